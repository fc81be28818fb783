//! Certificates of a federation and the TLS configurations built from them.
//!
//! The coordinator owns a CA. It issues its own server certificate and signs the certificate
//! signing requests of enrolling clients; every client key is made on the client and never leaves it.
//! Connections are TLS 1.3 only, with the ring crypto provider.

use std::sync::{Arc, Mutex};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};

/// Errors of certificate handling.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Generating or signing a certificate failed.
    #[error("certificate error: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// rustls refused a configuration or handshake.
    #[error("TLS error: {0}")]
    Rustls(#[from] rustls::Error),
    /// PEM input could not be parsed.
    #[error("bad PEM: {0}")]
    Pem(String),
    /// A network error during the first contact.
    #[error("connecting to {addr}: {source}")]
    Io { addr: String, source: std::io::Error },
    /// The coordinator's CA does not match the fingerprint of the join token.
    #[error("the coordinator's CA does not match the join token's fingerprint: wrong token, or not the coordinator you expect")]
    FingerprintMismatch,
    /// Anything else in a verifier build.
    #[error("{0}")]
    Other(String),
}

/// The crypto provider used everywhere: ring.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs ring as the process-wide default rustls provider; call once at the top of `main`
/// and in TLS tests. Installing twice is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A certificate authority: certificate and private key, both PEM.
#[derive(Clone)]
pub struct CertificateAuthority {
    /// CA certificate, PEM.
    pub cert_pem: String,
    /// CA private key, PEM (PKCS#8).
    pub key_pem: String,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority").finish_non_exhaustive()
    }
}

/// A certificate with its private key, both PEM.
#[derive(Clone)]
pub struct CertifiedKey {
    /// Certificate, PEM.
    pub cert_pem: String,
    /// Private key, PEM.
    pub key_pem: String,
}

impl std::fmt::Debug for CertifiedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertifiedKey").finish_non_exhaustive()
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
    bytes[0] &= 0x7f; // a positive integer
    SerialNumber::from_slice(&bytes)
}

impl CertificateAuthority {
    /// Creates a new self-signed CA named `common_name`.
    pub fn generate(common_name: &str) -> Result<Self, TlsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        Ok(CertificateAuthority { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// SHA-256 fingerprint of the CA certificate (DER), hex.
    pub fn fingerprint(&self) -> Result<String, TlsError> {
        Ok(cert_fingerprint(&first_cert(&self.cert_pem)?))
    }

    fn issuer(&self) -> Result<Issuer<'static, KeyPair>, TlsError> {
        let key = KeyPair::from_pem(&self.key_pem)?;
        Ok(Issuer::from_ca_cert_pem(&self.cert_pem, key)?)
    }

    /// Issues a server certificate for the given DNS names and IP addresses.
    pub fn issue_server_cert(&self, sans: &[String]) -> Result<CertifiedKey, TlsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        for san in sans {
            params.subject_alt_names.push(match san.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(san.clone().try_into()?),
            });
        }
        params.distinguished_name.push(DnType::CommonName, sans.first().map(String::as_str).unwrap_or("coordinator"));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.serial_number = Some(random_serial());
        let cert = params.signed_by(&key, &self.issuer()?)?;
        Ok(CertifiedKey { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// Signs a client's certificate signing request. Only the request's public key is used; the
    /// subject is set to `client_id` and the certificate is for client authentication only.
    pub fn sign_client_csr(&self, csr_pem: &str, client_id: &str) -> Result<String, TlsError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, client_id);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.serial_number = Some(random_serial());
        Ok(params.signed_by(&csr.public_key, &self.issuer()?)?.pem())
    }
}

/// Makes a client key pair and a certificate signing request for it. Returns (csr PEM, key PEM).
pub fn new_client_csr(name: &str) -> Result<(String, String), TlsError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    let csr = params.serialize_request(&key)?;
    Ok((csr.pem()?, key.serialize_pem()))
}

/// SHA-256 of a DER certificate, hex. Identifies a client certificate in the registry.
pub fn cert_fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// Parses every certificate of a PEM bundle.
pub fn parse_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::Pem("no certificate found".into()));
    }
    Ok(certs)
}

fn first_cert(pem: &str) -> Result<CertificateDer<'static>, TlsError> {
    Ok(parse_certs(pem)?.remove(0))
}

/// Checks that `pem` holds a private key the crypto provider can sign with (a client's
/// `client.key`), so that a corrupt file is named at start rather than failing every handshake.
pub fn check_private_key(pem: &str) -> Result<(), TlsError> {
    let key = parse_key(pem)?;
    crypto_provider().key_provider.load_private_key(key).map_err(|e| TlsError::Pem(e.to_string()))?;
    Ok(())
}

