//! Shared harness for the integration tests: prerequisites (root, FUSE,
//! tools) that skip outside CI and fail under `CI=true`, running the real
//! binary, OCI fixture images written from layer specs, layer extraction
//! for a kernel-overlayfs oracle, and a tree walker that compares mounts.
#![allow(dead_code)]

pub mod containerd;
pub mod daemon;
pub mod estargz;
pub mod ops;
pub mod registry;

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Skips the test (returns false) when a prerequisite is missing, unless
/// `CI=true`, where a missing prerequisite fails the test.
pub fn require(what: &str, ok: bool) -> bool {
    if ok {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("prerequisite missing under CI=true: {what}");
    }
    eprintln!("SKIPPED: {what} is not available");
    false
}

/// Root and a working /dev/fuse (and the given tools on PATH).
pub fn require_root_fuse(tools: &[&str]) -> bool {
    if !require("root (euid 0)", rustix::process::geteuid().is_root()) {
        return false;
    }
    if !require("/dev/fuse", Path::new("/dev/fuse").exists()) {
        return false;
    }
    tools.iter().all(|t| require(t, which(t)))
}

/// Is `tool` on PATH?
pub fn which(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The rmount binary under test.
pub fn rmount_bin() -> &'static str {
    env!("CARGO_BIN_EXE_rmount")
}

/// `rmount` serving each mount from a process of its own (`--no-daemon`):
/// the suites written before the daemon test that path and kill or pause
/// a mount's own server; tests/daemon.rs tests the daemon.
pub fn rmount_command() -> Command {
    let mut command = Command::new(rmount_bin());
    command.env("RMOUNT_NO_DAEMON", "1");
    command
}

/// Runs `rmount --root ROOT ARGS…` (see [`rmount_command`]) and returns its output.
pub fn rmount(root: &Path, args: &[&str]) -> Output {
    rmount_command().arg("--root").arg(root).args(args).output().expect("run rmount")
}

