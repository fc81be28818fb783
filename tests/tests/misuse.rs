//! The binaries used wrongly, as a new user or an adversary would: every bad flag refused with
//! its range, state dirs locked, exit codes a supervisor can trust (0 done, 1 transient,
//! 2 permanent, 130 interrupted), and nothing a client sends reaching the operator's terminal raw.

use std::collections::BTreeSet;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use fl_tests::*;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts exit status `code` and that stderr holds every one of `needles`.
#[track_caller]
fn assert_exit(out: &Output, code: i32, needles: &[&str]) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(code), "expected exit {code}, got {:?}; stderr: {err}", out.status);
    for needle in needles {
        assert!(err.contains(needle), "expected '{needle}' in stderr: {err}");
    }
}

fn client(args: &[&str]) -> Output {
    run(command("fl-client").args(args))
}

fn admin(args: &[&str]) -> Output {
    run(command("fl-coordinator").args(args))
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The defects of the issue: each flag value that looped, panicked or was silently accepted is
/// refused at parse time with exit 2, naming the flag and its range.
#[test]
fn bad_flag_values_are_refused_with_the_flag_and_its_range() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let serve = |extra: &[&str]| {
        let mut args = vec!["serve", "--listen", "127.0.0.1:0", "--labels", "a,b", "--state-dir", s(&state)];
        args.extend_from_slice(extra);
        admin(&args)
    };
    for (flag, value) in [
        ("--lr", "NaN"),
        ("--lr", "-1"),
        ("--lr", "inf"),
        ("--round-timeout", "NaN"),
        ("--round-timeout", "inf"),
        ("--rounds", "0"),
        ("--local-epochs", "0"),
        ("--min-clients", "0"),
        ("--over-sample", "0.5"),
    ] {
        let out = serve(&[&format!("{flag}={value}")]);
        assert_exit(&out, 2, &[flag, "invalid value"]);
    }
    assert!(!state.join("federation.json").exists(), "nothing was created by a refused command");

    let csv = dir.path().join("data.csv");
    std::fs::write(&csv, "text,label\nhello there,a\nbye now,b\n").unwrap();
    let url = "https://127.0.0.1:1";
    let run_args = |extra: &[&str]| {
        let mut args = vec!["run", "--coordinator", url, "--state-dir", s(&state), "--data", s(&csv)];
        args.extend_from_slice(extra);
        client(&args)
    };
    assert_exit(&run_args(&["--max-backoff=-1"]), 2, &["--max-backoff", "greater than 0"]);
    assert_exit(&run_args(&["--threads", "0"]), 2, &["--threads", "from 1 to 1024"]);
    let out_dir = dir.path().join("gen");
    let gen = |extra: &[&str]| {
        let mut args = vec!["gen-data", "--out", s(&out_dir), "--eval-rows", "10", "--test-rows", "10"];
        args.extend_from_slice(extra);
        client(&args)
    };
    assert_exit(&gen(&["--rows", "50", "--partition", "dirichlet", "--alpha", "0"]), 2, &["--alpha", "greater than 0"]);
    assert_exit(&gen(&["--rows", "0"]), 2, &["--rows", "from 1 to"]);
    assert!(!out_dir.exists(), "gen-data wrote nothing before refusing");
    let model = dir.path().join("m.safetensors");
    let train = client(&["train", "--data", s(&csv), "--out", s(&model), "--lr", "inf"]);
    assert_exit(&train, 2, &["--lr", "finite"]);
    assert!(!model.exists());
    let token = |extra: &[&str]| {
        let mut args = vec!["token", "create", "--state-dir", s(&state)];
        args.extend_from_slice(extra);
        admin(&args)
    };
    assert_exit(&token(&["--ttl", "0s"]), 2, &["--ttl", "from 1s"]);
    assert_exit(&token(&["--uses", "0"]), 2, &["--uses", "from 1"]);
}

/// One subcommand of a binary, as its help describes it.
#[derive(Debug)]
struct Subcommand {
    path: Vec<String>,
    /// Flags that take a value.
    flags: Vec<String>,
    /// Flags the usage line requires, and positional arguments (as `<NAME>`).
    required: Vec<String>,
}

