//! The coordinator's side of one attempt: it relays keys and sealed shares, sums masked inputs
//! as they arrive (memory grows with the model, not the clients), and unmasks the sum.

use std::collections::{BTreeMap, BTreeSet};

use super::crypto::{self, SEALED_SHARE_BYTES, SHARE_BYTES};
use super::{
    pair_sign, prg, seed_commitment, AdvertisedKeys, ParticipantId, RevealedShare, RoundContext, RoundPlan,
    SealedShare, SecAggError, SharedKeys, Stage, UnmaskRequest, UnmaskResponse,
};

/// The result of an attempt that completed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecAggOutcome {
    /// The sum of the survivors' quantized inputs, modulo 2^32.
    pub sum: Vec<u32>,
    /// Participants whose masked input is in the sum.
    pub masked: usize,
    /// Participants whose input is not in the sum (left before or during the masked-input stage).
    pub dropped: usize,
    /// Dropped participants whose pairwise masks were removed from their neighbours' shares.
    pub recovered: usize,
}

/// The coordinator's state for one attempt.
#[derive(Debug)]
pub struct SecAggServer {
    plan: RoundPlan,
    ctx: RoundContext,
    vector_len: usize,
    stage: Stage,
    keys: BTreeMap<ParticipantId, AdvertisedKeys>,
    commitments: BTreeMap<ParticipantId, [u8; 32]>,
    /// Sealed shares by holder.
    mailbox: BTreeMap<ParticipantId, Vec<SealedShare>>,
    sum: Vec<u32>,
    masked: BTreeSet<ParticipantId>,
    responses: BTreeMap<ParticipantId, UnmaskResponse>,
}

impl SecAggServer {
    /// An attempt for `plan`, summing vectors of `vector_len` words.
    pub fn new(plan: RoundPlan, ctx: RoundContext, vector_len: usize) -> Self {
        Self {
            plan,
            ctx,
            vector_len,
            stage: Stage::AdvertiseKeys,
            keys: BTreeMap::new(),
            commitments: BTreeMap::new(),
            mailbox: BTreeMap::new(),
            sum: vec![0; vector_len],
            masked: BTreeSet::new(),
            responses: BTreeMap::new(),
        }
    }

    /// The plan of this attempt.
    pub fn plan(&self) -> &RoundPlan {
        &self.plan
    }

    /// The stage this attempt is in.
    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// Participants the current stage still waits for.
    pub fn pending(&self) -> Vec<ParticipantId> {
        match self.stage {
            Stage::AdvertiseKeys => {
                (0..self.plan.participants() as u32).filter(|p| !self.keys.contains_key(p)).collect()
            }
            Stage::ShareKeys => self.keys.keys().copied().filter(|p| !self.commitments.contains_key(p)).collect(),
            Stage::MaskedInput => self.shared().filter(|p| !self.masked.contains(p)).collect(),
            Stage::Unmask => self.masked.iter().copied().filter(|p| !self.responses.contains_key(p)).collect(),
            Stage::Done => Vec::new(),
        }
    }

    /// Aborts the attempt: nothing more is accepted and no sum comes out.
    pub fn abort(&mut self) {
        self.stage = Stage::Done;
        self.sum.clear();
    }

    fn expect_stage(&self, got: Stage) -> Result<(), SecAggError> {
        if self.stage == got {
            Ok(())
        } else {
            Err(SecAggError::WrongStage { expected: self.stage, got })
        }
    }

    fn abort_unless(&mut self, stage: Stage, have: usize, need: usize) -> Result<(), SecAggError> {
        if have < need {
            self.stage = Stage::Done;
            return Err(SecAggError::BelowThreshold { stage, have, need });
        }
        Ok(())
    }

    /// Participants needed alive at every stage: a threshold of neighbours plus oneself.
    fn quorum(&self) -> usize {
        self.plan.threshold() + 1
    }

    /// Stage 1: `from` advertises its keys.
    pub fn receive_keys(&mut self, from: ParticipantId, keys: AdvertisedKeys) -> Result<(), SecAggError> {
        self.expect_stage(Stage::AdvertiseKeys)?;
        if from as usize >= self.plan.participants() {
            return Err(SecAggError::NotParticipant(from));
        }
        if self.keys.contains_key(&from) {
            return Err(SecAggError::Replay(format!("participant {from} already advertised its keys")));
        }
        if keys.cipher_public == keys.mask_public
            || self.keys.values().any(|k| {
                [k.cipher_public, k.mask_public].iter().any(|p| *p == keys.cipher_public || *p == keys.mask_public)
            })
        {
            return Err(SecAggError::Malformed(format!("participant {from} advertised a key already in use")));
        }
        self.keys.insert(from, keys);
        Ok(())
    }

