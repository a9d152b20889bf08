//! The OCI 1.1 Referrers API: `GET /v2/NAME/referrers/DIGEST` lists the
//! manifests whose `subject` is `DIGEST`, as an image index the registry
//! assembles. That index is not content-addressed, so nothing verifies it
//! but its size; callers verify every manifest it names by that manifest's
//! digest. Registries without the API (distribution 2.8, the Debian
//! `docker-registry`) answer `404`, which is `Ok(None)` here: the caller
//! then uses the tag fallback (`sha256-<hex>`), an ordinary manifest tag.
//! Results are not paginated (`Link`) here: a filtered listing is short.

use super::client::check;
use super::hosts::Capability;
use super::{RegistryError, Repository};
use crate::digest::Digest;
use reqwest::header::ACCEPT;
use reqwest::StatusCode;
use std::io::Read;

/// A referrers listing larger than this is refused (as manifests are).
const MAX_LISTING_SIZE: u64 = 4 << 20;

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

impl Repository {
    /// The referrers of the manifest `subject` as the registry lists them
    /// (an OCI image index), filtered to `artifact_type` when given (the
    /// registry may ignore the filter, so callers filter again); `None`
    /// when the registry has no Referrers API (`404`).
    pub fn referrers(
        &self,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Option<Vec<u8>>, RegistryError> {
        let path = match artifact_type {
            // Media types are safe in a query but for `+` (a space there).
            Some(t) => format!("referrers/{subject}?artifactType={}", t.replace('+', "%2B")),
            None => format!("referrers/{subject}"),
        };
        // A listing changes as artifacts are pushed: ask the hosts that
        // resolve tags, not mirrors that only serve content.
        self.on_endpoints(Capability::Resolve, |endpoint| {
            let url = self.url(endpoint, &path);
            let response =
                self.send(endpoint, None, &url, &|http| http.get(&url).header(ACCEPT, OCI_INDEX))?;
            if response.status() == StatusCode::NOT_FOUND {
                return Ok(None);
            }
            let mut bytes = Vec::new();
            check(response, &url)?.take(MAX_LISTING_SIZE + 1).read_to_end(&mut bytes).map_err(
                |e| RegistryError::Unreachable { url: url.clone(), reason: e.to_string() },
            )?;
            if bytes.len() as u64 > MAX_LISTING_SIZE {
                return Err(RegistryError::Invalid {
                    what: url,
                    reason: format!("referrers listing larger than {MAX_LISTING_SIZE} bytes"),
                });
            }
            Ok(Some(bytes))
        })
    }
}
