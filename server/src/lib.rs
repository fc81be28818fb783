//! The coordinator of a federation: enrollment, the round engine, aggregation, evaluation and
//! checkpoints, served over gRPC with mutual TLS.
//!
//! [`serve`] takes the listener and the shutdown signal from its caller, as mini-redis's
//! `server::run` does, so tests start the real coordinator on port 0 in process. The round
//! policy is [`policy`] (pure functions), the engine that runs it is [`coordinator`], the gRPC
//! edge is [`service`] with its one error type in [`error`]; [`state`] documents the state
//! directory, including `status.json`, which says what the coordinator is doing.

pub mod aggregation;
pub mod backend;
pub mod coordinator;
pub mod delta;
pub mod distill;
pub mod dp;
pub mod error;
pub mod health;
pub mod http;
pub mod listener;
pub mod long_run;
pub mod personal;
pub mod policy;
pub mod registry;
pub mod secagg;
pub mod service;
pub mod spool;
pub mod state;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use fl_common::cli::parse;
use fl_common::codec::UpdateCodec;
use fl_common::token::JoinToken;
use fl_common::{decode_model, ModelKind, ModelSpec, SpecOverrides};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::aggregation::{StrategyArgs, StrategyConfig, StrategyRuntime};
pub use crate::backend::{Evaluation, Evaluator, ModelBackend};
pub use crate::coordinator::RoundSettings;
use crate::coordinator::{Coordinator, GlobalModel};
use crate::dp::{DpArgs, DpFedAvg, DpLedger};
use crate::registry::{now_unix, RegistryStore};
pub use crate::spool::{FileSpool, Spool};
use crate::state::StateDir;

/// Model flags; `None` means "not given" (a default on creation, the stored value on restart).
#[derive(Clone, Debug, Default)]
pub struct ModelArgs {
    /// Architecture.
    pub kind: Option<ModelKind>,
    /// Labels, in order.
    pub labels: Option<Vec<String>>,
    /// Architecture flags.
    pub arch: SpecOverrides,
}

/// The model and local-training flags that `serve` and `fl-sim` share: the architecture, and what
/// each round tells its clients to train with. One declaration, so both parse the same way.
#[derive(clap::Args, Clone, Debug)]
pub struct TrainingArgs {
    /// Labels (comma-separated); default: the labels of --eval-data (fl-sim: else of --data).
    #[arg(long, value_delimiter = ',')]
    pub labels: Option<Vec<String>>,
    /// Model architecture: fasttext, bilstm, transformer or minilm [default: fasttext].
    #[arg(long)]
    pub model: Option<ModelKind>,
    #[command(flatten)]
    pub arch: SpecOverrides,
    /// Local epochs per round.
    #[arg(long, default_value_t = 1, value_parser = parse::int_in(1u32, 10_000))]
    pub local_epochs: u32,
    /// Local batch size.
    #[arg(long, default_value_t = 32, value_parser = parse::int_in(1u32, 1_000_000))]
    pub batch_size: u32,
    /// Local learning rate.
    #[arg(long, default_value_t = 0.01, value_parser = parse::positive_f32(100.0))]
    pub lr: f32,
    /// Local optimizer: adam or sgd.
    #[arg(long, default_value = "adam", value_parser = ["adam", "sgd"])]
    pub optimizer: String,
    /// Largest accepted L2 norm of an update.
    #[arg(long, default_value_t = 1.0e4, value_parser = parse::positive(1e12))]
    pub max_update_norm: f64,
    /// Update codec accepted from clients; repeat it (or separate with commas) for several, most
    /// preferred first. Clients use the first they know. The first also sets the delta downloads
    /// (none for safetensors-f32). One of: safetensors-f32, dense-f16, dense-int8, sparse-f32,
    /// sparse-f16, sparse-int8, topk-f32, topk-f16, topk-int8. The default moved 1/9.9 of dense
    /// f32's bytes at the same accuracy (BENCHMARKS.md "Update codecs"); safetensors-f32 stays
    /// accepted from clients that know nothing else. See README "Update codecs".
    #[arg(long = "update-codec", env = "FL_UPDATE_CODEC", value_delimiter = ',', value_parser = parse_update_codec, default_value = "topk-int8,safetensors-f32")]
    pub update_codec: Vec<UpdateCodec>,
}

