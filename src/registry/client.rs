//! [`Client`] (shared connection pool, auth state, hosts) and
//! [`Repository`] (one repository on one registry, reached through its
//! endpoints): authenticated requests and manifests verified by digest.

use super::auth::{Auth, Scope};
use super::credentials::{AuthFile, Credential};
use super::hosts::{Capability, Endpoint, Hosts};
use super::transport::{RetryPolicy, Transport};
use super::{error_message, RegistryError, MANIFEST_MEDIA_TYPES};
use crate::digest::Digest;
use crate::reference::Reference;
use reqwest::blocking::{Client as Http, RequestBuilder, Response};
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use reqwest::StatusCode;
use std::io::Read;
use std::sync::Arc;

/// Manifests and indexes larger than this are refused (containerd's limit):
/// they are read into memory whole.
const MAX_MANIFEST_SIZE: u64 = 4 << 20;

/// Attempts per request on a mirror before falling back to the next host.
const MIRROR_ATTEMPTS: u32 = 2;

/// How a [`Client`] is set up.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Mirrors and plain-HTTP registries.
    pub hosts: Hosts,
    /// Where credentials come from.
    pub auth_file: AuthFile,
    /// Retries of failed requests and broken downloads.
    pub retry: RetryPolicy,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            hosts: Hosts::new(Some(Hosts::default_dir()), Vec::new()),
            auth_file: AuthFile::discover(),
            retry: RetryPolicy::default(),
        }
    }
}

/// A registry client; cheap to clone and safe to share between threads.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    transport: Transport,
    auth: Auth,
    hosts: Hosts,
}

/// What a [`Repository`] handle will be used for (the token scope).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Read manifests and blobs.
    Pull,
    /// Read and write.
    Push,
}

/// A manifest or index as the registry served it, verified.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// The digest of `bytes`.
    pub digest: Digest,
    /// Its media type (from `Content-Type`, else its `mediaType` field).
    pub media_type: String,
    /// The exact bytes (the digest covers them).
    pub bytes: Vec<u8>,
}

impl Manifest {
    /// An OCI image index or Docker manifest list?
    pub fn is_index(&self) -> bool {
        self.media_type.contains("index") || self.media_type.contains("manifest.list")
    }
}

impl Client {
    /// A client with `options`.
    pub fn new(options: ClientOptions) -> Result<Self, RegistryError> {
        Ok(Self {
            inner: Arc::new(Inner {
                transport: Transport::new(options.retry)?,
                auth: Auth::new(options.auth_file),
                hosts: options.hosts,
            }),
        })
    }

    /// A handle on `reference`'s repository.
    pub fn repository(
        &self,
        reference: &Reference,
        action: Action,
    ) -> Result<Repository, RegistryError> {
        Ok(Repository {
            client: self.clone(),
            registry: reference.registry.clone(),
            name: reference.repository.clone(),
            endpoints: self.inner.hosts.endpoints(&reference.registry)?,
            scope: Scope::repository(&reference.repository, action == Action::Push),
        })
    }

    /// Checks `credential` against `registry` (`GET /v2/`, with a token
    /// request when the registry uses tokens), as `docker login` does.
    pub fn login(&self, registry: &str, credential: &Credential) -> Result<(), RegistryError> {
        let auth = &self.inner.auth;
        auth.set_credential(registry, Some(credential.clone()));
        let endpoints = self.inner.hosts.endpoints(registry)?;
        let Some(upstream) = endpoints.iter().find(|e| !e.mirror) else {
            unreachable!("Hosts::endpoints always ends with the upstream")
        };
        let url = format!("{}/v2/", upstream.base);
        let response = self.send(upstream, &Scope::none(), &url, &|http| http.get(&url))?;
        check(response, &url).map(drop)
    }

