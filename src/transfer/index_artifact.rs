//! Layer indexes published next to an image, so a lazy mount gets each
//! layer's [`LayerIndex`] (file table, gzip checkpoints or zstd frames,
//! chunk hashes) without downloading the layer to build it.
//!
//! **Why an artifact with a `subject`.** The indexes travel as an OCI 1.1
//! artifact: an image manifest of `artifactType` [`INDEX_ARTIFACT_TYPE`]
//! with an empty config, one zstd-compressed [`encode_index`] blob per
//! layer (annotated with the layer's digest), and `subject` naming the
//! image's manifest. The image itself is untouched: no conversion (as
//! eStargz or Nydus need), so its digest, and any signature over it, stay
//! valid, and a registry that deletes the image may collect its referrers.
//!
//! **Finding it.** The Referrers API (`GET …/referrers/<digest>`) lists the
//! artifacts of a manifest. Registries without it (distribution 2.8, the
//! Debian `docker-registry`) answer `404`; then the OCI 1.1 tag schema
//! applies: the tag `sha256-<hex>` names an image index whose `manifests`
//! are the referrers. Publishing there reads that index, replaces any older
//! rmount descriptor with ours and puts it back, keeping other tools'
//! entries. (Two writers racing on that tag can lose one update; the spec
//! accepts this, and a lost rmount entry only means a slower mount.) When
//! several rmount artifacts are listed, the newest by `created` wins.
//!
//! **Trust.** Every step is verified by digest: the artifact manifest by
//! the digest in its listing, each index blob by its descriptor's digest,
//! and the decoded index must describe the layer it is annotated with
//! ([`decode_index`] checks the blob digest and the format version). An
//! index of another format version is ignored with a warning, as if absent.
//! The listing itself is not content-addressed: anyone who may push to the
//! repository can publish an index, as they could push the image.
//!
//! **Prefetch list.** `rmount index build --prefetch-list FILE` adds one
//! more blob of media type [`PREFETCH_LIST_MEDIA_TYPE`]: the files a
//! recorded workload read ([`PrefetchList`], only those of the image's own
//! layers). [`fetch_index_artifact`] verifies it by its descriptor's digest
//! and saves it to [`published_list_path`], where `--prefetch recorded`
//! finds it. The list only steers prefetching, so a bad one is skipped with
//! a warning and never fails the fetch of the indexes.

use super::TransferError;
use crate::digest::Digest;
use crate::fs::record::{published_list_path, PrefetchList, PREFETCH_LIST_MEDIA_TYPE};
use crate::layer::{
    build_index, decode_index, encode_index, index_path, load_index, save_index, LayerIndex,
};
use crate::reference::Reference;
use crate::registry::{Action, Client, Manifest, RegistryError, Repository};
use crate::store::{io_err, LayerDesc, Store, StoreError};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;
use std::path::Path;

/// `artifactType` of rmount's index artifacts.
pub const INDEX_ARTIFACT_TYPE: &str = "application/vnd.rmount.index.v1";
/// Media type of one layer's index blob: zstd of [`encode_index`]'s bytes.
pub const LAYER_INDEX_MEDIA_TYPE: &str = "application/vnd.rmount.layer-index.v1+zstd";
/// Annotation of an index blob naming the layer blob it indexes.
pub const LAYER_DIGEST_ANNOTATION: &str = "io.rmount.layer.digest";

const CREATED: &str = "org.opencontainers.image.created";
const EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
/// The OCI empty descriptor's content (`sha256:44136fa3…`).
const EMPTY_CONFIG: &[u8] = b"{}";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Indexes are built once and fetched by every mount: compress hard.
const ZSTD_LEVEL: i32 = 19;
/// An index blob larger than this is refused (it is read into memory).
const MAX_INDEX_BLOB: u64 = 256 << 20;
/// A decompressed index larger than this is treated as absent (a zstd bomb).
const MAX_INDEX_SIZE: u64 = 1 << 30;
/// A prefetch list blob larger than this is not published, and is skipped
/// when fetched (it is read into memory).
const MAX_PREFETCH_LIST_BLOB: u64 = 16 << 20;

