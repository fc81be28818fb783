//! The health probe: asks the coordinator's gRPC health service over TLS. It links no libtorch,
//! so the container HEALTHCHECK (`fl-health`) costs milliseconds, not a libtorch load.

use std::path::Path;

use anyhow::{Context, Result};
use tonic_health::pb::health_check_response::ServingStatus;

/// Connects to `url`, trusting only the CA in `ca`, and returns the reported status.
pub async fn check(url: &str, ca: &Path) -> Result<ServingStatus> {
    let ca_pem = std::fs::read_to_string(ca).with_context(|| format!("reading {}", ca.display()))?;
    let channel = fl_common::tls::connect(url, &ca_pem, None).await.with_context(|| format!("connecting to {url}"))?;
    let response = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await
        .context("health check")?;
    Ok(response.into_inner().status())
}
