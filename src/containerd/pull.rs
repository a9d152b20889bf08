//! `rmount containerd pull`: has a running containerd hold an image whose
//! layers a remote snapshotter (rmount's) serves lazily, the way
//! `ctr-remote image rpull` does, client-side like containerd's own pull:
//!
//! 1. resolve the reference with rmount's registry client (manifests
//!    verified by digest; the platform chosen from an index);
//! 2. write the index (if any), the manifest and the config into
//!    containerd's content store, with the GC labels containerd's pull sets
//!    (the layer blobs are *not* written: that is the point);
//! 3. for each layer, bottom first, `Prepare` its chain ID on the
//!    snapshotter with the labels that ask for a remote snapshot
//!    (`containerd.io/snapshot.ref` and CRI's layer labels): `ALREADY_EXISTS`
//!    means the snapshotter serves it lazily. Mounts mean it cannot: the
//!    layer is then fetched into the content store, unpacked by
//!    containerd's applier (`diff.Apply`) and committed, as a plain pull would;
//! 4. create (or update) the image.
//!
//! Everything runs under a lease (expiring by itself within the hour), so
//! containerd's GC leaves half-done work alone; the lease is deleted at
//! the end, when the image and the labels hold everything.

use super::api::types::Descriptor as CtrDescriptor;
use super::client::{ContainerdClient, ContainerdError, Prepared};
use crate::digest::{Digest, HashingReader};
use crate::platform::{describe, Platform};
use crate::reference::Reference;
use crate::registry::{Action, Client, Manifest, RegistryError, Repository};
use crate::snapshotter::remote::{
    IMAGE_LAYERS_LABEL, IMAGE_REF_LABEL, LAYER_DIGEST_LABEL, TARGET_LABEL,
};
use oci_spec::image::{ImageIndex, ImageManifest};
use serde::Serialize;
use std::collections::HashMap;
use std::time::Duration;

/// containerd's limit on a label's key plus value (`labels.Validate`).
const MAX_LABEL_SIZE: usize = 4096;

/// How long the pull's lease outlives a crash of this process.
const LEASE_EXPIRY: Duration = Duration::from_secs(3600);

/// Errors of a containerd pull.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// Talking to containerd failed.
    #[error(transparent)]
    Containerd(#[from] ContainerdError),
    /// Talking to the registry failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// A manifest, index or config that is not what it should be.
    #[error("{what}: {reason}")]
    Invalid {
        /// Which document.
        what: String,
        /// Why.
        reason: String,
    },
    /// A layer containerd could not unpack (the lazy path was refused too).
    #[error("unpacking layer {layer} ({chain_id}): {error}")]
    Unpack {
        /// The layer's digest.
        layer: Digest,
        /// Its chain ID.
        chain_id: Digest,
        /// What failed.
        error: Box<PullError>,
    },
}

fn invalid(what: impl Into<String>, reason: impl ToString) -> PullError {
    PullError::Invalid { what: what.into(), reason: reason.to_string() }
}

/// How to pull.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// containerd's name for the snapshotter (its proxy plugin), e.g. `rmount`.
    pub snapshotter: String,
    /// The platform to pick from a multi-platform image.
    pub platform: Platform,
}

/// What became of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerOutcome {
    /// Its snapshot existed already.
    Existing,
    /// The snapshotter serves it lazily (nothing was downloaded here).
    Lazy,
    /// Downloaded into containerd's content store and unpacked.
    Unpacked,
}

/// One layer of a pulled image.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PulledLayer {
    /// The layer blob's digest.
    pub digest: Digest,
    /// Its compressed size.
    pub size: u64,
    /// The snapshot's name: the chain ID of the layers up to this one.
    pub chain_id: Digest,
    /// What happened to it.
    pub outcome: LayerOutcome,
}

/// What a pull did.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Pulled {
    /// The image's name in containerd (the normalised reference).
    pub image: String,
    /// Digest of what the reference names (an index for multi-platform images).
    pub digest: Digest,
    /// Its media type.
    pub media_type: String,
    /// The platform manifest.
    pub manifest: Digest,
    /// The config (image id).
    pub config: Digest,
    /// The snapshotter the layers were prepared on.
    pub snapshotter: String,
    /// The layers, bottom first.
    pub layers: Vec<PulledLayer>,
    /// Whether containerd had no image of that name before.
    pub created: bool,
}

impl Pulled {
    /// How many layers ended with `outcome`.
    pub fn count(&self, outcome: LayerOutcome) -> usize {
        self.layers.iter().filter(|l| l.outcome == outcome).count()
    }
}

/// A layer as the manifest and the config describe it.
struct Layer {
    digest: Digest,
    size: u64,
    media_type: String,
    chain_id: Digest,
}

