//! Update codecs and delta downloads, end to end: a real coordinator and real clients as
//! separate processes, over mutual TLS on loopback, training the libtorch model.

use std::time::Duration;

use fl_common::codec::tensor_digest;
use fl_common::decode_model;
use fl_tests::*;

/// Ten rounds of `sparse-int8` updates with delta downloads: every client rebuilds each round's
/// global model from the previous one plus the downloaded aggregate, checks it against the
/// digest in the round task (a mismatch fails its round), and ends holding the coordinator's
/// weights bit for bit.
#[test]
fn ten_rounds_of_delta_downloads_keep_every_client_bit_identical() {
    let root = tempfile::tempdir().unwrap();
    let rounds = 10;
    let (mut coordinator, dirs) = enrolled_federation(
        root.path(),
        900,
        3,
        "127.0.0.1:0",
        &[
            "--rounds",
            "10",
            "--min-clients",
            "3",
            "--round-timeout",
            "60",
            "--buckets",
            "4096",
            "--update-codec",
            "sparse-int8",
            "--update-codec",
            "safetensors-f32",
        ],
    );
    let url = coordinator.url();
    let mut clients: Vec<ClientProcess> = start_clients(root.path(), &url, &dirs);
    finish_federation(&mut coordinator, &mut clients, Duration::from_secs(300));
    let metrics = coordinator.metrics();
    assert_eq!(metrics.len(), rounds, "one metrics line per round");
    // Every client answered every round: none failed its digest check.
    assert!(metrics.iter().all(|m| m["participants"] == 3 && m["attempt"] == 0), "{metrics:?}");
    let full = std::fs::metadata(coordinator.state_dir.join("model/round-0001.safetensors")).unwrap().len();
    let down: Vec<u64> = metrics.iter().map(|m| m["bytes_down"].as_u64().unwrap()).collect();
    assert!(down[0] >= 3 * full, "round 1 downloads the full model: {down:?}");
    assert!(down[1..].iter().all(|&d| d < 3 * full / 2), "later rounds download deltas: {down:?} (model {full} B)");
    for m in &metrics {
        let (round_s, train_s, overhead_s) =
            (m["round_s"].as_f64().unwrap(), m["train_s"].as_f64().unwrap(), m["overhead_s"].as_f64().unwrap());
        assert!(train_s > 0.0 && train_s <= round_s, "{m}");
        assert!((overhead_s - (round_s - train_s)).abs() < 1e-9, "{m}");
    }

    // The clients trained round 10 from the global model of round 9; each holds it.
    let (_, coord_model) =
        decode_model(&std::fs::read(coordinator.state_dir.join("model/round-0009.safetensors")).unwrap()).unwrap();
    let want = tensor_digest(&coord_model);
    for dir in &dirs {
        let held =
            std::fs::read_dir(dir.join("codec")).unwrap().filter(|e| is_held_global(&e.as_ref().unwrap().path()));
        assert_eq!(held.count(), 1, "one global model held in {}", dir.display());
        assert_eq!(held_digest(dir).as_deref(), Some(want.as_str()), "{} holds other weights", dir.display());
    }
}

#[test]
fn an_unknown_update_codec_is_refused_with_the_list() {
    let root = tempfile::tempdir().unwrap();
    let out = run(command("fl-coordinator")
        .args(["serve", "--listen", "127.0.0.1:0", "--labels", "a,b", "--update-codec", "zip-f32", "--state-dir"])
        .arg(root.path().join("c")));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--update-codec") && stderr.contains("unknown update codec 'zip-f32'"), "{stderr}");
    assert!(stderr.contains("sparse-int8"), "the error lists the known codecs: {stderr}");
}

fn is_held_global(path: &std::path::Path) -> bool {
    path.file_name().unwrap().to_string_lossy().starts_with("global-")
}

/// The digest of the global model a client's state dir holds (`codec/global-FED.safetensors`).
fn held_digest(client_dir: &std::path::Path) -> Option<String> {
    let held =
        std::fs::read_dir(client_dir.join("codec")).ok()?.map(|e| e.unwrap().path()).find(|p| is_held_global(p))?;
    let (_, weights) = decode_model(&std::fs::read(held).ok()?).ok()?;
    Some(tensor_digest(&weights))
}

/// A client that misses rounds (SIGSTOPped while the others go on, then continued) holds a global
/// model older than the previous round's: it downloads the full model, not a delta it could not
/// apply, and ends with the coordinator's weights like the others.
#[test]
fn a_lagging_client_gets_the_full_model_and_ends_with_the_coordinators_weights() {
    let root = tempfile::tempdir().unwrap();
    let rounds = 7;
    // While client 3 is stopped, each round waits for it until the deadline and completes with
    // the other two; once continued, it is sampled again.
    let (mut coordinator, dirs) = enrolled_federation(
        root.path(),
        900,
        3,
        "127.0.0.1:0",
        &["--rounds", "7", "--min-clients", "2", "--round-timeout", "6", "--buckets", "4096"],
    );
    let url = coordinator.url();
    let mut clients: Vec<ClientProcess> = start_clients(root.path(), &url, &dirs);
    coordinator.wait_status(Duration::from_secs(120), "round 1 committed, client 3 holding a model", |s| {
        s.completed_rounds >= 1 && held_digest(&dirs[2]).is_some()
    });
    signal(&clients[2].child, "STOP");
    let stopped_at = coordinator.status().completed_rounds;
    let held = held_digest(&dirs[2]).unwrap();
    // Three more committed rounds. Commits trail the rounds (a round's commit runs while the next
    // collects), so client 3 may have been stopped holding the model of the round after
    // `stopped_at`; three more leave the round it answers next at least two models past the
    // one it holds, which no delta can bridge.
    coordinator.wait_status(Duration::from_secs(120), "three rounds without client 3", |s| {
        s.completed_rounds >= stopped_at + 3
    });
    let continued_after = coordinator.status().completed_rounds;
    assert!(continued_after < rounds, "rounds are left for the lagging client");
    signal(&clients[2].child, "CONT");
    finish_federation(&mut coordinator, &mut clients, Duration::from_secs(300));

    let metrics = coordinator.metrics();
    assert_eq!(metrics.len(), rounds as usize, "one metrics line per round");
    let full = std::fs::metadata(coordinator.state_dir.join("model/round-0001.safetensors")).unwrap().len();
    let down = |m: &serde_json::Value| m["bytes_down"].as_u64().unwrap();
    // The round whose task client 3 answers first may close at its deadline before its update
    // arrives (it first works off the stale task it was stopped in); its full download is
    // counted in the round that served it, whoever folded.
    let after: Vec<_> = metrics.iter().filter(|m| m["round"].as_u64().unwrap() > u64::from(continued_after)).collect();
    let rejoined = after.iter().find(|m| down(m) >= full).unwrap_or_else(|| {
        panic!("the lagging client downloaded the full model ({full} B) after round {continued_after}: {after:?}")
    });
    let last = metrics.last().unwrap();
    assert_eq!(last["participants"], 3, "{last}");
    if last["round"] != rejoined["round"] {
        assert!(down(last) < full, "then deltas again, for all three: {last}");
    }

    let (_, coord_model) = decode_model(
        &std::fs::read(coordinator.state_dir.join(format!("model/round-{:04}.safetensors", rounds - 1))).unwrap(),
    )
    .unwrap();
    let want = tensor_digest(&coord_model);
    assert_ne!(held, want, "client 3 was stopped with an old model");
    for dir in &dirs {
        assert_eq!(held_digest(dir).as_deref(), Some(want.as_str()), "{} ends with the coordinator's", dir.display());
    }
}
