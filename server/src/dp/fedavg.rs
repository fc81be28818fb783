//! DP-FedAvg as an [`AggregationStrategy`]: the engine folds updates into it like into FedAvg.
//!
//! Each update is clipped to L2 norm C and counts with weight one (an example-count weight
//! would both leak the count and scale one client's influence past C). The mean of the m
//! clipped updates gets Gaussian noise of standard deviation z_Δ·C/m on every coordinate.

use fl_common::TensorSet;
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::mechanism::{add_gaussian_noise, clip_factor, AdaptiveClipNorm};
use super::{DpConfig, DpConfigError};
use crate::aggregation::{AggregationStrategy, ClientUpdate};

/// Relative slack on C below which an update counts as unclipped.
const UNCLIPPED_TOLERANCE: f64 = 1e-5;

/// What one DP round did, for `metrics.jsonl`.
#[derive(Clone, Debug, PartialEq)]
pub struct DpRoundReport {
    /// The clip norm C used this round.
    pub clip_norm: f64,
    /// Updates averaged (m).
    pub clients: usize,
    /// Updates whose norm was at most C; `None` under secure aggregation, where the coordinator
    /// sees only the sum of updates the clients clipped.
    pub unclipped: Option<usize>,
    /// Standard deviation of the noise on each coordinate of the average: z_Δ·C/m.
    pub noise_std: f64,
    /// The clip norm of the next round (differs from `clip_norm` under adaptive clipping).
    pub next_clip_norm: f64,
}

/// Differentially private FedAvg (McMahan et al. 2018), with the adaptive clip norm of Andrew et
/// al. 2021 when configured.
#[derive(Debug)]
pub struct DpFedAvg {
    clip_norm: f64,
    update_noise_multiplier: f64,
    adaptive: Option<AdaptiveClipNorm>,
    sum: Option<TensorSet>,
    folded: usize,
    unclipped: usize,
    /// Clients clip before sending (`--dp-clip-on client`).
    clients_clip: bool,
    /// Whether this round's updates came as one securely aggregated sum.
    secure: bool,
    rng: StdRng,
    last_round: Option<DpRoundReport>,
}

impl DpFedAvg {
    /// A strategy for `config` with `clip_norm` as the current C (the stored one after a
    /// restart), for `clients_per_round` expected updates per round, with noise from a
    /// generator seeded by the operating system.
    pub fn new(config: &DpConfig, clip_norm: f64, clients_per_round: usize) -> Result<Self, DpConfigError> {
        Self::with_rng(config, clip_norm, clients_per_round, StdRng::from_os_rng())
    }

    /// As [`DpFedAvg::new`], with a given generator (tests).
    pub fn with_rng(
        config: &DpConfig,
        clip_norm: f64,
        clients_per_round: usize,
        rng: StdRng,
    ) -> Result<Self, DpConfigError> {
        let update_noise_multiplier = config.update_noise_multiplier(clients_per_round)?;
        let adaptive = config.adaptive.as_ref().map(|a| AdaptiveClipNorm {
            clip_norm,
            target_quantile: a.target_quantile,
            learning_rate: a.learning_rate,
            count_stddev: if config.noise_multiplier > 0.0 { DpConfig::count_stddev(clients_per_round) } else { 0.0 },
        });
        Ok(DpFedAvg {
            clip_norm,
            update_noise_multiplier,
            adaptive,
            sum: None,
            folded: 0,
            unclipped: 0,
            clients_clip: config.clip_on == super::ClipSite::Client,
            secure: false,
            rng,
            last_round: None,
        })
    }

    /// The clip norm the next round uses.
    pub fn clip_norm(&self) -> f64 {
        self.clip_norm
    }

    /// The noise multiplier applied to the update (z_Δ; Z without adaptive clipping).
    pub fn update_noise_multiplier(&self) -> f64 {
        self.update_noise_multiplier
    }

    /// What the last finished round did.
    pub fn last_round(&self) -> Option<&DpRoundReport> {
        self.last_round.as_ref()
    }

    /// A strategy for a new round attempt with the same settings, clip norm `clip_norm` and a
    /// fresh generator seeded by the operating system.
    pub fn for_attempt(&self, clip_norm: f64) -> DpFedAvg {
        DpFedAvg {
            clip_norm,
            update_noise_multiplier: self.update_noise_multiplier,
            adaptive: self.adaptive.clone().map(|a| AdaptiveClipNorm { clip_norm, ..a }),
            sum: None,
            folded: 0,
            unclipped: 0,
            clients_clip: self.clients_clip,
            secure: false,
            rng: StdRng::from_os_rng(),
            last_round: None,
        }
    }
}

