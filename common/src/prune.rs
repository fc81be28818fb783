//! Magnitude pruning of a model's weights: set the smallest weights, or the embedding rows of
//! smallest norm, to zero. The compact file ([`crate::compact`]) then leaves them out.

use crate::TensorSet;

/// Where the magnitude threshold of [`prune_weights`] is taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PruneScope {
    /// Each matrix loses the same fraction of its weights.
    Tensor,
    /// One threshold over all matrices together: large tables may lose more than small layers.
    Global,
}

/// Zeroes the `fraction` of weights with the smallest magnitude in every tensor of two or more
/// dimensions (vectors such as biases and norms are kept), skipping the tensors named in `skip`.
/// Returns how many weights were zeroed.
pub fn prune_weights(weights: &mut TensorSet, fraction: f64, scope: PruneScope, skip: &[&str]) -> usize {
    let fraction = fraction.clamp(0.0, 1.0);
    let mut targets: Vec<&mut Vec<f32>> = weights
        .tensors
        .iter_mut()
        .filter(|t| t.shape.len() >= 2 && !skip.contains(&t.name.as_str()))
        .map(|t| &mut t.data)
        .collect();
    match scope {
        PruneScope::Tensor => targets
            .iter_mut()
            .map(|data| {
                let k = (data.len() as f64 * fraction).floor() as usize;
                zero_smallest(&mut data.iter_mut().collect::<Vec<_>>(), k)
            })
            .sum(),
        PruneScope::Global => {
            let mut all: Vec<&mut f32> = targets.iter_mut().flat_map(|d| d.iter_mut()).collect();
            let k = (all.len() as f64 * fraction).floor() as usize;
            zero_smallest(&mut all, k)
        }
    }
}

/// Zeroes the `k` values of smallest magnitude; returns `k`.
fn zero_smallest(values: &mut [&mut f32], k: usize) -> usize {
    let k = k.min(values.len());
    if k == 0 {
        return 0;
    }
    values.select_nth_unstable_by(k - 1, |a, b| a.abs().total_cmp(&b.abs()));
    for v in &mut values[..k] {
        **v = 0.0;
    }
    k
}

/// Zeroes the `fraction` of rows of the matrix `name` with the smallest L2 norm: the embedding
/// buckets that training barely moved from their small initial values, or never touched. Returns
/// the number of rows zeroed, or `None` if there is no such matrix.
pub fn prune_rows(weights: &mut TensorSet, name: &str, fraction: f64) -> Option<usize> {
    let t = weights.tensors.iter_mut().find(|t| t.name == name && t.shape.len() >= 2)?;
    let cols = t.data.len() / t.shape[0].max(1);
    let norms: Vec<f32> = t.data.chunks(cols.max(1)).map(|r| r.iter().map(|x| x * x).sum()).collect();
    let mut order: Vec<usize> = (0..t.shape[0]).collect();
    let k = ((order.len() as f64) * fraction.clamp(0.0, 1.0)).floor() as usize;
    if k == 0 {
        return Some(0);
    }
    order.select_nth_unstable_by(k - 1, |&a, &b| norms[a].total_cmp(&norms[b]));
    for &r in &order[..k] {
        t.data[r * cols..(r + 1) * cols].fill(0.0);
    }
    Some(k)
}

/// Zeroes the rows of the matrix `name` that are bit for bit those of `initial` (the
/// federation's round-0 model, `STATE/model/initial.safetensors`): the embedding buckets that
/// no client's training ever touched, since updates only move the rows a batch reads. Returns the
/// number of rows zeroed; refuses an `initial` whose matrix is missing or of another shape.
pub fn prune_unchanged_rows(weights: &mut TensorSet, initial: &TensorSet, name: &str) -> Result<usize, String> {
    let t = weights
        .tensors
        .iter_mut()
        .find(|t| t.name == name && t.shape.len() >= 2)
        .ok_or_else(|| format!("the model has no matrix {name}"))?;
    let start = initial
        .tensors
        .iter()
        .find(|s| s.name == name)
        .ok_or_else(|| format!("the initial model has no tensor {name}"))?;
    if start.shape != t.shape {
        return Err(format!("{name} is {:?} in the initial model and {:?} in the model", start.shape, t.shape));
    }
    let cols = (t.data.len() / t.shape[0].max(1)).max(1);
    let mut zeroed = 0;
    for (row, old) in t.data.chunks_mut(cols).zip(start.data.chunks(cols)) {
        if row.iter().zip(old).all(|(a, b)| a.to_bits() == b.to_bits()) && row.iter().any(|v| *v != 0.0) {
            row.fill(0.0);
            zeroed += 1;
        }
    }
    Ok(zeroed)
}

