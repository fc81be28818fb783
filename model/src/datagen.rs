//! A generator of labelled English text, so that demos and tests need no download: sentences from
//! templates, whose content slots hold real topic words ("the striker scored a late goal") or
//! words every topic shares ("the officials said the plan was important"). Some sentences mix two
//! topics, some labels are wrong, some rows carry no topic word at all, so a model cannot reach
//! 100 %. Deterministic for a seed.

use std::collections::BTreeSet;
use std::path::Path;

use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};

use crate::tokenizer::words;

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

/// The words of one topic by part of speech, so that templates stay grammatical enough to read.
struct Lexicon {
    nouns: &'static str,
    verbs: &'static str,
    adjectives: &'static str,
}

/// Topic words, in the order of [`TOPICS`]. No word belongs to two topics or to [`SHARED`].
const LEXICONS: [Lexicon; 16] = [
    Lexicon {
        nouns: "match goal striker coach league referee penalty tournament season team stadium fans champions \
                midfielder defender goalkeeper trophy cup tennis football athletes marathon medal kickoff",
        verbs: "scored won defeated tackled qualified equalised substituted sprinted",
        adjectives: "extra unbeaten relegated injured athletic sporting",
    },
    Lexicon {
        nouns: "election parliament minister senator vote campaign party coalition president government policy \
                opposition ballot voters legislation debate mayor referendum diplomats treaty cabinet governor \
                congress lawmakers",
        verbs: "elected vetoed campaigned legislated resigned negotiated lobbied ratified",
        adjectives: "partisan electoral diplomatic legislative conservative liberal",
    },
    Lexicon {
        nouns: "researchers experiment laboratory hypothesis physics chemistry telescope molecules genome species \
                dinosaur particles astronomers theory microscope scientists cells biology galaxy planet bacteria \
                specimen evolution equation",
        verbs: "discovered measured observed published sequenced analysed synthesised hypothesised",
        adjectives: "scientific experimental genetic molecular quantum empirical",
    },
    Lexicon {
        nouns: "bank shares investors stocks market interest rates inflation bonds profits earnings dividend \
                currency loans mortgage traders portfolio revenue shareholders budget debt economy tax fund",
        verbs: "rallied invested borrowed traded plunged lent audited raised",
        adjectives: "fiscal quarterly financial monetary bullish central",
    },
    Lexicon {
        nouns: "doctors patients hospital vaccine nurses disease symptoms treatment clinic infection surgery diet \
                virus medicine therapy diagnosis flu pandemic blood heart cancer pharmacy prescription vitamins",
        verbs: "diagnosed vaccinated treated recovered prescribed infected operated healed",
        adjectives: "medical chronic clinical healthy contagious sick",
    },
    Lexicon {
        nouns: "flight airport passengers hotel tourists luggage passport beach cruise resort journey trip airline \
                visa destination holiday suitcase itinerary sightseeing backpackers booking island museum vacation",
        verbs: "travelled flew booked landed explored departed visited toured",
        adjectives: "scenic exotic overseas coastal remote guided",
    },
    Lexicon {
        nouns: "concert album band guitar singer song lyrics orchestra drummer melody chorus rapper piano festival \
                symphony vinyl playlist chart gig violin choir jazz tune musicians",
        verbs: "sang recorded performed composed strummed rehearsed remixed encored",
        adjectives: "acoustic musical melodic catchy classical orchestral",
    },
    Lexicon {
        nouns: "recipe chef restaurant kitchen dinner menu bread cheese soup dessert flavour ingredients pasta sauce \
                salad breakfast bakery spices wine chocolate lunch meal butter garlic",
        verbs: "cooked baked tasted roasted served seasoned grilled fried",
        adjectives: "delicious spicy tasty crispy sweet savoury",
    },
    Lexicon {
        nouns: "rain storm forecast temperatures snow winds clouds sunshine thunder flood drought hurricane fog \
                frost humidity showers heatwave umbrella lightning breeze tornado hail blizzard meteorologists",
        verbs: "rained snowed froze poured flooded drizzled thundered gusted",
        adjectives: "stormy sunny cloudy windy humid chilly",
    },
    Lexicon {
        nouns: "software smartphone app startup computer algorithm chips processor internet data developers code \
                robot servers laptop browser engineers gadget network cybersecurity users encryption silicon \
                platform",
        verbs: "launched coded upgraded downloaded programmed automated debugged deployed",
        adjectives: "digital wireless online artificial technical virtual",
    },
    Lexicon {
        nouns: "police suspect arrest court judge jury theft robbery detectives prison trial murder fraud witness \
                lawyer burglary officers evidence verdict gang smuggling warrant victim charges",
        verbs: "arrested charged convicted stole robbed sentenced investigated confessed",
        adjectives: "criminal guilty illegal suspicious violent armed",
    },
    Lexicon {
        nouns: "school students teachers university exam classroom curriculum homework lessons degree pupils campus \
                lecture professor scholarship graduates tuition grades semester library textbook kindergarten \
                diploma course",
        verbs: "graduated studied enrolled taught lectured tutored revised learned",
        adjectives: "academic educational undergraduate literate bilingual scholarly",
    },
    Lexicon {
        nouns: "designer runway dress models collection clothing jacket fabric boutique style shoes trends couture \
                jewellery handbag catwalk wardrobe silk denim outfit brand tailor skirt sneakers",
        verbs: "wore designed stitched modelled tailored styled dressed knitted",
        adjectives: "stylish elegant trendy fashionable vintage glamorous",
    },
    Lexicon {
        nouns: "movie director actor actress cinema screenplay premiere sequel trailer oscar blockbuster scene \
                camera script documentary hollywood cast critics thriller comedy drama role screen animation",
        verbs: "filmed directed starred premiered screened dubbed adapted rewound",
        adjectives: "cinematic animated dramatic directorial hilarious gripping",
    },
    Lexicon {
        nouns: "gamers console level quest controller multiplayer esports boss joystick arcade graphics character \
                puzzle dungeon gameplay leaderboard avatar headset streamer speedrun expansion achievements shooter \
                sandbox",
        verbs: "unlocked respawned streamed levelled crafted glitched grinded modded",
        adjectives: "playable retro pixelated immersive handheld multiplatform",
    },
    Lexicon {
        nouns: "solar turbines electricity power grid oil gas coal pipeline reactor batteries emissions fuel \
                renewables panels utility barrels refinery hydrogen kilowatt outage dam drilling carbon",
        verbs: "generated drilled refined powered extracted electrified pumped fuelled",
        adjectives: "renewable nuclear electric green fossil offshore",
    },
];

