//! Writable mounts (issue 3 acceptance), all through real FUSE mounts:
//!
//! * durability: what was written and fsynced survives `kill -9` of the
//!   serving process, and a copy-up killed halfway leaves either the lower
//!   file or the whole copy, never part of one, and nothing from the work dir;
//! * `rmount umount` cleans up a mount whose server was killed, and inode
//!   numbers of upper objects survive a remount (as in kernel overlayfs);
//! * real programs (`useradd`, `dpkg -i`, `tar -x`, `git`) run in a chroot of
//!   a writable Debian mount, and their changes survive a remount without
//!   touching the image's blobs;
//! * kernel overlayfs, given the same layers and rmount's upper directory,
//!   shows the same tree as rmount.
//!
//! Writes never go through host paths under a mountpoint (an image's
//! absolute symlinks would resolve on the host): they happen in a chroot or
//! through `openat2(RESOLVE_IN_ROOT)`.

mod common;

use common::*;
use rustix::fs::{openat2, AtFlags, Mode, OFlags, ResolveFlags};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------
// Helpers

/// A writable rmount mount; unmounted on drop (lazily if its server is gone).
struct RwMount {
    root: PathBuf,
    path: PathBuf,
}

impl RwMount {
    /// `rmount mount REF MNT` plus `extra` arguments (`--upper U --work W`).
    fn mount(root: &Path, reference: &str, path: &Path, extra: &[&str]) -> RwMount {
        std::fs::create_dir_all(path).unwrap();
        let mut args = vec!["mount", reference, path.to_str().unwrap()];
        args.extend_from_slice(extra);
        rmount_ok(root, &args);
        RwMount { root: root.to_path_buf(), path: path.to_path_buf() }
    }

    /// Mounted with its changes in `upper` and `work`.
    fn with_upper(root: &Path, reference: &str, path: &Path, upper: &Path, work: &Path) -> RwMount {
        let (upper, work) = (upper.to_str().unwrap(), work.to_str().unwrap());
        RwMount::mount(root, reference, path, &["--upper", upper, "--work", work])
    }

    /// The serving process, from `ROOT/mounts/*.json`.
    fn server_pid(&self) -> i32 {
        let mountpoint = self.path.canonicalize().unwrap();
        for entry in std::fs::read_dir(self.root.join("mounts")).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "json") {
                let record: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
                if record["mountpoint"].as_str() == mountpoint.to_str() {
                    return record["pid"].as_i64().unwrap() as i32;
                }
            }
        }
        panic!("no mount record for {}", mountpoint.display());
    }

    /// `kill -9` of the serving process, then the dead mount is detached
    /// (`umount -l`) the way an admin would clean it up.
    fn kill_server(self) {
        self.kill_server_only();
        lazy_unmount(&self.path);
        std::mem::forget(self);
    }

    /// `kill -9` of the serving process; the dead mount stays.
    fn kill_server_only(&self) {
        let pid = rustix::process::Pid::from_raw(self.server_pid()).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::KILL).unwrap();
        let start = Instant::now();
        while process_running(pid.as_raw_nonzero().get()) {
            assert!(start.elapsed() < Duration::from_secs(10), "server {pid:?} survived kill -9");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn unmount(self) {
        rmount_ok(&self.root, &["umount", self.path.to_str().unwrap()]);
        std::mem::forget(self);
    }
}

impl Drop for RwMount {
    fn drop(&mut self) {
        let out = rmount(&self.root, &["umount", self.path.to_str().unwrap()]);
        if !out.status.success() {
            eprintln!("unmounting {} failed: {}", self.path.display(), describe(&out));
            lazy_unmount(&self.path);
        }
    }
}

/// Is `pid` alive and not a zombie? (The server is not our child: init
/// reaps it, in its own time.)
fn process_running(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // `pid (comm) STATE ...`; comm may hold spaces or parentheses.
    stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
}

fn lazy_unmount(path: &Path) {
    let ok = Command::new("umount").arg("-l").arg(path).status().is_ok_and(|s| s.success());
    if !ok {
        run_ok(Command::new("fusermount3").arg("-uz").arg(path));
    }
}

