//! The daemon as the snapshotter's lazy-layer server: a containerd layer is
//! found in its image (pulled into the store lazily, as `rmount REF DIR`
//! does: manifest, config and layer indexes only) and mounted read-only,
//! with the layers below it, through the daemon's mount table — so it
//! shares the layer pool and chunk cache, and survives daemon restarts.

use super::protocol::{MountSpec, PrefetchSpec, RegistrySettings};
use super::table::Daemon;
use crate::digest::Digest;
use crate::layer::has_index;
use crate::platform::Platform;
use crate::reference::Reference;
use crate::snapshotter::remote::{LazyLayers, RemoteLayers};
use crate::store::Image;
use crate::transfer::{self, LayerData, NoProgress, PullOptions};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Seconds a lazily served read retries a failed fetch before `EIO`.
const FETCH_TIMEOUT_SECS: u64 = 30;

/// One lazy pull at a time: containerd prepares an image's layers one
/// after the other, and two images' first layers should not pull the same
/// metadata twice.
static PULLING: Mutex<()> = Mutex::new(());

fn position(image: &Image, layer: &Digest) -> Option<usize> {
    image.layers.iter().position(|l| &l.digest == layer)
}

impl LazyLayers for Daemon {
    fn locate(&self, image: &str, layer: &Digest) -> Result<Option<RemoteLayers>, String> {
        let reference: Reference = image.parse().map_err(|e| format!("{image}: {e}"))?;
        let store = self.store();
        let _pulling = PULLING.lock().unwrap_or_else(|p| p.into_inner());
        let resolved = match store.resolve(image) {
            Ok(found) if position(&found, layer).is_some() => found,
            _ => {
                let settings = RegistrySettings::from_environment();
                let client = settings.client().map_err(|e| e.to_string())?;
                let options = PullOptions {
                    platform: Platform::host(),
                    all_platforms: false,
                    jobs: 3,
                    layers: LayerData::IndexesOnly,
                };
                transfer::pull(store, &client, &reference, &options, &NoProgress)
                    .map_err(|e| format!("pulling {image} lazily: {e}"))?;
                store.resolve(image).map_err(|e| e.to_string())?
            }
        };
        let Some(index) = position(&resolved, layer) else { return Ok(None) };
        // Served lazily only with an index (or the blob) for it and every
        // layer below; else containerd unpacks it.
        let index_dir = store.index_dir();
        let servable = |l: &crate::store::LayerDesc| {
            store.blob_path(&l.digest).exists() || has_index(&index_dir, &l.digest)
        };
        if !resolved.layers[..=index].iter().all(servable) {
            return Ok(None);
        }
        let pinned = Reference { tag: None, digest: Some(resolved.manifest_digest), ..reference };
        Ok(Some(RemoteLayers { image: pinned.to_string(), layers: index + 1 }))
    }

    fn mount(
        &self,
        remote: &RemoteLayers,
        at: &Path,
        upper: Option<(PathBuf, PathBuf)>,
    ) -> Result<(), String> {
        let mountpoint = at.canonicalize().map_err(|e| format!("{}: {e}", at.display()))?;
        let spec = MountSpec {
            reference: remote.image.clone(),
            mountpoint,
            upper,
            fetch_timeout_secs: FETCH_TIMEOUT_SECS,
            prefetch: PrefetchSpec::None,
            prefetch_rate: None,
            record: None,
            registry: RegistrySettings::from_environment(),
            layers: Some(remote.layers),
        };
        Daemon::mount(self, spec).map(drop).map_err(|e| e.to_string())
    }

    fn unmount(&self, at: &Path) -> Result<(), String> {
        if !self.is_mounted(at) {
            return Ok(());
        }
        // Detach even when busy: containerd removes a snapshot only once
        // nothing stacks on it, and a lingering reader must not block that.
        Daemon::unmount(self, at, true, false).map_err(|e| e.to_string())
    }

    fn is_mounted(&self, at: &Path) -> bool {
        self.serves(at)
    }
}
