//! The edge model: export a trained model as a compact file (f16 or int8, pruned), run a
//! fastText model straight from its int8 table, and merge a minilm's adapters into a standalone
//! model that needs no base package.
//!
//! The file format is [`fl_common::compact`]'s. [`crate::model::Classifier::load`] reads both it
//! and the plain f32 model file, so `predict` and `--explain` take either.

use fl_common::compact::{encode_compact, CompactError, CompactModel, Precision, Values};
use fl_common::model_file::encode_model_with;
use fl_common::prune::{count_nonzero, prune_rows, prune_unchanged_rows, prune_weights, PruneScope};
use fl_common::{ModelKind, ModelSpec, NamedTensor, TensorSet};

use crate::model::{Classifier, EMBEDDING};

/// How to shrink a model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ExportOptions {
    /// Precision of the weight matrices (vectors stay f32).
    pub precision: Precision,
    /// Fraction of weights (or, with `prune_rows`, of embedding rows) set to zero, in `[0, 1)`.
    pub prune: f64,
    /// Where the magnitude threshold is taken for weight pruning.
    pub scope: PruneScope,
    /// Prune whole embedding rows by their norm instead of single weights; the other layers are
    /// kept whole.
    pub prune_rows: bool,
}

/// Why a model could not be exported.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The pruning fraction is outside `[0, 1)`.
    #[error("--prune must be in [0, 1), got {0}")]
    Fraction(f64),
    /// The weights do not fit the chosen precision.
    #[error(transparent)]
    Compact(#[from] CompactError),
}

/// A compact model file and what went into it.
#[derive(Clone, Debug)]
pub struct Export {
    /// The compact model file.
    pub bytes: Vec<u8>,
    /// Weights of the model.
    pub parameters: usize,
    /// Weights that are not zero in the file (after pruning and rounding).
    pub nonzero: usize,
    /// Embedding rows dropped by row pruning.
    pub rows_dropped: usize,
    /// Weights zeroed by weight pruning.
    pub weights_pruned: usize,
}

/// Prunes and quantizes `weights` into a compact model file.
pub fn export(spec: &ModelSpec, weights: &TensorSet, options: &ExportOptions) -> Result<Export, ExportError> {
    if !(0.0..1.0).contains(&options.prune) {
        return Err(ExportError::Fraction(options.prune));
    }
    let mut pruned = weights.clone();
    let (mut rows_dropped, mut weights_pruned) = (0, 0);
    if options.prune_rows {
        rows_dropped = prune_rows(&mut pruned, EMBEDDING, options.prune).unwrap_or(0);
    } else {
        weights_pruned = prune_weights(&mut pruned, options.prune, options.scope, &[]);
    }
    let bytes = encode_compact(spec, &pruned, options.precision)?;
    // Read back what was written: the counts are those of the file, and a file that would not
    // load is never written.
    let written = fl_common::compact::decode_compact(&bytes)?.to_tensor_set();
    Ok(Export {
        bytes,
        parameters: weights.num_values(),
        nonzero: count_nonzero(&written),
        rows_dropped,
        weights_pruned,
    })
}

/// Zeroes the embedding rows of `weights` (a model of `spec`) that are still those of the
/// federation's initial model in the file `initial` (`STATE/model/initial.safetensors`): the
/// buckets no client ever touched (`export --untouched-from`). Returns how many rows were zeroed;
/// the compact file then leaves them out.
pub fn drop_untouched_rows(
    weights: &mut TensorSet,
    spec: &ModelSpec,
    initial: &std::path::Path,
) -> Result<usize, String> {
    let name = initial.display();
    let bytes = std::fs::read(initial).map_err(|e| format!("{name}: {e}"))?;
    let (start_spec, start) = fl_common::decode_model(&bytes).map_err(|e| format!("{name}: not a model file: {e}"))?;
    start_spec.check_compatible(spec).map_err(|e| format!("{name}: not this model's initial weights: {e}"))?;
    prune_unchanged_rows(weights, &start, EMBEDDING).map_err(|e| format!("{name}: {e}"))
}

/// Why a model could not be merged.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    /// Only a minilm model has adapters and a base to fold them into.
    #[error(
        "--merge folds LoRA adapters into the pretrained base of a minilm model; this is a {0} model, which has \
         none (shrink it with --quantize and --prune instead)"
    )]
    NotMinilm(ModelKind),
    /// The model is merged already.
    #[error("the model is merged already (it holds its base); there is nothing to fold")]
    AlreadyMerged,
    /// The base could not be written out.
    #[error(transparent)]
    Pretrained(#[from] crate::pretrained::PretrainedError),
}

/// A merged standalone minilm model file and what went into it.
#[derive(Clone, Debug)]
pub struct Merged {
    /// The model file.
    pub bytes: Vec<u8>,
    /// Its spec: the model's, marked merged, without a base reference or LoRA fields.
    pub spec: ModelSpec,
    /// Weights in the file (base and head).
    pub parameters: usize,
    /// Adapters folded into the base's projections.
    pub adapters: usize,
}

