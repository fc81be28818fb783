//! Secure aggregation in the engine: the `serve` flags, the stored setting a restart cannot
//! change, and one attempt's stages driven by the deadline and the clients' answers.
//!
//! The protocol itself is [`fl_common::secagg`] (pure, shared with the client). Here an attempt
//! ([`SecAggAttempt`]) wraps its [`SecAggServer`] for the gRPC handlers, which submit a stage's
//! message and then wait until the engine ([`drive`]) closes that stage: when every participant
//! still connected has answered, or at the stage deadline. The first stage runs until the
//! round's deadline (it includes local training); each later stage gets a quarter of the round
//! timeout. Fewer survivors than the threshold abort the attempt, and the engine retries the
//! round as it does any failed attempt.
//!
//! Weighting: uniform. Each client clips every coordinate of its delta to `--secagg-clip` and
//! quantizes it; the coordinator unmasks the sum and divides by the number of inputs in it. A
//! client's example count never leaves it in the clear (it would say how much data it holds).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use anyhow::{bail, Result};
use fl_common::secagg::{
    AdvertisedKeys, ParticipantId, QuantizationPlan, RoundContext, RoundPlan, SealedShare, SecAggError, SecAggOutcome,
    SecAggServer, SecAggSettings, SharedKeys, Stage, Threshold, UnmaskRequest, UnmaskResponse, MAX_PARTICIPANTS,
};
use fl_common::{NamedTensor, TensorSet};
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The `serve` flags of secure aggregation.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct SecAggArgs {
    /// Secure aggregation (SecAgg+): clients mask their updates so that the coordinator only
    /// learns their sum. Fixed when the federation is created [default: off].
    #[arg(long = "secure-aggregation", env = "FL_SECURE_AGGREGATION")]
    pub enabled: bool,
    /// Neighbours each client exchanges masks with [default: all]; about 2*log2(n) is SecAgg+.
    #[arg(long = "secagg-neighbours")]
    pub neighbours: Option<usize>,
    /// Neighbours that must answer to unmask a client: "majority", a count, or a fraction in
    /// (0.5, 1] [default: majority].
    #[arg(long = "secagg-threshold")]
    pub threshold: Option<Threshold>,
    /// Each coordinate of an update is clipped to [-clip, clip] before quantization [default: 8].
    #[arg(long = "secagg-clip", allow_negative_numbers = true)]
    pub clip: Option<f32>,
}

/// The stored setting (`STATE/secagg.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SecAggConfig {
    /// Neighbours per client; `None` is all.
    pub neighbours: Option<usize>,
    /// The threshold as given.
    pub threshold: String,
    /// The clipping bound.
    pub clip: f32,
}

const CONFIG_FILE: &str = "secagg.json";
/// The default clipping bound, as Flower's `clipping_range`.
pub const DEFAULT_CLIP: f32 = 8.0;

impl SecAggArgs {
    fn any_set(&self) -> bool {
        self.neighbours.is_some() || self.threshold.is_some() || self.clip.is_some()
    }

    /// The configuration these flags ask for; `None` when secure aggregation is off.
    pub fn resolve(&self) -> Result<Option<SecAggConfig>> {
        if !self.enabled {
            if self.any_set() {
                bail!("--secagg-neighbours, --secagg-threshold and --secagg-clip need --secure-aggregation");
            }
            return Ok(None);
        }
        let clip = self.clip.unwrap_or(DEFAULT_CLIP);
        if !(clip.is_finite() && clip > 0.0) {
            bail!("--secagg-clip must be a positive finite number, got {clip}");
        }
        if let Some(k) = self.neighbours {
            if k < 2 {
                bail!("--secagg-neighbours must be at least 2, got {k}");
            }
        }
        Ok(Some(SecAggConfig {
            neighbours: self.neighbours,
            threshold: self.threshold.unwrap_or_default().to_string(),
            clip,
        }))
    }

    /// Checks the flags against the stored setting of an existing federation and returns the
    /// setting in force. Without `--secure-aggregation` the stored setting holds.
    pub fn settle(&self, stored: Option<SecAggConfig>) -> Result<Option<SecAggConfig>> {
        let asked = self.resolve()?;
        match (asked, stored) {
            (None, stored) => Ok(stored),
            (Some(_), None) => {
                bail!("--secure-aggregation cannot be turned on for an existing federation; use a new --state-dir")
            }
            (Some(asked), Some(stored)) if self.any_set() && asked != stored => bail!(
                "these flags would change the existing federation's secure aggregation ({stored:?}); \
                 use a new --state-dir for a new federation"
            ),
            (Some(_), Some(stored)) => Ok(Some(stored)),
        }
    }
}

