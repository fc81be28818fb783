//! Secure aggregation (SecAgg, Bonawitz et al. 2017, with the neighbour graph of SecAgg+, Bell et
//! al. 2020) as a pure library: no network, no clock. The client daemon drives a
//! [`SecAggClient`], the coordinator a [`SecAggServer`]; the messages between them are plain
//! types that the gRPC layer converts.
//!
//! One attempt of a round goes through four stages:
//! 1. **Advertise keys**: each participant sends two X25519 public keys, one to encrypt shares to
//!    it and one for pairwise masks.
//! 2. **Share keys**: each participant draws a 256-bit self-mask seed, splits it and its mask
//!    secret key with Shamir (threshold `t`) among its neighbours, and seals each neighbour's pair
//!    of shares with ChaCha20-Poly1305 under a key derived (HKDF-SHA256) from X25519. It also
//!    commits to its seed (SHA-256), so a wrong reconstruction is detected.
//! 3. **Masked input**: each participant adds to its quantized update its self mask and, for each
//!    neighbour that shared, the pairwise mask (+ towards higher ids, - towards lower ones), all
//!    expanded with the ChaCha20 keystream ([`prg`]) and summed modulo 2^32.
//! 4. **Unmask**: the coordinator names the survivors (masked input received) and the dropped
//!    (shared, then no masked input). Each survivor returns its seed shares of survivors and its
//!    mask-key shares of the dropped, never both for one peer. The coordinator removes the self
//!    masks of the survivors and the pairwise masks towards the dropped; what is left is the sum
//!    of the survivors' quantized updates.
//!
//! Participants are numbered `0..n` by the coordinator for one attempt; the number doubles as the
//! Shamir x coordinate (plus one), so an attempt has at most [`MAX_PARTICIPANTS`] participants.
//! Every key, seed and ciphertext is bound to a [`RoundContext`], so nothing replays across
//! rounds or attempts.

mod client;
pub mod crypto;
pub mod prg;
pub mod quant;
mod server;
#[cfg(test)]
mod tests;

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

pub use client::SecAggClient;
pub use quant::QuantizationPlan;
pub use server::{SecAggOutcome, SecAggServer};

/// The training stats a participant sends beside its masked input (the masked words carry only
/// the update): what the coordinator records for the round, as for a plain upload.
#[derive(Debug, Clone, Copy)]
pub struct Reported {
    /// Examples trained on.
    pub examples: u64,
    /// Mean training loss.
    pub loss: f64,
    /// Training accuracy.
    pub accuracy: f64,
    /// Seconds of local training.
    pub train_s: f64,
}

/// A participant's number within one attempt, `0..n`.
pub type ParticipantId = u32;

/// Most participants in one attempt: the Shamir shares live in GF(2^8), x = id + 1 <= 255.
pub const MAX_PARTICIPANTS: usize = 254;

/// What went wrong in the protocol. Every variant carries enough to tell the peer why.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecAggError {
    /// A setting that cannot work.
    #[error("secure aggregation: {0}")]
    Config(String),
    /// A message that does not parse or does not fit the protocol.
    #[error("malformed secure-aggregation message: {0}")]
    Malformed(String),
    /// A second message for a stage the sender already answered.
    #[error("replayed secure-aggregation message: {0}")]
    Replay(String),
    /// A message for another stage than the current one.
    #[error("secure-aggregation message for stage {got} while in stage {expected}")]
    WrongStage {
        /// The stage the protocol is in.
        expected: Stage,
        /// The stage the message belongs to.
        got: Stage,
    },
    /// A sender that is not (or no longer) a participant of this stage.
    #[error("participant {0} is not part of this secure-aggregation stage")]
    NotParticipant(ParticipantId),
    /// An honest client refusing a request that would reveal an input.
    #[error("secure-aggregation request refused: {0}")]
    Refused(String),
    /// Too few participants left: the attempt aborts with no output.
    #[error("secure aggregation aborted in stage {stage}: {have} participants left, {need} needed")]
    BelowThreshold {
        /// The stage that could not continue.
        stage: Stage,
        /// Participants (or shares) available.
        have: usize,
        /// Participants (or shares) needed.
        need: usize,
    },
    /// Reconstructed secrets that do not match what the participant advertised or committed to.
    #[error("the shares returned for participant {0} do not reconstruct its secret")]
    InconsistentShares(ParticipantId),
}

