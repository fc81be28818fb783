//! The `--strategy` flags: as given ([`StrategyArgs`]), checked and completed
//! ([`StrategyConfig`], kept in `STATE/strategy.json`), and what the engine runs with
//! ([`StrategyRuntime`]: the attempt's strategy, and the server optimiser's committed state in
//! `STATE/server-opt/round-NNNN.safetensors`).

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use serde::{Deserialize, Serialize};

use super::reptile::Reptile;
use super::robust::{RobustAggregator, RobustRule, SPOOL_PREFIX};
use super::server_opt::{ServerOptState, ServerOptimized, ServerOptimizer};
use super::{AggregationStrategy, FedAvg};

/// The file in the state dir that holds a federation's [`StrategyConfig`].
pub const STRATEGY_FILE: &str = "strategy.json";

/// The aggregation strategies `--strategy` names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
#[value(rename_all = "kebab-case")]
pub enum StrategyKind {
    /// Mean of the updates weighted by example counts.
    #[default]
    Fedavg,
    /// FedAvg with the proximal term μ/2·‖w − w_global‖² in the clients' training.
    Fedprox,
    /// FedAvg with server momentum.
    Fedavgm,
    /// Adam on the server.
    Fedadam,
    /// Yogi on the server.
    Fedyogi,
    /// Adagrad on the server.
    Fedadagrad,
    /// Coordinate-wise median.
    Median,
    /// Coordinate-wise trimmed mean.
    TrimmedMean,
    /// Krum.
    Krum,
    /// Multi-Krum.
    MultiKrum,
    /// Reptile's meta step: the unweighted mean delta times the server step size.
    Reptile,
}

impl std::fmt::Display for StrategyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use clap::ValueEnum;
        f.write_str(self.to_possible_value().expect("no skipped variants").get_name())
    }
}

impl StrategyKind {
    /// Robust strategies need every update at once (spooled on disk).
    pub fn is_robust(self) -> bool {
        matches!(self, StrategyKind::Median | StrategyKind::TrimmedMean | StrategyKind::Krum | StrategyKind::MultiKrum)
    }

    /// The flags that apply to this strategy besides `--proximal-mu`, which applies to all.
    fn flags(self) -> &'static [&'static str] {
        match self {
            StrategyKind::Fedavg | StrategyKind::Fedprox | StrategyKind::Median => &[],
            StrategyKind::Fedavgm => &["--server-lr", "--server-momentum"],
            StrategyKind::Reptile => &["--server-lr"],
            StrategyKind::Fedadam | StrategyKind::Fedyogi => &["--server-lr", "--beta1", "--beta2", "--tau"],
            StrategyKind::Fedadagrad => &["--server-lr", "--beta1", "--tau"],
            StrategyKind::TrimmedMean => &["--trim-fraction"],
            StrategyKind::Krum | StrategyKind::MultiKrum => &["--byzantine"],
        }
    }
}

/// The strategy flags of `serve` as given; `None` means "not given" (a default on creation, the
/// stored value on a restart).
#[derive(Clone, Debug, Default, PartialEq, clap::Args)]
pub struct StrategyArgs {
    /// Aggregation strategy: fedavg, fedprox, fedavgm, fedadam, fedyogi, fedadagrad, median,
    /// trimmed-mean, krum, multi-krum or reptile [default: fedavg].
    #[arg(long, value_enum, env = "FL_STRATEGY")]
    pub strategy: Option<StrategyKind>,
    /// μ of the proximal term μ/2·‖w − w_global‖² that clients add to their loss (any strategy;
    /// default 0.01 for fedprox, 0 otherwise).
    #[arg(long, allow_negative_numbers = true)]
    pub proximal_mu: Option<f64>,
    /// Server learning rate η [default: fedavgm 1, fedadam 0.1, fedyogi 0.01, fedadagrad 0.1];
    /// Reptile's meta step size ε [default: 1].
    #[arg(long, allow_negative_numbers = true)]
    pub server_lr: Option<f64>,
    /// Server momentum of fedavgm [default: 0.9].
    #[arg(long, allow_negative_numbers = true)]
    pub server_momentum: Option<f64>,
    /// β1 of fedadam, fedyogi, fedadagrad [default: 0.9].
    #[arg(long, allow_negative_numbers = true)]
    pub beta1: Option<f64>,
    /// β2 of fedadam, fedyogi [default: 0.99].
    #[arg(long, allow_negative_numbers = true)]
    pub beta2: Option<f64>,
    /// τ (adaptivity) of fedadam, fedyogi, fedadagrad [default: 0.001].
    #[arg(long, allow_negative_numbers = true)]
    pub tau: Option<f64>,
    /// Fraction trimmed from each tail by trimmed-mean [default: 0.2].
    #[arg(long, allow_negative_numbers = true)]
    pub trim_fraction: Option<f64>,
    /// Attackers F that krum and multi-krum tolerate; needs --min-clients ≥ 2F+3 (required for them).
    #[arg(long)]
    pub byzantine: Option<usize>,
}

