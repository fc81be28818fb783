//! Buffered asynchronous aggregation (FedBuff, Nguyen et al. 2022), as pure policy.
//!
//! In `--mode async` the coordinator has no rounds of sampled clients. Every connected client
//! that is idle gets a task on the newest model; the server takes a *step* (one "round" in
//! `metrics.jsonl`) once `--buffer-size` K updates are buffered. An update trained on the model
//! of step `r` that arrives while step `r'` is collecting has staleness `s = r' − r`; it is
//! weighted by 1/√(1+s) and refused when `s` exceeds `--max-staleness`.
//!
//! The functions here decide; the engine (`coordinator::async_mode`) does the I/O around them:
//! - [`admit`]: fold an update (with its staleness weight) or refuse it as too stale;
//! - [`should_step`]: take the step, keep collecting, or give up on the attempt;
//! - [`gets_task`]: whether a connected client gets a task now.
//!
//! A client gives at most one update to each step: after answering it waits until the step is
//! taken and then trains on the new model. With equal client speeds and K equal to the number of
//! clients, every step therefore folds one update of staleness 0 (weight exactly 1) from each
//! client, trained on the same model with the same task as a synchronous round: the step is the
//! synchronous FedAvg round, bit for bit when the updates fold in the same order.

use crate::policy::{Close, CloseReason};

/// `--mode`: synchronous rounds, or FedBuff's buffered asynchronous steps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
#[value(rename_all = "kebab-case")]
pub enum RoundMode {
    /// Rounds: sample, wait for the sampled clients, aggregate.
    #[default]
    Sync,
    /// FedBuff: clients train continuously; a step after every `--buffer-size` updates.
    Async,
}

impl std::fmt::Display for RoundMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RoundMode::Sync => "sync",
            RoundMode::Async => "async",
        })
    }
}

/// The settings of `--mode async`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BufferedMode {
    /// K: updates per step.
    pub buffer_size: usize,
    /// S: the largest staleness accepted.
    pub max_staleness: u32,
}

/// FedBuff's staleness weight 1/√(1+s). Exactly 1 for a fresh update.
pub fn staleness_weight(staleness: u32) -> f32 {
    (1.0 / (1.0 + f64::from(staleness)).sqrt()) as f32
}

/// What to do with an update trained for step `task_step` that arrives while `step` collects.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Admit {
    /// Fold it, its delta scaled by `weight`.
    Fold {
        /// Steps taken since its model.
        staleness: u32,
        /// [`staleness_weight`] of it.
        weight: f32,
    },
    /// Refuse it: staler than `--max-staleness`.
    TooStale {
        /// Steps taken since its model.
        staleness: u32,
    },
}

/// Admits or refuses an update by its staleness.
pub fn admit(task_step: u32, step: u32, mode: &BufferedMode) -> Admit {
    let staleness = step.saturating_sub(task_step);
    if staleness > mode.max_staleness {
        Admit::TooStale { staleness }
    } else {
        Admit::Fold { staleness, weight: staleness_weight(staleness) }
    }
}

/// Whether a task for step `task_step` can no longer be folded once `step` collects.
pub fn is_too_stale(task_step: u32, step: u32, mode: &BufferedMode) -> bool {
    matches!(admit(task_step, step, mode), Admit::TooStale { .. })
}

/// What the engine knows about the step being collected.
#[derive(Clone, Copy, Debug)]
pub struct StepView {
    /// Updates folded into this step.
    pub buffered: usize,
    /// Connected clients training a task that may still land in this step.
    pub in_flight: usize,
    /// `--min-clients`.
    pub min_clients: usize,
    /// Whether `--round-timeout` has passed since the step opened.
    pub deadline_passed: bool,
}

