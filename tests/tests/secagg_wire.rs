//! Secure aggregation through the real gRPC service in process: `fl_server::serve` with mutual
//! TLS on 127.0.0.1:0, a plain model backend, and three clients played by hand that run the
//! client library's four stages (`fl_client::secagg::submit`). A plain `SubmitUpdate` is
//! refused in a secure round, a replayed stage message is refused, and the round's model moves
//! by the mean of the three updates.

use std::sync::Arc;
use std::time::Duration;

use fl_client::identity::ClientState;
use fl_common::decode_model;
use fl_proto::pb;
use fl_server::secagg::SecAggArgs;
use fl_server::{ModelArgs, RoundSettings, ServeConfig, ServeOutcome};
use fl_tests::*;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secure_round_over_grpc_refuses_plain_updates_and_replays_and_averages() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let root = tempfile::tempdir().unwrap();
    let state_dir = root.path().join("coordinator");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let config = ServeConfig {
        state_dir: state_dir.clone(),
        model: ModelArgs { labels: Some(vec!["a".into(), "b".into()]), ..ModelArgs::default() },
        eval_data: None,
        settings: RoundSettings {
            rounds: 1,
            min_clients: 3,
            clients_per_round: 0,
            over_sample: 1.0,
            round_timeout: Duration::from_secs(60),
            local_epochs: 1,
            batch_size: 32,
            lr: 0.01,
            optimizer: "adam".into(),
            seed: 7,
            max_update_norm: 1.0e4,
            update_codecs: Vec::new(),
            max_failed_attempts: 3,
            long_run: Default::default(),
        },
        tls_sans: vec!["localhost".into(), "127.0.0.1".into()],
        seed: 1,
        init_model: None,
        spool: None,
        dashboard: None,
        dp: Default::default(),
        secagg: SecAggArgs { enabled: true, ..SecAggArgs::default() },
        strategy: Default::default(),
        distill: Default::default(),
    };
    let shutdown = CancellationToken::new();
    let served = tokio::spawn(fl_server::serve(config, Arc::new(PlainBackend), listener, shutdown.clone()));
    let url = format!("https://localhost:{port}");
    wait_until(Duration::from_secs(30), "the coordinator to listen", || state_dir.join("listen-addr").exists());
    let token = std::fs::read_to_string(state_dir.join("join-token")).unwrap().trim().to_string();

    let mut clients = Vec::new();
    for i in 0..3 {
        let dir = root.path().join(format!("client-{i}"));
        let identity = fl_client::enroll::enroll(&url, &token, "c", &ClientState::new(&dir), false).await.unwrap();
        clients.push(RawClient::join(&url, &identity).await);
    }
    let mut tasks = Vec::new();
    for c in &mut clients {
        tasks.push(c.next_task().await);
    }
    let secagg = tasks[0].secagg.clone().expect("the round task carries secure aggregation");
    assert_eq!(secagg.participants.len(), 3);
    let global = clients[0].global(&tasks[0]).await;

    // A plain update would show the coordinator the delta: refused.
    let plain = clients[0].submit(upload(&tasks[0], &filled(&global, 0.1), 10)).await;
    expect_refused(plain, tonic::Code::FailedPrecondition, "secure aggregation");

    // The three run the stages concurrently, with updates 0.1, 0.2 and 0.3 everywhere.
    let mut running = Vec::new();
    for (i, (c, task)) in clients.iter().zip(&tasks).enumerate() {
        let mut client = c.client.clone();
        let (id, task) = (c.id.clone(), task.clone());
        let values = vec![0.1 * (i + 1) as f32; global.num_values()];
        running.push(tokio::spawn(async move {
            let reported = fl_client::secagg::Reported { examples: 10, loss: 1.0, accuracy: 0.5 };
            let config = task.secagg.clone().unwrap();
            fl_client::secagg::submit(&mut client, &id, task.round, task.attempt, &config, values, reported).await
        }));
    }
    for r in running {
        r.await.unwrap().unwrap();
    }
    // A replayed stage-1 message after the stage closed is refused with a reason.
    let replay = clients[0]
        .client
        .sec_agg_advertise_keys(pb::SecAggAdvertiseKeysRequest {
            round: tasks[0].round,
            attempt: tasks[0].attempt,
            cipher_public_key: vec![9; 32],
            mask_public_key: vec![8; 32],
        })
        .await;
    if let Err(status) = &replay {
        assert!(matches!(status.code(), tonic::Code::FailedPrecondition | tonic::Code::NotFound), "{status:?}");
    } else {
        panic!("a replayed advertise-keys message was accepted");
    }

    let outcome = tokio::time::timeout(Duration::from_secs(60), served).await.unwrap().unwrap().unwrap();
    assert_eq!(outcome, ServeOutcome::Finished);
    let metrics = read_metrics(&state_dir);
    assert_eq!(metrics[0]["secagg_masked"], 3, "{}", metrics[0]);
    assert_eq!(metrics[0]["secagg_dropped"], 0);
    let (_, next) = decode_model(&std::fs::read(state_dir.join("model/final.safetensors")).unwrap()).unwrap();
    // The mean of 0.1, 0.2 and 0.3 is 0.2; quantization moves it by less than 1e-5.
    for (a, b) in next.tensors.iter().zip(&global.tensors) {
        for (x, y) in a.data.iter().zip(&b.data) {
            assert!((x - y - 0.2).abs() < 1e-5, "moved by {} instead of 0.2", x - y);
        }
    }
    shutdown.cancel();
}
