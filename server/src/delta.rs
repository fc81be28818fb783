//! Delta downloads: a client that holds the previous round's global model downloads only the
//! round's aggregate, in the download codec of the federation's preferred update codec
//! ([`UpdateCodec::for_download`]).
//!
//! The coordinator defines the next global model as `global + decode(encode(next - global))`
//! ([`fl_common::codec::SparseDelta::add_to`]), the very arithmetic a client does on the payload it
//! downloads, so every client that applies the delta holds bit-identical weights; the task's
//! `model_digest` ([`fl_common::codec::tensor_digest`]) lets it check.
//!
//! A top-k download codec leaves part of each aggregate out; the coordinator keeps it (its
//! [`ErrorFeedback`]) and persists it with each round, as the server optimiser's state:
//! `STATE/download-feedback/round-NNNN.safetensors` is written before round NNNN commits, the
//! file of the round before is removed after, and a restart loads the one of the last
//! committed round ([`load_feedback`]), so the next aggregates are those of a run without the
//! restart.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use fl_common::codec::{ErrorFeedback, Precision, Sparsity, UpdateCodec};
use fl_common::TensorSet;
use tracing::warn;

use crate::coordinator::GlobalModel;
use crate::state::StateDir;

/// Where the download residual as of committed round `round` is kept.
pub fn feedback_path(state: &StateDir, round: u32) -> PathBuf {
    state.path(&format!("download-feedback/round-{round:04}.safetensors"))
}

/// Writes the download residual of `round` before the round commits (a crash in between leaves a
/// file that the rerun of the round overwrites); an empty residual writes nothing. Blocking.
pub fn save_feedback(state: &StateDir, round: u32, feedback: &ErrorFeedback) -> anyhow::Result<()> {
    let path = feedback_path(state, round);
    feedback.save(&path).with_context(|| format!("writing {}", path.display()))
}

/// Removes the residual of the round before `round` once `round` is committed. Blocking.
pub fn feedback_committed(state: &StateDir, round: u32) {
    if round > 1 {
        let old = feedback_path(state, round - 1);
        if let Err(e) = fl_common::files::remove_if_exists(&old) {
            warn!("could not remove {}: {e}", old.display());
        }
    }
}

/// The download residual as of committed round `completed` (empty when there is none). Blocking.
pub fn load_feedback(state: &StateDir, completed: u32) -> anyhow::Result<ErrorFeedback> {
    let path = feedback_path(state, completed);
    ErrorFeedback::load(&path).with_context(|| format!("reading {}", path.display()))
}

/// A round's aggregate as it is downloaded by the clients that hold the model before it.
#[derive(Debug)]
pub struct ModelDelta {
    /// Digest of the global model the aggregate applies to.
    pub base_digest: String,
    /// Its codec.
    pub codec: UpdateCodec,
    /// The encoded aggregate.
    pub bytes: Arc<Vec<u8>>,
}

/// The next global model after `global`, given the round's `aggregate` (the strategy's next
/// model minus `global`): the aggregate as clients will apply it with `codec`, and the delta
/// they download. Blocking: it encodes the aggregate and hashes the model, one pass each over
/// the model (of the encoded aggregate only the kept values are decoded, and applied in the
/// aggregate's buffers); the model file is built later, when first needed
/// ([`GlobalModel::file`]). An aggregate the codec cannot carry (beyond f16's range) means full
/// downloads.
///
/// A top-k codec leaves most of the aggregate out: `feedback` keeps it (replaced, not changed
/// in place: the round's commit writes the one it holds), and the next round's aggregate
/// carries it. Other codecs send the whole aggregate, rounded.
pub fn next_global(
    global: &GlobalModel,
    aggregate: TensorSet,
    codec: UpdateCodec,
    feedback: &mut Arc<ErrorFeedback>,
) -> anyhow::Result<GlobalModel> {
    // Only f16 can fail to carry a value (one beyond its range): then clients download the full
    // model, the previous one plus the aggregate.
    let fallback = (codec.precision == Precision::F16).then(|| aggregate.clone());
    let encoded = if codec.sparsity == Sparsity::TopK {
        // The next model's buffers are copied from the previous one while the aggregate is encoded.
        let (sent, copy) = rayon::join(
            || codec.encode_owned_with_feedback(aggregate, feedback.residual.as_ref()),
            || (*global.tensors).clone(),
        );
        sent.map(|sent| {
            *feedback = Arc::new(ErrorFeedback { residual: Some(sent.residual) });
            (sent.sent, sent.payload, copy)
        })
    } else {
        codec.encode(&aggregate).and_then(|bytes| {
            let sent = codec.decode_sparse(&bytes, &global.tensors)?;
            // The previous model, in the aggregate's buffers.
            let mut buffers = aggregate;
            for (a, g) in buffers.tensors.iter_mut().zip(&global.tensors.tensors) {
                a.data.copy_from_slice(&g.data);
            }
            Ok((sent, bytes, buffers))
        })
    };
    match encoded {
        Ok((sent, bytes, mut applied)) => {
            let delta = ModelDelta { base_digest: global.digest.clone(), codec, bytes: Arc::new(bytes) };
            // The previous model, plus what the clients apply.
            sent.add_to(&mut applied, 1.0);
            Ok(GlobalModel::after(global, applied, Some(Arc::new(delta))))
        }
        Err(e) => {
            let aggregate = fallback.with_context(|| format!("encoding the round's aggregate as {codec}: {e}"))?;
            warn!("the round's aggregate cannot be sent as {codec}: {e}; clients download the full model");
            let mut next = (*global.tensors).clone();
            next.add_scaled(&aggregate, 1.0);
            Ok(GlobalModel::after(global, next, None))
        }
    }
}

