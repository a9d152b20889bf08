//! The metadata store: one redb database holding a record per snapshot,
//! keyed by its key (Active/View) or name (Committed), plus the id counter.
//!
//! Records are JSON, so a field added later reads old records with a default.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use redb::{ReadableTable, Table, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{Kind, RemoteLayers, Result, SnapshotError, Usage};

/// Snapshot key or name → JSON [`Record`].
pub(crate) const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
/// `"next_id"` → the next snapshot id; ids are never reused.
pub(crate) const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");

/// What the database keeps about one snapshot.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Record {
    /// Names the snapshot's dir `snapshots/<id>`; survives commit.
    pub id: u64,
    pub kind: Kind,
    /// The committed parent's name.
    pub parent: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub created: DateTime<Utc>,
    pub updated: DateTime<Utc>,
    /// Measured at commit time; `None` while Active or View.
    #[serde(default)]
    pub usage: Option<Usage>,
    /// Set for a committed snapshot rmount serves lazily (its `fs` is a
    /// read-only mount of the image's bottom layers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<RemoteLayers>,
    /// Set for an active snapshot served by rmount's writable FUSE union
    /// (over its lazily served parent) rather than kernel overlayfs: its
    /// mount is a bind of `rootfs`, where the daemon mounts the union.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fuse_union: bool,
}

/// Reads the record of `key`, if any.
pub(crate) fn get(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<Record>> {
    match table.get(key).map_err(redb::Error::from)? {
        Some(bytes) => serde_json::from_slice(bytes.value())
            .map(Some)
            .map_err(|e| SnapshotError::Corrupt(format!("record {key:?}: {e}"))),
        None => Ok(None),
    }
}

/// Reads the record of `key`, or [`SnapshotError::NotFound`].
pub(crate) fn must_get(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Record> {
    get(table, key)?.ok_or_else(|| SnapshotError::NotFound(format!("snapshot {key}")))
}

/// Writes the record of `key`.
pub(crate) fn put(table: &mut Table<&str, &[u8]>, key: &str, record: &Record) -> Result<()> {
    let bytes = serde_json::to_vec(record)
        .map_err(|e| SnapshotError::Corrupt(format!("encoding record {key:?}: {e}")))?;
    table.insert(key, bytes.as_slice()).map_err(redb::Error::from)?;
    Ok(())
}

/// Every (key, record) pair, in key order.
pub(crate) fn all(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<Vec<(String, Record)>> {
    let mut out = Vec::new();
    for entry in table.iter().map_err(redb::Error::from)? {
        let (k, v) = entry.map_err(redb::Error::from)?;
        let key = k.value().to_owned();
        let record = serde_json::from_slice(v.value())
            .map_err(|e| SnapshotError::Corrupt(format!("record {key:?}: {e}")))?;
        out.push((key, record));
    }
    Ok(out)
}

/// Takes the next id from the counter (inside the caller's write transaction).
pub(crate) fn next_id(counters: &mut Table<&str, u64>) -> Result<u64> {
    let id = counters.get("next_id").map_err(redb::Error::from)?.map(|v| v.value()).unwrap_or(1);
    counters.insert("next_id", id + 1).map_err(redb::Error::from)?;
    Ok(id)
}