/// What [`build_index_artifact`] built and published.
#[derive(Debug, Clone)]
pub struct IndexArtifactReport {
    /// The image manifest the indexes describe (the artifact's `subject`).
    pub subject: Digest,
    /// `registry/repository` published to; `None` when not pushed.
    pub repository: Option<String>,
    /// The artifact manifest, when pushed (or found already published).
    pub artifact: Option<Digest>,
    /// An artifact with the same indexes was there already; nothing was pushed.
    pub already_published: bool,
    /// The tag-schema tag (`sha256-<hex>`) that was updated, on registries
    /// without the Referrers API.
    pub fallback_tag: Option<String>,
    /// One per layer of the image, bottom first.
    pub layers: Vec<IndexedLayer>,
    /// The prefetch list embedded in the artifact, when one was given.
    pub prefetch_list: Option<ListBlob>,
}

/// A prefetch list as published in an index artifact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListBlob {
    /// The list blob (its JSON).
    pub digest: Digest,
    /// Its size.
    pub size: u64,
    /// How many files it names.
    pub files: usize,
}

/// One layer's published index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexedLayer {
    /// The layer blob.
    pub digest: Digest,
    /// Its (compressed) size.
    pub size: u64,
    /// The index blob (zstd of the encoded index).
    pub index_digest: Digest,
    /// Its size.
    pub index_size: u64,
}

/// Builds the indexes of every layer of stored image `source` (from the
/// store's index cache, else from the blob with [`build_index`]), and with
/// `push` publishes them as an artifact referring to the image's manifest
/// in `destination`'s repository (default: the name `source` resolved to;
/// a tag or digest in it is not used). The image must be in that
/// repository already. For a multi-platform image the platform manifest
/// [`Store::resolve`] picks is indexed and is the subject.
///
/// `prefetch_list` (a recorded workload's files) is embedded as one more
/// blob, keeping only the files of the image's layers (the others are left
/// out with a warning); a list with none of them is an error.
pub fn build_index_artifact(
    store: &Store,
    client: &Client,
    source: &str,
    destination: Option<&Reference>,
    push: bool,
    prefetch_list: Option<&PrefetchList>,
) -> Result<IndexArtifactReport, TransferError> {
    let image = store.resolve(source)?;
    let mut blobs = Vec::new();
    let mut layers = Vec::new();
    for layer in &image.layers {
        let blob = compress(&layer_index(store, layer, source)?)?;
        layers.push(IndexedLayer {
            digest: layer.digest.clone(),
            size: layer.size,
            index_digest: Digest::of(&blob),
            index_size: blob.len() as u64,
        });
        blobs.push(blob);
    }
    let mut list = None;
    if let Some(given) = prefetch_list {
        let digests: Vec<Digest> = image.layers.iter().map(|l| l.digest.clone()).collect();
        let (blob, bytes) = list_blob(given, &digests, source)?;
        list = Some(blob);
        blobs.push(bytes);
    }
    let mut report = IndexArtifactReport {
        subject: image.manifest_digest.clone(),
        repository: None,
        artifact: None,
        already_published: false,
        fallback_tag: None,
        layers,
        prefetch_list: list,
    };
    if !push {
        return Ok(report);
    }
    let destination = match (destination, &image.reference) {
        (Some(d), _) => d.clone(),
        (None, Some(name)) => name.parse()?,
        (None, None) => {
            let reason = "the image has no name to publish under: give the repository with --dest";
            return Err(invalid(source, reason));
        }
    };
    let repository = client.repository(&destination, Action::Push)?;
    report.repository = Some(repository.full_name());
    publish(&repository, &mut report, &blobs, source)?;
    Ok(report)
}

