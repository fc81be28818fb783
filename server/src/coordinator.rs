//! The round engine and the state it shares with the gRPC handlers.
//!
//! [`run_rounds`] runs the rounds one after another: wait until enough clients are connected
//! ([`policy::should_start`]), sample ([`policy::sample`]), push the round task, collect updates
//! until [`policy::should_close`] closes the attempt, then aggregate, evaluate and checkpoint,
//! or retry the round when too few updates came in. The decisions are the pure functions of
//! [`crate::policy`]; this module does the I/O and the waiting around them.
//!
//! The gRPC handlers ([`crate::service`]) call the [`Coordinator`] and get typed answers
//! ([`UpdateRefusal`]); they never see the round state. That state is a [`Phase`] behind a
//! mutex that is held only for bookkeeping: never across an await, a fold or I/O, and a lock
//! that a panic poisoned is simply taken over, so no RPC can be locked out. Each attempt's
//! running sum has its own async mutex: it lets one update at a time be decoded and folded (so
//! memory holds one update, not one per client), on a blocking thread, while heartbeats and
//! model downloads go on. A fold that panics marks that sum as damaged and fails the attempt,
//! which is then retried.
//!
//! Nothing here knows the wire types: the handlers convert `pb` messages to and from
//! [`RoundTask`], [`WorkItem`] and [`UpdateHeader`].

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock};
use std::time::Duration;

use anyhow::{Context, Result};
use fl_common::codec::{tensor_digest, CodecError, SparseDelta, UpdateCodec};
use fl_common::tensors::{TensorError, CODEC_SAFETENSORS_F32};
use fl_common::{encode_model, ModelSpec, TensorSet};
use rand::SeedableRng;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::aggregation::{AggregationStrategy, ClientUpdate, FedAvg, StrategyRuntime};
use crate::backend::Evaluator;
use crate::dp::{Budget, DpFedAvg, DpLedger};
use crate::long_run::{BestRound, LongRunArgs};
use crate::policy::{self, Close, RoundView};
use crate::registry::{now_unix, RegistryStore};
use crate::secagg::{SecAggAttempt, SecAggConfig, SecAggTask};
use crate::state::{self, CoordinatorStatus, StateDir};

mod async_mode;
mod in_process;
pub use in_process::{InProcessFederation, Opened};

/// The longest a round's commit waits for the next round's downloads
/// ([`Coordinator::wait_for_next_downloads`]).
const COMMIT_DEFER: Duration = Duration::from_secs(1);

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
    /// Update codecs accepted, most preferred first (`--update-codec`); empty means
    /// `safetensors-f32`. The first also chooses how clients download deltas
    /// ([`UpdateCodec::for_download`]; none for `safetensors-f32`).
    pub update_codecs: Vec<UpdateCodec>,
    /// Attempts in a row in which every sampled client's training failed for the same reasons
    /// after which the federation stops (committed rounds are kept).
    pub max_failed_attempts: u32,
    /// The learning-rate schedule and early stopping.
    pub long_run: LongRunArgs,
}

impl RoundSettings {
    /// The accepted update codecs, most preferred first.
    pub fn accepted_codecs(&self) -> Vec<UpdateCodec> {
        if self.update_codecs.is_empty() {
            vec![UpdateCodec::EXACT]
        } else {
            self.update_codecs.clone()
        }
    }

    /// The codec of delta downloads, if clients download deltas.
    pub fn download_codec(&self) -> Option<UpdateCodec> {
        self.update_codecs.first().filter(|c| **c != UpdateCodec::EXACT).map(UpdateCodec::for_download)
    }
}

/// The global model: its tensors, their digest, and the model file clients without the previous
/// model download (safetensors with the spec). The file of a round's model is built when first
/// needed (the round's commit, a full download), not on the round's critical path.
#[derive(Debug)]
pub struct GlobalModel {
    /// Weights.
    pub tensors: Arc<TensorSet>,
    /// [`tensor_digest`] of the weights.
    pub digest: String,
    /// The aggregate that made this model from the previous one, for delta downloads.
    pub delta: Option<Arc<crate::delta::ModelDelta>>,
    spec: ModelSpec,
    file: OnceLock<Arc<Vec<u8>>>,
    file_len: usize,
}

impl GlobalModel {
    /// Encodes `tensors` as a model file of `spec`. Blocking: it copies the whole model.
    pub fn encode(spec: &ModelSpec, tensors: TensorSet) -> GlobalModel {
        let bytes = encode_model(spec, &tensors);
        GlobalModel {
            file_len: bytes.len(),
            file: OnceLock::from(Arc::new(bytes)),
            digest: tensor_digest(&tensors),
            tensors: Arc::new(tensors),
            spec: spec.clone(),
            delta: None,
        }
    }

    /// The model after `base`, with the same spec, names and shapes (so a model file of the
    /// same length), and the aggregate that made it; its file is built when first needed.
    /// Blocking: it hashes the whole model.
    pub fn after(base: &GlobalModel, tensors: TensorSet, delta: Option<Arc<crate::delta::ModelDelta>>) -> GlobalModel {
        debug_assert!(tensors.check_matches(&base.tensors).is_ok(), "the next model has the same tensors");
        GlobalModel {
            digest: tensor_digest(&tensors),
            tensors: Arc::new(tensors),
            delta,
            spec: base.spec.clone(),
            file: OnceLock::new(),
            file_len: base.file_len,
        }
    }

    /// The model file's length in bytes.
    pub fn file_len(&self) -> usize {
        self.file_len
    }

    /// The model file. Blocking: the first caller builds it (a copy of the whole model), and
    /// one that comes meanwhile waits for it.
    pub fn file(&self) -> Arc<Vec<u8>> {
        let bytes = self.file.get_or_init(|| Arc::new(encode_model(&self.spec, &self.tensors)));
        debug_assert_eq!(bytes.len(), self.file_len);
        bytes.clone()
    }

    /// [`GlobalModel::file`] on a blocking thread, unless it is built already.
    pub async fn file_async(self: &Arc<Self>) -> Result<Arc<Vec<u8>>, tokio::task::JoinError> {
        if let Some(bytes) = self.file.get() {
            return Ok(bytes.clone());
        }
        let model = self.clone();
        tokio::task::spawn_blocking(move || model.file()).await
    }
}

/// The task of a round attempt, as sent to each sampled client.
#[derive(Clone, Debug, PartialEq)]
pub struct RoundTask {
    /// Round number, from 1.
    pub round: u32,
    /// Attempt number, from 0.
    pub attempt: u32,
    /// Local epochs.
    pub local_epochs: u32,
    /// Local batch size.
    pub batch_size: u32,
    /// Local learning rate.
    pub learning_rate: f32,
    /// Local optimizer.
    pub optimizer: String,
    /// Seed of the local training.
    pub seed: u64,
    /// When the attempt closes, in Unix milliseconds.
    pub deadline_unix_ms: u64,
    /// Size of the global model file.
    pub model_bytes: u64,
    /// Codec of the global model.
    pub model_codec: String,
    /// Codecs accepted for updates.
    pub update_codecs: Vec<String>,
    /// The clip norm clients apply to their update, when DP clips on the client.
    pub dp_clip_norm: Option<f64>,
    /// [`tensor_digest`] of the global model.
    pub model_digest: String,
    /// The delta download on offer: base digest, codec name, bytes.
    pub delta: Option<(String, String, u64)>,
    /// Secure aggregation of this attempt, when it is on.
    pub secagg: Option<SecAggTask>,
    /// μ of the proximal term clients add to their loss (FedProx); 0 for none.
    pub proximal_mu: f64,
    /// The teacher clients distill from (`--distill-from`), when the federation distills.
    pub distill: Option<Arc<fl_proto::pb::DistillTask>>,
}

/// What the engine sends down a client's work stream.
#[derive(Clone, Debug, PartialEq)]
pub enum WorkItem {
    /// Train this round.
    Round(Arc<RoundTask>),
    /// The federation is over.
    Finished {
        /// Rounds completed.
        rounds_completed: u32,
    },
    /// The operator revoked this client: the stream ends with this refusal.
    Revoked {
        /// The client.
        client_id: String,
    },
}

/// The sending half of a client's work stream.
pub type WorkSender = mpsc::Sender<WorkItem>;

/// The header of an upload, as the engine checks it.
#[derive(Clone, Debug, PartialEq)]
pub struct UpdateHeader {
    /// Round of the update.
    pub round: u32,
    /// Attempt of the update.
    pub attempt: u32,
    /// Codec of the payload.
    pub codec: String,
    /// Declared payload size.
    pub total_bytes: u64,
    /// Examples the client trained on.
    pub num_examples: u64,
    /// Mean local training loss.
    pub train_loss: f64,
    /// Local training accuracy.
    pub train_accuracy: f64,
    /// Seconds of local training.
    pub train_s: f64,
    /// A personalising client's accuracies on its held-out split (`crate::personal`).
    pub local_eval: Option<crate::personal::LocalEvaluation>,
    /// The client trained with the round's distillation teacher.
    pub distilled: bool,
}

impl UpdateHeader {
    /// Checks the header of an update to a model of `model_bytes` bytes, before any data: its
    /// codec must be one of `accepted`.
    pub fn check(&self, model_bytes: usize, accepted: &[UpdateCodec]) -> Result<(), InvalidUpdate> {
        if !self.codec.parse::<UpdateCodec>().is_ok_and(|c| accepted.contains(&c)) {
            return Err(InvalidUpdate::UnsupportedCodec(self.codec.clone()));
        }
        if !self.train_s.is_finite() || self.train_s < 0.0 {
            return Err(InvalidUpdate::NonFiniteMetrics);
        }
        let limit = model_bytes as u64 + (1 << 20);
        if self.total_bytes > limit {
            return Err(InvalidUpdate::TooLarge { bytes: self.total_bytes, limit });
        }
        if self.num_examples == 0 {
            return Err(InvalidUpdate::NoExamples);
        }
        if !self.train_loss.is_finite() || !self.train_accuracy.is_finite() {
            return Err(InvalidUpdate::NonFiniteMetrics);
        }
        self.local_eval.as_ref().map_or(Ok(()), |e| e.check())
    }
}