fn parse_update_codec(name: &str) -> Result<UpdateCodec, String> {
    name.parse().map_err(|e: fl_common::codec::CodecError| e.to_string())
}

/// What a [`RoundSettings`] holds besides [`TrainingArgs`]: the schedule of the rounds.
#[derive(Clone, Debug)]
pub struct RoundSchedule {
    /// Total rounds.
    pub rounds: u32,
    /// Fewest updates that make a round.
    pub min_clients: usize,
    /// Updates wanted per round (0: every connected client).
    pub clients_per_round: usize,
    /// Over-sampling factor.
    pub over_sample: f64,
    /// How long an attempt waits for updates.
    pub round_timeout: Duration,
    /// Base seed.
    pub seed: u64,
    /// Attempts in a row that fail for the same reasons before the federation stops.
    pub max_failed_attempts: u32,
    /// Learning-rate schedule and early stopping.
    pub long_run: long_run::LongRunArgs,
}

impl TrainingArgs {
    /// The model flags of [`ServeConfig::model`].
    pub fn model_args(&self) -> ModelArgs {
        ModelArgs { kind: self.model, labels: self.labels.clone(), arch: self.arch.clone() }
    }

    /// The engine's settings: these training flags on `schedule`.
    pub fn round_settings(&self, schedule: RoundSchedule) -> RoundSettings {
        RoundSettings {
            rounds: schedule.rounds,
            min_clients: schedule.min_clients,
            clients_per_round: schedule.clients_per_round,
            over_sample: schedule.over_sample,
            round_timeout: schedule.round_timeout,
            local_epochs: self.local_epochs,
            batch_size: self.batch_size,
            lr: self.lr,
            optimizer: self.optimizer.clone(),
            seed: schedule.seed,
            max_update_norm: self.max_update_norm,
            update_codecs: self.update_codec.clone(),
            max_failed_attempts: schedule.max_failed_attempts,
            long_run: schedule.long_run,
        }
    }
}

impl ModelArgs {
    /// The spec of a new federation: the kind's defaults, then the given flags.
    fn new_spec(&self, labels: Vec<String>) -> Result<ModelSpec> {
        self.arch
            .spec(self.kind.unwrap_or(ModelKind::Fasttext), labels)
            .map_err(|e| anyhow::anyhow!("invalid model flags: {e}"))
    }

    /// Lists the given flags that differ from `spec`.
    fn conflicts_with(&self, spec: &ModelSpec) -> Vec<String> {
        let mut conflicts = Vec::new();
        if let Some(k) = self.kind.filter(|k| *k != spec.kind) {
            conflicts.push(format!("--model {k} (model: {})", spec.kind));
        }
        if let Some(l) = self.labels.as_ref().filter(|l| **l != spec.labels) {
            conflicts.push(format!("--labels {} (model: {})", l.join(","), spec.labels.join(",")));
        }
        conflicts.extend(self.arch.conflicts_with(spec));
        conflicts
    }
}

/// Everything `serve` needs.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// State directory.
    pub state_dir: PathBuf,
    /// Model flags.
    pub model: ModelArgs,
    /// Labelled CSV for centralized evaluation.
    pub eval_data: Option<PathBuf>,
    /// Rounds and training config.
    pub settings: RoundSettings,
    /// Names for the server certificate.
    pub tls_sans: Vec<String>,
    /// Seed of the initial model.
    pub seed: u64,
    /// A model file to start a new federation from instead of random weights.
    pub init_model: Option<PathBuf>,
    /// Where uploads are spooled; `None` is files in `STATE/spool/`. Tests inject a failing one.
    pub spool: Option<Arc<dyn Spool>>,
    /// The HTTP side port's view, told when the gRPC port accepts clients (`/readyz`).
    pub dashboard: Option<Arc<http::Dashboard>>,
    /// Differential privacy flags; all unset is DP off (or, on a restart, the stored ones).
    pub dp: DpArgs,
    /// Secure aggregation flags; off is off (or, on a restart, the stored setting).
    pub secagg: secagg::SecAggArgs,
    /// Aggregation strategy flags; all unset is FedAvg (or, on a restart, the stored ones).
    pub strategy: StrategyArgs,
    /// Federated distillation flags; unset is off (or, on a restart, the stored setting).
    pub distill: distill::DistillArgs,
    /// The encodings downloads are compressed in for a client that asks for one (`serve
    /// --compression`); compressed uploads are read in any encoding regardless.
    pub compression: Vec<fl_common::tls::Compression>,
}