/// Finds the rmount index artifact of `manifest` in `repository`, downloads
/// the indexes of those of `layers` it has, verifies them and saves each
/// into `index_dir` (as [`save_index`] does). Returns the layers whose index
/// was saved: none when there is no artifact. Network and verification
/// failures are errors (the caller then downloads the layers); an index of
/// another format version is skipped with a warning.
///
/// The artifact's prefetch list, if it has one, is verified and saved to
/// [`published_list_path`]`(index_dir, manifest)`; one saved before is
/// removed when the artifact has none. A list that cannot be fetched,
/// verified or parsed is skipped with a warning.
pub fn fetch_index_artifact(
    repository: &Repository,
    manifest: &Digest,
    layers: &[Digest],
    index_dir: &Path,
) -> Result<Vec<Digest>, TransferError> {
    let listing = list_referrers(repository, manifest)?;
    let Some(artifact) = listing.bytes().map(newest_artifact).transpose()?.flatten() else {
        save_prefetch_list(repository, manifest, None, index_dir);
        return Ok(Vec::new());
    };
    let blobs = artifact_blobs(repository, &artifact, manifest)?;
    save_prefetch_list(repository, manifest, blobs.prefetch_list.as_ref(), index_dir);
    let mut saved: Vec<Digest> = Vec::new();
    for layer in layers {
        let Some((blob, size)) = blobs.indexes.get(layer) else { continue };
        if saved.contains(layer) {
            continue;
        }
        if let Some(index) = download_index(repository, layer, blob, *size)? {
            save_index(index_dir, &index).map_err(io_err(&index_path(index_dir, layer)))?;
            saved.push(layer.clone());
        }
    }
    Ok(saved)
}

/// The index of a stored layer: cached, else built from the blob (and cached).
fn layer_index(
    store: &Store,
    layer: &LayerDesc,
    source: &str,
) -> Result<LayerIndex, TransferError> {
    let index_dir = store.index_dir();
    if let Some(index) = load_index(&index_dir, &layer.digest) {
        return Ok(index);
    }
    let path = store.blob_path(&layer.digest);
    let file = match std::fs::File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let what = format!("layer of {source}; pull the image again");
            return Err(StoreError::MissingBlob { digest: layer.digest.clone(), what }.into());
        }
        Err(e) => return Err(io_err(&path)(e).into()),
    };
    let index = build_index(file, &layer.digest)?;
    if let Err(e) = save_index(&index_dir, &index) {
        tracing::warn!(layer = %layer.digest, error = %e, "could not cache the layer index");
    }
    Ok(index)
}

/// The blob of a prefetch list: the files of `list` that are in one of
/// `layers`, each once, in list order. Files of other layers are left out
/// with a warning; a list left with none is an error, as is one too large
/// for [`fetch_index_artifact`] to take.
fn list_blob(
    list: &PrefetchList,
    layers: &[Digest],
    source: &str,
) -> Result<(ListBlob, Vec<u8>), TransferError> {
    let (kept, left_out) = image_files(list, layers);
    for (layer, files) in &left_out {
        tracing::warn!(
            %layer,
            files,
            "leaving out of the prefetch list the files of a layer that is not in {source}"
        );
    }
    if kept.files.is_empty() {
        let reason = match list.files.len() {
            0 => "the prefetch list names no files".to_string(),
            n => format!("none of the {n} files of the prefetch list is in one of its layers"),
        };
        return Err(invalid(source, reason));
    }
    let bytes = kept.to_json();
    if bytes.len() as u64 > MAX_PREFETCH_LIST_BLOB {
        return Err(invalid(
            source,
            format!(
                "the prefetch list is {} bytes, more than the {MAX_PREFETCH_LIST_BLOB} allowed",
                bytes.len()
            ),
        ));
    }
    let blob =
        ListBlob { digest: Digest::of(&bytes), size: bytes.len() as u64, files: kept.files.len() };
    Ok((blob, bytes))
}

