//! Lazy mounts (issue 6) against a real registry (Debian's `docker-registry`
//! on a loopback port), with the image not in the store:
//!
//! * the lazily mounted tree equals the same image pulled and mounted from
//!   the store, for gzip, zstd and uncompressed layers, with an rmount index
//!   artifact in the registry and without one (the layers are then
//!   downloaded in full);
//! * one small file of a 100 MiB+ image costs at most two chunks;
//! * a blob altered in the registry's storage gives `EIO` (never wrong
//!   bytes) and a log line naming the layer; other chunks still read;
//! * the registry killed mid-read and restarted: the read completes; down
//!   past `--fetch-timeout`: `EIO`, then the next read works;
//! * `--cache-size` bounds the disk tier while everything is read twice;
//! * 16 threads on a cold mount get correct bytes and no chunk is fetched
//!   twice (checked on a proxy's log of `Range` requests);
//! * offline: a pulled image, and a lazy image read once, mount and read
//!   with the registry stopped.
//!
//! Reads go through `openat2(RESOLVE_IN_ROOT)`; the fixture images have no
//! absolute symlinks anyway. rmount runs with HOME, DOCKER_CONFIG and the
//! mirror config in temp dirs (`Client`).

mod common;

use common::registry::*;
use common::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex, OnceLock};
use std::time::{Duration, Instant};

const TOOLS: &[&str] = &["docker-registry", "skopeo", "umoci"];

/// The fetch unit's uncompressed size (a gzip span, 4 MiB of a tar).
const CHUNK: u64 = 4 << 20;
/// How much a chunk's compressed bytes may exceed CHUNK (deflate's stored
/// blocks, headers, a span's shared boundary byte).
const CHUNK_SLACK: u64 = 256 << 10;

fn ready() -> bool {
    require_root_fuse(TOOLS)
}

fn d(path: &str, mode: u32) -> (Item, Meta) {
    (Item::Dir { path: path.into(), mode }, Meta::default())
}

fn f(path: &str, mode: u32, data: Vec<u8>) -> (Item, Meta) {
    (Item::File { path: path.into(), mode, data }, Meta::default())
}

fn owned(item: (Item, Meta), uid: u64, gid: u64, mtime: u64) -> (Item, Meta) {
    (item.0, Meta { uid, gid, mtime, ..Meta::default() })
}

// ------------------------------------------------------------- fixtures

/// A layer as (blob, media type, tar). gzip at level 6, as registries' images
/// are (Go's compress/gzip, GNU gzip): deflate blocks of at most some 100
/// KiB. `Compress::Gzip` (flate2's fastest level, zlib-ng's deflate_quick)
/// can write one deflate block for a whole 100 MiB file of random bytes,
/// and no gzip index can start reading inside a block.
///
/// zstd: one frame per 4 MiB of tar once the tar is over 4 MiB (as
/// multi-threaded and chunked zstd writers make them: a frame is a chunk),
/// else a single frame.
fn layer(items: &[(Item, Meta)], how: Compress) -> (Vec<u8>, &'static str, Vec<u8>) {
    let tar = layer_tar(items);
    match how {
        Compress::None => make_layer(items, how),
        Compress::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
            io::Write::write_all(&mut e, &tar).unwrap();
            (e.finish().unwrap(), "application/vnd.oci.image.layer.v1.tar+gzip", tar)
        }
        Compress::Zstd => {
            let mut blob = Vec::new();
            for frame in tar.chunks(CHUNK as usize) {
                blob.extend(zstd::encode_all(frame, 3).unwrap());
            }
            (blob, "application/vnd.oci.image.layer.v1.tar+zstd", tar)
        }
    }
}

/// An image with every shape a tree comparison should see, in `how`'s
/// compression: modes, owners, an xattr, a relative symlink, a hardlink,
/// an empty file, 300 small files, two files that cross chunk boundaries
/// (one incompressible, one compressible), then a layer with a whiteout,
/// an opaque directory and a changed file.
fn tree_image(how: Compress) -> ImageSpec<'static> {
    let mut l0 = system_items("lazy", random_bytes(200_000, 1));
    l0.extend([
        d("replaced/sub", 0o700),
        f("replaced/sub/old", 0o644, b"old\n".to_vec()),
        owned(d("home", 0o755), 0, 0, 1_650_000_000),
        owned(d("home/user", 0o700), 1000, 1000, 1_650_000_000),
        owned(f("home/user/.profile", 0o640, pseudo_random(5000, 2)), 1000, 1000, 1_650_000_001),
        f("empty", 0o644, Vec::new()),
        d("data", 0o755),
        f("data/random.bin", 0o644, random_bytes(9 << 20, 3)),
        f("data/text.txt", 0o644, pseudo_random(6 << 20, 4)),
        d("many", 0o755),
    ]);
    for i in 0..300u64 {
        l0.push(f(
            &format!("many/f{i:03}"),
            0o644,
            pseudo_random((i as usize * 37) % 5000, 100 + i),
        ));
    }
    let l1 = vec![
        owned(d("etc", 0o755), 0, 0, 1_700_000_000),
        f("etc/os-release", 0o644, b"NAME=lazy\nVERSION=2\n".to_vec()),
        (Item::Whiteout { path: "etc/remove-me".into() }, Meta::default()),
        d("replaced", 0o755),
        (Item::Opaque { path: "replaced".into() }, Meta::default()),
        f("replaced/new", 0o644, b"new\n".to_vec()),
        f("top.txt", 0o644, b"top layer\n".to_vec()),
    ];
    ImageSpec {
        os: "linux",
        arch: host_arch(),
        cmd: &["/bin/sh"],
        layers: vec![layer(&l0, how), layer(&l1, how)],
    }
}

