//! `--model minilm` across the product: a real coordinator and two real clients as processes over
//! mutual TLS carry LoRA adapters and the head (never the base) through a short federation on
//! generated data; the final model predicts and explains; a client whose local base differs
//! refuses the federation with a clear error. The base comes from scripts/minilm-env.sh (the
//! test installs it when missing, as `make test` does): it fails, never skips, without it.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use fl_tests::*;

/// Rows are few and texts short: the 22M-weight encoder runs on the CPU here.
fn small_data(dir: &Path) {
    let out = run(command("fl-client").args(["gen-data", "--out"]).arg(dir).args([
        "--rows",
        "48",
        "--eval-rows",
        "24",
        "--test-rows",
        "8",
        "--classes",
        "3",
        "--shards",
        "2",
    ]));
    assert!(out.status.success(), "gen-data failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// `fl-client run` with `--pretrained dir` (or the default cache when `None`).
fn start_client(url: &str, state_dir: &Path, data: &Path, pretrained: Option<&Path>) -> ClientProcess {
    let log = state_dir.with_extension("log");
    let file = std::fs::File::create(&log).unwrap();
    let mut cmd = command("fl-client");
    if let Some(dir) = pretrained {
        cmd.arg("--pretrained").arg(dir);
    }
    let child = cmd
        .args(["run", "--coordinator", url, "--threads", "1", "--max-backoff", "2", "--state-dir"])
        .arg(state_dir)
        .arg("--data")
        .arg(data)
        .stdout(Stdio::from(file.try_clone().unwrap()))
        .stderr(Stdio::from(file))
        .spawn()
        .expect("client starts");
    ClientProcess { child, log }
}

#[test]
fn lora_adapters_travel_through_a_federation_and_a_wrong_base_is_refused() {
    let base = fl_model::pretrained::install_for_tests();
    let root = tempfile::tempdir().unwrap();
    small_data(&root.path().join("data"));
    let eval = root.path().join("data/eval.csv");
    let base_arg = base.to_str().unwrap();
    let mut coordinator = CoordinatorProcess::start(
        &root.path().join("coordinator"),
        &[
            "--pretrained",
            base_arg,
            "--eval-data",
            eval.to_str().unwrap(),
            "--model",
            "minilm",
            "--max-len",
            "16",
            "--lora-rank",
            "4",
            "--rounds",
            "2",
            "--min-clients",
            "2",
            "--local-epochs",
            "1",
            "--batch-size",
            "8",
            "--lr",
            "0.005",
            "--round-timeout",
            "240",
            // Dense f32 updates, so that the bytes below count the adapters exactly.
            "--update-codec",
            "safetensors-f32",
        ],
    );
    let url = coordinator.url();
    let dirs: Vec<_> = (1..=3).map(|i| root.path().join(format!("client-{i}"))).collect();
    for (i, dir) in dirs.iter().enumerate() {
        let out = enroll(&url, &coordinator.token(), dir, &format!("client-{}", i + 1));
        assert!(out.status.success(), "enroll failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    // A base that is not the federation's: same tokenizer and config, other weights.
    let other = root.path().join("other-base");
    std::fs::create_dir(&other).unwrap();
    for file in ["tokenizer.json", "config.json"] {
        std::fs::copy(base.join(file), other.join(file)).unwrap();
    }
    std::fs::write(other.join("model.safetensors"), b"not the federation's base").unwrap();
    let mut stranger = start_client(&url, &dirs[2], &root.path().join("data/shard-1.csv"), Some(&other));
    let status = wait_child(&mut stranger.child, Duration::from_secs(60)).expect("the stranger stops");
    assert_eq!(status.code(), Some(2), "a refused base is fatal:\n{}", stranger.log_text());
    let log = stranger.log_text();
    assert!(log.contains(fl_common::MINILM_BASE_SHA256) && log.contains("SHA-256"), "{log}");

    // The other two train: one names the base, one finds it in the cache.
    let clients = [
        start_client(&url, &dirs[0], &root.path().join("data/shard-1.csv"), Some(&base)),
        start_client(&url, &dirs[1], &root.path().join("data/shard-2.csv"), None),
    ];
    let status = coordinator.wait(Duration::from_secs(600));
    assert!(status.success(), "coordinator failed:\n{}", coordinator.log_text());
    drop(clients);
    let metrics = coordinator.metrics();
    assert_eq!(metrics.len(), 2, "{metrics:?}");
    assert!(metrics.iter().all(|m| m["participants"] == 2), "{metrics:?}");

    // Only adapters and head travel: rank 4 on query and value in 6 layers, and a 3-class head.
    let adapter_weights = 6 * 2 * (4 * 384 + 384 * 4) + 3 * 384 + 3;
    let final_path = coordinator.state_dir.join("model/final.safetensors");
    let (spec, weights) = fl_common::decode_model(&std::fs::read(&final_path).unwrap()).unwrap();
    assert_eq!(spec.base_sha256, fl_common::MINILM_BASE_SHA256);
    assert_eq!(weights.tensors.iter().map(|t| t.data.len()).sum::<usize>(), adapter_weights);
    assert!(weights.tensors.iter().all(|t| t.name.starts_with("lora.") || t.name.starts_with("head.")));
    for m in &metrics {
        let up = m["bytes_up"].as_u64().unwrap();
        // Two f32 updates of the adapters and head, plus framing; the base (90 MB) never goes up.
        assert!(up >= 2 * 4 * adapter_weights as u64 && up < 2 * 4 * adapter_weights as u64 + 64 * 1024, "{m}");
    }
    // The adapters trained: B started at zero and the aggregate moved it.
    let (_, round0) =
        fl_common::decode_model(&std::fs::read(coordinator.state_dir.join("model/initial.safetensors")).unwrap())
            .unwrap();
    let b = |set: &fl_common::TensorSet| set.tensors.iter().find(|t| t.name == "lora.0.value.b").unwrap().data.clone();
    assert!(b(&round0).iter().all(|v| *v == 0.0));
    assert!(b(&weights).iter().any(|v| *v != 0.0));

    // The final model predicts and explains, reading the base from the cache.
    let out = run(command("fl-client")
        .args(["predict", "--model"])
        .arg(&final_path)
        .arg("--data")
        .arg(root.path().join("data/test.csv")));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("accuracy: "));
    let out = run(command("fl-client")
        .args(["predict", "--explain", "--text", "a short text to explain", "--model"])
        .arg(&final_path));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("label: ") && stdout.contains("(word "), "{stdout}");
    // A missing --pretrained directory is one clear error.
    let out = run(command("fl-client")
        .args(["predict", "--text", "x", "--pretrained", "/nonexistent/minilm", "--model"])
        .arg(&final_path));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--pretrained /nonexistent/minilm: not a directory"));
}
