//! The curious coordinator: it keeps what it receives from one client in a round and runs the
//! vocabulary attack of `dp_attack.rs` on it (the embedding rows that are nonzero are the hashed
//! n-grams the client wrote). Without secure aggregation it receives the delta and recovers the
//! client's rows; with it, it receives the masked vector, in which every row is nonzero and no
//! ranking of rows beats the base rate.

use std::collections::BTreeSet;
use std::path::Path;

use fl_common::secagg::{self, QuantizationPlan, RoundContext, RoundPlan, SecAggClient, SecAggServer, SecAggSettings};
use fl_common::TensorSet;
use fl_model::datagen::{partition, write_csv, GeneratorConfig, Partition, TextGenerator};
use fl_model::model::Classifier;
use fl_model::train::{train, EncodedDataset, OptimizerKind, TrainConfig};
use fl_tests::dp_sim::{self, SimConfig};
use tokio_util::sync::CancellationToken;

const EMBEDDING: &str = "embedding.weight";
const CLIENTS: usize = 3;

fn gen_data(dir: &Path) {
    let generator = TextGenerator::new(GeneratorConfig { classes: 4, ..Default::default() });
    let labels = generator.labels();
    let train = generator.rows(300, 1);
    write_csv(&dir.join("eval.csv"), &generator.rows(100, 2), &labels).unwrap();
    for (i, shard) in partition(&train, CLIENTS, Partition::Iid, 4, 3).unwrap().iter().enumerate() {
        write_csv(&dir.join(format!("shard-{}.csv", i + 1)), shard, &labels).unwrap();
    }
}

/// The real local training of each client: their deltas from one global model.
fn deltas(config: &SimConfig) -> (TensorSet, Vec<TensorSet>) {
    let spec = dp_sim::sim_spec(config).unwrap();
    let probe = Classifier::new(spec.clone(), tch::Device::Cpu, 1).unwrap();
    let global = probe.to_tensors();
    let local =
        TrainConfig { epochs: 1, batch_size: 32, lr: 0.05, optimizer: OptimizerKind::Adam, seed: 3, proximal_mu: 0.0 };
    let deltas = (1..=CLIENTS)
        .map(|i| {
            let rows = fl_model::data::read_labelled_csv(&config.data_dir.join(format!("shard-{i}.csv"))).unwrap();
            let data = EncodedDataset::encode(&probe, &rows.texts, rows.label_indices(&spec.labels).unwrap());
            let mut model = Classifier::from_tensors(spec.clone(), &global, tch::Device::Cpu).unwrap();
            train(&mut model, &data, &local, &CancellationToken::new(), |_, _| {});
            model.to_tensors().minus(&global)
        })
        .collect();
    (global, deltas)
}

/// Where the embedding table sits in the flat vector, and its row width.
fn embedding_span(global: &TensorSet) -> (usize, usize, usize) {
    let mut offset = 0;
    for t in &global.tensors {
        if t.name == EMBEDDING {
            return (offset, t.data.len(), t.shape[1]);
        }
        offset += t.data.len();
    }
    panic!("no fastText embedding");
}

/// The full protocol for all clients; returns the masked vector the coordinator received from
/// client 0, and checks that the unmasked sum is the sum of the quantized inputs.
fn masked_upload_of_client_0(flat: &[Vec<f32>]) -> Vec<u32> {
    let ctx = RoundContext { session: rand::random(), round: 1, attempt: 0 };
    let plan = RoundPlan::new(&SecAggSettings::default(), CLIENTS, &ctx).unwrap();
    let quant = QuantizationPlan::new(8.0, CLIENTS as u32).unwrap();
    let mut rng = rand::rng();
    let mut server = SecAggServer::new(plan.clone(), ctx, flat[0].len());
    let mut clients: Vec<SecAggClient> =
        (0..CLIENTS as u32).map(|i| SecAggClient::new(i, plan.clone(), ctx, &mut rng).unwrap()).collect();
    for c in &clients {
        server.receive_keys(c.id(), c.advertise()).unwrap();
    }
    let directory = server.close_keys().unwrap();
    for c in &mut clients {
        let shared = c.share_keys(&directory).unwrap();
        server.receive_shares(c.id(), shared).unwrap();
    }
    server.close_shares().unwrap();
    let mut received = Vec::new();
    let mut plain_sum = vec![0u32; flat[0].len()];
    for c in &mut clients {
        let q = quant.quantize(&flat[c.id() as usize], &mut rng);
        for (s, v) in plain_sum.iter_mut().zip(&q) {
            *s = s.wrapping_add(*v);
        }
        let masked = c.masked_input(&server.inbox(c.id()), &q).unwrap();
        server.receive_masked(c.id(), &masked).unwrap();
        received.push(masked);
    }
    let request = server.close_masked().unwrap();
    for c in &mut clients {
        server.receive_unmask(c.id(), c.unmask(&request).unwrap()).unwrap();
    }
    assert_eq!(server.finish().unwrap().sum, plain_sum, "the coordinator still gets the exact sum");
    received.swap_remove(0)
}