/// Pulls `reference` into the containerd `containerd` talks to (its
/// namespace), its layers prepared on `options.snapshotter`.
pub fn pull(
    containerd: &mut ContainerdClient,
    registry: &Client,
    reference: &Reference,
    options: &PullOptions,
) -> Result<Pulled, PullError> {
    let lease = format!("rmount-pull-{}", unique());
    containerd.create_lease(&lease, LEASE_EXPIRY)?;
    containerd.set_lease(Some(&lease))?;
    let pulled = pull_leased(containerd, registry, reference, options);
    containerd.set_lease(None)?;
    if let Err(e) = containerd.delete_lease(&lease) {
        // It expires by itself; a failed pull's error matters more.
        tracing::warn!(lease, error = %e, "could not delete the pull's lease");
    }
    pulled
}

fn pull_leased(
    containerd: &ContainerdClient,
    registry: &Client,
    reference: &Reference,
    options: &PullOptions,
) -> Result<Pulled, PullError> {
    let repository = registry.repository(reference, Action::Pull)?;
    let wanted = match (&reference.digest, &reference.tag) {
        (Some(digest), _) => digest.to_string(),
        (None, Some(tag)) => tag.clone(),
        (None, None) => "latest".to_string(),
    };
    let source = HashMap::from([(
        format!("containerd.io/distribution.source.{}", reference.registry),
        reference.repository.clone(),
    )]);
    let top = repository.manifest(&wanted)?;
    let (index, manifest) = if top.is_index() {
        let index: ImageIndex = serde_json::from_slice(&top.bytes)
            .map_err(|e| invalid(format!("index {}", top.digest), e))?;
        let chosen = options.platform.choose(&index).ok_or_else(|| RegistryError::NoPlatform {
            reference: reference.to_string(),
            wanted: options.platform.to_string(),
            available: index.manifests().iter().map(describe).collect::<Vec<_>>().join(", "),
        })?;
        let position =
            index.manifests().iter().position(|d| std::ptr::eq(d, chosen)).unwrap_or_default();
        let digest = parse_digest(chosen.digest().as_ref(), "index entry")?;
        (Some((position, top.clone())), repository.manifest(&digest.to_string())?)
    } else {
        (None, top.clone())
    };
    let parsed: ImageManifest = serde_json::from_slice(&manifest.bytes)
        .map_err(|e| invalid(format!("manifest {}", manifest.digest), e))?;
    let config_digest = parse_digest(parsed.config().digest().as_ref(), "config")?;
    let config = repository.read_verified(&config_digest, parsed.config().size(), "config")?;
    let layers = layers(&parsed, &config, &config_digest)?;

    // Content: config, then manifest, then index, each referring to the
    // ones before it, as containerd's pull writes them.
    let mut labels = source.clone();
    if let Some(top_layer) = layers.last() {
        labels.insert(
            format!("containerd.io/gc.ref.snapshot.{}", options.snapshotter),
            top_layer.chain_id.to_string(),
        );
    }
    containerd.write_content(
        &format!("rmount-config-{config_digest}-{}", unique()),
        &config_digest.to_string(),
        &config,
        &labels,
    )?;
    let mut labels = source.clone();
    labels.insert("containerd.io/gc.ref.content.config".into(), config_digest.to_string());
    for (i, layer) in layers.iter().enumerate() {
        labels.insert(format!("containerd.io/gc.ref.content.l.{i}"), layer.digest.to_string());
    }
    write_manifest(containerd, &manifest, &labels)?;
    if let Some((position, index)) = &index {
        let mut labels = source.clone();
        labels.insert(
            format!("containerd.io/gc.ref.content.m.{position}"),
            manifest.digest.to_string(),
        );
        write_manifest(containerd, index, &labels)?;
    }

    let image = reference.to_string();
    let mut pulled_layers = Vec::with_capacity(layers.len());
    for (i, layer) in layers.iter().enumerate() {
        let parent = if i == 0 { String::new() } else { layers[i - 1].chain_id.to_string() };
        let outcome =
            prepare_layer(containerd, &repository, &image, &layers[i..], &parent, &source, options)
                .map_err(|e| PullError::Unpack {
                    layer: layer.digest.clone(),
                    chain_id: layer.chain_id.clone(),
                    error: Box::new(e),
                })?;
        tracing::info!(layer = %layer.digest, chain_id = %layer.chain_id, ?outcome, "layer ready");
        pulled_layers.push(PulledLayer {
            digest: layer.digest.clone(),
            size: layer.size,
            chain_id: layer.chain_id.clone(),
            outcome,
        });
    }

    let target = CtrDescriptor {
        media_type: top.media_type.clone(),
        digest: top.digest.to_string(),
        size: top.bytes.len() as i64,
        annotations: HashMap::new(),
    };
    let created = containerd.put_image(&image, target, HashMap::new())?;
    Ok(Pulled {
        image,
        digest: top.digest.clone(),
        media_type: top.media_type.clone(),
        manifest: manifest.digest.clone(),
        config: config_digest,
        snapshotter: options.snapshotter.clone(),
        layers: pulled_layers,
        created,
    })
}

