//! rmount mounts OCI/Docker images as a filesystem, reading file data straight
//! from the compressed layer blobs (no extraction step).
//!
//! Modules follow the data flow, each depending only on those above it
//! (plus [`sys`], the one home of `unsafe` and raw syscalls):
//!
//! | module | owns |
//! | --- | --- |
//! | [`digest`] | content digests (`sha256:…`), hashing readers/writers |
//! | [`durable`] | the one helper for durable writes: temp file → fsync → rename |
//! | [`reference`] | parsing and normalising image references like Docker does |
//! | [`platform`] | `os/arch[/variant]` and choosing a manifest from an index |
//! | [`registry`] | the OCI Distribution client: auth, manifests, resuming blob downloads, uploads, mirrors |
//! | [`store`] | the local content-addressed store in OCI image-layout form, archives, GC |
//! | [`snapshotter`] | the core of a containerd snapshotter: snapshot metadata in redb, overlay/bind mount descriptions |
//! | [`layer`] | one pass over a layer blob into a [`layer::LayerIndex`]; random access into gzip/zstd/plain blobs |
//! | [`cache`] | the bounded in-memory LRU of decompressed spans, single-flight |
//! | [`fs`] | the union tree of a layer stack, the writable overlay over an upper dir, the FUSE adapters, mount/umount |
//! | [`transfer`] | `pull` (registry → store, indexing as it streams) and `push` (store → registry) |
//! | [`commit`] | a mount's upper layer as a new layer and image (`commit`), its changes (`diff`), the merged tree as one tar (`export`) |
//! | [`daemon`] | one process serving every mount: keeper and worker, control socket, restarts that break no mount |
//! | [`cli`] | argument parsing and human/JSON output only |
//!
//! See `docs/architecture.md` for the on-disk formats and the reasons behind them.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod cache;
pub mod cli;
pub mod commit;
pub mod containerd;
pub mod daemon;
pub mod digest;
pub mod durable;
pub mod fs;
pub mod layer;
pub mod platform;
pub mod reference;
pub mod registry;
pub mod snapshotter;
pub mod store;
pub mod sys;
pub mod transfer;
