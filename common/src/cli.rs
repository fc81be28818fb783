//! What both binaries set up the same way at the start of `main`: the TLS crypto provider,
//! logging, SIGPIPE, and the shutdown signal.

use tokio_util::sync::CancellationToken;

/// Installs the crypto provider and logs to stderr filtered by `RUST_LOG` (default `info`).
pub fn init() {
    crate::tls::install_crypto_provider();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Restores SIGPIPE's default, so that a command whose output goes to a pipe that closes
/// (`fl-client predict ... | head -1`) ends quietly, as `cat` does, instead of panicking in
/// `println!`. Only for commands that write results to stdout and hold no network connection: a
/// server must see EPIPE as an error on one socket, not die of the signal.
pub fn die_quietly_on_closed_stdout() {
    // SAFETY: sets a signal disposition to its default; called at the start of main.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Cancels `token` on the first SIGINT or SIGTERM.
pub async fn cancel_on_signal(token: CancellationToken) {
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
    match term {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(e) => {
            tracing::warn!("no SIGTERM handler ({e}); only SIGINT stops this process");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    token.cancel();
}
