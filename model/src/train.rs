//! Local training: mini-batch Adam or SGD over a tokenized dataset.
//!
//! The embedding table is large (buckets × dim) but a batch touches few of its rows. Each step
//! gathers just those rows into a small leaf tensor, runs forward and backward on it, and updates
//! only those rows (with row-wise lazy Adam moments, as PyTorch's `SparseAdam`). The dense layers use
//! libtorch's own optimizer. This keeps a step's cost proportional to the batch, not the vocabulary.

use std::collections::HashMap;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use tch::{nn, nn::OptimizerConfig, Kind, Tensor};
use tokio_util::sync::CancellationToken;

use crate::model::{Batch, Classifier};

/// Optimizer choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// Adam (β1 0.9, β2 0.999, ε 1e-8).
    Adam,
    /// Plain stochastic gradient descent.
    Sgd,
}

impl std::str::FromStr for OptimizerKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "adam" => Ok(OptimizerKind::Adam),
            "sgd" => Ok(OptimizerKind::Sgd),
            other => Err(format!("unknown optimizer '{other}' (expected adam or sgd)")),
        }
    }
}

impl std::fmt::Display for OptimizerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OptimizerKind::Adam => "adam",
            OptimizerKind::Sgd => "sgd",
        })
    }
}

/// How to train locally for one round.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainConfig {
    /// Passes over the local data.
    pub epochs: u32,
    /// Examples per step.
    pub batch_size: u32,
    /// Learning rate.
    pub lr: f64,
    /// Optimizer.
    pub optimizer: OptimizerKind,
    /// Seed of the shuffling and dropout.
    pub seed: u64,
    /// FedProx's μ: adds μ/2·‖w − w_start‖² to the loss, w_start being the weights training
    /// started from (the round's global model). 0: no proximal term.
    pub proximal_mu: f64,
}

/// Tokenized examples with label indices.
#[derive(Clone, Debug, Default)]
pub struct EncodedDataset {
    /// Token ids per example.
    pub docs: Vec<Vec<i64>>,
    /// Label index per example; [`UNLABELLED`] for an example that only a teacher labels.
    pub labels: Vec<i64>,
    /// The teacher's class probabilities at the distillation temperature, per example, when
    /// distilling (see [`Distillation`]).
    pub soft: Option<Vec<Vec<f32>>>,
}

/// Label of an example without one: the labels' loss ignores it (libtorch's `ignore_index`).
pub const UNLABELLED: i64 = -100;

/// Knowledge distillation (Hinton et al., 2015): the loss is `alpha` × cross-entropy on the
/// labels plus `(1 - alpha)` × T² × KL(teacher ‖ student), both softened by temperature T.
/// With `alpha` 1 it is training on the labels.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Distillation {
    /// Temperature T (> 0): above 1 softens the teacher's outputs to show its second choices.
    pub temperature: f64,
    /// Weight of the labels' loss, in [0, 1].
    pub alpha: f64,
}

impl EncodedDataset {
    /// Tokenizes texts for `model`.
    pub fn encode(model: &Classifier, texts: &[String], labels: Vec<i64>) -> EncodedDataset {
        EncodedDataset { docs: texts.iter().map(|t| model.token_ids(t)).collect(), labels, soft: None }
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// What local training reports.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TrainStats {
    /// Examples in the local dataset.
    pub examples: usize,
    /// Mean training loss over the last epoch.
    pub loss: f64,
    /// Training accuracy over the last epoch.
    pub accuracy: f64,
    /// Examples processed per second.
    pub examples_per_s: f64,
    /// True if training stopped early because it was cancelled.
    pub cancelled: bool,
}

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;

/// Row-wise (lazy) Adam state of the embedding table.
struct SparseRowAdam {
    m: Tensor,
    v: Tensor,
    step: i32,
    /// Rows whose moments were written since they were last all zero, so that
    /// [`Trainer::restart`] clears those rows and not the whole table.
    touched: Vec<i64>,
    is_touched: Vec<bool>,
}

impl SparseRowAdam {
    fn new(embedding: &Tensor) -> SparseRowAdam {
        SparseRowAdam {
            m: embedding.zeros_like(),
            v: embedding.zeros_like(),
            step: 0,
            touched: Vec::new(),
            is_touched: vec![false; embedding.size().first().copied().unwrap_or(0).max(0) as usize],
        }
    }

