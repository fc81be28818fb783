//! Everything the coordinator keeps lives in its state directory, written with atomic write,
//! fsync and rename:
//!
//! ```text
//! federation.json      model spec (fixed for the federation), TLS names
//! ca.pem ca.key        federation CA (key 0600)
//! server.pem server.key
//! join-token           the initial join token, the operator's only clear copy (0600)
//! registry.json        tokens (hashed) and enrolled clients
//! progress.json        last completed round and elapsed training time
//! metrics.jsonl        one line per completed round
//! status.json          what the coordinator is doing now (below); rewritten on every change
//! model/initial.safetensors, model/round-NNNN.safetensors, model/final.safetensors
//! spool/               uploads being received; aggregate-*/: a robust strategy's updates of the round
//! strategy.json        the aggregation strategy and its parameters (fixed for the federation)
//! server-opt/round-NNNN.safetensors  the server optimiser's moments as of committed round NNNN
//! download-feedback/round-NNNN.safetensors  what top-k delta downloads left out, as of round NNNN
//! ```
//!
//! A round is committed in this order: model file, metrics line, progress. On start, metrics
//! lines past the recorded progress are dropped and that round is run again, so a crash at any
//! point neither counts a round twice nor loses or duplicates a metrics line. The commit of a
//! round (with its evaluation) runs in the background while the next round collects on the new
//! model; commits stay in round order, and a crash before one restarts from the last committed
//! round, which redoes the rounds after it (see `coordinator::complete_round`).
//!
//! `status.json` is [`CoordinatorStatus`], written atomically (off the async runtime) whenever it
//! changes, so that operators and tests ask the coordinator what it is doing instead of reading
//! its log (`fl-coordinator status --state-dir D` prints it):
//!
//! ```json
//! {"completed_rounds":2,"rounds_total":10,"round":3,"attempt":0,"phase":"collecting",
//!  "sampled":["c-1","c-2"],"accepted":["c-1"],"rejected":[],"connected":["c-1","c-2"],
//!  "failed_attempts":0,"last_failure":null,"failed_handshakes":0}
//! ```
//!
//! `phase` is `waiting` (for enough clients to start `round`), `collecting` (updates of
//! `round`/`attempt` from the `sampled` clients), `aggregating` (the next global model of
//! `round`; its evaluation and commit follow in the background) or `finished` (all rounds done,
//! the final model written). `completed_rounds` counts the committed rounds: while round r+1
//! collects, it may still be r-1. `sampled`,
//! `accepted` and `rejected` are those of the current or last attempt; `connected` are the
//! clients with an open work stream; ids are sorted. `failed_attempts` counts the attempts of
//! this serve run that were retried, `last_failure` says why the last one failed, or names the
//! last upload that could not be stored (a full disk); `failed_handshakes` counts the TLS
//! handshakes refused since the start.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use fl_common::files::{append_line, write_atomic};
use fl_common::tls::{CertificateAuthority, CertifiedKey};
use fl_common::ModelSpec;
use serde::{Deserialize, Serialize};

/// Reads a setting the state dir keeps as JSON (`secagg.json`, `distill.json`); `None` when the
/// federation has none.
pub(crate) fn read_setting<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).with_context(|| format!("reading {}", path.display()))?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Writes a setting as pretty JSON, atomically, when the federation is created.
pub(crate) fn write_setting<T: Serialize>(path: &Path, setting: &T) -> Result<()> {
    let json = serde_json::to_vec_pretty(setting)?;
    write_atomic(path, &json, 0o644).with_context(|| format!("writing {}", path.display()))
}

/// What is fixed when a federation is created.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FederationRecord {
    /// The model every round trains.
    pub spec: ModelSpec,
    /// Names in the server certificate.
    pub tls_sans: Vec<String>,
    /// Creation time.
    pub created_unix: u64,
}

/// Progress of the federation.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Progress {
    /// Rounds completed, counting from 1; 0 before the first.
    pub completed_round: u32,
    /// Seconds of serving up to the last completed round.
    pub elapsed_s: f64,
}

/// What the coordinator is doing: the content of `STATE/status.json` (see the module doc).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CoordinatorStatus {
    /// Rounds committed, counting from 1.
    pub completed_rounds: u32,
    /// Rounds of the federation.
    pub rounds_total: u32,
    /// The round being waited for, collected or aggregated (the last one once finished).
    pub round: u32,
    /// Its attempt, from 0.
    pub attempt: u32,
    /// What the coordinator does now.
    pub phase: Phase,
    /// Clients sampled for the attempt.
    pub sampled: Vec<String>,
    /// Sampled clients whose update was accepted.
    pub accepted: Vec<String>,
    /// Sampled clients whose update was refused or lost.
    pub rejected: Vec<String>,
    /// Clients with an open work stream.
    pub connected: Vec<String>,
    /// Attempts of this serve run that failed and were retried.
    pub failed_attempts: u32,
    /// Why the last attempt failed, or the last upload that could not be stored.
    pub last_failure: Option<String>,
    /// TLS handshakes refused since the start.
    pub failed_handshakes: u64,
    /// Updates refused since the start, by reason (`UpdateRefusal::reason`).
    #[serde(default)]
    pub refused: std::collections::BTreeMap<String, u64>,
}