    /// Ends stage 1: the key directory every participant gets, or an abort.
    pub fn close_keys(&mut self) -> Result<BTreeMap<ParticipantId, AdvertisedKeys>, SecAggError> {
        self.expect_stage(Stage::AdvertiseKeys)?;
        self.abort_unless(Stage::AdvertiseKeys, self.keys.len(), self.quorum())?;
        self.stage = Stage::ShareKeys;
        Ok(self.keys.clone())
    }

    /// Stage 2: `from` sends its seed commitment and one sealed pair per neighbour that advertised.
    pub fn receive_shares(&mut self, from: ParticipantId, shared: SharedKeys) -> Result<(), SecAggError> {
        self.expect_stage(Stage::ShareKeys)?;
        if !self.keys.contains_key(&from) {
            return Err(SecAggError::NotParticipant(from));
        }
        if self.commitments.contains_key(&from) {
            return Err(SecAggError::Replay(format!("participant {from} already shared its keys")));
        }
        let expected: BTreeSet<ParticipantId> =
            self.plan.neighbours(from).iter().copied().filter(|n| self.keys.contains_key(n)).collect();
        let mut got = BTreeSet::new();
        for s in &shared.shares {
            if s.from != from {
                return Err(SecAggError::Malformed(format!("participant {from} sent shares labelled as {}'s", s.from)));
            }
            if !expected.contains(&s.to) {
                return Err(SecAggError::Malformed(format!(
                    "participant {from} sent shares to {}, which is not a neighbour that advertised keys",
                    s.to
                )));
            }
            if s.ciphertext.len() != SEALED_SHARE_BYTES {
                return Err(SecAggError::Malformed(format!(
                    "participant {from} sent {} bytes of sealed shares for {}, expected {SEALED_SHARE_BYTES}",
                    s.ciphertext.len(),
                    s.to
                )));
            }
            if !got.insert(s.to) {
                return Err(SecAggError::Malformed(format!("participant {from} sent two sets of shares for {}", s.to)));
            }
        }
        if got != expected {
            return Err(SecAggError::Malformed(format!(
                "participant {from} sent shares for {} of its {} neighbours that advertised keys",
                got.len(),
                expected.len()
            )));
        }
        self.commitments.insert(from, shared.seed_commitment);
        for s in shared.shares {
            self.mailbox.entry(s.to).or_default().push(s);
        }
        Ok(())
    }

    /// Ends stage 2, or aborts.
    pub fn close_shares(&mut self) -> Result<(), SecAggError> {
        self.expect_stage(Stage::ShareKeys)?;
        self.abort_unless(Stage::ShareKeys, self.commitments.len(), self.quorum())?;
        self.stage = Stage::MaskedInput;
        Ok(())
    }

