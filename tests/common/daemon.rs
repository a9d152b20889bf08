//! Daemon harness for tests/daemon.rs: one rmount daemon per temp store,
//! reached through the real binary with `--root` (never through
//! [`super::rmount`], which sets `RMOUNT_NO_DAEMON`), stopped when its
//! guard drops, also when the test panics; and Debian-based fixture images
//! (the `debian` layout of `scripts/make-images.sh` plus layers of ours),
//! so that `chroot MNT sh -c …` works in a mount.

use super::registry::output_with_timeout;
use super::{describe, require, sha256_hex};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long one rmount command may take before the harness kills it (a
/// first mount of the Debian image indexes 60 MiB of gzip; a hung daemon
/// must fail the test, not hang it).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// What `rmount daemon status --json` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pong {
    /// The worker.
    pub pid: u32,
    /// The keeper.
    pub keeper_pid: u32,
    /// The control socket.
    pub socket: PathBuf,
}

/// The daemon of the store `scope/state`, driven with the binary `bin`.
/// Dropping it stops the daemon (waking a parked keeper first), kills by
/// pid any of its processes that outlive the stop, and lazily unmounts
/// whatever is still mounted under `scope`.
pub struct Daemon {
    /// The store root.
    pub root: PathBuf,
    /// The rmount binary the commands run.
    pub bin: PathBuf,
    scope: PathBuf,
    /// Every keeper and worker pid a status reply named.
    seen: Mutex<Vec<u32>>,
    /// The control socket a status reply named.
    socket: Mutex<Option<PathBuf>>,
}

impl Daemon {
    /// The (not yet started) daemon of `scope/state`, run by the binary
    /// under test.
    pub fn new(scope: &Path) -> Daemon {
        Daemon::with_binary(scope, Path::new(super::rmount_bin()))
    }

    /// The same, with the commands (and so the daemon they start) run by `bin`.
    pub fn with_binary(scope: &Path, bin: &Path) -> Daemon {
        Daemon {
            root: scope.join("state"),
            bin: bin.to_path_buf(),
            scope: scope.to_path_buf(),
            seen: Mutex::new(Vec::new()),
            socket: Mutex::new(None),
        }
    }

