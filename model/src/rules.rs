//! Rules from a trained model: what it looks for in each class, and a short ordered rule list
//! that imitates it.
//!
//! - Per class, the n-grams (fastText) or words (sequence models) that most raise that class,
//!   each with the precision and coverage that the model's own predictions give on the data:
//!   coverage is the fraction of rows containing the n-gram, precision the fraction of those rows
//!   that the model assigns to the class.
//! - For fastText an n-gram's score comes straight from the weights: its bucket's embedding times
//!   the output layer, the class's logit contribution minus the mean over classes. Buckets are
//!   hashed, so the n-grams of the data that share a bucket share its score: that is flagged
//!   (`collides_with`), not hidden. Sequence models mix words, so their word scores are the total
//!   occlusion drop of the class's probability over the rows that the model assigns to the class.
//! - The rule list is built by sequential covering against the model's predictions: each step
//!   picks, among rules of the form "the text contains at least m of these n-grams → class"
//!   (m-of-n rules, the classic form of rules extracted from networks; one n-gram and m = 1 is
//!   plain "contains X"), the one that agrees with the model on the most not-yet-covered rows,
//!   among those whose precision on these rows reaches `min_precision`. Rows it covers are
//!   removed. A default rule takes the rest. Its fidelity (agreement with the model) and accuracy
//!   are measured on held-out rows.

use std::collections::HashMap;
use std::fmt::Write;

use fl_common::ModelKind;
use serde::Serialize;

use crate::explain::{explain_label, Method};
use crate::model::Classifier;
use crate::tokenizer::words;

/// How many n-grams to show and how the rule list is built.
#[derive(Clone, Debug, PartialEq)]
pub struct RulesConfig {
    /// N-grams listed per class, and the most rules per class in the rule list.
    pub per_class: usize,
    /// Least precision (agreement with the model on the rows a rule is the first to match) of a rule.
    pub min_precision: f64,
    /// Least number of rows an n-gram must occur in to be listed or used, and a rule must win.
    pub min_support: usize,
    /// Sequence models: the most rows explained by occlusion to score words.
    pub occlusion_rows: usize,
}

impl Default for RulesConfig {
    fn default() -> Self {
        RulesConfig { per_class: 10, min_precision: 0.7, min_support: 5, occlusion_rows: 400 }
    }
}

/// The n-grams of the rows and which rows contain each: the vocabulary the rules are made of.
#[derive(Clone, Debug, Default)]
pub struct NgramIndex {
    /// The distinct n-grams (words joined by one space).
    pub ngrams: Vec<String>,
    /// For each n-gram, the rows containing it, ascending.
    pub rows_with: Vec<Vec<u32>>,
    /// Number of rows indexed.
    pub rows: usize,
    ids: HashMap<String, u32>,
}

/// The distinct 1..=`max_n`-grams of a text, as words joined by one space.
pub fn text_ngrams(text: &str, max_n: usize) -> Vec<String> {
    let words = words(text);
    let mut out: Vec<String> = (1..=max_n.max(1)).flat_map(|n| words.windows(n).map(|w| w.join(" "))).collect();
    out.sort();
    out.dedup();
    out
}

impl NgramIndex {
    /// Indexes the 1..=`max_n`-grams of `texts`.
    pub fn new(texts: &[&str], max_n: usize) -> NgramIndex {
        let mut index = NgramIndex { rows: texts.len(), ..Default::default() };
        for (row, text) in texts.iter().enumerate() {
            for g in text_ngrams(text, max_n) {
                let id = *index.ids.entry(g.clone()).or_insert_with(|| {
                    index.ngrams.push(g);
                    index.rows_with.push(Vec::new());
                    index.ngrams.len() as u32 - 1
                });
                index.rows_with[id as usize].push(row as u32);
            }
        }
        index
    }

    /// The id of an n-gram, if the rows contain it.
    pub fn id(&self, ngram: &str) -> Option<u32> {
        self.ids.get(ngram).copied()
    }
}

/// Precision and coverage of "contains the n-gram → `class`" against `predictions`: coverage is
/// the fraction of all rows that contain it, precision the fraction of those predicted `class`.
pub fn precision_coverage(rows_with: &[u32], predictions: &[usize], class: usize) -> (f64, f64) {
    if rows_with.is_empty() || predictions.is_empty() {
        return (0.0, 0.0);
    }
    let agree = rows_with.iter().filter(|&&r| predictions[r as usize] == class).count();
    (agree as f64 / rows_with.len() as f64, rows_with.len() as f64 / predictions.len() as f64)
}

