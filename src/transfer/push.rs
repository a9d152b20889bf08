//! `push`: a stored image, or a whole stored index, to a registry.
//!
//! Blobs go first and manifests last, children before their index, so the
//! registry never sees a manifest naming a blob or manifest it lacks (it
//! would refuse it, and a reader could see a half-pushed image). The stored
//! manifest bytes are pushed unchanged: re-serialising them would change
//! the digest, and with it the identity the user pushed.
//!
//! A blob moves only when it must: `HEAD` skips what the repository has;
//! a blob of another image the store names on the same registry is first
//! mounted from that repository (the registry links it, no bytes move, as
//! `docker push` does between repositories); only then are bytes sent.
//! Several blobs move in parallel, each on a scoped thread. Uploads need
//! `'static` request bodies, so the workers cannot call the caller's
//! [`Progress`]; they send events over a channel and the calling thread
//! reports them, so `Progress` is only ever called from one thread.

use super::{BlobOutcome, Progress, TransferError};
use crate::digest::Digest;
use crate::reference::Reference;
use crate::registry::{Action, BlobPush, BlobPushed, Client, Repository};
use crate::store::{Store, StoreError};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;

/// How to push.
#[derive(Debug, Clone)]
pub struct PushOptions {
    /// Upload blobs larger than this in chunks of this many bytes; `None`:
    /// each blob in one request.
    pub chunk_size: Option<u64>,
    /// Blobs uploaded in parallel (at least 1).
    pub jobs: usize,
}

impl Default for PushOptions {
    fn default() -> Self {
        Self { chunk_size: None, jobs: 3 }
    }
}

/// What a push put where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pushed {
    /// The normalised destination reference.
    pub reference: String,
    /// Digest of the manifest (or index) pushed.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
}

/// A manifest or index to put, exactly as stored.
struct Document {
    digest: Digest,
    media_type: String,
    bytes: Vec<u8>,
}

/// A blob to bring to the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Blob {
    digest: Digest,
    size: u64,
}

/// Everything a push sends: blobs, then `children`, then `root`.
struct Plan {
    blobs: Vec<Blob>,
    children: Vec<Document>,
    root: Document,
}

/// The fields of a manifest or index we need.
#[derive(serde::Deserialize)]
struct Json {
    #[serde(rename = "mediaType")]
    media_type: Option<String>,
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    manifests: Option<Vec<Descriptor>>,
}

#[derive(serde::Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    size: u64,
}

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// Pushes the stored image `source` (a name, `name@digest`, an id) to
/// `destination`. When the store names an index under `source`, every
/// platform image whose blobs are all stored is pushed, then the index.
pub fn push(
    store: &Store,
    client: &Client,
    source: &str,
    destination: &Reference,
    options: &PushOptions,
    progress: &dyn Progress,
) -> Result<Pushed, TransferError> {
    let (digest, media_type) = find_root(store, source)?;
    if let Some(wanted) = &destination.digest {
        if wanted != &digest {
            return Err(TransferError::Invalid {
                what: destination.to_string(),
                reason: format!("{source} is {digest}, not the digest given"),
            });
        }
    }
    let plan = plan(store, source, &digest, &media_type)?;
    let repository = client.repository(destination, Action::Push)?;
    let sources = mount_sources(store, destination);
    push_blobs(store, &repository, &plan.blobs, &sources, options, progress)?;
    for child in &plan.children {
        repository.put_manifest(&child.digest.to_string(), &child.media_type, &child.bytes)?;
    }
    let root = &plan.root;
    let tag = destination.tag.clone().unwrap_or_else(|| root.digest.to_string());
    let digest = repository.put_manifest(&tag, &root.media_type, &root.bytes)?;
    Ok(Pushed { reference: destination.to_string(), digest, size: root.bytes.len() as u64 })
}

/// The manifest or index `source` names, and its media type as recorded:
/// a name's `index.json` entry as it is (an index stays an index), else
/// whatever [`Store::resolve`] finds.
fn find_root(store: &Store, source: &str) -> Result<(Digest, String), TransferError> {
    let refs = store.refs()?;
    if let Ok(parsed) = source.parse::<Reference>() {
        match &parsed.digest {
            Some(digest) if store.blob_path(digest).exists() => {
                let entry = refs.iter().find(|r| &r.manifest == digest);
                let media_type = entry.map(|e| e.media_type.clone()).unwrap_or_default();
                return Ok((digest.clone(), media_type));
            }
            Some(_) => {}
            None => {
                let name = parsed.to_string();
                if let Some(entry) = refs.iter().find(|r| r.name.as_deref() == Some(&name)) {
                    return Ok((entry.manifest.clone(), entry.media_type.clone()));
                }
            }
        }
    }
    let image = store.resolve(source)?;
    Ok((image.manifest_digest, image.manifest_media_type))
}

