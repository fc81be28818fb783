//! Personalisation as the coordinator sees it: each personalising client reports, with its
//! update, the accuracy of its personal model and of the round's global model on its own held-out
//! split ([`LocalEvaluation`]). The engine keeps the reports of the round and writes their
//! distribution over the clients (count, mean, 10th percentile) into the round's `metrics.jsonl`
//! line ([`PersonalMetrics`]). The unusual clients are the point of personalisation, so the 10th
//! percentile matters as much as the mean.
//!
//! After the federation finished, any enrolled client may fetch the final model (round
//! `rounds_completed + 1` of `FetchModel`, [`final_model`]) to fine-tune it locally.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use fl_proto::pb;

use crate::coordinator::{Coordinator, GlobalModel, InvalidUpdate};

/// One client's accuracies on its local held-out split, reported with its update.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LocalEvaluation {
    /// The client's personal model after the round.
    pub personal_accuracy: f64,
    /// The round's global model, as the client received it.
    pub global_accuracy: f64,
    /// Rows of the held-out split.
    pub test_examples: u64,
}

impl From<pb::LocalEvaluation> for LocalEvaluation {
    fn from(e: pb::LocalEvaluation) -> LocalEvaluation {
        LocalEvaluation {
            personal_accuracy: e.personal_accuracy,
            global_accuracy: e.global_accuracy,
            test_examples: e.test_examples,
        }
    }
}

impl LocalEvaluation {
    /// Checks a report: accuracies are fractions, measured on at least one row.
    pub fn check(&self) -> Result<(), InvalidUpdate> {
        let fraction = |x: f64| x.is_finite() && (0.0..=1.0).contains(&x);
        if !fraction(self.personal_accuracy) || !fraction(self.global_accuracy) {
            return Err(InvalidUpdate::BadLocalEvaluation(format!(
                "accuracies must be in [0, 1], got personal {} and global {}",
                self.personal_accuracy, self.global_accuracy
            )));
        }
        if self.test_examples == 0 {
            return Err(InvalidUpdate::BadLocalEvaluation("measured on 0 held-out rows".into()));
        }
        Ok(())
    }
}

/// The distribution of a round's local evaluations, as fields of its `metrics.jsonl` line.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct PersonalMetrics {
    /// Clients of the round that reported.
    pub local_eval_clients: usize,
    /// Mean over those clients of the personal model's accuracy (each client counts once).
    pub personal_accuracy_mean: f64,
    /// Its 10th percentile.
    pub personal_accuracy_p10: f64,
    /// Mean over those clients of the round's global model's accuracy on their held-out splits.
    pub local_global_accuracy_mean: f64,
    /// Its 10th percentile.
    pub local_global_accuracy_p10: f64,
}

/// The distribution of `reports`; `None` when no client reported (no personalising client).
pub fn summarize(reports: &[LocalEvaluation]) -> Option<PersonalMetrics> {
    if reports.is_empty() {
        return None;
    }
    let personal: Vec<f64> = reports.iter().map(|r| r.personal_accuracy).collect();
    let global: Vec<f64> = reports.iter().map(|r| r.global_accuracy).collect();
    Some(PersonalMetrics {
        local_eval_clients: reports.len(),
        personal_accuracy_mean: mean(&personal),
        personal_accuracy_p10: percentile(&personal, 0.1),
        local_global_accuracy_mean: mean(&global),
        local_global_accuracy_p10: percentile(&global, 0.1),
    })
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}

/// The `q` quantile of `values` (not empty), linearly interpolated between the closest ranks:
/// the value at rank q·(n − 1) of the sorted values, as numpy's default computes it.
pub fn percentile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
}

/// The final model, for `FetchModel` of round `rounds_completed + 1` once the federation has
/// finished (any enrolled client may ask: it is the model every client was told about); `None`
/// for any other request, which the round engine then answers.
pub fn final_model(coord: &Coordinator, round: u32) -> Option<(Arc<GlobalModel>, Arc<AtomicU64>)> {
    let finished = coord.is_finished() && round == coord.completed_rounds() + 1;
    finished.then(|| (coord.global(), Arc::new(AtomicU64::new(0))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(personal: f64, global: f64) -> LocalEvaluation {
        LocalEvaluation { personal_accuracy: personal, global_accuracy: global, test_examples: 10 }
    }

    #[test]
    fn percentile_interpolates_like_numpy() {
        // numpy.percentile([0.9, 0.2, 0.5, 0.7, 0.4], 10) = 0.28: rank 0.4 between 0.2 and 0.4.
        assert!((percentile(&[0.9, 0.2, 0.5, 0.7, 0.4], 0.1) - 0.28).abs() < 1e-12);
        // numpy.percentile(range(11), 10) = 1.0: an exact rank.
        let ten: Vec<f64> = (0..=10).map(f64::from).collect();
        assert_eq!(percentile(&ten, 0.1), 1.0);
        assert_eq!(percentile(&[0.3], 0.1), 0.3);
        assert_eq!(percentile(&[0.3, 0.8], 0.0), 0.3);
        assert_eq!(percentile(&[0.3, 0.8], 1.0), 0.8);
    }

    #[test]
    fn the_distribution_counts_each_client_once() {
        let reports = [report(0.9, 0.5), report(0.8, 0.1), report(0.6, 0.3), report(1.0, 0.9)];
        let m = summarize(&reports).unwrap();
        assert_eq!(m.local_eval_clients, 4);
        assert!((m.personal_accuracy_mean - 0.825).abs() < 1e-12);
        assert!((m.local_global_accuracy_mean - 0.45).abs() < 1e-12);
        // Ranks 0.3: 0.6 + 0.3·(0.8 − 0.6) and 0.1 + 0.3·(0.3 − 0.1).
        assert!((m.personal_accuracy_p10 - 0.66).abs() < 1e-12, "{m:?}");
        assert!((m.local_global_accuracy_p10 - 0.16).abs() < 1e-12, "{m:?}");
        assert_eq!(summarize(&[]), None);
    }

    #[test]
    fn a_report_out_of_range_is_refused() {
        report(0.0, 1.0).check().unwrap();
        for bad in [report(1.5, 0.5), report(0.5, -0.1), report(f64::NAN, 0.5), report(0.5, f64::INFINITY)] {
            let err = bad.check().unwrap_err();
            assert!(err.to_string().contains("must be in [0, 1]"), "{err}");
        }
        let none = LocalEvaluation { test_examples: 0, ..report(0.5, 0.5) };
        assert!(none.check().unwrap_err().to_string().contains("0 held-out rows"));
    }
}
