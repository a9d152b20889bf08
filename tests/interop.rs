//! Interop with tools we did not write: an image built by `umoci` (with
//! real `.wh.` whiteouts) and converted by `skopeo` loads and mounts to the
//! same tree `umoci unpack` produces; what `rmount save` writes is read by
//! `skopeo` and unpacks with `umoci` to the same tree again.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;

fn umoci(args: &[&str], dir: &Path) -> String {
    run_ok(Command::new("umoci").args(args).current_dir(dir))
}

fn skopeo(args: &[&str], dir: &Path) -> String {
    run_ok(Command::new("skopeo").args(["--insecure-policy"]).args(args).current_dir(dir))
}

/// Builds `L:v2` with umoci: a base layer, then a layer that deletes a
/// file, replaces a directory and adds files.
fn build_umoci_image(dir: &Path) {
    umoci(&["init", "--layout", "L"], dir);
    umoci(&["new", "--image", "L:v1"], dir);
    umoci(&["unpack", "--image", "L:v1", "B"], dir);
    let rootfs = dir.join("B/rootfs");
    for d in ["etc", "usr/bin", "var/lib/app", "replaced/sub"] {
        std::fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    std::fs::write(rootfs.join("etc/os-release"), "NAME=fixture\n").unwrap();
    std::fs::write(rootfs.join("etc/remove-me"), "bye\n").unwrap();
    std::fs::write(rootfs.join("replaced/sub/old"), "old\n").unwrap();
    std::fs::write(rootfs.join("usr/bin/tool"), pseudo_random(300_000, 3)).unwrap();
    std::os::unix::fs::symlink("tool", rootfs.join("usr/bin/alias")).unwrap();
    std::fs::hard_link(rootfs.join("usr/bin/tool"), rootfs.join("var/lib/app/tool-copy")).unwrap();
    umoci(&["repack", "--image", "L:v1", "B"], dir);
    // The second layer is the diff of a fresh unpack of v1.
    umoci(&["unpack", "--image", "L:v1", "B2"], dir);
    let rootfs = dir.join("B2/rootfs");
    std::fs::remove_file(rootfs.join("etc/remove-me")).unwrap();
    std::fs::remove_dir_all(rootfs.join("replaced")).unwrap();
    std::fs::create_dir_all(rootfs.join("replaced")).unwrap();
    std::fs::write(rootfs.join("replaced/new"), "new\n").unwrap();
    std::fs::write(rootfs.join("etc/os-release"), "NAME=fixture\nVERSION=2\n").unwrap();
    umoci(&["repack", "--image", "L:v2", "B2"], dir);
    umoci(&["config", "--image", "L:v2", "--config.cmd", "/usr/bin/tool"], dir);
}

fn unpacked_tree(
    dir: &Path,
    layout_tag: &str,
    name: &str,
) -> std::collections::BTreeMap<String, String> {
    umoci(&["unpack", "--image", layout_tag, name], dir);
    describe_tree(&dir.join(name).join("rootfs"))
}

fn mounted_tree(
    root: &Path,
    reference: &str,
    mnt: &Path,
) -> std::collections::BTreeMap<String, String> {
    let mounted = Mounted::rmount(root, reference, mnt);
    describe_tree(&mounted.path)
}

#[test]
fn umoci_and_skopeo_images_mount_like_umoci_unpacks_them() {
    if !require_root_fuse(&["umoci", "skopeo"]) {
        return;
    }
    let tmp = tempdir();
    let dir = tmp.path();
    let root = dir.join("state");
    build_umoci_image(dir);
    let expected = unpacked_tree(dir, "L:v2", "U");
    assert!(expected.contains_key("replaced/new") && !expected.contains_key("etc/remove-me"));

    // OCI layout straight from umoci: a bare tag is named localhost/<dir>:<tag>.
    let loaded = rmount_ok(&root, &["load", "-i", dir.join("L").to_str().unwrap()]);
    assert!(loaded.contains("localhost/l:v2"), "{loaded}");
    assert_same_tree(&expected, &mounted_tree(&root, "localhost/l:v2", &dir.join("m1")));

    // docker-archive written by skopeo.
    skopeo(&["copy", "oci:L:v2", "docker-archive:d.tar:example.com/team/app:v2"], dir);
    let loaded = rmount_ok(&root, &["load", "-i", dir.join("d.tar").to_str().unwrap()]);
    assert!(loaded.contains("example.com/team/app:v2"), "{loaded}");
    assert_same_tree(&expected, &mounted_tree(&root, "example.com/team/app:v2", &dir.join("m2")));

    // What rmount saves, skopeo reads and umoci unpacks to the same tree.
    let oci_out = dir.join("saved-oci.tar");
    rmount_ok(&root, &["save", "localhost/l:v2", "-o", oci_out.to_str().unwrap()]);
    let inspect = skopeo(&["inspect", "oci-archive:saved-oci.tar"], dir);
    assert!(inspect.contains("\"Layers\""), "{inspect}");
    skopeo(&["copy", "oci-archive:saved-oci.tar", "oci:L2:back"], dir);
    assert_same_tree(&expected, &unpacked_tree(dir, "L2:back", "U2"));

    let docker_out = dir.join("saved-docker.tar");
    rmount_ok(
        &root,
        &[
            "save",
            "example.com/team/app:v2",
            "-o",
            docker_out.to_str().unwrap(),
            "--format",
            "docker-archive",
        ],
    );
    skopeo(&["inspect", "docker-archive:saved-docker.tar"], dir);
    skopeo(&["copy", "docker-archive:saved-docker.tar", "oci:L3:back"], dir);
    assert_same_tree(&expected, &unpacked_tree(dir, "L3:back", "U3"));

    // The image commands see what was loaded.
    let images = rmount_ok(&root, &["images", "--json"]);
    let images: serde_json::Value = serde_json::from_str(&images).unwrap();
    // umoci's layout holds v1 and v2; the docker-archive added a third name.
    assert_eq!(images.as_array().unwrap().len(), 3);
    let inspect: serde_json::Value =
        serde_json::from_str(&rmount_ok(&root, &["inspect", "localhost/l:v2"])).unwrap();
    assert_eq!(inspect[0]["Config"]["Cmd"][0], "/usr/bin/tool");
    assert_eq!(inspect[0]["RootFS"]["Layers"].as_array().unwrap().len(), 2);
    assert_eq!(inspect[0]["Layers"].as_array().unwrap().len(), 2);
    let history = rmount_ok(&root, &["history", "localhost/l:v2"]);
    assert!(history.contains("IMAGE") && history.contains("<missing>"), "{history}");
}

#[test]
fn tag_rmi_prune_and_df() {
    if !require_root_fuse(&["umoci"]) {
        return;
    }
    let tmp = tempdir();
    let dir = tmp.path();
    let root = dir.join("state");
    build_umoci_image(dir);
    rmount_ok(&root, &["load", "-i", dir.join("L").to_str().unwrap()]);
    rmount_ok(&root, &["tag", "localhost/l:v2", "mine:latest"]);
    assert!(rmount_ok(&root, &["images"]).contains("mine"));

    // A mounted image cannot be removed without -f.
    let mounted = Mounted::rmount(&root, "mine", &dir.join("m"));
    let out = rmount(&root, &["rmi", "localhost/l:v2"]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("mounted"),
        "{}",
        describe(&out)
    );
    let df: serde_json::Value = serde_json::from_str(&rmount_ok(&root, &["df", "--json"])).unwrap();
    assert_eq!(df["mounts"], 1);
    assert!(df["shared_bytes"].as_u64().unwrap() > 0, "v1 and v2 share their layers: {df}");
    drop(mounted);

    let removed = rmount_ok(&root, &["rmi", "localhost/l:v1"]);
    assert!(
        removed.contains("Untagged: localhost/l:v1") && removed.contains("Deleted:"),
        "{removed}"
    );
    let pruned: serde_json::Value =
        serde_json::from_str(&rmount_ok(&root, &["prune", "--json"])).unwrap();
    assert!(!pruned["blobs_removed"].as_array().unwrap().is_empty(), "{pruned}");
    // What is still tagged still mounts.
    let again = Mounted::rmount(&root, "mine:latest", &dir.join("m"));
    assert!(again.path.join("replaced/new").exists());
}
