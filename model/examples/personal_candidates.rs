//! Compares ways of personalising the final model of a finished `bench/personalize.sh` run on
//! each client's data: the final model as it is, shifted to the client's label prior
//! (`LocalPrior`), fine-tuned for 1, 2, 3 or 5 epochs, the prior shift then fine-tuning, and
//! fine-tuning then the shift. Each client's shard is split as `fl-client run --personalize`
//! splits it (`--local-test-fraction 0.2`, seed 7); fine-tuning uses the bench's settings (Adam,
//! lr 0.01, batch 32), and its accuracy is the mean over three shuffling seeds, so that one
//! seed's luck does not pick the method. Prints each client's accuracies and their mean.
//!
//! cargo run --release -p fl-model --example personal_candidates -- BENCH_RUN_DIR CLIENTS
use std::path::PathBuf;

use fl_common::TensorSet;
use fl_model::central::split_validation;
use fl_model::data::{read_labelled_csv, LabelledTexts};
use fl_model::model::Classifier;
use fl_model::personal::LocalPrior;
use fl_model::train::{train, EncodedDataset, OptimizerKind, TrainConfig};
use tch::Device;
use tokio_util::sync::CancellationToken;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const CANDIDATES: [&str; 11] =
    ["final", "prior", "ft1", "ft2", "ft3", "ft5", "prior+ft1", "prior+ft2", "prior+ft3", "prior+ft5", "ft3+prior"];

fn main() -> Result<()> {
    tch::set_num_threads(1);
    let args: Vec<String> = std::env::args().collect();
    let [_, dir, clients] = args.as_slice() else {
        return Err("usage: personal_candidates BENCH_RUN_DIR CLIENTS".into());
    };
    let dir = PathBuf::from(dir);
    let clients: usize = clients.parse()?;
    let model = Classifier::load(&dir.join("coord/model/final.safetensors"), Device::Cpu)?;
    let spec = model.spec.clone();
    let global = model.to_tensors();
    let mut sums = [0.0f64; CANDIDATES.len()];
    for i in 1..=clients {
        let rows = read_labelled_csv(&dir.join(format!("data/shard-{i}.csv")))?;
        let (train_rows, test_rows) = split_validation(&rows, 0.2, 7);
        let encode = |r: &LabelledTexts| -> Result<EncodedDataset> {
            Ok(EncodedDataset::encode(&model, &r.texts, r.label_indices(&spec.labels)?))
        };
        let (train_set, test_set) = (encode(&train_rows)?, encode(&test_rows)?);
        let prior = LocalPrior::from_labels(&train_set.labels, spec.num_classes());
        let load = |w: &TensorSet| Classifier::from_tensors(spec.clone(), w, Device::Cpu).expect("weights fit");
        let accuracy = |m: &Classifier| m.evaluate(&test_set.docs, &test_set.labels).0;
        let shifted = |w: &TensorSet| {
            let mut m = load(w);
            prior.apply(&mut m).expect("the shift fits the head");
            m
        };
        // Mean accuracy over three seeds of `epochs` of fine-tuning from `start`, then the shift if `after`.
        let tuned = |start: &TensorSet, epochs: u32, after: bool| {
            let seeds = [1u64, 2, 3];
            let sum: f64 = seeds
                .iter()
                .map(|&seed| {
                    let mut m = load(start);
                    let config = TrainConfig {
                        epochs,
                        batch_size: 32,
                        lr: 0.01,
                        optimizer: OptimizerKind::Adam,
                        seed,
                        proximal_mu: 0.0,
                    };
                    train(&mut m, &train_set, &config, &CancellationToken::new(), |_, _| {});
                    accuracy(&if after { shifted(&m.to_tensors()) } else { m })
                })
                .sum();
            sum / seeds.len() as f64
        };
        let start = shifted(&global).to_tensors();
        let row = [
            accuracy(&load(&global)),
            accuracy(&shifted(&global)),
            tuned(&global, 1, false),
            tuned(&global, 2, false),
            tuned(&global, 3, false),
            tuned(&global, 5, false),
            tuned(&start, 1, false),
            tuned(&start, 2, false),
            tuned(&start, 3, false),
            tuned(&start, 5, false),
            tuned(&global, 3, true),
        ];
        println!("client {i}: {} train / {} test rows", train_set.len(), test_set.len());
        let cells: Vec<String> = CANDIDATES.iter().zip(&row).map(|(name, a)| format!("{name} {a:.4}")).collect();
        println!("  {}", cells.join(", "));
        sums.iter_mut().zip(row).for_each(|(s, a)| *s += a);
    }
    println!("mean per-client accuracy, and its difference from the final model's:");
    for (name, sum) in CANDIDATES.iter().zip(sums) {
        println!("  {name:10} {:.4} {:+.1}", sum / clients as f64, 100.0 * (sum - sums[0]) / clients as f64);
    }
    Ok(())
}
