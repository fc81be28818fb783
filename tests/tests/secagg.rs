//! Secure aggregation end to end: a real coordinator and real clients, as separate processes,
//! over mutual TLS on loopback, with a client killed (`kill -9`) between the share-keys and the
//! masked-input stages. The same federation without secure aggregation, with the same client
//! killed in the same round, is the accuracy reference.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use fl_tests::*;

const ROUNDS: u64 = 3;
/// The fourth client dies in the first round from this one that it takes part in.
const STRUCK: u32 = 2;

/// Starts `fl-client run` for shard `shard` (from 1), with extra environment.
fn start_client(root: &Path, url: &str, dir: &Path, shard: usize, env: &[(&str, String)]) -> Child {
    let log = dir.with_extension("log");
    let file = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
    let mut cmd = command("fl-client");
    cmd.args(["run", "--coordinator", url, "--threads", "1", "--max-backoff", "2", "--state-dir"])
        .arg(dir)
        .arg("--data")
        .arg(root.join(format!("data/shard-{shard}.csv")))
        .stdout(Stdio::from(file.try_clone().unwrap()))
        .stderr(Stdio::from(file));
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("client starts")
}

/// Runs a 4-client federation of `ROUNDS` rounds. Round 1 has clients 1-3 (the fourth starts
/// once it is sampled), so both runs train the same clients in every round; the fourth client is
/// killed with SIGKILL in its first round from `STRUCK` on: with secure aggregation after it
/// shared its keys, without it while it trains. Returns the metrics lines.
fn federation(root: &Path, secure: bool) -> Vec<serde_json::Value> {
    let mut args = vec!["--rounds", "3", "--min-clients", "3", "--round-timeout", "60", "--local-epochs", "1"];
    if secure {
        args.push("--secure-aggregation");
    }
    let (mut coordinator, dirs) = enrolled_federation(root, 2000, 4, "127.0.0.1:0", &args);
    let url = coordinator.url();
    let marker = root.join("paused");
    let mut clients: Vec<Child> =
        dirs.iter().take(3).enumerate().map(|(i, d)| start_client(root, &url, d, i + 1, &[])).collect();
    coordinator.wait_status(Duration::from_secs(120), "round 1 with three clients", |s| {
        s.phase == Phase::Collecting && s.round == 1 && s.sampled.len() == 3
    });
    let env = if secure { vec![("FL_FAULT_SECAGG_PAUSE", format!("{STRUCK}:{}", marker.display()))] } else { vec![] };
    clients.push(start_client(root, &url, &dirs[3], 4, &env));
    if secure {
        wait_until(Duration::from_secs(240), "the fourth client to pause after sharing keys", || marker.exists());
    } else {
        coordinator.wait_status(Duration::from_secs(240), "a round with all four clients", |s| {
            s.phase == Phase::Collecting && s.round >= STRUCK && s.sampled.len() == 4
        });
    }
    clients[3].kill().unwrap();
    clients[3].wait().unwrap();
    let status = coordinator.wait(Duration::from_secs(300));
    assert!(status.success(), "coordinator failed:\n{}", coordinator.log_text());
    for c in clients.iter_mut().take(3) {
        let status = wait_child(c, Duration::from_secs(30)).expect("client exits after the federation ends");
        assert!(status.success());
    }
    coordinator.metrics()
}