/// The files of `list` in one of `layers`, each once, in list order; and
/// how many (distinct) files of each other layer were left out.
fn image_files(list: &PrefetchList, layers: &[Digest]) -> (PrefetchList, BTreeMap<Digest, usize>) {
    let layers: HashSet<&Digest> = layers.iter().collect();
    let mut seen = HashSet::new();
    let mut kept = PrefetchList { version: list.version, files: Vec::new() };
    let mut left_out = BTreeMap::new();
    for file in &list.files {
        if !seen.insert((&file.layer, &file.path)) {
            continue;
        }
        if layers.contains(&file.layer) {
            kept.files.push(file.clone());
        } else {
            *left_out.entry(file.layer.clone()).or_insert(0) += 1;
        }
    }
    (kept, left_out)
}

/// Saves the prefetch list `blob` (digest, size) of `manifest`'s artifact
/// where `--prefetch recorded` looks for it; with `None`, or when the list
/// is unusable (warned about), removes a list saved from an older artifact.
fn save_prefetch_list(
    repository: &Repository,
    manifest: &Digest,
    blob: Option<&(Digest, u64)>,
    index_dir: &Path,
) {
    let path = published_list_path(index_dir, manifest);
    if let Some((digest, size)) = blob {
        let saved = download_prefetch_list(repository, digest, *size).and_then(|bytes| {
            crate::durable::write_atomic(&path, &bytes).map_err(|e| e.to_string())
        });
        match saved {
            Ok(()) => return,
            Err(reason) => {
                tracing::warn!(list = %digest, %reason, "ignoring the published prefetch list")
            }
        }
    }
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove an old prefetch list")
        }
    }
}

/// Downloads a prefetch list blob; its bytes once verified by digest and
/// parsed as a [`PrefetchList`], else what is wrong.
fn download_prefetch_list(
    repository: &Repository,
    digest: &Digest,
    size: u64,
) -> Result<Vec<u8>, String> {
    if size == 0 || size > MAX_PREFETCH_LIST_BLOB {
        return Err(format!("{size} bytes; a list must have 1 to {MAX_PREFETCH_LIST_BLOB}"));
    }
    let bytes = repository.read_range(digest, 0, size).map_err(|e| e.to_string())?;
    let actual = Digest::of(&bytes);
    if &actual != digest {
        return Err(format!("digest mismatch: the blob's digest is {actual}"));
    }
    PrefetchList::parse(&bytes)?;
    Ok(bytes)
}

fn compress(index: &LayerIndex) -> Result<Vec<u8>, TransferError> {
    zstd::bulk::compress(&encode_index(index), ZSTD_LEVEL).map_err(|source| {
        crate::layer::LayerError::Io { digest: index.blob_digest.clone(), source }.into()
    })
}