/// The phase of the coordinator, in `status.json`.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Waiting for enough clients to start a round.
    #[default]
    Waiting,
    /// Collecting the updates of a round attempt.
    Collecting,
    /// Aggregating a round (its evaluation and commit follow in the background).
    Aggregating,
    /// All rounds are done.
    Finished,
}

/// The state directory.
#[derive(Clone, Debug)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// The directory at `root` (not created yet).
    pub fn new(root: &Path) -> Self {
        StateDir { root: root.to_owned() }
    }

    /// Its path.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Path of a file in it.
    pub fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Path of the model of round `round` (0 is the initial model).
    pub fn round_model_path(&self, round: u32) -> PathBuf {
        if round == 0 {
            self.root.join("model/initial.safetensors")
        } else {
            self.root.join(format!("model/round-{round:04}.safetensors"))
        }
    }

    /// Path of the model of the round with the lowest evaluation loss.
    pub fn best_model_path(&self) -> PathBuf {
        self.root.join("model/best.safetensors")
    }

    /// Path of the final model.
    pub fn final_model_path(&self) -> PathBuf {
        self.root.join("model/final.safetensors")
    }

    /// Path of the metrics file.
    pub fn metrics_path(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }

    /// Directory for uploads in flight.
    pub fn spool_dir(&self) -> PathBuf {
        self.root.join("spool")
    }

    /// Path of the status file.
    pub fn status_path(&self) -> PathBuf {
        self.root.join("status.json")
    }

    /// Writes `status.json` atomically. Blocking.
    pub fn write_status(&self, status: &CoordinatorStatus) -> std::io::Result<()> {
        let json = serde_json::to_vec(status).map_err(std::io::Error::other)?;
        write_atomic(&self.status_path(), &json, 0o644)
    }

    /// Reads `status.json`; `None` if there is none yet.
    pub fn read_status(&self) -> Result<Option<CoordinatorStatus>> {
        match std::fs::read(self.status_path()) {
            Ok(bytes) => Ok(Some(
                serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", self.status_path().display()))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", self.status_path().display())),
        }
    }

    /// True if a federation was created here.
    pub fn exists(&self) -> bool {
        self.path("federation.json").exists()
    }

    /// Creates the directory (mode 0700), the CA, the server certificate and the federation record.
    pub fn create(&self, spec: &ModelSpec, sans: &[String]) -> Result<(FederationRecord, CertificateAuthority)> {
        std::fs::create_dir_all(&self.root).with_context(|| format!("creating {}", self.root.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(0o700))?;
        }
        let ca = CertificateAuthority::generate("fedtext federation CA")?;
        write_atomic(&self.path("ca.key"), ca.key_pem.as_bytes(), 0o600)?;
        write_atomic(&self.path("ca.pem"), ca.cert_pem.as_bytes(), 0o644)?;
        self.write_server_cert(&ca, sans)?;
        let mut spec = spec.clone();
        spec.federation = ca.fingerprint()?;
        let record = FederationRecord { spec, tls_sans: sans.to_vec(), created_unix: crate::registry::now_unix() };
        write_atomic(&self.path("federation.json"), &serde_json::to_vec_pretty(&record)?, 0o644)?;
        Ok((record, ca))
    }

    fn write_server_cert(&self, ca: &CertificateAuthority, sans: &[String]) -> Result<CertifiedKey> {
        let server = ca.issue_server_cert(sans)?;
        write_atomic(&self.path("server.key"), server.key_pem.as_bytes(), 0o600)?;
        write_atomic(&self.path("server.pem"), server.cert_pem.as_bytes(), 0o644)?;
        Ok(server)
    }

    /// Loads the federation record and CA.
    pub fn load(&self) -> Result<(FederationRecord, CertificateAuthority)> {
        let read = |name: &str| {
            std::fs::read_to_string(self.path(name)).with_context(|| format!("reading {}", self.path(name).display()))
        };
        let record: FederationRecord = serde_json::from_str(&read("federation.json")?)
            .with_context(|| format!("parsing {}", self.path("federation.json").display()))?;
        let ca = CertificateAuthority { cert_pem: read("ca.pem")?, key_pem: read("ca.key")? };
        Ok((record, ca))
    }

    /// The server certificate for `sans`, re-issued by the same CA if the names changed.
    pub fn server_cert(
        &self,
        record: &mut FederationRecord,
        ca: &CertificateAuthority,
        sans: &[String],
    ) -> Result<CertifiedKey> {
        if record.tls_sans != sans || !self.path("server.pem").exists() {
            record.tls_sans = sans.to_vec();
            write_atomic(&self.path("federation.json"), &serde_json::to_vec_pretty(&record)?, 0o644)?;
            return self.write_server_cert(ca, sans);
        }
        let read = |name: &str| {
            std::fs::read_to_string(self.path(name)).with_context(|| format!("reading {}", self.path(name).display()))
        };
        Ok(CertifiedKey { cert_pem: read("server.pem")?, key_pem: read("server.key")? })
    }

    /// The recorded progress.
    pub fn progress(&self) -> Result<Progress> {
        match std::fs::read(self.path("progress.json")) {
            Ok(bytes) => Ok(serde_json::from_slice(&bytes)
                .with_context(|| format!("parsing {}", self.path("progress.json").display()))?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Progress::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", self.path("progress.json").display())),
        }
    }

    /// Brings metrics in line with progress after a crash: drops lines of rounds not committed.
    pub fn recover(&self) -> Result<Progress> {
        let progress = self.progress()?;
        let path = self.metrics_path();
        if let Ok(text) = std::fs::read_to_string(&path) {
            let mut kept = String::new();
            let mut dropped = 0;
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                let round = serde_json::from_str::<serde_json::Value>(line)
                    .ok()
                    .and_then(|v| v.get("round").and_then(|r| r.as_u64()));
                match round {
                    Some(r) if r <= u64::from(progress.completed_round) => {
                        kept.push_str(line);
                        kept.push('\n');
                    }
                    _ => dropped += 1,
                }
            }
            if dropped > 0 {
                tracing::warn!(dropped, "dropping metrics lines of rounds that were not committed before a crash");
                write_atomic(&path, kept.as_bytes(), 0o644)?;
            }
        }
        if !self.round_model_path(progress.completed_round).exists() {
            bail!(
                "{}: missing; the state directory is damaged",
                self.round_model_path(progress.completed_round).display()
            );
        }
        Ok(progress)
    }

    /// Commits a completed round: model, metrics line, then progress.
    pub fn commit_round(&self, round: u32, model_bytes: &[u8], metrics_line: &str, elapsed_s: f64) -> Result<()> {
        let model_path = self.round_model_path(round);
        write_atomic(&model_path, model_bytes, 0o644).with_context(|| format!("writing {}", model_path.display()))?;
        crash_point("after-model", round);
        append_line(&self.metrics_path(), metrics_line)
            .with_context(|| format!("appending to {}", self.metrics_path().display()))?;
        crash_point("after-metrics", round);
        let progress = Progress { completed_round: round, elapsed_s };
        write_atomic(&self.path("progress.json"), &serde_json::to_vec(&progress)?, 0o644)
            .with_context(|| format!("writing {}", self.path("progress.json").display()))?;
        Ok(())
    }
}

