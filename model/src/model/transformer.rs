//! A small Transformer encoder classifier, written from its parts: word embeddings plus learned
//! positional embeddings, pre-norm residual blocks of multi-head scaled dot-product
//! self-attention and a feed-forward layer, a final layer norm, mean or CLS pooling, a linear head.
//!
//! Padding is masked out of the attention keys and out of the pooling, so it never changes a
//! prediction. The CLS vector (for `pooling = "cls"`) is its own parameter, not a token id.

use std::ops::Range;

use fl_common::ModelSpec;
use tch::{nn, nn::Module, Kind, Tensor};

use super::{sequence_ids, sequence_spans, Architecture, Batch};
use crate::tokenizer::HashedNgramTokenizer;

/// Score given to masked keys before the softmax: finite, so that a text with no tokens gets
/// uniform (unused) weights instead of NaN, and small enough that `exp` of it is exactly 0.
const MASKED_SCORE: f64 = -1e9;

/// softmax(Q Kᵀ / sqrt(d_k)) V over keys where `key_mask` is true.
///
/// `q`, `k`, `v` are `[batch, heads, positions, d_k]`, `key_mask` is `[batch, positions]` bool.
/// Returns the output `[batch, heads, positions, d_k]` and the weights `[batch, heads, queries, keys]`.
pub(crate) fn scaled_dot_product_attention(q: &Tensor, k: &Tensor, v: &Tensor, key_mask: &Tensor) -> (Tensor, Tensor) {
    let d_k = *q.size().last().expect("q has dimensions");
    let scores = q.matmul(&k.transpose(-2, -1)) / (d_k as f64).sqrt();
    let scores = scores.masked_fill(&key_mask.logical_not().unsqueeze(1).unsqueeze(1), MASKED_SCORE);
    let weights = scores.softmax(-1, q.kind());
    (weights.matmul(v), weights)
}

/// Adds the first `positions` rows of the learned positional table to `x` (`[batch, positions, dim]`).
pub(crate) fn add_positions(x: &Tensor, table: &Tensor) -> Tensor {
    x + table.narrow(0, 0, x.size()[1])
}

/// Mean of `x` (`[batch, positions, dim]`) over the positions where `mask` is true; zero for none.
pub(crate) fn masked_mean(x: &Tensor, mask: &Tensor) -> Tensor {
    let m = mask.unsqueeze(-1).to_kind(x.kind());
    (x * &m).sum_dim_intlist(1, false, x.kind()) / m.sum_dim_intlist(1, false, x.kind()).clamp_min(1.0)
}

/// Multi-head self-attention with query, key, value and output projections.
#[derive(Debug)]
struct MultiHeadAttention {
    query: nn::Linear,
    key: nn::Linear,
    value: nn::Linear,
    output: nn::Linear,
    heads: i64,
}

impl MultiHeadAttention {
    fn new(path: nn::Path<'_>, dim: i64, heads: i64) -> Self {
        let linear = |name: &str| nn::linear(&path / name, dim, dim, Default::default());
        MultiHeadAttention {
            query: linear("query"),
            key: linear("key"),
            value: linear("value"),
            output: linear("output"),
            heads,
        }
    }

    /// Output `[batch, positions, dim]` and weights `[batch, heads, positions, positions]`.
    fn forward(&self, x: &Tensor, mask: &Tensor) -> (Tensor, Tensor) {
        let (b, t, dim) = x.size3().expect("x is [batch, positions, dim]");
        let split = |y: Tensor| y.view([b, t, self.heads, dim / self.heads]).transpose(1, 2);
        let (out, weights) = scaled_dot_product_attention(
            &split(self.query.forward(x)),
            &split(self.key.forward(x)),
            &split(self.value.forward(x)),
            mask,
        );
        (self.output.forward(&out.transpose(1, 2).contiguous().view([b, t, dim])), weights)
    }
}

/// Pre-norm residual block: x + Attention(LN(x)), then x + FeedForward(LN(x)).
#[derive(Debug)]
struct EncoderBlock {
    attention_norm: nn::LayerNorm,
    attention: MultiHeadAttention,
    ff_norm: nn::LayerNorm,
    ff_in: nn::Linear,
    ff_out: nn::Linear,
}

impl EncoderBlock {
    fn new(path: nn::Path<'_>, dim: i64, hidden: i64, heads: i64) -> Self {
        EncoderBlock {
            attention_norm: nn::layer_norm(&path / "attention_norm", vec![dim], Default::default()),
            attention: MultiHeadAttention::new(&path / "attention", dim, heads),
            ff_norm: nn::layer_norm(&path / "ff_norm", vec![dim], Default::default()),
            ff_in: nn::linear(&path / "ff_in", dim, hidden, Default::default()),
            ff_out: nn::linear(&path / "ff_out", hidden, dim, Default::default()),
        }
    }

