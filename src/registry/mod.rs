//! An OCI Distribution client that behaves like Docker, Podman and skopeo:
//! anonymous and authenticated bearer tokens (refreshed when they expire),
//! basic auth, credentials from Docker's config file and credential helpers,
//! manifests and indexes verified by digest, blobs streamed with resume
//! from the last byte received, range reads, uploads with cross-repository
//! mounts, retries with backoff on flaky connections, and mirrors.
//!
//! It is synchronous (reqwest's blocking client on a background runtime):
//! pulls run a few blob streams on threads, and lazy mounts call it from
//! their worker threads, so no caller needs an async runtime.
//!
//! | file | owns |
//! | --- | --- |
//! | `hosts` | which endpoints (mirrors, upstream) serve a registry, HTTP vs HTTPS |
//! | `credentials` | Docker's config file and `docker-credential-*` helpers |
//! | `auth` | `WWW-Authenticate` challenges, token requests, the token cache |
//! | `transport` | one request with retries, backoff, `Retry-After` |
//! | `client` | [`Client`] and [`Repository`]: authenticated requests, manifests |
//! | `blob` | [`BlobStream`] (resuming download) and range reads |
//! | `upload` | blob uploads (monolithic, chunked, cross-repo mount, from memory) and manifest puts |
//! | `referrers` | the OCI 1.1 Referrers API listing (`None` where the registry lacks it) |

mod auth;
mod blob;
mod client;
mod credentials;
mod hosts;
mod referrers;
mod transport;
mod upload;

pub use blob::BlobStream;
pub use client::{Action, Client, ClientOptions, Manifest, Repository};
pub use credentials::{AuthFile, Credential, CredentialError};
pub use hosts::{is_loopback, Capability, Endpoint, Hosts};
pub use transport::RetryPolicy;
pub use upload::{BlobPush, BlobPushed};

use crate::digest::Digest;

/// Media types a manifest request accepts, most preferred first.
pub const MANIFEST_MEDIA_TYPES: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

/// Errors talking to a registry. Each says what failed and what to do.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The connection failed, even after retries.
    #[error("cannot reach {url}: {reason} (is the registry up? for a plain-HTTP registry use --insecure-registry)")]
    Unreachable {
        /// The request.
        url: String,
        /// The last error.
        reason: String,
    },
    /// Authentication is needed or the credentials were refused.
    #[error("unauthorized: {detail}: run `rmount login {registry}`")]
    Unauthorized {
        /// Registry host.
        registry: String,
        /// What the registry said, and which credentials were used.
        detail: String,
    },
    /// A manifest, tag, blob or repository does not exist.
    #[error("{what} not found in {repository}: {message}")]
    NotFound {
        /// What was looked up.
        what: String,
        /// `registry/repository`.
        repository: String,
        /// The registry's message.
        message: String,
    },
    /// Any other unexpected status.
    #[error("{url}: the registry answered {status}: {message}")]
    Status {
        /// The request.
        url: String,
        /// HTTP status.
        status: u16,
        /// The registry's message.
        message: String,
    },
    /// Content does not hash to the digest that names it.
    #[error("{what}: digest mismatch: expected {expected}, the content has {actual}; the registry or the network corrupted it")]
    DigestMismatch {
        /// What was fetched.
        what: String,
        /// The digest it was asked for by (or announced with).
        expected: String,
        /// What the bytes hash to.
        actual: Digest,
    },
    /// A response that breaks the protocol (bad JSON, bad `Content-Range`…).
    #[error("{what}: {reason}")]
    Invalid {
        /// Which response.
        what: String,
        /// Why.
        reason: String,
    },
    /// The hosts configuration is malformed.
    #[error("registry configuration for {registry}: {reason}")]
    Config {
        /// Registry the file is for.
        registry: String,
        /// What is wrong.
        reason: String,
    },
    /// No manifest for the wanted platform.
    #[error(
        "{reference} has no image for {wanted} (it has: {available}); choose one with --platform"
    )]
    NoPlatform {
        /// The image.
        reference: String,
        /// The platform asked for.
        wanted: String,
        /// The platforms the index lists.
        available: String,
    },
    /// Reading the credentials failed.
    #[error(transparent)]
    Credentials(#[from] CredentialError),
}

/// The message inside a registry error body
/// (`{"errors":[{"code":"…","message":"…"}]}`), or the body itself.
fn error_message(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<ErrorItem>,
    }
    #[derive(serde::Deserialize)]
    struct ErrorItem {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    match serde_json::from_slice::<Errors>(body) {
        Ok(e) if !e.errors.is_empty() => e
            .errors
            .iter()
            .map(|i| format!("{} ({})", i.message, i.code))
            .collect::<Vec<_>>()
            .join("; "),
        _ => {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            if text.is_empty() {
                "no details".into()
            } else {
                text.chars().take(200).collect()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_messages_come_from_the_json_body_or_the_text() {
        let body = br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#;
        assert_eq!(error_message(body), "manifest unknown (MANIFEST_UNKNOWN)");
        assert_eq!(error_message(b"  oops \n"), "oops");
        assert_eq!(error_message(b""), "no details");
        assert_eq!(error_message(br#"{"errors":[]}"#), r#"{"errors":[]}"#);
    }
}
