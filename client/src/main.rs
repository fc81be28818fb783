//! `fl-client`: enroll with a coordinator, serve federated rounds, predict, generate data.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use fl_client::daemon::{self, DaemonConfig, DaemonExit};
use fl_client::data::read_labelled_csv;
use fl_client::datagen::{partition, write_csv, GeneratorConfig, Partition, TextGenerator};
use fl_client::identity::ClientState;
use fl_client::model::{default_device, Classifier};
use fl_client::predict::{describe_prediction, evaluate_rows};
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
    /// Predict with a model file: one text, or accuracy and confusion matrix on a labelled CSV.
    Predict {
        /// Model file (safetensors with metadata), e.g. STATE/model/final.safetensors.
        #[arg(long)]
        model: PathBuf,
        /// Text to classify.
        #[arg(long, conflicts_with = "data", required_unless_present = "data")]
        text: Option<String>,
        /// Labelled CSV to evaluate.
        #[arg(long)]
        data: Option<PathBuf>,
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
        /// iid or dirichlet.
        #[arg(long, default_value = "iid")]
        partition: String,
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

fn main() -> ExitCode {
    fl_common::tls::install_crypto_provider();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
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
            rt.spawn(stop_on_signal(shutdown.clone()));
            match rt.block_on(daemon::run(config, shutdown))? {
                DaemonExit::FederationFinished => Ok(ExitCode::SUCCESS),
                DaemonExit::Shutdown => Ok(ExitCode::from(130)),
            }
        }
        Command::Predict { model, text, data } => {
            let classifier = Classifier::load(&model, default_device())?;
            if let Some(text) = text {
                print!("{}", describe_prediction(&classifier, &text));
            } else if let Some(path) = data {
                let rows = read_labelled_csv(&path)?;
                print!("{}", evaluate_rows(&classifier, &rows)?);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::GenData { out, rows, eval_rows, test_rows, classes, shards, partition: how, alpha, signal, seed } => {
            let how = match how.as_str() {
                "iid" => Partition::Iid,
                "dirichlet" => Partition::Dirichlet(alpha),
                other => anyhow::bail!("unknown partition '{other}' (expected iid or dirichlet)"),
            };
            anyhow::ensure!((2..=16).contains(&classes), "--classes must be 2 to 16");
            anyhow::ensure!(shards >= 1, "--shards must be at least 1");
            let generator = TextGenerator::new(GeneratorConfig { classes, signal, seed, ..Default::default() });
            let labels = generator.labels();
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let train = generator.rows(rows, seed.wrapping_add(1));
            let write = |name: &str, rows: &[fl_client::datagen::Row]| {
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

async fn stop_on_signal(token: CancellationToken) {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    token.cancel();
}
