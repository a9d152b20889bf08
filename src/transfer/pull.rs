//! `pull`: resolve a reference in a registry, choose the platform, and
//! bring the config and every missing layer into the store — layers in
//! parallel, each indexed while it streams in (the same single pass `load`
//! uses), so the blob is read once and its index is ready for an instant
//! mount. A layer becomes visible in the store only after its digest checked
//! out; the manifest and the tag are written last, so an interrupted pull
//! leaves at most unreferenced blobs.

use super::estargz::TocHints;
use super::index_artifact::fetch_index_artifact;
use super::{pipe, BlobOutcome, Progress, TransferError};
use crate::digest::{Digest, HashingReader};
use crate::durable::AtomicFile;
use crate::layer::{build_index, has_index, save_index, LayerError, LayerIndex};
use crate::platform::{describe, Platform};
use crate::reference::Reference;
use crate::registry::{Action, BlobStream, Client, Manifest, RegistryError, Repository};
use crate::store::{io_err, RefEntry, Store};
use oci_spec::image::{Descriptor, ImageIndex, ImageManifest};
use std::fs::File;
use std::io::{self, Seek};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// How to pull.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// The platform to pick from a multi-platform image.
    pub platform: Platform,
    /// Pull every platform of an index (and tag the index itself).
    pub all_platforms: bool,
    /// Layers downloaded at once.
    pub jobs: usize,
    /// What to bring of each layer.
    pub layers: LayerData,
}

/// What a pull brings of each layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerData {
    /// The whole blob (a plain pull).
    Blobs,
    /// For a lazy mount: only its index (from the local index cache, an
    /// eStargz table of contents or an index artifact in the registry); a
    /// layer without one anywhere is downloaded whole.
    IndexesOrBlobs,
    /// Only its index; a layer without one is left out (the containerd
    /// snapshotter then lets containerd unpack it).
    IndexesOnly,
}

impl Default for PullOptions {
    fn default() -> Self {
        Self { platform: Platform::host(), all_platforms: false, jobs: 3, layers: LayerData::Blobs }
    }
}

/// What a pull stored.
#[derive(Debug, Clone)]
pub struct Pulled {
    /// The normalised reference, as tagged in the store (`None` when pulled by digest only).
    pub reference: Option<String>,
    /// Digest of what the reference names (an index for multi-platform images).
    pub digest: Digest,
    /// The platform manifest that was pulled (equals `digest` for a single-platform image).
    pub manifest: Digest,
    /// The image id (config digest) of that manifest.
    pub id: Digest,
}

fn invalid(what: impl Into<String>, reason: impl ToString) -> TransferError {
    TransferError::Invalid { what: what.into(), reason: reason.to_string() }
}

/// Pulls `reference` into `store`.
pub fn pull(
    store: &Store,
    client: &Client,
    reference: &Reference,
    options: &PullOptions,
    progress: &dyn Progress,
) -> Result<Pulled, TransferError> {
    let repository = client.repository(reference, Action::Pull)?;
    let wanted = match (&reference.digest, &reference.tag) {
        (Some(digest), _) => digest.to_string(),
        (None, Some(tag)) => tag.clone(),
        (None, None) => "latest".to_string(),
    };
    let top = repository.manifest(&wanted)?;
    let (chosen, tagged) = if top.is_index() {
        let index: ImageIndex = serde_json::from_slice(&top.bytes)
            .map_err(|e| invalid(format!("index {}", top.digest), e))?;
        let children = if options.all_platforms {
            index.manifests().iter().filter(|d| !is_attestation(d)).collect()
        } else {
            vec![options.platform.choose(&index).ok_or_else(|| RegistryError::NoPlatform {
                reference: reference.to_string(),
                wanted: options.platform.to_string(),
                available: index.manifests().iter().map(describe).collect::<Vec<_>>().join(", "),
            })?]
        };
        let mut pulled = Vec::new();
        for child in children {
            let digest = descriptor_digest(child)?;
            let manifest = repository.manifest(&digest.to_string())?;
            let id = pull_image(store, &repository, &manifest, options, progress)?;
            pulled.push((manifest, id));
        }
        if options.all_platforms {
            store.put_blob_bytes(&top.bytes)?;
            let host = options.platform.choose(&index).map(descriptor_digest).transpose()?;
            let chosen = pulled
                .iter()
                .find(|(m, _)| Some(&m.digest) == host.as_ref())
                .or(pulled.first())
                .cloned()
                .ok_or_else(|| invalid(format!("index {}", top.digest), "lists no images"))?;
            (chosen, top.clone())
        } else {
            let chosen = pulled.remove(0);
            let tagged = chosen.0.clone();
            (chosen, tagged)
        }
    } else {
        let id = pull_image(store, &repository, &top, options, progress)?;
        ((top.clone(), id), top.clone())
    };
    let name = reference.tag.as_ref().map(|_| reference.without_digest().to_string());
    store.set_ref(RefEntry {
        name: name.clone(),
        manifest: tagged.digest.clone(),
        media_type: tagged.media_type.clone(),
        size: tagged.bytes.len() as u64,
    })?;
    Ok(Pulled { reference: name, digest: top.digest, manifest: chosen.0.digest, id: chosen.1 })
}