/// The 100 MiB+ image: one gzip layer of 2,000 small files, a 104 MiB
/// incompressible file and 200 more small files; a tiny second layer.
const BIG_LEN: usize = 104 << 20;
const BIG_SEED: u64 = 77;

fn big_image() -> ImageSpec<'static> {
    let mut l0 = vec![d("small", 0o755)];
    for dir in 0..20u64 {
        l0.push(d(&format!("small/d{dir:02}"), 0o755));
        for i in 0..100u64 {
            let n = dir * 100 + i;
            let len = 1000 + (n as usize * 131) % 3000;
            l0.push(f(&format!("small/d{dir:02}/f{n:04}"), 0o644, pseudo_random(len, 1000 + n)));
        }
    }
    l0.push(d("big", 0o755));
    l0.push(f("big/blob.bin", 0o644, random_bytes(BIG_LEN, BIG_SEED)));
    l0.push(d("tail", 0o755));
    for i in 0..200u64 {
        l0.push(f(&format!("tail/f{i:03}"), 0o644, pseudo_random(2000 + i as usize, 5000 + i)));
    }
    let l1 = vec![d("etc", 0o755), f("etc/hostname", 0o644, b"big\n".to_vec())];
    ImageSpec {
        os: "linux",
        arch: host_arch(),
        cmd: &["/bin/sh"],
        layers: vec![layer(&l0, Compress::Gzip), layer(&l1, Compress::Gzip)],
    }
}

/// A ~40 MiB gzip image for the cache and concurrency tests: 24 random
/// 1.5 MiB files and 400 small ones in 8 dirs, shuffled together so most
/// chunks hold both kinds.
fn medium_image() -> ImageSpec<'static> {
    let mut l0 = Vec::new();
    for dir in 0..8u64 {
        l0.push(d(&format!("d{dir}"), 0o755));
        for i in 0..50u64 {
            let n = dir * 50 + i;
            let len = 500 + (n as usize * 977) % 8000;
            l0.push(f(&format!("d{dir}/small{n:03}"), 0o644, pseudo_random(len, 9000 + n)));
            if i % 17 == 0 {
                let data = random_bytes(3 << 19, 20_000 + n);
                l0.push(f(&format!("d{dir}/big{n:03}.bin"), 0o644, data));
            }
        }
    }
    ImageSpec {
        os: "linux",
        arch: host_arch(),
        cmd: &["/bin/sh"],
        layers: vec![layer(&l0, Compress::Gzip)],
    }
}

/// A fixture image written once as an OCI layout (tag `v1`) under
/// CARGO_TARGET_TMPDIR, with what the tests check against.
struct Fixture {
    layout: PathBuf,
    /// Regular files of the top layer view: path → (size, sha256 hex).
    /// (The big and medium images have each path in one layer only.)
    files: BTreeMap<String, (u64, String)>,
    /// Layer digests and sizes, bottom first.
    layers: Vec<(String, u64)>,
}

impl Fixture {
    fn load_or_build(name: &str, build: fn() -> ImageSpec<'static>) -> Fixture {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("lazy-fixture-{name}-v2"));
        let meta = dir.join("fixture.json");
        if !meta.exists() {
            let tmp = dir.with_extension(format!("tmp{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&tmp);
            let image = build();
            write_image_layout(&tmp.join("layout"), "v1", &image);
            let mut files = BTreeMap::new();
            for (_, _, tar) in &image.layers {
                let mut archive = tar::Archive::new(tar.as_slice());
                for e in archive.entries().unwrap() {
                    let mut e = e.unwrap();
                    if e.header().entry_type() != tar::EntryType::Regular {
                        continue;
                    }
                    let path = e.path().unwrap().to_string_lossy().into_owned();
                    let mut data = Vec::new();
                    io::Read::read_to_end(&mut e, &mut data).unwrap();
                    files.insert(path, json!([data.len(), sha256_hex(&data)]));
                }
            }
            let layers: Vec<Value> = image
                .layers
                .iter()
                .map(|(blob, _, _)| json!([format!("sha256:{}", sha256_hex(blob)), blob.len()]))
                .collect();
            let body = json!({"files": files, "layers": layers});
            std::fs::write(tmp.join("fixture.json"), serde_json::to_vec(&body).unwrap()).unwrap();
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::rename(&tmp, &dir).unwrap();
        }
        let v: Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
        let files = v["files"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), (v[0].as_u64().unwrap(), v[1].as_str().unwrap().to_string())))
            .collect();
        let layers = v["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| (l[0].as_str().unwrap().to_string(), l[1].as_u64().unwrap()))
            .collect();
        Fixture { layout: dir.join("layout"), files, layers }
    }

    fn push(&self, addr: &str, repo_tag: &str) {
        skopeo_push(&self.layout, "v1", addr, repo_tag, &[]);
    }

    fn expect_file(&self, mnt: &Path, path: &str) {
        let (size, sha) = &self.files[path];
        let data = read_in_root(mnt, path).unwrap_or_else(|e| panic!("read {path}: {e}"));
        assert_eq!(data.len() as u64, *size, "{path}: size");
        assert_eq!(&sha256_hex(&data), sha, "{path}: wrong bytes");
    }
}

fn big() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| Fixture::load_or_build("big", big_image))
}

