//! The primitives, each from an audited crate: X25519 (x25519-dalek) for key agreement,
//! HKDF-SHA256 (hkdf, sha2) to derive keys and mask seeds from a shared secret,
//! ChaCha20-Poly1305 (chacha20poly1305) to encrypt shares to their holder, and Shamir's secret
//! sharing over GF(2^8) (blahaj) to split a 32-byte secret byte by byte.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::ChaCha20Poly1305;
use hkdf::Hkdf;
use rand::RngCore;
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use super::{ParticipantId, RoundContext, SecAggError};

/// A 32-byte secret (a mask seed or an X25519 secret key), wiped when dropped.
pub type Secret32 = Zeroizing<[u8; 32]>;

/// Bytes of one Shamir share of a 32-byte secret: the x coordinate, then 32 y bytes.
pub const SHARE_BYTES: usize = 33;
/// Bytes of the plaintext sent to one holder: the self-mask seed share, then the mask-key share.
pub const SHARE_PAIR_BYTES: usize = 2 * SHARE_BYTES;
/// Bytes of an encrypted share pair (the plaintext plus the 16-byte Poly1305 tag).
pub const SEALED_SHARE_BYTES: usize = SHARE_PAIR_BYTES + 16;

/// A fresh secret from the operating system's generator.
pub fn random_secret<R: RngCore + ?Sized>(rng: &mut R) -> Secret32 {
    let mut s = Zeroizing::new([0u8; 32]);
    rng.fill_bytes(s.as_mut());
    s
}

/// The X25519 public key of `secret`.
pub fn public_key(secret: &[u8; 32]) -> [u8; 32] {
    PublicKey::from(&StaticSecret::from(*secret)).to_bytes()
}

/// X25519 of our secret and their public key, refusing a low-order public key (whose shared
/// secret would be all zeros and known to everyone).
fn agree(ours: &[u8; 32], theirs: &[u8; 32]) -> Result<Secret32, SecAggError> {
    let shared = StaticSecret::from(*ours).diffie_hellman(&PublicKey::from(*theirs));
    if !shared.was_contributory() {
        return Err(SecAggError::Malformed("a public key of low order".into()));
    }
    Ok(Zeroizing::new(shared.to_bytes()))
}

fn hkdf_32(ikm: &[u8; 32], ctx: &RoundContext, label: &[u8], a: ParticipantId, b: ParticipantId) -> Secret32 {
    let hk = Hkdf::<Sha256>::new(Some(&ctx.session), ikm);
    let mut info = Vec::with_capacity(label.len() + 16);
    info.extend_from_slice(label);
    info.extend_from_slice(&ctx.round.to_be_bytes());
    info.extend_from_slice(&ctx.attempt.to_be_bytes());
    info.extend_from_slice(&a.to_be_bytes());
    info.extend_from_slice(&b.to_be_bytes());
    let mut out = Zeroizing::new([0u8; 32]);
    hk.expand(&info, out.as_mut()).expect("32 bytes is a valid HKDF-SHA256 length");
    out
}

/// The pairwise mask seed of `a` and `b` (symmetric: both ends derive the same seed).
pub fn pairwise_seed(
    our_mask_secret: &[u8; 32],
    their_mask_public: &[u8; 32],
    ctx: &RoundContext,
    a: ParticipantId,
    b: ParticipantId,
) -> Result<Secret32, SecAggError> {
    let shared = agree(our_mask_secret, their_mask_public)?;
    Ok(hkdf_32(&shared, ctx, b"fl-secagg v1 pairwise mask", a.min(b), a.max(b)))
}

