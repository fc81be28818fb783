//! Folding one client's update into the FedAvg running sum, and decoding it from the wire, at the
//! benchmark's model size (4.2 M parameters); and the steps of a top-k-int8 round on its
//! critical path: a client's encode with error feedback, the coordinator's sparse decode and
//! fold, the next global model (the aggregate's top-k encode, its application and the digest),
//! and the global model's digest.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use fl_common::codec::{tensor_digest, ErrorFeedback, UpdateCodec};
use fl_common::{ModelKind, ModelSpec, NamedTensor, TensorSet};
use fl_server::aggregation::{AggregationStrategy, ClientUpdate, FedAvg};
use fl_server::coordinator::GlobalModel;

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

/// A delta whose values all differ (a simple hash of the index), as after a few rounds of
/// training with error feedback.
fn varied(scale: f32) -> TensorSet {
    let mut set = model();
    for t in &mut set.tensors {
        for (i, v) in t.data.iter_mut().enumerate() {
            let h = (i as u32).wrapping_mul(2_654_435_761) >> 8;
            *v = scale * (h as f32 / (1u32 << 24) as f32 - 0.5);
        }
    }
    set
}

fn topk_round(c: &mut Criterion) {
    let codec: UpdateCodec = "topk-int8".parse().unwrap();
    let (global, delta, residual) = (model(), varied(0.01), varied(0.001));
    let payload = codec.encode(&delta).unwrap();
    let mut group = c.benchmark_group("topk_int8_4.2M");
    group.sample_size(20);
    group.bench_function("client: encode with error feedback", |b| {
        b.iter_batched(
            || delta.clone(),
            |delta| codec.encode_owned_with_feedback(delta, Some(&residual)).unwrap().payload.len(),
            criterion::BatchSize::LargeInput,
        )
    });
    group.bench_function("coordinator: decode (sparse) and check", |b| {
        b.iter(|| codec.decode_sparse(&payload, &global).unwrap().l2_norm())
    });
    let sparse = codec.decode_sparse(&payload, &global).unwrap();
    let mut avg = FedAvg::default();
    avg.begin_round(&global);
    group.bench_function("coordinator: fold (sparse)", |b| b.iter(|| avg.try_fold_sparse(&sparse, 1675, &global)));
    let spec = ModelSpec::with_defaults(ModelKind::Fasttext, (0..10).map(|i| i.to_string()).collect());
    let base = GlobalModel::encode(&spec, global.clone());
    let feedback = Arc::new(ErrorFeedback { residual: Some(residual.clone()) });
    group.bench_function("coordinator: next global model (encode with feedback, apply, digest)", |b| {
        b.iter_batched(
            || (delta.clone(), feedback.clone()),
            |(aggregate, mut feedback)| {
                fl_server::delta::next_global(&base, aggregate, codec, &mut feedback).unwrap().digest.len()
            },
            criterion::BatchSize::LargeInput,
        )
    });
    group.bench_function("tensor digest (BLAKE3)", |b| b.iter(|| tensor_digest(&global)));
    group.finish();
}

criterion_group!(benches, fold, topk_round);
criterion_main!(benches);