/// Folds each LoRA adapter of a minilm `model` into its base (`W + (alpha / rank) · B A`) and
/// writes one standalone model file: the base's weights under the checkpoint's names, the head,
/// and the encoder config and tokenizer in the metadata, so that loading it reads no base.
pub fn merge(model: &Classifier) -> Result<Merged, MergeError> {
    if model.spec.merged {
        return Err(MergeError::AlreadyMerged);
    }
    let minilm = model.minilm().ok_or(MergeError::NotMinilm(model.spec.kind))?;
    let (base, metadata) = minilm.merged_base()?;
    let mut tensors: Vec<NamedTensor> = base
        .into_iter()
        .map(|(name, t)| {
            let shape = t.size().iter().map(|&d| d as usize).collect();
            let data = Vec::<f32>::try_from(&t.to_device(tch::Device::Cpu).contiguous().view(-1))
                .expect("base weights are f32");
            NamedTensor { name, shape, data }
        })
        .collect();
    tensors.extend(model.to_tensors().tensors.into_iter().filter(|t| t.name.starts_with("head.")));
    let weights = TensorSet::new(tensors);
    let spec = ModelSpec {
        base_sha256: String::new(),
        lora_rank: 0,
        lora_alpha: 0.0,
        lora_targets: String::new(),
        merged: true,
        ..model.spec.clone()
    };
    Ok(Merged {
        bytes: encode_model_with(&spec, &weights, metadata),
        spec,
        parameters: weights.num_values(),
        adapters: minilm.adapter_count(),
    })
}

/// A fastText model run from its int8 embedding table: each text's mean embedding is summed
/// from the 8-bit rows times their scales, in f32, then goes through the (f32) linear layer.
/// The table stays a quarter of the f32 size in memory, and is read a quarter as much.
#[derive(Clone, Debug)]
pub struct Int8FastText {
    q: Vec<i8>,
    scales: Vec<f32>,
    dim: usize,
    /// `[classes, dim]`.
    weight: Vec<f32>,
    bias: Vec<f32>,
}

impl Int8FastText {
    /// The int8 runner of a decoded compact fastText model, or `None` if it is not a fastText
    /// model whose embedding table is int8.
    pub fn from_compact(model: &CompactModel) -> Option<Int8FastText> {
        if model.spec.kind != ModelKind::Fasttext {
            return None;
        }
        let table = model.tensor(EMBEDDING)?;
        let Values::Int8 { q, scales } = &table.values else { return None };
        let weight = model.tensor("linear.weight")?.to_f32();
        let bias = model.tensor("linear.bias")?.to_f32();
        let dim = *table.shape.get(1)?;
        (weight.len() == bias.len() * dim).then(|| Int8FastText {
            q: q.clone(),
            scales: scales.clone(),
            dim,
            weight,
            bias,
        })
    }

    /// Class probabilities of texts given as token ids (as [`crate::model::Classifier::token_ids`]).
    pub fn predict_proba(&self, docs: &[Vec<i64>]) -> Vec<Vec<f32>> {
        let threads = (tch::get_num_threads().max(1) as usize).min(docs.len().div_ceil(256).max(1));
        if threads <= 1 {
            return docs.iter().map(|d| self.predict_one(d)).collect();
        }
        let chunk = docs.len().div_ceil(threads);
        std::thread::scope(|s| {
            let parts: Vec<_> = docs
                .chunks(chunk)
                .map(|part| s.spawn(move || part.iter().map(|d| self.predict_one(d)).collect::<Vec<_>>()))
                .collect();
            parts.into_iter().flat_map(|p| p.join().expect("int8 inference does not panic")).collect()
        })
    }

