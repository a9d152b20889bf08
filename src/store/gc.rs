//! Garbage collection and disk usage: what refs reach, what they do not.

use super::{io_err, Store, StoreError};
use crate::digest::Digest;
use serde::Serialize;
use std::collections::HashSet;
use std::path::Path;

/// What `prune` removed.
#[derive(Debug, Default, Serialize)]
pub struct PruneReport {
    /// Blobs removed.
    pub blobs_removed: Vec<Digest>,
    /// Bytes reclaimed (blobs, their layer indexes, stale temp files).
    pub reclaimed_bytes: u64,
}

/// What `df` reports.
#[derive(Debug, Default, Serialize)]
pub struct DiskUsage {
    /// Number of images (index entries).
    pub images: usize,
    /// Bytes of manifests, configs and layers reached by refs, each blob once.
    pub images_bytes: u64,
    /// Distinct layers.
    pub layers: usize,
    /// Bytes of distinct layers (shared layers counted once).
    pub layers_bytes: u64,
    /// Bytes of layer blobs shared by more than one image.
    pub shared_bytes: u64,
    /// Bytes of persisted layer indexes.
    pub index_cache_bytes: u64,
    /// Bytes of blobs no ref reaches (what `prune` would reclaim).
    pub reclaimable_bytes: u64,
    /// Live mounts.
    pub mounts: usize,
}

fn file_size(path: &Path) -> u64 {
    std::fs::symlink_metadata(path).map_or(0, |m| m.len())
}

impl Store {
    /// Digests of every blob some ref reaches (manifests, indexes, configs, layers).
    fn reachable(&self) -> Result<HashSet<Digest>, StoreError> {
        let mut reached = HashSet::new();
        for entry in self.refs()? {
            reached.insert(entry.manifest.clone());
            let image = self.image_from_entry(&entry)?;
            reached.insert(image.manifest_digest);
            reached.insert(image.config_digest);
            reached.extend(image.layers.into_iter().map(|l| l.digest));
        }
        Ok(reached)
    }

    /// Removes blobs no ref reaches, their layer indexes and stale temp files.
    pub fn prune(&self) -> Result<PruneReport, StoreError> {
        let _lock = self.lock_refs()?;
        let reached = self.reachable()?;
        let mut report = PruneReport::default();
        let dir = self.root().join("blobs/sha256");
        for entry in std::fs::read_dir(&dir).map_err(io_err(&dir))?.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let digest = format!("sha256:{name}").parse::<Digest>().ok();
            let stale_tmp = name.starts_with(".tmp-");
            let unreached = digest.as_ref().is_some_and(|d| !reached.contains(d));
            if !(stale_tmp || unreached) {
                continue;
            }
            report.reclaimed_bytes += file_size(&path);
            std::fs::remove_file(&path).map_err(io_err(&path))?;
            if let Some(digest) = digest {
                let index = crate::layer::index_path(&self.index_dir(), &digest);
                report.reclaimed_bytes += file_size(&index);
                let _ = std::fs::remove_file(index);
                report.blobs_removed.push(digest);
            }
        }
        Ok(report)
    }

    /// Disk usage of images, layers, the index cache and mounts.
    pub fn disk_usage(&self) -> Result<DiskUsage, StoreError> {
        let mut usage = DiskUsage::default();
        let mut layer_users: std::collections::HashMap<Digest, usize> = Default::default();
        let mut image_blobs = HashSet::new();
        let refs = self.refs()?;
        usage.images = refs.len();
        for entry in &refs {
            let image = self.image_from_entry(entry)?;
            image_blobs.insert(image.manifest_digest.clone());
            image_blobs.insert(image.config_digest.clone());
            let distinct: HashSet<_> = image.layers.iter().map(|l| l.digest.clone()).collect();
            for layer in distinct {
                image_blobs.insert(layer.clone());
                *layer_users.entry(layer).or_default() += 1;
            }
        }
        usage.images_bytes = image_blobs.iter().map(|d| file_size(&self.blob_path(d))).sum();
        usage.layers = layer_users.len();
        for (layer, users) in &layer_users {
            let size = file_size(&self.blob_path(layer));
            usage.layers_bytes += size;
            if *users > 1 {
                usage.shared_bytes += size;
            }
        }
        let reached = self.reachable()?;
        let dir = self.root().join("blobs/sha256");
        for entry in std::fs::read_dir(&dir).map_err(io_err(&dir))?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let reachable =
                format!("sha256:{name}").parse::<Digest>().is_ok_and(|d| reached.contains(&d));
            if !reachable {
                usage.reclaimable_bytes += file_size(&entry.path());
            }
        }
        let indexes = self.index_dir().join("sha256");
        if let Ok(entries) = std::fs::read_dir(indexes) {
            usage.index_cache_bytes = entries.flatten().map(|e| file_size(&e.path())).sum();
        }
        usage.mounts = self.mounts()?.len();
        Ok(usage)
    }
}