/// Why an update is invalid: the client's fault, reported back to it.
#[derive(Debug, thiserror::Error)]
pub enum InvalidUpdate {
    /// A codec the coordinator does not read, or does not accept in this federation.
    #[error("unsupported codec '{0}' (not in the round task's update_codecs)")]
    UnsupportedCodec(String),
    /// Declared size above the limit.
    #[error("upload of {bytes} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// Declared.
        bytes: u64,
        /// Allowed.
        limit: u64,
    },
    /// Zero examples cannot be weighted.
    #[error("update reports 0 examples")]
    NoExamples,
    /// NaN or infinite loss or accuracy.
    #[error("non-finite training metrics")]
    NonFiniteMetrics,
    /// The client's stream failed.
    #[error("upload broke off: {0}")]
    BrokeOff(String),
    /// Data after the trailer.
    #[error("data after the trailer")]
    DataAfterTrailer,
    /// A chunk not at the next offset.
    #[error("chunk out of order: offset {offset} after {received} bytes")]
    OutOfOrder {
        /// Offset of the chunk.
        offset: u64,
        /// Bytes received before it.
        received: u64,
    },
    /// A chunk above the chunk limit.
    #[error("chunk of {0} bytes exceeds {max}", max = crate::service::MAX_UPLOAD_CHUNK_BYTES)]
    ChunkTooLarge(usize),
    /// More data than declared.
    #[error("upload exceeds its declared {0} bytes")]
    LongerThanDeclared(u64),
    /// Two trailers.
    #[error("second trailer")]
    SecondTrailer,
    /// Two headers.
    #[error("second header")]
    SecondHeader,
    /// A chunk with nothing in it.
    #[error("empty chunk")]
    EmptyChunk,
    /// The stream ended without a trailer.
    #[error("truncated upload: no trailer after {received} of {total} bytes")]
    NoTrailer {
        /// Received.
        received: u64,
        /// Declared.
        total: u64,
    },
    /// Fewer bytes than declared.
    #[error("truncated upload: {received} of {total} bytes")]
    Truncated {
        /// Received.
        received: u64,
        /// Declared.
        total: u64,
    },
    /// The digest in the trailer does not match.
    #[error("SHA-256 of the payload does not match the trailer")]
    DigestMismatch,
    /// The payload does not decode, or does not fit the model.
    #[error(transparent)]
    Tensors(#[from] TensorError),
    /// The payload of a sparse or quantized codec is malformed.
    #[error("malformed update payload: {0}")]
    Codec(#[from] CodecError),
    /// Delta too large.
    #[error("L2 norm {norm:.3} exceeds the bound {bound}")]
    NormTooLarge {
        /// The delta's norm.
        norm: f64,
        /// `--max-update-norm`.
        bound: f64,
    },
    /// The spooled payload could not be read back.
    #[error("reading the spooled upload: {0}")]
    SpoolRead(std::io::Error),
    /// A personalising client's local evaluation is out of range.
    #[error("bad local evaluation: {0}")]
    BadLocalEvaluation(String),
}

/// Why an update (or a model download) is refused.
#[derive(Debug, thiserror::Error)]
pub enum UpdateRefusal {
    /// No round is open, or another one is.
    #[error("stale update: round {round} attempt {attempt} is not open (open: {open})")]
    Stale {
        /// Round asked for.
        round: u32,
        /// Attempt asked for.
        attempt: u32,
        /// What is open instead.
        open: String,
    },
    /// The client was not sampled for this round.
    #[error("client was not sampled for round {0}")]
    NotSampled(u32),
    /// Already answered.
    #[error("duplicate update for round {0}")]
    Duplicate(u32),
    /// Failed validation.
    #[error("invalid update: {0}")]
    Invalid(#[from] InvalidUpdate),
    /// The fold itself failed (a bug): the attempt is failed and retried.
    #[error("the update could not be folded: {0}")]
    FoldFailed(String),
    /// The round uses secure aggregation: a plain update would show the coordinator the delta.
    #[error("round {0} uses secure aggregation: the update goes through the SecAgg stages, not SubmitUpdate")]
    SecureAggregationOnly(u32),
}

impl InvalidUpdate {
    /// A short name of the kind of defect, for counting (`fl_updates_refused_total{reason}`).
    pub fn reason(&self) -> &'static str {
        match self {
            InvalidUpdate::UnsupportedCodec(_) => "unsupported_codec",
            InvalidUpdate::TooLarge { .. } => "too_large",
            InvalidUpdate::NoExamples => "no_examples",
            InvalidUpdate::NonFiniteMetrics => "non_finite_metrics",
            InvalidUpdate::BrokeOff(_) => "broke_off",
            InvalidUpdate::DataAfterTrailer
            | InvalidUpdate::OutOfOrder { .. }
            | InvalidUpdate::ChunkTooLarge(_)
            | InvalidUpdate::LongerThanDeclared(_)
            | InvalidUpdate::SecondTrailer
            | InvalidUpdate::SecondHeader
            | InvalidUpdate::EmptyChunk => "malformed_stream",
            InvalidUpdate::NoTrailer { .. } | InvalidUpdate::Truncated { .. } => "truncated",
            InvalidUpdate::DigestMismatch => "digest_mismatch",
            InvalidUpdate::Tensors(_) => "bad_tensors",
            InvalidUpdate::Codec(_) => "bad_payload",
            InvalidUpdate::NormTooLarge { .. } => "norm_too_large",
            InvalidUpdate::SpoolRead(_) => "spool_read",
            InvalidUpdate::BadLocalEvaluation(_) => "bad_local_evaluation",
        }
    }
}

impl UpdateRefusal {
    /// A short name of the reason, for counting: `stale`, `not_sampled`, `duplicate`,
    /// `fold_failed`, or the defect of an invalid update ([`InvalidUpdate::reason`]).
    pub fn reason(&self) -> &'static str {
        match self {
            UpdateRefusal::Stale { .. } => "stale",
            UpdateRefusal::NotSampled(_) => "not_sampled",
            UpdateRefusal::Duplicate(_) => "duplicate",
            UpdateRefusal::Invalid(why) => why.reason(),
            UpdateRefusal::FoldFailed(_) => "fold_failed",
            UpdateRefusal::SecureAggregationOnly(_) => "secure_aggregation",
        }
    }
}

/// The running sum of an attempt and what it counts.
#[derive(Debug)]
struct Accumulator {
    strategy: Box<dyn AggregationStrategy>,
    folded: Vec<String>,
    examples: u64,
    weighted_loss: f64,
    weighted_accuracy: f64,
    bytes_up: u64,
    /// The slowest participant's local training seconds.
    train_s: f64,
    /// Set while a fold runs; still set after a fold that panicked: the sum is then damaged.
    folding: bool,
    /// Secure aggregation's counts: masked, dropped, recovered.
    secagg: Option<(usize, usize, usize)>,
    /// The personalising clients' local evaluations.
    local_evals: Vec<crate::personal::LocalEvaluation>,
    /// Folded updates whose client distilled.
    distilled: usize,
    /// `--mode async`: the staleness of the folded updates, and the ones refused as too stale.
    buffered: Option<crate::aggregation::buffered::StepStaleness>,
}

impl Accumulator {
    /// Folds a decoded update and counts it, on a blocking thread; a failed fold (a robust
    /// strategy's spool on a full disk) leaves the sum as it was.
    fn add(
        &mut self,
        client: String,
        delta: Values<'_>,
        header: &UpdateHeader,
        bytes: u64,
    ) -> Result<(), crate::aggregation::AggregationError> {
        let num_examples = header.num_examples;
        self.folding = true;
        let result = match delta {
            Values::Dense(delta) => self.strategy.try_fold(ClientUpdate { delta, num_examples }),
            Values::Sparse(delta, reference) => self.strategy.try_fold_sparse(delta, num_examples, reference),
        };
        self.folding = false;
        result?;
        self.folded.push(client);
        self.examples += num_examples;
        self.weighted_loss += header.train_loss * num_examples as f64;
        self.weighted_accuracy += header.train_accuracy * num_examples as f64;
        self.bytes_up += bytes;
        self.train_s = self.train_s.max(header.train_s);
        self.local_evals.extend(header.local_eval);
        self.distilled += usize::from(header.distilled);
        Ok(())
    }
}

/// An update's values as folded: dense, or as decoded with the model they are relative to.
enum Values<'a> {
    Dense(&'a TensorSet),
    Sparse(&'a SparseDelta, &'a TensorSet),
}

/// Reads a spooled upload, decodes its delta against `reference` and checks it (names, shapes,
/// finite values, the L2 bound), on a blocking thread. The delta stays as decoded: a sparse
/// codec's carries only its kept values ([`SparseDelta`]).
async fn decode_update(
    codec: UpdateCodec,
    path: PathBuf,
    reference: Arc<TensorSet>,
    max_norm: f64,
) -> Result<SparseDelta, UpdateRefusal> {
    tokio::task::spawn_blocking(move || -> Result<SparseDelta, InvalidUpdate> {
        let bytes = std::fs::read(&path).map_err(InvalidUpdate::SpoolRead)?;
        // Names, shapes and finite values are checked as it decodes.
        let delta = codec.decode_sparse(&bytes, &reference)?;
        let norm = delta.l2_norm();
        if norm > max_norm {
            return Err(InvalidUpdate::NormTooLarge { norm, bound: max_norm });
        }
        Ok(delta)
    })
    .await
    .map_err(|e| UpdateRefusal::FoldFailed(format!("decoding: {e}")))
    .and_then(|d| d.map_err(UpdateRefusal::from))
}

/// The bookkeeping of the attempt being collected.
#[derive(Debug)]
struct RoundBook {
    task: Arc<RoundTask>,
    model: Arc<GlobalModel>,
    target: usize,
    deadline: Instant,
    started: Instant,
    sampled: HashSet<String>,
    accepted: HashSet<String>,
    rejected: HashSet<String>,
    /// Clients whose local training failed, with the reason they reported.
    training_failures: HashMap<String, String>,
    progress: HashMap<String, f32>,
    sum: Arc<tokio::sync::Mutex<Accumulator>>,
    bytes_down: Arc<AtomicU64>,
    /// Sampled clients that have downloaded the attempt's model ([`Coordinator::note_download`]).
    downloaded: HashSet<String>,
    secagg: Option<Arc<SecAggAttempt>>,
}

impl RoundBook {
    fn view<'a>(&'a self, connected: &'a HashSet<String>, min_clients: usize) -> RoundView<'a> {
        RoundView {
            sampled: &self.sampled,
            accepted: &self.accepted,
            rejected: &self.rejected,
            connected,
            target: self.target,
            min_clients,
            deadline: self.deadline,
        }
    }

    fn has_answered(&self, client: &str) -> bool {
        self.accepted.contains(client) || self.rejected.contains(client)
    }

    /// Checks that `client` may still answer this attempt.
    fn check_may_answer(&self, client: &str) -> Result<(), UpdateRefusal> {
        if !self.sampled.contains(client) {
            return Err(UpdateRefusal::NotSampled(self.task.round));
        }
        if self.has_answered(client) {
            return Err(UpdateRefusal::Duplicate(self.task.round));
        }
        Ok(())
    }
}

/// Where the engine is; the round book lives in `Collecting`.
#[derive(Debug)]
enum Phase {
    Waiting { round: u32, attempt: u32 },
    Collecting(Box<RoundBook>),
    Aggregating { round: u32, attempt: u32, sampled: Vec<String>, accepted: Vec<String>, rejected: Vec<String> },
    Finished { round: u32, attempt: u32 },
}

