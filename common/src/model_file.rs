//! The model file: the weights as safetensors (f32) with the [`ModelSpec`] as JSON in the metadata
//! under [`META_SPEC`]. The coordinator writes it after every round, clients download it, and
//! `fl-client train` saves to it. Reading and writing it needs no libtorch.

use std::collections::HashMap;

use crate::tensors::{TensorError, META_SPEC};
use crate::{ModelSpec, TensorSet};

/// Why bytes are not a model file.
#[derive(Debug, thiserror::Error)]
pub enum ModelFileError {
    /// Not a safetensors payload of f32 tensors.
    #[error(transparent)]
    Tensors(#[from] TensorError),
    /// The metadata holds no spec.
    #[error("no model spec in the metadata")]
    NoSpec,
    /// The spec is not valid JSON for a [`ModelSpec`].
    #[error("bad model spec: {0}")]
    BadSpec(#[from] serde_json::Error),
}

/// Encodes weights and spec as a model file.
pub fn encode_model(spec: &ModelSpec, weights: &TensorSet) -> Vec<u8> {
    encode_model_with(spec, weights, HashMap::new())
}

/// Encodes weights and spec as a model file, with more metadata beside the spec (a merged
/// minilm's tokenizer and encoder config).
pub fn encode_model_with(spec: &ModelSpec, weights: &TensorSet, metadata: HashMap<String, String>) -> Vec<u8> {
    weights.encode(Some(with_spec(spec, metadata)))
}

/// Writes the model file of [`encode_model`] to `path`, straight from the weights' buffers.
pub fn write_model_file(path: &std::path::Path, spec: &ModelSpec, weights: &TensorSet) -> std::io::Result<()> {
    weights.write_file(path, Some(with_spec(spec, HashMap::new())))
}

/// A model file's metadata: `metadata` and the spec under [`META_SPEC`].
fn with_spec(spec: &ModelSpec, mut metadata: HashMap<String, String>) -> HashMap<String, String> {
    metadata.insert(META_SPEC.to_string(), serde_json::to_string(spec).expect("spec serializes"));
    metadata
}

/// Decodes a model file into spec and weights.
pub fn decode_model(bytes: &[u8]) -> Result<(ModelSpec, TensorSet), ModelFileError> {
    decode_model_with(bytes).map(|(spec, weights, _)| (spec, weights))
}

/// Decodes a model file into spec, weights and the whole metadata.
pub fn decode_model_with(bytes: &[u8]) -> Result<(ModelSpec, TensorSet, HashMap<String, String>), ModelFileError> {
    let (weights, meta) = TensorSet::decode(bytes)?;
    let spec_json = meta.get(META_SPEC).ok_or(ModelFileError::NoSpec)?;
    let spec: ModelSpec = serde_json::from_str(spec_json)?;
    Ok((spec, weights, meta))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ModelKind, NamedTensor};

    #[test]
    fn round_trip_and_refusals() {
        let spec = ModelSpec::with_defaults(ModelKind::Fasttext, vec!["a".into(), "b".into()]);
        let weights = TensorSet::new(vec![NamedTensor { name: "w".into(), shape: vec![2], data: vec![1.0, -2.0] }]);
        let (got_spec, got) = decode_model(&encode_model(&spec, &weights)).unwrap();
        assert_eq!((got_spec, got), (spec, weights.clone()));
        assert!(matches!(decode_model(&weights.encode(None)), Err(ModelFileError::NoSpec)));
        assert!(matches!(decode_model(b"garbage"), Err(ModelFileError::Tensors(_))));
    }
}
