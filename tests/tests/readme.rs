//! What the README promises a new user: after `make demo`, each `fl-client predict --text`
//! example prints the class its comment names.

use std::path::Path;
use std::process::Command;

use fl_tests::{bin_dir, command, run};

/// `(text, label)` of each `fl-client predict ... --text "TEXT" ... # LABEL` line of README.md.
fn readme_examples() -> Vec<(String, String)> {
    let readme = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let text = std::fs::read_to_string(&readme).unwrap();
    let mut examples = Vec::new();
    for line in text.lines().filter(|l| l.contains("fl-client predict") && l.contains("--text")) {
        let quoted = line.split_once("--text \"").and_then(|(_, rest)| rest.split_once('"')).map(|(t, _)| t);
        let label = line.rsplit_once('#').map(|(_, l)| l.trim().to_string());
        match (quoted, label) {
            // A placeholder ("...") shows the flags, not a text.
            (Some("..."), _) => {}
            (Some(t), Some(l)) if !l.contains(' ') => examples.push((t.to_string(), l)),
            _ => panic!("README.md: every `predict --text` example names its class in a comment (# LABEL): {line}"),
        }
    }
    examples
}

#[test]
fn readme_predict_examples_give_the_class_they_imply_after_make_demo() {
    let examples = readme_examples();
    assert!(examples.len() >= 3, "README.md has {} predict --text examples", examples.len());
    let dir = tempfile::tempdir().unwrap();
    let demo = dir.path().join("demo");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    // The demo itself: same data, same federation, same model as `make demo`.
    let out = Command::new(root.join("scripts/demo.sh"))
        .current_dir(&root)
        .env("DEMO_DIR", &demo)
        .env("FL_BIN", bin_dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scripts/demo.sh failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let model = demo.join("coordinator/model/final.safetensors");
    let mut wrong = Vec::new();
    for (text, label) in &examples {
        let out = run(command("fl-client").args(["predict", "--model"]).arg(&model).args(["--text", text]));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let got = stdout.lines().next().and_then(|l| l.strip_prefix("label: ")).unwrap_or("").to_string();
        println!("{text:?}: {got} (README: {label})");
        if &got != label {
            wrong.push(format!("{text:?}: predicted {got}, README says {label}\n{stdout}"));
        }
    }
    assert!(wrong.is_empty(), "README examples the demo's model gets wrong:\n{}", wrong.join("\n"));
}
