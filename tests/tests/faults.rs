//! Fault injection with real processes on loopback: the coordinator killed and restarted at every
//! stage of a round, clients killed, paused past the deadline, revoked, or from another CA.
//! Each test asserts the final state: rounds completed, metrics lines, model files.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::Duration;

use fl_tests::*;

fn assert_final_state_files(state_dir: &Path, rounds: u64) {
    for r in 1..=rounds {
        assert_model_valid(&state_dir.join(format!("model/round-{r:04}.safetensors")));
    }
    assert_model_valid(&state_dir.join("model/final.safetensors"));
}

/// Rounds 1..=n, each exactly once, and every model file valid.
fn assert_final_state(state_dir: &Path, rounds: u64) {
    let metrics = read_metrics(state_dir);
    let numbers: Vec<u64> = metrics.iter().map(|m| m["round"].as_u64().unwrap()).collect();
    assert_eq!(numbers, (1..=rounds).collect::<Vec<_>>(), "each round exactly once in metrics.jsonl");
    assert_final_state_files(state_dir, rounds);
    let last = metrics.last().unwrap()["accuracy"].as_f64().unwrap();
    assert!(last > 0.4, "the model still learns (accuracy {last})");
}

/// The committed rounds, after checking that `metrics.jsonl` has exactly their lines, in order.
fn committed_metrics(state_dir: &Path) -> u32 {
    let committed = committed_rounds(state_dir);
    let rounds: Vec<u64> = read_metrics(state_dir).iter().map(|m| m["round"].as_u64().unwrap()).collect();
    assert_eq!(rounds, (1..=u64::from(committed)).collect::<Vec<_>>(), "one metrics line per committed round");
    committed
}

/// True while the coordinator collects the updates of `round`.
fn collecting(status: &CoordinatorStatus, round: u32) -> bool {
    status.phase == Phase::Collecting && status.round == round
}

/// SIGABRT, the signal of `std::process::abort`.
fn libc_sigabrt() -> i32 {
    6
}

#[test]
fn coordinator_killed_in_training_upload_and_checkpoint_resumes_without_loss() {
    let root = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let args = ["--rounds", "6", "--min-clients", "3", "--round-timeout", "60"];
    let (mut coordinator, dirs) = enrolled_federation(root.path(), 2400, 3, &listen, &args);
    let url = coordinator.url();
    let state = coordinator.state_dir.clone();
    let eval = root.path().join("data/eval.csv");
    let mut full_args = vec!["--eval-data", eval.to_str().unwrap()];
    full_args.extend_from_slice(&args);
    let mut clients = start_clients(root.path(), &url, &dirs);
    let mut faults = 0;

    // Strike 1: kill -9 while the clients train round 2.
    coordinator.wait_status(Duration::from_secs(120), "round 2 to start", |s| collecting(s, 2));
    coordinator.child.kill().unwrap();
    coordinator.child.wait().unwrap();
    faults += 1;
    // Round 1's commit runs while round 2 collects: it may or may not have been written.
    assert!(committed_metrics(&state) <= 1);
    // Each fold of round 3 stalls, so round 3 stays open with its updates accepted for a while:
    // clients that finish together otherwise leave too short a moment to strike in.
    coordinator = CoordinatorProcess::start_with(&state, &listen, &full_args, &[("FL_FAULT_SLEEP", "fold:3:2")]);

    // Strike 2: kill -9 while round 3's updates are being uploaded and folded.
    coordinator
        .wait_status(Duration::from_secs(120), "a round-3 update", |s| collecting(s, 3) && !s.accepted.is_empty());
    coordinator.child.kill().unwrap();
    coordinator.child.wait().unwrap();
    faults += 1;
    let done = committed_metrics(&state);
    assert!((1..=3).contains(&done), "round 2's commit may be pending, round 3 is committed whole or not at all");

    // Strikes 3 and 4: abort inside the checkpoint of rounds 4 and 5, between its writes.
    for (point, round) in [("after-metrics", 4), ("after-model", 5)] {
        let fault = format!("{point}:{round}");
        coordinator = CoordinatorProcess::start_with(&state, &listen, &full_args, &[("FL_FAULT_CRASH", &fault)]);
        let status = coordinator.wait(Duration::from_secs(180));
        assert_eq!(status.signal(), Some(libc_sigabrt()), "the injected crash aborted the process: {status}");
        // The crash hit between the writes of the commit: the round is not recorded as done.
        assert_eq!(committed_rounds(&state), round - 1, "{fault}");
        assert!(state.join(format!("model/round-{round:04}.safetensors")).exists(), "{fault}: model written");
        let last_metrics = read_metrics(&state).last().map(|m| m["round"].as_u64().unwrap());
        let metrics_written = point == "after-metrics";
        assert_eq!(last_metrics == Some(u64::from(round)), metrics_written, "{fault}: metrics line");
        faults += 1;
    }
    // Restart clean and finish: round 4's orphan metrics line was dropped and the round rerun.
    coordinator = CoordinatorProcess::start_with(&state, &listen, &full_args, &[]);
    let status = coordinator.wait(Duration::from_secs(180));
    assert!(status.success(), "{}", coordinator.log_text());
    assert_final_state(&state, 6);
    for c in clients.iter_mut() {
        let status = wait_child(&mut c.child, Duration::from_secs(30)).expect("client exits after the end");
        assert!(status.success(), "clients survive coordinator restarts without re-enrolling:\n{}", c.log_text());
    }
    // Every round needed all three: each client reconnected after every restart, as itself.
    let registry = fl_server::registry::RegistryStore::open(&state).unwrap().read().unwrap();
    assert_eq!(registry.clients.len(), 3, "nobody re-enrolled");
    for c in &registry.clients {
        assert!(c.rounds_joined >= 5, "{} joined {} rounds", c.id, c.rounds_joined);
    }
    println!("reliability: coordinator crashes injected: {faults}, rounds completed: 6, state lost: 0");
}