    fn predict_one(&self, ids: &[i64]) -> Vec<f32> {
        let mut mean = vec![0.0f32; self.dim];
        let rows = self.scales.len();
        for &id in ids {
            let r = (id.max(0) as usize).min(rows - 1);
            let scale = self.scales[r];
            for (m, &v) in mean.iter_mut().zip(&self.q[r * self.dim..(r + 1) * self.dim]) {
                *m += f32::from(v) * scale;
            }
        }
        let n = ids.len().max(1) as f32;
        let mut logits: Vec<f32> = self
            .bias
            .iter()
            .zip(self.weight.chunks(self.dim))
            .map(|(b, w)| b + w.iter().zip(&mean).map(|(w, m)| w * m).sum::<f32>() / n)
            .collect();
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut total = 0.0;
        for l in &mut logits {
            *l = (*l - max).exp();
            total += *l;
        }
        logits.iter_mut().for_each(|l| *l /= total);
        logits
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::central::testing::{generator, table, trained};
    use crate::model::Classifier;
    use crate::predict::evaluate_rows;
    use fl_common::compact::decode_compact;
    use tch::Device;

    fn options(precision: Precision, prune: f64, prune_rows: bool) -> ExportOptions {
        ExportOptions { precision, prune, scope: PruneScope::Tensor, prune_rows }
    }

    fn accuracy_of(bytes: &[u8], dir: &tempfile::TempDir, name: &str) -> (Classifier, f64) {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let model = Classifier::load(&path, Device::Cpu).unwrap();
        let generator = generator();
        let test = table(&generator, &generator.rows(400, 2));
        let accuracy = evaluate_rows(&model, &test).unwrap().accuracy;
        (model, accuracy)
    }

    #[test]
    fn an_int8_fasttext_export_loads_runs_in_int8_and_keeps_its_accuracy() {
        let dir = tempfile::tempdir().unwrap();
        let f32_model = trained(ModelKind::Fasttext);
        let (_, before) = accuracy_of(&f32_model.to_model_bytes(), &dir, "f32.safetensors");
        let weights = f32_model.to_tensors();
        let out = export(&f32_model.spec, &weights, &options(Precision::Int8, 0.0, false)).unwrap();
        // This small model is mostly untrained rows (incompressible noise): 68 bytes per 256 of f32.
        let ratio = out.bytes.len() as f64 / f32_model.to_model_bytes().len() as f64;
        assert!(ratio < 0.3, "int8 is {ratio:.3} of f32");
        let (int8, after) = accuracy_of(&out.bytes, &dir, "int8.fl");
        assert!(int8.runs_int8(), "a fastText int8 file runs from its int8 table");
        assert!((before - after).abs() <= 0.01, "f32 {before:.4}, int8 {after:.4}");

        // The int8 runner computes what the dequantized f32 model computes.
        let texts = ["kavo lomi nesu", "", "ta ri po ve da zu fe go hi ja ku ly mo ni ox pu"];
        let decoded = decode_compact(&out.bytes).unwrap();
        let dequantized =
            Classifier::from_tensors(decoded.spec.clone(), &decoded.to_tensor_set(), Device::Cpu).unwrap();
        assert!(!dequantized.runs_int8());
        for (a, b) in int8.predict_proba(&texts).iter().zip(dequantized.predict_proba(&texts)) {
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
            }
        }

        // Row pruning halves the table and still keeps the accuracy close.
        let rows = export(&f32_model.spec, &weights, &options(Precision::Int8, 0.5, true)).unwrap();
        assert_eq!(rows.rows_dropped, 4096 / 2);
        assert!(rows.bytes.len() < out.bytes.len() * 7 / 10, "{} vs {}", rows.bytes.len(), out.bytes.len());
        let (_, pruned) = accuracy_of(&rows.bytes, &dir, "rows.fl");
        assert!(before - pruned <= 0.03, "f32 {before:.4}, int8 half the rows {pruned:.4}");
    }

    #[test]
    fn pruning_a_transformer_zeroes_the_fraction_asked_and_its_file_shrinks() {
        let model = trained(ModelKind::Transformer);
        let weights = model.to_tensors();
        let f16 = export(&model.spec, &weights, &options(Precision::F16, 0.0, false)).unwrap();
        let half = export(&model.spec, &weights, &options(Precision::F16, 0.5, false)).unwrap();
        let matrices: usize = weights.tensors.iter().filter(|t| t.shape.len() >= 2).map(|t| t.data.len()).sum();
        assert!(half.weights_pruned >= matrices / 2 - weights.tensors.len() && half.weights_pruned <= matrices / 2);
        assert!(half.nonzero <= weights.num_values() - half.weights_pruned);
        assert!(half.bytes.len() < f16.bytes.len() * 8 / 10, "{} vs {}", half.bytes.len(), f16.bytes.len());
        let dir = tempfile::tempdir().unwrap();
        let (_, before) = accuracy_of(&model.to_model_bytes(), &dir, "t.safetensors");
        let (pruned, after) = accuracy_of(&half.bytes, &dir, "t.fl");
        assert!(!pruned.runs_int8());
        assert!(before - after <= 0.05, "f32 {before:.4}, half pruned {after:.4}");
        assert!(matches!(
            export(&model.spec, &weights, &options(Precision::F16, 1.0, false)),
            Err(ExportError::Fraction(_))
        ));
    }

    #[test]
    fn a_compact_file_whose_spec_does_not_fit_its_weights_is_refused_naming_the_file() {
        let model = trained(ModelKind::Fasttext);
        let mut spec = model.spec.clone();
        spec.embed_dim = 32;
        let bytes = encode_compact(&spec, &model.to_tensors(), Precision::Int8).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mismatch.fl");
        std::fs::write(&path, bytes).unwrap();
        let err = Classifier::load(&path, Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("mismatch.fl") && err.contains("embedding.weight") && err.contains("shape"), "{err}");
    }
}
