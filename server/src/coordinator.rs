//! The coordinator's shared state and its round engine.
//!
//! The engine runs rounds one after another: wait for enough clients, sample, push the round task,
//! collect updates until every sampled client answered or the deadline passed, aggregate,
//! evaluate, checkpoint. The gRPC handlers (`service`) feed it updates through [`Coordinator`].

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use fl_common::tensors::CODEC_SAFETENSORS_F32;
use fl_common::{encode_model, ModelSpec, TensorSet};
use fl_proto::pb;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use tokio::sync::{mpsc, Notify};
use tonic::Status;
use tracing::{info, warn};

use crate::aggregation::{AggregationStrategy, ClientUpdate, FedAvg};
use crate::backend::Evaluator;
use crate::registry::{now_unix, ClientStatus, RegistryStore};
use crate::state::StateDir;

/// Round settings of a serve run.
#[derive(Clone, Debug)]
pub struct RoundSettings {
    /// Total rounds of the federation.
    pub rounds: u32,
    /// Fewest updates that make a round; also the fewest connected clients to start one.
    pub min_clients: usize,
    /// Updates wanted per round; 0 means one from every connected client.
    pub clients_per_round: usize,
    /// Over-sampling factor: sample this many times `clients_per_round` clients and close the
    /// round as soon as `clients_per_round` updates are in (stragglers are then told to stop).
    pub over_sample: f64,
    /// How long a round attempt waits for updates.
    pub round_timeout: Duration,
    /// Local training config sent with each round.
    pub local_epochs: u32,
    /// Batch size.
    pub batch_size: u32,
    /// Learning rate.
    pub lr: f32,
    /// "adam" or "sgd".
    pub optimizer: String,
    /// Base seed; each round derives its own.
    pub seed: u64,
    /// Largest accepted L2 norm of an update's delta.
    pub max_update_norm: f64,
}

/// The global model: the encoded model file (what clients download) and its tensors.
#[derive(Debug)]
pub struct GlobalModel {
    /// Model file bytes (safetensors with the spec).
    pub bytes: Arc<Vec<u8>>,
    /// Weights.
    pub tensors: Arc<TensorSet>,
}

/// A connected client's work stream.
#[derive(Debug)]
struct Connection {
    id: u64,
    tx: mpsc::Sender<Result<pb::Instruction, Status>>,
}

/// The round attempt being collected.
#[derive(Debug)]
pub struct OpenRound {
    /// Round number, from 1.
    pub round: u32,
    /// Attempt number, from 0.
    pub attempt: u32,
    /// The global model of this round.
    pub model: Arc<GlobalModel>,
    task: pb::RoundTask,
    sampled: HashSet<String>,
    accepted: HashSet<String>,
    rejected: HashSet<String>,
    strategy: Box<dyn AggregationStrategy>,
    examples: u64,
    weighted_loss: f64,
    weighted_accuracy: f64,
    bytes_up: u64,
    bytes_down: Arc<AtomicU64>,
    progress: HashMap<String, f32>,
}

/// Why an update is refused.
#[derive(Debug, thiserror::Error)]
pub enum UpdateRefusal {
    /// No round is open, or another one is.
    #[error("stale update: round {round} attempt {attempt} is not open (open: {open})")]
    Stale { round: u32, attempt: u32, open: String },
    /// The client was not sampled for this round.
    #[error("client was not sampled for round {0}")]
    NotSampled(u32),
    /// Already answered.
    #[error("duplicate update for round {0}")]
    Duplicate(u32),
    /// Failed validation.
    #[error("invalid update: {0}")]
    Invalid(String),
}

impl From<UpdateRefusal> for Status {
    fn from(e: UpdateRefusal) -> Status {
        match e {
            UpdateRefusal::Stale { .. } | UpdateRefusal::Duplicate(_) => Status::failed_precondition(e.to_string()),
            UpdateRefusal::NotSampled(_) => Status::permission_denied(e.to_string()),
            UpdateRefusal::Invalid(_) => Status::invalid_argument(e.to_string()),
        }
    }
}