/// The stages of one attempt, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// Collecting public keys.
    AdvertiseKeys,
    /// Collecting sealed shares.
    ShareKeys,
    /// Collecting masked inputs.
    MaskedInput,
    /// Collecting shares to unmask.
    Unmask,
    /// Finished (or aborted).
    Done,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::AdvertiseKeys => "advertise-keys",
            Stage::ShareKeys => "share-keys",
            Stage::MaskedInput => "masked-input",
            Stage::Unmask => "unmask",
            Stage::Done => "done",
        })
    }
}

/// What binds every key, seed and ciphertext to one attempt of one round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundContext {
    /// 32 random bytes the coordinator draws per attempt.
    pub session: [u8; 32],
    /// The round number.
    pub round: u32,
    /// The attempt number within the round.
    pub attempt: u32,
}

/// How many share holders must answer to reconstruct a secret: `--secagg-threshold`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Threshold {
    /// A fraction of a participant's neighbours, in (0.5, 1].
    Fraction(f64),
    /// A number of neighbours.
    Count(usize),
    /// The smallest safe majority of the neighbours, `floor(k / 2) + 1`.
    #[default]
    Majority,
}

impl FromStr for Threshold {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("majority") {
            return Ok(Threshold::Majority);
        }
        if let Ok(count) = s.parse::<usize>() {
            if count == 0 {
                return Err("a threshold count must be at least 1".into());
            }
            return Ok(Threshold::Count(count));
        }
        match s.parse::<f64>() {
            Ok(f) if f > 0.5 && f <= 1.0 => Ok(Threshold::Fraction(f)),
            Ok(f) => Err(format!("a threshold fraction must be in (0.5, 1], got {f}")),
            Err(_) => {
                Err(format!("expected 'majority', a count (e.g. 6) or a fraction in (0.5, 1] (e.g. 0.6), got '{s}'"))
            }
        }
    }
}

impl fmt::Display for Threshold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Threshold::Fraction(x) => write!(f, "{x}"),
            Threshold::Count(c) => write!(f, "{c}"),
            Threshold::Majority => f.write_str("majority"),
        }
    }
}

/// The federation's secure-aggregation settings.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SecAggSettings {
    /// Neighbours per participant (`--secagg-neighbours`); `None` pairs everyone with everyone.
    pub neighbours: Option<usize>,
    /// Share holders needed to reconstruct (`--secagg-threshold`).
    pub threshold: Threshold,
}

/// The shape of one attempt: who neighbours whom, and the threshold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoundPlan {
    participants: usize,
    threshold: usize,
    neighbours: Vec<Vec<ParticipantId>>,
}

impl RoundPlan {
    /// Plans an attempt with `participants` clients. Refuses fewer than 3 (with 2, each one's
    /// sum minus its own input is the other's), more than [`MAX_PARTICIPANTS`], and a threshold
    /// that is not a strict majority of the neighbours: at most half would let a coordinator that
    /// lies about who dropped collect both shares of one participant from disjoint halves.
    pub fn new(settings: &SecAggSettings, participants: usize, ctx: &RoundContext) -> Result<Self, SecAggError> {
        if participants < 3 {
            return Err(SecAggError::BelowThreshold { stage: Stage::AdvertiseKeys, have: participants, need: 3 });
        }
        if participants > MAX_PARTICIPANTS {
            return Err(SecAggError::Config(format!(
                "{participants} participants in one attempt; at most {MAX_PARTICIPANTS} (lower --clients-per-round or --over-sample)"
            )));
        }
        let k = match settings.neighbours {
            Some(k) if k < 2 => {
                return Err(SecAggError::Config(format!("--secagg-neighbours must be at least 2, got {k}")))
            }
            Some(k) => k.min(participants - 1),
            None => participants - 1,
        };
        let neighbours = neighbour_graph(participants, k, ctx);
        let degree = neighbours.iter().map(Vec::len).min().unwrap_or(0);
        let threshold = resolve_threshold(settings.threshold, degree)?;
        Ok(Self { participants, threshold, neighbours })
    }

    /// The number of participants.
    pub fn participants(&self) -> usize {
        self.participants
    }

    /// Share holders needed to reconstruct one participant's secret.
    pub fn threshold(&self) -> usize {
        self.threshold
    }

    /// The neighbours of `id`, ascending; empty for an unknown id.
    pub fn neighbours(&self, id: ParticipantId) -> &[ParticipantId] {
        self.neighbours.get(id as usize).map(Vec::as_slice).unwrap_or(&[])
    }

    fn is_neighbour(&self, a: ParticipantId, b: ParticipantId) -> bool {
        self.neighbours(a).binary_search(&b).is_ok()
    }
}

