//! DP-FedAvg's mechanism on plain `f32` buffers: clipping, Gaussian noise on every coordinate,
//! and the adaptive clip norm of Andrew et al., "Differentially Private Learning with Adaptive
//! Clipping" (NeurIPS 2021), as TFF's `DifferentiallyPrivateFactory.gaussian_adaptive` runs it.
//!
//! Noise comes from `rand_distr::Normal` driven by `StdRng` (ChaCha12) seeded from the operating
//! system; tests inject a seeded generator.

use fl_common::TensorSet;
use rand::Rng;
use rand_distr::{Distribution, Normal};

use super::DpConfigError;

/// A client's update norm before clipping, and whether clipping changed it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ClipOutcome {
    /// L2 norm of the update as it came.
    pub norm: f64,
    /// True if the norm exceeded the clip norm and the update was scaled down.
    pub clipped: bool,
}

/// The factor that brings an update of L2 norm `norm` to at most `clip_norm`.
pub fn clip_factor(norm: f64, clip_norm: f64) -> f64 {
    if norm > clip_norm {
        clip_norm / norm
    } else {
        1.0
    }
}

/// Scales `delta` in place to L2 norm at most `clip_norm`.
pub fn clip_to_norm(delta: &mut TensorSet, clip_norm: f64) -> ClipOutcome {
    let norm = delta.clip_l2_norm(clip_norm);
    ClipOutcome { norm, clipped: norm > clip_norm }
}

/// Adds independent N(0, std²) noise to every coordinate of `values`, touched or not.
pub fn add_gaussian_noise<R: Rng + ?Sized>(values: &mut TensorSet, std: f64, rng: &mut R) {
    if std == 0.0 {
        return;
    }
    let normal = Normal::new(0.0, std).expect("a finite, non-negative standard deviation");
    for v in values.tensors.iter_mut().flat_map(|t| t.data.iter_mut()) {
        *v = (f64::from(*v) + normal.sample(rng)) as f32;
    }
}

/// The noise multiplier left for the update when the clip count takes noise of standard
/// deviation `count_stddev` out of a total multiplier `z` (Andrew et al. 2021, Thm. 1; TFF):
/// `z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2)`. The two Gaussian mechanisms then compose to exactly `z`,
/// which is what the accountant charges.
pub fn update_noise_multiplier(z: f64, count_stddev: f64) -> Result<f64, DpConfigError> {
    let count_z = 2.0 * count_stddev;
    if count_z <= z {
        return Err(DpConfigError::CountNoiseTooSmall { noise_multiplier: z, count_stddev });
    }
    Ok((z.powi(-2) - count_z.powi(-2)).powf(-0.5))
}

/// The clip norm that follows a target quantile of the clients' update norms.
#[derive(Clone, Debug, PartialEq)]
pub struct AdaptiveClipNorm {
    /// The current clip norm C.
    pub clip_norm: f64,
    /// γ: the fraction of clients that should be left unclipped.
    pub target_quantile: f64,
    /// η: the step of the geometric update.
    pub learning_rate: f64,
    /// σ_b: the standard deviation of the noise on the count of unclipped clients.
    pub count_stddev: f64,
}

impl AdaptiveClipNorm {
    /// The noised fraction b̃ of `clients` whose update norm was at most C, of which
    /// `unclipped` were. The bits are centred on ±1/2 before summing (sensitivity 1/2), so the
    /// count is a Gaussian mechanism of multiplier 2σ_b.
    pub fn noised_unclipped_fraction<R: Rng + ?Sized>(&self, unclipped: usize, clients: usize, rng: &mut R) -> f64 {
        let m = clients as f64;
        let centred = unclipped as f64 - m / 2.0;
        let noise = if self.count_stddev > 0.0 {
            Normal::new(0.0, self.count_stddev).expect("finite standard deviation").sample(rng)
        } else {
            0.0
        };
        (centred + noise) / m + 0.5
    }

    /// One geometric step, `C ← C·exp(−η(b̃ − γ))`: when more than the target fraction were
    /// unclipped, C is above the target quantile and shrinks; when fewer, it grows.
    pub fn step(&mut self, noised_unclipped_fraction: f64) {
        self.clip_norm *= (-self.learning_rate * (noised_unclipped_fraction - self.target_quantile)).exp();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fl_common::NamedTensor;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn tensors(values: &[f32]) -> TensorSet {
        TensorSet::new(vec![NamedTensor { name: "w".into(), shape: vec![values.len()], data: values.to_vec() }])
    }

    #[test]
    fn clipping_scales_down_to_the_norm_and_leaves_small_updates() {
        let mut big = tensors(&[3.0, 4.0]);
        let out = clip_to_norm(&mut big, 1.0);
        assert_eq!(out, ClipOutcome { norm: 5.0, clipped: true });
        assert!((big.l2_norm() - 1.0).abs() < 1e-6);
        assert!((big.tensors[0].data[0] - 0.6).abs() < 1e-6, "direction kept");
        let mut small = tensors(&[0.3, 0.4]);
        assert!(!clip_to_norm(&mut small, 1.0).clipped);
        assert_eq!(small, tensors(&[0.3, 0.4]));
    }

    #[test]
    fn noise_split_keeps_the_total_multiplier() {
        let (z, sb) = (1.0, 5.0);
        let zu = update_noise_multiplier(z, sb).unwrap();
        assert!(zu > z, "the update gets more noise than the total");
        // Composed Gaussian mechanisms: z⁻² = z_Δ⁻² + (2σ_b)⁻².
        let total = (zu.powi(-2) + (2.0 * sb).powi(-2)).powf(-0.5);
        assert!((total - z).abs() < 1e-12);
        assert!(matches!(update_noise_multiplier(1.0, 0.5), Err(DpConfigError::CountNoiseTooSmall { .. })));
    }

    #[test]
    fn clip_norm_shrinks_when_more_than_the_target_are_unclipped() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut adaptive =
            AdaptiveClipNorm { clip_norm: 1.0, target_quantile: 0.5, learning_rate: 0.2, count_stddev: 1.0 };
        // 19 of 20 norms at most C: C is above the median and must come down.
        let b = adaptive.noised_unclipped_fraction(19, 20, &mut rng);
        adaptive.step(b);
        assert!(adaptive.clip_norm < 1.0, "C went up to {} with b̃ = {b}", adaptive.clip_norm);
        // 1 of 20: C is below the median and must go up.
        let before = adaptive.clip_norm;
        let b = adaptive.noised_unclipped_fraction(1, 20, &mut rng);
        adaptive.step(b);
        assert!(adaptive.clip_norm > before, "C went down to {} with b̃ = {b}", adaptive.clip_norm);
        // Exactly on target without noise: C stays.
        let mut exact = AdaptiveClipNorm { count_stddev: 0.0, ..adaptive.clone() };
        let c = exact.clip_norm;
        exact.step(exact.noised_unclipped_fraction(10, 20, &mut rng));
        assert_eq!(exact.clip_norm, c);
    }
}