impl Phase {
    fn collecting(&self, round: u32, attempt: u32) -> Result<&RoundBook, UpdateRefusal> {
        match self {
            Phase::Collecting(book) if book.task.round == round && book.task.attempt == attempt => Ok(book),
            other => Err(UpdateRefusal::Stale { round, attempt, open: other.describe_open() }),
        }
    }

    fn collecting_mut(&mut self, round: u32, attempt: u32) -> Result<&mut RoundBook, UpdateRefusal> {
        self.collecting(round, attempt)?;
        match self {
            Phase::Collecting(book) => Ok(book),
            _ => unreachable!("checked above"),
        }
    }

    fn describe_open(&self) -> String {
        match self {
            Phase::Collecting(book) => format!("round {} attempt {}", book.task.round, book.task.attempt),
            _ => "none".into(),
        }
    }
}

/// A connected client's work stream.
#[derive(Debug)]
struct Connection {
    id: u64,
    tx: WorkSender,
}

/// What an upload may start with: the attempt's global model and running sum.
#[derive(Debug, Clone)]
pub struct UploadTicket {
    /// The global model the delta is relative to.
    pub model: Arc<GlobalModel>,
    sum: Arc<tokio::sync::Mutex<Accumulator>>,
}

/// A fully received upload, spooled to a file.
#[derive(Debug)]
pub struct SpooledUpload {
    /// The header.
    pub header: UpdateHeader,
    /// The spooled payload.
    pub path: PathBuf,
    /// Payload bytes received.
    pub bytes: u64,
}

/// Takes a lock that a panic elsewhere may have poisoned: the data behind it is bookkeeping
/// that every step leaves consistent, so the panic of one task must not lock out the others.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// State shared by the engine and the gRPC handlers.
#[derive(Debug)]
pub struct Coordinator {
    /// The state directory.
    pub state: StateDir,
    /// Tokens and clients; read from memory, refreshed by [`watch_registry`].
    pub registry: Arc<RegistryStore>,
    /// The federation's model spec.
    pub spec: ModelSpec,
    /// Round settings.
    pub settings: RoundSettings,
    /// The CA, for signing enrollments.
    pub ca: fl_common::tls::CertificateAuthority,
    global: RwLock<Arc<GlobalModel>>,
    connections: Mutex<HashMap<String, Connection>>,
    phase: Mutex<Phase>,
    changed: Notify,
    status: watch::Sender<CoordinatorStatus>,
    last_failure: Mutex<Option<String>>,
    /// Updates refused since the start, by reason.
    refused: Mutex<std::collections::BTreeMap<String, u64>>,
    /// The last upload of the open attempt that could not be stored, for its failure reason.
    attempt_error: Mutex<Option<String>>,
    failed_attempts: AtomicU32,
    failed_handshakes: AtomicU64,
    next_connection: AtomicU64,
    /// Rounds committed (model, metrics line and progress on disk).
    completed: AtomicU32,
    /// Rounds aggregated: their global model is known and the next round may open; at most one
    /// more than `completed` while that round's commit runs in the background.
    aggregated: AtomicU32,
    /// The background commit of the last aggregated round, if it may still run (see
    /// [`complete_round`]).
    pending_commit: tokio::sync::Mutex<Option<tokio::task::JoinHandle<Result<()>>>>,
    finished: AtomicBool,
    new_strategy: fn() -> Box<dyn AggregationStrategy>,
    strategy: Option<Arc<StrategyRuntime>>,
    dp: Option<DpState>,
    budget_exhausted: AtomicBool,
    /// What top-k delta downloads have not sent of the aggregates yet (see [`crate::delta`]).
    download_feedback: Mutex<Arc<fl_common::codec::ErrorFeedback>>,
    secagg: Option<(SecAggConfig, fl_common::secagg::QuantizationPlan)>,
    best: Mutex<BestRound>,
    early_stopped: AtomicBool,
    /// The teacher of federated distillation (see [`crate::distill`]).
    pub(crate) distill: Option<Arc<crate::distill::Teacher>>,
    /// `--mode async`: the clients' outstanding tasks (see [`async_mode`]).
    async_engine: Option<async_mode::AsyncEngine>,
}

fn fed_avg() -> Box<dyn AggregationStrategy> {
    Box::new(FedAvg::default())
}

/// Differential privacy of a federation: its ledger and the strategy each attempt copies.
#[derive(Debug)]
struct DpState {
    ledger: Mutex<DpLedger>,
    strategy: DpFedAvg,
}

impl Coordinator {
    /// Shared state for a federation whose last completed round is `completed`, with global
    /// model `global`.
    pub fn new(
        state: StateDir,
        registry: Arc<RegistryStore>,
        spec: ModelSpec,
        settings: RoundSettings,
        ca: fl_common::tls::CertificateAuthority,
        global: GlobalModel,
        completed: u32,
    ) -> Coordinator {
        let (status, _) = watch::channel(CoordinatorStatus::default());
        let coord = Coordinator {
            state,
            registry,
            spec,
            global: RwLock::new(Arc::new(global)),
            connections: Mutex::new(HashMap::new()),
            phase: Mutex::new(Phase::Waiting { round: completed + 1, attempt: 0 }),
            changed: Notify::new(),
            status,
            last_failure: Mutex::new(None),
            refused: Mutex::new(std::collections::BTreeMap::new()),
            attempt_error: Mutex::new(None),
            failed_attempts: AtomicU32::new(0),
            failed_handshakes: AtomicU64::new(0),
            next_connection: AtomicU64::new(1),
            completed: AtomicU32::new(completed),
            aggregated: AtomicU32::new(completed),
            pending_commit: tokio::sync::Mutex::new(None),
            finished: AtomicBool::new(false),
            new_strategy: fed_avg,
            strategy: None,
            dp: None,
            budget_exhausted: AtomicBool::new(false),
            download_feedback: Mutex::new(Default::default()),
            secagg: None,
            best: Mutex::new(BestRound::default()),
            early_stopped: AtomicBool::new(false),
            distill: None,
            async_engine: None,
            settings,
            ca,
        };
        coord.publish();
        coord
    }

    /// Turns on differential privacy: `strategy` (made for the ledger's configuration) is the
    /// template of each attempt's aggregation, and `ledger` is charged for each round.
    pub fn with_dp(mut self, ledger: DpLedger, strategy: DpFedAvg) -> Coordinator {
        self.dp = Some(DpState { ledger: Mutex::new(ledger), strategy });
        self
    }

    /// Turns on secure aggregation. Refused with a strategy that needs individual updates
    /// ([`AggregationStrategy::supports_secure_sum`]: the robust ones), and with differential
    /// privacy that clips on the coordinator, which cannot see the updates it would clip.
    pub fn with_secagg(mut self, config: SecAggConfig) -> Result<Coordinator> {
        if let Some(dp) = &self.dp {
            if !dp.strategy.supports_secure_sum() {
                anyhow::bail!(crate::secagg::DP_NEEDS_CLIENT_CLIP);
            }
        }
        if let Some(runtime) = &self.strategy {
            runtime.config().check_secure_aggregation()?;
        }
        let strategy = match &self.strategy {
            Some(runtime) => runtime.attempt_strategy(None),
            None => (self.new_strategy)(),
        };
        if !strategy.supports_secure_sum() {
            anyhow::bail!(
                "--secure-aggregation: the aggregation strategy {} needs each client's update, which secure aggregation hides; use fedavg, fedavgm or an adaptive server optimiser",
                self.strategy.as_ref().map_or_else(|| "fedavg".to_string(), |r| r.config().strategy.to_string())
            );
        }
        let max_clients = crate::secagg::max_participants(&self.settings);
        let quantization = config.quantization(max_clients)?;
        self.secagg = Some((config, quantization));
        Ok(self)
    }

    /// Plans secure aggregation for an attempt over `sampled`; `None` when it is off.
    fn plan_secagg(&self, round: u32, attempt: u32, sampled: &[String]) -> Result<Option<Arc<SecAggAttempt>>, String> {
        let Some((config, quantization)) = &self.secagg else { return Ok(None) };
        let len = self.global().tensors.num_values();
        SecAggAttempt::new(config, *quantization, round, attempt, sampled.to_vec(), len)
            .map(|a| Some(Arc::new(a)))
            .map_err(|e| e.to_string())
    }

    /// The secure-aggregation attempt `client` takes part in.
    pub fn secagg_attempt(&self, client: &str, round: u32, attempt: u32) -> Result<Arc<SecAggAttempt>, UpdateRefusal> {
        let phase = lock(&self.phase);
        let book = phase.collecting(round, attempt)?;
        if !book.sampled.contains(client) {
            return Err(UpdateRefusal::NotSampled(round));
        }
        book.secagg.clone().ok_or(UpdateRefusal::Stale {
            round,
            attempt,
            open: "a round without secure aggregation".into(),
        })
    }

    /// Folds the mean of an unmasked secure sum into the attempt's strategy; says whether the
    /// attempt completes.
    async fn fold_secure_sum(
        &self,
        attempt: &SecAggAttempt,
        outcome: Result<fl_common::secagg::SecAggOutcome, String>,
    ) -> Close {
        let outcome = match outcome {
            Ok(o) => o,
            Err(reason) => {
                *lock(&self.attempt_error) = Some(format!("secure aggregation: {reason}"));
                return Close::Retry(policy::CloseReason::Deadline);
            }
        };
        let (ticket, survivors) = {
            let mut phase = lock(&self.phase);
            let Ok(book) = phase.collecting_mut(attempt.round, attempt.attempt) else {
                return Close::Retry(policy::CloseReason::Deadline);
            };
            let survivors: Vec<String> = attempt.survivors();
            book.accepted.extend(survivors.iter().cloned());
            (book.sum.clone(), survivors)
        };
        let model = self.global();
        let mean = match crate::secagg::mean_update(&attempt.quantization, &outcome, &model.tensors) {
            Ok(mean) => mean,
            Err(e) => {
                *lock(&self.attempt_error) = Some(format!("secure aggregation: {e}"));
                return Close::Retry(policy::CloseReason::Deadline);
            }
        };
        let stats = attempt.stats();
        let mut sum = ticket.lock_owned().await;
        // Uniform weights: the mean of the masked inputs, folded as their sum (DP's noise is
        // calibrated to it; FedAvg folds it as one update).
        sum.strategy.fold_secure_sum(&mean, outcome.masked);
        sum.folded = survivors;
        sum.examples = stats.examples;
        sum.weighted_loss = stats.weighted_loss;
        sum.weighted_accuracy = stats.weighted_accuracy;
        sum.train_s = stats.train_s;
        sum.bytes_up = stats.bytes_up;
        sum.secagg = Some((outcome.masked, outcome.dropped, outcome.recovered));
        Close::Complete(policy::CloseReason::AllAnswered)
    }

