//! Types, codecs, file and TLS helpers shared by the coordinator (`fl-server`, `fl-coordinator`),
//! the client daemon (`fl-client`) and the ML library (`fl-model`). Nothing here needs libtorch.

pub mod attack;
pub mod cli;
pub mod codec;
pub mod compact;
pub mod files;
pub mod model_file;
pub mod model_spec;
pub mod prune;
pub mod secagg;
pub mod tensors;
pub mod tls;
pub mod token;

pub use model_file::{decode_model, encode_model, ModelFileError};
pub use model_spec::{
    ModelKind, ModelSpec, PretrainedArgs, SpecError, SpecOverrides, LORA_TARGETS, MINILM_BASE_SHA256,
};
pub use tensors::{NamedTensor, TensorSet};
