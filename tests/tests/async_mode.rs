//! `--mode async` with real processes: a coordinator and three clients over mutual TLS train
//! continuously, the coordinator steps after every `--buffer-size` updates, and each step is a
//! metrics line with its staleness. Combinations that cannot work are refused before anything is
//! created, and a restart may not change the mode.

use std::time::Duration;

use fl_tests::*;

#[test]
fn processes_federate_in_async_mode_and_the_mode_cannot_change_on_restart() {
    let root = tempfile::tempdir().unwrap();
    let args = [
        "--buckets",
        "4096",
        "--embed-dim",
        "16",
        "--round-timeout",
        "120",
        "--lr",
        "0.05",
        "--local-epochs",
        "3",
        "--rounds",
        "5",
        "--min-clients",
        "2",
        "--mode",
        "async",
        "--buffer-size",
        "2",
        "--max-staleness",
        "3",
    ];
    let (mut coordinator, dirs) = enrolled_federation(root.path(), 900, 3, "127.0.0.1:0", &args);
    let mut clients = start_clients(root.path(), &coordinator.url(), &dirs);
    finish_federation(&mut coordinator, &mut clients, Duration::from_secs(300));
    let metrics = coordinator.metrics();
    assert_eq!(metrics.len(), 5, "one metrics line per step");
    for (i, m) in metrics.iter().enumerate() {
        assert_eq!(m["round"].as_u64(), Some(i as u64 + 1));
        let participants = m["participants"].as_u64().unwrap();
        assert!((1..=2).contains(&participants), "a step folds at most --buffer-size updates: {m}");
        let (mean, max) = (m["staleness_mean"].as_f64().unwrap(), m["staleness_max"].as_u64().unwrap());
        assert!(mean >= 0.0 && mean <= max as f64 && max <= 3, "staleness within --max-staleness: {m}");
        assert!(m["dropped_stale"].as_u64().is_some(), "{m}");
    }
    let accuracy = metrics[4]["accuracy"].as_f64().unwrap();
    assert!(accuracy > 0.3, "10 classes, chance is 0.1; got {accuracy}");
    let state = coordinator.state_dir.clone();
    assert_model_valid(&state.join("model/final.safetensors"));
    let stored: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("strategy.json")).unwrap()).unwrap();
    assert_eq!((stored["mode"].as_str(), stored["buffer_size"].as_u64()), (Some("async"), Some(2)));

    // A restart in sync mode is refused before anything changes.
    let out = run(command("fl-coordinator")
        .args(["serve", "--listen", "127.0.0.1:0", "--rounds", "6", "--mode", "sync", "--state-dir"])
        .arg(&state));
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--mode sync (federation: async)"), "{stderr}");
    assert_eq!(committed_rounds(&state), 5);
}

#[test]
fn combinations_that_cannot_work_are_refused_before_a_federation_is_created() {
    let root = tempfile::tempdir().unwrap();
    let cases: [(&[&str], &str); 6] = [
        (&["--mode", "async"], "--mode async needs --buffer-size K"),
        (&["--buffer-size", "2"], "--buffer-size applies to --mode async only"),
        (&["--mode", "async", "--buffer-size", "2", "--clients-per-round", "3"], "do not apply to --mode async"),
        (&["--mode", "async", "--buffer-size", "2", "--secure-aggregation"], "cannot run in --mode async"),
        (
            &["--mode", "async", "--buffer-size", "2", "--strategy", "median"],
            "--mode async cannot run --strategy median",
        ),
        (
            &["--mode", "async", "--buffer-size", "2", "--dp-noise-multiplier", "1", "--dp-clip-norm", "1"],
            "--mode async cannot be combined with --dp-noise-multiplier",
        ),
    ];
    for (i, (flags, message)) in cases.iter().enumerate() {
        let state = root.path().join(format!("state-{i}"));
        let out = run(command("fl-coordinator")
            .args(["serve", "--listen", "127.0.0.1:0", "--labels", "a,b", "--state-dir"])
            .arg(&state)
            .args(*flags));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {stderr}");
        assert!(stderr.contains(message), "{flags:?}: expected '{message}' in {stderr}");
        assert!(!state.join("federation.json").exists(), "{flags:?}: nothing is created");
    }
}