    /// Whether `client` holds its work stream.
    fn is_connected(&self, client: &str) -> bool {
        lock(&self.connections).contains_key(client)
    }

    /// Continues early stopping from `best` (replayed from the committed metrics); the
    /// federation is over already if it says so.
    pub fn with_best(self, best: BestRound) -> Coordinator {
        let stop = best.should_stop(self.settings.long_run.early_stop_patience);
        self.early_stopped.store(stop, Ordering::SeqCst);
        *lock(&self.best) = best;
        self
    }

    /// True when `--early-stop-patience` rounds went by without a lower evaluation loss.
    pub fn early_stopped(&self) -> bool {
        self.early_stopped.load(Ordering::SeqCst)
    }

    /// Aggregates with `--strategy` (see [`StrategyRuntime`]) instead of plain FedAvg.
    pub fn with_strategy(mut self, strategy: StrategyRuntime) -> Coordinator {
        self.async_engine = strategy.config().buffered().map(async_mode::AsyncEngine::new);
        self.strategy = Some(Arc::new(strategy));
        self
    }

    /// True when the federation ended early because the next round would exceed
    /// `--dp-max-epsilon`.
    pub fn budget_exhausted(&self) -> bool {
        self.budget_exhausted.load(Ordering::SeqCst)
    }

    /// Clients enrolled and not revoked: the population that q and the default δ refer to.
    fn enrolled_clients(&self) -> usize {
        self.registry.index().active
    }

    /// The current global model.
    pub fn global(&self) -> Arc<GlobalModel> {
        self.global.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Rounds committed so far.
    pub fn completed_rounds(&self) -> u32 {
        self.completed.load(Ordering::SeqCst)
    }

    /// Rounds aggregated so far: the committed ones and the one whose commit may still run.
    fn aggregated_rounds(&self) -> u32 {
        self.aggregated.load(Ordering::SeqCst)
    }

    /// Continues the top-k download residual of the last committed round from its file (see
    /// [`crate::delta`]). Blocking.
    pub fn resume_download_feedback(self) -> Result<Coordinator> {
        let feedback = crate::delta::load_feedback(&self.state, self.completed_rounds())?;
        *lock(&self.download_feedback) = Arc::new(feedback);
        Ok(self)
    }

    /// True once all rounds are done.
    pub fn is_finished(&self) -> bool {
        self.finished.load(Ordering::SeqCst)
    }

    /// The status as `status.json` shows it.
    pub fn status(&self) -> CoordinatorStatus {
        self.status.borrow().clone()
    }

    /// Follows the status: a new value on every change.
    pub fn subscribe_status(&self) -> watch::Receiver<CoordinatorStatus> {
        self.status.subscribe()
    }

    /// Wakes the engine and updates the status after a change.
    fn changed(&self) {
        self.changed.notify_waiters();
        self.publish();
    }

    /// Recomputes the status; subscribers see it if it differs.
    fn publish(&self) {
        let sorted = |set: &HashSet<String>| {
            let mut ids: Vec<String> = set.iter().cloned().collect();
            ids.sort();
            ids
        };
        let mut status = CoordinatorStatus {
            completed_rounds: self.completed_rounds(),
            rounds_total: self.settings.rounds,
            failed_attempts: self.failed_attempts.load(Ordering::SeqCst),
            last_failure: lock(&self.last_failure).clone(),
            refused: lock(&self.refused).clone(),
            failed_handshakes: self.failed_handshakes.load(Ordering::SeqCst),
            ..CoordinatorStatus::default()
        };
        match &*lock(&self.phase) {
            Phase::Waiting { round, attempt } => {
                (status.phase, status.round, status.attempt) = (state::Phase::Waiting, *round, *attempt);
            }
            Phase::Collecting(book) => {
                (status.phase, status.round, status.attempt) =
                    (state::Phase::Collecting, book.task.round, book.task.attempt);
                status.sampled = sorted(&book.sampled);
                status.accepted = sorted(&book.accepted);
                status.rejected = sorted(&book.rejected);
            }
            Phase::Aggregating { round, attempt, sampled, accepted, rejected } => {
                (status.phase, status.round, status.attempt) = (state::Phase::Aggregating, *round, *attempt);
                (status.sampled, status.accepted, status.rejected) =
                    (sampled.clone(), accepted.clone(), rejected.clone());
            }
            Phase::Finished { round, attempt } => {
                (status.phase, status.round, status.attempt) = (state::Phase::Finished, *round, *attempt);
            }
        }
        let mut connected: Vec<String> = lock(&self.connections).keys().cloned().collect();
        connected.sort();
        status.connected = connected;
        self.status.send_if_modified(|current| {
            if *current == status {
                return false;
            }
            *current = status;
            true
        });
    }

    fn set_phase(&self, phase: Phase) -> Phase {
        let old = std::mem::replace(&mut *lock(&self.phase), phase);
        self.changed();
        old
    }

    /// Records an upload that could not be stored (a full disk): the status shows it, and so
    /// does the failure reason of the attempt, if it fails.
    pub fn record_spool_failure(&self, reason: String) {
        *lock(&self.attempt_error) = Some(reason.clone());
        self.record_failure(reason);
    }

    fn record_failure(&self, reason: String) {
        *lock(&self.last_failure) = Some(reason);
        self.publish();
    }

    /// Counts a refused TLS handshake.
    pub fn record_failed_handshake(&self) {
        self.failed_handshakes.fetch_add(1, Ordering::SeqCst);
        self.publish();
    }

    /// Registers a client's work stream, replacing an older one of the same client. Returns the
    /// connection id; `disconnect` with it removes exactly this stream.
    pub fn connect(&self, client_id: &str, tx: WorkSender) -> u64 {
        let id = self.next_connection.fetch_add(1, Ordering::SeqCst);
        // A sampled client that reconnects mid-round (it restarted, or its link dropped) gets
        // the round's task again.
        let resend = match &*lock(&self.phase) {
            // In async mode a client that (re)connects is idle: the engine gives it a new task.
            _ if self.async_engine.is_some() => async_mode::forget_task(self, client_id),
            Phase::Collecting(book) => {
                let connected = HashSet::new();
                policy::resend_task_on_connect(&book.view(&connected, self.settings.min_clients), client_id)
                    .then(|| book.task.clone())
            }
            _ => None,
        };
        if let Some(task) = resend {
            let _ = tx.try_send(WorkItem::Round(task));
        }
        lock(&self.connections).insert(client_id.to_string(), Connection { id, tx });
        self.changed();
        id
    }

    /// Removes a client's work stream if it is still connection `id`.
    pub fn disconnect(&self, client_id: &str, id: u64) {
        let removed = {
            let mut connections = lock(&self.connections);
            let current = connections.get(client_id).is_some_and(|c| c.id == id);
            current && connections.remove(client_id).is_some()
        };
        if removed {
            info!(client = client_id, "client disconnected");
        }
        self.changed();
    }

    fn connected_ids(&self) -> HashSet<String> {
        let mut connections = lock(&self.connections);
        connections.retain(|_, c| !c.tx.is_closed());
        connections.keys().cloned().collect()
    }

    /// Ends the work streams of clients that the registry now says are revoked; returns the
    /// connected clients that may be sampled.
    pub fn drop_revoked(&self) -> Vec<String> {
        let index = self.registry.index();
        let revoked = &index.revoked;
        let (eligible, dropped) = {
            let mut connections = lock(&self.connections);
            let mut dropped = 0;
            connections.retain(|id, c| {
                if revoked.contains(id.as_str()) {
                    let _ = c.tx.try_send(WorkItem::Revoked { client_id: id.clone() });
                    info!(client = %id, "dropping the connection of a revoked client");
                    dropped += 1;
                    return false;
                }
                !c.tx.is_closed()
            });
            (connections.keys().cloned().collect::<Vec<_>>(), dropped)
        };
        if dropped > 0 {
            self.changed();
        }
        eligible
    }

    /// Checks that `client_id` may fetch the model of (round, attempt); returns the model and
    /// the round's download counter.
    pub fn model_for(
        &self,
        client_id: &str,
        round: u32,
        attempt: u32,
    ) -> Result<(Arc<GlobalModel>, Arc<AtomicU64>), UpdateRefusal> {
        if let Some(engine) = &self.async_engine {
            return engine.model_for(client_id, round, attempt);
        }
        let phase = lock(&self.phase);
        let book = phase.collecting(round, attempt)?;
        if !book.sampled.contains(client_id) {
            return Err(UpdateRefusal::NotSampled(round));
        }
        Ok((book.model.clone(), book.bytes_down.clone()))
    }

    /// Records that `client_id` has been sent the last chunk of the model of (round, attempt).
    pub fn note_download(&self, client_id: &str, round: u32, attempt: u32) {
        if let Ok(book) = lock(&self.phase).collecting_mut(round, attempt) {
            book.downloaded.insert(client_id.to_string());
        }
        self.changed.notify_waiters();
    }

    /// Waits until every client sampled for the round after `round` has downloaded its model,
    /// for at most [`COMMIT_DEFER`], and not when no such round is opening or open (nor after
    /// the last round). The commit of a synchronous round of `serve` (evaluation, checkpoint)
    /// waits for this: the next round's downloads and model rebuilds are on its critical path,
    /// its training is not, and on a host that the clients share with the coordinator the commit
    /// then takes its cores from training.
    async fn wait_for_next_downloads(&self, round: u32) {
        let deadline = tokio::time::Instant::now() + COMMIT_DEFER;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let waiting = match &*lock(&self.phase) {
                Phase::Aggregating { round: r, .. } => *r == round && round < self.settings.rounds,
                Phase::Waiting { round: r, .. } => *r == round + 1,
                Phase::Collecting(book) => book.task.round == round + 1 && !book.sampled.is_subset(&book.downloaded),
                Phase::Finished { .. } => false,
            };
            if !waiting || tokio::time::timeout_at(deadline, notified).await.is_err() {
                return;
            }
        }
    }

    /// Checks that an upload from `client_id` with `header` may start.
    pub fn begin_upload(&self, client_id: &str, header: &UpdateHeader) -> Result<UploadTicket, UpdateRefusal> {
        if let Some(engine) = &self.async_engine {
            return engine.begin_upload(client_id, header);
        }
        let phase = lock(&self.phase);
        let book = phase.collecting(header.round, header.attempt)?;
        if book.secagg.is_some() {
            return Err(UpdateRefusal::SecureAggregationOnly(header.round));
        }
        book.check_may_answer(client_id)?;
        Ok(UploadTicket { model: book.model.clone(), sum: book.sum.clone() })
    }

    /// Counts a refused update by its reason (status.json's `refused`, and the HTTP side port's
    /// `fl_updates_refused_total`).
    pub fn count_refusal(&self, refusal: &UpdateRefusal) {
        *lock(&self.refused).entry(refusal.reason().to_string()).or_insert(0) += 1;
        self.changed();
    }

