//! Bidirectional multi-layer LSTM classifier: word embeddings, a stacked BiLSTM over the words
//! in order, the last layer's final forward and backward states concatenated, then a linear head.
//!
//! Variable lengths are handled by packing: libtorch's packed LSTM runs each text over its own
//! tokens only, so the forward direction stops at the last real word and the backward direction
//! starts there. Padding therefore never reaches the states that the head reads.

use std::ops::Range;

use fl_common::ModelSpec;
use tch::{nn, nn::Module, Tensor};

use super::{sequence_ids, sequence_spans, Architecture, Batch};
use crate::tokenizer::HashedNgramTokenizer;

/// Embedding, BiLSTM, linear head. The LSTM weights are named as PyTorch's `nn.LSTM` names them
/// (`lstm.weight_ih_l0`, `lstm.weight_ih_l0_reverse`, ...).
#[derive(Debug)]
pub struct BiLstm {
    /// LSTM weights in libtorch's flat order: per layer, per direction, w_ih, w_hh, b_ih, b_hh.
    weights: Vec<Tensor>,
    layers: i64,
    hidden: i64,
    dropout: f64,
    max_len: u32,
    head: nn::Linear,
}

impl BiLstm {
    /// Creates `embedding.weight`, the LSTM weights under `lstm` and the head under `head`.
    pub fn new(root: &nn::Path<'_>, spec: &ModelSpec) -> BiLstm {
        let dim = i64::from(spec.embed_dim);
        let hidden = i64::from(spec.hidden);
        let layers = i64::from(spec.layers);
        let _ = root.sub("embedding").var(
            "weight",
            &[i64::from(spec.buckets), dim],
            nn::Init::Randn { mean: 0.0, stdev: 0.1 },
        );
        // PyTorch's nn.LSTM initialisation: every weight uniform in ±1/sqrt(hidden).
        let bound = 1.0 / (hidden as f64).sqrt();
        let init = nn::Init::Uniform { lo: -bound, up: bound };
        let lstm = root.sub("lstm");
        let mut weights = Vec::new();
        for layer in 0..layers {
            let input = if layer == 0 { dim } else { 2 * hidden };
            for suffix in ["", "_reverse"] {
                weights.push(lstm.var(&format!("weight_ih_l{layer}{suffix}"), &[4 * hidden, input], init));
                weights.push(lstm.var(&format!("weight_hh_l{layer}{suffix}"), &[4 * hidden, hidden], init));
                weights.push(lstm.var(&format!("bias_ih_l{layer}{suffix}"), &[4 * hidden], init));
                weights.push(lstm.var(&format!("bias_hh_l{layer}{suffix}"), &[4 * hidden], init));
            }
        }
        let head = nn::linear(root / "head", 2 * hidden, spec.num_classes() as i64, Default::default());
        BiLstm { weights, layers, hidden, dropout: f64::from(spec.dropout), max_len: spec.max_len, head }
    }
}

impl Architecture for BiLstm {
    fn token_ids(&self, tokenizer: &HashedNgramTokenizer, text: &str) -> Vec<i64> {
        sequence_ids(tokenizer, text, self.max_len)
    }

    fn token_spans(&self, _tokenizer: &HashedNgramTokenizer, text: &str) -> Vec<Range<usize>> {
        sequence_spans(text, self.max_len)
    }

    fn pooled(&self, table: &Tensor, batch: &Batch, train: bool) -> Tensor {
        let device = table.device();
        let mask = batch.mask.unsqueeze(-1).to_kind(table.kind());
        // Zeroed padding: an empty text reads one zero vector, whichever table row 0 is.
        let x = (Tensor::embedding(table, &batch.padded, -1, false, false) * mask).dropout(self.dropout, train);

        // Packing wants the texts longest first; sort, run, and put the states back in order.
        let lengths: Vec<i64> = batch.lengths.iter().map(|&l| l.max(1)).collect();
        let mut order: Vec<i64> = (0..lengths.len() as i64).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(lengths[i as usize]));
        let mut inverse = vec![0i64; order.len()];
        for (sorted, &original) in order.iter().enumerate() {
            inverse[original as usize] = sorted as i64;
        }
        let sorted_lengths: Vec<i64> = order.iter().map(|&i| lengths[i as usize]).collect();
        let order = Tensor::from_slice(&order).to_device(device);
        let (data, batch_sizes) =
            x.index_select(0, &order).internal_pack_padded_sequence(&Tensor::from_slice(&sorted_lengths), true);