/// Every leaf subcommand of `bin`, read from `--help` recursively: new subcommands and flags are
/// covered without changing this test.
fn subcommands(bin: &str, path: &[String]) -> Vec<Subcommand> {
    let out = run(command(bin).args(path).arg("--help"));
    assert!(out.status.success(), "{bin} {path:?} --help: {}", stderr(&out));
    let help = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut section = "";
    let mut children = Vec::new();
    let mut flags = Vec::new();
    for line in help.lines() {
        if !line.starts_with(' ') && line.ends_with(':') {
            section = line;
            continue;
        }
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if section == "Commands:" && indent == 2 {
            let name = trimmed.split_whitespace().next().unwrap_or_default();
            if !name.is_empty() && name != "help" {
                children.push(name.to_string());
            }
        }
        // Option lines are indented by 2 or 6; their descriptions by 10.
        if section == "Options:" && indent <= 6 && trimmed.starts_with('-') {
            let words: Vec<&str> = trimmed.split_whitespace().collect();
            let long = words.iter().position(|w| w.starts_with("--"));
            if let Some(i) = long {
                if words.get(i + 1).is_some_and(|v| v.starts_with('<')) {
                    flags.push(words[i].to_string());
                }
            }
        }
    }
    if !children.is_empty() {
        return children
            .into_iter()
            .flat_map(|c| {
                let mut p = path.to_vec();
                p.push(c);
                subcommands(bin, &p)
            })
            .collect();
    }
    let usage = help.lines().find(|l| l.starts_with("Usage:")).unwrap_or_default().to_string();
    vec![Subcommand { path: path.to_vec(), flags, required: required_of(&usage) }]
}

/// The required flags and positionals of a usage line; of a group `<--a <A>|--b>`, the first.
fn required_of(usage: &str) -> Vec<String> {
    let mut out = Vec::new();
    // Angle-bracket depth: a group `<--model <MODEL>|--personal>` opens and closes over words.
    let mut depth = 0i32;
    let mut skipping = false;
    let words: Vec<&str> = usage.split_whitespace().skip(2).collect();
    for (i, w) in words.iter().enumerate() {
        if !skipping {
            let previous_is_flag = i > 0 && words[i - 1].trim_start_matches('<').starts_with("--");
            if let Some(flag) = w.trim_start_matches('<').strip_prefix("--") {
                let flag = flag.split(['|', '>']).next().unwrap_or_default();
                if words.get(i + 1).is_some_and(|v| v.starts_with('<') && !v.starts_with("<--")) {
                    out.push(format!("--{flag}"));
                }
            } else if depth == 0
                && w.starts_with('<')
                && w.ends_with('>')
                && !w.contains("COMMAND")
                && !previous_is_flag
            {
                out.push(w.to_string());
            }
            skipping = w.contains('|');
        }
        depth += w.matches('<').count() as i32 - w.matches('>').count() as i32;
        if depth <= 0 {
            depth = 0;
            skipping = false;
        }
    }
    out
}

#[test]
fn usage_lines_are_read_right() {
    let usage = "Usage: fl-client predict [OPTIONS] <--model <MODEL>|--personal> <--text <TEXT>|--data <DATA>>";
    assert_eq!(required_of(usage), ["--model", "--text"]);
    let usage = "Usage: fl-coordinator token revoke --state-dir <STATE_DIR> <ID>";
    assert_eq!(required_of(usage), ["--state-dir", "<ID>"]);
}

/// A value for an argument that is not under test: parses, and makes the command stop soon after
/// parsing (missing files, an unreachable coordinator, an address that cannot be bound).
fn filler(arg: &str, dir: &Path) -> String {
    let missing = dir.join("missing.csv").to_str().unwrap().to_string();
    match arg {
        "--coordinator" => "https://127.0.0.1:1".into(),
        "--token" => "fl1.bad".into(),
        // One per run: parallel runs must not meet on one state dir's lock.
        "--state-dir" => {
            static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            dir.join(format!("state-{n}")).to_str().unwrap().into()
        }
        "--out" => dir.join("out").to_str().unwrap().into(),
        // An invalid port fails at once; an invalid IP would wait for a DNS lookup.
        "--listen" => "127.0.0.1:99999".into(),
        "--text" => "hello".into(),
        "--labels" => "a,b".into(),
        "--name" => "n".into(),
        "--http" => "127.0.0.1:99999".into(),
        _ if arg.starts_with('<') => "x".into(),
        _ => missing,
    }
}

