//! Folding one client's update into the FedAvg running sum, and decoding it from the wire, at the
//! benchmark's model size (4.2 M parameters).

use criterion::{criterion_group, criterion_main, Criterion};
use fl_common::{NamedTensor, TensorSet};
use fl_server::aggregation::{AggregationStrategy, ClientUpdate, FedAvg};

fn model() -> TensorSet {
    TensorSet::new(vec![
        NamedTensor { name: "embedding.weight".into(), shape: vec![65_536, 64], data: vec![0.01; 65_536 * 64] },
        NamedTensor { name: "linear.weight".into(), shape: vec![10, 64], data: vec![0.02; 640] },
        NamedTensor { name: "linear.bias".into(), shape: vec![10], data: vec![0.0; 10] },
    ])
}

fn fold(c: &mut Criterion) {
    let global = model();
    let delta = model();
    let bytes = delta.encode(None);
    let mut group = c.benchmark_group("fedavg_4.2M");
    group.sample_size(20);
    group.bench_function("decode update", |b| b.iter(|| TensorSet::decode(&bytes).unwrap().0.num_values()));
    group.bench_function("validate update", |b| b.iter(|| (delta.check_matches(&global).is_ok(), delta.l2_norm())));
    let mut avg = FedAvg::default();
    avg.begin_round(&global);
    group.bench_function("fold update", |b| b.iter(|| avg.fold(ClientUpdate { delta: &delta, num_examples: 1675 })));
    group.bench_function("finish round", |b| {
        b.iter(|| {
            let mut avg = FedAvg::default();
            avg.begin_round(&global);
            avg.fold(ClientUpdate { delta: &delta, num_examples: 10 });
            avg.finish(&global).unwrap().num_values()
        })
    });
    group.finish();
}

criterion_group!(benches, fold);
criterion_main!(benches);
