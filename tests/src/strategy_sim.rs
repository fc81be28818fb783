//! A small federation in one process for the strategy tests and the strategy benchmark: the real
//! trainer (`fl_model::train`), the real strategy objects of fl-server (through
//! [`StrategyRuntime`], so the server optimiser's state is committed as the engine commits it)
//! and the real attacks of fl-client, without the network. Every client trains every round.

use std::path::Path;

use anyhow::{Context, Result};
use fl_client::attack::Attack;
use fl_common::{ModelKind, ModelSpec, TensorSet};
use fl_model::datagen::{partition, Partition, Row, TextGenerator};
use fl_model::model::Classifier;
use fl_model::train::{train, EncodedDataset, TrainConfig};
use fl_server::aggregation::{ClientUpdate, StrategyConfig, StrategyRuntime};
use rand::SeedableRng;
use tokio_util::sync::CancellationToken;

/// The clients' data and the evaluation set of a simulated federation.
#[derive(Debug)]
pub struct Population {
    /// The fastText spec every client trains.
    pub spec: ModelSpec,
    clients: Vec<EncodedDataset>,
    eval: EncodedDataset,
}

impl Population {
    /// `rows` generated training rows dealt to `clients` clients by `how`, and `eval_rows`
    /// evaluation rows, for a fastText model with `buckets` × `embed_dim` embeddings.
    pub fn generate(
        generator: &TextGenerator,
        rows: usize,
        eval_rows: usize,
        clients: usize,
        how: Partition,
        buckets: u32,
        embed_dim: u32,
    ) -> Result<Population> {
        let labels = generator.labels();
        let mut spec = ModelSpec::with_defaults(ModelKind::Fasttext, labels.clone());
        spec.buckets = buckets;
        spec.embed_dim = embed_dim;
        let probe = Classifier::new(spec.clone(), tch::Device::Cpu, 0)?;
        let encode = |rows: &[Row]| {
            let texts: Vec<String> = rows.iter().map(|r| r.text.clone()).collect();
            let labels = rows.iter().map(|r| r.label as i64).collect();
            EncodedDataset::encode(&probe, &texts, labels)
        };
        let shards = partition(&generator.rows(rows, 1), clients, how, labels.len(), 3)?;
        anyhow::ensure!(shards.iter().all(|s| !s.is_empty()), "a client got no rows: give more rows");
        let clients = shards.iter().map(|s| encode(s)).collect();
        Ok(Population { eval: encode(&generator.rows(eval_rows, 2)), spec, clients })
    }

    /// Number of clients.
    pub fn len(&self) -> usize {
        self.clients.len()
    }

    /// True without clients.
    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    /// The L2 norm of client `client`'s update when it trains `weights` with `local`: what an
    /// operator measures on a clean round to choose norm bounding's B.
    pub fn update_norm(&self, client: usize, weights: &TensorSet, local: &TrainConfig) -> Result<f64> {
        let mut model = Classifier::from_tensors(self.spec.clone(), weights, tch::Device::Cpu)?;
        train(&mut model, &self.clients[client], local, &CancellationToken::new(), |_, _| {});
        Ok(model.to_tensors().minus(weights).l2_norm())
    }

    /// The initial weights of a simulated federation with `seed` (as [`run`] starts from).
    pub fn initial_weights(&self, seed: u64) -> Result<TensorSet> {
        Ok(Classifier::new(self.spec.clone(), tch::Device::Cpu, seed)?.to_tensors())
    }

    /// Accuracy and loss of `weights` on the evaluation set.
    pub fn evaluate(&self, weights: &TensorSet) -> Result<(f64, f64)> {
        let model = Classifier::from_tensors(self.spec.clone(), weights, tch::Device::Cpu)?;
        Ok(model.evaluate(&self.eval.docs, &self.eval.labels))
    }
}

/// One simulated federation.
#[derive(Debug, Clone)]
pub struct SimRun<'a> {
    /// The strategy, as `serve --strategy` resolves it.
    pub strategy: StrategyConfig,
    /// Rounds.
    pub rounds: u32,
    /// Local training (its `proximal_mu` is set from the strategy).
    pub local: TrainConfig,
    /// Attacking clients (indices) and their attack.
    pub attackers: &'a [(usize, Attack)],
    /// Seed of the initial model.
    pub seed: u64,
}

/// Runs `run` on `population`, spooling in `state_dir` (as a coordinator's state dir); returns
/// the evaluation accuracy after each round.
pub fn run(population: &Population, run: &SimRun<'_>, state_dir: &Path) -> Result<Vec<f64>> {
    std::fs::create_dir_all(state_dir)?;
    let runtime = StrategyRuntime::open(run.strategy.clone(), state_dir, 0)?;
    let mut global = population.initial_weights(run.seed)?;
    let cancel = CancellationToken::new();
    let mut noise = rand::rngs::StdRng::seed_from_u64(run.seed);
    let mut accuracy = Vec::new();
    for round in 1..=run.rounds {
        let mut strategy = runtime.attempt_strategy(None);
        strategy.begin_round(&global);
        for (k, data) in population.clients.iter().enumerate() {
            let mut model = Classifier::from_tensors(population.spec.clone(), &global, tch::Device::Cpu)?;
            let local = TrainConfig {
                seed: run.seed ^ (u64::from(round) << 20) ^ k as u64,
                proximal_mu: run.strategy.proximal_mu,
                ..run.local.clone()
            };
            train(&mut model, data, &local, &cancel, |_, _| {});
            let mut delta = model.to_tensors().minus(&global);
            if let Some((_, attack)) = run.attackers.iter().find(|(c, _)| *c == k) {
                attack.apply(&mut delta, &mut noise);
            }
            strategy.try_fold(ClientUpdate { delta: &delta, num_examples: data.len() as u64 })?;
        }
        global = strategy.try_finish(&global)?.context("a round without updates")?;
        if let Some(state) = strategy.server_state() {
            runtime.advance(state.clone());
            runtime.save_state(round, state)?;
            runtime.committed(round);
        }
        accuracy.push(population.evaluate(&global)?.0);
    }
    Ok(accuracy)
}