/// One n-gram that raises a class.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ScoredNgram {
    /// The n-gram (words joined by one space).
    pub ngram: String,
    /// How much it raises the class: logit contribution above the mean class (fastText) or total
    /// probability drop when removed, over the rows assigned to the class (sequence models).
    pub score: f32,
    /// Fraction of the rows containing it that the model assigns to the class.
    pub precision: f64,
    /// Fraction of the rows containing it.
    pub coverage: f64,
    /// Other n-grams of the data hashed to the same bucket, which share its weights (fastText).
    pub collides_with: Vec<String>,
}

/// The condition of a rule: the text contains at least `at_least` of `ngrams`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Condition {
    /// The n-grams looked for.
    pub ngrams: Vec<String>,
    /// How many of them must occur.
    pub at_least: usize,
}

impl Condition {
    /// True if a text with these n-grams meets the condition.
    pub fn matches(&self, present: &std::collections::HashSet<String>) -> bool {
        self.ngrams.iter().filter(|g| present.contains(*g)).take(self.at_least).count() >= self.at_least
    }
}

impl std::fmt::Display for Condition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let quoted: Vec<String> = self.ngrams.iter().map(|g| format!("\"{g}\"")).collect();
        match (self.ngrams.len(), self.at_least) {
            (1, _) => write!(f, "contains {}", quoted[0]),
            (_, 1) => write!(f, "contains any of {{{}}}", quoted.join(", ")),
            (_, m) => write!(f, "contains at least {m} of {{{}}}", quoted.join(", ")),
        }
    }
}

/// One rule of the ordered list.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Rule {
    /// When it fires (`None`: the default rule, always).
    pub condition: Option<Condition>,
    /// Index of the class it gives.
    pub class: usize,
    /// The class's name.
    pub label: String,
    /// Rows of the build set that reached this rule and matched it.
    pub covered: usize,
    /// Fraction of those that the model assigns to `class`.
    pub precision: f64,
}

/// An ordered rule list: the first rule whose condition holds gives the class; the last rule is
/// the default.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RuleList {
    /// The rules, the default last.
    pub rules: Vec<Rule>,
}

impl RuleList {
    /// The class the rules give a text with these n-grams.
    pub fn classify(&self, present: &std::collections::HashSet<String>) -> usize {
        self.rules
            .iter()
            .find(|r| r.condition.as_ref().is_none_or(|c| c.matches(present)))
            .map(|r| r.class)
            .unwrap_or(0)
    }

    /// The class the rules give `text`, read as 1..=`max_n`-grams.
    pub fn classify_text(&self, text: &str, max_n: usize) -> usize {
        self.classify(&text_ngrams(text, max_n).into_iter().collect())
    }
}

/// A candidate rule during sequential covering, with the rows it matches.
struct Candidate {
    condition: Condition,
    class: usize,
    rows: Vec<u32>,
}

/// The rows containing at least `m` of the given n-grams.
fn rows_matching(index: &NgramIndex, ids: &[u32], m: usize) -> Vec<u32> {
    let mut hits: HashMap<u32, usize> = HashMap::new();
    for &id in ids {
        for &r in &index.rows_with[id as usize] {
            *hits.entry(r).or_default() += 1;
        }
    }
    let mut rows: Vec<u32> = hits.into_iter().filter(|&(_, n)| n >= m).map(|(r, _)| r).collect();
    rows.sort_unstable();
    rows
}