    /// Records that a client's upload was refused or lost after it started.
    pub fn record_rejection(&self, client_id: &str, round: u32, attempt: u32) {
        if let Some(engine) = &self.async_engine {
            engine.answered(self, client_id, round, attempt, async_mode::Answer::Rejected);
        } else if let Ok(book) = lock(&self.phase).collecting_mut(round, attempt) {
            if book.sampled.contains(client_id) {
                book.accepted.remove(client_id);
                book.rejected.insert(client_id.to_string());
            }
        }
        self.changed();
    }

    /// Validates a spooled upload and folds it into the attempt's running sum, one at a time,
    /// on a blocking thread. An invalid update is recorded as rejected.
    pub async fn fold_upload(
        &self,
        client_id: &str,
        ticket: UploadTicket,
        upload: SpooledUpload,
    ) -> Result<(), UpdateRefusal> {
        let (round, attempt) = (upload.header.round, upload.header.attempt);
        let codec: UpdateCodec =
            upload.header.codec.parse().map_err(|_| InvalidUpdate::UnsupportedCodec(upload.header.codec.clone()))?;
        if let Some(engine) = &self.async_engine {
            return engine.fold_upload(self, client_id, codec, ticket, upload).await;
        }
        let mut sum = ticket.sum.lock_owned().await;
        // The attempt may have closed, or the client answered, while this upload waited its turn.
        lock(&self.phase).collecting(round, attempt)?.check_may_answer(client_id)?;
        let decoded =
            decode_update(codec, upload.path.clone(), ticket.model.tensors.clone(), self.settings.max_update_norm)
                .await;
        let delta = match decoded {
            Ok(delta) => delta,
            Err(refusal) => {
                self.record_rejection(client_id, round, attempt);
                return Err(refusal);
            }
        };
        // Counted as accepted from here: the engine closes the attempt only after this fold.
        {
            let mut phase = lock(&self.phase);
            let book = phase.collecting_mut(round, attempt)?;
            book.check_may_answer(client_id)?;
            book.accepted.insert(client_id.to_string());
        }
        self.changed();
        let id = client_id.to_string();
        let reference = ticket.model.tensors.clone();
        let folded = tokio::task::spawn_blocking(move || {
            state::fault_sleep("fold", round);
            sum.add(id, Values::Sparse(&delta, &reference), &upload.header, upload.bytes)
        })
        .await;
        self.fold_outcome(client_id, round, attempt, folded)
    }

    /// What a fold on a blocking thread came to: a fold that failed or panicked is recorded (the
    /// update as rejected, a spool error as the attempt's failure) and refused.
    fn fold_outcome(
        &self,
        client_id: &str,
        round: u32,
        attempt: u32,
        folded: Result<Result<(), crate::aggregation::AggregationError>, tokio::task::JoinError>,
    ) -> Result<(), UpdateRefusal> {
        let failed = match folded {
            Ok(Ok(())) => None,
            Ok(Err(e)) => {
                let reason = format!("round {round}: the update of {client_id} could not be stored: {e}");
                self.record_spool_failure(reason);
                Some(e.to_string())
            }
            Err(e) => Some(e.to_string()),
        };
        if let Some(e) = failed {
            tracing::error!(client = client_id, round, attempt, "folding an update failed: {e}");
            self.record_rejection(client_id, round, attempt);
            return Err(UpdateRefusal::FoldFailed(e));
        }
        Ok(())
    }

    /// Records that a sampled client's local training failed: it has answered this attempt, so the
    /// attempt closes as soon as every sampled client answered, not at the deadline. Returns
    /// whether the report counted (false for a client not sampled, or one that already answered).
    pub fn record_training_failure(&self, client_id: &str, round: u32, attempt: u32, reason: &str) -> bool {
        if let Some(engine) = &self.async_engine {
            return engine.answered(self, client_id, round, attempt, async_mode::Answer::Failed(reason));
        }
        let counted = match lock(&self.phase).collecting_mut(round, attempt) {
            Ok(book) if book.sampled.contains(client_id) && !book.has_answered(client_id) => {
                book.rejected.insert(client_id.to_string());
                book.training_failures.insert(client_id.to_string(), reason.to_string());
                true
            }
            _ => false,
        };
        self.changed();
        counted
    }

    /// Records a heartbeat; returns whether the round attempt is still open for this client.
    pub fn heartbeat(&self, client_id: &str, round: u32, attempt: u32, progress: f32) -> bool {
        if let Some(engine) = &self.async_engine {
            return engine.heartbeat(self, client_id, round, attempt, progress);
        }
        match lock(&self.phase).collecting_mut(round, attempt) {
            Ok(book) if book.sampled.contains(client_id) => {
                book.progress.insert(client_id.to_string(), progress.clamp(0.0, 1.0));
                !book.has_answered(client_id)
            }
            _ => false,
        }
    }

    /// Opens an attempt for `sampled`; returns its task.
    fn open_round(
        &self,
        round: u32,
        attempt: u32,
        sampled: Vec<String>,
        target: usize,
        secagg: Option<Arc<SecAggAttempt>>,
    ) -> Arc<RoundTask> {
        let settings = &self.settings;
        let model = self.global();
        // DP wraps the mean: with DP on, each attempt aggregates with a copy of the DpFedAvg.
        let (dp_strategy, dp_clip_norm): (Option<Box<dyn AggregationStrategy>>, _) = match &self.dp {
            Some(dp) => {
                let ledger = lock(&dp.ledger);
                let client_clip = (ledger.config.clip_on == crate::dp::ClipSite::Client).then_some(ledger.clip_norm);
                (Some(Box::new(dp.strategy.for_attempt(ledger.clip_norm))), client_clip)
            }
            None => (None, None),
        };
        // --strategy builds on the mean (DP-FedAvg's when DP is on); without it, the mean alone.
        let mut strategy = match (&self.strategy, dp_strategy) {
            (Some(runtime), dp) => runtime.attempt_strategy(dp),
            (None, Some(dp)) => dp,
            (None, None) => (self.new_strategy)(),
        };
        let proximal_mu = self.strategy.as_ref().map_or(0.0, |s| s.config().proximal_mu);
        strategy.begin_round(&model.tensors);
        let deadline_unix_ms = (std::time::SystemTime::now() + settings.round_timeout)
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let task = Arc::new(RoundTask {
            round,
            attempt,
            local_epochs: settings.local_epochs,
            batch_size: settings.batch_size,
            learning_rate: settings.long_run.lr_schedule.lr(settings.lr, round, settings.rounds),
            optimizer: settings.optimizer.clone(),
            seed: settings.seed.wrapping_mul(1_000_003).wrapping_add(u64::from(round) * 131 + u64::from(attempt)),
            deadline_unix_ms,
            model_bytes: model.file_len() as u64,
            model_codec: CODEC_SAFETENSORS_F32.to_string(),
            update_codecs: settings.accepted_codecs().iter().map(|c| c.name().to_string()).collect(),
            dp_clip_norm,
            model_digest: model.digest.clone(),
            delta: model
                .delta
                .as_ref()
                .map(|d| (d.base_digest.clone(), d.codec.name().to_string(), d.bytes.len() as u64)),
            secagg: secagg.as_ref().map(|a| a.task.clone()),
            proximal_mu,
            distill: self.distill.as_ref().map(|t| Arc::new(t.task())),
        });
        let now = Instant::now();
        let book = RoundBook {
            task: task.clone(),
            model,
            target,
            deadline: now + settings.round_timeout,
            started: now,
            sampled: sampled.into_iter().collect(),
            accepted: HashSet::new(),
            rejected: HashSet::new(),
            training_failures: HashMap::new(),
            progress: HashMap::new(),
            sum: Arc::new(tokio::sync::Mutex::new(Accumulator {
                strategy,
                folded: Vec::new(),
                examples: 0,
                weighted_loss: 0.0,
                weighted_accuracy: 0.0,
                bytes_up: 0,
                train_s: 0.0,
                folding: false,
                secagg: None,
                local_evals: Vec::new(),
                distilled: 0,
                buffered: None,
            })),
            bytes_down: Arc::new(AtomicU64::new(0)),
            downloaded: HashSet::new(),
            secagg,
        };
        lock(&self.attempt_error).take();
        self.set_phase(Phase::Collecting(Box::new(book)));
        task
    }

    /// Whether the open attempt closes now.
    fn check_close(&self, now: Instant) -> Option<Close> {
        let connected = self.connected_ids();
        match &*lock(&self.phase) {
            Phase::Collecting(book) => {
                Some(policy::should_close(&book.view(&connected, self.settings.min_clients), now))
            }
            _ => None,
        }
    }

    /// Ends collection: the book leaves the shared state and the phase becomes `Aggregating`.
    fn close_round(&self) -> Option<Box<RoundBook>> {
        let mut phase = lock(&self.phase);
        let Phase::Collecting(book) = &*phase else { return None };
        let sorted = |set: &HashSet<String>| {
            let mut ids: Vec<String> = set.iter().cloned().collect();
            ids.sort();
            ids
        };
        let next = Phase::Aggregating {
            round: book.task.round,
            attempt: book.task.attempt,
            sampled: sorted(&book.sampled),
            accepted: sorted(&book.accepted),
            rejected: sorted(&book.rejected),
        };
        let Phase::Collecting(book) = std::mem::replace(&mut *phase, next) else { return None };
        drop(phase);
        self.changed();
        Some(book)
    }

    /// Runs `check` after every change (a join, a leave, an update), at `wake_at`, and at least
    /// every second, until it answers `Some`, or `shutdown` fires (`None`). The wake-up is
    /// registered before `check` runs, so a change between the check and the wait is not lost.
    async fn wait_for<T>(
        &self,
        wake_at: Instant,
        shutdown: &CancellationToken,
        mut check: impl FnMut() -> Option<T>,
    ) -> Option<T> {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(answer) = check() {
                return Some(answer);
            }
            if shutdown.is_cancelled() {
                return None;
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(policy::next_wake(wake_at, Instant::now(), Duration::from_secs(1))) => {}
                _ = shutdown.cancelled() => return None,
            }
        }
    }
}

/// Refreshes the in-memory registry every `period` when the file changed (the admin CLI writes
/// it from another process), and ends the work streams of clients revoked since.
pub async fn watch_registry(coord: Arc<Coordinator>, period: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let registry = coord.registry.clone();
        match tokio::task::spawn_blocking(move || registry.refresh_and_flush_seen()).await {
            Ok(Ok(true)) => {
                coord.drop_revoked();
                coord.changed();
            }
            Ok(Ok(false)) => {}
            Ok(Err(e)) => {
                // Never treat every client as unknown: serve from memory and put the file back.
                error!("the client registry is unreadable ({e}); rewriting it from memory");
                let registry = coord.registry.clone();
                match tokio::task::spawn_blocking(move || registry.restore()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => error!("could not rewrite the client registry: {e}"),
                    Err(e) => error!("rewriting the client registry failed: {e}"),
                }
            }
            Err(e) => warn!("re-reading the client registry failed: {e}"),
        }
    }
}

