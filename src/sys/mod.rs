//! The one home of `unsafe`, libc/rustix and raw syscalls. Everything here
//! offers a small safe API; every `unsafe` block has a `SAFETY:` comment.
#![allow(unsafe_code)]

pub mod fuse_takeover;
pub mod inflate;
pub mod malloc;
pub mod upper;