/// How `serve` ended.
#[derive(Debug, PartialEq, Eq)]
pub enum ServeOutcome {
    /// All rounds are done and the final model is written.
    Finished,
    /// Stopped by a signal; state is saved up to the last completed round.
    Interrupted,
}

/// What `serve` prepares before it listens: the federation, created or loaded.
struct Prepared {
    coord: Coordinator,
    tls: rustls::ServerConfig,
    eval: Option<Arc<dyn Evaluator>>,
    new_token: Option<JoinToken>,
    elapsed_s: f64,
}

/// Creates or opens the federation in `config.state_dir`, serves on `listener` and runs the
/// rounds. `shutdown` stops it early.
pub async fn serve(
    config: ServeConfig,
    backend: Arc<dyn ModelBackend>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<ServeOutcome> {
    // Creating a federation, reading the model and checking the eval data block: not on the runtime.
    let prepared = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || prepare(&config, backend.as_ref())).await??
    };
    let Prepared { coord, tls, eval, new_token, elapsed_s } = prepared;
    let coord = Arc::new(coord);
    let state = coord.state.clone();
    let addr = listener.local_addr()?;
    let background = CancellationToken::new();
    let status_writer = tokio::spawn(coordinator::write_status(coord.clone(), background.clone()));
    tokio::spawn(coordinator::watch_registry(coord.clone(), REGISTRY_POLL, background.clone()));
    let server_stop = CancellationToken::new();
    let spool = config.spool.clone().unwrap_or_else(|| Arc::new(FileSpool));
    let server = tokio::spawn({
        let (coord, stop, compression) = (coord.clone(), server_stop.clone(), config.compression.clone());
        async move {
            let result = run_server(coord, spool, &compression, listener, tls, stop).await;
            if let Err(e) = &result {
                tracing::error!("the gRPC server stopped: {e:#}");
            }
            result
        }
    });

    // The listener accepts from here on: publish the address and the token.
    let published = {
        let (state, token) = (state.clone(), new_token.clone());
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            if let Some(token) = token {
                fl_common::files::write_atomic(&state.path("join-token"), format!("{token}\n").as_bytes(), 0o600)?;
            }
            fl_common::files::write_atomic(&state.path("listen-addr"), addr.to_string().as_bytes(), 0o644)
        })
    };
    published.await??;
    if let Some(token) = new_token {
        // A closed stdout must not stop a coordinator: these lines are also in the state dir.
        fl_common::cli::print_line(&format!("join token: {token}"));
        fl_common::cli::print_line(&format!("(also in {}, mode 0600)", state.path("join-token").display()));
    }
    fl_common::cli::print_line(&format!("coordinator listening on {addr}"));
    if let Some(dashboard) = &config.dashboard {
        dashboard.set_ready(true);
    }
    info!(%addr, completed = coord.completed_rounds(), rounds = config.settings.rounds, "coordinator serving");

    let rounds = coordinator::run_rounds(coord.clone(), eval, shutdown.clone(), elapsed_s).await;
    let outcome = match rounds {
        Ok(())
            if coord.completed_rounds() >= config.settings.rounds
                || coord.budget_exhausted()
                || coord.early_stopped() =>
        {
            coordinator::finish(&coord).await?;
            // A client busy with a round's work (a training that its next heartbeat cancels, an
            // upload) reads the end only after it: it gets a while to, or it retries forever.
            coordinator::drain(&coord, Duration::from_secs(10)).await;
            Ok(ServeOutcome::Finished)
        }
        Ok(()) => Ok(ServeOutcome::Interrupted),
        Err(e) => Err(e),
    };
    if let Some(dashboard) = &config.dashboard {
        dashboard.set_ready(false);
    }
    server_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    background.cancel();
    let _ = status_writer.await;
    // When clients were last seen, noted since the watcher's last write.
    let registry = coord.registry.clone();
    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || registry.flush_seen()).await {
        tracing::warn!("could not write when clients were last seen: {e}");
    }
    outcome
}

