//! Server optimisers (Reddi et al. 2021, "Adaptive Federated Optimization"; Hsu et al. 2019 for
//! FedAvgM): the round's aggregate delta Δ (the mean of an inner strategy) is a pseudo-gradient,
//! and the server takes an optimiser step with it instead of adding it.
//!
//! - FedAvgM: v ← μ·v + Δ (v ← Δ in the first round); x ← x + η·v.
//! - FedAdam: m ← β1·m + (1−β1)·Δ; v ← β2·v + (1−β2)·Δ²; x ← x + η·m / (√v + τ).
//! - FedYogi: as FedAdam with v ← v − (1−β2)·Δ²·sign(v − Δ²).
//! - FedAdagrad: as FedAdam with v ← v + Δ².
//!
//! The moments start at zero and there is no bias correction, as in the paper's Algorithm 2 and
//! Flower's `FedAdagrad`/`FedYogi`. The arithmetic is f64 per coordinate, stored as f32; the state
//! ([`ServerOptState`]) is what the engine writes with each committed round, so a restart
//! continues with exactly the same moments.

use std::collections::HashMap;

use fl_common::{NamedTensor, TensorSet};

use super::{AggregationError, AggregationStrategy, ClientUpdate};

/// A server optimiser with its hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ServerOptimizer {
    /// FedAvgM: server learning rate η and momentum μ.
    Momentum {
        /// η.
        lr: f64,
        /// μ.
        momentum: f64,
    },
    /// FedAdam.
    Adam {
        /// η.
        lr: f64,
        /// β1.
        beta1: f64,
        /// β2.
        beta2: f64,
        /// τ, the adaptivity.
        tau: f64,
    },
    /// FedYogi.
    Yogi {
        /// η.
        lr: f64,
        /// β1.
        beta1: f64,
        /// β2.
        beta2: f64,
        /// τ.
        tau: f64,
    },
    /// FedAdagrad.
    Adagrad {
        /// η.
        lr: f64,
        /// β1.
        beta1: f64,
        /// τ.
        tau: f64,
    },
}

/// The moments of a server optimiser: what lasts from round to round.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServerOptState {
    /// Steps taken.
    pub steps: u64,
    /// First moment (FedAdam, FedYogi, FedAdagrad) or momentum buffer (FedAvgM); `None` before
    /// the first step.
    pub m: Option<TensorSet>,
    /// Second moment (FedAdam, FedYogi, FedAdagrad).
    pub v: Option<TensorSet>,
}

/// Why a stored server optimiser state cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ServerOptStateError {
    /// Not a safetensors file.
    #[error(transparent)]
    Tensors(#[from] fl_common::tensors::TensorError),
    /// The metadata lacks the step count.
    #[error("no valid 'steps' in the metadata")]
    NoSteps,
    /// A tensor name without the `m/` or `v/` prefix.
    #[error("unexpected tensor '{0}' (expected m/NAME or v/NAME)")]
    UnexpectedTensor(String),
}

impl ServerOptState {
    /// Encodes the state as safetensors: tensors `m/NAME` and `v/NAME`, the step count in the
    /// metadata.
    pub fn encode(&self) -> Vec<u8> {
        let mut tensors = Vec::new();
        for (prefix, set) in [("m/", &self.m), ("v/", &self.v)] {
            for t in set.iter().flat_map(|s| &s.tensors) {
                tensors.push(NamedTensor { name: format!("{prefix}{}", t.name), ..t.clone() });
            }
        }
        let metadata = HashMap::from([("steps".to_string(), self.steps.to_string())]);
        TensorSet::new(tensors).encode(Some(metadata))
    }

    /// Decodes what [`ServerOptState::encode`] wrote.
    pub fn decode(bytes: &[u8]) -> Result<ServerOptState, ServerOptStateError> {
        let (set, metadata) = TensorSet::decode(bytes)?;
        let steps = metadata.get("steps").and_then(|s| s.parse().ok()).ok_or(ServerOptStateError::NoSteps)?;
        let (mut m, mut v) = (Vec::new(), Vec::new());
        for t in set.tensors {
            if let Some(name) = t.name.strip_prefix("m/") {
                m.push(NamedTensor { name: name.to_string(), ..t });
            } else if let Some(name) = t.name.strip_prefix("v/") {
                v.push(NamedTensor { name: name.to_string(), ..t });
            } else {
                return Err(ServerOptStateError::UnexpectedTensor(t.name));
            }
        }
        let set = |t: Vec<NamedTensor>| (!t.is_empty()).then(|| TensorSet::new(t));
        Ok(ServerOptState { steps, m: set(m), v: set(v) })
    }
}