/// Content words every topic uses: they carry no label.
const SHARED: Lexicon = Lexicon {
    nouns: "people week report city plan day group news officials statement morning weekend year month country \
            family friends town community company question story moment change problem result night afternoon \
            area region crowd experts residents world life idea number",
    verbs: "said announced reported expected started discussed described followed changed shared wanted called \
            saw found made took began went came showed",
    adjectives: "new big local early late important long small major recent strong heavy good bad first last \
                 whole different usual surprising busy quiet great full",
};

/// When things happened (the `{t}` slot); shared by every topic.
const TIMES: [&str; 10] = [
    "on monday",
    "last week",
    "this morning",
    "yesterday",
    "on friday night",
    "earlier today",
    "over the weekend",
    "for the first time",
    "after a long wait",
    "this year",
];

/// Sentence templates. `{n}`, `{v}`, `{a}`: a noun, past-tense verb or adjective, from the row's
/// topic or shared; `{t}`: a time phrase. The rest are function words every topic shares.
const TEMPLATES: [&str; 16] = [
    "the {a} {n} {v} the {n} {t}.",
    "{t} the {n} {v} a {a} {n}.",
    "the {n} {v} the {n} in the {n} {t}.",
    "the {n} {v} {t}, and the {n} was {a}.",
    "many {n} said the {n} was {a} {t}.",
    "the {n} of the {n} {v} with the {a} {n}.",
    "people {v} the {n} after a {a} {n}.",
    "it was a {a} {n} for the {n}.",
    "there is a {a} {n} about the {n} {t}.",
    "the {n} {v} before the {n} {v} the {n}.",
    "officials {v} that the {n} is {a}.",
    "{t} we {v} the {a} {n} at the {n}.",
    "the {a} {n} {v} more {n} than the {n}.",
    "nobody knew why the {n} {v} the {n}.",
    "a {a} {n} and a {n} {v} {t}.",
    "according to the {n}, the {n} {v} the {a} {n}.",
];

