//! containerd harness for tests/containerd.rs: Debian's `containerd` 1.6
//! started with a private config, root, state dir and socket under a test's
//! scope (proxy snapshotter plugins registered by name), `ctr` and
//! `ctr-remote` against it in the namespace [`NAMESPACE`], containers run
//! with their runc state, fifos and cgroup kept out of the host's
//! `/run/containerd` and `/sys/fs/cgroup/<namespace>`, and the Debian image
//! pushed to a local registry.
//!
//! Dropping a [`Containerd`] (also while a test panics) kills its tasks,
//! stops containerd (SIGTERM, then SIGKILL), kills any shim of its socket
//! still alive and the processes that shim ran, and unmounts what is left
//! under the scope (task rootfs mounts). Declare it *after* an rmount
//! [`super::daemon::Daemon`] serving its snapshotter, so that it drops first.
//!
//! containerd 1.6 keeps a few things in `/run/containerd` whatever the
//! config says: the shims' sockets (`/run/containerd/s/<sha256>`, removed
//! when a shim exits, and by the drop for shims it kills) and the empty
//! `s` directory itself.

use super::daemon::{alive, cmdline, mountinfo_points};
use super::registry::{output_with_timeout, skopeo_push, Client, Registry};
use super::{describe, sha256_hex};
use serde_json::Value;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The containerd namespace every `ctr` command of the harness uses.
pub const NAMESPACE: &str = "rmount-test";

/// How long one `ctr` command may take before the harness kills it.
const CTR_TIMEOUT: Duration = Duration::from_secs(60);

/// How long containerd may take to answer `ctr version` after a start.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// The plugins the tests never use (CRI would want CNI and a sandbox
/// image; the others are snapshotters for other filesystems, tracing, and
/// `opt`, which would write to `/opt/containerd`).
const DISABLED_PLUGINS: &[&str] = &[
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
    "io.containerd.internal.v1.opt",
];

/// A containerd process with its own config (`SCOPE/config.toml`), root
/// (`SCOPE/root`), state (`SCOPE/state`), socket (`SCOPE/containerd.sock`)
/// and log (`SCOPE/containerd.log`), in a process group of its own.
pub struct Containerd {
    scope: PathBuf,
    /// `None` while stopped.
    child: Option<Child>,
}

impl Containerd {
    /// Writes the config under `scope` (created if needed) with one
    /// `[proxy_plugins.NAME] type = "snapshot"` per `(NAME, SOCKET)` pair,
    /// starts containerd and waits until `ctr version` answers.
    pub fn start(scope: &Path, proxy_plugins: &[(&str, &Path)]) -> Containerd {
        std::fs::create_dir_all(scope).unwrap();
        let scope = scope.canonicalize().unwrap();
        let quoted = |p: &Path| toml_string(p.to_str().unwrap());
        let mut config = String::from("version = 2\n");
        config += &format!("root = {}\n", quoted(&scope.join("root")));
        config += &format!("state = {}\n", quoted(&scope.join("state")));
        let disabled: Vec<String> = DISABLED_PLUGINS.iter().map(|p| toml_string(p)).collect();
        config += &format!("disabled_plugins = [{}]\n\n", disabled.join(", "));
        config += &format!("[grpc]\n  address = {}\n\n", quoted(&scope.join("containerd.sock")));
        config +=
            &format!("[ttrpc]\n  address = {}\n\n", quoted(&scope.join("containerd.sock.ttrpc")));
        config += "[debug]\n  level = \"debug\"\n\n";
        // Snapshots removed through the API (`ctr snapshot rm`, `ctr
        // container rm`) leave the backend only when the garbage collector
        // runs: run it after every deletion, at once.
        config += "[plugins.\"io.containerd.gc.v1.scheduler\"]\n  deletion_threshold = 1\n  \
                   schedule_delay = \"0s\"\n  startup_delay = \"0s\"\n\n";
        for (name, address) in proxy_plugins {
            config += &format!(
                "[proxy_plugins.{}]\n  type = \"snapshot\"\n  address = {}\n\n",
                toml_string(name),
                quoted(address)
            );
        }
        std::fs::write(scope.join("config.toml"), config).unwrap();
        let mut containerd = Containerd { scope, child: None };
        containerd.spawn_and_wait();
        containerd
    }

