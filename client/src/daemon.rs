//! The client daemon: join the federation, and for each round fetch the global model, train on
//! the local data, and upload only the weight delta. Reconnects with backoff; an identity the
//! coordinator refuses ends it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use fl_common::tensors::{sha256_hex, CODEC_SAFETENSORS_F32};
use fl_common::ModelSpec;
use fl_proto::pb::{self, federation_client::FederationClient};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tracing::{info, warn};

use fl_common::decode_model;
use fl_common::tls::connect;
use fl_model::data::LabelledTexts;
use fl_model::model::{default_device, Classifier};
use fl_model::personal::{personal_round, Personalization};
use fl_model::train::{train, EncodedDataset, TrainConfig};

use crate::identity::Identity;

/// Bytes per chunk of an upload.
pub const CHUNK_BYTES: usize = 1 << 20;

/// What the daemon needs.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// `https://HOST:PORT` of the coordinator.
    pub coordinator: String,
    /// The enrolled identity.
    pub identity: Identity,
    /// The local data, already read and checked.
    pub data: Arc<LabelledTexts>,
    /// Name reported to the coordinator.
    pub name: String,
    /// Longest wait between reconnection attempts.
    pub max_backoff: Duration,
    /// libtorch intra-op threads for local training.
    pub threads: i32,
    /// Keep a personal model beside the global one, if set.
    pub personal: Option<PersonalConfig>,
    /// A test tool: send poisoned updates (`--attack`).
    pub attack: Option<crate::attack::Attack>,
}

/// How this client trains a round: threads, personalisation, and the test-only attack.
#[derive(Debug)]
struct LocalSetup {
    threads: i32,
    personal: Option<PersonalConfig>,
    attack: Option<crate::attack::Attack>,
}

/// How a client personalises, and where it keeps its personal model.
#[derive(Debug, Clone)]
pub struct PersonalConfig {
    /// The method.
    pub method: Personalization,
    /// The local held-out split, never trained on: personal and global accuracy are measured on it.
    pub test: Arc<LabelledTexts>,
    /// `STATE/personal`: `model.safetensors`, `accuracy.json`, `metrics.jsonl`.
    pub dir: PathBuf,
}

impl PersonalConfig {
    /// The personal model file under a client's state dir.
    pub fn model_path(state_dir: &Path) -> PathBuf {
        state_dir.join("personal").join("model.safetensors")
    }
}

/// Personal and global accuracy on the local held-out split after one round.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PersonalAccuracy {
    /// The method, as text.
    pub method: String,
    /// The round.
    pub round: u32,
    /// Rows trained on.
    pub train_rows: usize,
    /// Rows of the local held-out split.
    pub test_rows: usize,
    /// Accuracy of the round's global model (as received) on the held-out split.
    pub global_accuracy: f64,
    /// Accuracy of the personal model after the round on the held-out split.
    pub personal_accuracy: f64,
}

/// Why the daemon stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum DaemonExit {
    /// The federation finished all its rounds.
    FederationFinished,
    /// Asked to stop.
    Shutdown,
}

/// An error that retrying cannot fix: the coordinator refused this identity, or the data does
/// not fit the federation.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct FatalError(pub String);

/// Runs until the federation finishes, `shutdown` fires, or a fatal error.
pub async fn run(config: DaemonConfig, shutdown: CancellationToken) -> Result<DaemonExit> {
    let mut backoff = Backoff::new(config.max_backoff);
    let mut encoded: Option<(ModelSpec, Arc<EncodedDataset>)> = None;
    loop {
        let session = session(&config, &mut encoded, &mut backoff, &shutdown);
        let outcome = tokio::select! {
            outcome = session => outcome,
            _ = shutdown.cancelled() => return Ok(DaemonExit::Shutdown),
        };
        match outcome {
            Ok(Some(exit)) => return Ok(exit),
            Ok(None) => warn!("coordinator closed the work stream; reconnecting"),
            Err(e) if e.is::<FatalError>() => return Err(e),
            Err(e) => warn!("{e:#}; reconnecting"),
        }
        let wait = backoff.next_delay();
        info!(seconds = format!("{:.1}", wait.as_secs_f64()), "waiting before reconnecting");
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => return Ok(DaemonExit::Shutdown),
        }
    }
}

