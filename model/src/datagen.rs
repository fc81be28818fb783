//! A generator of labelled text: topics with their own keywords among shared filler words, so
//! that demos and tests need no download. Deterministic for a seed.

use std::path::Path;

use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Gamma};

/// Topic names; the first `classes` are used.
pub const TOPICS: [&str; 16] = [
    "sports",
    "politics",
    "science",
    "finance",
    "health",
    "travel",
    "music",
    "food",
    "weather",
    "tech",
    "crime",
    "education",
    "fashion",
    "film",
    "gaming",
    "energy",
];

const SYLLABLES: [&str; 24] = [
    "ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "ve", "da", "zu", "fe", "go", "hi", "ja", "ku", "ly", "mo", "ni",
    "ox", "pu", "ra", "se", "tu",
];

/// How to generate a dataset.
#[derive(Clone, Debug)]
pub struct GeneratorConfig {
    /// Number of classes (at most 16).
    pub classes: usize,
    /// Keywords that belong to each class.
    pub keywords_per_class: usize,
    /// Size of the shared filler vocabulary.
    pub filler_words: usize,
    /// Probability that a word is a keyword of the row's class; the rest are filler or other
    /// classes' keywords. Lower is harder.
    pub signal: f64,
    /// Probability that a word is a keyword of another class (a confuser).
    pub confusion: f64,
    /// Fraction of rows whose label is replaced by a random one.
    pub label_noise: f64,
    /// Seed.
    pub seed: u64,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        GeneratorConfig {
            classes: 10,
            keywords_per_class: 40,
            filler_words: 400,
            signal: 0.2,
            confusion: 0.1,
            label_noise: 0.05,
            seed: 7,
        }
    }
}

/// A row of generated data.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// The text.
    pub text: String,
    /// Index of the label in [`TOPICS`].
    pub label: usize,
}

fn pseudo_word(rng: &mut impl Rng) -> String {
    let n = rng.random_range(2..=4);
    (0..n).map(|_| *SYLLABLES.choose(rng).expect("non-empty")).collect()
}

/// Generates labelled rows.
#[derive(Debug)]
pub struct TextGenerator {
    config: GeneratorConfig,
    keywords: Vec<Vec<String>>,
    filler: Vec<String>,
}

impl TextGenerator {
    /// Makes the vocabularies for `config`; the same seed gives the same words.
    pub fn new(config: GeneratorConfig) -> Self {
        assert!((1..=TOPICS.len()).contains(&config.classes), "classes must be 1..=16");
        let mut rng = rand::rngs::StdRng::seed_from_u64(config.seed);
        let mut seen = std::collections::HashSet::new();
        let mut fresh = |rng: &mut rand::rngs::StdRng| loop {
            let w = pseudo_word(rng);
            if seen.insert(w.clone()) {
                return w;
            }
        };
        let keywords =
            (0..config.classes).map(|_| (0..config.keywords_per_class).map(|_| fresh(&mut rng)).collect()).collect();
        let filler = (0..config.filler_words).map(|_| fresh(&mut rng)).collect();
        TextGenerator { config, keywords, filler }
    }

    /// The label names.
    pub fn labels(&self) -> Vec<String> {
        TOPICS[..self.config.classes].iter().map(|s| s.to_string()).collect()
    }

    /// The keywords of class `label` (what a good explanation should point at).
    pub fn keywords(&self, label: usize) -> &[String] {
        &self.keywords[label]
    }

    /// The shared filler words.
    pub fn filler(&self) -> &[String] {
        &self.filler
    }

    /// `n` rows drawn with `seed` (independent of the vocabulary seed).
    pub fn rows(&self, n: usize, seed: u64) -> Vec<Row> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15);
        let c = self.config.classes;
        (0..n)
            .map(|_| {
                let label = rng.random_range(0..c);
                let len = rng.random_range(8..=24);
                let words: Vec<&str> = (0..len)
                    .map(|_| {
                        let p: f64 = rng.random();
                        let list = if p < self.config.signal {
                            &self.keywords[label]
                        } else if p < self.config.signal + self.config.confusion {
                            &self.keywords[rng.random_range(0..c)]
                        } else {
                            &self.filler
                        };
                        list.choose(&mut rng).expect("non-empty").as_str()
                    })
                    .collect();
                let mut text = words.join(" ");
                if let Some(first) = text.get_mut(0..1) {
                    first.make_ascii_uppercase();
                }
                text.push('.');
                let label = if rng.random::<f64>() < self.config.label_noise { rng.random_range(0..c) } else { label };
                Row { text, label }
            })
            .collect()
    }
}

/// How rows are split among clients.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Partition {
    /// Shuffled and dealt evenly.
    Iid,
    /// Per class, shares drawn from a Dirichlet distribution with this concentration (smaller is
    /// more skewed).
    Dirichlet(f64),
}

/// Splits `rows` into `shards` parts. Every row lands in exactly one part.
pub fn partition(rows: &[Row], shards: usize, how: Partition, classes: usize, seed: u64) -> Vec<Vec<Row>> {
    assert!(shards > 0, "at least one shard");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = vec![Vec::new(); shards];
    match how {
        Partition::Iid => {
            let mut idx: Vec<usize> = (0..rows.len()).collect();
            idx.shuffle(&mut rng);
            for (i, r) in idx.into_iter().enumerate() {
                out[i % shards].push(rows[r].clone());
            }
        }
        Partition::Dirichlet(alpha) => {
            let gamma = Gamma::new(alpha, 1.0).expect("alpha must be positive");
            for class in 0..classes {
                let mut members: Vec<&Row> = rows.iter().filter(|r| r.label == class).collect();
                members.shuffle(&mut rng);
                let weights: Vec<f64> = (0..shards).map(|_| gamma.sample(&mut rng) + 1e-12).collect();
                let total: f64 = weights.iter().sum();
                let mut start = 0usize;
                let mut acc = 0.0;
                for (s, w) in weights.iter().enumerate() {
                    acc += w / total;
                    let end =
                        if s + 1 == shards { members.len() } else { (acc * members.len() as f64).round() as usize };
                    out[s].extend(members[start..end.max(start)].iter().map(|r| (*r).clone()));
                    start = end.max(start);
                }
            }
            for shard in &mut out {
                shard.shuffle(&mut rng);
            }
        }
    }
    out
}

/// Writes rows as a `text,label` CSV.
pub fn write_csv(path: &Path, rows: &[Row], labels: &[String]) -> std::io::Result<()> {
    let mut w = csv::Writer::from_path(path)?;
    w.write_record(["text", "label"])?;
    for r in rows {
        w.write_record([r.text.as_str(), labels[r.label].as_str()])?;
    }
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_is_deterministic_and_partitions_cover_all_rows() {
        let g = TextGenerator::new(GeneratorConfig::default());
        let rows = g.rows(500, 1);
        assert_eq!(rows, TextGenerator::new(GeneratorConfig::default()).rows(500, 1));
        for how in [Partition::Iid, Partition::Dirichlet(0.3)] {
            let parts = partition(&rows, 4, how, 10, 3);
            assert_eq!(parts.iter().map(Vec::len).sum::<usize>(), 500);
        }
        let iid = partition(&rows, 4, Partition::Iid, 10, 3);
        assert!(iid.iter().all(|p| p.len() == 125));
    }
}
