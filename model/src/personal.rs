//! Personalisation: each client keeps a model of its own beside the global one.
//!
//! - `finetune`: the personal model is the global model of the round fine-tuned on the local
//!   training split, which is what local training of the round computes anyway.
//! - `fedper`: the classifier head stays on the client. The body is trained and shared as usual;
//!   the head starts from the client's own head and its change is never uploaded (its delta is
//!   zero, so the global head stays as initialised).
//! - `ditto`: the global update is plain local training; the personal model `v` is trained on the
//!   local data with the extra term λ/2·‖v − w‖² pulling it towards the round's global model `w`.
//!   The term is applied as its exact proximal step after every optimizer step,
//!   v ← (v + ηλ·w) / (1 + ηλ) with η the learning rate: λ = 0 is local-only training, and as λ
//!   grows v becomes w. As in Ditto's paper, the personal step is a number of optimizer steps a
//!   round, not only of epochs: at least `min_steps` (in whole epochs), so that a client whose
//!   shard is one batch still trains its personal model (one step a round would leave it near
//!   the random model it was created from). `v` is created, the first time, from the global
//!   model the client received.
//!
//! With label skew a client's class prior differs from the federation's, and the global model's
//! logits carry the federation's: by Bayes' rule, p_local(y|x) ∝ p_global(y|x) · p_local(y) /
//! p_global(y). [`LocalPrior`] makes that correction in the head's bias (logit adjustment,
//! Menon et al. 2021), from the client's own training labels. It is where `finetune`'s
//! fine-tuning after the federation starts.

use std::collections::HashMap;

use fl_common::{ModelSpec, TensorSet};
use tch::Tensor;
use tokio_util::sync::CancellationToken;

use crate::model::{Classifier, ModelError};
use crate::train::{train, EncodedDataset, TrainConfig, TrainStats, Trainer};

/// How a client personalises.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
#[serde(rename_all = "lowercase", tag = "method")]
pub enum Personalization {
    /// Fine-tune the global model locally.
    Finetune,
    /// Keep the classifier head local.
    Fedper,
    /// A personal model pulled towards the global one with strength `lambda`.
    Ditto {
        /// λ of λ/2·‖v − w‖².
        lambda: f64,
        /// The least number of optimizer steps of the personal model a round (whole epochs).
        min_steps: u32,
    },
}

impl std::fmt::Display for Personalization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Personalization::Finetune => f.write_str("finetune"),
            Personalization::Fedper => f.write_str("fedper"),
            Personalization::Ditto { lambda, min_steps } => {
                write!(f, "ditto (lambda {lambda}, at least {min_steps} steps a round)")
            }
        }
    }
}

/// The shift of a client's logits from the federation's label prior to its own: for each class,
/// log p_local(y) − log p_ref(y). p_local is the client's training labels' frequency, each count
/// plus one (Laplace smoothing: a class never seen locally keeps some mass, and a client with few
/// rows gets a small shift). p_ref is uniform: the federation's own prior is not known to a
/// client, and the global model of a federation whose data is balanced overall has learnt a
/// uniform one. With balanced local labels the shift is zero.
#[derive(Clone, Debug, PartialEq)]
pub struct LocalPrior {
    /// Per class, the amount added to the head's bias.
    pub shift: Vec<f32>,
}

impl LocalPrior {
    /// The shift of `labels` (label indices; [`crate::train::UNLABELLED`] and other negative
    /// entries are not counted) over `classes` classes.
    pub fn from_labels(labels: &[i64], classes: usize) -> LocalPrior {
        let mut counts = vec![1.0f64; classes];
        for &l in labels {
            if let Some(c) = usize::try_from(l).ok().and_then(|l| counts.get_mut(l)) {
                *c += 1.0;
            }
        }
        let total: f64 = counts.iter().sum();
        LocalPrior { shift: counts.iter().map(|c| (c / total * classes as f64).ln() as f32).collect() }
    }