/// Reads the root document and decides what to send.
fn plan(
    store: &Store,
    source: &str,
    digest: &Digest,
    media_type: &str,
) -> Result<Plan, TransferError> {
    let (root, json) = read_document(store, digest, media_type)?;
    let Some(manifests) = json.manifests else {
        let blobs = image_blobs(store, &json, &format!("image {source}"))?;
        return Ok(Plan { blobs, children: Vec::new(), root });
    };
    let mut blobs = Vec::new();
    let mut children = Vec::new();
    for child in &manifests {
        let complete = parse_digest(&child.digest).and_then(|d| {
            let (doc, json) = read_document(store, &d, &child.media_type)?;
            if json.manifests.is_some() {
                return Err(invalid(d.to_string(), "an index inside an index is not supported"));
            }
            let blobs = image_blobs(store, &json, &format!("manifest {d}"))?;
            Ok((doc, blobs))
        });
        match complete {
            Ok((doc, child_blobs)) => {
                children.push(doc);
                blobs.extend(child_blobs);
            }
            Err(e) => {
                tracing::warn!(manifest = %child.digest, error = %e, "not pushing this platform")
            }
        }
    }
    if children.is_empty() {
        return Err(invalid(
            format!("index {digest}"),
            "none of its images is complete in the store; pull it again",
        ));
    }
    if children.len() < manifests.len() {
        tracing::warn!(index = %digest, "pushing an index whose images are not all stored; the registry may refuse it");
    }
    let mut seen = HashSet::new();
    blobs.retain(|b| seen.insert(b.digest.clone()));
    Ok(Plan { blobs, children, root })
}

/// A stored manifest or index, its media type (its own `mediaType`, else
/// the one recorded for it, else what its shape says) and its fields.
fn read_document(
    store: &Store,
    digest: &Digest,
    recorded: &str,
) -> Result<(Document, Json), TransferError> {
    let bytes = store.read_blob(digest, "manifest")?;
    let json: Json =
        serde_json::from_slice(&bytes).map_err(|e| invalid(format!("manifest {digest}"), e))?;
    let media_type = match &json.media_type {
        Some(t) if !t.is_empty() => t.clone(),
        _ if !recorded.is_empty() => recorded.to_string(),
        _ if json.manifests.is_some() => OCI_INDEX.to_string(),
        _ => OCI_MANIFEST.to_string(),
    };
    Ok((Document { digest: digest.clone(), media_type, bytes }, json))
}

/// The config and layers of an image manifest, each checked to be stored
/// with the size the manifest gives. Non-distributable (foreign) layers are
/// left out: registries fetch them from their URLs, and so does Docker.
fn image_blobs(store: &Store, json: &Json, what: &str) -> Result<Vec<Blob>, TransferError> {
    let config = json.config.as_ref().ok_or_else(|| invalid(what, "no config"))?;
    let mut blobs = Vec::new();
    for (i, d) in std::iter::once(config).chain(&json.layers).enumerate() {
        if is_foreign(&d.media_type) {
            continue;
        }
        let digest = parse_digest(&d.digest)?;
        let role = if i == 0 { "config".to_string() } else { format!("layer {i}") };
        let path = store.blob_path(&digest);
        let size = match std::fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let what = format!("{role} of {what}");
                return Err(StoreError::MissingBlob { digest, what }.into());
            }
            Err(source) => return Err(StoreError::Io { path, source }.into()),
        };
        if size != d.size {
            return Err(invalid(
                format!("{role} {digest} of {what}"),
                format!("the manifest says {} bytes, the store has {size}", d.size),
            ));
        }
        blobs.push(Blob { digest, size });
    }
    Ok(blobs)
}

fn is_foreign(media_type: &str) -> bool {
    media_type.contains("nondistributable") || media_type.contains("foreign")
}