/// State shared by the engine and the gRPC handlers.
#[derive(Debug)]
pub struct Coordinator {
    /// The state directory.
    pub state: StateDir,
    /// Tokens and clients.
    pub registry: RegistryStore,
    /// The federation's model spec.
    pub spec: ModelSpec,
    /// Round settings.
    pub settings: RoundSettings,
    /// The CA, for signing enrollments.
    pub ca: fl_common::tls::CertificateAuthority,
    global: RwLock<Arc<GlobalModel>>,
    connections: Mutex<HashMap<String, Connection>>,
    open: Mutex<Option<OpenRound>>,
    changed: Notify,
    next_connection: AtomicU64,
    completed: std::sync::atomic::AtomicU32,
    finished: AtomicBool,
    /// One update is decoded and folded at a time, so memory holds one update, not one per client.
    pub fold_gate: tokio::sync::Mutex<()>,
}

impl Coordinator {
    /// Shared state for a federation whose last completed round is `completed`, with global
    /// model `global`.
    pub fn new(
        state: StateDir,
        registry: RegistryStore,
        spec: ModelSpec,
        settings: RoundSettings,
        ca: fl_common::tls::CertificateAuthority,
        global: TensorSet,
        completed: u32,
    ) -> Coordinator {
        let model = GlobalModel { bytes: Arc::new(encode_model(&spec, &global)), tensors: Arc::new(global) };
        Coordinator {
            state,
            registry,
            spec,
            settings,
            ca,
            global: RwLock::new(Arc::new(model)),
            connections: Mutex::new(HashMap::new()),
            open: Mutex::new(None),
            changed: Notify::new(),
            next_connection: AtomicU64::new(1),
            completed: std::sync::atomic::AtomicU32::new(completed),
            finished: AtomicBool::new(false),
            fold_gate: tokio::sync::Mutex::new(()),
        }
    }

    /// The current global model.
    pub fn global(&self) -> Arc<GlobalModel> {
        self.global.read().expect("global lock").clone()
    }

    /// Rounds completed so far.
    pub fn completed_rounds(&self) -> u32 {
        self.completed.load(Ordering::SeqCst)
    }

    /// True once all rounds are done.
    pub fn is_finished(&self) -> bool {
        self.finished.load(Ordering::SeqCst)
    }

    /// Registers a client's work stream, replacing an older one of the same client. Returns the
    /// connection id; `disconnect` with it removes exactly this stream.
    pub fn connect(&self, client_id: &str, tx: mpsc::Sender<Result<pb::Instruction, Status>>) -> u64 {
        let id = self.next_connection.fetch_add(1, Ordering::SeqCst);
        // A sampled client that reconnects mid-round (it restarted, or its link dropped) gets
        // the round's task again.
        if let Some(r) = self.open.lock().expect("open round lock").as_ref() {
            if r.sampled.contains(client_id) && !r.accepted.contains(client_id) && !r.rejected.contains(client_id) {
                let task = pb::Instruction { kind: Some(pb::instruction::Kind::Round(r.task.clone())) };
                let _ = tx.try_send(Ok(task));
            }
        }
        self.connections.lock().expect("connections lock").insert(client_id.to_string(), Connection { id, tx });
        self.changed.notify_waiters();
        id
    }

    /// Removes a client's work stream if it is still connection `id`.
    pub fn disconnect(&self, client_id: &str, id: u64) {
        let mut connections = self.connections.lock().expect("connections lock");
        if connections.get(client_id).is_some_and(|c| c.id == id) {
            connections.remove(client_id);
            info!(client = client_id, "client disconnected");
        }
        drop(connections);
        self.changed.notify_waiters();
    }

    fn connected_ids(&self) -> Vec<String> {
        let mut connections = self.connections.lock().expect("connections lock");
        connections.retain(|_, c| !c.tx.is_closed());
        connections.keys().cloned().collect()
    }

