//! The client side of the federation: enrollment, the client's identity, and the daemon that
//! trains the `fl-model` classifier on private data each round and sends back only a delta.

/// Poisoned updates; they live in fl-common so that `fl-sim` attacks the same way.
pub use fl_common::attack;
pub mod daemon;
pub mod distill;
pub mod enroll;
pub mod held;
pub mod identity;
pub mod personal;
pub mod secagg;