/// Pushes the blobs, the artifact manifest and (without a Referrers API)
/// the fallback tag; nothing when the newest artifact has the same indexes.
fn publish(
    repository: &Repository,
    report: &mut IndexArtifactReport,
    blobs: &[Vec<u8>],
    source: &str,
) -> Result<(), TransferError> {
    let subject = match repository.manifest(&report.subject.to_string()) {
        Ok(manifest) => manifest,
        Err(RegistryError::NotFound { .. }) => {
            let name = repository.full_name();
            return Err(invalid(
                format!("{name}@{}", report.subject),
                format!(
                    "the image is not there: push the image first (`rmount push {source} {name}`)"
                ),
            ));
        }
        Err(e) => return Err(e.into()),
    };
    let listing = list_referrers(repository, &subject.digest)?;
    if let Some(current) = listing.bytes().map(newest_artifact).transpose()?.flatten() {
        let wanted = wanted_blobs(&report.layers, report.prefetch_list.as_ref());
        match artifact_blobs(repository, &current, &subject.digest) {
            Ok(published) if published == wanted => {
                report.artifact = Some(current);
                report.already_published = true;
                return Ok(());
            }
            Ok(published) => {
                if published.prefetch_list.is_some() && wanted.prefetch_list.is_none() {
                    tracing::warn!(
                        artifact = %current,
                        "the published artifact has a prefetch list and the new one will not \
                         (give --prefetch-list to publish one)"
                    );
                }
            }
            Err(e) => {
                tracing::warn!(artifact = %current, error = %e, "replacing an unusable index artifact")
            }
        }
    }
    repository.push_blob_bytes(EMPTY_CONFIG)?;
    for blob in blobs {
        repository.push_blob_bytes(blob)?;
    }
    let created = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let manifest =
        artifact_manifest(&subject, &report.layers, report.prefetch_list.as_ref(), &created);
    let digest =
        repository.put_manifest(&Digest::of(&manifest).to_string(), OCI_MANIFEST, &manifest)?;
    if let Referrers::Fallback(existing) = &listing {
        let tag = fallback_tag(&subject.digest);
        let descriptor = json!({
            "mediaType": OCI_MANIFEST,
            "digest": digest.to_string(),
            "size": manifest.len(),
            "artifactType": INDEX_ARTIFACT_TYPE,
            "annotations": { CREATED: created },
        });
        let existing = existing.as_ref().map(|m| m.bytes.as_slice());
        let index = with_referrer(existing, descriptor).map_err(|reason| invalid(&tag, reason))?;
        repository.put_manifest(&tag, OCI_INDEX, &index)?;
        report.fallback_tag = Some(tag);
    }
    report.artifact = Some(digest);
    Ok(())
}

/// Where the referrers of a manifest are listed.
enum Referrers {
    /// The Referrers API answered with this index.
    Api(Vec<u8>),
    /// No Referrers API: the tag schema's index, if the tag exists.
    Fallback(Option<Manifest>),
}

impl Referrers {
    fn bytes(&self) -> Option<&[u8]> {
        match self {
            Referrers::Api(bytes) => Some(bytes),
            Referrers::Fallback(manifest) => manifest.as_ref().map(|m| m.bytes.as_slice()),
        }
    }
}

fn list_referrers(repository: &Repository, subject: &Digest) -> Result<Referrers, TransferError> {
    if let Some(bytes) = repository.referrers(subject, Some(INDEX_ARTIFACT_TYPE))? {
        return Ok(Referrers::Api(bytes));
    }
    match repository.manifest(&fallback_tag(subject)) {
        Ok(manifest) => Ok(Referrers::Fallback(Some(manifest))),
        Err(RegistryError::NotFound { .. }) => Ok(Referrers::Fallback(None)),
        Err(e) => Err(e.into()),
    }
}

/// The tag schema's tag for the referrers of `subject`: `sha256-<hex>`.
fn fallback_tag(subject: &Digest) -> String {
    format!("sha256-{}", subject.hex())
}

/// A descriptor in a referrers listing.
#[derive(serde::Deserialize)]
struct Listed {
    digest: String,
    #[serde(rename = "artifactType", default)]
    artifact_type: Option<String>,
    #[serde(default)]
    annotations: Option<HashMap<String, String>>,
}

#[derive(serde::Deserialize)]
struct Listing {
    #[serde(default)]
    manifests: Vec<Listed>,
}

/// The newest rmount index artifact in a referrers listing: the latest
/// `created` annotation, a later entry winning ties (and undated ones).
fn newest_artifact(listing: &[u8]) -> Result<Option<Digest>, TransferError> {
    let listing: Listing =
        serde_json::from_slice(listing).map_err(|e| invalid("referrers listing", e))?;
    let newest = listing
        .manifests
        .iter()
        .enumerate()
        .filter(|(_, d)| d.artifact_type.as_deref() == Some(INDEX_ARTIFACT_TYPE))
        .filter_map(|(position, d)| {
            let digest = d.digest.parse::<Digest>().ok()?;
            let created = d.annotations.as_ref().and_then(|a| a.get(CREATED));
            let created = created.and_then(|c| chrono::DateTime::parse_from_rfc3339(c).ok());
            Some(((created, position), digest))
        })
        .max_by(|a, b| a.0.cmp(&b.0));
    Ok(newest.map(|(_, digest)| digest))
}