    /// Sends a request to `endpoint` with the best credentials we have for
    /// `scope`; a `401` is answered once (new challenge, fresh token).
    fn send(
        &self,
        endpoint: &Endpoint,
        scope: &Scope,
        url: &str,
        build: &dyn Fn(&Http) -> RequestBuilder,
    ) -> Result<Response, RegistryError> {
        let Inner { transport, auth, .. } = &*self.inner;
        let mut retried = false;
        loop {
            let header = auth.header(transport, &endpoint.host, scope)?;
            // A broken mirror should cost little: the next host is waiting.
            let attempts = if endpoint.mirror { MIRROR_ATTEMPTS } else { transport.retry.attempts };
            let response = transport.execute_with(attempts, url, &|http| match &header {
                Some(h) => build(http).header(AUTHORIZATION, h),
                None => build(http),
            })?;
            if response.status() != StatusCode::UNAUTHORIZED {
                return Ok(response);
            }
            let challenge = response.headers().get(WWW_AUTHENTICATE).and_then(|v| v.to_str().ok());
            if !retried && auth.challenged(&endpoint.host, challenge, scope, header.as_deref()) {
                retried = true;
                continue;
            }
            let body = response.bytes().unwrap_or_default();
            return Err(RegistryError::Unauthorized {
                registry: endpoint.host.clone(),
                detail: format!(
                    "{} ({})",
                    auth.describe_credential(&endpoint.host),
                    error_message(&body)
                ),
            });
        }
    }
}

/// Turns an unexpected status into an error carrying the registry's message.
pub(super) fn check(response: Response, url: &str) -> Result<Response, RegistryError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body = response.bytes().unwrap_or_default();
    Err(RegistryError::Status {
        url: url.to_string(),
        status: status.as_u16(),
        message: error_message(&body),
    })
}

/// One repository on one registry, reached through its endpoints (mirrors
/// first for pulls). Cheap to clone.
#[derive(Clone)]
pub struct Repository {
    client: Client,
    registry: String,
    name: String,
    endpoints: Vec<Endpoint>,
    scope: Scope,
}

impl Repository {
    /// `registry/repository`.
    pub fn full_name(&self) -> String {
        format!("{}/{}", self.registry, self.name)
    }