    /// The participants that shared (the only ones that may send a masked input).
    pub fn shared(&self) -> impl Iterator<Item = ParticipantId> + '_ {
        self.commitments.keys().copied()
    }

    /// The sealed shares for `holder` from everyone that shared.
    pub fn inbox(&self, holder: ParticipantId) -> Vec<SealedShare> {
        self.mailbox
            .get(&holder)
            .map(|v| v.iter().filter(|s| self.commitments.contains_key(&s.from)).cloned().collect())
            .unwrap_or_default()
    }

    /// Stage 3: `from`'s masked input, folded into the sum at once.
    pub fn receive_masked(&mut self, from: ParticipantId, masked: &[u32]) -> Result<(), SecAggError> {
        self.expect_stage(Stage::MaskedInput)?;
        if !self.commitments.contains_key(&from) {
            return Err(SecAggError::NotParticipant(from));
        }
        if self.masked.contains(&from) {
            return Err(SecAggError::Replay(format!("participant {from} already sent its masked input")));
        }
        if masked.len() != self.vector_len {
            return Err(SecAggError::Malformed(format!(
                "participant {from} sent {} masked values, expected {}",
                masked.len(),
                self.vector_len
            )));
        }
        for (acc, &m) in self.sum.iter_mut().zip(masked) {
            *acc = acc.wrapping_add(m);
        }
        self.masked.insert(from);
        Ok(())
    }

    /// Ends stage 3: the unmask request every survivor gets, or an abort.
    pub fn close_masked(&mut self) -> Result<UnmaskRequest, SecAggError> {
        self.expect_stage(Stage::MaskedInput)?;
        self.abort_unless(Stage::MaskedInput, self.masked.len(), self.quorum())?;
        self.stage = Stage::Unmask;
        Ok(self.unmask_request())
    }

    /// The unmask request of this attempt (the same for every survivor).
    pub fn unmask_request(&self) -> UnmaskRequest {
        UnmaskRequest {
            survivors: self.masked.iter().copied().collect(),
            dropped: self.shared().filter(|p| !self.masked.contains(p)).collect(),
        }
    }

    /// Stage 4: a survivor's shares. Each must be of the kind the request asked for, for a
    /// neighbour that shared, at the survivor's own x coordinate.
    pub fn receive_unmask(&mut self, from: ParticipantId, response: UnmaskResponse) -> Result<(), SecAggError> {
        self.expect_stage(Stage::Unmask)?;
        if !self.masked.contains(&from) {
            return Err(SecAggError::NotParticipant(from));
        }
        if self.responses.contains_key(&from) {
            return Err(SecAggError::Replay(format!("participant {from} already sent its unmask shares")));
        }
        let x = crypto::share_x(from);
        let mut owners = BTreeSet::new();
        for (share, want_survivor) in
            response.seed_shares.iter().map(|s| (s, true)).chain(response.key_shares.iter().map(|s| (s, false)))
        {
            let owner = share.owner;
            if !self.plan.is_neighbour(from, owner) || !self.commitments.contains_key(&owner) {
                return Err(SecAggError::Malformed(format!(
                    "participant {from} returned a share of {owner}, which it does not hold"
                )));
            }
            if self.masked.contains(&owner) != want_survivor {
                return Err(SecAggError::Malformed(format!(
                    "participant {from} returned the wrong kind of share of {owner}"
                )));
            }
            if share.share[0] != x {
                return Err(SecAggError::Malformed(format!(
                    "participant {from} returned a share of {owner} at another's x coordinate"
                )));
            }
            if !owners.insert(owner) {
                return Err(SecAggError::Malformed(format!("participant {from} returned two shares of {owner}")));
            }
        }
        self.responses.insert(from, response);
        Ok(())
    }

    /// Ends stage 4: removes the masks and returns the sum, or aborts when some participant's
    /// secret has fewer than the threshold of shares back, or its shares do not reconstruct it.
    pub fn finish(&mut self) -> Result<SecAggOutcome, SecAggError> {
        self.expect_stage(Stage::Unmask)?;
        self.stage = Stage::Done;
        let t = self.plan.threshold();
        let collect = |owner: ParticipantId, seeds: bool| -> Vec<&[u8; SHARE_BYTES]> {
            self.responses
                .values()
                .flat_map(|r| if seeds { &r.seed_shares } else { &r.key_shares })
                .filter(|s: &&RevealedShare| s.owner == owner)
                .map(|s| &s.share)
                .collect()
        };
        let request = self.unmask_request();
        let mut sum = std::mem::take(&mut self.sum);
        for &owner in &request.survivors {
            let shares = collect(owner, true);
            if shares.len() < t {
                return Err(SecAggError::BelowThreshold { stage: Stage::Unmask, have: shares.len(), need: t });
            }
            let seed = crypto::combine(&shares[..t], t)?;
            if seed_commitment(&self.ctx, owner, &seed) != self.commitments[&owner] {
                return Err(SecAggError::InconsistentShares(owner));
            }
            prg::apply_mask(&seed, -1, &mut sum);
        }
        for &owner in &request.dropped {
            let shares = collect(owner, false);
            if shares.len() < t {
                return Err(SecAggError::BelowThreshold { stage: Stage::Unmask, have: shares.len(), need: t });
            }
            let secret = crypto::combine(&shares[..t], t)?;
            if crypto::public_key(&secret) != self.keys[&owner].mask_public {
                return Err(SecAggError::InconsistentShares(owner));
            }
            // Each surviving neighbour added sign(v, owner) * mask(v, owner): take it out again.
            for &v in self.plan.neighbours(owner).iter().filter(|v| self.masked.contains(v)) {
                let pair = crypto::pairwise_seed(&secret, &self.keys[&v].mask_public, &self.ctx, owner, v)?;
                prg::apply_mask(&pair, -pair_sign(v, owner), &mut sum);
            }
        }
        Ok(SecAggOutcome {
            sum,
            masked: self.masked.len(),
            dropped: self.plan.participants() - self.masked.len(),
            recovered: request.dropped.len(),
        })
    }
}
