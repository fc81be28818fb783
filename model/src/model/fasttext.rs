//! fastText-style classifier: hashed n-gram embeddings, mean-pooled, then a linear layer.

use std::ops::Range;

use fl_common::ModelSpec;
use tch::{nn, nn::Module, Tensor};

use super::{Architecture, Batch};
use crate::tokenizer::HashedNgramTokenizer;

/// EmbeddingBag (mean) over hashed n-grams, then linear.
#[derive(Debug)]
pub struct FastText {
    linear: nn::Linear,
}

/// `mode` argument of `embedding_bag` for mean pooling.
const MEAN: i64 = 1;

impl FastText {
    /// Creates the parameters under `root`: `embedding.weight`, `linear.weight`, `linear.bias`.
    pub fn new(root: &nn::Path<'_>, spec: &ModelSpec) -> FastText {
        let dim = i64::from(spec.embed_dim);
        // fastText's initialisation: small uniform input vectors.
        let bound = 1.0 / dim as f64;
        let _ = root.sub("embedding").var(
            "weight",
            &[i64::from(spec.buckets), dim],
            nn::Init::Uniform { lo: -bound, up: bound },
        );
        let linear = nn::linear(root / "linear", dim, spec.num_classes() as i64, Default::default());
        FastText { linear }
    }
}

impl Architecture for FastText {
    fn token_ids(&self, tokenizer: &HashedNgramTokenizer, text: &str) -> Vec<i64> {
        tokenizer.ids(text)
    }

    fn token_spans(&self, tokenizer: &HashedNgramTokenizer, text: &str) -> Vec<Range<usize>> {
        // The same order as `HashedNgramTokenizer::ids`: all unigrams, then all bigrams, ...
        let words = crate::tokenizer::words(text).len();
        (1..=tokenizer.ngrams() as usize)
            .flat_map(|n| (0..(words + 1).saturating_sub(n)).map(move |i| i..i + n))
            .collect()
    }

    fn pooled(&self, table: &Tensor, batch: &Batch, _train: bool) -> Tensor {
        let (pooled, _, _, _) =
            Tensor::embedding_bag(table, &batch.ids, &batch.offsets, false, MEAN, false, None::<Tensor>, false);
        pooled
    }

    fn head(&self, pooled: &Tensor, _train: bool) -> Tensor {
        self.linear.forward(pooled)
    }

    fn head_names(&self) -> &'static [&'static str] {
        &["linear.weight", "linear.bias"]
    }
}
