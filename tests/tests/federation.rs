//! End-to-end: a real coordinator and real clients, as separate processes, over mutual TLS on
//! loopback, training the libtorch model on generated data.

use std::time::Duration;

use fl_tests::*;

fn assert_rounds(metrics: &[serde_json::Value], rounds: u64) {
    let numbers: Vec<u64> = metrics.iter().map(|m| m["round"].as_u64().unwrap()).collect();
    assert_eq!(numbers, (1..=rounds).collect::<Vec<_>>(), "one metrics line per round, from 1");
    for key in [
        "accuracy",
        "loss",
        "client_accuracy",
        "client_loss",
        "participants",
        "examples",
        "bytes_up",
        "bytes_down",
        "round_s",
        "elapsed_s",
    ] {
        assert!(metrics.iter().all(|m| m.get(key).is_some_and(|v| !v.is_null())), "every line has {key}");
    }
}

#[test]
fn three_clients_learn_over_mutual_tls_and_predict() {
    let root = tempfile::tempdir().unwrap();
    let (mut coordinator, dirs) = enrolled_federation(
        root.path(),
        1500,
        3,
        "127.0.0.1:0",
        // Three local epochs: 500 rows a client learn the generated English slowly in one.
        &["--rounds", "3", "--local-epochs", "3", "--min-clients", "3", "--round-timeout", "60"],
    );
    let url = coordinator.url();
    let clients: Vec<ClientProcess> = start_clients(root.path(), &url, &dirs);
    let status = coordinator.wait(Duration::from_secs(240));
    assert!(status.success(), "coordinator failed:\n{}", coordinator.log_text());
    for mut c in clients {
        let status = wait_child(&mut c.child, Duration::from_secs(30)).expect("client exits after the federation ends");
        assert!(status.success(), "client failed:\n{}", c.log_text());
    }
    let metrics = coordinator.metrics();
    assert_rounds(&metrics, 3);
    let last = metrics.last().unwrap();
    assert_eq!(last["participants"], 3);
    assert!(last["bytes_up"].as_u64().unwrap() > 0 && last["bytes_down"].as_u64().unwrap() > 0);
    let accuracy = last["accuracy"].as_f64().unwrap();
    assert!(accuracy > 0.5, "10 classes, chance is 0.1; got {accuracy}");

    let model = coordinator.state_dir.join("model/final.safetensors");
    assert!(coordinator.state_dir.join("model/round-0003.safetensors").exists());
    let out = run(command("fl-client")
        .args(["predict", "--model"])
        .arg(&model)
        .arg("--data")
        .arg(root.path().join("data/test.csv")));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let first = stdout.lines().next().unwrap();
    let test_accuracy: f64 = first.strip_prefix("accuracy: ").expect("first line is the accuracy").parse().unwrap();
    assert!(first.len() == "accuracy: 0.0000".len() && test_accuracy > 0.5, "{stdout}");
    assert!(stdout.contains("confusion matrix"));
    let out = run(command("fl-client").args(["predict", "--model"]).arg(&model).args(["--text", "hello world"]));
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("label: "));
    let status = coordinator.status();
    assert_eq!((status.phase, status.completed_rounds, status.rounds_total), (Phase::Finished, 3, 3), "{status:?}");
    assert_eq!(status.failed_attempts, 0);
}