/// How to generate a dataset.
#[derive(Clone, Debug)]
pub struct GeneratorConfig {
    /// Number of classes (at most 16).
    pub classes: usize,
    /// Probability that a content slot holds a word of the row's topic; lower is harder.
    pub signal: f64,
    /// Probability that a content slot holds a word of a random topic (a confuser).
    pub confusion: f64,
    /// Fraction of rows that mix their topic with a second one about equally (ambiguous rows).
    pub ambiguous: f64,
    /// Fraction of rows whose label is replaced by a random one.
    pub label_noise: f64,
    /// Seed: with the seed of [`TextGenerator::rows`], it fixes every row.
    pub seed: u64,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        GeneratorConfig { classes: 10, signal: 0.8, confusion: 0.05, ambiguous: 0.1, label_noise: 0.05, seed: 7 }
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

/// One part of speech: what a content slot asks for.
#[derive(Clone, Copy, Debug)]
enum Part {
    Noun,
    Verb,
    Adjective,
}

/// A topic's (or the shared) words by part of speech.
#[derive(Debug)]
struct Words {
    nouns: Vec<&'static str>,
    verbs: Vec<&'static str>,
    adjectives: Vec<&'static str>,
}

impl Words {
    fn of(lexicon: &Lexicon) -> Self {
        let split = |s: &'static str| s.split_whitespace().collect::<Vec<_>>();
        Words { nouns: split(lexicon.nouns), verbs: split(lexicon.verbs), adjectives: split(lexicon.adjectives) }
    }

    fn part(&self, part: Part) -> &[&'static str] {
        match part {
            Part::Noun => &self.nouns,
            Part::Verb => &self.verbs,
            Part::Adjective => &self.adjectives,
        }
    }

    fn all(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.nouns.iter().chain(&self.verbs).chain(&self.adjectives).copied()
    }
}

/// Generates labelled rows.
#[derive(Debug)]
pub struct TextGenerator {
    config: GeneratorConfig,
    topics: Vec<Words>,
    shared: Words,
    keywords: Vec<Vec<String>>,
    filler: Vec<String>,
}

impl TextGenerator {
    /// A generator for `config`.
    pub fn new(config: GeneratorConfig) -> Self {
        assert!((1..=TOPICS.len()).contains(&config.classes), "classes must be 1..=16");
        let topics: Vec<Words> = LEXICONS[..config.classes].iter().map(Words::of).collect();
        let shared = Words::of(&SHARED);
        let keywords = topics.iter().map(|t| t.all().map(String::from).collect()).collect();
        // Everything a row can hold that is not a topic word: shared content words, time phrases and
        // the templates' function words.
        let mut filler: BTreeSet<String> = shared.all().map(String::from).collect();
        for phrase in TIMES {
            filler.extend(words(phrase));
        }
        for template in TEMPLATES {
            filler.extend(words(&template.replace(['{', '}'], " ")));
        }
        for slot in ["n", "v", "t"] {
            // Slot names, not words ("a" is both, and stays).
            filler.remove(slot);
        }
        TextGenerator { config, topics, shared, keywords, filler: filler.into_iter().collect() }
    }

    /// The label names.
    pub fn labels(&self) -> Vec<String> {
        TOPICS[..self.config.classes].iter().map(|s| s.to_string()).collect()
    }

    /// The words of class `label`'s topic (what a good explanation should point at).
    pub fn keywords(&self, label: usize) -> &[String] {
        &self.keywords[label]
    }

    /// The words that belong to no topic: shared content words and function words.
    pub fn filler(&self) -> &[String] {
        &self.filler
    }

    /// `n` rows drawn with `seed` (and the config's seed).
    pub fn rows(&self, n: usize, seed: u64) -> Vec<Row> {
        let mut rng =
            rand::rngs::StdRng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15 ^ self.config.seed.rotate_left(32));
        let c = self.config.classes;
        (0..n)
            .map(|_| {
                let label = rng.random_range(0..c);
                // An ambiguous row draws its topic words from two topics about equally.
                let second = (c > 1 && rng.random::<f64>() < self.config.ambiguous)
                    .then(|| (label + rng.random_range(1..c)) % c);
                let sentences = rng.random_range(1..=2);
                let mut text = String::new();
                for _ in 0..sentences {
                    let template = *TEMPLATES.choose(&mut rng).expect("templates");
                    let sentence = self.fill(template, label, second, &mut rng);
                    if !text.is_empty() {
                        text.push(' ');
                    }
                    let mut chars = sentence.chars();
                    if let Some(first) = chars.next() {
                        text.extend(first.to_uppercase());
                        text.push_str(chars.as_str());
                    }
                }
                let label = if rng.random::<f64>() < self.config.label_noise { rng.random_range(0..c) } else { label };
                Row { text, label }
            })
            .collect()
    }

