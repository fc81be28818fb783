//! Aggregation strategies end to end: robust strategies hold against sign-flipping attackers
//! where FedAvg fails (in process, real training, real strategy objects), and a federation of
//! real processes runs with a server optimiser and with a robust strategy.

use std::time::Duration;

use fl_client::attack::Attack;
use fl_model::datagen::{GeneratorConfig, Partition, TextGenerator};
use fl_model::train::{OptimizerKind, TrainConfig};
use fl_server::aggregation::{StrategyArgs, StrategyKind};
use fl_tests::strategy_sim::{self, Population, SimRun};
use fl_tests::*;

fn strategy(kind: StrategyKind, byzantine: Option<usize>) -> fl_server::aggregation::StrategyConfig {
    StrategyArgs { strategy: Some(kind), byzantine, ..Default::default() }.resolve().unwrap()
}

fn norm_bound(bound: f64) -> fl_server::aggregation::StrategyConfig {
    StrategyArgs { strategy: Some(StrategyKind::NormBound), norm_bound: Some(bound), ..Default::default() }
        .resolve()
        .unwrap()
}

const ROWS: usize = 12_000;
const ROUNDS: u32 = 6;
const EPOCHS: u32 = 1;
const LR: f64 = 0.02;

#[test]
fn robust_strategies_hold_against_4_of_20_sign_flipping_clients() {
    tch::set_num_threads(1);
    let generator = TextGenerator::new(GeneratorConfig { classes: 4, ..Default::default() });
    let population = Population::generate(&generator, ROWS, 600, 20, Partition::Iid, 4096, 16).unwrap();
    let attackers: Vec<(usize, Attack)> = (0..4).map(|c| (c, Attack::SignFlip(5.0))).collect();
    let local = TrainConfig {
        epochs: EPOCHS,
        batch_size: 16,
        lr: LR,
        optimizer: OptimizerKind::Adam,
        seed: 0,
        proximal_mu: 0.0,
    };
    let dir = tempfile::tempdir().unwrap();
    let final_accuracy_of = |strategy: fl_server::aggregation::StrategyConfig, attacked: bool| {
        let kind = strategy.strategy;
        let sim = SimRun {
            strategy,
            rounds: ROUNDS,
            local: local.clone(),
            attackers: if attacked { &attackers } else { &[] },
            seed: 7,
        };
        let state = dir.path().join(format!("{kind}-{attacked}"));
        let accuracy = strategy_sim::run(&population, &sim, &state).unwrap();
        eprintln!("{kind:<12} attacked={attacked:<5} accuracy by round {accuracy:.3?}");
        *accuracy.last().unwrap()
    };
    let final_accuracy = |kind: StrategyKind, byzantine: Option<usize>, attacked: bool| {
        final_accuracy_of(strategy(kind, byzantine), attacked)
    };
    let clean = final_accuracy(StrategyKind::Fedavg, None, false);
    let fedavg = final_accuracy(StrategyKind::Fedavg, None, true);
    let robust: Vec<(StrategyKind, f64)> = [
        (StrategyKind::Median, None),
        (StrategyKind::TrimmedMean, None),
        (StrategyKind::MultiKrum, Some(4)),
        (StrategyKind::Krum, Some(4)),
    ]
    .into_iter()
    .map(|(kind, byzantine)| (kind, final_accuracy(kind, byzantine, true)))
    .collect();
    // Norm bounding's B: the median norm of five honest clients' first updates, as an operator
    // would measure it on a clean round.
    let initial = population.initial_weights(7).unwrap();
    let local_of = |k: usize| TrainConfig { seed: 7 ^ (1 << 20) ^ k as u64, ..local.clone() };
    let mut norms: Vec<f64> = (4..9).map(|k| population.update_norm(k, &initial, &local_of(k)).unwrap()).collect();
    norms.sort_by(f64::total_cmp);
    let bound = norms[2];
    eprintln!("honest update norms {norms:.3?}: --norm-bound {bound:.3}");
    let bounded = final_accuracy_of(norm_bound(bound), true);
    let krum_clean = final_accuracy(StrategyKind::Krum, Some(4), false);
    assert!(clean > 0.7, "the clean run learns (accuracy {clean})");
    assert!(fedavg < clean - 0.20, "FedAvg under attack loses at least 20 points: {fedavg} vs clean {clean}");
    for (kind, accuracy) in &robust {
        assert!(*accuracy > clean - 0.03, "{kind} under attack stays within 3 points of clean: {accuracy} vs {clean}");
    }
    // Krum applies one client's update a round, so it is slower and noisier than the means even
    // without attackers (BENCHMARKS.md); the attack itself must not cost it more than 3 points.
    let krum = robust.iter().find(|(k, _)| *k == StrategyKind::Krum).unwrap().1;
    assert!(krum > krum_clean - 0.03, "the attack costs Krum at most 3 points: {krum} vs its clean run {krum_clean}");
    assert!(bounded > fedavg + 0.20, "norm bounding resists the attack: {bounded} vs FedAvg's {fedavg}");
}

