//! The new image's config and manifest, as data: the parent config (kept
//! as raw JSON, so fields this crate does not model survive) with the layer's
//! `diff_id` appended, a `history` entry, `created`, author and the
//! `--change`s; an OCI manifest listing the parent's layers and the new one.
//!
//! The manifest is always OCI, also for a Docker-typed parent: the store is
//! an OCI layout, a zstd layer has no Docker media type, and Docker, Podman,
//! containerd and skopeo all read OCI manifests. Parent layers keep their
//! bytes; Docker layer media types are renamed to their OCI equivalents so
//! the manifest is one vocabulary.

use super::change::Change;
use super::layer::WrittenLayer;
use serde_json::{json, Map, Value};

/// The OCI manifest media type.
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";

/// What describes the commit in the new config.
#[derive(Debug, Clone, Default)]
pub struct Describe {
    /// `-a`: the author.
    pub author: Option<String>,
    /// `-m`: the history comment.
    pub message: Option<String>,
    /// `-c`: config changes, in order.
    pub changes: Vec<Change>,
    /// The creation time, RFC 3339.
    pub created: String,
    /// The history entry's `created_by`.
    pub created_by: String,
}

/// The new config from the parent's raw config.
pub fn new_config(parent: &Value, layer: &WrittenLayer, describe: &Describe) -> Value {
    let mut config = parent.as_object().cloned().unwrap_or_default();
    config.insert("created".into(), json!(describe.created));
    if let Some(author) = &describe.author {
        config.insert("author".into(), json!(author));
    }
    let exec = object(&mut config, "config");
    for change in &describe.changes {
        change.apply(exec);
    }
    let rootfs = object(&mut config, "rootfs");
    rootfs.insert("type".into(), json!("layers"));
    array(rootfs, "diff_ids").push(json!(layer.diff_id.to_string()));
    let mut entry = Map::new();
    entry.insert("created".into(), json!(describe.created));
    entry.insert("created_by".into(), json!(describe.created_by));
    if let Some(author) = &describe.author {
        entry.insert("author".into(), json!(author));
    }
    if let Some(message) = &describe.message {
        entry.insert("comment".into(), json!(message));
    }
    array(&mut config, "history").push(Value::Object(entry));
    Value::Object(config)
}

fn object<'a>(map: &'a mut Map<String, Value>, key: &str) -> &'a mut Map<String, Value> {
    let slot = map.entry(key).or_insert_with(|| json!({}));
    if !slot.is_object() {
        *slot = json!({});
    }
    slot.as_object_mut().expect("just made an object")
}

fn array<'a>(map: &'a mut Map<String, Value>, key: &str) -> &'a mut Vec<Value> {
    let slot = map.entry(key).or_insert_with(|| json!([]));
    if !slot.is_array() {
        *slot = json!([]);
    }
    slot.as_array_mut().expect("just made an array")
}

/// The OCI name of a layer media type (Docker's renamed, others kept).
pub fn oci_layer_media_type(media_type: &str) -> &str {
    match media_type {
        "application/vnd.docker.image.rootfs.diff.tar.gzip" => {
            "application/vnd.oci.image.layer.v1.tar+gzip"
        }
        "application/vnd.docker.image.rootfs.diff.tar" => "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => {
            "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        }
        other => other,
    }
}

/// A content descriptor.
pub fn descriptor(media_type: &str, digest: &crate::digest::Digest, size: u64) -> Value {
    json!({ "mediaType": media_type, "digest": digest.to_string(), "size": size })
}

/// The manifest: `parent_layers` (already descriptors) then the new layer.
pub fn new_manifest(
    config_digest: &crate::digest::Digest,
    config_size: u64,
    mut layers: Vec<Value>,
    layer: &WrittenLayer,
) -> Value {
    layers.push(descriptor(layer.media_type, &layer.digest, layer.size));
    json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": descriptor(CONFIG_MEDIA_TYPE, config_digest, config_size),
        "layers": layers,
    })
}

/// The creation time: `SOURCE_DATE_EPOCH` if set (reproducible builds), else now.
pub fn created_now() -> Result<String, String> {
    let time = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(s) if !s.trim().is_empty() => {
            let secs: i64 =
                s.trim().parse().map_err(|_| format!("SOURCE_DATE_EPOCH={s:?} is not a number"))?;
            chrono::DateTime::from_timestamp(secs, 0)
                .ok_or_else(|| format!("SOURCE_DATE_EPOCH={s:?} is out of range"))?
        }
        _ => chrono::Utc::now(),
    };
    Ok(time.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Digest;

    #[test]
    fn config_extends_the_parent() {
        let parent = json!({
            "architecture": "amd64", "os": "linux", "custom": 1,
            "config": {"Cmd": ["sh"], "Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers", "diff_ids": ["sha256:aa"]},
            "history": [{"created_by": "base"}],
        });
        let layer = WrittenLayer {
            digest: Digest::of(b"blob"),
            size: 4,
            diff_id: Digest::of(b"tar"),
            tar_size: 3,
            media_type: "application/vnd.oci.image.layer.v1.tar",
        };
        let describe = Describe {
            author: Some("me".into()),
            message: Some("why".into()),
            changes: vec![Change::parse("USER nobody").unwrap()],
            created: "2024-01-01T00:00:00Z".into(),
            created_by: "rmount commit".into(),
        };
        let c = new_config(&parent, &layer, &describe);
        assert_eq!(c["custom"], json!(1));
        assert_eq!(c["author"], json!("me"));
        assert_eq!(c["created"], json!("2024-01-01T00:00:00Z"));
        assert_eq!(c["config"]["User"], json!("nobody"));
        assert_eq!(c["config"]["Cmd"], json!(["sh"]));
        assert_eq!(c["rootfs"]["diff_ids"], json!(["sha256:aa", Digest::of(b"tar").to_string()]));
        assert_eq!(c["history"][1]["comment"], json!("why"));
        assert_eq!(c["history"][1]["author"], json!("me"));
        assert_eq!(
            oci_layer_media_type("application/vnd.docker.image.rootfs.diff.tar.gzip"),
            "application/vnd.oci.image.layer.v1.tar+gzip"
        );
    }
}
