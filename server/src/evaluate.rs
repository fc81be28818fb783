//! Centralized evaluation of a global model on the coordinator's labelled eval CSV.

use std::path::Path;

use anyhow::Result;
use fl_client::data::read_labelled_csv;
use fl_client::model::Classifier;
use fl_client::train::EncodedDataset;
use fl_common::{ModelSpec, TensorSet};

/// The eval set, tokenized for the federation's model.
#[derive(Debug)]
pub struct EvalSet {
    data: EncodedDataset,
}

impl EvalSet {
    /// Reads and checks `path`; every label must be one of `spec`'s.
    pub fn load(path: &Path, spec: &ModelSpec) -> Result<EvalSet> {
        let rows = read_labelled_csv(path)?;
        let labels = rows.label_indices(&spec.labels)?;
        let probe = Classifier::new(spec.clone(), tch::Device::Cpu, 0)?;
        Ok(EvalSet { data: EncodedDataset::encode(&probe, &rows.texts, labels) })
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
    pub fn evaluate(&self, spec: &ModelSpec, weights: &TensorSet) -> Result<(f64, f64)> {
        let model = Classifier::from_tensors(spec.clone(), weights, tch::Device::Cpu)?;
        Ok(model.evaluate(&self.data.docs, &self.data.labels))
    }
}
