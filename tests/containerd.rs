//! rmount as a containerd snapshotter (issue 8), against Debian's real
//! `containerd` 1.6 and `runc`, each test with a containerd of its own
//! (private config, root, state dir and socket: tests/common/containerd.rs)
//! and the Debian image in a real registry on 127.0.0.1:
//!
//! * the harness itself: pull and run with containerd's built-in
//!   `overlayfs` snapshotter, and the snapshot checks below hold for it
//!   (they are the reference the rmount snapshotter is held to);
//! * `ctr image pull --snapshotter rmount` and `ctr run --snapshotter
//!   rmount` print a file of the image, and `ctr snapshot ls/info/usage/rm`
//!   agree with the snapshot directories on disk.

mod common;

use common::containerd::*;
use common::daemon::Daemon;
use common::registry::Registry;
use common::*;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const TOOLS: &[&str] = &["containerd", "ctr", "runc", "docker-registry", "skopeo"];

fn ready() -> bool {
    require_root_fuse(TOOLS)
}

/// `ctr image pull --plain-http --snapshotter SNAPSHOTTER IMAGE`.
fn pull(ctd: &Containerd, snapshotter: &str, image: &str) {
    let start = Instant::now();
    ctd.ctr_ok(&["image", "pull", "--plain-http", "--snapshotter", snapshotter, image]);
    eprintln!("ctr image pull --snapshotter {snapshotter}: {:?}", start.elapsed());
}