/// Opens `rel` beneath `root` without ever leaving it (RESOLVE_IN_ROOT).
fn open_in(root: &Path, rel: &str, flags: OFlags, mode: u32) -> std::io::Result<File> {
    let dir = File::open(root)?;
    let fd = openat2(
        &dir,
        rel,
        flags | OFlags::CLOEXEC,
        Mode::from_raw_mode(mode),
        ResolveFlags::IN_ROOT,
    )?;
    Ok(File::from(fd))
}

/// The directory holding `rel` (opened beneath `root`) and `rel`'s last name,
/// for the `*at` calls: a single name never follows a symlink out.
fn parent_in(root: &Path, rel: &str) -> (OwnedFd, String) {
    let (dir, name) = rel.rsplit_once('/').unwrap_or(("", rel));
    let dir = open_in(root, if dir.is_empty() { "." } else { dir }, OFlags::PATH, 0).unwrap();
    (dir.into(), name.to_string())
}

fn read_in(root: &Path, rel: &str) -> Vec<u8> {
    let mut data = Vec::new();
    open_in(root, rel, OFlags::RDONLY | OFlags::NOFOLLOW, 0)
        .unwrap_or_else(|e| panic!("opening {rel}: {e}"))
        .read_to_end(&mut data)
        .unwrap();
    data
}

fn stat_in(root: &Path, rel: &str) -> std::io::Result<rustix::fs::Stat> {
    let (dir, name) = parent_in(root, rel);
    Ok(rustix::fs::statat(&dir, name.as_str(), AtFlags::SYMLINK_NOFOLLOW)?)
}

/// sha256 of a file by path (the files here are big: stream them).
fn hash_file(path: &Path) -> String {
    let mut hasher = rmount::digest::HashingWriter::new(std::io::sink());
    std::io::copy(&mut File::open(path).unwrap(), &mut hasher).unwrap();
    hasher.finish().0.hex().to_string()
}

/// Every blob in the store still hashes to its name.
fn assert_blobs_intact(root: &Path) {
    let dir = root.join("blobs/sha256");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(hash_file(&path), name, "blob {} changed", path.display());
        count += 1;
    }
    assert!(count > 0, "no blobs in {}", dir.display());
}

/// Names under `dir` (recursively) that look like rmount's work temporaries.
fn temporaries(dir: &Path) -> Vec<PathBuf> {
    walk(dir)
        .into_iter()
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("#rmount"))
        .collect()
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn chroot_sh(mnt: &Path, script: &str) -> String {
    run_ok(Command::new("chroot").arg(mnt).args(["sh", "-c", script]))
}

/// Runs `script` in a chroot of `mnt` with `input` as its stdin.
fn chroot_sh_stdin(mnt: &Path, script: &str, input: &Path) -> String {
    let stdin = File::open(input).unwrap();
    run_ok(Command::new("chroot").arg(mnt).args(["sh", "-c", script]).stdin(Stdio::from(stdin)))
}

fn timed<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let value = f();
    eprintln!("{what}: {:.2?}", start.elapsed());
    value
}

// ---------------------------------------------------------------------------
// Durability on a small fixture

fn file(path: &str, data: &[u8]) -> (Item, Meta) {
    (Item::File { path: path.into(), mode: 0o644, data: data.to_vec() }, Meta::default())
}

fn dir(path: &str) -> (Item, Meta) {
    (Item::Dir { path: path.into(), mode: 0o755 }, Meta::default())
}

/// Loads a one-layer gzip image `writable:test` into a store at `root`.
fn load_fixture(tmp: &Path, root: &Path, items: &[(Item, Meta)]) {
    let tar = layer_tar(items);
    let (blob, media_type) = compress(&tar, Compress::Gzip);
    let layout = tmp.join("layout");
    write_oci_layout(&layout, "writable:test", &[(blob, media_type, tar)]);
    rmount_ok(root, &["load", "-i", layout.to_str().unwrap()]);
}

