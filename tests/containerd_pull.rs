//! `rmount containerd pull` (issue 8, item 4) against Debian's real
//! `containerd` 1.6 and `runc` (tests/common/containerd.rs) and a real
//! registry on 127.0.0.1:
//!
//! * an image with an rmount index artifact is pulled with every layer
//!   served lazily by the rmount daemon's snapshotter: containerd's content
//!   store holds its manifest and config but no layer blob, `ctr run`
//!   prints a file of the image, the daemon's mounts fetched only part of
//!   it, a second pull finds every snapshot there, and no lease is left
//!   (the harness's containerd collects garbage after every deletion, the
//!   lease's included: what the runs use survived it), and removing the
//!   image collects its snapshots and content;
//! * on a snapshotter that serves nothing lazily (containerd's own
//!   `overlayfs`), every layer falls back to a download into containerd's
//!   content store and containerd's unpacking, and the image runs too;
//! * so it does on rmount's snapshotter when the daemon cannot reach the
//!   image (a registry name only the pull's `--hosts-dir` maps), and when
//!   the image has no layer index anywhere (rmount serves a layer lazily
//!   only with its index; it never downloads one whole for containerd).

mod common;

use common::containerd::*;
use common::daemon::Daemon;
use common::registry::Registry;
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Instant;

const TOOLS: &[&str] = &["containerd", "ctr", "runc", "docker-registry"];

/// The Debian image in `registry` as `ADDR/REPO:demo`, pushed by rmount
/// from a store of its own (`scope/publisher`), with its index artifact
/// when `with_index`. `None` (skip) when the image can't be built here.
fn publish_debian(
    scope: &Path,
    registry: &Registry,
    repo: &str,
    with_index: bool,
) -> Option<String> {
    let layout = common::daemon::debian_layout()?;
    let publisher = scope.join("publisher");
    let image = format!("{}/{repo}:demo", registry.addr());
    rmount_ok(&publisher, &["load", "-i", layout.to_str().unwrap()]);
    rmount_ok(&publisher, &["tag", "localhost/debian:demo", &image]);
    rmount_ok(&publisher, &["push", "-q", &image]);
    if with_index {
        rmount_ok(&publisher, &["index", "build", &image, "--push"]);
    }
    Some(image)
}

/// `rmount containerd pull --json` against `ctd`; the JSON it printed.
fn containerd_pull(
    daemon: &Daemon,
    ctd: &Containerd,
    snapshotter: &str,
    image: &str,
    extra: &[&str],
) -> Value {
    let socket = ctd.socket();
    let mut args = vec![
        "containerd",
        "pull",
        "--address",
        socket.to_str().unwrap(),
        "--namespace",
        NAMESPACE,
        "--snapshotter",
        snapshotter,
        "--json",
    ];
    args.extend_from_slice(extra);
    args.push(image);
    let start = Instant::now();
    let out = daemon.run(&args);
    assert!(
        out.status.success(),
        "rmount {args:?} failed:\n{}\n{}",
        describe(&out),
        ctd.log_tail()
    );
    eprintln!("rmount containerd pull --snapshotter {snapshotter}: {:?}", start.elapsed());
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}:\n{text}"))
}

/// Each layer's `outcome` in a pull's JSON.
fn outcomes(pulled: &Value) -> Vec<String> {
    let layers = pulled["layers"].as_array().unwrap_or_else(|| panic!("no layers: {pulled:#}"));
    assert!(!layers.is_empty(), "no layers: {pulled:#}");
    layers.iter().map(|l| l["outcome"].as_str().unwrap().to_string()).collect()
}

fn layer_digests(pulled: &Value) -> Vec<String> {
    pulled["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().into())
        .collect()
}

/// The digests in containerd's content store.
fn content(ctd: &Containerd) -> Vec<String> {
    ctd.ctr_ok(&["content", "ls", "--quiet"]).split_whitespace().map(String::from).collect()
}

/// The leases of the namespace (a pull deletes its own).
fn leases(ctd: &Containerd) -> Vec<String> {
    ctd.ctr_ok(&["leases", "ls", "--quiet"]).split_whitespace().map(String::from).collect()
}

/// `rmount daemon status --json`'s `snapshotterSocket`.
fn snapshotter_socket(daemon: &Daemon) -> PathBuf {
    let out = daemon.ok(&["daemon", "status", "--json"]);
    let status: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}:\n{out}"));
    PathBuf::from(status["snapshotterSocket"].as_str().expect("snapshotterSocket"))
}

