//! `fl-client`: enroll with a coordinator, serve federated rounds, train centrally, predict and
//! explain, generate data.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use fl_client::daemon::{self, DaemonConfig, DaemonExit};
use fl_client::identity::ClientState;
use fl_common::{ModelKind, SpecOverrides};
use fl_model::central::{default_train_config, train_central, CentralConfig, Progress};
use fl_model::data::read_labelled_csv;
use fl_model::datagen::{partition, write_csv, GeneratorConfig, Partition, TextGenerator};
use fl_model::explain::{describe_attention, describe_explanation, explain, Method};
use fl_model::model::{default_device, Classifier};
use fl_model::predict::{describe_prediction, evaluate_rows};
use fl_model::train::OptimizerKind;
use indicatif::{ProgressBar, ProgressStyle};
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(name = "fl-client", version, about = "Federated learning client: enroll, train on local data, predict")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Enroll with a coordinator using a join token; stores key, certificate and CA in the state dir.
    Enroll {
        /// Coordinator URL, https://HOST:PORT.
        #[arg(long, env = "FL_COORDINATOR")]
        coordinator: String,
        /// Join token printed by the coordinator.
        #[arg(long, env = "FL_TOKEN", hide_env_values = true)]
        token: String,
        /// Directory for this client's identity.
        #[arg(long, env = "FL_STATE_DIR")]
        state_dir: PathBuf,
        /// Name shown to the coordinator's operator.
        #[arg(long, env = "FL_NAME")]
        name: Option<String>,
    },
    /// Serve federated rounds: train on the local CSV and send back weight deltas.
    Run {
        /// Coordinator URL, https://HOST:PORT.
        #[arg(long, env = "FL_COORDINATOR")]
        coordinator: String,
        /// Directory holding the identity from `enroll`.
        #[arg(long, env = "FL_STATE_DIR")]
        state_dir: PathBuf,
        /// Local labelled CSV (`text,label`); it never leaves this machine.
        #[arg(long, env = "FL_DATA")]
        data: PathBuf,
        /// Name shown to the coordinator's operator (default: the enrollment name).
        #[arg(long, env = "FL_NAME")]
        name: Option<String>,
        /// libtorch intra-op threads (default: all cores).
        #[arg(long, env = "FL_THREADS")]
        threads: Option<i32>,
        /// Longest wait between reconnection attempts, in seconds.
        #[arg(long, default_value_t = 30.0)]
        max_backoff: f64,
    },
    /// Predict with a model file: texts, or accuracy and confusion matrix on a labelled CSV;
    /// optionally explain each prediction.
    Predict {
        /// Model file (safetensors with metadata), e.g. STATE/model/final.safetensors.
        #[arg(long)]
        model: PathBuf,
        /// Text to classify (repeat for several).
        #[arg(long, conflicts_with = "data", required_unless_present = "data")]
        text: Vec<String>,
        /// Labelled CSV to evaluate (with --explain: explain every row, then evaluate).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Print the words that pushed each prediction most towards and away from its label.
        #[arg(long)]
        explain: bool,
        /// Explanation method: occlusion (probability drop when the word is removed) or ig
        /// (integrated gradients on the embeddings).
        #[arg(long, value_enum, default_value_t = MethodArg::Occlusion, requires = "explain")]
        method: MethodArg,
        /// Integrated-gradients steps (more is more exact; --method ig).
        #[arg(long, default_value_t = 64, requires = "explain")]
        steps: usize,
        /// Words shown on each side.
        #[arg(long, default_value_t = 5, requires = "explain")]
        top: usize,
        /// Transformer only: print the last layer's attention weights, averaged over heads.
        #[arg(long)]
        attention: bool,
    },
    /// Train a model centrally on one labelled CSV, with the same code as a federated round: the
    /// centralized baseline, or a starting model for `fl-coordinator serve --init-model`.
    Train {
        /// Labelled CSV (`text,label`).
        #[arg(long)]
        data: PathBuf,
        /// Architecture: fasttext, bilstm or transformer.
        #[arg(long, default_value = "fasttext")]
        model: ModelKind,
        /// Where to write the model file.
        #[arg(long)]
        out: PathBuf,
        /// Passes over the training rows [default: per architecture].
        #[arg(long)]
        epochs: Option<u32>,
        /// Learning rate [default: per architecture].
        #[arg(long)]
        lr: Option<f64>,
        /// Examples per step.
        #[arg(long)]
        batch_size: Option<u32>,
        /// Optimizer: adam or sgd.
        #[arg(long, default_value = "adam")]
        optimizer: OptimizerKind,
        /// Fraction of the rows held out for validation.
        #[arg(long, default_value_t = 0.1)]
        validation: f64,
        /// Write the weights after the last epoch instead of those of the epoch with the best
        /// validation accuracy.
        #[arg(long)]
        keep_last: bool,
        /// Labels in output order, comma-separated [default: the CSV's labels, sorted].
        #[arg(long, value_delimiter = ',')]
        labels: Option<Vec<String>>,
        /// libtorch intra-op threads (default: all cores).
        #[arg(long, env = "FL_THREADS")]
        threads: Option<i32>,
        /// Seed of the weights, the split, the shuffling and dropout.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        #[command(flatten)]
        arch: SpecOverrides,
    },
    /// Generate a labelled text dataset (train, eval, test and per-client shards).
    GenData {
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Training rows (split into shards).
        #[arg(long, default_value_t = 6700)]
        rows: usize,
        /// Rows of eval.csv (for the coordinator).
        #[arg(long, default_value_t = 1000)]
        eval_rows: usize,
        /// Rows of test.csv.
        #[arg(long, default_value_t = 1000)]
        test_rows: usize,
        /// Number of classes (2 to 16).
        #[arg(long, default_value_t = 10)]
        classes: usize,
        /// Number of client shards (shard-1.csv ...).
        #[arg(long, default_value_t = 3)]
        shards: usize,
        /// How rows are dealt to the shards.
        #[arg(long, value_enum, default_value_t = PartitionArg::Iid)]
        partition: PartitionArg,
        /// Dirichlet concentration (smaller is more skewed).
        #[arg(long, default_value_t = 0.5)]
        alpha: f64,
        /// Probability that a word is a keyword of its class (lower is harder).
        #[arg(long, default_value_t = 0.2)]
        signal: f64,
        /// Seed.
        #[arg(long, default_value_t = 7)]
        seed: u64,
    },
}

