//! The HTTP side port (`serve --http ADDR`, off by default): Prometheus metrics, health, a JSON
//! API and a live dashboard.
//!
//! ```text
//! /metrics       Prometheus (OpenMetrics text), from prometheus-client
//! /healthz       200 while the process serves HTTP (liveness)
//! /readyz        200 while the gRPC port accepts clients, 503 before and after (readiness)
//! /api/rounds    the lines of metrics.jsonl, as a JSON array
//! /api/clients   id, name, status, last seen, rounds joined, last update of each enrolled client
//! /api/state     everything the dashboard shows, in one object
//! /events        the same object as server-sent events, one per change
//! /              the dashboard: one page, its script and styles inline, nothing fetched elsewhere
//! ```
//!
//! It reads what the coordinator writes to its state directory (`metrics.jsonl`, `registry.json`,
//! `status.json`), checking about once a second, so it shares no lock with the round engine and can
//! show nothing the files do not hold: never a key, a token, a certificate or a fingerprint. With a
//! token (`--http-token`), every path but `/healthz` and `/readyz` wants `Authorization: Bearer
//! TOKEN` (or `?token=TOKEN`, which the page passes on to its requests).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::stream::{self, Stream};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::registry::{ClientStatus, Registry as ClientRegistry};

/// The dashboard page: markup, styles and the chart script in one file, served as it is.
const PAGE: &str = include_str!("dashboard.html");

/// How often the state files are checked for changes.
const REFRESH: Duration = Duration::from_millis(500);

/// Options of the side port.
#[derive(Clone, Debug, Default)]
pub struct HttpOptions {
    /// A bearer token every path but the probes requires; `None` serves them openly.
    pub token: Option<String>,
    /// The run's configuration, shown on the page (flags, not secrets).
    pub config: BTreeMap<String, String>,
}

/// One enrolled client as `/api/clients` shows it: names and ids, nothing that authenticates.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ClientView {
    /// Id given at enrollment.
    pub id: String,
    /// Name the client gave.
    pub name: String,
    /// `connected`, `idle` (enrolled, no open stream) or `revoked`.
    pub status: &'static str,
    /// Last time it connected or sent anything (Unix seconds).
    pub last_seen_unix: u64,
    /// Rounds whose aggregate includes its update.
    pub rounds_joined: u32,
    /// The last round whose aggregate included its update, as this port saw it (0: none seen).
    pub last_update_round: u32,
    /// When that round was seen committed (Unix seconds; 0: none seen).
    pub last_update_unix: u64,
}

/// Everything the dashboard shows: what `/api/state` answers and `/events` sends.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct DashboardState {
    /// The run's configuration.
    pub config: BTreeMap<String, String>,
    /// What the coordinator does now (`status.json`), when it writes one.
    pub status: Option<Value>,
    /// Rounds completed (lines in `metrics.jsonl`).
    pub rounds_completed: usize,
    /// The metrics lines.
    pub rounds: Vec<Value>,
    /// Enrolled clients.
    pub clients: Vec<ClientView>,
    /// Whether the gRPC port accepts clients.
    pub ready: bool,
}

