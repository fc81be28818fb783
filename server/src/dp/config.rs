//! The DP flags: as given ([`DpArgs`]), and checked and completed ([`DpConfig`]).

use serde::{Deserialize, Serialize};

/// Default `--dp-target-quantile`: C follows the median update norm.
pub const DEFAULT_TARGET_QUANTILE: f64 = 0.5;
/// Default `--dp-clip-lr`, the geometric step of Andrew et al.
pub const DEFAULT_CLIP_LR: f64 = 0.2;
/// Default initial clip norm under `--dp-adaptive-clip` (TFF's `initial_l2_norm_clip`).
pub const DEFAULT_INITIAL_ADAPTIVE_CLIP: f64 = 0.1;

/// Where client updates are clipped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ClipSite {
    /// The coordinator clips what it receives.
    #[default]
    Server,
    /// Clients clip before sending (the round task carries C); the coordinator clips again,
    /// which changes nothing for an honest client.
    Client,
}

impl std::fmt::Display for ClipSite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ClipSite::Server => "server",
            ClipSite::Client => "client",
        })
    }
}

/// The DP flags of `serve` as given; `None` (or false) means "not given". A restart without
/// them keeps the federation's own.
#[derive(Clone, Debug, Default, PartialEq, clap::Args)]
pub struct DpArgs {
    /// Client-level differential privacy (DP-FedAvg): Gaussian noise of this multiplier Z times the
    /// clip norm on the sum of the clipped updates. Turns DP on [default: off].
    #[arg(long = "dp-noise-multiplier", allow_negative_numbers = true, env = "FL_DP_NOISE_MULTIPLIER")]
    pub noise_multiplier: Option<f64>,
    /// L2 norm C each client's update is clipped to (the initial C with --dp-adaptive-clip,
    /// default 0.1 there).
    #[arg(long = "dp-clip-norm", allow_negative_numbers = true, env = "FL_DP_CLIP_NORM")]
    pub clip_norm: Option<f64>,
    /// Adapt C each round towards a quantile of the update norms (Andrew et al. 2021).
    #[arg(long = "dp-adaptive-clip")]
    pub adaptive_clip: bool,
    /// Fraction of clients to leave unclipped under --dp-adaptive-clip [default: 0.5].
    #[arg(long = "dp-target-quantile", allow_negative_numbers = true)]
    pub target_quantile: Option<f64>,
    /// Step of the geometric update of C under --dp-adaptive-clip [default: 0.2].
    #[arg(long = "dp-clip-lr", allow_negative_numbers = true)]
    pub clip_lr: Option<f64>,
    /// Where updates are clipped: server, or client (the round task carries C) [default: server].
    #[arg(long = "dp-clip-on", value_enum)]
    pub clip_on: Option<ClipSite>,
    /// δ of the (ε, δ) guarantee [default: 1/n^1.1 for n enrolled clients].
    #[arg(long = "dp-delta", allow_negative_numbers = true)]
    pub delta: Option<f64>,
    /// End the federation, with a final model, before a round that would take ε past this.
    #[arg(long = "dp-max-epsilon", allow_negative_numbers = true, env = "FL_DP_MAX_EPSILON")]
    pub max_epsilon: Option<f64>,
}

/// Adaptive clipping settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdaptiveClipConfig {
    /// γ, the fraction of clients to leave unclipped.
    pub target_quantile: f64,
    /// η, the geometric step.
    pub learning_rate: f64,
}

/// A checked DP configuration: what a federation runs with and keeps in its state dir.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DpConfig {
    /// Z: noise standard deviation over the clip norm, for the whole round.
    pub noise_multiplier: f64,
    /// The clip norm C (the initial one under adaptive clipping).
    pub clip_norm: f64,
    /// Adaptive clipping, if on.
    pub adaptive: Option<AdaptiveClipConfig>,
    /// Where updates are clipped.
    pub clip_on: ClipSite,
    /// δ; `None` means 1/n^1.1 for n enrolled clients, recomputed each round.
    pub delta: Option<f64>,
    /// The budget: the federation ends before a round that would exceed it.
    pub max_epsilon: Option<f64>,
}