/// Number of non-zero values.
pub fn count_nonzero(weights: &TensorSet) -> usize {
    weights.tensors.iter().flat_map(|t| &t.data).filter(|v| **v != 0.0).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NamedTensor;

    fn set() -> TensorSet {
        TensorSet::new(vec![
            NamedTensor {
                name: "big".into(),
                shape: vec![4, 2],
                data: vec![8.0, -1.0, 3.0, -7.0, 2.0, 6.0, -5.0, 4.0],
            },
            NamedTensor { name: "bias".into(), shape: vec![2], data: vec![0.1, -0.2] },
            NamedTensor { name: "small".into(), shape: vec![1, 2], data: vec![0.5, -0.25] },
        ])
    }

    #[test]
    fn per_tensor_pruning_zeroes_the_smallest_of_each_matrix_and_keeps_vectors() {
        let mut w = set();
        assert_eq!(prune_weights(&mut w, 0.5, PruneScope::Tensor, &[]), 5);
        assert_eq!(w.tensors[1].data, vec![8.0, 0.0, 0.0, -7.0, 0.0, 6.0, -5.0, 0.0]);
        assert_eq!(w.tensors[0].data, vec![0.1, -0.2]);
        assert_eq!(w.tensors[2].data, vec![0.5, 0.0]);
    }

    #[test]
    fn global_pruning_takes_one_threshold_over_all_matrices() {
        let mut w = set();
        assert_eq!(prune_weights(&mut w, 0.5, PruneScope::Global, &[]), 5);
        assert_eq!(w.tensors[1].data, vec![8.0, 0.0, 0.0, -7.0, 0.0, 6.0, -5.0, 4.0]);
        assert_eq!(w.tensors[2].data, vec![0.0, 0.0]);
        let mut w = set();
        assert_eq!(prune_weights(&mut w, 0.5, PruneScope::Global, &["small"]), 4);
        assert_eq!(w.tensors[1].data, vec![8.0, 0.0, 0.0, -7.0, 0.0, 6.0, -5.0, 0.0]);
        assert_eq!(w.tensors[2].data, vec![0.5, -0.25]);
    }

    #[test]
    fn row_pruning_drops_the_rows_of_smallest_norm() {
        let mut w = set();
        assert_eq!(prune_rows(&mut w, "big", 0.5), Some(2));
        // Row norms²: 65, 58, 40, 41.
        assert_eq!(w.tensors[1].data, vec![8.0, -1.0, 3.0, -7.0, 0.0, 0.0, 0.0, 0.0]);
        assert_eq!(prune_rows(&mut w, "bias", 0.5), None);
        assert_eq!(count_nonzero(&w), 4 + 2 + 2);
    }

    #[test]
    fn unchanged_rows_are_those_equal_to_the_initial_model() {
        let initial = set();
        let mut w = set();
        // Rows 1 and 3 of "big" were trained; rows 0 and 2 were never touched.
        w.tensors[1].data[2] = 3.5;
        w.tensors[1].data[7] = 4.0 + f32::EPSILON * 4.0;
        assert_eq!(prune_unchanged_rows(&mut w, &initial, "big"), Ok(2));
        assert_eq!(w.tensors[1].data, vec![0.0, 0.0, 3.5, -7.0, 0.0, 0.0, -5.0, 4.0 + f32::EPSILON * 4.0]);
        assert_eq!(prune_unchanged_rows(&mut w, &initial, "big"), Ok(0), "zero rows are not counted twice");
        assert!(prune_unchanged_rows(&mut w, &initial, "missing").unwrap_err().contains("no matrix missing"));
        let mut other = set();
        other.tensors[1].shape = vec![2, 4];
        assert!(prune_unchanged_rows(&mut w, &other, "big").unwrap_err().contains("[2, 4]"));
    }
}
