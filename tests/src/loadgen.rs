//! A load generator for the coordinator: many enrolled clients in one process, each with its own
//! mTLS identity and its own connection, that answer round tasks as the client daemon does
//! (`FetchModel`, `Heartbeat`s every 2 s, `SubmitUpdate`) with synthetic sparse deltas instead of
//! training. Clients "train" for a log-normal time, and a fraction of those sampled drop their
//! connection mid-round and come back later. [`CoordinatorProbe`] watches the coordinator process
//! meanwhile: CPU seconds, RSS and file descriptors, per phase and per round.
//!
//! `fl-loadgen` (bench/scale.sh) is the command line; tests/tests/loadgen.rs runs it in process.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use fl_client::daemon::upload_chunks;
use fl_client::identity::{ClientState, Identity};
use fl_common::codec::{tensor_digest, UpdateCodec};
use fl_common::tensors::sha256_hex;
use fl_common::TensorSet;
use fl_proto::pb::{self, federation_client::FederationClient};
use rand::{Rng, SeedableRng};
use rand_distr::Distribution;
use serde::Serialize;
use sha2::Digest;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// What a load run does.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// `https://HOST:PORT` of the coordinator.
    pub coordinator: String,
    /// The join token; needed only when some client is not enrolled yet.
    pub token: Option<String>,
    /// Where the identities live (`client-0000`, ...): reused when present, enrolled otherwise.
    pub identities: PathBuf,
    /// Concurrent clients.
    pub clients: usize,
    /// Enrollments in flight at once.
    pub enroll_concurrency: usize,
    /// TLS handshakes in flight at once while connecting.
    pub connect_concurrency: usize,
    /// Median seconds of simulated local training.
    pub train_secs: f64,
    /// σ of the log-normal training time (0: every client takes `train_secs`).
    pub train_spread: f64,
    /// Probability that a sampled client drops its connection mid-round.
    pub dropout: f64,
    /// Seconds a dropped client stays away before it reconnects.
    pub rejoin_secs: f64,
    /// Rows of each matrix that a synthetic delta changes (the rest are zero).
    pub rows: usize,
    /// Seed of every random choice (drop-outs, training times, deltas).
    pub seed: u64,
    /// Only hold the connections this long once every client joined, then stop (no round work
    /// expected): for measuring idle connections.
    pub hold_secs: Option<f64>,
    /// Give up after this long.
    pub max_secs: f64,
}

impl LoadConfig {
    /// Defaults for `clients` clients of `coordinator`, identities under `identities`.
    pub fn new(coordinator: &str, identities: &Path, clients: usize) -> LoadConfig {
        LoadConfig {
            coordinator: coordinator.to_string(),
            token: None,
            identities: identities.to_path_buf(),
            clients,
            enroll_concurrency: 8,
            connect_concurrency: 32,
            train_secs: 5.0,
            train_spread: 0.5,
            dropout: 0.05,
            rejoin_secs: 3.0,
            rows: 200,
            seed: 1,
            hold_secs: None,
            max_secs: 3600.0,
        }
    }
}

/// What a load run saw, as `fl-loadgen --report` writes it.
#[derive(Debug, Default, Serialize)]
pub struct LoadReport {
    /// Clients.
    pub clients: usize,
    /// Identities enrolled by this run (the others were reused).
    pub enrolled: usize,
    /// Seconds spent enrolling them.
    pub enroll_s: f64,
    /// Seconds until every client had its TLS connection.
    pub connect_s: f64,
    /// Seconds until every client had joined (after connecting).
    pub join_s: f64,
    /// Clients that joined at least once.
    pub joined: usize,
    /// Clients told that the federation finished.
    pub finished: usize,
    /// Reconnections after a drop-out or a broken stream.
    pub reconnects: usize,
    /// Clients that gave up after failing to connect ten times in a row (also under `errors`).
    pub gave_up: usize,
    /// Per round attempt, in order.
    pub rounds: Vec<RoundCounts>,
    /// Full model downloads and their bytes.
    pub full_downloads: usize,
    /// Delta downloads (the round's aggregate only) and their bytes.
    pub delta_downloads: usize,
    /// Bytes downloaded in all.
    pub bytes_down: u64,
    /// Downloaded global models checked against the round task's digest (one per round and kind).
    pub models_verified: usize,
    /// Downloads of the same model whose bytes differed between clients (must be 0).
    pub download_mismatches: usize,
    /// Errors, counted by kind; the first of each kind is kept in `error_samples`.
    pub errors: std::collections::BTreeMap<String, usize>,
    /// The first message of each kind of error.
    pub error_samples: std::collections::BTreeMap<String, String>,
    /// What the coordinator process did, when a probe watched it.
    pub coordinator: Option<ProbeReport>,
}