/// A checked strategy configuration: what a federation runs with and keeps in its state dir.
/// Fields that do not apply to `strategy` are `None`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StrategyConfig {
    /// The strategy.
    pub strategy: StrategyKind,
    /// μ of the clients' proximal term (0: none).
    #[serde(default)]
    pub proximal_mu: f64,
    /// η.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_lr: Option<f64>,
    /// FedAvgM's momentum.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_momentum: Option<f64>,
    /// β1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta1: Option<f64>,
    /// β2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta2: Option<f64>,
    /// τ.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tau: Option<f64>,
    /// Trimmed mean's β per tail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trim_fraction: Option<f64>,
    /// Krum's F.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub byzantine: Option<usize>,
}

/// Why the strategy flags cannot run; each message names the flag to change.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum StrategyConfigError {
    /// A value out of its range.
    #[error("{flag} {value}: must be {range}")]
    OutOfRange {
        /// The flag.
        flag: &'static str,
        /// The value given.
        value: f64,
        /// What it must be.
        range: &'static str,
    },
    /// A flag the strategy does not use.
    #[error("{flag} does not apply to --strategy {strategy} (it takes: {takes})")]
    NotApplicable {
        /// The flag.
        flag: &'static str,
        /// The strategy.
        strategy: StrategyKind,
        /// What it takes.
        takes: String,
    },
    /// Krum without F.
    #[error("--strategy {0} needs --byzantine F, the number of attackers to tolerate")]
    NeedsByzantine(StrategyKind),
    /// Too few updates per round for Krum.
    #[error(
        "--strategy {strategy} --byzantine {byzantine} needs at least 2F+3 = {needed} updates per round: \
         raise --min-clients to {needed} (it is {min_clients}) or lower --byzantine"
    )]
    TooFewClients {
        /// The strategy.
        strategy: StrategyKind,
        /// F.
        byzantine: usize,
        /// 2F+3.
        needed: usize,
        /// `--min-clients`.
        min_clients: usize,
    },
    /// A robust strategy with differential privacy.
    #[error(
        "--strategy {0} cannot be combined with --dp-noise-multiplier: DP-FedAvg's guarantee is for the \
         mean of clipped updates; use fedavg or a server optimiser (fedavgm, fedadam, fedyogi, fedadagrad) with DP"
    )]
    RobustWithDp(StrategyKind),
}

fn check(flag: &'static str, value: f64, ok: bool, range: &'static str) -> Result<f64, StrategyConfigError> {
    if ok && value.is_finite() {
        Ok(value)
    } else {
        Err(StrategyConfigError::OutOfRange { flag, value, range })
    }
}

