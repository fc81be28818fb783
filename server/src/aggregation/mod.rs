//! Aggregation strategies. They work on plain f32 buffers and never need libtorch.
//!
//! Mean-based strategies fold updates into a running sum as they arrive, so memory grows with the
//! model, not with the number of clients. The robust ones ([`robust`]: median, trimmed mean,
//! Krum) need every update of the round at once: they spool each update to a file and read them
//! back block by block, so their disk use is O(clients × model) and their memory O(clients ×
//! block). The server optimisers ([`server_opt`]: FedAvgM, FedAdam, FedYogi, FedAdagrad) wrap a
//! mean and keep moments across rounds; [`reptile`] is Reptile's meta step (an unweighted mean of
//! the deltas times a step size); [`norm_bound`] clips each update before the mean;
//! [`buffered`] is the policy of `--mode async` (FedBuff); [`StrategyConfig`] is the
//! `--strategy` and `--mode` flags, checked.

pub mod buffered;
mod config;
pub mod norm_bound;
pub mod reptile;
pub mod robust;
pub mod server_opt;

pub use config::{StrategyArgs, StrategyConfig, StrategyConfigError, StrategyKind, StrategyRuntime, STRATEGY_FILE};

use fl_common::codec::SparseDelta;
use fl_common::TensorSet;

/// One client's contribution to a round.
#[derive(Debug)]
pub struct ClientUpdate<'a> {
    /// The weight delta (local minus global).
    pub delta: &'a TensorSet,
    /// Number of examples it was trained on.
    pub num_examples: u64,
}

/// A way to combine client deltas into the next global model.
pub trait AggregationStrategy: Send + std::fmt::Debug {
    /// Starts a round whose global model is `global`.
    fn begin_round(&mut self, global: &TensorSet);
    /// Folds one validated update into the running state.
    fn fold(&mut self, update: ClientUpdate<'_>);
    /// Applies the round's aggregate to `global`, returning the new global model; None if
    /// nothing was folded.
    fn finish(&mut self, global: &TensorSet) -> Option<TensorSet>;
    /// Whether the strategy can aggregate from the sum alone, as secure aggregation gives it (the
    /// unmasked mean, folded as one update). A strategy that needs each update (median, Krum,
    /// clipping on the server) keeps the default, and `serve --secure-aggregation` refuses it.
    fn supports_secure_sum(&self) -> bool {
        false
    }
    /// Folds the mean of `count` updates that secure aggregation unmasked as one sum. The
    /// default folds it as one update of weight one (uniform weights); DP-FedAvg counts it as
    /// `count` clipped updates, so that its noise is calibrated to the sum of `count`.
    fn fold_secure_sum(&mut self, mean: &TensorSet, count: usize) {
        let _ = count;
        self.fold(ClientUpdate { delta: mean, num_examples: 1 });
    }
    /// What differential privacy did in the last finished round; `None` for a strategy without DP.
    fn dp_round(&self) -> Option<&crate::dp::DpRoundReport> {
        None
    }
    /// As [`fold`](Self::fold), for a strategy whose fold can fail (one that spools updates to
    /// disk). The engine calls this one; a failed fold leaves the running state as it was.
    fn try_fold(&mut self, update: ClientUpdate<'_>) -> Result<(), AggregationError> {
        self.fold(update);
        Ok(())
    }
    /// As [`try_fold`](Self::try_fold), for an update as decoded, relative to `reference` (the
    /// round's global model): the default makes it dense and folds that. A strategy that sums
    /// weighted updates (FedAvg) adds the values where they are, with the same bits.
    fn try_fold_sparse(
        &mut self,
        delta: &SparseDelta,
        num_examples: u64,
        reference: &TensorSet,
    ) -> Result<(), AggregationError> {
        let dense = delta.to_dense(reference);
        self.try_fold(ClientUpdate { delta: &dense, num_examples })
    }
    /// The round's aggregate, the next model minus `global`, for delta downloads (which send the
    /// aggregate, not the model). The default is [`try_finish`](Self::try_finish) minus `global`;
    /// FedAvg gives its weighted mean without building the next model.
    fn try_finish_delta(&mut self, global: &TensorSet) -> Result<Option<TensorSet>, AggregationError> {
        Ok(self.try_finish(global)?.map(|next| next.minus(global)))
    }
    /// As [`finish`](Self::finish), for a strategy whose finish can fail. The engine calls this one.
    fn try_finish(&mut self, global: &TensorSet) -> Result<Option<TensorSet>, AggregationError> {
        Ok(self.finish(global))
    }
    /// The server optimiser's state after the last finished round (moments), which the engine
    /// stores with the committed round; `None` for a strategy without one.
    fn server_state(&self) -> Option<&server_opt::ServerOptState> {
        None
    }
}

/// Why a strategy could not fold or finish.
#[derive(Debug, thiserror::Error)]
pub enum AggregationError {
    /// Spooling an update to disk, or reading it back, failed.
    #[error("{path}: {source}")]
    Spool {
        /// The spool file or directory.
        path: std::path::PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// Fewer updates than the strategy needs.
    #[error("{strategy} needs at least {needed} updates, got {got}")]
    TooFewUpdates {
        /// The strategy.
        strategy: &'static str,
        /// How many it needs.
        needed: usize,
        /// How many were folded.
        got: usize,
    },
}

/// FedAvg: the new model is the global plus the mean of the deltas weighted by example counts.
#[derive(Debug, Default)]
pub struct FedAvg {
    sum: Option<TensorSet>,
    total_weight: f64,
    folded: usize,
}

impl AggregationStrategy for FedAvg {
    fn begin_round(&mut self, global: &TensorSet) {
        self.sum = Some(global.zeros_like());
        self.total_weight = 0.0;
        self.folded = 0;
    }

