//! An RDP accountant for the sampled Gaussian mechanism, the privacy loss of DP-FedAvg.
//!
//! Each round samples a fraction q of the enrolled clients and adds Gaussian noise of multiplier
//! z to the sum of their clipped updates. Its Rényi DP at order α is the closed form of Mironov,
//! Talwar and Zhang, "Rényi Differential Privacy of the Sampled Gaussian Mechanism" (2019):
//! the binomial sum for integer α (Sec. 3.2) and the two erfc series for fractional α (Sec. 3.3).
//! Rounds compose by adding RDP; the conversion to (ε, δ) is the tight one of Balle et al.,
//! "Hypothesis testing interpretations and Rényi DP" (2020, Prop. 12), also in Canonne, Kamath and
//! Steinke (2020, Eq. 20).
//!
//! The code follows Google's `dp-accounting` (its `rdp` module) step for step, including its
//! 1000-term limit for the fractional series (an order that has not converged is dropped, which
//! can only make ε larger), so that the two agree to rounding: `bench/dp/reference.py` prints the
//! reference values the tests hold.

use serde::{Deserialize, Serialize};

/// The Rényi orders the accountant tracks: 1.25 to 256, dense where small budgets are decided.
pub const ORDERS: [f64; 76] = [
    1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 2.75, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0,
    15.0, 16.0, 17.0, 18.0, 19.0, 20.0, 21.0, 22.0, 23.0, 24.0, 25.0, 26.0, 27.0, 28.0, 29.0, 30.0, 31.0, 32.0, 33.0,
    34.0, 35.0, 36.0, 37.0, 38.0, 39.0, 40.0, 41.0, 42.0, 43.0, 44.0, 45.0, 46.0, 47.0, 48.0, 49.0, 50.0, 51.0, 52.0,
    53.0, 54.0, 55.0, 56.0, 57.0, 58.0, 59.0, 60.0, 61.0, 62.0, 63.0, 64.0, 80.0, 96.0, 128.0, 192.0, 256.0,
];

/// Terms of the fractional-order series before an order is given up (as dp-accounting).
const MAX_STEPS_LOG_A_FRAC: usize = 1000;

/// `ln(e^x + e^y)` without overflow.
fn log_add(x: f64, y: f64) -> f64 {
    let (a, b) = if x < y { (x, y) } else { (y, x) };
    if a == f64::NEG_INFINITY {
        return b;
    }
    (a - b).exp().ln_1p() + b
}

/// `ln C(n, k)` for real n and k, with `ln |Γ|` where an argument is negative.
fn log_comb(n: f64, k: f64) -> f64 {
    libm::lgamma(n + 1.0) - libm::lgamma(k + 1.0) - libm::lgamma(n - k + 1.0)
}

/// `ln erfc(x)`, accurate far into the tail where `erfc` underflows.
fn log_erfc(x: f64) -> f64 {
    let r = libm::erfc(x);
    if r > 1e-300 {
        return r.ln();
    }
    // The asymptotic series of ln erfc at infinity (dp-accounting's fallback).
    let x2 = x * x;
    -std::f64::consts::PI.ln() / 2.0 - x.ln() - x2 - 0.5 / x2 + 0.625 / (x2 * x2) - 37.0 / 24.0 / (x2 * x2 * x2)
        + 353.0 / 64.0 / (x2 * x2 * x2 * x2)
}

/// `ln A_α` for integer α and 0 < q < 1 (Mironov et al. 2019, Sec. 3.2).
fn log_a_int(q: f64, sigma: f64, alpha: u32) -> f64 {
    let log1mq = (-q).ln_1p();
    let mut log_a = f64::NEG_INFINITY;
    for i in 0..=alpha {
        let (a, i) = (f64::from(alpha), f64::from(i));
        let log_coef = log_comb(a, i) + i * q.ln() + (a - i) * log1mq;
        log_a = log_add(log_a, log_coef + (i * i - i) / (2.0 * sigma * sigma));
    }
    log_a
}