/// The fields of an artifact manifest we read.
#[derive(serde::Deserialize)]
struct Artifact {
    #[serde(rename = "artifactType", default)]
    artifact_type: Option<String>,
    #[serde(default)]
    layers: Vec<Blob>,
    subject: Option<Subject>,
}

#[derive(serde::Deserialize)]
struct Blob {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    annotations: Option<HashMap<String, String>>,
}

#[derive(serde::Deserialize)]
struct Subject {
    digest: String,
}

/// Index blobs by the layer they index: (blob digest, size).
type IndexBlobs = HashMap<Digest, (Digest, u64)>;

/// The blobs of an index artifact that rmount reads.
#[derive(Debug, Default, PartialEq, Eq)]
struct ArtifactBlobs {
    /// The layer indexes.
    indexes: IndexBlobs,
    /// The prefetch list: (blob digest, size).
    prefetch_list: Option<(Digest, u64)>,
}

/// The blobs an artifact of `layers` and `list` has.
fn wanted_blobs(layers: &[IndexedLayer], list: Option<&ListBlob>) -> ArtifactBlobs {
    ArtifactBlobs {
        indexes: layers
            .iter()
            .map(|l| (l.digest.clone(), (l.index_digest.clone(), l.index_size)))
            .collect(),
        prefetch_list: list.map(|l| (l.digest.clone(), l.size)),
    }
}

/// Fetches the artifact manifest `artifact` (verified by its digest) and
/// lists its blobs; it must be an rmount index of `subject`.
fn artifact_blobs(
    repository: &Repository,
    artifact: &Digest,
    subject: &Digest,
) -> Result<ArtifactBlobs, TransferError> {
    let manifest = repository.manifest(&artifact.to_string())?;
    parse_artifact(&manifest.bytes, subject).map_err(|reason| {
        invalid(format!("index artifact {artifact} in {}", repository.full_name()), reason)
    })
}

/// The blobs of an artifact manifest, which must be an rmount index of
/// `subject`. A malformed index descriptor is an error; of the prefetch
/// list descriptors the first well-formed one counts (it is optional).
fn parse_artifact(bytes: &[u8], subject: &Digest) -> Result<ArtifactBlobs, String> {
    let parsed: Artifact = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if parsed.artifact_type.as_deref() != Some(INDEX_ARTIFACT_TYPE) {
        return Err(format!("its artifactType is not {INDEX_ARTIFACT_TYPE}"));
    }
    let about = parsed.subject.map(|s| s.digest);
    if about.as_deref() != Some(subject.to_string().as_str()) {
        return Err(format!("its subject is {about:?}, not {subject}"));
    }
    let mut blobs = ArtifactBlobs::default();
    for blob in parsed.layers.iter().filter(|b| b.media_type == LAYER_INDEX_MEDIA_TYPE) {
        let layer = blob.annotations.as_ref().and_then(|a| a.get(LAYER_DIGEST_ANNOTATION));
        let layer = layer
            .ok_or_else(|| format!("blob {} has no {LAYER_DIGEST_ANNOTATION}", blob.digest))?;
        let layer = layer.parse::<Digest>().map_err(|e| e.to_string())?;
        let digest = blob.digest.parse::<Digest>().map_err(|e| e.to_string())?;
        blobs.indexes.insert(layer, (digest, blob.size));
    }
    blobs.prefetch_list = parsed
        .layers
        .iter()
        .filter(|b| b.media_type == PREFETCH_LIST_MEDIA_TYPE)
        .find_map(|b| Some((b.digest.parse::<Digest>().ok()?, b.size)));
    Ok(blobs)
}

