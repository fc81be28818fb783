//! What the coordinator needs from an ML library, as a trait, so that the engine, aggregation and
//! the service build and test without libtorch. The `fl-coordinator` binary passes the libtorch
//! implementation from `fl-model`; tests pass a plain one.

use std::path::Path;
use std::sync::Arc;

use fl_common::{ModelSpec, TensorSet};

/// Errors of a backend: whatever the ML library reports, with context.
pub type BackendError = anyhow::Error;

/// Model construction and evaluation, as the coordinator uses them.
pub trait ModelBackend: Send + Sync + std::fmt::Debug {
    /// The initial weights of a new federation's model.
    fn initial_weights(&self, spec: &ModelSpec, seed: u64) -> Result<TensorSet, BackendError>;
    /// Checks that `weights` fit the architecture of `spec` (a starting model from a file).
    fn check_weights(&self, spec: &ModelSpec, weights: &TensorSet) -> Result<(), BackendError>;
    /// The distinct labels of a labelled CSV, in the order the federation will use.
    fn labels_of(&self, path: &Path) -> Result<Vec<String>, BackendError>;
    /// Reads and checks a labelled CSV for evaluation after each round; every label must be one
    /// of `spec`'s.
    fn evaluator(&self, path: &Path, spec: &ModelSpec) -> Result<Arc<dyn Evaluator>, BackendError>;
}

/// Evaluates global models on a held-out set.
pub trait Evaluator: Send + Sync + std::fmt::Debug {
    /// Rows in the set.
    fn len(&self) -> usize;
    /// True when the set is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Accuracy and mean loss of `weights`. Blocking: the engine calls it on a blocking thread.
    fn evaluate(&self, weights: &TensorSet) -> Result<Evaluation, BackendError>;
}

/// Accuracy and loss of a model on an evaluation set.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Evaluation {
    /// Fraction of rows predicted right.
    pub accuracy: f64,
    /// Mean cross-entropy.
    pub loss: f64,
}
