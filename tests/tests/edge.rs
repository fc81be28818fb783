//! The edge model end to end, with the built binaries: train, export, predict and explain from
//! the compact file, and refusal of corrupt and mismatched files.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fl_common::tensors::sha256_hex;
use fl_tests::{command, enroll, gen_data, run, start_clients, wait_child, ClientProcess, CoordinatorProcess};

fn accuracy(model: &Path, data: &Path) -> (f64, String) {
    let out = run(command("fl-client").args(["predict", "--model"]).arg(model).arg("--data").arg(data));
    assert!(out.status.success(), "predict failed: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let first = stdout.lines().next().unwrap();
    (first.strip_prefix("accuracy: ").expect("first line is the accuracy").parse().unwrap(), stdout)
}

#[test]
fn an_exported_model_round_trips_through_predict_and_explain_distills_and_bad_files_are_refused() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    gen_data(&data, 1500, 1);
    let f32_model = root.path().join("fasttext.safetensors");
    let out = run(command("fl-client")
        .args(["train", "--data"])
        .arg(data.join("train.csv"))
        .args(["--buckets", "8192", "--epochs", "3", "--threads", "2", "--out"])
        .arg(&f32_model));
    assert!(out.status.success(), "train failed: {}", String::from_utf8_lossy(&out.stderr));
    let test = data.join("test.csv");
    let (before, _) = accuracy(&f32_model, &test);

    let int8 = root.path().join("fasttext-int8.fl");
    let out = run(command("fl-client")
        .args(["export", "--model"])
        .arg(&f32_model)
        .arg("--out")
        .arg(&int8)
        .args(["--quantize", "int8", "--data"])
        .arg(&test));
    assert!(out.status.success(), "export failed: {}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("file size") && table.contains("accuracy") && table.contains("int8"), "{table}");
    let size = |p: &Path| std::fs::metadata(p).unwrap().len() as f64;
    assert!(size(&int8) < 0.3 * size(&f32_model), "int8 {} vs f32 {}", size(&int8), size(&f32_model));

    let (after, stdout) = accuracy(&int8, &test);
    assert!(stdout.contains("(int8)"), "predict runs the int8 table: {stdout}");
    assert!((before - after).abs() <= 0.01, "f32 {before}, int8 {after}");
    let out = run(command("fl-client").args(["predict", "--model"]).arg(&int8).args([
        "--text",
        "the striker scored a late goal",
        "--explain",
        "--top",
        "2",
    ]));
    assert!(out.status.success(), "explain failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("label: "));

    // Corrupt and mismatched files: a nonzero exit and a message that names the file.
    let bytes = std::fs::read(&int8).unwrap();
    let refused = |name: &str, content: &[u8], expect: &str| {
        let path = root.path().join(name);
        std::fs::write(&path, content).unwrap();
        let out = run(command("fl-client").args(["predict", "--model"]).arg(&path).args(["--text", "x"]));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name} was accepted");
        assert!(stderr.contains(name) && stderr.contains(expect), "{name}: {stderr}");
    };
    refused("truncated.fl", &bytes[..bytes.len() / 2], "not a valid model file");
    let mut flipped = bytes.clone();
    let n = flipped.len();
    flipped[n - 10] ^= 0xff;
    refused("flipped.fl", &flipped, "not a valid model file");
    refused("garbage.fl", b"FLEDGE\x00\x01 but no zlib stream", "compressed payload is corrupt");
    refused("empty.safetensors", b"", "not a valid model file");

    // Distillation from the command line: a student from the int8 teacher, and bad settings refused.
    let student = root.path().join("student.safetensors");
    let distill = |alpha: &str| {
        run(command("fl-client")
            .args(["distill", "--teacher"])
            .arg(&int8)
            .arg("--data")
            .arg(data.join("train.csv"))
            .args(["--buckets", "4096", "--epochs", "5", "--threads", "2", "--temperature", "2", "--alpha", alpha])
            .arg("--out")
            .arg(&student))
    };
    let out = distill("0.5");
    assert!(out.status.success(), "distill failed: {}", String::from_utf8_lossy(&out.stderr));
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("teacher") && report.contains("student"), "{report}");
    let (distilled, _) = accuracy(&student, &test);
    assert!(distilled > 0.5, "10 classes; the student scores {distilled}");
    let out = distill("1.5");
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--alpha"));

    // A forged file whose spec does not fit its weights is refused by fl-model's unit tests
    // (`edge::tests`), and forged layouts, scales and rows by fl-common's (`compact::tests`).
}