/// Exponential backoff with ±25 % jitter.
#[derive(Debug)]
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    const START: Duration = Duration::from_millis(250);

    fn new(max: Duration) -> Self {
        Backoff { next: Self::START, max }
    }

    fn reset(&mut self) {
        self.next = Self::START;
    }

    fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        base.mul_f64(rand::random_range(0.75..1.25))
    }
}

/// Classifies a failed call: refusals of our identity are fatal.
fn classify(status: tonic::Status) -> anyhow::Error {
    match status.code() {
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
            anyhow!(FatalError(format!("the coordinator refused this client: {}", status.message())))
        }
        _ => {
            let text = format!("{status}");
            if is_certificate_alert(&text) {
                anyhow!(FatalError(format!("the coordinator rejected this client's certificate during the TLS handshake ({text}); re-enroll with a fresh join token")))
            } else {
                anyhow!("coordinator call failed: {}", status.message())
            }
        }
    }
}

/// True when a TLS error says that a certificate was refused: ours by the coordinator (an alert),
/// or the coordinator's by us (it is not signed by our federation's CA). Retrying cannot fix either.
fn is_certificate_alert(text: &str) -> bool {
    [
        "BadCertificate",
        "UnknownCA",
        "CertificateRevoked",
        "CertificateUnknown",
        "DecryptError",
        "AccessDenied",
        "invalid peer certificate",
        "CertificateRequired",
    ]
    .iter()
    .any(|a| text.contains(a))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// One connection: join, then serve instructions. `Ok(None)` means reconnect.
async fn session(
    config: &DaemonConfig,
    encoded: &mut Option<(ModelSpec, Arc<EncodedDataset>)>,
    backoff: &mut Backoff,
    shutdown: &CancellationToken,
) -> Result<Option<DaemonExit>> {
    let channel = match connect(&config.coordinator, &config.identity.ca_pem, Some(&config.identity.key)).await {
        Ok(c) => c,
        Err(e) => {
            let e = anyhow::Error::from(e);
            let chain = e.chain().map(|c| c.to_string()).collect::<Vec<_>>().join(": ");
            if is_certificate_alert(&chain) {
                bail!(FatalError(format!("the coordinator rejected this client's certificate ({chain})")));
            }
            return Err(e.context(format!("connecting to {}", config.coordinator)));
        }
    };
    let mut client = FederationClient::new(channel.clone());
    let join = pb::JoinRequest { name: config.name.clone(), num_examples: config.data.len() as u64 };
    let mut stream = client.join(join).await.map_err(classify)?.into_inner();
    loop {
        let message = match stream.message().await {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(None),
            Err(status) => {
                let chain = error_chain(&status);
                if is_certificate_alert(&chain) {
                    bail!(FatalError(format!("the coordinator rejected this client's certificate ({chain})")));
                }
                return Err(classify(status));
            }
        };
        match message.kind {
            Some(pb::instruction::Kind::Welcome(welcome)) => {
                backoff.reset();
                let spec: ModelSpec =
                    serde_json::from_str(&welcome.model_spec_json).context("coordinator sent a bad model spec")?;
                info!(client_id = %welcome.client_id, rounds_completed = welcome.rounds_completed, rounds_total = welcome.rounds_total, "joined the federation");
                if let Some(personal) = &config.personal {
                    personal.test.label_indices(&spec.labels).map_err(|e| anyhow!(FatalError(e.to_string())))?;
                }
                if encoded.as_ref().map(|(s, _)| s != &spec).unwrap_or(true) {
                    *encoded = Some((spec.clone(), Arc::new(encode_for(&spec, &config.data)?)));
                }
            }
            Some(pb::instruction::Kind::Round(task)) => {
                let (spec, data) = encoded.clone().ok_or_else(|| anyhow!("round task before welcome"))?;
                let (round, attempt) = (task.round, task.attempt);
                let personal = config.personal.clone();
                let local = LocalSetup { threads: config.threads, personal, attack: config.attack };
                match do_round(&mut client, channel.clone(), &spec, data, task, local, shutdown).await {
                    Ok(RoundOutcome::Accepted) => info!(round, attempt, "update accepted"),
                    Ok(RoundOutcome::Refused(why)) => warn!(round, attempt, "update refused: {why}"),
                    Ok(RoundOutcome::Closed) => info!(round, attempt, "round closed before our update; skipped"),
                    Err(e) if e.is::<FatalError>() => return Err(e),
                    Err(e) => warn!(round, attempt, "round failed: {e:#}"),
                }
            }
            Some(pb::instruction::Kind::Finished(done)) => {
                info!(rounds = done.rounds_completed, "federation finished");
                return Ok(Some(DaemonExit::FederationFinished));
            }
            None => {}
        }
    }
}

/// Tokenizes the local data for the federation's model, checking every label.
fn encode_for(spec: &ModelSpec, data: &LabelledTexts) -> Result<EncodedDataset> {
    let labels = data.label_indices(&spec.labels).map_err(|e| anyhow!(FatalError(e.to_string())))?;
    let probe = Classifier::new(spec.clone(), tch::Device::Cpu, 0).map_err(|e| anyhow!(FatalError(e.to_string())))?;
    Ok(EncodedDataset::encode(&probe, &data.texts, labels))
}

enum RoundOutcome {
    Accepted,
    Refused(String),
    Closed,
}

async fn fetch_model(client: &mut FederationClient<Channel>, round: u32, attempt: u32) -> Result<Vec<u8>> {
    let mut stream = client.fetch_model(pb::FetchModelRequest { round, attempt }).await.map_err(classify)?.into_inner();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.message().await.map_err(classify)? {
        if chunk.offset != bytes.len() as u64 {
            bail!("model chunk out of order: offset {} after {} bytes", chunk.offset, bytes.len());
        }
        if bytes.is_empty() {
            bytes.reserve(chunk.total_bytes.min(1 << 34) as usize);
        }
        bytes.extend_from_slice(&chunk.data);
    }
    Ok(bytes)
}

#[allow(clippy::too_many_arguments)]
async fn do_round(
    client: &mut FederationClient<Channel>,
    channel: Channel,
    spec: &ModelSpec,
    data: Arc<EncodedDataset>,
    task: pb::RoundTask,
    local: LocalSetup,
    shutdown: &CancellationToken,
) -> Result<RoundOutcome> {
    let LocalSetup { threads, personal, attack } = local;
    let (round, attempt) = (task.round, task.attempt);
    // A finite positive clip norm asks for clipping here; anything else means none.
    let dp_clip_norm = if task.dp_clip_norm.is_finite() && task.dp_clip_norm > 0.0 { task.dp_clip_norm } else { 0.0 };
    let config = task.config.ok_or_else(|| anyhow!("round task without a training config"))?;
    let train_config = TrainConfig {
        epochs: config.local_epochs,
        batch_size: config.batch_size,
        lr: f64::from(config.learning_rate),
        optimizer: config.optimizer.parse().map_err(|e: String| anyhow!(e))?,
        seed: config.seed,
        proximal_mu: match config.proximal_mu {
            mu if mu.is_finite() && mu >= 0.0 => mu,
            mu => bail!("round task with an invalid proximal_mu {mu}: must be a finite number, zero or more"),
        },
    };
    let bytes = fetch_model(client, round, attempt).await?;
    let (model_spec, global) = decode_model(&bytes).map_err(|e| anyhow!("bad global model: {e}"))?;
    if let Err(e) = model_spec.check_compatible(spec) {
        bail!("global model does not match the federation spec: {e}");
    }
    if model_spec.federation != spec.federation {
        bail!("global model is from another federation (CA {} instead of {})", model_spec.federation, spec.federation);
    }

    let progress = Arc::new(AtomicU32::new(0f32.to_bits()));
    let cancel = shutdown.child_token();
    let heartbeat =
        tokio::spawn(heartbeat_loop(FederationClient::new(channel), round, attempt, progress.clone(), cancel.clone()));
    let training = {
        let (progress, cancel) = (progress.clone(), cancel.clone());
        tokio::task::spawn_blocking(move || -> Result<_> {
            // libtorch's thread count is per OS thread: set it on the thread that trains, or a
            // fresh blocking thread uses every core and several clients on one host oversubscribe.
            tch::set_num_threads(threads);
            let started = std::time::Instant::now();
            let report = |p: f32, _: &_| progress.store(p.to_bits(), Ordering::Relaxed);
            let (stats, mut delta) = match &personal {
                None => {
                    let mut model = Classifier::from_tensors(model_spec, &global, default_device())?;
                    let stats = train(&mut model, &data, &train_config, &cancel, report);
                    (stats, model.to_tensors().minus(&global))
                }
                Some(personal) => {
                    let (stats, delta) =
                        personal_step(personal, &model_spec, &global, &data, &train_config, round, &cancel, report)?;
                    (stats, delta)
                }
            };
            if dp_clip_norm > 0.0 {
                // Differential privacy with clipping on the client: only the clipped update leaves.
                delta.clip_l2_norm(dp_clip_norm);
            }
            if let Some(attack) = attack {
                // An attacker ignores the clip: the coordinator's defences must hold anyway.
                attack.apply(&mut delta, &mut rand::rng());
            }
            Ok((stats, delta.encode(None), started.elapsed().as_secs_f64()))
        })
    };
    let result = training.await.context("training task panicked");
    cancel.cancel();
    let _ = heartbeat.await;
    let (stats, payload, train_s) = result??;
    if stats.cancelled {
        return Ok(RoundOutcome::Closed);
    }
    info!(
        round,
        examples = stats.examples,
        loss = format!("{:.4}", stats.loss),
        accuracy = format!("{:.4}", stats.accuracy),
        examples_per_s = format!("{:.0}", stats.examples_per_s),
        train_s = format!("{train_s:.3}"),
        "local training done"
    );

    let header = pb::UpdateHeader {
        round,
        attempt,
        codec: CODEC_SAFETENSORS_F32.to_string(),
        total_bytes: payload.len() as u64,
        num_examples: stats.examples as u64,
        train_loss: stats.loss,
        train_accuracy: stats.accuracy,
    };
    let digest = sha256_hex(&payload);
    let chunks = upload_chunks(header, payload, digest);
    let ack = client.submit_update(tokio_stream::iter(chunks)).await;
    match ack {
        Ok(ack) => {
            let ack = ack.into_inner();
            Ok(if ack.accepted { RoundOutcome::Accepted } else { RoundOutcome::Refused(ack.message) })
        }
        Err(status) if status.code() == tonic::Code::FailedPrecondition => {
            Ok(RoundOutcome::Refused(status.message().to_string()))
        }
        Err(status) => Err(classify(status)),
    }
}

/// A personalising client's round: trains the upload and the personal model, measures both
/// models on the local held-out split, and stores the personal model and the accuracies.
#[allow(clippy::too_many_arguments)]
fn personal_step(
    personal: &PersonalConfig,
    spec: &ModelSpec,
    global: &fl_common::TensorSet,
    data: &EncodedDataset,
    config: &TrainConfig,
    round: u32,
    cancel: &CancellationToken,
    progress: impl FnMut(f32, &fl_model::train::TrainStats),
) -> Result<(fl_model::train::TrainStats, fl_common::TensorSet)> {
    let model_path = personal.dir.join("model.safetensors");
    // The personal model of an earlier round (or run) of this federation, if it still fits.
    let previous = std::fs::read(&model_path)
        .ok()
        .and_then(|bytes| decode_model(&bytes).ok())
        .filter(|(s, _)| s.check_compatible(spec).is_ok() && s.federation == spec.federation)
        .map(|(_, weights)| weights);
    let device = default_device();
    let outcome =
        personal_round(spec, global, previous.as_ref(), data, config, personal.method, device, cancel, progress)?;
    if outcome.stats.cancelled {
        return Ok((outcome.stats, outcome.delta));
    }
    let labels = personal.test.label_indices(&spec.labels)?;
    let probe = Classifier::new(spec.clone(), tch::Device::Cpu, 0)?;
    let test = EncodedDataset::encode(&probe, &personal.test.texts, labels);
    let accuracy_of = |weights: &fl_common::TensorSet| -> Result<f64> {
        let model = Classifier::from_tensors(spec.clone(), weights, device)?;
        Ok(model.evaluate(&test.docs, &test.labels).0)
    };
    let accuracy = PersonalAccuracy {
        method: personal.method.to_string(),
        round,
        train_rows: data.len(),
        test_rows: test.len(),
        global_accuracy: accuracy_of(global)?,
        personal_accuracy: accuracy_of(&outcome.personal)?,
    };
    std::fs::create_dir_all(&personal.dir).with_context(|| format!("creating {}", personal.dir.display()))?;
    let bytes = fl_common::model_file::encode_model(spec, &outcome.personal);
    fl_common::files::write_atomic(&model_path, &bytes, 0o600)
        .with_context(|| format!("writing {}", model_path.display()))?;
    let json = serde_json::to_string(&accuracy)?;
    let path = personal.dir.join("accuracy.json");
    fl_common::files::write_atomic(&path, json.as_bytes(), 0o644)
        .with_context(|| format!("writing {}", path.display()))?;
    let path = personal.dir.join("metrics.jsonl");
    fl_common::files::append_line(&path, &json).with_context(|| format!("writing {}", path.display()))?;
    info!(
        round,
        method = %personal.method,
        global_accuracy = format!("{:.4}", accuracy.global_accuracy),
        personal_accuracy = format!("{:.4}", accuracy.personal_accuracy),
        test_rows = accuracy.test_rows,
        "personal model updated"
    );
    Ok((outcome.stats, outcome.delta))
}

/// The messages of an upload: header, data in [`CHUNK_BYTES`] pieces, trailer. Data chunks are cut
/// from `payload` as the stream is polled, so one chunk at a time is copied.
pub fn upload_chunks(
    header: pb::UpdateHeader,
    payload: Vec<u8>,
    sha256: String,
) -> impl Iterator<Item = pb::UpdateChunk> + Send + 'static {
    use pb::update_chunk::Kind;
    let pieces = payload.len().div_ceil(CHUNK_BYTES);
    let data = (0..pieces).map(move |i| {
        let piece = &payload[i * CHUNK_BYTES..((i + 1) * CHUNK_BYTES).min(payload.len())];
        pb::UpdateChunk {
            kind: Some(Kind::Data(pb::UpdateData { offset: (i * CHUNK_BYTES) as u64, data: piece.to_vec() })),
        }
    });
    std::iter::once(pb::UpdateChunk { kind: Some(Kind::Header(header)) })
        .chain(data)
        .chain(std::iter::once(pb::UpdateChunk { kind: Some(Kind::Trailer(pb::UpdateTrailer { sha256 })) }))
}

async fn heartbeat_loop(
    mut client: FederationClient<Channel>,
    round: u32,
    attempt: u32,
    progress: Arc<AtomicU32>,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let progress = f32::from_bits(progress.load(Ordering::Relaxed));
        match client.heartbeat(pb::HeartbeatRequest { round, attempt, progress }).await {
            Ok(ack) if !ack.get_ref().round_open => {
                info!(round, attempt, "round closed by the coordinator; stopping local training");
                cancel.cancel();
                return;
            }
            Ok(_) => {}
            Err(status) => warn!(round, "heartbeat failed: {}", status.message()),
        }
    }
}