#[test]
fn containerd_pull_serves_layers_lazily_and_runs() {
    if !require_root_fuse(TOOLS) {
        return;
    }
    let Some(version) = debian_version() else { return };
    let tmp = tempdir();
    let registry = Registry::plain();
    let Some(image) = publish_debian(tmp.path(), &registry, "debian/lazy", true) else { return };
    let daemon = Daemon::new(tmp.path());
    daemon.ok(&["daemon"]);
    let socket = snapshotter_socket(&daemon);
    // Declared last: dropped (tasks killed, rootfs unmounted) before the daemon.
    let ctd = Containerd::start(&tmp.path().join("containerd"), &[("rmount", &socket)]);

    let pulled = containerd_pull(&daemon, &ctd, "rmount", &image, &[]);
    eprintln!("{pulled:#}");
    assert_eq!(pulled["image"], image.as_str());
    assert!(outcomes(&pulled).iter().all(|o| o == "lazy"), "{pulled:#}\n{}", daemon.log_tail());
    let images = ctd.ctr_ok(&["image", "ls", "--quiet"]);
    assert!(images.lines().any(|l| l == image), "ctr image ls:\n{images}");
    let stored = content(&ctd);
    for digest in [&pulled["manifest"], &pulled["config"]] {
        assert!(stored.iter().any(|d| d == digest.as_str().unwrap()), "{digest} not in {stored:?}");
    }
    for digest in layer_digests(&pulled) {
        assert!(!stored.contains(&digest), "layer {digest} was downloaded into containerd");
    }
    assert_eq!(leases(&ctd), Vec::<String>::new(), "the pull's lease is left");
    let top = pulled["layers"].as_array().unwrap().last().unwrap()["chainId"].as_str().unwrap();
    assert!(
        ctd.snapshots("rmount").iter().any(|r| r.key == top && r.kind == "Committed"),
        "no committed snapshot {top}"
    );

    let start = Instant::now();
    let id = unique_id("cdpull-run");
    assert_eq!(ctd.run_ok("rmount", &image, &id, &["cat", "/etc/debian_version"]), version);
    eprintln!("ctr run --rm --snapshotter rmount: {:?}", start.elapsed());
    // `ps` shows figures saved every few seconds; `stats` asks the mount.
    let mounts = daemon.ps();
    assert!(!mounts.is_empty(), "the daemon serves no mount");
    let mut most: f64 = 0.0;
    for mount in &mounts {
        assert_eq!(mount["lazy"], true, "{mount:#}");
        let mountpoint = mount["mountpoint"].as_str().unwrap();
        let out = daemon.ok(&["stats", "--json", mountpoint]);
        let stats: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}:\n{out}"));
        let fetched = stats["fetchedPercent"].as_f64().unwrap();
        eprintln!("{mountpoint}: {fetched}% fetched");
        assert!(fetched < 50.0, "a `cat` fetched {fetched}% of the image: {stats:#}");
        most = most.max(fetched);
    }
    assert!(most > 0.0, "nothing was fetched: was the image not lazy?");

    // Again: every snapshot is there already; the image is updated in place.
    let again = containerd_pull(&daemon, &ctd, "rmount", &image, &[]);
    assert!(outcomes(&again).iter().all(|o| o == "existing"), "{again:#}");
    assert_eq!(again["created"], false);
    let id = unique_id("cdpull-again");
    assert_eq!(ctd.run_ok("rmount", &image, &id, &["cat", "/etc/debian_version"]), version);

    // The GC labels tie the snapshots to the image: removing it collects them.
    ctd.ctr_ok(&["image", "rm", "--sync", &image]);
    let start = Instant::now();
    while !ctd.snapshots("rmount").is_empty() {
        assert!(start.elapsed().as_secs() < 10, "snapshots left: {:?}", ctd.snapshots("rmount"));
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(content(&ctd), Vec::<String>::new(), "content left after the image's removal");
}