    /// Adds the shift to the bias of `model`'s classifier head.
    pub fn apply(&self, model: &mut Classifier) -> Result<(), ModelError> {
        let name = model.head_names().iter().find(|n| n.ends_with(".bias")).expect("every head has a bias");
        let bias = model.vs.variables().remove(*name).expect("the head's bias is a weight");
        if bias.size() != [self.shift.len() as i64] {
            return Err(ModelError::Weights(fl_common::tensors::TensorError::Shape {
                name: name.to_string(),
                expected: vec![self.shift.len()],
                got: bias.size().iter().map(|&d| d as usize).collect(),
            }));
        }
        let shift = Tensor::from_slice(&self.shift).to_device(bias.device());
        tch::no_grad(|| {
            let _ = bias.shallow_clone().g_add_(&shift);
        });
        Ok(())
    }
}

/// What one personalised round gives.
#[derive(Debug)]
pub struct PersonalRound {
    /// The change to the global model to upload.
    pub delta: TensorSet,
    /// The client's personal model after the round.
    pub personal: TensorSet,
    /// Statistics of the local training that made `delta`.
    pub stats: TrainStats,
}

/// Trains `personal` on `data` for `config.epochs`, or for more whole epochs until it has taken
/// at least `min_steps` optimizer steps, pulled towards `global` with strength `lambda` (Ditto's
/// personal step).
pub fn train_ditto_personal(
    personal: &mut Classifier,
    global: &TensorSet,
    data: &EncodedDataset,
    config: &TrainConfig,
    lambda: f64,
    min_steps: u32,
    cancel: &CancellationToken,
) -> Result<(), ModelError> {
    let device = personal.device();
    let anchor: HashMap<String, Tensor> = global
        .tensors
        .iter()
        .map(|t| {
            let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
            (t.name.clone(), Tensor::from_slice(&t.data).view(shape.as_slice()).to_device(device))
        })
        .collect();
    let vars: Vec<(Tensor, Tensor)> =
        personal.vs.variables().into_iter().map(|(name, v)| (v, anchor[&name].shallow_clone())).collect();
    let pull = config.lr * lambda;
    let mut trainer = Trainer::new(personal, config);
    let (mut epochs, mut steps) = (0u32, 0usize);
    while epochs < config.epochs || steps < min_steps as usize {
        let epoch = trainer.epoch(personal, data, cancel, |_| {
            if pull > 0.0 {
                tch::no_grad(|| {
                    for (v, w) in &vars {
                        let next = (v + w * pull) / (1.0 + pull);
                        v.shallow_clone().copy_(&next);
                    }
                });
            }
        });
        epochs += 1;
        steps += epoch.steps;
        if epoch.cancelled || epoch.steps == 0 {
            break;
        }
    }
    Ok(())
}

