//! `fl-sim`: a federation of virtual clients in one process, to try a strategy, a client count,
//! a non-IID split or a DP noise level before deploying.
//!
//! The coordinator side is the real one: [`fl_server::prepare_in_process`] creates or opens the
//! state directory exactly as `serve` does, and [`fl_server::coordinator::InProcessFederation`]
//! opens, folds and commits each round through the engine's own functions (strategies, codecs,
//! DP, evaluation, checkpoints, `metrics.jsonl`). The client side is the real trainer of
//! `fl-model`. Only the network is left out.
//!
//! Memory stays flat in the number of clients: the training rows are loaded and tokenized once,
//! a client's shard is a list of row indices into them, and a round trains its sampled clients a
//! few at a time on `--threads` workers (libtorch on one thread each), folding each encoded
//! update into the running sum as it comes, in client order. Nothing per client outlives its
//! turn but a line of `clients.jsonl`.
//!
//! Deterministic: client `k` of round `r` trains with a seed drawn from (seed, r, k), the sample
//! of each round is drawn from (seed, r), and updates are folded in client order, so the final
//! weights are bit-identical whatever `--threads` is (for models without dropout: libtorch's
//! dropout generator is global to the process).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result};
use fl_common::attack::Attack;
use fl_common::cli::{parse, Permanent};
use fl_common::TensorSet;
use fl_model::model::Classifier;
use fl_model::partition::{partition_indices, Partition};
use fl_model::train::{train, EncodedDataset, TrainConfig};
use fl_server::coordinator::{Opened, RoundTask, UpdateHeader};
use fl_server::{RoundSchedule, ServeConfig};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use tokio_util::sync::CancellationToken;

/// How `--data` is dealt to the clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PartitionKind {
    /// Shuffled and dealt evenly.
    Iid,
    /// Per label, shares from a Dirichlet(`--alpha`) draw.
    Dirichlet,
    /// `--classes-per-client` labels per client.
    Pathological,
    /// One client per value of `--partition-column`.
    Column,
}

/// `--attack FRACTION:KIND`: this fraction of the clients poison every update they send.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttackSpec {
    /// Fraction of the clients that attack, in (0, 1].
    pub fraction: f64,
    /// How they attack.
    pub attack: Attack,
}

impl std::str::FromStr for AttackSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<AttackSpec, String> {
        let usage = "expected FRACTION:KIND, e.g. 0.2:sign-flip:5 (KIND: sign-flip:SCALE, scale:FACTOR, noise:STD)";
        let (fraction, kind) = s.split_once(':').ok_or_else(|| format!("--attack {s}: {usage}"))?;
        let fraction: f64 =
            fraction.parse().map_err(|_| format!("--attack {s}: '{fraction}' is not a number; {usage}"))?;
        if !(fraction > 0.0 && fraction <= 1.0) {
            return Err(format!("--attack {s}: the fraction must be in (0, 1]; {usage}"));
        }
        let attack = kind.parse::<Attack>().map_err(|e| e.to_string())?;
        Ok(AttackSpec { fraction, attack })
    }
}