impl ServerOptimizer {
    /// The next global model: one step from `global` with the aggregate delta `delta`, updating
    /// `state`.
    pub fn step(&self, state: &mut ServerOptState, global: &TensorSet, delta: &TensorSet) -> TensorSet {
        let mut next = global.clone();
        match *self {
            ServerOptimizer::Momentum { lr, momentum } => {
                let v = match state.m.take() {
                    None => delta.clone(),
                    Some(mut v) => {
                        zip_map(&mut v, delta, |v, d| momentum as f32 * v + d);
                        v
                    }
                };
                next.add_scaled(&v, lr as f32);
                state.m = Some(v);
            }
            ServerOptimizer::Adam { .. } | ServerOptimizer::Yogi { .. } | ServerOptimizer::Adagrad { .. } => {
                let (lr, beta1, beta2, tau) = match *self {
                    ServerOptimizer::Adam { lr, beta1, beta2, tau }
                    | ServerOptimizer::Yogi { lr, beta1, beta2, tau } => (lr, beta1, beta2, tau),
                    ServerOptimizer::Adagrad { lr, beta1, tau } => (lr, beta1, 0.0, tau),
                    ServerOptimizer::Momentum { .. } => unreachable!("matched above"),
                };
                let mut m = state.m.take().unwrap_or_else(|| delta.zeros_like());
                let mut v = state.v.take().unwrap_or_else(|| delta.zeros_like());
                zip_map(&mut m, delta, |m, d| (beta1 * f64::from(m) + (1.0 - beta1) * f64::from(d)) as f32);
                let second: fn(f64, f64, f64) -> f64 = match self {
                    ServerOptimizer::Adam { .. } => |v, d2, beta2| beta2 * v + (1.0 - beta2) * d2,
                    ServerOptimizer::Yogi { .. } => |v, d2, beta2| v - (1.0 - beta2) * d2 * (v - d2).signum_or_zero(),
                    _ => |v, d2, _| v + d2,
                };
                zip_map(&mut v, delta, |v, d| {
                    let d = f64::from(d);
                    second(f64::from(v), d * d, beta2) as f32
                });
                for ((x, m), v) in next.tensors.iter_mut().zip(&m.tensors).zip(&v.tensors) {
                    for ((x, &m), &v) in x.data.iter_mut().zip(&m.data).zip(&v.data) {
                        *x = (f64::from(*x) + lr * f64::from(m) / (f64::from(v).max(0.0).sqrt() + tau)) as f32;
                    }
                }
                state.m = Some(m);
                state.v = Some(v);
            }
        }
        state.steps += 1;
        next
    }
}

/// sign(x) with sign(0) = 0, as NumPy's `sign` (which Flower's FedYogi uses).
trait SignOrZero {
    fn signum_or_zero(self) -> f64;
}

impl SignOrZero for f64 {
    fn signum_or_zero(self) -> f64 {
        if self == 0.0 {
            0.0
        } else {
            self.signum()
        }
    }
}

fn zip_map(a: &mut TensorSet, b: &TensorSet, f: impl Fn(f32, f32) -> f32) {
    for (a, b) in a.tensors.iter_mut().zip(&b.tensors) {
        for (x, &y) in a.data.iter_mut().zip(&b.data) {
            *x = f(*x, y);
        }
    }
}

/// An inner strategy (FedAvg, DP-FedAvg, a robust one) whose aggregate is applied by a server
/// optimiser.
#[derive(Debug)]
pub struct ServerOptimized {
    inner: Box<dyn AggregationStrategy>,
    optimizer: ServerOptimizer,
    state: ServerOptState,
}

impl ServerOptimized {
    /// `inner`'s aggregate stepped by `optimizer`, starting from `state` (the committed one).
    pub fn new(inner: Box<dyn AggregationStrategy>, optimizer: ServerOptimizer, state: ServerOptState) -> Self {
        ServerOptimized { inner, optimizer, state }
    }
}

impl AggregationStrategy for ServerOptimized {
    fn begin_round(&mut self, global: &TensorSet) {
        self.inner.begin_round(global);
    }

    fn fold(&mut self, update: ClientUpdate<'_>) {
        self.inner.fold(update);
    }

    fn finish(&mut self, global: &TensorSet) -> Option<TensorSet> {
        self.try_finish(global).ok().flatten()
    }

    fn dp_round(&self) -> Option<&crate::dp::DpRoundReport> {
        self.inner.dp_round()
    }

    fn supports_secure_sum(&self) -> bool {
        self.inner.supports_secure_sum()
    }

    fn try_fold(&mut self, update: ClientUpdate<'_>) -> Result<(), AggregationError> {
        self.inner.try_fold(update)
    }

    fn try_finish(&mut self, global: &TensorSet) -> Result<Option<TensorSet>, AggregationError> {
        // The inner strategy applied to a zero model gives its aggregate delta exactly (0 + x is x),
        // so FedAvgM with μ 0 and η 1 adds the very same f32 values FedAvg adds.
        let Some(delta) = self.inner.try_finish(&global.zeros_like())? else { return Ok(None) };
        Ok(Some(self.optimizer.step(&mut self.state, global, &delta)))
    }