/// Builds an ordered rule list imitating `predictions` on the indexed rows, from each class's
/// n-grams ranked strongest first (`ranked[class]`, ids into `index`).
pub fn build_rule_list(
    index: &NgramIndex,
    predictions: &[usize],
    ranked: &[Vec<u32>],
    labels: &[String],
    config: &RulesConfig,
) -> RuleList {
    let mut candidates = Vec::new();
    for (class, ids) in ranked.iter().enumerate() {
        let single = ids.iter().take(2 * config.per_class).map(|&id| (vec![id], 1));
        let sets = [3usize, 5, 10, 20, 40]
            .into_iter()
            .filter(|&n| n <= ids.len())
            .flat_map(|n| (1..=3usize.min(n)).map(move |m| (ids[..n].to_vec(), m)));
        for (ids, m) in single.chain(sets) {
            let condition =
                Condition { ngrams: ids.iter().map(|&id| index.ngrams[id as usize].clone()).collect(), at_least: m };
            candidates.push(Candidate { rows: rows_matching(index, &ids, m), condition, class });
        }
    }
    let mut covered = vec![false; index.rows];
    let mut per_class = vec![0usize; labels.len()];
    let mut rules = Vec::new();
    loop {
        // (net agreement, agree, reached, candidate)
        let mut best: Option<(i64, usize, usize, usize)> = None;
        for (i, c) in candidates.iter().enumerate() {
            if per_class[c.class] >= config.per_class {
                continue;
            }
            let reached: Vec<u32> = c.rows.iter().copied().filter(|&r| !covered[r as usize]).collect();
            let agree = reached.iter().filter(|&&r| predictions[r as usize] == c.class).count();
            if reached.is_empty() || agree < config.min_support.max(1) {
                continue;
            }
            if (agree as f64) < config.min_precision * reached.len() as f64 {
                continue;
            }
            let net = 2 * agree as i64 - reached.len() as i64;
            if best.is_none_or(|(b, ..)| net > b) {
                best = Some((net, agree, reached.len(), i));
            }
        }
        let Some((_, agree, reached, i)) = best else { break };
        let chosen = candidates.swap_remove(i);
        for &r in &chosen.rows {
            covered[r as usize] = true;
        }
        per_class[chosen.class] += 1;
        rules.push(Rule {
            condition: Some(chosen.condition),
            class: chosen.class,
            label: labels[chosen.class].clone(),
            covered: reached,
            precision: agree as f64 / reached as f64,
        });
    }
    // The default rule: the model's most common class among the rows left.
    let mut counts = vec![0usize; labels.len()];
    for (r, &p) in predictions.iter().enumerate() {
        if !covered[r] {
            counts[p] += 1;
        }
    }
    let class = (0..labels.len()).max_by_key(|&k| (counts[k], std::cmp::Reverse(k))).unwrap_or(0);
    let left: usize = counts.iter().sum();
    rules.push(Rule {
        condition: None,
        class,
        label: labels.get(class).cloned().unwrap_or_default(),
        covered: left,
        precision: if left == 0 { 0.0 } else { counts[class] as f64 / left as f64 },
    });
    RuleList { rules }
}

/// Fraction of positions where `a` and `b` agree.
pub fn agreement(a: &[usize], b: &[usize]) -> f64 {
    let same = a.iter().zip(b).filter(|(x, y)| x == y).count();
    same as f64 / a.len().max(1) as f64
}

/// What `fl-client rules` reports.
#[derive(Clone, Debug, Serialize)]
pub struct RulesReport {
    /// The architecture.
    pub model: String,
    /// How word scores were computed.
    pub scoring: String,
    /// Class names.
    pub labels: Vec<String>,
    /// Rows the n-grams and rules were computed on.
    pub build_rows: usize,
    /// Held-out rows the rule list was measured on.
    pub heldout_rows: usize,
    /// Per class, the strongest n-grams.
    pub top_ngrams: Vec<Vec<ScoredNgram>>,
    /// The ordered rule list.
    pub rule_list: RuleList,
    /// Agreement of the rules with the model on the build rows.
    pub build_fidelity: f64,
    /// Agreement of the rules with the model on the held-out rows.
    pub heldout_fidelity: f64,
    /// Accuracy of the rules on the held-out rows' true labels.
    pub heldout_rules_accuracy: f64,
    /// Accuracy of the model on the held-out rows' true labels.
    pub heldout_model_accuracy: f64,
}

/// The predicted class of each text.
pub fn predicted_classes(model: &Classifier, texts: &[&str]) -> Vec<usize> {
    model
        .predict_proba(texts)
        .iter()
        .map(|p| (0..p.len()).max_by(|&a, &b| p[a].total_cmp(&p[b])).unwrap_or(0))
        .collect()
}