    /// Stops containerd (SIGTERM, SIGKILL after 10 s) and starts it again
    /// with the same config, root, state and socket. Shims and their
    /// containers keep running meanwhile; containerd reconnects to them.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn_and_wait();
    }

    /// Stops containerd (SIGTERM to its process group, SIGKILL after 10
    /// s); its shims and containers keep running. A no-op when stopped.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        let pgid = child.id() as libc::pid_t;
        // SAFETY: kill(2) on the process group we created; no memory involved.
        unsafe { libc::kill(-pgid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            if Instant::now() > deadline {
                eprintln!("containerd {pgid} ignored SIGTERM for 10 s; killing it");
                // SAFETY: as above.
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Is containerd running?
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// containerd's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The scope everything lives under.
    pub fn scope(&self) -> &Path {
        &self.scope
    }

    /// The gRPC socket (`ctr --address`).
    pub fn socket(&self) -> PathBuf {
        self.scope.join("containerd.sock")
    }

    /// containerd's root (`root =`): content store, metadata, built-in
    /// snapshotters (`ROOT/io.containerd.snapshotter.v1.overlayfs`).
    pub fn root(&self) -> PathBuf {
        self.scope.join("root")
    }

    /// containerd's state dir (`state =`): task bundles and their rootfs.
    pub fn state(&self) -> PathBuf {
        self.scope.join("state")
    }

    /// The config file containerd runs with.
    pub fn config_path(&self) -> PathBuf {
        self.scope.join("config.toml")
    }

    /// Where the built-in `overlayfs` snapshotter keeps its snapshots
    /// (`…/snapshots/<id>/fs`, metadata in `…/metadata.db`).
    pub fn overlayfs_dir(&self) -> PathBuf {
        self.root().join("io.containerd.snapshotter.v1.overlayfs")
    }

    /// Everything containerd logged (at debug level), over all restarts.
    pub fn log(&self) -> String {
        let raw = std::fs::read(self.scope.join("containerd.log")).unwrap_or_default();
        String::from_utf8_lossy(&raw).into_owned()
    }

    /// The last lines of containerd's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        format!("--- {}/containerd.log (tail):\n{tail}", self.scope.display())
    }

    /// `PROGRAM --address SOCK --namespace rmount-test ARGS…` (killed after a minute).
    fn client(&self, program: &str, args: &[&str]) -> Output {
        let mut command = Command::new(program);
        command.arg("--address").arg(self.socket()).args(["--namespace", NAMESPACE]).args(args);
        output_with_timeout(&mut command, b"", CTR_TIMEOUT)
    }

    fn client_ok(&self, program: &str, args: &[&str]) -> String {
        let out = self.client(program, args);
        assert!(
            out.status.success(),
            "{program} {args:?} failed:\n{}\n{}",
            describe(&out),
            self.log_tail()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `ctr` against this containerd.
    pub fn ctr(&self, args: &[&str]) -> Output {
        self.client("ctr", args)
    }

    /// Runs `ctr`; panics with its output and containerd's log tail unless
    /// it succeeds. Returns stdout.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        self.client_ok("ctr", args)
    }

    /// Runs `ctr-remote` (stargz-snapshotter's ctr, same global flags).
    pub fn ctr_remote(&self, args: &[&str]) -> Output {
        self.client("ctr-remote", args)
    }

    /// Runs `ctr-remote`; panics unless it succeeds. Returns stdout.
    pub fn ctr_remote_ok(&self, args: &[&str]) -> String {
        self.client_ok("ctr-remote", args)
    }

    /// The options that keep a `ctr run` container's state off the host:
    /// runc's state in `SCOPE/runc`, the task's fifos in `SCOPE/fifo`, and
    /// no cgroup of ours (runc then puts it in `/<id>` under its own,
    /// removed with the container) instead of `/rmount-test/<id>`.
    pub fn run_options(&self) -> Vec<String> {
        vec![
            format!("--runc-root={}", self.scope.join("runc").display()),
            format!("--fifo-dir={}", self.scope.join("fifo").display()),
            "--cgroup=".to_string(),
        ]
    }

    /// `ctr run --rm --snapshotter SNAPSHOTTER [run_options] IMAGE ID CMD…`
    /// (the image must be pulled). `id` must be unique on the host (runc
    /// and the shim's socket are keyed by it): see [`unique_id`].
    pub fn run(&self, snapshotter: &str, image: &str, id: &str, cmd: &[&str]) -> Output {
        let snapshotter = format!("--snapshotter={snapshotter}");
        let options = self.run_options();
        let mut args = vec!["run", "--rm", snapshotter.as_str()];
        args.extend(options.iter().map(String::as_str));
        args.extend([image, id]);
        args.extend_from_slice(cmd);
        self.ctr(&args)
    }

    /// [`Containerd::run`]; panics unless it succeeds. Returns stdout.
    pub fn run_ok(&self, snapshotter: &str, image: &str, id: &str, cmd: &[&str]) -> String {
        let out = self.run(snapshotter, image, id, cmd);
        assert!(
            out.status.success(),
            "ctr run {id} {cmd:?} ({snapshotter}) failed:\n{}\n{}",
            describe(&out),
            self.log_tail()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `ctr run -d` (detached, no `--rm`): the container keeps running;
    /// returns the task's pid. Stop it with [`Containerd::kill_task`] (the
    /// drop does it too).
    pub fn run_detached(&self, snapshotter: &str, image: &str, id: &str, cmd: &[&str]) -> u32 {
        let snapshotter = format!("--snapshotter={snapshotter}");
        let options = self.run_options();
        let mut args = vec!["run", "-d", snapshotter.as_str()];
        args.extend(options.iter().map(String::as_str));
        args.extend([image, id]);
        args.extend_from_slice(cmd);
        self.ctr_ok(&args);
        self.task_pid(id).unwrap_or_else(|| panic!("no task {id} after ctr run -d"))
    }

    /// `ctr task exec --exec-id UNIQUE ID CMD…` (fifos under the scope);
    /// panics unless it succeeds. Returns stdout.
    pub fn exec_ok(&self, id: &str, cmd: &[&str]) -> String {
        let exec_id = unique_id("exec");
        let fifo_dir = format!("--fifo-dir={}", self.scope.join("fifo").display());
        let mut args = vec!["task", "exec", fifo_dir.as_str(), "--exec-id", exec_id.as_str(), id];
        args.extend_from_slice(cmd);
        self.ctr_ok(&args)
    }

    /// The pid of task `id` (`ctr task ls`), if it exists.
    pub fn task_pid(&self, id: &str) -> Option<u32> {
        let out = self.ctr_ok(&["task", "ls"]);
        out.lines().skip(1).find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.first() == Some(&id)).then(|| fields.get(1)?.parse().ok()).flatten()
        })
    }

    /// The status of task `id` (`ctr task ls`: `RUNNING`, `STOPPED`…), if it exists.
    pub fn task_status(&self, id: &str) -> Option<String> {
        let out = self.ctr_ok(&["task", "ls"]);
        out.lines().skip(1).find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.first() == Some(&id)).then(|| fields.get(2).map(|s| s.to_string())).flatten()
        })
    }

    /// Kills task `id` (SIGKILL), deletes it and its container (and so
    /// the container's snapshot).
    pub fn kill_task(&self, id: &str) {
        let _ = self.ctr(&["task", "kill", "--signal", "SIGKILL", id]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.ctr(&["task", "rm", id]).status.success() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.ctr(&["task", "rm", "--force", id]);
        let _ = self.ctr(&["container", "rm", id]);
    }

    /// `ctr snapshot --snapshotter S ls`, parsed.
    pub fn snapshots(&self, snapshotter: &str) -> Vec<SnapshotRow> {
        let out = self.ctr_ok(&["snapshot", "--snapshotter", snapshotter, "ls"]);
        parse_snapshot_ls(&out)
    }

    /// `ctr snapshot --snapshotter S info KEY` (JSON), parsed.
    pub fn snapshot_info(&self, snapshotter: &str, key: &str) -> Value {
        let out = self.ctr_ok(&["snapshot", "--snapshotter", snapshotter, "info", key]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("snapshot info {key}: {e}\n{out}"))
    }

    /// `ctr snapshot --snapshotter S usage -b KEY`: (bytes, inodes).
    pub fn snapshot_usage(&self, snapshotter: &str, key: &str) -> (u64, u64) {
        let out = self.ctr_ok(&["snapshot", "--snapshotter", snapshotter, "usage", "-b", key]);
        let line = out.lines().nth(1).unwrap_or_else(|| panic!("snapshot usage {key}:\n{out}"));
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields[..] {
            [k, size, inodes] if k == key => (size.parse().unwrap(), inodes.parse().unwrap()),
            _ => panic!("snapshot usage {key}: unexpected line {line:?}\n{out}"),
        }
    }

    /// `ctr snapshot --snapshotter S mounts TARGET KEY`, parsed: the mount
    /// command ctr prints (`mount -t TYPE SOURCE TARGET -o OPTIONS`).
    pub fn snapshot_mounts(&self, snapshotter: &str, key: &str) -> Vec<MountLine> {
        let out = self.ctr_ok(&["snapshot", "--snapshotter", snapshotter, "mounts", "/MNT", key]);
        out.lines().filter(|l| !l.trim().is_empty()).map(|l| parse_mount_line(l, &out)).collect()
    }

    /// Kills every task of the namespace (best effort, for the drop).
    fn kill_all_tasks(&self) {
        let out = self.ctr(&["task", "ls", "--quiet"]);
        if !out.status.success() {
            return;
        }
        for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            eprintln!("cleanup: killing containerd task {id}");
            self.kill_task(id);
        }
    }

    /// Spawns containerd on the config, appending to its log, and waits
    /// for `ctr version`; panics with the log tail when it does not answer.
    fn spawn_and_wait(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.scope.join("containerd.log"))
            .unwrap();
        let _ = writeln!(&log, "---- harness: starting containerd");
        let _ = std::fs::remove_file(self.socket());
        let mut child = Command::new("/usr/bin/containerd")
            .arg("--config")
            .arg(self.config_path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("spawn /usr/bin/containerd");
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("containerd exited ({status}) before answering\n{}", self.log_tail());
            }
            if self.socket().exists() {
                let mut command = Command::new("ctr");
                command.arg("--address").arg(self.socket()).arg("version");
                let out = output_with_timeout(&mut command, b"", Duration::from_secs(5));
                if out.status.success() {
                    break;
                }
            }
            if start.elapsed() > START_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                panic!("containerd did not answer within {START_TIMEOUT:?}\n{}", self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.child = Some(child);
    }

    /// Kills (SIGKILL) every shim of this containerd's socket still alive,
    /// and first the processes each one runs (a container's init; killing
    /// it ends its pid namespace); removes the killed shims' sockets.
    fn kill_shims(&self) {
        let socket = self.socket();
        let socket = socket.to_str().unwrap_or("?");
        for pid in all_pids() {
            let args = cmdline_args(pid);
            if !args.first().is_some_and(|a| a.contains("containerd-shim")) {
                continue;
            }
            let flag = |name: &str| {
                args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
            };
            if flag("-address").as_deref() != Some(socket) {
                continue;
            }
            for child in all_pids().into_iter().filter(|p| parent_pid(*p) == Some(pid)) {
                eprintln!("cleanup: killing {child} ({}) of a leftover shim", cmdline(child));
                kill9(child);
            }
            eprintln!("cleanup: killing leftover shim {pid} ({})", args.join(" "));
            kill9(pid);
            // The shim's socket: /run/containerd/s/sha256(ADDRESS/NS/ID).
            if let (Some(ns), Some(id)) = (flag("-namespace"), flag("-id")) {
                let hash = sha256_hex(format!("{socket}/{ns}/{id}").as_bytes());
                let _ = std::fs::remove_file(Path::new("/run/containerd/s").join(hash));
            }
        }
    }

    /// Unmounts everything under the scope, deepest first (lazily when a
    /// plain unmount fails).
    fn unmount_scope(&self) {
        let mut left: Vec<PathBuf> =
            mountinfo_points().into_iter().filter(|m| m.starts_with(&self.scope)).collect();
        left.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
        left.dedup();
        for m in left {
            eprintln!("cleanup: {} is still mounted; unmounting it", m.display());
            let ok = Command::new("umount").arg(&m).status().is_ok_and(|s| s.success());
            if !ok {
                let _ = Command::new("umount").arg("-l").arg(&m).status();
            }
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Polite first (the shims unmount the rootfs and delete runc's
        // state), unless containerd is gone (each ctr would wait to connect).
        if self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None))) {
            self.kill_all_tasks();
        }
        self.stop();
        self.kill_shims();
        self.unmount_scope();
    }
}