impl StrategyArgs {
    fn given(&self) -> [(&'static str, bool); 7] {
        [
            ("--server-lr", self.server_lr.is_some()),
            ("--server-momentum", self.server_momentum.is_some()),
            ("--beta1", self.beta1.is_some()),
            ("--beta2", self.beta2.is_some()),
            ("--tau", self.tau.is_some()),
            ("--trim-fraction", self.trim_fraction.is_some()),
            ("--byzantine", self.byzantine.is_some()),
        ]
    }

    /// Checks the flags and fills in the strategy's defaults.
    pub fn resolve(&self) -> Result<StrategyConfig, StrategyConfigError> {
        let strategy = self.strategy.unwrap_or_default();
        let takes = strategy.flags();
        if let Some((flag, _)) = self.given().iter().find(|(flag, given)| *given && !takes.contains(flag)) {
            let takes = if takes.is_empty() { "only --proximal-mu".to_string() } else { takes.join(", ") };
            return Err(StrategyConfigError::NotApplicable { flag, strategy, takes });
        }
        let applies = |flag: &str| takes.contains(&flag);
        let default_lr = match strategy {
            StrategyKind::Fedadam | StrategyKind::Fedadagrad => 0.1,
            StrategyKind::Fedyogi => 0.01,
            _ => 1.0,
        };
        let mu = self.proximal_mu.unwrap_or(if strategy == StrategyKind::Fedprox { 0.01 } else { 0.0 });
        let opt = |flag: &'static str, given: Option<f64>, default: f64, ok: fn(f64) -> bool, range: &'static str| {
            applies(flag)
                .then(|| check(flag, given.unwrap_or(default), ok(given.unwrap_or(default)), range))
                .transpose()
        };
        let byzantine = match strategy {
            StrategyKind::Krum | StrategyKind::MultiKrum => {
                Some(self.byzantine.ok_or(StrategyConfigError::NeedsByzantine(strategy))?)
            }
            _ => None,
        };
        Ok(StrategyConfig {
            strategy,
            proximal_mu: check("--proximal-mu", mu, mu >= 0.0, "zero or more")?,
            server_lr: opt("--server-lr", self.server_lr, default_lr, |x| x > 0.0, "more than 0")?,
            server_momentum: opt(
                "--server-momentum",
                self.server_momentum,
                0.9,
                |x| (0.0..1.0).contains(&x),
                "in [0, 1)",
            )?,
            beta1: opt("--beta1", self.beta1, 0.9, |x| (0.0..1.0).contains(&x), "in [0, 1)")?,
            beta2: opt("--beta2", self.beta2, 0.99, |x| (0.0..1.0).contains(&x), "in [0, 1)")?,
            tau: opt("--tau", self.tau, 1e-3, |x| x > 0.0, "more than 0")?,
            trim_fraction: opt("--trim-fraction", self.trim_fraction, 0.2, |x| (0.0..0.5).contains(&x), "in [0, 0.5)")?,
            byzantine,
        })
    }

    /// The given flags that differ from a federation's stored configuration. The strategy and its
    /// parameters shape the model (and the stored moments), so a restart may not change them.
    pub fn conflicts_with(&self, stored: &StrategyConfig) -> Vec<String> {
        let mut conflicts = Vec::new();
        if let Some(s) = self.strategy.filter(|s| *s != stored.strategy) {
            conflicts.push(format!("--strategy {s} (federation: {})", stored.strategy));
        }
        let mut differs = |flag: &str, given: Option<f64>, stored: Option<f64>| {
            if let Some(g) = given.filter(|g| Some(*g) != stored) {
                let was = stored.map_or_else(|| "not used".to_string(), |s| s.to_string());
                conflicts.push(format!("{flag} {g} (federation: {was})"));
            }
        };
        differs("--proximal-mu", self.proximal_mu, Some(stored.proximal_mu));
        differs("--server-lr", self.server_lr, stored.server_lr);
        differs("--server-momentum", self.server_momentum, stored.server_momentum);
        differs("--beta1", self.beta1, stored.beta1);
        differs("--beta2", self.beta2, stored.beta2);
        differs("--tau", self.tau, stored.tau);
        differs("--trim-fraction", self.trim_fraction, stored.trim_fraction);
        differs("--byzantine", self.byzantine.map(|b| b as f64), stored.byzantine.map(|b| b as f64));
        conflicts
    }
}

impl StrategyConfig {
    /// Checks the configuration against the round settings and DP: Krum needs 2F+3 updates in
    /// every round (a round completes with at least `min_clients`), and robust rules are not DP.
    pub fn check_runs_with(&self, min_clients: usize, dp: bool) -> Result<(), StrategyConfigError> {
        if dp && (self.strategy.is_robust() || self.strategy == StrategyKind::Reptile) {
            return Err(StrategyConfigError::RobustWithDp(self.strategy));
        }
        if let Some(rule) = self.robust_rule() {
            let needed = rule.min_updates();
            if min_clients < needed {
                return Err(StrategyConfigError::TooFewClients {
                    strategy: self.strategy,
                    byzantine: self.byzantine.unwrap_or(0),
                    needed,
                    min_clients,
                });
            }
        }
        Ok(())
    }

    /// The server optimiser, for fedavgm, fedadam, fedyogi and fedadagrad.
    pub fn server_optimizer(&self) -> Option<ServerOptimizer> {
        let lr = self.server_lr.unwrap_or(1.0);
        let (beta1, beta2, tau) = (self.beta1.unwrap_or(0.9), self.beta2.unwrap_or(0.99), self.tau.unwrap_or(1e-3));
        match self.strategy {
            StrategyKind::Fedavgm => {
                Some(ServerOptimizer::Momentum { lr, momentum: self.server_momentum.unwrap_or(0.9) })
            }
            StrategyKind::Fedadam => Some(ServerOptimizer::Adam { lr, beta1, beta2, tau }),
            StrategyKind::Fedyogi => Some(ServerOptimizer::Yogi { lr, beta1, beta2, tau }),
            StrategyKind::Fedadagrad => Some(ServerOptimizer::Adagrad { lr, beta1, tau }),
            _ => None,
        }
    }

