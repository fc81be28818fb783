//! The registry of join tokens and enrolled clients, kept in `STATE/registry.json`.
//!
//! Tokens are stored hashed. Every change takes an exclusive lock on `STATE/registry.lock`,
//! re-reads the file, changes it and writes it atomically, so admin commands run against the
//! state directory while `serve` runs. The server keeps a copy in memory, which a watcher task
//! refreshes when the file changes (at most a second later), and authenticates from the copy
//! through an index ([`RegistryIndex`]), so a call costs the same with 10 clients or 100,000.
//!
//! Writes stay cheap in a large fleet: an update skips re-reading the file when it is the one
//! this process wrote last, enrollments that arrive together share one write
//! ([`RegistryStore::update_batched`]), and the time a client was last seen is noted in memory
//! and written once a second for all clients ([`RegistryStore::note_seen`]), not once per join.

use std::any::Any;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, PoisonError, RwLock};
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

/// Lookups over one version of the registry, rebuilt whenever the copy changes.
#[derive(Debug, Default)]
pub struct RegistryIndex {
    /// Position in `clients` of the first client with each certificate fingerprint.
    by_cert: HashMap<String, usize>,
    /// Ids of revoked clients.
    pub revoked: HashSet<String>,
    /// Clients that are not revoked.
    pub active: usize,
}

impl RegistryIndex {
    fn of(registry: &Registry) -> RegistryIndex {
        let mut index = RegistryIndex::default();
        for (i, c) in registry.clients.iter().enumerate() {
            index.by_cert.entry(c.cert_sha256.clone()).or_insert(i);
            match c.status {
                ClientStatus::Active => index.active += 1,
                ClientStatus::Revoked => {
                    index.revoked.insert(c.id.clone());
                }
            }
        }
        index
    }
}

/// The in-memory copy: the file's stamp when it was read or written, the registry, its index.
#[derive(Debug, Default)]
struct Copy {
    stamp: FileStamp,
    registry: Arc<Registry>,
    index: Arc<RegistryIndex>,
}

/// The answer to one batched change: its result, or the error of the write it was part of.
type BatchReply = std::io::Result<Box<dyn Any + Send>>;

/// A change of the registry whose result is boxed, so that changes of any result type queue together.
type BoxedChange = Box<dyn FnOnce(&mut Registry) -> Box<dyn Any + Send> + Send>;

/// A change waiting for the next batched write.
struct Queued {
    change: BoxedChange,
    reply: mpsc::SyncSender<BatchReply>,
}

impl std::fmt::Debug for Queued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Queued")
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
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
    copy: RwLock<Copy>,
    /// Changes waiting for a batched write.
    queue: Mutex<Vec<Queued>>,
    /// Held by the thread that writes a batch.
    writer: Mutex<()>,
    /// When clients were seen, not yet written: client id to Unix seconds.
    seen: Mutex<HashMap<String, u64>>,
}

