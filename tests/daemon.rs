//! The rmount daemon (issue 7) acceptance, with real FUSE mounts and one
//! daemon per temp store (`common::daemon::Daemon` stops it when the test
//! ends, also on a panic):
//!
//! * ten mounts of four images sharing a base layer (gzip, zstd and
//!   uncompressed tops), mounted in parallel from no daemon, read-only and
//!   writable: `ps` lists them, one daemon serves them, the base blob is
//!   opened once, every file of every mount reads right from ten threads at
//!   once, writes land in each writable mount's own upper, a parallel
//!   unmount (one with `--discard`) leaves no mount and no record, and
//!   `daemon stop` ends both processes and removes the socket;
//! * `kill -9` of the worker, twice: a reader holding a file open and
//!   reading past the page cache sees no error and right bytes, a shell
//!   loop in a chroot never fails, a new worker answers within 2 s, and an
//!   fsynced file is intact in the upper and in the mount;
//! * `daemon restart` after replacing the binary (an upgrade), and `daemon
//!   stop --keep-mounts` then `daemon`, while a shell loop in a chroot of
//!   the mount runs programs: the loop never fails, the keeper keeps its
//!   pid, the worker is new;
//! * SIGTERM to the keeper unmounts everything (a busy mount too) and keeps
//!   the upper and the records; the next `rmount daemon` mounts them again
//!   at the same paths; so does it after `kill -9` of both processes;
//! * the control socket is mode 0600, other users get "permission denied"
//!   (and "forbidden" past the file mode), and malformed, versionless,
//!   future-version and oversized requests get error replies or a closed
//!   connection, never a crash;
//! * `rmount commit` of a daemon mount (paused through the daemon) makes an
//!   image that shows the change, and the mount keeps serving.
//!
//! Reads and writes inside Debian mounts happen in a chroot or through
//! `openat2(RESOLVE_IN_ROOT)`: the image has absolute symlinks.

mod common;

use common::daemon::*;
use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn d(path: &str) -> (Item, Meta) {
    (Item::Dir { path: path.into(), mode: 0o755 }, Meta::default())
}

fn f(path: &str, data: Vec<u8>) -> (Item, Meta) {
    (Item::File { path: path.into(), mode: 0o644, data }, Meta::default())
}

fn gzip6(items: &[(Item, Meta)]) -> (Vec<u8>, &'static str, Vec<u8>) {
    let tar = layer_tar(items);
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    e.write_all(&tar).unwrap();
    (e.finish().unwrap(), "application/vnd.oci.image.layer.v1.tar+gzip", tar)
}

fn layer(items: &[(Item, Meta)], how: Compress) -> (Vec<u8>, &'static str, Vec<u8>) {
    if let Compress::Gzip = how {
        return gzip6(items);
    }
    let tar = layer_tar(items);
    let (blob, media_type) = compress(&tar, how);
    (blob, media_type, tar)
}

/// sha256 of `rel` in `mnt`, opened with RESOLVE_IN_ROOT.
fn try_hash(mnt: &Path, rel: &str) -> std::io::Result<String> {
    let mut file = open_in_root(mnt, rel)?;
    let mut data = Vec::new();
    file.read_to_end(&mut data)?;
    Ok(sha256_hex(&data))
}

/// Creates `rel` in `mnt` with `data` (RESOLVE_IN_ROOT, never following a
/// symlink out of the mount) and fsyncs it.
fn create_in_root(mnt: &Path, rel: &str, data: &[u8]) -> std::io::Result<()> {
    use rustix::fs::{openat2, Mode, OFlags, ResolveFlags};
    let dir = std::fs::File::open(mnt)?;
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = openat2(&dir, rel, flags, Mode::from_raw_mode(0o644), ResolveFlags::IN_ROOT)?;
    let mut file = std::fs::File::from(fd);
    file.write_all(data)?;
    file.sync_all()
}

fn kill(pid: u32, signal: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(pid as i32).unwrap();
    rustix::process::kill_process(pid, signal).unwrap();
}

/// Daemon processes (keepers and workers) whose command line names `root`.
fn daemon_processes(root: &Path) -> (usize, usize) {
    let needle = format!("--root {} daemon", root.display());
    let (mut keepers, mut workers) = (0, 0);
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let line = cmdline(pid);
        if alive(pid) && line.contains(&needle) {
            match line.contains("--worker") {
                true => workers += 1,
                false => keepers += 1,
            }
        }
    }
    (keepers, workers)
}

/// Kills a child process (by pid) when dropped, also on a panic.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if alive(self.0) {
            let _ = Command::new("kill").arg("-9").arg(self.0.to_string()).status();
        }
    }
}

/// `*.json` files in `dir`.
fn json_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
}

// ---------------------------------------------------------------------------
// Ten mounts of images sharing a base layer

/// An image of the shared-base fixture: its reference, id and regular files.
struct Shared {
    reference: String,
    image_id: String,
    files: BTreeMap<String, Vec<u8>>,
}

/// A fixture layer's items.
type Layer = [(Item, Meta)];

/// The files a stack of layers shows (files only; whiteouts remove).
fn merged(layers: &[&Layer]) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    for layer in layers {
        for (item, _) in layer.iter() {
            match item {
                Item::File { path, data, .. } => {
                    files.insert(path.clone(), data.clone());
                }
                Item::Whiteout { path } => {
                    let under = format!("{path}/");
                    files.retain(|p: &String, _| p != path && !p.starts_with(&under));
                }
                _ => {}
            }
        }
    }
    files
}

