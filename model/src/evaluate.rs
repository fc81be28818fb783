//! Centralized evaluation of a global model on a labelled CSV (the coordinator's `--eval-data`).

use std::path::Path;

use fl_common::{ModelSpec, TensorSet};

use crate::data::{read_labelled_csv, DataError};
use crate::model::{Classifier, ModelError};
use crate::train::EncodedDataset;

/// Why an eval set could not be loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// The CSV is unreadable or has a label the model does not know.
    #[error(transparent)]
    Data(#[from] DataError),
    /// The spec or the weights do not make a model.
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// An eval set, tokenized for one model spec, and the model it evaluates each set of weights
/// with (built once; each evaluation copies the weights in).
#[derive(Debug)]
pub struct EvalSet {
    data: EncodedDataset,
    model: std::sync::Mutex<Classifier>,
}

impl EvalSet {
    /// Reads and checks `path`; every label must be one of `spec`'s.
    pub fn load(path: &Path, spec: &ModelSpec) -> Result<EvalSet, EvalError> {
        let rows = read_labelled_csv(path)?;
        let labels = rows.label_indices(&spec.labels)?;
        let model = Classifier::new(spec.clone(), tch::Device::Cpu, 0)?;
        let data = EncodedDataset::encode(&model, &rows.texts, labels);
        Ok(EvalSet { data, model: std::sync::Mutex::new(model) })
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Accuracy and loss of `weights`. Blocking: call from a blocking thread.
    pub fn evaluate(&self, weights: &TensorSet) -> Result<(f64, f64), EvalError> {
        let mut model = self.model.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        model.load_tensors(weights)?;
        Ok(model.evaluate(&self.data.docs, &self.data.labels))
    }
}