    /// The robust rule, for median, trimmed-mean, krum and multi-krum.
    pub fn robust_rule(&self) -> Option<RobustRule> {
        let byzantine = self.byzantine.unwrap_or(0);
        match self.strategy {
            StrategyKind::Median => Some(RobustRule::Median),
            StrategyKind::TrimmedMean => Some(RobustRule::TrimmedMean { beta: self.trim_fraction.unwrap_or(0.2) }),
            StrategyKind::Krum => Some(RobustRule::Krum { byzantine }),
            StrategyKind::MultiKrum => Some(RobustRule::MultiKrum { byzantine }),
            _ => None,
        }
    }

    /// Reads `STATE/strategy.json`; FedAvg for a federation created before strategies existed.
    pub fn load(state_dir: &Path) -> anyhow::Result<StrategyConfig> {
        let path = state_dir.join(STRATEGY_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(StrategyConfig::default()),
            Err(e) => Err(anyhow::anyhow!("reading {}: {e}", path.display())),
        }
    }

    /// Writes `STATE/strategy.json`.
    pub fn save(&self, state_dir: &Path) -> anyhow::Result<()> {
        let path = state_dir.join(STRATEGY_FILE);
        fl_common::files::write_atomic(&path, &serde_json::to_vec_pretty(self)?, 0o644)
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))
    }
}

/// What the engine needs of the strategy: each attempt's strategy object, and the server
/// optimiser's state as of the last committed round.
#[derive(Debug)]
pub struct StrategyRuntime {
    config: StrategyConfig,
    state_dir: PathBuf,
    committed: Mutex<ServerOptState>,
}

