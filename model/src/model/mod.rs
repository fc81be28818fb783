//! The text classifiers, in tch. A [`Classifier`] pairs an [`Architecture`] with its
//! [`ModelSpec`]; its weights convert to and from the plain [`TensorSet`] used on the wire.
//!
//! Every architecture starts with an embedding table indexed by hashed token ids. Its forward
//! pass takes that table as an argument, so that training can pass only the rows a batch touches
//! and update just those rows (see `train`), and so that explanations can scale each token's
//! embedding on its own (see `explain`).

mod bilstm;
mod fasttext;
mod minilm;
mod transformer;

use std::ops::Range;
use std::path::Path;

use fl_common::model_file::{decode_model_with, encode_model};
use fl_common::tensors::TensorError;
use fl_common::{ModelKind, ModelSpec, NamedTensor, TensorSet};
use tch::{nn, Device, Kind, Tensor};

use crate::tokenizer::HashedNgramTokenizer;

pub use bilstm::BiLstm;
pub use fasttext::FastText;
pub use minilm::Minilm;
pub use transformer::Transformer;

/// Name of the embedding table in every architecture.
pub const EMBEDDING: &str = "embedding.weight";

/// Errors of model construction, loading and saving.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    /// The file is not a valid model file.
    #[error("{path}: not a valid model file: {reason}")]
    Invalid { path: String, reason: String },
    /// The spec does not make a model.
    #[error(transparent)]
    Spec(#[from] fl_common::SpecError),
    /// The weights do not fit the architecture.
    #[error("weights do not fit the model: {0}")]
    Weights(#[from] TensorError),
    /// The pretrained base of a minilm model is missing, unreadable or not the one the spec names.
    #[error(transparent)]
    Pretrained(#[from] crate::pretrained::PretrainedError),
    /// The spec does not fit the pretrained base.
    #[error("{0}")]
    Base(String),
    /// libtorch failed.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// A merged minilm (`fl-client export --merge`) built from its spec alone: its base is in
    /// its file, which only [`Classifier::load`] reads.
    #[error(
        "a merged minilm model (fl-client export --merge) carries its base in its own file: load that file to \
         predict or evaluate; to train or federate, start from the adapter model it was merged from"
    )]
    MergedWithoutBase,
    /// Training diverged: a model with NaN or infinite weights is never written.
    #[error("{path}: not written: the weights are not finite (training diverged; lower --lr)")]
    NonFinite { path: String },
}

/// A batch of tokenized documents, ready for a forward pass.
#[derive(Debug)]
pub struct Batch {
    /// Token ids of all documents, concatenated; each indexes a row of the table given to forward.
    pub ids: Tensor,
    /// Start of each document in `ids`.
    pub offsets: Tensor,
    /// Number of tokens of each document.
    pub lengths: Vec<i64>,
    /// The same ids as a `[batch, max_len]` matrix padded with 0, for sequence models.
    pub padded: Tensor,
    /// `[batch, max_len]` bool, true at real tokens.
    pub mask: Tensor,
}

impl Batch {
    /// Builds a batch from token id lists (already mapped to table rows). Empty documents get
    /// one padding position so that shapes stay valid; their mask is all false.
    pub fn new(docs: &[Vec<i64>], device: Device) -> Batch {
        let lengths: Vec<i64> = docs.iter().map(|d| d.len() as i64).collect();
        let mut offsets = Vec::with_capacity(docs.len());
        let mut flat = Vec::with_capacity(lengths.iter().sum::<i64>() as usize);
        for d in docs {
            offsets.push(flat.len() as i64);
            flat.extend_from_slice(d);
        }
        let max_len = lengths.iter().copied().max().unwrap_or(0).max(1) as usize;
        let mut padded = vec![0i64; docs.len() * max_len];
        let mut mask = vec![false; docs.len() * max_len];
        for (b, d) in docs.iter().enumerate() {
            padded[b * max_len..b * max_len + d.len()].copy_from_slice(d);
            mask[b * max_len..b * max_len + d.len()].fill(true);
        }
        let shape = [docs.len() as i64, max_len as i64];
        Batch {
            ids: Tensor::from_slice(&flat).to_device(device),
            offsets: Tensor::from_slice(&offsets).to_device(device),
            lengths,
            padded: Tensor::from_slice(&padded).view(shape).to_device(device),
            mask: Tensor::from_slice(&mask).view(shape).to_device(device),
        }
    }
}

