//! `--model minilm`: the pretrained all-MiniLM-L6-v2 BERT encoder, written from its parts, frozen,
//! with LoRA adapters (Hu et al., 2021) on chosen projections and a linear head on the mean-pooled
//! output.
//!
//! The encoder: word + position + token-type embeddings and a LayerNorm; per layer, multi-head
//! self-attention with the padding masked out of the keys, then the output projection and a
//! post-norm residual, then a GELU feed-forward layer and a post-norm residual; mean pooling over
//! the real tokens. The base weights are not variables of the model: they live in
//! [`crate::pretrained::MinilmBase`], shared and never trained, so that the `VarStore` (what
//! travels, aggregates and is saved) holds only the adapters and the head.
//!
//! An adapter adds `(alpha / rank) · B A x` to a projection `W x + b`: A `[rank, in]` starts random,
//! B `[out, rank]` starts at zero, so a fresh model computes exactly the base's embedding.

use std::ops::Range;

use fl_common::ModelSpec;
use tch::{nn, nn::Module, Tensor};

use super::transformer::{masked_mean, scaled_dot_product_attention};
use super::{Architecture, Batch};
use crate::pretrained::{BaseParts, Dense, MinilmBase, Norm, PretrainedError};
use crate::tokenizer::HashedNgramTokenizer;

/// A low-rank adapter `B A` on one projection.
#[derive(Debug)]
struct Lora {
    a: Tensor,
    b: Tensor,
}

impl Lora {
    /// `lora.{layer}.{target}.a` and `.b` under `root`.
    fn new(path: nn::Path<'_>, rank: i64, inp: i64, out: i64) -> Lora {
        // PEFT's initialisation: A uniform with Kaiming's bound for a linear layer, B zero.
        let bound = 1.0 / (inp as f64).sqrt();
        Lora {
            a: path.var("a", &[rank, inp], nn::Init::Uniform { lo: -bound, up: bound }),
            b: path.var("b", &[out, rank], nn::Init::Const(0.0)),
        }
    }
}

/// The adapters of one layer, by target; `None` where the projection has none.
#[derive(Debug, Default)]
struct LayerAdapters {
    query: Option<Lora>,
    key: Option<Lora>,
    value: Option<Lora>,
    output: Option<Lora>,
    ffn_in: Option<Lora>,
    ffn_out: Option<Lora>,
}

impl LayerAdapters {
    /// The adapter on `target` (a name that [`crate::pretrained::MinilmBase::to_parts`] uses).
    fn on(&self, target: &str) -> Option<&Lora> {
        match target {
            "query" => self.query.as_ref(),
            "key" => self.key.as_ref(),
            "value" => self.value.as_ref(),
            "output" => self.output.as_ref(),
            "ffn_in" => self.ffn_in.as_ref(),
            "ffn_out" => self.ffn_out.as_ref(),
            _ => None,
        }
    }
}

/// The minilm classifier. Variables: `lora.{i}.{query,key,value,output,ffn_in,ffn_out}.{a,b}` for
/// the targets of the spec, and `head.weight`, `head.bias`.
#[derive(Debug)]
pub struct Minilm {
    base: MinilmBase,
    tokenizer: tokenizers::Tokenizer,
    adapters: Vec<LayerAdapters>,
    head: nn::Linear,
    scale: f64,
    dropout: f64,
}

