//! Types, codecs, file and TLS helpers shared by the coordinator (`fl-coordinator`) and the
//! client daemon (`fl-client`).

pub mod files;
pub mod model_spec;
pub mod tensors;
pub mod tls;
pub mod token;

pub use model_spec::{ModelKind, ModelSpec};
pub use tensors::{NamedTensor, TensorSet};