/// Longest n-gram the rules use for `model`: its own for fastText, words for sequence models.
pub fn rule_ngrams(model: &Classifier) -> usize {
    match model.spec.kind {
        ModelKind::Fasttext => model.spec.ngrams as usize,
        _ => 1,
    }
}

/// Per n-gram and class, how much the n-gram raises the class (`scores[ngram][class]`), and the
/// n-grams sharing each n-gram's bucket.
fn ngram_scores(
    model: &Classifier,
    index: &NgramIndex,
    texts: &[&str],
    predictions: &[usize],
    config: &RulesConfig,
) -> (Vec<Vec<f32>>, Vec<Vec<u32>>) {
    let mut collisions = vec![Vec::new(); index.ngrams.len()];
    if model.spec.kind == ModelKind::Fasttext {
        let _guard = tch::no_grad_guard();
        let tokenizer = model.tokenizer();
        let buckets: Vec<i64> = index
            .ngrams
            .iter()
            .map(|g| tokenizer.ngram_id(&g.split(' ').map(str::to_owned).collect::<Vec<_>>()))
            .collect();
        let mut by_bucket: HashMap<i64, Vec<u32>> = HashMap::new();
        for (id, &b) in buckets.iter().enumerate() {
            by_bucket.entry(b).or_default().push(id as u32);
        }
        for (id, b) in buckets.iter().enumerate() {
            collisions[id] = by_bucket[b].iter().copied().filter(|&o| o as usize != id).collect();
        }
        let vars = model.vs.variables();
        let rows = model.embedding().index_select(0, &tch::Tensor::from_slice(&buckets).to_device(model.device()));
        let logits = rows.matmul(&vars["linear.weight"].tr());
        let centred = &logits - logits.mean_dim(-1, true, tch::Kind::Float);
        let scores = Vec::<Vec<f32>>::try_from(&centred.to_device(tch::Device::Cpu)).expect("scores are f32");
        return (scores, collisions);
    }
    (occlusion_scores(model, index, texts, predictions, config), collisions)
}

/// Per word and class, the total drop of the class's probability when the word is removed, over
/// up to `config.occlusion_rows` rows (evenly spaced) that the model assigns to the class. The
/// total, not the mean: a word seen once with a large drop says less than one that matters often.
fn occlusion_scores(
    model: &Classifier,
    index: &NgramIndex,
    texts: &[&str],
    predictions: &[usize],
    config: &RulesConfig,
) -> Vec<Vec<f32>> {
    let classes = model.spec.num_classes();
    let mut sums = vec![vec![0.0f32; classes]; index.ngrams.len()];
    let step = (texts.len() / config.occlusion_rows.max(1)).max(1);
    for (row, text) in texts.iter().enumerate().step_by(step).take(config.occlusion_rows) {
        let class = predictions[row];
        for w in explain_label(model, text, class, Method::Occlusion).words {
            if let Some(id) = index.id(&w.word) {
                sums[id as usize][class] += w.score;
            }
        }
    }
    sums
}

