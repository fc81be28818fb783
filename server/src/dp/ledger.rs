//! The privacy ledger: the federation's DP configuration, the privacy spent and the current clip
//! norm, kept in the state dir as `dp.json` so that ε continues across restarts.
//!
//! A round is charged before its model is committed: a crash between the two charges a round
//! that will run again, which overstates ε and never understates it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::accountant::RdpAccountant;
use super::DpConfig;

/// File name of the ledger in the state dir.
pub const LEDGER_FILE: &str = "dp.json";

/// Why the ledger could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not a ledger.
    #[error("{path}: not a DP ledger: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
}

/// A federation's DP state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DpLedger {
    /// The DP flags the federation was created with.
    pub config: DpConfig,
    /// The rounds charged so far.
    pub accountant: RdpAccountant,
    /// The clip norm of the next round (moves under adaptive clipping).
    pub clip_norm: f64,
}

/// The budget check before a round.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Budget {
    /// The round may run; ε after it.
    Allows {
        /// ε once the round is charged.
        epsilon_after: f64,
    },
    /// The round would take ε past `--dp-max-epsilon`: the federation ends before it.
    Exhausted {
        /// ε once the round were charged.
        epsilon_after: f64,
        /// The budget.
        max_epsilon: f64,
    },
}

impl DpLedger {
    /// A fresh ledger for `config`.
    pub fn new(config: DpConfig) -> Self {
        let clip_norm = config.clip_norm;
        DpLedger { config, accountant: RdpAccountant::new(), clip_norm }
    }

    /// The ledger's path in `state_dir`.
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(LEDGER_FILE)
    }

    /// Reads the ledger of `state_dir`; `None` if the federation runs without DP.
    pub fn load(state_dir: &Path) -> Result<Option<DpLedger>, LedgerError> {
        let path = Self::path(state_dir);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|source| LedgerError::Parse { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(LedgerError::Io { path, source }),
        }
    }

    /// Writes the ledger atomically. Blocking: call from a blocking thread in async code.
    pub fn save(&self, state_dir: &Path) -> Result<(), LedgerError> {
        let path = Self::path(state_dir);
        let bytes = serde_json::to_vec_pretty(self).expect("a ledger serializes");
        fl_common::files::write_atomic(&path, &bytes, 0o644).map_err(|source| LedgerError::Io { path, source })
    }

    /// δ for `enrolled` clients.
    pub fn delta(&self, enrolled: usize) -> f64 {
        self.config.delta_for(enrolled)
    }

    /// ε spent so far, at the δ of `enrolled` clients.
    pub fn epsilon(&self, enrolled: usize) -> f64 {
        self.accountant.epsilon(self.delta(enrolled))
    }

    /// Whether a round that samples `sampled` of `enrolled` clients fits the budget. A fixed-size
    /// sample is accounted as Poisson sampling with q = sampled/enrolled, as the peers do.
    pub fn check_budget(&self, sampled: usize, enrolled: usize) -> Budget {
        let epsilon_after = self.accountant.epsilon_after_round(
            sampling_rate(sampled, enrolled),
            self.config.noise_multiplier,
            self.delta(enrolled),
        );
        match self.config.max_epsilon {
            Some(max_epsilon) if epsilon_after > max_epsilon => Budget::Exhausted { epsilon_after, max_epsilon },
            _ => Budget::Allows { epsilon_after },
        }
    }

    /// Charges one aggregated round that sampled `sampled` of `enrolled` clients, and records the
    /// clip norm of the next round.
    pub fn charge(&mut self, sampled: usize, enrolled: usize, next_clip_norm: f64) {
        self.accountant.compose(sampling_rate(sampled, enrolled), self.config.noise_multiplier, 1);
        self.clip_norm = next_clip_norm;
    }
}

/// q = sampled/enrolled, at most 1.
pub fn sampling_rate(sampled: usize, enrolled: usize) -> f64 {
    (sampled as f64 / enrolled.max(1) as f64).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dp::DpArgs;

    fn ledger(max_epsilon: Option<f64>) -> DpLedger {
        let args = DpArgs { noise_multiplier: Some(1.0), clip_norm: Some(0.5), max_epsilon, ..DpArgs::default() };
        DpLedger::new(args.resolve().unwrap().unwrap())
    }

    #[test]
    fn epsilon_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(DpLedger::load(dir.path()).unwrap(), None, "no ledger: no DP");
        let mut before = ledger(None);
        for _ in 0..25 {
            before.charge(10, 100, 0.5);
        }
        before.save(dir.path()).unwrap();
        let after = DpLedger::load(dir.path()).unwrap().unwrap();
        assert_eq!(after, before);
        assert_eq!(after.accountant.rounds(), 25);
        assert!(after.epsilon(100) > 0.0);
        assert_eq!(after.epsilon(100), before.epsilon(100), "ε continues where it was");
    }

    #[test]
    fn a_corrupt_ledger_is_an_error_not_a_reset() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(DpLedger::path(dir.path()), b"{").unwrap();
        let err = DpLedger::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("dp.json") && err.contains("not a DP ledger"), "{err}");
    }

    #[test]
    fn the_budget_stops_before_the_round_that_would_exceed_it() {
        let mut l = ledger(Some(3.0));
        let mut rounds = 0;
        while let Budget::Allows { epsilon_after } = l.check_budget(10, 100) {
            assert!(epsilon_after <= 3.0);
            l.charge(10, 100, 0.5);
            rounds += 1;
            assert!(rounds < 10_000, "the budget never ran out");
        }
        assert!(l.epsilon(100) <= 3.0, "spent {} of 3", l.epsilon(100));
        assert!(matches!(l.check_budget(10, 100), Budget::Exhausted { epsilon_after, .. } if epsilon_after > 3.0));
        assert!(rounds > 1, "{rounds} rounds");
        assert!(matches!(ledger(None).check_budget(10, 100), Budget::Allows { .. }), "no budget, no limit");
    }

    #[test]
    fn sampling_rate_is_the_fraction_of_enrolled_clients() {
        assert_eq!(sampling_rate(10, 100), 0.1);
        assert_eq!(sampling_rate(30, 20), 1.0, "over-sampling cannot exceed everyone");
    }
}