    fn fill(&self, template: &str, label: usize, second: Option<usize>, rng: &mut impl Rng) -> String {
        let mut out = String::with_capacity(template.len() + 40);
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let close = open + rest[open..].find('}').expect("closed slot");
            let part = match &rest[open + 1..close] {
                "n" => Part::Noun,
                "v" => Part::Verb,
                "a" => Part::Adjective,
                _ => {
                    out.push_str(TIMES.choose(rng).expect("times"));
                    rest = &rest[close + 1..];
                    continue;
                }
            };
            let p: f64 = rng.random();
            let words = if p < self.config.signal {
                let topic = match second {
                    Some(other) if rng.random::<bool>() => other,
                    _ => label,
                };
                &self.topics[topic]
            } else if p < self.config.signal + self.config.confusion {
                &self.topics[rng.random_range(0..self.topics.len())]
            } else {
                &self.shared
            };
            out.push_str(words.part(part).choose(rng).expect("non-empty word list"));
            rest = &rest[close + 1..];
        }
        out.push_str(rest);
        out
    }
}

pub use crate::partition::{Partition, PartitionError};

/// Splits `rows` into `shards` parts with [`crate::partition::partition_indices`] (no minimum
/// shard size). Every row lands in exactly one part.
pub fn partition(
    rows: &[Row],
    shards: usize,
    how: Partition,
    classes: usize,
    seed: u64,
) -> Result<Vec<Vec<Row>>, PartitionError> {
    let labels: Vec<usize> = rows.iter().map(|r| r.label).collect();
    let parts = crate::partition::partition_indices(&labels, classes, shards, &how, 0, seed)?;
    Ok(parts.into_iter().map(|part| part.into_iter().map(|i| rows[i].clone()).collect()).collect())
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
            let parts = partition(&rows, 4, how, 10, 3).unwrap();
            assert_eq!(parts.iter().map(Vec::len).sum::<usize>(), 500);
        }
        let iid = partition(&rows, 4, Partition::Iid, 10, 3).unwrap();
        assert!(iid.iter().all(|p| p.len() == 125));
        let other_seed = TextGenerator::new(GeneratorConfig { seed: 8, ..Default::default() }).rows(500, 1);
        assert_ne!(rows, other_seed);
    }

    #[test]
    fn every_word_belongs_to_one_topic_or_to_none() {
        let g = TextGenerator::new(GeneratorConfig { classes: 16, ..Default::default() });
        let mut owner = std::collections::HashMap::new();
        for (label, topic) in TOPICS.iter().enumerate() {
            assert!(g.keywords(label).len() >= 30, "{topic}: too few words");
            for word in g.keywords(label) {
                assert_eq!(words(word), std::slice::from_ref(word), "{word:?} is not one tokenizer word");
                if let Some(other) = owner.insert(word.clone(), label) {
                    panic!("{word:?} is in {} and {topic}", TOPICS[other]);
                }
                assert!(!g.filler().contains(word), "{word:?} is a topic word and a shared word");
            }
        }
        for word in ["the", "a", "of", "said", "week", "yesterday"] {
            assert!(g.filler().iter().any(|w| w == word), "{word:?} should be shared");
        }
    }

    #[test]
    fn rows_are_sentences_of_known_words() {
        let g = TextGenerator::new(GeneratorConfig::default());
        let known: std::collections::HashSet<&String> = (0..10).flat_map(|l| g.keywords(l)).chain(g.filler()).collect();
        let rows = g.rows(300, 4);
        for row in &rows {
            assert!(row.text.starts_with(|c: char| c.is_ascii_uppercase()) && row.text.ends_with('.'), "{row:?}");
            for word in words(&row.text) {
                assert!(known.contains(&word), "{word:?} in {:?} comes from nowhere", row.text);
            }
        }
        // Most rows name their topic; some do not, or name another, so that 100 % is out of reach.
        let on_topic = rows.iter().filter(|r| words(&r.text).iter().any(|w| g.keywords(r.label).contains(w))).count();
        assert!((200..295).contains(&on_topic), "{on_topic} of 300 rows hold a word of their label");
    }
}