/// Why the DP flags cannot run; each message names the flag to change.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DpConfigError {
    /// A DP flag without `--dp-noise-multiplier`.
    #[error("{0} needs --dp-noise-multiplier (DP is off without it)")]
    NeedsNoiseMultiplier(&'static str),
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
    /// Fixed clipping without a norm.
    #[error("--dp-noise-multiplier needs --dp-clip-norm C (or --dp-adaptive-clip to learn C)")]
    NeedsClipNorm,
    /// An adaptive-clipping flag without `--dp-adaptive-clip`.
    #[error("{0} needs --dp-adaptive-clip")]
    NeedsAdaptiveClip(&'static str),
    /// Clients that clip cannot yet tell the coordinator whether they had to.
    #[error(
        "--dp-clip-on client cannot be combined with --dp-adaptive-clip yet: the coordinator would need each \
         client's unclipped bit; use --dp-clip-on server, or a fixed --dp-clip-norm"
    )]
    ClientClipAdaptive,
    /// The clip count's noise would use the whole budget.
    #[error(
        "--dp-adaptive-clip: the noise on the count of unclipped clients (standard deviation {count_stddev}, \
         1/20 of the clients per round) must be more than half of --dp-noise-multiplier {noise_multiplier}; \
         sample more clients per round (more than 10·Z) or lower --dp-noise-multiplier"
    )]
    CountNoiseTooSmall {
        /// The total noise multiplier.
        noise_multiplier: f64,
        /// The count's noise standard deviation.
        count_stddev: f64,
    },
}

fn check(flag: &'static str, value: f64, ok: bool, range: &'static str) -> Result<f64, DpConfigError> {
    if ok && value.is_finite() {
        Ok(value)
    } else {
        Err(DpConfigError::OutOfRange { flag, value, range })
    }
}

impl DpArgs {
    /// Checks the flags and fills in defaults; `None` when DP is off.
    pub fn resolve(&self) -> Result<Option<DpConfig>, DpConfigError> {
        let Some(z) = self.noise_multiplier else {
            let given = [
                ("--dp-clip-norm", self.clip_norm.is_some()),
                ("--dp-adaptive-clip", self.adaptive_clip),
                ("--dp-target-quantile", self.target_quantile.is_some()),
                ("--dp-clip-lr", self.clip_lr.is_some()),
                ("--dp-clip-on", self.clip_on.is_some()),
                ("--dp-delta", self.delta.is_some()),
                ("--dp-max-epsilon", self.max_epsilon.is_some()),
            ];
            return match given.iter().find(|(_, g)| *g) {
                Some((flag, _)) => Err(DpConfigError::NeedsNoiseMultiplier(flag)),
                None => Ok(None),
            };
        };
        let noise_multiplier = check("--dp-noise-multiplier", z, z >= 0.0, "zero or more")?;
        let adaptive = if self.adaptive_clip {
            let q = self.target_quantile.unwrap_or(DEFAULT_TARGET_QUANTILE);
            let lr = self.clip_lr.unwrap_or(DEFAULT_CLIP_LR);
            Some(AdaptiveClipConfig {
                target_quantile: check("--dp-target-quantile", q, q > 0.0 && q < 1.0, "in (0, 1)")?,
                learning_rate: check("--dp-clip-lr", lr, lr > 0.0, "more than 0")?,
            })
        } else if self.target_quantile.is_some() {
            return Err(DpConfigError::NeedsAdaptiveClip("--dp-target-quantile"));
        } else if self.clip_lr.is_some() {
            return Err(DpConfigError::NeedsAdaptiveClip("--dp-clip-lr"));
        } else {
            None
        };
        let clip_norm = match (self.clip_norm, &adaptive) {
            (Some(c), _) => check("--dp-clip-norm", c, c > 0.0, "more than 0")?,
            (None, Some(_)) => DEFAULT_INITIAL_ADAPTIVE_CLIP,
            (None, None) => return Err(DpConfigError::NeedsClipNorm),
        };
        if adaptive.is_some() && self.clip_on == Some(ClipSite::Client) {
            return Err(DpConfigError::ClientClipAdaptive);
        }
        let delta = self.delta.map(|d| check("--dp-delta", d, d > 0.0 && d < 1.0, "in (0, 1)")).transpose()?;
        let max_epsilon = self.max_epsilon.map(|e| check("--dp-max-epsilon", e, e > 0.0, "more than 0")).transpose()?;
        Ok(Some(DpConfig {
            noise_multiplier,
            clip_norm,
            adaptive,
            clip_on: self.clip_on.unwrap_or_default(),
            delta,
            max_epsilon,
        }))
    }

