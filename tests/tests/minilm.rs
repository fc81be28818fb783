//! `--model minilm` across the product: a real coordinator and two real clients as processes over
//! mutual TLS carry LoRA adapters and the head (never the base) through a short federation on
//! generated data; the final model predicts and explains; a client whose local base differs
//! refuses the federation with a clear error. The base comes from scripts/minilm-env.sh (the
//! test installs it when missing, as `make test` does): it fails, never skips, without it.

use std::ffi::OsStr;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use fl_tests::*;

/// Rows are few and texts short: the 22M-weight encoder runs on the CPU here.
fn small_data(dir: &Path, shards: usize) {
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
        &shards.to_string(),
    ]));
    assert!(out.status.success(), "gen-data failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// `fl-client run` with `--pretrained dir` (or the default cache when `None`).
fn start_client(url: &str, state_dir: &Path, data: &Path, pretrained: Option<&Path>) -> ClientProcess {
    let extra: Vec<&OsStr> = match pretrained {
        Some(dir) => vec![OsStr::new("--pretrained"), dir.as_os_str()],
        None => vec![],
    };
    ClientProcess::start_with(url, state_dir, data, &extra)
}

/// The coordinator flags of a small minilm federation: rank 4 on query and value, texts cut at
/// 16 tokens, `rounds` rounds of `clients` clients, then `extra`.
fn minilm_coordinator(root: &Path, base: &Path, rounds: u32, clients: usize, extra: &[&str]) -> CoordinatorProcess {
    let eval = root.join("data/eval.csv");
    let (rounds, clients) = (rounds.to_string(), clients.to_string());
    let mut args = vec![
        "--pretrained",
        base.to_str().unwrap(),
        "--eval-data",
        eval.to_str().unwrap(),
        "--model",
        "minilm",
        "--max-len",
        "16",
        "--lora-rank",
        "4",
        "--rounds",
        rounds.as_str(),
        "--min-clients",
        clients.as_str(),
        "--local-epochs",
        "1",
        "--batch-size",
        "8",
        "--lr",
        "0.005",
        "--round-timeout",
        "240",
    ];
    args.extend_from_slice(extra);
    CoordinatorProcess::start(&root.join("coordinator"), &args)
}

/// Weights of rank-4 adapters on query and value in 6 layers, and a 3-class head: all that travels.
const ADAPTER_WEIGHTS: usize = 6 * 2 * (4 * 384 + 384 * 4) + 3 * 384 + 3;

/// The final model's weights, after checking they are the adapters and head only, and that
/// the aggregate moved B away from its initial zeros.
fn final_adapters(coordinator: &CoordinatorProcess) -> fl_common::TensorSet {
    let read = |name: &str| {
        fl_common::decode_model(&std::fs::read(coordinator.state_dir.join("model").join(name)).unwrap()).unwrap()
    };
    let (spec, weights) = read("final.safetensors");
    assert_eq!(spec.base_sha256, fl_common::MINILM_BASE_SHA256);
    assert_eq!(weights.num_values(), ADAPTER_WEIGHTS);
    assert!(weights.tensors.iter().all(|t| t.name.starts_with("lora.") || t.name.starts_with("head.")));
    let (_, round0) = read("initial.safetensors");
    let b = |set: &fl_common::TensorSet| set.tensors.iter().find(|t| t.name == "lora.0.value.b").unwrap().data.clone();
    assert!(b(&round0).iter().all(|v| *v == 0.0));
    assert!(b(&weights).iter().any(|v| *v != 0.0), "the adapters did not move");
    weights
}

/// Checks that each round's uploads are `clients` f32-sized copies of the adapters and head
/// (4 bytes a weight, dense or as secure aggregation's masked u32 words), plus framing: the base
/// (90 MB) never goes up.
fn assert_adapter_sized_uploads(metrics: &[serde_json::Value], clients: u64) {
    let adapters = 4 * ADAPTER_WEIGHTS as u64 * clients;
    for m in metrics {
        let up = m["bytes_up"].as_u64().unwrap();
        assert!(up >= adapters && up < adapters + 64 * 1024 * clients, "{up} bytes up, {adapters} of adapters: {m}");
    }
}

/// The probabilities `predict --text` prints, one row per text.
fn printed_probabilities(stdout: &str) -> Vec<f32> {
    stdout
        .lines()
        .filter(|l| l.starts_with("  "))
        .map(|l| l.split_whitespace().last().unwrap().parse().unwrap())
        .collect()
}

#[test]
fn lora_adapters_travel_through_a_federation_and_a_wrong_base_is_refused() {
    let base = fl_model::pretrained::install_for_tests();
    let root = tempfile::tempdir().unwrap();
    small_data(&root.path().join("data"), 2);
    // Dense f32 updates, so that the bytes below count the adapters exactly.
    let mut coordinator = minilm_coordinator(root.path(), &base, 2, 2, &["--update-codec", "safetensors-f32"]);
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
    // Only adapters and head travel, and the aggregate trained them.
    assert_adapter_sized_uploads(&metrics, 2);
    final_adapters(&coordinator);
    let final_path = coordinator.state_dir.join("model/final.safetensors");

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

    // `export --merge` writes one standalone file, which predicts, evaluates and explains with
    // no base at all: --pretrained names an empty directory and the cache is empty too.
    let merged = root.path().join("merged.safetensors");
    let out =
        run(command("fl-client").args(["export", "--merge", "--model"]).arg(&final_path).arg("--out").arg(&merged));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let no_base = root.path().join("no-base");
    std::fs::create_dir(&no_base).unwrap();
    let predict = |model: &Path, args: &[&str], with_base: bool| -> Output {
        let mut cmd = command("fl-client");
        if !with_base {
            cmd.arg("--pretrained").arg(&no_base).env("FL_CACHE_DIR", &no_base);
        }
        let out = run(cmd.arg("predict").args(args).arg("--model").arg(model));
        assert!(
            out.status.success(),
            "predict {args:?} on {}: {}",
            model.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    let texts = ["--text", "a short text to classify", "--text", "and another one, a little longer than that"];
    let adapted = printed_probabilities(&String::from_utf8_lossy(&predict(&final_path, &texts, true).stdout));
    let standalone = printed_probabilities(&String::from_utf8_lossy(&predict(&merged, &texts, false).stdout));
    assert_eq!(adapted.len(), 2 * 3);
    // Printed to 4 decimals: equal up to the rounding of values within 1e-5 of each other.
    for (a, m) in adapted.iter().zip(&standalone) {
        assert!((a - m).abs() <= 1.01e-4, "adapted {adapted:?}, merged {standalone:?}");
    }
    let test = root.path().join("data/test.csv");
    let accuracy = |out: Output| String::from_utf8_lossy(&out.stdout).lines().next().unwrap().to_string();
    assert_eq!(
        accuracy(predict(&merged, &["--data", test.to_str().unwrap()], false)),
        accuracy(predict(&final_path, &["--data", test.to_str().unwrap()], true))
    );
    let out = predict(&merged, &["--explain", "--text", "a short text to explain"], false);
    assert!(String::from_utf8_lossy(&out.stdout).contains("(word "));
    // Without a merged file, the same empty --pretrained is refused: the base is really not read.
    let out = run(command("fl-client")
        .args(["predict", "--text", "x", "--model"])
        .arg(&final_path)
        .arg("--pretrained")
        .arg(&no_base)
        .env("FL_CACHE_DIR", &no_base));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no model.safetensors there"), "{out:?}");
}

#[test]
fn export_merge_refuses_a_model_without_adapters_and_other_export_flags() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = fl_common::ModelSpec::with_defaults(fl_common::ModelKind::Fasttext, vec!["a".into(), "b".into()]);
    spec.buckets = 256;
    let fasttext = dir.path().join("fasttext.safetensors");
    fl_model::model::Classifier::new(spec, tch::Device::Cpu, 0).unwrap().save(&fasttext).unwrap();
    let out_path = dir.path().join("merged.safetensors");
    for extra in [&[][..], &["--quantize", "f16"][..]] {
        let out = run(command("fl-client")
            .args(["export", "--merge", "--model"])
            .arg(&fasttext)
            .arg("--out")
            .arg(&out_path)
            .args(extra));
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let expected =
            if extra.is_empty() { "this is a fasttext model, which has none" } else { "cannot be used with" };
        assert!(stderr.contains(expected), "{stderr}");
        assert!(!out_path.exists(), "nothing is written");
    }
}

/// DP and secure aggregation on minilm: the clip and the noise apply to what travels (the
/// adapters and the head), which the masked sums carry and nothing else.
#[test]
fn lora_adapters_federate_under_differential_privacy_and_secure_aggregation() {
    let base = fl_model::pretrained::install_for_tests();
    let root = tempfile::tempdir().unwrap();
    small_data(&root.path().join("data"), 3);
    let extra = ["--secure-aggregation", "--dp-noise-multiplier", "0.5", "--dp-clip-norm", "0.5"];
    let mut coordinator = minilm_coordinator(root.path(), &base, 1, 3, &extra);
    let url = coordinator.url();
    let clients: Vec<ClientProcess> = (1..=3)
        .map(|i| {
            let dir = root.path().join(format!("client-{i}"));
            let out = enroll(&url, &coordinator.token(), &dir, &format!("client-{i}"));
            assert!(out.status.success(), "enroll failed: {}", String::from_utf8_lossy(&out.stderr));
            start_client(&url, &dir, &root.path().join(format!("data/shard-{i}.csv")), Some(&base))
        })
        .collect();
    let status = coordinator.wait(Duration::from_secs(600));
    assert!(status.success(), "coordinator failed:\n{}", coordinator.log_text());
    drop(clients);
    let metrics = coordinator.metrics();
    assert_eq!(metrics.len(), 1, "{metrics:?}");
    let m = &metrics[0];
    assert_eq!(m["secagg_masked"], 3, "{m}");
    assert_eq!(m["participants"], 3, "{m}");
    assert_eq!(m["dp_clip_norm"], 0.5, "{m}");
    assert!(m["dp_epsilon"].as_f64().is_some_and(|e| e.is_finite() && e > 0.0), "{m}");
    assert_adapter_sized_uploads(&metrics, 3);
    final_adapters(&coordinator);
}