impl RegistryStore {
    fn at(dir: &Path) -> RegistryStore {
        RegistryStore {
            path: dir.join("registry.json"),
            lock_path: dir.join("registry.lock"),
            copy: RwLock::new(Copy::default()),
            queue: Mutex::new(Vec::new()),
            writer: Mutex::new(()),
            seen: Mutex::new(HashMap::new()),
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
        let index = Arc::new(RegistryIndex::of(&registry));
        *self.copy.write().unwrap_or_else(PoisonError::into_inner) =
            Copy { stamp, registry: Arc::new(registry), index };
    }

    /// The in-memory copy, as of the last `refresh` or `update`. No I/O.
    pub fn snapshot(&self) -> Arc<Registry> {
        self.copy.read().unwrap_or_else(PoisonError::into_inner).registry.clone()
    }

    /// The index of the in-memory copy: revoked ids, active count. No I/O.
    pub fn index(&self) -> Arc<RegistryIndex> {
        self.copy.read().unwrap_or_else(PoisonError::into_inner).index.clone()
    }

    /// The active client with this certificate fingerprint, from the in-memory copy: one hash
    /// lookup, whatever the number of clients.
    pub fn authenticate(&self, cert_sha256: &str) -> Result<ClientRecord, AccessError> {
        let copy = self.copy.read().unwrap_or_else(PoisonError::into_inner);
        let client = copy
            .index
            .by_cert
            .get(cert_sha256)
            .and_then(|&i| copy.registry.clients.get(i))
            .ok_or(AccessError::UnknownCertificate)?;
        match client.status {
            ClientStatus::Active => Ok(client.clone()),
            ClientStatus::Revoked => Err(AccessError::ClientRevoked(client.id.clone())),
        }
    }

    /// Re-reads the file if it changed since the copy was made; returns whether it did. A file
    /// that is missing or does not parse is an error, and the copy stays as it was.
    pub fn refresh(&self) -> std::io::Result<bool> {
        let current = stamp(&self.path);
        if current.is_some() && self.copy.read().unwrap_or_else(PoisonError::into_inner).stamp == current {
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

    /// Changes the registry under the file lock and writes it back. The file is read again only
    /// when it is not the version this store wrote or read last (another process changed it).
    pub fn update<T>(&self, change: impl FnOnce(&mut Registry) -> T) -> std::io::Result<T> {
        let _lock = self.lock()?;
        let current = {
            let copy = self.copy.read().unwrap_or_else(PoisonError::into_inner);
            let now = stamp(&self.path);
            (now.is_some() && copy.stamp == now).then(|| (*copy.registry).clone())
        };
        let mut registry = match current {
            Some(registry) => registry,
            None => self.load_file()?.1,
        };
        let out = change(&mut registry);
        self.write(&registry)?;
        self.set_copy((stamp(&self.path), registry));
        Ok(out)
    }

    /// As [`RegistryStore::update`], but changes made at the same time from several threads
    /// share one write (group commit): each caller returns once the write that holds its change
    /// is on disk, with its own result, or with that write's error. Enrollments use it, so a
    /// burst of them costs a few writes of the registry instead of one each.
    pub fn update_batched<T: Send + 'static>(
        &self,
        change: impl FnOnce(&mut Registry) -> T + Send + 'static,
    ) -> std::io::Result<T> {
        let (reply, answer) = mpsc::sync_channel(1);
        let change = Box::new(move |r: &mut Registry| Box::new(change(r)) as Box<dyn Any + Send>);
        lock(&self.queue).push(Queued { change, reply });
        {
            // Whoever holds the writer takes every change queued so far, ours included unless an
            // earlier writer took it already (and then answered it before letting go).
            let _writer = lock(&self.writer);
            let batch = std::mem::take(&mut *lock(&self.queue));
            if !batch.is_empty() {
                let (changes, replies): (Vec<_>, Vec<_>) = batch.into_iter().map(|q| (q.change, q.reply)).unzip();
                match self.update(|registry| changes.into_iter().map(|c| c(registry)).collect::<Vec<_>>()) {
                    Ok(outs) => {
                        for (out, reply) in outs.into_iter().zip(replies) {
                            let _ = reply.send(Ok(out));
                        }
                    }
                    Err(e) => {
                        for reply in replies {
                            let _ = reply.send(Err(std::io::Error::new(e.kind(), e.to_string())));
                        }
                    }
                }
            }
        }
        let out = answer.recv().map_err(|_| std::io::Error::other("the registry write of this change failed"))??;
        out.downcast::<T>().map(|b| *b).map_err(|_| std::io::Error::other("registry batch: mismatched reply"))
    }

    /// Notes that `client_id` was seen at `now`, in memory; [`RegistryStore::flush_seen`] writes
    /// it. No I/O: a join costs no registry write.
    pub fn note_seen(&self, client_id: &str, now: u64) {
        let mut seen = lock(&self.seen);
        let at = seen.entry(client_id.to_string()).or_insert(now);
        *at = (*at).max(now);
    }

    /// The watcher's step: [`RegistryStore::refresh`], then [`RegistryStore::flush_seen`]. True
    /// when the copy changed, by another process or by the flush (whose update re-reads a file
    /// that another process changed since the refresh: its revocations must be acted on too).
    pub fn refresh_and_flush_seen(&self) -> std::io::Result<bool> {
        let changed = self.refresh()?;
        match self.flush_seen() {
            Ok(written) => Ok(changed || written > 0),
            Err(e) => {
                tracing::warn!("could not write when clients were last seen: {e}");
                Ok(changed)
            }
        }
    }

    /// Writes the times noted by [`RegistryStore::note_seen`] in one update; returns how many
    /// clients it wrote. On an error they stay noted for the next flush. Blocking.
    pub fn flush_seen(&self) -> std::io::Result<usize> {
        let pending = std::mem::take(&mut *lock(&self.seen));
        if pending.is_empty() {
            return Ok(0);
        }
        let written = self.update(|registry| {
            for c in registry.clients.iter_mut() {
                if let Some(&at) = pending.get(&c.id) {
                    c.last_seen_unix = c.last_seen_unix.max(at);
                }
            }
        });
        match written {
            Ok(()) => Ok(pending.len()),
            Err(e) => {
                for (id, at) in pending {
                    self.note_seen(&id, at);
                }
                Err(e)
            }
        }
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

    fn client(id: &str, cert: &str) -> ClientRecord {
        ClientRecord {
            id: id.into(),
            name: id.into(),
            cert_sha256: cert.into(),
            token_id: "t".into(),
            enrolled_unix: 1,
            last_seen_unix: 1,
            rounds_joined: 0,
            status: ClientStatus::Active,
        }
    }

    #[test]
    fn the_index_authenticates_and_follows_revocations() {
        let dir = tempfile::tempdir().unwrap();
        let store = RegistryStore::create(dir.path()).unwrap();
        store.update(|r| r.clients.extend([client("a", "fa"), client("b", "fb")])).unwrap();
        assert_eq!(store.authenticate("fb").unwrap().id, "b");
        assert_eq!(store.authenticate("fx"), Err(AccessError::UnknownCertificate));
        // Another process (the admin CLI) revokes b: the copy and its index follow on refresh.
        RegistryStore::open(dir.path()).unwrap().update(|r| r.clients[1].status = ClientStatus::Revoked).unwrap();
        assert!(store.refresh().unwrap());
        assert_eq!(store.authenticate("fb"), Err(AccessError::ClientRevoked("b".into())));
        assert_eq!((store.index().active, store.index().revoked.len()), (1, 1));
    }

    #[test]
    fn batched_updates_from_many_threads_all_land_with_their_own_results() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RegistryStore::create(dir.path()).unwrap());
        let threads: Vec<_> = (0..16)
            .map(|i| {
                let store = store.clone();
                std::thread::spawn(move || {
                    store
                        .update_batched(move |r| {
                            r.clients.push(client(&format!("c{i}"), &format!("f{i}")));
                            i * 10
                        })
                        .unwrap()
                })
            })
            .collect();
        let results: Vec<usize> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(results, (0..16).map(|i| i * 10).collect::<Vec<_>>(), "each caller gets its own result");
        let on_disk = RegistryStore::open(dir.path()).unwrap().snapshot();
        let mut ids: Vec<_> = on_disk.clients.iter().map(|c| c.id.clone()).collect();
        ids.sort();
        let mut want: Vec<_> = (0..16).map(|i| format!("c{i}")).collect();
        want.sort();
        assert_eq!(ids, want, "every change is in the file");
    }

    #[test]
    fn seen_times_are_written_once_for_all_clients() {
        let dir = tempfile::tempdir().unwrap();
        let store = RegistryStore::create(dir.path()).unwrap();
        store.update(|r| r.clients.extend([client("a", "fa"), client("b", "fb")])).unwrap();
        store.note_seen("a", 50);
        store.note_seen("b", 60);
        store.note_seen("a", 40);
        assert_eq!(RegistryStore::open(dir.path()).unwrap().snapshot().clients[0].last_seen_unix, 1, "not written yet");
        assert_eq!(store.flush_seen().unwrap(), 2);
        let on_disk = RegistryStore::open(dir.path()).unwrap().snapshot();
        let seen: Vec<u64> = on_disk.clients.iter().map(|c| c.last_seen_unix).collect();
        assert_eq!(seen, vec![50, 60], "the latest time of each client");
        assert_eq!(store.flush_seen().unwrap(), 0, "nothing left to write");
        // A flush that cannot write keeps the times for the next one.
        store.note_seen("b", 70);
        std::fs::remove_file(dir.path().join("registry.json")).unwrap();
        assert!(store.flush_seen().is_err());
        assert!(store.restore().unwrap());
        assert_eq!(store.flush_seen().unwrap(), 1);
        assert_eq!(RegistryStore::open(dir.path()).unwrap().snapshot().clients[1].last_seen_unix, 70);
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
