//! The mask generator: the ChaCha20 keystream (RFC 8439, 20 rounds, 96-bit nonce).
//!
//! Pinned specification, so that a client and the coordinator built from different versions
//! expand a seed into the same mask: key = the 32-byte seed, nonce = 12 zero bytes, block counter
//! starting at 0; the keystream bytes are read as little-endian `u32` words and word `i` masks
//! element `i`. The seed of every mask is used for one vector only, so the fixed nonce is safe.

use chacha20::cipher::{KeyIvInit, StreamCipher};
use chacha20::ChaCha20;

/// Bytes of a mask seed.
pub const SEED_BYTES: usize = 32;

/// Fills `out` with the ChaCha20 keystream of `key` under `nonce`, starting at block `counter`
/// (what the RFC test vectors are stated in).
#[cfg(test)]
fn keystream(key: &[u8; 32], nonce: &[u8; 12], counter: u32, out: &mut [u8]) {
    out.fill(0);
    let mut cipher = ChaCha20::new(key.into(), nonce.into());
    chacha20::cipher::StreamCipherSeek::seek(&mut cipher, u64::from(counter) * 64);
    cipher.apply_keystream(out);
}

/// Adds (`sign` = +1) or subtracts (`sign` = -1) the mask expanded from `seed` to `acc`, modulo 2^32.
pub fn apply_mask(seed: &[u8; SEED_BYTES], sign: i8, acc: &mut [u32]) {
    // Expand in 16 KiB pieces so a large model does not need a second model-sized buffer.
    const WORDS: usize = 4096;
    let mut cipher = ChaCha20::new(seed.into(), &[0u8; 12].into());
    let mut buf = vec![0u8; WORDS * 4];
    for piece in acc.chunks_mut(WORDS) {
        let bytes = &mut buf[..piece.len() * 4];
        bytes.fill(0);
        cipher.apply_keystream(bytes);
        for (slot, word) in piece.iter_mut().zip(bytes.chunks_exact(4)) {
            let m = u32::from_le_bytes([word[0], word[1], word[2], word[3]]);
            *slot = if sign >= 0 { slot.wrapping_add(m) } else { slot.wrapping_sub(m) };
        }
    }
}

/// The mask expanded from `seed`, `len` words long.
pub fn mask(seed: &[u8; SEED_BYTES], len: usize) -> Vec<u32> {
    let mut out = vec![0u32; len];
    apply_mask(seed, 1, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        hex::decode(s).unwrap()
    }

    /// RFC 8439 section 2.3.2: the block function test vector (key 00..1f, counter 1).
    #[test]
    fn rfc8439_block_function_vector() {
        let key: [u8; 32] = core::array::from_fn(|i| i as u8);
        let nonce: [u8; 12] = unhex("000000090000004a00000000").try_into().unwrap();
        let mut out = [0u8; 64];
        keystream(&key, &nonce, 1, &mut out);
        let want = unhex(
            "10 f1 e7 e4 d1 3b 59 15 50 0f dd 1f a3 20 71 c4 c7 d1 f4 c7 33 c0 68 03 04 22 aa 9a c3 d4 6c 4e
             d2 82 64 46 07 9f aa 09 14 c2 d7 05 d9 8b 02 a2 b5 12 9c d1 de 16 4e b9 cb d0 83 e8 a2 50 3c 4e",
        );
        assert_eq!(out.to_vec(), want);
    }

    /// RFC 8439 appendix A.1, test vector #1: the all-zero key and nonce at counter 0, which is
    /// exactly the mask of the all-zero seed under the pinned nonce.
    #[test]
    fn rfc8439_zero_key_vector_is_the_zero_seed_mask() {
        let want = unhex(
            "76 b8 e0 ad a0 f1 3d 90 40 5d 6a e5 53 86 bd 28 bd d2 19 b8 a0 8d ed 1a a8 36 ef cc 8b 77 0d c7
             da 41 59 7c 51 57 48 8d 77 24 e0 3f b8 d8 4a 37 6a 43 b8 f4 15 18 a1 1c c3 87 b6 69 b2 ee 65 86",
        );
        let words: Vec<u32> = want.chunks_exact(4).map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]])).collect();
        assert_eq!(mask(&[0u8; 32], 16), words);
    }

    #[test]
    fn long_masks_are_one_continuous_keystream() {
        let seed = [7u8; 32];
        let long = mask(&seed, 10_000);
        let mut bytes = vec![0u8; 40_000];
        keystream(&seed, &[0u8; 12], 0, &mut bytes);
        let words: Vec<u32> = bytes.chunks_exact(4).map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]])).collect();
        assert_eq!(long, words);
        let mut acc = long.clone();
        apply_mask(&seed, -1, &mut acc);
        assert!(acc.iter().all(|&w| w == 0));
    }
}