/// Values for the required arguments of `sub` but `skip`, and an address that cannot be bound
/// for `--listen`: a serve whose flags all pass stops at the bind.
fn filler_args(sub: &Subcommand, skip: Option<&String>, dir: &Path) -> Vec<String> {
    let listen = sub.flags.iter().filter(|f| *f == "--listen");
    let fillers: BTreeSet<&String> = sub.required.iter().chain(listen).collect();
    let mut args = Vec::new();
    for arg in fillers {
        if Some(arg) == skip {
            continue;
        }
        if !arg.starts_with('<') {
            args.push(arg.clone());
        }
        args.push(filler(arg, dir));
    }
    args
}

/// Every flag that takes a value, of every subcommand of `bin`, with hostile values: no exit 101
/// (a panic), no death by a signal, no hang. Parse-time refusals exit 2.
fn hostile_values_never_panic(bin: &'static str, least_cases: usize) {
    let dir = tempfile::tempdir().unwrap();
    let hostile = ["0", "-1", "NaN", "inf", "1000000000000"];
    let mut cases = Vec::new();
    for mut sub in subcommands(bin, &[]) {
        // Flags required only unless another is given (`predict --model|--personal`) are not
        // in the help's usage line; clap's error for their absence names them.
        let probe = run(command(bin).args(&sub.path).args(filler_args(&sub, None, dir.path())));
        let err = stderr(&probe);
        if err.contains("required arguments were not provided") {
            let usage = err.lines().find(|l| l.starts_with("Usage:")).unwrap_or_default();
            sub.required = required_of(usage);
        }
        for flag in &sub.flags {
            for value in hostile {
                let mut args = sub.path.clone();
                args.extend(filler_args(&sub, Some(flag), dir.path()));
                args.push(format!("{flag}={value}"));
                cases.push((bin, args));
            }
        }
    }
    assert!(cases.len() >= least_cases, "the walk found too few flags ({}): is --help parsed right?", cases.len());
    let cases = std::sync::Mutex::new(cases.into_iter());
    let failures = std::sync::Mutex::new(Vec::new());
    let ran = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for worker in 0..4 {
            let (cases, failures, ran, dir) = (&cases, &failures, &ran, dir.path());
            scope.spawn(move || {
                let cwd = dir.join(format!("cwd-{worker}"));
                std::fs::create_dir_all(&cwd).unwrap();
                loop {
                    let Some((bin, args)) = cases.lock().unwrap().next() else { return };
                    let mut child = command(bin)
                        .args(&args)
                        .current_dir(&cwd)
                        .env_remove("FL_STATE_DIR")
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(Stdio::piped())
                        .spawn()
                        .unwrap();
                    let status = wait_child(&mut child, Duration::from_secs(60));
                    ran.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let mut err = String::new();
                    let verdict = match status {
                        None => {
                            let _ = child.kill();
                            let _ = child.wait();
                            Some("still running after 60 s".to_string())
                        }
                        Some(st) => {
                            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
                            match (st.code(), st.signal()) {
                                (Some(0..=2), _) if !err.contains("panicked") => None,
                                _ => Some(format!("{st:?}: {}", err.lines().take(3).collect::<Vec<_>>().join(" | "))),
                            }
                        }
                    };
                    if let Some(v) = verdict {
                        failures.lock().unwrap().push(format!("{bin} {}: {v}", args.join(" ")));
                    }
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    assert!(failures.is_empty(), "{} of {} runs failed:\n{}", failures.len(), ran.into_inner(), failures.join("\n"));
}

#[test]
fn hostile_values_for_every_flag_of_fl_client_never_panic() {
    hostile_values_never_panic("fl-client", 400);
}

#[test]
fn hostile_values_for_every_flag_of_fl_coordinator_never_panic() {
    hostile_values_never_panic("fl-coordinator", 200);
}

#[test]
fn hostile_values_for_every_flag_of_fl_health_never_panic() {
    hostile_values_never_panic("fl-health", 10);
}

/// Polls until `path` holds text containing `needle`.
fn wait_for_text(path: &Path, needle: &str) {
    wait_until(Duration::from_secs(60), &format!("{needle} in {}", path.display()), || {
        std::fs::read_to_string(path).is_ok_and(|t| t.contains(needle))
    });
}

/// Locks, enrollment, the registry and exit codes against one running coordinator.
#[test]
fn state_dirs_are_locked_enrollment_cannot_half_happen_and_the_registry_cannot_vanish() {
    let root = tempfile::tempdir().unwrap();
    let (coordinator, dirs) =
        enrolled_federation(root.path(), 300, 1, "127.0.0.1:0", &["--rounds", "1", "--min-clients", "2"]);
    let state = coordinator.state_dir.clone();
    let url = coordinator.url();
    let token = coordinator.token();

    // A second coordinator on the same state dir: exit 2 at once, naming the holder.
    let started = Instant::now();
    let second = coordinator_cmd_serve(&state);
    assert_exit(&second, 2, &[&format!("process {}", coordinator.child.id()), "fl-coordinator serve"]);
    assert!(started.elapsed() < Duration::from_secs(20), "refused at once");
    // Admin commands still work beside it, under their own short lock.
    assert!(admin(&["clients", "list", "--state-dir", s(&state)]).status.success());

    // Two `run` on one client state dir: the second exits 2 naming the first.
    let data = root.path().join("data/shard-1.csv");
    let first = ClientProcess::start(&url, &dirs[0], &data);
    wait_for_text(&dirs[0].join("process.lock"), "fl-client run");
    let out = client(&["run", "--coordinator", &url, "--state-dir", s(&dirs[0]), "--data", s(&data)]);
    assert_exit(&out, 2, &[&format!("process {}", first.child.id()), "in use"]);
    // Enrolling into a client dir a daemon runs from is refused before the token is used.
    let out = client(&["enroll", "--coordinator", &url, "--token", &token, "--state-dir", s(&dirs[0]), "--force"]);
    assert_exit(&out, 2, &["in use"]);
    drop(first);

    let uses = || {
        fl_server::registry::RegistryStore::open(&state)
            .unwrap()
            .read()
            .unwrap()
            .tokens
            .iter()
            .map(|t| t.uses)
            .sum::<u32>()
    };
    let uses_before = uses();
    // An identity already there: refused without --force, and the token is not used.
    let out = enroll(&url, &token, &dirs[0], "again");
    assert_exit(&out, 2, &["already holds the identity", "--force"]);
    // A state dir that cannot be written (its parent is a file): refused before the token is used.
    let file = root.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    assert_exit(&enroll(&url, &token, &file.join("client"), "nowhere"), 2, &["a-file"]);
    assert_eq!(uses(), uses_before, "no token use was spent on a refused enrollment");
    // Storing the identity fails after the token was used (ca.pem is a non-empty directory): the
    // new id is revoked again, no half identity stays, exit 2.
    let blocked = root.path().join("blocked");
    std::fs::create_dir_all(blocked.join("ca.pem/in-the-way")).unwrap();
    let out = enroll(&url, &token, &blocked, "blocked");
    assert_exit(&out, 2, &["storing the identity", "ca.pem", "was revoked again"]);
    assert_eq!(uses(), uses_before + 1, "that enrollment spent a use");
    let registry = fl_server::registry::RegistryStore::open(&state).unwrap().read().unwrap();
    let blocked_id = registry.clients.iter().find(|c| c.name == "blocked").map(|c| (c.id.clone(), c.status));
    assert!(
        matches!(blocked_id, Some((_, fl_server::registry::ClientStatus::Revoked))),
        "the id whose identity could not be stored is revoked: {blocked_id:?}"
    );
    for file in ["client.key", "client.pem", "enrollment.json"] {
        assert!(!blocked.join(file).exists(), "{file} of a revoked identity is left behind");
    }
    // --force replaces the identity and the coordinator revokes the old id.
    let old_id = client_id(&dirs[0]);
    let out = run(command("fl-client")
        .args(["enroll", "--force", "--coordinator", &url, "--token", &token, "--name", "renewed", "--state-dir"])
        .arg(&dirs[0]));
    assert!(out.status.success(), "{}", stderr(&out));
    let new_id = client_id(&dirs[0]);
    assert_ne!(old_id, new_id);
    let registry = fl_server::registry::RegistryStore::open(&state).unwrap().read().unwrap();
    let status_of = |id: &str| registry.clients.iter().find(|c| c.id == id).map(|c| c.status);
    assert_eq!(status_of(&old_id), Some(fl_server::registry::ClientStatus::Revoked), "the replaced id is revoked");
    assert_eq!(status_of(&new_id), Some(fl_server::registry::ClientStatus::Active));

    // A name with a newline and an escape sequence is shown escaped.
    let evil = root.path().join("evil");
    assert!(enroll(&url, &token, &evil, "x\nforged line \u{1b}[31mred").status.success());
    let list = admin(&["clients", "list", "--state-dir", s(&state)]);
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(!text.contains('\u{1b}'), "no escape sequence reaches the terminal: {text}");
    assert_eq!(text.lines().count(), 5, "a header and one line per client, none forged: {text}");

    // registry.json deleted while serving: the coordinator writes it back from memory.
    std::fs::remove_file(state.join("registry.json")).unwrap();
    wait_until(Duration::from_secs(30), "registry.json to be rewritten", || {
        fl_server::registry::RegistryStore::open(&state).is_ok_and(|r| r.snapshot().clients.len() == 4)
    });
    // And the enrolled clients are still known: the renewed one joins.
    let daemon = ClientProcess::start(&url, &dirs[0], &data);
    coordinator
        .wait_status(Duration::from_secs(60), "the renewed client to connect", |st| st.connected.contains(&new_id));
    drop(daemon);

    // A corrupt client.key is named, exit 2 (it retried for ever before).
    std::fs::write(dirs[0].join("client.key"), "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
        .unwrap();
    let out = client(&["run", "--coordinator", &url, "--state-dir", s(&dirs[0]), "--data", s(&data)]);
    assert_exit(&out, 2, &["client.key"]);

    // A restart with flags that would change the federation: exit 2, naming the flag.
    drop(coordinator);
    let changes: [&[&str]; 3] =
        [&["--model", "bilstm"], &["--strategy", "median"], &["--dp-noise-multiplier", "1", "--dp-clip-norm", "1"]];
    for change in changes {
        let mut args = vec!["serve", "--listen", "127.0.0.1:0", "--rounds", "1", "--state-dir", s(&state)];
        args.extend_from_slice(change);
        assert_exit(&admin(&args), 2, &[change[0], "would change"]);
    }

    // `clients list` on a missing registry is an error, not an empty table.
    std::fs::remove_file(state.join("registry.json")).unwrap();
    let out = admin(&["clients", "list", "--state-dir", s(&state)]);
    assert_exit(&out, 2, &["registry.json"]);
}

fn coordinator_cmd_serve(state: &Path) -> Output {
    admin(&["serve", "--listen", "127.0.0.1:0", "--rounds", "1", "--state-dir", s(state)])
}

/// Exit statuses: permanent errors 2, transient 1, each cause printed once, no bytes of a binary
/// file, a URL with a bad port refused, a text with no word refused.
#[test]
fn exit_codes_and_messages_follow_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("client");
    let good_token = "fl1.01234567.0123456789abcdef0123456789abcdef.".to_string() + &"0".repeat(64);
    // Nothing listens on port 1: transient, and the cause once.
    let out =
        client(&["enroll", "--coordinator", "https://127.0.0.1:1", "--token", &good_token, "--state-dir", s(&state)]);
    let err = stderr(&out);
    if out.status.code() == Some(2) && err.contains("token") {
        panic!("the test's token does not parse: {err}");
    }
    assert_exit(&out, 1, &["refused"]);
    let refused = "Connection refused";
    assert!(err.matches(refused).count() <= 1, "the cause is printed once: {err}");
    // A URL with an invalid port is refused, not sent to 443.
    for url in ["https://127.0.0.1:99999", "https://127.0.0.1:abc"] {
        let out = client(&["enroll", "--coordinator", url, "--token", &good_token, "--state-dir", s(&state)]);
        assert_eq!(out.status.code(), Some(2), "{url}: {}", stderr(&out));
    }
    // A malformed token: permanent.
    let out = client(&["enroll", "--coordinator", "https://127.0.0.1:1", "--token", "fl1.x", "--state-dir", s(&state)]);
    assert_exit(&out, 2, &["--token"]);

    // A gzip given as CSV: named as not text, none of its bytes printed; exit 2.
    let gz = dir.path().join("data.csv");
    // The gzip magic and header, then bytes of every value.
    let mut bytes = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03".to_vec();
    bytes.extend((0u8..=255).cycle().take(600));
    std::fs::write(&gz, &bytes).unwrap();
    let out = client(&["train", "--data", s(&gz), "--out", s(&dir.path().join("m"))]);
    assert_exit(&out, 2, &["not a text file"]);
    assert!(!stderr(&out).contains('\u{fffd}'), "no binary bytes shown: {}", stderr(&out));
    // A bad CSV in `run`: permanent (a supervisor must not restart it for ever).
    let out = client(&["run", "--coordinator", "https://127.0.0.1:1", "--state-dir", s(&state), "--data", s(&gz)]);
    assert_exit(&out, 2, &["not a text file"]);

    // A model, then texts the model cannot read.
    let data = dir.path().join("data");
    gen_data(&data, 200, 1);
    let model = dir.path().join("model.safetensors");
    let out = client(&[
        "train",
        "--epochs",
        "1",
        "--buckets",
        "1024",
        "--threads",
        "1",
        "--data",
        s(&data.join("train.csv")),
        "--out",
        s(&model),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    for text in ["", "😀😀 🎉", "  ...  "] {
        let out = client(&["predict", "--model", s(&model), "--text", text]);
        assert_exit(&out, 2, &["no word"]);
    }
    let out = client(&["predict", "--model", s(&model), "--text", "a real sentence"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// `train` with stdout and stderr closed before it starts: it still writes its model and exits 0.
#[test]
fn train_with_closed_stdout_and_stderr_writes_its_model() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    gen_data(&data, 200, 1);
    let model = dir.path().join("model.safetensors");
    let mut child = command("fl-client")
        .args(["train", "--epochs", "2", "--buckets", "1024", "--threads", "1", "--data"])
        .arg(data.join("train.csv"))
        .arg("--out")
        .arg(&model)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Both readers go away at once: every write the command makes meets a closed pipe.
    drop(child.stdout.take());
    drop(child.stderr.take());
    let status = wait_child(&mut child, Duration::from_secs(120)).expect("train ends");
    assert!(status.success(), "train with closed stdout and stderr: {status:?}");
    assert_model_valid(&model);
    // Admin output into a closed pipe: no panic either.
    let mut child = command("fl-client")
        .args(["gen-data", "--rows", "20", "--eval-rows", "5", "--test-rows", "5", "--out"])
        .arg(dir.path().join("g"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    drop(child.stderr.take());
    let status = wait_child(&mut child, Duration::from_secs(60)).expect("gen-data ends");
    assert!(status.success() || status.signal() == Some(13), "{status:?}");
}

/// Clients whose training fails report it: the attempt ends as soon as every sampled client has
/// failed (not at the deadline), and after `--max-failed-attempts` identical failures the
/// coordinator stops with exit 2 and the reason, keeping the committed round.
#[test]
fn identical_training_failures_stop_the_federation_and_keep_committed_rounds() {
    let root = tempfile::tempdir().unwrap();
    let state = root.path().join("coordinator");
    let mut coordinator = CoordinatorProcess::start(
        &state,
        &[
            "--labels",
            "a,b",
            "--rounds",
            "3",
            "--min-clients",
            "2",
            "--round-timeout",
            "300",
            "--max-failed-attempts",
            "2",
        ],
    );
    let url = coordinator.url();
    let identities: Vec<_> = (1..=2)
        .map(|i| {
            let dir = root.path().join(format!("client-{i}"));
            let out = enroll(&url, &coordinator.token(), &dir, &format!("c{i}"));
            assert!(out.status.success(), "{}", stderr(&out));
            fl_client::identity::ClientState::new(&dir).load().unwrap()
        })
        .collect();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let started = Instant::now();
    runtime.block_on(async {
        let mut clients = Vec::new();
        for identity in &identities {
            clients.push(RawClient::join(&url, identity).await);
        }
        // Round 1 commits with two good (zero) updates.
        for c in &mut clients {
            let task = c.task_of_round(1).await;
            let global = c.global(&task).await;
            c.submit(upload(&task, &filled(&global, 0.0), 10)).await.unwrap();
        }
        // Round 2: every client's training fails the same way, twice.
        for attempt in 0..2 {
            for c in &mut clients {
                let task = c.task_of_round(2).await;
                assert_eq!(task.attempt, attempt, "a new attempt starts as soon as both failed");
                let report = fl_proto::pb::TrainingFailureReport {
                    round: task.round,
                    attempt: task.attempt,
                    reason: "training diverged: the loss is not finite\n\u{1b}[31m".into(),
                };
                let ack = c.client.report_training_failure(report).await.unwrap().into_inner();
                assert!(ack.counted);
            }
        }
    });
    let status = coordinator.wait(Duration::from_secs(60));
    assert_eq!(status.code(), Some(2), "{}", coordinator.log_text());
    assert!(started.elapsed() < Duration::from_secs(120), "ended long before the 300 s round timeout");
    let log = coordinator.log_text();
    assert!(log.contains("stopping the federation") && log.contains("training diverged"), "{log}");
    assert!(!log.contains('\u{1b}'), "the client's reason is escaped in the log");
    assert_eq!(committed_rounds(&state), 1, "the committed round is kept");
    assert_model_valid(&state.join("model/round-0001.safetensors"));
    assert!(!state.join("model/final.safetensors").exists(), "a stopped federation writes no final model");
}