impl AggregationStrategy for DpFedAvg {
    fn begin_round(&mut self, global: &TensorSet) {
        self.sum = Some(global.zeros_like());
        self.folded = 0;
        self.unclipped = 0;
        self.secure = false;
    }

    fn fold(&mut self, update: ClientUpdate<'_>) {
        let sum = self.sum.as_mut().expect("begin_round before fold");
        let norm = update.delta.l2_norm();
        let factor = clip_factor(norm, self.clip_norm);
        // An update a client already clipped to C comes back a hair above C after f32 rounding;
        // it still counts as unclipped (the scaling below stays exact).
        if norm <= self.clip_norm * (1.0 + UNCLIPPED_TOLERANCE) {
            self.unclipped += 1;
        }
        sum.add_scaled(update.delta, factor as f32);
        self.folded += 1;
    }

    /// The sum of updates the clients clipped to C themselves: noise is added after unmasking,
    /// calibrated like the sum of `count` clipped updates. Adaptive clipping is not offered here
    /// (it needs each client's clipped bit).
    fn supports_secure_sum(&self) -> bool {
        self.clients_clip && self.adaptive.is_none()
    }

    fn fold_secure_sum(&mut self, mean: &TensorSet, count: usize) {
        let sum = self.sum.as_mut().expect("begin_round before fold");
        sum.add_scaled(mean, count as f32);
        self.folded += count;
        self.secure = true;
    }

    fn finish(&mut self, global: &TensorSet) -> Option<TensorSet> {
        let mut sum = self.sum.take()?;
        if self.folded == 0 {
            return None;
        }
        let m = self.folded as f64;
        let used = self.clip_norm;
        // Noise on the sum has standard deviation z_Δ·C (the sensitivity of a sum of clipped
        // updates is C), so the mean carries z_Δ·C/m.
        add_gaussian_noise(&mut sum, self.update_noise_multiplier * used, &mut self.rng);
        let mut next = global.clone();
        next.add_scaled(&sum, (1.0 / m) as f32);
        if let Some(adaptive) = &mut self.adaptive {
            let b = adaptive.noised_unclipped_fraction(self.unclipped, self.folded, &mut self.rng);
            adaptive.step(b);
            self.clip_norm = adaptive.clip_norm;
        }
        self.last_round = Some(DpRoundReport {
            clip_norm: used,
            clients: self.folded,
            unclipped: (!self.secure).then_some(self.unclipped),
            noise_std: self.update_noise_multiplier * used / m,
            next_clip_norm: self.clip_norm,
        });
        Some(next)
    }