/// A classifier architecture: its parameters live in a `VarStore`, under the names that go on the wire.
pub trait Architecture: std::fmt::Debug + Send {
    /// Token ids of one text, as this architecture reads it.
    fn token_ids(&self, tokenizer: &HashedNgramTokenizer, text: &str) -> Vec<i64>;
    /// For each id of [`Architecture::token_ids`], the words of the text it stands for, as a
    /// range of indices into [`crate::tokenizer::words`] (one word, or the words of an n-gram).
    fn token_spans(&self, tokenizer: &HashedNgramTokenizer, text: &str) -> Vec<Range<usize>>;
    /// The pooled representation of each text `[batch, features]`: what the classifier head reads.
    /// `table` holds the embedding rows that `batch.ids` (and `batch.padded`) index: the whole
    /// table, or only the rows that a training batch touches. Dropout is active only when `train`.
    fn pooled(&self, table: &Tensor, batch: &Batch, train: bool) -> Tensor;
    /// Logits `[batch, classes]` from [`Architecture::pooled`]'s output.
    fn head(&self, pooled: &Tensor, train: bool) -> Tensor;
    /// Logits `[batch, classes]`; `table` as in [`Architecture::pooled`].
    fn forward(&self, table: &Tensor, batch: &Batch, train: bool) -> Tensor {
        self.head(&self.pooled(table, batch, train), train)
    }
    /// Names of the classifier head's weights (the part FedPer keeps local).
    fn head_names(&self) -> &'static [&'static str];
    /// Attention weights of the last layer averaged over heads, `[batch, positions, positions]`
    /// (query by key), for architectures that attend; positions are as in
    /// [`Architecture::attention_positions`].
    fn last_attention(&self, _table: &Tensor, _batch: &Batch) -> Option<Tensor> {
        None
    }
    /// Names of the positions of [`Architecture::last_attention`] for a document of `tokens` tokens.
    fn attention_positions(&self, tokens: usize) -> Vec<Option<usize>> {
        (0..tokens).map(Some).collect()
    }
    /// The embedding table when it is frozen and not a variable (a pretrained base's).
    fn frozen_embedding(&self) -> Option<Tensor> {
        None
    }
    /// The minilm model, to merge its adapters into its base.
    fn as_minilm(&self) -> Option<&Minilm> {
        None
    }
}

/// Word ids in text order, cut at `max_len`: what the sequence models read.
fn sequence_ids(tokenizer: &HashedNgramTokenizer, text: &str, max_len: u32) -> Vec<i64> {
    let mut ids = tokenizer.word_ids(text);
    ids.truncate(max_len as usize);
    ids
}

/// One word per id, for [`sequence_ids`].
fn sequence_spans(text: &str, max_len: u32) -> Vec<Range<usize>> {
    let n = crate::tokenizer::words(text).len().min(max_len as usize);
    (0..n).map(|i| i..i + 1).collect()
}

/// Attention weights over the positions of one text.
#[derive(Clone, Debug, PartialEq)]
pub struct Attention {
    /// What each position is: the index of a word of the text, or `None` for the CLS vector.
    pub positions: Vec<Option<usize>>,
    /// `weights[query][key]`; each row sums to one.
    pub weights: Vec<Vec<f32>>,
}