    fn server_state(&self) -> Option<&ServerOptState> {
        Some(&self.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregation::FedAvg;
    use proptest::prelude::*;

    fn tensors(values: &[f32]) -> TensorSet {
        TensorSet::new(vec![NamedTensor { name: "w".into(), shape: vec![values.len()], data: values.to_vec() }])
    }

    fn run_round(strategy: &mut dyn AggregationStrategy, global: &TensorSet, updates: &[(Vec<f32>, u64)]) -> TensorSet {
        strategy.begin_round(global);
        for (delta, n) in updates {
            strategy.try_fold(ClientUpdate { delta: &tensors(delta), num_examples: *n }).unwrap();
        }
        strategy.try_finish(global).unwrap().unwrap()
    }

    proptest! {
        #[test]
        fn fedavgm_with_momentum_0_and_lr_1_is_bit_identical_to_fedavg(
            start in proptest::collection::vec(-1f32..1.0, 1..16),
            rounds in proptest::collection::vec(
                proptest::collection::vec((proptest::collection::vec(-1f32..1.0, 16), 1u64..500), 1..5), 1..4),
        ) {
            let momentum = ServerOptimizer::Momentum { lr: 1.0, momentum: 0.0 };
            let mut state = ServerOptState::default();
            let (mut a, mut b) = (tensors(&start), tensors(&start));
            for updates in rounds {
                let updates: Vec<(Vec<f32>, u64)> =
                    updates.into_iter().map(|(d, n)| (d[..start.len()].to_vec(), n)).collect();
                a = run_round(&mut FedAvg::default(), &a, &updates);
                let mut m = ServerOptimized::new(Box::new(FedAvg::default()), momentum, state.clone());
                b = run_round(&mut m, &b, &updates);
                state = m.server_state().unwrap().clone();
                let bits = |t: &TensorSet| t.tensors[0].data.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                prop_assert_eq!(bits(&a), bits(&b));
            }
        }
    }

    #[test]
    fn one_fedadam_step_matches_a_hand_computation() {
        let adam = ServerOptimizer::Adam { lr: 0.1, beta1: 0.9, beta2: 0.99, tau: 1e-3 };
        let global = tensors(&[1.0, -2.0]);
        let mut strategy = ServerOptimized::new(Box::new(FedAvg::default()), adam, ServerOptState::default());
        // Mean delta: (3·0.2 + 1·(−0.2))/4 = 0.1 and (3·0 + 1·0.4)/4 = 0.1.
        let next = run_round(&mut strategy, &global, &[(vec![0.2, 0.0], 3), (vec![-0.2, 0.4], 1)]);
        // Δ = [0.1, 0.1]; m = 0.1·Δ = [0.01, 0.01]; v = 0.01·Δ² = [1e-4, 1e-4];
        // x += 0.1 · 0.01 / (√1e-4 + 1e-3) = 0.1 · 0.01 / 0.011 = 0.0909...
        let step = 0.1 * 0.01 / (0.01 + 1e-3);
        let want = [1.0 + step, -2.0 + step];
        for (got, want) in next.tensors[0].data.iter().zip(want) {
            assert!((f64::from(*got) - want).abs() < 1e-6, "{got} vs {want}");
        }
        let state = strategy.server_state().unwrap();
        assert_eq!(state.steps, 1);
        assert!((f64::from(state.m.as_ref().unwrap().tensors[0].data[0]) - 0.01).abs() < 1e-8);
        assert!((f64::from(state.v.as_ref().unwrap().tensors[0].data[1]) - 1e-4).abs() < 1e-9);
    }

    #[test]
    fn yogi_and_adagrad_second_moments() {
        let delta = tensors(&[0.5]);
        let global = tensors(&[0.0]);
        let mut yogi = ServerOptState { steps: 1, m: Some(tensors(&[0.0])), v: Some(tensors(&[1.0])) };
        ServerOptimizer::Yogi { lr: 0.01, beta1: 0.9, beta2: 0.99, tau: 1e-3 }.step(&mut yogi, &global, &delta);
        // v − (1−β2)·Δ²·sign(v − Δ²) = 1 − 0.01·0.25·1
        assert!((f64::from(yogi.v.unwrap().tensors[0].data[0]) - 0.9975).abs() < 1e-7);
        let mut adagrad = ServerOptState { steps: 1, m: Some(tensors(&[0.0])), v: Some(tensors(&[1.0])) };
        ServerOptimizer::Adagrad { lr: 0.1, beta1: 0.9, tau: 1e-3 }.step(&mut adagrad, &global, &delta);
        assert!((f64::from(adagrad.v.unwrap().tensors[0].data[0]) - 1.25).abs() < 1e-7);
    }

    #[test]
    fn state_round_trips_through_its_file_format() {
        let state = ServerOptState { steps: 7, m: Some(tensors(&[0.25, -1.0])), v: Some(tensors(&[1e-9, 3.0])) };
        assert_eq!(ServerOptState::decode(&state.encode()).unwrap(), state);
        let empty = ServerOptState::default();
        assert_eq!(ServerOptState::decode(&empty.encode()).unwrap(), empty);
        assert!(ServerOptState::decode(&tensors(&[1.0]).encode(None)).is_err());
    }
}