    /// Back to the state of [`SparseRowAdam::new`], in the same allocations.
    fn clear(&mut self) {
        if !self.touched.is_empty() {
            let rows = Tensor::from_slice(&self.touched).to_device(self.m.device());
            let _ = self.m.index_fill_(0, &rows, 0.0);
            let _ = self.v.index_fill_(0, &rows, 0.0);
            for &row in &self.touched {
                self.is_touched[row as usize] = false;
            }
            self.touched.clear();
        }
        self.step = 0;
    }

    fn mark(&mut self, rows: &[i64]) {
        for &row in rows {
            if let Some(seen) = self.is_touched.get_mut(row as usize) {
                if !*seen {
                    *seen = true;
                    self.touched.push(row);
                }
            }
        }
    }
}

/// Progress within one epoch.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EpochStats {
    /// Steps (batches) done.
    pub steps: usize,
    /// Examples seen.
    pub examples: usize,
    /// Mean training loss over the examples seen.
    pub loss: f64,
    /// Training accuracy over the examples seen.
    pub accuracy: f64,
    /// True if the epoch stopped early because it was cancelled.
    pub cancelled: bool,
}

/// Training state that lasts across epochs: the optimizers' moments and the shuffling RNG.
/// [`train`] runs one for a federated round; central training keeps one for the whole run.
pub struct Trainer {
    config: TrainConfig,
    embedding: Tensor,
    dense_opt: nn::Optimizer,
    row_adam: Option<SparseRowAdam>,
    /// False for a frozen pretrained table: its rows are read, never updated.
    embedding_trains: bool,
    rng: rand::rngs::StdRng,
    row_of: HashMap<i64, i64>,
    distillation: Option<Distillation>,
    proximal: Option<Proximal>,
}

/// FedProx's proximal term: μ and the weights it pulls towards.
struct Proximal {
    mu: f64,
    /// The starting embedding table.
    embedding: Tensor,
    /// The other trainable variables and their starting values.
    dense: Vec<(Tensor, Tensor)>,
}

impl Proximal {
    /// μ/2·‖w − w_start‖² over the dense variables and the embedding rows of the batch
    /// (`table`, gathered at `row_ids`). The rows a batch does not touch are left out, as
    /// lazy (sparse) Adam leaves out their moments: touching every row would make each step
    /// cost the whole vocabulary.
    fn penalty(&self, table: &Tensor, row_ids: &Tensor) -> Tensor {
        let start_rows = self.embedding.index_select(0, row_ids);
        let mut sum = (table - start_rows).square().sum(Kind::Float);
        for (var, start) in &self.dense {
            sum += (var - start).square().sum(Kind::Float);
        }
        sum * (self.mu / 2.0)
    }
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer").field("config", &self.config).finish_non_exhaustive()
    }
}

impl Trainer {
    /// Optimizers for `model`'s weights; seeds libtorch (dropout) and the shuffling with `config.seed`.
    pub fn new(model: &Classifier, config: &TrainConfig) -> Trainer {
        tch::manual_seed(config.seed as i64);
        let embedding = model.embedding();
        let dense_opt = match config.optimizer {
            OptimizerKind::Adam => nn::Adam::default().build(&model.vs, config.lr),
            OptimizerKind::Sgd => nn::Sgd::default().build(&model.vs, config.lr),
        }
        .expect("optimizer builds");
        let embedding_trains = model.embedding_trains();
        let row_adam =
            (embedding_trains && config.optimizer == OptimizerKind::Adam).then(|| SparseRowAdam::new(&embedding));
        Trainer {
            config: config.clone(),
            embedding,
            dense_opt,
            row_adam,
            embedding_trains,
            rng: rand::rngs::StdRng::seed_from_u64(config.seed),
            row_of: HashMap::new(),
            distillation: None,
            proximal: None,
        }
        .with_proximal(model, config.proximal_mu, config.proximal_mu > 0.0)
    }