#[test]
fn fsynced_changes_survive_kill_9_of_the_server() {
    if !require_root_fuse(&["umount", "fusermount3"]) {
        return;
    }
    let tmp = tempdir();
    let root = tmp.path().join("state");
    let lower_data = pseudo_random(300 << 10, 7);
    load_fixture(
        tmp.path(),
        &root,
        &[
            dir("etc"),
            file("etc/hostname", b"lower-host\n"),
            file("etc/keep", b"keep me\n"),
            dir("data"),
            file("data/lower-file", &lower_data),
            file("data/gone", b"deleted in the upper\n"),
        ],
    );
    let (upper, work) = (tmp.path().join("upper"), tmp.path().join("upper.work"));
    let mnt = tmp.path().join("mnt");
    let m = RwMount::with_upper(&root, "writable:test", &mnt, &upper, &work);

    // A new file.
    let mut new =
        open_in(&mnt, "data/new", OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL, 0o640).unwrap();
    new.write_all(b"fresh data\n").unwrap();
    new.sync_all().unwrap();
    // An overwrite inside a lower file (data copy-up, then a write).
    let host = open_in(&mnt, "etc/hostname", OFlags::WRONLY, 0).unwrap();
    host.write_all_at(b"UPPER", 0).unwrap();
    host.sync_data().unwrap();
    // An append to a bigger lower file.
    let mut append = open_in(&mnt, "data/lower-file", OFlags::WRONLY | OFlags::APPEND, 0).unwrap();
    append.write_all(b"appended tail").unwrap();
    append.sync_all().unwrap();
    // Namespace changes: a whiteout, a new dir, a rename, a symlink, a chmod
    // of a lower file (metadata-only copy-up).
    let (data_dir, _) = parent_in(&mnt, "data/gone");
    rustix::fs::unlinkat(&data_dir, "gone", AtFlags::empty()).unwrap();
    let (root_dir, _) = parent_in(&mnt, "newdir");
    rustix::fs::mkdirat(&root_dir, "newdir", Mode::from_raw_mode(0o750)).unwrap();
    let mut moved = open_in(&mnt, "data/to-move", OFlags::WRONLY | OFlags::CREATE, 0o600).unwrap();
    moved.write_all(b"moved\n").unwrap();
    moved.sync_all().unwrap();
    let (new_dir, _) = parent_in(&mnt, "newdir/moved");
    rustix::fs::renameat(&data_dir, "to-move", &new_dir, "moved").unwrap();
    rustix::fs::symlinkat("../etc/hostname", &new_dir, "link").unwrap();
    let (etc_dir, _) = parent_in(&mnt, "etc/keep");
    rustix::fs::chmodat(&etc_dir, "keep", Mode::from_raw_mode(0o600), AtFlags::empty()).unwrap();
    open_in(&mnt, "newdir", OFlags::RDONLY | OFlags::DIRECTORY, 0).unwrap().sync_all().unwrap();
    drop((new, host, append, moved, data_dir, root_dir, new_dir, etc_dir));

    let before = describe_tree(&mnt);
    m.kill_server();
    let m = RwMount::with_upper(&root, "writable:test", &mnt, &upper, &work);
    let after = describe_tree(&mnt);
    assert_same_tree(&before, &after);

    assert_eq!(read_in(&mnt, "data/new"), b"fresh data\n");
    assert_eq!(stat_in(&mnt, "data/new").unwrap().st_mode & 0o7777, 0o640);
    assert_eq!(read_in(&mnt, "etc/hostname"), b"UPPER-host\n");
    let mut want = lower_data.clone();
    want.extend_from_slice(b"appended tail");
    assert!(read_in(&mnt, "data/lower-file") == want, "data/lower-file lost its append");
    let gone = stat_in(&mnt, "data/gone").unwrap_err();
    assert_eq!(gone.raw_os_error(), Some(libc::ENOENT), "data/gone: {gone}");
    assert_eq!(stat_in(&mnt, "newdir").unwrap().st_mode & 0o7777, 0o750);
    assert_eq!(read_in(&mnt, "newdir/moved"), b"moved\n");
    assert!(stat_in(&mnt, "data/to-move").is_err(), "the rename's source is back");
    let (new_dir, _) = parent_in(&mnt, "newdir/link");
    let target = rustix::fs::readlinkat(&new_dir, "link", Vec::new()).unwrap();
    drop(new_dir);
    assert_eq!(target.to_bytes(), b"../etc/hostname");
    assert_eq!(stat_in(&mnt, "etc/keep").unwrap().st_mode & 0o7777, 0o600);
    assert_eq!(read_in(&mnt, "etc/keep"), b"keep me\n");
    assert!(temporaries(&mnt).is_empty(), "work temporaries visible: {:?}", temporaries(&mnt));
    m.unmount();
    assert!(temporaries(&upper).is_empty(), "temporaries in the upper: {:?}", temporaries(&upper));
    assert_blobs_intact(&root);
}

