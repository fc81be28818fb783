//! Named f32 tensors and their encoding on the wire and on disk (safetensors).
//!
//! Aggregation works on these plain buffers; it never needs libtorch.

use std::collections::HashMap;

use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use sha2::{Digest, Sha256};

/// Codec name of a dense little-endian f32 safetensors payload, with metadata.
pub const CODEC_SAFETENSORS_F32: &str = "safetensors-f32";

/// Metadata key that holds the JSON [`crate::ModelSpec`] in a model file.
pub const META_SPEC: &str = "fl.spec";

/// One named tensor of f32 values.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedTensor {
    /// Parameter name, e.g. `embedding.weight`.
    pub name: String,
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Values in row-major order; `data.len()` is the product of `shape`.
    pub data: Vec<f32>,
}

/// A set of named tensors in name order: a model's weights or a weight delta.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TensorSet {
    /// Tensors sorted by name.
    pub tensors: Vec<NamedTensor>,
}

/// Why a payload could not be decoded or does not fit.
#[derive(Debug, thiserror::Error)]
pub enum TensorError {
    /// The bytes are not a valid safetensors payload.
    #[error("malformed tensor payload: {0}")]
    Malformed(String),
    /// A tensor has another dtype than f32.
    #[error("tensor '{name}' has dtype {dtype}, expected F32")]
    Dtype { name: String, dtype: String },
    /// The payload does not have the tensors of the model.
    #[error("tensor names differ from the model: expected {expected:?}, got {got:?}")]
    Names { expected: Vec<String>, got: Vec<String> },
    /// A tensor has the wrong shape.
    #[error("tensor '{name}' has shape {got:?}, expected {expected:?}")]
    Shape { name: String, expected: Vec<usize>, got: Vec<usize> },
    /// A value is NaN or infinite.
    #[error("tensor '{name}' holds a non-finite value at index {index}")]
    NonFinite { name: String, index: usize },
}

/// Index of the first NaN or infinite value. Scans in blocks whose test the compiler
/// vectorizes, and only looks value by value inside the block that fails.
pub fn first_non_finite(data: &[f32]) -> Option<usize> {
    const BLOCK: usize = 1024;
    data.chunks(BLOCK).enumerate().find_map(|(b, block)| {
        // An exponent of all ones is NaN or infinity; `&` (not `&&`) keeps the loop branch-free.
        let finite = block.iter().fold(true, |ok, v| ok & (v.to_bits() & 0x7f80_0000 != 0x7f80_0000));
        (!finite).then(|| b * BLOCK + block.iter().position(|v| !v.is_finite()).unwrap_or(0))
    })
}

impl TensorSet {
    /// Builds a set, sorting tensors by name.
    pub fn new(mut tensors: Vec<NamedTensor>) -> Self {
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        TensorSet { tensors }
    }

    /// Total number of values.
    pub fn num_values(&self) -> usize {
        self.tensors.iter().map(|t| t.data.len()).sum()
    }

    /// A set of the same names and shapes, filled with zeros.
    pub fn zeros_like(&self) -> TensorSet {
        TensorSet {
            tensors: self
                .tensors
                .iter()
                .map(|t| NamedTensor { name: t.name.clone(), shape: t.shape.clone(), data: vec![0.0; t.data.len()] })
                .collect(),
        }
    }

    /// Checks that `self` has exactly the names and shapes of `reference` and only finite values.
    pub fn check_matches(&self, reference: &TensorSet) -> Result<(), TensorError> {
        let names = |s: &TensorSet| s.tensors.iter().map(|t| t.name.clone()).collect::<Vec<_>>();
        if names(self) != names(reference) {
            return Err(TensorError::Names { expected: names(reference), got: names(self) });
        }
        for (t, r) in self.tensors.iter().zip(&reference.tensors) {
            if t.shape != r.shape {
                return Err(TensorError::Shape {
                    name: t.name.clone(),
                    expected: r.shape.clone(),
                    got: t.shape.clone(),
                });
            }
            if let Some(index) = first_non_finite(&t.data) {
                return Err(TensorError::NonFinite { name: t.name.clone(), index });
            }
        }
        Ok(())
    }

    /// Whether `self` has exactly the names and shapes of `other` (values are not looked at).
    pub fn same_layout(&self, other: &TensorSet) -> bool {
        self.tensors.len() == other.tensors.len()
            && self.tensors.iter().zip(&other.tensors).all(|(a, b)| a.name == b.name && a.shape == b.shape)
    }

    /// Euclidean norm over all values.
    pub fn l2_norm(&self) -> f64 {
        self.tensors.iter().flat_map(|t| t.data.iter()).map(|&v| f64::from(v) * f64::from(v)).sum::<f64>().sqrt()
    }

    /// Scales the set in place so that its L2 norm is at most `max_norm`; returns the norm it had.
    /// Differential privacy clips each client's update this way, on the client or the coordinator.
    pub fn clip_l2_norm(&mut self, max_norm: f64) -> f64 {
        let norm = self.l2_norm();
        if norm > max_norm {
            let factor = max_norm / norm;
            for v in self.tensors.iter_mut().flat_map(|t| t.data.iter_mut()) {
                *v = (f64::from(*v) * factor) as f32;
            }
        }
        norm
    }

    /// `self - other`, element-wise; names and shapes must match (checked by the caller).
    pub fn minus(&self, other: &TensorSet) -> TensorSet {
        TensorSet {
            tensors: self
                .tensors
                .iter()
                .zip(&other.tensors)
                .map(|(a, b)| NamedTensor {
                    name: a.name.clone(),
                    shape: a.shape.clone(),
                    data: a.data.iter().zip(&b.data).map(|(x, y)| x - y).collect(),
                })
                .collect(),
        }
    }

