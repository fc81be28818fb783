//! Prediction reports: the label of one text, or accuracy and confusion matrix on a labelled CSV.

use std::fmt::Write;

use crate::data::{DataError, LabelledTexts};
use crate::model::Classifier;

/// Formats the prediction for one text: the label, then each class's probability, highest first.
pub fn describe_prediction(model: &Classifier, text: &str) -> String {
    let probs = &model.predict_proba(&[text])[0];
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
    let mut out = format!("label: {}\n", model.spec.labels[order[0]]);
    for i in order {
        let _ = writeln!(out, "  {:<14} {:.4}", model.spec.labels[i], probs[i]);
    }
    out
}

/// Accuracy and confusion matrix of a model on labelled rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    /// Fraction of rows predicted right.
    pub accuracy: f64,
    /// `matrix[true][predicted]` counts.
    pub confusion: Vec<Vec<u64>>,
    /// Label names.
    pub labels: Vec<String>,
}

/// Evaluates `model` on `rows`; unknown labels are an error.
pub fn evaluate_rows(model: &Classifier, rows: &LabelledTexts) -> Result<Evaluation, DataError> {
    let truth = rows.label_indices(&model.spec.labels)?;
    let texts: Vec<&str> = rows.texts.iter().map(String::as_str).collect();
    let probs = model.predict_proba(&texts);
    let k = model.spec.num_classes();
    let mut confusion = vec![vec![0u64; k]; k];
    for (p, &t) in probs.iter().zip(&truth) {
        let predicted = (0..k).max_by(|&a, &b| p[a].total_cmp(&p[b])).unwrap_or(0);
        confusion[t as usize][predicted] += 1;
    }
    let correct: u64 = (0..k).map(|i| confusion[i][i]).sum();
    Ok(Evaluation {
        accuracy: correct as f64 / truth.len().max(1) as f64,
        confusion,
        labels: model.spec.labels.clone(),
    })
}

impl std::fmt::Display for Evaluation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "accuracy: {:.4}", self.accuracy)?;
        writeln!(f, "confusion matrix (rows: true label, columns: predicted):")?;
        let row_names: Vec<String> = self.labels.iter().enumerate().map(|(i, l)| format!("{i}:{l}")).collect();
        let width = row_names.iter().map(|n| n.chars().count()).max().unwrap_or(5).max(5);
        write!(f, "{:>width$}", "")?;
        for (i, _) in self.labels.iter().enumerate() {
            write!(f, " {:>5}", i)?;
        }
        writeln!(f)?;
        for (i, row) in self.confusion.iter().enumerate() {
            write!(f, "{:>width$}", row_names[i])?;
            for c in row {
                write!(f, " {c:>5}")?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}