    /// `BIN --root ROOT ARGS…`, with `RMOUNT_NO_DAEMON` removed.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.bin);
        command.env_remove("RMOUNT_NO_DAEMON").arg("--root").arg(&self.root).args(args);
        command
    }

    /// Runs an rmount command (killed after two minutes).
    pub fn run(&self, args: &[&str]) -> Output {
        output_with_timeout(&mut self.command(args), b"", COMMAND_TIMEOUT)
    }

    /// Runs an rmount command; panics with its output and the daemon's log
    /// unless it succeeds. Returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "rmount {args:?} failed:\n{}\n{}",
            describe(&out),
            self.log_tail()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `rmount load -i LAYOUT`.
    pub fn load(&self, layout: &Path) {
        self.ok(&["load", "-i", layout.to_str().unwrap()]);
    }

    /// The daemon's answer to a ping, or `None` when none answers.
    pub fn status(&self) -> Option<Pong> {
        let out = self.run(&["daemon", "status", "--json"]);
        if !out.status.success() {
            return None;
        }
        let v: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("daemon status --json: {e}\n{}", describe(&out)));
        assert_eq!(v["type"], "pong", "{v}");
        let pong = Pong {
            pid: v["pid"].as_u64().expect("pid") as u32,
            keeper_pid: v["keeperPid"].as_u64().expect("keeperPid") as u32,
            socket: PathBuf::from(v["socket"].as_str().expect("socket")),
        };
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.extend([pong.pid, pong.keeper_pid]);
        *self.socket.lock().unwrap_or_else(|p| p.into_inner()) = Some(pong.socket.clone());
        Some(pong)
    }

    /// The daemon's pong; panics when none answers.
    pub fn pong(&self) -> Pong {
        self.status().unwrap_or_else(|| panic!("no daemon answers\n{}", self.log_tail()))
    }

    /// Waits up to `limit` for a worker other than `old` to answer.
    pub fn wait_new_worker(&self, old: u32, limit: Duration) -> Pong {
        let start = Instant::now();
        loop {
            if let Some(pong) = self.status().filter(|p| p.pid != old) {
                return pong;
            }
            assert!(
                start.elapsed() < limit,
                "no new worker answered within {limit:?} (old {old})\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `rmount ps --json`.
    pub fn ps(&self) -> Vec<Value> {
        let out = self.ok(&["ps", "--json"]);
        let v: Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("ps --json: {e}\n{out}"));
        v.as_array().unwrap_or_else(|| panic!("ps --json is not an array: {v}")).clone()
    }

    /// The `ps` entry of `mountpoint`, if listed.
    pub fn ps_entry(&self, mountpoint: &Path) -> Option<Value> {
        let wanted = mountpoint.canonicalize().unwrap_or_else(|_| mountpoint.to_path_buf());
        self.ps().into_iter().find(|m| m["mountpoint"].as_str() == wanted.to_str())
    }

    /// `rmount mount REF DIR [--read-only]` (through the daemon, which
    /// starts if none runs); creates DIR.
    pub fn mount(&self, reference: &str, dir: &Path, read_only: bool) {
        std::fs::create_dir_all(dir).unwrap();
        let mut args = vec!["mount", reference, dir.to_str().unwrap()];
        if read_only {
            args.push("--read-only");
        }
        self.ok(&args);
    }

    /// `rmount umount DIR`.
    pub fn umount(&self, dir: &Path) {
        self.ok(&["umount", dir.to_str().unwrap()]);
    }

    /// `ROOT/daemon/daemon.log`.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root.join("daemon/daemon.log")).unwrap_or_default()
    }

    /// The last lines of the daemon's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        format!("--- {}/daemon/daemon.log (tail):\n{tail}", self.root.display())
    }

    /// The keeper's pid from `ROOT/daemon/keeper.pid`, if that process lives.
    pub fn keeper_pid_file(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.root.join("daemon/keeper.pid")).ok()?;
        text.trim().parse().ok().filter(|pid| alive(*pid))
    }

    /// Mountpoints under this daemon's scope in /proc/self/mountinfo.
    pub fn mounts_in_scope(&self) -> Vec<PathBuf> {
        mountinfo_points().into_iter().filter(|m| m.starts_with(&self.scope)).collect()
    }

    /// Runs `rmount ARGS` with a short timeout, for cleanup (never panics).
    fn run_quietly(&self, args: &[&str], limit: Duration) -> bool {
        let out = output_with_timeout(&mut self.command(args), b"", limit);
        if !out.status.success() {
            eprintln!("cleanup: rmount {args:?}: {}", describe(&out));
        }
        out.status.success()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let answers = output_with_timeout(
            &mut self.command(&["daemon", "status"]),
            b"",
            Duration::from_secs(10),
        )
        .status
        .success();
        if !answers && self.keeper_pid_file().is_some() {
            // Parked (`stop --keep-mounts`): no socket until woken.
            self.run_quietly(&["daemon"], Duration::from_secs(20));
        }
        self.run_quietly(&["daemon", "stop"], Duration::from_secs(60));
        let mut pids = self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
        pids.extend(self.keeper_pid_file());
        for pid in pids {
            if alive(pid) && cmdline(pid).contains(self.root.to_str().unwrap_or("?")) {
                eprintln!("cleanup: daemon process {pid} outlived `daemon stop`; killing it");
                let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            }
        }
        // A stopped daemon's socket file is litter in /run/rmount
        // (tests/daemon.rs checks that `daemon stop` removes it).
        let socket = self.socket.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(socket) = socket.filter(|s| std::os::unix::net::UnixStream::connect(s).is_err())
        {
            let _ = std::fs::remove_file(socket);
        }
        let mut left = self.mounts_in_scope();
        left.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
        for m in left {
            eprintln!("cleanup: {} is still mounted; detaching it", m.display());
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
    }
}

/// Is `pid` a live (not zombie) process?
pub fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, None | Some('Z') | Some('X'))
}

/// `/proc/PID/cmdline` with spaces between the arguments.
pub fn cmdline(pid: u32) -> String {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    String::from_utf8_lossy(&raw).replace('\0', " ")
}

