//! Helpers for the integration tests: find the built binaries, start a coordinator on port 0,
//! enroll and run clients, read the coordinator's metrics and status; a raw gRPC client that
//! plays a client by hand.

pub mod dp_sim;
pub mod loadgen;
pub mod strategy_sim;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fl_client::daemon::upload_chunks;
use fl_client::identity::{ClientState, Identity};
use fl_common::tensors::sha256_hex;
use fl_common::{decode_model, TensorSet};
use fl_proto::pb::{self, federation_client::FederationClient};
use fl_server::state::StateDir;
pub use fl_server::state::{CoordinatorStatus, Phase};
use tonic::transport::Channel;

/// Directory of the built binaries: the profile directory above this test executable.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile>").to_path_buf();
    assert!(
        dir.join("fl-coordinator").exists() && dir.join("fl-client").exists(),
        "binaries missing in {}: run `cargo build --release --bins` (make test does)",
        dir.display()
    );
    dir
}

/// `fl-coordinator` or `fl-client` as a command.
pub fn command(bin: &str) -> Command {
    let mut cmd = Command::new(bin_dir().join(bin));
    cmd.env("RUST_LOG", "info");
    cmd
}

/// Runs a command to the end and returns its output.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("command runs")
}

/// Generates a dataset with `shards` client shards into `dir`.
pub fn gen_data(dir: &Path, rows: usize, shards: usize) {
    let out = run(command("fl-client").args(["gen-data", "--out"]).arg(dir).args([
        "--rows",
        &rows.to_string(),
        "--eval-rows",
        "500",
        "--test-rows",
        "500",
        "--shards",
        &shards.to_string(),
    ]));
    assert!(out.status.success(), "gen-data failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// A coordinator process.
#[derive(Debug)]
pub struct CoordinatorProcess {
    /// The child.
    pub child: Child,
    /// Its state directory.
    pub state_dir: PathBuf,
    /// Log file (stderr and stdout).
    pub log: PathBuf,
}

impl CoordinatorProcess {
    /// Starts `fl-coordinator serve` on 127.0.0.1:0 with `args`, and waits until it listens.
    pub fn start(state_dir: &Path, args: &[&str]) -> CoordinatorProcess {
        Self::start_with(state_dir, "127.0.0.1:0", args, &[])
    }

    /// Starts `fl-coordinator serve` on `listen` with `args` and extra environment `env`, and
    /// waits until it listens.
    pub fn start_with(state_dir: &Path, listen: &str, args: &[&str], env: &[(&str, &str)]) -> CoordinatorProcess {
        // Both describe a running coordinator: a restarted one writes its own.
        let _ = std::fs::remove_file(state_dir.join("listen-addr"));
        let _ = std::fs::remove_file(state_dir.join("status.json"));
        let log = state_dir.with_extension(format!(
            "log{}",
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
        ));
        let file = std::fs::File::create(&log).unwrap();
        let child = command("fl-coordinator")
            .args(["serve", "--listen", listen, "--state-dir"])
            .arg(state_dir)
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file))
            .spawn()
            .expect("coordinator starts");
        let mut process = CoordinatorProcess { child, state_dir: state_dir.to_owned(), log };
        let until = Instant::now() + Duration::from_secs(60);
        while !state_dir.join("listen-addr").exists() {
            if let Some(status) = process.child.try_wait().unwrap() {
                panic!("coordinator exited with {status}:\n{}", process.log_text());
            }
            assert!(Instant::now() < until, "coordinator did not start:\n{}", process.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
        process
    }

    /// `https://localhost:PORT`.
    pub fn url(&self) -> String {
        let addr = std::fs::read_to_string(self.state_dir.join("listen-addr")).unwrap();
        format!("https://localhost:{}", addr.trim().rsplit(':').next().unwrap())
    }

    /// The initial join token.
    pub fn token(&self) -> String {
        std::fs::read_to_string(self.state_dir.join("join-token")).unwrap().trim().to_string()
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for exit, failing after `limit`.
    pub fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        wait_child(&mut self.child, limit)
            .unwrap_or_else(|| panic!("coordinator still running after {limit:?}:\n{}", self.log_text()))
    }

    /// The metrics lines.
    pub fn metrics(&self) -> Vec<serde_json::Value> {
        read_metrics(&self.state_dir)
    }

    /// Its `status.json` (the default status before the first write).
    pub fn status(&self) -> CoordinatorStatus {
        read_status(&self.state_dir)
    }

    /// Waits until its status satisfies `condition`, failing with `what` after `limit`.
    pub fn wait_status(&self, limit: Duration, what: &str, mut condition: impl FnMut(&CoordinatorStatus) -> bool) {
        wait_until(limit, what, || condition(&self.status()));
    }
}

/// The coordinator's `STATE/status.json`, or the default status when there is none yet.
pub fn read_status(state_dir: &Path) -> CoordinatorStatus {
    StateDir::new(state_dir).read_status().expect("status.json parses").unwrap_or_default()
}

/// The client id an enrolled client's state directory holds.
pub fn client_id(client_dir: &Path) -> String {
    ClientState::new(client_dir).load().expect("enrolled client").record.client_id
}

impl Drop for CoordinatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP port that was free a moment ago, for a coordinator that must keep its address across
/// restarts.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Polls `condition` every 20 ms until it holds, failing with `what` after `limit`.
pub fn wait_until(limit: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let until = Instant::now() + limit;
    while !condition() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends a signal to a process.
pub fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill").args([&format!("-{sig}"), &child.id().to_string()]).status().unwrap();
    assert!(status.success(), "kill -{sig} failed");
}

/// Checks that a model file decodes and has finite weights.
pub fn assert_model_valid(path: &Path) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (_, weights) = fl_common::decode_model(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        weights.tensors.iter().all(|t| t.data.iter().all(|v| v.is_finite())),
        "{} has non-finite weights",
        path.display()
    );
}

/// Waits for a child to exit, up to `limit`.
pub fn wait_child(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let until = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() >= until {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The last completed round that `STATE/progress.json` records (0 before the first).
pub fn committed_rounds(state_dir: &Path) -> u32 {
    StateDir::new(state_dir).progress().expect("progress.json parses").completed_round
}

/// Parsed lines of `STATE/metrics.jsonl`.
pub fn read_metrics(state_dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(state_dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("metrics line is JSON"))
        .collect()
}

/// Enrolls a client into `state_dir`.
pub fn enroll(url: &str, token: &str, state_dir: &Path, name: &str) -> Output {
    run(command("fl-client")
        .args(["enroll", "--coordinator", url, "--token", token, "--name", name, "--state-dir"])
        .arg(state_dir))
}

/// A client daemon process.
#[derive(Debug)]
pub struct ClientProcess {
    /// The child.
    pub child: Child,
    /// Log file.
    pub log: PathBuf,
}

impl ClientProcess {
    /// Starts `fl-client run` with one thread.
    pub fn start(url: &str, state_dir: &Path, data: &Path) -> ClientProcess {
        ClientProcess::start_with(url, state_dir, data, &[])
    }

    /// [`ClientProcess::start`] with more flags for `run` (e.g. `--pretrained DIR`).
    pub fn start_with(url: &str, state_dir: &Path, data: &Path, extra: &[&std::ffi::OsStr]) -> ClientProcess {
        let log = state_dir.with_extension("log");
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let child = command("fl-client")
            .args(["run", "--coordinator", url, "--threads", "1", "--max-backoff", "2", "--state-dir"])
            .arg(state_dir)
            .arg("--data")
            .arg(data)
            .args(extra)
            .stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file))
            .spawn()
            .expect("client starts");
        ClientProcess { child, log }
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ClientProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits up to `limit` for the coordinator to finish its federation, then up to 30 s for each
/// client to exit after it; every one must succeed.
pub fn finish_federation(coordinator: &mut CoordinatorProcess, clients: &mut [ClientProcess], limit: Duration) {
    let status = coordinator.wait(limit);
    assert!(status.success(), "coordinator failed:\n{}", coordinator.log_text());
    for c in clients {
        let status = wait_child(&mut c.child, Duration::from_secs(30)).unwrap_or_else(|| {
            panic!("client did not exit within 30 s after the federation ended; its log:\n{}", c.log_text())
        });
        assert!(status.success(), "client failed:\n{}", c.log_text());
    }
}

/// Starts one client per enrolled state dir, each on its own shard (`root/data/shard-N.csv`).
pub fn start_clients(root: &Path, url: &str, dirs: &[PathBuf]) -> Vec<ClientProcess> {
    dirs.iter()
        .enumerate()
        .map(|(i, d)| ClientProcess::start(url, d, &root.join(format!("data/shard-{}.csv", i + 1))))
        .collect()
}

/// Round settings for the in-process tests: `rounds` rounds of every connected client, at least
/// `min_clients`, a 60 s deadline, one local epoch of Adam (batch 32, lr 0.01), seed 7, the exact
/// codec only; each test changes what it is about.
pub fn plain_round_settings(rounds: u32, min_clients: usize) -> fl_server::RoundSettings {
    fl_server::RoundSettings {
        rounds,
        min_clients,
        clients_per_round: 0,
        over_sample: 1.0,
        round_timeout: Duration::from_secs(60),
        local_epochs: 1,
        batch_size: 32,
        lr: 0.01,
        optimizer: "adam".into(),
        seed: 7,
        long_run: Default::default(),
        max_update_norm: 1.0e4,
        update_codecs: Vec::new(),
        max_failed_attempts: 3,
    }
}

/// A `serve` configuration for the in-process tests: labels a and b, TLS names localhost and
/// 127.0.0.1, seed 1, and nothing else turned on; each test sets what it is about.
pub fn plain_serve_config(state_dir: &Path, settings: fl_server::RoundSettings) -> fl_server::ServeConfig {
    fl_server::ServeConfig {
        state_dir: state_dir.to_path_buf(),
        model: fl_server::ModelArgs { labels: Some(vec!["a".into(), "b".into()]), ..Default::default() },
        eval_data: None,
        settings,
        tls_sans: vec!["localhost".into(), "127.0.0.1".into()],
        seed: 1,
        init_model: None,
        spool: None,
        dashboard: None,
        dp: Default::default(),
        secagg: Default::default(),
        strategy: Default::default(),
        distill: Default::default(),
        compression: vec![fl_common::tls::Compression::Gzip, fl_common::tls::Compression::Zstd],
    }
}

/// A small federation: data in `root/data`, a coordinator in `root/coordinator`, and
/// `clients` enrolled clients (not started).
pub fn enrolled_federation(
    root: &Path,
    rows: usize,
    clients: usize,
    listen: &str,
    serve_args: &[&str],
) -> (CoordinatorProcess, Vec<PathBuf>) {
    gen_data(&root.join("data"), rows, clients);
    let eval = root.join("data/eval.csv");
    let mut args = vec!["--eval-data", eval.to_str().unwrap()];
    args.extend_from_slice(serve_args);
    let coordinator = CoordinatorProcess::start_with(&root.join("coordinator"), listen, &args, &[]);
    let dirs: Vec<PathBuf> = (1..=clients).map(|i| root.join(format!("client-{i}"))).collect();
    for (i, dir) in dirs.iter().enumerate() {
        let out = enroll(&coordinator.url(), &coordinator.token(), dir, &format!("client-{}", i + 1));
        assert!(out.status.success(), "enroll failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    (coordinator, dirs)
}

/// A client played by hand over gRPC: joined, with its work stream.
#[derive(Debug)]
pub struct RawClient {
    /// The client's id.
    pub id: String,
    /// The gRPC client.
    pub client: FederationClient<Channel>,
    /// The work stream of its Join.
    pub work: tonic::Streaming<pb::Instruction>,
}

impl RawClient {
    /// Connects with `identity`, joins, and reads the welcome.
    pub async fn join(url: &str, identity: &Identity) -> RawClient {
        Self::try_join(url, identity).await.expect("join succeeds")
    }

    /// Connects with `identity` and joins; the refusal if the coordinator refuses it.
    pub async fn try_join(url: &str, identity: &Identity) -> Result<RawClient, tonic::Status> {
        let channel = fl_common::tls::connect(url, &identity.ca_pem, Some(&identity.key)).await.unwrap();
        let mut client = FederationClient::new(channel);
        let mut work = client.join(pb::JoinRequest { name: "raw".into(), num_examples: 10 }).await?.into_inner();
        let welcome = work.message().await?.expect("a welcome");
        assert!(matches!(welcome.kind, Some(pb::instruction::Kind::Welcome(_))), "first message is the welcome");
        Ok(RawClient { id: identity.record.client_id.clone(), client, work })
    }

    /// The next message of the work stream, within 30 s.
    pub async fn next_message(&mut self) -> Result<Option<pb::Instruction>, tonic::Status> {
        tokio::time::timeout(Duration::from_secs(30), self.work.message()).await.expect("a message within 30 s")
    }

    /// The next round task, within 30 s.
    pub async fn next_task(&mut self) -> pb::RoundTask {
        loop {
            let message = self.next_message().await.unwrap().expect("the work stream is open");
            if let Some(pb::instruction::Kind::Round(task)) = message.kind {
                return task;
            }
        }
    }

    /// The next round task of `round`, skipping older ones.
    pub async fn task_of_round(&mut self, round: u32) -> pb::RoundTask {
        loop {
            let task = self.next_task().await;
            if task.round >= round {
                return task;
            }
        }
    }

    /// Downloads the global model of `task`.
    pub async fn global(&mut self, task: &pb::RoundTask) -> TensorSet {
        let mut stream = self
            .client
            .fetch_model(pb::FetchModelRequest { round: task.round, attempt: task.attempt, ..Default::default() })
            .await
            .unwrap()
            .into_inner();
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.message().await.unwrap() {
            bytes.extend_from_slice(&chunk.data);
        }
        decode_model(&bytes).unwrap().1
    }

    /// Uploads `chunks`.
    pub async fn submit(&mut self, chunks: Vec<pb::UpdateChunk>) -> Result<pb::SubmitAck, tonic::Status> {
        self.client.submit_update(tokio_stream::iter(chunks)).await.map(|r| r.into_inner())
    }

    /// Sends a heartbeat; whether the attempt is still open for this client.
    pub async fn heartbeat(&mut self, task: &pb::RoundTask) -> Result<bool, tonic::Status> {
        let ack = self
            .client
            .heartbeat(pb::HeartbeatRequest { round: task.round, attempt: task.attempt, progress: 0.5 })
            .await?;
        Ok(ack.into_inner().round_open)
    }
}

/// The header of an upload of `payload` for `task`.
pub fn update_header(task: &pb::RoundTask, payload: &[u8], examples: u64) -> pb::UpdateHeader {
    pb::UpdateHeader {
        round: task.round,
        attempt: task.attempt,
        codec: "safetensors-f32".into(),
        total_bytes: payload.len() as u64,
        num_examples: examples,
        train_loss: 1.0,
        train_accuracy: 0.5,
        ..Default::default()
    }
}

/// A well-formed upload of `delta`.
pub fn upload(task: &pb::RoundTask, delta: &TensorSet, examples: u64) -> Vec<pb::UpdateChunk> {
    let payload = delta.encode(None);
    let digest = sha256_hex(&payload);
    upload_chunks(update_header(task, &payload, examples), payload, digest).collect()
}

/// A tensor set shaped like `global` with every value `value`.
pub fn filled(global: &TensorSet, value: f32) -> TensorSet {
    let mut delta = global.zeros_like();
    for t in &mut delta.tensors {
        t.data.iter_mut().for_each(|v| *v = value);
    }
    delta
}

/// Checks that an upload was refused with `code` and a message containing `reason`.
pub fn expect_refused(result: Result<pb::SubmitAck, tonic::Status>, code: tonic::Code, reason: &str) {
    let status = result.expect_err("the upload is refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(status.message().contains(reason), "expected '{reason}' in '{}'", status.message());
}

/// Checks that every value of `after` is the one of `before` plus `delta`.
pub fn assert_moved_by(before: &TensorSet, after: &TensorSet, delta: f32) {
    for (t, t0) in after.tensors.iter().zip(&before.tensors) {
        for (v, v0) in t.data.iter().zip(&t0.data) {
            assert!((v - v0 - delta).abs() < 1e-5, "{} moved by {} instead of {delta}", t.name, v - v0);
        }
    }
}

/// A model backend of plain weights for in-process engine tests: `w` of four zeros and `b` of
/// two halves; it reads no data and evaluates nothing.
#[derive(Debug)]
pub struct PlainBackend;

impl fl_server::backend::ModelBackend for PlainBackend {
    fn initial_weights(
        &self,
        _spec: &fl_common::ModelSpec,
        _seed: u64,
    ) -> Result<fl_common::TensorSet, fl_server::backend::BackendError> {
        Ok(fl_common::TensorSet::new(vec![
            fl_common::NamedTensor { name: "w".into(), shape: vec![2, 2], data: vec![0.0; 4] },
            fl_common::NamedTensor { name: "b".into(), shape: vec![2], data: vec![0.5; 2] },
        ]))
    }

    fn check_weights(
        &self,
        _spec: &fl_common::ModelSpec,
        _weights: &fl_common::TensorSet,
    ) -> Result<(), fl_server::backend::BackendError> {
        Ok(())
    }

    fn labels_of(&self, path: &Path) -> Result<Vec<String>, fl_server::backend::BackendError> {
        anyhow::bail!("{}: the plain backend reads no data", path.display())
    }

    fn evaluator(
        &self,
        path: &Path,
        _spec: &fl_common::ModelSpec,
    ) -> Result<Arc<dyn fl_server::backend::Evaluator>, fl_server::backend::BackendError> {
        anyhow::bail!("{}: the plain backend evaluates nothing", path.display())
    }
}
