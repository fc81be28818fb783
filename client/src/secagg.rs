//! The client's side of secure aggregation: when the round task carries a secure-aggregation
//! config, the delta is clipped, quantized and masked ([`fl_common::secagg`]) and goes through
//! the four SecAgg stages instead of `SubmitUpdate`. Only the masked vector leaves the client.

use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Context, Result};
use fl_common::secagg::{
    AdvertisedKeys, QuantizationPlan, RoundContext, RoundPlan, SealedShare, SecAggClient, SecAggSettings, Threshold,
    UnmaskRequest,
};
use fl_proto::pb::{self, federation_client::FederationClient};
use tonic::transport::Channel;

use crate::daemon::CHUNK_BYTES;

pub use fl_common::secagg::Reported;

fn key(bytes: &[u8], what: &str) -> Result<[u8; 32]> {
    bytes.try_into().map_err(|_| anyhow!("coordinator sent a {what} of {} bytes, expected 32", bytes.len()))
}

/// Runs the four stages for this client's `update` (the flat delta). Returns once the unmask
/// shares are accepted; an abort or a refusal is an error with the coordinator's reason.
pub async fn submit(
    client: &mut FederationClient<Channel>,
    client_id: &str,
    round: u32,
    attempt: u32,
    config: &pb::SecAggRoundConfig,
    update: Vec<f32>,
    reported: Reported,
) -> Result<()> {
    let session = key(&config.session, "session")?;
    let ctx = RoundContext { session, round, attempt };
    let id =
        config.participants.iter().position(|p| p == client_id).ok_or_else(|| {
            anyhow!("this client ({client_id}) is not among the round's secure-aggregation participants")
        })? as u32;
    let threshold: Threshold = config.threshold.parse().map_err(|e: String| anyhow!("secagg threshold: {e}"))?;
    let settings =
        SecAggSettings { neighbours: (config.neighbours > 0).then_some(config.neighbours as usize), threshold };
    let plan = RoundPlan::new(&settings, config.participants.len(), &ctx)?;
    let quantization = QuantizationPlan::new(config.clip, config.max_clients)?;
    let mut participant = SecAggClient::new(id, plan, ctx, &mut rand::rng())?;

    // Stage 1: advertise keys; the answer is everyone's keys.
    let keys = participant.advertise();
    let directory = client
        .sec_agg_advertise_keys(pb::SecAggAdvertiseKeysRequest {
            round,
            attempt,
            cipher_public_key: keys.cipher_public.to_vec(),
            mask_public_key: keys.mask_public.to_vec(),
        })
        .await
        .context("secure aggregation, advertise keys")?
        .into_inner();
    let directory: BTreeMap<u32, AdvertisedKeys> = directory
        .keys
        .iter()
        .map(|k| {
            Ok((
                k.participant,
                AdvertisedKeys {
                    cipher_public: key(&k.cipher_public_key, "public key")?,
                    mask_public: key(&k.mask_public_key, "public key")?,
                },
            ))
        })
        .collect::<Result<_>>()?;

    // Stage 2: share keys; the answer is the shares sealed to this client.
    let shared = participant.share_keys(&directory)?;
    let inbox = client
        .sec_agg_share_keys(pb::SecAggShareKeysRequest {
            round,
            attempt,
            seed_commitment: shared.seed_commitment.to_vec(),
            shares: shared
                .shares
                .into_iter()
                .map(|s| pb::SecAggSealedShare { from: s.from, to: s.to, ciphertext: s.ciphertext })
                .collect(),
        })
        .await
        .context("secure aggregation, share keys")?
        .into_inner();
    let inbox: Vec<SealedShare> =
        inbox.shares.into_iter().map(|s| SealedShare { from: s.from, to: s.to, ciphertext: s.ciphertext }).collect();

    pause_for_fault_test(round).await;

    // Stage 3: quantize and mask (a model-sized job: on a blocking thread), then stream it.
    let (participant_back, masked) = tokio::task::spawn_blocking(move || {
        let quantized = quantization.quantize(&update, &mut rand::rng());
        let masked = participant.masked_input(&inbox, &quantized);
        (participant, masked)
    })
    .await
    .context("masking panicked")?;
    let mut participant = participant_back;
    let masked = masked?;
    let total_words = masked.len() as u64;
    let words_per_chunk = CHUNK_BYTES / 4;
    let chunks: Vec<pb::SecAggMaskedInputChunk> = masked
        .chunks(words_per_chunk)
        .enumerate()
        .map(|(i, words)| pb::SecAggMaskedInputChunk {
            round,
            attempt,
            total_words,
            offset_words: (i * words_per_chunk) as u64,
            data: words.iter().flat_map(|w| w.to_le_bytes()).collect(),
            num_examples: reported.examples,
            train_loss: reported.loss,
            train_accuracy: reported.accuracy,
            train_s: reported.train_s,
        })
        .collect();
    if chunks.is_empty() {
        bail!("an empty model cannot be aggregated");
    }
    let request = client
        .sec_agg_masked_input(tokio_stream::iter(chunks))
        .await
        .context("secure aggregation, masked input")?
        .into_inner();

    // Stage 4: the shares that unmask the sum; refused if the request would expose anyone.
    let response = participant.unmask(&UnmaskRequest { survivors: request.survivors, dropped: request.dropped })?;
    let revealed = |list: Vec<fl_common::secagg::RevealedShare>| {
        list.into_iter().map(|s| pb::SecAggRevealedShare { owner: s.owner, share: s.share.to_vec() }).collect()
    };
    client
        .sec_agg_unmask(pb::SecAggUnmaskResponse {
            round,
            attempt,
            seed_shares: revealed(response.seed_shares),
            key_shares: revealed(response.key_shares),
        })
        .await
        .context("secure aggregation, unmask")?;
    Ok(())
}

/// Fault injection for the cross-process tests: with `FL_FAULT_SECAGG_PAUSE=ROUND:PATH`, the
/// client stops after sharing its keys in its first round from ROUND on, writes PATH, and waits
/// there, so a test can `kill -9` it exactly between the share-keys and masked-input stages.
async fn pause_for_fault_test(round: u32) {
    let Ok(spec) = std::env::var("FL_FAULT_SECAGG_PAUSE") else { return };
    let Some((at, marker)) = spec.split_once(':') else { return };
    match at.parse::<u32>() {
        Ok(from) if round >= from => {}
        _ => return,
    }
    tracing::warn!(round, "FL_FAULT_SECAGG_PAUSE: pausing after the share-keys stage");
    if let Err(e) = tokio::fs::write(marker, round.to_string()).await {
        tracing::error!("FL_FAULT_SECAGG_PAUSE: writing {marker}: {e}");
    }
    std::future::pending::<()>().await;
}
