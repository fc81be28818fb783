//! Local training throughput of the fastText model at the benchmark's shape: 65,536 buckets, 64
//! dimensions, unigrams and bigrams, 10 classes, Adam lr 0.01, batch 32, one thread.

use criterion::{criterion_group, criterion_main, Criterion};
use fl_common::{ModelKind, ModelSpec};
use fl_model::datagen::{GeneratorConfig, TextGenerator};
use fl_model::model::Classifier;
use fl_model::train::{train, train_in, EncodedDataset, OptimizerKind, TrainConfig, Trainer};
use tokio_util::sync::CancellationToken;

fn local_epoch(c: &mut Criterion) {
    tch::set_num_threads(1);
    let generator = TextGenerator::new(GeneratorConfig { signal: 0.05, ..Default::default() });
    let rows = generator.rows(1675, 1);
    let spec = ModelSpec::with_defaults(ModelKind::Fasttext, generator.labels());
    let model = Classifier::new(spec.clone(), tch::Device::Cpu, 1).unwrap();
    let texts: Vec<String> = rows.iter().map(|r| r.text.clone()).collect();
    let data = EncodedDataset::encode(&model, &texts, rows.iter().map(|r| r.label as i64).collect());
    let global = model.to_tensors();
    let config =
        TrainConfig { epochs: 1, batch_size: 32, lr: 0.01, optimizer: OptimizerKind::Adam, seed: 3, proximal_mu: 0.0 };
    let cancel = CancellationToken::new();
    let mut group = c.benchmark_group("fasttext_4.2M");
    group.sample_size(10);
    group.bench_function("one local epoch, 1675 rows", |b| {
        b.iter(|| {
            let mut local = Classifier::from_tensors(spec.clone(), &global, tch::Device::Cpu).unwrap();
            train(&mut local, &data, &config, &cancel, |_, _| {})
        })
    });
    // The client daemon keeps its model across rounds and copies the new weights in; these two
    // differ in the trainer only: built anew each round, or kept and restarted.
    let mut local = Classifier::from_tensors(spec.clone(), &global, tch::Device::Cpu).unwrap();
    group.bench_function("one local round, model kept, new trainer", |b| {
        b.iter(|| {
            local.load_tensors(&global).unwrap();
            train(&mut local, &data, &config, &cancel, |_, _| {})
        })
    });
    let mut kept = None;
    group.bench_function("one local round, model and trainer kept", |b| {
        b.iter(|| {
            local.load_tensors(&global).unwrap();
            train_in(&mut kept, &mut local, &data, &config, None, &cancel, |_, _| {})
        })
    });
    group.bench_function("new trainer (dense optimizer, row-wise moments allocated)", |b| {
        b.iter(|| Trainer::new(&local, &config))
    });
    let mut trainer = Trainer::new(&local, &config);
    group.bench_function("restart a trainer (dense optimizer built again, no row touched)", |b| {
        b.iter(|| trainer.restart(&local, &config))
    });
    group.bench_function("delta and encode", |b| b.iter(|| model.to_tensors().minus(&global).encode(None).len()));
    group.finish();
}

criterion_group!(benches, local_epoch);
criterion_main!(benches);
