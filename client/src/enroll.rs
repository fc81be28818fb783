//! Enrollment: verify the coordinator by the CA fingerprint in the join token, then trade the
//! token and a certificate signing request for a client certificate.

use anyhow::{bail, Context, Result};
use fl_common::tls::{self, CertifiedKey};
use fl_common::token::JoinToken;
use fl_proto::pb;

use crate::identity::{ClientState, EnrollmentRecord, Identity};

/// Host and port of an `https://HOST:PORT` URL.
pub fn host_port(url: &str) -> Result<(String, u16)> {
    let uri: tonic::codegen::http::Uri = url.parse().with_context(|| format!("bad coordinator URL '{url}'"))?;
    if uri.scheme_str() != Some("https") {
        bail!("coordinator URL '{url}' must start with https:// (TLS is always on)");
    }
    let host = uri.host().with_context(|| format!("coordinator URL '{url}' has no host"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
    Ok((host, uri.port_u16().unwrap_or(443)))
}

/// Opens a TLS channel to the coordinator that trusts only `ca_pem`.
pub async fn connect(url: &str, ca_pem: &str, identity: Option<&CertifiedKey>) -> Result<tonic::transport::Channel> {
    let (host, _) = host_port(url)?;
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_string())?
        .tls_config(tls::client_tls(ca_pem, identity, &host))?
        .connect_timeout(std::time::Duration::from_secs(5))
        .http2_keep_alive_interval(std::time::Duration::from_secs(5))
        .keep_alive_timeout(std::time::Duration::from_secs(5))
        .keep_alive_while_idle(true);
    Ok(endpoint.connect().await?)
}

/// Enrolls this client and stores its identity in `state`.
pub async fn enroll(url: &str, token: &str, name: &str, state: &ClientState) -> Result<Identity> {
    let token = JoinToken::parse(token)?;
    let (host, port) = host_port(url)?;
    let ca_pem = tls::fetch_pinned_ca(&host, port, &token.ca_fingerprint).await?;
    let channel = connect(url, &ca_pem, None).await.with_context(|| format!("connecting to {url}"))?;
    let (csr_pem, key_pem) = tls::new_client_csr(name)?;
    let response = pb::federation_client::FederationClient::new(channel)
        .enroll(pb::EnrollRequest { token: token.to_string(), csr_pem, name: name.to_string() })
        .await
        .map_err(|status| anyhow::anyhow!("enrollment refused: {}", status.message()))?
        .into_inner();
    let identity = Identity {
        key: CertifiedKey { cert_pem: response.certificate_pem, key_pem },
        ca_pem,
        record: EnrollmentRecord {
            client_id: response.client_id,
            coordinator: url.to_string(),
            name: name.to_string(),
        },
    };
    state.save(&identity)?;
    Ok(identity)
}