/// Downloads and verifies one index blob; `None` (with a warning) when it
/// does not decode to a current-version index of `layer`.
fn download_index(
    repository: &Repository,
    layer: &Digest,
    blob: &Digest,
    size: u64,
) -> Result<Option<LayerIndex>, TransferError> {
    if size > MAX_INDEX_BLOB {
        return Err(invalid(
            format!("index {blob} of layer {layer}"),
            format!("{size} bytes is more than the {MAX_INDEX_BLOB} allowed"),
        ));
    }
    let data = repository.read_range(blob, 0, size)?;
    let actual = Digest::of(&data);
    if &actual != blob {
        return Err(RegistryError::DigestMismatch {
            what: format!("index of layer {layer} in {}", repository.full_name()),
            expected: blob.to_string(),
            actual,
        }
        .into());
    }
    let index = decompress(&data).and_then(|bytes| {
        decode_index(&bytes, layer)
            .ok_or_else(|| "another index format version, or not this layer's index".to_string())
    });
    match index {
        Ok(index) => Ok(Some(index)),
        Err(reason) => {
            tracing::warn!(%layer, index = %blob, %reason, "ignoring the published index");
            Ok(None)
        }
    }
}

fn decompress(data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    zstd::stream::read::Decoder::with_buffer(data)
        .and_then(|d| d.take(MAX_INDEX_SIZE + 1).read_to_end(&mut out))
        .map_err(|e| format!("not zstd: {e}"))?;
    if out.len() as u64 > MAX_INDEX_SIZE {
        return Err(format!("expands to more than {MAX_INDEX_SIZE} bytes"));
    }
    Ok(out)
}

/// The artifact manifest: empty config, one blob per layer, then the
/// prefetch list if there is one, `subject`.
fn artifact_manifest(
    subject: &Manifest,
    layers: &[IndexedLayer],
    list: Option<&ListBlob>,
    created: &str,
) -> Vec<u8> {
    let mut blobs: Vec<Value> = layers
        .iter()
        .map(|l| {
            json!({
                "mediaType": LAYER_INDEX_MEDIA_TYPE,
                "digest": l.index_digest.to_string(),
                "size": l.index_size,
                "annotations": { LAYER_DIGEST_ANNOTATION: l.digest.to_string() },
            })
        })
        .collect();
    if let Some(list) = list {
        blobs.push(json!({
            "mediaType": PREFETCH_LIST_MEDIA_TYPE,
            "digest": list.digest.to_string(),
            "size": list.size,
        }));
    }
    json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": INDEX_ARTIFACT_TYPE,
        "config": {
            "mediaType": EMPTY_MEDIA_TYPE,
            "digest": Digest::of(EMPTY_CONFIG).to_string(),
            "size": EMPTY_CONFIG.len(),
        },
        "layers": blobs,
        "subject": {
            "mediaType": subject.media_type,
            "digest": subject.digest.to_string(),
            "size": subject.bytes.len(),
        },
        "annotations": { CREATED: created },
    })
    .to_string()
    .into_bytes()
}

/// The tag schema's index with `descriptor` added, replacing any rmount
/// index descriptor and keeping everything else (other tools' referrers).
fn with_referrer(existing: Option<&[u8]>, descriptor: Value) -> Result<Vec<u8>, String> {
    let mut index = match existing {
        None => json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [] }),
        Some(bytes) => serde_json::from_slice(bytes).map_err(|e| e.to_string())?,
    };
    let Some(manifests) = index.get_mut("manifests").and_then(Value::as_array_mut) else {
        return Err("holds something other than an image index; not overwriting it".into());
    };
    manifests
        .retain(|d| d.get("artifactType").and_then(Value::as_str) != Some(INDEX_ARTIFACT_TYPE));
    manifests.push(descriptor);
    index["mediaType"] = json!(OCI_INDEX);
    Ok(index.to_string().into_bytes())
}

fn invalid(what: impl Into<String>, reason: impl std::fmt::Display) -> TransferError {
    TransferError::Invalid { what: what.into(), reason: reason.to_string() }
}

#[cfg(test)]
mod tests;