/// Waits up to `limit` for `pid` to end; whether it did.
pub fn wait_gone(pid: u32, limit: Duration) -> bool {
    let start = Instant::now();
    while alive(pid) {
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// Every mountpoint in /proc/self/mountinfo (octal escapes decoded).
pub fn mountinfo_points() -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    text.lines().filter_map(|l| l.split(' ').nth(4)).map(|p| PathBuf::from(unescape(p))).collect()
}

fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Runs `script` with `sh` in a chroot of `mnt` (killed after a minute);
/// panics unless it succeeds. Returns its stdout.
pub fn chroot_sh(mnt: &Path, script: &str) -> String {
    let mut command = Command::new("chroot");
    command.arg(mnt).args(["sh", "-c", script]);
    let out = output_with_timeout(&mut command, b"", Duration::from_secs(60));
    assert!(out.status.success(), "chroot {} sh -c {script:?}:\n{}", mnt.display(), describe(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// ------------------------------------------------------- Debian fixtures

/// The tag of the Debian image in `scripts/make-images.sh debian`'s layout.
const DEBIAN_TAG: &str = "demo";

/// The Debian layout from `scripts/make-images.sh debian` (built once and
/// cached under `$RMOUNT_IMAGE_CACHE`); `None` (skip) when it is not built
/// and the tools that build it are missing (a failure under `CI=true`).
pub fn debian_layout() -> Option<PathBuf> {
    let cache = std::env::var_os("RMOUNT_IMAGE_CACHE")
        .map_or_else(|| PathBuf::from("/var/cache/rmount-images"), PathBuf::from);
    if !cache.join("debian/index.json").exists()
        && !["mmdebstrap", "umoci"].iter().all(|t| require(t, super::which(t)))
    {
        return None;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/make-images.sh");
    let out = super::run_ok(Command::new(script).arg("debian"));
    Some(PathBuf::from(out.trim()))
}

/// Writes an OCI layout at `dir` holding one image named `name` (a full
/// reference): the Debian image of `base` (its blobs hardlinked) with
/// `layers` (blob, media type, tar; bottom first) on top. Returns the
/// config digest.
pub fn write_debian_plus(
    base: &Path,
    dir: &Path,
    name: &str,
    layers: &[(Vec<u8>, &str, Vec<u8>)],
) -> String {
    let json = |path: PathBuf| -> Value {
        serde_json::from_slice(&std::fs::read(&path).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    let base_blob = |digest: &str| base.join("blobs/sha256").join(&digest["sha256:".len()..]);
    let index = json(base.join("index.json"));
    let desc = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == DEBIAN_TAG)
        .unwrap_or_else(|| panic!("no tag {DEBIAN_TAG} in {}", base.display()))
        .clone();
    let mut manifest = json(base_blob(desc["digest"].as_str().unwrap()));
    let mut config = json(base_blob(manifest["config"]["digest"].as_str().unwrap()));
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    for layer in manifest["layers"].as_array().unwrap() {
        let digest = layer["digest"].as_str().unwrap();
        let (from, to) = (base_blob(digest), blobs.join(&digest["sha256:".len()..]));
        if std::fs::hard_link(&from, &to).is_err() {
            std::fs::copy(&from, &to).unwrap();
        }
    }
    let put = |data: &[u8]| -> String {
        let hex = sha256_hex(data);
        std::fs::write(blobs.join(&hex), data).unwrap();
        format!("sha256:{hex}")
    };
    for (blob, media_type, tar) in layers {
        let digest = put(blob);
        let desc = json!({"mediaType": media_type, "digest": digest, "size": blob.len()});
        manifest["layers"].as_array_mut().unwrap().push(desc);
        let diff_id = json!(format!("sha256:{}", sha256_hex(tar)));
        config["rootfs"]["diff_ids"].as_array_mut().unwrap().push(diff_id);
        if let Some(history) = config["history"].as_array_mut() {
            history.push(json!({"created_by": "rmount daemon test fixture"}));
        }
    }
    let config = serde_json::to_vec(&config).unwrap();
    let config_digest = put(&config);
    manifest["config"]["digest"] = json!(config_digest);
    manifest["config"]["size"] = json!(config.len());
    let manifest = serde_json::to_vec(&manifest).unwrap();
    let manifest_digest = put(&manifest);
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest, "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": name}}],
    });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    config_digest
}
