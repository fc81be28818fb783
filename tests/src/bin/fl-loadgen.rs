//! `fl-loadgen`: enrolls and connects many clients to a running `fl-coordinator serve` from one
//! process, answers its rounds with synthetic sparse deltas, and reports what the clients saw
//! and, given its pid, what the coordinator process used (bench/scale.sh drives it).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use fl_common::cli::parse;
use fl_tests::loadgen::{self, CoordinatorProbe, LoadConfig};

/// Load generator for the coordinator: N enrolled mTLS clients in one process.
#[derive(Parser, Debug)]
#[command(name = "fl-loadgen", version)]
struct Args {
    /// Coordinator URL, https://HOST:PORT.
    #[arg(long, env = "FL_COORDINATOR")]
    coordinator: String,
    /// Join token for the clients not enrolled yet.
    #[arg(long, env = "FL_TOKEN", hide_env_values = true, conflicts_with = "token_file")]
    token: Option<String>,
    /// File holding the join token (STATE/join-token).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Directory of the clients' identities (client-0000, ...): reused when present.
    #[arg(long)]
    identities: PathBuf,
    /// Number of concurrent clients.
    #[arg(long, value_parser = parse::int_in(1usize, 100_000))]
    clients: usize,
    /// Median seconds of simulated local training (log-normal).
    #[arg(long, default_value_t = 5.0, value_parser = parse::seconds(86_400.0))]
    train_secs: f64,
    /// σ of the log-normal training time.
    #[arg(long, default_value_t = 0.5, value_parser = parse::float_in(0.0, 3.0))]
    train_spread: f64,
    /// Probability that a sampled client drops its connection mid-round (it comes back later).
    #[arg(long, default_value_t = 0.05, value_parser = parse::float_in(0.0, 1.0))]
    dropout: f64,
    /// Seconds a dropped client stays away (±50 %).
    #[arg(long, default_value_t = 3.0, value_parser = parse::seconds(3600.0))]
    rejoin_secs: f64,
    /// Rows of each matrix a synthetic delta changes.
    #[arg(long, default_value_t = 200, value_parser = parse::int_in(1usize, 10_000_000))]
    rows: usize,
    /// Seed of drop-outs, training times and deltas.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Hold the connections this many seconds once all joined, then stop: idle measurement.
    #[arg(long, value_parser = parse::seconds(86_400.0))]
    hold_secs: Option<f64>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 3600.0, value_parser = parse::seconds(7.0 * 86_400.0))]
    max_secs: f64,
    /// Enrollments in flight at once.
    #[arg(long, default_value_t = 8, value_parser = parse::int_in(1usize, 1000))]
    enroll_concurrency: usize,
    /// TLS handshakes in flight at once.
    #[arg(long, default_value_t = 32, value_parser = parse::int_in(1usize, 10_000))]
    connect_concurrency: usize,
    /// Pid of the coordinator, to measure its CPU, memory and descriptors from /proc.
    #[arg(long, requires = "coordinator_state")]
    coordinator_pid: Option<u32>,
    /// The coordinator's state dir, to read its metrics.jsonl.
    #[arg(long)]
    coordinator_state: Option<PathBuf>,
    /// Write the report (JSON) here; it is printed to stdout too.
    #[arg(long)]
    report: Option<PathBuf>,
}

fn main() -> ExitCode {
    fl_common::cli::init();
    match real_main(Args::parse()) {
        Ok(code) => code,
        Err(e) => fl_common::cli::report_error(&e, |_| false),
    }
}

fn real_main(args: Args) -> Result<ExitCode> {
    let open_files = fl_common::cli::raise_open_files_limit();
    if let Some(limit) = open_files.filter(|l| *l < args.clients as u64 + 64) {
        anyhow::bail!(
            "{} clients need about {} open files, and this process may open {limit}: raise `ulimit -n`",
            args.clients,
            args.clients + 64
        );
    }
    let token = match (&args.token, &args.token_file) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(path)) => Some(
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?.trim().to_string(),
        ),
        (None, None) => None,
    };
    let config = LoadConfig {
        token,
        enroll_concurrency: args.enroll_concurrency,
        connect_concurrency: args.connect_concurrency,
        train_secs: args.train_secs,
        train_spread: args.train_spread,
        dropout: args.dropout,
        rejoin_secs: args.rejoin_secs,
        rows: args.rows,
        seed: args.seed,
        hold_secs: args.hold_secs,
        max_secs: args.max_secs,
        ..LoadConfig::new(&args.coordinator, &args.identities, args.clients)
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let report = runtime.block_on(async {
        let probe = match (args.coordinator_pid, &args.coordinator_state) {
            (Some(pid), Some(state)) => Some(CoordinatorProbe::start(pid, state)?),
            _ => None,
        };
        let bar = indicatif::ProgressBar::new_spinner();
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        loadgen::run(config, probe.as_ref(), Some(bar)).await
    })?;
    let json = serde_json::to_string_pretty(&report)?;
    if let Some(path) = &args.report {
        std::fs::write(path, &json).with_context(|| format!("writing {}", path.display()))?;
    }
    fl_common::cli::print_line(&json);
    let complete = report.errors.is_empty() && report.download_mismatches == 0;
    Ok(if complete { ExitCode::SUCCESS } else { ExitCode::from(fl_common::cli::exit::TRANSIENT) })
}