/// One round of a personalising client: the upload for the federation and the new personal
/// model. `previous` is the personal model of the client's last round, if any.
// The arguments are those of `train` plus the global and personal weights; a struct would only
// rename them.
#[allow(clippy::too_many_arguments)]
pub fn personal_round(
    spec: &ModelSpec,
    global: &TensorSet,
    previous: Option<&TensorSet>,
    data: &EncodedDataset,
    config: &TrainConfig,
    method: Personalization,
    device: tch::Device,
    cancel: &CancellationToken,
    progress: impl FnMut(f32, &TrainStats),
) -> Result<PersonalRound, ModelError> {
    let mut model = Classifier::from_tensors(spec.clone(), global, device)?;
    let head: Vec<String> = model.head_names().iter().map(|s| s.to_string()).collect();
    if let (Personalization::Fedper, Some(previous)) = (method, previous) {
        let mut start = global.clone();
        for t in &mut start.tensors {
            if head.contains(&t.name) {
                if let Some(own) = previous.tensors.iter().find(|p| p.name == t.name) {
                    t.data.clone_from(&own.data);
                }
            }
        }
        model.load_tensors(&start)?;
    }
    let stats = train(&mut model, data, config, cancel, progress);
    let trained = model.to_tensors();
    let mut delta = trained.minus(global);
    let personal = match method {
        Personalization::Finetune => trained,
        Personalization::Fedper => {
            for t in &mut delta.tensors {
                if head.contains(&t.name) {
                    t.data.iter_mut().for_each(|x| *x = 0.0);
                }
            }
            trained
        }
        Personalization::Ditto { lambda, min_steps } => {
            let mut personal = Classifier::from_tensors(spec.clone(), previous.unwrap_or(global), device)?;
            train_ditto_personal(&mut personal, global, data, config, lambda, min_steps, cancel)?;
            personal.to_tensors()
        }
    };
    Ok(PersonalRound { delta, personal, stats })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::central::testing::{generator, small_config, table};
    use fl_common::ModelKind;
    use tch::Device;

    fn setup() -> (ModelSpec, TensorSet, EncodedDataset, TrainConfig) {
        let generator = generator();
        let config = small_config(ModelKind::Fasttext, generator.labels());
        let mut spec = config.spec;
        spec.buckets = 1024;
        let model = Classifier::new(spec.clone(), Device::Cpu, 3).unwrap();
        let rows = table(&generator, &generator.rows(200, 4));
        let labels = rows.label_indices(&spec.labels).unwrap();
        let data = EncodedDataset::encode(&model, &rows.texts, labels);
        let train = TrainConfig { epochs: 1, lr: 0.01, ..config.train };
        (spec, model.to_tensors(), data, train)
    }

    fn max_abs_diff(a: &TensorSet, b: &TensorSet) -> f32 {
        a.minus(b).tensors.iter().flat_map(|t| t.data.iter()).fold(0.0f32, |m, x| m.max(x.abs()))
    }

    /// One personalised round of the set-up's data and config, from `global` and `previous`.
    fn round_of(
        (spec, _, data, config): &(ModelSpec, TensorSet, EncodedDataset, TrainConfig),
        global: &TensorSet,
        previous: Option<&TensorSet>,
        method: Personalization,
    ) -> PersonalRound {
        let cancel = CancellationToken::new();
        personal_round(spec, global, previous, data, config, method, Device::Cpu, &cancel, |_, _| {}).unwrap()
    }

    #[test]
    fn local_prior_is_the_log_ratio_of_the_smoothed_local_frequencies_to_uniform() {
        // 3 classes, labels 0,0,0,1 (and an unlabelled row): counts plus one are 4, 2, 1 of 7.
        let prior = LocalPrior::from_labels(&[0, 0, 0, 1, crate::train::UNLABELLED], 3);
        let expected = [(12.0f64 / 7.0).ln(), (6.0f64 / 7.0).ln(), (3.0f64 / 7.0).ln()];
        for (got, want) in prior.shift.iter().zip(expected) {
            assert!((f64::from(*got) - want).abs() < 1e-6, "{:?} against {expected:?}", prior.shift);
        }
        // Balanced labels: no shift.
        assert!(LocalPrior::from_labels(&[0, 1, 2, 2, 1, 0], 3).shift.iter().all(|s| s.abs() < 1e-6));
    }

    #[test]
    fn local_prior_multiplies_the_global_posterior_by_the_prior_ratio() {
        let (spec, global, data, _) = setup();
        let labels: Vec<i64> = (0..40).map(|i| if i < 30 { 0 } else { 1 + i % 3 }).collect();
        let prior = LocalPrior::from_labels(&labels, spec.num_classes());
        let mut model = Classifier::from_tensors(spec.clone(), &global, Device::Cpu).unwrap();
        prior.apply(&mut model).unwrap();
        let before = Classifier::from_tensors(spec.clone(), &global, Device::Cpu).unwrap();
        let docs = &data.docs[..5];
        let probs = |m: &Classifier| {
            let p = m.forward(&crate::model::Batch::new(docs, Device::Cpu)).softmax(-1, tch::Kind::Float);
            Vec::<Vec<f32>>::try_from(&p).unwrap()
        };
        // Bayes' rule: p_local(y|x) ∝ p(y|x)·p_local(y)/p_uniform(y) = p(y|x)·exp(shift_y).
        for (p, q) in probs(&before).iter().zip(probs(&model)) {
            let unnormalised: Vec<f64> =
                p.iter().zip(&prior.shift).map(|(&p, &s)| f64::from(p) * f64::from(s).exp()).collect();
            let z: f64 = unnormalised.iter().sum();
            for (u, q) in unnormalised.iter().zip(q) {
                assert!((u / z - f64::from(q)).abs() < 1e-5, "{p:?} shifted gives {q:?}");
            }
        }
        // Only the head's bias moved.
        let changed: Vec<String> = model
            .to_tensors()
            .minus(&global)
            .tensors
            .into_iter()
            .filter(|t| t.data.iter().any(|&x| x != 0.0))
            .map(|t| t.name)
            .collect();
        assert_eq!(changed, ["linear.bias"]);
        assert!(prior.shift[0] > 0.0 && prior.shift[1..].iter().all(|&s| s < 0.0), "{:?}", prior.shift);
    }

    #[test]
    fn ditto_with_a_huge_lambda_is_the_global_model() {
        let set = setup();
        let global = &set.1;
        let round = |lambda| round_of(&set, global, None, Personalization::Ditto { lambda, min_steps: 1 });
        let pulled = round(1e12);
        assert!(
            max_abs_diff(&pulled.personal, global) < 1e-6,
            "personal differs from global by {}",
            max_abs_diff(&pulled.personal, global)
        );
        // And the pull is what makes it so: a moderate lambda leaves the personal model elsewhere.
        assert!(max_abs_diff(&round(1.0).personal, global) > 1e-3);
    }

    #[test]
    fn ditto_with_lambda_zero_is_local_only_training() {
        let set = setup();
        let (spec, global, data, config) = &set;
        // Two rounds with different global models in between: the personal model ignores them.
        let mut other_global = global.clone();
        other_global.tensors.iter_mut().for_each(|t| t.data.iter_mut().for_each(|x| *x *= 0.5));
        let method = Personalization::Ditto { lambda: 0.0, min_steps: 1 };
        let first = round_of(&set, global, None, method);
        let second = round_of(&set, &other_global, Some(&first.personal), method);
        // Local-only: the same start trained twice on the local data, nothing from the federation.
        let mut local = Classifier::from_tensors(spec.clone(), global, Device::Cpu).unwrap();
        for _ in 0..2 {
            train(&mut local, data, config, &CancellationToken::new(), |_, _| {});
        }
        assert!(max_abs_diff(&second.personal, &local.to_tensors()) < 1e-6);
        assert!(max_abs_diff(&second.personal, &other_global) > 1e-3);
    }

    #[test]
    fn ditto_takes_at_least_min_steps_a_round_in_whole_epochs() {
        let (spec, global, data, config) = setup();
        let cancel = CancellationToken::new();
        let ditto = |data: &EncodedDataset, config: &TrainConfig, min_steps| {
            let mut personal = Classifier::from_tensors(spec.clone(), &global, Device::Cpu).unwrap();
            train_ditto_personal(&mut personal, &global, data, config, 1.0, min_steps, &cancel).unwrap();
            personal.to_tensors()
        };
        // A shard of one batch: 6 rows, one step an epoch. At least 5 steps is 5 epochs.
        let tiny = EncodedDataset { docs: data.docs[..6].to_vec(), labels: data.labels[..6].to_vec(), soft: None };
        let five_epochs = TrainConfig { epochs: 5, ..config.clone() };
        let at_least_five = ditto(&tiny, &config, 5);
        assert!(max_abs_diff(&at_least_five, &ditto(&tiny, &five_epochs, 1)) < 1e-6);
        assert!(max_abs_diff(&at_least_five, &ditto(&tiny, &config, 1)) > 1e-4, "more steps, another model");
        // A shard with more steps an epoch than the minimum: one epoch, as before.
        let per_epoch = data.len().div_ceil(config.batch_size as usize) as u32;
        assert!(per_epoch > 2, "{per_epoch} steps an epoch");
        assert!(max_abs_diff(&ditto(&data, &config, per_epoch - 1), &ditto(&data, &config, 0)) < 1e-6);
        assert!(max_abs_diff(&ditto(&data, &config, per_epoch + 1), &ditto(&data, &config, 0)) > 1e-4);
    }

    #[test]
    fn fedper_keeps_the_head_local() {
        let set = setup();
        let global = &set.1;
        let first = round_of(&set, global, None, Personalization::Fedper);
        for t in &first.delta.tensors {
            let zero = t.data.iter().all(|&x| x == 0.0);
            assert_eq!(zero, t.name.starts_with("linear."), "{}", t.name);
        }
        let head = |s: &TensorSet| s.tensors.iter().find(|t| t.name == "linear.weight").unwrap().data.clone();
        // The next round starts from the client's own head, not the global one.
        let second = round_of(&set, global, Some(&first.personal), Personalization::Fedper);
        assert_ne!(head(&second.personal), head(&first.personal));
        let fresh = round_of(&set, global, None, Personalization::Fedper);
        assert_eq!(head(&fresh.personal), head(&first.personal), "same start, same training");
    }
}