    /// Starts over for a new round of `model`, the model this trainer was built for with new
    /// weights copied in ([`Classifier::load_tensors`]): the state is that of
    /// `Trainer::new(model, config)` (moments zero, seeds, proximal start), so a round trains
    /// bit for bit the same weights, but the row-wise moments (two tables the size of the
    /// embedding) keep their allocation and only the rows the last round touched are cleared.
    /// tch cannot clear a libtorch optimizer's state, so the dense layers' optimizer is built
    /// again; its state is the size of the dense layers. Returns false, changing nothing, when
    /// `model` is not the model this trainer was built for (build a new one then).
    pub fn restart(&mut self, model: &Classifier, config: &TrainConfig) -> bool {
        let embedding = model.embedding();
        if embedding.data_ptr() != self.embedding.data_ptr() || embedding.size() != self.embedding.size() {
            return false;
        }
        tch::manual_seed(config.seed as i64);
        self.dense_opt = match config.optimizer {
            OptimizerKind::Adam => nn::Adam::default().build(&model.vs, config.lr),
            OptimizerKind::Sgd => nn::Sgd::default().build(&model.vs, config.lr),
        }
        .expect("optimizer builds");
        let wants_row_adam = self.embedding_trains && config.optimizer == OptimizerKind::Adam;
        match (&mut self.row_adam, wants_row_adam) {
            (Some(state), true) => state.clear(),
            (_, true) => self.row_adam = Some(SparseRowAdam::new(&self.embedding)),
            (_, false) => self.row_adam = None,
        }
        self.rng = rand::rngs::StdRng::seed_from_u64(config.seed);
        self.config = config.clone();
        self.distillation = None;
        // The proximal start is this round's weights: copied into the kept tensors.
        match (self.proximal.as_mut(), config.proximal_mu > 0.0) {
            (Some(proximal), true) => {
                proximal.mu = config.proximal_mu;
                tch::no_grad(|| {
                    proximal.embedding.copy_(&self.embedding);
                    for (var, start) in &mut proximal.dense {
                        start.copy_(var);
                    }
                });
            }
            (_, on) => self.proximal = self.proximal_start(model, config.proximal_mu, on),
        }
        true
    }

    /// Adds FedProx's proximal term with `mu`, towards `model`'s current weights, when `on`.
    /// [`Trainer::new`] turns it on for a positive `proximal_mu`; tests turn it on with μ 0.
    pub fn with_proximal(mut self, model: &Classifier, mu: f64, on: bool) -> Trainer {
        self.proximal = self.proximal_start(model, mu, on);
        self
    }

    fn proximal_start(&self, model: &Classifier, mu: f64, on: bool) -> Option<Proximal> {
        on.then(|| {
            let dense = model
                .vs
                .variables()
                .into_iter()
                .filter(|(name, v)| name != crate::model::EMBEDDING && v.requires_grad())
                .map(|(_, v)| {
                    let start = v.detach().copy();
                    (v, start)
                })
                .collect();
            Proximal { mu, embedding: self.embedding.detach().copy(), dense }
        })
    }

    /// Trains on a mix of the labels and the teacher's outputs (`EncodedDataset::soft`) from now on.
    pub fn distill(mut self, distillation: Distillation) -> Trainer {
        self.distillation = Some(distillation);
        self
    }