/// Size of the lower file whose copy-up is interrupted: big enough that the
/// copy takes a while.
const BIG: usize = 200 << 20;

/// The regular files under `dir` and their sizes, now: what vanishes while
/// it is read (a copy-up renames its temporaries away) is skipped.
fn files_now(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            match entry.metadata() {
                Ok(meta) if meta.is_dir() => stack.push(entry.path()),
                Ok(meta) if meta.is_file() => files.push((entry.path(), meta.len())),
                _ => {}
            }
        }
    }
    files
}

#[test]
fn copy_up_killed_midway_leaves_the_lower_or_the_whole_copy() {
    if !require_root_fuse(&["umount", "fusermount3"]) {
        return;
    }
    let tmp = tempdir();
    let root = tmp.path().join("state");
    let big = pseudo_random(BIG, 11);
    let big_hash = sha256_hex(&big);
    timed("building and loading the 200 MiB fixture", || {
        load_fixture(
            tmp.path(),
            &root,
            &[dir("data"), file("data/small", b"small\n"), file("data/big", &big)],
        );
    });
    let (upper, work) = (tmp.path().join("upper"), tmp.path().join("upper.work"));
    let mnt = tmp.path().join("mnt");
    let m = RwMount::with_upper(&root, "writable:test", &mnt, &upper, &work);

    // The open for appending copies the whole file up before it returns.
    let opener = {
        let mnt = mnt.clone();
        std::thread::spawn(move || {
            open_in(&mnt, "data/big", OFlags::WRONLY | OFlags::APPEND, 0)
                .and_then(|mut f| f.write_all(b"appended").map(|()| f))
                .map(drop)
        })
    };
    // Wait until half a copy is in the work directory, then kill.
    let start = Instant::now();
    let partial = loop {
        let growing = files_now(&work).into_iter().find(|(_, len)| *len > BIG as u64 / 2);
        if let Some((path, _)) = growing {
            break path;
        }
        assert!(!opener.is_finished(), "the copy-up finished before it was seen in {work:?}");
        assert!(start.elapsed() < Duration::from_secs(60), "no copy-up appeared in {work:?}");
        std::thread::sleep(Duration::from_millis(1));
    };
    m.kill_server();
    let opened = opener.join().unwrap();
    let copied = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
    eprintln!("killed with {copied} of {BIG} bytes copied; open returned {opened:?}");
    assert!(opened.is_err(), "the copy-up completed before the kill: the test proves nothing");

    // Before the remount: the upper holds no partial file under the real name.
    if let Ok(meta) = std::fs::symlink_metadata(upper.join("data/big")) {
        assert_eq!(meta.len(), BIG as u64, "a partial copy was renamed into the upper");
    }
    assert!(temporaries(&upper).is_empty(), "temporaries in the upper: {:?}", temporaries(&upper));

    let m = RwMount::with_upper(&root, "writable:test", &mnt, &upper, &work);
    assert_eq!(stat_in(&mnt, "data/big").unwrap().st_size as usize, BIG, "data/big: size");
    assert_eq!(hash_in_root(&mnt, Path::new("data/big")), big_hash, "data/big: content");
    assert_eq!(entries(&mnt.join("data")), ["big", "small"], "the merged data dir");
    assert!(temporaries(&mnt).is_empty(), "work temporaries visible: {:?}", temporaries(&mnt));
    assert_eq!(entries(&work), Vec::<String>::new(), "the remount left the work dir dirty");

    // The interrupted append now works, once.
    let mut f = open_in(&mnt, "data/big", OFlags::WRONLY | OFlags::APPEND, 0).unwrap();
    f.write_all(b"appended").unwrap();
    f.sync_all().unwrap();
    drop(f);
    let data = read_in(&mnt, "data/big");
    assert_eq!(data.len(), BIG + 8);
    assert!(data[..BIG] == big[..] && &data[BIG..] == b"appended", "data/big after the append");
    m.unmount();
    assert_eq!(std::fs::metadata(upper.join("data/big")).unwrap().len(), (BIG + 8) as u64);
    assert!(temporaries(&upper).is_empty(), "temporaries in the upper: {:?}", temporaries(&upper));
    assert_blobs_intact(&root);
}

