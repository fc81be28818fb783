//! The edge model end to end, with the built binaries: train, export, predict and explain from
//! the compact file, and refusal of corrupt and mismatched files.

use std::path::Path;

use fl_tests::{command, gen_data, run};

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
