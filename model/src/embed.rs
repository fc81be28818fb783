//! Explanatory embeddings: each text's pooled representation (what the classifier head reads),
//! projected to two dimensions by principal component analysis computed here, for plotting.
//!
//! PCA: centre the points, form the covariance matrix (features × features, at most a few
//! hundred), and take its two leading eigenvectors by power iteration with deflation. Each
//! component's sign is fixed so that its largest entry is positive, so that the same model and
//! data always give the same picture.

use std::path::Path;

use serde::Serialize;

use crate::model::Classifier;
use crate::rules::predicted_classes;

/// A fitted projection onto the leading principal components.
#[derive(Clone, Debug, PartialEq)]
pub struct Pca {
    /// Mean of the fitted points.
    pub mean: Vec<f64>,
    /// Unit-length components, leading first.
    pub components: Vec<Vec<f64>>,
    /// Variance of the points along each component.
    pub variances: Vec<f64>,
    /// Total variance of the points (the trace of the covariance).
    pub total_variance: f64,
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

impl Pca {
    /// Fits `k` components to `points` (rows of equal length).
    pub fn fit(points: &[Vec<f64>], k: usize) -> Pca {
        let d = points.first().map_or(0, Vec::len);
        let n = points.len().max(1) as f64;
        let mut mean = vec![0.0; d];
        for p in points {
            for (m, x) in mean.iter_mut().zip(p) {
                *m += x / n;
            }
        }
        let mut cov = vec![vec![0.0; d]; d];
        let denominator = (n - 1.0).max(1.0);
        for p in points {
            let c: Vec<f64> = p.iter().zip(&mean).map(|(x, m)| x - m).collect();
            for (row, ci) in cov.iter_mut().zip(&c) {
                for (x, cj) in row.iter_mut().zip(&c) {
                    *x += ci * cj / denominator;
                }
            }
        }
        let total_variance = (0..d).map(|i| cov[i][i]).sum();
        let mut components: Vec<Vec<f64>> = Vec::new();
        let mut variances = Vec::new();
        for c in 0..k.min(d) {
            // A fixed start that is not orthogonal to any axis; 500 iterations reach the
            // eigenvector for any practical gap between eigenvalues.
            let mut v: Vec<f64> = (0..d).map(|i| 1.0 + ((i + c) % 7) as f64 * 0.1).collect();
            let mut lambda = 0.0;
            for _ in 0..500 {
                let mut w: Vec<f64> = cov.iter().map(|row| dot(row, &v)).collect();
                for prev in &components {
                    let along = dot(&w, prev);
                    w.iter_mut().zip(prev).for_each(|(x, p)| *x -= along * p);
                }
                let norm = dot(&w, &w).sqrt();
                if norm < 1e-12 {
                    break;
                }
                lambda = norm;
                v = w.into_iter().map(|x| x / norm).collect();
            }
            let largest = v.iter().copied().fold(0.0f64, |a, x| if x.abs() > a.abs() { x } else { a });
            if largest < 0.0 {
                v.iter_mut().for_each(|x| *x = -*x);
            }
            components.push(v);
            variances.push(lambda);
        }
        Pca { mean, components, variances, total_variance }
    }

    /// Coordinates of `point` along the components.
    pub fn project(&self, point: &[f64]) -> Vec<f64> {
        let centred: Vec<f64> = point.iter().zip(&self.mean).map(|(x, m)| x - m).collect();
        self.components.iter().map(|c| dot(c, &centred)).collect()
    }
}

/// One text's point in the plane.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EmbeddedPoint {
    /// First principal coordinate.
    pub x: f64,
    /// Second principal coordinate.
    pub y: f64,
    /// Index of the true label, if known.
    pub label: Option<usize>,
    /// Index of the model's prediction.
    pub predicted: usize,
}

/// The texts' pooled representations in two dimensions.
#[derive(Clone, Debug)]
pub struct Embedding {
    /// One point per text.
    pub points: Vec<EmbeddedPoint>,
    /// Fraction of the total variance along each of the two axes.
    pub explained: [f64; 2],
}