fn is_mountpoint(path: &Path) -> bool {
    let target = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines().any(|l| l.split(' ').nth(4) == target.to_str())
}

/// After a crash of the server the admin's way out is `rmount umount`; it
/// must detach the dead mount rather than need `umount -l`.
#[test]
fn umount_cleans_up_a_mount_whose_server_was_killed() {
    if !require_root_fuse(&["umount", "fusermount3"]) {
        return;
    }
    let tmp = tempdir();
    let root = tmp.path().join("state");
    load_fixture(tmp.path(), &root, &[dir("etc"), file("etc/hostname", b"lower\n")]);
    let mnt = tmp.path().join("mnt");
    let m = RwMount::mount(&root, "writable:test", &mnt, &[]);
    m.kill_server_only();
    let out = rmount(&root, &["umount", mnt.to_str().unwrap()]);
    let still_mounted = is_mountpoint(&mnt);
    if still_mounted {
        lazy_unmount(&mnt);
    }
    std::mem::forget(m);
    assert!(out.status.success(), "rmount umount of a dead mount failed:\n{}", describe(&out));
    assert!(!still_mounted, "rmount umount succeeded but {} is still mounted", mnt.display());
    // And the same upper mounts again.
    let m = RwMount::mount(&root, "writable:test", &mnt, &[]);
    assert_eq!(read_in(&mnt, "etc/hostname"), b"lower\n");
    m.unmount();
}

/// Kernel overlayfs keeps an upper object's inode number across remounts
/// (it is the upper file's own); tools that cache `st_ino` (git's index,
/// backup tools) depend on that.
#[test]
fn new_files_keep_their_inode_numbers_across_a_remount() {
    if !require_root_fuse(&[]) {
        return;
    }
    let tmp = tempdir();
    let root = tmp.path().join("state");
    load_fixture(tmp.path(), &root, &[dir("etc"), file("etc/hostname", b"lower\n")]);
    let mnt = tmp.path().join("mnt");
    let names = ["a", "b", "c", "etc/hostname"];
    let m = RwMount::mount(&root, "writable:test", &mnt, &[]);
    for name in &names[..3] {
        open_in(&mnt, name, OFlags::WRONLY | OFlags::CREATE, 0o644).unwrap();
    }
    open_in(&mnt, "etc/hostname", OFlags::WRONLY | OFlags::APPEND, 0).unwrap();
    let before: Vec<u64> = names.iter().map(|n| stat_in(&mnt, n).unwrap().st_ino).collect();
    m.unmount();
    let m = RwMount::mount(&root, "writable:test", &mnt, &[]);
    // Looked up in another order than they were made.
    let after: Vec<u64> = names.iter().rev().map(|n| stat_in(&mnt, n).unwrap().st_ino).collect();
    let after: Vec<u64> = after.into_iter().rev().collect();
    m.unmount();
    assert_eq!(before, after, "inode numbers of {names:?} before and after a remount");
}