/// The flags of `fl-sim`: the simulation's own, then the model, training, strategy, codec, DP
/// and long-run flags of `fl-coordinator serve` (the same argument structs where serve has them).
#[derive(clap::Parser, Debug, Clone)]
#[command(name = "fl-sim", version, about = "Simulate a federation of virtual clients in one process")]
pub struct SimArgs {
    /// State directory, as `serve`'s: metrics.jsonl, model/, plus clients.jsonl.
    #[arg(long, env = "FL_STATE_DIR")]
    pub state_dir: PathBuf,
    /// Labelled CSV (`text,label`) dealt to the virtual clients.
    #[arg(long)]
    pub data: PathBuf,
    /// Labelled CSV for centralized evaluation after each round.
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Virtual clients (not with --partition column, which makes one per value).
    #[arg(long, value_parser = parse::int_in(1usize, 1_000_000))]
    pub clients: Option<usize>,
    /// Clients sampled per round (0: all).
    #[arg(long, default_value_t = 0, value_parser = parse::int_in(0usize, 1_000_000))]
    pub clients_per_round: usize,
    /// Fewest folded updates that make a round [default: the clients sampled].
    #[arg(long, value_parser = parse::int_in(1usize, 1_000_000))]
    pub min_clients: Option<usize>,
    /// Rounds.
    #[arg(long, default_value_t = 10, value_parser = parse::int_in(1u32, 1_000_000))]
    pub rounds: u32,
    /// How --data is dealt to the clients.
    #[arg(long, value_enum, default_value_t = PartitionKind::Iid)]
    pub partition: PartitionKind,
    /// Dirichlet concentration of --partition dirichlet (smaller is more skewed: 0.1 .. 100).
    #[arg(long, default_value_t = 0.5, value_parser = parse::positive(1e6))]
    pub alpha: f64,
    /// Labels per client of --partition pathological.
    #[arg(long, default_value_t = 2, value_parser = parse::int_in(1usize, 10_000))]
    pub classes_per_client: usize,
    /// The CSV column (a user or site id) of --partition column.
    #[arg(long)]
    pub partition_column: Option<String>,
    /// Fewest rows per client of --partition dirichlet (redrawn until every client has them).
    #[arg(long, default_value_t = 1, value_parser = parse::int_in(0usize, 1_000_000))]
    pub min_shard_size: usize,
    /// Seed of the partition, the initial model, the sampling and the clients' training.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Clients trained at once (libtorch uses one thread each) [default: the cores].
    #[arg(long, value_parser = parse::int_in(1usize, 1024))]
    pub threads: Option<usize>,
    /// Poisoning clients: FRACTION:KIND, e.g. 0.2:sign-flip:5 (see `fl-client run --attack`).
    #[arg(long)]
    pub attack: Option<AttackSpec>,
    #[command(flatten)]
    pub training: fl_server::TrainingArgs,
    #[command(flatten)]
    pub dp: fl_server::dp::DpArgs,
    #[command(flatten)]
    pub strategy: fl_server::aggregation::StrategyArgs,
    #[command(flatten)]
    pub long_run: fl_server::long_run::LongRunArgs,
    /// No progress bar (it is drawn only on a terminal anyway).
    #[arg(long)]
    pub quiet: bool,
}

/// One line of `clients.jsonl`: what a virtual client did in a round.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ClientLine {
    /// Round.
    pub round: u32,
    /// Client id.
    pub client: String,
    /// Rows it trained on.
    pub examples: usize,
    /// Mean training loss of its last local epoch.
    pub loss: f64,
    /// Accuracy on its own data during its last local epoch.
    pub accuracy: f64,
    /// Whether it poisoned its update (`--attack`).
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub attacker: bool,
    /// Why the coordinator refused its update, or why its training failed.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub refused: Option<String>,
}

/// What a simulation ends with.
#[derive(Clone, Debug)]
pub struct SimOutcome {
    /// Rounds committed in the state directory.
    pub completed_rounds: u32,
    /// [`fl_common::codec::tensor_digest`] of the final global weights.
    pub final_digest: String,
    /// Rows per client, in client order.
    pub shard_sizes: Vec<usize>,
}

/// A virtual client: its id and its rows in the loaded dataset.
#[derive(Debug)]
struct VirtualClient {
    id: String,
    rows: Vec<usize>,
    attack: Option<Attack>,
}

/// Salts the seeds of the attackers' choice and noise, apart from the training seeds.
const ATTACK_SALT: u64 = 0x00A7_7AC4;

/// Mixes seeds (SplitMix64's finaliser): distinct inputs give unrelated seeds.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The seed of client `k` in round `round`.
pub fn client_seed(seed: u64, round: u32, client: usize) -> u64 {
    mix(mix(mix(seed) ^ u64::from(round)) ^ client as u64)
}

impl SimArgs {
    /// The `serve` configuration these flags make.
    fn serve_config(&self, clients_per_round: usize) -> ServeConfig {
        ServeConfig {
            state_dir: self.state_dir.clone(),
            model: self.training.model_args(),
            eval_data: self.eval_data.clone(),
            settings: self.training.round_settings(RoundSchedule {
                rounds: self.rounds,
                min_clients: self.min_clients.unwrap_or(clients_per_round),
                clients_per_round,
                over_sample: 1.0,
                round_timeout: Duration::from_secs(86_400),
                seed: self.seed,
                max_failed_attempts: 1,
                long_run: self.long_run.clone(),
            }),
            tls_sans: vec!["localhost".into()],
            seed: self.seed,
            init_model: None,
            spool: None,
            dashboard: None,
            dp: self.dp.clone(),
            secagg: Default::default(),
            strategy: self.strategy.clone(),
            distill: Default::default(),
            compression: Vec::new(),
        }
    }
}