    /// `self += scale * other`, element-wise; names and shapes must match (checked by the caller).
    pub fn add_scaled(&mut self, other: &TensorSet, scale: f32) {
        use rayon::prelude::*;
        // In chunks on the rayon pool: a large model's on every core, and the same bits.
        const CHUNK: usize = 1 << 16;
        for (a, b) in self.tensors.iter_mut().zip(&other.tensors) {
            a.data.par_chunks_mut(CHUNK).zip(b.data.par_chunks(CHUNK)).for_each(|(xs, ys)| {
                for (x, y) in xs.iter_mut().zip(ys) {
                    *x += scale * y;
                }
            });
        }
    }

    /// Writes the set as safetensors with the given metadata to `path`, straight from the
    /// tensors' buffers (no copy of the whole set in memory, unlike [`TensorSet::encode`]).
    pub fn write_file(&self, path: &std::path::Path, metadata: Option<HashMap<String, String>>) -> std::io::Result<()> {
        safetensors::serialize_to_file(self.views(), metadata, path).map_err(|e| match e {
            safetensors::SafeTensorError::IoError(e) => e,
            other => std::io::Error::other(other.to_string()),
        })
    }

    /// Encodes as safetensors with the given metadata.
    pub fn encode(&self, metadata: Option<HashMap<String, String>>) -> Vec<u8> {
        safetensors::serialize(self.views(), metadata).expect("serializing f32 tensors cannot fail")
    }

    /// Each tensor as a safetensors view of its own buffer, for [`TensorSet::encode`] and
    /// [`TensorSet::write_file`].
    fn views(&self) -> impl Iterator<Item = (&str, TensorView<'_>)> {
        self.tensors.iter().map(|t| {
            let bytes: &[u8] = bytemuck::cast_slice(&t.data);
            let view = TensorView::new(Dtype::F32, t.shape.clone(), bytes).expect("shape matches data length");
            (t.name.as_str(), view)
        })
    }

    /// Decodes a safetensors payload of f32 tensors, returning the tensors and the metadata.
    pub fn decode(bytes: &[u8]) -> Result<(TensorSet, HashMap<String, String>), TensorError> {
        let parsed = SafeTensors::deserialize(bytes).map_err(|e| TensorError::Malformed(e.to_string()))?;
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| TensorError::Malformed(e.to_string()))?;
        let metadata = header.metadata().clone().unwrap_or_default();
        let mut tensors = Vec::with_capacity(parsed.len());
        for (name, view) in parsed.iter() {
            if view.dtype() != Dtype::F32 {
                return Err(TensorError::Dtype { name: name.to_string(), dtype: format!("{:?}", view.dtype()) });
            }
            let data = view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            tensors.push(NamedTensor { name: name.to_string(), shape: view.shape().to_vec(), data });
        }
        Ok((TensorSet::new(tensors), metadata))
    }
}

/// Hex SHA-256 of a byte string.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn set(values: Vec<f32>) -> TensorSet {
        let n = values.len();
        TensorSet::new(vec![
            NamedTensor { name: "w".into(), shape: vec![n], data: values },
            NamedTensor { name: "b".into(), shape: vec![1, 2], data: vec![1.5, -2.0] },
        ])
    }

    proptest! {
        #[test]
        fn decode_of_encode_is_identity(values in proptest::collection::vec(-1e6f32..1e6, 0..200)) {
            let original = set(values);
            let mut meta = HashMap::new();
            meta.insert("k".to_string(), "v".to_string());
            let (decoded, got_meta) = TensorSet::decode(&original.encode(Some(meta.clone()))).unwrap();
            prop_assert_eq!(decoded, original);
            prop_assert_eq!(got_meta, meta);
        }

        #[test]
        fn decoder_never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = TensorSet::decode(&bytes);
        }
    }

    #[test]
    fn check_matches_reports_shape_name_and_nan() {
        let reference = set(vec![0.0; 3]);
        assert!(set(vec![1.0; 3]).check_matches(&reference).is_ok());
        assert!(matches!(set(vec![1.0; 4]).check_matches(&reference), Err(TensorError::Shape { .. })));
        assert!(matches!(
            set(vec![1.0, f32::NAN, 0.0]).check_matches(&reference),
            Err(TensorError::NonFinite { index: 1, .. })
        ));
        let renamed = TensorSet::new(vec![NamedTensor { name: "x".into(), shape: vec![1], data: vec![0.0] }]);
        assert!(matches!(renamed.check_matches(&reference), Err(TensorError::Names { .. })));
    }

    #[test]
    fn clipping_scales_down_to_the_norm_and_keeps_small_sets() {
        let mut big = TensorSet::new(vec![NamedTensor { name: "w".into(), shape: vec![2], data: vec![3.0, 4.0] }]);
        assert_eq!(big.clip_l2_norm(1.0), 5.0);
        assert!((big.l2_norm() - 1.0).abs() < 1e-6);
        assert!((big.tensors[0].data[0] - 0.6).abs() < 1e-6, "the direction is kept");
        let mut small = TensorSet::new(vec![NamedTensor { name: "w".into(), shape: vec![2], data: vec![0.3, 0.4] }]);
        small.clip_l2_norm(1.0);
        assert_eq!(small.tensors[0].data, vec![0.3, 0.4]);
    }
}
