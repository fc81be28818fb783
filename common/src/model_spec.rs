//! What a model is: architecture, hyper-parameters, tokenizer settings and labels. Stored in the
//! metadata of every model file, so that a model file is all that prediction needs.

use serde::{Deserialize, Serialize};

/// The architecture of the text classifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// Hashed n-gram EmbeddingBag with mean pooling, then a linear layer.
    Fasttext,
    /// Embedding, bidirectional multi-layer LSTM, linear head.
    Bilstm,
    /// Small pre-norm Transformer encoder with learned positions.
    Transformer,
}

impl std::fmt::Display for ModelKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ModelKind::Fasttext => "fasttext",
            ModelKind::Bilstm => "bilstm",
            ModelKind::Transformer => "transformer",
        })
    }
}

impl std::str::FromStr for ModelKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "fasttext" => Ok(ModelKind::Fasttext),
            "bilstm" => Ok(ModelKind::Bilstm),
            "transformer" => Ok(ModelKind::Transformer),
            other => Err(format!("unknown model '{other}' (expected fasttext, bilstm or transformer)")),
        }
    }
}

/// Everything that defines a model apart from its weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// Architecture.
    pub kind: ModelKind,
    /// Class labels, in output order.
    pub labels: Vec<String>,
    /// Size of the hashed token id space.
    pub buckets: u32,
    /// Width of the token embeddings.
    pub embed_dim: u32,
    /// Longest n-gram hashed by the tokenizer (1 = unigrams, 2 = unigrams and bigrams).
    pub ngrams: u32,
    /// Recurrent or encoder layers (bilstm, transformer).
    #[serde(default)]
    pub layers: u32,
    /// LSTM hidden size or Transformer feed-forward width.
    #[serde(default)]
    pub hidden: u32,
    /// Attention heads (transformer).
    #[serde(default)]
    pub heads: u32,
    /// Longest token sequence fed to a sequence model; longer texts are truncated.
    #[serde(default)]
    pub max_len: u32,
    /// Dropout probability during training.
    #[serde(default)]
    pub dropout: f32,
    /// Pooling of the transformer: "mean" or "cls".
    #[serde(default)]
    pub pooling: String,
    /// The federation that made this model: the SHA-256 fingerprint of its CA, or empty for a
    /// model trained centrally.
    #[serde(default)]
    pub federation: String,
}

impl ModelSpec {
    /// Number of classes.
    pub fn num_classes(&self) -> usize {
        self.labels.len()
    }

    /// The index of `label`, if it is one of the model's labels.
    pub fn label_index(&self, label: &str) -> Option<usize> {
        self.labels.iter().position(|l| l == label)
    }

    /// Checks that two specs describe the same architecture with the same labels (weights may differ).
    pub fn check_compatible(&self, other: &ModelSpec) -> Result<(), String> {
        let mut a = self.clone();
        let mut b = other.clone();
        a.federation.clear();
        b.federation.clear();
        if a.labels != b.labels {
            return Err(format!("labels differ: {:?} vs {:?}", a.labels, b.labels));
        }
        if a != b {
            return Err(format!(
                "architecture differs: {} vs {}",
                serde_json::to_string(&a).unwrap_or_default(),
                serde_json::to_string(&b).unwrap_or_default()
            ));
        }
        Ok(())
    }
}