    /// One pass over `data` in a fresh random order. `progress` is called after every step.
    pub fn epoch(
        &mut self,
        model: &Classifier,
        data: &EncodedDataset,
        cancel: &CancellationToken,
        mut progress: impl FnMut(&EpochStats),
    ) -> EpochStats {
        let device = model.device();
        let lr = self.config.lr;
        let mut order: Vec<usize> = (0..data.len()).collect();
        order.shuffle(&mut self.rng);
        let (mut loss_sum, mut correct) = (0.0f64, 0.0f64);
        let mut labelled_seen = 0usize;
        let mut stats = EpochStats::default();
        for chunk in order.chunks(self.config.batch_size.max(1) as usize) {
            if cancel.is_cancelled() {
                stats.cancelled = true;
                break;
            }
            // Map the batch's token ids onto the rows it touches.
            self.row_of.clear();
            let mut rows: Vec<i64> = Vec::new();
            let row_of = &mut self.row_of;
            let docs: Vec<Vec<i64>> = chunk
                .iter()
                .map(|&i| {
                    data.docs[i]
                        .iter()
                        .map(|&id| {
                            *row_of.entry(id).or_insert_with(|| {
                                rows.push(id);
                                rows.len() as i64 - 1
                            })
                        })
                        .collect()
                })
                .collect();
            let labels: Vec<i64> = chunk.iter().map(|&i| data.labels[i]).collect();
            let batch = Batch::new(&docs, device);
            let target = Tensor::from_slice(&labels).to_device(device);
            let row_ids = Tensor::from_slice(&rows).to_device(device);
            let table = self.embedding.index_select(0, &row_ids).detach().set_requires_grad(self.embedding_trains);

            let logits = model.forward_with_table(&table, &batch, true);
            let loss = match (self.distillation, &data.soft) {
                (Some(d), Some(soft)) => {
                    let soft: Vec<f32> = chunk.iter().flat_map(|&i| soft[i].iter().copied()).collect();
                    let soft = Tensor::from_slice(&soft).view([labels.len() as i64, -1]).to_device(device);
                    let log_student = (&logits / d.temperature).log_softmax(-1, Kind::Float);
                    // KL(teacher ‖ student), summed over classes, averaged over the batch.
                    let kl =
                        (&soft * (soft.clamp_min(1e-12).log() - log_student)).sum(Kind::Float) / labels.len() as f64;
                    let labelled = labels.iter().filter(|&&l| l != UNLABELLED).count();
                    let ce = if labelled > 0 { logits.cross_entropy_for_logits(&target) } else { kl.zeros_like() };
                    ce * d.alpha + kl * ((1.0 - d.alpha) * d.temperature * d.temperature)
                }
                _ => logits.cross_entropy_for_logits(&target),
            };
            self.dense_opt.zero_grad();
            match &self.proximal {
                Some(proximal) => (&loss + proximal.penalty(&table, &row_ids)).backward(),
                None => loss.backward(),
            }
            self.dense_opt.step();
            if self.embedding_trains {
                let grad = table.grad();
                tch::no_grad(|| update_rows(&self.embedding, &row_ids, &grad, lr, self.row_adam.as_mut()));
                if let Some(state) = self.row_adam.as_mut() {
                    state.mark(&rows);
                }
            }

            loss_sum += loss.double_value(&[]) * labels.len() as f64;
            correct += logits.argmax(-1, false).eq_tensor(&target).sum(Kind::Double).double_value(&[]);
            stats.steps += 1;
            stats.examples += labels.len();
            stats.loss = loss_sum / stats.examples as f64;
            labelled_seen += labels.iter().filter(|&&l| l != UNLABELLED).count();
            stats.accuracy = correct / labelled_seen.max(1) as f64;
            progress(&stats);
        }
        stats
    }
}

/// Trains `model` in place. `progress` is called with the fraction done, now and then.
pub fn train(
    model: &mut Classifier,
    data: &EncodedDataset,
    config: &TrainConfig,
    cancel: &CancellationToken,
    progress: impl FnMut(f32, &TrainStats),
) -> TrainStats {
    train_with(model, data, config, None, cancel, progress)
}