/// Runs rmount and panics with its output unless it succeeds.
pub fn rmount_ok(root: &Path, args: &[&str]) -> String {
    let out = rmount(root, args);
    assert!(out.status.success(), "rmount {args:?} failed:\n{}", describe(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command and panics with its output unless it succeeds.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed:\n{}", describe(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn describe(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Unmounts on drop (an rmount mount or a kernel overlay mount).
pub struct Mounted {
    pub path: PathBuf,
    root: Option<PathBuf>,
}

impl Mounted {
    /// Mounts `reference` from the store at `root` on `path` with rmount.
    pub fn rmount(root: &Path, reference: &str, path: &Path) -> Mounted {
        std::fs::create_dir_all(path).unwrap();
        rmount_ok(root, &["mount", reference, path.to_str().unwrap(), "--read-only"]);
        Mounted { path: path.to_path_buf(), root: Some(root.to_path_buf()) }
    }

    /// Mounts kernel overlayfs with `lowers` (top first) on `path`.
    pub fn overlay(lowers: &[PathBuf], path: &Path) -> Mounted {
        std::fs::create_dir_all(path).unwrap();
        let lowerdir: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
        run_ok(
            Command::new("mount")
                .args(["-t", "overlay", "overlay", "-o"])
                .arg(format!("lowerdir={}", lowerdir.join(":")))
                .arg(path),
        );
        Mounted { path: path.to_path_buf(), root: None }
    }

    /// Mounts kernel overlayfs writable: `lowers` (top first) under `upper`,
    /// with `workdir=work` and the extra comma-separated `options`.
    pub fn overlay_rw(
        lowers: &[PathBuf],
        upper: &Path,
        work: &Path,
        options: &str,
        path: &Path,
    ) -> Mounted {
        std::fs::create_dir_all(path).unwrap();
        let lowerdir: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
        let mut data = format!(
            "lowerdir={},upperdir={},workdir={}",
            lowerdir.join(":"),
            upper.display(),
            work.display()
        );
        if !options.is_empty() {
            data = format!("{data},{options}");
        }
        run_ok(Command::new("mount").args(["-t", "overlay", "overlay", "-o"]).arg(data).arg(path));
        Mounted { path: path.to_path_buf(), root: None }
    }

    /// Mounts `reference` from the store at `root` on `path` writable, with
    /// its changes in `upper` (`rmount mount REF DIR --upper U --work W`).
    pub fn rmount_rw(
        root: &Path,
        reference: &str,
        path: &Path,
        upper: &Path,
        work: &Path,
    ) -> Mounted {
        std::fs::create_dir_all(path).unwrap();
        let (path_s, upper_s, work_s) =
            (path.to_str().unwrap(), upper.to_str().unwrap(), work.to_str().unwrap());
        rmount_ok(root, &["mount", reference, path_s, "--upper", upper_s, "--work", work_s]);
        Mounted { path: path.to_path_buf(), root: Some(root.to_path_buf()) }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let out = match &self.root {
            Some(root) => rmount(root, &["umount", self.path.to_str().unwrap()]),
            None => {
                // A child another test thread is forking can hold copies of
                // our (close-on-exec) fds until it execs: retry briefly.
                let mut tries = 0;
                loop {
                    let out = Command::new("umount").arg(&self.path).output().expect("umount");
                    tries += 1;
                    if out.status.success() || tries == 10 {
                        break out;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            }
        };
        if !out.status.success() {
            eprintln!("unmounting {} failed: {}", self.path.display(), describe(&out));
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

/// One entry of a fixture layer.
#[derive(Clone, Debug)]
pub enum Item {
    Dir {
        path: String,
        mode: u32,
    },
    File {
        path: String,
        mode: u32,
        data: Vec<u8>,
    },
    Symlink {
        path: String,
        target: String,
    },
    Hardlink {
        path: String,
        target: String,
    },
    Char {
        path: String,
        major: u32,
        minor: u32,
    },
    Block {
        path: String,
        major: u32,
        minor: u32,
    },
    Fifo {
        path: String,
    },
    /// `.wh.NAME` hiding `path`.
    Whiteout {
        path: String,
    },
    /// `.wh..wh..opq` in directory `path`.
    Opaque {
        path: String,
    },
}

/// Metadata applied to an item (defaults: root, mtime 1_600_000_000).
#[derive(Clone, Debug)]
pub struct Meta {
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
    pub xattrs: Vec<(String, Vec<u8>)>,
}

impl Default for Meta {
    fn default() -> Self {
        Meta { uid: 0, gid: 0, mtime: 1_600_000_000, xattrs: Vec::new() }
    }
}

/// How a fixture layer is compressed.
#[derive(Clone, Copy, Debug)]
pub enum Compress {
    None,
    Gzip,
    Zstd,
}

/// Builds the tar of a layer.
pub fn layer_tar(items: &[(Item, Meta)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (item, meta) in items {
        if !meta.xattrs.is_empty() {
            let pax: Vec<(String, &[u8])> = meta
                .xattrs
                .iter()
                .map(|(k, v)| (format!("SCHILY.xattr.{k}"), v.as_slice()))
                .collect();
            b.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), *v))).unwrap();
        }
        let mut h = tar::Header::new_gnu();
        h.set_uid(meta.uid);
        h.set_gid(meta.gid);
        h.set_mtime(meta.mtime);
        h.set_size(0);
        let (kind, path, mode): (tar::EntryType, String, u32) = match item {
            Item::Dir { path, mode } => (tar::EntryType::Directory, format!("{path}/"), *mode),
            Item::File { path, mode, data } => {
                h.set_size(data.len() as u64);
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                b.append_data(&mut h, path, data.as_slice()).unwrap();
                continue;
            }
            Item::Symlink { path, target } => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                b.append_link(&mut h, path, target).unwrap();
                continue;
            }
            Item::Hardlink { path, target } => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_mode(0o644);
                b.append_link(&mut h, path, target).unwrap();
                continue;
            }
            Item::Char { path, major, minor } | Item::Block { path, major, minor } => {
                h.set_device_major(*major).unwrap();
                h.set_device_minor(*minor).unwrap();
                let kind = if matches!(item, Item::Char { .. }) {
                    tar::EntryType::Char
                } else {
                    tar::EntryType::Block
                };
                (kind, path.clone(), 0o600)
            }
            Item::Fifo { path } => (tar::EntryType::Fifo, path.clone(), 0o644),
            Item::Whiteout { path } => {
                let (dir, name) =
                    path.rsplit_once('/').map_or(("", path.as_str()), |(d, n)| (d, n));
                let wh = if dir.is_empty() {
                    format!(".wh.{name}")
                } else {
                    format!("{dir}/.wh.{name}")
                };
                (tar::EntryType::Regular, wh, 0o644)
            }
            Item::Opaque { path } => {
                (tar::EntryType::Regular, format!("{path}/.wh..wh..opq"), 0o644)
            }
        };
        h.set_entry_type(kind);
        h.set_mode(mode);
        b.append_data(&mut h, path, &[][..]).unwrap();
    }
    b.into_inner().unwrap()
}

pub fn compress(tar: &[u8], how: Compress) -> (Vec<u8>, &'static str) {
    match how {
        Compress::None => (tar.to_vec(), "application/vnd.oci.image.layer.v1.tar"),
        Compress::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(tar).unwrap();
            (e.finish().unwrap(), "application/vnd.oci.image.layer.v1.tar+gzip")
        }
        Compress::Zstd => {
            (zstd::encode_all(tar, 1).unwrap(), "application/vnd.oci.image.layer.v1.tar+zstd")
        }
    }
}

pub fn sha256_hex(data: &[u8]) -> String {
    rmount::digest::Digest::of(data).hex().to_string()
}

/// Writes an OCI layout at `dir` holding one image named `name` (a full
/// reference) whose layers are `blobs` (bottom first: (blob, media type, tar)).
pub fn write_oci_layout(dir: &Path, name: &str, layers: &[(Vec<u8>, &str, Vec<u8>)]) -> String {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |data: &[u8]| -> String {
        let hex = sha256_hex(data);
        std::fs::write(blobs.join(&hex), data).unwrap();
        format!("sha256:{hex}")
    };
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for (blob, media_type, tar) in layers {
        let digest = put(blob);
        descs.push(
            serde_json::json!({"mediaType": media_type, "digest": digest, "size": blob.len()}),
        );
        diff_ids.push(format!("sha256:{}", sha256_hex(tar)));
    }
    let config = serde_json::json!({
        "created": "2024-01-01T00:00:00Z", "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": layers.iter().map(|_| serde_json::json!({"created_by": "fixture"})).collect::<Vec<_>>(),
    });
    let config = serde_json::to_vec(&config).unwrap();
    let config_digest = put(&config);
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": descs,
    });
    let manifest = serde_json::to_vec(&manifest).unwrap();
    let manifest_digest = put(&manifest);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest,
            "size": manifest.len(), "annotations": {"org.opencontainers.image.ref.name": name}}],
    });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    config_digest
}

