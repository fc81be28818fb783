//! The participant's side of one attempt.

use std::collections::{BTreeMap, BTreeSet};

use rand::RngCore;
use zeroize::Zeroizing;

use super::crypto::{self, Secret32, SHARE_BYTES, SHARE_PAIR_BYTES};
use super::{
    pair_sign, prg, seed_commitment, AdvertisedKeys, ParticipantId, RevealedShare, RoundContext, RoundPlan,
    SealedShare, SecAggError, SharedKeys, Stage, UnmaskRequest, UnmaskResponse,
};

/// The shares a participant holds of one neighbour's secrets.
type HeldShares = Zeroizing<[u8; SHARE_PAIR_BYTES]>;

/// One participant of one attempt. It answers each stage once, in order, and refuses to reveal
/// both shares of any neighbour.
pub struct SecAggClient {
    id: ParticipantId,
    plan: RoundPlan,
    ctx: RoundContext,
    cipher_secret: Secret32,
    mask_secret: Secret32,
    seed: Secret32,
    stage: Stage,
    /// Neighbours that advertised keys, with their keys.
    directory: BTreeMap<ParticipantId, AdvertisedKeys>,
    /// Shares held for neighbours that shared (the coordinator's U2, seen from here).
    held: BTreeMap<ParticipantId, HeldShares>,
}

impl std::fmt::Debug for SecAggClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secrets.
        f.debug_struct("SecAggClient").field("id", &self.id).field("stage", &self.stage).finish_non_exhaustive()
    }
}

impl SecAggClient {
    /// A participant numbered `id` in the attempt `plan` describes, with fresh secrets.
    pub fn new<R: RngCore + ?Sized>(
        id: ParticipantId,
        plan: RoundPlan,
        ctx: RoundContext,
        rng: &mut R,
    ) -> Result<Self, SecAggError> {
        if id as usize >= plan.participants() {
            return Err(SecAggError::NotParticipant(id));
        }
        Ok(Self {
            id,
            plan,
            ctx,
            cipher_secret: crypto::random_secret(rng),
            mask_secret: crypto::random_secret(rng),
            seed: crypto::random_secret(rng),
            stage: Stage::AdvertiseKeys,
            directory: BTreeMap::new(),
            held: BTreeMap::new(),
        })
    }

    /// This participant's number.
    pub fn id(&self) -> ParticipantId {
        self.id
    }

    /// Stage 1: the two public keys to advertise.
    pub fn advertise(&self) -> AdvertisedKeys {
        AdvertisedKeys {
            cipher_public: crypto::public_key(&self.cipher_secret),
            mask_public: crypto::public_key(&self.mask_secret),
        }
    }

    fn expect_stage(&self, got: Stage) -> Result<(), SecAggError> {
        if self.stage == got {
            Ok(())
        } else if self.stage > got {
            Err(SecAggError::Replay(format!("stage {got} was already answered")))
        } else {
            Err(SecAggError::WrongStage { expected: self.stage, got })
        }
    }

    /// Stage 2: given every advertised key, seal shares of the seed and the mask key to each
    /// neighbour that advertised.
    pub fn share_keys(
        &mut self,
        directory: &BTreeMap<ParticipantId, AdvertisedKeys>,
    ) -> Result<SharedKeys, SecAggError> {
        self.expect_stage(Stage::AdvertiseKeys)?;
        if directory.get(&self.id) != Some(&self.advertise()) {
            return Err(SecAggError::Refused("the key directory does not carry this participant's own keys".into()));
        }
        let mut seen = BTreeSet::new();
        for keys in directory.values() {
            if !seen.insert(keys.cipher_public) || !seen.insert(keys.mask_public) {
                return Err(SecAggError::Malformed("the key directory repeats a public key".into()));
            }
        }
        let neighbours: BTreeMap<ParticipantId, AdvertisedKeys> =
            self.plan.neighbours(self.id).iter().filter_map(|n| directory.get(n).map(|k| (*n, *k))).collect();
        let t = self.plan.threshold();
        if neighbours.len() < t {
            self.stage = Stage::Done;
            return Err(SecAggError::BelowThreshold { stage: Stage::ShareKeys, have: neighbours.len(), need: t });
        }
        let holders: Vec<ParticipantId> = neighbours.keys().copied().collect();
        let seed_shares = crypto::split(&self.seed, t, &holders);
        let key_shares = crypto::split(&self.mask_secret, t, &holders);
        let mut shares = Vec::with_capacity(holders.len());
        for ((holder, seed_share), key_share) in holders.iter().zip(&seed_shares).zip(&key_shares) {
            let mut plain = Zeroizing::new([0u8; SHARE_PAIR_BYTES]);
            plain[..SHARE_BYTES].copy_from_slice(&seed_share[..]);
            plain[SHARE_BYTES..].copy_from_slice(&key_share[..]);
            let ciphertext = crypto::seal_shares(
                &self.cipher_secret,
                &neighbours[holder].cipher_public,
                &self.ctx,
                self.id,
                *holder,
                &plain,
            )?;
            shares.push(SealedShare { from: self.id, to: *holder, ciphertext });
        }
        self.directory = neighbours;
        self.stage = Stage::ShareKeys;
        Ok(SharedKeys { seed_commitment: seed_commitment(&self.ctx, self.id, &self.seed), shares })
    }