/// What the clients did in one round attempt.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RoundCounts {
    /// Round.
    pub round: u32,
    /// Attempt.
    pub attempt: u32,
    /// Round tasks received (a resent task after a rejoin counts again).
    pub tasks: usize,
    /// Updates accepted.
    pub accepted: usize,
    /// Updates refused (stale, round closed, not sampled).
    pub refused: usize,
    /// Clients that dropped their connection mid-round.
    pub dropped: usize,
    /// Clients told by a heartbeat that the round closed before they uploaded.
    pub closed_early: usize,
    /// Milliseconds from the start of an upload to its acknowledgement (the coordinator
    /// acknowledges after spooling, validating and folding it): median.
    pub ack_ms_p50: f64,
    /// The same, 95th percentile.
    pub ack_ms_p95: f64,
    /// The same, the slowest.
    pub ack_ms_max: f64,
    #[serde(skip)]
    ack_ms: Vec<f64>,
}

/// Enrolls the clients that have no identity yet and loads all `config.clients` identities.
/// Returns them with the number enrolled now.
pub async fn identities(config: &LoadConfig) -> Result<(Vec<Identity>, usize)> {
    let dirs: Vec<PathBuf> = (0..config.clients).map(|i| config.identities.join(format!("client-{i:04}"))).collect();
    let missing: Vec<usize> = (0..dirs.len()).filter(|&i| !ClientState::new(&dirs[i]).is_enrolled()).collect();
    if !missing.is_empty() {
        let token = config.token.clone().ok_or_else(|| {
            anyhow!(
                "{} of {} clients under {} have no identity yet: give the join token (--token or --token-file)",
                missing.len(),
                dirs.len(),
                config.identities.display()
            )
        })?;
        let slots = Arc::new(Semaphore::new(config.enroll_concurrency.max(1)));
        let mut set = JoinSet::new();
        for i in missing.iter().copied() {
            let (dir, url, token, slots) = (dirs[i].clone(), config.coordinator.clone(), token.clone(), slots.clone());
            set.spawn(async move {
                let _slot = slots.acquire_owned().await;
                let name = format!("load-{i:04}");
                fl_client::enroll::enroll(&url, &token, &name, &ClientState::new(&dir), false)
                    .await
                    .with_context(|| format!("enrolling {}", dir.display()))
            });
        }
        while let Some(done) = set.join_next().await {
            done.context("an enrollment task panicked")??;
        }
    }
    let loaded = tokio::task::spawn_blocking(move || -> Result<Vec<Identity>> {
        dirs.iter().map(|d| ClientState::new(d).load()).collect()
    })
    .await??;
    Ok((loaded, missing.len()))
}

