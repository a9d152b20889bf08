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
//!   agree with the snapshot directories on disk;
//! * lazy (remote) snapshots: an image published with an rmount index
//!   artifact, pulled with `ctr-remote image rpull` (which hardcodes the
//!   snapshotter name `stargz`, so rmount's socket is registered under that
//!   name too), is committed layer by layer without a layer blob in
//!   containerd's content store; containers run on it (python, and nginx
//!   answering on its own loopback) while `rmount stats`/`ps` show only a
//!   fraction of the layer bytes fetched;
//! * restarts: `rmount daemon restart` and `kill -9` of its worker keep a
//!   running container's rootfs readable and new containers starting; a
//!   containerd restart keeps the snapshots.

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

// ------------------------------------------------------- lazy (remote) snapshots

const LAZY_TOOLS: &[&str] =
    &["containerd", "ctr", "ctr-remote", "runc", "docker-registry", "skopeo", "nsenter", "curl"];

/// An image of `scripts/make-images.sh` to pull lazily, and a workload
/// whose output is known from the image's own layers.
struct Workload {
    layout: PathBuf,
    tag: &'static str,
    /// What `ctr run` runs.
    cmd: Vec<&'static str>,
    /// What it prints.
    expected: String,
    /// Commands reading parts of the image `cmd` does not, and what they print.
    others: Vec<(Vec<&'static str>, String)>,
}

/// The `debian-python` image with a python workload, or (when that image
/// can't be built here) the `debian` image with `cat /etc/debian_version`.
fn python_or_debian() -> Option<Workload> {
    if let Some(layout) = image_layout("debian-python") {
        return Some(Workload {
            layout,
            tag: "python",
            cmd: vec!["python3", "-c", "import json; print(json.dumps({'lazy': 'python'}))"],
            expected: "{\"lazy\": \"python\"}\n".into(),
            others: vec![
                (
                    vec!["python3", "-c", "import decimal; print(decimal.Decimal(1) / 8)"],
                    "0.125\n".into(),
                ),
                (
                    vec!["python3", "-c", "import fractions; print(fractions.Fraction(2, 6))"],
                    "1/3\n".into(),
                ),
            ],
        });
    }
    let layout = image_layout("debian")?;
    let version = String::from_utf8(layout_file(&layout, "demo", "etc/debian_version")?).unwrap();
    let file = |path: &str| String::from_utf8(layout_file(&layout, "demo", path).unwrap()).unwrap();
    let (motd, os_release) = (file("etc/motd"), file("usr/lib/os-release"));
    Some(Workload {
        layout,
        tag: "demo",
        cmd: vec!["cat", "/etc/debian_version"],
        expected: version,
        others: vec![
            (vec!["cat", "/etc/motd"], motd),
            (vec!["cat", "/usr/lib/os-release"], os_release),
        ],
    })
}

/// A registry with an image published with its rmount index artifact, an
/// rmount daemon (fresh store) and a containerd with the daemon's
/// snapshotter socket registered as `rmount` and as `stargz`. Fields drop
/// in order: containerd (tasks killed, rootfs unmounted) before the daemon.
struct Lazy {
    ctd: Containerd,
    daemon: Daemon,
    _registry: Registry,
    /// `ADDR/REPO:TAG`.
    image: String,
    /// The image's layers (digest, compressed size), bottom first.
    layers: Vec<(String, u64)>,
    _tmp: tempfile::TempDir,
}

impl Lazy {
    fn start(layout: &Path, tag: &str, repo_tag: &str) -> Lazy {
        Lazy::start_with(layout, tag, repo_tag, &[])
    }

    /// [`Lazy::start`] with extra `rmount daemon` flags.
    fn start_with(layout: &Path, tag: &str, repo_tag: &str, daemon_flags: &[&str]) -> Lazy {
        let tmp = tempdir();
        let registry = Registry::plain();
        let image = publish_with_index(&registry, layout, tag, repo_tag, &tmp.path().join("pub"));
        let daemon = Daemon::new(tmp.path());
        daemon.ok(&[&["daemon"], daemon_flags].concat());
        let socket = snapshotter_socket(&daemon);
        let start = Instant::now();
        let ctd = Containerd::start(
            &tmp.path().join("containerd"),
            &[("rmount", &socket), ("stargz", &socket)],
        );
        eprintln!("containerd up: {:?}", start.elapsed());
        let layers = layout_layers(layout, tag);
        Lazy { ctd, daemon, _registry: registry, image, layers, _tmp: tmp }
    }