/// A text classifier: architecture, weights and spec.
#[derive(Debug)]
pub struct Classifier {
    /// What the model is.
    pub spec: ModelSpec,
    /// The weights.
    pub vs: nn::VarStore,
    net: Box<dyn Architecture>,
    tokenizer: HashedNgramTokenizer,
    /// Set when the model was loaded from an int8 compact fastText file: predictions then run
    /// from the int8 table (training and explanations use the f32 weights in `vs`).
    int8: Option<crate::edge::Int8FastText>,
}

impl Classifier {
    /// A freshly initialised model; the same seed gives the same weights. The spec is
    /// validated first, so that a bad spec from a file or the network is an error, not a panic.
    pub fn new(spec: ModelSpec, device: Device, seed: u64) -> Result<Classifier, ModelError> {
        Classifier::build(spec, device, seed, None)
    }

    /// [`Classifier::new`], on `merged` for a merged minilm (whose base is in its file).
    fn build(
        spec: ModelSpec,
        device: Device,
        seed: u64,
        merged: Option<crate::pretrained::MinilmBase>,
    ) -> Result<Classifier, ModelError> {
        spec.validate()?;
        // libtorch's generator is global: hold it from seeding to the last initialised weight, so
        // that models built on other threads meanwhile do not change these weights.
        static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _init = INIT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        tch::manual_seed(seed as i64);
        let vs = nn::VarStore::new(device);
        let net: Box<dyn Architecture> = match spec.kind {
            ModelKind::Fasttext => Box::new(FastText::new(&vs.root(), &spec)),
            ModelKind::Bilstm => Box::new(BiLstm::new(&vs.root(), &spec)),
            ModelKind::Transformer => Box::new(Transformer::new(&vs.root(), &spec)),
            ModelKind::Minilm => {
                let base = match merged {
                    Some(base) => base,
                    None if spec.merged => return Err(ModelError::MergedWithoutBase),
                    None => crate::pretrained::base(device, &spec.base_sha256)?,
                };
                Box::new(Minilm::new(&vs.root(), &spec, base).map_err(ModelError::Base)?)
            }
        };
        let tokenizer = HashedNgramTokenizer::new(spec.buckets, spec.ngrams);
        Ok(Classifier { spec, vs, net, tokenizer, int8: None })
    }

    /// A model with the given weights.
    pub fn from_tensors(spec: ModelSpec, weights: &TensorSet, device: Device) -> Result<Classifier, ModelError> {
        let mut model = Classifier::new(spec, device, 0)?;
        model.load_tensors(weights)?;
        Ok(model)
    }

    /// The device the weights are on.
    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// The minilm model, when it is one (see [`crate::edge::merge`]).
    pub fn minilm(&self) -> Option<&Minilm> {
        self.net.as_minilm()
    }

    /// The tokenizer of this model.
    pub fn tokenizer(&self) -> &HashedNgramTokenizer {
        &self.tokenizer
    }

    /// Token ids of a text as the architecture reads it.
    pub fn token_ids(&self, text: &str) -> Vec<i64> {
        self.net.token_ids(&self.tokenizer, text)
    }

    /// For each id of [`Classifier::token_ids`], the range of words of the text it stands for.
    pub fn token_spans(&self, text: &str) -> Vec<Range<usize>> {
        self.net.token_spans(&self.tokenizer, text)
    }

    /// Number of weights.
    pub fn num_parameters(&self) -> usize {
        self.vs.variables().values().map(|t| t.numel()).sum()
    }

    /// The last layer's attention of one text, averaged over heads; `None` for architectures
    /// without attention.
    pub fn attention(&self, text: &str) -> Option<Attention> {
        let _guard = tch::no_grad_guard();
        let ids = self.token_ids(text);
        let batch = Batch::new(std::slice::from_ref(&ids), self.device());
        let weights = self.net.last_attention(&self.embedding(), &batch)?;
        let weights = Vec::<Vec<f32>>::try_from(&weights.get(0).to_device(Device::Cpu)).ok()?;
        Some(Attention { positions: self.net.attention_positions(ids.len()), weights })
    }

