//! The `--strategy` flags: as given ([`StrategyArgs`]), checked and completed
//! ([`StrategyConfig`], kept in `STATE/strategy.json`), and what the engine runs with
//! ([`StrategyRuntime`]: the attempt's strategy, and the server optimiser's committed state in
//! `STATE/server-opt/round-NNNN.safetensors`).

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use serde::{Deserialize, Serialize};

use super::buffered::{BufferedMode, RoundMode};
use super::norm_bound::NormBounded;
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
    /// FedAvg of the updates, each clipped to an L2 norm of `--norm-bound`.
    NormBound,
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
            StrategyKind::NormBound => &["--norm-bound"],
        }
    }
}

/// The strategy flags of `serve` as given; `None` means "not given" (a default on creation, the
/// stored value on a restart).
#[derive(Clone, Debug, Default, PartialEq, clap::Args)]
pub struct StrategyArgs {
    /// Aggregation strategy: fedavg, fedprox, fedavgm, fedadam, fedyogi, fedadagrad, median,
    /// trimmed-mean, krum, multi-krum, norm-bound or reptile [default: fedavg].
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
    /// L2 norm each update is clipped to by norm-bound (required for it).
    #[arg(long, allow_negative_numbers = true)]
    pub norm_bound: Option<f64>,
    /// sync: rounds of sampled clients; async: FedBuff, clients train continuously and the
    /// server steps after every --buffer-size updates [default: sync].
    #[arg(long, value_enum, env = "FL_MODE")]
    pub mode: Option<RoundMode>,
    /// Updates per server step in --mode async (required for it).
    #[arg(long, value_parser = fl_common::cli::parse::int_in(1usize, 100_000))]
    pub buffer_size: Option<usize>,
    /// Largest staleness (server steps since the update's model) accepted in --mode async;
    /// staler updates are refused and counted [default: 10].
    #[arg(long, value_parser = fl_common::cli::parse::int_in(0u32, 1_000_000))]
    pub max_staleness: Option<u32>,
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
    /// Norm bounding's B.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub norm_bound: Option<f64>,
    /// Synchronous rounds or buffered asynchronous steps.
    #[serde(default)]
    pub mode: RoundMode,
    /// K of `--mode async`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buffer_size: Option<usize>,
    /// S of `--mode async`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_staleness: Option<u32>,
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
    /// Norm bounding without its bound.
    #[error("--strategy norm-bound needs --norm-bound B, the largest L2 norm of an update")]
    NeedsNormBound,
    /// Norm bounding with differential privacy, which clips already.
    #[error(
        "--strategy norm-bound cannot be combined with --dp-noise-multiplier: DP-FedAvg clips every update \
         already (--dp-clip-norm); use fedavg with DP"
    )]
    NormBoundWithDp,
    /// Async mode without its buffer size.
    #[error("--mode async needs --buffer-size K, the number of updates per server step")]
    NeedsBufferSize,
    /// An async flag in sync mode.
    #[error("{0} applies to --mode async only")]
    AsyncOnly(&'static str),
    /// A strategy that needs every update of a round at once, in async mode.
    #[error(
        "--mode async cannot run --strategy {0}: it needs every update of a synchronous round at once; \
         use fedavg, fedprox, norm-bound or a server optimiser (fedavgm, fedadam, fedyogi, fedadagrad)"
    )]
    AsyncWithRobust(StrategyKind),
    /// Secure aggregation with a strategy that needs each update.
    #[error(
        "--secure-aggregation cannot run --strategy {0}: it needs each client's update, which secure \
         aggregation hides; use fedavg, fedprox or a server optimiser"
    )]
    SecureWithEachUpdate(StrategyKind),
    /// Secure aggregation in async mode.
    #[error("--secure-aggregation cannot run in --mode async: masking needs a synchronous round of clients")]
    SecureAsync,
    /// Async mode with differential privacy.
    #[error(
        "--mode async cannot be combined with --dp-noise-multiplier: the accountant's amplification by \
         sampling assumes each round's clients are drawn at random, and an async step takes whichever \
         clients finish first"
    )]
    AsyncWithDp,
}