/// As [`train`], and with `distillation`, on the labels mixed with the teacher's outputs in
/// `data.soft` ([`Trainer::distill`]): a client's round of federated distillation.
pub fn train_with(
    model: &mut Classifier,
    data: &EncodedDataset,
    config: &TrainConfig,
    distillation: Option<Distillation>,
    cancel: &CancellationToken,
    progress: impl FnMut(f32, &TrainStats),
) -> TrainStats {
    train_in(&mut None, model, data, config, distillation, cancel, progress)
}

/// As [`train_with`], in `trainer`: the trainer of an earlier round of this `model` (new weights
/// copied in) is restarted ([`Trainer::restart`]), keeping its allocations; otherwise a new one
/// is built and left in `trainer` for the next round. Either way the round trains the same
/// weights.
pub fn train_in(
    trainer: &mut Option<Trainer>,
    model: &mut Classifier,
    data: &EncodedDataset,
    config: &TrainConfig,
    distillation: Option<Distillation>,
    cancel: &CancellationToken,
    mut progress: impl FnMut(f32, &TrainStats),
) -> TrainStats {
    if !trainer.as_mut().is_some_and(|reused| reused.restart(model, config)) {
        *trainer = Some(Trainer::new(model, config));
    }
    let trainer = trainer.as_mut().expect("a trainer was restarted or built");
    trainer.distillation = distillation;
    let batch_size = config.batch_size.max(1) as usize;
    let total_steps = (config.epochs as usize * data.len().div_ceil(batch_size)).max(1);
    let mut stats = TrainStats { examples: data.len(), ..Default::default() };
    let started = std::time::Instant::now();
    let (mut steps_before, mut examples_done) = (0usize, 0usize);
    for _epoch in 0..config.epochs {
        let epoch = trainer.epoch(model, data, cancel, |e| {
            if (steps_before + e.steps).is_multiple_of(16) {
                stats.loss = e.loss;
                stats.accuracy = e.accuracy;
                progress((steps_before + e.steps) as f32 / total_steps as f32, &stats);
            }
        });
        steps_before += epoch.steps;
        examples_done += epoch.examples;
        if epoch.cancelled {
            stats.cancelled = true;
            break;
        }
        stats.loss = epoch.loss;
        stats.accuracy = epoch.accuracy;
    }
    stats.examples_per_s = examples_done as f64 / started.elapsed().as_secs_f64().max(1e-9);
    progress(1.0, &stats);
    stats
}

/// Applies the gradient of the touched embedding rows: lazy Adam, or SGD when `adam` is None.
fn update_rows(embedding: &Tensor, rows: &Tensor, grad: &Tensor, lr: f64, adam: Option<&mut SparseRowAdam>) {
    let mut embedding = embedding.shallow_clone();
    let Some(state) = adam else {
        let _ = embedding.index_add_(0, rows, &(grad * -lr));
        return;
    };
    state.step += 1;
    let m = state.m.index_select(0, rows) * BETA1 + grad * (1.0 - BETA1);
    let v = state.v.index_select(0, rows) * BETA2 + grad.square() * (1.0 - BETA2);
    let _ = state.m.index_copy_(0, rows, &m);
    let _ = state.v.index_copy_(0, rows, &v);
    let bias1 = 1.0 - BETA1.powi(state.step);
    let bias2 = 1.0 - BETA2.powi(state.step);
    let update = (&m / bias1) / ((&v / bias2).sqrt() + EPS) * -lr;
    let _ = embedding.index_add_(0, rows, &update);
}

#[cfg(test)]
mod tests {
    use super::*;
    use fl_common::{ModelKind, ModelSpec, TensorSet};
    use tch::Device;

