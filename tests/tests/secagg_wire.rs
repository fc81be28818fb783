//! Secure aggregation through the real gRPC service in process: `fl_server::serve` with mutual
//! TLS on 127.0.0.1:0, a plain model backend, and three clients played by hand that run the
//! client library's four stages (`fl_client::secagg::submit`). A plain `SubmitUpdate` is
//! refused in a secure round, a replayed stage message is refused, and the round's model moves
//! by the mean of the three updates. With differential privacy, the round task tells clients to
//! clip and the coordinator adds its noise to the unmasked sum; flags that cannot work with
//! secure aggregation are refused before anything starts.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fl_client::identity::ClientState;
use fl_common::decode_model;
use fl_proto::pb;
use fl_server::aggregation::{StrategyArgs, StrategyKind};
use fl_server::dp::{ClipSite, DpArgs};
use fl_server::secagg::SecAggArgs;
use fl_server::{RoundSettings, ServeConfig, ServeOutcome};
use fl_tests::*;
use tokio_util::sync::CancellationToken;

/// One round of `clients` clients with secure aggregation, and the rest as given.
fn secure_config(
    state_dir: &Path,
    dp: DpArgs,
    strategy: StrategyArgs,
    round_timeout: Duration,
    clients: usize,
) -> ServeConfig {
    let settings = RoundSettings { round_timeout, ..fl_tests::plain_round_settings(1, clients) };
    ServeConfig {
        dp,
        secagg: SecAggArgs { enabled: true, ..SecAggArgs::default() },
        strategy,
        ..plain_serve_config(state_dir, settings)
    }
}

/// A running coordinator and its joined clients, each with its round task.
struct SecureRound {
    _root: tempfile::TempDir,
    state_dir: std::path::PathBuf,
    served: tokio::task::JoinHandle<anyhow::Result<ServeOutcome>>,
    shutdown: CancellationToken,
    clients: Vec<RawClient>,
    tasks: Vec<pb::RoundTask>,
    /// The round's global model.
    global: fl_common::TensorSet,
}

impl SecureRound {
    async fn start(dp: DpArgs, round_timeout: Duration, n: usize) -> SecureRound {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let root = tempfile::tempdir().unwrap();
        let state_dir = root.path().join("coordinator");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let config = secure_config(&state_dir, dp, StrategyArgs::default(), round_timeout, n);
        let shutdown = CancellationToken::new();
        let served = tokio::spawn(fl_server::serve(config, Arc::new(PlainBackend), listener, shutdown.clone()));
        let url = format!("https://localhost:{port}");
        wait_until(Duration::from_secs(30), "the coordinator to listen", || state_dir.join("listen-addr").exists());
        let token = std::fs::read_to_string(state_dir.join("join-token")).unwrap().trim().to_string();
        let mut clients = Vec::new();
        for i in 0..n {
            let dir = root.path().join(format!("client-{i}"));
            let identity = fl_client::enroll::enroll(&url, &token, "c", &ClientState::new(&dir), false).await.unwrap();
            clients.push(RawClient::join(&url, &identity).await);
        }
        let mut tasks = Vec::new();
        for c in &mut clients {
            tasks.push(c.next_task().await);
        }
        let global = clients[0].global(&tasks[0]).await;
        SecureRound { _root: root, state_dir, served, shutdown, clients, tasks, global }
    }

    /// Every client runs the four stages concurrently; client i sends `0.1·(i+1)` everywhere.
    async fn run_stages(&self) {
        let all: Vec<usize> = (0..self.clients.len()).collect();
        for result in self.try_stages_of(&all).await {
            result.unwrap();
        }
    }

    /// As [`run_stages`](Self::run_stages), for the clients in `who` only; what each got.
    async fn try_stages_of(&self, who: &[usize]) -> Vec<anyhow::Result<()>> {
        let mut running = Vec::new();
        for (i, (c, task)) in self.clients.iter().zip(&self.tasks).enumerate().filter(|(i, _)| who.contains(i)) {
            let mut client = c.client.clone();
            let (id, task) = (c.id.clone(), task.clone());
            let values = vec![0.1 * (i + 1) as f32; self.global.num_values()];
            running.push(tokio::spawn(async move {
                let reported = fl_client::secagg::Reported { examples: 10, loss: 1.0, accuracy: 0.5, train_s: 0.25 };
                let config = task.secagg.clone().unwrap();
                fl_client::secagg::submit(&mut client, &id, task.round, task.attempt, &config, values, reported).await
            }));
        }
        let mut results = Vec::new();
        for r in running {
            results.push(r.await.unwrap());
        }
        results
    }

    /// Takes every client's task of the next attempt (skipping repeats of the current one).
    async fn next_attempt(&mut self) {
        for (c, task) in self.clients.iter_mut().zip(&mut self.tasks) {
            let current = (task.round, task.attempt);
            while (task.round, task.attempt) == current {
                *task = c.next_task().await;
            }
        }
    }