impl SecAggConfig {
    /// Reads the stored setting; `None` when the federation has secure aggregation off.
    pub fn load(root: &Path) -> Result<Option<SecAggConfig>> {
        crate::state::read_setting(&root.join(CONFIG_FILE))
    }

    /// Stores the setting when the federation is created.
    pub fn save(&self, root: &Path) -> Result<()> {
        crate::state::write_setting(&root.join(CONFIG_FILE), self)
    }

    /// The protocol settings.
    pub fn settings(&self) -> Result<SecAggSettings> {
        let threshold = self.threshold.parse().map_err(|e: String| anyhow::anyhow!("--secagg-threshold: {e}"))?;
        Ok(SecAggSettings { neighbours: self.neighbours, threshold })
    }

    /// The quantization for attempts of at most `max_clients` participants; refuses a round
    /// size whose sum could overflow the modulus, or that the shares cannot number.
    pub fn quantization(&self, max_clients: usize) -> Result<QuantizationPlan> {
        if max_clients > MAX_PARTICIPANTS {
            bail!(
                "secure aggregation takes at most {MAX_PARTICIPANTS} clients per attempt, and these settings sample up to \
                 {max_clients}; lower --clients-per-round or --over-sample"
            );
        }
        Ok(QuantizationPlan::new(self.clip, max_clients as u32)?)
    }
}

/// The most participants an attempt of these settings can have: the quantization is sized for
/// their sum. Every connected client may be asked when `--clients-per-round` is 0.
pub fn max_participants(settings: &crate::coordinator::RoundSettings) -> usize {
    if settings.clients_per_round == 0 {
        MAX_PARTICIPANTS
    } else {
        (settings.clients_per_round as f64 * settings.over_sample.max(1.0)).ceil() as usize
    }
}

/// What a participant is told about the attempt (sent in the round task).
#[derive(Clone, Debug, PartialEq)]
pub struct SecAggTask {
    /// The attempt's random session.
    pub session: [u8; 32],
    /// Participants' client ids, in participant order.
    pub participants: Vec<String>,
    /// Neighbours per participant; 0 is all.
    pub neighbours: u32,
    /// The threshold as configured.
    pub threshold: String,
    /// The clipping bound.
    pub clip: f32,
    /// The quantization's largest sum.
    pub max_clients: u32,
}

