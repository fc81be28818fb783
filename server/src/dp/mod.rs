//! Client-level differential privacy: DP-FedAvg (clipping, Gaussian noise, adaptive clipping)
//! and the RDP accountant that turns the rounds run into (ε, δ).

pub mod accountant;
pub mod mechanism;

/// Why a DP configuration cannot run; each names the flag to change.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DpConfigError {
    /// The clip count's noise would use the whole budget.
    #[error(
        "--dp-adaptive-clip: the noise on the count of unclipped clients (standard deviation {count_stddev}) \
         must be more than half of --dp-noise-multiplier {noise_multiplier}; sample more clients per round \
         or lower --dp-noise-multiplier"
    )]
    CountNoiseTooSmall {
        /// The total noise multiplier.
        noise_multiplier: f64,
        /// The count's noise standard deviation.
        count_stddev: f64,
    },
}