/// Extracts a layer tar into `dir` in kernel overlayfs's lower format:
/// `.wh.NAME` becomes a 0/0 char device, `.wh..wh..opq` the opaque xattr.
pub fn extract_for_overlay(tar: &[u8], dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let mut child = Command::new("tar")
        .args(["-x", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-p", "-f", "-", "-C"])
        .arg(dir)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(tar).unwrap();
    assert!(child.wait().unwrap().success(), "tar -x failed");
    // Convert whiteouts, then restore the mtimes of the dirs that held them.
    let mut archive = tar::Archive::new(tar);
    let mut dir_mtimes = HashMap::new();
    for e in archive.entries().unwrap() {
        let e = e.unwrap();
        let path = e
            .path()
            .unwrap()
            .to_string_lossy()
            .trim_end_matches('/')
            .trim_start_matches("./")
            .to_string();
        if e.header().entry_type().is_dir() {
            dir_mtimes.insert(path, e.header().mtime().unwrap());
        }
    }
    for entry in walk(dir) {
        let name = entry.file_name().unwrap().to_string_lossy().into_owned();
        let parent = entry.parent().unwrap().to_path_buf();
        if name == ".wh..wh..opq" {
            std::fs::remove_file(&entry).unwrap();
            rustix::fs::lsetxattr(
                &parent,
                "trusted.overlay.opaque",
                b"y",
                rustix::fs::XattrFlags::empty(),
            )
            .unwrap();
        } else if let Some(hidden) = name.strip_prefix(".wh.") {
            std::fs::remove_file(&entry).unwrap();
            let target = parent.join(hidden);
            rustix::fs::mknodat(
                rustix::fs::CWD,
                &target,
                rustix::fs::FileType::CharacterDevice,
                rustix::fs::Mode::empty(),
                0,
            )
            .unwrap();
        }
    }
    // Whiteout conversion and tar's delayed hardlinks touch directories:
    // put every directory's mtime back, deepest first.
    let mut dirs: Vec<(String, u64)> = dir_mtimes.into_iter().collect();
    dirs.sort_by_key(|(p, _)| std::cmp::Reverse(p.matches('/').count()));
    for (rel, mtime) in dirs {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime);
        std::fs::File::open(dir.join(rel)).unwrap().set_modified(t).unwrap();
    }
}

/// Every path under `root` (not following symlinks), sorted, root excluded.
pub fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let mut entries: Vec<PathBuf> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
        entries.sort();
        for p in entries.into_iter().rev() {
            if std::fs::symlink_metadata(&p).unwrap().is_dir() {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out.sort();
    out
}

/// Opens `rel` read-only beneath `root` without following any symlink out
/// of it (RESOLVE_IN_ROOT), nor a symlink at `rel` itself.
pub fn open_in_root(root: &Path, rel: impl AsRef<Path>) -> std::io::Result<std::fs::File> {
    use rustix::fs::{openat2, Mode, OFlags, ResolveFlags};
    let dir = std::fs::File::open(root)?;
    let fd = openat2(
        &dir,
        rel.as_ref(),
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT,
    )?;
    Ok(std::fs::File::from(fd))
}

/// sha256 of a regular file opened beneath `root` without following any
/// symlink out of it (RESOLVE_IN_ROOT).
pub fn hash_in_root(root: &Path, rel: &Path) -> String {
    let mut file = open_in_root(root, rel).unwrap();
    let mut hasher = rmount::digest::HashingWriter::new(std::io::sink());
    std::io::copy(&mut file, &mut hasher).unwrap();
    hasher.finish().0.hex().to_string()
}

fn xattrs(path: &Path) -> Vec<String> {
    let mut names = vec![0u8; 64 * 1024];
    let n = rustix::fs::llistxattr(path, &mut names[..]).unwrap_or(0);
    let mut out = Vec::new();
    for name in names[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let name = String::from_utf8_lossy(name).into_owned();
        if name.starts_with("trusted.overlay.") {
            continue;
        }
        let mut value = vec![0u8; 64 * 1024];
        let len = rustix::fs::lgetxattr(path, name.as_str(), &mut value[..]).unwrap_or(0);
        out.push(format!("{name}={}", hex::encode(&value[..len])));
    }
    out.sort();
    out
}

/// A line per path describing everything the oracle compares. Directory
/// `nlink` and size are left out: overlayfs reports nlink 1 for merged dirs
/// and dir sizes depend on the backing file system.
pub fn describe_tree(root: &Path) -> BTreeMap<String, String> {
    let mut first_by_inode: HashMap<(u64, u64), String> = HashMap::new();
    let mut out = BTreeMap::new();
    for path in walk(root) {
        let rel = path.strip_prefix(root).unwrap();
        let key = rel.to_string_lossy().into_owned();
        let m = std::fs::symlink_metadata(&path).unwrap();
        let ft = m.file_type();
        let kind = kind_name(&ft);
        let mut line = format!(
            "{kind} mode={:o} uid={} gid={} mtime={}",
            m.mode() & 0o7777,
            m.uid(),
            m.gid(),
            m.mtime()
        );
        if !ft.is_dir() {
            line += &format!(" size={} nlink={}", m.size(), m.nlink());
        }
        if ft.is_symlink() {
            line += &format!(" target={}", std::fs::read_link(&path).unwrap().display());
        }
        if ft.is_char_device() || ft.is_block_device() {
            line += &format!(" rdev={}", m.rdev());
        }
        if ft.is_file() {
            line += &format!(" sha256={}", hash_in_root(root, rel));
            if m.nlink() > 1 {
                let first = first_by_inode.entry((m.dev(), m.ino())).or_insert_with(|| key.clone());
                line += &format!(" linkgroup={first}");
            }
        }
        let x = xattrs(&path);
        if !x.is_empty() {
            line += &format!(" xattrs={}", x.join(","));
        }
        out.insert(key, line);
    }
    out
}

/// Panics with a readable diff unless the two descriptions are equal.
pub fn assert_same_tree(expected: &BTreeMap<String, String>, actual: &BTreeMap<String, String>) {
    let mut diffs = Vec::new();
    for (path, e) in expected {
        match actual.get(path) {
            None => diffs.push(format!("missing in rmount: {path} ({e})")),
            Some(a) if a != e => diffs.push(format!("{path}:\n   oracle: {e}\n   rmount: {a}")),
            _ => {}
        }
    }
    for path in actual.keys().filter(|p| !expected.contains_key(*p)) {
        diffs.push(format!("extra in rmount: {path} ({})", actual[path]));
    }
    assert!(diffs.is_empty(), "{} differences:\n{}", diffs.len(), diffs.join("\n"));
}

/// Compressible pseudo-random bytes (deterministic).
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 64);
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let words = ["alpha ", "beta ", "gamma ", "delta ", "\n", "epsilon ", "zeta "];
        out.extend_from_slice(words[(x % 7) as usize].as_bytes());
        out.extend_from_slice(&x.to_le_bytes()[..(x >> 60) as usize % 4]);
    }
    out.truncate(len);
    out
}

/// A fresh temp dir under /tmp (not under the repo: mounts live here).
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("rmount-test-").tempdir().unwrap()
}

/// A file type's short name, as tree descriptions show it.
pub fn kind_name(ft: &std::fs::FileType) -> &'static str {
    if ft.is_dir() {
        "dir"
    } else if ft.is_file() {
        "file"
    } else if ft.is_symlink() {
        "link"
    } else if ft.is_char_device() {
        "chr"
    } else if ft.is_block_device() {
        "blk"
    } else if ft.is_fifo() {
        "fifo"
    } else {
        "sock"
    }
}
