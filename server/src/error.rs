//! The one error type of the gRPC service, and its one mapping to `tonic::Status`.

use fl_common::tls::TlsError;
use fl_common::token::TokenParseError;
use tonic::Status;

use crate::coordinator::UpdateRefusal;
use crate::registry::AccessError;
use crate::secagg::SecAggRefusal;
use fl_common::secagg::SecAggError;

/// Everything a `fl.v1.Federation` call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The TLS connection carries no client certificate.
    #[error("client certificate required: enroll first")]
    NoCertificate,
    /// The registry refuses the certificate or the join token.
    #[error(transparent)]
    Access(#[from] AccessError),
    /// The join token does not parse.
    #[error(transparent)]
    Token(#[from] TokenParseError),
    /// The join token names another federation's CA.
    #[error("join token is for another federation (CA fingerprint differs)")]
    OtherFederation,
    /// The certificate signing request cannot be signed.
    #[error("bad certificate signing request: {0}")]
    BadCsr(TlsError),
    /// The round engine refuses the update or download.
    #[error(transparent)]
    Update(#[from] UpdateRefusal),
    /// A secure-aggregation message was refused, or its attempt aborted.
    #[error(transparent)]
    SecAgg(#[from] SecAggRefusal),
    /// The first message of an upload is not a header.
    #[error("an upload must start with a header")]
    NoHeader,
    /// An upload without any message.
    #[error("empty upload")]
    EmptyUpload,
    /// The upload could not be stored (a full disk): not the client's fault.
    #[error("coordinator cannot store the upload: {0}")]
    Spool(std::io::Error),
    /// The registry file could not be read or written.
    #[error("registry: {0}")]
    Registry(std::io::Error),
    /// The client's request stream failed before the upload started.
    #[error("{}", .0.message())]
    Stream(Status),
    /// The client went away.
    #[error("client went away")]
    Cancelled,
    /// A teacher was asked for in a federation that does not distill.
    #[error("this federation has no distillation teacher (serve --distill-from)")]
    NoTeacher,
    /// A bug or a failed background task.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Status {
        let message = e.to_string();
        match e {
            ServiceError::NoCertificate
            | ServiceError::Token(_)
            | ServiceError::OtherFederation
            | ServiceError::Access(
                AccessError::UnknownToken
                | AccessError::TokenExpired(_)
                | AccessError::TokenUsedUp(..)
                | AccessError::UnknownCertificate,
            ) => Status::unauthenticated(message),
            ServiceError::Access(AccessError::ClientRevoked(_) | AccessError::TokenRevoked(_)) => {
                Status::permission_denied(message)
            }
            ServiceError::NoTeacher => Status::failed_precondition(message),
            ServiceError::BadCsr(_) | ServiceError::NoHeader | ServiceError::EmptyUpload => {
                Status::invalid_argument(message)
            }
            ServiceError::Update(refusal) => match refusal {
                UpdateRefusal::Stale { .. } | UpdateRefusal::Duplicate(_) | UpdateRefusal::SecureAggregationOnly(_) => {
                    Status::failed_precondition(message)
                }
                UpdateRefusal::NotSampled(_) => Status::permission_denied(message),
                UpdateRefusal::Invalid(_) => Status::invalid_argument(message),
                UpdateRefusal::FoldFailed(_) => Status::internal(message),
            },
            ServiceError::SecAgg(refusal) => match refusal {
                SecAggRefusal::NotParticipant { .. } => Status::permission_denied(message),
                SecAggRefusal::Aborted(_) => Status::aborted(message),
                SecAggRefusal::Protocol(e) => match e {
                    SecAggError::Malformed(_) | SecAggError::Config(_) | SecAggError::InconsistentShares(_) => {
                        Status::invalid_argument(message)
                    }
                    SecAggError::NotParticipant(_) => Status::permission_denied(message),
                    SecAggError::BelowThreshold { .. } => Status::aborted(message),
                    SecAggError::Replay(_) | SecAggError::WrongStage { .. } | SecAggError::Refused(_) => {
                        Status::failed_precondition(message)
                    }
                },
            },
            ServiceError::Spool(_) => Status::unavailable(message),
            ServiceError::Stream(status) => status,
            ServiceError::Cancelled => Status::cancelled(message),
            ServiceError::Registry(_) | ServiceError::Internal(_) => Status::internal(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordinator::InvalidUpdate;

    #[test]
    fn each_error_maps_to_its_code() {
        let code = |e: ServiceError| Status::from(e).code();
        assert_eq!(code(ServiceError::NoCertificate), tonic::Code::Unauthenticated);
        assert_eq!(code(AccessError::UnknownCertificate.into()), tonic::Code::Unauthenticated);
        assert_eq!(code(AccessError::ClientRevoked("c".into()).into()), tonic::Code::PermissionDenied);
        assert_eq!(code(UpdateRefusal::Duplicate(1).into()), tonic::Code::FailedPrecondition);
        assert_eq!(code(UpdateRefusal::NotSampled(1).into()), tonic::Code::PermissionDenied);
        assert_eq!(code(UpdateRefusal::Invalid(InvalidUpdate::NoExamples).into()), tonic::Code::InvalidArgument);
        assert_eq!(code(ServiceError::Spool(std::io::Error::other("full"))), tonic::Code::Unavailable);
        assert_eq!(code(SecAggRefusal::from(SecAggError::Replay("x".into())).into()), tonic::Code::FailedPrecondition);
        assert_eq!(code(SecAggRefusal::from(SecAggError::Malformed("x".into())).into()), tonic::Code::InvalidArgument);
        assert_eq!(code(SecAggRefusal::Aborted("x".into()).into()), tonic::Code::Aborted);
        let status = Status::from(ServiceError::from(UpdateRefusal::Invalid(InvalidUpdate::DigestMismatch)));
        assert_eq!(status.message(), "invalid update: SHA-256 of the payload does not match the trailer");
    }
}
