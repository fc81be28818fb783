//! Explanations of a prediction: which words of a text pushed the model towards its predicted
//! label, and which pushed it away.
//!
//! Two methods, both scoring the words the model reads, in units of probability:
//! - Occlusion (the default): the drop in the label's probability when the word is removed from
//!   the text. Exact by construction: removing a word with a positive score lowers the probability
//!   by exactly that score, which is what a reader of "most supportive word" expects.
//! - Integrated gradients on the token embeddings: the gradient of the label's probability,
//!   averaged along the straight path from all-zero embeddings to the text's embeddings, times
//!   the embedding, summed over the embedding dimensions. The scores add up to
//!   p(label | text) − p(label | zero embeddings), up to the error of the `steps`-point midpoint
//!   rule. For fastText each n-gram's score is shared equally among its words. Integrated
//!   gradients answer "what moved the prediction away from the empty baseline", which for a
//!   model that mixes words (the transformer) can differ from the effect of removing one word.
//!
//! Integrated gradients work for every architecture through `Architecture::forward(table, batch, _)`:
//! each token of the text gets its own row in `table`, so its embedding can be scaled on its own.

use std::fmt::Write;

use tch::{Device, Kind, Tensor};

use crate::model::{Batch, Classifier};
use crate::tokenizer::words;

/// How to score the words.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Method {
    /// Integrated gradients with this many interpolation steps.
    IntegratedGradients {
        /// Points of the midpoint rule along the path (more is more exact).
        steps: usize,
    },
    /// Probability drop when the word is removed.
    #[default]
    Occlusion,
}

/// The score of one word of the text.
#[derive(Clone, Debug, PartialEq)]
pub struct WordScore {
    /// Index of the word in [`crate::tokenizer::words`] of the text.
    pub index: usize,
    /// The word (lowercased, as the tokenizer sees it).
    pub word: String,
    /// Positive: pushed towards the label; negative: away from it. In units of probability.
    pub score: f32,
}

/// Why the model gave a text its label.
#[derive(Clone, Debug, PartialEq)]
pub struct Explanation {
    /// Index of the explained label (the predicted one, unless asked otherwise).
    pub label: usize,
    /// The model's probability of that label for the text.
    pub probability: f32,
    /// Integrated gradients only: the label's probability with every token embedding zero.
    pub baseline_probability: Option<f32>,
    /// Scores of the words the model reads, in text order.
    pub words: Vec<WordScore>,
}

impl Explanation {
    /// Up to `k` words with positive scores, strongest first.
    pub fn supporting(&self, k: usize) -> Vec<&WordScore> {
        let mut out: Vec<&WordScore> = self.words.iter().filter(|w| w.score > 0.0).collect();
        out.sort_by(|a, b| b.score.total_cmp(&a.score));
        out.truncate(k);
        out
    }

    /// Up to `k` words with negative scores, strongest first.
    pub fn opposing(&self, k: usize) -> Vec<&WordScore> {
        let mut out: Vec<&WordScore> = self.words.iter().filter(|w| w.score < 0.0).collect();
        out.sort_by(|a, b| a.score.total_cmp(&b.score));
        out.truncate(k);
        out
    }
}

/// Explains the model's predicted label for `text`.
pub fn explain(model: &Classifier, text: &str, method: Method) -> Explanation {
    let probs = &model.predict_proba(&[text])[0];
    let label = (0..probs.len()).max_by(|&a, &b| probs[a].total_cmp(&probs[b])).unwrap_or(0);
    explain_label(model, text, label, method)
}