/// Four images on one gzip base layer (300 small files and two of several
/// MiB): the base alone, and the base under a gzip, a zstd and an
/// uncompressed top layer that add, replace and white out files.
fn shared_images(dir: &Path) -> Vec<Shared> {
    let mut base = vec![d("etc"), d("usr"), d("usr/share"), d("data")];
    base.push(f("etc/os-release", b"NAME=shared\n".to_vec()));
    base.push(f("data/big-a.bin", pseudo_random(6 << 20, 1)));
    base.push(f("data/big-b.bin", pseudo_random(5 << 20, 2)));
    for i in 0..300u64 {
        base.push(f(&format!("usr/share/f{i:03}"), pseudo_random((i as usize * 131) % 20_000, i)));
    }
    let gz_top = {
        let mut top = vec![f("etc/os-release", b"NAME=gz\n".to_vec()), d("top"), d("top/gz")];
        top.extend((0..50u64).map(|i| f(&format!("top/gz/f{i}"), pseudo_random(3000, 500 + i))));
        top.push((Item::Whiteout { path: "usr/share/f000".into() }, Meta::default()));
        top
    };
    let zst_top = vec![
        f("data/zst.bin", pseudo_random(3 << 20, 3)),
        f("usr/share/f001", b"replaced by the zstd layer\n".to_vec()),
        f("etc/os-release", b"NAME=zst\n".to_vec()),
    ];
    let plain_top = vec![
        d("top"),
        f("top/plain.txt", pseudo_random(70_000, 4)),
        (Item::Whiteout { path: "data/big-b.bin".into() }, Meta::default()),
    ];
    let base_layer = gzip6(&base);
    let images: [(&str, Option<(&Layer, Compress)>); 4] = [
        ("base", None),
        ("gz", Some((&gz_top, Compress::Gzip))),
        ("zst", Some((&zst_top, Compress::Zstd))),
        ("plain", Some((&plain_top, Compress::None))),
    ];
    let mut out = Vec::new();
    for (tag, top) in images {
        let reference = format!("localhost/shared:{tag}");
        let mut layers = vec![base_layer.clone()];
        let mut stack: Vec<&Layer> = vec![&base];
        if let Some((items, how)) = top {
            layers.push(layer(items, how));
            stack.push(items);
        }
        let layout = dir.join(format!("layout-{tag}"));
        let image_id = write_oci_layout(&layout, &reference, &layers);
        out.push(Shared { reference, image_id, files: merged(&stack) });
    }
    out
}

