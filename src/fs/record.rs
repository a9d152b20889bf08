//! Recording which files a workload reads (`--record FILE`), and the list
//! format that `rmount index build --prefetch-list` publishes and
//! `--prefetch recorded` replays: a later lazy mount fetches the chunks of
//! those files first, in parallel, before the workload asks for them.
//!
//! Files are named by layer digest and path inside that layer, so a list
//! stays meaningful for any image that shares the layer.

use super::union::EntryRef;
use crate::digest::Digest;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::Path;
use std::sync::Mutex;

/// Media type of a prefetch list (in an index artifact).
pub const PREFETCH_LIST_MEDIA_TYPE: &str = "application/vnd.rmount.prefetch-list.v1+json";

/// One file a workload read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedFile {
    /// The layer blob holding the file's data.
    pub layer: Digest,
    /// The file's path in that layer.
    pub path: String,
}

/// Files in the order they were first read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefetchList {
    /// Format version (1).
    pub version: u32,
    /// The files.
    pub files: Vec<RecordedFile>,
}

impl PrefetchList {
    /// Parses a list; says what is wrong.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let list: PrefetchList = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if list.version != 1 {
            return Err(format!("unsupported prefetch list version {}", list.version));
        }
        Ok(list)
    }

    /// The list as JSON.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }
}

/// Collects the entries whose data is read, first read first.
#[derive(Default)]
pub struct Recorder {
    seen: Mutex<(HashSet<EntryRef>, Vec<EntryRef>)>,
}

impl Recorder {
    /// Notes a read of `entry`.
    pub fn read(&self, entry: EntryRef) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.0.insert(entry) {
            seen.1.push(entry);
        }
    }

    /// The recorded entries as a list; `name(entry)` gives layer and path.
    pub fn list(&self, name: impl Fn(EntryRef) -> Option<RecordedFile>) -> PrefetchList {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        PrefetchList { version: 1, files: seen.1.iter().filter_map(|e| name(*e)).collect() }
    }
}

/// Where a lazy pull keeps the prefetch list published with the index
/// artifact of image manifest `manifest`.
pub fn published_list_path(index_dir: &Path, manifest: &Digest) -> std::path::PathBuf {
    index_dir.join("prefetch").join(format!("{}.json", manifest.hex()))
}

/// Writes `list` to `path` atomically.
pub fn save_list(path: &Path, list: &PrefetchList) -> std::io::Result<()> {
    crate::durable::write_atomic(path, &list.to_json())
}