/// Writes `status.json` whenever the status changes, on a blocking thread, until `stop`; then
/// writes the last status and returns.
pub async fn write_status(coord: Arc<Coordinator>, stop: CancellationToken) {
    let mut rx = coord.subscribe_status();
    let mut written: Option<CoordinatorStatus> = None;
    loop {
        let status = rx.borrow_and_update().clone();
        if written.as_ref() != Some(&status) {
            let state = coord.state.clone();
            let to_write = status.clone();
            match tokio::task::spawn_blocking(move || state.write_status(&to_write)).await {
                Ok(Ok(())) => written = Some(status),
                Ok(Err(e)) => warn!("could not write {}: {e}", coord.state.status_path().display()),
                Err(e) => warn!("writing the status failed: {e}"),
            }
        }
        tokio::select! {
            biased;
            _ = stop.cancelled() => {
                let last = rx.borrow().clone();
                if written.as_ref() != Some(&last) {
                    let state = coord.state.clone();
                    let _ = tokio::task::spawn_blocking(move || state.write_status(&last)).await;
                }
                return;
            }
            changed = rx.changed() => if changed.is_err() { return },
        }
    }
}

/// Runs the remaining rounds; returns when all are done or `shutdown` fires, after the commit
/// of the last aggregated round (which runs in the background, see [`complete_round`]).
pub async fn run_rounds(
    coord: Arc<Coordinator>,
    eval: Option<Arc<dyn Evaluator>>,
    shutdown: CancellationToken,
    elapsed_before: f64,
) -> Result<()> {
    let mut rounds = RoundLoop {
        coord: coord.clone(),
        eval,
        shutdown,
        elapsed_before,
        serving_since: Instant::now(),
        repeated: policy::RepeatedFailure::default(),
    };
    let ran = if coord.async_engine.is_some() {
        async_mode::run_steps(&mut rounds).await
    } else {
        run_sync_rounds(&mut rounds).await
    };
    // Even on shutdown or an error: the round aggregated last is a good one.
    let settled = settle_commits(&coord).await;
    ran.and(settled)
}

/// What the round loops of both modes share: the coordinator, the evaluator, the shutdown, the
/// clock of `elapsed_s`, and the count of attempts that failed alike.
struct RoundLoop {
    coord: Arc<Coordinator>,
    eval: Option<Arc<dyn Evaluator>>,
    shutdown: CancellationToken,
    elapsed_before: f64,
    serving_since: Instant,
    repeated: policy::RepeatedFailure,
}

/// What became of a closed attempt.
#[derive(Debug, PartialEq, Eq)]
enum Concluded {
    /// The round is aggregated (its commit may still run): the next one may open.
    Completed,
    /// The attempt failed: retry the round.
    Retry,
    /// `shutdown` fired while waiting to retry.
    Stopped,
}

impl RoundLoop {
    /// Ends a closed attempt, in both modes: once the fold in flight is done, the attempt fails
    /// when the sum is damaged or fewer than `needed` updates were folded (`too_few` says so),
    /// and [`fail_attempt`] waits before the retry; otherwise `prepare` completes the sum and
    /// [`complete_round`] aggregates the round.
    async fn conclude(
        &mut self,
        book: Box<RoundBook>,
        close: Close,
        needed: usize,
        too_few: impl FnOnce(&Accumulator, &RoundBook) -> String,
        prepare: impl FnOnce(&mut Accumulator, &RoundBook),
    ) -> Result<Concluded> {
        // A fold in flight finishes before the sum is taken.
        let mut sum = book.sum.clone().lock_owned().await;
        let failure = match close {
            _ if sum.folding => Some("an update could not be folded".to_string()),
            Close::Complete(_) if sum.folded.len() >= needed => None,
            _ => Some(too_few(&sum, &book)),
        };
        if let Some(reason) = failure {
            let retry = fail_attempt(&self.coord, &book, reason, &mut self.repeated, &self.shutdown).await?;
            return Ok(if retry { Concluded::Retry } else { Concluded::Stopped });
        }
        self.repeated = policy::RepeatedFailure::default();
        prepare(&mut sum, &book);
        let elapsed = self.elapsed_before + self.serving_since.elapsed().as_secs_f64();
        let after_downloads = self.coord.async_engine.is_none();
        complete_round(&self.coord, self.eval.clone(), *book, sum, elapsed, after_downloads).await?;
        Ok(Concluded::Completed)
    }
}

/// The synchronous rounds of [`run_rounds`].
async fn run_sync_rounds(rounds: &mut RoundLoop) -> Result<()> {
    let coord = rounds.coord.clone();
    let shutdown = rounds.shutdown.clone();
    let settings = coord.settings.clone();
    let mut rng = rand::rngs::StdRng::from_os_rng();
    while coord.aggregated_rounds() < settings.rounds && !coord.early_stopped() {
        let round = coord.aggregated_rounds() + 1;
        let mut attempt = 0;
        loop {
            coord.set_phase(Phase::Waiting { round, attempt });
            let mut last_report = Instant::now() - Duration::from_secs(60);
            let eligible = coord.wait_for(Instant::now() + Duration::from_secs(1), &shutdown, || {
                let ids = coord.drop_revoked();
                if policy::should_start(ids.len(), settings.min_clients) {
                    return Some(ids);
                }
                if last_report.elapsed() >= Duration::from_secs(10) {
                    info!(round, connected = ids.len(), needed = settings.min_clients, "waiting for clients");
                    last_report = Instant::now();
                }
                None
            });
            let Some(eligible) = eligible.await else { return Ok(()) };
            let size = policy::sample_size(
                eligible.len(),
                settings.clients_per_round,
                settings.min_clients,
                settings.over_sample,
            );
            let sampled = policy::sample(eligible, size, &mut rng);
            if let Some(dp) = &coord.dp {
                let budget = lock(&dp.ledger).check_budget(sampled.len(), coord.enrolled_clients());
                if let Budget::Exhausted { epsilon_after, max_epsilon } = budget {
                    info!(
                        round,
                        epsilon_after,
                        max_epsilon,
                        "the privacy budget is spent: the federation ends before this round"
                    );
                    coord.budget_exhausted.store(true, Ordering::SeqCst);
                    return Ok(());
                }
            }
            let secagg = match coord.plan_secagg(round, attempt, &sampled) {
                Ok(secagg) => secagg,
                Err(reason) => {
                    warn!(round, attempt, "round attempt failed: secure aggregation: {reason}; retrying");
                    coord.failed_attempts.fetch_add(1, Ordering::SeqCst);
                    coord.record_failure(format!("round {round} attempt {attempt}: secure aggregation: {reason}"));
                    attempt += 1;
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = shutdown.cancelled() => return Ok(()),
                    }
                    continue;
                }
            };
            let task = coord.open_round(round, attempt, sampled.clone(), size.target, secagg.clone());
            info!(round, attempt, sampled = sampled.len(), "round started");
            for client in &sampled {
                let tx = lock(&coord.connections).get(client).map(|c| c.tx.clone());
                if let Some(tx) = tx {
                    if tx.try_send(WorkItem::Round(task.clone())).is_err() {
                        warn!(client, round, "could not send the round task; client is gone or not reading");
                    }
                }
            }

            let deadline = Instant::now() + settings.round_timeout;
            let close = match &secagg {
                // Secure aggregation closes the attempt when its four stages end.
                Some(sa) => {
                    let stage_time = settings.round_timeout / 4;
                    let outcome =
                        crate::secagg::drive(sa, deadline, stage_time, |c| coord.is_connected(c), &shutdown).await;
                    if shutdown.is_cancelled() {
                        None
                    } else {
                        Some(coord.fold_secure_sum(sa, outcome).await)
                    }
                }
                None => {
                    coord
                        .wait_for(deadline, &shutdown, || {
                            coord.check_close(Instant::now()).filter(|close| *close != Close::Open)
                        })
                        .await
                }
            };
            let close = match close {
                Some(close) => close,
                None => {
                    coord.close_round();
                    coord.set_phase(Phase::Waiting { round, attempt });
                    return Ok(());
                }
            };
            let Some(book) = coord.close_round() else { return Ok(()) };
            if let Close::Complete(policy::CloseReason::Deadline) | Close::Retry(policy::CloseReason::Deadline) = close
            {
                log_stragglers(&book, &settings);
            }
            let needed = settings.min_clients.max(1);
            let too_few = |sum: &Accumulator, book: &RoundBook| {
                format!(
                    "too few good updates: {} accepted, {needed} needed ({} sampled, {} refused or lost)",
                    sum.folded.len(),
                    book.sampled.len(),
                    book.rejected.len()
                )
            };
            match rounds.conclude(book, close, needed, too_few, |_, _| {}).await? {
                Concluded::Completed => break,
                Concluded::Retry => attempt += 1,
                Concluded::Stopped => return Ok(()),
            }
        }
    }
    Ok(())
}

/// Records a failed attempt and waits a second before the next one; `Ok(false)` when `shutdown`
/// fired meanwhile. `--max-failed-attempts` attempts in a row in which every client's training
/// failed the same way stop the federation (a permanent error; committed rounds are kept).
async fn fail_attempt(
    coord: &Coordinator,
    book: &RoundBook,
    mut reason: String,
    repeated: &mut policy::RepeatedFailure,
    shutdown: &CancellationToken,
) -> Result<bool> {
    let (round, attempt) = (book.task.round, book.task.attempt);
    if let Some(error) = lock(&coord.attempt_error).take() {
        reason = format!("{reason}; {error}");
    }
    let all_failed = policy::all_training_failed(&book.sampled, &book.training_failures);
    if let Some(why) = &all_failed {
        reason = format!("{reason}; {why}");
    }
    if repeated.record(all_failed) >= coord.settings.max_failed_attempts.max(1) {
        coord.failed_attempts.fetch_add(1, Ordering::SeqCst);
        coord.record_failure(format!("round {round} attempt {attempt}: {reason}"));
        return Err(fl_common::cli::Permanent::error(format!(
            "stopping the federation: {} attempts in a row of round {round} failed the same way ({reason}); \
             the {} committed round(s) are kept: fix the cause (e.g. --lr) and restart",
            repeated.count,
            coord.completed_rounds()
        )));
    }
    warn!(round, attempt, "round attempt failed: {reason}; retrying");
    coord.failed_attempts.fetch_add(1, Ordering::SeqCst);
    coord.record_failure(format!("round {round} attempt {attempt}: {reason}"));
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_secs(1)) => Ok(true),
        _ = shutdown.cancelled() => Ok(false),
    }
}

