//! The ML library of the federation, on libtorch (tch): the hashed n-gram tokenizer, labelled CSV
//! data, the classifiers (fastText, BiLSTM, Transformer, and the pretrained MiniLM with LoRA), local and central training,
//! evaluation, explanations (per text, rules, embeddings, an HTML report), prediction and
//! synthetic data generation.
//!
//! The client daemon trains with it each round; the `fl-coordinator` binary evaluates with it.
//! The coordinator library (`fl-server`) does not depend on it.

pub mod central;
pub mod data;
pub mod datagen;
pub mod edge;
pub mod embed;
pub mod evaluate;
pub mod explain;
pub mod model;
pub mod partition;
pub mod personal;
pub mod predict;
pub mod pretrained;
pub mod report;
pub mod rules;
pub mod tokenizer;
pub mod train;
