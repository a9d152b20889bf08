//! Stored images: resolving a user's reference to a manifest, choosing the
//! host's platform from an image index, and reading the config.

use super::layout::oci_digest;
use super::{RefEntry, Store, StoreError};
use crate::digest::Digest;
use crate::platform::Platform;
use crate::reference::Reference;
use oci_spec::image::{ImageConfiguration, ImageIndex, ImageManifest};

/// A stored image: manifest, config and layer descriptors.
#[derive(Debug, Clone)]
pub struct Image {
    /// The normalised reference it was resolved from, if it was a name.
    pub reference: Option<String>,
    /// Digest of the manifest.
    pub manifest_digest: Digest,
    /// Media type of the manifest (OCI or Docker schema2).
    pub manifest_media_type: String,
    /// Size of the manifest.
    pub manifest_size: u64,
    /// Digest of the config = the image id.
    pub config_digest: Digest,
    /// Parsed config.
    pub config: ImageConfiguration,
    /// The config exactly as stored, for `inspect`.
    pub raw_config: serde_json::Value,
    /// Layer blobs, bottom first.
    pub layers: Vec<LayerDesc>,
}

/// One layer blob of an image.
#[derive(Debug, Clone)]
pub struct LayerDesc {
    /// Blob digest.
    pub digest: Digest,
    /// Media type as written in the manifest.
    pub media_type: String,
    /// Compressed size.
    pub size: u64,
}

fn invalid(what: impl Into<String>, e: impl std::fmt::Display) -> StoreError {
    StoreError::Invalid { what: what.into(), reason: e.to_string() }
}

fn is_index(media_type: &str, json: &serde_json::Value) -> bool {
    media_type.contains("index")
        || media_type.contains("manifest.list")
        || json.get("manifests").is_some()
}

impl Store {
    /// Resolves a reference: a name (`nginx`, `nginx:1`, full or familiar),
    /// `name@sha256:…`, an image id (`sha256:…`) or a unique id prefix.
    pub fn resolve(&self, reference: &str) -> Result<Image, StoreError> {
        let refs = self.refs()?;
        let parsed = reference.parse::<Reference>();
        if let Ok(parsed) = &parsed {
            if let Some(digest) = &parsed.digest {
                let entry = refs.iter().find(|r| &r.manifest == digest);
                let media_type = entry.map(|e| e.media_type.clone()).unwrap_or_default();
                return self.image_from_manifest(digest, &media_type, Some(parsed.to_string()));
            }
            let name = parsed.to_string();
            if let Some(entry) = refs.iter().find(|r| r.name.as_deref() == Some(&name)) {
                return self.image_from_entry(entry);
            }
        }
        let id = reference.strip_prefix("sha256:").unwrap_or(reference);
        if !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
            let mut found: Option<Image> = None;
            for entry in &refs {
                let image = self.image_from_entry(entry)?;
                if image.config_digest.hex().starts_with(id) {
                    if found.as_ref().is_some_and(|f| f.config_digest != image.config_digest) {
                        return Err(StoreError::Ambiguous(reference.to_string()));
                    }
                    found = Some(Image { reference: None, ..image });
                }
            }
            if let Some(image) = found {
                return Ok(image);
            }
        }
        match parsed {
            Err(e) => Err(e.into()),
            Ok(_) => Err(StoreError::NotFound(reference.to_string())),
        }
    }

    /// Every stored image, one per `index.json` entry.
    pub fn images(&self) -> Result<Vec<Image>, StoreError> {
        self.refs()?.iter().map(|e| self.image_from_entry(e)).collect()
    }

    pub(super) fn image_from_entry(&self, entry: &RefEntry) -> Result<Image, StoreError> {
        self.image_from_manifest(&entry.manifest, &entry.media_type, entry.name.clone())
    }

    /// Reads the manifest `digest` (choosing the host platform from an
    /// index) and its config.
    pub fn image_from_manifest(
        &self,
        digest: &Digest,
        media_type: &str,
        reference: Option<String>,
    ) -> Result<Image, StoreError> {
        let data = self.read_blob(digest, "manifest")?;
        let json: serde_json::Value =
            serde_json::from_slice(&data).map_err(|e| invalid(format!("manifest {digest}"), e))?;
        if is_index(media_type, &json) {
            let index: ImageIndex =
                serde_json::from_value(json).map_err(|e| invalid(format!("index {digest}"), e))?;
            let chosen = Platform::host().choose(&index).ok_or_else(|| {
                invalid(format!("index {digest}"), "no manifest for this platform")
            })?;
            let child = oci_digest(chosen)?;
            return self.image_from_manifest(&child, chosen.media_type().as_ref(), reference);
        }
        let manifest: ImageManifest =
            serde_json::from_value(json).map_err(|e| invalid(format!("manifest {digest}"), e))?;
        let config_digest = oci_digest(manifest.config())?;
        let config_data =
            self.read_blob(&config_digest, &format!("config of manifest {digest}"))?;
        let raw_config: serde_json::Value = serde_json::from_slice(&config_data)
            .map_err(|e| invalid(format!("config {config_digest}"), e))?;
        let config: ImageConfiguration = serde_json::from_slice(&config_data)
            .map_err(|e| invalid(format!("config {config_digest}"), e))?;
        let layers = manifest
            .layers()
            .iter()
            .map(|d| {
                Ok(LayerDesc {
                    digest: oci_digest(d)?,
                    media_type: d.media_type().to_string(),
                    size: d.size(),
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let manifest_media_type = manifest
            .media_type()
            .as_ref()
            .map(|m| m.to_string())
            .unwrap_or_else(|| media_type.to_string());
        Ok(Image {
            reference,
            manifest_digest: digest.clone(),
            manifest_media_type,
            manifest_size: data.len() as u64,
            config_digest,
            config,
            raw_config,
            layers,
        })
    }

    /// Fails unless every blob `image` needs is present.
    pub fn check_complete(&self, image: &Image) -> Result<(), StoreError> {
        for layer in &image.layers {
            if !self.blob_path(&layer.digest).exists() {
                return Err(StoreError::MissingBlob {
                    digest: layer.digest.clone(),
                    what: format!("layer of image {}", image.config_digest.short()),
                });
            }
        }
        Ok(())
    }
}