/// Explains label `label` (an index into the model's labels) for `text`.
pub fn explain_label(model: &Classifier, text: &str, label: usize, method: Method) -> Explanation {
    let all_words = words(text);
    let probability = model.predict_proba(&[text])[0][label];
    let (per_word, baseline_probability) = match method {
        Method::IntegratedGradients { steps } => {
            let (per_token, baseline) = integrated_gradients(model, text, label, steps.max(1));
            let spans = model.token_spans(text);
            let mut per_word = vec![0.0f32; spans.iter().map(|s| s.end).max().unwrap_or(0)];
            for (span, score) in spans.into_iter().zip(per_token) {
                let share = score / span.len() as f32;
                for w in span {
                    per_word[w] += share;
                }
            }
            (per_word, Some(baseline))
        }
        Method::Occlusion => (occlusion(model, &all_words, text, label, probability), None),
    };
    let words = per_word
        .into_iter()
        .enumerate()
        .map(|(index, score)| WordScore { index, word: all_words[index].clone(), score })
        .collect();
    Explanation { label, probability, baseline_probability, words }
}

/// Integrated gradients of p(label) per token of `model.token_ids(text)`, and p(label) at the
/// all-zero baseline.
fn integrated_gradients(model: &Classifier, text: &str, label: usize, steps: usize) -> (Vec<f32>, f32) {
    let ids = model.token_ids(text);
    let n = ids.len();
    if n == 0 {
        // Nothing to scale: the text is its own baseline.
        return (Vec::new(), model.predict_proba(&[text])[0][label]);
    }
    let device = model.device();
    let embedded = model.embedding().detach().index_select(0, &Tensor::from_slice(&ids).to_device(device));
    let probability_of = |table: &Tensor, docs: &[Vec<i64>]| {
        model
            .forward_with_table(table, &Batch::new(docs, device), false)
            .softmax(-1, Kind::Float)
            .select(1, label as i64)
    };
    let own_rows: Vec<i64> = (0..n as i64).collect();
    let baseline = tch::no_grad(|| probability_of(&embedded.zeros_like(), &[own_rows]).double_value(&[0])) as f32;
    // All steps in one batch: document s reads rows s*n .. s*n+n, its tokens scaled by alpha_s.
    let alphas: Vec<f32> = (0..steps).map(|s| (s as f32 + 0.5) / steps as f32).collect();
    let alphas = Tensor::from_slice(&alphas).to_device(device).view([steps as i64, 1, 1]);
    let table = (embedded.unsqueeze(0) * alphas).view([(steps * n) as i64, -1]).set_requires_grad(true);
    let docs: Vec<Vec<i64>> = (0..steps).map(|s| ((s * n) as i64..((s + 1) * n) as i64).collect()).collect();
    let total = probability_of(&table, &docs).sum(Kind::Float);
    // `run_backward` returns the gradient without accumulating into the weights' gradients.
    let grad = Tensor::run_backward(&[total], &[&table], false, false).remove(0);
    let mean_grad = grad.view([steps as i64, n as i64, -1]).mean_dim(0, false, Kind::Float);
    let scores = (mean_grad * embedded).sum_dim_intlist(-1, false, Kind::Float).to_device(Device::Cpu);
    (Vec::<f32>::try_from(&scores).expect("scores are f32"), baseline)
}

/// p(label | text) − p(label | text without word i), for each word the model reads.
fn occlusion(model: &Classifier, all_words: &[String], text: &str, label: usize, probability: f32) -> Vec<f32> {
    let read = model.token_spans(text).iter().map(|s| s.end).max().unwrap_or(0);
    let occluded: Vec<String> = (0..read).map(|i| without_word(all_words, i)).collect();
    let texts: Vec<&str> = occluded.iter().map(String::as_str).collect();
    model.predict_proba(&texts).iter().map(|p| probability - p[label]).collect()
}

/// The text's words without word `index`, joined by spaces (which the tokenizer reads as the
/// same words).
pub fn without_word(all_words: &[String], index: usize) -> String {
    let kept: Vec<&str> = all_words.iter().enumerate().filter(|&(i, _)| i != index).map(|(_, w)| w.as_str()).collect();
    kept.join(" ")
}