#[test]
fn secure_aggregation_survives_a_kill_in_the_masking_stages_and_matches_plain_accuracy() {
    let root = tempfile::tempdir().unwrap();
    let secure = federation(&root.path().join("secure"), true);
    let plain = federation(&root.path().join("plain"), false);

    for m in secure.iter().chain(&plain) {
        println!("{m}");
    }
    let rounds: Vec<u64> = secure.iter().map(|m| m["round"].as_u64().unwrap()).collect();
    assert_eq!(rounds, (1..=ROUNDS).collect::<Vec<_>>(), "every round completes once");
    let struck = secure.iter().find(|m| m["sampled"] == 4).expect("a round sampled all four clients");
    // The killed client shared its keys, so its pairwise masks were rebuilt from its neighbours'
    // shares, and the round's sum holds the three others.
    assert_eq!(struck["secagg_masked"], 3, "{struck}");
    assert_eq!(struck["secagg_dropped"], 1, "{struck}");
    assert_eq!(struck["secagg_recovered"], 1, "{struck}");
    assert_eq!(struck["participants"], 3, "{struck}");
    assert!(secure.iter().all(|m| m["secagg_masked"] == 3), "three clients in every round's sum");
    let participants = |m: &[serde_json::Value]| m.iter().map(|l| l["participants"].clone()).collect::<Vec<_>>();
    assert_eq!(participants(&secure), participants(&plain), "both runs train the same clients each round");
    assert!(plain.iter().all(|m| m.get("secagg_masked").is_none()), "plain runs record no secagg counts");

    let accuracy = |m: &[serde_json::Value]| m.last().unwrap()["accuracy"].as_f64().unwrap();
    let (with, without) = (accuracy(&secure), accuracy(&plain));
    println!("secagg accuracy: with {with:.4}, without {without:.4}");
    assert!(without > 0.5, "the reference learns: {without}");
    assert!(
        (with - without).abs() <= 0.01,
        "with secure aggregation {with}, without {without}: more than 1 point apart"
    );
}

/// L2 norm of `after - before`, over every tensor.
fn moved(before: &Path, after: &Path) -> f64 {
    let read = |p: &Path| fl_common::decode_model(&std::fs::read(p).unwrap()).unwrap().1;
    let (a, b) = (read(before), read(after));
    let squares: f64 = a
        .tensors
        .iter()
        .zip(&b.tensors)
        .flat_map(|(x, y)| x.data.iter().zip(&y.data).map(|(u, v)| f64::from(v - u).powi(2)))
        .sum();
    squares.sqrt()
}

#[test]
fn differential_privacy_with_secure_aggregation_clips_on_the_clients_and_noises_the_sum() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    // Z = 0 isolates the clipping: the mean of updates clipped to C moves the model by at most C
    // (plus the quantization's rounding, about 1e-5 here). Unclipped, this federation moves it by
    // about 7 in round 1 (measured with --dp-clip-norm 1000), so a client that skips the clip fails.
    let clip = 0.05;
    let args = [
        "--rounds",
        "2",
        "--min-clients",
        "3",
        "--round-timeout",
        "60",
        "--local-epochs",
        "1",
        "--secure-aggregation",
        "--dp-noise-multiplier",
        "0",
        "--dp-clip-norm",
        "0.05",
    ];
    let (mut coordinator, dirs) = enrolled_federation(root, 1500, 3, "127.0.0.1:0", &args);
    let url = coordinator.url();
    let mut clients: Vec<Child> =
        dirs.iter().enumerate().map(|(i, d)| start_client(root, &url, d, i + 1, &[])).collect();
    let status = coordinator.wait(Duration::from_secs(300));
    assert!(status.success(), "coordinator failed:\n{}", coordinator.log_text());
    for c in &mut clients {
        assert!(wait_child(c, Duration::from_secs(30)).expect("client exits").success());
    }
    let metrics = coordinator.metrics();
    assert_eq!(metrics.len(), 2, "{metrics:?}");
    let model = root.join("coordinator/model");
    for (i, m) in metrics.iter().enumerate() {
        assert_eq!(m["secagg_masked"], 3, "{m}");
        assert_eq!(m["dp_clip_norm"], clip, "{m}");
        assert!(m["dp_unclipped"].is_null(), "only the sum is seen: {m}");
        assert!(m["train_s"].as_f64().is_some_and(|t| t > 0.0), "the clients' training seconds arrive: {m}");
        let before =
            if i == 0 { model.join("initial.safetensors") } else { model.join(format!("round-{i:04}.safetensors")) };
        let step = moved(&before, &model.join(format!("round-{:04}.safetensors", i + 1)));
        println!("round {}: the global model moved by {step:.6} (C = {clip})", i + 1);
        assert!(step <= clip + 1e-4, "round {}: moved by {step}, more than C = {clip}: a client did not clip", i + 1);
        assert!(step > 0.0, "round {}: the model did not move", i + 1);
    }
}