#[test]
fn ten_mounts_share_layers_and_serve_concurrently() {
    if !require_root_fuse(&["umount"]) {
        return;
    }
    let tmp = tempdir();
    let daemon = Daemon::new(tmp.path());
    let images = shared_images(tmp.path());
    for image in &images {
        let tag = image.reference.rsplit(':').next().unwrap();
        daemon.load(&tmp.path().join(format!("layout-{tag}")));
    }
    assert!(daemon.status().is_none(), "a daemon answers before the first mount");
    // Mount i: image i % 4, read-only when i is odd.
    let mounts: Vec<(PathBuf, &Shared, bool)> = (0..10)
        .map(|i| (tmp.path().join(format!("mnt/m{i}")), &images[i % 4], i % 2 == 1))
        .collect();
    let start = Instant::now();
    std::thread::scope(|s| {
        for (dir, image, read_only) in &mounts {
            let daemon = &daemon;
            s.spawn(move || daemon.mount(&image.reference, dir, *read_only));
        }
    });
    eprintln!("10 parallel mounts, from no daemon: {:?}", start.elapsed());
    let pong = daemon.pong();
    assert_eq!(daemon_processes(&daemon.root), (1, 1), "one keeper and one worker serve the store");

    let listed = daemon.ps();
    assert_eq!(listed.len(), 10, "ps --json: {listed:#?}");
    for (dir, image, read_only) in &mounts {
        let m = daemon.ps_entry(dir).unwrap_or_else(|| panic!("{} not in ps", dir.display()));
        assert_eq!(m["reference"], image.reference.as_str(), "{m}");
        assert_eq!(m["imageId"], image.image_id.as_str(), "{m}");
        assert_eq!(m["readOnly"], *read_only, "{m}");
        assert_eq!(m["upper"].is_null(), *read_only, "{m}");
        assert_eq!(m["lazy"], false, "{m}");
        assert_eq!(m["fetchedPercent"].as_f64(), Some(100.0), "{m}");
        for key in ["mountedAt", "uptimeSecs"] {
            assert!(m[key].is_u64(), "{key} in {m}");
        }
    }
    // The base layer is opened once for all ten mounts.
    let base_digest = {
        let layout = tmp.path().join("layout-base");
        let index: Value =
            serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
        let digest = index["manifests"][0]["digest"].as_str().unwrap();
        let manifest: Value = serde_json::from_slice(
            &std::fs::read(layout.join("blobs/sha256").join(&digest[7..])).unwrap(),
        )
        .unwrap();
        manifest["layers"][0]["digest"].as_str().unwrap()[7..].to_string()
    };
    let base_fds = std::fs::read_dir(format!("/proc/{}/fd", pong.pid))
        .unwrap()
        .flatten()
        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|t| t.ends_with(&base_digest)))
        .count();
    assert_eq!(base_fds, 1, "fds of the worker open on the shared base blob {base_digest}");

    // Every file of every mount, from ten threads at once.
    for (dir, image, _) in &mounts {
        let seen: Vec<String> = walk(dir)
            .into_iter()
            .filter(|p| std::fs::symlink_metadata(p).unwrap().is_file())
            .map(|p| p.strip_prefix(dir).unwrap().to_string_lossy().into_owned())
            .collect();
        let expected: Vec<&String> = image.files.keys().collect();
        assert_eq!(seen.iter().collect::<Vec<_>>(), expected, "files of {}", dir.display());
    }
    let mut jobs: Vec<(&Path, &str, String)> = Vec::new();
    for (dir, image, _) in &mounts {
        for (path, data) in &image.files {
            jobs.push((dir.as_path(), path.as_str(), sha256_hex(data)));
        }
    }
    // Interleave mounts and files so the threads hit all mounts at once.
    jobs.sort_by_key(|(dir, path, _)| sha256_hex(format!("{}{path}", dir.display()).as_bytes()));
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..10 {
            s.spawn(|| loop {
                let Some((dir, path, want)) = jobs.get(next.fetch_add(1, Ordering::Relaxed)) else {
                    return;
                };
                match try_hash(dir, path) {
                    Ok(got) if got == *want => {}
                    Ok(got) => failures
                        .lock()
                        .unwrap()
                        .push(format!("{}/{path}: sha256 {got}, expected {want}", dir.display())),
                    Err(e) => {
                        failures.lock().unwrap().push(format!("{}/{path}: {e}", dir.display()))
                    }
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    assert!(failures.is_empty(), "{} bad reads:\n{}", failures.len(), failures.join("\n"));
    eprintln!("{} files read from 10 threads in {:?}", jobs.len(), start.elapsed());

    // Writes land in each writable mount's own upper; read-only mounts refuse.
    let uppers: Vec<Option<PathBuf>> = mounts
        .iter()
        .map(|(dir, _, _)| daemon.ps_entry(dir).unwrap()["upper"].as_str().map(PathBuf::from))
        .collect();
    for (i, (dir, _, read_only)) in mounts.iter().enumerate() {
        let made = create_in_root(dir, &format!("mine-{i}"), format!("mount {i}\n").as_bytes());
        match read_only {
            true => assert_eq!(made.unwrap_err().raw_os_error(), Some(libc::EROFS), "{i}"),
            false => made.unwrap_or_else(|e| panic!("writing in {}: {e}", dir.display())),
        }
    }
    for (i, ((dir, _, read_only), upper)) in mounts.iter().zip(&uppers).enumerate() {
        for j in 0..10 {
            let mine = try_hash(dir, &format!("mine-{j}")).ok();
            let want =
                (i == j && !read_only).then(|| sha256_hex(format!("mount {j}\n").as_bytes()));
            assert_eq!(mine, want, "mine-{j} in {}", dir.display());
        }
        if let Some(upper) = upper {
            assert!(upper.join(format!("mine-{i}")).is_file(), "mine-{i} in {}", upper.display());
        }
    }

    // mount 0 (writable) with --discard, the others keeping their changes.
    std::thread::scope(|s| {
        for (i, (dir, _, _)) in mounts.iter().enumerate() {
            let daemon = &daemon;
            match i {
                0 => s.spawn(move || daemon.ok(&["umount", "--discard", dir.to_str().unwrap()])),
                _ => s.spawn(move || daemon.ok(&["umount", dir.to_str().unwrap()])),
            };
        }
    });
    assert!(!uppers[0].as_ref().unwrap().exists(), "--discard deletes mount 0's upper");
    for (i, upper) in uppers.iter().enumerate().skip(1) {
        if let Some(upper) = upper {
            assert!(upper.join(format!("mine-{i}")).is_file(), "{} kept", upper.display());
        }
    }
    assert_eq!(daemon.ps(), Vec::<Value>::new(), "ps after unmounting everything");
    assert_eq!(daemon.mounts_in_scope(), Vec::<PathBuf>::new(), "left in /proc/self/mountinfo");
    assert_eq!(json_files(&daemon.root.join("mounts")), Vec::<PathBuf>::new(), "ROOT/mounts");
    assert_eq!(
        json_files(&daemon.root.join("daemon/mounts")),
        Vec::<PathBuf>::new(),
        "ROOT/daemon/mounts"
    );
    assert_eq!(daemon.pong().pid, pong.pid, "the worker served everything without a restart");

    daemon.ok(&["daemon", "stop"]);
    assert!(wait_gone(pong.keeper_pid, Duration::from_secs(10)), "the keeper exits on stop");
    assert!(wait_gone(pong.pid, Duration::from_secs(10)), "the worker exits on stop");
    assert!(daemon.status().is_none(), "a daemon answers after stop");
    assert!(!pong.socket.exists(), "`daemon stop` left its socket {}", pong.socket.display());
}

// ---------------------------------------------------------------------------
// Debian with our layer on top

const DEBIAN_REF: &str = "localhost/daemon-test:debian";

fn big_file() -> Vec<u8> {
    pseudo_random(8 << 20, 7)
}

/// Loads the Debian image plus a gzip layer with `/data/big.bin` (8 MiB)
/// and `/data/small.txt` as [`DEBIAN_REF`]; false: skip (no Debian image).
fn load_debian(tmp: &Path, daemon: &Daemon) -> bool {
    let Some(base) = debian_layout() else { return false };
    let items =
        [d("data"), f("data/big.bin", big_file()), f("data/small.txt", b"small\n".to_vec())];
    let layout = tmp.join("layout-debian");
    write_debian_plus(&base, &layout, DEBIAN_REF, &[gzip6(&items)]);
    daemon.load(&layout);
    true
}

/// A thread reading a file it holds open, past the page cache (each round
/// drops the file's cached pages first), comparing every byte.
struct Reader {
    reads: Arc<AtomicU64>,
    errors: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Reader {
    fn start(mnt: &Path, rel: &str, expected: Vec<u8>) -> Reader {
        let file = open_in_root(mnt, rel).unwrap();
        let reads = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, e, s) = (reads.clone(), errors.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut x = 0x2545_f491_4f6c_dd1du64;
            let mut buf = vec![0u8; 128 << 10];
            while !s.load(Ordering::Relaxed) {
                let _ = rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed);
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let offset = (x % (expected.len() - buf.len()) as u64) & !4095;
                let want = &expected[offset as usize..offset as usize + buf.len()];
                match file.read_exact_at(&mut buf, offset) {
                    Ok(()) if buf == want => {}
                    Ok(()) => e.lock().unwrap().push(format!("wrong bytes at {offset}")),
                    Err(err) => e.lock().unwrap().push(format!("read at {offset}: {err}")),
                }
                r.fetch_add(1, Ordering::Relaxed);
            }
        });
        Reader { reads, errors, stop, thread: Some(thread) }
    }

    fn count(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// Waits until `target` reads are done; panics after 10 s.
    fn wait_reads(&self, target: u64) {
        let start = Instant::now();
        while self.count() < target {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the reader is stuck at {} reads (waiting for {target}); errors: {:?}",
                self.count(),
                self.errors.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops the thread; the errors it saw.
    fn finish(mut self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        std::mem::take(&mut *self.errors.lock().unwrap())
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[test]
fn kill_9_of_the_worker_keeps_open_files_reading() {
    if !require_root_fuse(&["chroot", "umount"]) {
        return;
    }
    let tmp = tempdir();
    let daemon = Daemon::new(tmp.path());
    if !load_debian(tmp.path(), &daemon) {
        return;
    }
    let mnt = tmp.path().join("mnt");
    daemon.mount(DEBIAN_REF, &mnt, false);
    let upper = PathBuf::from(daemon.ps_entry(&mnt).unwrap()["upper"].as_str().unwrap());
    let reader = Reader::start(&mnt, "data/big.bin", big_file());
    // Programs opening, reading and writing files in the mount meanwhile.
    let looping = Loop::start(&mnt);
    for round in 1..=2 {
        chroot_sh(&mnt, &format!("echo data-{round} > /f{round} && sync /f{round}"));
        let before = daemon.pong();
        reader.wait_reads(reader.count() + 20);
        let at_kill = reader.count();
        kill(before.pid, rustix::process::Signal::KILL);
        let killed = Instant::now();
        let after = daemon.wait_new_worker(before.pid, Duration::from_secs(2));
        let answered = killed.elapsed();
        assert_eq!(after.keeper_pid, before.keeper_pid, "the keeper stays");
        assert!(wait_gone(before.pid, Duration::from_secs(2)), "the killed worker is gone");
        reader.wait_reads(at_kill + 50);
        looping.wait_rounds(looping.rounds() + 30);
        // New opens, in a chroot and with RESOLVE_IN_ROOT.
        assert!(chroot_sh(&mnt, "cat /etc/os-release").contains("Debian"));
        assert_eq!(try_hash(&mnt, "data/small.txt").unwrap(), sha256_hex(b"small\n"));
        let entry = daemon.ps_entry(&mnt).expect("ps lists the mount after kill -9");
        assert_eq!(entry["readOnly"], false, "{entry}");
        for r in 1..=round {
            let want = format!("data-{r}\n");
            let in_upper = std::fs::read_to_string(upper.join(format!("f{r}"))).unwrap();
            assert_eq!(in_upper, want, "f{r} in the upper dir");
            assert_eq!(chroot_sh(&mnt, &format!("cat /f{r}")), want, "f{r} through the mount");
        }
        eprintln!(
            "round {round}: new worker {} answered {answered:?} after kill -9 of {}; {} reads so far",
            after.pid,
            before.pid,
            reader.count()
        );
    }
    let errors = reader.finish();
    assert!(errors.is_empty(), "the reader saw {} errors: {errors:?}", errors.len());
    let (status, output) = looping.finish();
    assert!(status.success() && !output.contains("FAIL"), "the loop ({status}):\n{output}");
    daemon.umount(&mnt);
    assert!(daemon.mounts_in_scope().is_empty());
}

// ---------------------------------------------------------------------------
// Restart and park while programs run in the mount

/// `sh` in a chroot of the mount running `cat` and a write until `/stop`
/// exists, counting its rounds in `/count`; prints FAIL for each failure.
struct Loop {
    child: Child,
    output: Arc<Mutex<String>>,
    mnt: PathBuf,
}

const LOOP: &str = r#"echo started
i=0
while [ ! -e /stop ]; do
  cat /etc/os-release > /dev/null || echo "FAIL cat $i"
  echo $i > /count || echo "FAIL write $i"
  i=$((i+1))
done
echo "done $i""#;

impl Loop {
    fn start(mnt: &Path) -> Loop {
        let mut child = Command::new("chroot")
            .arg(mnt)
            .args(["sh", "-c", LOOP])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let output = Arc::new(Mutex::new(String::new()));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let output = output.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { return };
                    output.lock().unwrap().push_str(&format!("{line}\n"));
                }
            });
        }
        let this = Loop { child, output, mnt: mnt.to_path_buf() };
        this.wait_rounds(10);
        this
    }

    /// Rounds done so far (0 while `/count` is missing or being rewritten).
    fn rounds(&self) -> u64 {
        let mut text = String::new();
        match open_in_root(&self.mnt, "count") {
            Ok(mut file) => {
                let _ = file.read_to_string(&mut text);
                text.trim().parse().unwrap_or(0)
            }
            Err(_) => 0,
        }
    }

    /// Waits until the loop did `target` rounds; panics after 20 s.
    fn wait_rounds(&self, target: u64) -> u64 {
        let start = Instant::now();
        loop {
            let rounds = self.rounds();
            if rounds >= target {
                return rounds;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "the loop is stuck at {rounds} rounds (waiting for {target}); output:\n{}",
                self.output.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the loop; its exit status and output.
    fn finish(mut self) -> (std::process::ExitStatus, String) {
        chroot_sh(&self.mnt, "touch /stop");
        let start = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if start.elapsed() > Duration::from_secs(30) {
                let _ = self.child.kill();
                break self.child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        std::thread::sleep(Duration::from_millis(50));
        chroot_sh(&self.mnt, "rm /stop");
        let output = self.output.lock().unwrap().clone();
        (status, output)
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The binary `/proc/PID/exe` names, and whether it was deleted since.
fn exe_of(pid: u32) -> String {
    std::fs::read_link(format!("/proc/{pid}/exe")).unwrap().to_string_lossy().into_owned()
}

#[test]
fn restart_keeps_a_chroot_loop_running() {
    if !require_root_fuse(&["chroot", "umount"]) {
        return;
    }
    let tmp = tempdir();
    let bin_dir = tmp.path().join("bin");
    std::fs::create_dir_all(&bin_dir).unwrap();
    let copy = bin_dir.join("rmount");
    std::fs::copy(rmount_bin(), &copy).unwrap();
    let daemon = Daemon::with_binary(tmp.path(), &copy);
    if !load_debian(tmp.path(), &daemon) {
        return;
    }
    daemon.ok(&["daemon"]);
    let mnt = tmp.path().join("mnt");
    daemon.mount(DEBIAN_REF, &mnt, false);

    // An upgrade: a new file renamed over the binary, then `daemon restart`.
    let looping = Loop::start(&mnt);
    let before = daemon.pong();
    assert_eq!(exe_of(before.keeper_pid), copy.display().to_string());
    let fresh = bin_dir.join(".rmount.new");
    std::fs::copy(rmount_bin(), &fresh).unwrap();
    std::fs::rename(&fresh, &copy).unwrap();
    assert!(exe_of(before.keeper_pid).ends_with(" (deleted)"), "the old binary is replaced");
    let rounds = looping.rounds();
    let start = Instant::now();
    daemon.ok(&["daemon", "restart"]);
    eprintln!("daemon restart: {:?}", start.elapsed());
    let after = daemon.pong();
    assert_eq!(after.keeper_pid, before.keeper_pid, "the keeper keeps its pid");
    assert_ne!(after.pid, before.pid, "a new worker");
    assert_eq!(
        exe_of(after.keeper_pid),
        copy.display().to_string(),
        "the keeper runs the new file"
    );
    assert_eq!(exe_of(after.pid), copy.display().to_string(), "the worker runs the new file");
    looping.wait_rounds(rounds + 30);
    let (status, output) = looping.finish();
    assert!(status.success() && !output.contains("FAIL"), "the loop ({status}):\n{output}");
    assert!(output.contains("done"), "{output}");
    assert!(daemon.ps_entry(&mnt).is_some(), "ps lists the mount after the restart");

    // Parked: `daemon stop --keep-mounts`, then `daemon`.
    let looping = Loop::start(&mnt);
    let before = daemon.pong();
    // Read before parking: while parked, everything on the mount waits.
    let rounds = looping.rounds();
    daemon.ok(&["daemon", "stop", "--keep-mounts"]);
    assert!(daemon.status().is_none(), "a parked daemon has no socket");
    assert!(!before.socket.exists(), "{} is removed while parked", before.socket.display());
    assert_eq!(daemon.keeper_pid_file(), Some(before.keeper_pid), "the keeper holds the mounts");
    assert!(wait_gone(before.pid, Duration::from_secs(5)), "the worker exits when parked");
    assert!(mountinfo_points().contains(&mnt), "the mount stays while parked");
    std::thread::sleep(Duration::from_millis(300));
    daemon.ok(&["daemon"]);
    let after = daemon.pong();
    assert_eq!(after.keeper_pid, before.keeper_pid, "the keeper keeps its pid");
    assert_ne!(after.pid, before.pid, "a new worker");
    looping.wait_rounds(rounds + 30);
    let (status, output) = looping.finish();
    assert!(status.success() && !output.contains("FAIL"), "the loop ({status}):\n{output}");
    assert!(daemon.ps_entry(&mnt).is_some(), "ps lists the mount after parking");
    daemon.umount(&mnt);
}

// ---------------------------------------------------------------------------
// SIGTERM and the next start

/// A daemon serving the Debian image twice under `tmp`: writable at `rw`,
/// read-only at `ro` (`None`: no Debian image here, reported by the loader).
fn debian_rw_and_ro(tmp: &Path) -> Option<(Daemon, PathBuf, PathBuf)> {
    let daemon = Daemon::new(tmp);
    if !load_debian(tmp, &daemon) {
        return None;
    }
    let (rw, ro) = (tmp.join("rw"), tmp.join("ro"));
    daemon.mount(DEBIAN_REF, &rw, false);
    daemon.mount(DEBIAN_REF, &ro, true);
    Some((daemon, rw, ro))
}

/// Each of `mounts` is listed as it was (`before`, from `ps`) and mounted
/// exactly once (nothing left over from the previous daemon beneath it).
fn assert_served_again(daemon: &Daemon, mounts: &[&PathBuf], before: &[Value]) {
    let points = mountinfo_points();
    for (mnt, before) in mounts.iter().zip(before) {
        let now = daemon.ps_entry(mnt).unwrap_or_else(|| {
            panic!("{} is not served again\n{}", mnt.display(), daemon.log_tail())
        });
        for key in ["mountpoint", "reference", "imageId", "readOnly", "upper", "mountedAt"] {
            assert_eq!(now[key], before[key], "{key} of {}", mnt.display());
        }
        let times = points.iter().filter(|p| p == mnt).count();
        assert_eq!(times, 1, "{} in mountinfo", mnt.display());
    }
}

#[test]
fn sigterm_unmounts_and_the_next_start_mounts_again() {
    if !require_root_fuse(&["chroot", "umount"]) {
        return;
    }
    let tmp = tempdir();
    let Some((daemon, rw, ro)) = debian_rw_and_ro(tmp.path()) else { return };
    chroot_sh(&rw, "echo kept > /etc/kept && rm /data/small.txt && sync /etc/kept");
    let entries: Vec<Value> = [&rw, &ro].iter().map(|m| daemon.ps_entry(m).unwrap()).collect();
    let upper = PathBuf::from(entries[0]["upper"].as_str().unwrap());
    let pong = daemon.pong();
    // A program in the read-only mount keeps it busy.
    let mut busy = Command::new("chroot").arg(&ro).args(["sleep", "60"]).spawn().unwrap();
    let _busy_guard = KillOnDrop(busy.id());
    std::thread::sleep(Duration::from_millis(200));
    assert!(busy.try_wait().unwrap().is_none(), "sleep in the mount exited early");

    kill(pong.keeper_pid, rustix::process::Signal::TERM);
    assert!(wait_gone(pong.keeper_pid, Duration::from_secs(15)), "the keeper exits on SIGTERM");
    assert!(wait_gone(pong.pid, Duration::from_secs(5)), "the worker exits with it");
    assert_eq!(daemon.mounts_in_scope(), Vec::<PathBuf>::new(), "SIGTERM unmounts everything");
    let _ = busy.kill();
    let _ = busy.wait();
    assert_eq!(std::fs::read_to_string(upper.join("etc/kept")).unwrap(), "kept\n");
    let whiteout = std::fs::symlink_metadata(upper.join("data/small.txt")).unwrap();
    assert!(whiteout.file_type().is_char_device() && whiteout.rdev() == 0, "whiteout kept");
    assert_eq!(json_files(&daemon.root.join("daemon/mounts")).len(), 2, "the records are kept");

    daemon.ok(&["daemon"]);
    let again = daemon.pong();
    assert_ne!(again.keeper_pid, pong.keeper_pid);
    assert_served_again(&daemon, &[&rw, &ro], &entries);
    assert_eq!(
        chroot_sh(&rw, "cat /etc/kept; test ! -e /data/small.txt && echo gone"),
        "kept\ngone\n"
    );
    assert_eq!(
        chroot_sh(&ro, "cat /data/small.txt; test ! -e /etc/kept && echo absent"),
        "small\nabsent\n"
    );
    assert_eq!(try_hash(&ro, "data/big.bin").unwrap(), sha256_hex(&big_file()));
    assert!(chroot_sh(&rw, "cat /etc/os-release").contains("Debian"));
    daemon.umount(&rw);
    daemon.umount(&ro);
}

/// Both processes killed (a crash, the OOM killer): the mounts answer
/// `ENOTCONN` until the next start, which mounts them again at the same
/// paths from the durable records, also when their roots were stat'ed
/// before (the kernel then answers `stat` from its cache, dead or not).
#[test]
fn kill_9_of_keeper_and_worker_then_the_next_start_mounts_again() {
    if !require_root_fuse(&["chroot", "umount"]) {
        return;
    }
    let tmp = tempdir();
    let Some((daemon, rw, ro)) = debian_rw_and_ro(tmp.path()) else { return };
    chroot_sh(&rw, "echo kept > /etc/kept && sync /etc/kept");
    for mnt in [&rw, &ro] {
        assert!(std::fs::metadata(mnt).unwrap().is_dir());
    }
    let entries: Vec<Value> = [&rw, &ro].iter().map(|m| daemon.ps_entry(m).unwrap()).collect();
    let pong = daemon.pong();
    // Both at once (their process group): a worker that outlived its
    // keeper would hand the mounts to a new keeper.
    let group = rustix::process::Pid::from_raw(pong.keeper_pid as i32).unwrap();
    rustix::process::kill_process_group(group, rustix::process::Signal::KILL).unwrap();
    assert!(wait_gone(pong.keeper_pid, Duration::from_secs(5)));
    assert!(wait_gone(pong.pid, Duration::from_secs(5)));
    for mnt in [&rw, &ro] {
        // ENOTCONN, or ECONNABORTED for a request the kernel had queued.
        let dead = open_in_root(mnt, "etc/os-release").unwrap_err();
        let errno = dead.raw_os_error();
        assert!(
            [Some(libc::ENOTCONN), Some(libc::ECONNABORTED)].contains(&errno),
            "{}: {dead}",
            mnt.display()
        );
    }

    daemon.ok(&["daemon"]);
    assert_served_again(&daemon, &[&rw, &ro], &entries);
    assert_eq!(chroot_sh(&rw, "cat /etc/kept"), "kept\n");
    assert!(chroot_sh(&ro, "cat /etc/os-release").contains("Debian"));
    daemon.umount(&rw);
    daemon.umount(&ro);
}

/// The keeper killed: the worker hands the mounts to a new keeper and
/// leaves; reads never fail, and the new keeper protects them again (a
/// `kill -9` of its worker breaks nothing either).
#[test]
fn kill_9_of_the_keeper_gets_a_new_keeper() {
    if !require_root_fuse(&["chroot", "umount"]) {
        return;
    }
    let tmp = tempdir();
    let Some((daemon, rw, ro)) = debian_rw_and_ro(tmp.path()) else { return };
    let entries: Vec<Value> = [&rw, &ro].iter().map(|m| daemon.ps_entry(m).unwrap()).collect();
    let looping = Loop::start(&rw);
    let first = daemon.pong();
    kill(first.keeper_pid, rustix::process::Signal::KILL);
    let second = daemon.wait_new_worker(first.pid, Duration::from_secs(5));
    assert_ne!(second.keeper_pid, first.keeper_pid, "a new keeper");
    assert!(wait_gone(first.pid, Duration::from_secs(5)), "the orphaned worker left");
    let rounds = looping.rounds();
    kill(second.pid, rustix::process::Signal::KILL);
    let third = daemon.wait_new_worker(second.pid, Duration::from_secs(5));
    assert_eq!(third.keeper_pid, second.keeper_pid, "the new keeper restarted its worker");
    looping.wait_rounds(rounds + 30);
    let (status, output) = looping.finish();
    assert!(status.success() && !output.contains("FAIL"), "the loop ({status}):\n{output}");
    assert_served_again(&daemon, &[&rw, &ro], &entries);
    assert!(chroot_sh(&ro, "cat /etc/os-release").contains("Debian"));
    daemon.umount(&rw);
    daemon.umount(&ro);
}

// ---------------------------------------------------------------------------
// The control socket

const TEST_USER: &str = "rmount-test";

/// The uid of [`TEST_USER`], created as a system user when missing.
fn test_user() -> u32 {
    let id = || Command::new("id").args(["-u", TEST_USER]).output().unwrap();
    let mut out = id();
    if !out.status.success() {
        run_ok(Command::new("useradd").args(["--system", "--no-create-home", TEST_USER]));
        out = id();
    }
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// One request line; the reply line parsed, or `None` when the daemon
/// closed the connection.
fn exchange(conn: &mut BufReader<UnixStream>, line: &[u8]) -> Option<Value> {
    conn.get_mut().write_all(line).unwrap();
    let mut reply = String::new();
    match conn.read_line(&mut reply) {
        Ok(0) => None,
        Ok(_) => Some(serde_json::from_str(&reply).unwrap_or_else(|e| panic!("{e}: {reply:?}"))),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => None,
        Err(e) => panic!("reading the reply to {:?}: {e}", String::from_utf8_lossy(line)),
    }
}

fn connect(socket: &Path) -> BufReader<UnixStream> {
    let stream = UnixStream::connect(socket).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    BufReader::new(stream)
}

#[test]
fn socket_refuses_other_users_and_bad_json() {
    if !require_root_fuse(&["runuser", "useradd", "umount"]) {
        return;
    }
    let uid = test_user();
    let tmp = tempdir();
    let daemon = Daemon::new(tmp.path());
    let layout = tmp.path().join("layout");
    let items = [d("etc"), f("etc/hello", b"hello\n".to_vec())];
    write_oci_layout(&layout, "localhost/tiny:one", &[layer(&items, Compress::Gzip)]);
    daemon.load(&layout);
    let mnt = tmp.path().join("mnt");
    daemon.mount("localhost/tiny:one", &mnt, true);
    let pong = daemon.pong();

    let meta = std::fs::metadata(&pong.socket).unwrap();
    assert!(meta.file_type().is_socket(), "{}", pong.socket.display());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600, "socket mode");
    assert_eq!((meta.uid(), meta.gid()), (0, 0), "socket owner");

    // Another user's `rmount ps`: aimed at this daemon's socket
    // (`XDG_RUNTIME_DIR=/run` makes a non-root rmount name the same path),
    // and, at the end, with the user's own environment.
    let as_user = |aimed: bool| {
        let mut command = Command::new("runuser");
        command.args(["-u", TEST_USER, "--", "env", "-u", "RMOUNT_NO_DAEMON"]);
        if aimed {
            command.arg("XDG_RUNTIME_DIR=/run");
        }
        command.arg(&daemon.bin).arg("--root").arg(&daemon.root).args(["ps", "--json"]);
        command.output().unwrap()
    };
    let out = as_user(true);
    let text = describe(&out);
    assert!(!out.status.success(), "ps as uid {uid} at the socket succeeded:\n{text}");
    assert!(text.contains("Permission denied"), "ps as uid {uid} at the socket:\n{text}");
    assert!(!text.contains(mnt.to_str().unwrap()), "ps as uid {uid} listed mounts:\n{text}");
    // Past the file mode, the daemon checks the peer's uid itself, and
    // says so whoever is faster: the daemon's refusal or the client's
    // request (two spinning threads make the daemon win most races).
    std::fs::set_permissions(&pong.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let spin = AtomicBool::new(true);
    let outs: Vec<std::process::Output> = std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                while spin.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            });
        }
        let outs = (0..20).map(|_| as_user(true)).collect();
        spin.store(false, Ordering::Relaxed);
        outs
    });
    std::fs::set_permissions(&pong.socket, std::fs::Permissions::from_mode(0o600)).unwrap();
    let refused = format!("uid {uid} may not use this daemon");
    let unclear: Vec<String> = outs
        .iter()
        .filter(|out| out.status.success() || !describe(out).contains(&refused))
        .map(describe)
        .collect();
    assert!(
        unclear.is_empty(),
        "{} of 20 `ps` runs as uid {uid} on a 0666 socket did not say {refused:?}; the first:\n{}",
        unclear.len(),
        unclear[0]
    );

    // Bad requests on one connection: each gets an error, the next still works.
    let mut conn = connect(&pong.socket);
    let cases: [(&[u8], &str); 11] = [
        (b"not json\n", "bad-request"),
        (b"\n", "bad-request"),
        (b"\xff\xfe{\n", "bad-request"),
        (b"[1,2,3]\n", "bad-request"),
        (br#"{"op":"list"}"#, "bad-request"),
        (br#"{"version":99,"op":"list"}"#, "unsupported-version"),
        (br#"{"version":"1","op":"list"}"#, "bad-request"),
        (br#"{"version":1,"op":"launch-missiles"}"#, "bad-request"),
        (br#"{"version":1,"op":"unmount"}"#, "bad-request"),
        (br#"{"version":1,"op":"unmount","mountpoint":"/nonexistent"}"#, "not-found"),
        (br#"{"version":1,"op":"pause","mountpoint":"/nonexistent"}"#, "not-found"),
    ];
    for (request, kind) in cases {
        let mut line = request.to_vec();
        if line.last() != Some(&b'\n') {
            line.push(b'\n');
        }
        let shown = String::from_utf8_lossy(request);
        let reply = exchange(&mut conn, &line).unwrap_or_else(|| panic!("{shown:?}: closed"));
        assert_eq!(reply["version"], 1, "{shown:?}: {reply}");
        assert_eq!(reply["status"], "error", "{shown:?}: {reply}");
        assert_eq!(reply["kind"], kind, "{shown:?}: {reply}");
        assert!(reply["message"].as_str().is_some_and(|m| !m.is_empty()), "{shown:?}: {reply}");
    }
    let list = exchange(&mut conn, b"{\"version\":1,\"op\":\"list\"}\n").unwrap();
    assert_eq!(list["status"], "ok", "{list}");
    assert_eq!(list["result"]["type"], "mounts", "{list}");
    assert_eq!(list["result"]["mounts"][0]["mountpoint"], mnt.to_str().unwrap(), "{list}");
    drop(conn);

    // 2 MiB without a newline: an error reply or a closed connection.
    let mut conn = connect(&pong.socket);
    let mut writer = conn.get_ref().try_clone().unwrap();
    let flood = std::thread::spawn(move || {
        let _ = writer.write_all(&vec![b'a'; 2 << 20]);
    });
    let mut reply = String::new();
    match conn.read_line(&mut reply) {
        Ok(0) => {}
        Ok(_) => {
            let v: Value = serde_json::from_str(&reply).unwrap();
            assert_eq!((&v["status"], &v["kind"]), (&"error".into(), &"bad-request".into()), "{v}");
            let mut rest = Vec::new();
            let closed = conn.read_to_end(&mut rest);
            assert!(
                closed.is_ok_and(|_| rest.is_empty()) || rest.is_empty(),
                "more after it: {rest:?}"
            );
        }
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    drop(conn);
    flood.join().unwrap();

    // Half a request then a hangup; and connections that say nothing.
    let mut half = UnixStream::connect(&pong.socket).unwrap();
    half.write_all(br#"{"version":1,"op":"#).unwrap();
    drop(half);
    for _ in 0..100 {
        drop(UnixStream::connect(&pong.socket).unwrap());
    }

    let after = daemon.pong();
    assert_eq!(after.pid, pong.pid, "the same worker still answers");
    assert!(daemon.ps_entry(&mnt).is_some(), "the mount is still listed");
    assert_eq!(try_hash(&mnt, "etc/hello").unwrap(), sha256_hex(b"hello\n"));
    assert!(!daemon.log().contains("panicked"), "{}", daemon.log_tail());

    // Last, as the other user would run it, with its own environment: its
    // rmount looks for the socket elsewhere (a non-root caller's runtime
    // dir), and must still not report "no mounts" for a store root serves.
    let out = as_user(false);
    let text = describe(&out);
    assert!(!text.contains(mnt.to_str().unwrap()), "ps as uid {uid} listed mounts:\n{text}");
    assert!(
        !out.status.success() && text.contains("Permission denied"),
        "ps as uid {uid} (its own environment) should fail with permission denied:\n{text}"
    );
    daemon.umount(&mnt);
}

// ---------------------------------------------------------------------------
// Commit of a daemon mount

#[test]
fn commit_of_a_daemon_mount() {
    if !require_root_fuse(&["chroot", "umount"]) {
        return;
    }
    let tmp = tempdir();
    let daemon = Daemon::new(tmp.path());
    if !load_debian(tmp.path(), &daemon) {
        return;
    }
    let mnt = tmp.path().join("mnt");
    daemon.mount(DEBIAN_REF, &mnt, false);
    chroot_sh(
        &mnt,
        "echo committed > /etc/motd && rm /data/small.txt && mkdir -p /srv/app && echo app > /srv/app/file",
    );
    let pong = daemon.pong();
    let out = daemon.ok(&["commit", mnt.to_str().unwrap(), "localhost/x:committed"]);
    let id = out.trim().lines().last().unwrap_or("");
    assert!(id.starts_with("sha256:") && id.len() == 71, "commit printed {out:?}");
    // The pause ended: the mount serves and takes writes, the worker runs.
    assert_eq!(chroot_sh(&mnt, "echo after > /after && cat /after"), "after\n");
    let state = std::fs::read_to_string(format!("/proc/{}/stat", pong.pid)).unwrap();
    assert!(!state.rsplit_once(')').unwrap().1.trim_start().starts_with('T'), "{state}");
    assert_eq!(daemon.pong().pid, pong.pid);

    let committed = tmp.path().join("committed");
    daemon.mount("localhost/x:committed", &committed, true);
    let entry = daemon.ps_entry(&committed).unwrap();
    assert_eq!(entry["reference"], "localhost/x:committed", "{entry}");
    assert_eq!(entry["imageId"], id, "{entry}");
    assert_eq!(entry["readOnly"], true, "{entry}");
    let shown = chroot_sh(
        &committed,
        "cat /etc/motd /srv/app/file; test ! -e /data/small.txt && echo gone; test ! -e /after && echo no-after",
    );
    assert_eq!(shown, "committed\napp\ngone\nno-after\n");
    assert_eq!(try_hash(&committed, "data/big.bin").unwrap(), sha256_hex(&big_file()));
    daemon.umount(&committed);
    daemon.umount(&mnt);
}