        let zeros = Tensor::zeros([2 * self.layers, lengths.len() as i64, self.hidden], (table.kind(), device));
        let (_, h_n, _) = Tensor::lstm_data(
            &data,
            &batch_sizes,
            &[zeros.shallow_clone(), zeros],
            &self.weights,
            true,
            self.layers,
            self.dropout,
            train,
            true,
        );
        // h_n is [layers * directions, batch, hidden]; the last two rows are the top layer's
        // forward state (after the last word) and backward state (after the first word).
        let top = Tensor::cat(&[h_n.get(2 * self.layers - 2), h_n.get(2 * self.layers - 1)], 1);
        top.index_select(0, &Tensor::from_slice(&inverse).to_device(device))
    }

    fn head(&self, pooled: &Tensor, train: bool) -> Tensor {
        self.head.forward(&pooled.dropout(self.dropout, train))
    }

    fn head_names(&self) -> &'static [&'static str] {
        &["head.weight", "head.bias"]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Classifier;
    use fl_common::ModelKind;
    use tch::{Device, Kind};

    fn spec(layers: u32) -> ModelSpec {
        let mut spec = ModelSpec::with_defaults(ModelKind::Bilstm, vec!["a".into(), "b".into(), "c".into()]);
        spec.buckets = 512;
        spec.embed_dim = 8;
        spec.hidden = 6;
        spec.layers = layers;
        spec.max_len = 32;
        spec
    }

    #[test]
    fn padding_and_batch_neighbours_do_not_change_predictions() {
        for layers in [1, 2] {
            let model = Classifier::new(spec(layers), Device::Cpu, 3).unwrap();
            let short = "alpha beta gamma";
            let long = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen";
            let alone = model.predict_proba(&[short]);
            let batched = model.predict_proba(&[long, short, "", "delta"]);
            for (a, b) in alone[0].iter().zip(&batched[1]) {
                assert!((a - b).abs() < 1e-6, "{layers} layers: {:?} vs {:?}", alone[0], batched[1]);
            }
        }
    }

    #[test]
    fn packed_batch_equals_a_plain_bilstm_over_the_text_alone() {
        // The head reads the states of an unpadded BiLSTM run: the backward direction starts at
        // the last real word of each text, not at the padding after it.
        tch::manual_seed(5);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = BiLstm::new(&vs.root(), &spec(2));
        let table = vs.variables()["embedding.weight"].shallow_clone();
        let _guard = tch::no_grad_guard();
        let ids: Vec<i64> = vec![5, 17, 9, 300];
        let x = Tensor::embedding(&table, &Tensor::from_slice(&ids).unsqueeze(0), -1, false, false);
        let zeros = Tensor::zeros([4, 1, 6], (Kind::Float, Device::Cpu));
        let (_, h_n, _) =
            Tensor::lstm(&x, &[zeros.shallow_clone(), zeros], &net.weights, true, 2, 0.0, false, true, true);
        let reference = net.head.forward(&Tensor::cat(&[h_n.get(2), h_n.get(3)], 1)).get(0);
        let long: Vec<i64> = (20..32).collect();
        let batched = net.forward(&table, &Batch::new(&[long, ids.clone(), vec![]], Device::Cpu), false).get(1);
        let diff = (&reference - batched).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "max difference {diff}");
        // Reversing the words changes the forward and backward states: order matters.
        let reversed: Vec<i64> = ids.iter().rev().copied().collect();
        let other = net.forward(&table, &Batch::new(&[reversed], Device::Cpu), false).get(0);
        assert!((reference - other).abs().max().double_value(&[]) > 1e-4);
    }

    #[test]
    fn dropout_acts_only_in_training() {
        let mut s = spec(2);
        s.dropout = 0.5;
        let model = Classifier::new(s, Device::Cpu, 1).unwrap();
        let batch = Batch::new(&[vec![1, 2, 3, 4]], Device::Cpu);
        let table = model.embedding();
        let eval = |train| model.forward_with_table(&table, &batch, train);
        assert_eq!(eval(false).double_value(&[0, 0]), eval(false).double_value(&[0, 0]));
        let differs = (0..5).any(|_| (eval(true) - eval(true)).abs().max().double_value(&[]) > 1e-6);
        assert!(differs, "training forward passes should differ by dropout");
    }
}