/// Attestation manifests (`unknown/unknown`) that BuildKit adds to indexes
/// are not images.
fn is_attestation(descriptor: &Descriptor) -> bool {
    descriptor.platform().as_ref().is_some_and(|p| p.os().to_string() == "unknown")
}

fn descriptor_digest(descriptor: &Descriptor) -> Result<Digest, TransferError> {
    descriptor
        .digest()
        .to_string()
        .parse()
        .map_err(|e| invalid(format!("descriptor {}", descriptor.digest()), e))
}

/// Stores the config and layers of one image manifest, then the manifest.
/// Returns the image id.
fn pull_image(
    store: &Store,
    repository: &Repository,
    manifest: &Manifest,
    options: &PullOptions,
    progress: &dyn Progress,
) -> Result<Digest, TransferError> {
    let parsed: ImageManifest = serde_json::from_slice(&manifest.bytes)
        .map_err(|e| invalid(format!("manifest {}", manifest.digest), e))?;
    let config = descriptor_digest(parsed.config())?;
    if !store.blob_path(&config).exists() {
        let data = repository.read_verified(&config, parsed.config().size(), "config")?;
        store.put_blob_bytes(&data)?;
    }
    let layers = parsed
        .layers()
        .iter()
        .map(|d| Ok((descriptor_digest(d)?, d.size())))
        .collect::<Result<Vec<_>, TransferError>>()?;
    let layers = match options.layers {
        LayerData::Blobs => layers,
        lazy => {
            let tocs = TocHints::of(store, &parsed, &config);
            let unindexed =
                layers_without_index(store, repository, &manifest.digest, layers, &tocs);
            let leave_out = lazy == LayerData::IndexesOnly;
            let what = if leave_out { "leaving it out" } else { "downloading it in full" };
            for (digest, _) in &unindexed {
                tracing::warn!(layer = %digest, "no index for this layer: {what} (`rmount index build --push` publishes indexes)");
            }
            if leave_out {
                Vec::new()
            } else {
                unindexed
            }
        }
    };
    fetch_layers(store, repository, &layers, options.jobs, progress)?;
    store.put_blob_bytes(&manifest.bytes)?;
    Ok(config)
}

/// The layers of a lazy pull that must be downloaded after all: those not
/// in the store whose index is neither in the local index cache, nor made
/// from an eStargz table of contents (`tocs`), nor in an index artifact in
/// the registry.
fn layers_without_index(
    store: &Store,
    repository: &Repository,
    manifest: &Digest,
    layers: Vec<(Digest, u64)>,
    tocs: &TocHints,
) -> Vec<(Digest, u64)> {
    let index_dir = store.index_dir();
    let mut missing: Vec<(Digest, u64)> = layers
        .into_iter()
        .filter(|(d, _)| !store.blob_path(d).exists() && !has_index(&index_dir, d))
        .filter(|(d, size)| !tocs.index_layer(store, repository, d, *size))
        .collect();
    if missing.is_empty() {
        return missing;
    }
    let digests: Vec<Digest> = missing.iter().map(|(d, _)| d.clone()).collect();
    match fetch_index_artifact(repository, manifest, &digests, &index_dir) {
        Ok(found) => missing.retain(|(d, _)| !found.contains(d)),
        Err(e) => tracing::warn!(error = %e, "cannot use the image's index artifact"),
    }
    missing
}