/// One row of `ctr snapshot ls`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRow {
    pub key: String,
    /// Empty for a snapshot without a parent.
    pub parent: String,
    /// `Active`, `Committed` or `View`.
    pub kind: String,
}

/// Parses `ctr snapshot ls` (`KEY PARENT KIND`; PARENT may be blank).
pub fn parse_snapshot_ls(out: &str) -> Vec<SnapshotRow> {
    let mut lines = out.lines();
    let header = lines.next().unwrap_or("");
    assert!(header.starts_with("KEY"), "ctr snapshot ls printed no header:\n{out}");
    lines
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields[..] {
                [key, kind] => {
                    SnapshotRow { key: key.into(), parent: String::new(), kind: kind.into() }
                }
                [key, parent, kind] => {
                    SnapshotRow { key: key.into(), parent: parent.into(), kind: kind.into() }
                }
                _ => panic!("unexpected ctr snapshot ls line {line:?}:\n{out}"),
            }
        })
        .collect()
}

/// One mount of `ctr snapshot mounts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountLine {
    /// `overlay` or `bind`.
    pub kind: String,
    pub source: String,
    /// The `-o` options, split at commas.
    pub options: Vec<String>,
}

impl MountLine {
    /// The value of option `name=…` (e.g. `upperdir`), if present.
    pub fn option(&self, name: &str) -> Option<&str> {
        self.options.iter().find_map(|o| o.strip_prefix(name)?.strip_prefix('='))
    }