/// The key and associated data that seal shares from `sender` to `holder`. The key depends on the
/// direction, so each key seals one message and the fixed nonce is never reused.
fn share_key(
    our_cipher_secret: &[u8; 32],
    their_cipher_public: &[u8; 32],
    ctx: &RoundContext,
    sender: ParticipantId,
    holder: ParticipantId,
) -> Result<(Secret32, Vec<u8>), SecAggError> {
    let shared = agree(our_cipher_secret, their_cipher_public)?;
    let key = hkdf_32(&shared, ctx, b"fl-secagg v1 share key", sender, holder);
    let mut aad = Vec::with_capacity(48);
    aad.extend_from_slice(&ctx.session);
    aad.extend_from_slice(&ctx.round.to_be_bytes());
    aad.extend_from_slice(&ctx.attempt.to_be_bytes());
    aad.extend_from_slice(&sender.to_be_bytes());
    aad.extend_from_slice(&holder.to_be_bytes());
    Ok((key, aad))
}

/// Encrypts a share pair from `sender` to `holder`.
pub fn seal_shares(
    sender_cipher_secret: &[u8; 32],
    holder_cipher_public: &[u8; 32],
    ctx: &RoundContext,
    sender: ParticipantId,
    holder: ParticipantId,
    plaintext: &[u8; SHARE_PAIR_BYTES],
) -> Result<Vec<u8>, SecAggError> {
    let (key, aad) = share_key(sender_cipher_secret, holder_cipher_public, ctx, sender, holder)?;
    let cipher = ChaCha20Poly1305::new(key.as_ref().into());
    cipher
        .encrypt(&[0u8; 12].into(), Payload { msg: plaintext, aad: &aad })
        .map_err(|_| SecAggError::Malformed("share encryption failed".into()))
}

/// Decrypts the share pair `sender` sealed for `holder`; fails on any tampering, a wrong
/// sender, holder or round.
pub fn open_shares(
    holder_cipher_secret: &[u8; 32],
    sender_cipher_public: &[u8; 32],
    ctx: &RoundContext,
    sender: ParticipantId,
    holder: ParticipantId,
    sealed: &[u8],
) -> Result<Zeroizing<[u8; SHARE_PAIR_BYTES]>, SecAggError> {
    if sealed.len() != SEALED_SHARE_BYTES {
        return Err(SecAggError::Malformed(format!(
            "sealed shares from participant {sender} are {} bytes, expected {SEALED_SHARE_BYTES}",
            sealed.len()
        )));
    }
    let (key, aad) = share_key(holder_cipher_secret, sender_cipher_public, ctx, sender, holder)?;
    let cipher = ChaCha20Poly1305::new(key.as_ref().into());
    let plain = Zeroizing::new(
        cipher
            .decrypt(&[0u8; 12].into(), Payload { msg: sealed, aad: &aad })
            .map_err(|_| SecAggError::Malformed(format!("shares from participant {sender} fail authentication")))?,
    );
    let mut out = Zeroizing::new([0u8; SHARE_PAIR_BYTES]);
    out.copy_from_slice(&plain);
    Ok(out)
}

/// The Shamir x coordinate of a holder: its participant id plus one (x = 0 is the secret).
pub fn share_x(holder: ParticipantId) -> u8 {
    u8::try_from(holder + 1).expect("participant ids are checked to be below 255")
}

/// Splits `secret` into shares for `holders` (any `threshold` of them recover it), in the
/// order of `holders`.
pub fn split(secret: &[u8; 32], threshold: usize, holders: &[ParticipantId]) -> Vec<Zeroizing<[u8; SHARE_BYTES]>> {
    let dealer = blahaj::Sharks(u8::try_from(threshold).expect("threshold checked below 255"));
    let max_x = holders.iter().map(|&h| share_x(h)).max().unwrap_or(1) as usize;
    let all: Vec<blahaj::Share> = dealer.dealer(secret).take(max_x).collect();
    holders
        .iter()
        .map(|&h| {
            let bytes = Vec::<u8>::from(&all[share_x(h) as usize - 1]);
            let mut out = Zeroizing::new([0u8; SHARE_BYTES]);
            out.copy_from_slice(&bytes);
            out
        })
        .collect()
}