/// The Prometheus metrics, fed from the state files as they change.
#[derive(Debug)]
struct Metrics {
    registry: Mutex<Registry>,
    rounds_completed: Counter,
    round: Gauge,
    attempt: Gauge,
    clients: Family<Vec<(String, String)>, Gauge>,
    refused: Family<Vec<(String, String)>, Counter>,
    bytes_up: Counter,
    bytes_down: Counter,
    round_duration: Histogram,
    accuracy: Gauge<f64, AtomicU64>,
    loss: Gauge<f64, AtomicU64>,
    /// Registered on the first round that reports ε: a run without DP shows no ε.
    epsilon: Mutex<Option<Gauge<f64, AtomicU64>>>,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("fl");
        let rounds_completed = Counter::default();
        registry.register(
            "rounds_completed",
            "Rounds completed (committed to metrics.jsonl)",
            rounds_completed.clone(),
        );
        let round = Gauge::default();
        registry.register("round", "The round being waited for, collected or aggregated", round.clone());
        let attempt = Gauge::default();
        registry.register("round_attempt", "Attempt of the current round, from 0", attempt.clone());
        let clients = Family::default();
        registry.register(
            "clients",
            "Clients by state: enrolled, connected, sampled and accepted (in the current attempt)",
            clients.clone(),
        );
        let refused = Family::default();
        registry.register("updates_refused", "Updates refused, by reason", refused.clone());
        let bytes_up = Counter::default();
        registry.register("bytes_up", "Update bytes received from clients in completed rounds", bytes_up.clone());
        let bytes_down = Counter::default();
        registry.register("bytes_down", "Model bytes sent to clients in completed rounds", bytes_down.clone());
        let round_duration = Histogram::new(exponential_buckets(0.5, 2.0, 14));
        registry.register("round_duration_seconds", "Wall time of completed rounds", round_duration.clone());
        let accuracy = Gauge::default();
        registry.register("accuracy", "Accuracy of the global model on the eval data, last round", accuracy.clone());
        let loss = Gauge::default();
        registry.register("loss", "Loss of the global model on the eval data, last round", loss.clone());
        Metrics {
            registry: Mutex::new(registry),
            rounds_completed,
            round,
            attempt,
            clients,
            refused,
            bytes_up,
            bytes_down,
            round_duration,
            accuracy,
            loss,
            epsilon: Mutex::new(None),
        }
    }

    /// Counts one completed round.
    fn observe_round(&self, line: &Value) {
        let number = |key: &str| line.get(key).and_then(Value::as_f64);
        self.rounds_completed.inc();
        self.bytes_up.inc_by(number("bytes_up").unwrap_or(0.0) as u64);
        self.bytes_down.inc_by(number("bytes_down").unwrap_or(0.0) as u64);
        if let Some(s) = number("round_s") {
            self.round_duration.observe(s);
        }
        if let Some(a) = number("accuracy") {
            self.accuracy.set(a);
        }
        if let Some(l) = number("loss") {
            self.loss.set(l);
        }
        if let Some(e) = number("dp_epsilon") {
            let mut slot = self.epsilon.lock().unwrap_or_else(PoisonError::into_inner);
            slot.get_or_insert_with(|| {
                let gauge = Gauge::default();
                self.registry.lock().unwrap_or_else(PoisonError::into_inner).register(
                    "dp_epsilon",
                    "Differential privacy: epsilon spent so far",
                    gauge.clone(),
                );
                gauge
            })
            .set(e);
        }
    }

    fn observe_status(&self, status: &Value, enrolled: usize) {
        let count = |key: &str| status.get(key).and_then(Value::as_array).map_or(0, Vec::len) as i64;
        self.round.set(status.get("round").and_then(Value::as_i64).unwrap_or(0));
        self.attempt.set(status.get("attempt").and_then(Value::as_i64).unwrap_or(0));
        for state in ["connected", "sampled", "accepted"] {
            self.clients.get_or_create(&vec![("state".into(), state.into())]).set(count(state));
        }
        self.clients.get_or_create(&vec![("state".into(), "enrolled".into())]).set(enrolled as i64);
        // Refusals by reason, when the status counts them.
        if let Some(reasons) = status.get("refused").and_then(Value::as_object) {
            for (reason, n) in reasons {
                let counter = self.refused.get_or_create(&vec![("reason".into(), reason.clone())]);
                let seen = counter.get();
                let total = n.as_u64().unwrap_or(0);
                if total > seen {
                    counter.inc_by(total - seen);
                }
            }
        }
    }

    fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry.lock().unwrap_or_else(PoisonError::into_inner));
        out
    }
}

/// What the side port knows: the latest [`DashboardState`], the metrics, and a version that
/// changes with the state (for the event stream).
#[derive(Debug)]
pub struct Dashboard {
    state_dir: PathBuf,
    token_digest: Option<[u8; 32]>,
    /// Replaced when `metrics.jsonl` shrinks (a restart dropped uncommitted rounds): Prometheus
    /// reads the drop of the counters as a reset.
    metrics: Mutex<Arc<Metrics>>,
    ready: AtomicBool,
    current: watch::Sender<Arc<DashboardState>>,
    files: Mutex<FileCursor>,
}

/// How far the state files have been read.
#[derive(Debug, Default)]
struct FileCursor {
    metrics_offset: u64,
    registry_stamp: Option<(SystemTime, u64)>,
    status_stamp: Option<(SystemTime, u64)>,
    registry: ClientRegistry,
    /// Last round each client's update was seen in, and when.
    last_update: BTreeMap<String, (u32, u64)>,
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Dashboard {
    /// A dashboard of the federation in `state_dir`.
    pub fn new(state_dir: &Path, options: HttpOptions) -> Arc<Self> {
        let initial = DashboardState { config: options.config, ..DashboardState::default() };
        Arc::new(Dashboard {
            state_dir: state_dir.to_owned(),
            token_digest: options.token.as_deref().map(digest),
            metrics: Mutex::new(Arc::new(Metrics::new())),
            ready: AtomicBool::new(false),
            current: watch::Sender::new(Arc::new(initial)),
            files: Mutex::new(FileCursor::default()),
        })
    }

    /// Says whether the gRPC port accepts clients (`/readyz`).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
        self.current.send_if_modified(|state| {
            if state.ready == ready {
                return false;
            }
            Arc::make_mut(state).ready = ready;
            true
        });
    }

