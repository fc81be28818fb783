//! The round engine in process, in the manner of mini-redis's tests: `fl_server::serve` on
//! 127.0.0.1:0 with real gRPC and mutual TLS, clients enrolled by a real Enroll RPC and played
//! by hand, and a plain model backend (no libtorch). Each test asks the coordinator what
//! happened (its `status.json`, `metrics.jsonl`, the model files), never its log.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use fl_client::identity::{ClientState, Identity};
use fl_common::{decode_model, TensorSet};
use fl_proto::pb;
use fl_server::aggregation::buffered::RoundMode;
use fl_server::aggregation::StrategyArgs;
use fl_server::dp::accountant::RdpAccountant;
use fl_server::dp::{DpArgs, DpLedger};
use fl_server::registry::{ClientStatus, RegistryStore};
use fl_server::spool::{FileSpool, Spool, SpoolFile, SpoolOpen};
use fl_server::{ModelArgs, RoundSettings, ServeConfig, ServeOutcome};
use fl_tests::*;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A coordinator served in this process.
struct Served {
    root: tempfile::TempDir,
    state_dir: PathBuf,
    url: String,
    token: String,
    shutdown: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<ServeOutcome>>>,
}

impl Served {
    async fn start(settings: RoundSettings, spool: Option<Arc<dyn Spool>>) -> Served {
        Self::start_with_dp(settings, spool, DpArgs::default()).await
    }

    async fn start_with_dp(settings: RoundSettings, spool: Option<Arc<dyn Spool>>, dp: DpArgs) -> Served {
        Self::start_full(settings, spool, dp, Default::default()).await
    }

    async fn start_with_strategy(settings: RoundSettings, strategy: StrategyArgs) -> Served {
        Self::start_full(settings, None, DpArgs::default(), strategy).await
    }

    async fn start_full(
        settings: RoundSettings,
        spool: Option<Arc<dyn Spool>>,
        dp: DpArgs,
        strategy: StrategyArgs,
    ) -> Served {
        fl_common::tls::install_crypto_provider();
        let root = tempfile::tempdir().unwrap();
        let state_dir = root.path().join("coordinator");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let config = ServeConfig { spool, dp, strategy, ..plain_serve_config(&state_dir, settings) };
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(fl_server::serve(config, Arc::new(PlainBackend), listener, shutdown.clone()));
        // The address is published once the listener accepts.
        wait_async(Duration::from_secs(30), "the coordinator to listen", || state_dir.join("listen-addr").exists())
            .await;
        let token = std::fs::read_to_string(state_dir.join("join-token")).unwrap().trim().to_string();
        Served { url: format!("https://localhost:{port}"), token, state_dir, root, shutdown, task: Some(task) }
    }

    /// Enrolls a client through the Enroll RPC, as `fl-client enroll` does.
    async fn enroll(&self, name: &str) -> Identity {
        let dir = self.root.path().join(name);
        fl_client::enroll::enroll(&self.url, &self.token, name, &ClientState::new(&dir), false).await.unwrap()
    }

    async fn join(&self, identity: &Identity) -> RawClient {
        RawClient::join(&self.url, identity).await
    }

    fn status(&self) -> CoordinatorStatus {
        read_status(&self.state_dir)
    }

    async fn wait_status(&self, what: &str, condition: impl Fn(&CoordinatorStatus) -> bool) -> CoordinatorStatus {
        wait_async(Duration::from_secs(30), what, || condition(&self.status())).await;
        self.status()
    }

    fn initial(&self) -> TensorSet {
        self.model("model/initial.safetensors")
    }

    fn model(&self, file: &str) -> TensorSet {
        decode_model(&std::fs::read(self.state_dir.join(file)).unwrap()).unwrap().1
    }

