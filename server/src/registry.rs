//! The registry of join tokens and enrolled clients, kept in `STATE/registry.json`.
//!
//! Tokens are stored hashed. Every change takes an exclusive lock on `STATE/registry.lock`,
//! re-reads the file, changes it and writes it atomically, so admin commands run against the
//! state directory while `serve` runs. The server keeps a copy in memory, which a watcher task
//! refreshes when the file changes (at most a second later), and authenticates from the copy.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use fl_common::token::{hash_secret, JoinToken};
use serde::{Deserialize, Serialize};

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A join token as stored: never the secret, only its hash.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TokenRecord {
    /// Public id.
    pub id: String,
    /// SHA-256 of the secret, hex.
    pub secret_sha256: String,
    /// When it was made.
    pub created_unix: u64,
    /// When it stops working, if ever.
    pub expires_unix: Option<u64>,
    /// How many enrollments it allows in all, if limited.
    pub max_uses: Option<u32>,
    /// Enrollments done with it.
    pub uses: u32,
    /// Revoked by the operator.
    pub revoked: bool,
}

/// Status of an enrolled client.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ClientStatus {
    /// May connect.
    Active,
    /// Refused from now on.
    Revoked,
}

/// An enrolled client.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ClientRecord {
    /// Id given at enrollment; the subject of its certificate.
    pub id: String,
    /// Name the client gave.
    pub name: String,
    /// SHA-256 of its certificate (DER), hex.
    pub cert_sha256: String,
    /// The token it enrolled with.
    pub token_id: String,
    /// When it enrolled.
    pub enrolled_unix: u64,
    /// Last time it connected or sent anything.
    pub last_seen_unix: u64,
    /// Rounds whose aggregate includes its update.
    pub rounds_joined: u32,
    /// Active or revoked.
    pub status: ClientStatus,
}

/// Tokens and clients.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Registry {
    /// Join tokens.
    pub tokens: Vec<TokenRecord>,
    /// Enrolled clients.
    pub clients: Vec<ClientRecord>,
}

/// Why a token or client was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AccessError {
    /// No token with that id and secret.
    #[error("unknown join token")]
    UnknownToken,
    /// Token revoked.
    #[error("join token {0} was revoked")]
    TokenRevoked(String),
    /// Token expired.
    #[error("join token {0} has expired")]
    TokenExpired(String),
    /// Token used up.
    #[error("join token {0} is used up ({1} uses)")]
    TokenUsedUp(String, u32),
    /// Certificate not in the registry.
    #[error("unknown certificate: this client is not enrolled in this federation")]
    UnknownCertificate,
    /// Client revoked.
    #[error("client {0} is revoked")]
    ClientRevoked(String),
}

impl Registry {
    /// Checks a presented token and, if it is good, counts one use.
    pub fn redeem(&mut self, token: &JoinToken, now: u64) -> Result<(), AccessError> {
        let hash = token.secret_hash();
        let record = self
            .tokens
            .iter_mut()
            .find(|t| t.id == token.id && t.secret_sha256 == hash)
            .ok_or(AccessError::UnknownToken)?;
        if record.revoked {
            return Err(AccessError::TokenRevoked(record.id.clone()));
        }
        if record.expires_unix.is_some_and(|e| now >= e) {
            return Err(AccessError::TokenExpired(record.id.clone()));
        }
        if record.max_uses.is_some_and(|m| record.uses >= m) {
            return Err(AccessError::TokenUsedUp(record.id.clone(), record.uses));
        }
        record.uses += 1;
        Ok(())
    }

    /// The active client with this certificate fingerprint.
    pub fn authenticate(&self, cert_sha256: &str) -> Result<&ClientRecord, AccessError> {
        let client =
            self.clients.iter().find(|c| c.cert_sha256 == cert_sha256).ok_or(AccessError::UnknownCertificate)?;
        match client.status {
            ClientStatus::Active => Ok(client),
            ClientStatus::Revoked => Err(AccessError::ClientRevoked(client.id.clone())),
        }
    }

    /// Adds a token record for `token`.
    pub fn add_token(&mut self, token: &JoinToken, ttl_secs: Option<u64>, max_uses: Option<u32>, now: u64) {
        self.tokens.push(TokenRecord {
            id: token.id.clone(),
            secret_sha256: hash_secret(&token.secret),
            created_unix: now,
            expires_unix: ttl_secs.map(|t| now + t),
            max_uses,
            uses: 0,
            revoked: false,
        });
    }
}

