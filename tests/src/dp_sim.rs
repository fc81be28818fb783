//! A federation in one process for the DP benchmark and the attacker test: the real trainer
//! (`fl_model::train`), the real aggregation strategies (`FedAvg`, `DpFedAvg`) and the real
//! accountant, without the network. Clients are the `shard-*.csv` files of `fl-client gen-data`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use fl_common::{ModelKind, ModelSpec, TensorSet};
use fl_model::data::read_labelled_csv;
use fl_model::model::Classifier;
use fl_model::train::{train, EncodedDataset, OptimizerKind, TrainConfig};
use fl_server::aggregation::{AggregationStrategy, ClientUpdate, FedAvg};
use fl_server::dp::accountant::RdpAccountant;
use fl_server::dp::{DpConfig, DpFedAvg};
use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::SeedableRng;
use tokio_util::sync::CancellationToken;

/// One simulated federation.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// A `gen-data` directory: `shard-*.csv` (one per client) and `eval.csv`.
    pub data_dir: PathBuf,
    /// Rounds to run.
    pub rounds: u32,
    /// Clients sampled per round, uniformly without replacement.
    pub clients_per_round: usize,
    /// DP, or plain FedAvg (weighted by example counts) when `None`.
    pub dp: Option<DpConfig>,
    /// Local training of each sampled client.
    pub local: TrainConfig,
    /// Embedding buckets of the fastText model.
    pub buckets: u32,
    /// Embedding width of the fastText model.
    pub embed_dim: u32,
    /// Seed of the initial model and of the sampling.
    pub seed: u64,
    /// Where to write each round's model file (`round-N.safetensors`), if anywhere.
    pub save_models: Option<PathBuf>,
}

impl SimConfig {
    /// Defaults for `data_dir`: 20 rounds of 10 clients, one local epoch of Adam at 0.05.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        SimConfig {
            data_dir: data_dir.into(),
            rounds: 20,
            clients_per_round: 10,
            dp: None,
            local: TrainConfig {
                epochs: 1,
                batch_size: 32,
                lr: 0.05,
                optimizer: OptimizerKind::Adam,
                seed: 0,
                proximal_mu: 0.0,
            },
            buckets: 65_536,
            embed_dim: 64,
            seed: 1,
            save_models: None,
        }
    }
}

/// What one round gave, as a `metrics.jsonl` line would say it.
#[derive(Clone, Debug, PartialEq)]
pub struct SimRound {
    /// Round number, from 1.
    pub round: u32,
    /// Accuracy on `eval.csv`.
    pub accuracy: f64,
    /// ε after this round; `None` without DP.
    pub epsilon: Option<f64>,
    /// δ of the guarantee.
    pub delta: Option<f64>,
    /// The clip norm used this round.
    pub clip_norm: Option<f64>,
    /// The clients sampled this round (indices of the shards, from 0).
    pub sampled: Vec<usize>,
}

/// A client: its shard's rows, tokenized.
struct SimClient {
    data: EncodedDataset,
}

/// Shards in numeric order: shard-1.csv, shard-2.csv, ...
fn shard_paths(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut shards: Vec<(u32, PathBuf)> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| {
            let n = p.file_name()?.to_str()?.strip_prefix("shard-")?.strip_suffix(".csv")?.parse().ok()?;
            Some((n, p))
        })
        .collect();
    shards.sort();
    anyhow::ensure!(!shards.is_empty(), "no shard-*.csv in {}", dir.display());
    Ok(shards.into_iter().map(|(_, p)| p).collect())
}

/// The model spec of the federation: fastText with the eval set's labels.
pub fn sim_spec(config: &SimConfig) -> Result<ModelSpec> {
    let eval = read_labelled_csv(&config.data_dir.join("eval.csv"))?;
    let mut labels = eval.distinct_labels();
    labels.sort_by_key(|l| fl_model::datagen::TOPICS.iter().position(|t| t == l).unwrap_or(usize::MAX));
    let mut spec = ModelSpec::with_defaults(ModelKind::Fasttext, labels);
    spec.buckets = config.buckets;
    spec.embed_dim = config.embed_dim;
    Ok(spec)
}

/// The embedding rows that a client's texts touch (the attacker's ground truth).
pub fn client_rows(spec: &ModelSpec, shard: &Path) -> Result<std::collections::BTreeSet<i64>> {
    let rows = read_labelled_csv(shard)?;
    let probe = Classifier::new(spec.clone(), tch::Device::Cpu, 0)?;
    Ok(rows.texts.iter().flat_map(|t| probe.token_ids(t)).collect())
}

/// Runs the federation and returns one line per round.
pub fn run(config: &SimConfig) -> Result<Vec<SimRound>> {
    let spec = sim_spec(config)?;
    let probe = Classifier::new(spec.clone(), tch::Device::Cpu, config.seed)?;
    let clients = shard_paths(&config.data_dir)?
        .iter()
        .map(|path| {
            let rows = read_labelled_csv(path)?;
            let labels = rows.label_indices(&spec.labels)?;
            Ok(SimClient { data: EncodedDataset::encode(&probe, &rows.texts, labels) })
        })
        .collect::<Result<Vec<_>>>()?;
    let eval = fl_model::evaluate::EvalSet::load(&config.data_dir.join("eval.csv"), &spec)?;
    let n = clients.len();
    let m = config.clients_per_round.min(n);
    let mut dp_strategy = config.dp.as_ref().map(|dp| DpFedAvg::new(dp, dp.clip_norm, m)).transpose()?;
    let mut fedavg = FedAvg::default();
    let mut accountant = RdpAccountant::new();
    let mut global: TensorSet = probe.to_tensors();
    let mut sampler = StdRng::seed_from_u64(config.seed);
    let cancel = CancellationToken::new();
    let mut out = Vec::new();
    if let Some(dir) = &config.save_models {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("round-0.safetensors"), fl_common::encode_model(&spec, &global))?;
    }
    for round in 1..=config.rounds {
        let sampled: Vec<usize> = sample(&mut sampler, n, m).into_vec();
        let clip_norm = dp_strategy.as_ref().map(DpFedAvg::clip_norm);
        let strategy: &mut dyn AggregationStrategy = match &mut dp_strategy {
            Some(dp) => dp,
            None => &mut fedavg,
        };
        strategy.begin_round(&global);
        for (k, &c) in sampled.iter().enumerate() {
            let mut model = Classifier::from_tensors(spec.clone(), &global, tch::Device::Cpu)?;
            let local = TrainConfig { seed: config.seed ^ (u64::from(round) << 20) ^ k as u64, ..config.local.clone() };
            train(&mut model, &clients[c].data, &local, &cancel, |_, _| {});
            let delta = model.to_tensors().minus(&global);
            strategy.fold(ClientUpdate { delta: &delta, num_examples: clients[c].data.len() as u64 });
        }
        global = strategy.finish(&global).context("a round with no update")?;
        let (epsilon, delta) = match &config.dp {
            Some(dp) => {
                accountant.compose(m as f64 / n as f64, dp.noise_multiplier, 1);
                let delta = dp.delta_for(n);
                (Some(accountant.epsilon(delta)), Some(delta))
            }
            None => (None, None),
        };
        let (accuracy, _loss) = eval.evaluate(&global)?;
        if let Some(dir) = &config.save_models {
            std::fs::write(dir.join(format!("round-{round}.safetensors")), fl_common::encode_model(&spec, &global))?;
        }
        out.push(SimRound { round, accuracy, epsilon, delta, clip_norm, sampled });
    }
    Ok(out)
}