    /// Waits for `serve` to return.
    async fn outcome(&mut self) -> ServeOutcome {
        let task = self.task.take().expect("serve runs");
        tokio::time::timeout(Duration::from_secs(30), task).await.expect("serve returns").unwrap().unwrap()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn wait_async(limit: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let until = tokio::time::Instant::now() + limit;
    while !condition() {
        assert!(tokio::time::Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn ids(clients: &[&RawClient]) -> Vec<String> {
    let mut ids: Vec<String> = clients.iter().map(|c| c.id.clone()).collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_completes_with_the_fedavg_of_the_uploaded_deltas() {
    let mut served = Served::start(plain_round_settings(1, 2), None).await;
    let status = served.status();
    assert_eq!((status.phase, status.round, status.rounds_total), (Phase::Waiting, 1, 1), "{status:?}");
    let (ia, ib) = (served.enroll("a").await, served.enroll("b").await);
    let mut a = served.join(&ia).await;
    let status = served.wait_status("a connected", |s| s.connected.len() == 1).await;
    assert_eq!(status.phase, Phase::Waiting, "one client is not enough to start");
    let mut b = served.join(&ib).await;

    let task = a.next_task().await;
    assert_eq!(b.next_task().await, task, "both get the same task");
    assert_eq!((task.round, task.attempt), (1, 0));
    let status = served.wait_status("round 1 to start", |s| s.phase == Phase::Collecting).await;
    assert_eq!(status.sampled, ids(&[&a, &b]));
    let initial = served.initial();
    assert_eq!(a.global(&task).await, initial);
    assert!(a.submit(upload(&task, &filled(&initial, 0.1), 10)).await.unwrap().accepted);
    let status = served.wait_status("a's update", |s| !s.accepted.is_empty()).await;
    assert_eq!(status.accepted, vec![a.id.clone()]);
    assert!(b.submit(upload(&task, &filled(&initial, 0.4), 30)).await.unwrap().accepted);

    assert_eq!(served.outcome().await, ServeOutcome::Finished);
    // (10 * 0.1 + 30 * 0.4) / 40 = 0.325
    assert_moved_by(&initial, &served.model("model/round-0001.safetensors"), 0.325);
    assert_eq!(served.model("model/final.safetensors"), served.model("model/round-0001.safetensors"));
    let metrics = read_metrics(&served.state_dir);
    assert_eq!(metrics.len(), 1);
    assert_eq!((metrics[0]["round"].as_u64(), metrics[0]["attempt"].as_u64()), (Some(1), Some(0)));
    assert_eq!((metrics[0]["participants"].as_u64(), metrics[0]["examples"].as_u64()), (Some(2), Some(40)));
    assert!(metrics[0]["accuracy"].is_null(), "no eval data, no accuracy");
    let status = served.status();
    assert_eq!((status.phase, status.completed_rounds, status.round), (Phase::Finished, 1, 1), "{status:?}");
    assert_eq!(status.last_failure, None);
    for client in [&mut a, &mut b] {
        let finished = client.next_message().await.unwrap().unwrap();
        assert!(matches!(finished.kind, Some(pb::instruction::Kind::Finished(_))), "{finished:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sampled_client_that_reconnects_mid_round_gets_the_task_again() {
    let mut served = Served::start(plain_round_settings(1, 2), None).await;
    let (ia, ib) = (served.enroll("a").await, served.enroll("b").await);
    let mut a = served.join(&ia).await;
    let b = served.join(&ib).await;
    let task = a.next_task().await;
    let b_id = b.id.clone();
    served.wait_status("round 1 with both", |s| s.phase == Phase::Collecting && s.connected.contains(&b_id)).await;
    drop(b);
    served.wait_status("b to disconnect", |s| !s.connected.contains(&b_id)).await;
    let status = served.status();
    assert_eq!((status.phase, status.attempt), (Phase::Collecting, 0), "the round waits for b: {status:?}");

    let mut b = served.join(&ib).await;
    assert_eq!(b.next_task().await, task, "the reconnected client gets the same task again");
    let initial = served.initial();
    assert!(a.submit(upload(&task, &filled(&initial, 0.2), 10)).await.unwrap().accepted);
    assert!(b.submit(upload(&task, &filled(&initial, 0.2), 10)).await.unwrap().accepted);
    assert_eq!(served.outcome().await, ServeOutcome::Finished);
    let metrics = read_metrics(&served.state_dir);
    assert_eq!((metrics[0]["attempt"].as_u64(), metrics[0]["participants"].as_u64()), (Some(0), Some(2)));
    assert_moved_by(&initial, &served.model("model/round-0001.safetensors"), 0.2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_late_and_unsampled_updates_are_refused() {
    let mut served = Served::start(plain_round_settings(2, 2), None).await;
    let (ia, ib, ic) = (served.enroll("a").await, served.enroll("b").await, served.enroll("c").await);
    let mut a = served.join(&ia).await;
    let mut b = served.join(&ib).await;
    let first = a.next_task().await;
    b.next_task().await;
    let initial = served.initial();
    let update = upload(&first, &filled(&initial, 0.1), 10);
    assert!(a.submit(update.clone()).await.unwrap().accepted);
    expect_refused(a.submit(update.clone()).await, tonic::Code::FailedPrecondition, "duplicate");
    assert!(!a.heartbeat(&first).await.unwrap(), "the round is over for a client that answered");
    assert!(b.submit(upload(&first, &filled(&initial, 0.1), 10)).await.unwrap().accepted);

    let second = a.task_of_round(2).await;
    assert_eq!(b.task_of_round(2).await, second);
    expect_refused(a.submit(update).await, tonic::Code::FailedPrecondition, "stale");
    let mut c = served.join(&ic).await;
    served.wait_status("c connected", |s| s.connected.contains(&c.id)).await;
    expect_refused(
        c.submit(upload(&second, &filled(&initial, 0.1), 10)).await,
        tonic::Code::PermissionDenied,
        "not sampled",
    );
    let fetch = c
        .client
        .fetch_model(pb::FetchModelRequest { round: second.round, attempt: second.attempt, ..Default::default() })
        .await;
    assert_eq!(fetch.err().map(|s| s.code()), Some(tonic::Code::PermissionDenied), "only sampled clients fetch");
    let global = a.global(&second).await;
    assert!(a.submit(upload(&second, &filled(&global, -0.1), 10)).await.unwrap().accepted);
    assert!(b.submit(upload(&second, &filled(&global, -0.1), 10)).await.unwrap().accepted);
    assert_eq!(served.outcome().await, ServeOutcome::Finished);
    let metrics = read_metrics(&served.state_dir);
    assert_eq!(metrics.len(), 2);
    assert!(metrics.iter().all(|m| m["participants"] == 2 && m["rejected"] == 0), "{metrics:?}");
    assert_moved_by(&initial, &served.model("model/final.safetensors"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_client_is_refused_at_once() {
    let served = Served::start(plain_round_settings(100, 1), None).await;
    let (ia, ib) = (served.enroll("a").await, served.enroll("b").await);
    let _a = served.join(&ia).await;
    let mut b = served.join(&ib).await;
    served.wait_status("both connected", |s| s.connected.len() == 2).await;
    // Revoke b as `fl-coordinator clients revoke` does: through the registry file.
    let registry = RegistryStore::open(&served.state_dir).unwrap();
    let revoked = registry
        .update(|r| r.clients.iter_mut().filter(|c| c.id == b.id).map(|c| c.status = ClientStatus::Revoked).count())
        .unwrap();
    assert_eq!(revoked, 1);
    // Its work stream ends with the refusal.
    let refusal = loop {
        match b.next_message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended without a reason"),
            Err(status) => break status,
        }
    };
    assert_eq!(refusal.code(), tonic::Code::PermissionDenied, "{refusal:?}");
    assert!(refusal.message().contains("revoked"), "{}", refusal.message());
    let again = RawClient::try_join(&served.url, &ib).await.expect_err("its certificate no longer joins");
    assert_eq!(again.code(), tonic::Code::PermissionDenied);
    let heartbeat =
        b.client.heartbeat(pb::HeartbeatRequest { round: 1, attempt: 0, progress: 0.0 }).await.expect_err("refused");
    assert_eq!(heartbeat.code(), tonic::Code::PermissionDenied);
    let status = served.wait_status("b to leave the status", |s| s.connected.len() == 1).await;
    assert!(!status.connected.contains(&b.id) && !status.sampled.contains(&b.id), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_sampling_closes_the_round_at_the_target() {
    let mut settings = plain_round_settings(3, 2);
    (settings.clients_per_round, settings.over_sample) = (2, 2.0);
    let mut served = Served::start(settings, None).await;
    let mut clients = Vec::new();
    for name in ["a", "b", "c", "d"] {
        let identity = served.enroll(name).await;
        clients.push(served.join(&identity).await);
    }
    // Round 1 started as soon as two clients were connected; its sampled clients answer it.
    let status = served.wait_status("round 1", |s| s.phase == Phase::Collecting && s.round == 1).await;
    let initial = served.initial();
    let mut answered = 0;
    for c in clients.iter_mut().filter(|c| status.sampled.contains(&c.id)) {
        let task = c.task_of_round(1).await;
        if answered < 2 {
            assert!(c.submit(upload(&task, &filled(&initial, 0.1), 10)).await.unwrap().accepted);
            answered += 1;
        }
    }
    // Round 2 samples all four (2 wanted, times 2) and closes when two updates are in.
    let status = served.wait_status("round 2", |s| s.phase == Phase::Collecting && s.round == 2).await;
    assert_eq!(status.sampled.len(), 4, "{status:?}");
    let mut tasks = Vec::new();
    for c in clients.iter_mut() {
        tasks.push(c.task_of_round(2).await);
    }
    let global = clients[0].global(&tasks[0]).await;
    for (c, task) in clients.iter_mut().zip(&tasks).take(2) {
        assert!(c.submit(upload(task, &filled(&global, 0.1), 10)).await.unwrap().accepted);
    }
    served.wait_status("round 2 to complete", |s| s.completed_rounds == 2).await;
    let (straggler, task) = (&mut clients[2], &tasks[2]);
    assert!(!straggler.heartbeat(task).await.unwrap(), "stragglers are told to stop");
    expect_refused(
        straggler.submit(upload(task, &filled(&global, 0.1), 10)).await,
        tonic::Code::FailedPrecondition,
        "stale",
    );
    let metrics = read_metrics(&served.state_dir);
    assert_eq!((metrics[1]["sampled"].as_u64(), metrics[1]["participants"].as_u64()), (Some(4), Some(2)));
    assert_moved_by(&initial, &served.model("model/round-0002.safetensors"), 0.2);
    served.shutdown.cancel();
    assert_eq!(served.outcome().await, ServeOutcome::Interrupted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deadline_completes_a_round_with_enough_updates_and_retries_one_without() {
    let mut settings = plain_round_settings(1, 2);
    settings.round_timeout = Duration::from_secs(3);
    let mut served = Served::start(settings, None).await;
    let mut clients = Vec::new();
    for name in ["a", "b", "c"] {
        let identity = served.enroll(name).await;
        clients.push(served.join(&identity).await);
    }
    // Attempt 0 may have started with two clients; only one answers it.
    let status = served.wait_status("attempt 0", |s| s.phase == Phase::Collecting).await;
    let initial = served.initial();
    let first = clients.iter_mut().find(|c| status.sampled.contains(&c.id)).unwrap();
    let task = first.next_task().await;
    assert!(first.submit(upload(&task, &filled(&initial, 0.1), 10)).await.unwrap().accepted);
    let status = served.wait_status("attempt 1", |s| s.attempt == 1 && s.phase == Phase::Collecting).await;
    assert_eq!(status.failed_attempts, 1);
    let failure = status.last_failure.clone().unwrap_or_default();
    assert!(failure.contains("round 1 attempt 0: too few good updates: 1 accepted, 2 needed"), "{failure}");
    assert_eq!(status.sampled.len(), 3, "all three are connected now");
    // Attempt 1: two of three answer; the third is silent, and the deadline closes the round.
    for c in clients.iter_mut().take(2) {
        let task = loop {
            let task = c.next_task().await;
            if task.attempt == 1 {
                break task;
            }
        };
        assert!(c.submit(upload(&task, &filled(&initial, 0.3), 10)).await.unwrap().accepted);
    }
    assert_eq!(served.outcome().await, ServeOutcome::Finished);
    let metrics = read_metrics(&served.state_dir);
    assert_eq!(metrics.len(), 1, "no line for the failed attempt");
    assert_eq!((metrics[0]["attempt"].as_u64(), metrics[0]["participants"].as_u64()), (Some(1), Some(2)));
    assert_eq!(metrics[0]["sampled"].as_u64(), Some(3));
    assert_moved_by(&initial, &served.model("model/round-0001.safetensors"), 0.3);
}

/// A spool that fails every write with ENOSPC while `full` is set, as a full disk does.
#[derive(Debug, Default)]
struct FullDisk {
    full: Arc<AtomicBool>,
}

struct NoSpace;

impl tokio::io::AsyncWrite for NoSpace {
    fn poll_write(self: std::pin::Pin<&mut Self>, _: &mut Context<'_>, _: &[u8]) -> Poll<std::io::Result<usize>> {
        Poll::Ready(Err(std::io::Error::from_raw_os_error(libc_enospc())))
    }
    fn poll_flush(self: std::pin::Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: std::pin::Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// ENOSPC on Linux and the BSDs.
fn libc_enospc() -> i32 {
    28
}

impl Spool for FullDisk {
    fn create(&self, path: PathBuf) -> SpoolOpen {
        if self.full.load(Ordering::SeqCst) {
            Box::pin(async { Ok(Box::pin(NoSpace) as SpoolFile) })
        } else {
            FileSpool.create(path)
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_the_attempt_visibly_and_the_federation_recovers() {
    let disk = FullDisk::default();
    let full = disk.full.clone();
    full.store(true, Ordering::SeqCst);
    let mut served = Served::start(plain_round_settings(2, 2), Some(Arc::new(disk))).await;
    let (ia, ib) = (served.enroll("a").await, served.enroll("b").await);
    let mut clients = [served.join(&ia).await, served.join(&ib).await];
    let initial = served.initial();
    for c in clients.iter_mut() {
        let task = c.next_task().await;
        let refused = c.submit(upload(&task, &filled(&initial, 0.1), 10)).await.expect_err("cannot be stored");
        assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
        assert!(refused.message().contains("No space left on device"), "{}", refused.message());
    }
    let status = served.wait_status("the failed attempt", |s| s.failed_attempts >= 1).await;
    let failure = status.last_failure.clone().unwrap_or_default();
    assert!(failure.contains("round 1 attempt 0"), "the failure names the attempt: {failure}");
    assert!(failure.contains("cannot spool the upload") && failure.contains("No space left on device"), "{failure}");
    assert!(read_metrics(&served.state_dir).is_empty(), "no metrics line for an uncommitted round");
    assert!(
        std::fs::read_dir(served.state_dir.join("spool")).unwrap().next().is_none(),
        "no half-written spool file is left"
    );

    // Space comes back: the next attempts go through.
    full.store(false, Ordering::SeqCst);
    for round in 1..=2 {
        for c in clients.iter_mut() {
            let task = c.task_of_round(round).await;
            assert!(task.attempt >= u32::from(round == 1));
            let global = c.global(&task).await;
            assert!(c.submit(upload(&task, &filled(&global, 0.1), 10)).await.unwrap().accepted);
        }
    }
    assert_eq!(served.outcome().await, ServeOutcome::Finished);
    let rounds: Vec<u64> = read_metrics(&served.state_dir).iter().map(|m| m["round"].as_u64().unwrap()).collect();
    assert_eq!(rounds, vec![1, 2]);
    assert_moved_by(&initial, &served.model("model/final.safetensors"), 0.2);
    assert_eq!(served.status().phase, Phase::Finished);
}

/// DP flags: noise multiplier 1, clip norm 0.5, and a budget.
fn dp_args(max_epsilon: Option<f64>) -> DpArgs {
    DpArgs { noise_multiplier: Some(1.0), clip_norm: Some(0.5), max_epsilon, ..DpArgs::default() }
}

/// Plays `rounds` rounds with clients `a` and `b`, each sending a delta of 10 in every
/// coordinate (far above the clip norm).
async fn play_dp_rounds(served: &Served, a: &mut RawClient, b: &mut RawClient, rounds: u32) {
    for round in 1..=rounds {
        let task = a.task_of_round(round).await;
        assert_eq!(b.task_of_round(round).await, task);
        assert_eq!(task.dp_clip_norm, 0.0, "the coordinator clips: clients are not asked to");
        let global = a.global(&task).await;
        for client in [&mut *a, &mut *b] {
            assert!(client.submit(upload(&task, &filled(&global, 10.0), 10)).await.unwrap().accepted);
        }
        served.wait_status("the round to complete", |s| s.completed_rounds >= round).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dp_federation_clips_noises_and_accounts_each_round() {
    let mut served = Served::start_with_dp(plain_round_settings(3, 2), None, dp_args(None)).await;
    let (ia, ib) = (served.enroll("a").await, served.enroll("b").await);
    let (mut a, mut b) = (served.join(&ia).await, served.join(&ib).await);
    let initial = served.initial();
    play_dp_rounds(&served, &mut a, &mut b, 3).await;
    assert_eq!(served.outcome().await, ServeOutcome::Finished);

    // Clipped to 0.5 the two deltas average to 0.5/sqrt(6) per coordinate; noise of
    // standard deviation 1·0.5/2 moves every coordinate on top of that, untouched or not.
    let round1 = served.model("model/round-0001.safetensors");
    let moved: Vec<f32> = round1
        .tensors
        .iter()
        .zip(&initial.tensors)
        .flat_map(|(n, o)| n.data.iter().zip(&o.data).map(|(x, y)| x - y).collect::<Vec<_>>())
        .collect();
    assert!(moved.iter().all(|d| *d != 0.0), "every coordinate gets noise: {moved:?}");
    assert!(moved.iter().any(|d| (d - 0.5 / 6f32.sqrt()).abs() > 1e-3), "not a plain mean: {moved:?}");

    let metrics = read_metrics(&served.state_dir);
    assert_eq!(metrics.len(), 3);
    let mut accountant = RdpAccountant::new();
    let delta = 2f64.powf(-1.1);
    for (i, line) in metrics.iter().enumerate() {
        accountant.compose(1.0, 1.0, 1);
        let want = accountant.epsilon(delta);
        let got = line["dp_epsilon"].as_f64().unwrap_or_else(|| panic!("no dp_epsilon in {line}"));
        assert!((got - want).abs() < 1e-9 * want, "round {}: ε {got} vs {want}", i + 1);
        assert!((line["dp_delta"].as_f64().unwrap() - delta).abs() < 1e-12, "δ = 1/n^1.1 for n = 2: {line}");
        assert_eq!(line["dp_noise_multiplier"].as_f64(), Some(1.0));
        assert_eq!(line["dp_clip_norm"].as_f64(), Some(0.5));
        assert_eq!(line["dp_unclipped"].as_u64(), Some(0), "both updates were clipped");
    }
    // The ledger in the state dir holds the three rounds, for a restart to continue from.
    let ledger = DpLedger::load(&served.state_dir).unwrap().expect("a DP ledger");
    assert_eq!(ledger.accountant.rounds(), 3);
    assert_eq!(ledger.epsilon(2), metrics[2]["dp_epsilon"].as_f64().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_privacy_budget_ends_the_federation_cleanly_before_it_is_exceeded() {
    // One round of q = 1, z = 1 fits the budget; a second does not.
    let delta = 2f64.powf(-1.1);
    let mut accountant = RdpAccountant::new();
    accountant.compose(1.0, 1.0, 1);
    let one = accountant.epsilon(delta);
    accountant.compose(1.0, 1.0, 1);
    let two = accountant.epsilon(delta);
    let mut served = Served::start_with_dp(plain_round_settings(5, 2), None, dp_args(Some((one + two) / 2.0))).await;
    let (ia, ib) = (served.enroll("a").await, served.enroll("b").await);
    let (mut a, mut b) = (served.join(&ia).await, served.join(&ib).await);
    play_dp_rounds(&served, &mut a, &mut b, 1).await;
    assert_eq!(served.outcome().await, ServeOutcome::Finished, "a spent budget is a clean end");
    assert_eq!(read_metrics(&served.state_dir).len(), 1);
    assert_eq!(served.model("model/final.safetensors"), served.model("model/round-0001.safetensors"));
    let finished = a.next_message().await.unwrap().unwrap();
    assert!(matches!(finished.kind, Some(pb::instruction::Kind::Finished(_))), "{finished:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_other_dp_flags_is_refused() {
    let served = Served::start_with_dp(plain_round_settings(1, 2), None, dp_args(Some(4.0))).await;
    served.shutdown.cancel();
    let restart = |dp: DpArgs| {
        let state_dir = served.state_dir.clone();
        async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let config = ServeConfig {
                model: ModelArgs::default(),
                dp,
                ..plain_serve_config(&state_dir, plain_round_settings(1, 2))
            };
            fl_server::serve(config, Arc::new(PlainBackend), listener, CancellationToken::new()).await
        }
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let err = restart(DpArgs { noise_multiplier: Some(0.5), ..dp_args(Some(4.0)) }).await.unwrap_err().to_string();
    assert!(err.contains("--dp-noise-multiplier 0.5 (federation: 1)"), "{err}");
    let err = restart(dp_args(Some(8.0))).await.unwrap_err().to_string();
    assert!(err.contains("--dp-max-epsilon 8 (federation: 4)"), "{err}");
    let err = restart(DpArgs { noise_multiplier: Some(-1.0), ..DpArgs::default() }).await.unwrap_err().to_string();
    assert!(err.contains("--dp-noise-multiplier -1: must be zero or more"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_clipping_on_the_client_the_task_carries_c_and_the_coordinator_still_clips() {
    let dp = DpArgs { clip_on: Some(fl_server::dp::ClipSite::Client), ..dp_args(None) };
    let mut served = Served::start_with_dp(plain_round_settings(1, 2), None, dp).await;
    let (ia, ib) = (served.enroll("a").await, served.enroll("b").await);
    let (mut a, mut b) = (served.join(&ia).await, served.join(&ib).await);
    let task = a.next_task().await;
    assert_eq!(task.dp_clip_norm, 0.5, "clients learn C from the task");
    assert_eq!(b.next_task().await, task);
    let global = a.global(&task).await;
    // a clips as asked; b does not, and the coordinator clips it anyway.
    let mut clipped = filled(&global, 10.0);
    clipped.clip_l2_norm(task.dp_clip_norm);
    assert!(a.submit(upload(&task, &clipped, 10)).await.unwrap().accepted);
    assert!(b.submit(upload(&task, &filled(&global, 10.0), 10)).await.unwrap().accepted);
    assert_eq!(served.outcome().await, ServeOutcome::Finished);
    let metrics = read_metrics(&served.state_dir);
    assert_eq!(metrics[0]["dp_clip_norm"].as_f64(), Some(0.5));
    assert_eq!(metrics[0]["dp_unclipped"].as_u64(), Some(1), "a's update was already within C, b's was not");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_evaluations_are_summarised_per_attempt_and_the_final_model_is_served_after_the_end() {
    let mut served = Served::start(plain_round_settings(1, 2), None).await;
    let (ia, ib) = (served.enroll("a").await, served.enroll("b").await);
    let mut a = served.join(&ia).await;
    let mut b = served.join(&ib).await;
    let first = a.next_task().await;
    b.next_task().await;
    let initial = served.initial();
    let with_eval = |task: &pb::RoundTask, personal: f64, global: f64| {
        let mut chunks = upload(task, &filled(&initial, 0.1), 10);
        let Some(pb::update_chunk::Kind::Header(header)) = chunks[0].kind.as_mut() else { panic!("a header first") };
        header.local_eval =
            Some(pb::LocalEvaluation { personal_accuracy: personal, global_accuracy: global, test_examples: 20 });
        chunks
    };
    // An accuracy above 1 is refused; the attempt then has too few updates and is retried, and
    // the accepted report of the failed attempt is not counted in the round's line.
    let bad = a.submit(with_eval(&first, 1.5, 0.5)).await;
    expect_refused(bad, tonic::Code::InvalidArgument, "bad local evaluation");
    assert!(b.submit(with_eval(&first, 0.2, 0.1)).await.unwrap().accepted);
    let retry = a.next_task().await;
    assert_eq!((retry.round, retry.attempt), (1, 1));
    assert_eq!(b.next_task().await, retry);
    assert!(a.submit(with_eval(&retry, 0.9, 0.5)).await.unwrap().accepted);
    assert!(b.submit(with_eval(&retry, 0.6, 0.7)).await.unwrap().accepted);
    for client in [&mut a, &mut b] {
        let finished = client.next_message().await.unwrap().unwrap();
        assert!(matches!(finished.kind, Some(pb::instruction::Kind::Finished(_))), "{finished:?}");
    }
    // Once finished, the final model is round rounds_completed + 1; other rounds are refused.
    let last = a.global(&pb::RoundTask { round: 2, ..Default::default() }).await;
    let old = a.client.fetch_model(pb::FetchModelRequest { round: 1, attempt: 1, ..Default::default() }).await;
    assert_eq!(old.err().map(|s| s.code()), Some(tonic::Code::FailedPrecondition));
    assert_eq!(served.outcome().await, ServeOutcome::Finished);
    assert_eq!(last, served.model("model/final.safetensors"));

    let metrics = read_metrics(&served.state_dir);
    assert_eq!(metrics.len(), 1);
    let line = &metrics[0];
    assert_eq!((line["attempt"].as_u64(), line["local_eval_clients"].as_u64()), (Some(1), Some(2)), "{line}");
    let field = |name: &str| line[name].as_f64().unwrap();
    // Means (0.9 + 0.6)/2 and (0.5 + 0.7)/2; 10th percentiles 0.6 + 0.1·0.3 and 0.5 + 0.1·0.2.
    assert!((field("personal_accuracy_mean") - 0.75).abs() < 1e-12, "{line}");
    assert!((field("personal_accuracy_p10") - 0.63).abs() < 1e-12, "{line}");
    assert!((field("local_global_accuracy_mean") - 0.6).abs() < 1e-12, "{line}");
    assert!((field("local_global_accuracy_p10") - 0.52).abs() < 1e-12, "{line}");
}

fn async_mode(buffer_size: usize, max_staleness: u32) -> StrategyArgs {
    StrategyArgs {
        mode: Some(RoundMode::Async),
        buffer_size: Some(buffer_size),
        max_staleness: Some(max_staleness),
        ..Default::default()
    }
}

/// A client's local "training" as a pure function of the model, the client and the task, so
/// two runs that hand out the same tasks on the same models get the same updates.
fn local_delta(global: &TensorSet, client: usize, task: &pb::RoundTask) -> TensorSet {
    let seed = task.config.as_ref().unwrap().seed;
    let mut delta = global.zeros_like();
    for (t, g) in delta.tensors.iter_mut().zip(&global.tensors) {
        for (i, (d, w)) in t.data.iter_mut().zip(&g.data).enumerate() {
            *d = 0.3 * (w * (client as f32 + 1.7)).sin() + ((seed % 97) as f32 * 0.001 + i as f32 * 0.01) / 3.0;
        }
    }
    delta
}

/// Three clients of equal speed play `rounds` rounds: each takes its task, downloads the model
/// and uploads its delta, one after the other; returns the model file of every round.
async fn play_equal_speeds(served: &mut Served, rounds: u32) -> Vec<TensorSet> {
    let identities = [served.enroll("a").await, served.enroll("b").await, served.enroll("c").await];
    let mut clients = Vec::new();
    for identity in &identities {
        clients.push(served.join(identity).await);
    }
    for round in 1..=rounds {
        for (i, client) in clients.iter_mut().enumerate() {
            let task = client.task_of_round(round).await;
            assert_eq!((task.round, task.attempt), (round, 0));
            let global = client.global(&task).await;
            let examples = 10 * (i as u64 + 1);
            assert!(client.submit(upload(&task, &local_delta(&global, i, &task), examples)).await.unwrap().accepted);
        }
    }
    assert_eq!(served.outcome().await, ServeOutcome::Finished);
    (1..=rounds).map(|r| served.model(&format!("model/round-{r:04}.safetensors"))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_mode_with_equal_speeds_and_k_equal_to_the_clients_is_synchronous_fedavg() {
    let mut sync = Served::start(plain_round_settings(3, 3), None).await;
    let sync_models = play_equal_speeds(&mut sync, 3).await;
    let mut buffered = Served::start_with_strategy(plain_round_settings(3, 3), async_mode(3, 0)).await;
    let async_models = play_equal_speeds(&mut buffered, 3).await;
    assert_ne!(sync_models[0], sync.initial(), "the rounds moved the model");
    for (round, (s, a)) in sync_models.iter().zip(&async_models).enumerate() {
        assert_eq!(s, a, "round {}: async step and synchronous FedAvg round differ", round + 1);
    }
    for line in read_metrics(&buffered.state_dir) {
        assert_eq!(line["participants"].as_u64(), Some(3), "{line}");
        assert_eq!(line["staleness_mean"].as_f64(), Some(0.0), "{line}");
        assert_eq!((line["staleness_max"].as_u64(), line["dropped_stale"].as_u64()), (Some(0), Some(0)), "{line}");
    }
    assert!(read_metrics(&sync.state_dir)[0].get("staleness_mean").is_none(), "sync rounds have no staleness");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_mode_weights_stale_updates_and_refuses_those_staler_than_s() {
    // K = 1: a step after every update. S = 1.
    let mut served = Served::start_with_strategy(plain_round_settings(4, 2), async_mode(1, 1)).await;
    let (ia, ib) = (served.enroll("a").await, served.enroll("b").await);
    let (mut a, mut b) = (served.join(&ia).await, served.join(&ib).await);
    let initial = served.initial();
    let (a1, b1) = (a.task_of_round(1).await, b.task_of_round(1).await);
    assert_eq!(a1, b1, "step 1's task goes to both clients");
    assert!(a.submit(upload(&a1, &filled(&initial, 0.1), 10)).await.unwrap().accepted);
    served.wait_status("step 1", |s| s.completed_rounds == 1).await;
    let model1 = served.model("model/round-0001.safetensors");
    assert_moved_by(&initial, &model1, 0.1);

    // Step 2: a trains on model 1; b is still on the initial model, which it can still download.
    let a2 = a.task_of_round(2).await;
    assert_eq!(b.global(&b1).await, initial);
    assert!(b.heartbeat(&b1).await.unwrap(), "staleness 1 is within --max-staleness 1");
    assert!(b.submit(upload(&b1, &filled(&initial, 0.4), 10)).await.unwrap().accepted);
    served.wait_status("step 2", |s| s.completed_rounds == 2).await;
    let model2 = served.model("model/round-0002.safetensors");
    assert_moved_by(&model1, &model2, 0.4 / 2f32.sqrt());

    // Step 3 with b's fresh update; a's task (of step 2) then has staleness 2 and is dropped.
    let b3 = b.task_of_round(3).await;
    assert!(b.submit(upload(&b3, &filled(&initial, 0.2), 10)).await.unwrap().accepted);
    served.wait_status("step 3", |s| s.completed_rounds == 3).await;
    assert!(!a.heartbeat(&a2).await.unwrap(), "a's task is too stale: the heartbeat stops it");
    expect_refused(a.submit(upload(&a2, &filled(&initial, 5.0), 10)).await, tonic::Code::FailedPrecondition, "stale");
    let a4 = a.task_of_round(4).await;
    assert!(a.submit(upload(&a4, &filled(&initial, 0.3), 10)).await.unwrap().accepted);
    assert_eq!(served.outcome().await, ServeOutcome::Finished);
    assert_moved_by(&served.model("model/round-0003.safetensors"), &served.model("model/final.safetensors"), 0.3);

    let metrics = read_metrics(&served.state_dir);
    let field = |line: &serde_json::Value, name: &str| line[name].as_f64().unwrap();
    let staleness: Vec<(f64, f64, f64)> = metrics
        .iter()
        .map(|l| (field(l, "staleness_mean"), field(l, "staleness_max"), field(l, "dropped_stale")))
        .collect();
    assert_eq!(staleness, vec![(0.0, 0.0, 0.0), (1.0, 1.0, 0.0), (0.0, 0.0, 0.0), (0.0, 0.0, 1.0)]);
    assert!(served.status().refused.get("stale").is_some_and(|n| *n >= 1), "{:?}", served.status().refused);
}

/// Clients that compress on the wire (gzip, zstd) and one that does not share a round: the
/// coordinator reads all three uploads, compresses each download in the encoding its client asks
/// for, and `bytes_up`/`bytes_down` count the same payload bytes as for plain clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_and_plain_clients_share_a_round_and_bytes_count_the_payload() {
    use fl_common::tls::Compression;
    let mut served = Served::start(plain_round_settings(1, 3), None).await;
    let mut clients = Vec::new();
    for (name, compression) in [("plain", Compression::None), ("gzip", Compression::Gzip), ("zstd", Compression::Zstd)]
    {
        let identity = served.enroll(name).await;
        let mut client = served.join(&identity).await;
        if let Some(encoding) = compression.encoding() {
            client.client = client.client.clone().send_compressed(encoding).accept_compressed(encoding);
        }
        clients.push((client, compression));
    }
    let initial = served.initial();
    let (mut payload_up, mut payload_down) = (0, 0);
    for (i, (client, compression)) in clients.iter_mut().enumerate() {
        let task = client.next_task().await;
        let response = client
            .client
            .fetch_model(pb::FetchModelRequest { round: task.round, attempt: task.attempt, ..Default::default() })
            .await
            .unwrap();
        let encoding = response.metadata().get("grpc-encoding").map(|v| v.to_str().unwrap().to_string());
        let asked = compression.encoding().map(|e| e.to_string());
        assert_eq!(encoding, asked, "the download is compressed as the client asked");
        let mut stream = response.into_inner();
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.message().await.unwrap() {
            bytes.extend_from_slice(&chunk.data);
        }
        assert_eq!(bytes.len() as u64, task.model_bytes);
        payload_down += task.model_bytes;
        assert_eq!(decode_model(&bytes).unwrap().1, initial, "{compression:?}: the same model");
        let delta = filled(&initial, 0.1 * (i + 1) as f32);
        payload_up += delta.encode(None).len() as u64;
        assert!(client.submit(upload(&task, &delta, 10)).await.unwrap().accepted, "{compression:?}: accepted");
    }
    assert_eq!(served.outcome().await, ServeOutcome::Finished);
    assert_moved_by(&initial, &served.model("model/round-0001.safetensors"), 0.2);
    let metrics = read_metrics(&served.state_dir);
    assert_eq!(metrics[0]["participants"].as_u64(), Some(3));
    assert_eq!(metrics[0]["bytes_up"].as_u64(), Some(payload_up), "uploads count their payload, compressed or not");
    assert_eq!(metrics[0]["bytes_down"].as_u64(), Some(payload_down), "downloads count the model, compressed or not");
}