/// Flags of a small fastText federation that trains in seconds.
const SMALL: &[&str] = &["--buckets", "4096", "--embed-dim", "16", "--round-timeout", "120", "--lr", "0.05"];

fn serve_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    SMALL.iter().copied().chain(extra.iter().copied()).collect()
}

/// Runs the enrolled clients of `dirs` until the coordinator finishes; the last `attackers`
/// clients send sign-flipped updates.
fn run_to_the_end(
    root: &std::path::Path,
    coordinator: &mut CoordinatorProcess,
    dirs: &[std::path::PathBuf],
    attackers: usize,
) {
    let url = coordinator.url();
    let mut clients = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        let data = root.join(format!("data/shard-{}.csv", i + 1));
        let mut cmd = command("fl-client");
        cmd.args(["run", "--coordinator", &url, "--threads", "1", "--max-backoff", "1", "--state-dir"])
            .arg(dir)
            .arg("--data")
            .arg(&data);
        if i >= dirs.len() - attackers {
            cmd.args(["--attack", "sign-flip:5"]);
        }
        let log = std::fs::File::create(dir.with_extension("log")).unwrap();
        let child = cmd.stdout(log.try_clone().unwrap()).stderr(log).spawn().unwrap();
        clients.push(ClientProcess { child, log: dir.with_extension("log") });
    }
    let status = coordinator.wait(Duration::from_secs(300));
    assert!(status.success(), "coordinator failed:\n{}", coordinator.log_text());
    for mut c in clients {
        let status = wait_child(&mut c.child, Duration::from_secs(30)).expect("client exits after the federation ends");
        assert!(status.success(), "client failed:\n{}", c.log_text());
    }
}

#[test]
fn processes_federate_with_fedadam_and_fedprox_and_keep_the_moments() {
    let root = tempfile::tempdir().unwrap();
    let args = serve_args(&["--rounds", "2", "--min-clients", "3", "--strategy", "fedadam", "--proximal-mu", "0.01"]);
    let (mut coordinator, dirs) = enrolled_federation(root.path(), 1200, 3, "127.0.0.1:0", &args);
    run_to_the_end(root.path(), &mut coordinator, &dirs, 0);
    let metrics = coordinator.metrics();
    assert_eq!(metrics.len(), 2);
    assert_eq!(metrics[1]["participants"], 3);
    let accuracy = metrics[1]["accuracy"].as_f64().unwrap();
    assert!(accuracy > 0.3, "10 classes, chance is 0.1; got {accuracy}");
    let state = coordinator.state_dir.clone();
    let moments = fl_server::aggregation::server_opt::ServerOptState::decode(
        &std::fs::read(state.join("server-opt/round-0002.safetensors")).unwrap(),
    )
    .unwrap();
    assert_eq!(moments.steps, 2, "two server steps, stored with round 2");
    assert!(moments.m.is_some() && moments.v.is_some());
    assert!(!state.join("server-opt/round-0001.safetensors").exists(), "older moments are removed");
    let stored: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("strategy.json")).unwrap()).unwrap();
    assert_eq!((stored["strategy"].as_str(), stored["proximal_mu"].as_f64()), (Some("fedadam"), Some(0.01)));

    // A restart with another strategy is refused before anything changes.
    let out = run(command("fl-coordinator")
        .args(["serve", "--listen", "127.0.0.1:0", "--rounds", "3", "--strategy", "median", "--state-dir"])
        .arg(&state));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--strategy median (federation: fedadam)"), "{stderr}");
    assert_eq!(committed_rounds(&state), 2);
}

#[test]
fn processes_federate_with_the_median_against_a_sign_flipping_client() {
    let root = tempfile::tempdir().unwrap();
    let args = serve_args(&["--rounds", "3", "--min-clients", "3", "--strategy", "median"]);
    let (mut coordinator, dirs) = enrolled_federation(root.path(), 1500, 3, "127.0.0.1:0", &args);
    run_to_the_end(root.path(), &mut coordinator, &dirs, 1);
    let metrics = coordinator.metrics();
    assert_eq!(metrics.len(), 3);
    assert!(metrics.iter().all(|m| m["participants"] == 3), "the attacker's updates are folded too");
    let accuracy = metrics[2]["accuracy"].as_f64().unwrap();
    assert!(accuracy > 0.3, "the median learns despite the attacker (chance is 0.1); got {accuracy}");
    let spool = std::fs::read_dir(coordinator.state_dir.join("spool")).unwrap().count();
    assert_eq!(spool, 0, "the spooled updates are removed after each round");
}