impl Minilm {
    /// Creates the adapters and the head under `root` on top of `base`; the spec must match
    /// the base's shape (the caller checks the base's digest).
    pub fn new(root: &nn::Path<'_>, spec: &ModelSpec, base: MinilmBase) -> Result<Minilm, String> {
        let c = &base.config;
        let mut problems = Vec::new();
        for (field, spec_value, base_value) in [
            ("embed_dim", spec.embed_dim, c.hidden_size),
            ("layers", spec.layers, c.num_hidden_layers),
            ("heads", spec.heads, c.num_attention_heads),
            ("hidden", spec.hidden, c.intermediate_size),
            ("buckets", spec.buckets, c.vocab_size),
        ] {
            if i64::from(spec_value) != base_value {
                problems.push(format!("{field} is {spec_value} but the base has {base_value}"));
            }
        }
        if i64::from(spec.max_len) > c.max_position_embeddings {
            problems
                .push(format!("max_len {} exceeds the base's {} positions", spec.max_len, c.max_position_embeddings));
        }
        if !problems.is_empty() {
            return Err(format!("the spec does not fit the base in {}: {}", base.dir.display(), problems.join("; ")));
        }
        let mut tokenizer = (*base.tokenizer).clone();
        let truncation = tokenizers::TruncationParams { max_length: spec.max_len as usize, ..Default::default() };
        tokenizer.with_truncation(Some(truncation)).map_err(|e| format!("tokenizer truncation: {e}"))?;
        let (h, ffn, rank) = (c.hidden_size, c.intermediate_size, i64::from(spec.lora_rank));
        let targets = spec.lora_target_list();
        let adapters = (0..c.num_hidden_layers)
            .map(|i| {
                let path = root / "lora" / i;
                let make = |target: &str, inp: i64, out: i64| {
                    let on = rank > 0 && targets.contains(&target.split('_').next().unwrap_or(target));
                    on.then(|| Lora::new(&path / target, rank, inp, out))
                };
                LayerAdapters {
                    query: make("query", h, h),
                    key: make("key", h, h),
                    value: make("value", h, h),
                    output: make("output", h, h),
                    ffn_in: make("ffn_in", h, ffn),
                    ffn_out: make("ffn_out", ffn, h),
                }
            })
            .collect();
        let head = nn::linear(root / "head", h, spec.num_classes() as i64, Default::default());
        let scale = if rank > 0 { f64::from(spec.lora_alpha) / rank as f64 } else { 0.0 };
        Ok(Minilm { base, tokenizer, adapters, head, scale, dropout: f64::from(spec.dropout) })
    }

    /// `W x + b`, plus the adapter's `scale · B A dropout(x)` when there is one.
    fn project(&self, x: &Tensor, dense: &Dense, lora: Option<&Lora>, train: bool) -> Tensor {
        let y = x.linear(&dense.weight, Some(&dense.bias));
        match lora {
            Some(l) => y + x.dropout(self.dropout, train).matmul(&l.a.tr()).matmul(&l.b.tr()) * self.scale,
            None => y,
        }
    }

    fn norm(&self, x: &Tensor, norm: &Norm) -> Tensor {
        let dim = [self.base.config.hidden_size];
        x.layer_norm(dim, Some(&norm.weight), Some(&norm.bias), self.base.config.layer_norm_eps, false)
    }

    /// The last hidden states `[batch, positions, dim]`; `table` holds the word embeddings that
    /// `batch` indexes. (`--attention` stays with the word-level transformer: these positions are
    /// WordPiece tokens, not words.)
    fn encode(&self, table: &Tensor, batch: &Batch, train: bool) -> Tensor {
        let (b, t) = batch.padded.size2().expect("padded is [batch, positions]");
        let (dim, heads) = (self.base.config.hidden_size, self.base.config.num_attention_heads);
        let words = Tensor::embedding(table, &batch.padded, -1, false, false);
        let x = words + self.base.position.narrow(0, 0, t) + self.base.token_type.get(0);
        let mut x = self.norm(&x, &self.base.embedding_norm);
        let split = |y: Tensor| y.view([b, t, heads, dim / heads]).transpose(1, 2);
        for (layer, lora) in self.base.layers.iter().zip(&self.adapters) {
            let q = split(self.project(&x, &layer.query, lora.query.as_ref(), train));
            let k = split(self.project(&x, &layer.key, lora.key.as_ref(), train));
            let v = split(self.project(&x, &layer.value, lora.value.as_ref(), train));
            let (context, _) = scaled_dot_product_attention(&q, &k, &v, &batch.mask);
            let context = context.transpose(1, 2).contiguous().view([b, t, dim]);
            let attended = self.project(&context, &layer.attention_output, lora.output.as_ref(), train);
            x = self.norm(&(attended + &x), &layer.attention_norm);
            let inner = self.project(&x, &layer.ffn_in, lora.ffn_in.as_ref(), train).gelu("none");
            let out = self.project(&inner, &layer.ffn_out, lora.ffn_out.as_ref(), train);
            x = self.norm(&(out + &x), &layer.output_norm);
        }
        x
    }

    /// The WordPiece encoding of `text` with [CLS] and [SEP], truncated to `max_len`.
    fn encoding(&self, text: &str) -> tokenizers::Encoding {
        // WordPiece maps any text to ids ([UNK] for what it does not know); an error is a bug.
        self.tokenizer.encode(text, true).unwrap_or_default()
    }

    /// The frozen word embedding table of the base.
    pub fn word_embeddings(&self) -> Tensor {
        self.base.word.shallow_clone()
    }