#[test]
fn wrong_tokens_are_refused() {
    let root = tempfile::tempdir().unwrap();
    let coordinator =
        CoordinatorProcess::start(&root.path().join("coordinator"), &["--labels", "a,b", "--rounds", "1"]);
    let token = coordinator.token();
    let parts: Vec<&str> = token.split('.').collect();

    let wrong_secret = format!("{}.{}.{}.{}", parts[0], parts[1], "0".repeat(32), parts[3]);
    let out = enroll(&coordinator.url(), &wrong_secret, &root.path().join("c1"), "c1");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown join token"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let wrong_ca = format!("{}.{}.{}.{}", parts[0], parts[1], parts[2], "ab".repeat(32));
    let out = enroll(&coordinator.url(), &wrong_ca, &root.path().join("c2"), "c2");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not match the join token"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = enroll(&coordinator.url(), "not-a-token", &root.path().join("c3"), "c3");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("malformed join token"));
    assert!(!root.path().join("c1/client.pem").exists());

    let out = enroll(&coordinator.url(), &token, &root.path().join("c4"), "c4");
    assert!(out.status.success(), "the real token works: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn client_without_certificate_is_refused() {
    fl_common::tls::install_crypto_provider();
    let root = tempfile::tempdir().unwrap();
    let coordinator =
        CoordinatorProcess::start(&root.path().join("coordinator"), &["--labels", "a,b", "--rounds", "1"]);
    let ca = std::fs::read_to_string(coordinator.state_dir.join("ca.pem")).unwrap();
    let url = coordinator.url();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let status = rt.block_on(async {
        let channel = fl_common::tls::connect(&url, &ca, None).await.unwrap();
        let mut client = fl_proto::pb::federation_client::FederationClient::new(channel);
        client.join(fl_proto::pb::JoinRequest { name: "anon".into(), num_examples: 1 }).await.unwrap_err()
    });
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert!(status.message().contains("client certificate required"), "{}", status.message());
}

#[test]
fn a_client_killed_mid_round_does_not_stop_the_round() {
    let root = tempfile::tempdir().unwrap();
    let (mut coordinator, dirs) = enrolled_federation(
        root.path(),
        3000,
        3,
        "127.0.0.1:0",
        &["--rounds", "3", "--min-clients", "2", "--round-timeout", "20"],
    );
    let url = coordinator.url();
    let mut clients: Vec<ClientProcess> = start_clients(root.path(), &url, &dirs);
    // Kill client 3 while it trains its first round.
    let victim = client_id(&dirs[2]);
    coordinator.wait_status(Duration::from_secs(60), "client 3 sampled", |s| {
        s.phase == Phase::Collecting && s.sampled.contains(&victim)
    });
    clients[2].child.kill().unwrap();
    let status = coordinator.wait(Duration::from_secs(240));
    assert!(status.success(), "{}", coordinator.log_text());
    let metrics = coordinator.metrics();
    assert_rounds(&metrics, 3);
    assert!(metrics.iter().all(|m| m["participants"].as_u64().unwrap() >= 2));
    assert_eq!(metrics[2]["participants"], 2, "the killed client is not in later rounds");
    for c in clients.iter_mut().take(2) {
        assert!(wait_child(&mut c.child, Duration::from_secs(30)).unwrap().success(), "{}", c.log_text());
    }
}

#[test]
fn a_bad_csv_stops_the_client_before_it_connects() {
    let root = tempfile::tempdir().unwrap();
    let csv = root.path().join("bad.csv");
    std::fs::write(&csv, "text,label\nfine,a\n\"unterminated,b\nmore\n").unwrap();
    let state = root.path().join("client");
    std::fs::create_dir_all(&state).unwrap();
    let out = run(command("fl-client")
        .args(["run", "--coordinator", "https://localhost:1", "--state-dir"])
        .arg(&state)
        .arg("--data")
        .arg(&csv));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bad.csv: line 3"), "{stderr}");
}

#[test]
fn init_model_is_checked_and_truncated_models_are_refused() {
    let root = tempfile::tempdir().unwrap();
    gen_data(&root.path().join("data"), 600, 1);
    // A model of a first federation (its initial weights are a complete model file).
    let first = CoordinatorProcess::start(
        &root.path().join("first"),
        &["--labels", "x,y,z", "--buckets", "512", "--rounds", "1"],
    );
    let model = first.state_dir.join("model/initial.safetensors");
    let serve = |dir: &str, extra: &[&str]| {
        run(command("fl-coordinator")
            .args(["serve", "--listen", "127.0.0.1:0", "--rounds", "1", "--state-dir"])
            .arg(root.path().join(dir))
            .arg("--init-model")
            .arg(&model)
            .args(extra))
    };
    let out = serve("b", &["--buckets", "1024"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("does not fit the flags: --buckets 1024 (model: 512)"), "{stderr}");
    assert!(!root.path().join("b/federation.json").exists(), "nothing is created on a mismatch");
    let out = serve("c", &["--model", "bilstm"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--model bilstm (model: fasttext)"));
    let eval = root.path().join("data/eval.csv");
    let out = serve("d", &["--eval-data", eval.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown label"), "{}", String::from_utf8_lossy(&out.stderr));

    let bytes = std::fs::read(&model).unwrap();
    let truncated = root.path().join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let out = run(command("fl-client").args(["predict", "--text", "hello", "--model"]).arg(&truncated));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("truncated.safetensors: not a valid model file"), "{stderr}");
    let garbage = root.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"not a model").unwrap();
    let out = run(command("fl-client").args(["predict", "--text", "hello", "--model"]).arg(&garbage));
    assert!(!out.status.success());
}

fn sequence_model_learns_federated(kind: &str) {
    let root = tempfile::tempdir().unwrap();
    let (mut coordinator, dirs) = enrolled_federation(
        root.path(),
        1800,
        3,
        "127.0.0.1:0",
        &["--model", kind, "--rounds", "3", "--min-clients", "3", "--local-epochs", "2", "--round-timeout", "120"],
    );
    let url = coordinator.url();
    let clients: Vec<ClientProcess> = start_clients(root.path(), &url, &dirs);
    let status = coordinator.wait(Duration::from_secs(300));
    assert!(status.success(), "coordinator failed:\n{}", coordinator.log_text());
    let metrics = coordinator.metrics();
    assert_rounds(&metrics, 3);
    let accuracy = metrics.last().unwrap()["accuracy"].as_f64().unwrap();
    assert!(accuracy > 0.5, "{kind}: 10 classes, chance is 0.1; got {accuracy}");
    let model = coordinator.state_dir.join("model/final.safetensors");
    let out = run(command("fl-client")
        .args(["predict", "--model"])
        .arg(&model)
        .arg("--data")
        .arg(root.path().join("data/test.csv")));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    drop(clients);
}

#[test]
fn bilstm_learns_in_a_federation() {
    sequence_model_learns_federated("bilstm");
}

#[test]
fn transformer_learns_in_a_federation() {
    sequence_model_learns_federated("transformer");
}

#[test]
fn a_centrally_trained_model_seeds_a_federation() {
    let root = tempfile::tempdir().unwrap();
    gen_data(&root.path().join("data"), 1500, 2);
    let start = root.path().join("central.safetensors");
    let out = run(command("fl-client")
        // Five epochs: the generated English needs them on 1,350 training rows (0.72 test accuracy).
        .args(["train", "--model", "fasttext", "--epochs", "5", "--threads", "1", "--data"])
        .arg(root.path().join("data/train.csv"))
        .arg("--out")
        .arg(&start));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let eval = root.path().join("data/eval.csv");
    let mut coordinator = CoordinatorProcess::start(
        &root.path().join("coordinator"),
        &[
            "--init-model",
            start.to_str().unwrap(),
            "--eval-data",
            eval.to_str().unwrap(),
            "--rounds",
            "1",
            "--min-clients",
            "2",
        ],
    );
    let url = coordinator.url();
    let mut clients = Vec::new();
    for i in 1..=2 {
        let dir = root.path().join(format!("client-{i}"));
        assert!(enroll(&url, &coordinator.token(), &dir, "c").status.success());
        clients.push(ClientProcess::start(&url, &dir, &root.path().join(format!("data/shard-{i}.csv"))));
    }
    assert!(coordinator.wait(Duration::from_secs(120)).success(), "{}", coordinator.log_text());
    let weights = |path: &std::path::Path| fl_common::decode_model(&std::fs::read(path).unwrap()).unwrap();
    let (central_spec, central) = weights(&start);
    let (initial_spec, initial) = weights(&coordinator.state_dir.join("model/initial.safetensors"));
    assert_eq!(initial, central, "the federation starts from the trained weights");
    assert_eq!(initial_spec.labels, central_spec.labels);
    assert!(!initial_spec.federation.is_empty(), "the starting model now belongs to this federation");
    let accuracy = coordinator.metrics()[0]["accuracy"].as_f64().unwrap();
    assert!(accuracy > 0.6, "{accuracy}");
}
