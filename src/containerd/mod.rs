//! Talking to containerd: its gRPC API ([`api`]).

pub mod api;