fn medium() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| Fixture::load_or_build("medium", medium_image))
}

// ------------------------------------------------------------- helpers

/// Polls `done` every 50 ms until it holds or `timeout` passes.
fn wait_until(timeout: Duration, done: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How many GETs of `digest` the registry has answered through the proxy.
fn blob_gets_answered(proxy: &FaultProxy, digest: &str) -> usize {
    let path = format!("/blobs/{digest}");
    proxy
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path.contains(&path) && r.status != 0)
        .count()
}

fn read_in_root(root: &Path, rel: &str) -> io::Result<Vec<u8>> {
    let mut data = Vec::new();
    io::Read::read_to_end(&mut open_in_root(root, rel)?, &mut data)?;
    Ok(data)
}

/// Reads `rel` beneath `root`, then drops its pages from the page cache
/// (POSIX_FADV_DONTNEED), so the next read goes to the mount again.
fn read_uncached(root: &Path, rel: &str) -> io::Result<Vec<u8>> {
    use std::os::fd::AsRawFd;
    let mut file = open_in_root(root, rel)?;
    let mut data = Vec::new();
    io::Read::read_to_end(&mut file, &mut data)?;
    // SAFETY: a valid open fd; the call only advises the kernel.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0, "posix_fadvise {rel}");
    Ok(data)
}

/// `len` bytes at `offset` (fewer only at EOF); an error mid-way is the error.
fn pread(file: &std::fs::File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(done);
    Ok(buf)
}

fn is_eio(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EIO)
}

/// A read-only mount made by `rmount mount REF DIR --read-only EXTRA…` with
/// a `Client`'s environment (lazy when REF is not in its store); unmounted
/// on drop.
struct ImageMount {
    client: Client,
    path: PathBuf,
    /// The mount command's stderr.
    stderr: String,
}

impl ImageMount {
    fn mount(client: &Client, reference: &str, path: &Path, extra: &[&str]) -> ImageMount {
        std::fs::create_dir_all(path).unwrap();
        let mut args = vec!["mount", reference, path.to_str().unwrap(), "--read-only"];
        args.extend_from_slice(extra);
        let start = Instant::now();
        let out = client.run(&args);
        let took = start.elapsed();
        assert!(out.status.success(), "rmount {args:?} failed:\n{}", describe(&out));
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        eprintln!("mounted {reference} in {took:?}; stderr:\n{stderr}");
        ImageMount { client: client.with_root(&client.root), path: path.to_path_buf(), stderr }
    }

    /// `rmount stats DIR --json`.
    fn stats(&self) -> Value {
        self.client.stats(&self.path)
    }

    /// Stats once `done` holds for them (they refresh about once a second),
    /// or the last ones after 5 s.
    fn stats_when(&self, done: impl Fn(&Value) -> bool) -> Value {
        self.stats_within(Duration::from_secs(5), done)
    }

