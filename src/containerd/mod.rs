//! Talking to containerd: its gRPC API ([`api`]), a synchronous client of
//! it ([`client`]), and `rmount containerd pull` ([`pull`]), which has
//! containerd hold an image whose layers rmount's snapshotter serves lazily.
//!
//! | file | owns |
//! | --- | --- |
//! | `api` | the generated gRPC code (content, images, leases, diff, snapshots) |
//! | `client` | [`client::ContainerdClient`]: connect over the Unix socket, namespace and lease headers, typed errors |
//! | `pull` | the client side of a lazy pull: content with GC labels, remote-snapshot `Prepare`s, the fallback unpack, the image |

pub mod api;
pub mod client;
pub mod pull;

pub use client::{ContainerdClient, ContainerdError, Prepared};
pub use pull::{pull, LayerOutcome, PullError, PullOptions, Pulled, PulledLayer};