// ---------------------------------------------------------------------------
// Real programs on a Debian image, then kernel overlayfs on rmount's upper

const TOOLS_REF: &str = "localhost/debian-tools:tools";

/// The `debian-tools` layout from `scripts/make-images.sh` (built once, cached).
fn tools_layout() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/make-images.sh");
    let out = timed("scripts/make-images.sh debian-tools", || {
        run_ok(Command::new(script).arg("debian-tools"))
    });
    PathBuf::from(out.trim())
}

/// The layer tars (bottom first) of tag `tag` in the OCI layout, with their
/// blobs read from the store at `root`.
fn layer_tars(layout: &Path, tag: &str, root: &Path) -> Vec<Vec<u8>> {
    let json = |path: PathBuf| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    };
    let blob =
        |digest: &str| root.join("blobs/sha256").join(digest.strip_prefix("sha256:").unwrap());
    let index = json(layout.join("index.json"));
    let manifest = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap_or_else(|| panic!("no tag {tag} in {}", layout.display()));
    let manifest = json(blob(manifest["digest"].as_str().unwrap()));
    let mut tars = Vec::new();
    for layer in manifest["layers"].as_array().unwrap() {
        let data = std::fs::read(blob(layer["digest"].as_str().unwrap())).unwrap();
        let mut tar = Vec::new();
        match layer["mediaType"].as_str().unwrap() {
            t if t.ends_with("gzip") => {
                flate2::read::GzDecoder::new(&data[..]).read_to_end(&mut tar).unwrap();
            }
            t if t.ends_with("zstd") => tar = zstd::decode_all(&data[..]).unwrap(),
            _ => tar = data,
        }
        tars.push(tar);
    }
    tars
}

/// A tar of 10,000 small files in 100 directories: `dNN/fNN` holds
/// `NN+1` lines `file D F`.
fn ten_thousand_files(dir: &Path) -> PathBuf {
    let archive = dir.join("files.tar");
    let mut b = tar::Builder::new(File::create(&archive).unwrap());
    let header = |kind, size, mode| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h.set_mtime(1_700_000_000);
        h
    };
    for d in 0..100 {
        let mut h = header(tar::EntryType::Directory, 0, 0o755);
        b.append_data(&mut h, format!("d{d:02}/"), std::io::empty()).unwrap();
        for f in 0..100 {
            let data = format!("file {d} {f}\n").repeat(f + 1);
            let mut h = header(tar::EntryType::Regular, data.len() as u64, 0o644);
            b.append_data(&mut h, format!("d{d:02}/f{f:02}"), data.as_bytes()).unwrap();
        }
    }
    b.into_inner().unwrap().sync_all().unwrap();
    archive
}

/// `apt-get download hello` into `dir`; the .deb's path.
fn download_hello(dir: &Path) -> PathBuf {
    let download =
        || Command::new("apt-get").args(["download", "-q", "hello"]).current_dir(dir).status();
    if !download().is_ok_and(|s| s.success()) {
        // A machine whose package lists were never fetched.
        run_ok(Command::new("apt-get").arg("update").arg("-q"));
        assert!(download().is_ok_and(|s| s.success()), "apt-get download hello failed");
    }
    let deb = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("apt-get download left no .deb");
    deb
}