#[test]
fn containerd_pull_unpacks_what_the_snapshotter_does_not_serve_lazily() {
    if !require_root_fuse(TOOLS) {
        return;
    }
    let Some(version) = debian_version() else { return };
    let tmp = tempdir();
    let registry = Registry::plain();
    let Some(image) = publish_debian(tmp.path(), &registry, "debian/plain", false) else { return };
    // No rmount daemon: containerd's own overlayfs snapshotter ignores the
    // remote-snapshot labels and hands out mounts for every layer.
    let daemon = Daemon::new(tmp.path());
    let ctd = Containerd::start(&tmp.path().join("containerd"), &[]);

    let pulled = containerd_pull(&daemon, &ctd, "overlayfs", &image, &[]);
    eprintln!("{pulled:#}");
    assert!(outcomes(&pulled).iter().all(|o| o == "unpacked"), "{pulled:#}");
    let stored = content(&ctd);
    for digest in layer_digests(&pulled) {
        assert!(stored.contains(&digest), "layer {digest} is not in containerd's content store");
    }
    assert_eq!(leases(&ctd), Vec::<String>::new(), "the pull's lease is left");
    assert!(ctd.snapshots("overlayfs").iter().all(|r| r.kind == "Committed"));
    let id = unique_id("cdpull-overlayfs");
    assert_eq!(ctd.run_ok("overlayfs", &image, &id, &["cat", "/etc/debian_version"]), version);
}

#[test]
fn containerd_pull_unpacks_layers_rmount_cannot_reach() {
    if !require_root_fuse(TOOLS) {
        return;
    }
    let Some(version) = debian_version() else { return };
    let tmp = tempdir();
    let registry = Registry::plain();
    let Some(_) = publish_debian(tmp.path(), &registry, "debian/hidden", true) else { return };
    // `hidden.invalid:5000` is the registry only for the pull (its mirror
    // configuration); the daemon cannot resolve the name.
    let hosts = tmp.path().join("hosts");
    let dir = hosts.join("hidden.invalid:5000");
    std::fs::create_dir_all(&dir).unwrap();
    let server = format!("server = \"http://{}\"\n", registry.addr());
    std::fs::write(dir.join("hosts.toml"), server).unwrap();
    let image = "hidden.invalid:5000/debian/hidden:demo";
    let daemon = Daemon::new(tmp.path());
    daemon.ok(&["daemon"]);
    let socket = snapshotter_socket(&daemon);
    let ctd = Containerd::start(&tmp.path().join("containerd"), &[("rmount", &socket)]);

    let hosts_dir = format!("--hosts-dir={}", hosts.display());
    let pulled = containerd_pull(&daemon, &ctd, "rmount", image, &[&hosts_dir]);
    assert!(outcomes(&pulled).iter().all(|o| o == "unpacked"), "{pulled:#}");
    assert_eq!(leases(&ctd), Vec::<String>::new(), "the pull's lease is left");
    let id = unique_id("cdpull-fallback");
    assert_eq!(ctd.run_ok("rmount", image, &id, &["cat", "/etc/debian_version"]), version);
}

#[test]
fn containerd_pull_unpacks_layers_without_an_index() {
    if !require_root_fuse(TOOLS) {
        return;
    }
    let Some(version) = debian_version() else { return };
    let tmp = tempdir();
    let registry = Registry::plain();
    let Some(image) = publish_debian(tmp.path(), &registry, "debian/unindexed", false) else {
        return;
    };
    let daemon = Daemon::new(tmp.path());
    daemon.ok(&["daemon"]);
    let socket = snapshotter_socket(&daemon);
    let ctd = Containerd::start(&tmp.path().join("containerd"), &[("rmount", &socket)]);

    let pulled = containerd_pull(&daemon, &ctd, "rmount", &image, &[]);
    assert!(outcomes(&pulled).iter().all(|o| o == "unpacked"), "{pulled:#}");
    assert!(daemon.ps().is_empty(), "no lazy mount: {:#?}", daemon.ps());
    let blobs = std::fs::read_dir(daemon.root.join("blobs/sha256")).unwrap();
    let layers = layer_digests(&pulled);
    for blob in blobs {
        let name = format!("sha256:{}", blob.unwrap().file_name().to_string_lossy());
        assert!(!layers.contains(&name), "rmount downloaded layer {name} for containerd");
    }
    let id = unique_id("cdpull-unindexed");
    assert_eq!(ctd.run_ok("rmount", &image, &id, &["cat", "/etc/debian_version"]), version);
}