    /// `ctr-remote image rpull --plain-http IMAGE`, then checks that the
    /// pull was lazy: one committed `stargz` snapshot per layer, lazy
    /// mounts in `rmount ps`, and no layer blob in containerd's content
    /// store.
    fn rpull(&self) {
        let start = Instant::now();
        self.ctd.ctr_remote_ok(&["image", "rpull", "--plain-http", &self.image]);
        eprintln!("ctr-remote image rpull: {:?}", start.elapsed());
        let rows = self.ctd.snapshots("stargz");
        eprintln!("stargz snapshots: {rows:#?}");
        assert_eq!(rows.len(), self.layers.len(), "one snapshot per layer: {rows:#?}");
        assert!(rows.iter().all(|r| r.kind == "Committed"), "{rows:#?}");
        let lazy = self.lazy_mounts();
        assert!(!lazy.is_empty(), "no lazy mount in rmount ps:\n{:#?}", self.daemon.ps());
        // (The manifest's labels name the layers; the DIGEST column must not.)
        let content = self.ctd.ctr_ok(&["content", "ls"]);
        let blobs: Vec<&str> =
            content.lines().skip(1).filter_map(|l| l.split_whitespace().next()).collect();
        for (digest, _) in &self.layers {
            assert!(
                !blobs.contains(&digest.as_str()),
                "layer {digest} was downloaded into containerd's content store:\n{content}"
            );
        }
    }

    /// Prints the warnings and errors of rmount's and containerd's logs
    /// (for the report; a test asserts on what the commands did).
    fn print_log_warnings(&self) {
        let daemon = self.daemon.log();
        let rmount: Vec<&str> =
            daemon.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).collect();
        eprintln!("daemon.log: {} warnings/errors", rmount.len());
        for line in rmount.iter().take(20) {
            eprintln!("  {line}");
        }
        let ctd = self.ctd.log();
        let containerd: Vec<&str> = ctd
            .lines()
            .filter(|l| l.contains("level=error") || l.contains("level=warning"))
            .collect();
        eprintln!("containerd.log: {} warnings/errors", containerd.len());
        for line in containerd.iter().take(20) {
            eprintln!("  {line}");
        }
    }

    /// The lazy mounts `rmount ps --json` lists.
    fn lazy_mounts(&self) -> Vec<Value> {
        self.daemon.ps().into_iter().filter(|m| m["lazy"] == true).collect()
    }

    /// `rmount stats MOUNTPOINT --json` of every lazy mount.
    fn lazy_stats(&self) -> Vec<Value> {
        self.lazy_mounts()
            .iter()
            .map(|m| {
                let mountpoint = m["mountpoint"].as_str().unwrap();
                let out = self.daemon.ok(&["stats", mountpoint, "--json"]);
                serde_json::from_str(&out).unwrap_or_else(|e| panic!("stats --json: {e}\n{out}"))
            })
            .collect()
    }

