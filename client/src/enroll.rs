//! Enrollment: verify the coordinator by the CA fingerprint in the join token, then trade the
//! token and a certificate signing request for a client certificate.

use anyhow::{Context, Result};
use fl_common::tls::{self, connect, host_port, CertifiedKey};
use fl_common::token::JoinToken;
use fl_proto::pb;

use crate::identity::{ClientState, EnrollmentRecord, Identity};

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