    /// Waits for the one-round federation to finish; its metrics line and final model.
    async fn finish(self) -> (serde_json::Value, fl_common::TensorSet, fl_common::TensorSet) {
        let outcome = match tokio::time::timeout(Duration::from_secs(60), self.served).await {
            Ok(served) => served.unwrap().unwrap(),
            Err(_) => panic!("the round did not finish: {:?}", read_status(&self.state_dir)),
        };
        assert_eq!(outcome, ServeOutcome::Finished);
        let metrics = read_metrics(&self.state_dir);
        let (_, next) = decode_model(&std::fs::read(self.state_dir.join("model/final.safetensors")).unwrap()).unwrap();
        self.shutdown.cancel();
        (metrics[0].clone(), self.global, next)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secure_round_over_grpc_refuses_plain_updates_and_replays_and_averages() {
    let mut round = SecureRound::start(DpArgs::default(), Duration::from_secs(60), 3).await;
    let secagg = round.tasks[0].secagg.clone().expect("the round task carries secure aggregation");
    assert_eq!(secagg.participants.len(), 3);

    // A plain update would show the coordinator the delta: refused.
    let (task, global) = (round.tasks[0].clone(), round.global.clone());
    let plain = round.clients[0].submit(upload(&task, &filled(&global, 0.1), 10)).await;
    expect_refused(plain, tonic::Code::FailedPrecondition, "secure aggregation");

    // Malformed masked inputs are refused with a reason before they reach the protocol, and
    // leave the round as it was.
    let n = global.num_values() as u64;
    let chunk = |total_words: u64, offset_words: u64, words: usize| pb::SecAggMaskedInputChunk {
        round: task.round,
        attempt: task.attempt,
        total_words,
        offset_words,
        data: vec![7; words * 4],
        num_examples: 10,
        train_loss: 1.0,
        train_accuracy: 0.5,
        train_s: 0.0,
    };
    let odd = pb::SecAggMaskedInputChunk { data: vec![7; 5], ..chunk(n, 0, 0) };
    let nan_loss = pb::SecAggMaskedInputChunk { train_loss: f64::NAN, ..chunk(n, 0, n as usize) };
    let other_attempt = pb::SecAggMaskedInputChunk { attempt: task.attempt + 1, ..chunk(n, 1, 1) };
    let negative_time = pb::SecAggMaskedInputChunk { train_s: -1.0, ..chunk(n, 0, n as usize) };
    let cases = [
        (vec![chunk(n + 1, 0, n as usize + 1)], "masked values announced"),
        (vec![nan_loss], "non-finite"),
        (vec![negative_time], "training seconds -1"),
        (vec![chunk(n, 1, 1)], "chunk at word 1 after 0 words"),
        (vec![chunk(n, 0, 1), chunk(n, 0, 1)], "chunk at word 0 after 1 words"),
        (vec![odd], "a multiple of 4"),
        (vec![chunk(n, 0, n as usize + 1)], "more than the"),
        (vec![chunk(n, 0, 1), other_attempt], "different attempts"),
    ];
    for (chunks, reason) in cases {
        let refused = round.clients[0].client.sec_agg_masked_input(tokio_stream::iter(chunks)).await;
        let status = refused.expect_err("a malformed masked input is refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(reason), "expected '{reason}' in '{}'", status.message());
    }

    round.run_stages().await;
    // A replayed stage-1 message after the stage closed is refused with a reason.
    let replay = round.clients[0]
        .client
        .sec_agg_advertise_keys(pb::SecAggAdvertiseKeysRequest {
            round: task.round,
            attempt: task.attempt,
            cipher_public_key: vec![9; 32],
            mask_public_key: vec![8; 32],
        })
        .await;
    if let Err(status) = &replay {
        assert!(matches!(status.code(), tonic::Code::FailedPrecondition | tonic::Code::NotFound), "{status:?}");
    } else {
        panic!("a replayed advertise-keys message was accepted");
    }

    let (metrics, global, next) = round.finish().await;
    assert_eq!(metrics["secagg_masked"], 3, "{metrics}");
    assert_eq!(metrics["secagg_dropped"], 0);
    assert_eq!(metrics["train_s"], 0.25, "the masked inputs carry their training seconds: {metrics}");
    // The mean of 0.1, 0.2 and 0.3 is 0.2; quantization moves it by less than 1e-5.
    assert_moved_by(&global, &next, 0.2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn differential_privacy_under_secure_aggregation_has_clients_clip_and_noises_the_sum() {
    // Z = 0: the next model must be exactly the mean of what the clients masked.
    let dp = DpArgs { noise_multiplier: Some(0.0), clip_norm: Some(2.0), ..DpArgs::default() };
    let round = SecureRound::start(dp, Duration::from_secs(60), 3).await;
    for task in &round.tasks {
        assert_eq!(task.dp_clip_norm, 2.0, "the round task asks every client to clip to C");
    }
    round.run_stages().await;
    let (metrics, global, next) = round.finish().await;
    assert_eq!(metrics["secagg_masked"], 3, "{metrics}");
    assert_eq!(metrics["dp_clip_norm"], 2.0, "{metrics}");
    assert!(metrics["dp_unclipped"].is_null(), "the coordinator sees only the sum: {metrics}");
    assert_moved_by(&global, &next, 0.2);

    // Z = 4: noise of standard deviation Z·C/m = 8/3 per coordinate lands on the mean.
    let dp = DpArgs { noise_multiplier: Some(4.0), clip_norm: Some(2.0), ..DpArgs::default() };
    let round = SecureRound::start(dp, Duration::from_secs(60), 3).await;
    round.run_stages().await;
    let (metrics, global, next) = round.finish().await;
    assert!(metrics["dp_epsilon"].as_f64().is_some_and(f64::is_finite), "{metrics}");
    let moved: Vec<f32> = next
        .tensors
        .iter()
        .zip(&global.tensors)
        .flat_map(|(a, b)| a.data.iter().zip(&b.data).map(|(x, y)| x - y))
        .collect();
    assert!(moved.iter().any(|m| (m - 0.2).abs() > 1e-3), "no noise on the mean: {moved:?}");
    assert!(moved.iter().all(|m| (m - 0.2).abs() < 6.0 * 8.0 / 3.0), "noise beyond 6σ: {moved:?}");
}

#[tokio::test]
async fn flags_that_need_each_update_are_refused_with_secure_aggregation() {
    let root = tempfile::tempdir().unwrap();
    let cases = [
        (
            DpArgs {
                noise_multiplier: Some(1.0),
                clip_norm: Some(1.0),
                clip_on: Some(ClipSite::Server),
                ..DpArgs::default()
            },
            StrategyArgs::default(),
            "--dp-clip-on client",
        ),
        (
            DpArgs { noise_multiplier: Some(1.0), adaptive_clip: true, ..DpArgs::default() },
            StrategyArgs::default(),
            "--dp-clip-on client",
        ),
        (DpArgs::default(), StrategyArgs { strategy: Some(StrategyKind::Median), ..StrategyArgs::default() }, "median"),
    ];
    for (i, (dp, strategy, want)) in cases.into_iter().enumerate() {
        let state_dir = root.path().join(format!("coordinator-{i}"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let config = secure_config(&state_dir, dp, strategy, Duration::from_secs(60), 3);
        let err =
            fl_server::serve(config, Arc::new(PlainBackend), listener, CancellationToken::new()).await.unwrap_err();
        assert!(err.to_string().contains(want), "case {i}: {err:#}");
        assert_eq!(
            fl_common::cli::exit_status(&err, |_| false),
            fl_common::cli::exit::PERMANENT,
            "case {i}: a flag error is permanent: {err:#}"
        );
        assert!(!state_dir.join("join-token").exists(), "case {i}: nothing is created");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_participant_aborts_the_attempt_at_the_stage_deadline_and_the_round_is_retried() {
    // Stages after the first get a quarter of the round timeout: 2 s here.
    let round_timeout = Duration::from_secs(8);
    let mut round = SecureRound::start(DpArgs::default(), round_timeout, 3).await;
    // Client 2 advertises its keys, then stays connected and silent. The other two are fewer than
    // the 3 needed (each needs a majority of its 2 neighbours, plus itself).
    let mut silent = round.clients[2].client.clone();
    let task = round.tasks[2].clone();
    let advertised = tokio::spawn(async move {
        silent
            .sec_agg_advertise_keys(pb::SecAggAdvertiseKeysRequest {
                round: task.round,
                attempt: task.attempt,
                cipher_public_key: x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from([3; 32]))
                    .to_bytes()
                    .to_vec(),
                mask_public_key: x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from([4; 32]))
                    .to_bytes()
                    .to_vec(),
            })
            .await
    });
    let started = std::time::Instant::now();
    for result in round.try_stages_of(&[0, 1]).await {
        let err = format!("{:#}", result.expect_err("the attempt aborts"));
        assert!(err.contains("share-keys") && err.contains("3 needed"), "{err}");
    }
    let waited = started.elapsed();
    assert!(waited >= round_timeout / 4, "the key-sharing stage closed after {waited:?}, before its deadline");
    advertised.await.unwrap().expect("the silent client's keys were accepted");

    // The round is retried like any failed attempt; this time all three answer.
    let first = round.tasks[0].attempt;
    round.next_attempt().await;
    assert_eq!(round.tasks[0].attempt, first + 1);
    round.run_stages().await;
    let (metrics, global, next) = round.finish().await;
    assert_eq!(metrics["secagg_masked"], 3, "{metrics}");
    assert_moved_by(&global, &next, 0.2);
}