    /// Stage 3: given the shares sealed to this participant by the neighbours that shared, mask
    /// the quantized `input`.
    pub fn masked_input(&mut self, inbox: &[SealedShare], input: &[u32]) -> Result<Vec<u32>, SecAggError> {
        self.expect_stage(Stage::ShareKeys)?;
        let x = crypto::share_x(self.id);
        let mut held = BTreeMap::new();
        for sealed in inbox {
            if sealed.to != self.id {
                return Err(SecAggError::Malformed(format!(
                    "shares for participant {} delivered to {}",
                    sealed.to, self.id
                )));
            }
            let Some(keys) = self.directory.get(&sealed.from) else {
                return Err(SecAggError::Malformed(format!(
                    "shares from participant {}, which is not a neighbour that advertised keys",
                    sealed.from
                )));
            };
            let plain = crypto::open_shares(
                &self.cipher_secret,
                &keys.cipher_public,
                &self.ctx,
                sealed.from,
                self.id,
                &sealed.ciphertext,
            )?;
            if plain[0] != x || plain[SHARE_BYTES] != x {
                return Err(SecAggError::Malformed(format!(
                    "shares from participant {} carry the wrong x coordinate",
                    sealed.from
                )));
            }
            if held.insert(sealed.from, plain).is_some() {
                return Err(SecAggError::Replay(format!("two sets of shares from participant {}", sealed.from)));
            }
        }
        let t = self.plan.threshold();
        if held.len() < t {
            self.stage = Stage::Done;
            return Err(SecAggError::BelowThreshold { stage: Stage::MaskedInput, have: held.len(), need: t });
        }
        let mut out = input.to_vec();
        prg::apply_mask(&self.seed, 1, &mut out);
        for peer in held.keys() {
            let pair =
                crypto::pairwise_seed(&self.mask_secret, &self.directory[peer].mask_public, &self.ctx, self.id, *peer)?;
            prg::apply_mask(&pair, pair_sign(self.id, *peer), &mut out);
        }
        self.held = held;
        self.stage = Stage::MaskedInput;
        Ok(out)
    }

    /// Stage 4: reveal seed shares of the survivors and mask-key shares of the dropped, for the
    /// neighbours this participant holds shares of. Refuses a request that names a neighbour in
    /// both lists, names this participant as dropped, or leaves fewer than the threshold alive.
    pub fn unmask(&mut self, request: &UnmaskRequest) -> Result<UnmaskResponse, SecAggError> {
        self.expect_stage(Stage::MaskedInput)?;
        let survivors: BTreeSet<ParticipantId> = request.survivors.iter().copied().collect();
        let dropped: BTreeSet<ParticipantId> = request.dropped.iter().copied().collect();
        if survivors.len() != request.survivors.len() || dropped.len() != request.dropped.len() {
            return Err(SecAggError::Malformed("the unmask request repeats a participant".into()));
        }
        if let Some(both) = survivors.intersection(&dropped).next() {
            return Err(SecAggError::Refused(format!(
                "participant {both} is named both survivor and dropped: revealing both of its shares would expose its input"
            )));
        }
        if !survivors.contains(&self.id) {
            return Err(SecAggError::Refused(
                "this participant sent its masked input but is not named a survivor".into(),
            ));
        }
        for peer in survivors.iter().chain(&dropped) {
            if self.plan.is_neighbour(self.id, *peer)
                && self.directory.contains_key(peer)
                && !self.held.contains_key(peer)
            {
                return Err(SecAggError::Refused(format!(
                    "participant {peer} never shared keys with this one, so it cannot be unmasked"
                )));
            }
        }
        // Every neighbour that shared must be accounted for, or the coordinator could leave a
        // pairwise mask in place and learn nothing, or subtract one that never was.
        if let Some(missing) = self.held.keys().find(|p| !survivors.contains(p) && !dropped.contains(p)) {
            return Err(SecAggError::Malformed(format!(
                "the unmask request does not say whether participant {missing} survived"
            )));
        }
        let alive = self.held.keys().filter(|p| survivors.contains(p)).count() + 1;
        let t = self.plan.threshold();
        if alive < t {
            self.stage = Stage::Done;
            return Err(SecAggError::BelowThreshold { stage: Stage::Unmask, have: alive, need: t });
        }
        let mut response = UnmaskResponse::default();
        for (owner, pair) in &self.held {
            let (range, list) = if survivors.contains(owner) {
                (0..SHARE_BYTES, &mut response.seed_shares)
            } else {
                (SHARE_BYTES..SHARE_PAIR_BYTES, &mut response.key_shares)
            };
            let mut share = [0u8; SHARE_BYTES];
            share.copy_from_slice(&pair[range]);
            list.push(RevealedShare { owner: *owner, share });
        }
        // One answer per attempt: a second request (even the same one) is a replay.
        self.stage = Stage::Done;
        Ok(response)
    }
}