/// Waits up to 10 s for `cond` (containerd removes snapshots from the
/// backend in its garbage collector, after the API call returned).
fn wait_for(what: &str, ctd: &Containerd, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{what}: not after 10 s\n{}",
            ctd.log_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The snapshot dirs on disk: the names under `dir` (`<id>`, each with `fs`).
fn ids_on_disk(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// `DIR/<id>/fs` → `<id>`; panics when `path` is not of that form.
fn id_of(dir: &Path, path: &Path) -> String {
    let rest = path.strip_prefix(dir).unwrap_or_else(|_| {
        panic!("snapshot dir {} is not under {}", path.display(), dir.display())
    });
    let parts: Vec<_> = rest.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    assert!(parts.len() == 2 && parts[1] == "fs", "{} is not <id>/fs", path.display());
    assert!(path.is_dir(), "{} does not exist", path.display());
    parts[0].clone()
}

/// `ctr snapshot ls/info/usage/rm` against the snapshot dirs under `dir`
/// (`<id>/fs`, as containerd's overlayfs snapshotter lays them out) while
/// the only snapshots are one image's committed chain:
///
/// * `ls` lists one chain of Committed snapshots, bottom without parent;
/// * an Active snapshot prepared on the top has an overlay mount whose
///   `lowerdir`s are the chain's dirs (top first) and whose `upperdir` is
///   a new dir: the dirs on disk are exactly those;
/// * `info` has each snapshot's name, parent and kind as `ls` has them;
/// * `usage` of each is the disk usage of its `fs` (`st_blocks`, inodes),
///   also after a write into the active snapshot's upper dir;
/// * `rm` of a snapshot with a child is refused; `rm` of the active one
///   removes its dir.
fn check_snapshots_on_disk(ctd: &Containerd, snapshotter: &str, dir: &Path) {
    let rows = ctd.snapshots(snapshotter);
    eprintln!("{snapshotter} snapshots: {rows:#?}");
    assert!(!rows.is_empty(), "no {snapshotter} snapshots after a pull");
    for row in &rows {
        assert_eq!(row.kind, "Committed", "only the image's layers should exist: {rows:#?}");
    }
    // The chain, top first.
    let top = rows
        .iter()
        .find(|r| !rows.iter().any(|c| c.parent == r.key))
        .unwrap_or_else(|| panic!("no top snapshot in {rows:#?}"));
    let mut chain = vec![top.clone()];
    while let Some(parent) = rows
        .iter()
        .find(|r| !chain.last().unwrap().parent.is_empty() && r.key == chain.last().unwrap().parent)
    {
        chain.push(parent.clone());
    }
    assert_eq!(chain.len(), rows.len(), "not one chain: {rows:#?}");
    assert_eq!(chain.last().unwrap().parent, "", "the bottom has a parent: {rows:#?}");

    // An active snapshot on top shows where every snapshot lives.
    let probe = unique_id("probe");
    ctd.ctr_ok(&["snapshot", "--snapshotter", snapshotter, "prepare", &probe, &top.key]);
    let mounts = ctd.snapshot_mounts(snapshotter, &probe);
    eprintln!("mounts of {probe}: {mounts:#?}");
    assert_eq!(mounts.len(), 1, "{mounts:#?}");
    let mount = &mounts[0];
    assert_eq!(mount.kind, "overlay", "{mount:#?}");
    let lowers = mount.lowerdirs();
    assert_eq!(lowers.len(), chain.len(), "lowerdirs vs the chain {chain:#?}: {mount:#?}");
    let mut ids = BTreeSet::new();
    let mut fs_of = std::collections::BTreeMap::new();
    for (row, lower) in chain.iter().zip(&lowers) {
        assert!(ids.insert(id_of(dir, lower)), "{} twice in {mount:#?}", lower.display());
        fs_of.insert(row.key.clone(), lower.clone());
    }
    let upper = PathBuf::from(mount.option("upperdir").expect("upperdir"));
    let work = PathBuf::from(mount.option("workdir").expect("workdir"));
    let probe_id = id_of(dir, &upper);
    assert!(ids.insert(probe_id.clone()), "the new snapshot reuses a dir: {mount:#?}");
    assert_eq!(work, dir.join(&probe_id).join("work"), "workdir beside upperdir");
    assert!(work.is_dir(), "{} does not exist", work.display());
    fs_of.insert(probe.clone(), upper.clone());
    wait_for("the snapshot dirs on disk are the snapshots", ctd, || ids_on_disk(dir) == ids);

    // info agrees with ls.
    let mut all = chain.clone();
    all.push(SnapshotRow { key: probe.clone(), parent: top.key.clone(), kind: "Active".into() });
    assert_eq!(ctd.snapshots(snapshotter).len(), all.len());
    for row in &all {
        let info = ctd.snapshot_info(snapshotter, &row.key);
        eprintln!("info {}: {info}", row.key);
        assert_eq!(info["Name"], row.key.as_str(), "{info:#}");
        assert_eq!(info["Parent"].as_str().unwrap_or(""), row.parent, "{info:#}");
        assert_eq!(info["Kind"], row.kind.as_str(), "{info:#}");
        assert!(info["Labels"].is_object() || info["Labels"].is_null(), "{info:#}");
        for time in ["Created", "Updated"] {
            assert!(
                info[time].as_str().is_some_and(|t| !t.starts_with("0001")),
                "{time}: {info:#}"
            );
        }
    }

    // usage is the disk usage of each fs dir.
    std::fs::write(upper.join("probe.bin"), pseudo_random(100_000, 8)).unwrap();
    for row in &all {
        let usage = ctd.snapshot_usage(snapshotter, &row.key);
        assert_eq!(usage, disk_usage(&fs_of[&row.key]), "usage of {} ({})", row.key, row.kind);
    }
    let (probe_bytes, probe_inodes) = ctd.snapshot_usage(snapshotter, &probe);
    assert!(probe_bytes >= 100_000 && probe_inodes == 2, "{probe_bytes} {probe_inodes}");

    // rm: refused with a child, done without.
    let out = ctd.ctr(&["snapshot", "--snapshotter", snapshotter, "rm", &top.key]);
    assert!(!out.status.success(), "rm of a parent succeeded:\n{}", describe(&out));
    assert!(fs_of[&top.key].is_dir(), "a refused rm removed the dir");
    ctd.ctr_ok(&["snapshot", "--snapshotter", snapshotter, "rm", &probe]);
    assert_eq!(ctd.snapshots(snapshotter), rows, "ls after rm");
    ids.remove(&probe_id);
    wait_for("rm removes the snapshot's dir", ctd, || ids_on_disk(dir) == ids);
    let out = ctd.ctr(&["snapshot", "--snapshotter", snapshotter, "info", &probe]);
    assert!(!out.status.success(), "info of a removed snapshot:\n{}", describe(&out));
}

#[test]
fn ctr_pull_and_run_with_overlayfs_snapshotter_harness_check() {
    if !ready() {
        return;
    }
    let Some(version) = debian_version() else { return };
    let tmp = tempdir();
    let registry = Registry::plain();
    let image = push_debian(&registry, "debian/containerd:demo").unwrap();
    let start = Instant::now();
    let mut ctd = Containerd::start(&tmp.path().join("containerd"), &[]);
    eprintln!("containerd up: {:?}", start.elapsed());
    pull(&ctd, "overlayfs", &image);

    let start = Instant::now();
    let id = unique_id("overlayfs-run");
    let out = ctd.run_ok("overlayfs", &image, &id, &["cat", "/etc/debian_version"]);
    eprintln!("ctr run --rm: {:?}", start.elapsed());
    assert_eq!(out, version);
    // --rm removed the container and (through the collector) its snapshot.
    let dir = ctd.overlayfs_dir().join("snapshots");
    wait_for("the container's snapshot is collected", &ctd, || {
        ctd.snapshots("overlayfs").iter().all(|r| r.kind == "Committed")
    });
    check_snapshots_on_disk(&ctd, "overlayfs", &dir);

    // A restart keeps images and snapshots; a running container survives it.
    let id = unique_id("overlayfs-sleep");
    let pid = ctd.run_detached("overlayfs", &image, &id, &["sleep", "300"]);
    let start = Instant::now();
    ctd.restart();
    eprintln!("containerd restart: {:?}", start.elapsed());
    assert_eq!(ctd.task_pid(&id), Some(pid), "the task after a restart");
    assert_eq!(ctd.exec_ok(&id, &["cat", "/etc/debian_version"]), version);
    ctd.kill_task(&id);
    let id = unique_id("overlayfs-again");
    assert_eq!(ctd.run_ok("overlayfs", &image, &id, &["cat", "/etc/debian_version"]), version);
}

/// `rmount daemon status --json`'s `snapshotterSocket`, checked against
/// the naming rule (`snapshotter-<hash12>.sock` beside the control socket
/// `rmount-<hash12>.sock`, for a non-default root).
fn snapshotter_socket(daemon: &Daemon) -> PathBuf {
    let out = daemon.ok(&["daemon", "status", "--json"]);
    let status: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}:\n{out}"));
    let socket = status["snapshotterSocket"]
        .as_str()
        .unwrap_or_else(|| panic!("no snapshotterSocket in `daemon status --json`: {status:#}"));
    let control = status["socket"].as_str().expect("socket");
    let hash = Path::new(control)
        .file_name()
        .and_then(|n| n.to_str()?.strip_prefix("rmount-")?.strip_suffix(".sock"))
        .unwrap_or_else(|| panic!("control socket {control} is not rmount-<hash>.sock"));
    let expected = Path::new(control).with_file_name(format!("snapshotter-{hash}.sock"));
    assert_eq!(Path::new(socket), expected, "{status:#}");
    assert_eq!(expected.parent(), Some(Path::new("/run/rmount")));
    PathBuf::from(socket)
}

#[test]
fn ctr_pull_and_run_with_rmount_snapshotter() {
    if !ready() {
        return;
    }
    let Some(version) = debian_version() else { return };
    let tmp = tempdir();
    let daemon = Daemon::new(tmp.path());
    daemon.ok(&["daemon"]);
    let socket = snapshotter_socket(&daemon);
    let registry = Registry::plain();
    let image = push_debian(&registry, "debian/rmount:demo").unwrap();
    // Declared last: dropped (tasks killed, rootfs unmounted) before the daemon.
    let ctd = Containerd::start(&tmp.path().join("containerd"), &[("rmount", &socket)]);
    // (A proxy plugin is "ok" even when nothing listens on its socket:
    // containerd dials lazily. The pull below is what proves the link.)
    let plugins = ctd.ctr_ok(&["plugins", "ls"]);
    assert!(
        plugins.lines().any(|l| l.contains("io.containerd.snapshotter.v1")
            && l.contains("rmount")
            && l.trim_end().ends_with("ok")),
        "the rmount proxy plugin is not loaded:\n{plugins}"
    );

    pull(&ctd, "rmount", &image);
    let start = Instant::now();
    let id = unique_id("rmount-run");
    let out = ctd.run_ok("rmount", &image, &id, &["cat", "/etc/debian_version"]);
    eprintln!("ctr run --rm --snapshotter rmount: {:?}", start.elapsed());
    assert_eq!(out, version);

    let snapshots = daemon.root.join("snapshots");
    assert!(snapshots.join("metadata.redb").is_file(), "no {}/metadata.redb", snapshots.display());
    wait_for("the container's snapshot is collected", &ctd, || {
        ctd.snapshots("rmount").iter().all(|r| r.kind == "Committed")
    });
    check_snapshots_on_disk(&ctd, "rmount", &snapshots.join("snapshots"));

    // The image still runs after all that.
    let id = unique_id("rmount-again");
    assert_eq!(ctd.run_ok("rmount", &image, &id, &["cat", "/etc/debian_version"]), version);
}