    /// The given flags that differ from a federation's stored DP configuration (`None`: DP off).
    /// DP flags change what a federation promises, so a restart may not change them.
    pub fn conflicts_with(&self, stored: Option<&DpConfig>) -> Vec<String> {
        let Some(stored) = stored else {
            return match self.noise_multiplier {
                Some(z) => vec![format!("--dp-noise-multiplier {z} (the federation runs without DP)")],
                None => Vec::new(),
            };
        };
        let opt = |v: Option<f64>| v.map_or("unset".to_string(), |v| v.to_string());
        let given = |v: Option<f64>| v.map(|v| v.to_string());
        let (quantile, lr) =
            stored.adaptive.as_ref().map_or((None, None), |a| (Some(a.target_quantile), Some(a.learning_rate)));
        let adaptive = |on: bool| if on { "on" } else { "off" }.to_string();
        let pairs = [
            ("--dp-noise-multiplier", given(self.noise_multiplier), stored.noise_multiplier.to_string()),
            ("--dp-clip-norm", given(self.clip_norm), stored.clip_norm.to_string()),
            ("--dp-adaptive-clip", self.adaptive_clip.then(|| adaptive(true)), adaptive(stored.adaptive.is_some())),
            ("--dp-target-quantile", given(self.target_quantile), opt(quantile)),
            ("--dp-clip-lr", given(self.clip_lr), opt(lr)),
            ("--dp-clip-on", self.clip_on.map(|v| v.to_string()), stored.clip_on.to_string()),
            ("--dp-delta", given(self.delta), opt(stored.delta)),
            ("--dp-max-epsilon", given(self.max_epsilon), opt(stored.max_epsilon)),
        ];
        pairs
            .into_iter()
            .filter_map(|(flag, given, had)| {
                given.filter(|g| *g != had).map(|g| format!("{flag} {g} (federation: {had})"))
            })
            .collect()
    }
}

impl DpConfig {
    /// δ for a federation of `enrolled` clients: the flag, or 1/n^1.1.
    pub fn delta_for(&self, enrolled: usize) -> f64 {
        self.delta.unwrap_or_else(|| (enrolled.max(2) as f64).powf(-1.1))
    }

    /// σ_b, the standard deviation of the noise on the count of unclipped clients: m/20 for
    /// `clients_per_round` = m expected per round, as Andrew et al. and TFF.
    pub fn count_stddev(clients_per_round: usize) -> f64 {
        clients_per_round as f64 / 20.0
    }