    /// `lowerdir`'s directories, top first (empty when there is none).
    pub fn lowerdirs(&self) -> Vec<PathBuf> {
        self.option("lowerdir").map_or_else(Vec::new, |l| l.split(':').map(PathBuf::from).collect())
    }
}

/// Parses `mount -t TYPE SOURCE TARGET -o OPTS` (ctr's `snapshot mounts`).
fn parse_mount_line(line: &str, out: &str) -> MountLine {
    let fields: Vec<&str> = line.split_whitespace().collect();
    match fields[..] {
        ["mount", "-t", kind, source, _target, "-o", options] => MountLine {
            kind: kind.into(),
            source: source.into(),
            options: options.split(',').map(String::from).collect(),
        },
        ["mount", "-t", kind, source, _target] => {
            MountLine { kind: kind.into(), source: source.into(), options: Vec::new() }
        }
        _ => panic!("unexpected ctr snapshot mounts line {line:?}:\n{out}"),
    }
}

/// Disk usage the way containerd computes a snapshot's (`fs.DiskUsage`):
/// allocated bytes (`st_blocks * 512`) and the number of inodes, each
/// hardlinked inode counted once, the directory itself included.
pub fn disk_usage(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let mut bytes = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if seen.insert((meta.dev(), meta.ino())) {
            bytes += meta.blocks() * 512;
        }
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path).unwrap() {
                stack.push(entry.unwrap().path());
            }
        }
    }
    (bytes, seen.len() as u64)
}