    fn data(model: &Classifier) -> EncodedDataset {
        let texts: Vec<String> = (0..48)
            .map(|i| match i % 3 {
                0 => format!("football match goal {i} team score"),
                1 => format!("election vote parliament {i} minister"),
                _ => format!("stock market shares {i} bank profit"),
            })
            .collect();
        let labels = (0..48).map(|i| i % 3).collect();
        EncodedDataset::encode(model, &texts, labels)
    }

    fn start(kind: ModelKind) -> Classifier {
        let mut spec = ModelSpec::with_defaults(kind, vec!["sport".into(), "politics".into(), "business".into()]);
        spec.buckets = 512;
        Classifier::new(spec, Device::Cpu, 5).unwrap()
    }

    fn config(mu: f64) -> TrainConfig {
        TrainConfig { epochs: 2, batch_size: 8, lr: 0.05, optimizer: OptimizerKind::Adam, seed: 11, proximal_mu: mu }
    }

    /// Trains a copy of `initial` (weights of `spec`); `force_proximal` runs the proximal term
    /// even at μ 0.
    fn trained(spec: &ModelSpec, initial: &TensorSet, mu: f64, force_proximal: bool) -> TensorSet {
        let model = Classifier::from_tensors(spec.clone(), initial, Device::Cpu).unwrap();
        let data = data(&model);
        let config = config(mu);
        let mut trainer = Trainer::new(&model, &config).with_proximal(&model, mu, mu > 0.0 || force_proximal);
        let cancel = CancellationToken::new();
        for _ in 0..config.epochs {
            trainer.epoch(&model, &data, &cancel, |_| {});
        }
        model.to_tensors()
    }

    fn distance(a: &TensorSet, b: &TensorSet) -> f64 {
        a.minus(b).l2_norm()
    }

    #[test]
    fn proximal_term_with_mu_0_trains_the_same_weights_and_mu_pulls_towards_the_start() {
        tch::set_num_threads(1);
        for kind in [ModelKind::Fasttext, ModelKind::Bilstm, ModelKind::Transformer] {
            // One set of initial weights and no dropout: libtorch's generator is global, and
            // tests running beside this one draw from it too.
            let first = start(kind);
            let mut spec = first.spec.clone();
            spec.dropout = 0.0;
            let before = first.to_tensors();
            let plain = trained(&spec, &before, 0.0, false);
            let zero = trained(&spec, &before, 0.0, true);
            assert_eq!(plain, zero, "{kind}: the proximal term with μ 0 changes nothing");
            let prox = trained(&spec, &before, 1.0, false);
            let (moved_plain, moved_prox) = (distance(&plain, &before), distance(&prox, &before));
            assert!(moved_plain > 0.0, "{kind}: training moved the weights");
            assert!(
                moved_prox < 0.9 * moved_plain,
                "{kind}: μ 1 keeps the weights nearer the start ({moved_prox} vs {moved_plain})"
            );
        }
    }

    #[test]
    fn train_with_mu_0_equals_plain_training() {
        tch::set_num_threads(1);
        // One set of initial weights: libtorch's generator is global, and tests running beside
        // this one draw from it too.
        let first = start(ModelKind::Fasttext);
        let (spec, initial) = (first.spec.clone(), first.to_tensors());
        let run = |mu: f64| {
            let mut model = Classifier::from_tensors(spec.clone(), &initial, Device::Cpu).unwrap();
            let data = data(&model);
            train(&mut model, &data, &config(mu), &CancellationToken::new(), |_, _| {});
            model.to_tensors()
        };
        let plain = run(0.0);
        assert_eq!(plain, run(0.0), "training is deterministic for a seed");
        assert_ne!(plain, run(0.5), "a positive μ reaches the trainer");
    }