fn precision(flagged: &BTreeSet<i64>, truth: &BTreeSet<i64>) -> f64 {
    flagged.intersection(truth).count() as f64 / flagged.len().max(1) as f64
}

#[test]
fn a_curious_coordinator_learns_the_clients_words_without_secure_aggregation_only() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    gen_data(dir.path());
    let config = SimConfig { buckets: 65_536, embed_dim: 8, ..SimConfig::new(dir.path()) };
    let spec = dp_sim::sim_spec(&config).unwrap();
    let truth = dp_sim::client_rows(&spec, &dir.path().join("shard-1.csv")).unwrap();
    let (global, deltas) = deltas(&config);
    let (offset, len, dim) = embedding_span(&global);
    let rows = len / dim;
    let base_rate = truth.len() as f64 / rows as f64;

    // Without secure aggregation the coordinator receives client 0's delta.
    let flat: Vec<Vec<f32>> = deltas.iter().map(secagg::flatten).collect();
    let table = &flat[0][offset..offset + len];
    let changed: BTreeSet<i64> =
        (0..rows).filter(|r| table[r * dim..(r + 1) * dim].iter().any(|v| *v != 0.0)).map(|r| r as i64).collect();
    let recall = changed.intersection(&truth).count() as f64 / truth.len() as f64;
    let plain_precision = precision(&changed, &truth);
    eprintln!(
        "plain upload: {} rows nonzero, client has {}, recall {recall:.3}, precision {plain_precision:.3}, base rate {base_rate:.4}",
        changed.len(),
        truth.len()
    );
    assert!(recall > 0.99, "the plain delta gives the client's rows away (recall {recall})");
    assert!(
        plain_precision > 0.99 && plain_precision > 10.0 * base_rate,
        "plain precision {plain_precision} vs base rate {base_rate}"
    );

    // With secure aggregation it receives the masked vector.
    let masked = masked_upload_of_client_0(&flat);
    let table = &masked[offset..offset + len];
    let flagged: BTreeSet<i64> =
        (0..rows).filter(|r| table[r * dim..(r + 1) * dim].iter().any(|v| *v != 0)).map(|r| r as i64).collect();
    let masked_precision = precision(&flagged, &truth);
    // Ranking rows by distance from the quantized zero (the middle of the range) does no better.
    let middle = f64::from(u32::MAX / CLIENTS as u32) / 2.0;
    let mut scored: Vec<(f64, i64)> = (0..rows)
        .map(|r| {
            let d: f64 = table[r * dim..(r + 1) * dim].iter().map(|&v| (f64::from(v) - middle).powi(2)).sum();
            (d, r as i64)
        })
        .collect();
    scored.sort_by(|a, b| a.0.total_cmp(&b.0));
    let top: BTreeSet<i64> = scored.iter().take(truth.len()).map(|&(_, r)| r).collect();
    let top_precision = precision(&top, &truth);
    eprintln!(
        "masked upload: {} rows nonzero, precision {masked_precision:.4}, top-{} rows nearest zero {top_precision:.4}, base rate {base_rate:.4}",
        flagged.len(),
        truth.len()
    );
    assert!(flagged.len() == rows, "every row of a masked upload is nonzero");
    assert!((masked_precision - base_rate).abs() < 1e-9, "precision {masked_precision} vs base rate {base_rate}");
    // The top-k precision of a random ranking has mean base_rate; 2x allows the sampling spread
    // (k is a few hundred rows), as dp_attack.rs does.
    assert!(top_precision < 2.0 * base_rate, "ranking a masked upload: {top_precision} vs base rate {base_rate}");
}
