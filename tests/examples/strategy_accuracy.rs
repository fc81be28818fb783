//! Final accuracy and rounds to a target accuracy per aggregation strategy, IID and Dirichlet, on
//! generated data, in one process (`fl_tests::strategy_sim`). Prints a markdown table.
//!
//! `cargo run --release -p fl-tests --example strategy_accuracy -- [ROUNDS] [TARGET]`

use fl_model::datagen::{GeneratorConfig, Partition, TextGenerator};
use fl_model::train::{OptimizerKind, TrainConfig};
use fl_server::aggregation::{StrategyArgs, StrategyKind};
use fl_tests::strategy_sim::{self, Population, SimRun};

fn main() -> anyhow::Result<()> {
    tch::set_num_threads(1);
    let mut args = std::env::args().skip(1);
    let rounds: u32 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(10);
    let target: f64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(0.8);
    let generator = TextGenerator::new(GeneratorConfig { classes: 4, ..Default::default() });
    let local =
        TrainConfig { epochs: 1, batch_size: 16, lr: 0.02, optimizer: OptimizerKind::Adam, seed: 0, proximal_mu: 0.0 };
    let strategies = [
        (StrategyKind::Fedavg, None),
        (StrategyKind::Fedprox, None),
        (StrategyKind::Fedavgm, None),
        (StrategyKind::Fedadam, None),
        (StrategyKind::Fedyogi, None),
        (StrategyKind::Fedadagrad, None),
        (StrategyKind::Median, None),
        (StrategyKind::TrimmedMean, None),
        (StrategyKind::MultiKrum, Some(4)),
        (StrategyKind::Krum, Some(4)),
    ];
    let dir = tempfile::tempdir()?;
    println!("| strategy | partition | final accuracy | best | rounds to {target} |");
    println!("|---|---|---|---|---|");
    for (name, how) in [("IID", Partition::Iid), ("Dirichlet 0.3", Partition::Dirichlet(0.3))] {
        let population = Population::generate(&generator, 12_000, 600, 20, how, 4096, 16)?;
        for (kind, byzantine) in strategies {
            let strategy = StrategyArgs { strategy: Some(kind), byzantine, ..Default::default() }.resolve()?;
            let sim = SimRun { strategy, rounds, local: local.clone(), attackers: &[], seed: 7 };
            let accuracy = strategy_sim::run(&population, &sim, &dir.path().join(format!("{kind}-{name}")))?;
            let best = accuracy.iter().copied().fold(0.0, f64::max);
            let reached = accuracy.iter().position(|&a| a >= target).map_or("—".to_string(), |r| (r + 1).to_string());
            println!("| {kind} | {name} | {:.3} | {best:.3} | {reached} |", accuracy.last().unwrap());
        }
    }
    Ok(())
}