/// Decides whether the step is taken now ([`Close::Complete`]), keeps collecting
/// ([`Close::Open`]), or is given up and collected again ([`Close::Retry`]: too few updates).
///
/// The step is taken with K updates; with fewer, but at least min(K, `--min-clients`), when no
/// connected client is still training for it (each has answered; more cannot come) or at the
/// deadline.
pub fn should_step(view: &StepView, mode: &BufferedMode) -> Close {
    if view.buffered >= mode.buffer_size {
        return Close::Complete(CloseReason::TargetReached);
    }
    let reason = if view.in_flight == 0 {
        CloseReason::AllAnswered
    } else if view.deadline_passed {
        CloseReason::Deadline
    } else {
        return Close::Open;
    };
    let enough = view.buffered >= view.min_clients.max(1).min(mode.buffer_size);
    if enough {
        Close::Complete(reason)
    } else {
        Close::Retry(reason)
    }
}

/// Whether a connected client gets a task now: it has none outstanding and has not answered the
/// step being collected (it then waits for the next step's model), and enough clients are
/// connected (`--min-clients`, as for a synchronous round).
pub fn gets_task(has_task: bool, answered_this_step: bool, connected: usize, min_clients: usize) -> bool {
    !has_task && !answered_this_step && connected >= min_clients.max(1)
}

/// The staleness of the updates folded into one step, and the updates refused as too stale.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepStaleness {
    staleness: Vec<u32>,
    /// Updates refused (or tasks abandoned) during this step for being staler than S.
    pub dropped_stale: usize,
}

impl StepStaleness {
    /// Records a folded update of `staleness`.
    pub fn record(&mut self, staleness: u32) {
        self.staleness.push(staleness);
    }

    /// The metrics line's fields.
    pub fn metrics(&self) -> StalenessMetrics {
        let n = self.staleness.len();
        StalenessMetrics {
            staleness_mean: if n == 0 {
                0.0
            } else {
                self.staleness.iter().map(|&s| f64::from(s)).sum::<f64>() / n as f64
            },
            staleness_max: self.staleness.iter().copied().max().unwrap_or(0),
            dropped_stale: self.dropped_stale,
        }
    }
}

