//! The libtorch side of the coordinator: `fl-model` behind `fl_server::ModelBackend`.

use std::path::Path;
use std::sync::Arc;

use fl_common::{ModelSpec, TensorSet};
use fl_model::evaluate::EvalSet;
use fl_model::model::Classifier;
use fl_server::backend::{BackendError, Evaluation, Evaluator, ModelBackend};

/// Builds, checks and evaluates models with libtorch on the CPU.
#[derive(Debug, Default)]
pub struct TorchBackend;

impl ModelBackend for TorchBackend {
    fn initial_weights(&self, spec: &ModelSpec, seed: u64) -> Result<TensorSet, BackendError> {
        Ok(Classifier::new(spec.clone(), tch::Device::Cpu, seed)?.to_tensors())
    }

    fn check_weights(&self, spec: &ModelSpec, weights: &TensorSet) -> Result<(), BackendError> {
        Classifier::from_tensors(spec.clone(), weights, tch::Device::Cpu)?;
        Ok(())
    }

    fn labels_of(&self, path: &Path) -> Result<Vec<String>, BackendError> {
        Ok(fl_model::data::read_labelled_csv(path)?.distinct_labels())
    }

    fn evaluator(&self, path: &Path, spec: &ModelSpec) -> Result<Arc<dyn Evaluator>, BackendError> {
        Ok(Arc::new(TorchEvaluator(EvalSet::load(path, spec)?)))
    }
}

#[derive(Debug)]
struct TorchEvaluator(EvalSet);

impl Evaluator for TorchEvaluator {
    fn len(&self) -> usize {
        self.0.len()
    }

    fn evaluate(&self, weights: &TensorSet) -> Result<Evaluation, BackendError> {
        let (accuracy, loss) = self.0.evaluate(weights)?;
        Ok(Evaluation { accuracy, loss })
    }
}