/// Extracts per-class n-grams and a rule list from `model` on the `build` texts, and measures the
/// rules on the held-out texts and their true labels (indices into the model's labels).
/// `progress` is told what is being done.
pub fn extract_rules(
    model: &Classifier,
    build: &[&str],
    heldout: &[&str],
    heldout_labels: &[usize],
    config: &RulesConfig,
    mut progress: impl FnMut(&str),
) -> RulesReport {
    let max_n = rule_ngrams(model);
    let labels = model.spec.labels.clone();
    progress("predicting the build rows");
    let predictions = predicted_classes(model, build);
    let index = NgramIndex::new(build, max_n);
    progress(if model.spec.kind == ModelKind::Fasttext {
        "scoring n-grams from the weights"
    } else {
        "scoring words by occlusion"
    });
    let (scores, collisions) = ngram_scores(model, &index, build, &predictions, config);
    let mut ranked = Vec::with_capacity(labels.len());
    let mut top_ngrams = Vec::with_capacity(labels.len());
    for (class, _) in labels.iter().enumerate() {
        let mut ids: Vec<u32> = (0..index.ngrams.len() as u32)
            .filter(|&id| index.rows_with[id as usize].len() >= config.min_support && scores[id as usize][class] > 0.0)
            .collect();
        ids.sort_by(|&a, &b| scores[b as usize][class].total_cmp(&scores[a as usize][class]));
        ids.truncate(40.max(2 * config.per_class));
        top_ngrams.push(
            ids.iter()
                .take(config.per_class)
                .map(|&id| {
                    let (precision, coverage) = precision_coverage(&index.rows_with[id as usize], &predictions, class);
                    ScoredNgram {
                        ngram: index.ngrams[id as usize].clone(),
                        score: scores[id as usize][class],
                        precision,
                        coverage,
                        collides_with: collisions[id as usize]
                            .iter()
                            .map(|&o| index.ngrams[o as usize].clone())
                            .collect(),
                    }
                })
                .collect(),
        );
        ranked.push(ids);
    }
    progress("building the rule list");
    let rule_list = build_rule_list(&index, &predictions, &ranked, &labels, config);
    let build_rules: Vec<usize> = build.iter().map(|t| rule_list.classify_text(t, max_n)).collect();
    progress("measuring on the held-out rows");
    let heldout_model = predicted_classes(model, heldout);
    let heldout_rules: Vec<usize> = heldout.iter().map(|t| rule_list.classify_text(t, max_n)).collect();
    RulesReport {
        model: model.spec.kind.to_string(),
        scoring: if model.spec.kind == ModelKind::Fasttext {
            "weights: bucket embedding times output layer, minus the mean over classes".into()
        } else {
            format!("occlusion: total drop of the class's probability over up to {} rows", config.occlusion_rows)
        },
        labels,
        build_rows: build.len(),
        heldout_rows: heldout.len(),
        top_ngrams,
        build_fidelity: agreement(&build_rules, &predictions),
        heldout_fidelity: agreement(&heldout_rules, &heldout_model),
        heldout_rules_accuracy: agreement(&heldout_rules, heldout_labels),
        heldout_model_accuracy: agreement(&heldout_model, heldout_labels),
        rule_list,
    }
}

impl RulesReport {
    /// Rules per class, the default rule not counted.
    pub fn rules_per_class(&self) -> Vec<usize> {
        let mut counts = vec![0; self.labels.len()];
        for r in self.rule_list.rules.iter().filter(|r| r.condition.is_some()) {
            counts[r.class] += 1;
        }
        counts
    }