    /// Connected clients that may be sampled; the work streams of clients revoked since they
    /// connected are ended with the reason.
    fn eligible_ids(&self) -> Vec<String> {
        let revoked: HashSet<String> = match self.registry.read() {
            Ok(reg) => reg.clients.iter().filter(|c| c.status == ClientStatus::Revoked).map(|c| c.id.clone()).collect(),
            Err(e) => {
                warn!("could not read the client registry: {e}");
                HashSet::new()
            }
        };
        let mut connections = self.connections.lock().expect("connections lock");
        connections.retain(|id, c| {
            if revoked.contains(id) {
                let _ = c.tx.try_send(Err(Status::permission_denied(format!("client {id} is revoked"))));
                info!(client = %id, "dropping the connection of a revoked client");
                return false;
            }
            !c.tx.is_closed()
        });
        connections.keys().cloned().collect()
    }

    /// Checks that `client_id` may fetch the model of (round, attempt); returns the model and
    /// the round's download counter.
    pub fn model_for(
        &self,
        client_id: &str,
        round: u32,
        attempt: u32,
    ) -> Result<(Arc<GlobalModel>, Arc<AtomicU64>), UpdateRefusal> {
        let open = self.open.lock().expect("open round lock");
        let r = self.check_open(open.as_ref(), round, attempt)?;
        if !r.sampled.contains(client_id) {
            return Err(UpdateRefusal::NotSampled(round));
        }
        Ok((r.model.clone(), r.bytes_down.clone()))
    }

    fn check_open<'a>(
        &self,
        open: Option<&'a OpenRound>,
        round: u32,
        attempt: u32,
    ) -> Result<&'a OpenRound, UpdateRefusal> {
        match open {
            Some(r) if r.round == round && r.attempt == attempt => Ok(r),
            other => Err(UpdateRefusal::Stale {
                round,
                attempt,
                open: other
                    .map(|r| format!("round {} attempt {}", r.round, r.attempt))
                    .unwrap_or_else(|| "none".into()),
            }),
        }
    }

    /// Checks that an upload from `client_id` for (round, attempt) may start.
    pub fn check_may_submit(
        &self,
        client_id: &str,
        round: u32,
        attempt: u32,
    ) -> Result<Arc<GlobalModel>, UpdateRefusal> {
        let open = self.open.lock().expect("open round lock");
        let r = self.check_open(open.as_ref(), round, attempt)?;
        if !r.sampled.contains(client_id) {
            return Err(UpdateRefusal::NotSampled(round));
        }
        if r.accepted.contains(client_id) || r.rejected.contains(client_id) {
            return Err(UpdateRefusal::Duplicate(round));
        }
        Ok(r.model.clone())
    }

    /// Records that a client's upload was refused after it started.
    pub fn record_rejection(&self, client_id: &str, round: u32, attempt: u32) {
        let mut open = self.open.lock().expect("open round lock");
        if let Some(r) =
            open.as_mut().filter(|r| r.round == round && r.attempt == attempt && r.sampled.contains(client_id))
        {
            r.rejected.insert(client_id.to_string());
        }
        drop(open);
        self.changed.notify_waiters();
    }

    /// Folds a validated delta into the open round, if it is still open for this client.
    #[allow(clippy::too_many_arguments)]
    pub fn fold(
        &self,
        client_id: &str,
        round: u32,
        attempt: u32,
        delta: &TensorSet,
        num_examples: u64,
        train_loss: f64,
        train_accuracy: f64,
        bytes_up: u64,
    ) -> Result<(), UpdateRefusal> {
        let mut open = self.open.lock().expect("open round lock");
        self.check_open(open.as_ref(), round, attempt)?;
        let r = open.as_mut().expect("checked open");
        if !r.sampled.contains(client_id) {
            return Err(UpdateRefusal::NotSampled(round));
        }
        if r.accepted.contains(client_id) || r.rejected.contains(client_id) {
            return Err(UpdateRefusal::Duplicate(round));
        }
        r.strategy.fold(ClientUpdate { delta, num_examples });
        r.accepted.insert(client_id.to_string());
        r.examples += num_examples;
        r.weighted_loss += train_loss * num_examples as f64;
        r.weighted_accuracy += train_accuracy * num_examples as f64;
        r.bytes_up += bytes_up;
        drop(open);
        self.changed.notify_waiters();
        Ok(())
    }

    /// Records a heartbeat; returns whether the round attempt is still open for this client.
    pub fn heartbeat(&self, client_id: &str, round: u32, attempt: u32, progress: f32) -> bool {
        let mut open = self.open.lock().expect("open round lock");
        match open.as_mut() {
            Some(r) if r.round == round && r.attempt == attempt && r.sampled.contains(client_id) => {
                r.progress.insert(client_id.to_string(), progress.clamp(0.0, 1.0));
                !r.accepted.contains(client_id) && !r.rejected.contains(client_id)
            }
            _ => false,
        }
    }

    /// The Welcome message for a joining client.
    pub fn welcome(&self, client_id: &str) -> pb::Instruction {
        pb::Instruction {
            kind: Some(pb::instruction::Kind::Welcome(pb::Welcome {
                client_id: client_id.to_string(),
                model_spec_json: serde_json::to_string(&self.spec).expect("spec serializes"),
                rounds_total: self.settings.rounds,
                rounds_completed: self.completed_rounds(),
            })),
        }
    }

    /// The message that ends the federation for a client.
    pub fn finished_message(&self) -> pb::Instruction {
        pb::Instruction {
            kind: Some(pb::instruction::Kind::Finished(pb::FederationFinished {
                rounds_completed: self.completed_rounds(),
            })),
        }
    }

    /// Waits until something changed (a join, a leave, an update) or `limit` passed.
    async fn wait_change(&self, limit: Duration) {
        let _ = tokio::time::timeout(limit, self.changed.notified()).await;
    }
}

