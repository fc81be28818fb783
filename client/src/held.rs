//! What a client keeps between rounds for the update codecs, in memory and in `STATE/codec/`:
//!
//! - the last global model it trained from (`global-FED.safetensors`, a model file), so that
//!   the next round downloads only the aggregate when the coordinator offers a delta; it is
//!   trusted only when its [`tensor_digest`] is the one the round task names;
//! - the error-feedback residual of a lossy codec (`residual-FED.safetensors`): what earlier
//!   updates left out, added to the next one, across rounds and restarts.
//!
//! `FED` is the start of the federation id, so a client enrolled anew never mixes federations.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use fl_common::codec::{tensor_digest, ErrorFeedback};
use fl_common::files::{remove_if_exists, replace_unsynced};
use fl_common::model_file::write_model_file;
use fl_common::{decode_model, ModelSpec, TensorSet};
use tracing::warn;

/// The global model and the residual a client holds.
#[derive(Debug)]
pub struct HeldState {
    dir: PathBuf,
    /// The federation the files were loaded for.
    loaded_for: Option<String>,
    /// Digest and weights of the global model held.
    global: Option<(String, Arc<TensorSet>)>,
    /// The residual of the codec's error feedback (shared with a save or a round in progress).
    pub feedback: Arc<ErrorFeedback>,
    /// The model of the last round, reused (new weights copied in) to spare its allocation.
    pub model: Option<fl_model::model::Classifier>,
    /// The trainer of that model, restarted each round to spare its optimizer allocations.
    pub trainer: Option<fl_model::train::Trainer>,
    /// The training settings of the last round this process trained (for the fine-tuning after
    /// the federation); in memory only.
    pub train_config: Option<fl_model::train::TrainConfig>,
    /// The local rows labelled by the teacher of a distilling federation (memory only).
    pub distilled: Option<crate::distill::Distilled>,
    global_dirty: bool,
    feedback_dirty: bool,
    /// The save in progress ([`HeldState::save_in_background`]).
    saving: Option<tokio::task::JoinHandle<Result<()>>>,
}

impl HeldState {
    /// The held state under a client's state dir; nothing is read until a round needs it.
    pub fn new(state_dir: &Path) -> HeldState {
        HeldState {
            dir: state_dir.join("codec"),
            loaded_for: None,
            global: None,
            feedback: Arc::default(),
            model: None,
            trainer: None,
            train_config: None,
            distilled: None,
            global_dirty: false,
            feedback_dirty: false,
            saving: None,
        }
    }

    fn path(&self, what: &str, spec: &ModelSpec) -> PathBuf {
        let fed: String = spec.federation.chars().take(16).collect();
        self.dir.join(format!("{what}-{fed}.safetensors"))
    }