/// Connects every client, joins them all, serves rounds until the federation finishes (or the
/// hold time or `max_secs` is over), and reports. `probe` marks its phases on the coordinator.
pub async fn run(
    config: LoadConfig,
    probe: Option<&CoordinatorProbe>,
    progress: Option<indicatif::ProgressBar>,
) -> Result<LoadReport> {
    if config.clients == 0 {
        bail!("--clients must be at least 1");
    }
    let started = Instant::now();
    if let Some(p) = probe {
        p.mark("start");
    }
    if let Some(bar) = &progress {
        bar.set_message(format!("enrolling or loading {} identities", config.clients));
    }
    let (identities, enrolled) = identities(&config).await?;
    let enroll_s = started.elapsed().as_secs_f64();
    if let Some(p) = probe {
        p.mark("enrolled");
    }

    // Every TLS handshake first, then every Join: the round starts against a full house.
    let connecting = Instant::now();
    let slots = Arc::new(Semaphore::new(config.connect_concurrency.max(1)));
    let mut set = JoinSet::new();
    for (i, identity) in identities.iter().cloned().enumerate() {
        let (url, slots) = (config.coordinator.clone(), slots.clone());
        set.spawn(async move {
            let _slot = slots.acquire_owned().await;
            (i, connect(&url, &identity).await)
        });
    }
    let mut channels: Vec<Option<Channel>> = vec![None; identities.len()];
    while let Some(done) = set.join_next().await {
        let (i, channel) = done.context("a connect task panicked")?;
        channels[i] = Some(channel.with_context(|| format!("connecting client {i}"))?);
    }
    let connect_s = connecting.elapsed().as_secs_f64();
    if let Some(p) = probe {
        p.mark("connected");
    }

    let shared = Arc::new(Shared::new(config.clone()));
    if let Some(bar) = progress.clone() {
        let shared = shared.clone();
        tokio::spawn(async move {
            while !bar.is_finished() {
                bar.set_message(shared.progress_line());
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
    }
    let joining = Instant::now();
    let mut clients = JoinSet::new();
    for (i, (identity, channel)) in identities.into_iter().zip(channels).enumerate() {
        let shared = shared.clone();
        clients.spawn(async move { VirtualClient::new(i, identity, shared.clone()).run(channel).await });
    }
    let all_joined = async {
        while shared.counts().joined < config.clients {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::select! {
        _ = all_joined => {}
        _ = tokio::time::sleep(Duration::from_secs_f64(config.max_secs)) => shared.stop.cancel(),
    }
    let join_s = joining.elapsed().as_secs_f64();
    if let Some(p) = probe {
        p.mark("joined");
    }
    if let Some(hold) = config.hold_secs {
        tokio::time::sleep(Duration::from_secs_f64(hold)).await;
        if let Some(p) = probe {
            p.mark("held");
        }
        shared.stop.cancel();
    }
    let deadline = tokio::time::sleep(Duration::from_secs_f64(config.max_secs).saturating_sub(started.elapsed()));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            done = clients.join_next() => match done {
                Some(result) => result.context("a client task panicked")?,
                None => break,
            },
            _ = &mut deadline, if !shared.stop.is_cancelled() => {
                shared.record_error("timeout", format!("stopped after --max-secs {}", config.max_secs));
                shared.stop.cancel();
            }
        }
    }
    if let Some(p) = probe {
        p.mark("finished");
    }
    if let Some(bar) = &progress {
        bar.finish_with_message(shared.progress_line());
    }

    let counts = shared.counts();
    let mut rounds: Vec<RoundCounts> = counts.rounds.values().cloned().collect();
    rounds.sort_by_key(|r| (r.round, r.attempt));
    for r in &mut rounds {
        r.ack_ms.sort_by(f64::total_cmp);
        let at = |q: f64| r.ack_ms.get(((r.ack_ms.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(0.0);
        (r.ack_ms_p50, r.ack_ms_p95, r.ack_ms_max) = (at(0.5), at(0.95), r.ack_ms.last().copied().unwrap_or(0.0));
    }
    let cache = shared.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    Ok(LoadReport {
        clients: config.clients,
        enrolled,
        enroll_s,
        connect_s,
        join_s,
        joined: counts.joined,
        finished: counts.finished,
        reconnects: counts.reconnects,
        gave_up: counts.gave_up,
        rounds,
        full_downloads: counts.full_downloads,
        delta_downloads: counts.delta_downloads,
        bytes_down: counts.bytes_down,
        models_verified: cache.verified,
        download_mismatches: cache.raw.values().filter(|shas| shas.len() > 1).count(),
        errors: counts.errors.clone(),
        error_samples: counts.error_samples.clone(),
        coordinator: probe.map(CoordinatorProbe::report),
    })
}

async fn connect(url: &str, identity: &Identity) -> Result<Channel> {
    // Within `tls::CONNECT_TIMEOUT`, TLS handshake included.
    Ok(fl_common::tls::connect(url, &identity.ca_pem, Some(&identity.key)).await?)
}

/// Counters of the whole run.
#[derive(Debug, Default)]
struct Counts {
    joined: usize,
    finished: usize,
    reconnects: usize,
    gave_up: usize,
    rounds: HashMap<(u32, u32), RoundCounts>,
    full_downloads: usize,
    delta_downloads: usize,
    bytes_down: u64,
    errors: std::collections::BTreeMap<String, usize>,
    error_samples: std::collections::BTreeMap<String, String>,
}

/// Global models as the clients downloaded them: shared, so that one copy is kept per round
/// however many clients download it.
#[derive(Debug, Default)]
struct ModelCache {
    /// Downloads (by model digest and kind) that one client keeps whole, to check and decode.
    claimed: HashSet<(String, bool)>,
    /// The SHA-256 of the downloaded bytes, per model digest and kind: all clients must agree.
    raw: HashMap<(String, bool), HashSet<String>>,
    /// Checked global models by digest (the last few).
    globals: HashMap<String, Arc<TensorSet>>,
    /// Zeros in the model's shapes: what synthetic deltas start from.
    template: Option<Arc<TensorSet>>,
    verified: usize,
}

/// What every virtual client shares.
#[derive(Debug)]
struct Shared {
    config: LoadConfig,
    counts: Mutex<Counts>,
    cache: Mutex<ModelCache>,
    /// Notified when a client joins or a model is checked.
    changed: Notify,
    /// Encodings in flight: each holds a dense delta of the model's size.
    encoders: Semaphore,
    stop: CancellationToken,
}

impl Shared {
    fn new(config: LoadConfig) -> Shared {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
        Shared {
            config,
            counts: Mutex::default(),
            cache: Mutex::default(),
            changed: Notify::new(),
            encoders: Semaphore::new(cores),
            stop: CancellationToken::new(),
        }
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, ModelCache> {
        self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn round(&self, task: &pb::RoundTask, change: impl FnOnce(&mut RoundCounts)) {
        let mut counts = self.counts();
        let entry = counts.rounds.entry((task.round, task.attempt)).or_insert_with(|| RoundCounts {
            round: task.round,
            attempt: task.attempt,
            ..RoundCounts::default()
        });
        change(entry);
    }

    /// One line on where the run is: joined clients, the latest attempt's counts, errors.
    fn progress_line(&self) -> String {
        let counts = self.counts();
        let latest = counts.rounds.values().max_by_key(|r| (r.round, r.attempt));
        let round = latest.map_or_else(String::new, |r| {
            format!(
                ", round {} attempt {}: {} tasks, {} accepted, {} dropped, {} refused",
                r.round, r.attempt, r.tasks, r.accepted, r.dropped, r.refused
            )
        });
        let errors: usize = counts.errors.values().sum();
        format!(
            "{} of {} joined{round}, {} finished, {errors} errors",
            counts.joined, self.config.clients, counts.finished
        )
    }

    fn record_error(&self, kind: &str, message: String) {
        let mut counts = self.counts();
        *counts.errors.entry(kind.to_string()).or_insert(0) += 1;
        counts.error_samples.entry(kind.to_string()).or_insert(message);
    }
}

/// How a round task ended for a client.
enum TaskEnd {
    /// Answered, or told the round closed: keep reading the work stream.
    Continue,
    /// Dropped the connection: reconnect later.
    Dropped,
}

/// Connection attempts in a row, a second apart, after which a client gives up.
const GIVE_UP_AFTER: u32 = 10;

/// One simulated client.
struct VirtualClient {
    index: usize,
    identity: Identity,
    shared: Arc<Shared>,
    /// Digest of the global model this client holds, for delta downloads.
    held: Option<String>,
    /// Attempts this client already dropped out of (it answers them when it comes back).
    dropped: HashSet<(u32, u32)>,
    joined_once: bool,
}

impl VirtualClient {
    fn new(index: usize, identity: Identity, shared: Arc<Shared>) -> VirtualClient {
        VirtualClient { index, identity, shared, held: None, dropped: HashSet::new(), joined_once: false }
    }

    /// A generator for one decision of this client about one attempt.
    fn rng(&self, round: u32, attempt: u32, purpose: u64) -> rand::rngs::StdRng {
        let mut h = self.shared.config.seed ^ 0x9E37_79B9_7F4A_7C15;
        for v in [self.index as u64, u64::from(round), u64::from(attempt), purpose] {
            h = (h ^ v).wrapping_mul(0x0100_0000_01B3).rotate_left(17);
        }
        rand::rngs::StdRng::seed_from_u64(h)
    }

    async fn run(mut self, mut channel: Option<Channel>) {
        let stop = self.shared.stop.clone();
        let mut failures = 0;
        loop {
            if stop.is_cancelled() {
                return;
            }
            let ch = match channel.take() {
                Some(c) => c,
                None => match connect(&self.shared.config.coordinator, &self.identity).await {
                    Ok(c) => {
                        failures = 0;
                        c
                    }
                    Err(e) => {
                        // A coordinator that finished stops listening after its drain: a client
                        // still away then gives up, as a daemon would after its retries.
                        failures += 1;
                        if failures >= GIVE_UP_AFTER {
                            self.shared.counts().gave_up += 1;
                            self.shared.record_error("unreachable", format!("{e:#}"));
                            return;
                        }
                        if self.pause(Duration::from_secs(1)).await {
                            return;
                        }
                        continue;
                    }
                },
            };
            match self.session(ch).await {
                Ok(Some(wait)) => {
                    self.shared.counts().reconnects += 1;
                    if self.pause(wait).await {
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    self.shared.record_error("session", format!("{e:#}"));
                    self.shared.counts().reconnects += 1;
                    if self.pause(Duration::from_secs(1)).await {
                        return;
                    }
                }
            }
        }
    }

    /// Sleeps `wait`; true when the run stopped meanwhile.
    async fn pause(&self, wait: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(wait) => false,
            _ = self.shared.stop.cancelled() => true,
        }
    }

    /// One connection: join and serve the work stream. `Ok(None)`: done; `Ok(Some(wait))`:
    /// reconnect after `wait`.
    async fn session(&mut self, channel: Channel) -> Result<Option<Duration>> {
        let mut client = FederationClient::new(channel.clone());
        let join = pb::JoinRequest { name: format!("load-{:04}", self.index), num_examples: 100 };
        let mut stream = client.join(join).await.context("join")?.into_inner();
        loop {
            let message = tokio::select! {
                m = stream.message() => m,
                _ = self.shared.stop.cancelled() => return Ok(None),
            };
            let kind = match message {
                Ok(Some(m)) => m.kind,
                Ok(None) => return Ok(Some(Duration::from_secs(1))),
                Err(status) => bail!("work stream: {}", status.message()),
            };
            match kind {
                Some(pb::instruction::Kind::Welcome(_)) if !self.joined_once => {
                    self.joined_once = true;
                    self.shared.counts().joined += 1;
                    self.shared.changed.notify_waiters();
                }
                Some(pb::instruction::Kind::Welcome(_)) => {}
                Some(pb::instruction::Kind::Round(task)) => {
                    self.shared.round(&task, |r| r.tasks += 1);
                    match self.task(&mut client, &channel, &task).await {
                        Ok(TaskEnd::Continue) => {}
                        Ok(TaskEnd::Dropped) => {
                            self.shared.round(&task, |r| r.dropped += 1);
                            // Dropping every handle of the channel closes the connection.
                            drop((stream, client, channel));
                            let spread = self.rng(task.round, task.attempt, 3).random_range(0.5..1.5);
                            return Ok(Some(Duration::from_secs_f64(self.shared.config.rejoin_secs * spread)));
                        }
                        Err(e) => self.shared.record_error("round", format!("round {}: {e:#}", task.round)),
                    }
                }
                Some(pb::instruction::Kind::Finished(_)) => {
                    self.shared.counts().finished += 1;
                    return Ok(None);
                }
                None => {}
            }
        }
    }

    /// Serves one round task as the daemon does, training replaced by a wait.
    async fn task(
        &mut self,
        client: &mut FederationClient<Channel>,
        channel: &Channel,
        task: &pb::RoundTask,
    ) -> Result<TaskEnd> {
        let config = &self.shared.config;
        let key = (task.round, task.attempt);
        let drop_out =
            !self.dropped.contains(&key) && self.rng(task.round, task.attempt, 1).random_bool(config.dropout);
        let train = match rand_distr::LogNormal::new(config.train_secs.max(1e-3).ln(), config.train_spread.max(0.0)) {
            Ok(d) => d.sample(&mut self.rng(task.round, task.attempt, 2)),
            Err(_) => config.train_secs,
        };
        self.download(client, task).await?;
        let trained = Instant::now();
        // A drop-out leaves somewhere in the middle of its training.
        let until = if drop_out { train * self.rng(task.round, task.attempt, 4).random_range(0.2..0.8) } else { train };
        let mut beat = FederationClient::new(channel.clone());
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        tick.tick().await;
        let end = tokio::time::Instant::now() + Duration::from_secs_f64(until);
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(end) => break,
                _ = tick.tick() => {
                    let progress = (trained.elapsed().as_secs_f64() / train) as f32;
                    let beat = beat.heartbeat(pb::HeartbeatRequest { round: task.round, attempt: task.attempt, progress });
                    match beat.await {
                        Ok(ack) if !ack.get_ref().round_open => {
                            self.shared.round(task, |r| r.closed_early += 1);
                            return Ok(TaskEnd::Continue);
                        }
                        Ok(_) => {}
                        Err(status) => self.shared.record_error("heartbeat", status.message().to_string()),
                    }
                }
                _ = self.shared.stop.cancelled() => return Ok(TaskEnd::Continue),
            }
        }
        if drop_out {
            self.dropped.insert(key);
            return Ok(TaskEnd::Dropped);
        }
        let payload = self.synthetic_update(task).await?;
        let (codec, payload, examples) = payload;
        let header = pb::UpdateHeader {
            round: task.round,
            attempt: task.attempt,
            codec: codec.name().to_string(),
            total_bytes: payload.len() as u64,
            num_examples: examples,
            train_loss: 0.5,
            train_accuracy: 0.8,
            train_s: train,
            ..Default::default()
        };
        let digest = sha256_hex(&payload);
        let sent = Instant::now();
        let ack = client.submit_update(tokio_stream::iter(upload_chunks(header, payload, digest))).await;
        let ack_ms = sent.elapsed().as_secs_f64() * 1e3;
        match ack {
            Ok(ack) if ack.get_ref().accepted => self.shared.round(task, |r| {
                r.accepted += 1;
                r.ack_ms.push(ack_ms);
            }),
            Ok(_) => self.shared.round(task, |r| r.refused += 1),
            Err(status) if status.code() == tonic::Code::FailedPrecondition => {
                self.shared.round(task, |r| r.refused += 1)
            }
            Err(status) => bail!("upload: {}", status.message()),
        }
        Ok(TaskEnd::Continue)
    }

    /// Downloads the task's global model: only the aggregate when this client holds the base of
    /// the delta on offer. One client per model keeps the bytes to check them against the task's
    /// digest; every client hashes what it got, and all must agree.
    async fn download(&mut self, client: &mut FederationClient<Channel>, task: &pb::RoundTask) -> Result<()> {
        if !task.model_digest.is_empty() && self.held.as_deref() == Some(task.model_digest.as_str()) {
            return Ok(());
        }
        let delta = !task.delta_base_digest.is_empty() && self.held.as_deref() == Some(task.delta_base_digest.as_str());
        let have_digest = if delta { task.delta_base_digest.clone() } else { String::new() };
        let key = (task.model_digest.clone(), delta);
        let keep = self.shared.cache().claimed.insert(key.clone());
        let request =
            pb::FetchModelRequest { round: task.round, attempt: task.attempt, have_digest, ..Default::default() };
        let fetched = async {
            let mut stream = client.fetch_model(request).await.context("fetch model")?.into_inner();
            let (mut received, mut hasher, mut bytes) = (0u64, sha2::Sha256::new(), Vec::new());
            let mut got_delta = false;
            while let Some(chunk) = stream.message().await.context("model stream")? {
                if chunk.offset != received {
                    bail!("model chunk out of order: offset {} after {received} bytes", chunk.offset);
                }
                got_delta = chunk.delta;
                received += chunk.data.len() as u64;
                hasher.update(&chunk.data);
                if keep {
                    bytes.extend_from_slice(&chunk.data);
                }
            }
            if got_delta != delta {
                bail!("asked for a delta: {delta}, got one: {got_delta}");
            }
            Ok((received, hex::encode(hasher.finalize()), bytes))
        };
        let (received, raw_sha, bytes) = match fetched.await {
            Ok(done) => done,
            Err(e) => {
                if keep {
                    self.shared.cache().claimed.remove(&key);
                }
                return Err(e);
            }
        };
        {
            let mut counts = self.shared.counts();
            counts.bytes_down += received;
            if delta {
                counts.delta_downloads += 1;
            } else {
                counts.full_downloads += 1;
            }
        }
        self.shared.cache().raw.entry(key.clone()).or_default().insert(raw_sha);
        if keep {
            let shared = self.shared.clone();
            let task = task.clone();
            tokio::task::spawn_blocking(move || check_download(&shared, &task, delta, &bytes)).await??;
            self.shared.changed.notify_waiters();
        }
        self.held = Some(task.model_digest.clone());
        Ok(())
    }

    /// A delta in the model's shapes that changes `rows` random rows of each matrix, encoded with
    /// the coordinator's most preferred codec: (codec, payload, examples).
    async fn synthetic_update(&self, task: &pb::RoundTask) -> Result<(UpdateCodec, Vec<u8>, u64)> {
        let codec = match task.update_codecs.first() {
            None => UpdateCodec::EXACT,
            Some(_) => task.update_codecs.iter().find_map(|n| n.parse::<UpdateCodec>().ok()).ok_or_else(|| {
                anyhow!("the coordinator accepts no codec this generator knows: {}", task.update_codecs.join(", "))
            })?,
        };
        let template = self.template().await?;
        let _slot = self.shared.encoders.acquire().await?;
        let mut rng = self.rng(task.round, task.attempt, 5);
        let rows = self.shared.config.rows;
        let examples = rng.random_range(50..500);
        let payload = tokio::task::spawn_blocking(move || {
            let mut delta = (*template).clone();
            for t in &mut delta.tensors {
                let cols = if t.shape.len() >= 2 { t.shape[1..].iter().product::<usize>() } else { t.data.len() };
                let nrows = t.data.len() / cols.max(1);
                for _ in 0..rows.min(nrows) {
                    let r = rng.random_range(0..nrows);
                    for v in &mut t.data[r * cols..(r + 1) * cols] {
                        *v = rng.random_range(-0.01..0.01);
                    }
                }
            }
            codec.encode(&delta)
        })
        .await??;
        Ok((codec, payload, examples))
    }

    /// The zeros template, once some client checked a full model (waits up to 60 s for it).
    async fn template(&self) -> Result<Arc<TensorSet>> {
        let until = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let notified = self.shared.changed.notified();
            if let Some(t) = self.shared.cache().template.clone() {
                return Ok(t);
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(until) => bail!("no client could check a full model download within 60 s"),
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }
}

/// Checks a kept download against the task's digest and remembers the model.
fn check_download(shared: &Shared, task: &pb::RoundTask, delta: bool, bytes: &[u8]) -> Result<()> {
    let global =
        if delta {
            let base =
                shared.cache().globals.get(&task.delta_base_digest).cloned().ok_or_else(|| {
                    anyhow!("delta download of round {}: its base model was never checked", task.round)
                })?;
            let codec: UpdateCodec = task.delta_codec.parse().map_err(|e| anyhow!("delta codec: {e}"))?;
            codec.decode_sparse(bytes, &base).map_err(|e| anyhow!("bad delta: {e}"))?.applied_to(&base)
        } else {
            fl_common::decode_model(bytes).map_err(|e| anyhow!("bad model file: {e}"))?.1
        };
    let digest = tensor_digest(&global);
    if !task.model_digest.is_empty() && digest != task.model_digest {
        bail!("round {}: downloaded model has digest {digest}, the task says {}", task.round, task.model_digest);
    }
    let mut cache = shared.cache();
    if cache.template.is_none() {
        cache.template = Some(Arc::new(global.zeros_like()));
    }
    if cache.globals.len() >= 4 {
        cache.globals.clear();
    }
    cache.globals.insert(digest, Arc::new(global));
    cache.verified += 1;
    Ok(())
}

/// Watches a coordinator process: CPU seconds (user + system), resident memory and open file
/// descriptors, sampled every 100 ms from `/proc`, with named marks and one mark per line that
/// appears in its `metrics.jsonl` (a committed round).
#[derive(Debug)]
pub struct CoordinatorProbe {
    source: ProcSource,
    started: Instant,
    inner: Arc<Mutex<ProbeState>>,
    stop: CancellationToken,
}

#[derive(Debug, Default)]
struct ProbeState {
    marks: Vec<ProbeMark>,
    rounds: Vec<ProbeRound>,
    max_rss_kib: u64,
    max_fds: usize,
    peak_hwm_kib: u64,
}

/// The coordinator at a moment.
#[derive(Clone, Debug, Serialize)]
pub struct ProbeMark {
    /// What happened then.
    pub name: String,
    /// Seconds since the probe started.
    pub at_s: f64,
    /// CPU seconds the process had used.
    pub cpu_s: f64,
    /// Resident memory, KiB.
    pub rss_kib: u64,
    /// Open file descriptors.
    pub fds: usize,
}

/// One committed round, as the probe saw it.
#[derive(Clone, Debug, Serialize)]
pub struct ProbeRound {
    /// The metrics line.
    pub metrics: serde_json::Value,
    /// CPU seconds between the previous commit (or the `joined` mark) and this one.
    pub cpu_s: f64,
    /// The largest resident memory sampled in that interval, KiB.
    pub max_rss_kib: u64,
}

/// What the probe saw in all.
#[derive(Clone, Debug, Serialize)]
pub struct ProbeReport {
    /// The coordinator's pid.
    pub pid: u32,
    /// Peak resident memory (VmHWM), KiB.
    pub peak_rss_kib: u64,
    /// The largest RSS sampled, KiB.
    pub max_rss_kib: u64,
    /// The most open file descriptors sampled.
    pub max_fds: usize,
    /// The marks, in order.
    pub marks: Vec<ProbeMark>,
    /// The committed rounds, in order.
    pub rounds: Vec<ProbeRound>,
}

/// One sample of `/proc/PID`.
#[derive(Clone, Copy, Debug)]
struct Sample {
    cpu_s: f64,
    rss_kib: u64,
    hwm_kib: u64,
    fds: usize,
}

/// Where the samples come from.
#[derive(Clone, Debug)]
struct ProcSource {
    pid: u32,
    ticks_per_s: f64,
}

impl ProcSource {
    fn sample(&self) -> Result<Sample> {
        let pid = self.pid;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // The fields after the command name, which is in parentheses and may hold spaces: the
        // first of them is field 3, so utime and stime (fields 14 and 15) are at 11 and 12.
        let after = stat.rsplit_once(')').map(|(_, rest)| rest).ok_or_else(|| anyhow!("bad /proc/{pid}/stat"))?;
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
        let cpu_s = (ticks(11) + ticks(12)) / self.ticks_per_s;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kib = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0);
        Ok(Sample { cpu_s, rss_kib: kib("VmRSS:"), hwm_kib: kib("VmHWM:"), fds })
    }
}

impl CoordinatorProbe {
    /// Starts watching process `pid`, whose state directory is `state_dir`.
    pub fn start(pid: u32, state_dir: &Path) -> Result<CoordinatorProbe> {
        // SAFETY: sysconf only reads a constant of the system.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        let source = ProcSource { pid, ticks_per_s: if ticks > 0 { ticks as f64 } else { 100.0 } };
        source.sample().with_context(|| format!("reading /proc/{pid}: is the coordinator running?"))?;
        let probe =
            CoordinatorProbe { source, started: Instant::now(), inner: Arc::default(), stop: CancellationToken::new() };
        let (source, inner, stop, started) =
            (probe.source.clone(), probe.inner.clone(), probe.stop.clone(), probe.started);
        let metrics = state_dir.join("metrics.jsonl");
        tokio::spawn(async move {
            let mut seen_lines = 0usize;
            let mut round_start: Option<f64> = None;
            let mut round_rss = 0u64;
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.cancelled() => return,
                }
                let Ok(s) = source.sample() else { continue };
                let lines: Vec<serde_json::Value> = std::fs::read_to_string(&metrics)
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|l| serde_json::from_str(l).ok())
                    .collect();
                let mut state = inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                state.max_rss_kib = state.max_rss_kib.max(s.rss_kib);
                state.max_fds = state.max_fds.max(s.fds);
                state.peak_hwm_kib = state.peak_hwm_kib.max(s.hwm_kib);
                round_rss = round_rss.max(s.rss_kib);
                if round_start.is_none() {
                    round_start = state.marks.iter().find(|m| m.name == "joined").map(|m| m.cpu_s);
                }
                for line in lines.into_iter().skip(seen_lines) {
                    seen_lines += 1;
                    let from = round_start.unwrap_or(s.cpu_s);
                    state.rounds.push(ProbeRound { metrics: line, cpu_s: s.cpu_s - from, max_rss_kib: round_rss });
                    round_start = Some(s.cpu_s);
                    round_rss = s.rss_kib;
                    state.marks.push(ProbeMark {
                        name: format!("committed round {seen_lines}"),
                        at_s: started.elapsed().as_secs_f64(),
                        cpu_s: s.cpu_s,
                        rss_kib: s.rss_kib,
                        fds: s.fds,
                    });
                }
            }
        });
        Ok(probe)
    }

    /// Records the coordinator's CPU, memory and descriptors now, as `name`.
    pub fn mark(&self, name: &str) {
        let Ok(s) = self.source.sample() else { return };
        let at_s = self.started.elapsed().as_secs_f64();
        let mut state = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        state.marks.push(ProbeMark { name: name.to_string(), at_s, cpu_s: s.cpu_s, rss_kib: s.rss_kib, fds: s.fds });
        state.peak_hwm_kib = state.peak_hwm_kib.max(s.hwm_kib);
        state.max_rss_kib = state.max_rss_kib.max(s.rss_kib);
        state.max_fds = state.max_fds.max(s.fds);
    }

    /// What the probe saw so far (with a last sample).
    pub fn report(&self) -> ProbeReport {
        let last = self.source.sample().ok();
        let state = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        ProbeReport {
            pid: self.source.pid,
            peak_rss_kib: state.peak_hwm_kib.max(last.map(|s| s.hwm_kib).unwrap_or(0)),
            max_rss_kib: state.max_rss_kib,
            max_fds: state.max_fds,
            marks: state.marks.clone(),
            rounds: state.rounds.clone(),
        }
    }
}

impl Drop for CoordinatorProbe {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