    /// The latest state.
    pub fn state(&self) -> Arc<DashboardState> {
        self.current.borrow().clone()
    }

    /// Re-reads the state files that changed since the last call; returns whether anything did.
    /// Blocking: async code calls it on a blocking thread.
    pub fn refresh(&self) -> bool {
        let mut files = self.files.lock().unwrap_or_else(PoisonError::into_inner);
        let mut next = (*self.state()).clone();
        let mut changed = false;

        // metrics.jsonl only grows while a coordinator runs; a shorter file means a recovery dropped
        // lines of uncommitted rounds: read it again from the start.
        let metrics_path = self.state_dir.join("metrics.jsonl");
        let len = std::fs::metadata(&metrics_path).map(|m| m.len()).unwrap_or(0);
        if len < files.metrics_offset {
            files.metrics_offset = 0;
            next.rounds.clear();
            *self.metrics.lock().unwrap_or_else(PoisonError::into_inner) = Arc::new(Metrics::new());
            changed = true;
        }
        let metrics = self.metrics();
        let mut new_lines = Vec::new();
        if len > files.metrics_offset {
            if let Ok(bytes) = std::fs::read(&metrics_path) {
                let start = files.metrics_offset as usize;
                // Only whole lines: a line being appended is read at the next refresh.
                let end = bytes[start..].iter().rposition(|&b| b == b'\n').map_or(start, |i| start + i + 1);
                for line in bytes[start..end].split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                    match serde_json::from_slice::<Value>(line) {
                        Ok(v) => new_lines.push(v),
                        Err(e) => warn!("{}: skipping a line that is not JSON: {e}", metrics_path.display()),
                    }
                }
                files.metrics_offset = end as u64;
            }
        }
        let now = crate::registry::now_unix();
        for line in &new_lines {
            metrics.observe_round(line);
            let round = line.get("round").and_then(Value::as_u64).unwrap_or(0) as u32;
            // The status of the committing attempt names whose updates the round holds.
            if let Some(accepted) = next.status.as_ref().and_then(|s| s.get("accepted")).and_then(Value::as_array) {
                for id in accepted.iter().filter_map(Value::as_str) {
                    files.last_update.insert(id.to_owned(), (round, now));
                }
            }
        }
        if !new_lines.is_empty() {
            next.rounds.extend(new_lines);
            changed = true;
        }
        next.rounds_completed = next.rounds.len();

        let status_path = self.state_dir.join("status.json");
        let status_stamp = stamp(&status_path);
        if status_stamp != files.status_stamp {
            files.status_stamp = status_stamp;
            if let Ok(bytes) = std::fs::read(&status_path) {
                if let Ok(status) = serde_json::from_slice::<Value>(&bytes) {
                    if next.status.as_ref() != Some(&status) {
                        next.status = Some(status);
                        changed = true;
                    }
                }
            }
        }

        let registry_path = self.state_dir.join("registry.json");
        let registry_stamp = stamp(&registry_path);
        if registry_stamp != files.registry_stamp {
            files.registry_stamp = registry_stamp;
            if let Ok(bytes) = std::fs::read(&registry_path) {
                if let Ok(registry) = serde_json::from_slice::<ClientRegistry>(&bytes) {
                    files.registry = registry;
                    changed = true;
                }
            }
        }