/// Blobs that images stored under other repositories of the destination's
/// registry contain, and one such repository for each: candidates for a
/// cross-repository mount. Best effort: unreadable entries are skipped.
fn mount_sources(store: &Store, destination: &Reference) -> HashMap<Digest, String> {
    let mut sources = HashMap::new();
    let Ok(refs) = store.refs() else { return sources };
    for entry in refs {
        let Some(name) = entry.name.as_deref().and_then(|n| n.parse::<Reference>().ok()) else {
            continue;
        };
        if name.registry != destination.registry || name.repository == destination.repository {
            continue;
        }
        let Ok((_, json)) = read_document(store, &entry.manifest, &entry.media_type) else {
            continue;
        };
        let mut images = Vec::new();
        match &json.manifests {
            None => images.push(json),
            Some(children) => {
                for child in children {
                    let Ok(digest) = parse_digest(&child.digest) else { continue };
                    if let Ok((_, json)) = read_document(store, &digest, &child.media_type) {
                        images.push(json);
                    }
                }
            }
        }
        for image in &images {
            for d in image.config.iter().chain(&image.layers) {
                if let Ok(digest) = parse_digest(&d.digest) {
                    sources.entry(digest).or_insert_with(|| name.repository.clone());
                }
            }
        }
    }
    sources
}

/// What a worker tells the calling thread; blobs by index into the list.
enum Event {
    Started(usize),
    Advanced(usize, u64),
    Finished(usize, Result<BlobOutcome, TransferError>),
}

/// Brings `blobs` to the repository, up to `options.jobs` at a time. After
/// the first failure no new blob is started; that failure is returned once
/// the running ones end.
fn push_blobs(
    store: &Store,
    repository: &Repository,
    blobs: &[Blob],
    sources: &HashMap<Digest, String>,
    options: &PushOptions,
    progress: &dyn Progress,
) -> Result<(), TransferError> {
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let mut first_error = None;
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel();
        for _ in 0..options.jobs.clamp(1, blobs.len().max(1)) {
            let (tx, next, failed) = (tx.clone(), &next, &failed);
            scope.spawn(move || loop {
                if failed.load(Ordering::Relaxed) {
                    return;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(blob) = blobs.get(i) else { return };
                let _ = tx.send(Event::Started(i));
                let report = tx.clone();
                let advanced = move |n| {
                    let _ = report.send(Event::Advanced(i, n));
                };
                let from = sources.get(&blob.digest);
                let result = push_blob(store, repository, blob, from, options.chunk_size, advanced);
                if result.is_err() {
                    failed.store(true, Ordering::Relaxed);
                }
                let _ = tx.send(Event::Finished(i, result));
            });
        }
        drop(tx);
        for event in rx {
            match event {
                Event::Started(i) => progress.blob_started(&blobs[i].digest, blobs[i].size),
                Event::Advanced(i, n) => progress.blob_advanced(&blobs[i].digest, n),
                Event::Finished(i, Ok(outcome)) => {
                    progress.blob_finished(&blobs[i].digest, &outcome)
                }
                Event::Finished(_, Err(e)) => {
                    first_error.get_or_insert(e);
                }
            }
        }
    });
    first_error.map_or(Ok(()), Err)
}

/// One blob: already there, mounted from `from`, or uploaded.
fn push_blob(
    store: &Store,
    repository: &Repository,
    blob: &Blob,
    from: Option<&String>,
    chunk_size: Option<u64>,
    advanced: impl Fn(u64) + Send + Sync + 'static,
) -> Result<BlobOutcome, TransferError> {
    if repository.has_blob(&blob.digest)? {
        return Ok(BlobOutcome::Existing);
    }
    let request = BlobPush {
        digest: blob.digest.clone(),
        size: blob.size,
        path: store.blob_path(&blob.digest),
        chunk_size,
        mount_from: from.cloned(),
    };
    Ok(match (repository.push_blob(&request, advanced)?, from) {
        (BlobPushed::Mounted, Some(from)) => BlobOutcome::Mounted { from: from.clone() },
        _ => BlobOutcome::Transferred,
    })
}

fn parse_digest(text: &str) -> Result<Digest, TransferError> {
    text.parse().map_err(|e| invalid(format!("descriptor {text}"), e))
}

