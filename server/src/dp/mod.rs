//! Client-level differential privacy: DP-FedAvg (clipping, Gaussian noise, adaptive clipping)
//! and the RDP accountant that turns the rounds run into (ε, δ).
//!
//! The math is pure and lives in [`accountant`] and [`mechanism`]; [`DpFedAvg`] is the
//! aggregation strategy that applies it, and [`DpConfig`] holds the flags.

pub mod accountant;
mod config;
mod fedavg;
mod ledger;
pub mod mechanism;

pub use config::{
    AdaptiveClipConfig, ClipSite, DpArgs, DpConfig, DpConfigError, DEFAULT_CLIP_LR, DEFAULT_INITIAL_ADAPTIVE_CLIP,
    DEFAULT_TARGET_QUANTILE,
};
pub use fedavg::{DpFedAvg, DpRoundReport};
pub use ledger::{sampling_rate, Budget, DpLedger, LedgerError, LEDGER_FILE};
