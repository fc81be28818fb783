//! The explanation and personalisation commands as a user runs them: `fl-client rules`, `embed`,
//! `report` (checked in a real headless browser when one is installed), and a personalised
//! federation (the clients' local evaluations in the coordinator's `metrics.jsonl`, finetune's
//! fine-tuning of the final model) followed by `predict --personal`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use fl_tests::*;

/// A small fastText model trained on `dir/data/train.csv` (generated), at `dir/model.safetensors`.
fn small_model(dir: &Path) -> std::path::PathBuf {
    gen_data(&dir.join("data"), 1500, 1);
    let model = dir.join("model.safetensors");
    let out = run(command("fl-client")
        .args(["train", "--threads", "2", "--epochs", "2", "--buckets", "8192", "--data"])
        .arg(dir.join("data/train.csv"))
        .arg("--out")
        .arg(&model));
    assert!(out.status.success(), "train failed: {}", String::from_utf8_lossy(&out.stderr));
    model
}

/// The first headless browser found on PATH.
fn browser() -> Option<&'static str> {
    ["chromium-headless-shell", "chromium", "google-chrome", "chrome"].into_iter().find(|b| {
        Command::new(b).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
    })
}

#[test]
fn rules_embed_and_report_from_the_command_line_and_in_a_browser() {
    let root = tempfile::tempdir().unwrap();
    let model = small_model(root.path());
    let data = root.path().join("data");

    let out = run(command("fl-client")
        .args(["rules", "--format", "json", "--model"])
        .arg(&model)
        .arg("--data")
        .arg(data.join("train.csv"))
        .arg("--test")
        .arg(data.join("test.csv")));
    assert!(out.status.success(), "rules failed: {}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("rules --format json prints JSON");
    let rules = report["rule_list"]["rules"].as_array().unwrap();
    assert!(rules.last().unwrap()["condition"].is_null(), "the last rule is the default");
    assert!(rules.len() >= 2 && rules.len() <= 10 * 10 + 1);
    assert_eq!(report["heldout_rows"], 500);
    let fidelity = report["heldout_fidelity"].as_f64().unwrap();
    assert!(fidelity > 0.5, "fidelity {fidelity}");
    assert_eq!(report["top_ngrams"].as_array().unwrap().len(), 10);

    let points = root.path().join("points.csv");
    let out = run(command("fl-client")
        .args(["embed", "--model"])
        .arg(&model)
        .arg("--data")
        .arg(data.join("test.csv"))
        .arg("--out")
        .arg(&points));
    assert!(out.status.success(), "embed failed: {}", String::from_utf8_lossy(&out.stderr));
    let csv = std::fs::read_to_string(&points).unwrap();
    assert!(csv.starts_with("x,y,label,predicted,text\n"));
    assert_eq!(csv.lines().count(), 501);

    let page = root.path().join("report.html");
    let out = run(command("fl-client")
        .args(["report", "--model"])
        .arg(&model)
        .arg("--data")
        .arg(data.join("test.csv"))
        .arg("--out")
        .arg(&page));
    assert!(out.status.success(), "report failed: {}", String::from_utf8_lossy(&out.stderr));
    let html = std::fs::read_to_string(&page).unwrap().to_lowercase();
    for forbidden in ["http:", "https:", "src=", "href=", "<link", "url(", "@import", "<script"] {
        assert!(!html.contains(forbidden), "the report contains {forbidden:?}");
    }

    // A bad row: the error names the file, the line and the field.
    let bad = root.path().join("bad.csv");
    std::fs::write(&bad, "text,label\nkalo mine,sports\nsuta pove,cooking\n").unwrap();
    let out = run(command("fl-client").args(["rules", "--model"]).arg(&model).arg("--data").arg(&bad));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.csv: line 3, field 'label': unknown label 'cooking'"), "{err}");

    // Rendered by a real browser: the DOM it builds has the plot's points and the tables.
    let Some(browser) = browser() else {
        println!("skipped: the browser check (no chromium-headless-shell or chromium on PATH; apt-get install chromium-headless-shell)");
        return;
    };
    let out = run(Command::new(browser)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--dump-dom"])
        .arg(format!("file://{}", page.display())));
    assert!(out.status.success(), "{browser} failed: {}", String::from_utf8_lossy(&out.stderr));
    let dom = String::from_utf8_lossy(&out.stdout);
    assert_eq!(dom.matches("<circle").count(), 500, "the browser's DOM has every point");
    for id in ["confusion", "rules", "scatter", "fidelity"] {
        assert!(dom.contains(&format!("id=\"{id}\"")), "the browser's DOM lacks #{id}");
    }
}

#[test]
fn predict_personal_refuses_a_client_without_a_personal_model() {
    let root = tempfile::tempdir().unwrap();
    let out =
        run(command("fl-client").args(["predict", "--personal", "--text", "hello", "--state-dir"]).arg(root.path()));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("this client has no personal model"), "{err}");
    assert!(err.contains("--personalize"), "the message says what to do: {err}");
}

