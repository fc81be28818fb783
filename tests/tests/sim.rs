//! `fl-sim`: the same seed gives bit-identical weights with 1 or 2 training threads, a tiny run
//! writes what `serve` writes plus clients.jsonl, and bad flags exit 2 with a reason.

use std::path::Path;

use clap::Parser;
use fl_model::datagen::{write_csv, GeneratorConfig, TextGenerator};
use fl_sim::{ClientLine, SimArgs};
use fl_tests::{command, run};
use tokio_util::sync::CancellationToken;

/// Writes train.csv (1,200 rows, 4 labels) and eval.csv (300 rows) into `dir`.
fn data(dir: &Path) {
    let generator = TextGenerator::new(GeneratorConfig { classes: 4, ..Default::default() });
    let labels = generator.labels();
    write_csv(&dir.join("train.csv"), &generator.rows(1200, 1), &labels).unwrap();
    write_csv(&dir.join("eval.csv"), &generator.rows(300, 2), &labels).unwrap();
}

/// A small Dirichlet federation: 8 clients, 4 per round, 2 rounds, a 4,096 × 16 fastText.
fn args(dir: &Path, state: &str, threads: usize, seed: u64) -> SimArgs {
    let (train, eval, state) = (dir.join("train.csv"), dir.join("eval.csv"), dir.join(state));
    SimArgs::try_parse_from([
        "fl-sim",
        "--state-dir",
        state.to_str().unwrap(),
        "--data",
        train.to_str().unwrap(),
        "--eval-data",
        eval.to_str().unwrap(),
        "--clients",
        "8",
        "--clients-per-round",
        "4",
        "--rounds",
        "2",
        "--partition",
        "dirichlet",
        "--alpha",
        "0.5",
        "--buckets",
        "4096",
        "--embed-dim",
        "16",
        "--lr",
        "0.05",
        "--threads",
        &threads.to_string(),
        "--seed",
        &seed.to_string(),
        "--quiet",
    ])
    .unwrap()
}

#[test]
fn the_same_seed_gives_the_same_weights_with_one_or_two_threads() {
    fl_common::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    data(dir.path());
    let never = CancellationToken::new();
    let one = fl_sim::run(&args(dir.path(), "one", 1, 7), &never).unwrap();
    let two = fl_sim::run(&args(dir.path(), "two", 2, 7), &never).unwrap();
    assert_eq!(one.completed_rounds, 2);
    assert_eq!(one.shard_sizes, two.shard_sizes);
    assert_eq!(one.final_digest, two.final_digest, "1 and 2 threads trained different weights");
    // The model files hold the same weights (their specs differ only in the federation id).
    let final_weights = |state: &str| {
        let bytes = std::fs::read(dir.path().join(state).join("model/final.safetensors")).unwrap();
        fl_common::decode_model(&bytes).unwrap().1
    };
    assert!(final_weights("one") == final_weights("two"), "the final model files hold different weights");
    // The digest depends on the seed: the comparison above can fail.
    let other = fl_sim::run(&args(dir.path(), "other", 2, 8), &never).unwrap();
    assert_ne!(one.final_digest, other.final_digest);

    // What serve writes: one metrics line per round, with an evaluation; plus clients.jsonl.
    let metrics = std::fs::read_to_string(dir.path().join("one/metrics.jsonl")).unwrap();
    let metrics: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(metrics.len(), 2);
    for (i, m) in metrics.iter().enumerate() {
        assert_eq!(m["round"], i + 1);
        assert_eq!(m["participants"], 4);
        let accuracy = m["accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&accuracy), "{m}");
    }
    let clients = std::fs::read_to_string(dir.path().join("one/clients.jsonl")).unwrap();
    let clients: Vec<ClientLine> = clients.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(clients.len(), 8, "4 clients in each of 2 rounds");
    assert!(clients.iter().all(|c| c.refused.is_none() && c.examples > 0 && c.loss.is_finite()), "{clients:?}");
    let sizes: usize = one.shard_sizes.iter().sum();
    assert_eq!(sizes, 1200, "the shards cover the data");
    assert!(dir.path().join("one/model/round-0002.safetensors").exists());
}

#[test]
fn the_binary_runs_a_tiny_federation_and_refuses_bad_flags() {
    let dir = tempfile::tempdir().unwrap();
    data(dir.path());
    let base = |state: &str| {
        let mut cmd = command("fl-sim");
        cmd.arg("--state-dir").arg(dir.path().join(state)).arg("--data").arg(dir.path().join("train.csv"));
        cmd.args(["--buckets", "4096", "--embed-dim", "16", "--threads", "2"]);
        cmd
    };
    let out = run(base("tiny").args(["--clients", "4", "--rounds", "1", "--partition", "pathological"]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("round  accuracy") && stdout.contains("1 rounds, 4 clients"), "{stdout}");
    let clients = std::fs::read_to_string(dir.path().join("tiny/clients.jsonl")).unwrap();
    assert_eq!(clients.lines().count(), 4);
    let metrics = std::fs::read_to_string(dir.path().join("tiny/metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 1);

    let refused = [
        (vec!["--clients", "4", "--alpha", "0"], "--alpha"),
        (vec!["--clients", "4", "--attack", "1.5:sign-flip:5"], "fraction must be in (0, 1]"),
        (vec!["--partition", "column"], "--partition-column"),
        (vec!["--clients", "4", "--partition", "column", "--partition-column", "user"], "--clients does not go"),
        (vec!["--partition", "column", "--partition-column", "user"], "no column 'user'"),
        (vec!["--clients", "2", "--partition", "pathological", "--classes-per-client", "1"], "cannot cover 4 classes"),
        (vec!["--rounds", "2"], "--clients N is required"),
    ];
    for (i, (flags, reason)) in refused.iter().enumerate() {
        let out = run(base(&format!("bad-{i}")).args(flags));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {stderr}");
        assert!(stderr.contains(reason), "{flags:?}: expected {reason:?} in {stderr}");
    }
}