/// `ln A_α` for fractional α and 0 < q < 1 (Mironov et al. 2019, Sec. 3.3); infinity when the
/// series has not converged in [`MAX_STEPS_LOG_A_FRAC`] terms.
fn log_a_frac(q: f64, sigma: f64, alpha: f64) -> f64 {
    let (mut log_a0, mut log_a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
    let log1mq = (-q).ln_1p();
    let (mut last_s0, mut last_s1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let half = 0.5f64.ln();
    let s2 = std::f64::consts::SQRT_2 * sigma;
    for i in 0..MAX_STEPS_LOG_A_FRAC {
        let i = i as f64;
        let log_coef = log_comb(alpha, i);
        let j = alpha - i;
        let log_t0 = log_coef + i * q.ln() + j * log1mq;
        let log_t1 = log_coef + j * q.ln() + i * log1mq;
        let log_e0 = half + log_erfc((i - z0) / s2);
        let log_e1 = half + log_erfc((z0 - j) / s2);
        let log_s0 = log_t0 + (i * i - i) / (2.0 * sigma * sigma) + log_e0;
        let log_s1 = log_t1 + (j * j - j) / (2.0 * sigma * sigma) + log_e1;
        log_a0 = log_add(log_a0, log_s0);
        log_a1 = log_add(log_a1, log_s1);
        let total = log_add(log_a0, log_a1);
        // Stop once both terms decrease and are negligible next to the total.
        if log_s0 < last_s0 && log_s1 < last_s1 && log_s0.max(log_s1) < total - 30.0 {
            return total;
        }
        last_s0 = log_s0;
        last_s1 = log_s1;
    }
    tracing::debug!(q, sigma, alpha, "the RDP series has not converged; the order is dropped");
    f64::INFINITY
}

/// RDP at `order` of one round of the Poisson-sampled Gaussian mechanism with sampling rate `q`
/// and noise multiplier `z` (noise standard deviation over L2 sensitivity).
pub fn rdp_sampled_gaussian(q: f64, z: f64, order: f64) -> f64 {
    debug_assert!((0.0..=1.0).contains(&q) && z >= 0.0 && order > 1.0);
    if q == 0.0 {
        return 0.0;
    }
    if order.is_infinite() || z == 0.0 {
        return f64::INFINITY;
    }
    if q == 1.0 {
        return order / (2.0 * z * z);
    }
    let log_a = if order.fract() == 0.0 && order <= f64::from(u32::MAX) {
        log_a_int(q, z, order as u32)
    } else {
        log_a_frac(q, z, order)
    };
    log_a / (order - 1.0)
}

/// The smallest ε such that RDP `rdp[i]` at `orders[i]` implies (ε, δ)-DP, and the order that
/// gives it (Balle et al. 2020, Prop. 12; dp-accounting's `compute_epsilon`).
pub fn epsilon_from_rdp(orders: &[f64], rdp: &[f64], delta: f64) -> (f64, f64) {
    assert_eq!(orders.len(), rdp.len(), "one RDP value per order");
    if delta <= 0.0 {
        return if rdp.iter().all(|&r| r == 0.0) { (0.0, 0.0) } else { (f64::INFINITY, 0.0) };
    }
    let mut best = (f64::INFINITY, orders.first().copied().unwrap_or(0.0));
    for (&a, &r) in orders.iter().zip(rdp) {
        let eps = if r < 0.0 || delta * delta + (-r).exp_m1() > 0.0 {
            // r < 0 is rounding; the second case is the KL bound δ ≤ sqrt(1 − e^−r).
            0.0
        } else if a > 1.01 {
            r + (-1.0 / a).ln_1p() - (delta * a).ln() / (a - 1.0)
        } else {
            f64::INFINITY
        };
        if eps < best.0 {
            best = (eps, a);
        }
    }
    (best.0.max(0.0), best.1)
}

/// Rounds of one sampled Gaussian mechanism, all with the same rate and noise.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SampledGaussianRounds {
    /// Sampling rate: clients sampled over clients enrolled.
    pub q: f64,
    /// Noise multiplier z of the whole round (update and, with adaptive clipping, the count).
    pub noise_multiplier: f64,
    /// How many rounds ran with these.
    pub rounds: u64,
}

/// The privacy spent so far: the rounds run, from which RDP and ε follow. This is what the state
/// dir keeps, so ε continues across restarts.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RdpAccountant {
    /// The rounds, consecutive rounds with the same q and z merged.
    pub history: Vec<SampledGaussianRounds>,
}

