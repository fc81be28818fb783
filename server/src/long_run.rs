//! Long runs that do not decay: the clients' learning rate over rounds ([`LrSchedule`]), early
//! stopping on the evaluation loss and the best round ([`BestRound`]). Pure functions; the engine
//! calls them and writes `model/best.safetensors`.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// The clients' learning rate over rounds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    /// `--lr` every round.
    #[default]
    Constant,
    /// `--lr` · ½(1 + cos(π·(r−1)/R)) in round r of R.
    Cosine,
    /// `--lr`, then ×0.1 from half of the rounds and ×0.01 from three quarters.
    Step,
}

impl LrSchedule {
    /// The learning rate of `round` (from 1) of `rounds`, from the base `lr`.
    pub fn lr(self, lr: f32, round: u32, rounds: u32) -> f32 {
        let progress = f64::from(round.saturating_sub(1)) / f64::from(rounds.max(1));
        match self {
            LrSchedule::Constant => lr,
            LrSchedule::Cosine => (f64::from(lr) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())) as f32,
            LrSchedule::Step if progress >= 0.75 => lr * 0.01,
            LrSchedule::Step if progress >= 0.5 => lr * 0.1,
            LrSchedule::Step => lr,
        }
    }
}

/// The long-run flags of `serve`.
#[derive(Clone, Debug, Default, PartialEq, clap::Args)]
pub struct LongRunArgs {
    /// The clients' learning rate over rounds: constant, cosine (to near 0 at the last round) or
    /// step (×0.1 at half the rounds, ×0.01 at three quarters).
    #[arg(long, value_enum, default_value_t = LrSchedule::Constant)]
    pub lr_schedule: LrSchedule,
    /// End the federation (with a final model) after N rounds in a row without a lower evaluation
    /// loss than the best so far. Needs --eval-data, which should then be a validation split.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub early_stop_patience: Option<u32>,
}

/// The round with the lowest evaluation loss so far, and how many rounds came after it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BestRound {
    /// The best round and its loss; `None` before the first evaluated round.
    pub best: Option<(u32, f64)>,
    /// Evaluated rounds since the best one.
    pub since_best: u32,
}

impl BestRound {
    /// Records the evaluation loss of `round`; true when it is the new best.
    pub fn observe(&mut self, round: u32, loss: f64) -> bool {
        // A non-finite loss never counts as an improvement.
        if loss.is_finite() && self.best.is_none_or(|(_, best)| loss < best) {
            self.best = Some((round, loss));
            self.since_best = 0;
            true
        } else {
            if self.best.is_some() {
                self.since_best += 1;
            }
            false
        }
    }

    /// The best round so far.
    pub fn round(&self) -> Option<u32> {
        self.best.map(|(r, _)| r)
    }

    /// True when `patience` rounds in a row did not improve the loss.
    pub fn should_stop(&self, patience: Option<u32>) -> bool {
        patience.is_some_and(|p| self.best.is_some() && self.since_best >= p)
    }

    /// Replays the `loss` of each line of a `metrics.jsonl` (the committed rounds). Blocking.
    pub fn from_metrics(path: &Path) -> std::io::Result<BestRound> {
        let mut best = BestRound::default();
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(best),
            Err(e) => return Err(e),
        };
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let Ok(value) = serde_json::from_str::<serde_json::Value>(line) else { continue };
            if let (Some(round), Some(loss)) = (value["round"].as_u64(), value["loss"].as_f64()) {
                best.observe(round as u32, loss);
            }
        }
        Ok(best)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules() {
        assert_eq!(LrSchedule::Constant.lr(0.1, 7, 10), 0.1);
        assert_eq!(LrSchedule::Cosine.lr(0.1, 1, 10), 0.1);
        assert!((LrSchedule::Cosine.lr(0.1, 6, 10) - 0.05).abs() < 1e-7);
        assert!(LrSchedule::Cosine.lr(0.1, 10, 10) < 0.003);
        let step: Vec<f32> = (1..=8).map(|r| LrSchedule::Step.lr(1.0, r, 8)).collect();
        assert_eq!(step, vec![1.0, 1.0, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01]);
    }

    #[test]
    fn early_stopping_counts_rounds_without_a_lower_loss() {
        let mut best = BestRound::default();
        assert!(!best.should_stop(Some(1)), "nothing evaluated yet");
        assert!(best.observe(1, 1.0));
        assert!(best.observe(2, 0.5));
        assert!(!best.observe(3, 0.5), "equal is not better");
        assert!(!best.should_stop(Some(2)));
        assert!(!best.observe(4, 0.7));
        assert!(best.should_stop(Some(2)) && !best.should_stop(None));
        assert_eq!(best.round(), Some(2));
        assert!(best.observe(5, 0.1));
        assert!(!best.should_stop(Some(2)));
    }

    #[test]
    fn best_round_replays_from_the_metrics_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        assert_eq!(BestRound::from_metrics(&path).unwrap(), BestRound::default());
        std::fs::write(&path, "{\"round\":1,\"loss\":0.9}\n{\"round\":2,\"loss\":0.4}\n{\"round\":3,\"loss\":0.6}\n")
            .unwrap();
        let best = BestRound::from_metrics(&path).unwrap();
        assert_eq!((best.round(), best.since_best), (Some(2), 1));
    }
}