fn check(flag: &'static str, value: f64, ok: bool, range: &'static str) -> Result<f64, StrategyConfigError> {
    if ok && value.is_finite() {
        Ok(value)
    } else {
        Err(StrategyConfigError::OutOfRange { flag, value, range })
    }
}

impl StrategyArgs {
    fn given(&self) -> [(&'static str, bool); 8] {
        [
            ("--server-lr", self.server_lr.is_some()),
            ("--server-momentum", self.server_momentum.is_some()),
            ("--beta1", self.beta1.is_some()),
            ("--beta2", self.beta2.is_some()),
            ("--tau", self.tau.is_some()),
            ("--trim-fraction", self.trim_fraction.is_some()),
            ("--byzantine", self.byzantine.is_some()),
            ("--norm-bound", self.norm_bound.is_some()),
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
        let mode = self.mode.unwrap_or_default();
        let (buffer_size, max_staleness) = match mode {
            RoundMode::Async => (
                Some(self.buffer_size.ok_or(StrategyConfigError::NeedsBufferSize)?),
                Some(self.max_staleness.unwrap_or(10)),
            ),
            RoundMode::Sync if self.buffer_size.is_some() => {
                return Err(StrategyConfigError::AsyncOnly("--buffer-size"))
            }
            RoundMode::Sync if self.max_staleness.is_some() => {
                return Err(StrategyConfigError::AsyncOnly("--max-staleness"))
            }
            RoundMode::Sync => (None, None),
        };
        let norm_bound = match strategy {
            StrategyKind::NormBound => {
                let bound = self.norm_bound.ok_or(StrategyConfigError::NeedsNormBound)?;
                Some(check("--norm-bound", bound, bound > 0.0, "more than 0")?)
            }
            _ => None,
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
            norm_bound,
            mode,
            buffer_size,
            max_staleness,
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
        differs("--norm-bound", self.norm_bound, stored.norm_bound);
        if let Some(m) = self.mode.filter(|m| *m != stored.mode) {
            conflicts.push(format!("--mode {m} (federation: {})", stored.mode));
        }
        let mut differs_int = |flag: &str, given: Option<u64>, stored: Option<u64>| {
            if let Some(g) = given.filter(|g| Some(*g) != stored) {
                let was = stored.map_or_else(|| "not used".to_string(), |s| s.to_string());
                conflicts.push(format!("{flag} {g} (federation: {was})"));
            }
        };
        differs_int("--buffer-size", self.buffer_size.map(|b| b as u64), stored.buffer_size.map(|b| b as u64));
        differs_int("--max-staleness", self.max_staleness.map(u64::from), stored.max_staleness.map(u64::from));
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
        if dp && self.strategy == StrategyKind::NormBound {
            return Err(StrategyConfigError::NormBoundWithDp);
        }
        if self.mode == RoundMode::Async {
            if self.strategy.is_robust() {
                return Err(StrategyConfigError::AsyncWithRobust(self.strategy));
            }
            if dp {
                return Err(StrategyConfigError::AsyncWithDp);
            }
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

    /// Checks that secure aggregation, which hands the strategy one unmasked mean per round,
    /// can run with this configuration.
    pub fn check_secure_aggregation(&self) -> Result<(), StrategyConfigError> {
        if self.mode == RoundMode::Async {
            return Err(StrategyConfigError::SecureAsync);
        }
        if self.strategy.is_robust() || self.strategy == StrategyKind::NormBound {
            return Err(StrategyConfigError::SecureWithEachUpdate(self.strategy));
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

    /// The settings of `--mode async`; `None` in sync mode.
    pub fn buffered(&self) -> Option<BufferedMode> {
        match self.mode {
            RoundMode::Sync => None,
            RoundMode::Async => Some(BufferedMode {
                buffer_size: self.buffer_size.unwrap_or(1).max(1),
                max_staleness: self.max_staleness.unwrap_or(10),
            }),
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
/// optimiser's state as of the last aggregated round.
#[derive(Debug)]
pub struct StrategyRuntime {
    config: StrategyConfig,
    state_dir: PathBuf,
    current: Mutex<ServerOptState>,
}

impl StrategyRuntime {
    /// The runtime of a federation in `state_dir` whose last committed round is `completed`:
    /// loads the optimiser state of that round and removes robust spool directories left by a
    /// crash. Blocking.
    pub fn open(config: StrategyConfig, state_dir: &Path, completed: u32) -> anyhow::Result<StrategyRuntime> {
        let runtime =
            StrategyRuntime { config, state_dir: state_dir.to_path_buf(), current: Mutex::new(Default::default()) };
        if runtime.config.server_optimizer().is_some() && completed > 0 {
            let path = runtime.state_path(completed);
            let bytes = std::fs::read(&path).map_err(|e| {
                anyhow::anyhow!("{}: {e}; the server optimiser's state of round {completed} is missing", path.display())
            })?;
            let state = ServerOptState::decode(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            *runtime.current.lock().unwrap_or_else(PoisonError::into_inner) = state;
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
    /// with the server optimiser on top, from the state of the last aggregated round.
    pub fn attempt_strategy(&self, dp: Option<Box<dyn AggregationStrategy>>) -> Box<dyn AggregationStrategy> {
        if self.config.strategy == StrategyKind::Reptile {
            return Box::new(Reptile::new(self.config.server_lr.unwrap_or(1.0)));
        }
        let inner: Box<dyn AggregationStrategy> = match (self.config.robust_rule(), dp) {
            (Some(rule), _) => Box::new(RobustAggregator::new(rule, &self.spool_root())),
            (None, None) if self.config.strategy == StrategyKind::NormBound => {
                Box::new(NormBounded::new(self.config.norm_bound.unwrap_or(f64::INFINITY)))
            }
            (None, Some(dp)) => dp,
            (None, None) => Box::new(FedAvg::default()),
        };
        match self.config.server_optimizer() {
            Some(optimizer) => {
                let state = self.current.lock().unwrap_or_else(PoisonError::into_inner).clone();
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

    /// Makes `state` (of the round just aggregated) the one the next round's attempts start
    /// from. The engine calls it before that round's commit, which runs in the background while
    /// the next round collects; a crash before the commit restarts from the state file of the
    /// last committed round instead.
    pub fn advance(&self, state: ServerOptState) {
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = state;
    }

    /// Removes the state files older than `round` once `round` is committed (the model files of
    /// old rounds stay; the moments of old rounds are not needed). Blocking.
    pub fn committed(&self, round: u32) {
        if round > 1 {
            let old = self.state_path(round - 1);
            if let Err(e) = fl_common::files::remove_if_exists(&old) {
                tracing::warn!("could not remove {}: {e}", old.display());
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
    fn async_mode_and_norm_bound_flags() {
        let async_args = StrategyArgs { mode: Some(RoundMode::Async), buffer_size: Some(3), ..Default::default() };
        let config = async_args.resolve().unwrap();
        assert_eq!(config.buffered(), Some(BufferedMode { buffer_size: 3, max_staleness: 10 }));
        assert_eq!(StrategyArgs::default().resolve().unwrap().buffered(), None);
        let err = StrategyArgs { mode: Some(RoundMode::Async), ..Default::default() }.resolve().unwrap_err();
        assert_eq!(err, StrategyConfigError::NeedsBufferSize);
        let err = StrategyArgs { max_staleness: Some(2), ..Default::default() }.resolve().unwrap_err();
        assert_eq!(err.to_string(), "--max-staleness applies to --mode async only");
        // Strategies that need the whole round, and DP, are refused in async mode.
        let median = StrategyArgs { strategy: Some(StrategyKind::Median), ..async_args.clone() }.resolve().unwrap();
        let err = median.check_runs_with(3, false).unwrap_err();
        assert!(err.to_string().starts_with("--mode async cannot run --strategy median"), "{err}");
        assert_eq!(config.check_runs_with(3, true), Err(StrategyConfigError::AsyncWithDp));
        config.check_runs_with(1, false).unwrap();
        let adam = StrategyArgs { strategy: Some(StrategyKind::Fedadam), ..async_args.clone() }.resolve().unwrap();
        adam.check_runs_with(1, false).unwrap();
        // A restart may not change the mode or its settings.
        let conflicts = StrategyArgs { mode: Some(RoundMode::Sync), ..Default::default() }.conflicts_with(&config);
        assert_eq!(conflicts, vec!["--mode sync (federation: async)".to_string()]);
        let conflicts =
            StrategyArgs { buffer_size: Some(4), max_staleness: Some(1), ..Default::default() }.conflicts_with(&config);
        assert_eq!(
            conflicts,
            vec!["--buffer-size 4 (federation: 3)".to_string(), "--max-staleness 1 (federation: 10)".to_string()]
        );
        assert!(async_args.conflicts_with(&config).is_empty());

        let err = args(StrategyKind::NormBound).resolve().unwrap_err();
        assert_eq!(err, StrategyConfigError::NeedsNormBound);
        let err = StrategyArgs { norm_bound: Some(0.0), ..args(StrategyKind::NormBound) }.resolve().unwrap_err();
        assert_eq!(err.to_string(), "--norm-bound 0: must be more than 0");
        let err = StrategyArgs { norm_bound: Some(1.0), ..Default::default() }.resolve().unwrap_err();
        assert!(err.to_string().starts_with("--norm-bound does not apply to --strategy fedavg"), "{err}");
        let bound = StrategyArgs { norm_bound: Some(2.5), ..args(StrategyKind::NormBound) }.resolve().unwrap();
        assert_eq!(bound.norm_bound, Some(2.5));
        assert_eq!(bound.check_runs_with(1, true), Err(StrategyConfigError::NormBoundWithDp));
        // Secure aggregation hides each update: refused with norm-bound, robust rules and async mode.
        assert_eq!(
            bound.check_secure_aggregation(),
            Err(StrategyConfigError::SecureWithEachUpdate(StrategyKind::NormBound))
        );
        assert_eq!(median.check_secure_aggregation(), Err(StrategyConfigError::SecureAsync));
        assert_eq!(
            StrategyArgs { byzantine: Some(1), ..args(StrategyKind::Krum) }
                .resolve()
                .unwrap()
                .check_secure_aggregation(),
            Err(StrategyConfigError::SecureWithEachUpdate(StrategyKind::Krum))
        );
        args(StrategyKind::Fedadam).resolve().unwrap().check_secure_aggregation().unwrap();
        let conflicts = StrategyArgs { norm_bound: Some(3.0), ..Default::default() }.conflicts_with(&bound);
        assert_eq!(conflicts, vec!["--norm-bound 3 (federation: 2.5)".to_string()]);
    }

    #[test]
    fn config_round_trips_through_its_file() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(StrategyConfig::load(dir.path()).unwrap(), StrategyConfig::default());
        let config = StrategyArgs { byzantine: Some(1), ..args(StrategyKind::MultiKrum) }.resolve().unwrap();
        config.save(dir.path()).unwrap();
        assert_eq!(StrategyConfig::load(dir.path()).unwrap(), config);
        let config = StrategyArgs {
            mode: Some(RoundMode::Async),
            buffer_size: Some(5),
            max_staleness: Some(2),
            norm_bound: Some(1.5),
            ..args(StrategyKind::NormBound)
        }
        .resolve()
        .unwrap();
        config.save(dir.path()).unwrap();
        assert_eq!(StrategyConfig::load(dir.path()).unwrap(), config);
    }
}