#[test]
fn finetune_flags_without_finetune_are_refused_as_permanent() {
    let root = tempfile::tempdir().unwrap();
    gen_data(&root.path().join("data"), 100, 1);
    for (flag, personalize, why) in [
        (
            ["--finetune-epochs", "2"],
            Some("ditto"),
            "--finetune-epochs applies to --personalize finetune only (not ditto",
        ),
        (["--finetune-epochs", "2"], None, "--finetune-epochs needs --personalize finetune"),
        (
            ["--local-prior", "false"],
            Some("fedper"),
            "--local-prior applies to --personalize finetune only (not fedper",
        ),
        (["--local-prior", "true"], None, "--local-prior needs --personalize finetune"),
    ] {
        let mut cmd = command("fl-client");
        cmd.args(["run", "--coordinator", "https://localhost:9", "--state-dir"])
            .arg(root.path().join("client"))
            .args(flag)
            .arg("--data")
            .arg(root.path().join("data/shard-1.csv"));
        if let Some(method) = personalize {
            cmd.args(["--personalize", method]);
        }
        let out = run(&mut cmd);
        assert_eq!(out.status.code(), Some(2), "bad flags are permanent: {}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stderr).contains(why), "{}", String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn personalised_clients_keep_a_personal_model_and_predict_with_it() {
    let root = tempfile::tempdir().unwrap();
    let (mut coordinator, dirs) = enrolled_federation(
        root.path(),
        1200,
        2,
        "127.0.0.1:0",
        // Three local epochs: 600 rows a client learn the generated English slowly in one.
        &[
            "--rounds",
            "2",
            "--local-epochs",
            "3",
            "--min-clients",
            "2",
            "--round-timeout",
            "60",
            "--buckets",
            "8192",
            "--lr",
            "0.01",
        ],
    );
    let url = coordinator.url();
    let methods = ["finetune", "ditto"];
    let mut clients: Vec<ClientProcess> = dirs
        .iter()
        .zip(methods)
        .enumerate()
        .map(|(i, (dir, method))| {
            let log = dir.with_extension("log");
            let file = std::fs::File::create(&log).unwrap();
            let child = command("fl-client")
                .args(["run", "--coordinator", &url, "--threads", "1", "--personalize", method, "--state-dir"])
                .arg(dir)
                .arg("--data")
                .arg(root.path().join(format!("data/shard-{}.csv", i + 1)))
                .stdout(Stdio::from(file.try_clone().unwrap()))
                .stderr(Stdio::from(file))
                .spawn()
                .unwrap();
            ClientProcess { child, log }
        })
        .collect();
    let status = coordinator.wait(Duration::from_secs(240));
    assert!(status.success(), "coordinator failed:\n{}", coordinator.log_text());
    for c in &mut clients {
        let status = wait_child(&mut c.child, Duration::from_secs(30)).expect("client exits");
        assert!(status.success(), "client failed:\n{}", c.log_text());
    }
    // Each round's line records the distribution of what both clients measured in that round.
    let rounds = read_metrics(&coordinator.state_dir);
    assert_eq!(rounds.len(), 2);
    let client_rounds: Vec<Vec<serde_json::Value>> = dirs.iter().map(|d| read_metrics(&d.join("personal"))).collect();
    for (r, line) in rounds.iter().enumerate() {
        assert_eq!(line["local_eval_clients"], 2, "{line}");
        for (field, client_field) in
            [("personal_accuracy", "personal_accuracy"), ("local_global_accuracy", "global_accuracy")]
        {
            // A client's last line for the round (an attempt retried would have written two).
            let of_round = |c: &Vec<serde_json::Value>| {
                let mine = c.iter().rfind(|l| l["round"] == r + 1 && l["after_federation"] == false).unwrap();
                mine[client_field].as_f64().unwrap()
            };
            let mut reported: Vec<f64> = client_rounds.iter().map(of_round).collect();
            reported.sort_by(f64::total_cmp);
            let mean = (reported[0] + reported[1]) / 2.0;
            let p10 = reported[0] + 0.1 * (reported[1] - reported[0]);
            assert!((line[format!("{field}_mean")].as_f64().unwrap() - mean).abs() < 1e-12, "{line}");
            assert!((line[format!("{field}_p10")].as_f64().unwrap() - p10).abs() < 1e-12, "{line}");
        }
    }
    for (dir, method) in dirs.iter().zip(methods) {
        let accuracy: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("personal/accuracy.json")).unwrap()).unwrap();
        assert_eq!(accuracy["round"], 2);
        assert!(accuracy["method"].as_str().unwrap().starts_with(method));
        // finetune fine-tunes the final model after the federation (a third line); ditto keeps
        // the personal model of its last round.
        let finetuned = method == "finetune";
        assert_eq!(accuracy["after_federation"], finetuned, "{accuracy}");
        assert_eq!(read_metrics(&dir.join("personal")).len(), if finetuned { 3 } else { 2 });
        // 600 rows per shard, 20 % held out.
        assert_eq!(accuracy["test_rows"], 120);
        // Above chance (0.1) by a margin; finetune trains locally on top of the global model,
        // while ditto (λ 10) stays near the global model of two rounds.
        let least = if method == "finetune" { 0.3 } else { 0.15 };
        assert!(accuracy["personal_accuracy"].as_f64().unwrap() > least, "{accuracy}");
        let out = run(command("fl-client")
            .args(["predict", "--personal", "--state-dir"])
            .arg(dir)
            .arg("--data")
            .arg(root.path().join("data/test.csv")));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("accuracy: "));
    }
}