/// `--method` of `predict --explain`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum MethodArg {
    /// Probability drop when the word is removed.
    Occlusion,
    /// Integrated gradients on the embeddings (`--steps`).
    #[value(alias = "integrated-gradients")]
    Ig,
}

/// `--partition` of `gen-data`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum PartitionArg {
    /// Shuffled and dealt evenly.
    Iid,
    /// Per class, shares drawn from a Dirichlet distribution (`--alpha`).
    Dirichlet,
}

fn main() -> ExitCode {
    fl_common::cli::init();
    match real_main(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            // Retrying cannot fix a refused identity or data that does not fit the federation:
            // a distinct status lets supervisors stop restarting (systemd RestartPreventExitStatus=2).
            if e.downcast_ref::<daemon::FatalError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

fn real_main(cli: Cli) -> Result<ExitCode> {
    if matches!(cli.command, Command::Predict { .. } | Command::Train { .. } | Command::GenData { .. }) {
        fl_common::cli::die_quietly_on_closed_stdout();
    }
    match cli.command {
        Command::Enroll { coordinator, token, state_dir, name } => {
            let state = ClientState::new(&state_dir);
            let name = name.unwrap_or_else(default_name);
            let identity = runtime()?.block_on(fl_client::enroll::enroll(&coordinator, &token, &name, &state))?;
            println!(
                "enrolled as {} ({}); identity stored in {}",
                identity.record.client_id,
                name,
                state_dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { coordinator, state_dir, data, name, threads, max_backoff } => {
            // Check the whole file before connecting: nothing trains on half a file.
            let rows = read_labelled_csv(&data)?;
            let identity = ClientState::new(&state_dir).load()?;
            let threads =
                threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get() as i32).unwrap_or(1));
            tch::set_num_threads(threads);
            tch::set_num_interop_threads(1);
            tracing::info!(rows = rows.len(), file = %data.display(), threads, device = ?default_device(), "local data checked");
            let config = DaemonConfig {
                coordinator,
                name: name.unwrap_or_else(|| identity.record.name.clone()),
                identity,
                data: Arc::new(rows),
                max_backoff: Duration::from_secs_f64(max_backoff),
                threads,
            };
            let shutdown = CancellationToken::new();
            let rt = runtime()?;
            rt.spawn(fl_common::cli::cancel_on_signal(shutdown.clone()));
            match rt.block_on(daemon::run(config, shutdown))? {
                DaemonExit::FederationFinished => Ok(ExitCode::SUCCESS),
                DaemonExit::Shutdown => Ok(ExitCode::from(130)),
            }
        }
        Command::Predict { model, text, data, explain: explaining, method, steps, top, attention } => {
            // Explanations differentiate through the model in evaluation mode, which cuDNN's LSTM
            // cannot do; single texts are cheap on the CPU.
            let device = if explaining || attention { tch::Device::Cpu } else { default_device() };
            let classifier = Classifier::load(&model, device)?;
            anyhow::ensure!(
                !attention || classifier.spec.kind == ModelKind::Transformer,
                "--attention needs a transformer model; {} is a {}",
                model.display(),
                classifier.spec.kind
            );
            let method = match method {
                MethodArg::Ig => Method::IntegratedGradients { steps },
                MethodArg::Occlusion => Method::Occlusion,
            };
            let describe = |text: &str| {
                if explaining {
                    print!("{}", describe_explanation(&classifier, &explain(&classifier, text, method), top));
                } else {
                    print!("{}", describe_prediction(&classifier, text));
                }
                if attention {
                    print!("{}", describe_attention(&classifier, text).unwrap_or_default());
                }
            };
            if let Some(path) = data {
                let rows = read_labelled_csv(&path)?;
                if explaining || attention {
                    for (text, label) in rows.texts.iter().zip(&rows.labels) {
                        println!(
                            "text: {text}
true label: {label}"
                        );
                        describe(text);
                        println!();
                    }
                }
                print!("{}", evaluate_rows(&classifier, &rows)?);
            } else {
                for (i, t) in text.iter().enumerate() {
                    if text.len() > 1 || explaining || attention {
                        println!("{}text: {t}", if i > 0 { "\n" } else { "" });
                    }
                    describe(t);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Train {
            data,
            model,
            out,
            epochs,
            lr,
            batch_size,
            optimizer,
            validation,
            keep_last,
            labels,
            threads,
            seed,
            arch,
        } => {
            anyhow::ensure!((0.0..1.0).contains(&validation), "--validation must be in [0, 1)");
            let rows = read_labelled_csv(&data)?;
            let labels = labels.unwrap_or_else(|| rows.distinct_labels());
            let spec = arch.spec(model, labels).map_err(anyhow::Error::msg)?;
            let mut train = default_train_config(model);
            train.epochs = epochs.unwrap_or(train.epochs);
            train.lr = lr.unwrap_or(train.lr);
            train.batch_size = batch_size.unwrap_or(train.batch_size);
            train.optimizer = optimizer;
            train.seed = seed;
            let threads =
                threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get() as i32).unwrap_or(1));
            tch::set_num_threads(threads);
            tch::set_num_interop_threads(1);
            let device = default_device();
            let config = CentralConfig { spec, train, validation, keep_best: !keep_last };
            let cancel = CancellationToken::new();
            let rt = runtime()?;
            rt.spawn(fl_common::cli::cancel_on_signal(cancel.clone()));
            let started = std::time::Instant::now();
            let mut bar = ProgressBar::hidden();
            let mut rows_per_epoch = 0u64;
            let outcome = train_central(&rows, &config, device, &cancel, |p| match p {
                Progress::Start { train_rows, validation_rows } => {
                    eprintln!(
                        "training {} on {train_rows} rows ({validation_rows} held out), {} epochs, lr {}, batch {}, {threads} threads, {device:?}",
                        config.spec.kind, config.train.epochs, config.train.lr, config.train.batch_size
                    );
                    rows_per_epoch = train_rows as u64;
                    bar = ProgressBar::new(rows_per_epoch * u64::from(config.train.epochs));
                    bar.set_style(
                        ProgressStyle::with_template(
                            "{elapsed_precise} [{bar:30}] {pos}/{len} examples, epoch {prefix}, {msg} (eta {eta})",
                        )
                        .expect("valid template")
                        .progress_chars("=> "),
                    );
                }
                Progress::Step { epoch, stats, examples_per_s } => {
                    bar.set_prefix(epoch.to_string());
                    bar.set_position(u64::from(epoch - 1) * rows_per_epoch + stats.examples as u64);
                    bar.set_message(format!("loss {:.4}, {examples_per_s:.0} examples/s", stats.loss));
                }
                Progress::Epoch(r) => {
                    let validation = match (r.validation_accuracy, r.validation_loss) {
                        (Some(a), Some(l)) => format!(", validation accuracy {a:.4} loss {l:.4}"),
                        _ => String::new(),
                    };
                    // Printed even when stderr is not a terminal and the bar stays hidden.
                    bar.suspend(|| {
                        println!(
                            "epoch {}: train loss {:.4} accuracy {:.4}{validation}, {:.0} examples/s",
                            r.epoch, r.train_loss, r.train_accuracy, r.examples_per_s
                        )
                    });
                }
            })?;
            bar.finish_and_clear();
            if outcome.cancelled {
                eprintln!("interrupted; no model written");
                return Ok(ExitCode::from(130));
            }
            outcome.model.save(&out).with_context(|| format!("writing {}", out.display()))?;
            let kept = outcome.epochs.iter().find(|r| r.epoch == outcome.kept_epoch);
            // The median epoch: one epoch slowed down by other work on the machine does not move it.
            let mut speeds: Vec<f64> = outcome.epochs.iter().map(|r| r.examples_per_s).collect();
            speeds.sort_by(f64::total_cmp);
            let median_speed = speeds.get(speeds.len() / 2).copied().unwrap_or(0.0);
            println!(
                "wrote {} ({} model, {} parameters, weights of epoch {}{}) in {:.1} s; median epoch: {:.0} examples/s",
                out.display(),
                config.spec.kind,
                outcome.model.num_parameters(),
                outcome.kept_epoch,
                kept.and_then(|r| r.validation_accuracy)
                    .map(|a| format!(", validation accuracy {a:.4}"))
                    .unwrap_or_default(),
                started.elapsed().as_secs_f64(),
                median_speed,
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::GenData { out, rows, eval_rows, test_rows, classes, shards, partition: how, alpha, signal, seed } => {
            let how = match how {
                PartitionArg::Iid => Partition::Iid,
                PartitionArg::Dirichlet => Partition::Dirichlet(alpha),
            };
            anyhow::ensure!((2..=16).contains(&classes), "--classes must be 2 to 16");
            anyhow::ensure!(shards >= 1, "--shards must be at least 1");
            let generator = TextGenerator::new(GeneratorConfig { classes, signal, seed, ..Default::default() });
            let labels = generator.labels();
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let train = generator.rows(rows, seed.wrapping_add(1));
            let write = |name: &str, rows: &[fl_model::datagen::Row]| {
                let path = out.join(name);
                write_csv(&path, rows, &labels).with_context(|| format!("writing {}", path.display()))
            };
            write("train.csv", &train)?;
            write("eval.csv", &generator.rows(eval_rows, seed.wrapping_add(2)))?;
            write("test.csv", &generator.rows(test_rows, seed.wrapping_add(3)))?;
            for (i, shard) in partition(&train, shards, how, classes, seed).iter().enumerate() {
                write(&format!("shard-{}.csv", i + 1), shard)?;
            }
            println!(
                "wrote {} train rows in {shards} shards, {eval_rows} eval and {test_rows} test rows to {}",
                rows,
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn default_name() -> String {
    std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| "client".into())
}