/// Trains a fastText of `buckets` x `dim` on `csv` for `epochs`.
fn train_small(csv: &Path, out: &Path, buckets: &str, dim: &str, epochs: &str) {
    let out = run(command("fl-client")
        .args(["train", "--data"])
        .arg(csv)
        .args(["--buckets", buckets, "--embed-dim", dim, "--epochs", epochs, "--threads", "2", "--out"])
        .arg(out));
    assert!(out.status.success(), "train failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// `fl-coordinator serve` on `state` that must fail at start; its stderr.
fn refused_serve(state: &Path, args: &[&str]) -> String {
    let out =
        run(command("fl-coordinator").args(["serve", "--listen", "127.0.0.1:0", "--state-dir"]).arg(state).args(args));
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "serve should exit 2 (permanent): {stderr}");
    stderr
}

/// Federated distillation across processes: the coordinator ships an int8 teacher of another
/// spec than the federation's model; each client fetches it once, checks it, keeps it, distils
/// on its own rows, and says so in its update; a teacher with other labels, or another teacher
/// on a restart, is refused at start.
#[test]
fn a_federation_distils_from_a_shipped_teacher_fetched_once_per_client() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    gen_data(&data, 900, 2);
    // The teacher: a fastText of another size than the federation's, exported to int8.
    let teacher_f32 = root.path().join("teacher.safetensors");
    train_small(&data.join("train.csv"), &teacher_f32, "2048", "16", "3");
    let teacher = root.path().join("teacher-int8.fl");
    let out = run(command("fl-client").args(["export", "--model"]).arg(&teacher_f32).arg("--out").arg(&teacher));
    assert!(out.status.success(), "export failed: {}", String::from_utf8_lossy(&out.stderr));
    // A model of 3 classes: not the federation's labels.
    let other = root.path().join("other");
    let out = run(command("fl-client").args(["gen-data", "--out"]).arg(&other).args([
        "--rows",
        "60",
        "--eval-rows",
        "10",
        "--test-rows",
        "10",
        "--shards",
        "1",
        "--classes",
        "3",
    ]));
    assert!(out.status.success(), "gen-data failed: {}", String::from_utf8_lossy(&out.stderr));
    let wrong_labels = root.path().join("wrong-labels.safetensors");
    train_small(&other.join("train.csv"), &wrong_labels, "1024", "8", "1");

    let eval = data.join("eval.csv");
    let state = root.path().join("coordinator");
    let path = |p: &PathBuf| p.to_str().unwrap().to_string();
    let stderr = refused_serve(&state, &["--eval-data", &path(&eval), "--distill-from", &path(&wrong_labels)]);
    assert!(stderr.contains("wrong-labels.safetensors") && stderr.contains("labels"), "{stderr}");
    assert!(!state.join("model").exists(), "a refused teacher leaves no federation behind");

    let args = [
        "--eval-data",
        &path(&eval),
        "--rounds",
        "2",
        "--min-clients",
        "2",
        "--round-timeout",
        "60",
        "--buckets",
        "4096",
        "--local-epochs",
        "2",
        "--distill-from",
        &path(&teacher),
    ];
    let mut coordinator = CoordinatorProcess::start(&state, &args);
    let dirs: Vec<PathBuf> = (1..=2).map(|i| root.path().join(format!("client-{i}"))).collect();
    for (i, dir) in dirs.iter().enumerate() {
        let out = enroll(&coordinator.url(), &coordinator.token(), dir, &format!("client-{}", i + 1));
        assert!(out.status.success(), "enroll failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let clients: Vec<ClientProcess> = start_clients(root.path(), &coordinator.url(), &dirs);
    let status = coordinator.wait(Duration::from_secs(300));
    assert!(status.success(), "coordinator failed:\n{}", coordinator.log_text());
    for mut c in clients {
        let status = wait_child(&mut c.child, Duration::from_secs(30)).expect("client exits after the federation ends");
        assert!(status.success(), "client failed:\n{}", c.log_text());
        assert!(c.log_text().contains("local training distils"), "{}", c.log_text());
    }

    let bytes = std::fs::read(&teacher).unwrap();
    let size = bytes.len() as u64;
    let metrics = coordinator.metrics();
    assert_eq!(metrics.len(), 2, "{metrics:?}");
    for m in &metrics {
        assert_eq!(m["participants"], 2, "{m}");
        assert_eq!(m["distilled"], 2, "both updates were distilled: {m}");
        assert!(m["accuracy"].as_f64().unwrap().is_finite(), "{m}");
    }
    // Each client fetched the teacher once, in round 1; the bytes count as downloads.
    assert_eq!(metrics[0]["teacher_bytes_down"].as_u64(), Some(2 * size), "{:?}", metrics[0]);
    assert_eq!(metrics[1]["teacher_bytes_down"].as_u64(), Some(0), "{:?}", metrics[1]);
    assert!(metrics[0]["bytes_down"].as_u64().unwrap() > 2 * size, "{:?}", metrics[0]);
    let kept = format!("distill/teacher-{}.model", sha256_hex(&bytes));
    for dir in &dirs {
        assert_eq!(std::fs::read(dir.join(&kept)).unwrap(), bytes, "{} keeps the teacher", dir.display());
    }

    // The federation's final model without the rows no client's update ever moved.
    let model = state.join("model");
    let export = |out: &Path, initial: &Path| {
        run(command("fl-client")
            .args(["export", "--model"])
            .arg(model.join("final.safetensors"))
            .arg("--out")
            .arg(out)
            .arg("--untouched-from")
            .arg(initial)
            .arg("--data")
            .arg(data.join("test.csv")))
    };
    let (plain, untouched) = (root.path().join("final.fl"), root.path().join("final-touched.fl"));
    let out = run(command("fl-client")
        .args(["export", "--model"])
        .arg(model.join("final.safetensors"))
        .arg("--out")
        .arg(&plain));
    assert!(out.status.success(), "export failed: {}", String::from_utf8_lossy(&out.stderr));
    let out = export(&untouched, &model.join("initial.safetensors"));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "export failed: {}", String::from_utf8_lossy(&out.stderr));
    let dropped: usize = stdout.split(" embedding rows never touched").next().unwrap().trim().parse().unwrap();
    assert!(dropped > 0 && dropped < 4096, "{stdout}");
    let size = |p: &Path| std::fs::metadata(p).unwrap().len();
    assert!(size(&untouched) < size(&plain), "{} vs {}", size(&untouched), size(&plain));
    accuracy(&untouched, &data.join("test.csv"));
    // The initial weights of another model are refused.
    let out = export(&untouched, &teacher_f32);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--untouched-from") && stderr.contains("teacher.safetensors"), "{stderr}");

    // A restart cannot change the teacher: another file is refused, the same one resumes.
    let stderr = refused_serve(&state, &["--distill-from", &path(&teacher_f32)]);
    assert!(stderr.contains("would change the existing federation's distillation"), "{stderr}");
    let stderr = refused_serve(&state, &["--distill-from", &path(&teacher), "--distill-alpha", "0.9"]);
    assert!(stderr.contains("would change"), "{stderr}");
}
