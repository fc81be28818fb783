//! The client side of the federation: local data, the tokenizer, the tch models, local training,
//! enrollment, the daemon that serves rounds, and prediction.

pub mod daemon;
pub mod data;
pub mod datagen;
pub mod enroll;
pub mod identity;
pub mod model;
pub mod predict;
pub mod tokenizer;
pub mod train;