/// The files of `STATE/download-feedback/`, sorted: the top-k download residual of each round
/// whose file is kept.
fn feedback_files(state: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(state.join("download-feedback"))
        .map(|dir| dir.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

/// The pipelined commit: round r+1 collects on round r's model while round r's evaluation and
/// commit run in the background. Strike 1: round 3's commit is stalled (`FL_FAULT_SLEEP`) and the
/// coordinator is killed -9 while round 4 collects. Strike 2: round 4's commit is stalled, then
/// aborts at its start (`FL_FAULT_CRASH=before-commit:4`) while round 5 collects. Each restart
/// resumes from the last committed round and redoes the round that was pending.
#[test]
fn coordinator_killed_while_the_next_round_collects_and_the_commit_is_pending() {
    let root = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let args = ["--rounds", "6", "--min-clients", "2", "--round-timeout", "60"];
    let (mut coordinator, dirs) = enrolled_federation(root.path(), 1800, 2, &listen, &args);
    let state = coordinator.state_dir.clone();
    let eval = root.path().join("data/eval.csv");
    let mut full_args = vec!["--eval-data", eval.to_str().unwrap()];
    full_args.extend_from_slice(&args);
    // The same federation, now with round 3's commit stalled for a minute.
    coordinator.child.kill().unwrap();
    coordinator.child.wait().unwrap();
    coordinator =
        CoordinatorProcess::start_with(&state, &listen, &full_args, &[("FL_FAULT_SLEEP", "before-commit:3:60")]);
    let mut clients = start_clients(root.path(), &coordinator.url(), &dirs);

    // Strike 1: round 4's updates come in on round 3's model; round 3 is not committed yet.
    let mut seen = CoordinatorStatus::default();
    coordinator.wait_status(Duration::from_secs(180), "a round-4 update", |s| {
        seen = s.clone();
        s.round == 4 && s.phase != Phase::Waiting && !s.accepted.is_empty()
    });
    assert_eq!(seen.completed_rounds, 2, "round 4 collects before round 3 is committed: {seen:?}");
    coordinator.child.kill().unwrap();
    coordinator.child.wait().unwrap();
    assert_eq!(committed_metrics(&state), 2, "round 3's metrics line waits for its commit");
    assert!(!state.join("model/round-0003.safetensors").exists(), "round 3's model file was not written");
    assert_eq!(feedback_files(&state), vec!["round-0002.safetensors"], "the residual of committed round 2 is kept");

    // Strike 2: round 3 is redone; round 4's commit stalls, then aborts while round 5 collects.
    coordinator = CoordinatorProcess::start_with(
        &state,
        &listen,
        &full_args,
        &[("FL_FAULT_SLEEP", "before-commit:4:20"), ("FL_FAULT_CRASH", "before-commit:4")],
    );
    coordinator.wait_status(Duration::from_secs(180), "round 5 while round 4 commits", |s| {
        s.round == 5 && s.phase != Phase::Waiting && s.completed_rounds == 3
    });
    let status = coordinator.wait(Duration::from_secs(120));
    assert_eq!(status.signal(), Some(libc_sigabrt()), "the injected crash aborted the process: {status}");
    assert_eq!(committed_metrics(&state), 3);
    assert_eq!(feedback_files(&state), vec!["round-0003.safetensors"]);

    // Restart clean and finish: every round once, in order, and the residual of the last one.
    coordinator = CoordinatorProcess::start_with(&state, &listen, &full_args, &[]);
    let status = coordinator.wait(Duration::from_secs(180));
    assert!(status.success(), "{}", coordinator.log_text());
    assert_final_state(&state, 6);
    assert_eq!(feedback_files(&state), vec!["round-0006.safetensors"]);
    for c in clients.iter_mut() {
        let status = wait_child(&mut c.child, Duration::from_secs(30)).expect("client exits after the end");
        assert!(status.success(), "clients survive coordinator restarts:\n{}", c.log_text());
    }
    println!("reliability: coordinator killed with a commit pending: 2 times, rounds completed: 6, state lost: 0");
}

#[test]
fn a_third_of_the_clients_killed_mid_round() {
    let root = tempfile::tempdir().unwrap();
    let (mut coordinator, dirs) = enrolled_federation(
        root.path(),
        3000,
        6,
        "127.0.0.1:0",
        &["--rounds", "4", "--min-clients", "3", "--round-timeout", "30"],
    );
    let url = coordinator.url();
    let mut clients = start_clients(root.path(), &url, &dirs);
    // Strike in the first round that sampled all six.
    let mut struck = 0u64;
    coordinator.wait_status(Duration::from_secs(120), "a round with all 6 clients", |s| {
        if s.phase == Phase::Collecting && s.sampled.len() == 6 {
            struck = u64::from(s.round);
        }
        struck > 0
    });
    assert!(struck <= 3, "all six clients connected by round 3");
    for c in clients.iter_mut().skip(4) {
        c.child.kill().unwrap();
    }
    let status = coordinator.wait(Duration::from_secs(240));
    assert!(status.success(), "{}", coordinator.log_text());
    assert_final_state(&coordinator.state_dir, 4);
    let metrics = coordinator.metrics();
    let round = &metrics[struck as usize - 1];
    assert_eq!(round["sampled"], 6);
    assert_eq!(round["participants"], 4, "the struck round completes with the 4 survivors");
    assert_eq!(metrics[3]["participants"], 4);
    println!("reliability: clients killed: 2 of 6 in round {struck}, rounds completed: 4, state lost: 0");
}

#[test]
fn a_client_paused_past_the_deadline_rejoins_later() {
    let root = tempfile::tempdir().unwrap();
    let (mut coordinator, dirs) = enrolled_federation(
        root.path(),
        1800,
        3,
        "127.0.0.1:0",
        &["--rounds", "4", "--min-clients", "2", "--round-timeout", "6"],
    );
    let url = coordinator.url();
    let mut clients = start_clients(root.path(), &url, &dirs);
    coordinator.wait_status(Duration::from_secs(120), "round 2 to start", |s| collecting(s, 2));
    signal(&clients[2].child, "STOP");
    coordinator.wait_status(Duration::from_secs(60), "round 2 to close at its deadline", |s| s.completed_rounds >= 2);
    signal(&clients[2].child, "CONT");
    let status = coordinator.wait(Duration::from_secs(240));
    assert!(status.success(), "{}", coordinator.log_text());
    assert_final_state(&coordinator.state_dir, 4);
    let metrics = coordinator.metrics();
    assert_eq!(metrics[1]["participants"], 2, "round 2 closed at its deadline without the paused client");
    assert_eq!(metrics[3]["participants"], 3, "the paused client is back by round 4");
    let status = wait_child(&mut clients[2].child, Duration::from_secs(30)).unwrap();
    assert!(status.success(), "{}", clients[2].log_text());
}

#[test]
fn a_revoked_client_is_refused_at_once_and_for_good() {
    let root = tempfile::tempdir().unwrap();
    let (coordinator, dirs) = enrolled_federation(
        root.path(),
        1200,
        2,
        "127.0.0.1:0",
        &["--rounds", "1000", "--min-clients", "1", "--round-timeout", "30"],
    );
    let url = coordinator.url();
    let mut clients = start_clients(root.path(), &url, &dirs);
    wait_until(Duration::from_secs(120), "round 2 to complete", || coordinator.metrics().len() >= 2);
    let state = coordinator.state_dir.to_str().unwrap().to_string();
    let list = run(command("fl-coordinator").args(["clients", "list", "--state-dir", &state]));
    let list = String::from_utf8_lossy(&list.stdout).to_string();
    let mut lines = list.lines();
    assert!(lines.next().unwrap().starts_with("ID"), "{list}");
    let victim = lines.find(|l| l.contains("client-2")).unwrap().split_whitespace().next().unwrap().to_string();
    let out = run(command("fl-coordinator").args(["clients", "revoke", &victim, "--state-dir", &state]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let status = wait_child(&mut clients[1].child, Duration::from_secs(60)).expect("revoked client stops");
    assert_eq!(status.code(), Some(2), "a refused identity exits with status 2");
    coordinator.wait_status(Duration::from_secs(10), "the revoked client to be gone", |s| {
        !s.connected.contains(&victim) && s.connected.len() == 1
    });
    // Its next connection, with a certificate that is still valid, is refused too.
    let again = run(command("fl-client")
        .args(["run", "--coordinator", &url, "--state-dir"])
        .arg(&dirs[1])
        .arg("--data")
        .arg(root.path().join("data/shard-2.csv")));
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("revoked"), "{}", String::from_utf8_lossy(&again.stderr));
    let list = run(command("fl-coordinator").args(["clients", "list", "--state-dir", &state]));
    let row = String::from_utf8_lossy(&list.stdout).lines().find(|l| l.starts_with(&victim)).unwrap().to_string();
    assert!(row.ends_with("revoked"), "{row}");
    // The other client carries on.
    let before = coordinator.metrics().len();
    wait_until(Duration::from_secs(60), "more rounds", || coordinator.metrics().len() > before + 1);
    assert!(clients[0].child.try_wait().unwrap().is_none());
}

#[test]
fn a_client_of_another_federation_is_refused() {
    fl_common::tls::install_crypto_provider();
    let root = tempfile::tempdir().unwrap();
    let ours = CoordinatorProcess::start(&root.path().join("ours"), &["--labels", "a,b", "--rounds", "1"]);
    let theirs = CoordinatorProcess::start(&root.path().join("theirs"), &["--labels", "a,b", "--rounds", "1"]);
    let stranger = root.path().join("stranger");
    assert!(enroll(&theirs.url(), &theirs.token(), &stranger, "stranger").status.success());
    let csv = root.path().join("data.csv");
    std::fs::write(&csv, "text,label\nhello,a\nbye,b\n").unwrap();

    // The daemon refuses a coordinator that its CA did not sign, and stops for good.
    let out = run(command("fl-client")
        .args(["run", "--coordinator", &ours.url(), "--state-dir"])
        .arg(&stranger)
        .arg("--data")
        .arg(&csv));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("certificate"), "{stderr}");

    // A peer that trusts our CA but presents their certificate fails the TLS handshake.
    let identity = fl_client::identity::ClientState::new(&stranger).load().unwrap();
    let ca = std::fs::read_to_string(ours.state_dir.join("ca.pem")).unwrap();
    let url = ours.url();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let result = rt.block_on(async {
        let channel = fl_common::tls::connect(&url, &ca, Some(&identity.key)).await?;
        let mut client = fl_proto::pb::federation_client::FederationClient::new(channel);
        client.join(fl_proto::pb::JoinRequest { name: "x".into(), num_examples: 1 }).await?;
        anyhow::Ok(())
    });
    assert!(result.is_err(), "a certificate from another CA is refused");
    // And the coordinator still serves its own clients.
    assert!(enroll(&ours.url(), &ours.token(), &root.path().join("member"), "member").status.success());
}

#[test]
fn tokens_expire_run_out_and_are_revoked() {
    let root = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(&root.path().join("c"), &["--labels", "a,b", "--rounds", "1"]);
    let state = coordinator.state_dir.to_str().unwrap().to_string();
    let create = |extra: &[&str]| {
        let out = run(command("fl-coordinator").args(["token", "create", "--state-dir", &state]).args(extra));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let enroll_err = |token: &str, dir: &str| {
        let out = enroll(&coordinator.url(), token, &root.path().join(dir), dir);
        (out.status.success(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    let once = create(&["--uses", "1"]);
    assert!(enroll_err(&once, "a1").0);
    let (ok, err) = enroll_err(&once, "a2");
    assert!(!ok && err.contains("used up"), "{err}");

    let short = create(&["--ttl", "1s"]);
    let short_id = short.split('.').nth(1).unwrap().to_string();
    let registry = fl_server::registry::RegistryStore::open(&coordinator.state_dir).unwrap();
    let expires = registry.read().unwrap().tokens.iter().find(|t| t.id == short_id).unwrap().expires_unix.unwrap();
    wait_until(Duration::from_secs(5), "the token to expire", || fl_server::registry::now_unix() >= expires);
    let (ok, err) = enroll_err(&short, "b1");
    assert!(!ok && err.contains("expired"), "{err}");

    let revoked = create(&[]);
    let id = revoked.split('.').nth(1).unwrap();
    assert!(run(command("fl-coordinator").args(["token", "revoke", id, "--state-dir", &state])).status.success());
    let (ok, err) = enroll_err(&revoked, "c1");
    assert!(!ok && err.contains("revoked"), "{err}");

    let list = run(command("fl-coordinator").args(["token", "list", "--state-dir", &state]));
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(list.lines().next().unwrap().starts_with("ID"));
    assert!(
        list.contains("used-up") && list.contains("expired") && list.contains("revoked") && list.contains("active"),
        "{list}"
    );
    // The registry never holds a secret in clear.
    let registry = std::fs::read_to_string(coordinator.state_dir.join("registry.json")).unwrap();
    assert!(!registry.contains(once.split('.').nth(2).unwrap()));
    use std::os::unix::fs::PermissionsExt;
    for f in ["join-token", "ca.key", "server.key"] {
        let mode = std::fs::metadata(coordinator.state_dir.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
    let mode = std::fs::metadata(root.path().join("a1/client.key")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "client key");
    // `fl-coordinator status` prints status.json: nobody joined, so the first round waits.
    let out = run(command("fl-coordinator").args(["status", "--json", "--state-dir", &state]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status: CoordinatorStatus = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((status.phase, status.round, status.rounds_total), (Phase::Waiting, 1, 1), "{status:?}");
}

#[test]
fn a_client_restarted_mid_round_gets_the_task_again() {
    let root = tempfile::tempdir().unwrap();
    let (mut coordinator, dirs) = enrolled_federation(
        root.path(),
        1800,
        3,
        "127.0.0.1:0",
        &["--rounds", "3", "--min-clients", "3", "--round-timeout", "60"],
    );
    let url = coordinator.url();
    let mut clients = start_clients(root.path(), &url, &dirs);
    coordinator.wait_status(Duration::from_secs(120), "round 2 to start", |s| collecting(s, 2));
    clients[0].child.kill().unwrap();
    clients[0].child.wait().unwrap();
    clients[0] = ClientProcess::start(&url, &dirs[0], &root.path().join("data/shard-1.csv"));
    let status = coordinator.wait(Duration::from_secs(240));
    assert!(status.success(), "{}", coordinator.log_text());
    assert_final_state(&coordinator.state_dir, 3);
    assert!(coordinator.metrics().iter().all(|m| m["participants"] == 3), "the restarted client answered round 2");
    assert!(wait_child(&mut clients[0].child, Duration::from_secs(30)).unwrap().success());
}

/// Mounts a small tmpfs at `dir`, or returns false where that is not allowed (not root).
fn mount_small_tmpfs(dir: &Path, size: &str) -> bool {
    std::fs::create_dir_all(dir).unwrap();
    std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

struct Unmount(std::path::PathBuf);
impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A real full disk under the spool of a coordinator process. Needs root to mount a tmpfs;
/// without root it says "skipped", and `engine.rs` still covers a full spool in process with an
/// injected writer (`a_full_disk_fails_the_attempt_visibly_and_the_federation_recovers`).
#[test]
fn disk_full_is_reported_and_the_federation_recovers() {
    let root = tempfile::tempdir().unwrap();
    let disk = root.path().join("disk");
    if !mount_small_tmpfs(&disk, "4m") {
        println!("skipped: disk_full_is_reported_and_the_federation_recovers: mounting a tmpfs needs root");
        return;
    }
    let _unmount = Unmount(disk.clone());
    gen_data(&root.path().join("data"), 900, 2);
    let listen = format!("127.0.0.1:{}", free_port());
    // The uploads are spooled on the small disk; status.json stays writable to report it.
    let state = root.path().join("coordinator");
    std::fs::create_dir_all(disk.join("spool")).unwrap();
    std::fs::create_dir_all(&state).unwrap();
    std::os::unix::fs::symlink(disk.join("spool"), state.join("spool")).unwrap();
    let eval = root.path().join("data/eval.csv");
    let args = [
        "--eval-data",
        eval.to_str().unwrap(),
        "--buckets",
        "4096",
        "--embed-dim",
        "16",
        "--rounds",
        "2",
        "--min-clients",
        "2",
    ];
    let mut coordinator = CoordinatorProcess::start_with(&state, &listen, &args, &[]);
    let url = coordinator.url();
    let dirs = [root.path().join("client-1"), root.path().join("client-2")];
    for d in &dirs {
        assert!(enroll(&url, &coordinator.token(), d, "c").status.success());
    }
    // Fill the disk: uploads cannot be spooled, so rounds fail and are retried, loudly.
    let filler = disk.join("filler");
    let _ = std::fs::write(&filler, vec![0u8; 8 << 20]);
    let mut clients = start_clients(root.path(), &url, &dirs);
    coordinator.wait_status(Duration::from_secs(120), "an attempt failed by the full disk", |s| {
        s.failed_attempts >= 1 && s.last_failure.as_ref().is_some_and(|f| f.contains("No space left on device"))
    });
    assert!(read_metrics(&state).is_empty(), "no metrics line for an uncommitted round");
    // A client enrolling onto a full disk fails clearly rather than half-writing its identity.
    let out = enroll(&url, &coordinator.token(), &disk.join("client-x"), "x");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("No space left on device"), "{stderr}");
    // Space comes back: the federation goes on by itself and completes.
    std::fs::remove_file(&filler).unwrap();
    assert!(coordinator.wait(Duration::from_secs(180)).success(), "{}", coordinator.log_text());
    let rounds: Vec<u64> = read_metrics(&state).iter().map(|m| m["round"].as_u64().unwrap()).collect();
    assert_eq!(rounds, vec![1, 2]);
    assert_final_state_files(&state, 2);
    for c in clients.iter_mut() {
        assert!(wait_child(&mut c.child, Duration::from_secs(30)).unwrap().success(), "{}", c.log_text());
    }
}
