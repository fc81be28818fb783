//! Hashed n-gram tokenizer: no vocabulary is ever built or exchanged.
//!
//! Words are lowercase runs of letters, digits and apostrophes. Each n-gram (words joined by one
//! space) is hashed with 64-bit FNV-1a, which is fixed and platform independent, into `buckets` ids.

/// Splits text into words and hashes n-grams into a fixed id space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HashedNgramTokenizer {
    buckets: u32,
    ngrams: u32,
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// 64-bit FNV-1a of a byte string.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(FNV_OFFSET, |hash, &b| (hash ^ u64::from(b)).wrapping_mul(FNV_PRIME))
}

/// The words of `text`: lowercase runs of letters, digits and apostrophes.
pub fn words(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for c in text.chars() {
        if c.is_alphanumeric() || c == '\'' {
            current.extend(c.to_lowercase());
        } else if !current.is_empty() {
            out.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

impl HashedNgramTokenizer {
    /// A tokenizer hashing 1..=`ngrams`-grams into `buckets` ids.
    pub fn new(buckets: u32, ngrams: u32) -> Self {
        assert!(buckets > 0 && ngrams > 0, "buckets and ngrams must be positive");
        HashedNgramTokenizer { buckets, ngrams }
    }

    /// Longest n-gram hashed.
    pub fn ngrams(&self) -> u32 {
        self.ngrams
    }

    /// The id of one n-gram given as its words.
    pub fn ngram_id(&self, ngram: &[String]) -> i64 {
        let joined = ngram.join(" ");
        (fnv1a64(joined.as_bytes()) % u64::from(self.buckets)) as i64
    }

    /// Ids of all unigrams, then all bigrams, and so on up to `ngrams`.
    pub fn ids(&self, text: &str) -> Vec<i64> {
        let words = words(text);
        let mut ids = Vec::with_capacity(words.len() * self.ngrams as usize);
        for n in 1..=self.ngrams as usize {
            ids.extend(words.windows(n).map(|w| self.ngram_id(w)));
        }
        ids
    }

    /// Ids of the unigrams only, in text order (for sequence models).
    pub fn word_ids(&self, text: &str) -> Vec<i64> {
        words(text).iter().map(|w| self.ngram_id(std::slice::from_ref(w))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_lowercase_runs_of_letters_digits_apostrophes() {
        assert_eq!(words("Don't STOP, me-now 42x!"), vec!["don't", "stop", "me", "now", "42x"]);
        assert_eq!(words("Ünïcode Straße"), vec!["ünïcode", "straße"]);
        assert!(words(" ,.;").is_empty());
    }

    #[test]
    fn hash_is_pinned() {
        // FNV-1a 64 reference values: these must never change, or federations break.
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x85944171f73967e8);
        let tok = HashedNgramTokenizer::new(65_536, 2);
        assert_eq!(tok.ids("a"), vec![0xec8c]);
        assert_eq!(tok.ids("Foobar"), vec![0x67e8]);
        let ids = tok.ids("hello world");
        assert_eq!(ids.len(), 3, "two unigrams and one bigram");
        assert_eq!(ids[2], (fnv1a64(b"hello world") % 65_536) as i64);
        assert_eq!(ids, vec![48_395, 35_571, 53_991]);
    }
}
