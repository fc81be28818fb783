//! Central training on one machine (`fl-client train`): the same models and the same training
//! code as a federated round, over a whole labelled CSV with a held-out validation part. It gives
//! the centralized upper bound that a federation is compared against, and a starting model to
//! fine-tune from (`fl-coordinator serve --init-model`).

use std::time::Instant;

use fl_common::{ModelKind, ModelSpec};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use tch::Device;
use tokio_util::sync::CancellationToken;

use crate::data::{DataError, LabelledTexts};
use crate::model::{Classifier, ModelError};
use crate::train::{Distillation, EncodedDataset, EpochStats, OptimizerKind, TrainConfig, Trainer, UNLABELLED};

/// Why central training could not run.
#[derive(Debug, thiserror::Error)]
pub enum CentralError {
    /// A row has a label outside the model's labels.
    #[error(transparent)]
    Data(#[from] DataError),
    /// The spec does not make a model.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The teacher or the distillation settings do not fit.
    #[error("{0}")]
    Teacher(String),
    /// Nothing is left to train on after the validation split.
    #[error("no training rows left after holding out {validation} for validation")]
    NoTrainingRows {
        /// Rows held out.
        validation: usize,
    },
}

/// Training defaults of each architecture: they reach good accuracy on about 7 000 short texts
/// of 10 classes within a few minutes on two CPU cores (see BENCHMARKS.md).
pub fn default_train_config(kind: ModelKind) -> TrainConfig {
    let (epochs, lr) = match kind {
        ModelKind::Fasttext => (5, 0.002),
        ModelKind::Bilstm => (6, 0.003),
        ModelKind::Transformer => (8, 0.001),
        // A pretrained encoder needs few passes; the issue measured LoRA at 0.68 after one epoch.
        ModelKind::Minilm => (2, 0.001),
    };
    TrainConfig { epochs, batch_size: 32, lr, optimizer: OptimizerKind::Adam, seed: 42, proximal_mu: 0.0 }
}

/// What to train and how.
#[derive(Clone, Debug)]
pub struct CentralConfig {
    /// The model to train (its labels fix the output order).
    pub spec: ModelSpec,
    /// Epochs, batch size, learning rate, optimizer and seed.
    pub train: TrainConfig,
    /// Fraction of the rows held out for validation (0 for none).
    pub validation: f64,
    /// Return the weights of the epoch with the best validation accuracy rather than the last
    /// (small text sets overfit within a few epochs).
    pub keep_best: bool,
}

/// The result of one epoch.
#[derive(Clone, Debug, PartialEq)]
pub struct EpochReport {
    /// 1-based epoch number.
    pub epoch: u32,
    /// Mean training loss.
    pub train_loss: f64,
    /// Training accuracy (with dropout on).
    pub train_accuracy: f64,
    /// Accuracy on the validation rows, if there are any.
    pub validation_accuracy: Option<f64>,
    /// Mean cross-entropy on the validation rows, if there are any.
    pub validation_loss: Option<f64>,
    /// Training examples per second (excluding validation).
    pub examples_per_s: f64,
}

/// Progress reports of [`train_central`].
#[derive(Debug)]
pub enum Progress<'a> {
    /// Training starts: the number of training and validation rows.
    Start {
        /// Rows trained on per epoch.
        train_rows: usize,
        /// Rows held out.
        validation_rows: usize,
    },
    /// A training step is done.
    Step {
        /// 1-based epoch.
        epoch: u32,
        /// The epoch so far.
        stats: &'a EpochStats,
        /// Training examples per second in this epoch so far.
        examples_per_s: f64,
    },
    /// An epoch is done and validated.
    Epoch(&'a EpochReport),
}

/// A centrally trained model and its history.
#[derive(Debug)]
pub struct CentralOutcome {
    /// The trained model: after the best epoch with `keep_best`, else after the last.
    pub model: Classifier,
    /// The epoch whose weights `model` holds (0 if none completed).
    pub kept_epoch: u32,
    /// One report per completed epoch.
    pub epochs: Vec<EpochReport>,
    /// True if training was cancelled.
    pub cancelled: bool,
}

/// Splits `rows` into training and validation parts, `fraction` of them (rounded) held out
/// after a seeded shuffle.
pub fn split_validation(rows: &LabelledTexts, fraction: f64, seed: u64) -> (LabelledTexts, LabelledTexts) {
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    let held_out = ((rows.len() as f64 * fraction.clamp(0.0, 1.0)).round() as usize).min(rows.len());
    let pick = |idx: &[usize]| LabelledTexts {
        texts: idx.iter().map(|&i| rows.texts[i].clone()).collect(),
        labels: idx.iter().map(|&i| rows.labels[i].clone()).collect(),
        lines: idx.iter().map(|&i| rows.lines[i]).collect(),
        path: rows.path.clone(),
    };
    (pick(&order[held_out..]), pick(&order[..held_out]))
}

/// Trains a fresh model of `config.spec` on `rows`, validating after each epoch. Uses the
/// federated round's training code ([`Trainer`]), with one optimizer state for the whole run.
pub fn train_central(
    rows: &LabelledTexts,
    config: &CentralConfig,
    device: Device,
    cancel: &CancellationToken,
    progress: impl FnMut(Progress<'_>),
) -> Result<CentralOutcome, CentralError> {
    train_student(rows, config, None, device, cancel, progress)
}

/// A trained model that a student learns from, and how.
#[derive(Debug)]
pub struct Teacher<'a> {
    /// The teacher; any architecture, with the student's labels.
    pub model: &'a Classifier,
    /// Temperature and the labels' weight.
    pub distillation: Distillation,
    /// Texts without labels that the student learns from the teacher alone.
    pub unlabelled: &'a [String],
}

/// The teacher's probabilities `p` softened to temperature `t`: softmax(ln p / t), which is
/// softmax(logits / t).
fn soften(p: &[f32], t: f64) -> Vec<f32> {
    let z: Vec<f64> = p.iter().map(|&x| f64::from(x.max(1e-30)).ln() / t).collect();
    let max = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = z.iter().map(|v| (v - max).exp()).collect();
    let total: f64 = e.iter().sum();
    e.iter().map(|v| (v / total) as f32).collect()
}

/// The teacher's class probabilities on `texts`, softened to temperature `t`: the targets of
/// distillation ([`crate::train::EncodedDataset::soft`]), centrally and in a federated round.
pub fn soft_targets(teacher: &Classifier, texts: &[&str], t: f64) -> Vec<Vec<f32>> {
    teacher.predict_proba(texts).iter().map(|p| soften(p, t)).collect()
}

/// As [`train_central`], and with a teacher, knowledge distillation: the student trains on the
/// labels mixed with the teacher's softened outputs (and on `unlabelled` texts through the
/// teacher alone). Validation, and the best epoch, are on the labelled rows held out.
pub fn train_student(
    rows: &LabelledTexts,
    config: &CentralConfig,
    teacher: Option<&Teacher<'_>>,
    device: Device,
    cancel: &CancellationToken,
    progress: impl FnMut(Progress<'_>),
) -> Result<CentralOutcome, CentralError> {
    let labels = &config.spec.labels;
    if let Some(t) = teacher {
        let d = t.distillation;
        if !(d.temperature.is_finite() && d.temperature > 0.0 && (0.0..=1.0).contains(&d.alpha)) {
            return Err(CentralError::Teacher(format!(
                "temperature must be > 0 and alpha in [0, 1] (got {} and {})",
                d.temperature, d.alpha
            )));
        }
        if &t.model.spec.labels != labels {
            return Err(CentralError::Teacher(format!(
                "the teacher's labels {:?} differ from the student's {:?}",
                t.model.spec.labels, labels
            )));
        }
    }
    let (train_rows, validation_rows) = split_validation(rows, config.validation, config.train.seed);
    if train_rows.is_empty() {
        return Err(CentralError::NoTrainingRows { validation: validation_rows.len() });
    }
    let model = Classifier::new(config.spec.clone(), device, config.train.seed)?;
    train_model(model, &train_rows, &validation_rows, config, teacher, cancel, progress)
}

/// [`train_student`] from `model`'s weights on the rows already split. The tests start two runs
/// from one set of weights: libtorch's generator is global, so a model initialised while a test
/// beside it draws (dropout, another seed) gets other weights.
fn train_model(
    model: Classifier,
    train_rows: &LabelledTexts,
    validation_rows: &LabelledTexts,
    config: &CentralConfig,
    teacher: Option<&Teacher<'_>>,
    cancel: &CancellationToken,
    mut progress: impl FnMut(Progress<'_>),
) -> Result<CentralOutcome, CentralError> {
    let labels = &config.spec.labels;
    let mut train_data = EncodedDataset::encode(&model, &train_rows.texts, train_rows.label_indices(labels)?);
    let validation = EncodedDataset::encode(&model, &validation_rows.texts, validation_rows.label_indices(labels)?);
    if let Some(t) = teacher {
        for text in t.unlabelled {
            train_data.docs.push(model.token_ids(text));
            train_data.labels.push(UNLABELLED);
        }
        let texts: Vec<&str> = train_rows.texts.iter().chain(t.unlabelled).map(String::as_str).collect();
        train_data.soft = Some(soft_targets(t.model, &texts, t.distillation.temperature));
    }
    progress(Progress::Start { train_rows: train_data.len(), validation_rows: validation.len() });

    let mut trainer = Trainer::new(&model, &config.train);
    if let Some(t) = teacher {
        trainer = trainer.distill(t.distillation);
    }
    let mut outcome = CentralOutcome { model, kept_epoch: 0, epochs: Vec::new(), cancelled: false };
    let mut best: Option<(f64, u32, fl_common::TensorSet)> = None;
    for epoch in 1..=config.train.epochs {
        let started = Instant::now();
        let stats = trainer.epoch(&outcome.model, &train_data, cancel, |stats| {
            let examples_per_s = stats.examples as f64 / started.elapsed().as_secs_f64().max(1e-9);
            progress(Progress::Step { epoch, stats, examples_per_s });
        });
        let examples_per_s = stats.examples as f64 / started.elapsed().as_secs_f64().max(1e-9);
        if stats.cancelled {
            outcome.cancelled = true;
            break;
        }
        let (validation_accuracy, validation_loss) = if validation.is_empty() {
            (None, None)
        } else {
            let (accuracy, loss) = outcome.model.evaluate(&validation.docs, &validation.labels);
            (Some(accuracy), Some(loss))
        };
        let report = EpochReport {
            epoch,
            train_loss: stats.loss,
            train_accuracy: stats.accuracy,
            validation_accuracy,
            validation_loss,
            examples_per_s,
        };
        progress(Progress::Epoch(&report));
        if let (true, Some(accuracy)) = (config.keep_best, validation_accuracy) {
            if best.as_ref().is_none_or(|(b, _, _)| accuracy > *b) {
                best = Some((accuracy, epoch, outcome.model.to_tensors()));
            }
        }
        outcome.epochs.push(report);
    }
    outcome.kept_epoch = outcome.epochs.len() as u32;
    if let Some((_, epoch, weights)) = best {
        if epoch != outcome.kept_epoch {
            outcome.model.load_tensors(&weights)?;
        }
        outcome.kept_epoch = epoch;
    }
    Ok(outcome)
}

/// Generated data and centrally trained models shared by the tests of this crate.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::OnceLock;

    use super::*;
    use crate::datagen::{GeneratorConfig, Row, TextGenerator};

    /// Classes of the generated test data (chance is 1/5).
    pub(crate) const CLASSES: usize = 5;

    /// The generator of the test data.
    pub(crate) fn generator() -> TextGenerator {
        TextGenerator::new(GeneratorConfig { classes: CLASSES, seed: 11, ..Default::default() })
    }

    /// Rows as a labelled table.
    pub(crate) fn table(generator: &TextGenerator, rows: &[Row]) -> LabelledTexts {
        let labels = generator.labels();
        LabelledTexts {
            texts: rows.iter().map(|r| r.text.clone()).collect(),
            labels: rows.iter().map(|r| labels[r.label].clone()).collect(),
            lines: (2..rows.len() as u64 + 2).collect(),
            path: "generated.csv".into(),
        }
    }

    /// A small config that trains each kind in seconds.
    pub(crate) fn small_config(kind: ModelKind, labels: Vec<String>) -> CentralConfig {
        let mut spec = ModelSpec::with_defaults(kind, labels);
        spec.buckets = 4096;
        let mut train = default_train_config(kind);
        train.epochs = match kind {
            ModelKind::Fasttext => 6,
            ModelKind::Bilstm => 5,
            ModelKind::Transformer => 6,
            ModelKind::Minilm => 1,
        };
        CentralConfig { spec, train, validation: 0.0, keep_best: false }
    }

    /// A model of `kind` trained on 1 500 generated rows, as model-file bytes (trained once per
    /// test run, then shared).
    pub(crate) fn trained(kind: ModelKind) -> Classifier {
        static TRAINED: [OnceLock<Vec<u8>>; 3] = [OnceLock::new(), OnceLock::new(), OnceLock::new()];
        let slot = match kind {
            ModelKind::Fasttext => &TRAINED[0],
            ModelKind::Bilstm => &TRAINED[1],
            ModelKind::Transformer => &TRAINED[2],
            ModelKind::Minilm => panic!("the shared 1 500-row models are the from-scratch kinds only"),
        };
        let bytes = slot.get_or_init(|| {
            let generator = generator();
            let rows = table(&generator, &generator.rows(1500, 1));
            let config = small_config(kind, generator.labels());
            let outcome = train_central(&rows, &config, Device::Cpu, &CancellationToken::new(), |_| {}).unwrap();
            outcome.model.to_model_bytes()
        });
        let (spec, weights) = fl_common::decode_model(bytes).unwrap();
        Classifier::from_tensors(spec, &weights, Device::Cpu).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use crate::predict::evaluate_rows;

    fn learns(kind: ModelKind) {
        let generator = generator();
        let model = trained(kind);
        let test = table(&generator, &generator.rows(400, 2));
        let accuracy = evaluate_rows(&model, &test).unwrap().accuracy;
        let chance = 1.0 / CLASSES as f64;
        assert!(accuracy > 3.0 * chance, "{kind}: test accuracy {accuracy:.3} (chance {chance})");
    }

    #[test]
    fn fasttext_learns_generated_data() {
        learns(ModelKind::Fasttext);
    }

    #[test]
    fn bilstm_learns_generated_data() {
        learns(ModelKind::Bilstm);
    }

    #[test]
    fn transformer_learns_generated_data() {
        learns(ModelKind::Transformer);
    }

    #[test]
    fn validation_is_reported_every_epoch_and_the_split_is_disjoint() {
        let generator = generator();
        let rows = table(&generator, &generator.rows(200, 5));
        let (train, validation) = split_validation(&rows, 0.25, 3);
        assert_eq!((train.len(), validation.len()), (150, 50));
        let mut all: Vec<u64> = train.lines.iter().chain(&validation.lines).copied().collect();
        all.sort();
        assert_eq!(all, rows.lines);

        let mut config = small_config(ModelKind::Fasttext, generator.labels());
        config.train.epochs = 2;
        config.validation = 0.25;
        let (mut started, mut steps, mut epochs) = (None, 0, 0);
        let outcome = train_central(&rows, &config, Device::Cpu, &CancellationToken::new(), |p| match p {
            Progress::Start { train_rows, validation_rows } => started = Some((train_rows, validation_rows)),
            Progress::Step { .. } => steps += 1,
            Progress::Epoch(r) => {
                epochs += 1;
                assert!(r.validation_accuracy.is_some() && r.examples_per_s > 0.0);
            }
        })
        .unwrap();
        assert_eq!(started, Some((150, 50)));
        assert_eq!(steps, 2 * 150usize.div_ceil(32));
        assert_eq!((epochs, outcome.epochs.len(), outcome.kept_epoch), (2, 2, 2));
    }

    #[test]
    fn keep_best_returns_the_weights_of_the_best_validation_epoch() {
        let generator = generator();
        let rows = table(&generator, &generator.rows(300, 6));
        let mut config = small_config(ModelKind::Fasttext, generator.labels());
        config.train.epochs = 4;
        config.train.lr = 0.05; // overfits fast, so the best epoch is usually not the last
        config.validation = 0.3;
        config.keep_best = true;
        let outcome = train_central(&rows, &config, Device::Cpu, &CancellationToken::new(), |_| {}).unwrap();
        let accuracies: Vec<f64> = outcome.epochs.iter().map(|e| e.validation_accuracy.unwrap()).collect();
        let best = accuracies.iter().copied().fold(f64::MIN, f64::max);
        let first_best = accuracies.iter().position(|&a| a == best).unwrap() as u32 + 1;
        assert_eq!(outcome.kept_epoch, first_best, "{accuracies:?}");
        let (_, validation) = split_validation(&rows, 0.3, config.train.seed);
        let again = crate::predict::evaluate_rows(&outcome.model, &validation).unwrap().accuracy;
        assert!((again - best).abs() < 1e-9, "kept model scores {again}, best epoch {best}");
    }

    #[test]
    fn distilling_at_temperature_1_with_alpha_1_is_training_on_the_labels() {
        let generator = generator();
        let rows = table(&generator, &generator.rows(300, 8));
        let mut config = small_config(ModelKind::Fasttext, generator.labels());
        config.train.epochs = 2;
        let (train_rows, validation_rows) = split_validation(&rows, config.validation, config.train.seed);
        let initial = Classifier::new(config.spec.clone(), Device::Cpu, 1).unwrap().to_tensors();
        let run = |teacher: Option<&Teacher<'_>>| {
            let model = Classifier::from_tensors(config.spec.clone(), &initial, Device::Cpu).unwrap();
            let cancel = CancellationToken::new();
            train_model(model, &train_rows, &validation_rows, &config, teacher, &cancel, |_| {}).unwrap().model
        };
        let labels_only = run(None).to_tensors();
        let teacher_model = trained(ModelKind::Transformer);
        let teacher = |temperature, alpha| Teacher {
            model: &teacher_model,
            distillation: Distillation { temperature, alpha },
            unlabelled: &[],
        };
        let distilled = run(Some(&teacher(1.0, 1.0))).to_tensors();
        let max_diff = |a: &fl_common::TensorSet, b: &fl_common::TensorSet| {
            a.tensors
                .iter()
                .zip(&b.tensors)
                .flat_map(|(x, y)| x.data.iter().zip(&y.data).map(|(p, q)| (p - q).abs()))
                .fold(0.0f32, f32::max)
        };
        assert!(max_diff(&labels_only, &distilled) < 1e-6, "{}", max_diff(&labels_only, &distilled));
        // The teacher's term is live: with alpha 0.5 the weights move elsewhere.
        assert!(max_diff(&labels_only, &run(Some(&teacher(2.0, 0.5))).to_tensors()) > 1e-3);
        let err =
            train_student(&rows, &config, Some(&teacher(0.0, 0.5)), Device::Cpu, &CancellationToken::new(), |_| {})
                .unwrap_err();
        assert!(err.to_string().contains("temperature must be > 0"), "{err}");
    }

    #[test]
    fn a_student_learns_unlabelled_texts_from_its_teacher() {
        let generator = generator();
        let labelled = table(&generator, &generator.rows(20, 9));
        let unlabelled: Vec<String> = generator.rows(1200, 10).into_iter().map(|r| r.text).collect();
        let teacher_model = trained(ModelKind::Fasttext);
        let teacher = Teacher {
            model: &teacher_model,
            distillation: Distillation { temperature: 2.0, alpha: 0.0 },
            unlabelled: &unlabelled,
        };
        let mut config = small_config(ModelKind::Fasttext, generator.labels());
        config.train.seed = 5;
        let student = train_student(&labelled, &config, Some(&teacher), Device::Cpu, &CancellationToken::new(), |_| {})
            .unwrap()
            .model;
        let labels_only =
            train_central(&labelled, &config, Device::Cpu, &CancellationToken::new(), |_| {}).unwrap().model;
        let test = table(&generator, &generator.rows(400, 2));
        let accuracy = |m: &Classifier| evaluate_rows(m, &test).unwrap().accuracy;
        let (s, l, t) = (accuracy(&student), accuracy(&labels_only), accuracy(&teacher_model));
        assert!(s > l + 0.1 && s > t - 0.15, "student {s:.3}, 20 labels only {l:.3}, teacher {t:.3}");
    }

    #[test]
    fn unknown_labels_and_bad_specs_are_errors() {
        let generator = generator();
        let rows = table(&generator, &generator.rows(20, 5));
        let config = small_config(ModelKind::Fasttext, vec!["sports".into(), "other".into()]);
        let err = train_central(&rows, &config, Device::Cpu, &CancellationToken::new(), |_| {}).unwrap_err();
        assert!(err.to_string().contains("unknown label"), "{err}");
        let overrides = fl_common::SpecOverrides { heads: Some(5), ..Default::default() };
        assert!(overrides
            .spec(ModelKind::Transformer, generator.labels())
            .unwrap_err()
            .to_string()
            .contains("divisible"));
        let overrides = fl_common::SpecOverrides { layers: Some(2), pooling: Some("cls".into()), ..Default::default() };
        let spec = overrides.spec(ModelKind::Transformer, generator.labels()).unwrap();
        assert_eq!((spec.layers, spec.pooling.as_str(), spec.heads), (2, "cls", 4));
    }
}