/// Says how far the clients that did not answer got, from their heartbeats.
fn log_stragglers(book: &RoundBook, settings: &RoundSettings) {
    let stragglers: Vec<String> = book
        .sampled
        .iter()
        .filter(|c| !book.has_answered(c))
        .map(|c| match book.progress.get(c) {
            Some(p) => format!("{c}:{:.0}%", p * 100.0),
            None => format!("{c}:silent"),
        })
        .collect();
    info!(
        round = book.task.round,
        attempt = book.task.attempt,
        answered = book.accepted.len() + book.rejected.len(),
        wanted = book.target,
        needed = settings.min_clients,
        sampled = book.sampled.len(),
        stragglers = stragglers.join(","),
        "round deadline reached"
    );
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
    /// The slowest participant's local training seconds.
    train_s: f64,
    /// `round_s - train_s`: what the round spends beyond training.
    overhead_s: f64,
    elapsed_s: f64,
    /// The clients' learning rate of this round (after `--lr-schedule`).
    learning_rate: f32,
    /// The round with the lowest evaluation loss so far (`model/best.safetensors`).
    #[serde(skip_serializing_if = "Option::is_none")]
    best_round: Option<u32>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    dp: Option<DpMetrics>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    secagg: Option<SecAggMetrics>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    personal: Option<crate::personal::PersonalMetrics>,
    /// `--distill-from`: distilled, teacher_bytes_down.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    distill: Option<crate::distill::DistillMetrics>,
    /// `--mode async`: staleness_mean, staleness_max, dropped_stale.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    buffered: Option<crate::aggregation::buffered::StalenessMetrics>,
}

/// The secure-aggregation fields of a metrics line.
#[derive(serde::Serialize)]
struct SecAggMetrics {
    /// Clients whose masked update is in the sum.
    secagg_masked: usize,
    /// Sampled clients whose update is not (left before or during the masked-input stage).
    secagg_dropped: usize,
    /// Clients that left after sharing keys, whose pairwise masks were rebuilt from shares.
    secagg_recovered: usize,
}

/// The DP fields of a metrics line.
#[derive(serde::Serialize)]
struct DpMetrics {
    /// ε spent after this round (at `dp_delta`); null when infinite (no noise).
    dp_epsilon: Option<f64>,
    dp_delta: f64,
    dp_noise_multiplier: f64,
    /// The clip norm used this round.
    dp_clip_norm: f64,
    /// Updates this round whose norm was at most the clip norm; null under secure aggregation,
    /// where the coordinator sees only their sum.
    dp_unclipped: Option<usize>,
}

/// Completes a round whose updates are folded. On the round's critical path: the strategy's
/// finish, the next global model ([`crate::delta::next_global`]), the server optimiser's and the
/// download residual's new state, and the DP charge with its ledger on disk (the budget check of
/// the next round sees it; a crash later overstates ε, never understates it). The next global
/// model is then published, so the next round may open, while the round's evaluation, metrics
/// line, checkpoint ([`StateDir::commit_round`]), best model and early-stop decision run in the
/// background ([`commit`]). Commits stay in round order: this waits for the previous round's
/// commit before its own (at most one runs; `round_s` includes the wait, if any), and a failed
/// one fails here. Until its commit, the round is not done on disk: a crash restarts from the
/// last committed round, which redoes it. With `after_downloads` the commit first waits for the
/// next round's downloads ([`Coordinator::wait_for_next_downloads`]).
async fn complete_round(
    coord: &Arc<Coordinator>,
    eval: Option<Arc<dyn Evaluator>>,
    book: RoundBook,
    mut sum: tokio::sync::OwnedMutexGuard<Accumulator>,
    elapsed_s: f64,
    after_downloads: bool,
) -> Result<()> {
    let (round, attempt) = (book.task.round, book.task.attempt);
    let global = book.model.clone();
    let download = coord.settings.download_codec();
    let mut feedback = lock(&coord.download_feedback).clone();
    let mut strategy = std::mem::replace(&mut sum.strategy, Box::new(FedAvg::default()));
    let closed = std::time::Instant::now();
    let (next, dp_round, feedback, server_state) = tokio::task::spawn_blocking(move || -> Result<_> {
        let started = std::time::Instant::now();
        let next = match download {
            None => {
                let next = strategy.try_finish(&global.tensors)?.context("no update was folded")?;
                GlobalModel::after(&global, next, None)
            }
            // With delta downloads the model is what clients rebuild from the aggregate's payload.
            Some(codec) => {
                let aggregate = strategy.try_finish_delta(&global.tensors)?.context("no update was folded")?;
                let finished_s = started.elapsed().as_secs_f64();
                let next = crate::delta::next_global(&global, aggregate, codec, &mut feedback)?;
                tracing::debug!(
                    round,
                    finish_s = format!("{finished_s:.3}"),
                    next_model_s = format!("{:.3}", started.elapsed().as_secs_f64() - finished_s),
                    "aggregate and next global model (encoded, applied, hashed)"
                );
                next
            }
        };
        Ok((next, strategy.dp_round().cloned(), feedback, strategy.server_state().cloned()))
    })
    .await??;
    let aggregated_s = closed.elapsed().as_secs_f64();
    // The commit writes the residual as of this round (a top-k codec's; none otherwise).
    *lock(&coord.download_feedback) = feedback.clone();
    if let (Some(runtime), Some(state)) = (&coord.strategy, &server_state) {
        runtime.advance(state.clone());
    }
    // The round is charged, and the ledger written, before the model is committed: a crash in
    // between overstates ε, never understates it.
    let dp = match (&coord.dp, dp_round) {
        (Some(dp), Some(report)) => {
            let enrolled = coord.enrolled_clients();
            let ledger = {
                let mut ledger = lock(&dp.ledger);
                ledger.charge(book.sampled.len(), enrolled, report.next_clip_norm);
                ledger.clone()
            };
            let root = coord.state.root().to_path_buf();
            tokio::task::spawn_blocking(move || ledger.save(&root).map(|()| ledger)).await?.map(|ledger| {
                let epsilon = ledger.epsilon(enrolled);
                Some(DpMetrics {
                    dp_epsilon: epsilon.is_finite().then_some(epsilon),
                    dp_delta: ledger.delta(enrolled),
                    dp_noise_multiplier: ledger.config.noise_multiplier,
                    dp_clip_norm: report.clip_norm,
                    dp_unclipped: report.unclipped,
                })
            })?
        }
        _ => None,
    };
    // Commits stay in round order: the previous round's (usually done by now) comes first.
    let mut pending = coord.pending_commit.lock().await;
    if let Some(previous) = pending.take() {
        previous.await.context("the commit of the previous round panicked")??;
    }
    tracing::debug!(
        round,
        aggregated_s = format!("{aggregated_s:.3}"),
        ready_s = format!("{:.3}", closed.elapsed().as_secs_f64()),
        "round closed: next model built; the previous commit waited for"
    );
    let participants = sum.folded.len();
    let examples = sum.examples.max(1) as f64;
    // The round's critical path ends here: the next round may open.
    let round_s = book.started.elapsed().as_secs_f64();
    let line = MetricsLine {
        round,
        attempt,
        accuracy: None,
        loss: None,
        client_accuracy: sum.weighted_accuracy / examples,
        client_loss: sum.weighted_loss / examples,
        participants,
        sampled: book.sampled.len(),
        rejected: book.rejected.len(),
        examples: sum.examples,
        bytes_up: sum.bytes_up,
        bytes_down: book.bytes_down.load(Ordering::SeqCst),
        round_s,
        train_s: sum.train_s,
        overhead_s: (round_s - sum.train_s).max(0.0),
        elapsed_s,
        learning_rate: book.task.learning_rate,
        best_round: None,
        dp,
        secagg: sum.secagg.map(|(masked, dropped, recovered)| SecAggMetrics {
            secagg_masked: masked,
            secagg_dropped: dropped,
            secagg_recovered: recovered,
        }),
        personal: crate::personal::summarize(&sum.local_evals),
        distill: coord.distill.as_ref().map(|t| t.metrics(sum.distilled)),
        buffered: sum.buffered.as_ref().map(|b| b.metrics()),
    };
    let next = Arc::new(next);
    let job = Commit {
        after_downloads,
        model: next.clone(),
        eval,
        line,
        server_state,
        feedback,
        joined: sum.folded.iter().cloned().collect(),
    };
    drop(sum);
    *coord.global.write().unwrap_or_else(PoisonError::into_inner) = next;
    coord.aggregated.store(round, Ordering::SeqCst);
    *pending = Some(tokio::spawn(commit(coord.clone(), job)));
    drop(pending);
    coord.changed();
    Ok(())
}

/// What the background commit of an aggregated round needs.
struct Commit {
    /// Whether it waits for the next round's downloads first.
    after_downloads: bool,
    /// The round's new global model.
    model: Arc<GlobalModel>,
    eval: Option<Arc<dyn Evaluator>>,
    /// The metrics line, but for the evaluation and the best round.
    line: MetricsLine,
    /// The server optimiser's state after the round.
    server_state: Option<crate::aggregation::server_opt::ServerOptState>,
    /// The download residual after the round.
    feedback: Arc<fl_common::codec::ErrorFeedback>,
    /// The clients whose update is in the round.
    joined: HashSet<String>,
}