fn write_manifest(
    containerd: &ContainerdClient,
    manifest: &Manifest,
    labels: &HashMap<String, String>,
) -> Result<(), PullError> {
    let kind = if manifest.is_index() { "index" } else { "manifest" };
    containerd.write_content(
        &format!("rmount-{kind}-{}-{}", manifest.digest, unique()),
        &manifest.digest.to_string(),
        &manifest.bytes,
        labels,
    )?;
    Ok(())
}

fn parse_digest(text: &str, what: &str) -> Result<Digest, PullError> {
    text.parse().map_err(|e| invalid(format!("{what} digest {text}"), e))
}

/// The manifest's layers with their chain IDs (from the config's `diff_ids`).
fn layers(
    manifest: &ImageManifest,
    config: &[u8],
    digest: &Digest,
) -> Result<Vec<Layer>, PullError> {
    #[derive(serde::Deserialize)]
    struct Config {
        rootfs: RootFs,
    }
    #[derive(serde::Deserialize)]
    struct RootFs {
        diff_ids: Vec<String>,
    }
    let what = || format!("config {digest}");
    let config: Config = serde_json::from_slice(config).map_err(|e| invalid(what(), e))?;
    let diff_ids = config.rootfs.diff_ids;
    if diff_ids.len() != manifest.layers().len() {
        return Err(invalid(
            what(),
            format!(
                "{} diff_ids for {} layers in the manifest",
                diff_ids.len(),
                manifest.layers().len()
            ),
        ));
    }
    let mut chain: Option<Digest> = None;
    let mut layers = Vec::with_capacity(diff_ids.len());
    for (descriptor, diff_id) in manifest.layers().iter().zip(&diff_ids) {
        let diff_id = parse_digest(diff_id, "diff_id")?;
        let chain_id = chain_id(chain.as_ref(), &diff_id);
        layers.push(Layer {
            digest: parse_digest(descriptor.digest().as_ref(), "layer")?,
            size: descriptor.size(),
            media_type: descriptor.media_type().to_string(),
            chain_id: chain_id.clone(),
        });
        chain = Some(chain_id);
    }
    Ok(layers)
}

/// The OCI chain ID of a layer with diff ID `diff_id` on the chain `parent`.
pub fn chain_id(parent: Option<&Digest>, diff_id: &Digest) -> Digest {
    match parent {
        None => diff_id.clone(),
        Some(parent) => Digest::of(format!("{parent} {diff_id}").as_bytes()),
    }
}

/// CRI's `cri.image-layers` label: the layers from this one up, comma-
/// separated, as many as fit containerd's label size limit.
fn image_layers_label(layers: &[Layer]) -> String {
    let mut value = String::new();
    for layer in layers {
        let digest = layer.digest.to_string();
        let added = if value.is_empty() { digest.len() } else { digest.len() + 1 };
        if IMAGE_LAYERS_LABEL.len() + value.len() + added > MAX_LABEL_SIZE {
            break;
        }
        if !value.is_empty() {
            value.push(',');
        }
        value.push_str(&digest);
    }
    value
}

/// Makes the snapshot of `layers[0]` (whose parent snapshot is `parent`):
/// lazily through the snapshotter if it can, else by unpacking the layer.
fn prepare_layer(
    containerd: &ContainerdClient,
    repository: &Repository,
    image: &str,
    layers: &[Layer],
    parent: &str,
    source: &HashMap<String, String>,
    options: &PullOptions,
) -> Result<LayerOutcome, PullError> {
    let layer = &layers[0];
    let snapshotter = options.snapshotter.as_str();
    let chain_id = layer.chain_id.to_string();
    if containerd.stat_snapshot(snapshotter, &chain_id)?.is_some() {
        return Ok(LayerOutcome::Existing);
    }
    let key = format!("extract-{} {chain_id}", unique());
    let labels = HashMap::from([
        (TARGET_LABEL.to_string(), chain_id.clone()),
        (IMAGE_REF_LABEL.to_string(), image.to_string()),
        (LAYER_DIGEST_LABEL.to_string(), layer.digest.to_string()),
        (IMAGE_LAYERS_LABEL.to_string(), image_layers_label(layers)),
    ]);
    let mounts = match containerd.prepare_snapshot(snapshotter, &key, parent, labels)? {
        Prepared::AlreadyExists => return Ok(LayerOutcome::Lazy),
        Prepared::Mounts(mounts) => mounts,
    };
    tracing::info!(layer = %layer.digest, "the snapshotter does not serve this layer lazily; unpacking it");
    let unpacked = (|| {
        fetch_layer(containerd, repository, layer, source)?;
        let descriptor = CtrDescriptor {
            media_type: layer.media_type.clone(),
            digest: layer.digest.to_string(),
            size: layer.size as i64,
            annotations: HashMap::new(),
        };
        containerd.apply(descriptor, mounts)?;
        let labels = HashMap::from([(TARGET_LABEL.to_string(), chain_id.clone())]);
        containerd.commit_snapshot(snapshotter, &chain_id, &key, labels)?;
        Ok::<_, PullError>(())
    })();
    if let Err(e) = unpacked {
        if let Err(removing) = containerd.remove_snapshot(snapshotter, &key) {
            tracing::warn!(key, error = %removing, "could not remove the unfinished snapshot");
        }
        return Err(e);
    }
    Ok(LayerOutcome::Unpacked)
}