fn parse_key(pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::Pem(e.to_string()))
}

fn root_store(ca_pem: &str) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in parse_certs(ca_pem)? {
        roots.add(cert)?;
    }
    Ok(Arc::new(roots))
}

/// The coordinator's TLS configuration: TLS 1.3 only, HTTP/2, its certificate chain (server
/// certificate then CA), and optional client certificates that must chain to the federation CA.
/// Certificates are optional at the TLS layer only so that `Enroll` can be reached; every other
/// RPC requires one.
pub fn server_config(server: &CertifiedKey, ca_pem: &str) -> Result<rustls::ServerConfig, TlsError> {
    let provider = crypto_provider();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(root_store(ca_pem)?, provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Other(e.to_string()))?;
    let mut chain = parse_certs(&server.cert_pem)?;
    chain.extend(parse_certs(ca_pem)?);
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, parse_key(&server.key_pem)?)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// tonic's client TLS configuration: trust only the federation CA, present `identity` if given.
pub fn client_tls(ca_pem: &str, identity: Option<&CertifiedKey>, domain: &str) -> tonic::transport::ClientTlsConfig {
    let mut config = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca_pem))
        .domain_name(domain);
    if let Some(id) = identity {
        config = config.identity(tonic::transport::Identity::from_pem(&id.cert_pem, &id.key_pem));
    }
    config
}

/// Why a channel to the coordinator could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL is not `https://HOST[:PORT]`.
    #[error("bad coordinator URL '{url}': {reason}")]
    Url {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The connection or the TLS handshake failed.
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
    /// The TCP connection was made but the TLS handshake got no answer in time.
    #[error(
        "no TLS connection to {url} within {seconds} s (a coordinator out of file descriptors leaves connections unanswered: see its `ulimit -n`)"
    )]
    Timeout {
        /// The URL.
        url: String,
        /// The limit.
        seconds: u64,
    },
}

/// Host and port of an `https://HOST:PORT` URL (port 443 if none).
pub fn host_port(url: &str) -> Result<(String, u16), ConnectError> {
    let bad = |reason: &str| ConnectError::Url { url: url.to_string(), reason: reason.to_string() };
    let uri: tonic::codegen::http::Uri =
        url.parse().map_err(|e: tonic::codegen::http::uri::InvalidUri| bad(&e.to_string()))?;
    if uri.scheme_str() != Some("https") {
        return Err(bad("it must start with https:// (TLS is always on)"));
    }
    let host = uri.host().ok_or_else(|| bad("it has no host"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
    // The http crate reads `:99999` or `:abc` as no port at all: refuse it rather than use 443.
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
    let after_host = authority.rsplit_once(']').map_or(authority, |(_, rest)| rest);
    let port = match after_host.rsplit_once(':') {
        None => 443,
        Some((_, text)) => match text.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => return Err(bad(&format!("invalid port '{text}' (1 to 65535)"))),
        },
    };
    Ok((host, port))
}

/// gRPC message compression on the wire, tonic's `gzip` or `zstd` (both at their default
/// levels, 6 and 3), or none. A client compresses its uploads with it and asks for its
/// downloads in it; the coordinator reads every encoding, and compresses a download in one
/// only when the client asks for it and `serve --compression` lists it. BENCHMARKS.md
/// ("Transport compression") says what each saves and costs on which payload.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Compression {
    /// Messages as they are.
    #[default]
    None,
    /// gzip (deflate, level 6).
    Gzip,
    /// Zstandard (level 3).
    Zstd,
}

impl Compression {
    /// tonic's encoding; `None` for none.
    pub fn encoding(self) -> Option<tonic::codec::CompressionEncoding> {
        match self {
            Compression::None => None,
            Compression::Gzip => Some(tonic::codec::CompressionEncoding::Gzip),
            Compression::Zstd => Some(tonic::codec::CompressionEncoding::Zstd),
        }
    }

    /// Every encoding there is: what the coordinator reads.
    pub const ENCODINGS: [tonic::codec::CompressionEncoding; 2] =
        [tonic::codec::CompressionEncoding::Gzip, tonic::codec::CompressionEncoding::Zstd];
}