    /// Reads the files of `spec`'s federation once. Blocking. A file that does not fit the
    /// model is ignored with a warning: the client then downloads the full model, or starts
    /// with an empty residual.
    pub fn load(&mut self, spec: &ModelSpec) {
        if self.loaded_for.as_deref() == Some(spec.federation.as_str()) {
            return;
        }
        self.loaded_for = Some(spec.federation.clone());
        self.global = None;
        self.feedback = Arc::default();
        // Saves that a crash cut short leave their temporary files; none of this process's yet.
        fl_common::files::remove_temporaries(&self.dir);
        let path = self.path("global", spec);
        match std::fs::read(&path) {
            Ok(bytes) => match decode_model(&bytes) {
                Ok((s, weights)) if s.check_compatible(spec).is_ok() && s.federation == spec.federation => {
                    self.global = Some((tensor_digest(&weights), Arc::new(weights)));
                }
                Ok(_) => warn!("{} is from another model; ignored", path.display()),
                Err(e) => warn!("{}: {e}; ignored", path.display()),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!("{}: {e}; ignored", path.display()),
        }
        let path = self.path("residual", spec);
        match ErrorFeedback::load(&path) {
            Ok(feedback) => self.feedback = Arc::new(feedback),
            Err(e) => warn!("{}: {e}; starting with an empty residual", path.display()),
        }
    }

    /// The global model held, if its digest is `digest`.
    pub fn global_if(&self, digest: &str) -> Option<Arc<TensorSet>> {
        self.global.as_ref().filter(|(d, _)| !digest.is_empty() && d == digest).map(|(_, g)| g.clone())
    }

    /// Digest of the global model held.
    pub fn digest(&self) -> Option<&str> {
        self.global.as_ref().map(|(d, _)| d.as_str())
    }

    /// Holds `weights` (of digest `digest`) as the global model.
    pub fn set_global(&mut self, digest: String, weights: Arc<TensorSet>) {
        if self.digest() != Some(digest.as_str()) {
            self.global = Some((digest, weights));
            self.global_dirty = true;
        }
    }

    /// Gives up the global model held, if its digest is `digest`, so that the caller may change
    /// it in place (it holds the only reference unless a save is still writing it).
    pub fn take_global_if(&mut self, digest: &str) -> Option<Arc<TensorSet>> {
        let held = self.global_if(digest)?;
        self.global = None;
        Some(held)
    }

    /// Forgets the global model held (it did not produce the round's model).
    pub fn forget_global(&mut self) {
        self.global = None;
        self.global_dirty = true;
    }

    /// Replaces the residual after an accepted update.
    pub fn set_feedback(&mut self, feedback: Arc<ErrorFeedback>) {
        self.feedback = feedback;
        self.feedback_dirty = true;
    }

    /// How long a client waits for its next task before it writes what changed: the daemon
    /// otherwise saves when training starts ([`HeldState::save_in_background`]).
    pub const IDLE_SAVE: std::time::Duration = std::time::Duration::from_secs(1);

    /// True when something changed since the last save started.
    pub fn has_unsaved(&self) -> bool {
        self.global_dirty || self.feedback_dirty
    }

    /// Starts writing what changed since the last save, on a blocking thread, and returns: the
    /// round's critical path does not wait for the disk. The daemon calls it when a round's
    /// training starts, so the write shares the cores with training and not with the steps
    /// before and after it, and after [`HeldState::IDLE_SAVE`] without a task. One save runs at a time: while one
    /// does, what changed stays marked and a later call writes the latest state, so a slow disk
    /// never queues models in memory. [`HeldState::save`] writes and waits (the daemon, before it
    /// exits). A model still being written when the next round changes it is copied. The files
    /// are a cache, checked when read (the model by its digest, the residual as a tensor file),
    /// so they are replaced atomically but not fsync'd: a power loss may cost the next round a
    /// full download, or the residual.
    pub async fn save_in_background(&mut self, spec: &ModelSpec) {
        if let Err(e) = self.settle_if_done().await {
            warn!("could not keep the global model and residual for the next round: {e:#}");
        }
        if self.saving.is_some() {
            return;
        }
        let global = self.global_dirty.then(|| (self.path("global", spec), self.global.clone()));
        let feedback = self.feedback_dirty.then(|| (self.path("residual", spec), self.feedback.clone()));
        if global.is_none() && feedback.is_none() {
            return;
        }
        self.global_dirty = false;
        self.feedback_dirty = false;
        let spec = spec.clone();
        self.saving = Some(tokio::task::spawn_blocking(move || -> Result<()> {
            if let Some((path, global)) = global {
                match global {
                    Some((_, weights)) => replace_unsynced(&path, 0o600, |tmp| write_model_file(tmp, &spec, &weights)),
                    None => remove_if_exists(&path),
                }
                .with_context(|| format!("writing {}", path.display()))?;
            }
            if let Some((path, feedback)) = feedback {
                feedback.save_unsynced(&path).with_context(|| format!("writing {}", path.display()))?;
            }
            Ok(())
        }));
    }

    /// The outcome of the last save if it has finished (without waiting for one in progress).
    async fn settle_if_done(&mut self) -> Result<()> {
        match &self.saving {
            Some(saving) if saving.is_finished() => self.settle().await,
            _ => Ok(()),
        }
    }

    /// Waits for the save in progress, if any. A failed save marks both files to be written
    /// again by the next one.
    pub async fn settle(&mut self) -> Result<()> {
        let Some(saving) = self.saving.take() else { return Ok(()) };
        let result = saving.await.context("the save panicked").and_then(|r| r);
        if result.is_err() {
            self.global_dirty = true;
            self.feedback_dirty = true;
        }
        result
    }

    /// Writes what changed since the last save and waits for it (after the save in progress, if
    /// any; what that one failed to write is written again).
    pub async fn save(&mut self, spec: &ModelSpec) -> Result<()> {
        if let Err(e) = self.settle().await {
            warn!("{e:#}; writing again");
        }
        self.save_in_background(spec).await;
        self.settle().await
    }
}

#[cfg(test)]
mod tests {
    use fl_common::codec::UpdateCodec;
    use fl_common::{ModelKind, NamedTensor};

    use super::*;

    #[tokio::test]
    async fn global_and_residual_survive_a_restart_and_stay_in_their_federation() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = ModelSpec::with_defaults(ModelKind::Fasttext, vec!["a".into(), "b".into()]);
        spec.federation = "ab".repeat(32);
        let weights = TensorSet::new(vec![NamedTensor { name: "w".into(), shape: vec![4, 2], data: vec![0.5; 8] }]);
        let digest = tensor_digest(&weights);
        let mut held = HeldState::new(dir.path());
        held.load(&spec);
        assert!(held.digest().is_none());
        held.set_global(digest.clone(), Arc::new(weights.clone()));
        let mut feedback = ErrorFeedback::default();
        let delta = TensorSet::new(vec![NamedTensor { name: "w".into(), shape: vec![4, 2], data: vec![0.25; 8] }]);
        "topk-f32".parse::<UpdateCodec>().unwrap().encode_with_feedback(&delta, &mut feedback).unwrap();
        held.set_feedback(Arc::new(feedback.clone()));
        held.save(&spec).await.unwrap();

        // A save that a crash cut short leaves its temporary file; the next start removes it.
        let leftover = dir.path().join("codec").join(format!(".global-{}.safetensors.tmp-1", &spec.federation[..16]));
        std::fs::write(&leftover, b"torn").unwrap();
        let mut again = HeldState::new(dir.path());
        again.load(&spec);
        assert!(!leftover.exists(), "the interrupted save's temporary file is removed");
        assert_eq!(again.global_if(&digest).as_deref(), Some(&weights));
        assert!(again.global_if("other").is_none());
        assert_eq!(*again.feedback, feedback);

        let mut other = spec.clone();
        other.federation = "cd".repeat(32);
        again.load(&other);
        assert!(again.digest().is_none() && again.feedback.residual.is_none(), "another federation starts empty");
    }
}