        let connected: Vec<&str> = next
            .status
            .as_ref()
            .and_then(|s| s.get("connected"))
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let clients: Vec<ClientView> = files
            .registry
            .clients
            .iter()
            .map(|c| {
                let (last_update_round, last_update_unix) = files.last_update.get(&c.id).copied().unwrap_or((0, 0));
                ClientView {
                    id: c.id.clone(),
                    name: c.name.clone(),
                    status: match c.status {
                        ClientStatus::Revoked => "revoked",
                        ClientStatus::Active if connected.contains(&c.id.as_str()) => "connected",
                        ClientStatus::Active => "idle",
                    },
                    last_seen_unix: c.last_seen_unix,
                    rounds_joined: c.rounds_joined,
                    last_update_round,
                    last_update_unix,
                }
            })
            .collect();
        if clients != next.clients {
            next.clients = clients;
            changed = true;
        }
        if let Some(status) = &next.status {
            metrics.observe_status(status, next.clients.len());
        } else {
            metrics.clients.get_or_create(&vec![("state".into(), "enrolled".into())]).set(next.clients.len() as i64);
        }
        next.ready = self.ready.load(Ordering::SeqCst);
        if changed {
            self.current.send_replace(Arc::new(next));
        }
        changed
    }

    fn metrics(&self) -> Arc<Metrics> {
        self.metrics.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The Prometheus exposition (OpenMetrics text) of the latest state.
    pub fn encode_metrics(&self) -> String {
        self.metrics().encode()
    }

    /// Checks the state files until `stop`.
    pub async fn follow(self: Arc<Self>, stop: CancellationToken) {
        loop {
            let dashboard = self.clone();
            if let Err(e) = tokio::task::spawn_blocking(move || dashboard.refresh()).await {
                warn!("refreshing the dashboard failed: {e}");
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(REFRESH) => {}
            }
        }
    }

    fn authorized(&self, headers: &HeaderMap, query: Option<&str>) -> bool {
        let Some(expected) = self.token_digest else { return true };
        let bearer =
            headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        let from_query = query.and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("token=")));
        // Digests have a fixed length, so comparing them leaks nothing about the token's length.
        [bearer, from_query].into_iter().flatten().any(|given| digest(given) == expected)
    }
}

/// The router of the side port.
pub fn router(dashboard: Arc<Dashboard>) -> Router {
    let guarded = Router::new()
        .route("/", get(page))
        .route("/metrics", get(metrics))
        .route("/api/rounds", get(rounds))
        .route("/api/clients", get(clients))
        .route("/api/state", get(state))
        .route("/events", get(events))
        .route_layer(middleware::from_fn_with_state(dashboard.clone(), require_token));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .merge(guarded)
        .with_state(dashboard)
}

/// Serves the side port on `listener` until `shutdown`, following the state files meanwhile.
pub async fn serve(
    listener: TcpListener,
    dashboard: Arc<Dashboard>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    info!(%addr, token = dashboard.token_digest.is_some(), "HTTP side port: dashboard, /metrics, /api, probes");
    tokio::spawn(dashboard.clone().follow(shutdown.clone()));
    axum::serve(listener, router(dashboard)).with_graceful_shutdown(shutdown.cancelled_owned()).await
}

async fn require_token(State(dashboard): State<Arc<Dashboard>>, request: Request, next: Next) -> Response {
    if dashboard.authorized(request.headers(), request.uri().query()) {
        next.run(request).await
    } else {
        (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Bearer")], "a bearer token is required\n")
            .into_response()
    }
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

async fn readyz(State(dashboard): State<Arc<Dashboard>>) -> Response {
    if dashboard.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not accepting clients\n").into_response()
    }
}

async fn metrics(State(dashboard): State<Arc<Dashboard>>) -> Response {
    let body = dashboard.encode_metrics();
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body).into_response()
}

async fn rounds(State(dashboard): State<Arc<Dashboard>>) -> Json<Vec<Value>> {
    Json(dashboard.state().rounds.clone())
}

async fn clients(State(dashboard): State<Arc<Dashboard>>) -> Json<Vec<ClientView>> {
    Json(dashboard.state().clients.clone())
}

async fn state(State(dashboard): State<Arc<Dashboard>>) -> Json<DashboardState> {
    Json((*dashboard.state()).clone())
}