/// Fault injection for the crash tests: `FL_FAULT_CRASH=after-model:3` aborts the process at that
/// point of round 3's commit, as a power cut would (points: `before-commit`, at the start of the
/// background commit; `after-model`; `after-metrics`). Unset in normal use.
pub(crate) fn crash_point(point: &str, round: u32) {
    if let Ok(spec) = std::env::var("FL_FAULT_CRASH") {
        if spec == format!("{point}:{round}") {
            eprintln!("FL_FAULT_CRASH: aborting at {spec}");
            std::process::abort();
        }
    }
}

/// Fault injection for the crash tests: `FL_FAULT_SLEEP=before-commit:3:20` stalls round 3's
/// background commit for 20 seconds at that point (blocking), as a slow disk or evaluation
/// would, so that a test can strike while the next round collects and the commit is pending;
/// `fold:3:2` stalls each fold of round 3 for 2 s, after the update counts as accepted and before
/// the round may close. Unset in normal use.
pub(crate) fn fault_sleep(point: &str, round: u32) {
    let Ok(spec) = std::env::var("FL_FAULT_SLEEP") else { return };
    let prefix = format!("{point}:{round}:");
    if let Some(seconds) = spec.strip_prefix(&prefix).and_then(|s| s.parse::<f64>().ok()) {
        eprintln!("FL_FAULT_SLEEP: stalling {point} of round {round} for {seconds} s");
        std::thread::sleep(std::time::Duration::from_secs_f64(seconds));
    }
}