impl StrategyRuntime {
    /// The runtime of a federation in `state_dir` whose last committed round is `completed`:
    /// loads the optimiser state of that round and removes robust spool directories left by a
    /// crash. Blocking.
    pub fn open(config: StrategyConfig, state_dir: &Path, completed: u32) -> anyhow::Result<StrategyRuntime> {
        let runtime =
            StrategyRuntime { config, state_dir: state_dir.to_path_buf(), committed: Mutex::new(Default::default()) };
        if runtime.config.server_optimizer().is_some() && completed > 0 {
            let path = runtime.state_path(completed);
            let bytes = std::fs::read(&path).map_err(|e| {
                anyhow::anyhow!("{}: {e}; the server optimiser's state of round {completed} is missing", path.display())
            })?;
            let state = ServerOptState::decode(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            *runtime.committed.lock().unwrap_or_else(PoisonError::into_inner) = state;
        }
        if let Ok(entries) = std::fs::read_dir(runtime.spool_root()) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with(SPOOL_PREFIX) {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        Ok(runtime)
    }

    /// The configuration.
    pub fn config(&self) -> &StrategyConfig {
        &self.config
    }

    fn spool_root(&self) -> PathBuf {
        self.state_dir.join("spool")
    }

    /// Where the optimiser state of `round` is stored.
    pub fn state_path(&self, round: u32) -> PathBuf {
        self.state_dir.join(format!("server-opt/round-{round:04}.safetensors"))
    }

    /// The strategy of a round attempt: `dp` (DP-FedAvg) or FedAvg as the mean, or a robust rule,
    /// with the server optimiser on top, from the committed state.
    pub fn attempt_strategy(&self, dp: Option<Box<dyn AggregationStrategy>>) -> Box<dyn AggregationStrategy> {
        if self.config.strategy == StrategyKind::Reptile {
            return Box::new(Reptile::new(self.config.server_lr.unwrap_or(1.0)));
        }
        let inner: Box<dyn AggregationStrategy> = match (self.config.robust_rule(), dp) {
            (Some(rule), _) => Box::new(RobustAggregator::new(rule, &self.spool_root())),
            (None, Some(dp)) => dp,
            (None, None) => Box::new(FedAvg::default()),
        };
        match self.config.server_optimizer() {
            Some(optimizer) => {
                let state = self.committed.lock().unwrap_or_else(PoisonError::into_inner).clone();
                Box::new(ServerOptimized::new(inner, optimizer, state))
            }
            None => inner,
        }
    }

    /// Writes the optimiser state of `round` before the round is committed (a crash in between
    /// leaves a file that the rerun of the round overwrites). Blocking.
    pub fn save_state(&self, round: u32, state: &ServerOptState) -> anyhow::Result<()> {
        let path = self.state_path(round);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.display()))?;
        }
        fl_common::files::write_atomic(&path, &state.encode(), 0o644)
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))
    }

    /// Makes `state` the committed one once `round` is committed, and removes older state files
    /// (the model files of old rounds stay; the moments of old rounds are not needed). Blocking.
    pub fn committed(&self, round: u32, state: ServerOptState) {
        *self.committed.lock().unwrap_or_else(PoisonError::into_inner) = state;
        if round > 1 {
            let old = self.state_path(round - 1);
            if let Err(e) = std::fs::remove_file(&old) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!("could not remove {}: {e}", old.display());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(strategy: StrategyKind) -> StrategyArgs {
        StrategyArgs { strategy: Some(strategy), ..Default::default() }
    }

    #[test]
    fn defaults_follow_the_papers_and_flower() {
        let adam = args(StrategyKind::Fedadam).resolve().unwrap();
        assert_eq!((adam.server_lr, adam.beta1, adam.beta2, adam.tau), (Some(0.1), Some(0.9), Some(0.99), Some(1e-3)));
        assert_eq!(args(StrategyKind::Fedyogi).resolve().unwrap().server_lr, Some(0.01));
        let m = args(StrategyKind::Fedavgm).resolve().unwrap();
        assert_eq!((m.server_lr, m.server_momentum), (Some(1.0), Some(0.9)));
        assert_eq!(args(StrategyKind::TrimmedMean).resolve().unwrap().trim_fraction, Some(0.2));
        assert_eq!(args(StrategyKind::Fedprox).resolve().unwrap().proximal_mu, 0.01);
        assert_eq!(args(StrategyKind::Reptile).resolve().unwrap().server_lr, Some(1.0));
        assert_eq!(StrategyArgs::default().resolve().unwrap(), StrategyConfig::default());
    }

    #[test]
    fn bad_flags_name_the_flag_and_the_range() {
        let err = StrategyArgs { trim_fraction: Some(0.5), ..args(StrategyKind::TrimmedMean) }.resolve().unwrap_err();
        assert_eq!(err.to_string(), "--trim-fraction 0.5: must be in [0, 0.5)");
        let err = StrategyArgs { tau: Some(0.1), ..args(StrategyKind::Median) }.resolve().unwrap_err();
        assert_eq!(err.to_string(), "--tau does not apply to --strategy median (it takes: only --proximal-mu)");
        let err = args(StrategyKind::Krum).resolve().unwrap_err();
        assert!(err.to_string().contains("--byzantine F"), "{err}");
        let err = StrategyArgs { proximal_mu: Some(-1.0), ..Default::default() }.resolve().unwrap_err();
        assert_eq!(err.to_string(), "--proximal-mu -1: must be zero or more");
        let krum = StrategyArgs { byzantine: Some(2), ..args(StrategyKind::Krum) }.resolve().unwrap();
        let err = krum.check_runs_with(6, false).unwrap_err();
        assert!(err.to_string().contains("raise --min-clients to 7 (it is 6)"), "{err}");
        krum.check_runs_with(7, false).unwrap();
        assert!(matches!(krum.check_runs_with(7, true), Err(StrategyConfigError::RobustWithDp(_))));
        let reptile = args(StrategyKind::Reptile).resolve().unwrap();
        assert!(matches!(reptile.check_runs_with(2, true), Err(StrategyConfigError::RobustWithDp(_))));
        let err = StrategyArgs { server_momentum: Some(0.5), ..args(StrategyKind::Reptile) }.resolve().unwrap_err();
        assert_eq!(err.to_string(), "--server-momentum does not apply to --strategy reptile (it takes: --server-lr)");
    }

    #[test]
    fn a_restart_may_not_change_the_strategy() {
        let stored = args(StrategyKind::Fedadam).resolve().unwrap();
        assert!(StrategyArgs::default().conflicts_with(&stored).is_empty());
        assert!(args(StrategyKind::Fedadam).conflicts_with(&stored).is_empty());
        let conflicts = args(StrategyKind::Median).conflicts_with(&stored);
        assert_eq!(conflicts, vec!["--strategy median (federation: fedadam)".to_string()]);
        let conflicts = StrategyArgs { server_lr: Some(0.5), ..Default::default() }.conflicts_with(&stored);
        assert_eq!(conflicts, vec!["--server-lr 0.5 (federation: 0.1)".to_string()]);
    }

    #[test]
    fn config_round_trips_through_its_file() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(StrategyConfig::load(dir.path()).unwrap(), StrategyConfig::default());
        let config = StrategyArgs { byzantine: Some(1), ..args(StrategyKind::MultiKrum) }.resolve().unwrap();
        config.save(dir.path()).unwrap();
        assert_eq!(StrategyConfig::load(dir.path()).unwrap(), config);
    }
}