/// A container id unique on this host for this test run: `PREFIX-PID-N`.
/// (runc's state, the shim's socket and the container's cgroup are keyed
/// by the id, and tests run in parallel.)
pub fn unique_id(prefix: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!("{prefix}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// The Debian image (`scripts/make-images.sh debian`'s `demo` tag) pushed
/// to `registry` as `REPO_TAG`; returns `ADDR/REPO_TAG` for `ctr pull
/// --plain-http`. `None` (skip) when the image can't be built here.
pub fn push_debian(registry: &Registry, repo_tag: &str) -> Option<String> {
    let layout = super::daemon::debian_layout()?;
    skopeo_push(&layout, "demo", registry.addr(), repo_tag, &[]);
    Some(format!("{}/{repo_tag}", registry.addr()))
}

/// The text of `/etc/debian_version` in the Debian image (from its own
/// layer blobs, as the oracle for what a container prints).
pub fn debian_version() -> Option<String> {
    let layout = super::daemon::debian_layout()?;
    let text = layout_file(&layout, "demo", "etc/debian_version")
        .expect("the Debian image has no /etc/debian_version");
    Some(String::from_utf8(text).unwrap())
}

/// The layout `scripts/make-images.sh NAME` builds (`debian`,
/// `debian-python`, `debian-nginx`…), built once and cached under
/// `$RMOUNT_IMAGE_CACHE` like [`super::daemon::debian_layout`]: `None`
/// (skip) when it is not built and the tools that build it are missing (a
/// failure under `CI=true`).
pub fn image_layout(name: &str) -> Option<PathBuf> {
    let cache = std::env::var_os("RMOUNT_IMAGE_CACHE")
        .map_or_else(|| PathBuf::from("/var/cache/rmount-images"), PathBuf::from);
    if !cache.join(name).join("index.json").exists()
        && !["mmdebstrap", "umoci"].iter().all(|t| super::require(t, super::which(t)))
    {
        return None;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/make-images.sh");
    let start = Instant::now();
    let out = super::run_ok(Command::new(script).arg(name));
    eprintln!("scripts/make-images.sh {name}: {:?}", start.elapsed());
    Some(PathBuf::from(out.trim()))
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The manifest of tag `tag` in the OCI layout `layout`.
pub fn layout_manifest(layout: &Path, tag: &str) -> Value {
    let index = read_json(&layout.join("index.json"));
    let desc = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap_or_else(|| panic!("no tag {tag} in {}", layout.display()))
        .clone();
    read_json(&layout_blob(layout, desc["digest"].as_str().unwrap()))
}

fn layout_blob(layout: &Path, digest: &str) -> PathBuf {
    layout.join("blobs/sha256").join(&digest["sha256:".len()..])
}

/// The (digest, size) of each layer of tag `tag` in `layout`, bottom first.
pub fn layout_layers(layout: &Path, tag: &str) -> Vec<(String, u64)> {
    let manifest = layout_manifest(layout, tag);
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| (l["digest"].as_str().unwrap().to_string(), l["size"].as_u64().unwrap()))
        .collect()
}

/// The content of regular file `path` (relative, e.g. `etc/debian_version`)
/// in the image of tag `tag` in `layout`, read from its layer blobs (the
/// top layer that has it wins; a whiteout of it or of a parent in a later
/// layer hides it): the oracle for what a container reads.
pub fn layout_file(layout: &Path, tag: &str, path: &str) -> Option<Vec<u8>> {
    let manifest = layout_manifest(layout, tag);
    let mut found = None;
    for layer in manifest["layers"].as_array().unwrap() {
        let file =
            std::fs::File::open(layout_blob(layout, layer["digest"].as_str().unwrap())).unwrap();
        let media_type = layer["mediaType"].as_str().unwrap_or("");
        let reader: Box<dyn std::io::Read> = if media_type.ends_with("gzip") {
            Box::new(flate2::read::GzDecoder::new(file))
        } else if media_type.ends_with("zstd") {
            Box::new(zstd::Decoder::new(file).unwrap())
        } else {
            Box::new(file)
        };
        let mut archive = tar::Archive::new(reader);
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let name = entry.path().unwrap().to_string_lossy().trim_start_matches("./").to_string();
            let name = name.trim_end_matches('/');
            if name == path && entry.header().entry_type().is_file() {
                let mut data = Vec::new();
                std::io::Read::read_to_end(&mut entry, &mut data).unwrap();
                found = Some(data);
            } else if let Some((dir, base)) = name.rsplit_once('/').or(Some(("", name))) {
                // A whiteout of the path or of one of its parents.
                if let Some(hidden) = base.strip_prefix(".wh.") {
                    let hidden =
                        if dir.is_empty() { hidden.to_string() } else { format!("{dir}/{hidden}") };
                    if path == hidden || path.starts_with(&format!("{hidden}/")) {
                        found = None;
                    }
                }
            }
        }
    }
    found
}

/// Publishes the image of tag `tag` in `layout` the way an image with an
/// rmount index artifact is published: pushed to `registry` as
/// `REPO_TAG` (skopeo), pulled into a publisher's store under `dir` and
/// `rmount index build REF --push`. Returns `ADDR/REPO_TAG`.
pub fn publish_with_index(
    registry: &Registry,
    layout: &Path,
    tag: &str,
    repo_tag: &str,
    dir: &Path,
) -> String {
    let start = Instant::now();
    skopeo_push(layout, tag, registry.addr(), repo_tag, &[]);
    let reference = format!("{}/{repo_tag}", registry.addr());
    let publisher = Client::new(dir);
    publisher.pull(&reference, &["-q"]);
    publisher.ok(&["index", "build", &reference, "--push"]);
    eprintln!("published {reference} with its index artifact: {:?}", start.elapsed());
    reference
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn all_pids() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect()
}

/// `/proc/PID/cmdline`'s arguments.
fn cmdline_args(pid: u32) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    raw.split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

fn parent_pid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

fn kill9(pid: u32) {
    if alive(pid) {
        // SAFETY: kill(2) with a pid we just read; no memory involved.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
}