/// The fields an async step adds to its `metrics.jsonl` line.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct StalenessMetrics {
    /// Mean staleness of the folded updates.
    pub staleness_mean: f64,
    /// Largest staleness of a folded update.
    pub staleness_max: u32,
    /// Updates refused during the step for being staler than `--max-staleness`.
    pub dropped_stale: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregation::{AggregationStrategy, ClientUpdate, FedAvg};
    use fl_common::{NamedTensor, TensorSet};

    const MODE: BufferedMode = BufferedMode { buffer_size: 3, max_staleness: 2 };

    fn view(buffered: usize, in_flight: usize, deadline_passed: bool) -> StepView {
        StepView { buffered, in_flight, min_clients: 2, deadline_passed }
    }

    #[test]
    fn staleness_weights_are_one_over_the_root_of_one_plus_s() {
        assert_eq!(staleness_weight(0), 1.0);
        assert!((staleness_weight(1) - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-7);
        assert_eq!(staleness_weight(3), 0.5);
        assert!((staleness_weight(8) - 1.0 / 3.0).abs() < 1e-7);
    }

    #[test]
    fn updates_staler_than_s_are_refused() {
        assert_eq!(admit(5, 5, &MODE), Admit::Fold { staleness: 0, weight: 1.0 });
        assert_eq!(admit(3, 5, &MODE), Admit::Fold { staleness: 2, weight: staleness_weight(2) });
        assert_eq!(admit(2, 5, &MODE), Admit::TooStale { staleness: 3 });
        assert!(is_too_stale(2, 5, &MODE) && !is_too_stale(3, 5, &MODE));
        let strict = BufferedMode { max_staleness: 0, ..MODE };
        assert_eq!(admit(4, 5, &strict), Admit::TooStale { staleness: 1 });
    }

    #[test]
    fn a_step_is_taken_after_k_updates() {
        assert_eq!(should_step(&view(3, 5, false), &MODE), Close::Complete(CloseReason::TargetReached));
        assert_eq!(should_step(&view(2, 1, false), &MODE), Close::Open);
        assert_eq!(should_step(&view(0, 4, false), &MODE), Close::Open);
    }

    #[test]
    fn fewer_than_k_when_no_more_can_come_or_at_the_deadline() {
        // Every connected client answered: nobody can add to this step.
        assert_eq!(should_step(&view(2, 0, false), &MODE), Close::Complete(CloseReason::AllAnswered));
        assert_eq!(should_step(&view(2, 1, true), &MODE), Close::Complete(CloseReason::Deadline));
        // Below min(K, --min-clients): the attempt is collected again.
        assert_eq!(should_step(&view(1, 0, false), &MODE), Close::Retry(CloseReason::AllAnswered));
        assert_eq!(should_step(&view(0, 2, true), &MODE), Close::Retry(CloseReason::Deadline));
        // K below --min-clients: K updates are enough.
        let k1 = BufferedMode { buffer_size: 1, ..MODE };
        assert_eq!(should_step(&view(1, 3, false), &k1), Close::Complete(CloseReason::TargetReached));
    }

    #[test]
    fn a_client_gets_one_task_at_a_time_and_one_per_step() {
        assert!(gets_task(false, false, 3, 2));
        assert!(!gets_task(true, false, 3, 2), "it is training");
        assert!(!gets_task(false, true, 3, 2), "it answered this step: it waits for the next model");
        assert!(!gets_task(false, false, 1, 2), "too few clients connected");
    }

    #[test]
    fn staleness_metrics() {
        let mut s = StepStaleness::default();
        assert_eq!(s.metrics(), StalenessMetrics { staleness_mean: 0.0, staleness_max: 0, dropped_stale: 0 });
        for x in [0, 2, 1, 0] {
            s.record(x);
        }
        s.dropped_stale = 3;
        assert_eq!(s.metrics(), StalenessMetrics { staleness_mean: 0.75, staleness_max: 2, dropped_stale: 3 });
    }

    fn tensors(values: &[f32]) -> TensorSet {
        TensorSet::new(vec![NamedTensor { name: "w".into(), shape: vec![values.len()], data: values.to_vec() }])
    }

    /// Clients of equal speed, K = n: each step admits every client's fresh update with weight
    /// 1, and the engine scales a delta by the weight before FedAvg folds it (skipped at 1). The
    /// result is FedAvg's, bit for bit.
    #[test]
    fn equal_speeds_and_k_equal_to_n_is_fedavg() {
        let mode = BufferedMode { buffer_size: 3, max_staleness: 0 };
        let updates = [(vec![0.1f32, -0.3], 5u64), (vec![0.7, 0.2], 2), (vec![-0.4, 0.9], 9)];
        let global = tensors(&[1.0, 2.0]);
        let mut sync = FedAvg::default();
        sync.begin_round(&global);
        for (d, n) in &updates {
            sync.fold(ClientUpdate { delta: &tensors(d), num_examples: *n });
        }
        let mut buffered = FedAvg::default();
        buffered.begin_round(&global);
        let mut view = StepView { buffered: 0, in_flight: 3, min_clients: 3, deadline_passed: false };
        for (d, n) in &updates {
            let Admit::Fold { weight, .. } = admit(7, 7, &mode) else { panic!("fresh updates are folded") };
            assert_eq!(weight, 1.0);
            buffered.fold(ClientUpdate { delta: &tensors(d), num_examples: *n });
            view.buffered += 1;
            view.in_flight -= 1;
            let expected = if view.buffered == 3 { Close::Complete(CloseReason::TargetReached) } else { Close::Open };
            assert_eq!(should_step(&view, &mode), expected);
        }
        assert_eq!(buffered.finish(&global), sync.finish(&global));
    }
}