/// Creates or opens the federation in `config.state_dir` exactly as [`serve`] does, for driving
/// in process (`fl-sim`) instead of serving: `clients` are the virtual clients, enrolled in the
/// registry. Blocking.
pub fn prepare_in_process(
    config: &ServeConfig,
    backend: &dyn ModelBackend,
    clients: &[String],
) -> Result<coordinator::InProcessFederation> {
    let Prepared { coord, eval, elapsed_s, .. } = prepare(config, backend)?;
    coordinator::InProcessFederation::new(coord, eval, elapsed_s, clients)
}

/// How often the registry file is checked for changes made by the admin CLI.
const REGISTRY_POLL: Duration = Duration::from_secs(1);

/// Creates the federation, or loads it and checks the flags against it. Blocking.
fn prepare(config: &ServeConfig, backend: &dyn ModelBackend) -> Result<Prepared> {
    let state = StateDir::new(&config.state_dir);
    let mut new_token = None;
    // Bad DP and secure-aggregation flags fail before anything is created.
    let new_secagg = config.secagg.resolve()?;
    let mut dp_args = config.dp.clone();
    if new_secagg.is_some() && dp_args.clip_on.is_none() && dp_args.noise_multiplier.is_some() && !dp_args.adaptive_clip
    {
        // The coordinator cannot clip what it cannot see: under secure aggregation clients clip.
        dp_args.clip_on = Some(dp::ClipSite::Client);
    }
    let new_dp = dp_args.resolve()?;
    let new_strategy = config.strategy.resolve()?;
    if config.settings.long_run.early_stop_patience.is_some() && config.eval_data.is_none() {
        return Err(fl_common::cli::Permanent::error(
            "--early-stop-patience needs --eval-data (a validation split): it watches the evaluation loss",
        ));
    }
    let (mut record, ca) = if state.exists() {
        let (record, ca) = state.load()?;
        let ledger = DpLedger::load(state.root())?;
        let conflicts = config.dp.conflicts_with(ledger.as_ref().map(|l| &l.config));
        if !conflicts.is_empty() {
            return Err(fl_common::cli::Permanent::error(format!(
                "these flags would change the existing federation's differential privacy: {}; use a new --state-dir for a new federation",
                conflicts.join(", ")
            )));
        }
        let conflicts = config.strategy.conflicts_with(&StrategyConfig::load(state.root())?);
        if !conflicts.is_empty() {
            return Err(fl_common::cli::Permanent::error(format!(
                "these flags would change the existing federation's aggregation strategy: {}; use a new --state-dir for a new federation",
                conflicts.join(", ")
            )));
        }
        let conflicts = config.model.conflicts_with(&record.spec);
        if !conflicts.is_empty() {
            return Err(fl_common::cli::Permanent::error(format!(
                "these flags would change the existing federation's model: {}; use a new --state-dir for a new federation",
                conflicts.join(", ")
            )));
        }
        config.distill.settle(state.root(), &record.spec, backend)?;
        if config.init_model.is_some() {
            tracing::warn!("--init-model is ignored: the federation already exists and resumes from its last round");
        }
        info!(dir = %state.root().display(), "resuming the federation");
        (record, ca)
    } else {
        let (spec, init_weights) = match &config.init_model {
            Some(path) => {
                let (spec, weights) = load_init_model(backend, path)?;
                let conflicts = config.model.conflicts_with(&spec);
                if !conflicts.is_empty() {
                    return Err(fl_common::cli::Permanent::error(format!(
                        "--init-model {}: the model does not fit the flags: {}",
                        path.display(),
                        conflicts.join(", ")
                    )));
                }
                (spec, Some(weights))
            }
            None => {
                let labels = match (&config.model.labels, &config.eval_data) {
                    (Some(l), _) => l.clone(),
                    (None, Some(path)) => backend.labels_of(path)?,
                    (None, None) => {
                        return Err(fl_common::cli::Permanent::error(
                            "a new federation needs its labels: give --labels a,b,c or --eval-data CSV",
                        ))
                    }
                };
                if labels.len() < 2 {
                    return Err(fl_common::cli::Permanent::error(format!(
                        "a classifier needs at least 2 labels, got {labels:?}"
                    )));
                }
                (config.model.new_spec(labels)?, None)
            }
        };
        // Check the eval data before anything is created, so a bad file leaves no half-made federation.
        if let Some(path) = &config.eval_data {
            backend.evaluator(path, &spec)?;
        }
        if let Some(secagg) = &new_secagg {
            // The same checks `with_secagg` makes, before anything is created.
            if new_dp.as_ref().is_some_and(|dp| dp.clip_on != dp::ClipSite::Client || dp.adaptive.is_some()) {
                return Err(fl_common::cli::Permanent::error(secagg::DP_NEEDS_CLIENT_CLIP));
            }
            new_strategy.check_secure_aggregation().map_err(fl_common::cli::Permanent::error)?;
            secagg.quantization(secagg::max_participants(&config.settings))?;
        }
        if let Some(dp) = &new_dp {
            // Checks the noise split before anything is created.
            DpFedAvg::new(dp, dp.clip_norm, expected_clients_per_round(&config.settings))?;
        }
        new_strategy.check_runs_with(config.settings.min_clients, new_dp.is_some())?;
        let teacher = config.distill.resolve(&spec, backend)?;
        check_async_settings(&new_strategy, &config.settings)?;
        let (record, ca) = state.create(&spec, &config.tls_sans)?;
        if let Some(teacher) = &teacher {
            teacher.save(state.root())?;
        }
        new_strategy.save(state.root())?;
        if let Some(dp) = new_dp {
            DpLedger::new(dp).save(state.root())?;
        }
        if let Some(secagg) = &new_secagg {
            secagg.save(state.root())?;
        }
        let initial = match init_weights {
            Some(weights) => weights,
            None => backend.initial_weights(&record.spec, config.seed)?,
        };
        let bytes = fl_common::encode_model(&record.spec, &initial);
        fl_common::files::write_atomic(&state.round_model_path(0), &bytes, 0o644)?;
        let token = JoinToken::generate(&record.spec.federation);
        RegistryStore::create(state.root())?.update(|r| r.add_token(&token, None, None, now_unix()))?;
        info!(dir = %state.root().display(), labels = record.spec.labels.join(","), "created a new federation");
        new_token = Some(token);
        (record, ca)
    };
    let spec = record.spec.clone();
    let server_cert = state.server_cert(&mut record, &ca, &config.tls_sans)?;
    let progress = state.recover()?;
    let model_path = state.round_model_path(progress.completed_round);
    let bytes = std::fs::read(&model_path).with_context(|| format!("reading {}", model_path.display()))?;
    let (model_spec, global) = decode_model(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", model_path.display()))?;
    model_spec.check_compatible(&spec).map_err(|e| anyhow::anyhow!("{}: {e}", model_path.display()))?;
    let eval = match &config.eval_data {
        Some(path) => {
            let set = backend.evaluator(path, &spec)?;
            info!(rows = set.len(), file = %path.display(), "eval data checked");
            Some(set)
        }
        None => None,
    };
    let registry = Arc::new(RegistryStore::open(state.root())?);
    let tls = fl_common::tls::server_config(&server_cert, &ca.cert_pem)?;
    let global = GlobalModel::encode(&spec, global);
    let ledger = DpLedger::load(state.root())?;
    let strategy = StrategyConfig::load(state.root())?;
    strategy.check_runs_with(config.settings.min_clients, ledger.is_some())?;
    check_async_settings(&strategy, &config.settings)?;
    if strategy != StrategyConfig::default() {
        info!(strategy = %strategy.strategy, config = ?strategy, "aggregation strategy");
    }
    let strategy = StrategyRuntime::open(strategy, state.root(), progress.completed_round)?;
    let best = long_run::BestRound::from_metrics(&state.metrics_path())
        .with_context(|| format!("reading {}", state.metrics_path().display()))?;
    if let Some(round) = best.round() {
        // The best model may be missing if a crash came between a commit and its write.
        let from = state.round_model_path(round);
        std::fs::copy(&from, state.best_model_path())
            .with_context(|| format!("copying {} to {}", from.display(), state.best_model_path().display()))?;
    }
    let mut coord =
        Coordinator::new(state, registry, spec, config.settings.clone(), ca, global, progress.completed_round)
            .with_strategy(strategy)
            .with_best(best)
            .resume_download_feedback()?;
    if let Some(ledger) = ledger {
        let strategy = DpFedAvg::new(&ledger.config, ledger.clip_norm, expected_clients_per_round(&config.settings))?;
        info!(
            noise_multiplier = ledger.config.noise_multiplier,
            clip_norm = ledger.clip_norm,
            clip_on = %ledger.config.clip_on,
            rounds_charged = ledger.accountant.rounds(),
            "differential privacy is on"
        );
        coord = coord.with_dp(ledger, strategy);
    }
    if let Some(secagg) = config.secagg.settle(secagg::SecAggConfig::load(coord.state.root())?)? {
        info!(?secagg, "secure aggregation is on");
        coord = coord.with_secagg(secagg)?;
    }
    if let Some(teacher) = distill::Teacher::load(coord.state.root())? {
        info!(teacher = %teacher.config.source, sha256 = %teacher.config.teacher_sha256, bytes = teacher.config.teacher_bytes, "federated distillation is on");
        coord = coord.with_distill(teacher);
    }
    Ok(Prepared { coord, tls, eval, new_token, elapsed_s: progress.elapsed_s })
}

/// Refuses the round flags that `--mode async` has no use for, rather than ignoring them.
fn check_async_settings(strategy: &StrategyConfig, settings: &RoundSettings) -> Result<()> {
    if strategy.buffered().is_some() && (settings.clients_per_round != 0 || settings.over_sample != 1.0) {
        return Err(fl_common::cli::Permanent::error(
            "--clients-per-round and --over-sample do not apply to --mode async: every connected client \
             trains, and a step takes --buffer-size updates",
        ));
    }
    Ok(())
}

/// The number of updates a round expects, which sizes the noise on the adaptive clip count:
/// `--clients-per-round`, or `--min-clients` when every connected client is asked.
fn expected_clients_per_round(settings: &RoundSettings) -> usize {
    if settings.clients_per_round > 0 {
        settings.clients_per_round
    } else {
        settings.min_clients.max(1)
    }
}

/// Reads a starting model: a model file from a previous federation or from central training.
fn load_init_model(backend: &dyn ModelBackend, path: &std::path::Path) -> Result<(ModelSpec, fl_common::TensorSet)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading --init-model {}", path.display()))?;
    let (mut spec, weights) = decode_model(&bytes)
        .map_err(|e| anyhow::anyhow!("--init-model {}: not a valid model file: {e}", path.display()))?;
    spec.federation.clear();
    // Building the model checks that the weights fit the architecture.
    backend.check_weights(&spec, &weights).with_context(|| format!("--init-model {}", path.display()))?;
    Ok((spec, weights))
}