    /// The block's output and its attention weights.
    fn forward(&self, x: &Tensor, mask: &Tensor, dropout: f64, train: bool) -> (Tensor, Tensor) {
        let (attended, weights) = self.attention.forward(&self.attention_norm.forward(x), mask);
        let x = x + attended.dropout(dropout, train);
        let ff = self.ff_in.forward(&self.ff_norm.forward(&x)).gelu("none").dropout(dropout, train);
        let x = &x + self.ff_out.forward(&ff).dropout(dropout, train);
        (x, weights)
    }
}

/// The encoder classifier. Parameters: `embedding.weight`, `positions.weight`, `cls` (CLS
/// pooling only), `blocks.{i}.{attention_norm,attention.{query,key,value,output},ff_norm,ff_in,ff_out}`,
/// `final_norm`, `head`.
#[derive(Debug)]
pub struct Transformer {
    positions: Tensor,
    cls: Option<Tensor>,
    blocks: Vec<EncoderBlock>,
    final_norm: nn::LayerNorm,
    head: nn::Linear,
    dropout: f64,
    max_len: u32,
}

impl Transformer {
    /// Creates the parameters under `root`. `spec.embed_dim` is the model width, `spec.hidden`
    /// the feed-forward width.
    pub fn new(root: &nn::Path<'_>, spec: &ModelSpec) -> Transformer {
        let dim = i64::from(spec.embed_dim);
        let cls = spec.pooling == "cls";
        let _ = root.sub("embedding").var(
            "weight",
            &[i64::from(spec.buckets), dim],
            nn::Init::Randn { mean: 0.0, stdev: 0.1 },
        );
        // With CLS pooling the CLS vector takes position 0 and the words follow.
        let positions = root.sub("positions").var(
            "weight",
            &[i64::from(spec.max_len) + i64::from(cls), dim],
            nn::Init::Randn { mean: 0.0, stdev: 0.02 },
        );
        let cls = cls.then(|| root.var("cls", &[dim], nn::Init::Randn { mean: 0.0, stdev: 0.1 }));
        let blocks = (0..spec.layers)
            .map(|i| EncoderBlock::new(root / "blocks" / i, dim, i64::from(spec.hidden), i64::from(spec.heads)))
            .collect();
        Transformer {
            positions,
            cls,
            blocks,
            final_norm: nn::layer_norm(root / "final_norm", vec![dim], Default::default()),
            head: nn::linear(root / "head", dim, spec.num_classes() as i64, Default::default()),
            dropout: f64::from(spec.dropout),
            max_len: spec.max_len,
        }
    }

    /// The normalised encoder output `[batch, positions, dim]`, its mask, and the last block's
    /// attention weights `[batch, heads, positions, positions]`.
    fn encode(&self, table: &Tensor, batch: &Batch, train: bool) -> (Tensor, Tensor, Tensor) {
        let t = batch.padded.size()[1].min(i64::from(self.max_len));
        let mut x = Tensor::embedding(table, &batch.padded.narrow(1, 0, t), -1, false, false);
        let mut mask = batch.mask.narrow(1, 0, t);
        if let Some(cls) = &self.cls {
            let b = x.size()[0];
            x = Tensor::cat(&[cls.view([1, 1, -1]).expand([b, 1, -1], false), x], 1);
            mask = Tensor::cat(&[Tensor::ones([b, 1], (Kind::Bool, mask.device())), mask], 1);
        }
        let mut x = add_positions(&x, &self.positions).dropout(self.dropout, train);
        let mut last = Tensor::new();
        for block in &self.blocks {
            (x, last) = block.forward(&x, &mask, self.dropout, train);
        }
        (self.final_norm.forward(&x), mask, last)
    }
}

impl Architecture for Transformer {
    fn token_ids(&self, tokenizer: &HashedNgramTokenizer, text: &str) -> Vec<i64> {
        sequence_ids(tokenizer, text, self.max_len)
    }

    fn token_spans(&self, _tokenizer: &HashedNgramTokenizer, text: &str) -> Vec<Range<usize>> {
        sequence_spans(text, self.max_len)
    }

    fn pooled(&self, table: &Tensor, batch: &Batch, train: bool) -> Tensor {
        let (x, mask, _) = self.encode(table, batch, train);
        if self.cls.is_some() {
            x.select(1, 0)
        } else {
            masked_mean(&x, &mask)
        }
    }

    fn head(&self, pooled: &Tensor, train: bool) -> Tensor {
        self.head.forward(&pooled.dropout(self.dropout, train))
    }

