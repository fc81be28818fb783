//! The HTTP side port for real: a coordinator with `--http` and two clients over mutual TLS; the
//! dashboard in headless Chromium; `/metrics` through the reference Prometheus parser, compared with
//! `metrics.jsonl`; the event stream; the bearer token.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use fl_tests::{enrolled_federation, read_metrics, signal, start_clients, wait_until};

/// `GET path` over plain HTTP/1.1; the status code and the body (chunked bodies decoded).
fn http_get(addr: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{extra}\r\n").unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, after)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            out.push_str(&after[..n]);
            rest = &after[n + 2..];
        }
        out
    } else {
        body.to_string()
    };
    (code, body)
}

/// The first `state` event of `/events`, parsed.
fn first_event(addr: &str) -> serde_json::Value {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(stream, "GET /events HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n").unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    let mut event = String::new();
    loop {
        line.clear();
        assert!(reader.read_line(&mut line).unwrap() > 0, "the event stream ended before an event");
        // Chunk sizes of the chunked encoding interleave with the lines; only event lines matter.
        if let Some(name) = line.strip_prefix("event:") {
            event = name.trim().to_string();
        } else if let Some(data) = line.strip_prefix("data:") {
            if event == "state" {
                return serde_json::from_str(data.trim()).expect("event data is JSON");
            }
        }
    }
}

/// Runs the project's script `name` (scripts/NAME) and returns its output's last line, or the
/// "skipped: why" it printed when the tool cannot be had here.
fn tool(name: &str) -> Result<String, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts").join(name);
    let out = Command::new(&script).output().unwrap_or_else(|e| panic!("{}: {e}", script.display()));
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().trim().to_string())
    } else {
        Err(stderr
            .lines()
            .find(|l| l.starts_with("skipped:"))
            .map_or_else(|| format!("skipped: {} failed: {}", script.display(), stderr.trim()), str::to_string))
    }
}

fn chromium(binary: &str, args: &[&str], url: &str) -> std::process::Output {
    let mut cmd = Command::new(binary);
    cmd.args(["--headless", "--disable-gpu", "--hide-scrollbars", "--window-size=1400,1500"]);
    // Chromium's sandbox refuses to run as root.
    if is_root() {
        cmd.arg("--no-sandbox");
    }
    let out = cmd.args(args).arg(url).output().expect("chromium runs");
    assert!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0\n")).unwrap_or(false)
}

fn output_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The number in `<... id="ID" ...>N<`, or the value of `attr` in the element with that id.
fn element<'a>(dom: &'a str, id: &str) -> &'a str {
    let at = dom.find(&format!("id=\"{id}\"")).unwrap_or_else(|| panic!("no element #{id} in the page"));
    let start = dom[..at].rfind('<').unwrap();
    let end = at + dom[at..].find('>').unwrap();
    &dom[start..=end]
}

fn text_of<'a>(dom: &'a str, id: &str) -> &'a str {
    let tag = element(dom, id);
    let after = dom.find(tag).unwrap() + tag.len();
    dom[after..].split('<').next().unwrap()
}

