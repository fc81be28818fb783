//! Join tokens: `fl1.<id>.<secret>.<ca-sha256>`.
//!
//! The id names the token in the registry, the secret proves possession (the registry stores only
//! its hash), and the CA fingerprint lets a new client verify the coordinator on first contact
//! without a copied CA file, as `kubeadm join` does.

use rand::RngCore;
use sha2::{Digest, Sha256};

/// A parsed join token.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// Public token id (8 hex digits).
    pub id: String,
    /// Secret part (32 hex digits).
    pub secret: String,
    /// SHA-256 of the federation CA certificate (DER), hex.
    pub ca_fingerprint: String,
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinToken")
            .field("id", &self.id)
            .field("ca_fingerprint", &self.ca_fingerprint)
            .finish_non_exhaustive()
    }
}

/// Why a token string is not a token.
#[derive(Debug, thiserror::Error)]
#[error("malformed join token: {0} (expected fl1.<id>.<secret>.<ca-sha256>, as printed by the coordinator)")]
pub struct TokenParseError(&'static str);

impl JoinToken {
    /// Makes a fresh random token for a federation whose CA has `ca_fingerprint`.
    pub fn generate(ca_fingerprint: &str) -> JoinToken {
        let mut rng = rand::rng();
        let mut id = [0u8; 4];
        let mut secret = [0u8; 16];
        rng.fill_bytes(&mut id);
        rng.fill_bytes(&mut secret);
        JoinToken { id: hex::encode(id), secret: hex::encode(secret), ca_fingerprint: ca_fingerprint.to_string() }
    }

    /// Parses the printed form.
    pub fn parse(s: &str) -> Result<JoinToken, TokenParseError> {
        let parts: Vec<&str> = s.trim().split('.').collect();
        let [version, id, secret, fp] = parts.as_slice() else {
            return Err(TokenParseError("wrong number of parts"));
        };
        if *version != "fl1" {
            return Err(TokenParseError("unknown version prefix"));
        }
        let is_hex = |p: &str, len: usize| p.len() == len && p.bytes().all(|b| b.is_ascii_hexdigit());
        if !is_hex(id, 8) || !is_hex(secret, 32) {
            return Err(TokenParseError("bad id or secret"));
        }
        if !is_hex(fp, 64) {
            return Err(TokenParseError("bad CA fingerprint"));
        }
        Ok(JoinToken { id: id.to_string(), secret: secret.to_lowercase(), ca_fingerprint: fp.to_lowercase() })
    }

    /// SHA-256 of the secret, hex: what the registry stores.
    pub fn secret_hash(&self) -> String {
        hash_secret(&self.secret)
    }
}

/// SHA-256 of a token secret, hex.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

impl std::fmt::Display for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "fl1.{}.{}.{}", self.id, self.secret, self.ca_fingerprint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_garbage() {
        let token = JoinToken::generate(&"ab".repeat(32));
        assert_eq!(JoinToken::parse(&token.to_string()).unwrap(), token);
        assert!(JoinToken::parse("hello").is_err());
        assert!(JoinToken::parse(&format!("fl2.{}.{}.{}", token.id, token.secret, token.ca_fingerprint)).is_err());
        assert!(JoinToken::parse(&format!("fl1.{}.{}.{}", token.id, token.secret, "zz")).is_err());
    }
}
