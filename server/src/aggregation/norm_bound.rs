//! Norm bounding (Sun et al. 2019, "Can you really backdoor federated learning?"): each update
//! is scaled down to an L2 norm of at most B before it is averaged, so no client moves the model
//! by more than B/n. Unlike `--max-update-norm`, which refuses a large update, the update still
//! counts, clipped.
//!
//! Every client weighs the same, as in the robust rules: an attacker could otherwise claim a huge
//! example count and make its clipped update the whole mean. It folds one update at a time into a
//! running sum, so memory is O(model) and it works in `--mode async` too.

use fl_common::TensorSet;

use super::{AggregationStrategy, ClientUpdate, FedAvg};

/// The mean of the updates, each clipped to an L2 norm of at most `bound`.
#[derive(Debug)]
pub struct NormBounded {
    bound: f64,
    mean: FedAvg,
    /// Updates of this round that were above the bound.
    pub clipped: usize,
}

impl NormBounded {
    /// Norm bounding at `bound` (> 0).
    pub fn new(bound: f64) -> Self {
        NormBounded { bound, mean: FedAvg::default(), clipped: 0 }
    }
}

impl AggregationStrategy for NormBounded {
    fn begin_round(&mut self, global: &TensorSet) {
        self.mean.begin_round(global);
        self.clipped = 0;
    }

    fn fold(&mut self, update: ClientUpdate<'_>) {
        let mut delta = update.delta.clone();
        if delta.clip_l2_norm(self.bound) > self.bound {
            self.clipped += 1;
        }
        self.mean.fold(ClientUpdate { delta: &delta, num_examples: 1 });
    }

    fn finish(&mut self, global: &TensorSet) -> Option<TensorSet> {
        self.mean.finish(global)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fl_common::NamedTensor;

    fn tensors(values: &[f32]) -> TensorSet {
        TensorSet::new(vec![NamedTensor { name: "w".into(), shape: vec![values.len()], data: values.to_vec() }])
    }

    #[test]
    fn each_update_is_clipped_to_the_bound_then_averaged_uniformly() {
        let global = tensors(&[0.0, 0.0]);
        let mut s = NormBounded::new(1.0);
        s.begin_round(&global);
        // Norm 0.5: kept as it is. Norm 50 (an attacker, claiming many examples): scaled to 1.
        s.fold(ClientUpdate { delta: &tensors(&[0.3, 0.4]), num_examples: 1 });
        s.fold(ClientUpdate { delta: &tensors(&[-30.0, -40.0]), num_examples: 1_000_000 });
        let next = s.finish(&global).unwrap();
        assert_eq!(s.clipped, 1);
        let want = [(0.3 - 0.6) / 2.0, (0.4 - 0.8) / 2.0];
        for (got, want) in next.tensors[0].data.iter().zip(want) {
            assert!((got - want).abs() < 1e-6, "{:?}", next.tensors[0].data);
        }
    }

    #[test]
    fn updates_within_the_bound_give_the_unweighted_mean() {
        let global = tensors(&[1.0]);
        let mut s = NormBounded::new(10.0);
        s.begin_round(&global);
        for (x, n) in [(1.0, 3), (2.0, 1), (-3.0, 7)] {
            s.fold(ClientUpdate { delta: &tensors(&[x]), num_examples: n });
        }
        assert_eq!(s.finish(&global).unwrap().tensors[0].data, vec![1.0]);
        assert_eq!(s.clipped, 0);
    }
}
