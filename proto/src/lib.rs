//! The wire contract of the federation, generated from `proto/fl/v1/*.proto`.

/// Messages and services of package `fl.v1`.
#[allow(missing_debug_implementations, unreachable_pub, clippy::all)]
pub mod pb {
    tonic::include_proto!("fl.v1");
}