/// Why a secure-aggregation message was refused, or the attempt ended without an answer.
#[derive(Debug, thiserror::Error)]
pub enum SecAggRefusal {
    /// The caller is not a participant of this attempt.
    #[error("this client is not a participant of round {round} attempt {attempt}")]
    NotParticipant {
        /// The round.
        round: u32,
        /// The attempt.
        attempt: u32,
    },
    /// The protocol refused the message.
    #[error(transparent)]
    Protocol(#[from] SecAggError),
    /// The attempt aborted.
    #[error("the secure-aggregation attempt aborted: {0}")]
    Aborted(String),
}

pub use fl_common::secagg::Reported;

/// Counts for `metrics.jsonl` and the client stats of the survivors.
#[derive(Debug, Default, Clone)]
pub struct SecAggStats {
    /// Examples trained on by the survivors.
    pub examples: u64,
    /// Sum of loss times examples.
    pub weighted_loss: f64,
    /// Sum of accuracy times examples.
    pub weighted_accuracy: f64,
    /// The slowest survivor's local training seconds.
    pub train_s: f64,
    /// Bytes the coordinator received in the four stages.
    pub bytes_up: u64,
}

/// One attempt's secure aggregation, shared by the engine and the handlers.
#[derive(Debug)]
pub struct SecAggAttempt {
    /// The round.
    pub round: u32,
    /// The attempt.
    pub attempt: u32,
    /// What the round task tells the participants.
    pub task: SecAggTask,
    /// The quantization.
    pub quantization: QuantizationPlan,
    ids: HashMap<String, ParticipantId>,
    server: Mutex<SecAggServer>,
    directory: OnceLock<BTreeMap<ParticipantId, AdvertisedKeys>>,
    unmask: OnceLock<UnmaskRequest>,
    /// The stage the engine has opened, or the abort reason.
    stage: watch::Sender<Result<Stage, String>>,
    changed: Notify,
    stats: Mutex<SecAggStats>,
    /// Per participant, what it reported with its masked input.
    reported: Mutex<HashMap<ParticipantId, Reported>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl SecAggAttempt {
    /// Plans an attempt over `sampled` with a fresh session, for a model of `vector_len` values.
    pub fn new(
        config: &SecAggConfig,
        quantization: QuantizationPlan,
        round: u32,
        attempt: u32,
        mut sampled: Vec<String>,
        vector_len: usize,
    ) -> Result<SecAggAttempt, SecAggError> {
        sampled.sort();
        let session: [u8; 32] = rand::random();
        let ctx = RoundContext { session, round, attempt };
        let settings = config.settings().map_err(|e| SecAggError::Config(e.to_string()))?;
        let plan = RoundPlan::new(&settings, sampled.len(), &ctx)?;
        let ids = sampled.iter().enumerate().map(|(i, c)| (c.clone(), i as ParticipantId)).collect();
        Ok(SecAggAttempt {
            round,
            attempt,
            task: SecAggTask {
                session,
                participants: sampled,
                neighbours: config.neighbours.unwrap_or(0) as u32,
                threshold: config.threshold.clone(),
                clip: config.clip,
                max_clients: quantization.max_clients(),
            },
            quantization,
            ids,
            server: Mutex::new(SecAggServer::new(plan, ctx, vector_len)),
            directory: OnceLock::new(),
            unmask: OnceLock::new(),
            stage: watch::channel(Ok(Stage::AdvertiseKeys)).0,
            changed: Notify::new(),
            stats: Mutex::new(SecAggStats::default()),
            reported: Mutex::new(HashMap::new()),
        })
    }

    fn participant(&self, client: &str) -> Result<ParticipantId, SecAggRefusal> {
        self.ids.get(client).copied().ok_or(SecAggRefusal::NotParticipant { round: self.round, attempt: self.attempt })
    }

    /// Waits until the engine has moved past `stage` (or aborted).
    async fn wait_past(&self, stage: Stage) -> Result<(), SecAggRefusal> {
        let mut rx = self.stage.subscribe();
        loop {
            match &*rx.borrow_and_update() {
                Err(reason) => return Err(SecAggRefusal::Aborted(reason.clone())),
                Ok(s) if *s > stage => return Ok(()),
                Ok(_) => {}
            }
            if rx.changed().await.is_err() {
                return Err(SecAggRefusal::Aborted("the coordinator closed the attempt".into()));
            }
        }
    }

    fn count_bytes(&self, bytes: usize) {
        lock(&self.stats).bytes_up += bytes as u64;
    }

    /// Stage 1 from `client`; answers with the key directory once the stage closes.
    pub async fn advertise(
        &self,
        client: &str,
        keys: AdvertisedKeys,
    ) -> Result<BTreeMap<ParticipantId, AdvertisedKeys>, SecAggRefusal> {
        let id = self.participant(client)?;
        lock(&self.server).receive_keys(id, keys)?;
        self.count_bytes(64);
        self.changed.notify_one();
        self.wait_past(Stage::AdvertiseKeys).await?;
        Ok(self.directory.get().cloned().unwrap_or_default())
    }

    /// Stage 2 from `client`; answers with the shares sealed to it once the stage closes.
    pub async fn share(&self, client: &str, shared: SharedKeys) -> Result<Vec<SealedShare>, SecAggRefusal> {
        let id = self.participant(client)?;
        let bytes = 32 + shared.shares.iter().map(|s| s.ciphertext.len() + 8).sum::<usize>();
        lock(&self.server).receive_shares(id, shared)?;
        self.count_bytes(bytes);
        self.changed.notify_one();
        self.wait_past(Stage::ShareKeys).await?;
        Ok(lock(&self.server).inbox(id))
    }

    /// Stage 3 from `client`, with the training stats it reports; answers with the unmask
    /// request once the stage closes.
    pub async fn masked(
        &self,
        client: &str,
        masked: &[u32],
        reported: Reported,
    ) -> Result<UnmaskRequest, SecAggRefusal> {
        let id = self.participant(client)?;
        lock(&self.server).receive_masked(id, masked)?;
        self.count_bytes(masked.len() * 4);
        lock(&self.reported).insert(id, reported);
        self.changed.notify_one();
        self.wait_past(Stage::MaskedInput).await?;
        Ok(self.unmask.get().cloned().unwrap_or_default())
    }

    /// Stage 4 from `client`.
    pub fn unmask_shares(&self, client: &str, response: UnmaskResponse) -> Result<(), SecAggRefusal> {
        let id = self.participant(client)?;
        let bytes = (response.seed_shares.len() + response.key_shares.len()) * 37;
        lock(&self.server).receive_unmask(id, response)?;
        self.count_bytes(bytes);
        self.changed.notify_one();
        Ok(())
    }

    /// Tells the waiting handlers where the attempt is (the previous value is of no interest).
    fn publish(&self, stage: Result<Stage, String>) {
        let _previous = self.stage.send_replace(stage);
    }

    /// Aborts the attempt: every waiting handler is answered with `reason`.
    pub fn abort(&self, reason: String) {
        lock(&self.server).abort();
        self.publish(Err(reason));
    }

    /// Client ids of the participants whose masked input is in the sum.
    pub fn survivors(&self) -> Vec<String> {
        let survivors = self.unmask.get().map(|u| u.survivors.clone()).unwrap_or_default();
        survivors.iter().map(|s| self.task.participants[*s as usize].clone()).collect()
    }

    /// The stats of the survivors.
    pub fn stats(&self) -> SecAggStats {
        let mut stats = lock(&self.stats).clone();
        let survivors = self.unmask.get().map(|u| u.survivors.clone()).unwrap_or_default();
        let reported = lock(&self.reported);
        for r in survivors.iter().filter_map(|s| reported.get(s)) {
            stats.examples += r.examples;
            stats.weighted_loss += r.loss * r.examples as f64;
            stats.weighted_accuracy += r.accuracy * r.examples as f64;
            stats.train_s = stats.train_s.max(r.train_s);
        }
        stats
    }
}

/// Runs the stages of `attempt` to the end. `is_connected` says whether a client still holds
/// its work stream: the engine does not wait for a participant that left. Returns the unmasked
/// sum, or why the attempt failed (it is then aborted, and handlers are told).
pub async fn drive(
    attempt: &Arc<SecAggAttempt>,
    round_deadline: Instant,
    stage_time: Duration,
    is_connected: impl Fn(&str) -> bool,
    shutdown: &CancellationToken,
) -> Result<SecAggOutcome, String> {
    let result = drive_stages(attempt, round_deadline, stage_time, &is_connected, shutdown).await;
    match result {
        Ok(outcome) => {
            attempt.publish(Ok(Stage::Done));
            Ok(outcome)
        }
        Err(reason) => {
            attempt.abort(reason.clone());
            Err(reason)
        }
    }
}

async fn drive_stages(
    attempt: &Arc<SecAggAttempt>,
    round_deadline: Instant,
    stage_time: Duration,
    is_connected: &impl Fn(&str) -> bool,
    shutdown: &CancellationToken,
) -> Result<SecAggOutcome, String> {
    let err = |e: SecAggError| e.to_string();
    wait_stage(attempt, round_deadline, is_connected, shutdown).await?;
    let directory = lock(&attempt.server).close_keys().map_err(err)?;
    let _ = attempt.directory.set(directory);
    attempt.publish(Ok(Stage::ShareKeys));

    wait_stage(attempt, Instant::now() + stage_time, is_connected, shutdown).await?;
    lock(&attempt.server).close_shares().map_err(err)?;
    attempt.publish(Ok(Stage::MaskedInput));

    wait_stage(attempt, Instant::now() + stage_time, is_connected, shutdown).await?;
    let request = lock(&attempt.server).close_masked().map_err(err)?;
    let _ = attempt.unmask.set(request);
    attempt.publish(Ok(Stage::Unmask));

    wait_stage(attempt, Instant::now() + stage_time, is_connected, shutdown).await?;
    // Unmasking expands one mask per survivor and per dropped neighbour pair: not on the runtime.
    let attempt = attempt.clone();
    tokio::task::spawn_blocking(move || lock(&attempt.server).finish())
        .await
        .map_err(|e| format!("unmasking failed: {e}"))?
        .map_err(err)
}

/// Waits until every connected participant the current stage expects has answered, or `deadline`.
async fn wait_stage(
    attempt: &SecAggAttempt,
    deadline: Instant,
    is_connected: &impl Fn(&str) -> bool,
    shutdown: &CancellationToken,
) -> Result<(), String> {
    loop {
        let notified = attempt.changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let waiting = lock(&attempt.server)
            .pending()
            .into_iter()
            .filter(|p| is_connected(&attempt.task.participants[*p as usize]))
            .count();
        if waiting == 0 || Instant::now() >= deadline {
            return Ok(());
        }
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep_until(deadline.min(Instant::now() + Duration::from_millis(500))) => {}
            _ = shutdown.cancelled() => return Err("the coordinator is shutting down".into()),
        }
    }
}

/// Why DP must clip on the clients under secure aggregation: the coordinator only sees the sum.
pub const DP_NEEDS_CLIENT_CLIP: &str =
    "--secure-aggregation with differential privacy needs --dp-clip-on client and a fixed \
     --dp-clip-norm: the coordinator sees only the sum, so the clients clip (it is the default under \
     --secure-aggregation; --dp-adaptive-clip would need each client's clipped bit)";

/// The model-shaped mean of the unmasked sum: dequantized, divided by the inputs in it.
pub fn mean_update(
    quantization: &QuantizationPlan,
    outcome: &SecAggOutcome,
    like: &TensorSet,
) -> Result<TensorSet, SecAggError> {
    let sum = quantization.dequantize_sum(&outcome.sum, outcome.masked)?;
    if sum.len() != like.num_values() {
        return Err(SecAggError::Malformed(format!(
            "sum of {} values for a model of {}",
            sum.len(),
            like.num_values()
        )));
    }
    let scale = 1.0 / outcome.masked as f32;
    let mut values = sum.into_iter();
    let tensors = like
        .tensors
        .iter()
        .map(|t| NamedTensor {
            name: t.name.clone(),
            shape: t.shape.clone(),
            data: values.by_ref().take(t.data.len()).map(|v| v * scale).collect(),
        })
        .collect();
    Ok(TensorSet::new(tensors))
}

/// The gRPC edge of the four stages: `pb` in, domain types to the attempt, `pb` out. The
/// service's handlers authenticate the caller and call these.
pub mod wire {
    use std::collections::BTreeMap;

