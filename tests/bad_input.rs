//! Bad input gets one clear error, a non-zero exit, no panic, nothing
//! mounted and no ref to a missing blob.

mod common;

use common::*;
use std::path::Path;

/// A tar holding one regular file whose name is written raw (the tar
/// crate's builder refuses unsafe names, as it should).
fn tar_with_raw_name(name: &str) -> Vec<u8> {
    let mut h = tar::Header::new_ustar();
    h.set_size(1);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    let bytes = h.as_mut_bytes();
    bytes[..100].fill(0);
    bytes[..name.len()].copy_from_slice(name.as_bytes());
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.push(b'x');
    out.resize(512 * 4, 0);
    out
}

fn good_tar() -> Vec<u8> {
    let data = b"hello\n".to_vec();
    layer_tar(&[(Item::File { path: "hello".into(), mode: 0o644, data }, Meta::default())])
}

fn assert_clean_failure(out: &std::process::Output, key: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, got:\n{}", describe(out));
    assert!(!stderr.contains("panicked"), "panic:\n{stderr}");
    assert!(stderr.contains(key), "error should mention {key:?}:\n{stderr}");
}

fn refs_point_at_present_blobs(root: &Path) {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("index.json")).unwrap()).unwrap();
    for m in index["manifests"].as_array().unwrap() {
        let digest = m["digest"].as_str().unwrap().trim_start_matches("sha256:");
        assert!(root.join("blobs/sha256").join(digest).exists(), "ref to missing blob {digest}");
    }
}

fn is_mounted(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let target = path.canonicalize().unwrap();
    info.lines().any(|l| l.split(' ').nth(4) == Some(target.to_str().unwrap()))
}

/// Loads a one-layer image made of `blob`; then tries to mount it and
/// expects the mount to fail mentioning `key`.
fn mount_fails(tar: Vec<u8>, blob: Vec<u8>, key: &str) {
    let tmp = tempdir();
    let root = tmp.path().join("state");
    let layout = tmp.path().join("layout");
    write_oci_layout(
        &layout,
        "bad:test",
        &[(blob, "application/vnd.oci.image.layer.v1.tar+gzip", tar)],
    );
    rmount_ok(&root, &["load", "-i", layout.to_str().unwrap()]);
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let out = rmount(&root, &["mount", "bad:test", mnt.to_str().unwrap()]);
    assert_clean_failure(&out, key);
    assert!(!is_mounted(&mnt), "a failed mount left {mnt:?} mounted");
    refs_point_at_present_blobs(&root);
}

#[test]
fn truncated_gzip_layer() {
    if !require_root_fuse(&[]) {
        return;
    }
    let tar = layer_tar(&[(
        Item::File { path: "big".into(), mode: 0o644, data: pseudo_random(1 << 20, 9) },
        Meta::default(),
    )]);
    let (gz, _) = compress(&tar, Compress::Gzip);
    mount_fails(tar, gz[..gz.len() / 2].to_vec(), "truncated");
}

#[test]
fn unsafe_entry_names() {
    if !require_root_fuse(&[]) {
        return;
    }
    for name in ["../../etc/passwd", "/abs"] {
        let tar = tar_with_raw_name(name);
        mount_fails(tar.clone(), tar, name);
    }
}

#[test]
fn hardlink_to_missing_target() {
    if !require_root_fuse(&[]) {
        return;
    }
    let tar = layer_tar(&[(
        Item::Hardlink { path: "link".into(), target: "nowhere".into() },
        Meta::default(),
    )]);
    mount_fails(tar.clone(), tar, "nowhere");
}

#[test]
fn blob_with_wrong_digest_is_not_loaded() {
    let tmp = tempdir();
    let root = tmp.path().join("state");
    let layout = tmp.path().join("layout");
    let tar = good_tar();
    write_oci_layout(
        &layout,
        "bad:digest",
        &[(tar.clone(), "application/vnd.oci.image.layer.v1.tar", tar.clone())],
    );
    let blob = layout.join("blobs/sha256").join(sha256_hex(&tar));
    std::fs::write(&blob, b"tampered").unwrap();
    assert_clean_failure(&rmount(&root, &["load", "-i", layout.to_str().unwrap()]), "digest");
    refs_point_at_present_blobs(&root);
    assert!(!rmount_ok(&root, &["images"]).contains("bad"), "a ref was written");
}

#[test]
fn manifest_pointing_at_missing_blob_is_not_loaded() {
    let tmp = tempdir();
    let root = tmp.path().join("state");
    let layout = tmp.path().join("layout");
    let tar = good_tar();
    write_oci_layout(
        &layout,
        "bad:missing",
        &[(tar.clone(), "application/vnd.oci.image.layer.v1.tar", tar.clone())],
    );
    std::fs::remove_file(layout.join("blobs/sha256").join(sha256_hex(&tar))).unwrap();
    assert_clean_failure(&rmount(&root, &["load", "-i", layout.to_str().unwrap()]), "missing");
    refs_point_at_present_blobs(&root);
}

#[test]
fn unknown_input_and_missing_image() {
    let tmp = tempdir();
    let root = tmp.path().join("state");
    let junk = tmp.path().join("junk.tar");
    std::fs::write(&junk, b"not a tar at all").unwrap();
    let out = rmount(&root, &["load", "-i", junk.to_str().unwrap()]);
    assert!(!out.status.success() && !String::from_utf8_lossy(&out.stderr).contains("panicked"));
    assert_clean_failure(&rmount(&root, &["inspect", "nosuch:image"]), "no such image");
    assert_clean_failure(&rmount(&root, &["inspect", "Bad_Name"]), "Bad_Name");
}