impl RdpAccountant {
    /// An accountant that has spent nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `rounds` more rounds at rate `q` and noise multiplier `z`.
    pub fn compose(&mut self, q: f64, noise_multiplier: f64, rounds: u64) {
        match self.history.last_mut() {
            Some(last) if last.q == q && last.noise_multiplier == noise_multiplier => last.rounds += rounds,
            _ => self.history.push(SampledGaussianRounds { q, noise_multiplier, rounds }),
        }
    }

    /// Rounds recorded.
    pub fn rounds(&self) -> u64 {
        self.history.iter().map(|h| h.rounds).sum()
    }

    /// The total RDP at each of [`ORDERS`].
    pub fn rdp(&self) -> Vec<f64> {
        ORDERS
            .iter()
            .map(|&a| {
                self.history.iter().map(|h| h.rounds as f64 * rdp_sampled_gaussian(h.q, h.noise_multiplier, a)).sum()
            })
            .collect()
    }

    /// ε at `delta` for the rounds so far, and the order that gives it.
    pub fn epsilon_and_order(&self, delta: f64) -> (f64, f64) {
        epsilon_from_rdp(&ORDERS, &self.rdp(), delta)
    }

    /// ε at `delta` for the rounds so far.
    pub fn epsilon(&self, delta: f64) -> f64 {
        self.epsilon_and_order(delta).0
    }