    #[test]
    fn train_with_a_teacher_at_t_1_and_alpha_1_is_train_and_alpha_0_follows_the_teacher() {
        tch::set_num_threads(1);
        let first = start(ModelKind::Fasttext);
        let (spec, initial) = (first.spec.clone(), first.to_tensors());
        let run = |distillation: Option<Distillation>| {
            let mut model = Classifier::from_tensors(spec.clone(), &initial, Device::Cpu).unwrap();
            let mut data = data(&model);
            // A teacher that is sure of the class after each example's own: every soft target
            // disagrees with the label.
            data.soft = Some(
                data.labels
                    .iter()
                    .map(|&l| (0..3).map(|c| if c == (l + 1) % 3 { 0.98 } else { 0.01 }).collect())
                    .collect(),
            );
            train_with(&mut model, &data, &config(0.0), distillation, &CancellationToken::new(), |_, _| {});
            let agree = |target: &dyn Fn(i64) -> i64| {
                let (accuracy, _) =
                    model.evaluate(&data.docs, &data.labels.iter().map(|&l| target(l)).collect::<Vec<_>>());
                accuracy
            };
            (model.to_tensors(), agree(&|l| l), agree(&|l| (l + 1) % 3))
        };
        let (plain, labels_acc, _) = run(None);
        let (hard, ..) = run(Some(Distillation { temperature: 1.0, alpha: 1.0 }));
        assert!(max_abs_diff(&plain, &hard) < 1e-6, "T 1 and alpha 1 is training on the labels");
        let (_, on_labels, on_teacher) = run(Some(Distillation { temperature: 2.0, alpha: 0.0 }));
        assert!(labels_acc > 0.9, "the labels are learnt: {labels_acc}");
        assert!(on_teacher > 0.9 && on_labels < 0.1, "alpha 0 follows the teacher: {on_teacher} vs labels {on_labels}");
    }

    #[test]
    fn a_restarted_trainer_trains_the_same_weights_as_a_new_one_in_its_allocations() {
        tch::set_num_threads(1);
        // No dropout: libtorch's generator is global, and tests running beside this one draw from it.
        let first = start(ModelKind::Fasttext);
        let mut spec = first.spec.clone();
        spec.dropout = 0.0;
        let initial = first.to_tensors();
        let cancel = CancellationToken::new();
        let sgd = TrainConfig { optimizer: OptimizerKind::Sgd, ..config(0.0) };
        // Round 2's settings after round 1's: the same, FedProx on, a new seed, SGD, and back to Adam.
        let rounds = [
            (config(0.0), config(0.0)),
            (config(0.0), config(0.5)),
            (config(0.5), TrainConfig { seed: 12, ..config(0.5) }),
            (config(0.0), sgd.clone()),
            (sgd, config(0.0)),
        ];
        for (one, two) in rounds {
            let mut model = Classifier::from_tensors(spec.clone(), &initial, Device::Cpu).unwrap();
            let data = data(&model);
            let mut slot = None;
            train_in(&mut slot, &mut model, &data, &one, None, &cancel, |_, _| {});
            // Round 2 starts from other weights, copied into the same model.
            let global = model.to_tensors().minus(&initial);
            model.load_tensors(&global).unwrap();
            let moments = slot.as_ref().unwrap().row_adam.as_ref().map(|s| s.m.data_ptr());
            train_in(&mut slot, &mut model, &data, &two, None, &cancel, |_, _| {});
            let reused = model.to_tensors();
            if two.optimizer == OptimizerKind::Adam && one.optimizer == OptimizerKind::Adam {
                let after = slot.as_ref().unwrap().row_adam.as_ref().map(|s| s.m.data_ptr());
                assert_eq!(after, moments, "the row-wise moments keep their allocation");
            }

            let mut fresh = Classifier::from_tensors(spec.clone(), &global, Device::Cpu).unwrap();
            train(&mut fresh, &data, &two, &cancel, |_, _| {});
            assert_eq!(reused, fresh.to_tensors(), "{one:?} then {two:?}: bit-identical to a new trainer");
        }
    }

    fn max_abs_diff(a: &TensorSet, b: &TensorSet) -> f32 {
        a.minus(b).tensors.iter().flat_map(|t| t.data.iter().map(|v| v.abs())).fold(0.0, f32::max)
    }
}
