//! Loading images from, and saving them to, the formats other tools write:
//! an OCI image layout (a directory or a tar of one, skopeo's `oci:` and
//! `oci-archive:`) and a `docker save` tarball (skopeo's `docker-archive:`).
//!
//! A tar is read in one streaming pass: large members go straight into the
//! store as blobs (hashed on the way, verified against their names), small
//! ones (JSON documents) stay in memory. Refs are written last, after every
//! blob they reach is in place and verified.

use super::layout::oci_digest;
use super::{io_err, RefEntry, Store, StoreError};
use crate::digest::{Digest, HashingWriter};
use crate::durable::AtomicFile;
use crate::reference::Reference;
use oci_spec::image::{Descriptor, ImageIndex, ImageManifest, MediaType};
use serde::Deserialize;
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// Archive members up to this size are kept in memory (manifests, configs).
const SMALL: u64 = 4 << 20;
/// The annotation containerd and skopeo use for an image's full name.
pub(super) const CONTAINERD_NAME: &str = "io.containerd.image.name";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// Archive formats `save` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveFormat {
    /// An OCI image layout in a tar.
    OciArchive,
    /// The `docker save` format.
    DockerArchive,
}

/// One image a `load` stored.
#[derive(Debug, Clone)]
pub struct LoadedImage {
    /// The name it was tagged with, if any.
    pub reference: Option<String>,
    /// Its id (config digest).
    pub id: Digest,
}

/// Where archive members come from: a directory, or a tar already streamed.
enum Source {
    Dir(PathBuf),
    Tar { small: HashMap<String, Vec<u8>>, blobs: HashMap<String, Digest> },
}

impl Source {
    fn has(&self, path: &str) -> bool {
        match self {
            Source::Dir(dir) => dir.join(path).exists(),
            Source::Tar { small, blobs } => small.contains_key(path) || blobs.contains_key(path),
        }
    }

    fn read(&self, store: &Store, path: &str) -> Result<Vec<u8>, StoreError> {
        match self {
            Source::Dir(dir) => {
                let p = dir.join(path);
                std::fs::read(&p).map_err(io_err(&p))
            }
            Source::Tar { small, blobs } => match (small.get(path), blobs.get(path)) {
                (Some(data), _) => Ok(data.clone()),
                (None, Some(digest)) => store.read_blob(digest, path),
                (None, None) => Err(missing_member(path)),
            },
        }
    }

    /// Puts the member `path` into the store, checking it against
    /// `expected` when given; returns its digest and size.
    fn import(
        &self,
        store: &Store,
        path: &str,
        expected: Option<&Digest>,
    ) -> Result<(Digest, u64), StoreError> {
        let check = |actual: Digest, size: u64| match expected {
            Some(e) if e != &actual => {
                Err(StoreError::DigestMismatch { expected: e.clone(), actual })
            }
            _ => Ok((actual, size)),
        };
        match self {
            Source::Dir(dir) => {
                let p = dir.join(path);
                let mut file = File::open(&p).map_err(|e| match e.kind() {
                    io::ErrorKind::NotFound => missing_member(path),
                    _ => io_err(&p)(e),
                })?;
                match expected {
                    Some(d) => Ok((d.clone(), store.put_blob(&mut file, d)?)),
                    None => store_unnamed(store, &mut file),
                }
            }
            Source::Tar { small, blobs } => match (small.get(path), blobs.get(path)) {
                (Some(data), _) => {
                    let actual = Digest::of(data);
                    let (digest, size) = check(actual, data.len() as u64)?;
                    store.put_blob(&mut &data[..], &digest)?;
                    Ok((digest, size))
                }
                (None, Some(digest)) => {
                    let size = std::fs::metadata(store.blob_path(digest)).map_or(0, |m| m.len());
                    check(digest.clone(), size)
                }
                (None, None) => Err(missing_member(path)),
            },
        }
    }
}

fn missing_member(path: &str) -> StoreError {
    match path.strip_prefix("blobs/sha256/").and_then(|h| format!("sha256:{h}").parse().ok()) {
        Some(digest) => StoreError::MissingBlob { digest, what: "named by the archive".into() },
        None => {
            StoreError::Invalid { what: path.into(), reason: "missing from the archive".into() }
        }
    }
}

/// Stores content whose digest is not known in advance.
fn store_unnamed(store: &Store, content: &mut dyn Read) -> Result<(Digest, u64), StoreError> {
    let tmp_dest = store.root().join("blobs/sha256/incoming");
    let file = AtomicFile::create(&tmp_dest).map_err(io_err(&tmp_dest))?;
    let mut writer = HashingWriter::new(file);
    io::copy(content, &mut writer).map_err(io_err(&tmp_dest))?;
    let (digest, size, mut file) = writer.finish();
    file.flush().map_err(io_err(&tmp_dest))?;
    let dest = store.blob_path(&digest);
    if !dest.exists() {
        file.commit_to(&dest).map_err(io_err(&dest))?;
    }
    Ok((digest, size))
}