    /// `stats_when` with another time limit.
    fn stats_within(&self, timeout: Duration, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.stats();
            if done(&s) || Instant::now() > deadline {
                return s;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Every ROOT/mounts/*.log (the serving processes' stderr).
    fn log(&self) -> String {
        self.client.mount_logs()
    }

    fn tree(&self) -> BTreeMap<String, String> {
        describe_tree(&self.path)
    }
}

impl Drop for ImageMount {
    fn drop(&mut self) {
        self.client.umount_or_detach(&self.path);
    }
}

/// The byte ranges `[start, end]` of the proxy's GETs of `digest` with a
/// `Range` header, and how many GETs of it had none (whole-blob downloads).
fn blob_gets(proxy: &FaultProxy, digest: &str) -> (Vec<(u64, u64)>, usize) {
    let mut ranges = Vec::new();
    let mut whole = 0;
    for r in proxy.requests() {
        if r.method != "GET" || !r.path.contains(&format!("/blobs/{digest}")) {
            continue;
        }
        match r.range.as_deref().and_then(|v| v.strip_prefix("bytes=")) {
            Some(spec) => {
                let (a, b) = spec.split_once('-').unwrap();
                let start = a.trim().parse().unwrap();
                let end = b.trim().parse().unwrap_or(u64::MAX);
                ranges.push((start, end));
            }
            None => whole += 1,
        }
    }
    (ranges, whole)
}

/// A registry holding `fixture` as `team/NAME:v1`, a proxy in front of it,
/// the image pulled into one store whose index artifact is pushed: returns
/// (registry, proxy, the reference through the proxy, the puller).
fn published_with_artifact(
    tmp: &Path,
    fixture: &Fixture,
    name: &str,
) -> (Registry, FaultProxy, String, Client) {
    let registry = Registry::plain();
    fixture.push(registry.addr(), &format!("team/{name}:v1"));
    let proxy = FaultProxy::start(registry.addr());
    let reference = format!("{}/team/{name}:v1", proxy.addr());
    let puller = Client::new(&tmp.join("puller"));
    puller.pull(&reference, &["-q"]);
    puller.ok(&["index", "build", &reference, "--push"]);
    (registry, proxy, reference, puller)
}

// ------------------------------------------------------- 1. tree equality

/// Without an index artifact (layers downloaded in full at mount), then
/// with one (no layer data fetched at mount), the lazy tree equals the
/// pulled image's tree mounted from the store.
fn lazy_tree_equals_store_tree(how: Compress, name: &str) {
    let tmp = tempdir();
    let registry = Registry::plain();
    let image = tree_image(how);
    let layers: Vec<String> =
        image.layers.iter().map(|(b, _, _)| format!("sha256:{}", sha256_hex(b))).collect();
    let repo_tag = format!("team/{name}:v1");
    if matches!(how, Compress::None) {
        // skopeo gzips uncompressed layers on the way to a registry (even
        // with --dest-decompress): rmount pushes them as they are.
        let local = format!("localhost/lazy/{name}:v1");
        write_image_layout(&tmp.path().join("layout"), &local, &image);
        let loader = Client::new(&tmp.path().join("loader"));
        loader.ok(&["load", "-i", tmp.path().join("layout").to_str().unwrap()]);
        loader.push(&local, Some(&format!("{}/{repo_tag}", registry.addr())), &["-q"]);
    } else {
        write_image_layout(&tmp.path().join("layout"), "v1", &image);
        skopeo_push(&tmp.path().join("layout"), "v1", registry.addr(), &repo_tag, &[]);
    }
    let manifest = skopeo_inspect(registry.addr(), &repo_tag, true);
    let pushed: Vec<&str> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap())
        .collect();
    assert_eq!(pushed, layers, "skopeo changed the layers: {manifest:#}");
    let proxy = FaultProxy::start(registry.addr());
    let reference = format!("{}/team/{name}:v1", proxy.addr());

    // No artifact yet: the fallback downloads each layer, and says so.
    let plain = Client::new(&tmp.path().join("plain"));
    let lazy = ImageMount::mount(&plain, &reference, &tmp.path().join("mnt-plain"), &[]);
    assert!(
        lazy.stderr.to_lowercase().contains("download"),
        "a mount without an index should say on stderr that it downloads the layers:\n{}",
        lazy.stderr
    );
    let without_artifact = lazy.tree();
    drop(lazy);

    // The reference: pulled into a store and mounted from it.
    let puller = Client::new(&tmp.path().join("puller"));
    puller.pull(&reference, &["-q"]);
    let expected = mounted_tree(&puller.root, &reference, &tmp.path().join("mnt-store"));
    assert!(expected.len() > 300, "{} entries", expected.len());
    assert_same_tree(&expected, &without_artifact);

    // With the artifact: the mount downloads no layer.
    puller.ok(&["index", "build", &reference, "--push"]);
    proxy.clear_requests();
    let fresh = Client::new(&tmp.path().join("fresh"));
    let lazy = ImageMount::mount(&fresh, &reference, &tmp.path().join("mnt-lazy"), &[]);
    for digest in &layers {
        let (ranges, whole) = blob_gets(&proxy, digest);
        assert_eq!(
            (whole, ranges.len()),
            (0, 0),
            "mounting with an index artifact fetched layer {digest}:\n{}",
            proxy.describe_requests()
        );
    }
    let stats = lazy.stats();
    assert_eq!(stats["reference"], reference.as_str(), "{stats:#}");
    assert_eq!(num(&stats, "fetchedBytes"), 0, "{stats:#}");
    assert_same_tree(&expected, &lazy.tree());

    // Everything was read once: every chunk is cached, each fetched once.
    let stats = lazy.stats_when(|s| {
        s["layers"].as_array().is_some_and(|ls| ls.iter().all(|l| l["chunksCached"] == l["chunks"]))
    });
    let first = layer_stats(&stats, &layers[0]);
    assert!(num(first, "chunks") >= 3, "a 15 MiB layer in {} chunks: {stats:#}", first["chunks"]);
    for (digest, (blob, _, _)) in layers.iter().zip(&image.layers) {
        let l = layer_stats(&stats, digest);
        assert_eq!(l["chunksCached"], l["chunks"], "{digest}: {stats:#}");
        assert_eq!(l["size"], blob.len(), "{digest}: {stats:#}");
        let (ranges, whole) = blob_gets(&proxy, digest);
        assert_eq!(whole, 0, "{digest} downloaded whole:\n{}", proxy.describe_requests());
        let last = blob.len() as u64 - 1;
        let fetched: u64 = ranges.iter().map(|&(a, b)| b.min(last) + 1 - a).sum();
        assert!(
            fetched <= blob.len() as u64 + num(l, "chunks") * 64,
            "{digest}: {fetched} bytes fetched for a {} byte blob:\n{}",
            blob.len(),
            proxy.describe_requests()
        );
    }
}

#[test]
fn lazy_gzip_tree_equals_store_tree_with_and_without_index_artifact() {
    if ready() {
        lazy_tree_equals_store_tree(Compress::Gzip, "gzip");
    }
}

#[test]
fn lazy_zstd_tree_equals_store_tree_with_and_without_index_artifact() {
    if ready() {
        lazy_tree_equals_store_tree(Compress::Zstd, "zstd");
    }
}

#[test]
fn lazy_uncompressed_tree_equals_store_tree_with_and_without_index_artifact() {
    if ready() {
        lazy_tree_equals_store_tree(Compress::None, "tar");
    }
}

// -------------------------------------------------- 2. one small file

#[test]
fn reading_one_small_file_of_a_100_mib_image_fetches_at_most_two_chunks() {
    if !ready() {
        return;
    }
    let tmp = tempdir();
    let fixture = big();
    let (layer, layer_size) = fixture.layers[0].clone();
    assert!(layer_size > 100 << 20, "the big layer is only {layer_size} bytes");
    let (_registry, proxy, reference, _puller) =
        published_with_artifact(tmp.path(), fixture, "big");

    proxy.clear_requests();
    let client = Client::new(&tmp.path().join("lazy"));
    let lazy = ImageMount::mount(&client, &reference, &tmp.path().join("mnt"), &[]);
    assert_eq!(blob_gets(&proxy, &layer), (vec![], 0), "{}", proxy.describe_requests());
    let before = lazy.stats();
    assert_eq!(num(&before, "fetchedBytes"), 0, "{before:#}");
    assert_eq!(num(&before, "fetches"), 0, "{before:#}");

    let start = Instant::now();
    fixture.expect_file(&lazy.path, "small/d10/f1000");
    eprintln!("first read took {:?}", start.elapsed());

    let stats = lazy.stats_when(|s| num(s, "fetches") > 0);
    eprintln!("stats: {stats:#}\nproxy:\n{}", proxy.describe_requests());
    let (fetched, fetches) = (num(&stats, "fetchedBytes"), num(&stats, "fetches"));
    assert!((1..=2).contains(&fetches), "{fetches} fetches for one small file: {stats:#}");
    assert!(
        fetched > 0 && fetched <= 2 * (CHUNK + CHUNK_SLACK),
        "{fetched} bytes fetched for one small file: {stats:#}"
    );
    let l = layer_stats(&stats, &layer);
    assert_eq!(num(l, "size"), layer_size, "{stats:#}");
    assert_eq!(num(l, "fetchedBytes"), fetched, "{stats:#}");
    assert!(num(l, "chunks") >= 25, "a {layer_size} byte layer in {} chunks", num(l, "chunks"));
    assert!(num(l, "chunksCached") <= 2, "{stats:#}");
    assert!(stats["fetchedPercent"].as_f64().is_some_and(|p| p < 10.0), "{stats:#}");
    for p in ["p50", "p90", "p99"] {
        assert!(stats["fetchLatencyMs"][p].as_f64().is_some(), "fetchLatencyMs.{p}: {stats:#}");
    }
    // What the proxy carried agrees.
    let (ranges, whole) = blob_gets(&proxy, &layer);
    assert_eq!(whole, 0, "{}", proxy.describe_requests());
    let carried: u64 = ranges.iter().map(|(a, b)| b - a + 1).sum();
    assert!(carried <= 2 * (CHUNK + CHUNK_SLACK), "{}", proxy.describe_requests());

    // Reading it again is a cache hit.
    fixture.expect_file(&lazy.path, "small/d10/f1000");
    fixture.expect_file(&lazy.path, "small/d10/f1001");
    let again = lazy.stats_when(|s| num(s, "cacheHits") > 0);
    assert_eq!(num(&again, "fetches"), fetches, "{again:#}");
}

// -------------------------------------------------- 3. corruption

#[test]
fn a_blob_altered_in_the_registry_gives_eio_and_a_log_line_never_wrong_bytes() {
    if !ready() {
        return;
    }
    let tmp = tempdir();
    let fixture = big();
    let (layer, layer_size) = fixture.layers[0].clone();
    let (registry, _proxy, reference, _puller) =
        published_with_artifact(tmp.path(), fixture, "corrupt");
    let client = Client::new(&tmp.path().join("lazy"));
    let lazy = ImageMount::mount(&client, &reference, &tmp.path().join("mnt"), &[]);

    // One byte in the middle of the blob: inside the big file's stored blocks.
    let offset = layer_size / 2;
    registry.flip_blob_byte(&layer, offset, 0x5a);

    let expected = random_bytes(BIG_LEN, BIG_SEED);
    let file = open_in_root(&lazy.path, "big/blob.bin").unwrap();
    let piece = 1 << 20;
    let mut failed = Vec::new();
    for i in 0..BIG_LEN.div_ceil(piece) {
        let at = i * piece;
        match pread(&file, at as u64, piece) {
            Ok(data) => assert!(
                data == expected[at..(at + piece).min(BIG_LEN)],
                "big/blob.bin: wrong bytes at {at}..{} (the altered byte is at blob offset {offset})",
                at + data.len()
            ),
            Err(e) if is_eio(&e) => failed.push(at),
            Err(e) => panic!("read at {at}: {e} (expected EIO or the right bytes)"),
        }
    }
    eprintln!("EIO at MiB {:?}", failed.iter().map(|a| a >> 20).collect::<Vec<_>>());
    assert!(!failed.is_empty(), "no read failed although blob byte {offset} was altered");
    let bad_span = (failed.last().unwrap() + piece - failed[0]) as u64;
    assert!(
        bad_span <= 2 * CHUNK + piece as u64,
        "reads failed over {bad_span} bytes: more than the chunk holding the altered byte"
    );

    // The log names the layer and says what went wrong.
    let log = lazy.log();
    let short = &layer["sha256:".len()..][..12];
    let line = log.lines().find(|l| {
        let l = l.to_lowercase();
        l.contains(short) && (l.contains("mismatch") || l.contains("corrupt"))
    });
    assert!(
        line.is_some(),
        "no log line names layer {layer} with a digest mismatch; mount log:\n{log}"
    );
    eprintln!("log line: {}", line.unwrap());

    // Unaffected chunks still read: before and after the big file.
    fixture.expect_file(&lazy.path, "small/d00/f0001");
    fixture.expect_file(&lazy.path, "tail/f150");

    // Put the byte back: the same reads now succeed (nothing bad was kept).
    registry.flip_blob_byte(&layer, offset, 0x5a);
    for &at in &failed {
        let data =
            pread(&file, at as u64, piece).unwrap_or_else(|e| panic!("re-read at {at}: {e}"));
        assert!(
            data == expected[at..(at + piece).min(BIG_LEN)],
            "wrong bytes at {at} after repair"
        );
    }
}

// ------------------------------------------------- 4. registry outage

#[test]
fn a_read_waits_for_a_restarted_registry_and_fails_with_eio_past_the_fetch_timeout() {
    if !ready() {
        return;
    }
    let tmp = tempdir();
    let fixture = big();
    let (mut registry, proxy, reference, _puller) =
        published_with_artifact(tmp.path(), fixture, "outage");
    let layer = fixture.layers[0].0.clone();

    // (a) Killed mid-read: a sequential read of the big file (its first
    // layer GETs held 1 s each by the proxy), the registry killed once a GET
    // came back and restarted 3 s later: the read completes, correct.
    let waiting = Client::new(&tmp.path().join("waiting"));
    let lazy = ImageMount::mount(&waiting, &reference, &tmp.path().join("mnt-a"), &[]);
    proxy.clear_requests();
    for _ in 0..3 {
        proxy.fault(&format!("GET /v2/team/outage/blobs/{layer}"), Fault::Delay { ms: 1000 });
    }
    let path = lazy.path.clone();
    let reader = std::thread::spawn(move || {
        let start = Instant::now();
        (read_in_root(&path, "big/blob.bin"), start.elapsed())
    });
    // Mid-read: one layer GET has come back, the read goes on.
    let answered = || blob_gets_answered(&proxy, &layer);
    wait_until(Duration::from_secs(30), || answered() >= 1);
    assert!(answered() >= 1, "no layer GET came back:\n{}", proxy.describe_requests());
    assert!(!reader.is_finished(), "the read finished before the registry was killed");
    registry.stop();
    let stopped = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    assert!(!reader.is_finished(), "the read ended while the registry was down");
    registry.restart();
    let restarted = Instant::now();
    let (data, took) = reader.join().unwrap();
    let data = data.unwrap_or_else(|e| {
        panic!("the read failed after the registry came back: {e}\nlog:\n{}", lazy.log())
    });
    eprintln!(
        "read of the big file took {took:?}: killed {:?} and restarted {:?} before it ended",
        stopped.elapsed(),
        restarted.elapsed()
    );
    assert!(restarted.elapsed() < Duration::from_secs(25), "the read ended long after the restart");
    assert_eq!(sha256_hex(&data), fixture.files["big/blob.bin"].1, "big/blob.bin: wrong bytes");
    drop(lazy);

    // (b) Down for longer than --fetch-timeout 3: EIO after about 3 s, the
    // mount stays up, and the same read succeeds after the restart.
    let impatient = Client::new(&tmp.path().join("impatient"));
    let direct = format!("{}/team/outage:v1", registry.addr());
    let lazy = ImageMount::mount(
        &impatient,
        &direct,
        &tmp.path().join("mnt-b"),
        &["--fetch-timeout", "3"],
    );
    registry.stop();
    let start = Instant::now();
    let err = read_in_root(&lazy.path, "tail/f100").expect_err("a read with the registry down");
    let took = start.elapsed();
    assert!(is_eio(&err), "expected EIO, got {err}");
    eprintln!("EIO after {took:?} with --fetch-timeout 3");
    assert!(
        took >= Duration::from_secs(2) && took <= Duration::from_secs(20),
        "EIO came after {took:?}, not after retrying for --fetch-timeout 3"
    );
    std::thread::sleep(Duration::from_secs(2));
    registry.restart();
    fixture.expect_file(&lazy.path, "tail/f100");
    fixture.expect_file(&lazy.path, "small/d05/f0555");
    lazy.stats();
}

// ---------------------------------------------------- 5. cache bound

/// Bytes under `dir`: (apparent size, allocated blocks × 512).
fn disk_usage(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let (mut apparent, mut allocated) = (0, 0);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let Ok(m) = e.path().symlink_metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else {
                apparent += m.len();
                allocated += m.blocks() * 512;
            }
        }
    }
    (apparent, allocated)
}

#[test]
fn cache_size_bounds_the_disk_tier_while_everything_is_read_twice() {
    if !ready() {
        return;
    }
    let tmp = tempdir();
    let fixture = medium();
    let layer_size = fixture.layers[0].1;
    const BOUND: u64 = 12 << 20;
    assert!(layer_size > 3 * BOUND, "the image ({layer_size} bytes) must be well over the bound");
    let (_registry, _proxy, reference, _puller) =
        published_with_artifact(tmp.path(), fixture, "cache");
    let client = Client::new(&tmp.path().join("lazy"));
    let lazy = ImageMount::mount(
        &client,
        &reference,
        &tmp.path().join("mnt"),
        &["--cache-size", "12M", "--cache-mem", "8"],
    );
    let chunks = client.root.join("cache/chunks");

    // Sample the disk tier's size while reading.
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    let sampler = {
        let (stop, peak, chunks) = (stop.clone(), peak.clone(), chunks.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let (a, b) = disk_usage(&chunks);
                peak.0.fetch_max(a, Ordering::SeqCst);
                peak.1.fetch_max(b, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    for pass in 0..2 {
        for (path, (size, sha)) in &fixture.files {
            let data = read_uncached(&lazy.path, path).unwrap_or_else(|e| panic!("{path}: {e}"));
            assert_eq!(data.len() as u64, *size, "pass {pass}: {path}: size");
            assert_eq!(&sha256_hex(&data), sha, "pass {pass}: {path}: wrong bytes");
        }
        let (a, b) = disk_usage(&chunks);
        eprintln!("after pass {pass}: {a} bytes apparent, {b} allocated in {}", chunks.display());
        assert!(
            a <= BOUND && b <= BOUND,
            "after pass {pass}: {a} / {b} bytes over the {BOUND} bound"
        );
    }
    stop.store(true, Ordering::SeqCst);
    sampler.join().unwrap();
    let (peak_apparent, peak_allocated) =
        (peak.0.load(Ordering::SeqCst), peak.1.load(Ordering::SeqCst));
    eprintln!("peak: {peak_apparent} bytes apparent, {peak_allocated} allocated");
    assert!(peak_apparent > 0, "nothing was ever cached on disk under {}", chunks.display());
    // One chunk of slack for a chunk being written before the eviction it causes.
    assert!(
        peak_apparent <= BOUND + CHUNK && peak_allocated <= BOUND + CHUNK,
        "the disk tier peaked at {peak_apparent} / {peak_allocated} bytes (bound {BOUND})"
    );
    // `du` agrees.
    let du = std::process::Command::new("du").arg("-sb").arg(&chunks).output().unwrap();
    let du_bytes: u64 =
        String::from_utf8_lossy(&du.stdout).split_whitespace().next().unwrap().parse().unwrap();
    // du -sb counts the directories' own sizes too.
    assert!(du_bytes <= BOUND + (1 << 20), "du -sb {}: {du_bytes}", chunks.display());
    let stats = lazy.stats_when(|s| num(s, "fetchedBytes") > layer_size);
    eprintln!("stats after two passes: {stats:#}");
    assert!(
        num(&stats, "fetchedBytes") > layer_size,
        "two passes over an image larger than the cache fetched only {} bytes",
        num(&stats, "fetchedBytes")
    );
}

// ------------------------------------------------------ 6. concurrency

#[test]
fn sixteen_threads_on_a_cold_mount_read_correct_bytes_and_no_chunk_is_fetched_twice() {
    if !ready() {
        return;
    }
    let tmp = tempdir();
    let fixture = medium();
    let (layer, layer_size) = fixture.layers[0].clone();
    let (_registry, proxy, reference, _puller) =
        published_with_artifact(tmp.path(), fixture, "conc");
    let client = Client::new(&tmp.path().join("lazy"));
    let lazy = ImageMount::mount(&client, &reference, &tmp.path().join("mnt"), &[]);
    proxy.clear_requests();
    // Hold every layer GET 200 ms, so many readers wait on each fetch.
    for _ in 0..200 {
        proxy.fault(&format!("GET /v2/team/conc/blobs/{layer}"), Fault::Delay { ms: 200 });
    }

    let files: Vec<String> = fixture.files.keys().cloned().collect();
    let barrier = Arc::new(Barrier::new(16));
    let errors = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..16u64)
        .map(|t| {
            let (files, barrier, errors, mnt) =
                (files.clone(), barrier.clone(), errors.clone(), lazy.path.clone());
            let expected = fixture.files.clone();
            std::thread::spawn(move || {
                let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (t + 1);
                barrier.wait();
                for _ in 0..40 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let path = &files[(x % files.len() as u64) as usize];
                    match read_in_root(&mnt, path) {
                        Ok(data) if sha256_hex(&data) == expected[path].1 => {}
                        Ok(_) => errors.lock().unwrap().push(format!("{path}: wrong bytes")),
                        Err(e) => errors.lock().unwrap().push(format!("{path}: {e}")),
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let errors = errors.lock().unwrap();
    assert!(errors.is_empty(), "{} bad reads: {:?}", errors.len(), &errors[..errors.len().min(20)]);

    // No byte of the blob travelled twice (adjacent gzip spans may share
    // the byte their boundary falls in: overlaps of a few bytes are allowed).
    let (mut ranges, whole) = blob_gets(&proxy, &layer);
    assert_eq!(whole, 0, "{}", proxy.describe_requests());
    assert!(!ranges.is_empty(), "no Range request went out:\n{}", proxy.describe_requests());
    ranges.sort();
    for w in ranges.windows(2) {
        let ((a0, a1), (b0, b1)) = (w[0], w[1]);
        let overlap = (a1 + 1).saturating_sub(b0);
        assert!(
            overlap <= 16,
            "ranges {a0}-{a1} and {b0}-{b1} overlap by {overlap} bytes: a chunk was fetched twice\n{}",
            proxy.describe_requests()
        );
    }
    let stats = lazy.stats_when(|s| num(s, "fetches") as usize >= ranges.len());
    eprintln!("{} range requests; stats: {stats:#}", ranges.len());
    let l = layer_stats(&stats, &layer);
    assert!(
        num(&stats, "fetches") <= num(l, "chunks"),
        "{} fetches for {} chunks: {stats:#}",
        num(&stats, "fetches"),
        num(l, "chunks")
    );
    assert!(num(&stats, "fetchedBytes") <= layer_size + num(l, "chunks") * 16, "{stats:#}");
}

// ---------------------------------------------------------- offline

#[test]
fn a_pulled_image_mounts_and_reads_with_the_registry_stopped() {
    if !ready() {
        return;
    }
    let tmp = tempdir();
    let mut registry = Registry::plain();
    write_image_layout(&tmp.path().join("layout"), "v1", &tree_image(Compress::Gzip));
    skopeo_push(&tmp.path().join("layout"), "v1", registry.addr(), "team/offline:v1", &[]);
    let reference = format!("{}/team/offline:v1", registry.addr());
    let expected = describe_tree(&skopeo_pull_unpack(
        registry.addr(),
        "team/offline:v1",
        &tmp.path().join("umoci"),
    ));
    let client = Client::new(&tmp.path().join("client"));
    client.pull(&reference, &["-q"]);
    registry.stop();
    let mount = ImageMount::mount(&client, &reference, &tmp.path().join("mnt"), &[]);
    assert_same_tree(&expected, &mount.tree());
}

#[test]
fn a_lazy_image_read_once_remounts_and_reads_with_the_registry_stopped() {
    if !ready() {
        return;
    }
    let tmp = tempdir();
    let mut registry = Registry::plain();
    let image = tree_image(Compress::Gzip);
    write_image_layout(&tmp.path().join("layout"), "v1", &image);
    skopeo_push(&tmp.path().join("layout"), "v1", registry.addr(), "team/once:v1", &[]);
    let reference = format!("{}/team/once:v1", registry.addr());
    let puller = Client::new(&tmp.path().join("puller"));
    puller.pull(&reference, &["-q"]);
    puller.ok(&["index", "build", &reference, "--push"]);
    let expected = mounted_tree(&puller.root, &reference, &tmp.path().join("mnt-store"));

    let client = Client::new(&tmp.path().join("lazy"));
    let lazy = ImageMount::mount(&client, &reference, &tmp.path().join("mnt"), &[]);
    assert_same_tree(&expected, &lazy.tree());
    let stats = lazy.stats_when(|s| num(s, "fetchedBytes") > 0);
    assert!(num(&stats, "fetchedBytes") > 0, "{stats:#}");
    drop(lazy);

    registry.stop();
    let again = ImageMount::mount(&client, &reference, &tmp.path().join("mnt"), &[]);
    assert_same_tree(&expected, &again.tree());
    std::thread::sleep(Duration::from_millis(1500));
    let stats = again.stats();
    assert_eq!(num(&stats, "fetchedBytes"), 0, "a remount fetched data: {stats:#}");
}

// ------------------------------------------------------ prefetch, tokens

fn all_cached(stats: &Value) -> bool {
    stats["layers"].as_array().is_some_and(|ls| ls.iter().all(|l| l["chunksCached"] == l["chunks"]))
}

#[test]
fn prefetch_all_fetches_the_whole_image_so_it_reads_with_the_registry_stopped() {
    if !ready() {
        return;
    }
    let tmp = tempdir();
    let fixture = medium();
    let (mut registry, _proxy, reference, _puller) =
        published_with_artifact(tmp.path(), fixture, "prefetch");
    let client = Client::new(&tmp.path().join("lazy"));
    let lazy =
        ImageMount::mount(&client, &reference, &tmp.path().join("mnt"), &["--prefetch", "all"]);
    let stats = lazy.stats_within(Duration::from_secs(60), all_cached);
    assert!(all_cached(&stats), "prefetch did not fetch everything in 60 s: {stats:#}");
    assert_eq!(num(&stats, "fetchedBytes"), fixture.layers[0].1, "{stats:#}");
    registry.stop();
    for path in fixture.files.keys() {
        fixture.expect_file(&lazy.path, path);
    }
}

#[test]
fn lazy_reads_go_on_after_the_registry_token_expired() {
    if !ready() {
        return;
    }
    let tmp = tempdir();
    let fixture = medium();
    // Tokens stop working 4 s after they are issued.
    let tokens = TokenServer::start(4);
    let registry = Registry::token(&tokens);
    fixture.push(registry.addr(), "team/token:v1");
    let reference = format!("{}/team/token:v1", registry.addr());
    let puller = Client::new(&tmp.path().join("puller"));
    puller.pull(&reference, &["-q"]);
    puller.ok(&["index", "build", &reference, "--push"]);

    let client = Client::new(&tmp.path().join("lazy"));
    let lazy = ImageMount::mount(&client, &reference, &tmp.path().join("mnt"), &[]);
    let files: Vec<&String> = fixture.files.keys().collect();
    fixture.expect_file(&lazy.path, files[0]);
    let issued = tokens.issued();
    std::thread::sleep(Duration::from_secs(6));
    // A file far from the first one: another chunk, fetched with a new token.
    fixture.expect_file(&lazy.path, files[files.len() - 1]);
    let stats = lazy.stats_when(|s| num(s, "fetches") >= 2);
    assert!(num(&stats, "fetches") >= 2, "the second read fetched nothing: {stats:#}");
    assert!(tokens.issued() > issued, "no new token was fetched after the first expired");
}