/// The off-critical-path half of [`complete_round`]: once the next round's clients have their
/// model (in `serve`'s synchronous rounds, [`Coordinator::wait_for_next_downloads`]), evaluates
/// the round's model, then writes the
/// server optimiser's state and the download residual of the round, commits it (model file,
/// metrics line, progress) and writes the best model; then early stopping decides, and the
/// registry counts the round for its clients.
async fn commit(coord: Arc<Coordinator>, job: Commit) -> Result<()> {
    let Commit { after_downloads, model, eval, mut line, server_state, feedback, joined } = job;
    let round = line.round;
    if after_downloads {
        coord.wait_for_next_downloads(round).await;
    }
    let state = coord.state.clone();
    let runtime = coord.strategy.clone();
    let mut best = *lock(&coord.best);
    let written = model.clone();
    let (line, best) = tokio::task::spawn_blocking(move || -> Result<(MetricsLine, BestRound)> {
        state::fault_sleep("before-commit", round);
        state::crash_point("before-commit", round);
        let evaluation = match eval {
            Some(e) => Some(e.evaluate(&written.tensors)?),
            None => None,
        };
        let improved = evaluation.is_some_and(|e| best.observe(round, e.loss));
        line.accuracy = evaluation.map(|e| e.accuracy);
        line.loss = evaluation.map(|e| e.loss);
        line.best_round = best.round();
        let json = serde_json::to_string(&line)?;
        // The server optimiser's moments and the download residual go to disk before the round
        // commits; see StrategyRuntime and crate::delta.
        if let (Some(runtime), Some(server_state)) = (&runtime, &server_state) {
            runtime.save_state(round, server_state)?;
        }
        crate::delta::save_feedback(&state, round, &feedback)?;
        state.commit_round(round, &written.file(), &json, line.elapsed_s)?;
        if let (Some(runtime), Some(_)) = (&runtime, &server_state) {
            runtime.committed(round);
        }
        crate::delta::feedback_committed(&state, round);
        if improved {
            // After the commit: a crash before this write is mended on restart (lib.rs copies the
            // best round's model file again).
            fl_common::files::write_atomic(&state.best_model_path(), &written.file(), 0o644)?;
        }
        Ok((line, best))
    })
    .await??;
    *lock(&coord.best) = best;
    if best.should_stop(coord.settings.long_run.early_stop_patience) {
        info!(round, best_round = best.round(), "no lower evaluation loss for --early-stop-patience rounds: stopping");
        coord.early_stopped.store(true, Ordering::SeqCst);
    }
    coord.completed.store(round, Ordering::SeqCst);
    coord.changed();
    let now = now_unix();
    let registry = coord.registry.clone();
    let updated = tokio::task::spawn_blocking(move || {
        registry.update(|reg| {
            for c in reg.clients.iter_mut().filter(|c| joined.contains(&c.id)) {
                c.rounds_joined += 1;
                c.last_seen_unix = now;
            }
        })
    })
    .await;
    match updated {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!("could not update the client registry: {e}"),
        Err(e) => warn!("updating the client registry failed: {e}"),
    }
    info!(
        round,
        participants = line.participants,
        accuracy = line.accuracy.map(|a| format!("{a:.4}")).unwrap_or_else(|| "n/a".into()),
        client_accuracy = format!("{:.4}", line.client_accuracy),
        seconds = format!("{:.2}", line.round_s),
        "round completed"
    );
    Ok(())
}

/// Waits for the background commit of the last aggregated round, if one may still run; its
/// error, if it failed.
async fn settle_commits(coord: &Coordinator) -> Result<()> {
    let pending = coord.pending_commit.lock().await.take();
    match pending {
        Some(handle) => handle.await.context("the commit of the last round panicked")?,
        None => Ok(()),
    }
}

/// Ends the federation: writes the final model and tells every connected client.
pub async fn finish(coord: &Arc<Coordinator>) -> Result<()> {
    settle_commits(coord).await?;
    let global = coord.global();
    let path = coord.state.final_model_path();
    tokio::task::spawn_blocking(move || fl_common::files::write_atomic(&path, &global.file(), 0o644)).await??;
    coord.finished.store(true, Ordering::SeqCst);
    let last = coord.completed_rounds();
    let attempt = match &*lock(&coord.phase) {
        Phase::Aggregating { attempt, .. } | Phase::Waiting { attempt, .. } | Phase::Finished { attempt, .. } => {
            *attempt
        }
        Phase::Collecting(book) => book.task.attempt,
    };
    coord.set_phase(Phase::Finished { round: last, attempt });
    let senders: Vec<_> = lock(&coord.connections).values().map(|c| c.tx.clone()).collect();
    for tx in senders {
        let _ = tx.send(WorkItem::Finished { rounds_completed: last }).await;
    }
    info!(rounds = last, model = %coord.state.final_model_path().display(), "federation finished");
    Ok(())
}

/// Waits up to `limit` for all clients to disconnect after the end; names those that did not.
pub async fn drain(coord: &Arc<Coordinator>, limit: Duration) {
    let never = CancellationToken::new();
    let all_gone = coord.wait_for(Instant::now() + limit, &never, || coord.connected_ids().is_empty().then_some(()));
    let _ = tokio::time::timeout(limit, all_gone).await;
    let left = coord.connected_ids();
    if !left.is_empty() {
        warn!(clients = ?left, seconds = limit.as_secs_f64(), "still connected after the end; they were told it ended");
    }
}

#[cfg(test)]
mod tests {
    use fl_common::{ModelKind, NamedTensor, SpecOverrides};

    use super::*;

    /// A strategy whose fold panics, as a bug would.
    #[derive(Debug)]
    struct PanickingFold;

    impl AggregationStrategy for PanickingFold {
        fn begin_round(&mut self, _global: &TensorSet) {}
        fn fold(&mut self, _update: ClientUpdate<'_>) {
            panic!("a bug in the fold");
        }
        fn finish(&mut self, _global: &TensorSet) -> Option<TensorSet> {
            None
        }
    }

    fn settings() -> RoundSettings {
        RoundSettings {
            rounds: 1,
            min_clients: 1,
            clients_per_round: 0,
            over_sample: 1.0,
            round_timeout: Duration::from_secs(60),
            local_epochs: 1,
            batch_size: 1,
            lr: 0.1,
            optimizer: "sgd".into(),
            seed: 1,
            max_update_norm: 10.0,
            update_codecs: Vec::new(),
            max_failed_attempts: 3,
            long_run: Default::default(),
        }
    }

    /// The header of an update of attempt 0 of `round` from a client with 3 examples.
    fn header(round: u32, codec: &str, total_bytes: u64) -> UpdateHeader {
        UpdateHeader {
            round,
            attempt: 0,
            codec: codec.into(),
            total_bytes,
            num_examples: 3,
            train_loss: 1.0,
            train_accuracy: 0.5,
            train_s: 0.1,
            local_eval: None,
            distilled: false,
        }
    }

    /// Plays `round` with one update of `delta` from client "a" (top-k int8, the accepted
    /// codec), through the engine's steps, and waits for its commit.
    async fn play_round(coord: &Arc<Coordinator>, round: u32, delta: &TensorSet, spool: &std::path::Path) {
        let codec = coord.settings.accepted_codecs()[0];
        coord.open_round(round, 0, vec!["a".into()], 1, None);
        let payload = codec.encode(delta).unwrap();
        let header = header(round, codec.name(), payload.len() as u64);
        let path = spool.join(format!("a-{round}.part"));
        std::fs::write(&path, &payload).unwrap();
        let ticket = coord.begin_upload("a", &header).unwrap();
        let upload = SpooledUpload { header, path, bytes: payload.len() as u64 };
        coord.fold_upload("a", ticket, upload).await.unwrap();
        let book = coord.close_round().unwrap();
        let sum = book.sum.clone().lock_owned().await;
        complete_round(coord, None, *book, sum, 0.0, false).await.unwrap();
        settle_commits(coord).await.unwrap();
        assert_eq!(coord.completed_rounds(), round);
    }

    /// The coordinator's top-k download residual is persisted with each round: a coordinator
    /// restarted after round 2 holds the same residual, and its round 3 gives the same model as
    /// a run without the restart.
    #[tokio::test]
    async fn the_download_residual_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let spool = tempfile::tempdir().unwrap();
        let spec = SpecOverrides::default().spec(ModelKind::Fasttext, vec!["a".into(), "b".into()]).unwrap();
        let weights = |scale: f32| {
            let data = (0..4096).map(|i| scale * ((i * 7919 % 4096) as f32 / 4096.0 - 0.5)).collect();
            TensorSet::new(vec![NamedTensor { name: "w".into(), shape: vec![1024, 4], data }])
        };
        let mut settings = settings();
        (settings.rounds, settings.update_codecs) = (3, vec!["topk-int8".parse().unwrap()]);
        let ca = fl_common::tls::CertificateAuthority::generate("test CA").unwrap();
        let registry = Arc::new(RegistryStore::create(dir.path()).unwrap());
        let start = |completed: u32, global: TensorSet| {
            let coord = Coordinator::new(
                StateDir::new(dir.path()),
                registry.clone(),
                spec.clone(),
                settings.clone(),
                ca.clone(),
                GlobalModel::encode(&spec, global),
                completed,
            );
            Arc::new(coord.resume_download_feedback().unwrap())
        };
        let first = start(0, weights(0.0));
        play_round(&first, 1, &weights(0.01), spool.path()).await;
        play_round(&first, 2, &weights(-0.02), spool.path()).await;
        let residual = lock(&first.download_feedback).clone();
        assert!(residual.residual.as_ref().is_some_and(|r| r.l2_norm() > 0.0), "top-k left part of the aggregates out");
        let state = StateDir::new(dir.path());
        assert!(crate::delta::feedback_path(&state, 2).exists());
        assert!(
            !crate::delta::feedback_path(&state, 1).exists(),
            "the residual of round 1 is removed once round 2 commits"
        );

        // Restart after round 2, from the files, as serve does.
        let (_, global) = fl_common::decode_model(&std::fs::read(state.round_model_path(2)).unwrap()).unwrap();
        let restarted = start(2, global);
        assert_eq!(*lock(&restarted.download_feedback), residual);
        play_round(&first, 3, &weights(0.03), spool.path()).await;
        let without_restart = first.global().digest.clone();
        play_round(&restarted, 3, &weights(0.03), spool.path()).await;
        assert_eq!(restarted.global().digest, without_restart);
    }

    #[tokio::test]
    async fn a_panicking_fold_fails_the_update_and_poisons_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let registry = Arc::new(RegistryStore::create(dir.path()).unwrap());
        let spec = SpecOverrides::default().spec(ModelKind::Fasttext, vec!["a".into(), "b".into()]).unwrap();
        let weights = TensorSet::new(vec![NamedTensor { name: "w".into(), shape: vec![2], data: vec![0.0; 2] }]);
        let ca = fl_common::tls::CertificateAuthority::generate("test CA").unwrap();
        let mut coord = Coordinator::new(
            state,
            registry,
            spec.clone(),
            settings(),
            ca,
            GlobalModel::encode(&spec, weights.clone()),
            0,
        );
        coord.new_strategy = || Box::new(PanickingFold);
        let task = coord.open_round(1, 0, vec!["a".into(), "b".into()], 2, None);

        let header = header(1, CODEC_SAFETENSORS_F32, 0);
        let path = dir.path().join("a.part");
        std::fs::write(&path, weights.encode(None)).unwrap();
        let ticket = coord.begin_upload("a", &header).unwrap();
        let upload = SpooledUpload { header: header.clone(), path, bytes: 8 };
        let refused = coord.fold_upload("a", ticket, upload).await.expect_err("the fold panicked");
        assert!(matches!(refused, UpdateRefusal::FoldFailed(_)), "{refused:?}");

        // Every lock still works: the other client heartbeats, downloads and may upload.
        assert!(coord.heartbeat("b", 1, 0, 0.5));
        assert!(coord.model_for("b", 1, 0).is_ok());
        assert!(coord.begin_upload("b", &header).is_ok());
        assert!(matches!(coord.begin_upload("a", &header), Err(UpdateRefusal::Duplicate(1))));
        let status = coord.status();
        assert_eq!((status.round, status.rejected.clone()), (task.round, vec!["a".to_string()]), "{status:?}");
        // The damaged sum fails the attempt when it closes.
        let book = coord.close_round().expect("the attempt was open");
        assert!(book.sum.lock().await.folding, "the sum is marked damaged");
    }
}
