//! Enrollment: verify the coordinator by the CA fingerprint in the join token, then trade the
//! token and a certificate signing request for a client certificate.
//!
//! It cannot half-happen: the state dir is locked, checked writable and checked empty of an
//! identity (unless `force`) before the token is used; an identity that cannot be stored after
//! enrollment is withdrawn (revoked) at the coordinator; `force` withdraws the identity it replaces.

use anyhow::{Context, Result};
use fl_common::cli::Permanent;
use fl_common::files::DirLock;
use fl_common::tls::{self, connect, host_port, CertifiedKey};
use fl_common::token::JoinToken;
use fl_proto::pb;
use tracing::warn;

use crate::identity::{ClientState, EnrollmentRecord, Identity};

/// Enrolls this client and stores its identity in `state`. With `force`, an identity already
/// there is replaced and withdrawn at the coordinator; without it, it is an error.
pub async fn enroll(url: &str, token: &str, name: &str, state: &ClientState, force: bool) -> Result<Identity> {
    let token = JoinToken::parse(token).map_err(|e| Permanent::error(format!("--token: {e}")))?;
    let (host, port) = host_port(url)?;
    // Everything that can fail locally fails before the single-use token is spent.
    let _lock = DirLock::acquire(state.dir(), "fl-client enroll")?;
    state.check_writable()?;
    let previous = match (state.is_enrolled(), force) {
        (false, _) => None,
        (true, false) => {
            let id = state.load().map(|i| i.record.client_id).unwrap_or_else(|_| "unreadable".into());
            return Err(Permanent::error(format!(
                "{} already holds the identity of client {id}; pass --force to replace it (the old id is then revoked)",
                state.dir().display()
            )));
        }
        (true, true) => Some(state.load().context("reading the identity that --force replaces")?),
    };
    let ca_pem = tls::fetch_pinned_ca(&host, port, &token.ca_fingerprint).await?;
    let channel = connect(url, &ca_pem, None).await.with_context(|| format!("connecting to {url}"))?;
    let (csr_pem, key_pem) = tls::new_client_csr(name)?;
    let response = pb::federation_client::FederationClient::new(channel)
        .enroll(pb::EnrollRequest { token: token.to_string(), csr_pem, name: name.to_string() })
        .await
        .map_err(|status| match status.code() {
            // The token or the request is refused: retrying with the same cannot help.
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied | tonic::Code::InvalidArgument => {
                Permanent::error(format!("enrollment refused: {}", status.message()))
            }
            _ => anyhow::anyhow!("enrollment failed: {}", status.message()),
        })?
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
    if let Err(e) = state.save(&identity) {
        // No half identity stays: the previous one (under --force) is put back, or none is left.
        state.discard();
        if let Some(old) = &previous {
            if let Err(restore) = state.save(old) {
                warn!("could not put back the replaced identity: {}", fl_common::cli::describe(&restore));
            }
        }
        let withdrawn = withdraw(url, &identity, "its identity could not be stored").await;
        let what = match withdrawn {
            Ok(()) => format!("client id {} was revoked again", identity.record.client_id),
            Err(w) => format!(
                "revoking client id {} failed too ({}): revoke it with `fl-coordinator clients revoke`",
                identity.record.client_id,
                fl_common::cli::describe(&w)
            ),
        };
        // A local fault that a restart would only repeat, spending another token use: permanent.
        return Err(Permanent::error(format!(
            "storing the identity in {} failed after enrollment ({}); {what}",
            state.dir().display(),
            fl_common::cli::describe(&e)
        )));
    }
    if let Some(old) = previous {
        if let Err(e) = withdraw(url, &old, "replaced by enroll --force").await {
            warn!(
                "could not revoke the replaced client id {} ({}): revoke it with `fl-coordinator clients revoke {}`",
                old.record.client_id,
                fl_common::cli::describe(&e),
                old.record.client_id
            );
        }
    }
    Ok(identity)
}

/// Revokes `identity` at the coordinator, authenticated as that identity.
pub async fn withdraw(url: &str, identity: &Identity, reason: &str) -> Result<()> {
    let channel = connect(url, &identity.ca_pem, Some(&identity.key)).await?;
    pb::federation_client::FederationClient::new(channel)
        .withdraw_enrollment(pb::WithdrawEnrollmentRequest { reason: reason.to_string() })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
    Ok(())
}
