//! The attack of issue 10, played on the model files of a simulated federation: an observer who
//! holds two consecutive models flags the embedding rows that changed. Rows are hashed n-grams,
//! so the flagged rows tell which words and bigrams the round's client wrote. Without DP it finds
//! the client's rows exactly; with DP-FedAvg every row changes and its precision is the base rate.

use std::collections::BTreeSet;
use std::path::Path;

use fl_model::datagen::{partition, write_csv, GeneratorConfig, Partition, TextGenerator};
use fl_server::dp::DpArgs;
use fl_tests::dp_sim::{self, SimConfig};

const EMBEDDING: &str = "embedding.weight";

/// Writes a gen-data directory: `shards` client files and an eval set.
fn gen_data(dir: &Path, rows: usize, shards: usize) {
    let generator = TextGenerator::new(GeneratorConfig { classes: 4, ..Default::default() });
    let labels = generator.labels();
    let train = generator.rows(rows, 1);
    write_csv(&dir.join("eval.csv"), &generator.rows(200, 2), &labels).unwrap();
    for (i, shard) in partition(&train, shards, Partition::Iid, 4, 3).unwrap().iter().enumerate() {
        write_csv(&dir.join(format!("shard-{}.csv", i + 1)), shard, &labels).unwrap();
    }
}

/// The embedding rows of a model file.
fn embedding_rows(path: &Path) -> (Vec<f32>, usize) {
    let (_, weights) = fl_common::decode_model(&std::fs::read(path).unwrap()).unwrap();
    let table = weights.tensors.iter().find(|t| t.name == EMBEDDING).expect("a fastText embedding");
    (table.data.clone(), table.shape[1])
}

/// What the attacker gets: the rows that changed between two model files, and each row's change.
struct Attack {
    changed: BTreeSet<i64>,
    change_norms: Vec<(f64, i64)>,
    rows: usize,
}

fn attack(before: &Path, after: &Path) -> Attack {
    let (a, dim) = embedding_rows(before);
    let (b, _) = embedding_rows(after);
    let rows = a.len() / dim;
    let mut changed = BTreeSet::new();
    let mut change_norms = Vec::with_capacity(rows);
    for r in 0..rows {
        let d: f64 = (0..dim).map(|k| f64::from(b[r * dim + k] - a[r * dim + k]).powi(2)).sum();
        if d > 0.0 {
            changed.insert(r as i64);
        }
        change_norms.push((d.sqrt(), r as i64));
    }
    change_norms.sort_by(|x, y| y.0.total_cmp(&x.0));
    Attack { changed, change_norms, rows }
}

/// Precision of flagging `flagged` when the truth is `truth`.
fn precision(flagged: &BTreeSet<i64>, truth: &BTreeSet<i64>) -> f64 {
    flagged.intersection(truth).count() as f64 / flagged.len().max(1) as f64
}

fn one_client_round(dir: &Path, dp: Option<DpArgs>) -> (Attack, BTreeSet<i64>) {
    let models = dir.join(if dp.is_some() { "models-dp" } else { "models-plain" });
    let config = SimConfig {
        rounds: 1,
        clients_per_round: 1,
        dp: dp.map(|a| a.resolve().unwrap().unwrap()),
        save_models: Some(models.clone()),
        ..SimConfig::new(dir)
    };
    let rounds = dp_sim::run(&config).unwrap();
    let client = rounds[0].sampled[0];
    let spec = dp_sim::sim_spec(&config).unwrap();
    let truth = dp_sim::client_rows(&spec, &dir.join(format!("shard-{}.csv", client + 1))).unwrap();
    (attack(&models.join("round-0.safetensors"), &models.join("round-1.safetensors")), truth)
}

#[test]
fn dp_noise_hides_which_rows_a_client_touched() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    gen_data(dir.path(), 2000, 20);

    // Without DP: the changed rows are exactly the client's n-grams.
    let (plain, truth) = one_client_round(dir.path(), None);
    let base_rate = truth.len() as f64 / plain.rows as f64;
    let recall = plain.changed.intersection(&truth).count() as f64 / truth.len() as f64;
    let plain_precision = precision(&plain.changed, &truth);
    eprintln!("no DP: {} rows changed, client has {}, recall {recall:.3}, precision {plain_precision:.3}, base rate {base_rate:.4}",
        plain.changed.len(), truth.len());
    assert!(recall > 0.99, "without DP the attacker finds the client's rows (recall {recall})");
    assert!(plain_precision > 20.0 * base_rate, "without DP precision {plain_precision} vs base rate {base_rate}");

    // With DP: every row moves, so "changed" says nothing; ranking rows by how much they moved
    // does no better than chance either.
    let dp = DpArgs { noise_multiplier: Some(1.0), clip_norm: Some(0.5), ..DpArgs::default() };
    let (noised, truth) = one_client_round(dir.path(), Some(dp));
    let base_rate = truth.len() as f64 / noised.rows as f64;
    let untouched_changed =
        noised.changed.iter().filter(|r| !truth.contains(r)).count() as f64 / (noised.rows - truth.len()) as f64;
    let dp_precision = precision(&noised.changed, &truth);
    let top: BTreeSet<i64> = noised.change_norms.iter().take(truth.len()).map(|&(_, r)| r).collect();
    let top_precision = precision(&top, &truth);
    eprintln!(
        "DP z=1: {untouched_changed:.4} of untouched rows changed, precision {dp_precision:.4}, \
               precision of the top-{} rows by change {top_precision:.4}, base rate {base_rate:.4}",
        truth.len()
    );
    assert!(untouched_changed > 0.999, "with noise on, untouched rows change too ({untouched_changed})");
    assert!((dp_precision - base_rate).abs() < 0.01 * base_rate, "precision {dp_precision} vs base rate {base_rate}");
    assert!(top_precision < 2.0 * base_rate, "ranking by change: {top_precision} vs base rate {base_rate}");
}