impl Store {
    /// Loads every image of an OCI layout (dir or tar) or docker-archive.
    pub fn load(&self, input: &Path) -> Result<Vec<LoadedImage>, StoreError> {
        let source =
            if input.is_dir() { Source::Dir(input.to_path_buf()) } else { self.stream_tar(input)? };
        let stem = input
            .file_stem()
            .map(|s| s.to_string_lossy().to_lowercase())
            .unwrap_or_else(|| "image".into());
        if source.has("oci-layout") && source.has("index.json") {
            self.load_oci(&source, &stem)
        } else if source.has("manifest.json") {
            self.load_docker(&source)
        } else {
            Err(StoreError::UnknownArchive(input.to_path_buf()))
        }
    }

    fn stream_tar(&self, input: &Path) -> Result<Source, StoreError> {
        let file = File::open(input).map_err(io_err(input))?;
        let mut archive = tar::Archive::new(io::BufReader::new(file));
        let bad = |e: io::Error| StoreError::Invalid {
            what: input.display().to_string(),
            reason: format!("not a readable tar archive: {e}"),
        };
        let mut small = HashMap::new();
        let mut blobs = HashMap::new();
        for entry in archive.entries().map_err(bad)? {
            let mut entry = entry.map_err(bad)?;
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let path = entry.path().map_err(bad)?.to_string_lossy().into_owned();
            let path = path.trim_start_matches("./").to_string();
            if entry.size() <= SMALL {
                let mut data = Vec::with_capacity(entry.size() as usize);
                entry.read_to_end(&mut data).map_err(bad)?;
                small.insert(path, data);
            } else {
                let (digest, _) = store_unnamed(self, &mut entry)?;
                if let Some(named) = path.strip_prefix("blobs/sha256/") {
                    if named != digest.hex() {
                        let expected = format!("sha256:{named}").parse().map_err(
                            |e: crate::digest::DigestError| StoreError::Invalid {
                                what: path.clone(),
                                reason: e.to_string(),
                            },
                        )?;
                        return Err(StoreError::DigestMismatch { expected, actual: digest });
                    }
                }
                blobs.insert(path, digest);
            }
        }
        Ok(Source::Tar { small, blobs })
    }

    fn load_oci(&self, source: &Source, stem: &str) -> Result<Vec<LoadedImage>, StoreError> {
        let index: ImageIndex = parse(&source.read(self, "index.json")?, "index.json")?;
        let mut loaded = Vec::new();
        let mut entries = Vec::new();
        for desc in index.manifests() {
            let digest = oci_digest(desc)?;
            self.import_manifest(source, desc)?;
            let media_type = desc.media_type().to_string();
            let image = self.image_from_manifest(&digest, &media_type, None)?;
            let name = oci_name(desc, stem);
            entries.push(RefEntry {
                name: name.clone(),
                manifest: digest,
                media_type,
                size: desc.size(),
            });
            loaded.push(LoadedImage { reference: name, id: image.config_digest });
        }
        for entry in entries {
            self.set_ref(entry)?;
        }
        Ok(loaded)
    }

    /// Imports a manifest or index and everything it reaches, blobs first.
    fn import_manifest(&self, source: &Source, desc: &Descriptor) -> Result<(), StoreError> {
        let digest = oci_digest(desc)?;
        let path = format!("blobs/sha256/{}", digest.hex());
        let data = source.read(self, &path)?;
        let json: serde_json::Value = parse(&data, &path)?;
        if json.get("manifests").is_some() {
            let child: ImageIndex = parse(&data, &path)?;
            for d in child.manifests() {
                self.import_manifest(source, d)?;
            }
        } else {
            let manifest: ImageManifest = parse(&data, &path)?;
            for d in std::iter::once(manifest.config()).chain(manifest.layers()) {
                let blob = oci_digest(d)?;
                source.import(self, &format!("blobs/sha256/{}", blob.hex()), Some(&blob))?;
            }
        }
        source.import(self, &path, Some(&digest))?;
        Ok(())
    }