/// The final model of a one-client FedAdam federation of 3 rounds; with `crash`, the coordinator
/// aborts at that commit point of round 2 (`FL_FAULT_CRASH`) and is restarted.
fn fedadam_final_model(root: &std::path::Path, crash: Option<&str>) -> Vec<u8> {
    // Dense updates: under a top-k codec the client's upload residual has already taken in the
    // round that the crash makes it train again, so a restart changes the trajectory.
    let args = serve_args(&[
        "--rounds",
        "3",
        "--min-clients",
        "1",
        "--strategy",
        "fedadam",
        "--seed",
        "5",
        "--update-codec",
        "safetensors-f32",
    ]);
    let (mut coordinator, dirs) = enrolled_federation(root, 400, 1, "127.0.0.1:0", &args);
    let url = coordinator.url();
    let listen = url.rsplit(':').next().unwrap().to_string();
    let mut client = ClientProcess::start(&url, &dirs[0], &root.join("data/shard-1.csv"));
    if let Some(point) = crash {
        // Abort as a kill -9 would, in the middle of committing round 2, and restart on the same port.
        let state = coordinator.state_dir.clone();
        coordinator.child.kill().unwrap();
        coordinator.child.wait().unwrap();
        let env = [("FL_FAULT_CRASH", point)];
        let mut crashing = CoordinatorProcess::start_with(&state, &format!("127.0.0.1:{listen}"), &args, &env);
        let status = crashing.wait(Duration::from_secs(120));
        assert!(!status.success(), "the coordinator aborted at {point}:\n{}", crashing.log_text());
        assert_eq!(committed_rounds(&state), 1, "round 2 was not committed");
        coordinator = CoordinatorProcess::start_with(&state, &format!("127.0.0.1:{listen}"), &args, &[]);
    }
    let status = coordinator.wait(Duration::from_secs(180));
    assert!(status.success(), "coordinator failed:\n{}", coordinator.log_text());
    let status = wait_child(&mut client.child, Duration::from_secs(30)).expect("client exits");
    assert!(status.success(), "client failed:\n{}", client.log_text());
    std::fs::read(coordinator.state_dir.join("model/final.safetensors")).unwrap()
}

#[test]
fn fedadam_resumes_bit_identically_after_a_crash_between_rounds() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let uninterrupted = fedadam_final_model(a.path(), None);
    let crashed = fedadam_final_model(b.path(), Some("after-model:2"));
    // The federations differ in their CA (in the file's metadata): compare the weights' bytes.
    let weights = |bytes: &[u8]| fl_common::decode_model(bytes).unwrap().1.encode(None);
    assert!(weights(&uninterrupted) == weights(&crashed), "the resumed run ends with the very same weights");
}

#[test]
fn a_long_run_follows_the_lr_schedule_keeps_the_best_model_and_stops_early() {
    let root = tempfile::tempdir().unwrap();
    // A high learning rate makes the evaluation loss stop falling within a few rounds.
    let args = [
        "--buckets",
        "4096",
        "--embed-dim",
        "16",
        "--round-timeout",
        "120",
        "--lr",
        "0.3",
        "--rounds",
        "12",
        "--min-clients",
        "2",
        "--lr-schedule",
        "step",
        "--early-stop-patience",
        "1",
    ];
    let (mut coordinator, dirs) = enrolled_federation(root.path(), 800, 2, "127.0.0.1:0", &args);
    run_to_the_end(root.path(), &mut coordinator, &dirs, 0);
    let metrics = coordinator.metrics();
    let n = metrics.len();
    assert!(n < 12, "patience 1 stopped the federation before round 12 ({n} rounds)");
    let (mut best, mut best_loss) = (0, f64::INFINITY);
    for (i, m) in metrics.iter().enumerate() {
        let round = i as u64 + 1;
        let want_lr = if round <= 6 {
            0.3
        } else if round <= 9 {
            0.03
        } else {
            0.003
        };
        let lr = m["learning_rate"].as_f64().unwrap();
        assert!((lr - want_lr).abs() < 1e-6, "round {round}: learning_rate {lr}, step schedule says {want_lr}");
        let loss = m["loss"].as_f64().unwrap();
        if loss < best_loss {
            (best, best_loss) = (round, loss);
        }
        assert_eq!(m["best_round"].as_u64(), Some(best), "round {round}");
    }
    let last_loss = metrics[n - 1]["loss"].as_f64().unwrap();
    assert!(last_loss >= best_loss && best < n as u64, "the last round did not improve on round {best}");
    let state = &coordinator.state_dir;
    let best_file = std::fs::read(state.join("model/best.safetensors")).unwrap();
    assert_eq!(best_file, std::fs::read(state.join(format!("model/round-{best:04}.safetensors"))).unwrap());
    assert!(state.join("model/final.safetensors").exists());
    let status = coordinator.status();
    assert_eq!((status.phase, status.completed_rounds), (Phase::Finished, n as u32), "{status:?}");
}