/// Streams `layer` from the registry into containerd's content store
/// (unless it is there), checking its digest on the way.
fn fetch_layer(
    containerd: &ContainerdClient,
    repository: &Repository,
    layer: &Layer,
    source: &HashMap<String, String>,
) -> Result<(), PullError> {
    let digest = layer.digest.to_string();
    if containerd.content_info(&digest)?.is_some() {
        return Ok(());
    }
    let stream = repository.blob(&layer.digest, layer.size)?;
    let mut hashing = HashingReader::new(stream);
    let written = containerd.write_content_from(
        &format!("rmount-layer-{digest}-{}", unique()),
        &digest,
        layer.size,
        &mut hashing,
        source,
    );
    let (actual, read) = hashing.finish();
    match written {
        Ok(_) => Ok(()),
        // containerd refused the content: say so if the registry sent the wrong bytes.
        Err(e) if read == layer.size && actual != layer.digest => {
            tracing::debug!(error = %e, "containerd refused the layer");
            Err(RegistryError::DigestMismatch {
                what: format!("layer {digest} of {}", repository.full_name()),
                expected: digest,
                actual,
            }
            .into())
        }
        Err(e) => Err(e.into()),
    }
}

/// A string unique to this call: `<unix nanos>-<random>`, like
/// containerd's unpack keys. Content-write refs carry one too, so that two
/// pulls of one image do not wait on each other's ref lock (the second
/// commit finds the blob there).
fn unique() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{nanos}-{:08x}", fastrand::u32(..))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: u8) -> Digest {
        Digest::of(&[n])
    }

    #[test]
    fn chain_ids_follow_the_oci_spec() {
        let (a, b) = (digest(1), digest(2));
        assert_eq!(chain_id(None, &a), a);
        let expected = Digest::of(format!("{a} {b}").as_bytes());
        assert_eq!(chain_id(Some(&a), &b), expected);
    }

    #[test]
    fn image_layers_label_fits_containerds_limit() {
        let layers: Vec<Layer> = (0..100)
            .map(|n| Layer {
                digest: digest(n),
                size: 1,
                media_type: String::new(),
                chain_id: digest(n),
            })
            .collect();
        let value = image_layers_label(&layers[..2]);
        assert_eq!(value, format!("{},{}", digest(0), digest(1)));
        let value = image_layers_label(&layers);
        assert!(IMAGE_LAYERS_LABEL.len() + value.len() <= MAX_LABEL_SIZE);
        assert!(value.starts_with(&digest(0).to_string()));
        assert_eq!(value.split(',').count(), (MAX_LABEL_SIZE - IMAGE_LAYERS_LABEL.len() + 1) / 72);
    }

    #[test]
    fn configs_give_chain_ids_and_must_match_the_manifest() {
        let (d1, d2) = (digest(1), digest(2));
        let manifest: ImageManifest = serde_json::from_value(serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest(9).to_string(), "size": 2},
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest(3).to_string(), "size": 10},
                {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest(4).to_string(), "size": 20},
            ],
        }))
        .unwrap();
        let config = serde_json::json!({"rootfs": {"type": "layers", "diff_ids": [d1.to_string(), d2.to_string()]}});
        let got = layers(&manifest, config.to_string().as_bytes(), &digest(9)).unwrap();
        assert_eq!(got[0].chain_id, d1);
        assert_eq!(got[1].chain_id, chain_id(Some(&d1), &d2));
        assert_eq!(got[1].digest, digest(4));
        assert_eq!(got[1].size, 20);
        let short = serde_json::json!({"rootfs": {"type": "layers", "diff_ids": [d1.to_string()]}});
        assert!(layers(&manifest, short.to_string().as_bytes(), &digest(9)).is_err());
        assert!(layers(&manifest, b"not json", &digest(9)).is_err());
    }
}