    /// The base's weights under the checkpoint's names with each adapter folded into its
    /// projection (`W + (alpha / rank) · B A`, so the adapter's term of [`Minilm::project`] moves
    /// into `W`), and the config and tokenizer as model file metadata: the standalone model of
    /// `fl-client export --merge`, without the head.
    pub fn merged_base(&self) -> Result<BaseParts, PretrainedError> {
        let _guard = tch::no_grad_guard();
        self.base.to_parts(|layer, target, weight| match self.adapters[layer].on(target) {
            Some(l) => (weight + l.b.matmul(&l.a) * self.scale).detach(),
            None => weight.shallow_clone(),
        })
    }

    /// Adapters (A-B pairs) of the model.
    pub fn adapter_count(&self) -> usize {
        let names = ["query", "key", "value", "output", "ffn_in", "ffn_out"];
        self.adapters.iter().map(|a| names.iter().filter(|n| a.on(n).is_some()).count()).sum()
    }
}

/// Byte ranges of the words of `text` as [`crate::tokenizer::words`] splits them.
fn word_byte_ranges(text: &str) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in text.char_indices() {
        let in_word = c.is_alphanumeric() || c == '\'';
        match (in_word, start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                out.push(s..i);
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        out.push(s..text.len());
    }
    out
}

impl Architecture for Minilm {
    fn token_ids(&self, _tokenizer: &HashedNgramTokenizer, text: &str) -> Vec<i64> {
        self.encoding(text).get_ids().iter().map(|&id| i64::from(id)).collect()
    }

    /// The word each WordPiece token starts in; [CLS], [SEP] and punctuation get an empty range.
    fn token_spans(&self, _tokenizer: &HashedNgramTokenizer, text: &str) -> Vec<Range<usize>> {
        let words = word_byte_ranges(text);
        let encoding = self.encoding(text);
        encoding
            .get_offsets()
            .iter()
            .zip(encoding.get_special_tokens_mask())
            .map(|(&(start, end), &special)| {
                let word =
                    (special == 0 && end > start).then(|| words.iter().position(|w| w.contains(&start))).flatten();
                word.map_or(0..0, |w| w..w + 1)
            })
            .collect()
    }

    fn pooled(&self, table: &Tensor, batch: &Batch, train: bool) -> Tensor {
        masked_mean(&self.encode(table, batch, train), &batch.mask)
    }

    fn head(&self, pooled: &Tensor, train: bool) -> Tensor {
        self.head.forward(&pooled.dropout(self.dropout, train))
    }

