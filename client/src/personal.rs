//! What a personalising client keeps and reports: the personal model and its accuracy against the
//! global model's on the local held-out split (`STATE/personal/`, and the coordinator through the
//! update header's `local_eval`), and, for `--personalize finetune`, the fine-tuning of the final
//! model once the federation has finished.
//!
//! After the federation: the client fetches the final model (`FetchModel` of round
//! `rounds_completed + 1`) while its work stream is still open, closes the stream, and fine-tunes
//! the final model on its training split for `--finetune-epochs` epochs with the training settings
//! of its last round (without a proximal term), after shifting its logits to the client's own
//! label prior (`--local-prior`, [`LocalPrior`]). The result becomes its personal model;
//! `accuracy.json` then says `"after_federation": true`.

use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use fl_common::{ModelSpec, TensorSet};
use fl_proto::pb;
use tokio_util::sync::CancellationToken;
use tracing::info;

use fl_model::model::{default_device, Classifier};
use fl_model::personal::LocalPrior;
use fl_model::train::{train, EncodedDataset, TrainConfig};

use crate::daemon::{PersonalAccuracy, PersonalConfig};

/// Measures `global` and `personal_weights` on the held-out split and stores the personal model
/// and the accuracies in `STATE/personal` (`model.safetensors`, `accuracy.json`, a line of
/// `metrics.jsonl`). Blocking.
pub(crate) fn record(
    personal: &PersonalConfig,
    spec: &ModelSpec,
    global: &TensorSet,
    personal_weights: &TensorSet,
    round: u32,
    train_rows: usize,
    after_federation: bool,
) -> Result<PersonalAccuracy> {
    let labels = personal.test.label_indices(&spec.labels)?;
    let probe = Classifier::new(spec.clone(), tch::Device::Cpu, 0)?;
    let test = EncodedDataset::encode(&probe, &personal.test.texts, labels);
    let device = default_device();
    let accuracy_of = |weights: &TensorSet| -> Result<f64> {
        let model = Classifier::from_tensors(spec.clone(), weights, device)?;
        Ok(model.evaluate(&test.docs, &test.labels).0)
    };
    let accuracy = PersonalAccuracy {
        method: personal.method.to_string(),
        round,
        train_rows,
        test_rows: test.len(),
        global_accuracy: accuracy_of(global)?,
        personal_accuracy: accuracy_of(personal_weights)?,
        after_federation,
    };
    std::fs::create_dir_all(&personal.dir).with_context(|| format!("creating {}", personal.dir.display()))?;
    let model_path = personal.dir.join("model.safetensors");
    let bytes = fl_common::model_file::encode_model(spec, personal_weights);
    fl_common::files::write_atomic(&model_path, &bytes, 0o600)
        .with_context(|| format!("writing {}", model_path.display()))?;
    let json = serde_json::to_string(&accuracy)?;
    let path = personal.dir.join("accuracy.json");
    fl_common::files::write_atomic(&path, json.as_bytes(), 0o644)
        .with_context(|| format!("writing {}", path.display()))?;
    let path = personal.dir.join("metrics.jsonl");
    fl_common::files::append_line(&path, &json).with_context(|| format!("writing {}", path.display()))?;
    info!(
        round,
        method = %personal.method,
        after_federation,
        global_accuracy = format!("{:.4}", accuracy.global_accuracy),
        personal_accuracy = format!("{:.4}", accuracy.personal_accuracy),
        test_rows = accuracy.test_rows,
        "personal model updated"
    );
    Ok(accuracy)
}

impl From<&PersonalAccuracy> for pb::LocalEvaluation {
    fn from(a: &PersonalAccuracy) -> pb::LocalEvaluation {
        pb::LocalEvaluation {
            personal_accuracy: a.personal_accuracy,
            global_accuracy: a.global_accuracy,
            test_examples: a.test_rows as u64,
        }
    }
}

/// Fine-tunes the final model `global` of a federation of `rounds` rounds on `data` for
/// `personal.final_epochs` epochs with `last_round` (the settings of this client's last round),
/// starting from its logits shifted to the local label prior when `personal.local_prior`, and
/// records it as the personal model. Trains on a blocking thread with `threads` threads.
pub(crate) async fn finetune_final(
    personal: &PersonalConfig,
    spec: &ModelSpec,
    global: Arc<TensorSet>,
    data: Arc<EncodedDataset>,
    last_round: TrainConfig,
    rounds: u32,
    threads: i32,
) -> Result<PersonalAccuracy> {
    let config = TrainConfig { epochs: personal.final_epochs, proximal_mu: 0.0, ..last_round };
    let (personal, spec) = (personal.clone(), spec.clone());
    tokio::task::spawn_blocking(move || -> Result<PersonalAccuracy> {
        tch::set_num_threads(threads);
        let mut model = Classifier::from_tensors(spec.clone(), &global, default_device())?;
        if personal.local_prior {
            LocalPrior::from_labels(&data.labels, spec.num_classes()).apply(&mut model)?;
        }
        let stats = train(&mut model, &data, &config, &CancellationToken::new(), |_, _| {});
        if !stats.loss.is_finite() {
            return Err(anyhow!("fine-tuning the final model diverged: the loss is not finite"));
        }
        record(&personal, &spec, &global, &model.to_tensors(), rounds, data.len(), true)
    })
    .await
    .context("fine-tuning the final model panicked")?
}