/// The outcome of one round attempt.
#[derive(Debug)]
struct ClosedRound {
    round: OpenRound,
    started: Instant,
}

/// Runs the remaining rounds; returns when all are done or `shutdown` fires.
pub async fn run_rounds(
    coord: Arc<Coordinator>,
    eval: Option<Arc<dyn Evaluator>>,
    shutdown: tokio_util::sync::CancellationToken,
    elapsed_before: f64,
) -> Result<()> {
    let serving_since = Instant::now();
    let settings = coord.settings.clone();
    let mut rng = rand::rngs::StdRng::from_os_rng();
    while coord.completed_rounds() < settings.rounds {
        let round = coord.completed_rounds() + 1;
        let mut attempt = 0;
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            // Wait for enough clients.
            let mut last_report = Instant::now() - Duration::from_secs(60);
            let connected = loop {
                let ids = coord.eligible_ids();
                if ids.len() >= settings.min_clients {
                    break ids;
                }
                if last_report.elapsed() >= Duration::from_secs(10) {
                    info!(round, connected = ids.len(), needed = settings.min_clients, "waiting for clients");
                    last_report = Instant::now();
                }
                tokio::select! {
                    _ = coord.wait_change(Duration::from_secs(1)) => {}
                    _ = shutdown.cancelled() => return Ok(()),
                }
            };
            let closed = run_attempt(&coord, round, attempt, connected, &mut rng, &shutdown).await;
            let Some(closed) = closed else { return Ok(()) };
            let accepted = closed.round.accepted.len();
            if accepted >= settings.min_clients.max(1) {
                let elapsed = elapsed_before + serving_since.elapsed().as_secs_f64();
                complete_round(&coord, eval.clone(), closed, elapsed).await?;
                break;
            }
            warn!(
                round,
                attempt,
                accepted,
                needed = settings.min_clients,
                "round attempt failed: too few good updates; retrying"
            );
            attempt += 1;
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.cancelled() => return Ok(()),
            }
        }
    }
    Ok(())
}

