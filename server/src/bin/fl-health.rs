//! `fl-health`: exits 0 if the coordinator's gRPC health service reports SERVING. A small binary
//! without libtorch, for container HEALTHCHECKs and systemd watchdogs.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tonic_health::pb::health_check_response::ServingStatus;

/// Exit 0 if the coordinator reports SERVING, 1 otherwise.
#[derive(Parser, Debug)]
#[command(name = "fl-health", version)]
struct Cli {
    /// Coordinator URL, https://HOST:PORT.
    #[arg(long, env = "FL_COORDINATOR")]
    coordinator: String,
    /// The federation CA (STATE/ca.pem).
    #[arg(long, env = "FL_CA")]
    ca: PathBuf,
}

fn main() -> ExitCode {
    fl_common::tls::install_crypto_provider();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(fl_server::health::check(&cli.coordinator, &cli.ca)) {
        Ok(status) => {
            fl_common::cli::print_line(&format!("{status:?}"));
            if status == ServingStatus::Serving {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        // A probe: every failure, a bad flag aside (clap, 2), is "not healthy now".
        Err(e) => {
            fl_common::cli::eprint_line(&format!("error: {}", fl_common::cli::describe(&e)));
            ExitCode::FAILURE
        }
    }
}