    fn dp_round(&self) -> Option<&DpRoundReport> {
        self.last_round.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dp::DpArgs;
    use fl_common::NamedTensor;
    use rand::Rng;

    fn tensors(values: &[f32]) -> TensorSet {
        TensorSet::new(vec![NamedTensor { name: "w".into(), shape: vec![values.len()], data: values.to_vec() }])
    }

    fn config(args: DpArgs) -> DpConfig {
        args.resolve().unwrap().unwrap()
    }

    #[test]
    fn noise_std_is_z_c_over_m_on_every_coordinate() {
        let (z, c, m, n) = (1.3, 0.5, 10, 200_000);
        let cfg = config(DpArgs { noise_multiplier: Some(z), clip_norm: Some(c), ..DpArgs::default() });
        let mut dp = DpFedAvg::new(&cfg, c, m).unwrap();
        let global = tensors(&vec![0.0; n]);
        let zero = global.zeros_like();
        dp.begin_round(&global);
        for _ in 0..m {
            dp.fold(ClientUpdate { delta: &zero, num_examples: 1 });
        }
        let next = dp.finish(&global).unwrap();
        let values = &next.tensors[0].data;
        assert!(values.iter().all(|&v| v != 0.0), "untouched coordinates get noise too");
        let mean = values.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64;
        let std = (values.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt();
        let want = z * c / m as f64;
        assert!((std - want).abs() / want < 0.02, "empirical std {std} vs Z·C/m = {want}");
        assert!(mean.abs() < 5.0 * want / (n as f64).sqrt(), "mean {mean}");
        assert_eq!(dp.last_round().unwrap().noise_std, want);
    }

    #[test]
    fn updates_are_clipped_and_weighted_uniformly() {
        let cfg = config(DpArgs { noise_multiplier: Some(0.0), clip_norm: Some(1.0), ..DpArgs::default() });
        let mut dp = DpFedAvg::new(&cfg, 1.0, 2).unwrap();
        let global = tensors(&[0.0, 0.0]);
        dp.begin_round(&global);
        // A huge update with a huge example count moves the mean by at most C/m.
        dp.fold(ClientUpdate { delta: &tensors(&[300.0, 400.0]), num_examples: 1_000_000 });
        dp.fold(ClientUpdate { delta: &tensors(&[0.0, 0.5]), num_examples: 1 });
        let next = dp.finish(&global).unwrap();
        let want = [(0.6 + 0.0) / 2.0, (0.8 + 0.5) / 2.0];
        for (got, want) in next.tensors[0].data.iter().zip(want) {
            assert!((f64::from(*got) - want).abs() < 1e-6, "{got} vs {want}");
        }
        let report = dp.last_round().unwrap();
        assert_eq!((report.clients, report.unclipped), (2, Some(1)));
    }

    /// Andrew et al.'s experiment: norms spread evenly on [0.5, 1.5], C should find their median.
    fn adaptive_run(initial: f64, seed: u64) -> f64 {
        let m = 20;
        let cfg = config(DpArgs {
            noise_multiplier: Some(1.0),
            clip_norm: Some(initial),
            adaptive_clip: true,
            ..DpArgs::default()
        });
        let mut dp = DpFedAvg::with_rng(&cfg, initial, m, StdRng::seed_from_u64(seed)).unwrap();
        let mut norms = StdRng::seed_from_u64(seed ^ 0xA5A5);
        let global = tensors(&[0.0; 4]);
        for _ in 0..60 {
            dp.begin_round(&global);
            for _ in 0..m {
                let norm: f32 = norms.random_range(0.5..1.5);
                dp.fold(ClientUpdate { delta: &tensors(&[norm, 0.0, 0.0, 0.0]), num_examples: 1 });
            }
            dp.finish(&global).unwrap();
        }
        dp.clip_norm()
    }

    #[test]
    fn adaptive_clip_norm_reaches_the_median_by_round_60() {
        let median = 1.0;
        for (initial, seed) in [(0.1, 1), (0.1, 2), (5.0, 3), (5.0, 4), (1.0, 5)] {
            let c = adaptive_run(initial, seed);
            assert!((c - median).abs() / median < 0.1, "from C={initial} (seed {seed}): C={c} after 60 rounds");
        }
    }

    #[test]
    fn adaptive_clipping_charges_the_count_noise_to_the_update() {
        let cfg = config(DpArgs { noise_multiplier: Some(1.0), adaptive_clip: true, ..DpArgs::default() });
        let dp = DpFedAvg::new(&cfg, cfg.clip_norm, 100).unwrap();
        // σ_b = 5: z_Δ = (1 − 1/100)^(−1/2).
        assert!((dp.update_noise_multiplier() - 0.99f64.powf(-0.5)).abs() < 1e-12);
        let err = DpFedAvg::new(&cfg, cfg.clip_norm, 10).unwrap_err();
        assert!(err.to_string().contains("--dp-adaptive-clip"), "{err}");
    }

    #[test]
    fn a_secure_sum_gets_the_noise_of_its_count_of_clipped_updates() {
        let (z, c, m, n) = (1.1, 0.5, 8, 100_000);
        let client_clip = DpArgs {
            noise_multiplier: Some(z),
            clip_norm: Some(c),
            clip_on: Some(super::super::ClipSite::Client),
            ..DpArgs::default()
        };
        let mut dp = DpFedAvg::with_rng(&config(client_clip), c, m, StdRng::seed_from_u64(9)).unwrap();
        assert!(dp.supports_secure_sum());
        let server_clip = DpArgs { noise_multiplier: Some(z), clip_norm: Some(c), ..DpArgs::default() };
        assert!(
            !DpFedAvg::new(&config(server_clip), c, m).unwrap().supports_secure_sum(),
            "the server cannot clip a sum"
        );

        // Secure aggregation hands over the mean of m inputs; the next model is the mean plus
        // noise of standard deviation z·C/m, exactly as if m clipped updates were folded.
        let global = tensors(&vec![0.0; n]);
        let mean = tensors(&vec![0.25; n]);
        dp.begin_round(&global);
        dp.fold_secure_sum(&mean, m);
        let next = dp.finish(&global).unwrap();
        let values = &next.tensors[0].data;
        let avg = values.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64;
        let std = (values.iter().map(|&v| (f64::from(v) - avg).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt();
        let want = z * c / m as f64;
        assert!((std - want).abs() / want < 0.02, "empirical std {std} vs z·C/m = {want}");
        assert!((avg - 0.25).abs() < 5.0 * want / (n as f64).sqrt(), "mean {avg}");
        let report = dp.last_round().unwrap();
        assert_eq!((report.clients, report.unclipped), (m, None), "the coordinator cannot count unclipped updates");
        assert_eq!(report.noise_std, want);
    }
}