async fn run_attempt(
    coord: &Arc<Coordinator>,
    round: u32,
    attempt: u32,
    mut connected: Vec<String>,
    rng: &mut rand::rngs::StdRng,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Option<ClosedRound> {
    let settings = &coord.settings;
    connected.shuffle(rng);
    let target = if settings.clients_per_round == 0 {
        connected.len()
    } else {
        settings.clients_per_round.max(settings.min_clients).min(connected.len())
    };
    let k = ((target as f64 * settings.over_sample.max(1.0)).ceil() as usize).min(connected.len());
    connected.truncate(k);
    let sampled: HashSet<String> = connected.into_iter().collect();
    let model = coord.global();
    let mut strategy: Box<dyn AggregationStrategy> = Box::new(FedAvg::default());
    strategy.begin_round(&model.tensors);
    let deadline = Instant::now() + settings.round_timeout;
    let deadline_unix_ms = (std::time::SystemTime::now() + settings.round_timeout)
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let task = pb::RoundTask {
        round,
        attempt,
        config: Some(pb::TrainConfig {
            local_epochs: settings.local_epochs,
            batch_size: settings.batch_size,
            learning_rate: settings.lr,
            optimizer: settings.optimizer.clone(),
            seed: settings.seed.wrapping_mul(1_000_003).wrapping_add(u64::from(round) * 131 + u64::from(attempt)),
        }),
        deadline_unix_ms,
        model_bytes: model.bytes.len() as u64,
        model_codec: CODEC_SAFETENSORS_F32.to_string(),
        update_codecs: vec![CODEC_SAFETENSORS_F32.to_string()],
    };
    *coord.open.lock().expect("open round lock") = Some(OpenRound {
        round,
        attempt,
        model,
        task: task.clone(),
        sampled: sampled.clone(),
        accepted: HashSet::new(),
        rejected: HashSet::new(),
        strategy,
        examples: 0,
        weighted_loss: 0.0,
        weighted_accuracy: 0.0,
        bytes_up: 0,
        bytes_down: Arc::new(AtomicU64::new(0)),
        progress: HashMap::new(),
    });
    let started = Instant::now();
    info!(round, attempt, sampled = sampled.len(), "round started");
    for client in &sampled {
        let tx = coord.connections.lock().expect("connections lock").get(client).map(|c| c.tx.clone());
        let message = pb::Instruction { kind: Some(pb::instruction::Kind::Round(task.clone())) };
        if let Some(tx) = tx {
            if tx.send(Ok(message)).await.is_err() {
                warn!(client, round, "could not send the round task; client is gone");
            }
        }
    }
    loop {
        let (answered, accepted, gone) = {
            let open = coord.open.lock().expect("open round lock");
            let r = open.as_ref().expect("round is open");
            let answered = r.accepted.len() + r.rejected.len();
            let accepted = r.accepted.len();
            let connected: HashSet<String> = coord.connected_ids().into_iter().collect();
            let gone = r
                .sampled
                .iter()
                .filter(|c| !connected.contains(*c) && !r.accepted.contains(*c) && !r.rejected.contains(*c))
                .count();
            (answered, accepted, gone)
        };
        // Closes when every sampled client answered, when enough updates are in (over-sampling),
        // or when every client that did not answer is gone.
        if answered == sampled.len()
            || (k > target && accepted >= target)
            || (gone > 0 && answered + gone == sampled.len() && answered >= coord.settings.min_clients)
        {
            break;
        }
        let now = Instant::now();
        if now >= deadline {
            // Say how far the clients that did not answer got, from their heartbeats.
            let stragglers: Vec<String> = {
                let open = coord.open.lock().expect("open round lock");
                let r = open.as_ref().expect("round is open");
                r.sampled
                    .iter()
                    .filter(|c| !r.accepted.contains(*c) && !r.rejected.contains(*c))
                    .map(|c| match r.progress.get(c) {
                        Some(p) => format!("{c}:{:.0}%", p * 100.0),
                        None => format!("{c}:silent"),
                    })
                    .collect()
            };
            info!(
                round,
                attempt,
                answered,
                wanted = target,
                sampled = sampled.len(),
                stragglers = stragglers.join(","),
                "round deadline reached"
            );
            break;
        }
        tokio::select! {
            _ = coord.wait_change((deadline - now).min(Duration::from_secs(1))) => {}
            _ = shutdown.cancelled() => {
                coord.open.lock().expect("open round lock").take();
                return None;
            }
        }
    }
    let round_state = coord.open.lock().expect("open round lock").take().expect("round is open");
    Some(ClosedRound { round: round_state, started })
}

#[derive(serde::Serialize)]
struct MetricsLine {
    round: u32,
    attempt: u32,
    accuracy: Option<f64>,
    loss: Option<f64>,
    client_accuracy: f64,
    client_loss: f64,
    participants: usize,
    sampled: usize,
    rejected: usize,
    examples: u64,
    bytes_up: u64,
    bytes_down: u64,
    round_s: f64,
    elapsed_s: f64,
}

async fn complete_round(
    coord: &Arc<Coordinator>,
    eval: Option<Arc<dyn Evaluator>>,
    closed: ClosedRound,
    elapsed_s: f64,
) -> Result<()> {
    let ClosedRound { mut round, started } = closed;
    let global = round.model.tensors.clone();
    let mut strategy = std::mem::replace(&mut round.strategy, Box::new(FedAvg::default()));
    let (next, evaluation) = tokio::task::spawn_blocking(move || -> Result<_> {
        let next = strategy.finish(&global).context("no update was folded")?;
        let evaluation = match eval {
            Some(e) => Some(e.evaluate(&next)?),
            None => None,
        };
        Ok((next, evaluation))
    })
    .await??;
    let bytes = encode_model(&coord.spec, &next);
    let participants = round.accepted.len();
    let examples = round.examples.max(1) as f64;
    let line = MetricsLine {
        round: round.round,
        attempt: round.attempt,
        accuracy: evaluation.map(|e| e.accuracy),
        loss: evaluation.map(|e| e.loss),
        client_accuracy: round.weighted_accuracy / examples,
        client_loss: round.weighted_loss / examples,
        participants,
        sampled: round.sampled.len(),
        rejected: round.rejected.len(),
        examples: round.examples,
        bytes_up: round.bytes_up,
        bytes_down: round.bytes_down.load(Ordering::SeqCst),
        round_s: started.elapsed().as_secs_f64(),
        elapsed_s,
    };
    let state = coord.state.clone();
    let json = serde_json::to_string(&line)?;
    let round_no = round.round;
    let bytes = Arc::new(bytes);
    let to_write = bytes.clone();
    tokio::task::spawn_blocking(move || state.commit_round(round_no, &to_write, &json, elapsed_s)).await??;
    *coord.global.write().expect("global lock") = Arc::new(GlobalModel { bytes, tensors: Arc::new(next) });
    coord.completed.store(round_no, Ordering::SeqCst);
    let joined: HashSet<String> = round.accepted.clone();
    let now = now_unix();
    if let Err(e) = coord.registry.update(|reg| {
        for c in reg.clients.iter_mut().filter(|c| joined.contains(&c.id)) {
            c.rounds_joined += 1;
            c.last_seen_unix = now;
        }
    }) {
        warn!("could not update the client registry: {e}");
    }
    info!(
        round = round_no,
        participants,
        accuracy = line.accuracy.map(|a| format!("{a:.4}")).unwrap_or_else(|| "n/a".into()),
        client_accuracy = format!("{:.4}", line.client_accuracy),
        seconds = format!("{:.2}", line.round_s),
        "round completed"
    );
    Ok(())
}

/// Ends the federation: writes the final model and tells every connected client.
pub async fn finish(coord: &Arc<Coordinator>) -> Result<()> {
    let global = coord.global();
    let path = coord.state.final_model_path();
    let bytes = global.bytes.clone();
    tokio::task::spawn_blocking(move || fl_common::files::write_atomic(&path, &bytes, 0o644)).await??;
    coord.finished.store(true, Ordering::SeqCst);
    let senders: Vec<_> = coord.connections.lock().expect("connections lock").values().map(|c| c.tx.clone()).collect();
    for tx in senders {
        let _ = tx.send(Ok(coord.finished_message())).await;
    }
    info!(rounds = coord.completed_rounds(), model = %coord.state.final_model_path().display(), "federation finished");
    Ok(())
}

/// Waits up to `limit` for all clients to disconnect after the end.
pub async fn drain(coord: &Arc<Coordinator>, limit: Duration) {
    let until = Instant::now() + limit;
    while Instant::now() < until && !coord.connected_ids().is_empty() {
        coord.wait_change(Duration::from_millis(100)).await;
    }
}