/// Formats an explanation: the label and its probability, then up to `top` words on each side.
pub fn describe_explanation(model: &Classifier, explanation: &Explanation, top: usize) -> String {
    let label = &model.spec.labels[explanation.label];
    let mut out = format!("label: {label} (p = {:.4})\n", explanation.probability);
    if let Some(base) = explanation.baseline_probability {
        let total: f32 = explanation.words.iter().map(|w| w.score).sum();
        let _ = writeln!(out, "  integrated gradients: p at zero embeddings {base:.4}, scores sum to {total:+.4}");
    }
    for (title, list) in [("towards", explanation.supporting(top)), ("away from", explanation.opposing(top))] {
        let _ = writeln!(out, "  {title} {label}:");
        if list.is_empty() {
            let _ = writeln!(out, "    (none)");
        }
        for w in list {
            let _ = writeln!(out, "    {:+.4}  {} (word {})", w.score, w.word, w.index + 1);
        }
    }
    out
}

/// Formats the last layer's attention of `text`, averaged over heads, as a query-by-key table;
/// `None` if the architecture does not attend.
pub fn describe_attention(model: &Classifier, text: &str) -> Option<String> {
    let attention = model.attention(text)?;
    let all_words = words(text);
    let names: Vec<String> = attention
        .positions
        .iter()
        .map(|p| match p {
            Some(i) => all_words[*i].clone(),
            None => "[CLS]".to_string(),
        })
        .collect();
    let width = names.iter().map(|n| n.chars().count()).max().unwrap_or(5).clamp(5, 16);
    let cut = |s: &str| s.chars().take(width).collect::<String>();
    let mut out = String::from("attention of the last layer, mean over heads (rows: query, columns: key):\n");
    let _ = write!(out, "{:>width$}", "");
    for n in &names {
        let _ = write!(out, " {:>width$}", cut(n));
    }
    out.push('\n');
    for (name, row) in names.iter().zip(&attention.weights) {
        let _ = write!(out, "{:>width$}", cut(name));
        for w in row {
            let _ = write!(out, " {w:>width$.3}");
        }
        out.push('\n');
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::central::testing::{generator, trained};
    use fl_common::ModelKind;

    const KINDS: [ModelKind; 3] = [ModelKind::Fasttext, ModelKind::Bilstm, ModelKind::Transformer];

    /// Held-out generated texts that `model` labels correctly, with their label.
    fn correctly_labelled(model: &Classifier, n: usize) -> Vec<(String, usize)> {
        let rows = generator().rows(200, 9);
        let texts: Vec<&str> = rows.iter().map(|r| r.text.as_str()).collect();
        let probs = model.predict_proba(&texts);
        rows.iter()
            .zip(probs)
            .filter(|(r, p)| (0..p.len()).all(|k| p[k] <= p[r.label]))
            .map(|(r, _)| (r.text.clone(), r.label))
            .take(n)
            .collect()
    }

    #[test]
    fn integrated_gradients_add_up_to_the_probability_change() {
        for kind in KINDS {
            let model = trained(kind);
            for (text, _) in correctly_labelled(&model, 5) {
                let e = explain(&model, &text, Method::IntegratedGradients { steps: 128 });
                assert!(e.words.iter().any(|w| w.score != 0.0));
                let total: f32 = e.words.iter().map(|w| w.score).sum();
                let change = e.probability - e.baseline_probability.unwrap();
                assert!((total - change).abs() < 0.02, "{kind}: scores sum {total}, probability change {change}");
            }
        }
    }

    const IG: Method = Method::IntegratedGradients { steps: 64 };

    #[test]
    fn explanations_rank_keywords_above_filler() {
        // Within each text, the generator's keywords of the label should score above its filler
        // words: on average in nearly every text, and in most keyword/filler pairs. The
        // transformer mixes words through attention and is the least bag-of-words-like, so the
        // pair threshold leaves it room (it measures about 0.8, the others above 0.9).
        let generator = generator();
        for kind in KINDS {
            let model = trained(kind);
            for method in [Method::Occlusion, IG] {
                let (mut above, mut pairs, mut mean_above, mut texts) = (0usize, 0usize, 0usize, 0usize);
                for (text, label) in correctly_labelled(&model, 30) {
                    let e = explain(&model, &text, method);
                    assert_eq!(e.label, label);
                    let scores_of = |list: &[String]| -> Vec<f32> {
                        e.words.iter().filter(|w| list.contains(&w.word)).map(|w| w.score).collect()
                    };
                    let keywords = scores_of(generator.keywords(label));
                    let filler = scores_of(generator.filler());
                    for k in &keywords {
                        for f in &filler {
                            pairs += 1;
                            above += usize::from(k > f);
                        }
                    }
                    if !keywords.is_empty() && !filler.is_empty() {
                        texts += 1;
                        let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
                        mean_above += usize::from(mean(&keywords) > mean(&filler));
                    }
                }
                let fraction = above as f64 / pairs.max(1) as f64;
                assert!(pairs > 100 && texts >= 20, "{kind}: too few keywords and filler words ({pairs}, {texts})");
                assert!(fraction > 0.7, "{kind} {method:?}: keywords above filler in {fraction:.3} of pairs");
                assert!(
                    mean_above as f64 >= 0.85 * texts as f64,
                    "{kind} {method:?}: mean keyword score above mean filler score in {mean_above} of {texts} texts"
                );
            }
        }
    }

    #[test]
    fn removing_the_most_supportive_word_lowers_the_probability() {
        // What `predict --explain` prints: the default method, the first word "towards" the label.
        for kind in KINDS {
            let model = trained(kind);
            let mut checked = 0;
            for (text, label) in correctly_labelled(&model, 20) {
                let e = explain(&model, &text, Method::default());
                let Some(top) = e.supporting(1).first().copied() else { continue };
                let shorter = without_word(&words(&text), top.index);
                let after = model.predict_proba(&[shorter.as_str()])[0][label];
                assert!(
                    after < e.probability,
                    "{kind}: removing '{}' from '{text}' took p from {} to {after}",
                    top.word,
                    e.probability
                );
                checked += 1;
            }
            assert!(checked >= 15, "{kind}: only {checked} texts had a supporting word");
        }
    }

    #[test]
    fn occlusion_scores_are_the_probability_drops() {
        let model = trained(ModelKind::Fasttext);
        let text = "Kalo mine suta, pove dari.";
        let e = explain_label(&model, text, 1, Method::Occlusion);
        let all = words(text);
        assert_eq!(e.words.len(), all.len());
        for w in &e.words {
            let p = model.predict_proba(&[without_word(&all, w.index).as_str()])[0][1];
            assert!((w.score - (e.probability - p)).abs() < 1e-6);
        }
    }

    #[test]
    fn fasttext_bigram_scores_are_shared_by_their_words_and_empty_texts_explain_to_nothing() {
        let model = trained(ModelKind::Fasttext);
        let e = explain(&model, "alpha beta gamma", IG);
        assert_eq!(e.words.iter().map(|w| w.word.as_str()).collect::<Vec<_>>(), ["alpha", "beta", "gamma"]);
        assert_eq!(model.token_spans("alpha beta gamma"), vec![0..1, 1..2, 2..3, 0..2, 1..3]);
        for method in [IG, Method::Occlusion] {
            let e = explain(&model, " ... ", method);
            assert!(e.words.is_empty());
        }
        assert_eq!(explain(&model, " ... ", IG).baseline_probability, Some(explain(&model, " ... ", IG).probability));
    }

    #[test]
    fn descriptions_show_label_words_and_attention() {
        let model = trained(ModelKind::Transformer);
        let (text, label) = correctly_labelled(&model, 1).remove(0);
        let e = explain(&model, &text, IG);
        let out = describe_explanation(&model, &e, 3);
        assert!(out.contains("integrated gradients: p at zero embeddings"), "{out}");
        assert!(out.starts_with(&format!("label: {}", model.spec.labels[label])), "{out}");
        assert!(out.contains(&format!("towards {}:", model.spec.labels[label])), "{out}");
        let attention = describe_attention(&model, &text).unwrap();
        assert_eq!(attention.lines().count(), 2 + words(&text).len(), "{attention}");
        assert!(describe_attention(&trained(ModelKind::Bilstm), &text).is_none());
    }
}