/// Recovers a secret from exactly `threshold` shares with distinct x coordinates.
pub fn combine(shares: &[&[u8; SHARE_BYTES]], threshold: usize) -> Result<Secret32, SecAggError> {
    let parsed: Vec<blahaj::Share> = shares
        .iter()
        .map(|s| blahaj::Share::try_from(&s[..]).map_err(|e| SecAggError::Malformed(e.into())))
        .collect::<Result<_, _>>()?;
    let mut xs: Vec<u8> = parsed.iter().map(|s| s.x.0).collect();
    xs.sort_unstable();
    xs.dedup();
    if xs.len() != parsed.len() || parsed.len() < threshold || xs.contains(&0) {
        return Err(SecAggError::Malformed("shares must have distinct nonzero x coordinates".into()));
    }
    let dealer = blahaj::Sharks(u8::try_from(threshold).expect("threshold checked below 255"));
    let secret = Zeroizing::new(dealer.recover(&parsed[..threshold]).map_err(|e| SecAggError::Malformed(e.into()))?);
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(&secret);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> RoundContext {
        RoundContext { session: [9; 32], round: 3, attempt: 1 }
    }

    #[test]
    fn pairwise_seeds_agree_and_depend_on_the_round() {
        let mut rng = rand::rng();
        let (a, b) = (random_secret(&mut rng), random_secret(&mut rng));
        let s1 = pairwise_seed(&a, &public_key(&b), &ctx(), 1, 2).unwrap();
        let s2 = pairwise_seed(&b, &public_key(&a), &ctx(), 2, 1).unwrap();
        assert_eq!(*s1, *s2);
        let other = RoundContext { attempt: 2, ..ctx() };
        assert_ne!(*pairwise_seed(&a, &public_key(&b), &other, 1, 2).unwrap(), *s1);
    }

    #[test]
    fn a_low_order_key_is_refused() {
        let mut rng = rand::rng();
        let a = random_secret(&mut rng);
        assert!(pairwise_seed(&a, &[0u8; 32], &ctx(), 1, 2).is_err());
    }

    #[test]
    fn sealed_shares_open_only_for_their_holder_and_direction() {
        let mut rng = rand::rng();
        let (a, b) = (random_secret(&mut rng), random_secret(&mut rng));
        let msg = [5u8; SHARE_PAIR_BYTES];
        let sealed = seal_shares(&a, &public_key(&b), &ctx(), 0, 1, &msg).unwrap();
        assert_eq!(sealed.len(), SEALED_SHARE_BYTES);
        assert_eq!(*open_shares(&b, &public_key(&a), &ctx(), 0, 1, &sealed).unwrap(), msg);
        // Replayed as if it went the other way, or into another round: refused.
        assert!(open_shares(&b, &public_key(&a), &ctx(), 1, 0, &sealed).is_err());
        let later = RoundContext { round: 4, ..ctx() };
        assert!(open_shares(&b, &public_key(&a), &later, 0, 1, &sealed).is_err());
        let mut bad = sealed.clone();
        bad[3] ^= 1;
        assert!(open_shares(&b, &public_key(&a), &ctx(), 0, 1, &bad).is_err());
    }

    #[test]
    fn any_threshold_shares_recover_the_secret_and_fewer_do_not() {
        let mut rng = rand::rng();
        let secret = random_secret(&mut rng);
        let holders = [0, 2, 3, 7, 9];
        let shares = split(&secret, 3, &holders);
        assert_eq!(shares[3][0], 8); // x = id + 1
        let pick = [&*shares[4], &*shares[0], &*shares[2]];
        assert_eq!(*combine(&pick, 3).unwrap(), *secret);
        assert!(combine(&pick[..2], 3).is_err());
        assert!(combine(&[&*shares[0], &*shares[0], &*shares[1]], 3).is_err());
    }
}
