"""Reference mean-pooled embeddings of all-MiniLM-L6-v2 with Hugging Face transformers, for the
fixture that model/src/model/minilm.rs's test compares against. Run by scripts/minilm-reference.sh."""
import json
import sys

import torch
import transformers
from transformers import AutoModel, AutoTokenizer

model_dir, max_len = sys.argv[1], int(sys.argv[2])
sentences = [
    "The quick brown fox jumps over the lazy dog.",
    "Federated learning keeps private text on the device; only adapter weights travel!",
    "Tokenizers split unaffordable words: WordPiece, naïvely?",
]
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModel.from_pretrained(model_dir).eval()
batch = tokenizer(sentences, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
with torch.no_grad():
    hidden = model(**batch).last_hidden_state
mask = batch["attention_mask"].unsqueeze(-1).float()
pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
print(json.dumps({
    "produced_by": f"transformers {transformers.__version__}, torch {torch.__version__}: scripts/minilm-reference.sh",
    "max_len": max_len,
    "sentences": sentences,
    "input_ids": [[i for i, m in zip(ids, am) if m] for ids, am in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist())],
    "embeddings": [[round(v, 7) for v in row] for row in pooled.tolist()],
}, ensure_ascii=False))
