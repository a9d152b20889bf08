//! eStargz layers in a lazy pull: a layer whose descriptor carries the
//! `containerd.io/snapshot/stargz/toc.digest` annotation is indexed from its
//! table of contents — one range read of the 51-byte footer, one of the TOC
//! member — instead of being downloaded in full. The TOC is trusted only if
//! its sha256 equals the annotation, which the verified manifest vouches
//! for; anything else (no footer, a TOC that does not match or does not
//! parse) is logged and the pull goes on with the next source of an index.
//! See `crate::layer`'s eStargz module for what the index looks like.

use super::TransferError;
use crate::digest::Digest;
use crate::layer::{
    index_from_toc, read_footer, read_toc, save_index, LayerError, LayerIndex, ESTARGZ_FOOTER_SIZE,
    TOC_DIGEST_ANNOTATION,
};
use crate::registry::{RegistryError, Repository};
use crate::store::Store;
use oci_spec::image::ImageManifest;
use std::collections::HashMap;

/// Largest compressed TOC member fetched (a layer of a million files has a
/// TOC of a few tens of MiB).
const MAX_TOC_MEMBER: u64 = 256 << 20;

/// What an image says about its eStargz layers: per layer blob, the TOC
/// digest (from the layer descriptor) and the diff_id (from the config).
#[derive(Debug, Default)]
pub(super) struct TocHints {
    by_layer: HashMap<Digest, (Digest, Digest)>,
}

impl TocHints {
    /// The hints of `manifest`, whose config blob `config` is in `store`.
    /// Layers without a well-formed annotation, or without a diff_id in
    /// the config, get none.
    pub(super) fn of(store: &Store, manifest: &ImageManifest, config: &Digest) -> Self {
        let annotated: Vec<(usize, Digest, Digest)> = manifest
            .layers()
            .iter()
            .enumerate()
            .filter_map(|(i, d)| {
                let toc = d.annotations().as_ref()?.get(TOC_DIGEST_ANNOTATION)?.parse().ok()?;
                Some((i, d.digest().to_string().parse().ok()?, toc))
            })
            .collect();
        if annotated.is_empty() {
            return Self::default();
        }
        let diff_ids = match diff_ids(store, config) {
            Ok(ids) => ids,
            Err(reason) => {
                tracing::warn!(%config, "cannot read the diff_ids of the image config: {reason}");
                return Self::default();
            }
        };
        let by_layer = annotated
            .into_iter()
            .filter_map(|(i, layer, toc)| Some((layer, (toc, diff_ids.get(i)?.clone()))))
            .collect();
        Self { by_layer }
    }

    /// Indexes `layer` (`size` bytes) from its TOC in `repository` and
    /// saves the index in `store`, if the image annotates a TOC for it.
    /// Returns whether it did; failures are logged.
    pub(super) fn index_layer(
        &self,
        store: &Store,
        repository: &Repository,
        layer: &Digest,
        size: u64,
    ) -> bool {
        let Some((toc, diff_id)) = self.by_layer.get(layer) else { return false };
        let index = match index_from_registry(repository, layer, size, toc, diff_id.clone()) {
            Ok(index) => index,
            Err(e) => {
                tracing::warn!(%layer, error = %e, "cannot use the layer's eStargz table of contents");
                return false;
            }
        };
        if let Err(e) = save_index(&store.index_dir(), &index) {
            tracing::warn!(%layer, error = %e, "cannot save the index made from the eStargz table of contents");
            return false;
        }
        tracing::info!(%layer, "indexed from its eStargz table of contents");
        true
    }
}

/// The config's `rootfs.diff_ids`, bottom layer first.
fn diff_ids(store: &Store, config: &Digest) -> Result<Vec<Digest>, String> {
    let bytes = std::fs::read(store.blob_path(config)).map_err(|e| e.to_string())?;
    let config: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    config["rootfs"]["diff_ids"]
        .as_array()
        .ok_or("no rootfs.diff_ids")?
        .iter()
        .map(|id| id.as_str().and_then(|s| s.parse().ok()).ok_or(format!("bad diff_id {id}")))
        .collect()
}

/// The index of eStargz `layer` from two range reads of the blob: the
/// footer, then the TOC member, whose JSON must hash to `toc_digest`.
pub(super) fn index_from_registry(
    repository: &Repository,
    layer: &Digest,
    size: u64,
    toc_digest: &Digest,
    diff_id: Digest,
) -> Result<LayerIndex, TransferError> {
    let toc_err = |source| LayerError::Toc { digest: layer.clone(), source };
    let footer_start = size
        .checked_sub(ESTARGZ_FOOTER_SIZE)
        .ok_or_else(|| invalid(layer, format!("{size} bytes cannot hold an eStargz footer")))?;
    let tail = repository.read_range(layer, footer_start, ESTARGZ_FOOTER_SIZE)?;
    let toc_offset = read_footer(&tail).map_err(toc_err)?;
    let member_len = footer_start.checked_sub(toc_offset).filter(|&n| n > 0).ok_or_else(|| {
        invalid(layer, format!("TOC offset {toc_offset} is past the footer at {footer_start}"))
    })?;
    if member_len > MAX_TOC_MEMBER {
        return Err(invalid(layer, format!("a TOC member of {member_len} bytes is too large")));
    }
    let member = repository.read_range(layer, toc_offset, member_len)?;
    let toc = read_toc(&member).map_err(toc_err)?;
    let actual = toc.digest();
    if &actual != toc_digest {
        return Err(RegistryError::DigestMismatch {
            what: format!("eStargz table of contents of layer {layer}"),
            expected: toc_digest.to_string(),
            actual,
        }
        .into());
    }
    Ok(index_from_toc(&toc, layer, size, toc_offset, diff_id)?)
}

fn invalid(layer: &Digest, reason: String) -> TransferError {
    TransferError::Invalid { what: format!("eStargz layer {layer}"), reason }
}