/// Runs the simulation of `args` to its end (or until `cancel`); writes the state directory.
pub fn run(args: &SimArgs, cancel: &CancellationToken) -> Result<SimOutcome> {
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let rows = fl_model::data::read_labelled_csv(&args.data)?;
    // Labels: --labels, else --eval-data's (as serve), else --data's.
    let labels = match (&args.training.labels, &args.eval_data) {
        (Some(l), _) => l.clone(),
        (None, Some(path)) => fl_model::data::read_labelled_csv(path)?.distinct_labels(),
        (None, None) => rows.distinct_labels(),
    };
    let label_idx = rows.label_indices(&labels)?;
    let how = match args.partition {
        PartitionKind::Iid => Partition::Iid,
        PartitionKind::Dirichlet => Partition::Dirichlet(args.alpha),
        PartitionKind::Pathological => Partition::Pathological(args.classes_per_client),
        PartitionKind::Column => {
            let column = args
                .partition_column
                .as_deref()
                .ok_or_else(|| Permanent::error("--partition column needs --partition-column NAME"))?;
            if args.clients.is_some() {
                return Err(Permanent::error(
                    "--clients does not go with --partition column: there is one client per value of the column",
                ));
            }
            Partition::Natural(fl_model::partition::read_column(&args.data, column).map_err(Permanent::error)?)
        }
    };
    if args.partition != PartitionKind::Column && args.partition_column.is_some() {
        return Err(Permanent::error("--partition-column goes with --partition column only"));
    }
    let n = match (&how, args.clients) {
        (Partition::Natural(_), _) => 0,
        (_, Some(n)) => n,
        (_, None) => return Err(Permanent::error("--clients N is required (but with --partition column)")),
    };
    let labels_usize: Vec<usize> = label_idx.iter().map(|&l| l as usize).collect();
    let shards = partition_indices(&labels_usize, labels.len(), n, &how, args.min_shard_size, args.seed)
        .map_err(Permanent::error)?;
    if let Some(empty) = shards.iter().position(Vec::is_empty) {
        return Err(Permanent::error(format!(
            "client {} got no rows of {}: give more rows, fewer --clients, or --min-shard-size 1",
            empty + 1,
            args.data.display()
        )));
    }
    let n = shards.len();
    let width = n.to_string().len().max(4);
    let mut attackers = vec![false; n];
    if let Some(spec) = &args.attack {
        let count = ((spec.fraction * n as f64).round() as usize).clamp(1, n);
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(mix(args.seed ^ ATTACK_SALT)));
        for &k in &order[..count] {
            attackers[k] = true;
        }
    }
    let clients: Vec<VirtualClient> = shards
        .into_iter()
        .enumerate()
        .map(|(k, rows)| VirtualClient {
            id: format!("sim-{:0width$}", k + 1),
            rows,
            attack: attackers[k].then(|| args.attack.map(|a| a.attack)).flatten(),
        })
        .collect();
    let shard_sizes: Vec<usize> = clients.iter().map(|c| c.rows.len()).collect();
    let per_round = if args.clients_per_round == 0 { n } else { args.clients_per_round.min(n) };
    let ids: Vec<String> = clients.iter().map(|c| c.id.clone()).collect();

    let _lock = fl_common::files::DirLock::acquire(&args.state_dir, "fl-sim")?;
    let mut config = args.serve_config(per_round);
    config.model.labels = Some(labels.clone());
    let fed = fl_server::prepare_in_process(&config, &fl_coordinator::backend::TorchBackend, &ids)?;
    let spec = fed.spec().clone();
    if threads > 1 && spec.dropout > 0.0 {
        tracing::warn!(
            threads,
            dropout = spec.dropout,
            "libtorch's dropout generator is global to the process: with --threads above 1 a rerun may differ slightly (--threads 1 is bit-exact)"
        );
    }
    // One tokenization of every row; a client's data is gathered from it for its turn only.
    let probe = Classifier::new(spec.clone(), tch::Device::Cpu, 0)?;
    let encoded = EncodedDataset::encode(&probe, &rows.texts, label_idx);
    drop(probe);
    drop(rows);

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let clients_path = args.state_dir.join("clients.jsonl");
    let mut clients_log = std::io::BufWriter::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&clients_path)
            .with_context(|| format!("opening {}", clients_path.display()))?,
    );
    let first = fed.completed_rounds() + 1;
    let todo = u64::from(args.rounds.saturating_sub(first - 1)) * per_round as u64;
    let bar = if args.quiet { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(todo) };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} round {msg} [{bar:30}] {pos}/{len} client updates ({eta})")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    let codec = fed.update_codec();
    while !fed.is_over() {
        if cancel.is_cancelled() {
            break;
        }
        let round = fed.completed_rounds() + 1;
        bar.set_message(format!("{round}/{}", args.rounds));
        // The sample of a round depends on (seed, round) only; updates fold in client order.
        let mut rng = rand::rngs::StdRng::seed_from_u64(mix(args.seed ^ mix(u64::from(round))));
        let size = fl_server::policy::sample_size(n, per_round, 1, 1.0);
        let mut sampled: Vec<usize> = fl_server::policy::sample(ids.clone(), size, &mut rng)
            .iter()
            .map(|id| ids.binary_search(id).expect("an id"))
            .collect();
        sampled.sort_unstable();
        let task = match fed.open_round(round, sampled.iter().map(|&k| ids[k].clone()).collect()) {
            Opened::Round(task) => task,
            Opened::BudgetExhausted => break,
        };
        let global = fed.global();
        // Trains a few clients at a time (bounded memory), folds them in client order.
        for chunk in sampled.chunks(threads * 4) {
            let results = train_chunk(
                chunk,
                &clients,
                &encoded,
                &spec,
                &global.tensors,
                &task,
                codec,
                args.seed,
                threads,
                cancel,
            )?;
            for (k, result) in chunk.iter().zip(results) {
                let client = &clients[*k];
                let line = match result {
                    Ok(trained) => {
                        let header = UpdateHeader {
                            round,
                            attempt: task.attempt,
                            codec: codec.name().to_string(),
                            total_bytes: trained.payload.len() as u64,
                            num_examples: client.rows.len() as u64,
                            train_loss: trained.loss,
                            train_accuracy: trained.accuracy,
                            train_s: trained.train_s,
                            local_eval: None,
                            distilled: false,
                        };
                        let refused = runtime.block_on(fed.submit(&client.id, header, &trained.payload)).err();
                        ClientLine {
                            round,
                            client: client.id.clone(),
                            examples: client.rows.len(),
                            loss: trained.loss,
                            accuracy: trained.accuracy,
                            attacker: client.attack.is_some(),
                            refused: refused.map(|r| r.to_string()),
                        }
                    }
                    Err(why) => {
                        fed.training_failed(&client.id, round, &why);
                        ClientLine {
                            round,
                            client: client.id.clone(),
                            examples: client.rows.len(),
                            loss: f64::NAN,
                            accuracy: f64::NAN,
                            attacker: client.attack.is_some(),
                            refused: Some(why),
                        }
                    }
                };
                writeln!(clients_log, "{}", serde_json::to_string(&line)?)?;
                bar.inc(1);
            }
        }
        if cancel.is_cancelled() {
            break;
        }
        clients_log.flush()?;
        bar.suspend(|| runtime.block_on(fed.commit()))?;
    }
    clients_log.flush()?;
    bar.finish_and_clear();
    if fed.is_over() {
        runtime.block_on(fed.finish())?;
    }
    let completed_rounds = fed.completed_rounds();
    Ok(SimOutcome { completed_rounds, final_digest: fed.global().digest.clone(), shard_sizes })
}

