//! `fl-coordinator`: create and serve a federation, check its health, manage tokens and clients.
//! The engine is `fl-server`; this binary hands it the libtorch evaluator of `fl-model`.

use fl_coordinator::backend;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use fl_common::cli::{parse, printable, NAME_CHARS};
use fl_common::token::JoinToken;
use fl_server::registry::{now_unix, ClientStatus, RegistryStore};
use fl_server::state::StateDir;
use fl_server::{RoundSchedule, ServeConfig, ServeOutcome};
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(name = "fl-coordinator", version, about = "Federated learning coordinator")]
struct Cli {
    #[command(flatten)]
    pretrained: fl_common::PretrainedArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create (first start) or resume a federation and run its rounds.
    Serve(Box<ServeArgs>),
    /// Serve the dashboard, /metrics and /api of a federation's state directory, without running
    /// it: for a finished run, or beside a coordinator started without --http.
    Dashboard {
        /// State directory of the federation.
        #[arg(long, env = "FL_STATE_DIR")]
        state_dir: PathBuf,
        #[command(flatten)]
        http: HttpArgs,
    },
    /// Exit 0 if the coordinator's gRPC health service reports SERVING (`fl-health` does the
    /// same without loading libtorch: use it for container probes).
    Health {
        /// Coordinator URL, https://HOST:PORT.
        #[arg(long, env = "FL_COORDINATOR")]
        coordinator: String,
        /// The federation CA (STATE/ca.pem).
        #[arg(long)]
        ca: PathBuf,
    },
    /// Print what a coordinator is doing: rounds, accuracy, clients, refused updates and errors
    /// (from STATE/status.json, metrics.jsonl and registry.json).
    Status {
        #[arg(long, env = "FL_STATE_DIR")]
        state_dir: PathBuf,
        /// Print STATE/status.json as it is instead of the summary.
        #[arg(long)]
        json: bool,
    },
    /// Manage join tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Manage enrolled clients.
    Clients {
        #[command(subcommand)]
        command: ClientsCommand,
    },
}

/// The HTTP side port: dashboard, /metrics, /api, /healthz and /readyz.
#[derive(clap::Args, Debug, Clone)]
struct HttpArgs {
    /// Serve the dashboard, /metrics, /api and the probes on ADDR (off by default). A bare port
    /// means 127.0.0.1:PORT; listen on other interfaces only with --http-token or behind a firewall.
    #[arg(long, env = "FL_HTTP", value_name = "ADDR")]
    http: Option<String>,
    /// Require `Authorization: Bearer TOKEN` (or ?token=TOKEN) on every HTTP path but /healthz and
    /// /readyz. Prefer the environment variable: arguments are visible to other local users.
    #[arg(long, env = "FL_HTTP_TOKEN", hide_env_values = true, value_name = "TOKEN")]
    http_token: Option<String>,
}