    fn load_docker(&self, source: &Source) -> Result<Vec<LoadedImage>, StoreError> {
        let items: Vec<DockerManifestItem> =
            parse(&source.read(self, "manifest.json")?, "manifest.json")?;
        let mut loaded = Vec::new();
        let mut entries = Vec::new();
        for item in items {
            let (config, config_size) = source.import(self, &item.config, None)?;
            let mut layers = Vec::new();
            for layer in &item.layers {
                let (digest, size) = source.import(self, layer, None)?;
                let media_type = layer_media_type(&self.blob_path(&digest))?;
                layers.push(Descriptor::new(media_type, size, oci(&digest)?));
            }
            let manifest = oci_spec::image::ImageManifestBuilder::default()
                .schema_version(2u32)
                .media_type(MediaType::ImageManifest)
                .config(Descriptor::new(MediaType::ImageConfig, config_size, oci(&config)?))
                .layers(layers)
                .build()
                .map_err(|e| StoreError::Invalid {
                    what: "manifest".into(),
                    reason: e.to_string(),
                })?;
            let json = serde_json::to_vec(&manifest).map_err(|e| StoreError::Invalid {
                what: "manifest".into(),
                reason: e.to_string(),
            })?;
            let digest = self.put_blob_bytes(&json)?;
            let names: Vec<Option<String>> = if item.repo_tags.is_empty() {
                vec![None]
            } else {
                item.repo_tags
                    .iter()
                    .map(|t| t.parse::<Reference>().map(|r| Some(r.to_string())))
                    .collect::<Result<_, _>>()?
            };
            for name in names {
                entries.push(RefEntry {
                    name: name.clone(),
                    manifest: digest.clone(),
                    media_type: OCI_MANIFEST.into(),
                    size: json.len() as u64,
                });
                loaded.push(LoadedImage { reference: name, id: config.clone() });
            }
        }
        for entry in entries {
            self.set_ref(entry)?;
        }
        Ok(loaded)
    }

    /// Writes `images` to `output` as `format`, atomically.
    pub fn save(
        &self,
        references: &[String],
        output: &Path,
        format: ArchiveFormat,
    ) -> Result<(), StoreError> {
        let images = references.iter().map(|r| self.resolve(r)).collect::<Result<Vec<_>, _>>()?;
        let file = AtomicFile::create(output).map_err(io_err(output))?;
        let mut tar = tar::Builder::new(file);
        let result = match format {
            ArchiveFormat::OciArchive => super::save::write_oci(self, &images, &mut tar),
            ArchiveFormat::DockerArchive => super::save::write_docker(self, &images, &mut tar),
        };
        result?;
        let file = tar.into_inner().map_err(io_err(output))?;
        file.commit().map_err(io_err(output))
    }
}

/// The name an OCI layout entry gets: `io.containerd.image.name`, a full
/// reference in `ref.name`, or `localhost/<archive name>:<ref.name>` when
/// `ref.name` is a bare tag (as `skopeo copy … oci:DIR:TAG` writes it), the
/// archive name lowercased.
fn oci_name(desc: &Descriptor, stem: &str) -> Option<String> {
    let annotations = desc.annotations().as_ref()?;
    if let Some(full) = annotations.get(CONTAINERD_NAME).and_then(|n| n.parse::<Reference>().ok()) {
        return Some(full.to_string());
    }
    let name = annotations.get(super::REF_NAME)?;
    if name.contains('/') || name.contains(':') {
        return name.parse::<Reference>().ok().map(|r| r.to_string());
    }
    // Repository names are lowercase; a directory called `L` gives `localhost/l`.
    let stem = stem.to_ascii_lowercase();
    format!("localhost/{stem}:{name}").parse::<Reference>().ok().map(|r| r.to_string())
}

/// A layer's media type from its magic bytes.
fn layer_media_type(path: &Path) -> Result<MediaType, StoreError> {
    let mut magic = [0u8; 4];
    let mut file = File::open(path).map_err(io_err(path))?;
    let n = file.read(&mut magic).map_err(io_err(path))?;
    Ok(match &magic[..n] {
        [0x1f, 0x8b, ..] => MediaType::ImageLayerGzip,
        [0x28, 0xb5, 0x2f, 0xfd] => MediaType::ImageLayerZstd,
        _ => MediaType::ImageLayer,
    })
}

pub(super) fn oci(d: &Digest) -> Result<oci_spec::image::Digest, StoreError> {
    d.to_string().parse().map_err(|e: oci_spec::OciSpecError| StoreError::Invalid {
        what: d.to_string(),
        reason: e.to_string(),
    })
}

fn parse<T: for<'de> Deserialize<'de>>(data: &[u8], what: &str) -> Result<T, StoreError> {
    serde_json::from_slice(data)
        .map_err(|e| StoreError::Invalid { what: what.to_string(), reason: e.to_string() })
}

/// One image of a docker-archive's `manifest.json`.
#[derive(Debug, Deserialize)]
struct DockerManifestItem {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Vec<String>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}
