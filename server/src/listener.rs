//! The TLS listener: accepts TCP connections and completes TLS handshakes off the accept loop,
//! so a peer that sends garbage or stalls costs one task and a log line, never the server.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, warn};

/// How long a peer may take to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A stream of established TLS connections from `listener`, for `serve_with_incoming_shutdown`.
/// `on_refused` is called for each handshake that fails or times out.
pub fn tls_incoming(
    listener: TcpListener,
    config: rustls::ServerConfig,
    on_refused: impl Fn() + Send + Sync + 'static,
) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let on_refused = Arc::new(on_refused);
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let mut last_warning = None;
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of descriptors, every client beyond the limit is refused: say so, at
                    // most every 10 s, instead of at debug level.
                    if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
                        if last_warning.is_none_or(|t: std::time::Instant| t.elapsed() >= Duration::from_secs(10)) {
                            warn!("cannot accept a connection: {e}; each client holds a descriptor: raise `ulimit -n` (README, \"Large fleets\")");
                            last_warning = Some(std::time::Instant::now());
                        }
                    } else {
                        debug!("accept failed: {e}");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, conn_tx, on_refused) = (acceptor.clone(), tx.clone(), on_refused.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = conn_tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => {
                        info!(%peer, "TLS handshake failed: {e}");
                        on_refused();
                    }
                    Err(_) => {
                        info!(%peer, "TLS handshake timed out");
                        on_refused();
                    }
                }
            });
            if tx.is_closed() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}
