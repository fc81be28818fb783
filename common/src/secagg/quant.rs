//! Clipping and stochastic quantization of an update into the ring of integers modulo 2^32.
//!
//! Every coordinate is clipped to `[-clip, clip]` and mapped to an integer in `[0, max_level]` by
//! stochastic rounding, so the quantized value is an unbiased estimate of the clipped one. The
//! sum of `n` quantized vectors is at most `n * max_level`; `max_level` is chosen as
//! `floor((2^32 - 1) / max_clients)`, so the sum of the largest possible round never wraps
//! around and the unmasked sum (taken modulo 2^32) is the true integer sum.

use rand::Rng;

use super::SecAggError;

/// Fewest quantization levels a plan accepts: below this the step would swamp the updates.
pub const MIN_LEVELS: u32 = 1 << 10;

/// How updates are clipped and quantized for one federation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuantizationPlan {
    clip: f32,
    max_level: u32,
    max_clients: u32,
}

impl QuantizationPlan {
    /// A plan for coordinates clipped to `[-clip, clip]` and sums of at most `max_clients`
    /// inputs. Refuses a plan whose sum could overflow 2^32 with fewer than [`MIN_LEVELS`] levels.
    pub fn new(clip: f32, max_clients: u32) -> Result<Self, SecAggError> {
        if !(clip.is_finite() && clip > 0.0) {
            return Err(SecAggError::Config(format!("--secagg-clip must be a positive finite number, got {clip}")));
        }
        if max_clients == 0 {
            return Err(SecAggError::Config("secure aggregation needs at least one client per round".into()));
        }
        let max_level = u32::MAX / max_clients;
        if max_level < MIN_LEVELS {
            return Err(SecAggError::Config(format!(
                "{max_clients} clients per round would overflow the 2^32 modulus: they leave {max_level} \
                 quantization levels, fewer than {MIN_LEVELS}; allow at most {} clients per round \
                 (--clients-per-round times --over-sample)",
                u32::MAX / MIN_LEVELS
            )));
        }
        Ok(Self { clip, max_level, max_clients })
    }

    /// The clipping bound.
    pub fn clip(&self) -> f32 {
        self.clip
    }

    /// The largest quantized value of one coordinate.
    pub fn max_level(&self) -> u32 {
        self.max_level
    }

    /// The most inputs a sum may hold without wrapping.
    pub fn max_clients(&self) -> u32 {
        self.max_clients
    }

    /// The width of one quantization step in update units.
    pub fn step(&self) -> f64 {
        2.0 * f64::from(self.clip) / f64::from(self.max_level)
    }

    /// Clips and stochastically rounds `values`. A NaN counts as 0.
    pub fn quantize<R: Rng + ?Sized>(&self, values: &[f32], rng: &mut R) -> Vec<u32> {
        let clip = f64::from(self.clip);
        let scale = f64::from(self.max_level) / (2.0 * clip);
        values
            .iter()
            .map(|&v| {
                let v = if v.is_nan() { 0.0 } else { f64::from(v).clamp(-clip, clip) };
                let x = (v + clip) * scale;
                let floor = x.floor();
                let up = rng.random::<f64>() < x - floor;
                (floor as u64 + u64::from(up)).min(u64::from(self.max_level)) as u32
            })
            .collect()
    }

    /// Turns the sum of `count` quantized vectors back into the sum of the clipped updates.
    /// The error is below `count * step()` per coordinate.
    pub fn dequantize_sum(&self, sum: &[u32], count: usize) -> Result<Vec<f32>, SecAggError> {
        if count == 0 || count > self.max_clients as usize {
            return Err(SecAggError::Config(format!(
                "cannot dequantize a sum of {count} inputs: the plan allows 1..={}",
                self.max_clients
            )));
        }
        let step = self.step();
        let offset = count as f64 * f64::from(self.clip);
        Ok(sum.iter().map(|&s| (f64::from(s) * step - offset) as f32).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn too_many_clients_is_refused_with_the_limit() {
        let err = QuantizationPlan::new(8.0, 5_000_000).unwrap_err().to_string();
        assert!(err.contains("4194303 clients"), "{err}");
        assert!(QuantizationPlan::new(8.0, 4_194_303).is_ok());
        assert!(QuantizationPlan::new(0.0, 10).is_err());
        assert!(QuantizationPlan::new(f32::NAN, 10).is_err());
    }

    #[test]
    fn the_largest_sum_does_not_wrap() {
        let plan = QuantizationPlan::new(1.0, 1000).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let top = plan.quantize(&[5.0], &mut rng)[0];
        assert_eq!(top, plan.max_level());
        assert!(u64::from(top) * 1000 <= u64::from(u32::MAX));
    }

    #[test]
    fn stochastic_rounding_is_unbiased() {
        let plan = QuantizationPlan::new(1.0, 1 << 20).unwrap(); // 4095 levels: a coarse step
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let x = 0.123_456_f32;
        let n = 20_000;
        let sum: u64 = (0..n).map(|_| u64::from(plan.quantize(&[x], &mut rng)[0])).sum();
        let mean = sum as f64 / n as f64 * plan.step() - 1.0;
        // The standard error of the mean is below step / (2 sqrt(n)); allow five of them.
        assert!((mean - f64::from(x)).abs() < 5.0 * plan.step() / (2.0 * (n as f64).sqrt()), "{mean}");
    }
}