async fn run_server(
    coord: Arc<Coordinator>,
    spool: Arc<dyn Spool>,
    compression: &[fl_common::tls::Compression],
    listener: TcpListener,
    tls: rustls::ServerConfig,
    stop: CancellationToken,
) -> Result<()> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<fl_proto::pb::federation_server::FederationServer<service::FederationService>>()
        .await;
    let mut federation =
        fl_proto::pb::federation_server::FederationServer::new(service::FederationService::new(coord.clone(), spool))
            .max_decoding_message_size(service::MAX_UPLOAD_CHUNK_BYTES + 4096);
    // Compressed and plain clients alike: every encoding is read; a download is compressed only
    // in an encoding the client asks for.
    for encoding in fl_common::tls::Compression::ENCODINGS {
        federation = federation.accept_compressed(encoding);
    }
    for encoding in compression.iter().filter_map(|c| c.encoding()) {
        federation = federation.send_compressed(encoding);
    }
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(fl_common::tls::KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(fl_common::tls::KEEPALIVE_TIMEOUT))
        .add_service(health_service)
        .add_service(federation)
        .serve_with_incoming_shutdown(
            listener::tls_incoming(listener, tls, move || coord.record_failed_handshake()),
            stop.cancelled_owned(),
        )
        .await?;
    Ok(())
}