/// The longest a connection may take, TLS handshake included.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// How often both ends of a connection ping the other (HTTP/2 PING) to find a dead peer.
pub const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);
/// How long a ping may wait for its answer before the connection is closed. Generous: the answer
/// queues behind the data already sent, and with 100 clients downloading a 16 MB model on two
/// busy cores a 5 s limit dropped one connection in five mid-download (BENCHMARKS.md, "Scale").
pub const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// Opens a TLS channel to the coordinator at `url` that trusts only `ca_pem` and presents
/// `identity` if given. Used by the client daemon, enrollment and the health probe.
pub async fn connect(
    url: &str,
    ca_pem: &str,
    identity: Option<&CertifiedKey>,
) -> Result<tonic::transport::Channel, ConnectError> {
    let (host, _) = host_port(url)?;
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_string())?
        .tls_config(client_tls(ca_pem, identity, &host))?
        .connect_timeout(std::time::Duration::from_secs(5))
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    // `connect_timeout` covers TCP only: a peer that never answers the handshake (a coordinator
    // out of descriptors keeps connections in its backlog, unaccepted) would be waited for ever.
    match tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect()).await {
        Ok(channel) => Ok(channel?),
        Err(_) => Err(ConnectError::Timeout { url: url.to_string(), seconds: CONNECT_TIMEOUT.as_secs() }),
    }
}

/// Accepts a server whose presented chain contains a CA with the pinned fingerprint and whose
/// certificate that CA signed, and remembers that CA.
#[derive(Debug)]
struct PinnedCaVerifier {
    fingerprint: String,
    provider: Arc<CryptoProvider>,
    found: Mutex<Option<CertificateDer<'static>>>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| cert_fingerprint(c) == self.fingerprint)
            .ok_or(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer))?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let verified = inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)?;
        *self.found.lock().expect("verifier lock") = Some(ca.clone().into_owned());
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// First contact with a coordinator: a TLS handshake that trusts the server only if its chain
/// holds a CA with `fingerprint` (from the join token) that signed its certificate for `host`.
/// Returns that CA as PEM, to be trusted from then on.
pub async fn fetch_pinned_ca(host: &str, port: u16, fingerprint: &str) -> Result<String, TlsError> {
    let provider = crypto_provider();
    let verifier = Arc::new(PinnedCaVerifier {
        fingerprint: fingerprint.to_lowercase(),
        provider: provider.clone(),
        found: Mutex::new(None),
    });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    let addr = format!("{host}:{port}");
    let tcp =
        tokio::net::TcpStream::connect(&addr).await.map_err(|source| TlsError::Io { addr: addr.clone(), source })?;
    let name = ServerName::try_from(host.to_string()).map_err(|e| TlsError::Other(e.to_string()))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    match connector.connect(name, tcp).await {
        Ok(_) => {}
        Err(e) => {
            let unknown_issuer =
                e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()).is_some_and(|re| {
                    matches!(re, rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer))
                });
            if unknown_issuer {
                return Err(TlsError::FingerprintMismatch);
            }
            return Err(TlsError::Io { addr, source: e });
        }
    }
    let ca = verifier.found.lock().expect("verifier lock").take().ok_or(TlsError::FingerprintMismatch)?;
    Ok(pem_encode("CERTIFICATE", &ca))
}

/// PEM-encodes DER bytes.
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    pem::encode_config(&pem::Pem::new(label, der), pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_with_a_bad_port_is_refused() {
        assert_eq!(host_port("https://localhost:7443").unwrap(), ("localhost".into(), 7443));
        assert_eq!(host_port("https://[::1]:7443").unwrap(), ("::1".into(), 7443));
        assert_eq!(host_port("https://example.org").unwrap(), ("example.org".into(), 443));
        for bad in ["https://localhost:99999", "https://localhost:abc", "https://localhost:0", "https://[::1]:x"] {
            assert!(host_port(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn ca_signs_server_and_client_certs_that_parse() {
        install_crypto_provider();
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let server = ca.issue_server_cert(&["localhost".into(), "127.0.0.1".into()]).unwrap();
        server_config(&server, &ca.cert_pem).unwrap();
        let (csr, _key) = new_client_csr("edge-1").unwrap();
        let cert = ca.sign_client_csr(&csr, "c-123").unwrap();
        assert_eq!(parse_certs(&cert).unwrap().len(), 1);
        assert_eq!(ca.fingerprint().unwrap().len(), 64);
    }

    #[test]
    fn pem_encoding_round_trips() {
        let ca = CertificateAuthority::generate("x").unwrap();
        let der = first_cert(&ca.cert_pem).unwrap();
        assert_eq!(pem_encode("CERTIFICATE", &der), ca.cert_pem.replace("\r\n", "\n"));
    }
}