    /// The embedding table: a variable, or a pretrained base's frozen table (see
    /// [`Classifier::embedding_trains`]).
    pub fn embedding(&self) -> Tensor {
        if let Some(table) = self.net.frozen_embedding() {
            return table;
        }
        self.vs.variables().remove(EMBEDDING).expect("every architecture has an embedding table")
    }

    /// False when the embedding table is a frozen pretrained one that training leaves alone.
    pub fn embedding_trains(&self) -> bool {
        self.net.frozen_embedding().is_none()
    }

    /// Logits for a batch whose ids index `table`.
    pub fn forward_with_table(&self, table: &Tensor, batch: &Batch, train: bool) -> Tensor {
        self.net.forward(table, batch, train)
    }

    /// Logits for a batch of full-table token ids.
    pub fn forward(&self, batch: &Batch) -> Tensor {
        self.net.forward(&self.embedding(), batch, false)
    }

    /// True when [`Classifier::predict_proba`] runs from an int8 table (see [`crate::edge`]).
    pub fn runs_int8(&self) -> bool {
        self.int8.is_some()
    }

    /// Texts per batch when predicting or evaluating. Sequence models hold activations for every
    /// token of every layer at once (a minilm batch of 512 texts took 1.9 GB), so they take fewer.
    fn inference_batch(&self) -> usize {
        match self.spec.kind {
            ModelKind::Fasttext => 512,
            _ => 64,
        }
    }

    /// The pooled representation of each text (what the classifier head reads), one row per text.
    pub fn pooled(&self, texts: &[&str]) -> Vec<Vec<f32>> {
        let _guard = tch::no_grad_guard();
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(self.inference_batch()) {
            let docs: Vec<Vec<i64>> = chunk.iter().map(|t| self.token_ids(t)).collect();
            let pooled = self.net.pooled(&self.embedding(), &Batch::new(&docs, self.device()), false);
            out.extend(Vec::<Vec<f32>>::try_from(&pooled.to_device(Device::Cpu)).expect("features are f32"));
        }
        out
    }