impl HttpArgs {
    /// Binds the side port, if asked for, and writes its address to STATE/http-addr.
    async fn start(
        &self,
        state_dir: &std::path::Path,
        config: std::collections::BTreeMap<String, String>,
        shutdown: &CancellationToken,
    ) -> Result<Option<Arc<fl_server::http::Dashboard>>> {
        let Some(addr) = &self.http else { return Ok(None) };
        let addr = if addr.bytes().all(|b| b.is_ascii_digit()) { format!("127.0.0.1:{addr}") } else { addr.clone() };
        let listener =
            tokio::net::TcpListener::bind(&addr).await.with_context(|| format!("--http: listening on {addr}"))?;
        let bound = listener.local_addr()?;
        std::fs::create_dir_all(state_dir).with_context(|| format!("creating {}", state_dir.display()))?;
        fl_common::files::write_atomic(&state_dir.join("http-addr"), bound.to_string().as_bytes(), 0o644)?;
        fl_common::cli::print_line(&format!("dashboard on http://{bound}/"));
        let options = fl_server::http::HttpOptions { token: self.http_token.clone(), config };
        let dashboard = fl_server::http::Dashboard::new(state_dir, options);
        tokio::spawn({
            let (dashboard, stop) = (dashboard.clone(), shutdown.clone());
            async move {
                if let Err(e) = fl_server::http::serve(listener, dashboard, stop).await {
                    tracing::error!("the HTTP side port stopped: {e}");
                }
            }
        });
        Ok(Some(dashboard))
    }
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "FL_LISTEN", default_value = "127.0.0.1:7443")]
    listen: String,
    /// State directory (created on first start).
    #[arg(long, env = "FL_STATE_DIR")]
    state_dir: PathBuf,
    /// Total rounds of the federation.
    #[arg(long, env = "FL_ROUNDS", default_value_t = 10, value_parser = parse::int_in(1u32, 1_000_000))]
    rounds: u32,
    /// Fewest updates that make a round, and fewest connected clients to start one.
    #[arg(long, env = "FL_MIN_CLIENTS", default_value_t = 2, value_parser = parse::int_in(1usize, 100_000))]
    min_clients: usize,
    /// Updates wanted per round (0: one from every connected client).
    #[arg(long, env = "FL_CLIENTS_PER_ROUND", default_value_t = 0, value_parser = parse::int_in(0usize, 100_000))]
    clients_per_round: usize,
    /// Sample this many times --clients-per-round and close the round when that many updates are in.
    #[arg(long, default_value_t = 1.0, value_parser = parse::float_in(1.0, 100.0))]
    over_sample: f64,
    /// Seconds a round waits for updates before it closes (or is retried with too few).
    #[arg(long, env = "FL_ROUND_TIMEOUT", default_value_t = 300.0, value_parser = parse::seconds(7.0 * 86_400.0))]
    round_timeout: f64,
    /// Labelled CSV for centralized evaluation after each round.
    #[arg(long, env = "FL_EVAL_DATA")]
    eval_data: Option<PathBuf>,
    #[command(flatten)]
    training: fl_server::TrainingArgs,
    /// Seed of the initial model and of the rounds.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Encodings the coordinator compresses model downloads in, for a client that asks for one
    /// (`fl-client run --compression`): zstd, gzip (about 5 times zstd's CPU), or none (never
    /// compress). Compressed uploads are read in either regardless. See BENCHMARKS.md
    /// "Transport compression".
    #[arg(long, env = "FL_COMPRESSION", value_enum, value_delimiter = ',', default_value = "zstd")]
    compression: Vec<fl_common::tls::Compression>,
    /// Stop the federation (exit 2, committed rounds kept) after this many attempts in a row in
    /// which every sampled client's local training failed for the same reasons.
    #[arg(long, env = "FL_MAX_FAILED_ATTEMPTS", default_value_t = 3, value_parser = parse::int_in(1u32, 1000))]
    max_failed_attempts: u32,
    /// Start a new federation from this model file (from a previous federation or from
    /// `fl-client train`) instead of random weights; its architecture and labels must fit the flags.
    #[arg(long, env = "FL_INIT_MODEL")]
    init_model: Option<PathBuf>,
    /// Names in the server certificate (DNS names or IPs) [default: localhost, 127.0.0.1].
    #[arg(long = "tls-san")]
    tls_san: Vec<String>,
    #[command(flatten)]
    http: HttpArgs,
    #[command(flatten)]
    dp: fl_server::dp::DpArgs,
    #[command(flatten)]
    secagg: fl_server::secagg::SecAggArgs,
    #[command(flatten)]
    strategy: fl_server::aggregation::StrategyArgs,
    #[command(flatten)]
    distill: fl_server::distill::DistillArgs,
    #[command(flatten)]
    long_run: fl_server::long_run::LongRunArgs,
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Create a join token and print it.
    Create {
        #[arg(long, env = "FL_STATE_DIR")]
        state_dir: PathBuf,
        /// Lifetime, e.g. 30m, 24h, 7d (default: no expiry).
        #[arg(long, value_parser = parse::duration)]
        ttl: Option<u64>,
        /// Enrollments allowed (default: unlimited).
        #[arg(long, value_parser = parse::int_in(1u32, u32::MAX))]
        uses: Option<u32>,
    },
    /// List join tokens.
    List {
        #[arg(long, env = "FL_STATE_DIR")]
        state_dir: PathBuf,
    },
    /// Revoke a join token by id.
    Revoke {
        /// Token id (the part after `fl1.`).
        id: String,
        #[arg(long, env = "FL_STATE_DIR")]
        state_dir: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum ClientsCommand {
    /// List enrolled clients.
    List {
        #[arg(long, env = "FL_STATE_DIR")]
        state_dir: PathBuf,
    },
    /// Revoke a client: its next connection is refused.
    Revoke {
        /// Client id.
        id: String,
        #[arg(long, env = "FL_STATE_DIR")]
        state_dir: PathBuf,
    },
}

fn main() -> ExitCode {
    fl_common::cli::limit_malloc_arenas();
    fl_common::cli::init();
    match real_main(Cli::parse()) {
        Ok(code) => code,
        Err(e) => fl_common::cli::report_error(&e, is_permanent),
    }
}

/// Errors of this binary that retrying cannot fix (exit 2), beside those `fl_common::cli` knows.
fn is_permanent(e: &(dyn std::error::Error + 'static)) -> bool {
    e.is::<fl_model::data::DataError>()
        || e.is::<fl_common::SpecError>()
        || e.is::<fl_server::dp::DpConfigError>()
        || e.is::<fl_server::aggregation::StrategyConfigError>()
        || matches!(
            e.downcast_ref::<fl_model::model::ModelError>(),
            Some(fl_model::model::ModelError::Invalid { .. } | fl_model::model::ModelError::Spec(_))
        )
}

fn real_main(cli: Cli) -> Result<ExitCode> {
    // Commands that print for a reader who may stop reading (`| head`); serve and dashboard keep
    // SIGPIPE ignored and never fail on a closed stdout.
    if matches!(cli.command, Command::Status { .. } | Command::Token { .. } | Command::Clients { .. }) {
        fl_common::cli::die_quietly_on_closed_stdout();
    }
    fl_model::pretrained::configure(&cli.pretrained)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cli.command {
        Command::Serve(args) => runtime.block_on(serve(*args)),
        Command::Dashboard { state_dir, http } => runtime.block_on(dashboard(&state_dir, &http)),
        Command::Health { coordinator, ca } => runtime.block_on(health(&coordinator, &ca)),
        Command::Status { state_dir, json } => status(&state_dir, json),
        Command::Token { command } => token(command),
        Command::Clients { command } => clients(command),
    }
}

async fn serve(args: ServeArgs) -> Result<ExitCode> {
    // One descriptor per connected client: a large fleet needs more than a default soft limit.
    tracing::info!(open_files = ?fl_common::cli::raise_open_files_limit(), "open files limit");
    // Held until the process ends: a second coordinator on this state dir is refused at once.
    let _lock = fl_common::files::DirLock::acquire(&args.state_dir, "fl-coordinator serve")?;
    let sans =
        if args.tls_san.is_empty() { vec!["localhost".into(), "127.0.0.1".into()] } else { args.tls_san.clone() };
    let config = ServeConfig {
        state_dir: args.state_dir.clone(),
        model: args.training.model_args(),
        eval_data: args.eval_data.clone(),
        settings: args.training.round_settings(RoundSchedule {
            rounds: args.rounds,
            min_clients: args.min_clients,
            clients_per_round: args.clients_per_round,
            over_sample: args.over_sample,
            round_timeout: Duration::from_secs_f64(args.round_timeout),
            seed: args.seed,
            max_failed_attempts: args.max_failed_attempts,
            long_run: args.long_run.clone(),
        }),
        tls_sans: sans,
        seed: args.seed,
        init_model: args.init_model.clone(),
        spool: None,
        dashboard: None,
        dp: args.dp.clone(),
        secagg: args.secagg.clone(),
        strategy: args.strategy.clone(),
        distill: args.distill.clone(),
        compression: args.compression.clone(),
    };
    let listener =
        tokio::net::TcpListener::bind(&args.listen).await.with_context(|| format!("listening on {}", args.listen))?;
    let shutdown = CancellationToken::new();
    tokio::spawn(fl_common::cli::cancel_on_signal(shutdown.clone()));
    let config =
        ServeConfig { dashboard: args.http.start(&args.state_dir, run_config(&args), &shutdown).await?, ..config };
    match fl_server::serve(config, Arc::new(backend::TorchBackend), listener, shutdown).await? {
        ServeOutcome::Finished => Ok(ExitCode::SUCCESS),
        ServeOutcome::Interrupted => {
            fl_common::cli::eprint_line(&format!(
                "stopped; state saved in {} (restart with the same flags to resume)",
                args.state_dir.display()
            ));
            Ok(ExitCode::from(130))
        }
    }
}

/// What the dashboard shows as the run's configuration: the flags that shape the run.
fn run_config(args: &ServeArgs) -> std::collections::BTreeMap<String, String> {
    let mut c = std::collections::BTreeMap::new();
    c.insert("listen".into(), args.listen.clone());
    c.insert("rounds".into(), args.rounds.to_string());
    c.insert("min clients".into(), args.min_clients.to_string());
    let per_round =
        if args.clients_per_round == 0 { "all connected".into() } else { args.clients_per_round.to_string() };
    c.insert("clients per round".into(), per_round);
    c.insert("round timeout".into(), format!("{} s", args.round_timeout));
    let t = &args.training;
    c.insert("model".into(), t.model.map_or_else(|| "as created (default fasttext)".into(), |m| m.to_string()));
    c.insert(
        "local training".into(),
        format!("{} epoch(s), batch {}, lr {}, {}", t.local_epochs, t.batch_size, t.lr, t.optimizer),
    );
    c.insert("update codecs".into(), t.update_codec.iter().map(|c| c.name()).collect::<Vec<_>>().join(", "));
    c.insert("eval data".into(), args.eval_data.as_ref().map_or_else(|| "none".into(), |p| p.display().to_string()));
    c.insert("state dir".into(), args.state_dir.display().to_string());
    if let Some(teacher) = &args.distill.from {
        c.insert("distillation teacher".into(), teacher.display().to_string());
    }
    c
}

/// `fl-coordinator dashboard`: the side port alone, until SIGINT or SIGTERM.
async fn dashboard(state_dir: &std::path::Path, http: &HttpArgs) -> Result<ExitCode> {
    if !StateDir::new(state_dir).exists() {
        bail!("{}: no federation here (no federation.json)", state_dir.display());
    }
    let http = HttpArgs { http: Some(http.http.clone().unwrap_or_else(|| "127.0.0.1:9090".into())), ..http.clone() };
    let shutdown = CancellationToken::new();
    tokio::spawn(fl_common::cli::cancel_on_signal(shutdown.clone()));
    let mut config = std::collections::BTreeMap::new();
    config.insert("state dir".into(), state_dir.display().to_string());
    config.insert("served by".into(), "fl-coordinator dashboard (no coordinator in this process)".into());
    http.start(state_dir, config, &shutdown).await?;
    shutdown.cancelled().await;
    Ok(ExitCode::SUCCESS)
}

async fn health(url: &str, ca: &std::path::Path) -> Result<ExitCode> {
    let status = fl_server::health::check(url, ca).await?;
    println!("{status:?}");
    Ok(if status == tonic_health::pb::health_check_response::ServingStatus::Serving {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn status(state_dir: &std::path::Path, json: bool) -> Result<ExitCode> {
    let state = StateDir::new(state_dir);
    if !state.exists() {
        bail!("{}: no federation here", state_dir.display());
    }
    let Some(status) = state.read_status()? else {
        bail!("{}: no status yet (the coordinator has not served)", state.status_path().display())
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(ExitCode::SUCCESS);
    }
    let metrics: Vec<serde_json::Value> = std::fs::read_to_string(state.metrics_path())
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let registry = RegistryStore::open(state.root())?.read()?;
    print!("{}", status_summary(&status, &metrics, &registry, now_unix()));
    Ok(ExitCode::SUCCESS)
}

/// What `fl-coordinator status` prints: the dashboard's summary for a terminal.
fn status_summary(
    status: &fl_server::state::CoordinatorStatus,
    metrics: &[serde_json::Value],
    registry: &fl_server::registry::Registry,
    now: u64,
) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let phase = match status.phase {
        fl_server::state::Phase::Finished => "finished".to_string(),
        fl_server::state::Phase::Waiting => {
            format!("waiting for clients to start round {} (attempt {})", status.round, status.attempt)
        }
        fl_server::state::Phase::Collecting => {
            format!("collecting round {} (attempt {})", status.round, status.attempt)
        }
        fl_server::state::Phase::Aggregating => format!("aggregating round {}", status.round),
    };
    let _ = writeln!(out, "rounds     {} of {} completed; {phase}", status.completed_rounds, status.rounds_total);
    let number = |m: &serde_json::Value, k: &str| m.get(k).and_then(serde_json::Value::as_f64);
    match metrics.last() {
        Some(last) => {
            let best = metrics
                .iter()
                .filter_map(|m| Some((number(m, "accuracy")?, number(m, "round")?)))
                .fold(None, |b: Option<(f64, f64)>, x| if b.is_none_or(|b| x.0 > b.0) { Some(x) } else { b });
            let _ = writeln!(
                out,
                "accuracy   {:.4} (round {}), loss {:.4}{}",
                number(last, "accuracy").unwrap_or(f64::NAN),
                number(last, "round").unwrap_or(0.0),
                number(last, "loss").unwrap_or(f64::NAN),
                best.map(|(a, r)| format!("; best {a:.4} (round {r})")).unwrap_or_default()
            );
        }
        None => {
            let _ = writeln!(out, "accuracy   no round completed yet");
        }
    }
    let active = registry.clients.iter().filter(|c| c.status == ClientStatus::Active).count();
    let _ = writeln!(
        out,
        "clients    {} enrolled ({active} active), {} connected; this attempt: {} sampled, {} accepted, {} refused or lost",
        registry.clients.len(),
        status.connected.len(),
        status.sampled.len(),
        status.accepted.len(),
        status.rejected.len()
    );
    for c in &registry.clients {
        let state = match c.status {
            ClientStatus::Revoked => "revoked",
            ClientStatus::Active if status.connected.contains(&c.id) => "connected",
            ClientStatus::Active => "idle",
        };
        let seen = now.saturating_sub(c.last_seen_unix);
        let _ = writeln!(
            out,
            "           {:<16} {:<16} {state:<9} rounds joined {:<4} last seen {seen} s ago",
            printable(&c.name, NAME_CHARS),
            c.id,
            c.rounds_joined
        );
    }
    if !status.refused.is_empty() {
        let reasons: Vec<String> = status.refused.iter().map(|(r, n)| format!("{r} {n}")).collect();
        let _ = writeln!(out, "refused    {}", reasons.join(", "));
    }
    let _ = writeln!(
        out,
        "errors     {} failed attempts, {} refused TLS handshakes; last: {}",
        status.failed_attempts,
        status.failed_handshakes,
        status.last_failure.as_deref().unwrap_or("none")
    );
    out
}

fn open_registry(state_dir: &std::path::Path) -> Result<(StateDir, RegistryStore)> {
    let state = StateDir::new(state_dir);
    if !state.exists() {
        bail!(
            "{}: no federation here (start `fl-coordinator serve --state-dir {}` first)",
            state_dir.display(),
            state_dir.display()
        );
    }
    let registry = RegistryStore::open(state.root())?;
    Ok((state, registry))
}

fn format_time(unix: Option<u64>) -> String {
    match unix {
        None => "-".into(),
        Some(t) => {
            let age = now_unix() as i64 - t as i64;
            if age >= 0 {
                format!("{}s-ago", age)
            } else {
                format!("in-{}s", -age)
            }
        }
    }
}

fn token(command: TokenCommand) -> Result<ExitCode> {
    match command {
        TokenCommand::Create { state_dir, ttl, uses } => {
            let (state, registry) = open_registry(&state_dir)?;
            let (record, _) = state.load()?;
            let token = JoinToken::generate(&record.spec.federation);
            registry.update(|r| r.add_token(&token, ttl, uses, now_unix()))?;
            println!("{token}");
        }
        TokenCommand::List { state_dir } => {
            let (_, registry) = open_registry(&state_dir)?;
            println!("{:<10} {:<14} {:<14} {:>6} {:>6} STATUS", "ID", "CREATED", "EXPIRES", "USES", "MAX");
            for t in registry.read()?.tokens {
                let status = if t.revoked {
                    "revoked"
                } else if t.expires_unix.is_some_and(|e| now_unix() >= e) {
                    "expired"
                } else if t.max_uses.is_some_and(|m| t.uses >= m) {
                    "used-up"
                } else {
                    "active"
                };
                let max = t.max_uses.map(|m| m.to_string()).unwrap_or_else(|| "-".into());
                println!(
                    "{:<10} {:<14} {:<14} {:>6} {:>6} {}",
                    t.id,
                    format_time(Some(t.created_unix)),
                    format_time(t.expires_unix),
                    t.uses,
                    max,
                    status
                );
            }
        }
        TokenCommand::Revoke { id, state_dir } => {
            let (_, registry) = open_registry(&state_dir)?;
            let found =
                registry.update(|r| r.tokens.iter_mut().filter(|t| t.id == id).map(|t| t.revoked = true).count())?;
            if found == 0 {
                bail!("no token with id {id}");
            }
            println!("revoked token {id}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn clients(command: ClientsCommand) -> Result<ExitCode> {
    match command {
        ClientsCommand::List { state_dir } => {
            let (_, registry) = open_registry(&state_dir)?;
            println!(
                "{:<16} {:<20} {:<14} {:<14} {:>6} {:<8}",
                "ID", "NAME", "ENROLLED", "LAST-SEEN", "ROUNDS", "STATUS"
            );
            for c in registry.read()?.clients {
                let status = match c.status {
                    ClientStatus::Active => "active",
                    ClientStatus::Revoked => "revoked",
                };
                let name = if c.name.is_empty() {
                    "-".to_string()
                } else {
                    printable(&c.name, NAME_CHARS).replace(char::is_whitespace, "_")
                };
                println!(
                    "{:<16} {:<20} {:<14} {:<14} {:>6} {}",
                    c.id,
                    name,
                    format_time(Some(c.enrolled_unix)),
                    format_time(Some(c.last_seen_unix)),
                    c.rounds_joined,
                    status
                );
            }
        }
        ClientsCommand::Revoke { id, state_dir } => {
            let (_, registry) = open_registry(&state_dir)?;
            let found = registry.update(|r| {
                r.clients.iter_mut().filter(|c| c.id == id).map(|c| c.status = ClientStatus::Revoked).count()
            })?;
            if found == 0 {
                bail!("no client with id {id}");
            }
            println!("revoked client {id}; its next connection is refused");
        }
    }
    Ok(ExitCode::SUCCESS)
}
