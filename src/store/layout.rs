//! Blobs and refs on disk: verified blob writes, and `index.json` updates
//! under an exclusive lock so concurrent commands never lose a ref.

use super::{io_err, Store, StoreError, REF_NAME};
use crate::digest::{Digest, HashingWriter};
use crate::durable::{write_atomic, AtomicFile};
use oci_spec::image::{Descriptor, ImageIndex, ImageIndexBuilder, MediaType};
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};

const OCI_LAYOUT: &str = r#"{"imageLayoutVersion":"1.0.0"}"#;

/// One `index.json` entry: a manifest and the reference naming it, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefEntry {
    /// Full normalised reference, or `None` for an untagged image.
    pub name: Option<String>,
    /// The manifest.
    pub manifest: Digest,
    /// The manifest's media type.
    pub media_type: String,
    /// The manifest's size.
    pub size: u64,
}

pub(super) fn init(store: &Store) -> Result<(), StoreError> {
    let root = store.root();
    std::fs::create_dir_all(root.join("blobs/sha256")).map_err(io_err(root))?;
    let layout = root.join("oci-layout");
    if !layout.exists() {
        write_atomic(&layout, OCI_LAYOUT.as_bytes()).map_err(io_err(&layout))?;
    }
    let index = root.join("index.json");
    if !index.exists() {
        write_refs(store, &[])?;
    }
    Ok(())
}

/// Holds the store's exclusive lock for ref updates until dropped.
pub(super) struct RefLock(#[allow(dead_code)] File);

impl Store {
    /// Copies `content` into the store as the blob `expected`, verifying the
    /// digest before the blob becomes visible. Returns its size.
    pub fn put_blob(&self, content: &mut dyn Read, expected: &Digest) -> Result<u64, StoreError> {
        let dest = self.blob_path(expected);
        if dest.exists() {
            return Ok(std::fs::metadata(&dest).map_err(io_err(&dest))?.len());
        }
        let file = AtomicFile::create(&dest).map_err(io_err(&dest))?;
        let mut writer = HashingWriter::new(file);
        io::copy(content, &mut writer).map_err(io_err(&dest))?;
        let (actual, size, file) = writer.finish();
        if &actual != expected {
            return Err(StoreError::DigestMismatch { expected: expected.clone(), actual });
        }
        file.commit().map_err(io_err(&dest))?;
        Ok(size)
    }

    /// Stores `data` as a blob and returns its digest.
    pub fn put_blob_bytes(&self, data: &[u8]) -> Result<Digest, StoreError> {
        let digest = Digest::of(data);
        self.put_blob(&mut &data[..], &digest)?;
        Ok(digest)
    }

    /// Reads a whole (small) blob: a manifest, index or config.
    pub fn read_blob(&self, digest: &Digest, what: &str) -> Result<Vec<u8>, StoreError> {
        let path = self.blob_path(digest);
        match std::fs::read(&path) {
            Ok(data) => Ok(data),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(StoreError::MissingBlob { digest: digest.clone(), what: what.to_string() })
            }
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// All `index.json` entries.
    pub fn refs(&self) -> Result<Vec<RefEntry>, StoreError> {
        let path = self.root().join("index.json");
        let data = std::fs::read(&path).map_err(io_err(&path))?;
        let index: ImageIndex = serde_json::from_slice(&data).map_err(|e| StoreError::Invalid {
            what: path.display().to_string(),
            reason: e.to_string(),
        })?;
        index
            .manifests()
            .iter()
            .map(|d| {
                let name = d.annotations().as_ref().and_then(|a| a.get(REF_NAME)).cloned();
                Ok(RefEntry {
                    name,
                    manifest: oci_digest(d)?,
                    media_type: d.media_type().to_string(),
                    size: d.size(),
                })
            })
            .collect()
    }

    /// Takes the exclusive ref lock.
    pub(super) fn lock_refs(&self) -> Result<RefLock, StoreError> {
        let path = self.root().join("index.lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| io_err(&path)(e.into()))?;
        Ok(RefLock(file))
    }

    /// Applies `change` to the entries under the ref lock and writes them back.
    pub(super) fn update_refs<T>(
        &self,
        change: impl FnOnce(&mut Vec<RefEntry>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let _lock = self.lock_refs()?;
        let mut refs = self.refs()?;
        let result = change(&mut refs)?;
        write_refs(self, &refs)?;
        Ok(result)
    }

    /// Points `name` at `entry`'s manifest (replacing what it named), or adds
    /// an untagged entry when `entry.name` is `None` and the manifest is not
    /// referenced yet.
    pub fn set_ref(&self, entry: RefEntry) -> Result<(), StoreError> {
        self.update_refs(|refs| {
            match &entry.name {
                Some(name) => refs.retain(|r| r.name.as_ref() != Some(name)),
                None if refs.iter().any(|r| r.manifest == entry.manifest) => return Ok(()),
                None => {}
            }
            // A tagged entry replaces an untagged one for the same manifest.
            refs.retain(|r| !(r.name.is_none() && r.manifest == entry.manifest));
            refs.push(entry);
            Ok(())
        })
    }
}

fn write_refs(store: &Store, refs: &[RefEntry]) -> Result<(), StoreError> {
    let manifests = refs
        .iter()
        .map(|r| {
            let digest: oci_spec::image::Digest =
                r.manifest.to_string().parse().map_err(|e: oci_spec::OciSpecError| {
                    StoreError::Invalid { what: r.manifest.to_string(), reason: e.to_string() }
                })?;
            let mut d = Descriptor::new(MediaType::from(r.media_type.as_str()), r.size, digest);
            if let Some(name) = &r.name {
                d.set_annotations(Some(HashMap::from([(REF_NAME.to_string(), name.clone())])));
            }
            Ok(d)
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    let index =
        ImageIndexBuilder::default().schema_version(2u32).manifests(manifests).build().map_err(
            |e| StoreError::Invalid { what: "index.json".into(), reason: e.to_string() },
        )?;
    let path = store.root().join("index.json");
    let json = serde_json::to_vec_pretty(&index)
        .map_err(|e| StoreError::Invalid { what: "index.json".into(), reason: e.to_string() })?;
    write_atomic(&path, &json).map_err(io_err(&path))
}

/// Our digest type from an OCI descriptor's.
pub(crate) fn oci_digest(d: &Descriptor) -> Result<Digest, StoreError> {
    d.digest().to_string().parse().map_err(|e: crate::digest::DigestError| StoreError::Invalid {
        what: format!("descriptor {}", d.digest()),
        reason: e.to_string(),
    })
}