async fn events(
    State(dashboard): State<Arc<Dashboard>>,
) -> Sse<impl Stream<Item = Result<Event, std::convert::Infallible>>> {
    let rx = dashboard.current.subscribe();
    // The first event is the state as it is; then one per change.
    let stream = stream::unfold((rx, true), |(mut rx, first)| async move {
        if !first && rx.changed().await.is_err() {
            return None;
        }
        let state = rx.borrow_and_update().clone();
        let event = Event::default().event("state").json_data(&*state).unwrap_or_else(|_| Event::default());
        Some((Ok(event), (rx, false)))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn line(round: u32, accuracy: f64, extra: &str) -> String {
        format!(
            "{{\"round\":{round},\"accuracy\":{accuracy},\"loss\":0.5,\"participants\":2,\"bytes_up\":1000,\"bytes_down\":3000,\"round_s\":1.5{extra}}}\n"
        )
    }

    fn append(path: &Path, text: &str) {
        use std::io::Write;
        std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap().write_all(text.as_bytes()).unwrap();
    }

    #[test]
    fn metrics_follow_the_state_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let dashboard = Dashboard::new(dir.path(), HttpOptions::default());
        assert!(!dashboard.refresh(), "nothing there yet");
        append(&path, &(line(1, 0.5, "") + &line(2, 0.75, "")));
        assert!(dashboard.refresh());
        let text = dashboard.encode_metrics();
        for expected in [
            "fl_rounds_completed_total 2\n",
            "fl_bytes_up_total 2000\n",
            "fl_bytes_down_total 6000\n",
            "fl_round_duration_seconds_count 2\n",
            "fl_accuracy 0.75\n",
            "fl_clients{state=\"enrolled\"} 0\n",
        ] {
            assert!(text.contains(expected), "{expected:?} not in\n{text}");
        }
        assert!(!text.contains("epsilon"), "no DP, no epsilon");
        // A line being written is read once it is whole.
        let third = line(3, 0.8, ",\"dp_epsilon\":1.25");
        append(&path, &third[..10]);
        dashboard.refresh();
        assert_eq!(dashboard.state().rounds_completed, 2);
        append(&path, &third[10..]);
        dashboard.refresh();
        assert_eq!(dashboard.state().rounds_completed, 3);
        assert!(dashboard.encode_metrics().contains("fl_dp_epsilon 1.25\n"));
        // The engine's status.json: clients by state and refusals by reason.
        let status = r#"{"round":4,"attempt":1,"connected":["c-1","c-2"],"sampled":["c-1"],"accepted":[],"refused":{"norm_too_large":2,"stale":1}}"#;
        std::fs::write(dir.path().join("status.json"), status).unwrap();
        dashboard.refresh();
        let text = dashboard.encode_metrics();
        for expected in [
            "fl_round 4\n",
            "fl_round_attempt 1\n",
            "fl_clients{state=\"connected\"} 2\n",
            "fl_clients{state=\"sampled\"} 1\n",
            "fl_updates_refused_total{reason=\"norm_too_large\"} 2\n",
            "fl_updates_refused_total{reason=\"stale\"} 1\n",
        ] {
            assert!(text.contains(expected), "{expected:?} not in\n{text}");
        }
        // A restart that drops an uncommitted round: counters start again from the file.
        std::fs::write(&path, line(1, 0.5, "")).unwrap();
        dashboard.refresh();
        assert_eq!(dashboard.state().rounds_completed, 1);
        assert!(dashboard.encode_metrics().contains("fl_rounds_completed_total 1\n"));
    }

    async fn get(addr: std::net::SocketAddr, path: &str, auth: Option<&str>) -> (u16, String) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let auth = auth.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut raw = String::new();
        stream.read_to_string(&mut raw).await.unwrap();
        let code = raw.split_whitespace().nth(1).unwrap().parse().unwrap();
        (code, raw.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
    }

    #[tokio::test]
    async fn the_token_guards_all_but_the_probes_and_readiness_follows_the_grpc_port() {
        let dir = tempfile::tempdir().unwrap();
        let options = HttpOptions { token: Some("s3cret".into()), config: BTreeMap::new() };
        let dashboard = Dashboard::new(dir.path(), options);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(listener, dashboard.clone(), stop.clone()));
        assert_eq!(get(addr, "/healthz", None).await.0, 200);
        assert_eq!(get(addr, "/readyz", None).await.0, 503);
        dashboard.set_ready(true);
        assert_eq!(get(addr, "/readyz", None).await.0, 200);
        for path in ["/", "/metrics", "/api/rounds", "/api/clients", "/api/state", "/events"] {
            assert_eq!(get(addr, path, None).await.0, 401, "{path} without the token");
            assert_eq!(get(addr, path, Some("wrong")).await.0, 401, "{path} with a wrong token");
        }
        let (code, body) = get(addr, "/metrics", Some("s3cret")).await;
        assert_eq!(code, 200);
        assert!(body.contains("fl_rounds_completed_total"), "{body}");
        assert_eq!(get(addr, "/api/state?token=s3cret", None).await.0, 200);
        let (code, page) = get(addr, "/?token=s3cret", None).await;
        assert!(code == 200 && page.contains("id=\"rounds-completed\"") && page.contains("id=\"accuracy-chart\""));
        assert!(!page.contains("src=") && !page.contains("<link"), "the page loads nothing from elsewhere");
        stop.cancel();
        server.await.unwrap().unwrap();
    }
}