/// Resolves a threshold against a neighbourhood of `k` share holders.
pub fn resolve_threshold(threshold: Threshold, k: usize) -> Result<usize, SecAggError> {
    let t = match threshold {
        Threshold::Majority => k / 2 + 1,
        Threshold::Count(c) => c,
        Threshold::Fraction(f) => (f * k as f64).ceil() as usize,
    };
    if t > k || 2 * t <= k {
        return Err(SecAggError::Config(format!(
            "--secagg-threshold {threshold} means {t} of {k} neighbours; it must be a strict majority, {}..={k}",
            k / 2 + 1
        )));
    }
    Ok(t)
}

/// A symmetric graph where every participant has `k` neighbours (`k` rounded up to even when
/// the graph is not complete): participants sit on a ring in an order drawn from the session,
/// each linked to the `ceil(k/2)` nearest on either side.
fn neighbour_graph(n: usize, k: usize, ctx: &RoundContext) -> Vec<Vec<ParticipantId>> {
    let half = k.div_ceil(2);
    if 2 * half >= n - 1 {
        return (0..n as u32).map(|i| (0..n as u32).filter(|&j| j != i).collect()).collect();
    }
    // The ring order: ids sorted by a ChaCha20 word each, from a seed both ends derive alike.
    let seed: [u8; 32] = Sha256::new().chain_update(b"fl-secagg v1 graph").chain_update(ctx.session).finalize().into();
    let keys = prg::mask(&seed, n);
    let mut ring: Vec<u32> = (0..n as u32).collect();
    ring.sort_by_key(|&i| (keys[i as usize], i));
    let mut out = vec![Vec::with_capacity(2 * half); n];
    for (pos, &id) in ring.iter().enumerate() {
        for d in 1..=half {
            out[id as usize].push(ring[(pos + d) % n]);
            out[id as usize].push(ring[(pos + n - d) % n]);
        }
    }
    for list in &mut out {
        list.sort_unstable();
        list.dedup();
    }
    out
}

/// The two public keys a participant advertises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdvertisedKeys {
    /// X25519 key that shares are sealed to.
    pub cipher_public: [u8; 32],
    /// X25519 key of the pairwise masks.
    pub mask_public: [u8; 32],
}

/// Shares sealed by `from` for `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedShare {
    /// The participant whose secrets these are shares of.
    pub from: ParticipantId,
    /// The holder.
    pub to: ParticipantId,
    /// ChaCha20-Poly1305 ciphertext of the seed share and the mask-key share.
    pub ciphertext: Vec<u8>,
}

/// What a participant sends in the share-keys stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedKeys {
    /// SHA-256 commitment to the self-mask seed, checked after reconstruction.
    pub seed_commitment: [u8; 32],
    /// One sealed pair per neighbour that advertised keys.
    pub shares: Vec<SealedShare>,
}

/// What the coordinator asks in the unmask stage.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UnmaskRequest {
    /// Participants whose masked input arrived: their seed shares are wanted.
    pub survivors: Vec<ParticipantId>,
    /// Participants that shared but sent no masked input: their mask-key shares are wanted.
    pub dropped: Vec<ParticipantId>,
}

/// One share returned in the unmask stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevealedShare {
    /// Whose secret it is a share of.
    pub owner: ParticipantId,
    /// The Shamir share: x coordinate, then 32 bytes.
    pub share: [u8; crypto::SHARE_BYTES],
}

/// What a survivor answers in the unmask stage.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UnmaskResponse {
    /// Shares of survivors' self-mask seeds.
    pub seed_shares: Vec<RevealedShare>,
    /// Shares of dropped participants' mask secret keys.
    pub key_shares: Vec<RevealedShare>,
}

/// The commitment to a self-mask seed.
pub fn seed_commitment(ctx: &RoundContext, owner: ParticipantId, seed: &[u8; 32]) -> [u8; 32] {
    Sha256::new()
        .chain_update(b"fl-secagg v1 seed commitment")
        .chain_update(ctx.session)
        .chain_update(ctx.round.to_be_bytes())
        .chain_update(ctx.attempt.to_be_bytes())
        .chain_update(owner.to_be_bytes())
        .chain_update(seed)
        .finalize()
        .into()
}

/// The flat vector a client quantizes and the coordinator unflattens: every tensor's values,
/// in the set's (sorted) order.
pub fn flatten(update: &crate::TensorSet) -> Vec<f32> {
    update.tensors.iter().flat_map(|t| t.data.iter().copied()).collect()
}

/// The sign with which `a` adds its pairwise mask with `b`.
fn pair_sign(a: ParticipantId, b: ParticipantId) -> i8 {
    if a < b {
        1
    } else {
        -1
    }
}