    use fl_common::secagg::crypto::SHARE_BYTES;
    use fl_common::secagg::{AdvertisedKeys, RevealedShare, SealedShare, SecAggError, SharedKeys, UnmaskResponse};
    use fl_proto::pb;
    use tokio_stream::StreamExt;
    use tonic::Streaming;

    use super::SecAggRefusal;
    use crate::coordinator::{Coordinator, RoundTask};
    use crate::error::ServiceError;
    use crate::service::MAX_UPLOAD_CHUNK_BYTES;

    fn key(bytes: &[u8], what: &str) -> Result<[u8; 32], SecAggRefusal> {
        bytes
            .try_into()
            .map_err(|_| SecAggError::Malformed(format!("{what} must be 32 bytes, got {}", bytes.len())).into())
    }

    /// The round task's secure-aggregation part.
    pub fn task(task: &RoundTask) -> Option<pb::SecAggRoundConfig> {
        task.secagg.as_ref().map(|s| pb::SecAggRoundConfig {
            session: s.session.to_vec(),
            participants: s.participants.clone(),
            neighbours: s.neighbours,
            threshold: s.threshold.clone(),
            clip: s.clip,
            max_clients: s.max_clients,
        })
    }

    fn directory_pb(directory: BTreeMap<u32, AdvertisedKeys>) -> pb::SecAggKeyDirectory {
        pb::SecAggKeyDirectory {
            keys: directory
                .into_iter()
                .map(|(participant, k)| pb::SecAggPublicKeys {
                    participant,
                    cipher_public_key: k.cipher_public.to_vec(),
                    mask_public_key: k.mask_public.to_vec(),
                })
                .collect(),
        }
    }

