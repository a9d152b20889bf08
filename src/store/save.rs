//! Writing images out as archives other tools read: an OCI layout in a tar
//! (`skopeo … oci-archive:FILE`) or the `docker save` format
//! (`docker-archive:FILE`, layers as uncompressed tars named by diff_id).

use super::archive::{oci, CONTAINERD_NAME};
use super::{io_err, Image, Store, StoreError, REF_NAME};
use crate::digest::{Digest, HashingWriter};
use crate::durable::AtomicFile;
use crate::reference::Reference;
use oci_spec::image::{Descriptor, ImageIndexBuilder, MediaType};
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek};

type Tar = tar::Builder<AtomicFile>;

fn header(size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    h
}

fn add_bytes(tar: &mut Tar, path: &str, data: &[u8]) -> Result<(), StoreError> {
    let mut h = header(data.len() as u64);
    tar.append_data(&mut h, path, data).map_err(io_err(path.as_ref()))
}

fn add_file(tar: &mut Tar, path: &str, file: &mut File) -> Result<(), StoreError> {
    let size = file.metadata().map_err(io_err(path.as_ref()))?.len();
    let mut h = header(size);
    tar.append_data(&mut h, path, file).map_err(io_err(path.as_ref()))
}

fn add_blob(store: &Store, tar: &mut Tar, digest: &Digest) -> Result<(), StoreError> {
    let path = store.blob_path(digest);
    let mut file = File::open(&path).map_err(io_err(&path))?;
    add_file(tar, &format!("blobs/sha256/{}", digest.hex()), &mut file)
}

fn json<T: Serialize>(value: &T, what: &str) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value)
        .map_err(|e| StoreError::Invalid { what: what.into(), reason: e.to_string() })
}

/// An OCI image layout: each image's manifest, config and layers once.
pub(super) fn write_oci(store: &Store, images: &[Image], tar: &mut Tar) -> Result<(), StoreError> {
    add_bytes(tar, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let mut written = HashSet::new();
    let mut manifests = Vec::new();
    for image in images {
        let blobs = std::iter::once(&image.config_digest)
            .chain(image.layers.iter().map(|l| &l.digest))
            .chain(std::iter::once(&image.manifest_digest));
        for digest in blobs {
            if written.insert(digest.clone()) {
                add_blob(store, tar, digest)?;
            }
        }
        let mut desc = Descriptor::new(
            MediaType::from(image.manifest_media_type.as_str()),
            image.manifest_size,
            oci(&image.manifest_digest)?,
        );
        if let Some(name) = &image.reference {
            let tag = name.parse::<Reference>().ok().and_then(|r| r.tag).unwrap_or_default();
            desc.set_annotations(Some(HashMap::from([
                (REF_NAME.to_string(), tag),
                (CONTAINERD_NAME.to_string(), name.clone()),
            ])));
        }
        manifests.push(desc);
    }
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(manifests)
        .build()
        .map_err(|e| StoreError::Invalid { what: "index.json".into(), reason: e.to_string() })?;
    add_bytes(tar, "index.json", &json(&index, "index.json")?)
}

#[derive(Serialize)]
struct DockerManifestItem {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags")]
    repo_tags: Vec<String>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

/// The `docker save` format: `manifest.json`, `repositories`, the config as
/// `<id>.json` and each layer uncompressed as `<diff_id>/layer.tar`.
pub(super) fn write_docker(
    store: &Store,
    images: &[Image],
    tar: &mut Tar,
) -> Result<(), StoreError> {
    let mut written = HashSet::new();
    let mut items = Vec::new();
    let mut repositories: HashMap<String, HashMap<String, String>> = HashMap::new();
    for image in images {
        let config_name = format!("{}.json", image.config_digest.hex());
        if written.insert(config_name.clone()) {
            let data = store.read_blob(&image.config_digest, "config")?;
            add_bytes(tar, &config_name, &data)?;
        }
        let mut layers = Vec::new();
        for layer in &image.layers {
            let name = write_uncompressed_layer(store, tar, &layer.digest, &mut written)?;
            layers.push(name);
        }
        let mut repo_tags = Vec::new();
        if let Some(r) = image.reference.as_deref().and_then(|r| r.parse::<Reference>().ok()) {
            if let Some(tag) = &r.tag {
                repo_tags.push(format!("{}:{tag}", r.familiar_name()));
                let top = layers.last().and_then(|l| l.split('/').next()).unwrap_or_default();
                repositories
                    .entry(r.familiar_name())
                    .or_default()
                    .insert(tag.clone(), top.to_string());
            }
        }
        items.push(DockerManifestItem { config: config_name, repo_tags, layers });
    }
    add_bytes(tar, "manifest.json", &json(&items, "manifest.json")?)?;
    add_bytes(tar, "repositories", &json(&repositories, "repositories")?)
}

/// Writes a layer decompressed, named by its diff_id; returns the tar path.
fn write_uncompressed_layer(
    store: &Store,
    tar: &mut Tar,
    blob: &Digest,
    written: &mut HashSet<String>,
) -> Result<String, StoreError> {
    let path = store.blob_path(blob);
    let bad = io_err(&path);
    let open = || -> io::Result<Box<dyn Read>> {
        let mut file = BufReader::new(File::open(&path)?);
        let magic = file.fill_buf()?.to_vec();
        Ok(if magic.starts_with(&[0x1f, 0x8b]) {
            Box::new(flate2::bufread::MultiGzDecoder::new(file))
        } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Box::new(zstd::stream::read::Decoder::with_buffer(file)?)
        } else {
            Box::new(file)
        })
    };
    // Decompress once to a temp file: the tar header needs the size first.
    let tmp = store.root().join("tmp-save-layer");
    let mut spool = AtomicFile::create(&tmp).map_err(io_err(&tmp))?;
    let mut hashing = HashingWriter::new(spool.file());
    let copied = open().and_then(|mut r| io::copy(&mut r, &mut hashing));
    let (diff_id, _, _) = hashing.finish();
    copied.map_err(bad)?;
    let name = format!("{}/layer.tar", diff_id.hex());
    if written.insert(name.clone()) {
        let file = spool.file();
        file.rewind().map_err(io_err(&tmp))?;
        add_file(tar, &name, file)?;
    }
    Ok(name)
}