#[test]
fn dashboard_in_a_browser_and_metrics_through_a_prometheus_parser() {
    let root = tempfile::tempdir().unwrap();
    let (mut coordinator, dirs) = enrolled_federation(
        root.path(),
        900,
        2,
        "127.0.0.1:0",
        &[
            "--rounds",
            "5",
            "--min-clients",
            "2",
            "--round-timeout",
            "120",
            "--buckets",
            "4096",
            "--http",
            "127.0.0.1:0",
        ],
    );
    let state = coordinator.state_dir.clone();
    let addr = std::fs::read_to_string(state.join("http-addr")).expect("STATE/http-addr").trim().to_string();
    assert!(addr.starts_with("127.0.0.1:"), "the side port binds where it is told: {addr}");

    assert_eq!(http_get(&addr, "/healthz", &[]).0, 200);
    wait_until(Duration::from_secs(30), "/readyz 200", || http_get(&addr, "/readyz", &[]).0 == 200);
    wait_until(Duration::from_secs(10), "both clients in /api/clients", || {
        let (_, body) = http_get(&addr, "/api/clients", &[]);
        body.contains("\"client-1\"") && body.contains("\"client-2\"")
    });
    let (_, clients_json) = http_get(&addr, "/api/clients", &[]);
    for secret in ["cert_sha256", "token", "BEGIN"] {
        assert!(!clients_json.contains(secret), "/api/clients shows {secret}: {clients_json}");
    }
    let event = first_event(&addr);
    assert!(event.get("rounds_completed").is_some() && event.get("clients").is_some(), "{event}");

    // Two rounds, then client 2 stops answering: the third round waits (120 s deadline), so the
    // page, /metrics and metrics.jsonl can be compared without a round landing in between.
    let clients = start_clients(root.path(), &coordinator.url(), &dirs);
    wait_until(Duration::from_secs(180), "two rounds", || read_metrics(&state).len() >= 2);
    signal(&clients[1].child, "STOP");
    // A round whose updates were both in may still commit: wait until the count holds for 4 s.
    let mut rounds = read_metrics(&state).len();
    let mut stable_since = Instant::now();
    while stable_since.elapsed() < Duration::from_secs(4) {
        std::thread::sleep(Duration::from_millis(200));
        let now = read_metrics(&state).len();
        if now != rounds {
            (rounds, stable_since) = (now, Instant::now());
        }
    }
    let metrics = read_metrics(&state);
    assert_eq!(metrics.len(), rounds);
    // The side port reads the files every 500 ms.
    wait_until(Duration::from_secs(10), "the API to show every round", || {
        let (_, body) = http_get(&addr, "/api/rounds", &[]);
        serde_json::from_str::<Vec<serde_json::Value>>(&body).map(|v| v.len()).unwrap_or(0) == rounds
    });
    let (_, api_rounds) = http_get(&addr, "/api/rounds", &[]);
    assert_eq!(serde_json::from_str::<Vec<serde_json::Value>>(&api_rounds).unwrap(), metrics);

    // /metrics through the Python prometheus-client's OpenMetrics parser.
    let (code, exposition) = http_get(&addr, "/metrics", &[]);
    assert_eq!(code, 200);
    let out_dir = output_dir();
    std::fs::write(out_dir.join("metrics.txt"), &exposition).unwrap();
    match tool("promparse-env.sh") {
        Err(skip) => println!("{skip} (the /metrics parser check did not run)"),
        Ok(python) => {
            let parser = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/parse_metrics.py");
            let out = Command::new(&python).arg(&parser).arg(out_dir.join("metrics.txt")).output().unwrap();
            assert!(out.status.success(), "the parser refused /metrics: {}", String::from_utf8_lossy(&out.stderr));
            let parsed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let sample = |name: &str| parsed["samples"][name].as_f64().unwrap_or_else(|| panic!("no {name}: {parsed}"));
            let sum = |key: &str| metrics.iter().map(|m| m[key].as_f64().unwrap()).sum::<f64>();
            assert_eq!(sample("fl_rounds_completed_total"), rounds as f64);
            assert_eq!(sample("fl_round_duration_seconds_count"), rounds as f64);
            assert_eq!(sample("fl_bytes_up_total"), sum("bytes_up"));
            assert_eq!(sample("fl_bytes_down_total"), sum("bytes_down"));
            assert!((sample("fl_round_duration_seconds_sum") - sum("round_s")).abs() < 1e-6);
            let last = metrics.last().unwrap();
            assert!((sample("fl_accuracy") - last["accuracy"].as_f64().unwrap()).abs() < 1e-9);
            assert!((sample("fl_loss") - last["loss"].as_f64().unwrap()).abs() < 1e-9);
            assert_eq!(sample("fl_clients{state=\"enrolled\"}"), 2.0);
            assert_eq!(parsed["types"]["fl_rounds_completed"], "counter");
            assert_eq!(parsed["types"]["fl_round_duration_seconds"], "histogram");
            println!(
                "/metrics parsed: {} samples agree with metrics.jsonl ({rounds} rounds)",
                parsed["samples"].as_object().unwrap().len()
            );
        }
    }

    // The page in headless Chromium: the script fetches /api/state and draws (?live=0 renders once;
    // the live page keeps its event stream open, and a headless dump would wait for it forever).
    match tool("chromium-env.sh") {
        Err(skip) => println!("{skip} (the browser check did not run)"),
        Ok(browser) => {
            let url = format!("http://{addr}/?live=0");
            let out = chromium(&browser, &["--virtual-time-budget=10000", "--dump-dom"], &url);
            let dom = String::from_utf8_lossy(&out.stdout).to_string();
            std::fs::write(out_dir.join("dashboard.html"), &dom).unwrap();
            assert_eq!(text_of(&dom, "rounds-completed"), rounds.to_string(), "rounds completed on the page");
            assert!(
                element(&dom, "accuracy-chart").contains(&format!("data-points=\"{rounds}\"")),
                "accuracy chart: {}",
                element(&dom, "accuracy-chart")
            );
            let table = &dom[dom.find("id=\"clients-table\"").unwrap()..];
            let table = &table[..table.find("</table>").unwrap()];
            for name in ["client-1", "client-2"] {
                assert!(table.contains(&format!("<td>{name}</td>")), "{name} missing from the clients table: {table}");
            }
            let shot = out_dir.join("dashboard.png");
            let _ = std::fs::remove_file(&shot);
            chromium(&browser, &["--virtual-time-budget=10000", &format!("--screenshot={}", shot.display())], &url);
            assert!(std::fs::metadata(&shot).map(|m| m.len() > 10_000).unwrap_or(false), "no screenshot");
            println!("dashboard: {rounds} rounds, 2 clients on the page; screenshot {}", shot.display());
        }
    }
    // The same summary in a terminal.
    let out = fl_tests::run(fl_tests::command("fl-coordinator").args(["status", "--state-dir"]).arg(&state));
    let summary = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(summary.contains(&format!("rounds     {rounds} of 5 completed")), "{summary}");
    assert!(summary.contains("client-1") && summary.contains("client-2"), "{summary}");
    println!("fl-coordinator status:\n{summary}");
    assert_eq!(read_metrics(&state).len(), rounds, "a round landed during the checks: they compared moving values");

    signal(&clients[1].child, "CONT");
    assert!(coordinator.wait(Duration::from_secs(300)).success(), "{}", coordinator.log_text());
    assert_eq!(read_metrics(&state).len(), 5);
}
