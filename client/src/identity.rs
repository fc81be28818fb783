//! The client's identity on disk: its key (mode 0600), its certificate and the federation CA.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use fl_common::tls::CertifiedKey;
use serde::{Deserialize, Serialize};

/// Files of an enrolled client's state directory.
#[derive(Debug, Clone)]
pub struct ClientState {
    dir: PathBuf,
}

/// What enrollment recorded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnrollmentRecord {
    /// Id the coordinator gave this client.
    pub client_id: String,
    /// Coordinator URL used at enrollment.
    pub coordinator: String,
    /// Name sent at enrollment.
    pub name: String,
}

/// An identity loaded from disk.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Certificate and key.
    pub key: CertifiedKey,
    /// Federation CA, PEM.
    pub ca_pem: String,
    /// Enrollment details.
    pub record: EnrollmentRecord,
}

impl ClientState {
    /// The state directory at `dir`.
    pub fn new(dir: &Path) -> Self {
        ClientState { dir: dir.to_owned() }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Creates the directory if needed and checks that files can be written in it.
    pub fn check_writable(&self) -> Result<()> {
        std::fs::create_dir_all(&self.dir).with_context(|| format!("creating {}", self.dir.display()))?;
        let probe = self.dir.join(".write-test");
        fl_common::files::write_atomic(&probe, b"", 0o600)
            .with_context(|| format!("{}: cannot write the identity here", self.dir.display()))?;
        let _ = std::fs::remove_file(&probe);
        Ok(())
    }

    fn key_path(&self) -> PathBuf {
        self.dir.join("client.key")
    }
    fn cert_path(&self) -> PathBuf {
        self.dir.join("client.pem")
    }
    fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    fn record_path(&self) -> PathBuf {
        self.dir.join("enrollment.json")
    }

    /// True when this directory holds an identity.
    pub fn is_enrolled(&self) -> bool {
        self.cert_path().exists() && self.key_path().exists()
    }

    /// Stores a new identity.
    pub fn save(&self, identity: &Identity) -> Result<()> {
        use fl_common::files::write_atomic;
        std::fs::create_dir_all(&self.dir).with_context(|| format!("creating {}", self.dir.display()))?;
        let record = serde_json::to_string_pretty(&identity.record)?;
        let files = [
            (self.key_path(), identity.key.key_pem.as_bytes(), 0o600),
            (self.cert_path(), identity.key.cert_pem.as_bytes(), 0o644),
            (self.ca_path(), identity.ca_pem.as_bytes(), 0o644),
            (self.record_path(), record.as_bytes(), 0o644),
        ];
        for (path, bytes, mode) in files {
            write_atomic(&path, bytes, mode).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }

    /// Removes whatever [`save`](Self::save) wrote of an identity, so that a failed store
    /// leaves no half identity behind (best effort: each file that is there is removed).
    pub fn discard(&self) {
        for path in [self.key_path(), self.cert_path(), self.ca_path(), self.record_path()] {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Loads the identity; a clear error if the client is not enrolled.
    pub fn load(&self) -> Result<Identity> {
        if !self.is_enrolled() {
            bail!(
                "{}: no client identity here; run `fl-client enroll --state-dir {}` first",
                self.dir.display(),
                self.dir.display()
            );
        }
        let read = |p: PathBuf| std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()));
        let record: EnrollmentRecord = serde_json::from_str(&read(self.record_path())?)
            .with_context(|| format!("parsing {}", self.record_path().display()))?;
        let identity = Identity {
            key: CertifiedKey { cert_pem: read(self.cert_path())?, key_pem: read(self.key_path())? },
            ca_pem: read(self.ca_path())?,
            record,
        };
        // A damaged file would fail every handshake: name it now, as an error retrying cannot fix.
        let damaged = |path: PathBuf, e: &dyn std::fmt::Display| {
            fl_common::cli::Permanent::error(format!(
                "{}: damaged ({e}); restore it, or re-enroll with `fl-client enroll --force`",
                path.display()
            ))
        };
        fl_common::tls::check_private_key(&identity.key.key_pem).map_err(|e| damaged(self.key_path(), &e))?;
        for (path, pem) in [(self.cert_path(), &identity.key.cert_pem), (self.ca_path(), &identity.ca_pem)] {
            match fl_common::tls::parse_certs(pem) {
                Ok(certs) if !certs.is_empty() => {}
                Ok(_) => return Err(damaged(path, &"no certificate in it")),
                Err(e) => return Err(damaged(path, &e)),
            }
        }
        Ok(identity)
    }
}