    /// The report as text for a terminal.
    pub fn to_text(&self) -> String {
        let mut out = format!(
            "model: {}, {} classes; n-grams and rules from {} rows, measured on {} held-out rows\nscores: {}\n",
            self.model,
            self.labels.len(),
            self.build_rows,
            self.heldout_rows,
            self.scoring
        );
        for (label, list) in self.labels.iter().zip(&self.top_ngrams) {
            let _ = writeln!(out, "\nclass {label}:\n  {:>8}  {:>9}  {:>8}  n-gram", "score", "precision", "coverage");
            if list.is_empty() {
                let _ = writeln!(out, "  (no n-gram raises this class in enough rows)");
            }
            for g in list {
                let _ = write!(out, "  {:>+8.4}  {:>9.3}  {:>8.4}  \"{}\"", g.score, g.precision, g.coverage, g.ngram);
                if !g.collides_with.is_empty() {
                    let shown: Vec<String> = g.collides_with.iter().take(3).map(|c| format!("\"{c}\"")).collect();
                    let more = g.collides_with.len().saturating_sub(3);
                    let more = if more > 0 { format!(" and {more} more") } else { String::new() };
                    let _ = write!(out, "  [collision: shares its bucket with {}{more}]", shown.join(", "));
                }
                out.push('\n');
            }
        }
        let _ = writeln!(out, "\nrule list (the first rule that matches gives the class):");
        for (i, r) in self.rule_list.rules.iter().enumerate() {
            let condition =
                r.condition.as_ref().map(|c| format!("if the text {c}")).unwrap_or_else(|| "otherwise".into());
            let _ = writeln!(
                out,
                "  {:>3}. {condition} -> {}   (first to match {} rows, precision {:.3})",
                i + 1,
                r.label,
                r.covered,
                r.precision
            );
        }
        let most = self.rules_per_class().into_iter().max().unwrap_or(0);
        let _ = writeln!(
            out,
            "\n{} rules and a default (at most {most} per class)\nfidelity to the model: {:.4} held out, {:.4} on the build rows\naccuracy on the held-out labels: rules {:.4}, model {:.4}",
            self.rule_list.rules.len() - 1,
            self.heldout_fidelity,
            self.build_fidelity,
            self.heldout_rules_accuracy,
            self.heldout_model_accuracy
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::central::testing::{generator, trained};

    /// A hand-made set: texts, the model's (pretend) predictions, two classes.
    fn hand_made() -> (Vec<&'static str>, Vec<usize>, Vec<String>) {
        let texts = vec![
            "good movie",           // 0: pos
            "good plot, good cast", // 1: pos
            "bad movie",            // 2: neg
            "bad acting",           // 3: neg
            "good but bad ending",  // 4: neg
            "a movie",              // 5: pos
        ];
        (texts, vec![0, 0, 1, 1, 1, 0], vec!["pos".into(), "neg".into()])
    }

    #[test]
    fn precision_and_coverage_on_a_hand_made_set() {
        let (texts, predictions, _) = hand_made();
        let index = NgramIndex::new(&texts, 2);
        let stats =
            |g: &str, class| precision_coverage(&index.rows_with[index.id(g).unwrap() as usize], &predictions, class);
        // "good" is in rows 0, 1, 4 (twice in row 1, counted once); rows 0 and 1 are pos.
        assert_eq!(index.rows_with[index.id("good").unwrap() as usize], vec![0, 1, 4]);
        assert_eq!(stats("good", 0), (2.0 / 3.0, 3.0 / 6.0));
        assert_eq!(stats("good", 1), (1.0 / 3.0, 3.0 / 6.0));
        assert_eq!(stats("bad", 1), (1.0, 3.0 / 6.0));
        assert_eq!(stats("movie", 0), (2.0 / 3.0, 3.0 / 6.0));
        assert_eq!(stats("good movie", 0), (1.0, 1.0 / 6.0));
        assert_eq!(stats("but bad", 1), (1.0, 1.0 / 6.0));
        assert!(index.id("good bad").is_none(), "bigrams are of adjacent words only");
        assert!(index.id("movie good").is_none());
        assert_eq!(precision_coverage(&[], &predictions, 0), (0.0, 0.0));
    }

    #[test]
    fn rule_list_on_a_hand_made_set_is_ordered_and_has_a_default() {
        let (texts, predictions, labels) = hand_made();
        let index = NgramIndex::new(&texts, 1);
        let id = |g: &str| index.id(g).unwrap();
        let ranked = vec![vec![id("good"), id("movie")], vec![id("bad"), id("acting")]];
        let config = RulesConfig { per_class: 1, min_precision: 0.9, min_support: 1, ..Default::default() };
        let list = build_rule_list(&index, &predictions, &ranked, &labels, &config);
        // "bad" is the only precise rule covering 3 rows; "good" then matches only rows 0 and 1 (both pos).
        let shown: Vec<String> = list
            .rules
            .iter()
            .map(|r| format!("{:?} {}", r.condition.as_ref().map(ToString::to_string), r.label))
            .collect();
        assert_eq!(
            shown,
            [r#"Some("contains \"bad\"") neg"#, r#"Some("contains \"good\"") pos"#, "None pos"],
            "{list:#?}"
        );
        assert_eq!((list.rules[0].covered, list.rules[0].precision), (3, 1.0));
        assert_eq!((list.rules[1].covered, list.rules[1].precision), (2, 1.0));
        assert_eq!((list.rules[2].covered, list.rules[2].precision), (1, 1.0), "row 5 is left for the default");
        let classes: Vec<usize> = texts.iter().map(|t| list.classify_text(t, 1)).collect();
        assert_eq!(classes, predictions);
        assert_eq!(agreement(&classes, &predictions), 1.0);
        assert_eq!(list.classify_text("bad but good", 1), 1, "the first matching rule wins");
        assert_eq!(list.classify_text("nothing known", 1), 0, "the default rule");
    }

    #[test]
    fn m_of_n_conditions_count_distinct_ngrams() {
        let c = Condition { ngrams: vec!["a".into(), "b".into(), "c d".into()], at_least: 2 };
        let has = |t: &str| c.matches(&text_ngrams(t, 2).into_iter().collect());
        assert!(has("a then c d"));
        assert!(!has("a a a"));
        assert!(!has("c then d b"), "\"c d\" is a bigram of adjacent words");
        assert_eq!(c.to_string(), r#"contains at least 2 of {"a", "b", "c d"}"#);
        assert_eq!(Condition { ngrams: vec!["x".into()], at_least: 1 }.to_string(), r#"contains "x""#);
    }

    #[test]
    fn fasttext_rules_find_the_generator_keywords_and_imitate_the_model() {
        let model = trained(ModelKind::Fasttext);
        let generator = generator();
        let build: Vec<String> = generator.rows(1500, 21).into_iter().map(|r| r.text).collect();
        let heldout = generator.rows(500, 22);
        let build: Vec<&str> = build.iter().map(String::as_str).collect();
        let texts: Vec<&str> = heldout.iter().map(|r| r.text.as_str()).collect();
        let labels: Vec<usize> = heldout.iter().map(|r| r.label).collect();
        let report = extract_rules(&model, &build, &texts, &labels, &RulesConfig::default(), |_| {});
        for (class, list) in report.top_ngrams.iter().enumerate() {
            let keywords = generator.keywords(class);
            let hits = list.iter().filter(|g| keywords.contains(&g.ngram)).count();
            assert!(hits >= 8, "class {class}: {hits} of the top 10 are its keywords: {list:?}");
            let g = &list[0];
            let (p, c) = precision_coverage(
                &NgramIndex::new(&build, 2).rows_with[NgramIndex::new(&build, 2).id(&g.ngram).unwrap() as usize],
                &predicted_classes(&model, &build),
                class,
            );
            assert_eq!((g.precision, g.coverage), (p, c));
        }
        assert!(report.rules_per_class().iter().all(|&n| n <= 10));
        assert!(report.heldout_fidelity >= 0.7, "{}", report.to_text());
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(
            json["rule_list"]["rules"].as_array().unwrap().last().unwrap()["condition"],
            serde_json::Value::Null
        );
    }

    #[test]
    fn occlusion_scores_rank_keywords_first() {
        // The path sequence models take, run on the fastText model (which trains in seconds):
        // the words with the largest mean occlusion drop for a class are mostly its keywords.
        let model = trained(ModelKind::Fasttext);
        let generator = generator();
        let texts: Vec<String> = generator.rows(300, 23).into_iter().map(|r| r.text).collect();
        let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
        let predictions = predicted_classes(&model, &texts);
        let index = NgramIndex::new(&texts, 1);
        let config = RulesConfig { occlusion_rows: 150, ..Default::default() };
        let scores = occlusion_scores(&model, &index, &texts, &predictions, &config);
        let (mut hits, mut listed) = (0, 0);
        for (class, column) in (0..generator.labels().len()).map(|c| (c, scores.iter().map(move |s| s[c]))) {
            let column: Vec<f32> = column.collect();
            let mut ids: Vec<usize> = (0..index.ngrams.len()).filter(|&id| index.rows_with[id].len() >= 3).collect();
            ids.sort_by(|&a, &b| column[b].total_cmp(&column[a]));
            for &id in ids.iter().take(5) {
                listed += 1;
                hits += usize::from(generator.keywords(class).contains(&index.ngrams[id]));
            }
        }
        assert!(hits as f64 >= 0.7 * listed as f64, "{hits} of the top {listed} words are their class's keywords");
    }

    #[test]
    fn collisions_are_flagged() {
        // With 4 096 buckets, some of the ~thousands of bigrams in the data share a bucket.
        let model = trained(ModelKind::Fasttext);
        let texts: Vec<String> = generator().rows(300, 5).into_iter().map(|r| r.text).collect();
        let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
        let index = NgramIndex::new(&texts, 2);
        let (_, collisions) = ngram_scores(&model, &index, &texts, &vec![0; texts.len()], &RulesConfig::default());
        let tokenizer = model.tokenizer();
        let bucket = |g: &str| tokenizer.ngram_id(&g.split(' ').map(str::to_owned).collect::<Vec<_>>());
        let flagged = collisions.iter().filter(|c| !c.is_empty()).count();
        assert!(flagged > 0);
        for (id, others) in collisions.iter().enumerate() {
            for &o in others {
                assert_eq!(bucket(&index.ngrams[id]), bucket(&index.ngrams[o as usize]));
            }
        }
    }
}
