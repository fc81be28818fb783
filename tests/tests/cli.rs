//! The binaries as command-line tools: what a user piping their output sees.

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::time::Duration;

use fl_tests::{command, gen_data, run, wait_child};

/// `fl-client predict --data test.csv | head -1`: the reader closes the pipe after one line. The
/// command must end quietly (exit 0, or killed by SIGPIPE as `cat` would be), never panic.
#[test]
fn predict_into_a_closed_pipe_ends_without_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    gen_data(&data, 400, 1);
    let model = dir.path().join("model.safetensors");
    let out = run(command("fl-client")
        .args(["train", "--epochs", "1", "--buckets", "4096", "--threads", "1", "--data"])
        .arg(data.join("train.csv"))
        .arg("--out")
        .arg(&model));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // With --explain every row of test.csv is explained: far more output than a pipe buffer holds,
    // so predict is still writing when the reader goes away.
    let mut child = command("fl-client")
        .args(["predict", "--explain", "--model"])
        .arg(&model)
        .arg("--data")
        .arg(data.join("test.csv"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
    // The reader is dropped here: the pipe is closed with most of the output unwritten.
    assert!(!first.is_empty(), "predict printed nothing");
    let status = wait_child(&mut child, Duration::from_secs(120)).expect("predict ends");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    // A panic exits with 101: only success or death by SIGPIPE pass.
    assert!(
        status.success() || status.signal() == Some(13),
        "predict into a closed pipe: {status:?}, stderr: {stderr}"
    );
}