    fn sealed_pb(s: SealedShare) -> pb::SecAggSealedShare {
        pb::SecAggSealedShare { from: s.from, to: s.to, ciphertext: s.ciphertext }
    }

    fn revealed(list: Vec<pb::SecAggRevealedShare>) -> Result<Vec<RevealedShare>, SecAggRefusal> {
        list.into_iter()
            .map(|s| {
                let share: [u8; SHARE_BYTES] = s.share.as_slice().try_into().map_err(|_| {
                    SecAggError::Malformed(format!("a share must be {SHARE_BYTES} bytes, got {}", s.share.len()))
                })?;
                Ok(RevealedShare { owner: s.owner, share })
            })
            .collect()
    }

    /// Stage 1.
    pub async fn advertise(
        coord: &Coordinator,
        client: &str,
        req: pb::SecAggAdvertiseKeysRequest,
    ) -> Result<pb::SecAggKeyDirectory, ServiceError> {
        let attempt = coord.secagg_attempt(client, req.round, req.attempt)?;
        let keys = AdvertisedKeys {
            cipher_public: key(&req.cipher_public_key, "cipher_public_key")?,
            mask_public: key(&req.mask_public_key, "mask_public_key")?,
        };
        Ok(directory_pb(attempt.advertise(client, keys).await?))
    }