    fn head_names(&self) -> &'static [&'static str] {
        &["head.weight", "head.bias"]
    }

    fn last_attention(&self, table: &Tensor, batch: &Batch) -> Option<Tensor> {
        let (_, _, weights) = self.encode(table, batch, false);
        Some(weights.mean_dim(1, false, weights.kind()))
    }

    fn attention_positions(&self, tokens: usize) -> Vec<Option<usize>> {
        let words = (0..tokens.min(self.max_len as usize)).map(Some);
        if self.cls.is_some() {
            std::iter::once(None).chain(words).collect()
        } else {
            words.collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Classifier;
    use fl_common::ModelKind;
    use tch::Device;

    fn spec(pooling: &str) -> ModelSpec {
        let mut spec = ModelSpec::with_defaults(ModelKind::Transformer, vec!["a".into(), "b".into(), "c".into()]);
        spec.buckets = 512;
        spec.embed_dim = 8;
        spec.hidden = 16;
        spec.heads = 2;
        spec.layers = 2;
        spec.max_len = 16;
        spec.pooling = pooling.into();
        spec
    }

    fn tensor(data: &[f32], shape: &[i64]) -> Tensor {
        Tensor::from_slice(data).view(shape)
    }

    fn close(a: &Tensor, b: &Tensor, tol: f64) {
        assert_eq!(a.size(), b.size());
        let diff = (a - b).abs().max().double_value(&[]);
        assert!(diff < tol, "max difference {diff}\n{a}\n{b}");
    }

    #[test]
    fn attention_matches_a_hand_computed_masked_softmax() {
        // One head, three positions, d_k = 2; the third key is padding.
        let q = [[1.0f64, 0.0], [0.0, 2.0], [1.0, 1.0]];
        let k = [[1.0f64, 1.0], [-1.0, 0.5], [3.0, 3.0]];
        let v = [[1.0f64, 2.0], [3.0, -1.0], [100.0, 100.0]];
        let flat =
            |m: &[[f64; 2]; 3]| tensor(&m.iter().flatten().map(|&x| x as f32).collect::<Vec<_>>(), &[1, 1, 3, 2]);
        let mask = Tensor::from_slice(&[true, true, false]).view([1, 3]);
        let (out, weights) = scaled_dot_product_attention(&flat(&q), &flat(&k), &flat(&v), &mask);
        for (i, qi) in q.iter().enumerate() {
            let i = i as i64;
            let scores: Vec<f64> = k[..2].iter().map(|kj| (qi[0] * kj[0] + qi[1] * kj[1]) / 2f64.sqrt()).collect();
            let z: f64 = scores.iter().map(|s| s.exp()).sum();
            let w: Vec<f64> = scores.iter().map(|s| s.exp() / z).collect();
            for (j, wj) in w.iter().enumerate() {
                assert!((weights.double_value(&[0, 0, i, j as i64]) - wj).abs() < 1e-6);
            }
            assert_eq!(weights.double_value(&[0, 0, i, 2]), 0.0, "padding gets no weight");
            for (c, (v0, v1)) in v[0].iter().zip(&v[1]).enumerate() {
                let expected = w[0] * v0 + w[1] * v1;
                assert!((out.double_value(&[0, 0, i, c as i64]) - expected).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn multi_head_attention_is_per_head_attention_of_sliced_projections() {
        tch::manual_seed(1);
        let vs = nn::VarStore::new(Device::Cpu);
        let (dim, heads, t) = (8, 2, 5);
        let mha = MultiHeadAttention::new(vs.root() / "attention", dim, heads);
        let x = Tensor::randn([1, t, dim], (Kind::Float, Device::Cpu));
        let mask = Tensor::from_slice(&[true, true, true, false, false]).view([1, t]);
        let (out, weights) = mha.forward(&x, &mask);
        let d_k = dim / heads;
        let project = |l: &nn::Linear, h: i64| {
            x.matmul(&l.ws.narrow(0, h * d_k, d_k).tr()) + l.bs.as_ref().unwrap().narrow(0, h * d_k, d_k)
        };
        let mut per_head = Vec::new();
        for h in 0..heads {
            let (q, k, v) = (project(&mha.query, h), project(&mha.key, h), project(&mha.value, h));
            let scores = q.matmul(&k.transpose(-2, -1)) / (d_k as f64).sqrt();
            let scores = scores.narrow(2, 0, 3);
            let w = scores.softmax(-1, Kind::Float);
            close(&w, &weights.get(0).get(h).narrow(1, 0, 3).unsqueeze(0), 1e-6);
            per_head.push(w.matmul(&v.narrow(1, 0, 3)));
        }
        let expected = mha.output.forward(&Tensor::cat(&per_head, 2));
        close(&out, &expected, 1e-5);
    }

    #[test]
    fn layer_norm_is_standardise_then_scale_and_shift() {
        tch::manual_seed(2);
        let vs = nn::VarStore::new(Device::Cpu);
        let norm = nn::layer_norm(vs.root() / "norm", vec![4], Default::default());
        tch::no_grad(|| {
            norm.ws.as_ref().unwrap().shallow_clone().copy_(&tensor(&[1.0, 2.0, 0.5, -1.0], &[4]));
            norm.bs.as_ref().unwrap().shallow_clone().copy_(&tensor(&[0.0, 1.0, -1.0, 0.5], &[4]));
        });
        let x = [[1.0f64, 2.0, 3.0, 6.0], [-2.0, 0.0, 0.0, 2.0]];
        let out = norm.forward(&tensor(&x.iter().flatten().map(|&v| v as f32).collect::<Vec<_>>(), &[2, 4]));
        let (w, b) = ([1.0, 2.0, 0.5, -1.0], [0.0, 1.0, -1.0, 0.5]);
        for (r, row) in x.iter().enumerate() {
            let mean = row.iter().sum::<f64>() / 4.0;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 4.0;
            for c in 0..4 {
                let expected = (row[c] - mean) / (var + 1e-5).sqrt() * w[c] + b[c];
                assert!((out.double_value(&[r as i64, c as i64]) - expected).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn positions_add_row_by_row_and_pooling_averages_real_tokens() {
        let table = tensor(&(0..12).map(|v| v as f32 * 10.0).collect::<Vec<_>>(), &[6, 2]);
        let x = tensor(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[1, 3, 2]);
        let added = add_positions(&x, &table);
        close(&added, &tensor(&[1.0, 12.0, 23.0, 34.0, 45.0, 56.0], &[1, 3, 2]), 1e-6);

        let x = tensor(&[1.0, 2.0, 3.0, 4.0, 100.0, 100.0, 7.0, 8.0, -5.0, -5.0, -5.0, -5.0], &[2, 3, 2]);
        let mask = Tensor::from_slice(&[true, true, false, false, false, false]).view([2, 3]);
        close(&masked_mean(&x, &mask), &tensor(&[2.0, 3.0, 0.0, 0.0], &[2, 2]), 1e-6);
    }

    #[test]
    fn padding_and_batch_neighbours_do_not_change_predictions() {
        for pooling in ["mean", "cls"] {
            let model = Classifier::new(spec(pooling), Device::Cpu, 3).unwrap();
            let short = "alpha beta gamma";
            let long = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen";
            let alone = model.predict_proba(&[short]);
            let batched = model.predict_proba(&[long, short, "", "delta"]);
            for (a, b) in alone[0].iter().zip(&batched[1]) {
                assert!((a - b).abs() < 1e-6, "{pooling}: {:?} vs {:?}", alone[0], batched[1]);
            }
            assert!(batched[2].iter().all(|p| p.is_finite()), "an empty text still gets probabilities");
        }
    }

    #[test]
    fn cls_is_a_parameter_and_attention_rows_are_distributions_over_real_tokens() {
        let model = Classifier::new(spec("cls"), Device::Cpu, 4).unwrap();
        let vars = model.vs.variables();
        assert_eq!(vars["cls"].size(), vec![8]);
        assert_eq!(vars["positions.weight"].size(), vec![17, 8], "max_len words plus the CLS position");
        let attention = model.attention("alpha beta gamma").unwrap();
        assert_eq!(attention.positions, vec![None, Some(0), Some(1), Some(2)]);
        for row in &attention.weights {
            assert_eq!(row.len(), 4);
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
        let mean = Classifier::new(spec("mean"), Device::Cpu, 4).unwrap();
        assert!(!mean.vs.variables().contains_key("cls"));
    }

    #[test]
    fn dropout_acts_only_in_training() {
        let mut s = spec("mean");
        s.dropout = 0.5;
        let model = Classifier::new(s, Device::Cpu, 1).unwrap();
        let batch = Batch::new(&[vec![1, 2, 3, 4]], Device::Cpu);
        let table = model.embedding();
        let run = |train| model.forward_with_table(&table, &batch, train);
        close(&run(false), &run(false), 0.0 + 1e-12);
        let differs = (0..5).any(|_| (run(true) - run(true)).abs().max().double_value(&[]) > 1e-6);
        assert!(differs, "training forward passes should differ by dropout");
    }

    #[test]
    fn texts_longer_than_max_len_are_cut() {
        let model = Classifier::new(spec("mean"), Device::Cpu, 1).unwrap();
        let long: Vec<String> = (0..40).map(|i| format!("w{i}")).collect();
        assert_eq!(model.token_ids(&long.join(" ")).len(), 16);
        assert_eq!(model.token_spans(&long.join(" ")).len(), 16);
        assert_eq!(model.predict_proba(&[long.join(" ").as_str()])[0].len(), 3);
    }
}
