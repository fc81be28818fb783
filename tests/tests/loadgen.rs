//! The load generator (`fl-loadgen`, bench/scale.sh) against a coordinator served in process
//! with a plain backend: 20 clients enrolled by the real Enroll RPC, each on its own mTLS
//! connection, through two rounds in which some drop out mid-round and come back. What the
//! generator reports must match what the coordinator recorded in its state directory.

use std::sync::Arc;
use std::time::Duration;

use fl_common::codec::UpdateCodec;
use fl_server::{RoundSettings, ServeOutcome};
use fl_tests::loadgen::{self, LoadConfig};
use fl_tests::plain_serve_config;
use fl_tests::{read_metrics, read_status, PlainBackend};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_clients_serve_two_rounds_with_drop_outs() {
    fl_common::tls::install_crypto_provider();
    let root = tempfile::tempdir().unwrap();
    let state_dir = root.path().join("coordinator");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let settings = RoundSettings {
        // The coordinator's default: top-k int8 updates, and delta downloads from round 2 on.
        update_codecs: vec!["topk-int8".parse().unwrap(), UpdateCodec::EXACT],
        // Every client must answer: a drop-out has to come back, get its task again and upload.
        ..fl_tests::plain_round_settings(2, 20)
    };
    let config = plain_serve_config(&state_dir, settings);
    let shutdown = CancellationToken::new();
    let serve = tokio::spawn(fl_server::serve(config, Arc::new(PlainBackend), listener, shutdown.clone()));
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    while !state_dir.join("listen-addr").exists() {
        assert!(tokio::time::Instant::now() < until, "the coordinator did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let token = std::fs::read_to_string(state_dir.join("join-token")).unwrap().trim().to_string();

    let mut load = LoadConfig::new(&format!("https://localhost:{port}"), &root.path().join("identities"), 20);
    load.token = Some(token);
    (load.train_secs, load.train_spread) = (0.3, 0.3);
    (load.dropout, load.rejoin_secs) = (0.2, 0.3);
    (load.rows, load.seed, load.max_secs) = (1, 3, 90.0);
    let report = loadgen::run(load, None, None).await.expect("the load run completes");
    let outcome = tokio::time::timeout(Duration::from_secs(30), serve).await.expect("serve returns").unwrap();
    assert_eq!(outcome.unwrap(), ServeOutcome::Finished);

    assert!(report.errors.is_empty(), "errors: {:?}", report.error_samples);
    assert_eq!((report.enrolled, report.joined, report.finished), (20, 20, 20), "{report:?}");
    let dropped: usize = report.rounds.iter().map(|r| r.dropped).sum();
    assert!(dropped > 0, "seed 3 with a drop-out rate of 0.2 drops some clients: {report:?}");
    assert!(report.reconnects >= dropped, "each drop-out reconnected: {report:?}");

    // The coordinator committed both rounds with every client's update, drop-outs included.
    let metrics = read_metrics(&state_dir);
    assert_eq!(metrics.len(), 2, "{metrics:?}");
    for line in &metrics {
        assert_eq!(line["participants"], 20, "{line}");
        let (round, attempt) = (line["round"].as_u64().unwrap() as u32, line["attempt"].as_u64().unwrap() as u32);
        let counts = report.rounds.iter().find(|r| (r.round, r.attempt) == (round, attempt)).expect("the attempt");
        assert_eq!(counts.accepted, 20, "the generator saw 20 accepted updates: {counts:?}");
        assert_eq!(counts.tasks, 20 + counts.dropped, "a drop-out got its task again on rejoining: {counts:?}");
    }
    assert_eq!(read_status(&state_dir).completed_rounds, 2);

    // Round 1 downloads the whole model; round 2 only the aggregate, to clients holding round 1's.
    assert_eq!(report.full_downloads, 20, "{report:?}");
    assert_eq!(report.delta_downloads, 20, "{report:?}");
    assert_eq!(report.download_mismatches, 0);
    assert_eq!(report.models_verified, 2, "one client checked each round's model against its digest");

    // The identities stay for the next run, and the registry knows every client.
    let registry = fl_server::registry::RegistryStore::open(&state_dir).unwrap().snapshot();
    assert_eq!(registry.clients.len(), 20);
    assert!(registry.clients.iter().all(|c| c.rounds_joined == 2), "{registry:?}");
    let (identities, enrolled) =
        loadgen::identities(&LoadConfig::new("https://localhost:1", &root.path().join("identities"), 20))
            .await
            .expect("reused without a token");
    assert_eq!((identities.len(), enrolled), (20, 0));
}

#[test]
fn bad_flags_are_refused_with_the_flag() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fl-loadgen"))
        .args(["--coordinator", "https://localhost:1", "--identities", "/nonexistent", "--clients", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--clients"), "{out:?}");
}