/// Projects each text's pooled representation onto its two leading principal components.
/// `labels` are the texts' true label indices, if known.
pub fn embed(model: &Classifier, texts: &[&str], labels: Option<&[usize]>) -> Embedding {
    let pooled: Vec<Vec<f64>> =
        model.pooled(texts).into_iter().map(|r| r.into_iter().map(f64::from).collect()).collect();
    let pca = Pca::fit(&pooled, 2);
    let predicted = predicted_classes(model, texts);
    let points = pooled
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let xy = pca.project(p);
            EmbeddedPoint {
                x: xy.first().copied().unwrap_or(0.0),
                y: xy.get(1).copied().unwrap_or(0.0),
                label: labels.map(|l| l[i]),
                predicted: predicted[i],
            }
        })
        .collect();
    let share = |i: usize| pca.variances.get(i).copied().unwrap_or(0.0) / pca.total_variance.max(1e-300);
    Embedding { points, explained: [share(0), share(1)] }
}

/// Writes the points as CSV: `x,y,label,predicted,text`.
pub fn write_points_csv(path: &Path, embedding: &Embedding, texts: &[&str], labels: &[String]) -> csv::Result<()> {
    let mut w = csv::Writer::from_path(path)?;
    w.write_record(["x", "y", "label", "predicted", "text"])?;
    for (p, text) in embedding.points.iter().zip(texts) {
        let label = p.label.map(|l| labels[l].as_str()).unwrap_or("");
        w.write_record([&format!("{:.6}", p.x), &format!("{:.6}", p.y), label, &labels[p.predicted], text])?;
    }
    w.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::central::testing::{generator, trained};
    use fl_common::ModelKind;

    #[test]
    fn pca_finds_the_directions_of_largest_variance() {
        // Points spread along (1, 2, 0) with a small, uncorrelated spread along (0, 0, 1): known
        // components. The signs + - - + sum to zero against any arithmetic run of four t.
        let points: Vec<Vec<f64>> = (0..48)
            .map(|i| {
                let t = i as f64 - 23.5;
                let s = if i % 4 == 0 || i % 4 == 3 { 0.5 } else { -0.5 };
                vec![5.0 + t, 1.0 + 2.0 * t, -3.0 + s]
            })
            .collect();
        let pca = Pca::fit(&points, 2);
        let s5 = 5f64.sqrt();
        for (got, want) in pca.components[0].iter().zip([1.0 / s5, 2.0 / s5, 0.0]) {
            assert!((got - want).abs() < 1e-9, "{:?}", pca.components);
        }
        for (got, want) in pca.components[1].iter().zip([0.0, 0.0, 1.0]) {
            assert!((got - want).abs() < 1e-9, "{:?}", pca.components);
        }
        assert!((pca.mean[0] - 5.0).abs() < 1e-12 && (pca.mean[2] + 3.0).abs() < 1e-12);
        // Variance along (1,2,0)/√5 of t√5 with t = -23.5..23.5: 5 · var(t).
        let var_t = (0..48).map(|i| (i as f64 - 23.5).powi(2)).sum::<f64>() / 47.0;
        assert!((pca.variances[0] - 5.0 * var_t).abs() < 1e-6);
        assert!((pca.variances[0] + pca.variances[1] - pca.total_variance).abs() < 1e-6);
        assert_eq!(pca.project(&[5.0, 1.0, -3.0]), vec![0.0, 0.0]);
    }

    #[test]
    fn embedded_classes_form_separate_clusters() {
        // For a trained model, texts of one class lie nearer their own class's centre than the
        // other classes' on the whole: the nearest-centroid accuracy in the plane beats chance well.
        for kind in [ModelKind::Fasttext, ModelKind::Bilstm] {
            let model = trained(kind);
            let rows = generator().rows(300, 31);
            let texts: Vec<&str> = rows.iter().map(|r| r.text.as_str()).collect();
            let labels: Vec<usize> = rows.iter().map(|r| r.label).collect();
            let e = embed(&model, &texts, Some(&labels));
            assert_eq!(e.points.len(), 300);
            assert!(e.explained[0] >= e.explained[1] && e.explained[0] + e.explained[1] <= 1.0 + 1e-9);
            let classes = model.spec.num_classes();
            let mut centres = vec![(0.0, 0.0, 0usize); classes];
            for p in &e.points {
                let c = &mut centres[p.predicted];
                *c = (c.0 + p.x, c.1 + p.y, c.2 + 1);
            }
            let near = e
                .points
                .iter()
                .filter(|p| {
                    let d = |c: &(f64, f64, usize)| {
                        let n = c.2.max(1) as f64;
                        (p.x - c.0 / n).powi(2) + (p.y - c.1 / n).powi(2)
                    };
                    (0..classes).min_by(|&a, &b| d(&centres[a]).total_cmp(&d(&centres[b]))) == Some(p.predicted)
                })
                .count();
            assert!(near as f64 > 0.5 * 300.0, "{kind}: {near} of 300 points nearest their class centre");
        }
    }
}