    /// Names of the classifier head's weights.
    pub fn head_names(&self) -> &'static [&'static str] {
        self.net.head_names()
    }

    /// Class probabilities for each text.
    pub fn predict_proba(&self, texts: &[&str]) -> Vec<Vec<f32>> {
        if let Some(int8) = &self.int8 {
            let docs: Vec<Vec<i64>> = texts.iter().map(|t| self.token_ids(t)).collect();
            return int8.predict_proba(&docs);
        }
        let _guard = tch::no_grad_guard();
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(self.inference_batch()) {
            let docs: Vec<Vec<i64>> = chunk.iter().map(|t| self.token_ids(t)).collect();
            let probs = self.forward(&Batch::new(&docs, self.device())).softmax(-1, Kind::Float).to_device(Device::Cpu);
            let rows: Vec<Vec<f32>> = Vec::<Vec<f32>>::try_from(&probs).expect("probabilities are f32");
            out.extend(rows);
        }
        out
    }

    /// Accuracy (fraction) and mean cross-entropy over labelled token lists.
    pub fn evaluate(&self, docs: &[Vec<i64>], labels: &[i64]) -> (f64, f64) {
        let _guard = tch::no_grad_guard();
        let (mut correct, mut loss_sum) = (0.0f64, 0.0f64);
        let batch = self.inference_batch();
        for (d, l) in docs.chunks(batch).zip(labels.chunks(batch)) {
            let logits = self.forward(&Batch::new(d, self.device()));
            let target = Tensor::from_slice(l).to_device(self.device());
            loss_sum += logits.cross_entropy_for_logits(&target).double_value(&[]) * l.len() as f64;
            correct += logits.argmax(-1, false).eq_tensor(&target).sum(Kind::Double).double_value(&[]);
        }
        let n = labels.len().max(1) as f64;
        (correct / n, loss_sum / n)
    }

    /// The weights as plain tensors.
    pub fn to_tensors(&self) -> TensorSet {
        let tensors = self
            .vs
            .variables()
            .into_iter()
            .map(|(name, t)| {
                let shape = t.size().iter().map(|&d| d as usize).collect();
                let flat = t.detach().to_device(Device::Cpu).contiguous().view(-1);
                let data = Vec::<f32>::try_from(&flat).expect("weights are f32");
                NamedTensor { name, shape, data }
            })
            .collect();
        TensorSet::new(tensors)
    }

    /// `self`'s weights minus `base` (of the same names and shapes): a client's update.
    pub fn delta_from(&self, base: &TensorSet) -> TensorSet {
        let mut delta = self.to_tensors();
        for (d, b) in delta.tensors.iter_mut().zip(&base.tensors) {
            d.data.iter_mut().zip(&b.data).for_each(|(x, y)| *x -= y);
        }
        delta
    }

    /// Replaces the weights; names and shapes must match, and every value be finite. Each
    /// weight is copied once, straight from `weights`.
    pub fn load_tensors(&mut self, weights: &TensorSet) -> Result<(), ModelError> {
        let vars = self.vs.variables();
        let fits = weights.tensors.len() == vars.len()
            && weights.tensors.iter().all(|t| {
                vars.get(&t.name).is_some_and(|v| v.size().iter().map(|&d| d as usize).eq(t.shape.iter().copied()))
            });
        if !fits {
            // The slow comparison, for its error message.
            weights.check_matches(&self.shapes())?;
        }
        for t in &weights.tensors {
            if let Some(index) = fl_common::tensors::first_non_finite(&t.data) {
                return Err(TensorError::NonFinite { name: t.name.clone(), index }.into());
            }
        }
        tch::no_grad(|| {
            for t in &weights.tensors {
                let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
                let mut strides = vec![1i64; shape.len()];
                for i in (0..shape.len().saturating_sub(1)).rev() {
                    strides[i] = strides[i + 1] * shape[i + 1];
                }
                let mut var = vars[&t.name].shallow_clone();
                // SAFETY: the view reads `t.data` (f32, `shape`'s product of values, contiguous),
                // which outlives it: `copy_` reads it on this thread and the view is dropped
                // right after, before `weights` can be touched.
                let source = unsafe {
                    Tensor::from_blob(t.data.as_ptr().cast::<u8>(), &shape, &strides, Kind::Float, Device::Cpu)
                };
                var.copy_(&source);
            }
        });
        Ok(())
    }

    /// Names and shapes of the weights (values zero).
    fn shapes(&self) -> TensorSet {
        TensorSet::new(
            self.vs
                .variables()
                .into_iter()
                .map(|(name, t)| {
                    let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
                    let n = shape.iter().product();
                    NamedTensor { name, shape, data: vec![0.0; n] }
                })
                .collect(),
        )
    }

    /// Encodes the model as a model file: safetensors with the spec in the metadata.
    pub fn to_model_bytes(&self) -> Vec<u8> {
        encode_model(&self.spec, &self.to_tensors())
    }

    /// Writes the model file atomically.
    pub fn save(&self, path: &Path) -> Result<(), ModelError> {
        if self.spec.merged {
            // Its weights here are the head only; the base is written by `export --merge`.
            return Err(ModelError::MergedWithoutBase);
        }
        let weights = self.to_tensors();
        if !weights.tensors.iter().all(|t| t.data.iter().all(|v| v.is_finite())) {
            return Err(ModelError::NonFinite { path: path.display().to_string() });
        }
        fl_common::files::write_atomic(path, &encode_model(&self.spec, &weights), 0o644)
            .map_err(|source| ModelError::Io { path: path.display().to_string(), source })
    }

    /// Reads a model file: the plain f32 model file, or a compact one (`fl-client export`).
    /// Errors name the file.
    pub fn load(path: &Path, device: Device) -> Result<Classifier, ModelError> {
        let invalid = |reason: String| ModelError::Invalid { path: path.display().to_string(), reason };
        let bytes =
            std::fs::read(path).map_err(|source| ModelError::Io { path: path.display().to_string(), source })?;
        if fl_common::compact::is_compact(&bytes) {
            let compact = fl_common::compact::decode_compact(&bytes).map_err(|e| invalid(e.to_string()))?;
            let mut model = Classifier::from_tensors(compact.spec.clone(), &compact.to_tensor_set(), device)
                .map_err(|e| invalid(e.to_string()))?;
            model.int8 = crate::edge::Int8FastText::from_compact(&compact);
            return Ok(model);
        }
        let (spec, weights, metadata) = decode_model_with(&bytes).map_err(|e| invalid(e.to_string()))?;
        if spec.merged {
            return Classifier::load_merged(path, spec, weights, &metadata, device).map_err(|e| invalid(e.to_string()));
        }
        Classifier::from_tensors(spec, &weights, device).map_err(|e| invalid(e.to_string()))
    }

    /// A merged minilm from its file's parts: the base's tensors and metadata, and the head.
    fn load_merged(
        path: &Path,
        spec: ModelSpec,
        weights: TensorSet,
        metadata: &std::collections::HashMap<String, String>,
        device: Device,
    ) -> Result<Classifier, ModelError> {
        let (head, base): (Vec<NamedTensor>, Vec<NamedTensor>) =
            weights.tensors.into_iter().partition(|t| t.name.starts_with("head."));
        let base = base
            .into_iter()
            .map(|t| {
                let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
                (t.name, Tensor::from_slice(&t.data).view(shape.as_slice()))
            })
            .collect();
        let base = crate::pretrained::merged_base(path, metadata, base, device)?;
        let mut model = Classifier::build(spec, device, 0, Some(base))?;
        model.load_tensors(&TensorSet::new(head))?;
        Ok(model)
    }
}