/// Downloads the layers the store lacks, `jobs` at a time. The first error
/// stops workers from starting new layers and is returned.
fn fetch_layers(
    store: &Store,
    repository: &Repository,
    layers: &[(Digest, u64)],
    jobs: usize,
    progress: &dyn Progress,
) -> Result<(), TransferError> {
    let queue = Mutex::new(layers.iter());
    let failed = AtomicBool::new(false);
    let first_error = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..jobs.clamp(1, layers.len().max(1)) {
            scope.spawn(|| loop {
                let next = queue.lock().unwrap_or_else(|p| p.into_inner()).next();
                let Some((digest, size)) = next else { break };
                if failed.load(Ordering::Relaxed) {
                    break;
                }
                if let Err(e) = fetch_layer(store, repository, digest, *size, progress) {
                    failed.store(true, Ordering::Relaxed);
                    first_error.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                }
            });
        }
    });
    match first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Downloads one layer into the store, indexing it as it streams in: the
/// download runs on a thread of its own beside the indexing pass (see
/// [`pipe`]). The blob becomes visible only once its digest checked out.
fn fetch_layer(
    store: &Store,
    repository: &Repository,
    digest: &Digest,
    size: u64,
    progress: &dyn Progress,
) -> Result<(), TransferError> {
    progress.blob_started(digest, size);
    let dest = store.blob_path(digest);
    if dest.exists() {
        progress.blob_finished(digest, &BlobOutcome::Existing);
        return Ok(());
    }
    let stream = repository.blob(digest, size)?;
    let mut file = AtomicFile::create(&dest).map_err(io_err(&dest))?;
    let advanced = |n| progress.blob_advanced(digest, n);
    let (indexed, whole) = index_while_downloading(stream, file.file(), digest, advanced)
        .map_err(|source| LayerError::Io { digest: digest.clone(), source })?;
    // The pass verified the digest; the file stays a temp file unless it matched.
    let index = match indexed {
        Ok(index) => index,
        Err(e) => return Err(explain_bad_layer(repository, digest, file.file(), whole, e)),
    };
    file.commit().map_err(io_err(&dest))?;
    if let Err(e) = save_index(&store.index_dir(), &index) {
        tracing::warn!(layer = %digest, error = %e, "could not save the layer index; the first mount will rebuild it");
    }
    progress.blob_finished(digest, &BlobOutcome::Transferred);
    Ok(())
}

/// Downloads `stream` into `file` on a thread of its own (see [`pipe`])
/// while the indexing pass reads it on this one. Returns the outcome of the
/// pass and whether the whole blob reached `file`; fails only when the
/// thread cannot be started.
fn index_while_downloading(
    stream: BlobStream,
    file: &mut File,
    digest: &Digest,
    advanced: impl Fn(u64) + Send,
) -> io::Result<(Result<LayerIndex, LayerError>, bool)> {
    let (chunks, blob) = pipe::channel();
    std::thread::scope(|scope| {
        let download = std::thread::Builder::new()
            .name("download".into())
            .spawn_scoped(scope, move || pipe::download(stream, file, chunks, advanced))?;
        // Returning drops `blob`: after a failed pass the download runs on alone.
        let indexed = build_index(blob, digest);
        let whole = download.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        Ok((indexed, whole))
    })
}

/// A layer that failed to index: corrupt compression or tar, or a wrong
/// digest. Damage in transit shows up as any of these, so when the whole
/// blob reached `copy` it is hashed: a digest that does not match is the
/// real finding, reported as such; otherwise the layer itself is malformed.
fn explain_bad_layer(
    repository: &Repository,
    digest: &Digest,
    copy: &File,
    whole: bool,
    error: LayerError,
) -> TransferError {
    let mismatch = |actual| {
        TransferError::Registry(RegistryError::DigestMismatch {
            what: format!("layer {digest} of {}", repository.full_name()),
            expected: digest.to_string(),
            actual,
        })
    };
    if let LayerError::DigestMismatch { actual, .. } = error {
        return mismatch(actual);
    }
    if !whole {
        return error.into();
    }
    let mut hashing = HashingReader::new(copy);
    let rehashed =
        { copy }.seek(io::SeekFrom::Start(0)).and_then(|_| io::copy(&mut hashing, &mut io::sink()));
    match (rehashed, hashing.finish()) {
        (Ok(_), (actual, _)) if &actual != digest => mismatch(actual),
        _ => error.into(),
    }
}