    /// Stage 2.
    pub async fn share(
        coord: &Coordinator,
        client: &str,
        req: pb::SecAggShareKeysRequest,
    ) -> Result<pb::SecAggShareInbox, ServiceError> {
        let attempt = coord.secagg_attempt(client, req.round, req.attempt)?;
        let shared = SharedKeys {
            seed_commitment: key(&req.seed_commitment, "seed_commitment")?,
            shares: req
                .shares
                .into_iter()
                .map(|s| SealedShare { from: s.from, to: s.to, ciphertext: s.ciphertext })
                .collect(),
        };
        let inbox = attempt.share(client, shared).await?;
        Ok(pb::SecAggShareInbox { shares: inbox.into_iter().map(sealed_pb).collect() })
    }

    /// Stage 3: the chunks are checked (order, sizes, one attempt) and reassembled, then the
    /// vector is folded into the masked sum.
    pub async fn masked(
        coord: &Coordinator,
        client: &str,
        mut stream: Streaming<pb::SecAggMaskedInputChunk>,
    ) -> Result<pb::SecAggUnmaskRequest, ServiceError> {
        let malformed = |m: String| ServiceError::from(SecAggRefusal::from(SecAggError::Malformed(m)));
        let first = match stream.next().await {
            Some(Ok(c)) => c,
            Some(Err(status)) => return Err(ServiceError::Stream(status)),
            None => return Err(ServiceError::EmptyUpload),
        };
        let attempt = coord.secagg_attempt(client, first.round, first.attempt)?;
        let expected = coord.global().tensors.num_values();
        if first.total_words != expected as u64 {
            return Err(malformed(format!("{} masked values announced, the model has {expected}", first.total_words)));
        }
        if !(first.train_loss.is_finite() && first.train_accuracy.is_finite()) {
            return Err(malformed("non-finite training loss or accuracy".into()));
        }
        if !(first.train_s.is_finite() && first.train_s >= 0.0) {
            return Err(malformed(format!("training seconds {}", first.train_s)));
        }
        let reported = super::Reported {
            examples: first.num_examples,
            loss: first.train_loss,
            accuracy: first.train_accuracy,
            train_s: first.train_s,
        };
        let mut words: Vec<u32> = Vec::with_capacity(expected);
        let mut chunk = Some(first);
        while let Some(c) = chunk.take() {
            if (c.round, c.attempt) != (attempt.round, attempt.attempt) {
                return Err(malformed("chunks of one masked input name different attempts".into()));
            }
            if c.offset_words != words.len() as u64 {
                return Err(malformed(format!("chunk at word {} after {} words", c.offset_words, words.len())));
            }
            if c.data.len() % 4 != 0 || c.data.len() > MAX_UPLOAD_CHUNK_BYTES {
                return Err(malformed(format!(
                    "a chunk of {} bytes: a multiple of 4 up to {MAX_UPLOAD_CHUNK_BYTES}",
                    c.data.len()
                )));
            }
            if words.len() + c.data.len() / 4 > expected {
                return Err(malformed(format!("more than the {expected} masked values announced")));
            }
            words.extend(c.data.chunks_exact(4).map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]])));
            chunk = match stream.next().await {
                Some(Ok(c)) => Some(c),
                Some(Err(status)) => return Err(ServiceError::Stream(status)),
                None => None,
            };
        }
        let request = attempt.masked(client, &words, reported).await?;
        Ok(pb::SecAggUnmaskRequest { survivors: request.survivors, dropped: request.dropped })
    }

    /// Stage 4.
    pub fn unmask(
        coord: &Coordinator,
        client: &str,
        req: pb::SecAggUnmaskResponse,
    ) -> Result<pb::SecAggAck, ServiceError> {
        let attempt = coord.secagg_attempt(client, req.round, req.attempt)?;
        let response =
            UnmaskResponse { seed_shares: revealed(req.seed_shares)?, key_shares: revealed(req.key_shares)? };
        attempt.unmask_shares(client, response)?;
        Ok(pb::SecAggAck { accepted: true, message: String::new() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on() -> SecAggArgs {
        SecAggArgs { enabled: true, ..SecAggArgs::default() }
    }

    #[test]
    fn flags_resolve_with_safe_defaults_and_clear_errors() {
        assert_eq!(SecAggArgs::default().resolve().unwrap(), None);
        let config = on().resolve().unwrap().unwrap();
        assert_eq!(config, SecAggConfig { neighbours: None, threshold: "majority".into(), clip: DEFAULT_CLIP });
        let err = SecAggArgs { clip: Some(1.0), ..SecAggArgs::default() }.resolve().unwrap_err().to_string();
        assert!(err.contains("need --secure-aggregation"), "{err}");
        let err = SecAggArgs { clip: Some(-1.0), ..on() }.resolve().unwrap_err().to_string();
        assert!(err.contains("--secagg-clip"), "{err}");
        assert!(SecAggArgs { neighbours: Some(1), ..on() }.resolve().is_err());
    }

    #[test]
    fn a_restart_cannot_change_it() {
        let stored = on().resolve().unwrap();
        // No flag: the stored setting holds, on or off.
        assert_eq!(SecAggArgs::default().settle(stored.clone()).unwrap(), stored);
        assert_eq!(SecAggArgs::default().settle(None).unwrap(), None);
        // Turning it on for a plain federation, or changing its settings, is refused.
        assert!(on().settle(None).unwrap_err().to_string().contains("cannot be turned on"));
        let other = SecAggArgs { clip: Some(2.0), ..on() };
        assert!(other.settle(stored.clone()).unwrap_err().to_string().contains("would change"));
        assert_eq!(on().settle(stored.clone()).unwrap(), stored);
    }

    #[test]
    fn the_round_size_is_checked_at_start() {
        let config = on().resolve().unwrap().unwrap();
        assert!(config.quantization(254).is_ok());
        let err = config.quantization(300).unwrap_err().to_string();
        assert!(err.contains("at most 254"), "{err}");
    }

    #[test]
    fn the_mean_has_the_model_shape() {
        let like = TensorSet::new(vec![
            NamedTensor { name: "a".into(), shape: vec![2], data: vec![0.0; 2] },
            NamedTensor { name: "b".into(), shape: vec![1], data: vec![0.0] },
        ]);
        let plan = QuantizationPlan::new(1.0, 4).unwrap();
        let mut rng = rand::rng();
        let inputs = [[0.5f32, -0.25, 1.0], [0.1, 0.25, -1.0]];
        let mut sum = vec![0u32; 3];
        for input in &inputs {
            for (s, q) in sum.iter_mut().zip(plan.quantize(input, &mut rng)) {
                *s = s.wrapping_add(q);
            }
        }
        let outcome = SecAggOutcome { sum, masked: 2, dropped: 0, recovered: 0 };
        let mean = mean_update(&plan, &outcome, &like).unwrap();
        let want = [0.3f32, 0.0, 0.0];
        let got: Vec<f32> = mean.tensors.iter().flat_map(|t| t.data.clone()).collect();
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?}");
        }
        assert_eq!(mean.tensors[0].shape, vec![2]);
        let short = SecAggOutcome { sum: vec![0; 2], masked: 2, dropped: 0, recovered: 0 };
        assert!(mean_update(&plan, &short, &like).is_err());
    }
}