#[cfg(test)]
mod tests {
    use fl_common::codec::tensor_digest;
    use fl_common::{ModelKind, ModelSpec, NamedTensor};

    use super::*;

    fn delta_bytes(model: &GlobalModel) -> Arc<Vec<u8>> {
        model.delta.as_ref().expect("a delta is offered").bytes.clone()
    }

    #[test]
    fn a_client_applying_the_delta_holds_the_same_bits() {
        let spec = ModelSpec::with_defaults(ModelKind::Fasttext, vec!["a".into(), "b".into()]);
        let weights = |data: Vec<f32>| TensorSet::new(vec![NamedTensor { name: "w".into(), shape: vec![4, 2], data }]);
        let global = GlobalModel::encode(&spec, weights(vec![0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]));
        let next = weights(vec![0.1, 0.2, 0.31, 0.39, 0.5, 0.6, 0.7001, 0.8]);
        for name in ["sparse-f32", "sparse-f16", "sparse-int8", "dense-int8", "topk-int8"] {
            let codec: UpdateCodec = name.parse().unwrap();
            let mut feedback = Arc::default();
            let model = next_global(&global, next.minus(&global.tensors), codec, &mut feedback).unwrap();
            if name == "topk-int8" {
                // The same bits as the clients' encoder with its error feedback, which decodes twice.
                let mut theirs = ErrorFeedback::default();
                let payload = codec.encode_with_feedback(&next.minus(&global.tensors), &mut theirs).unwrap();
                assert_eq!(*delta_bytes(&model), payload);
                assert_eq!(*feedback, theirs);
            }
            let delta = model.delta.as_ref().expect("a delta is offered");
            assert_eq!(delta.base_digest, global.digest);
            // What a client does with the previous model and the downloaded bytes.
            let applied = codec.decode_sparse(&delta.bytes, &global.tensors).unwrap().applied_to(&global.tensors);
            assert_eq!(tensor_digest(&applied), model.digest, "{name}");
            let err = model.tensors.tensors[0].data.iter().zip(&next.tensors[0].data).map(|(a, b)| (a - b).abs());
            assert!(err.fold(0.0f32, f32::max) < 1e-3, "{name}: close to the strategy's model");
            // The model file, built when first asked for, is that of the weights.
            assert_eq!(model.file_len(), global.file_len());
            assert_eq!(*model.file(), fl_common::encode_model(&spec, &model.tensors), "{name}");
        }
        let huge = weights(vec![1e6; 8]).minus(&global.tensors);
        let model = next_global(&global, huge.clone(), "sparse-f16".parse().unwrap(), &mut Arc::default()).unwrap();
        let mut exact = (*global.tensors).clone();
        exact.add_scaled(&huge, 1.0);
        assert!(model.delta.is_none() && *model.tensors == exact, "beyond f16: the exact model, in full");
    }

    /// Row-sparse f32 updates fold into FedAvg exactly as their dense form: a row that one
    /// client touched is weighted by the examples of all clients of the round.
    #[test]
    fn sparse_updates_aggregate_like_dense_with_all_clients_weights() {
        use crate::aggregation::{AggregationStrategy, ClientUpdate, FedAvg};
        let rows = 50;
        let table = |touched: &[usize], scale: f32| {
            let mut data = vec![0.0f32; rows * 3];
            for &r in touched {
                for c in 0..3 {
                    data[r * 3 + c] = scale * (r as f32 + 1.0) * (c as f32 - 1.3);
                }
            }
            TensorSet::new(vec![
                NamedTensor { name: "embedding.weight".into(), shape: vec![rows, 3], data },
                NamedTensor { name: "linear.bias".into(), shape: vec![2], data: vec![scale, -scale] },
            ])
        };
        let global = table(&(0..rows).collect::<Vec<_>>(), 0.01);
        let clients = [(table(&[1, 7, 30], 0.5), 120u64), (table(&[7, 8], -0.25), 30), (table(&[49], 1.5), 850)];
        let codec: UpdateCodec = "sparse-f32".parse().unwrap();
        let (mut dense, mut sparse) = (FedAvg::default(), FedAvg::default());
        dense.begin_round(&global);
        sparse.begin_round(&global);
        for (delta, examples) in &clients {
            dense.fold(ClientUpdate { delta, num_examples: *examples });
            let decoded = codec.decode(&codec.encode(delta).unwrap(), &global).unwrap();
            sparse.fold(ClientUpdate { delta: &decoded, num_examples: *examples });
        }
        let (d, s) = (dense.finish(&global).unwrap(), sparse.finish(&global).unwrap());
        for (a, b) in d.tensors.iter().flat_map(|t| &t.data).zip(s.tensors.iter().flat_map(|t| &t.data)) {
            assert!((a - b).abs() <= 1e-6, "{a} vs {b}");
        }
        // Row 49 was touched by the third client only: its mean is weighted by 850 / 1000.
        let want = global.tensors[0].data[49 * 3] + clients[2].0.tensors[0].data[49 * 3] * 850.0 / 1000.0;
        let got = s.tensors[0].data[49 * 3];
        assert!((got - want).abs() <= 1e-6 * want.abs().max(1.0), "{got} vs {want}");
    }
}
