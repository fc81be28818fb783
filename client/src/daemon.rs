//! The client daemon: join the federation, and for each round fetch the global model, train on
//! the local data, and upload only the weight delta. Reconnects with backoff; an identity the
//! coordinator refuses ends it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use fl_common::codec::{tensor_digest, ErrorFeedback, UpdateCodec};
use fl_common::tensors::sha256_hex;
use fl_common::{ModelSpec, TensorSet};
use fl_proto::pb::{self, federation_client::FederationClient};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tracing::{info, warn};

use fl_common::decode_model;
use fl_common::tls::connect;
use fl_model::data::LabelledTexts;
use fl_model::model::{default_device, Classifier};
use fl_model::personal::{personal_round, Personalization};
use fl_model::train::{train_in, EncodedDataset, TrainConfig};

use crate::held::HeldState;
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
    /// The client's state dir: the held global model and the codec residual live in `codec/`.
    pub state_dir: PathBuf,
    /// A test tool: send poisoned updates (`--attack`).
    pub attack: Option<crate::attack::Attack>,
    /// Compression of the model downloads and update uploads on the wire (`--compression`).
    pub compression: fl_common::tls::Compression,
}

/// How this client trains a round: threads, personalisation, distillation, and the test-only attack.
#[derive(Debug)]
struct LocalSetup {
    threads: i32,
    personal: Option<PersonalConfig>,
    attack: Option<crate::attack::Attack>,
    distill: crate::distill::DistillSetup,
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
    /// `finetune`: epochs of fine-tuning of the final model after the federation.
    pub final_epochs: u32,
    /// `finetune`: shift the final model's head to the local label prior before fine-tuning it
    /// ([`fl_model::personal::LocalPrior`]).
    pub local_prior: bool,
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
    /// True for the final model fine-tuned after the federation (then `global_accuracy` is the
    /// final model's and `round` the number of rounds).
    #[serde(default)]
    pub after_federation: bool,
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
    let mut held = HeldState::new(&config.state_dir);
    loop {
        let session = session(&config, &mut encoded, &mut held, &mut backoff, &shutdown);
        let outcome = tokio::select! {
            outcome = session => outcome,
            _ = shutdown.cancelled() => Ok(Some(DaemonExit::Shutdown)),
        };
        // What the last rounds changed is on disk before the daemon exits or reconnects.
        let saved = match &encoded {
            Some((spec, _)) => held.save(spec).await,
            None => held.settle().await,
        };
        if let Err(e) = saved {
            warn!("could not keep the global model and residual for the next round: {e:#}");
        }
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
    held: &mut HeldState,
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
    if let Some(encoding) = config.compression.encoding() {
        client = client.send_compressed(encoding).accept_compressed(encoding);
    }
    let join = pb::JoinRequest { name: config.name.clone(), num_examples: config.data.len() as u64 };
    let mut stream = client.join(join).await.map_err(classify)?.into_inner();
    let mut client_id = String::new();
    loop {
        let next = loop {
            tokio::select! {
                next = stream.message() => break next,
                // No task for a while: what the last round changed is written now.
                _ = tokio::time::sleep(HeldState::IDLE_SAVE), if held.has_unsaved() => {
                    if let Some((spec, _)) = encoded.as_ref() {
                        held.save_in_background(spec).await;
                    }
                }
            }
        };
        let message = match next {
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
                client_id = welcome.client_id.clone();
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
                let distill =
                    crate::distill::DistillSetup { texts: config.data.clone(), dir: config.state_dir.join("distill") };
                let local = LocalSetup { threads: config.threads, personal, attack: config.attack, distill };
                let ids = (&client_id, channel.clone());
                let round_run = do_round(&mut client, ids, &spec, data, task, local, held, shutdown);
                match round_run.await {
                    Ok(RoundOutcome::Accepted) => info!(round, attempt, "update accepted"),
                    Ok(RoundOutcome::Refused(why)) => warn!(round, attempt, "update refused: {why}"),
                    Ok(RoundOutcome::Closed) => info!(round, attempt, "round closed before our update; skipped"),
                    Ok(RoundOutcome::TrainingFailed(why)) => {
                        warn!(round, attempt, "local training failed: {why}; reported to the coordinator")
                    }
                    Err(e) if e.is::<FatalError>() => return Err(e),
                    Err(e) => warn!(round, attempt, "round failed: {e:#}"),
                }
            }
            Some(pb::instruction::Kind::Finished(done)) => {
                info!(rounds = done.rounds_completed, "federation finished");
                let finetune = config.personal.as_ref().filter(|p| p.method == Personalization::Finetune);
                if let (Some(personal), Some((spec, data))) = (finetune, encoded.clone()) {
                    // The final model is fetched while the work stream is open, then the stream closes.
                    let rounds = done.rounds_completed;
                    let task = pb::RoundTask { round: rounds + 1, ..Default::default() };
                    let tuned = match held.train_config.clone() {
                        None => Err(anyhow!("this run trained no round, so it has no training settings")),
                        Some(train) => {
                            match verified(global_model(&mut client, &spec, &task, held).await, held).await {
                                Ok(last) => {
                                    drop(stream);
                                    let threads = config.threads;
                                    crate::personal::finetune_final(personal, &spec, last, data, train, rounds, threads)
                                        .await
                                        .map(drop)
                                }
                                Err(e) => Err(e.context("fetching the final model")),
                            }
                        }
                    };
                    if let Err(e) = tuned {
                        warn!("the final model was not fine-tuned; the personal model stays the last round's: {e:#}");
                    }
                }
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

/// What training hands to the upload.
enum Body {
    Encoded(Vec<u8>),
    Flat(Vec<f32>),
}

enum RoundOutcome {
    Accepted,
    Refused(String),
    Closed,
    TrainingFailed(String),
}

/// A downloaded model payload: the full model file, the round's aggregate in `codec`, or the
/// distillation teacher.
pub(crate) struct Download {
    pub(crate) bytes: Vec<u8>,
    delta: bool,
    codec: String,
}

/// Streams what `request` asks for, in order.
pub(crate) async fn fetch_model(
    client: &mut FederationClient<Channel>,
    request: pb::FetchModelRequest,
) -> Result<Download> {
    let mut stream = client.fetch_model(request).await.map_err(classify)?.into_inner();
    let mut bytes = Vec::new();
    let (mut delta, mut codec) = (false, String::new());
    while let Some(chunk) = stream.message().await.map_err(classify)? {
        if bytes.is_empty() {
            (delta, codec) = (chunk.delta, chunk.codec.clone());
        }
        if chunk.offset != bytes.len() as u64 {
            bail!("model chunk out of order: offset {} after {} bytes", chunk.offset, bytes.len());
        }
        if bytes.is_empty() {
            bytes.reserve(chunk.total_bytes.min(1 << 34) as usize);
        }
        bytes.extend_from_slice(&chunk.data);
    }
    Ok(Download { bytes, delta, codec })
}

/// The digest check of a global model, still hashing on a blocking thread.
struct DigestCheck {
    round: u32,
    want: String,
    hashing: Option<tokio::task::JoinHandle<String>>,
}

impl DigestCheck {
    /// Waits for the digest: a model that is not the task's is forgotten and refused.
    async fn verify(self, held: &mut HeldState) -> Result<()> {
        let Some(hashing) = self.hashing else { return Ok(()) };
        let digest = hashing.await.context("hashing the global model panicked")?;
        if digest != self.want {
            held.forget_global();
            bail!("the global model of round {} has digest {digest}, the round task says {}", self.round, self.want);
        }
        Ok(())
    }
}

/// The global model of [`global_model`] once its digest is checked.
async fn verified(got: Result<(Arc<TensorSet>, DigestCheck)>, held: &mut HeldState) -> Result<Arc<TensorSet>> {
    let (global, check) = got?;
    check.verify(held).await?;
    Ok(global)
}

/// The global model of `task`: the one held if the task names it, the held one plus the
/// downloaded aggregate when a delta is offered for it, or else the full model. A downloaded
/// model is held, and its digest computed, on a blocking thread: the round trains meanwhile, and
/// the caller verifies it ([`DigestCheck::verify`]) before it sends anything made from it. A
/// model whose digest is not the task's is refused (and forgotten).
async fn global_model(
    client: &mut FederationClient<Channel>,
    spec: &ModelSpec,
    task: &pb::RoundTask,
    held: &mut HeldState,
) -> Result<(Arc<TensorSet>, DigestCheck)> {
    let (round, attempt) = (task.round, task.attempt);
    let want = task.model_digest.clone();
    if let Some(global) = held.global_if(&want) {
        return Ok((global, DigestCheck { round, want, hashing: None }));
    }
    let have = match held.global_if(&task.delta_base_digest) {
        Some(_) => task.delta_base_digest.clone(),
        None => String::new(),
    };
    let request = pb::FetchModelRequest { round, attempt, have_digest: have, ..Default::default() };
    let fetching = std::time::Instant::now();
    let download = fetch_model(client, request).await?;
    let fetched_s = fetching.elapsed().as_secs_f64();
    // The aggregate is applied to the held model in place: it is given up here (a model that
    // fails its digest check below would be forgotten anyway).
    let base = if download.delta { held.take_global_if(&task.delta_base_digest) } else { None };
    let download_len = download.bytes.len();
    let spec = spec.clone();
    let decoded = tokio::task::spawn_blocking(move || -> Result<TensorSet> {
        let global = match (download.delta, base) {
            (true, Some(base)) => {
                let codec: UpdateCodec = download.codec.parse().map_err(|e| anyhow!("bad model delta: {e}"))?;
                let aggregate =
                    codec.decode_sparse(&download.bytes, &base).map_err(|e| anyhow!("bad model delta: {e}"))?;
                // The only reference, unless the last save is still writing it: then a copy.
                let mut global = Arc::try_unwrap(base).unwrap_or_else(|shared| (*shared).clone());
                aggregate.add_to(&mut global, 1.0);
                global
            }
            (true, None) => bail!("the coordinator sent a delta that was not asked for"),
            (false, _) => {
                let (model_spec, global) =
                    decode_model(&download.bytes).map_err(|e| anyhow!("bad global model: {e}"))?;
                if let Err(e) = model_spec.check_compatible(&spec) {
                    bail!("global model does not match the federation spec: {e}");
                }
                if model_spec.federation != spec.federation {
                    bail!(
                        "global model is from another federation (CA {} instead of {})",
                        model_spec.federation,
                        spec.federation
                    );
                }
                global
            }
        };
        Ok(global)
    });
    let global = Arc::new(decoded.await.context("decoding the global model panicked")??);
    tracing::debug!(
        round,
        fetched_s = format!("{fetched_s:.3}"),
        built_s = format!("{:.3}", fetching.elapsed().as_secs_f64() - fetched_s),
        bytes = download_len,
        "global model fetched and built"
    );
    let hashing = {
        let global = global.clone();
        tokio::task::spawn_blocking(move || tensor_digest(&global))
    };
    let check = if want.is_empty() {
        // A task that names no digest: the model is held under its own.
        held.set_global(hashing.await.context("hashing the global model panicked")?, global.clone());
        DigestCheck { round, want, hashing: None }
    } else {
        held.set_global(want.clone(), global.clone());
        DigestCheck { round, want, hashing: Some(hashing) }
    };
    Ok((global, check))
}

#[allow(clippy::too_many_arguments)]
async fn do_round(
    client: &mut FederationClient<Channel>,
    (client_id, channel): (&String, Channel),
    spec: &ModelSpec,
    data: Arc<EncodedDataset>,
    task: pb::RoundTask,
    local: LocalSetup,
    held: &mut HeldState,
    shutdown: &CancellationToken,
) -> Result<RoundOutcome> {
    let LocalSetup { threads, personal, attack, distill } = local;
    let (round, attempt) = (task.round, task.attempt);
    // The coordinator's most preferred codec that this client reads; none listed is the exact one.
    let codec = match task.update_codecs.first() {
        None => UpdateCodec::EXACT,
        Some(_) => task.update_codecs.iter().find_map(|n| n.parse::<UpdateCodec>().ok()).ok_or_else(|| {
            anyhow!("the coordinator accepts no update codec this client knows: {}", task.update_codecs.join(", "))
        })?,
    };
    // A finite positive clip norm asks for clipping here; anything else means none.
    let dp_clip_norm = if task.dp_clip_norm.is_finite() && task.dp_clip_norm > 0.0 { task.dp_clip_norm } else { 0.0 };
    let config = task.config.clone().ok_or_else(|| anyhow!("round task without a training config"))?;
    let secagg = task.secagg.clone();
    let secure = secagg.is_some();
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
    {
        let spec = spec.clone();
        let loaded = std::mem::replace(held, HeldState::new(Path::new("")));
        *held = tokio::task::spawn_blocking(move || {
            let mut loaded = loaded;
            loaded.load(&spec);
            loaded
        })
        .await
        .context("reading the held model panicked")?;
    }
    let received = std::time::Instant::now();
    let (global, digest_check) = global_model(client, spec, &task, held).await?;
    let model_s = received.elapsed().as_secs_f64();
    held.train_config = Some(train_config.clone());
    let setting = (spec, data, threads, personal.is_some());
    let (data, distillation) =
        match crate::distill::prepare(client, &task, &distill, setting, &mut held.distilled).await {
            Ok(prepared) => prepared,
            Err(e) => {
                // The held model is checked even so: a later round may train from it as it is.
                digest_check.verify(held).await?;
                return report_failure(client, round, attempt, format!("distillation: {e:#}")).await;
            }
        };
    let model_spec = spec.clone();
    // Error feedback keeps what a lossy codec leaves out; not with client-side DP clipping,
    // whose bound holds for the clipped delta only.
    // Nor with secure aggregation, whose masked upload is the whole dense delta.
    // The residual so far is only read: the new one is made in the delta's buffers, and replaces
    // it when the coordinator accepts the update.
    let residual = (codec.needs_error_feedback() && dp_clip_norm == 0.0 && !secure).then(|| held.feedback.clone());
    let mut reused = held.model.take();
    let mut trainer = held.trainer.take();

    // What the last round changed, and this round's model, are written while this one trains.
    held.save_in_background(spec).await;
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
            tracing::debug!(
                round,
                model_s = format!("{model_s:.3}"),
                train_from_s = format!("{:.3}", received.elapsed().as_secs_f64()),
                "round task to training: global model ready, training starts (seconds after the task came)"
            );
            let report = |p: f32, _: &_| progress.store(p.to_bits(), Ordering::Relaxed);
            let (stats, mut delta, local_eval) = match &personal {
                None => {
                    // The last round's model and trainer, with this round's weights copied in: no
                    // new allocation.
                    let mut model = match reused.take() {
                        Some(mut model) if model.spec == model_spec => {
                            model.load_tensors(&global)?;
                            model
                        }
                        _ => {
                            trainer = None;
                            Classifier::from_tensors(model_spec.clone(), &global, default_device())?
                        }
                    };
                    let stats = train_in(&mut trainer, &mut model, &data, &train_config, distillation, &cancel, report);
                    let delta = model.delta_from(&global);
                    reused = Some(model);
                    (stats, delta, None)
                }
                Some(personal) => {
                    personal_step(personal, &model_spec, &global, &data, &train_config, round, &cancel, report)?
                }
            };
            if !stats.cancelled && (!stats.loss.is_finite() || !stats.accuracy.is_finite()) {
                bail!("training diverged: the loss is not finite (lower the learning rate)");
            }
            if delta.tensors.iter().any(|t| fl_common::tensors::first_non_finite(&t.data).is_some()) {
                bail!("training diverged: the weights are not finite (lower the learning rate)");
            }
            if dp_clip_norm > 0.0 {
                // Differential privacy with clipping on the client: only the clipped update leaves.
                delta.clip_l2_norm(dp_clip_norm);
            }
            if let Some(attack) = attack {
                // An attacker ignores the clip: the coordinator's defences must hold anyway.
                attack.apply(&mut delta, &mut rand::rng());
            }
            let train_s = started.elapsed().as_secs_f64();
            // Secure aggregation sends the flat values, masked; otherwise the encoded delta.
            let (body, feedback) = if secure {
                (Body::Flat(fl_common::secagg::flatten(&delta)), None)
            } else {
                match residual {
                    Some(residual) => {
                        let sent = codec.encode_owned_with_feedback(delta, residual.residual.as_ref())?;
                        let feedback = Arc::new(ErrorFeedback { residual: Some(sent.residual) });
                        (Body::Encoded(sent.payload), Some(feedback))
                    }
                    None => (Body::Encoded(codec.encode(&delta)?), None),
                }
            };
            Ok((stats, body, train_s, feedback, (reused, trainer), local_eval))
        })
    };
    let result = training.await;
    cancel.cancel();
    let _ = heartbeat.await;
    // Whatever the training did, the model it started from is checked before anything else: a
    // model that is not the round's is forgotten, and nothing made from it leaves. (A later round
    // whose task names the held model's digest trains from it unhashed.)
    digest_check.verify(held).await?;
    // A failed training is reported, never left for the deadline to find.
    let failure = match result {
        Ok(Ok(trained)) => Ok(trained),
        Ok(Err(e)) => Err(fl_common::cli::describe(&e)),
        Err(e) if e.is_panic() => {
            let panic = e.into_panic();
            let text = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a panic".into());
            Err(format!("training panicked: {}", text.lines().next().unwrap_or_default()))
        }
        Err(e) => Err(format!("training task failed: {e}")),
    };
    let (stats, body, train_s, feedback, reused, local_eval) = match failure {
        Ok(trained) => trained,
        Err(reason) => return report_failure(client, round, attempt, reason).await,
    };
    (held.model, held.trainer) = reused;
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

    let payload = match body {
        Body::Flat(values) => {
            let config = secagg.ok_or_else(|| anyhow!("flat values without a secure-aggregation task"))?;
            let reported = crate::secagg::Reported {
                examples: stats.examples as u64,
                loss: stats.loss,
                accuracy: stats.accuracy,
                train_s,
            };
            return match crate::secagg::submit(client, client_id, round, attempt, &config, values, reported).await {
                Ok(()) => Ok(RoundOutcome::Accepted),
                Err(e) => Ok(RoundOutcome::Refused(format!("{e:#}"))),
            };
        }
        Body::Encoded(payload) => payload,
    };
    let header = pb::UpdateHeader {
        round,
        attempt,
        codec: codec.name().to_string(),
        total_bytes: payload.len() as u64,
        num_examples: stats.examples as u64,
        train_loss: stats.loss,
        train_accuracy: stats.accuracy,
        train_s,
        local_eval,
        distilled: distillation.is_some(),
    };
    let digest = sha256_hex(&payload);
    let chunks = upload_chunks(header, payload, digest);
    let ack = client.submit_update(tokio_stream::iter(chunks)).await;
    let outcome = match ack {
        Ok(ack) => {
            let ack = ack.into_inner();
            if ack.accepted {
                RoundOutcome::Accepted
            } else {
                RoundOutcome::Refused(ack.message)
            }
        }
        Err(status) if status.code() == tonic::Code::FailedPrecondition => {
            RoundOutcome::Refused(status.message().to_string())
        }
        Err(status) => return Err(classify(status)),
    };
    // The residual moves on only when the coordinator took what was sent; a lost update's
    // delta is lost as with any codec, and the old residual is still owed.
    // It is written when the next round trains, or after a while without one.
    if let (RoundOutcome::Accepted, Some(feedback)) = (&outcome, feedback) {
        held.set_feedback(feedback);
    }
    Ok(outcome)
}

/// Tells the coordinator that this client could not train the round (training or its distillation
/// setup failed), instead of going silent.
async fn report_failure(
    client: &mut FederationClient<Channel>,
    round: u32,
    attempt: u32,
    reason: String,
) -> Result<RoundOutcome> {
    let report = pb::TrainingFailureReport { round, attempt, reason: reason.clone() };
    if let Err(status) = client.report_training_failure(report).await {
        warn!(round, attempt, "could not report the training failure: {}", status.message());
    }
    Ok(RoundOutcome::TrainingFailed(reason))
}

/// A personalising client's round: trains the upload and the personal model, and measures and
/// stores both models on the local held-out split; the measurement goes with the upload.
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
) -> Result<(fl_model::train::TrainStats, fl_common::TensorSet, Option<pb::LocalEvaluation>)> {
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
        return Ok((outcome.stats, outcome.delta, None));
    }
    let accuracy = crate::personal::record(personal, spec, global, &outcome.personal, round, data.len(), false)?;
    Ok((outcome.stats, outcome.delta, Some((&accuracy).into())))
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

