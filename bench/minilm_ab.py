"""Averaging LoRA factors separately against averaging their products (issue 17).

FedAvg averages each adapter's A and B on their own, so the round's update of a projection is
mean(B) @ mean(A), while the average of the clients' own updates is mean(B @ A). Reads the model
files of clients trained from one start and prints, per adapter and overall, the relative
difference ||mean(B) mean(A) - mean(B A)|| / ||mean(B A)||, with the alpha/rank scale left out
(it cancels). Usage: python minilm_ab.py CLIENT_MODEL...  (run by bench/minilm-ab.sh)
"""
import json
import struct
import sys

import torch


def read(path):
    """The f32 tensors of a safetensors file, by name."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        data = bytearray(f.read())
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32", f"{path}: {name} is {info['dtype']}"
        start, end = info["data_offsets"]
        tensors[name] = torch.frombuffer(data[start:end], dtype=torch.float32).reshape(info["shape"])
    return tensors


models = [read(p) for p in sys.argv[1:]]
names = sorted(n[: -len(".a")] for n in models[0] if n.startswith("lora.") and n.endswith(".a"))
total_diff, total_ref = 0.0, 0.0
print("| adapter | mean(B)·mean(A) vs mean(B·A), relative |")
print("|---|---|")
for name in names:
    a = [m[name + ".a"] for m in models]
    b = [m[name + ".b"] for m in models]
    of_products = sum(bi @ ai for ai, bi in zip(a, b)) / len(models)
    of_means = (sum(b) / len(b)) @ (sum(a) / len(a))
    diff = (of_means - of_products).norm().item()
    ref = of_products.norm().item()
    total_diff += diff**2
    total_ref += ref**2
    print(f"| {name} | {diff / ref:.4f} |")
print(f"| all adapters | {(total_diff / total_ref) ** 0.5:.4f} |")