    /// The noise multiplier of the update itself: Z without adaptive clipping; with it, what is
    /// left after the count takes its share (see [`super::mechanism::update_noise_multiplier`]).
    pub fn update_noise_multiplier(&self, clients_per_round: usize) -> Result<f64, DpConfigError> {
        match self.adaptive {
            None => Ok(self.noise_multiplier),
            Some(_) if self.noise_multiplier == 0.0 => Ok(0.0),
            Some(_) => {
                super::mechanism::update_noise_multiplier(self.noise_multiplier, Self::count_stddev(clients_per_round))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on(z: f64, c: f64) -> DpArgs {
        DpArgs { noise_multiplier: Some(z), clip_norm: Some(c), ..DpArgs::default() }
    }

    #[test]
    fn off_by_default() {
        assert_eq!(DpArgs::default().resolve(), Ok(None));
    }

    #[test]
    fn defaults_when_on() {
        let cfg = on(1.0, 0.5).resolve().unwrap().unwrap();
        assert_eq!(cfg.clip_on, ClipSite::Server);
        assert_eq!(cfg.adaptive, None);
        assert!((cfg.delta_for(100) - 100f64.powf(-1.1)).abs() < 1e-15, "δ = 1/n^1.1");
        let adaptive = DpArgs { adaptive_clip: true, clip_norm: None, ..on(1.0, 0.5) }.resolve().unwrap().unwrap();
        assert_eq!(
            adaptive.adaptive,
            Some(AdaptiveClipConfig { target_quantile: DEFAULT_TARGET_QUANTILE, learning_rate: DEFAULT_CLIP_LR })
        );
        assert_eq!(adaptive.clip_norm, DEFAULT_INITIAL_ADAPTIVE_CLIP);
    }

    #[test]
    fn bad_flags_name_the_flag() {
        let err = |args: DpArgs| args.resolve().unwrap_err().to_string();
        assert!(err(on(-1.0, 0.5)).contains("--dp-noise-multiplier -1"));
        assert!(err(on(f64::NAN, 0.5)).contains("--dp-noise-multiplier"));
        assert!(err(on(1.0, 0.0)).contains("--dp-clip-norm 0"));
        assert!(err(DpArgs { clip_norm: None, ..on(1.0, 1.0) }).contains("--dp-clip-norm"));
        for q in [0.0, 1.0, 1.5, -0.1] {
            let args = DpArgs { adaptive_clip: true, target_quantile: Some(q), ..on(1.0, 0.5) };
            assert!(err(args).contains(&format!("--dp-target-quantile {q}: must be in (0, 1)")), "{q}");
        }
        assert!(err(DpArgs { target_quantile: Some(0.5), ..on(1.0, 0.5) }).contains("needs --dp-adaptive-clip"));
        assert!(err(DpArgs { adaptive_clip: true, clip_lr: Some(0.0), ..on(1.0, 0.5) }).contains("--dp-clip-lr 0"));
        assert!(err(DpArgs { delta: Some(1.0), ..on(1.0, 0.5) }).contains("--dp-delta 1"));
        assert!(err(DpArgs { max_epsilon: Some(-2.0), ..on(1.0, 0.5) }).contains("--dp-max-epsilon -2"));
        assert!(err(DpArgs { clip_norm: Some(1.0), ..DpArgs::default() })
            .contains("--dp-clip-norm needs --dp-noise-multiplier"));
    }

    #[test]
    fn restart_with_other_dp_flags_is_a_conflict() {
        let args = DpArgs { max_epsilon: Some(8.0), ..on(1.0, 0.5) };
        let stored = args.resolve().unwrap().unwrap();
        assert!(args.conflicts_with(Some(&stored)).is_empty());
        assert!(DpArgs::default().conflicts_with(Some(&stored)).is_empty(), "no flags: the stored ones");
        let changed = DpArgs { max_epsilon: Some(16.0), ..on(1.2, 0.5) };
        let conflicts = changed.conflicts_with(Some(&stored));
        assert_eq!(conflicts.len(), 2, "{conflicts:?}");
        assert!(conflicts[0].starts_with("--dp-noise-multiplier 1.2"));
        assert!(conflicts[1].starts_with("--dp-max-epsilon 16"));
        assert_eq!(on(1.0, 0.5).conflicts_with(None).len(), 1, "DP on a federation that ran without it");
    }

    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        dp: DpArgs,
    }

    #[test]
    fn the_flags_parse_and_a_negative_value_reaches_the_check() {
        use clap::Parser;
        let cli = Cli::try_parse_from([
            "serve",
            "--dp-noise-multiplier",
            "1.1",
            "--dp-adaptive-clip",
            "--dp-target-quantile",
            "0.7",
            "--dp-clip-on",
            "server",
            "--dp-max-epsilon",
            "8",
        ])
        .unwrap();
        let cfg = cli.dp.resolve().unwrap().unwrap();
        assert_eq!(cfg.noise_multiplier, 1.1);
        assert_eq!(cfg.adaptive.unwrap().target_quantile, 0.7);
        assert_eq!(cfg.max_epsilon, Some(8.0));
        let negative = Cli::try_parse_from(["serve", "--dp-noise-multiplier", "-1"]).unwrap();
        let err = negative.dp.resolve().unwrap_err().to_string();
        assert_eq!(err, "--dp-noise-multiplier -1: must be zero or more");
        assert!(Cli::try_parse_from(["serve"]).unwrap().dp.resolve().unwrap().is_none(), "off by default");
    }
}
