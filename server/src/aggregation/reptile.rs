//! Reptile (Nichol, Achiam and Schulman 2018, "On First-Order Meta-Learning Algorithms") as a
//! federated strategy, the meta-learning view of FedAvg (Jiang et al. 2019, "Improving Federated
//! Learning Personalization via Model Agnostic Meta Learning"): each client is a task, its local
//! training (k epochs of minibatch steps from the global model θ, `--local-epochs`) is the inner
//! loop that ends at φᵢ, and the server takes the meta step
//!
//! θ ← θ + ε · (1/n) Σᵢ (φᵢ − θ)
//!
//! with ε the server step size (`--server-lr`). Unlike FedAvg, every client (task) weighs the same
//! whatever its number of examples: the start is learnt for the average client, which is what a
//! per-client accuracy after local fine-tuning measures. With ε = 1 and equal shards it is FedAvg.

use fl_common::TensorSet;

use super::{AggregationStrategy, ClientUpdate};

/// The Reptile meta step over the round's updates, each client weighted equally.
#[derive(Debug)]
pub struct Reptile {
    /// ε, the server step size.
    step: f64,
    sum: Option<TensorSet>,
    folded: usize,
}

impl Reptile {
    /// Reptile with server step size `step` (ε).
    pub fn new(step: f64) -> Reptile {
        Reptile { step, sum: None, folded: 0 }
    }
}

impl AggregationStrategy for Reptile {
    fn begin_round(&mut self, global: &TensorSet) {
        self.sum = Some(global.zeros_like());
        self.folded = 0;
    }

    fn fold(&mut self, update: ClientUpdate<'_>) {
        let sum = self.sum.as_mut().expect("begin_round before fold");
        sum.add_scaled(update.delta, 1.0);
        self.folded += 1;
    }

    /// Every client weighs the same, as secure aggregation's uniform mean does.
    fn supports_secure_sum(&self) -> bool {
        true
    }

    fn fold_secure_sum(&mut self, mean: &TensorSet, count: usize) {
        let sum = self.sum.as_mut().expect("begin_round before fold");
        sum.add_scaled(mean, count as f32);
        self.folded += count;
    }

    fn finish(&mut self, global: &TensorSet) -> Option<TensorSet> {
        let sum = self.sum.take()?;
        if self.folded == 0 {
            return None;
        }
        let mut next = global.clone();
        next.add_scaled(&sum, (self.step / self.folded as f64) as f32);
        Some(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregation::FedAvg;
    use fl_common::NamedTensor;

    fn tensors(values: &[f32]) -> TensorSet {
        TensorSet::new(vec![NamedTensor { name: "w".into(), shape: vec![values.len()], data: values.to_vec() }])
    }

    #[test]
    fn the_meta_step_is_the_step_size_times_the_unweighted_mean_delta() {
        let global = tensors(&[1.0, -2.0]);
        let mut reptile = Reptile::new(0.5);
        reptile.begin_round(&global);
        // Example counts do not weigh: each client is one task.
        reptile.fold(ClientUpdate { delta: &tensors(&[1.0, 0.0]), num_examples: 300 });
        reptile.fold(ClientUpdate { delta: &tensors(&[-3.0, 4.0]), num_examples: 1 });
        let next = reptile.finish(&global).unwrap();
        // θ + 0.5 · ((1 − 3)/2, (0 + 4)/2) = (1 − 0.5, −2 + 1)
        assert_eq!(next.tensors[0].data, vec![0.5, -1.0]);
        // The next round starts afresh.
        reptile.begin_round(&next);
        assert!(reptile.finish(&next).is_none(), "nothing folded, no step");
    }

    #[test]
    fn step_one_with_equal_shards_is_fedavg() {
        let global = tensors(&[0.25, 4.0, -1.0]);
        let deltas = [tensors(&[1.0, 2.0, 3.0]), tensors(&[-0.5, 0.0, 6.0]), tensors(&[0.0, -8.0, 0.5])];
        let mut reptile = Reptile::new(1.0);
        let mut fedavg = FedAvg::default();
        reptile.begin_round(&global);
        fedavg.begin_round(&global);
        for d in &deltas {
            reptile.fold(ClientUpdate { delta: d, num_examples: 50 });
            fedavg.fold(ClientUpdate { delta: d, num_examples: 50 });
        }
        let (a, b) = (reptile.finish(&global).unwrap(), fedavg.finish(&global).unwrap());
        for (x, y) in a.tensors[0].data.iter().zip(&b.tensors[0].data) {
            assert!((x - y).abs() < 1e-6, "{x} vs {y}");
        }
    }

    #[test]
    fn a_secure_sum_takes_the_same_step_as_its_updates() {
        let global = tensors(&[1.0, -2.0]);
        let mut reptile = Reptile::new(0.5);
        assert!(reptile.supports_secure_sum());
        reptile.begin_round(&global);
        // The unmasked mean of (1, 0) and (−3, 4), as secure aggregation hands it over.
        reptile.fold_secure_sum(&tensors(&[-1.0, 2.0]), 2);
        assert_eq!(reptile.finish(&global).unwrap().tensors[0].data, vec![0.5, -1.0]);
    }
}