    /// The repository path, e.g. `library/nginx`.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub(super) fn retry_policy(&self) -> RetryPolicy {
        self.client.inner.transport.retry
    }

    /// `BASE/v2/NAME/PATH`, with `?ns=REGISTRY` on mirrors (containerd's convention).
    pub(super) fn url(&self, endpoint: &Endpoint, path: &str) -> String {
        let url = format!("{}/v2/{}/{path}", endpoint.base, self.name);
        if endpoint.mirror {
            let sep = if url.contains('?') { '&' } else { '?' };
            format!("{url}{sep}ns={}", self.registry)
        } else {
            url
        }
    }

    /// An absolute URL for a `Location` header, which may be relative.
    pub(super) fn absolute(&self, endpoint: &Endpoint, location: &str) -> String {
        if location.starts_with("http://") || location.starts_with("https://") {
            location.to_string()
        } else {
            format!("{}/{}", endpoint.base, location.trim_start_matches('/'))
        }
    }

    /// Sends with this repository's scope (or `scope` when given).
    pub(super) fn send(
        &self,
        endpoint: &Endpoint,
        scope: Option<&Scope>,
        url: &str,
        build: &dyn Fn(&Http) -> RequestBuilder,
    ) -> Result<Response, RegistryError> {
        self.client.send(endpoint, scope.unwrap_or(&self.scope), url, build)
    }

    pub(super) fn scope(&self) -> &Scope {
        &self.scope
    }

    /// Runs `attempt` on each endpoint that can serve `capability`, in
    /// order, until one succeeds; the last error if none does.
    pub(super) fn on_endpoints<T>(
        &self,
        capability: Capability,
        mut attempt: impl FnMut(&Endpoint) -> Result<T, RegistryError>,
    ) -> Result<T, RegistryError> {
        let mut last = None;
        for endpoint in self.endpoints.iter().filter(|e| e.can(capability)) {
            match attempt(endpoint) {
                Ok(value) => return Ok(value),
                Err(e) => {
                    if endpoint.mirror {
                        tracing::warn!(mirror = %endpoint.base, error = %e, "mirror failed; trying the next host");
                    }
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| RegistryError::Config {
            registry: self.registry.clone(),
            reason: format!("no host has the {capability:?} capability"),
        }))
    }

    /// Fetches the manifest or index named by `reference` (a tag or a
    /// digest) and verifies it: against the digest asked for, and against
    /// `Docker-Content-Digest` when the registry sends one.
    pub fn manifest(&self, reference: &str) -> Result<Manifest, RegistryError> {
        let by_digest = reference.parse::<Digest>().ok();
        let capability = if by_digest.is_some() { Capability::Pull } else { Capability::Resolve };
        self.on_endpoints(capability, |endpoint| {
            self.fetch_manifest(endpoint, reference, by_digest.as_ref())
        })
    }

    fn fetch_manifest(
        &self,
        endpoint: &Endpoint,
        reference: &str,
        expected: Option<&Digest>,
    ) -> Result<Manifest, RegistryError> {
        let url = self.url(endpoint, &format!("manifests/{reference}"));
        let accept = MANIFEST_MEDIA_TYPES.join(", ");
        let response =
            self.send(endpoint, None, &url, &|http| http.get(&url).header(ACCEPT, &accept))?;
        if response.status() == StatusCode::NOT_FOUND {
            let body = response.bytes().unwrap_or_default();
            return Err(RegistryError::NotFound {
                what: format!("manifest {reference}"),
                repository: self.full_name(),
                message: error_message(&body),
            });
        }
        let response = check(response, &url)?;
        let header = |name: &str| {
            response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
        };
        let content_type = header(CONTENT_TYPE.as_str());
        let announced = header("docker-content-digest");
        let mut bytes = Vec::new();
        response
            .take(MAX_MANIFEST_SIZE + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| RegistryError::Unreachable { url: url.clone(), reason: e.to_string() })?;
        if bytes.len() as u64 > MAX_MANIFEST_SIZE {
            return Err(RegistryError::Invalid {
                what: format!("manifest {reference}"),
                reason: format!("larger than {MAX_MANIFEST_SIZE} bytes"),
            });
        }
        let digest = Digest::of(&bytes);
        let what = format!("manifest {} of {}", reference, self.full_name());
        for wanted in expected.map(Digest::to_string).into_iter().chain(announced) {
            if wanted != digest.to_string() {
                return Err(RegistryError::DigestMismatch {
                    what,
                    expected: wanted,
                    actual: digest,
                });
            }
        }
        let media_type = match content_type
            .map(|t| t.split(';').next().unwrap_or("").trim().to_string())
        {
            Some(t) if MANIFEST_MEDIA_TYPES.contains(&t.as_str()) => t,
            _ => media_type_of(&bytes).ok_or_else(|| RegistryError::Invalid {
                what: what.clone(),
                reason: "neither Content-Type nor mediaType names a manifest or index type".into(),
            })?,
        };
        Ok(Manifest { digest, media_type, bytes })
    }
}

/// The `mediaType` a manifest declares, or what its shape implies.
fn media_type_of(bytes: &[u8]) -> Option<String> {
    let json: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    if let Some(t) = json.get("mediaType").and_then(|t| t.as_str()) {
        return Some(t.to_string());
    }
    let oci = if json.get("manifests").is_some() { 0 } else { 2 };
    json.get("schemaVersion")?;
    Some(MANIFEST_MEDIA_TYPES[oci].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types_fall_back_to_the_documents_shape() {
        assert_eq!(
            media_type_of(br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json"}"#).as_deref(),
            Some("application/vnd.docker.distribution.manifest.v2+json")
        );
        assert_eq!(
            media_type_of(br#"{"schemaVersion":2,"manifests":[]}"#).as_deref(),
            Some("application/vnd.oci.image.index.v1+json")
        );
        assert_eq!(
            media_type_of(br#"{"schemaVersion":2,"layers":[]}"#).as_deref(),
            Some("application/vnd.oci.image.manifest.v1+json")
        );
        assert_eq!(media_type_of(b"not json"), None);
        assert_eq!(media_type_of(b"{}"), None);
    }
}
