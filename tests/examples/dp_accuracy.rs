//! Accuracy against ε: one simulated federation per noise multiplier (see `fl_tests::dp_sim`),
//! on a `fl-client gen-data` directory. Prints a Markdown table and, with `--jsonl`, every round.
//!
//! cargo run --release -p fl-tests --example dp_accuracy -- --data DIR --noise 0.5,1,2

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use fl_server::dp::DpArgs;
use fl_tests::dp_sim::{self, SimConfig};

#[derive(Parser, Debug)]
struct Args {
    /// A gen-data directory (shard-*.csv, eval.csv).
    #[arg(long)]
    data: PathBuf,
    /// Noise multipliers to run; plain FedAvg is always run first.
    #[arg(long, value_delimiter = ',', default_values_t = [0.5, 1.0, 2.0])]
    noise: Vec<f64>,
    /// Clip norm C (fixed clipping).
    #[arg(long, default_value_t = 0.5)]
    clip_norm: f64,
    /// Rounds.
    #[arg(long, default_value_t = 30)]
    rounds: u32,
    /// Clients sampled per round.
    #[arg(long, default_value_t = 50)]
    clients_per_round: usize,
    /// Local epochs.
    #[arg(long, default_value_t = 1)]
    epochs: u32,
    /// Local learning rate.
    #[arg(long, default_value_t = 0.05)]
    lr: f64,
    /// fastText hash buckets.
    #[arg(long, default_value_t = 65_536)]
    buckets: u32,
    /// fastText embedding width.
    #[arg(long, default_value_t = 64)]
    embed_dim: u32,
    /// Write every round as a JSON line here.
    #[arg(long)]
    jsonl: Option<PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    tch::set_num_threads(1);
    let mut jsonl = args.jsonl.as_ref().map(std::fs::File::create).transpose()?;
    let base = SimConfig {
        rounds: args.rounds,
        clients_per_round: args.clients_per_round,
        buckets: args.buckets,
        embed_dim: args.embed_dim,
        ..SimConfig::new(&args.data)
    };
    let base =
        SimConfig { local: fl_model::train::TrainConfig { epochs: args.epochs, lr: args.lr, ..base.local }, ..base };
    println!(
        "| noise multiplier z | clip norm C | ε after {} rounds | δ | accuracy (last round) | best accuracy |",
        args.rounds
    );
    println!("|---|---|---|---|---|---|");
    for z in std::iter::once(None).chain(args.noise.iter().copied().map(Some)) {
        let dp = z
            .map(|z| {
                DpArgs { noise_multiplier: Some(z), clip_norm: Some(args.clip_norm), ..DpArgs::default() }.resolve()
            })
            .transpose()?
            .flatten();
        let started = std::time::Instant::now();
        let rounds = dp_sim::run(&SimConfig { dp, ..base.clone() })?;
        let last = rounds.last().expect("at least one round");
        let best = rounds.iter().map(|r| r.accuracy).fold(0.0, f64::max);
        let fmt = |v: Option<f64>, p: usize| v.map_or("∞ (no DP)".to_string(), |v| format!("{v:.p$}"));
        println!(
            "| {} | {} | {} | {} | {:.3} | {:.3} |",
            z.map_or("— (FedAvg)".to_string(), |z| z.to_string()),
            if z.is_some() { args.clip_norm.to_string() } else { "—".into() },
            fmt(last.epsilon, 2),
            last.delta.map_or("—".into(), |d| format!("{d:.2e}")),
            last.accuracy,
            best
        );
        eprintln!("  ({:.0} s)", started.elapsed().as_secs_f64());
        if let Some(f) = &mut jsonl {
            for r in &rounds {
                writeln!(
                    f,
                    "{}",
                    serde_json::json!({"noise_multiplier": z, "round": r.round, "accuracy": r.accuracy,
                        "dp_epsilon": r.epsilon, "dp_delta": r.delta, "dp_clip_norm": r.clip_norm})
                )?;
            }
        }
    }
    Ok(())
}