    /// ε at `delta` if one more round ran at rate `q` and multiplier `z`: what `--dp-max-epsilon`
    /// checks before a round starts.
    pub fn epsilon_after_round(&self, q: f64, noise_multiplier: f64, delta: f64) -> f64 {
        let mut next = self.clone();
        next.compose(q, noise_multiplier, 1);
        next.epsilon(delta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (q, z, rounds, δ, ε, optimal order) from Google's dp-accounting 0.6.0, printed by
    /// `"$D/bin/python" bench/dp/reference.py` with `D=$FL_CACHE_DIR/dp-accounting-0.6.0` a venv
    /// made by `python3 -m venv "$D" && "$D/bin/pip" install dp-accounting==0.6.0`.
    const REFERENCE: [(f64, f64, u64, f64, f64, f64); 8] = [
        (0.01, 1.1, 1000, 1e-05, 1.7252908180449444, 9.0),
        (0.1, 1.0, 100, 1e-05, 7.972921510380539, 3.0),
        (0.05, 0.5, 50, 0.001, 11.316897033443079, 1.75),
        (1.0, 2.0, 10, 1e-05, 8.087861628831664, 4.0),
        (0.2, 0.8, 200, 0.00630957344480193, 28.16630667404926, 1.75),
        (0.001, 3.0, 10000, 1e-06, 0.14397573379667375, 96.0),
        (0.5, 0.3, 5, 1e-05, 52.57059915613573, 1.5),
        (0.02, 5.0, 1, 1e-05, 0.0294038237984212, 192.0),
    ];

    /// (q, z, order, RDP of one round), from the same script.
    const REFERENCE_RDP: [(f64, f64, f64, f64); 16] = [
        (0.01, 1.1, 1.75, 0.00011372156773174268),
        (0.01, 1.1, 2.5, 0.00016215219755506363),
        (0.01, 1.1, 10.0, 0.0008075821730220726),
        (0.01, 1.1, 256.0, 101.1618942900286),
        (0.1, 1.0, 1.75, 0.015955356104618415),
        (0.1, 1.0, 2.5, 0.02385328594777003),
        (0.1, 1.0, 10.0, 2.4428163733756034),
        (0.1, 1.0, 256.0, 125.68838516154322),
        (0.5, 0.3, 1.75, 8.106280003996682),
        (0.5, 0.3, 2.5, 12.733643685010533),
        (0.5, 0.3, 10.0, 54.78539202160006),
        (0.5, 0.3, 256.0, 1421.5263568174248),
        (1.0, 2.0, 1.75, 0.21875),
        (1.0, 2.0, 2.5, 0.3125),
        (1.0, 2.0, 10.0, 1.25),
        (1.0, 2.0, 256.0, 32.0),
    ];

    fn rel_err(got: f64, want: f64) -> f64 {
        (got - want).abs() / want.abs()
    }

    #[test]
    fn epsilon_matches_dp_accounting() {
        for (q, z, rounds, delta, want, want_order) in REFERENCE {
            let mut acc = RdpAccountant::new();
            acc.compose(q, z, rounds);
            let (eps, order) = acc.epsilon_and_order(delta);
            assert!(rel_err(eps, want) < 1e-3, "q={q} z={z} rounds={rounds} δ={delta}: ε {eps} vs {want}");
            assert_eq!(order, want_order, "q={q} z={z} rounds={rounds}: optimal order");
        }
    }

    #[test]
    fn rdp_matches_dp_accounting() {
        for (q, z, order, want) in REFERENCE_RDP {
            let got = rdp_sampled_gaussian(q, z, order);
            assert!(rel_err(got, want) < 1e-6, "q={q} z={z} α={order}: RDP {got} vs {want}");
        }
    }

    #[test]
    fn rounds_compose_like_one_long_run() {
        let mut split = RdpAccountant::new();
        split.compose(0.1, 1.0, 40);
        split.compose(0.1, 1.0, 60);
        assert_eq!(split.history.len(), 1, "equal rounds merge");
        let mut whole = RdpAccountant::new();
        whole.compose(0.1, 1.0, 100);
        assert_eq!(split.epsilon(1e-5), whole.epsilon(1e-5));
        assert_eq!(whole.epsilon_after_round(0.1, 1.0, 1e-5), {
            whole.compose(0.1, 1.0, 1);
            whole.epsilon(1e-5)
        });
    }

    #[test]
    fn epsilon_grows_with_rounds() {
        let mut acc = RdpAccountant::new();
        let mut last = 0.0;
        for round in 1..=200 {
            acc.compose(0.05, 1.0, 1);
            let eps = acc.epsilon(1e-5);
            assert!(eps > last, "round {round}: ε {eps} did not grow from {last}");
            last = eps;
        }
    }

    #[test]
    fn epsilon_grows_with_sampling_rate() {
        let mut last = 0.0;
        for q in [0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 0.9, 1.0] {
            let mut acc = RdpAccountant::new();
            acc.compose(q, 1.0, 50);
            let eps = acc.epsilon(1e-5);
            assert!(eps > last, "q={q}: ε {eps} did not grow from {last}");
            last = eps;
        }
    }

    #[test]
    fn epsilon_grows_as_noise_shrinks() {
        let mut last = 0.0;
        for z in [10.0, 5.0, 3.0, 2.0, 1.5, 1.1, 1.0, 0.8, 0.6, 0.5] {
            let mut acc = RdpAccountant::new();
            acc.compose(0.05, z, 100);
            let eps = acc.epsilon(1e-5);
            assert!(eps > last, "z={z}: ε {eps} did not grow from {last}");
            last = eps;
        }
    }

    #[test]
    fn degenerate_mechanisms() {
        let mut none = RdpAccountant::new();
        assert_eq!(none.epsilon(1e-5), 0.0, "no rounds, no loss");
        none.compose(0.0, 1.0, 10);
        assert_eq!(none.epsilon(1e-5), 0.0, "nobody sampled, no loss");
        let mut noiseless = RdpAccountant::new();
        noiseless.compose(0.1, 0.0, 1);
        assert_eq!(noiseless.epsilon(1e-5), f64::INFINITY, "no noise, no guarantee");
    }

    #[test]
    fn the_state_round_trips_through_json() {
        let mut acc = RdpAccountant::new();
        acc.compose(0.1, 1.0, 7);
        acc.compose(0.125, 1.0, 3);
        let back: RdpAccountant = serde_json::from_str(&serde_json::to_string(&acc).unwrap()).unwrap();
        assert_eq!(back, acc);
        assert_eq!(back.rounds(), 10);
    }

    #[test]
    fn orders_cover_the_required_range() {
        assert_eq!(ORDERS[0], 1.25);
        assert_eq!(*ORDERS.last().unwrap(), 256.0);
        assert!(ORDERS.windows(2).all(|w| w[0] < w[1]));
    }
}