    /// Checks that some, but not all, of the layers' bytes were fetched:
    /// every lazy mount's `fetchedPercent` (ps and stats) is below 100, and
    /// per layer digest the bytes fetched (the most any mount reports)
    /// sum to more than nothing and less than the layers' size.
    ///
    /// `ps` reads the statistics a mount writes to disk (at most once a
    /// second, when they moved), so it is polled until it agrees with
    /// `stats` (up to 5 s).
    fn assert_fetched_a_fraction(&self) {
        let stats = self.lazy_stats();
        let percent_of = |mountpoint: &Value| {
            let s = stats.iter().find(|s| &s["mountpoint"] == mountpoint);
            s.map(|s| s["fetchedPercent"].as_f64().unwrap())
        };
        let start = Instant::now();
        let ps = loop {
            let ps = self.lazy_mounts();
            let agree = ps.iter().all(|m| {
                let pct = m["fetchedPercent"].as_f64().unwrap();
                percent_of(&m["mountpoint"]).is_some_and(|s| (s - pct).abs() < 0.05)
            });
            if agree {
                eprintln!("rmount ps agrees with rmount stats after {:?}", start.elapsed());
                break ps;
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "rmount ps --json's fetchedPercent disagrees with rmount stats for 5 s:\n\
                 {ps:#?}\n{stats:#?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        eprintln!("rmount ps --json (lazy): {ps:#?}");
        for s in &stats {
            eprintln!(
                "rmount stats {}: fetched {}% ({} bytes, {} fetches)",
                s["mountpoint"], s["fetchedPercent"], s["fetchedBytes"], s["fetches"]
            );
            for l in s["layers"].as_array().unwrap() {
                eprintln!("  {l}");
            }
        }
        for m in &ps {
            let pct = m["fetchedPercent"].as_f64().unwrap();
            assert!(pct < 100.0, "a lazy mount fetched everything: {m:#}");
        }
        let mut fetched = std::collections::BTreeMap::<String, u64>::new();
        for s in &stats {
            assert!(s["fetchedPercent"].as_f64().unwrap() < 100.0, "{s:#}");
            for l in s["layers"].as_array().unwrap() {
                let bytes = l["fetchedBytes"].as_u64().unwrap();
                let entry = fetched.entry(l["digest"].as_str().unwrap().to_string()).or_default();
                *entry = (*entry).max(bytes);
            }
        }
        let total: u64 = self.layers.iter().map(|(_, size)| size).sum();
        let got: u64 = fetched.values().sum();
        eprintln!(
            "fetched {got} of {total} layer bytes ({:.1}%)",
            got as f64 * 100.0 / total as f64
        );
        assert!(got > 0, "nothing fetched although a container ran: {stats:#?}");
        assert!(got < total, "every layer byte was fetched: {stats:#?}");
    }
}

#[test]
fn lazy_rpull_with_ctr_remote_then_run() {
    if !require_root_fuse(LAZY_TOOLS) {
        return;
    }
    let Some(w) = python_or_debian() else { return };
    let lazy = Lazy::start(&w.layout, w.tag, "lazy/workload:v1");
    lazy.rpull();
    for s in lazy.lazy_stats() {
        eprintln!(
            "before any container ran: {} fetched {}% ({} bytes, {} fetches)",
            s["mountpoint"], s["fetchedPercent"], s["fetchedBytes"], s["fetches"]
        );
    }
    let start = Instant::now();
    let id = unique_id("lazy-run");
    let out = lazy.ctd.run_ok("stargz", &lazy.image, &id, &w.cmd);
    eprintln!("ctr run --rm --snapshotter stargz: {:?}", start.elapsed());
    assert_eq!(out, w.expected);
    lazy.assert_fetched_a_fraction();
}

/// Polls `nsenter -t PID -n curl -s http://127.0.0.1/` (the container's
/// network namespace) until it answers; returns the body.
fn first_response(ctd: &Containerd, daemon: &Daemon, id: &str, pid: u32) -> String {
    let start = Instant::now();
    loop {
        let mut curl = std::process::Command::new("nsenter");
        curl.args(["-t", &pid.to_string(), "-n", "curl", "-s", "--max-time", "5"]);
        curl.arg("http://127.0.0.1/");
        let out = common::registry::output_with_timeout(&mut curl, b"", Duration::from_secs(10));
        if out.status.success() && !out.stdout.is_empty() {
            eprintln!("nginx's first response: {:?} after ctr run -d", start.elapsed());
            return String::from_utf8_lossy(&out.stdout).into_owned();
        }
        let status = ctd.task_status(id);
        assert!(
            status.as_deref() == Some("RUNNING") && start.elapsed() < Duration::from_secs(30),
            "nginx (task {id}: {status:?}) did not answer on 127.0.0.1:80 within {:?}; last \
             curl:\n{}\n{}\n{}",
            start.elapsed(),
            describe(&out),
            ctd.log_tail(),
            daemon.log_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn nginx_in_a_lazily_pulled_container_serves_on_loopback() {
    if !require_root_fuse(LAZY_TOOLS) {
        return;
    }
    let Some(layout) = image_layout("debian-nginx") else { return };
    let page = layout_file(&layout, "nginx", "var/www/html/index.nginx-debian.html")
        .expect("the nginx image has no /var/www/html/index.nginx-debian.html");
    let page = String::from_utf8(page).unwrap();
    assert!(page.contains("nginx"), "{page}");
    let lazy = Lazy::start(&layout, "nginx", "lazy/nginx:v1");
    lazy.rpull();
    let id = unique_id("lazy-nginx");
    let start = Instant::now();
    let pid = lazy.ctd.run_detached("stargz", &lazy.image, &id, &["nginx", "-g", "daemon off;"]);
    eprintln!("ctr run -d nginx: {:?}", start.elapsed());
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    assert_ne!(ns(&pid.to_string()), ns("self"), "the container shares the host's network");
    let body = first_response(&lazy.ctd, &lazy.daemon, &id, pid);
    assert_eq!(body, page, "nginx served something else than the image's default page");
    lazy.assert_fetched_a_fraction();
    lazy.ctd.kill_task(&id);
}

/// The container `id` (task `pid`, running the loop of
/// [`daemon_restart_and_kill_keep_running_containers`]) still runs and
/// reads its image, and a new container of the image starts and prints.
fn assert_containers_work(
    lazy: &Lazy,
    w: &Workload,
    other: &(Vec<&str>, String),
    id: &str,
    pid: u32,
    when: &str,
) {
    let ctd = &lazy.ctd;
    // First, at once: a new container (containerd's first snapshotter
    // calls since the worker changed: Prepare, Mounts).
    let start = Instant::now();
    let new = unique_id("lazy-new");
    let out = ctd.run("stargz", &lazy.image, &new, &w.cmd);
    assert!(
        out.status.success(),
        "a new container ({new}) {when}: ctr run failed:\n{}\n{}\n{}",
        describe(&out),
        ctd.log_tail(),
        lazy.daemon.log_tail()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), w.expected, "a new container {when}");
    eprintln!("ctr run --rm of a new container {when}: {:?}", start.elapsed());
    // The running container: still running, and reads a part of the
    // image nothing read before (fetched by the new worker).
    assert_eq!(ctd.task_status(id).as_deref(), Some("RUNNING"), "task {id} {when}");
    assert_eq!(ctd.task_pid(id), Some(pid), "task {id}'s pid {when}");
    let start = Instant::now();
    assert_eq!(ctd.exec_ok(id, &w.cmd), w.expected, "ctr task exec {when}");
    let (cmd, expected) = other;
    assert_eq!(&ctd.exec_ok(id, cmd), expected, "ctr task exec {cmd:?} {when}");
    eprintln!("ctr task exec ×2 {when}: {:?}", start.elapsed());
}

#[test]
fn daemon_restart_and_kill_keep_running_containers() {
    if !require_root_fuse(LAZY_TOOLS) {
        return;
    }
    let Some(w) = python_or_debian() else { return };
    let version = layout_file(&w.layout, w.tag, "etc/debian_version").unwrap();
    let lazy = Lazy::start(&w.layout, w.tag, "lazy/restart:v1");
    lazy.rpull();
    let id = unique_id("lazy-loop");
    // Exits (and so stops the task) when a read of the image fails.
    let script = "while true; do cat /etc/debian_version > /dev/null || exit 3; sleep 0.1; done";
    let pid = lazy.ctd.run_detached("stargz", &lazy.image, &id, &["sh", "-c", script]);
    assert_eq!(lazy.ctd.exec_ok(&id, &["cat", "/etc/debian_version"]).as_bytes(), version);
    std::thread::sleep(Duration::from_millis(300));

    let before = lazy.daemon.pong();
    let start = Instant::now();
    lazy.daemon.ok(&["daemon", "restart"]);
    let restarted = lazy.daemon.wait_new_worker(before.pid, Duration::from_secs(10));
    eprintln!(
        "rmount daemon restart: {:?} (worker {} → {})",
        start.elapsed(),
        before.pid,
        restarted.pid
    );
    assert_containers_work(&lazy, &w, &w.others[0], &id, pid, "after `rmount daemon restart`");

    let start = Instant::now();
    let _ = std::process::Command::new("kill").arg("-9").arg(restarted.pid.to_string()).status();
    let respawned = lazy.daemon.wait_new_worker(restarted.pid, Duration::from_secs(10));
    eprintln!("kill -9 of the worker: a new one ({}) after {:?}", respawned.pid, start.elapsed());
    let when = "after kill -9 of the daemon's worker";
    assert_containers_work(&lazy, &w, &w.others[1], &id, pid, when);
    let rows = lazy.ctd.snapshots("stargz");
    assert!(
        rows.iter().filter(|r| r.kind == "Committed").count() == lazy.layers.len(),
        "{rows:#?}"
    );
    lazy.ctd.kill_task(&id);
    lazy.print_log_warnings();
}

#[test]
fn containerd_restart_keeps_snapshots() {
    if !require_root_fuse(LAZY_TOOLS) {
        return;
    }
    let Some(w) = python_or_debian() else { return };
    let mut lazy = Lazy::start(&w.layout, w.tag, "lazy/ctd-restart:v1");
    lazy.rpull();
    let id = unique_id("lazy-first");
    assert_eq!(lazy.ctd.run_ok("stargz", &lazy.image, &id, &w.cmd), w.expected);
    let id = unique_id("lazy-sleep");
    let pid = lazy.ctd.run_detached("stargz", &lazy.image, &id, &["sleep", "300"]);
    let sorted = |mut rows: Vec<SnapshotRow>| {
        rows.sort_by(|a, b| a.key.cmp(&b.key));
        rows
    };
    let before = sorted(lazy.ctd.snapshots("stargz"));
    eprintln!("stargz snapshots before the restart: {before:#?}");
    assert_eq!(before.len(), lazy.layers.len() + 1, "the layers and the sleeper's: {before:#?}");

    let start = Instant::now();
    lazy.ctd.restart();
    eprintln!("containerd restart: {:?}", start.elapsed());
    let after = sorted(lazy.ctd.snapshots("stargz"));
    assert_eq!(after, before, "ctr snapshot ls after a containerd restart");
    let images = lazy.ctd.ctr_ok(&["image", "ls", "--quiet"]);
    assert!(images.lines().any(|l| l == lazy.image), "{images}");
    assert_eq!(lazy.ctd.task_pid(&id), Some(pid), "the sleeper after the restart");
    let (cmd, expected) = &w.others[0];
    assert_eq!(&lazy.ctd.exec_ok(&id, cmd), expected, "exec in the sleeper after the restart");
    let id2 = unique_id("lazy-after");
    assert_eq!(lazy.ctd.run_ok("stargz", &lazy.image, &id2, &w.cmd), w.expected);
    let (cmd, expected) = &w.others[1];
    let id3 = unique_id("lazy-after");
    assert_eq!(&lazy.ctd.run_ok("stargz", &lazy.image, &id3, cmd), expected);
    lazy.ctd.kill_task(&id);
    lazy.assert_fetched_a_fraction();
}

/// The entries of a gzip'd layer tar: path (no `./`, no trailing `/`) →
/// kind and, for a file, its content's sha256. Whiteouts are files named
/// `.wh.*`; their modes differ between writers and are left out.
fn layer_entries(gz: &[u8]) -> std::collections::BTreeMap<String, String> {
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(gz));
    let mut entries = std::collections::BTreeMap::new();
    for entry in archive.entries().expect("tar") {
        let mut entry = entry.expect("tar entry");
        let path = entry.path().expect("path").to_string_lossy().into_owned();
        let path = path.trim_start_matches("./").trim_end_matches('/').to_owned();
        if path.is_empty() || path == "." {
            continue;
        }
        let kind = entry.header().entry_type();
        let what = if kind.is_file() {
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut data).expect("read");
            format!("file {}", sha256_hex(&data))
        } else {
            format!("{kind:?}")
        };
        entries.insert(path, what);
    }
    entries
}

/// A container's changes, committed by containerd's differ (`ctr snapshot
/// diff`) and by `rmount commit --snapshot`, are the same layer entries;
/// rmount's commit is an image whose container sees the changes.
#[test]
fn commit_of_a_lazy_container_matches_containerds_diff() {
    if !require_root_fuse(LAZY_TOOLS) {
        return;
    }
    let Some(w) = python_or_debian() else { return };
    let lazy = Lazy::start(&w.layout, w.tag, "lazy/commit:v1");
    lazy.rpull();
    let id = unique_id("lazy-commit");
    let script = "echo hello > /hello.txt && rm /etc/motd && mkdir -p /new/sub && \
                  echo deep > /new/sub/f && ln -s /hello.txt /new/link && touch /ready && sleep 300";
    lazy.ctd.run_detached("stargz", &lazy.image, &id, &["sh", "-c", script]);
    wait_for("the container's changes", &lazy.ctd, || {
        lazy.ctd
            .ctr(&["task", "exec", "--exec-id", &unique_id("probe"), &id, "test", "-e", "/ready"])
            .status
            .success()
    });

    let diff = lazy.ctd.ctr(&["snapshot", "--snapshotter", "stargz", "diff", &id]);
    assert!(diff.status.success(), "ctr snapshot diff: {}", describe(&diff));
    let theirs = layer_entries(&diff.stdout);

    let committed = "localhost/committed:v1";
    lazy.daemon.ok(&["commit", "--snapshot", &id, committed]);
    let inspect: Value = serde_json::from_str(&lazy.daemon.ok(&["inspect", committed])).unwrap();
    let top = inspect[0]["Layers"].as_array().and_then(|l| l.last()).expect("layers").clone();
    let digest = top["Digest"].as_str().expect("digest");
    let blob = lazy.daemon.root.join("blobs/sha256").join(digest.trim_start_matches("sha256:"));
    let ours = layer_entries(&std::fs::read(&blob).expect("committed layer"));
    eprintln!("containerd's diff: {theirs:#?}\nrmount commit: {ours:#?}");
    assert_eq!(ours, theirs, "rmount commit --snapshot and containerd's differ");
    for path in ["hello.txt", "etc/.wh.motd", "new/sub/f", "new/link", "ready"] {
        assert!(ours.contains_key(path), "{path} in the committed layer");
    }

    // The committed image holds the container's changes.
    let mnt = tempdir();
    lazy.daemon.mount(committed, mnt.path(), true);
    assert_eq!(std::fs::read_to_string(mnt.path().join("new/sub/f")).unwrap(), "deep\n");
    assert!(!mnt.path().join("etc/motd").exists(), "the deleted file stays deleted");
    lazy.daemon.umount(mnt.path());
    lazy.ctd.kill_task(&id);
}

/// `rmount daemon --snapshot-union fuse`: a container's rootfs over lazy
/// layers is rmount's own writable FUSE union (containerd bind-mounts it;
/// no kernel overlayfs), for kernels whose overlayfs refuses FUSE lowers.
/// Containers run, write, survive a daemon restart, and commit.
#[test]
fn fuse_union_serves_container_rootfs_without_kernel_overlayfs() {
    if !require_root_fuse(LAZY_TOOLS) {
        return;
    }
    let Some(w) = python_or_debian() else { return };
    let lazy = Lazy::start_with(&w.layout, w.tag, "lazy/fuse:v1", &["--snapshot-union", "fuse"]);
    lazy.rpull();
    let id = unique_id("fuse-run");
    assert_eq!(lazy.ctd.run_ok("stargz", &lazy.image, &id, &w.cmd), w.expected);

    let id = unique_id("fuse-loop");
    let script = "echo written > /written.txt && rm /etc/motd && touch /ready && sleep 300";
    let pid = lazy.ctd.run_detached("stargz", &lazy.image, &id, &["sh", "-c", script]);
    let mounts = lazy.ctd.ctr_ok(&["snapshot", "--snapshotter", "stargz", "mounts", "/mnt", &id]);
    assert!(
        mounts.contains("-t bind") && mounts.contains("/rootfs "),
        "a bind of the FUSE union's rootfs: {mounts}"
    );
    let writable: Vec<Value> =
        lazy.daemon.ps().into_iter().filter(|m| m["readOnly"] == false).collect();
    assert_eq!(writable.len(), 1, "one writable FUSE union: {:#?}", lazy.daemon.ps());
    wait_for("the container's changes", &lazy.ctd, || {
        lazy.ctd
            .ctr(&["task", "exec", "--exec-id", &unique_id("probe"), &id, "test", "-e", "/ready"])
            .status
            .success()
    });

    let before = lazy.daemon.pong();
    lazy.daemon.ok(&["daemon", "restart"]);
    lazy.daemon.wait_new_worker(before.pid, Duration::from_secs(10));
    assert_eq!(lazy.ctd.task_pid(&id), Some(pid), "the container after a daemon restart");
    assert_eq!(lazy.ctd.exec_ok(&id, &["cat", "/written.txt"]), "written\n");
    let (cmd, expected) = &w.others[0];
    assert_eq!(&lazy.ctd.exec_ok(&id, cmd), expected, "a new read after the restart");

    let diff = lazy.ctd.ctr(&["snapshot", "--snapshotter", "stargz", "diff", &id]);
    assert!(diff.status.success(), "ctr snapshot diff: {}", describe(&diff));
    let theirs = layer_entries(&diff.stdout);
    assert!(
        theirs.contains_key("written.txt") && theirs.contains_key("etc/.wh.motd"),
        "{theirs:#?}"
    );
    // The commit pauses the union while it reads the upper, and resumes it.
    lazy.daemon.ok(&["commit", "--snapshot", &id, "localhost/fuse-committed:v1"]);
    assert_eq!(lazy.ctd.exec_ok(&id, &["cat", "/written.txt"]), "written\n", "after the commit");
    let image: Value =
        serde_json::from_str(&lazy.daemon.ok(&["inspect", "localhost/fuse-committed:v1"])).unwrap();
    let layers = image[0]["Layers"].as_array().map_or(0, Vec::len);
    assert_eq!(layers, lazy.layers.len() + 1, "the image's layers and the container's");
    lazy.ctd.kill_task(&id);
}