    fn head_names(&self) -> &'static [&'static str] {
        &["head.weight", "head.bias"]
    }

    fn frozen_embedding(&self) -> Option<Tensor> {
        Some(self.word_embeddings())
    }

    fn as_minilm(&self) -> Option<&Minilm> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Classifier, ModelError};
    use crate::pretrained::install_for_tests;
    use fl_common::{ModelKind, TensorSet};
    use tch::Device;

    fn spec(classes: usize, rank: u32, targets: &str) -> ModelSpec {
        let labels = (0..classes).map(|i| format!("c{i}")).collect();
        let mut spec = ModelSpec::with_defaults(ModelKind::Minilm, labels);
        spec.lora_rank = rank;
        spec.lora_targets = targets.into();
        spec
    }

    #[derive(serde::Deserialize)]
    struct Reference {
        max_len: u32,
        sentences: Vec<String>,
        input_ids: Vec<Vec<i64>>,
        embeddings: Vec<Vec<f32>>,
    }

    fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs())).fold(0.0, f32::max)
    }

    /// minilm-reference.json holds the mean-pooled embeddings that Hugging Face transformers
    /// computes on the same files (`scripts/minilm-reference.sh > model/src/model/minilm-reference.json`).
    #[test]
    fn mean_pooled_embeddings_match_the_transformers_reference() {
        install_for_tests();
        let reference: Reference = serde_json::from_str(include_str!("minilm-reference.json")).unwrap();
        let mut spec = spec(2, 8, "query,value");
        spec.max_len = reference.max_len;
        let model = Classifier::new(spec, Device::Cpu, 0).unwrap();
        let texts: Vec<&str> = reference.sentences.iter().map(String::as_str).collect();
        let ids: Vec<Vec<i64>> = texts.iter().map(|t| model.token_ids(t)).collect();
        assert_eq!(ids, reference.input_ids, "WordPiece ids differ from the reference tokenizer's");
        // Batched together (with padding) as the reference was: the mask must hide the padding.
        let pooled = model.pooled(&texts);
        let diff = max_abs_diff(&pooled, &reference.embeddings);
        assert!(diff < 1e-4, "largest difference from the reference: {diff}");
        // One at a time, without padding, gives the same.
        let single: Vec<Vec<f32>> = texts.iter().map(|t| model.pooled(&[t]).remove(0)).collect();
        assert!(max_abs_diff(&single, &reference.embeddings) < 1e-4);
    }

    #[test]
    fn rank_zero_and_zeroed_b_compute_the_base() {
        install_for_tests();
        let texts = ["a first sentence", "and another, somewhat longer, sentence to embed"];
        let base = Classifier::new(spec(3, 0, "query,value"), Device::Cpu, 1).unwrap();
        assert_eq!(base.vs.variables().len(), 2, "rank 0 has only the head");
        let mut adapted = Classifier::new(spec(3, 4, "query,key,value,output,ffn"), Device::Cpu, 1).unwrap();
        // A fresh adapter has B = 0: exactly the base.
        assert!(max_abs_diff(&adapted.pooled(&texts), &base.pooled(&texts)) < 1e-6);
        // Random B changes the embedding; zeroing B again restores the base.
        let mut weights = adapted.to_tensors();
        for t in weights.tensors.iter_mut().filter(|t| t.name.ends_with(".b")) {
            t.data.iter_mut().enumerate().for_each(|(i, v)| *v = ((i % 7) as f32 - 3.0) * 0.05);
        }
        adapted.load_tensors(&weights).unwrap();
        assert!(max_abs_diff(&adapted.pooled(&texts), &base.pooled(&texts)) > 1e-3, "B must matter");
        for t in weights.tensors.iter_mut().filter(|t| t.name.ends_with(".b")) {
            t.data.fill(0.0);
        }
        adapted.load_tensors(&weights).unwrap();
        assert!(max_abs_diff(&adapted.pooled(&texts), &base.pooled(&texts)) < 1e-6);
    }

    #[test]
    fn only_adapters_and_head_are_weights() {
        install_for_tests();
        let model = Classifier::new(spec(10, 8, "query,value"), Device::Cpu, 1).unwrap();
        let weights: TensorSet = model.to_tensors();
        assert!(weights.tensors.iter().all(|t| t.name.starts_with("lora.") || t.name.starts_with("head.")));
        assert_eq!(weights.tensors.iter().filter(|t| t.name.starts_with("lora.")).count(), 6 * 2 * 2);
        // The count for rank 8 on query and value with 10 classes: 77,578 weights.
        assert_eq!(model.num_parameters(), 77_578);
        assert!(!model.embedding_trains());
        let ffn = Classifier::new(spec(2, 2, "ffn"), Device::Cpu, 1).unwrap();
        let shapes: Vec<(String, Vec<usize>)> = ffn
            .to_tensors()
            .tensors
            .into_iter()
            .filter(|t| t.name.starts_with("lora.0."))
            .map(|t| (t.name, t.shape))
            .collect();
        assert_eq!(
            shapes,
            [
                ("lora.0.ffn_in.a".to_string(), vec![2, 384]),
                ("lora.0.ffn_in.b".to_string(), vec![1536, 2]),
                ("lora.0.ffn_out.a".to_string(), vec![2, 1536]),
                ("lora.0.ffn_out.b".to_string(), vec![384, 2]),
            ]
        );
    }

    #[test]
    fn a_model_built_on_another_base_is_refused() {
        let dir = install_for_tests();
        let mut other = spec(2, 8, "query,value");
        other.base_sha256 = "ab".repeat(32);
        let err = Classifier::new(other, Device::Cpu, 0).unwrap_err().to_string();
        assert!(err.contains(&"ab".repeat(32)) && err.contains(fl_common::MINILM_BASE_SHA256), "{err}");
        assert!(err.contains(&dir.join("model.safetensors").display().to_string()), "{err}");
    }

    #[test]
    fn training_moves_adapters_and_head_and_leaves_the_base_alone() {
        install_for_tests();
        let mut spec = spec(2, 4, "query,value");
        spec.max_len = 16;
        let mut model = Classifier::new(spec, Device::Cpu, 3).unwrap();
        let table_before = model.embedding().copy();
        let before = model.to_tensors();
        let texts: Vec<String> = (0..8)
            .map(|i| if i % 2 == 0 { format!("great happy day {i}") } else { format!("awful sad night {i}") })
            .collect();
        let data = crate::train::EncodedDataset::encode(&model, &texts, (0..8).map(|i| i % 2).collect());
        let config = crate::train::TrainConfig {
            epochs: 3,
            batch_size: 4,
            lr: 0.01,
            optimizer: crate::train::OptimizerKind::Adam,
            seed: 1,
            proximal_mu: 0.0,
        };
        let stats = crate::train::train(&mut model, &data, &config, &Default::default(), |_, _| {});
        assert_eq!(stats.examples, 8);
        assert!(model.embedding().equal(&table_before), "the frozen table changed");
        let after = model.to_tensors();
        for (b, a) in before.tensors.iter().zip(&after.tensors) {
            assert_ne!(b.data, a.data, "{} did not train", b.name);
        }
        assert_eq!(model.predict_proba(&["great happy day", "awful sad night"]).len(), 2);
    }

    #[test]
    fn a_merged_model_computes_the_adapted_model_from_its_own_file() {
        install_for_tests();
        let texts = ["a first sentence", "and another, somewhat longer, sentence to classify", "x"];
        let mut model = Classifier::new(spec(3, 4, "query,key,value,output,ffn"), Device::Cpu, 5).unwrap();
        // Trained adapters have B away from zero; these values move the embedding well past 1e-4.
        let mut weights = model.to_tensors();
        for t in weights.tensors.iter_mut().filter(|t| t.name.ends_with(".b")) {
            t.data.iter_mut().enumerate().for_each(|(i, v)| *v = ((i % 5) as f32 - 2.0) * 0.04);
        }
        model.load_tensors(&weights).unwrap();
        let base_only = Classifier::new(spec(3, 0, ""), Device::Cpu, 5).unwrap();
        assert!(max_abs_diff(&model.pooled(&texts), &base_only.pooled(&texts)) > 1e-2, "the adapters must matter");

        let merged = crate::edge::merge(&model).unwrap();
        assert!(merged.spec.merged && merged.spec.base_sha256.is_empty() && merged.spec.lora_rank == 0);
        assert_eq!(merged.adapters, 6 * 6, "query, key, value, output and both ffn projections in 6 layers");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("merged.safetensors");
        std::fs::write(&path, &merged.bytes).unwrap();
        let standalone = Classifier::load(&path, Device::Cpu).unwrap();
        assert_eq!(standalone.spec, merged.spec);
        let logits = |m: &Classifier| {
            let docs: Vec<Vec<i64>> = texts.iter().map(|t| m.token_ids(t)).collect();
            let _guard = tch::no_grad_guard();
            Vec::<Vec<f32>>::try_from(&m.forward(&crate::model::Batch::new(&docs, Device::Cpu))).unwrap()
        };
        assert_eq!(standalone.token_ids(texts[1]), model.token_ids(texts[1]), "the tokenizer travels in the file");
        for (what, diff) in [
            ("logits", max_abs_diff(&logits(&standalone), &logits(&model))),
            ("probabilities", max_abs_diff(&standalone.predict_proba(&texts), &model.predict_proba(&texts))),
            ("pooled", max_abs_diff(&standalone.pooled(&texts), &model.pooled(&texts))),
        ] {
            assert!(diff < 1e-4, "merged {what} differ from the adapted model's by {diff}");
        }

        // It is not rebuilt from its spec (the base is in the file), nor saved as its head alone,
        // nor merged twice; a fastText model has nothing to merge.
        let err = Classifier::from_tensors(merged.spec.clone(), &standalone.to_tensors(), Device::Cpu).unwrap_err();
        assert!(matches!(err, ModelError::MergedWithoutBase), "{err}");
        assert!(matches!(standalone.save(&dir.path().join("x")), Err(ModelError::MergedWithoutBase)));
        assert!(matches!(crate::edge::merge(&standalone), Err(crate::edge::MergeError::AlreadyMerged)));
        let mut ft = ModelSpec::with_defaults(ModelKind::Fasttext, vec!["a".into(), "b".into()]);
        ft.buckets = 64;
        let err = crate::edge::merge(&Classifier::new(ft, Device::Cpu, 0).unwrap()).unwrap_err().to_string();
        assert!(err.contains("this is a fasttext model"), "{err}");
    }

    #[test]
    fn token_spans_point_at_the_words_tokens_start_in() {
        install_for_tests();
        let model = Classifier::new(spec(2, 0, ""), Device::Cpu, 0).unwrap();
        let text = "Unaffordable, naïvely!";
        let ids = model.token_ids(text);
        let spans = model.token_spans(text);
        assert_eq!(ids.len(), spans.len());
        assert_eq!(spans.first(), Some(&(0..0)), "[CLS]");
        assert_eq!(spans.last(), Some(&(0..0)), "[SEP]");
        assert!(spans.contains(&(1..2)), "{spans:?}");
        assert_eq!(spans.iter().map(|s| s.end).max(), Some(2));
    }
}