/// The device to train on: the first CUDA device if there is one, else the CPU.
pub fn default_device() -> Device {
    Device::cuda_if_available()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(kind: ModelKind) -> ModelSpec {
        let mut spec = ModelSpec::with_defaults(kind, vec!["x".into(), "y".into(), "z".into()]);
        spec.buckets = 1024;
        spec
    }

    #[test]
    fn every_kind_round_trips_through_a_model_file() {
        let dir = tempfile::tempdir().unwrap();
        let texts = ["a short text", "and a somewhat longer one with more words in it", ""];
        for kind in [ModelKind::Fasttext, ModelKind::Bilstm, ModelKind::Transformer] {
            let mut specs = vec![small(kind)];
            if kind == ModelKind::Transformer {
                specs.push(ModelSpec { pooling: "cls".into(), layers: 1, ..small(kind) });
            }
            for spec in specs {
                let model = Classifier::new(spec.clone(), Device::Cpu, 9).unwrap();
                let path = dir.path().join(format!("{kind}-{}.safetensors", spec.pooling));
                model.save(&path).unwrap();
                let loaded = Classifier::load(&path, Device::Cpu).unwrap();
                assert_eq!(loaded.spec, spec);
                assert_eq!(loaded.to_tensors(), model.to_tensors(), "{kind}");
                assert_eq!(loaded.predict_proba(&texts), model.predict_proba(&texts), "{kind}");
                assert!(model.vs.variables().contains_key(EMBEDDING));
            }
        }
    }

    #[test]
    fn an_invalid_spec_is_an_error_not_a_panic() {
        let mut spec = small(ModelKind::Transformer);
        spec.heads = 5;
        let err = Classifier::new(spec, Device::Cpu, 0).unwrap_err();
        assert!(err.to_string().contains("divisible"), "{err}");
    }
}
