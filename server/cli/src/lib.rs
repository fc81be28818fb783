//! The libtorch side of the coordinator, shared by the `fl-coordinator` binary and `fl-sim`:
//! `fl-model` behind `fl_server::ModelBackend`.

pub mod backend;