/// The lines of two tree descriptions that differ, for the report.
fn tree_differences(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> Vec<String> {
    let mut diffs = Vec::new();
    for (path, x) in a {
        match b.get(path) {
            None => diffs.push(format!("only in kernel overlayfs: {path} ({x})")),
            Some(y) if x != y => diffs.push(format!("{path}:\n   kernel: {x}\n   rmount: {y}")),
            _ => {}
        }
    }
    for (path, y) in b.iter().filter(|(p, _)| !a.contains_key(*p)) {
        diffs.push(format!("only in rmount: {path} ({y})"));
    }
    diffs
}

/// The overlayfs constructs the last phase of the Debian test made are in
/// the upper, in kernel overlayfs's format.
fn assert_upper_format(root: &Path) {
    let containers: Vec<PathBuf> =
        std::fs::read_dir(root.join("containers")).unwrap().map(|e| e.unwrap().path()).collect();
    let upper = containers[0].join("upper");
    let xattr = |rel: &str, key: &str| -> Option<Vec<u8>> {
        let mut value = vec![0u8; 4096];
        let n = rustix::fs::lgetxattr(upper.join(rel), key, &mut value[..]).ok()?;
        value.truncate(n);
        Some(value)
    };
    let stat = |rel: &str| rustix::fs::lstat(upper.join(rel)).unwrap();
    let redirect = xattr("usr/share/licenses-moved", "trusted.overlay.redirect");
    assert_eq!(redirect.as_deref(), Some(&b"/usr/share/common-licenses"[..]), "redirect");
    let man = stat("usr/share/man");
    assert!(
        rustix::fs::FileType::from_raw_mode(man.st_mode) == rustix::fs::FileType::CharacterDevice
            && man.st_rdev == 0,
        "usr/share/man is not a whiteout in the upper"
    );
    assert_eq!(xattr("var/lib/apt", "trusted.overlay.opaque").as_deref(), Some(&b"y"[..]));
    assert!(xattr("usr/bin/hostname", "trusted.overlay.metacopy").is_some(), "metacopy");
    assert_eq!(stat("usr/bin/hostname").st_blocks, 0, "a metacopy file holds no data");
}

#[test]
fn real_programs_on_a_writable_debian_mount_and_kernel_overlayfs_agrees() {
    let tools = ["mmdebstrap", "umoci", "apt-get", "tar", "chroot", "umount", "fusermount3"];
    if !require_root_fuse(&tools) {
        return;
    }
    let layout = tools_layout();
    let tmp = tempdir();
    let root = tmp.path().join("state");
    rmount_ok(&root, &["load", "-i", layout.to_str().unwrap()]);
    let debs = tmp.path().join("debs");
    std::fs::create_dir_all(&debs).unwrap();
    let deb = download_hello(&debs);
    let archive = timed("making the 10k-file tar", || ten_thousand_files(tmp.path()));
    let mnt = tmp.path().join("mnt");

    // The default upper: ROOT/containers/<key>/upper.
    let m = timed("mount", || RwMount::mount(&root, TOOLS_REF, &mnt, &[]));
    timed("motd + useradd", || {
        let out = chroot_sh(&mnt, "echo x > /etc/motd; useradd -m u1; ls -la /home");
        assert!(out.contains(" u1"), "ls -la /home after useradd:\n{out}");
    });
    timed("dpkg -i hello", || {
        chroot_sh_stdin(&mnt, "cat > /tmp/hello.deb", &deb);
        run_ok(Command::new("chroot").arg(&mnt).args(["dpkg", "-i", "/tmp/hello.deb"]));
        let out = run_ok(Command::new("chroot").arg(&mnt).arg("hello"));
        assert_eq!(out, "Hello, world!\n");
    });
    timed("tar -x of 10,000 files", || {
        chroot_sh_stdin(&mnt, "mkdir -p /data && tar -x -C /data", &archive);
        let count = chroot_sh(&mnt, "find /data -type f | wc -l");
        assert_eq!(count.trim(), "10000");
        assert_eq!(chroot_sh(&mnt, "cat /data/d42/f03"), "file 42 3\n".repeat(4));
    });
    timed("git init, add, commit", || {
        chroot_sh(
            &mnt,
            "cd /data && git init -q && git config user.email t@example.com \
             && git config user.name Tester && git config gc.autoDetach false \
             && git add . && git commit -qm 'ten thousand files'",
        );
        let log = chroot_sh(&mnt, "cd /data && git log --format=%s && git status --porcelain");
        assert_eq!(log, "ten thousand files\n", "git log + status");
        chroot_sh(&mnt, "cd /data && git fsck --no-progress --strict");
        // 10,000 loose objects make the commit run `git gc --auto` (in the
        // foreground, as configured): packs written, loose objects deleted.
        let packs = chroot_sh(&mnt, "ls /data/.git/objects/pack");
        assert!(packs.contains(".pack"), "git gc --auto made no pack: {packs}");
    });
    // Overlay features the programs above may not reach: a renamed lower
    // directory (redirect), a deleted lower tree (whiteouts), a lower dir
    // replaced by a new one (opaque), a chmod of a lower file (metacopy).
    timed("mv, rm -r, rmdir+mkdir, chmod", || {
        chroot_sh(
            &mnt,
            "mv /usr/share/common-licenses /usr/share/licenses-moved \
             && rm -r /usr/share/man && rm -r /var/lib/apt && mkdir -p /var/lib/apt/lists \
             && chmod 0700 /usr/bin/hostname",
        );
    });
    let before = timed("describe_tree (rmount, first mount)", || describe_tree(&mnt));
    assert_upper_format(&root);
    timed("umount", || m.unmount());

    // Remount on the same mountpoint: the same default upper comes back,
    // showing exactly what the first mount showed.
    let m = timed("remount", || RwMount::mount(&root, TOOLS_REF, &mnt, &[]));
    let after = timed("describe_tree (rmount, remounted)", || describe_tree(&mnt));
    assert_same_tree(&before, &after);
    let passwd = String::from_utf8(read_in(&mnt, "etc/passwd")).unwrap();
    assert!(passwd.lines().any(|l| l.starts_with("u1:x:1000:")), "u1 in /etc/passwd:\n{passwd}");
    assert_eq!(stat_in(&mnt, "home/u1").unwrap().st_uid, 1000, "/home/u1");
    assert!(stat_in(&mnt, "home/u1/.bashrc").is_ok(), "/etc/skel was copied to /home/u1");
    assert_eq!(read_in(&mnt, "etc/motd"), b"x\n");
    assert_eq!(run_ok(Command::new("chroot").arg(&mnt).arg("hello")), "Hello, world!\n");
    assert!(chroot_sh(&mnt, "dpkg -s hello").contains("Status: install ok installed"));
    let count = chroot_sh(&mnt, "find /data -type f -not -path '/data/.git/*' | wc -l");
    assert_eq!(count.trim(), "10000");
    assert_eq!(chroot_sh(&mnt, "cd /data && git log --format=%s"), "ten thousand files\n");
    // (`git status` may rewrite .git/index: it refreshes stat data.)
    assert_eq!(chroot_sh(&mnt, "cd /data && git status --porcelain"), "");
    let last = timed("describe_tree (rmount, last view)", || describe_tree(&mnt));
    timed("umount", || m.unmount());
    timed("hashing the store's blobs", || assert_blobs_intact(&root));

    // Kernel overlayfs over the same layers with rmount's upper.
    let containers: Vec<PathBuf> =
        std::fs::read_dir(root.join("containers")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(containers.len(), 1, "one default upper: {containers:?}");
    let upper = containers[0].join("upper");
    let mut lowers = Vec::new();
    timed("extracting the layers for overlayfs", || {
        for (i, tar) in layer_tars(&layout, "tools", &root).iter().enumerate() {
            let lower = tmp.path().join(format!("lower{i}"));
            extract_for_overlay(tar, &lower);
            lowers.push(lower);
        }
    });
    lowers.reverse();
    let kwork = containers[0].join("kernel-work");
    std::fs::create_dir_all(&kwork).unwrap();
    let kernel = Mounted::overlay_rw(
        &lowers,
        &upper,
        &kwork,
        "redirect_dir=on,metacopy=on,ro",
        &tmp.path().join("kernel"),
    );
    let expected = timed("describe_tree (kernel overlayfs)", || describe_tree(&kernel.path));
    drop(kernel);
    let diffs = tree_differences(&expected, &last);
    assert!(
        diffs.is_empty(),
        "kernel overlayfs and rmount differ on the same upper ({} differences):\n{}",
        diffs.len(),
        diffs.join("\n")
    );
}
