//! The client side of the federation: local data, the tokenizer, the tch models, local training,
//! enrollment, the daemon that serves rounds, prediction and its explanations, and central
//! training on one machine.

pub mod central;
pub mod daemon;
pub mod data;
pub mod datagen;
pub mod enroll;
pub mod explain;
pub mod identity;
pub mod model;
pub mod predict;
pub mod tokenizer;
pub mod train;