/// A client's encoded update and what its training reported.
#[derive(Debug)]
struct Trained {
    payload: Vec<u8>,
    loss: f64,
    accuracy: f64,
    train_s: f64,
}

/// Trains the clients of `chunk` on `threads` workers; the results come back in chunk order.
#[allow(clippy::too_many_arguments)]
fn train_chunk(
    chunk: &[usize],
    clients: &[VirtualClient],
    data: &EncodedDataset,
    spec: &fl_common::ModelSpec,
    global: &TensorSet,
    task: &RoundTask,
    codec: fl_common::codec::UpdateCodec,
    seed: u64,
    threads: usize,
    cancel: &CancellationToken,
) -> Result<Vec<Result<Trained, String>>> {
    let next = AtomicUsize::new(0);
    let results: Mutex<BTreeMap<usize, Result<Trained, String>>> = Mutex::new(BTreeMap::new());
    let failure: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..threads.min(chunk.len()) {
            scope.spawn(|| {
                // libtorch's thread count is per OS thread: one each, the workers are the parallelism.
                tch::set_num_threads(1);
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(&k) = chunk.get(i) else { return };
                    match train_client(k, &clients[k], data, spec, global, task, codec, seed, cancel) {
                        Ok(result) => {
                            results.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(i, result);
                        }
                        Err(e) => {
                            *failure.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(e);
                            return;
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = failure.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner) {
        return Err(e);
    }
    let results = results.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
    anyhow::ensure!(results.len() == chunk.len() || cancel.is_cancelled(), "a training worker stopped early");
    Ok(results.into_values().collect())
}

/// Trains client `k` from `global` as the daemon does: the task's local training, DP clipping
/// when the task asks for it, the attack if it is an attacker, then the codec. `Err(reason)`
/// is a training failure the coordinator is told of; the outer error is a bug or I/O.
#[allow(clippy::too_many_arguments)]
fn train_client(
    k: usize,
    client: &VirtualClient,
    data: &EncodedDataset,
    spec: &fl_common::ModelSpec,
    global: &TensorSet,
    task: &RoundTask,
    codec: fl_common::codec::UpdateCodec,
    seed: u64,
    cancel: &CancellationToken,
) -> Result<Result<Trained, String>> {
    let started = std::time::Instant::now();
    let local = EncodedDataset {
        docs: client.rows.iter().map(|&r| data.docs[r].clone()).collect(),
        labels: client.rows.iter().map(|&r| data.labels[r]).collect(),
        soft: None,
    };
    let config = TrainConfig {
        epochs: task.local_epochs,
        batch_size: task.batch_size,
        lr: f64::from(task.learning_rate),
        optimizer: task.optimizer.parse().map_err(anyhow::Error::msg)?,
        seed: client_seed(seed, task.round, k),
        proximal_mu: task.proximal_mu,
    };
    let mut model = Classifier::from_tensors(spec.clone(), global, tch::Device::Cpu)?;
    let stats = train(&mut model, &local, &config, cancel, |_, _| {});
    if !stats.loss.is_finite() || !stats.accuracy.is_finite() {
        return Ok(Err("training diverged: the loss is not finite (lower the learning rate)".into()));
    }
    let mut delta = model.to_tensors().minus(global);
    drop(model);
    if delta.tensors.iter().any(|t| t.data.iter().any(|v| !v.is_finite())) {
        return Ok(Err("training diverged: the weights are not finite (lower the learning rate)".into()));
    }
    if let Some(clip) = task.dp_clip_norm.filter(|c| c.is_finite() && *c > 0.0) {
        delta.clip_l2_norm(clip);
    }
    if let Some(attack) = &client.attack {
        attack
            .apply(&mut delta, &mut rand::rngs::StdRng::seed_from_u64(client_seed(seed ^ ATTACK_SALT, task.round, k)));
    }
    let payload = codec.encode(&delta)?;
    Ok(Ok(Trained { payload, loss: stats.loss, accuracy: stats.accuracy, train_s: started.elapsed().as_secs_f64() }))
}

/// The short table printed at the end: one row per round of `metrics.jsonl`.
pub fn summary_table(state_dir: &std::path::Path) -> Result<String> {
    let path = state_dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = String::from("round  accuracy  eval loss  client acc  clients  epsilon   round s\n");
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{}: bad line", path.display()))?;
        let num = |k: &str, digits: usize| match v.get(k).and_then(serde_json::Value::as_f64) {
            Some(x) => format!("{x:.digits$}"),
            None => "-".into(),
        };
        out.push_str(&format!(
            "{:>5}  {:>8}  {:>9}  {:>10}  {:>7}  {:>7}  {:>8}\n",
            num("round", 0),
            num("accuracy", 4),
            num("loss", 4),
            num("client_accuracy", 4),
            num("participants", 0),
            num("dp_epsilon", 2),
            num("round_s", 2),
        ));
    }
    Ok(out)
}