fn invalid(what: impl Into<String>, reason: impl std::fmt::Display) -> TransferError {
    TransferError::Invalid { what: what.into(), reason: reason.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    fn store_with(blobs: &[&[u8]]) -> (tempfile::TempDir, Store, Vec<Digest>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let digests = blobs.iter().map(|b| store.put_blob_bytes(b).unwrap()).collect();
        (dir, store, digests)
    }

    fn manifest(config: &Digest, config_size: usize, layers: &[(&Digest, usize)]) -> Vec<u8> {
        let layers: Vec<_> = layers
            .iter()
            .map(|(d, s)| format!(r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{d}","size":{s}}}"#))
            .collect();
        format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":{config_size}}},"layers":[{}]}}"#,
            layers.join(",")
        )
        .into_bytes()
    }

    #[test]
    fn an_index_pushes_its_complete_images_and_their_blobs_once() {
        let (_dir, store, d) = store_with(&[b"{}", b"layer"]);
        let (config, layer) = (&d[0], &d[1]);
        let good = manifest(config, 2, &[(layer, 5), (layer, 5)]);
        let missing: Digest = A.parse().unwrap();
        let broken = manifest(config, 2, &[(&missing, 3)]);
        let good_d = store.put_blob_bytes(&good).unwrap();
        let broken_d = store.put_blob_bytes(&broken).unwrap();
        let index = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{good_d}","size":{}}},{{"mediaType":"{OCI_MANIFEST}","digest":"{broken_d}","size":{}}}]}}"#,
            good.len(),
            broken.len()
        );
        let index_d = store.put_blob_bytes(index.as_bytes()).unwrap();
        store
            .set_ref(crate::store::RefEntry {
                name: Some("docker.io/library/multi:latest".into()),
                manifest: index_d.clone(),
                media_type: OCI_INDEX.into(),
                size: index.len() as u64,
            })
            .unwrap();

        let (root, media_type) = find_root(&store, "multi").unwrap();
        assert_eq!((&root, media_type.as_str()), (&index_d, OCI_INDEX));
        let plan = plan(&store, "multi", &root, &media_type).unwrap();
        assert_eq!(plan.root.bytes, index.as_bytes());
        assert_eq!(plan.root.media_type, OCI_INDEX, "from the entry: the JSON has none");
        assert_eq!(plan.children.len(), 1, "the image with a missing layer is skipped");
        assert_eq!(plan.children[0].digest, good_d);
        assert_eq!(plan.children[0].media_type, OCI_MANIFEST);
        let blobs: Vec<_> = plan.blobs.iter().map(|b| (&b.digest, b.size)).collect();
        assert_eq!(blobs, [(config, 2), (layer, 5)]);
    }

    #[test]
    fn a_single_image_needs_all_its_blobs_at_their_sizes() {
        let (_dir, store, d) = store_with(&[b"{}", b"layer"]);
        let missing: Digest = A.parse().unwrap();
        for (layers, expect) in [
            (vec![(&d[1], 5)], None),
            (vec![(&missing, 5)], Some("missing")),
            (vec![(&d[1], 6)], Some("says 6 bytes")),
        ] {
            let bytes = manifest(&d[0], 2, &layers);
            let digest = store.put_blob_bytes(&bytes).unwrap();
            let result = plan(&store, "x", &digest, "");
            match expect {
                None => {
                    let plan = result.unwrap();
                    assert!(plan.children.is_empty());
                    assert_eq!(plan.root.media_type, OCI_MANIFEST, "from the shape");
                    assert_eq!(plan.blobs.len(), 2);
                }
                Some(text) => {
                    let err = result.err().unwrap().to_string();
                    assert!(err.contains(text), "{err}");
                }
            }
        }
    }

    #[test]
    fn foreign_layers_are_not_pushed() {
        let (_dir, store, d) = store_with(&[b"{}"]);
        let bytes = format!(
            r#"{{"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{{"digest":"{}","size":2}},"layers":[{{"mediaType":"application/vnd.docker.image.rootfs.foreign.diff.tar.gzip","digest":"{A}","size":9}}]}}"#,
            d[0]
        );
        let digest = store.put_blob_bytes(bytes.as_bytes()).unwrap();
        let plan = plan(&store, "x", &digest, OCI_MANIFEST).unwrap();
        assert_eq!(plan.blobs, [Blob { digest: d[0].clone(), size: 2 }]);
        assert_eq!(plan.root.media_type, "application/vnd.docker.distribution.manifest.v2+json");
    }

    #[test]
    fn mounts_come_from_other_repositories_of_the_same_registry() {
        let (_dir, store, d) = store_with(&[b"{}", b"layer"]);
        let bytes = manifest(&d[0], 2, &[(&d[1], 5)]);
        let m = store.put_blob_bytes(&bytes).unwrap();
        for name in ["reg.io:5000/team/a:1", "reg.io:5000/team/b:1", "other.io/team/c:1"] {
            store
                .set_ref(crate::store::RefEntry {
                    name: Some(name.into()),
                    manifest: m.clone(),
                    media_type: OCI_MANIFEST.into(),
                    size: bytes.len() as u64,
                })
                .unwrap();
        }
        let destination: Reference = "reg.io:5000/team/b:2".parse().unwrap();
        let sources = mount_sources(&store, &destination);
        assert_eq!(sources.get(&d[1]).map(String::as_str), Some("team/a"));
        assert_eq!(sources.get(&d[0]).map(String::as_str), Some("team/a"));
        let elsewhere: Reference = "new.io/x:1".parse().unwrap();
        assert!(mount_sources(&store, &elsewhere).is_empty());
    }
}