/// What identifies a version of the registry file: modification time, length and inode. A
/// rename by `write_atomic` always changes the inode, so a change within one mtime tick is seen.
type FileStamp = Option<(SystemTime, u64, u64)>;

fn stamp(path: &Path) -> FileStamp {
    let meta = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&meta);
    #[cfg(not(unix))]
    let inode = 0;
    Some((meta.modified().ok()?, meta.len(), inode))
}

/// The registry file with its lock, and an in-memory copy of it.
///
/// [`RegistryStore::snapshot`] reads the copy without I/O (the server authenticates every RPC
/// with it); [`RegistryStore::refresh`] re-reads the file when another process (the admin CLI)
/// changed it, and [`RegistryStore::update`] changes file and copy together. `refresh` and
/// `update` block: async code calls them on a blocking thread.
#[derive(Debug)]
pub struct RegistryStore {
    path: PathBuf,
    lock_path: PathBuf,
    copy: RwLock<(FileStamp, Arc<Registry>)>,
}

impl RegistryStore {
    fn at(dir: &Path) -> RegistryStore {
        RegistryStore {
            path: dir.join("registry.json"),
            lock_path: dir.join("registry.lock"),
            copy: RwLock::new((None, Arc::new(Registry::default()))),
        }
    }

    /// The registry of the federation in `dir`, read once. A missing file is an error: a
    /// federation always has one, and treating it as empty would un-enroll every client.
    pub fn open(dir: &Path) -> std::io::Result<RegistryStore> {
        let store = Self::at(dir);
        let loaded = store.load_file()?;
        store.set_copy(loaded);
        Ok(store)
    }

    /// The registry of a new federation in `dir`: an empty one is written if there is none.
    pub fn create(dir: &Path) -> std::io::Result<RegistryStore> {
        let store = Self::at(dir);
        let _lock = store.lock()?;
        if !store.path.exists() {
            store.write(&Registry::default())?;
        }
        drop(_lock);
        Self::open(dir)
    }

    fn lock(&self) -> std::io::Result<File> {
        let file = File::options().create(true).truncate(false).write(true).open(&self.lock_path)?;
        file.lock()?;
        Ok(file)
    }