    fn fold(&mut self, update: ClientUpdate<'_>) {
        self.running_sum(update.num_examples).add_scaled(update.delta, update.num_examples as f32);
    }

    fn supports_secure_sum(&self) -> bool {
        true
    }

    /// The running sum starts at +0 and never holds -0 (x + y is -0 only when both are), so
    /// adding the zeros a sparse delta leaves out would change no bit: they are skipped.
    fn try_fold_sparse(
        &mut self,
        delta: &SparseDelta,
        num_examples: u64,
        _reference: &TensorSet,
    ) -> Result<(), AggregationError> {
        delta.add_to(self.running_sum(num_examples), num_examples as f32);
        Ok(())
    }

    /// The weighted mean of the deltas, in the running sum's own buffers.
    fn try_finish_delta(&mut self, _global: &TensorSet) -> Result<Option<TensorSet>, AggregationError> {
        let Some((mut sum, scale)) = self.take_sum() else { return Ok(None) };
        sum.tensors.iter_mut().for_each(|t| t.data.iter_mut().for_each(|x| *x *= scale));
        Ok(Some(sum))
    }

    fn finish(&mut self, global: &TensorSet) -> Option<TensorSet> {
        let (sum, scale) = self.take_sum()?;
        let mut next = global.clone();
        next.add_scaled(&sum, scale);
        Some(next)
    }
}

impl FedAvg {
    /// The running sum, with one more update of `num_examples` counted.
    fn running_sum(&mut self, num_examples: u64) -> &mut TensorSet {
        self.total_weight += num_examples as f64;
        self.folded += 1;
        self.sum.as_mut().expect("begin_round before fold")
    }

    /// The running sum and the scale of its weighted mean, once per round; `None` when nothing
    /// (or nothing of weight) was folded.
    fn take_sum(&mut self) -> Option<(TensorSet, f32)> {
        let sum = self.sum.take()?;
        (self.folded > 0 && self.total_weight > 0.0).then(|| (sum, (1.0 / self.total_weight) as f32))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fl_common::NamedTensor;
    use proptest::prelude::*;

    fn tensors(values: &[f32]) -> TensorSet {
        TensorSet::new(vec![NamedTensor { name: "w".into(), shape: vec![values.len()], data: values.to_vec() }])
    }

    #[test]
    fn weighted_by_example_counts() {
        let global = tensors(&[1.0, 1.0]);
        let mut avg = FedAvg::default();
        avg.begin_round(&global);
        avg.fold(ClientUpdate { delta: &tensors(&[1.0, 0.0]), num_examples: 3 });
        avg.fold(ClientUpdate { delta: &tensors(&[-1.0, 4.0]), num_examples: 1 });
        let next = avg.finish(&global).unwrap();
        // (3*1 + 1*-1)/4 = 0.5 and (0 + 4)/4 = 1
        assert_eq!(next.tensors[0].data, vec![1.5, 2.0]);
    }

    #[test]
    fn nothing_folded_gives_nothing() {
        let global = tensors(&[1.0]);
        let mut avg = FedAvg::default();
        avg.begin_round(&global);
        assert!(avg.finish(&global).is_none());
    }

    proptest! {
        #[test]
        fn fedavg_of_identical_updates_is_that_update(
            delta in proptest::collection::vec(-10f32..10.0, 1..20),
            weights in proptest::collection::vec(1u64..1000, 1..6),
        ) {
            let global = tensors(&vec![0.5; delta.len()]);
            let d = tensors(&delta);
            let mut avg = FedAvg::default();
            avg.begin_round(&global);
            for &w in &weights {
                avg.fold(ClientUpdate { delta: &d, num_examples: w });
            }
            let next = avg.finish(&global).unwrap();
            for (got, want) in next.tensors[0].data.iter().zip(&delta) {
                prop_assert!((got - (0.5 + want)).abs() < 1e-3, "{got} vs {}", 0.5 + want);
            }
        }
    }
}