#[cfg(test)]
mod tests {
    use fl_common::NamedTensor;

    use super::*;

    fn model() -> Arc<TensorSet> {
        Arc::new(TensorSet::new(vec![NamedTensor { name: "w".into(), shape: vec![2], data: vec![0.5, -1.0] }]))
    }

    #[tokio::test]
    async fn a_model_whose_digest_is_not_the_tasks_is_refused_and_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let mut held = HeldState::new(dir.path());
        let global = model();
        let digest = tensor_digest(&global);
        // Held under the task's digest while it trains; the digest computed says otherwise.
        held.set_global("f00d".into(), global.clone());
        let hashing = tokio::task::spawn_blocking(move || tensor_digest(&global));
        let check = DigestCheck { round: 7, want: "f00d".into(), hashing: Some(hashing) };
        let err = check.verify(&mut held).await.unwrap_err().to_string();
        assert!(err.contains("round 7") && err.contains(&digest) && err.contains("the round task says f00d"), "{err}");
        assert!(held.digest().is_none(), "the model is forgotten");

        let global = model();
        held.set_global(digest.clone(), global.clone());
        let hashing = tokio::task::spawn_blocking(move || tensor_digest(&global));
        DigestCheck { round: 8, want: digest.clone(), hashing: Some(hashing) }.verify(&mut held).await.unwrap();
        assert_eq!(held.digest(), Some(digest.as_str()));
    }
}