    fn load_file(&self) -> std::io::Result<(FileStamp, Registry)> {
        // The stamp is taken first: a change after it is seen by the next refresh.
        let stamp = stamp(&self.path);
        match std::fs::read(&self.path) {
            Ok(bytes) => {
                let registry = serde_json::from_slice(&bytes).map_err(|e| {
                    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {e}", self.path.display()))
                })?;
                Ok((stamp, registry))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{}: missing (the registry of tokens and clients)", self.path.display()),
            )),
            Err(e) => Err(std::io::Error::new(e.kind(), format!("{}: {e}", self.path.display()))),
        }
    }

    fn write(&self, registry: &Registry) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(registry).map_err(std::io::Error::other)?;
        fl_common::files::write_atomic(&self.path, &bytes, 0o600)
    }

    fn set_copy(&self, (stamp, registry): (FileStamp, Registry)) {
        *self.copy.write().unwrap_or_else(PoisonError::into_inner) = (stamp, Arc::new(registry));
    }

    /// The in-memory copy, as of the last `refresh` or `update`. No I/O.
    pub fn snapshot(&self) -> Arc<Registry> {
        self.copy.read().unwrap_or_else(PoisonError::into_inner).1.clone()
    }

    /// Re-reads the file if it changed since the copy was made; returns whether it did. A file
    /// that is missing or does not parse is an error, and the copy stays as it was.
    pub fn refresh(&self) -> std::io::Result<bool> {
        let current = stamp(&self.path);
        if current.is_some() && self.copy.read().unwrap_or_else(PoisonError::into_inner).0 == current {
            return Ok(false);
        }
        let loaded = self.load_file()?;
        let changed = *self.snapshot() != loaded.1;
        self.set_copy(loaded);
        Ok(changed)
    }

    /// After [`RegistryStore::refresh`] failed: rewrites the file from the in-memory copy under
    /// the lock (a file that does not parse is kept beside it as `registry.json.corrupt`).
    /// Returns false when the file was good again by the time the lock was taken.
    pub fn restore(&self) -> std::io::Result<bool> {
        let _lock = self.lock()?;
        match self.load_file() {
            Ok(loaded) => {
                self.set_copy(loaded);
                return Ok(false);
            }
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                let _ = std::fs::rename(&self.path, self.path.with_extension("json.corrupt"));
            }
            Err(_) => {}
        }
        let registry = self.snapshot();
        self.write(&registry)?;
        self.set_copy((stamp(&self.path), (*registry).clone()));
        Ok(true)
    }

    /// The current registry, re-read if the file changed.
    pub fn read(&self) -> std::io::Result<Registry> {
        self.refresh()?;
        Ok((*self.snapshot()).clone())
    }

    /// Changes the registry under the file lock and writes it back.
    pub fn update<T>(&self, change: impl FnOnce(&mut Registry) -> T) -> std::io::Result<T> {
        let _lock = self.lock()?;
        let (_, mut registry) = self.load_file()?;
        let out = change(&mut registry);
        self.write(&registry)?;
        self.set_copy((stamp(&self.path), registry));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_expire_run_out_and_revoke() {
        let mut reg = Registry::default();
        let token = JoinToken::generate(&"0".repeat(64));
        reg.add_token(&token, Some(60), Some(2), 1000);
        assert_eq!(reg.redeem(&token, 1001), Ok(()));
        assert_eq!(reg.redeem(&token, 1002), Ok(()));
        assert_eq!(reg.redeem(&token, 1003), Err(AccessError::TokenUsedUp(token.id.clone(), 2)));
        let other = JoinToken::generate(&"0".repeat(64));
        reg.add_token(&other, Some(60), None, 1000);
        assert_eq!(reg.redeem(&other, 1060), Err(AccessError::TokenExpired(other.id.clone())));
        let mut wrong = other.clone();
        wrong.secret = "f".repeat(32);
        assert_eq!(reg.redeem(&wrong, 1001), Err(AccessError::UnknownToken));
    }

    #[test]
    fn store_sees_changes_made_by_another_handle() {
        let dir = tempfile::tempdir().unwrap();
        let a = RegistryStore::create(dir.path()).unwrap();
        let b = RegistryStore::open(dir.path()).unwrap();
        let token = JoinToken::generate(&"0".repeat(64));
        assert!(a.snapshot().tokens.is_empty());
        b.update(|r| r.add_token(&token, None, None, 1)).unwrap();
        assert!(a.snapshot().tokens.is_empty(), "the copy changes only on refresh");
        assert!(a.refresh().unwrap(), "the change is seen");
        assert_eq!(a.snapshot().tokens.len(), 1);
        assert!(!a.refresh().unwrap(), "nothing new");
        assert_eq!(a.read().unwrap().tokens.len(), 1);
    }

    #[test]
    fn a_change_within_one_mtime_tick_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let a = RegistryStore::create(dir.path()).unwrap();
        let b = RegistryStore::open(dir.path()).unwrap();
        for i in 0..5 {
            let token = JoinToken::generate(&"0".repeat(64));
            b.update(|r| r.add_token(&token, None, None, i)).unwrap();
            a.refresh().unwrap();
            assert_eq!(a.snapshot().tokens.len(), i as usize + 1);
        }
    }

    #[test]
    fn a_deleted_or_corrupt_file_is_rewritten_from_memory() {
        let dir = tempfile::tempdir().unwrap();
        assert!(RegistryStore::open(dir.path()).is_err(), "no registry is an error, not an empty one");
        let store = RegistryStore::create(dir.path()).unwrap();
        let token = JoinToken::generate(&"0".repeat(64));
        store.update(|r| r.add_token(&token, None, None, 1)).unwrap();
        std::fs::remove_file(dir.path().join("registry.json")).unwrap();
        assert!(store.refresh().is_err(), "a missing file is an error");
        assert_eq!(store.snapshot().tokens.len(), 1, "the copy is kept");
        assert!(RegistryStore::open(dir.path()).unwrap_err().to_string().contains("registry.json: missing"));
        assert!(store.restore().unwrap());
        assert_eq!(RegistryStore::open(dir.path()).unwrap().snapshot().tokens.len(), 1, "rewritten from memory");
        std::fs::write(dir.path().join("registry.json"), b"{ not json").unwrap();
        assert!(store.refresh().is_err());
        assert!(store.restore().unwrap());
        assert_eq!(RegistryStore::open(dir.path()).unwrap().snapshot().tokens.len(), 1);
        assert!(dir.path().join("registry.json.corrupt").exists(), "the bad file is kept for a look");
        assert!(!store.restore().unwrap(), "nothing to restore when the file is good");
    }
}
