//! eStargz layers (issue 6, item 1b) against a real registry: an image of
//! two eStargz layers (written by `common::estargz`, with the
//! `containerd.io/snapshot/stargz/toc.digest` annotation on each layer
//! descriptor) mounts lazily from its tables of contents — no layer is
//! downloaded in full, nothing is fetched before a read — and shows the
//! same tree (names, metadata, sha256 of every file) as the image pulled
//! into a store and mounted from there, where the layers are indexed as
//! the gzip they also are. A second test does the same with an image
//! converted by stargz-snapshotter's own `ctr-remote` (through a private
//! containerd), so the reader is checked against the reference writer.

mod common;

use common::estargz::{to_estargz, Estargz};
use common::registry::*;
use common::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TOOLS: &[&str] = &["docker-registry", "skopeo"];
const GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// eStargz chunk size of the fixture (stargz-snapshotter's default is 4 MiB).
const CHUNK: usize = 256 << 10;

fn f(path: &str, mode: u32, data: Vec<u8>) -> (Item, Meta) {
    (Item::File { path: path.into(), mode, data }, Meta::default())
}

/// Dirs, small and multi-chunk files, a symlink, a hardlink, an xattr,
/// owners and an empty file; then a layer that whites out, makes a
/// directory opaque and changes a file.
fn layer_items() -> [Vec<(Item, Meta)>; 2] {
    let mut l0 = system_items("esgz", random_bytes(1_000_000, 1));
    l0.extend([
        f("replaced/old", 0o644, b"old\n".to_vec()),
        (
            Item::Dir { path: "home".into(), mode: 0o750 },
            Meta { uid: 1000, gid: 1000, mtime: 1_650_000_000, ..Meta::default() },
        ),
        (
            Item::File { path: "home/.profile".into(), mode: 0o640, data: pseudo_random(5000, 2) },
            Meta { uid: 1000, gid: 1000, mtime: 1_650_000_001, ..Meta::default() },
        ),
        f("empty", 0o644, Vec::new()),
        f("data.txt", 0o644, pseudo_random(3 << 20, 4)),
    ]);
    let l1 = vec![
        (Item::Whiteout { path: "etc/remove-me".into() }, Meta::default()),
        (Item::Opaque { path: "replaced".into() }, Meta::default()),
        f("replaced/new", 0o644, b"new\n".to_vec()),
        f("etc/os-release", 0o644, b"NAME=esgz\nVERSION=2\n".to_vec()),
    ];
    [l0, l1]
}

fn layers() -> Vec<Estargz> {
    layer_items().iter().map(|items| to_estargz(&layer_tar(items), CHUNK)).collect()
}

/// An OCI layout at `dir` whose `tag` is an image of `layers`, each layer
/// descriptor annotated with its TOC digest.
fn write_layout(dir: &Path, tag: &str, layers: &[Estargz]) {
    let descs: Vec<Value> = layers
        .iter()
        .map(|l| {
            json!({"mediaType": GZIP, "digest": put_blob(dir, &l.blob), "size": l.blob.len(),
                   "annotations": {"containerd.io/snapshot/stargz/toc.digest": l.toc_digest}})
        })
        .collect();
    let diff_ids: Vec<String> =
        layers.iter().map(|l| format!("sha256:{}", sha256_hex(&l.tar))).collect();
    let config = serde_json::to_vec(&json!({
        "architecture": host_arch(), "os": "linux", "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap();
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": put_blob(dir, &config), "size": config.len()},
        "layers": descs,
    }))
    .unwrap();
    let index = json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": put_blob(dir, &manifest), "size": manifest.len(),
        "annotations": {"org.opencontainers.image.ref.name": tag}}]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

/// Unmounts on drop.
struct Unmount<'a>(&'a Client, &'a Path);

impl Drop for Unmount<'_> {
    fn drop(&mut self) {
        self.0.umount_or_detach(self.1);
    }
}

/// A layer as the lazy mount's stats should see it: its digest and how
/// many chunks its TOC gives (one per data chunk, plus the TOC itself).
struct Expected {
    digest: String,
    size: u64,
    chunks: usize,
}

impl Expected {
    fn of(blob: &[u8], toc_json: &[u8]) -> Expected {
        let toc: Value = serde_json::from_slice(toc_json).unwrap();
        let entries = toc["entries"].as_array().unwrap();
        let data_chunks = entries.iter().filter(|e| e.get("chunkDigest").is_some()).count();
        Expected {
            digest: format!("sha256:{}", sha256_hex(blob)),
            size: blob.len() as u64,
            chunks: data_chunks + 1,
        }
    }
}

/// Pulls `reference` (through `proxy`) into a store and mounts it, then
/// mounts it lazily from a fresh state directory: the lazy mount must
/// index every layer from its TOC (no whole-blob GET, no "downloading it in
/// full", nothing fetched before reading, the TOC's chunk count) and show
/// the same tree. Returns that tree.
fn lazy_equals_pulled(
    tmp: &Path,
    proxy: &FaultProxy,
    reference: &str,
    layers: &[Expected],
) -> std::collections::BTreeMap<String, String> {
    // (a) Pulled into a store: the layers are indexed as gzip.
    let puller = Client::new(&tmp.join("puller"));
    puller.pull(reference, &["-q"]);
    let expected = mounted_tree(&puller.root, reference, &tmp.join("mnt-store"));
    assert!(expected.contains_key("stargz.index.json"), "{expected:#?}");
    proxy.clear_requests();

    // (b) Lazily, from a fresh state directory: indexed from the TOCs.
    let lazy = Client::new(&tmp.join("lazy"));
    let mnt = tmp.join("mnt-lazy");
    std::fs::create_dir_all(&mnt).unwrap();
    let out = lazy.run(&["mount", reference, mnt.to_str().unwrap(), "--read-only"]);
    assert!(out.status.success(), "lazy mount failed:\n{}", describe(&out));
    let _unmount = Unmount(&lazy, &mnt);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let total: u64 = layers.iter().map(|l| l.size).sum();
    let before = lazy.stats(&mnt);
    assert!(before["fetchedBytes"].as_u64().unwrap() < total, "{before:#}");
    for (layer, s) in layers.iter().zip(before["layers"].as_array().unwrap()) {
        assert_eq!(s["digest"], json!(layer.digest));
        assert_eq!(s["remote"], json!(true), "{s:#}");
        assert_eq!(s["chunks"], json!(layer.chunks), "{s:#}");
    }
    let actual = describe_tree(&mnt);
    assert_same_tree(&expected, &actual);
    let logs = format!("{stderr}{}", lazy.mount_logs());
    assert!(!logs.contains("downloading it in full"), "a layer was downloaded:\n{logs}");
    // Every GET of a layer blob had a Range (footer, TOC, chunks).
    for layer in layers {
        let whole: Vec<_> = proxy
            .requests()
            .into_iter()
            .filter(|r| r.method == "GET" && r.path.contains(&layer.digest) && r.range.is_none())
            .collect();
        assert!(whole.is_empty(), "whole-blob GETs of {}: {whole:?}", layer.digest);
    }
    std::thread::sleep(Duration::from_millis(1200));
    let after = lazy.stats(&mnt);
    let fetched = after["fetchedBytes"].as_u64().unwrap();
    assert!(fetched > 0 && fetched <= total, "{after:#}");
    expected
}

#[test]
fn estargz_lazy_mount_uses_the_toc_and_equals_the_pulled_tree() {
    if !require_root_fuse(TOOLS) {
        return;
    }
    let tmp = tempdir();
    let layers = layers();
    let layout = tmp.path().join("layout");
    write_layout(&layout, "v1", &layers);
    let registry = Registry::plain();
    skopeo_push(&layout, "v1", registry.addr(), "team/esgz:v1", &[]);
    let raw = skopeo_inspect(registry.addr(), "team/esgz:v1", true);
    let annotation = &raw["layers"][0]["annotations"]["containerd.io/snapshot/stargz/toc.digest"];
    assert_eq!(annotation, &json!(layers[0].toc_digest), "the registry kept the annotation");
    let proxy = FaultProxy::start(registry.addr());
    let reference = format!("{}/team/esgz:v1", proxy.addr());
    let expected: Vec<Expected> =
        layers.iter().map(|l| Expected::of(&l.blob, &l.toc_json)).collect();
    let tree = lazy_equals_pulled(tmp.path(), &proxy, &reference, &expected);
    assert!(!tree.contains_key("etc/remove-me") && !tree.contains_key("replaced/old"));
    assert!(tree["usr/bin/tagged"].contains("xattrs="), "{}", tree["usr/bin/tagged"]);
}

/// A private containerd (config, root, state and socket in a temp dir);
/// killed on drop.
struct Containerd {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Containerd {
    fn start() -> Containerd {
        let dir = tempdir();
        let p = dir.path();
        let socket = p.join("containerd.sock");
        let config = format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n\
             [debug]\n  address = \"\"\n",
            root = p.join("root").display(),
            state = p.join("state").display(),
            sock = socket.display(),
        );
        std::fs::write(p.join("config.toml"), config).unwrap();
        let log = std::fs::File::create(p.join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(p.join("config.toml"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start containerd");
        let ready = Instant::now() + Duration::from_secs(20);
        let containerd = Containerd { child, socket, _dir: dir };
        while containerd.ctr_output(&["version"]).is_none_or(|o| !o.status.success()) {
            assert!(Instant::now() < ready, "containerd did not start");
            std::thread::sleep(Duration::from_millis(200));
        }
        containerd
    }

    fn ctr_output(&self, args: &[&str]) -> Option<std::process::Output> {
        let mut cmd = Command::new("ctr-remote");
        cmd.arg("--address").arg(&self.socket).args(["--namespace", "rmount-test"]).args(args);
        cmd.output().ok()
    }

    /// Runs `ctr-remote ARGS…` against this containerd; panics on failure.
    fn ctr(&self, args: &[&str]) -> String {
        let out = self.ctr_output(args).expect("run ctr-remote");
        assert!(out.status.success(), "ctr-remote {args:?} failed:\n{}", describe(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The same comparison with an image converted to eStargz by
/// stargz-snapshotter's `ctr-remote images convert --estargz` (Debian's
/// stargz-snapshotter package), pushed to the registry by containerd.
#[test]
fn ctr_remote_converted_image_mounts_lazily_from_its_toc() {
    if !require_root_fuse(&["docker-registry", "skopeo", "containerd", "ctr-remote"]) {
        return;
    }
    let tmp = tempdir();
    let registry = Registry::plain();
    let image = ImageSpec {
        os: "linux",
        arch: host_arch(),
        cmd: &["/bin/sh"],
        layers: layer_items().iter().map(|items| make_layer(items, Compress::Gzip)).collect(),
    };
    write_image_layout(&tmp.path().join("layout"), "v1", &image);
    skopeo_push(&tmp.path().join("layout"), "v1", registry.addr(), "team/plain:v1", &[]);
    let containerd = Containerd::start();
    let plain = format!("{}/team/plain:v1", registry.addr());
    let converted = format!("{}/team/esgz:v1", registry.addr());
    containerd.ctr(&["images", "pull", "--plain-http", &plain]);
    let chunk = CHUNK.to_string();
    containerd.ctr(&[
        "images",
        "convert",
        "--estargz",
        "--oci",
        "--estargz-chunk-size",
        &chunk,
        &plain,
        &converted,
    ]);
    containerd.ctr(&["images", "push", "--plain-http", &converted]);
    let raw = skopeo_inspect(registry.addr(), "team/esgz:v1", true);
    let mut expected = Vec::new();
    for layer in raw["layers"].as_array().unwrap() {
        let digest = layer["digest"].as_str().unwrap();
        assert!(
            layer["annotations"]["containerd.io/snapshot/stargz/toc.digest"].is_string(),
            "ctr-remote did not annotate the TOC: {layer:#}"
        );
        let blob = std::fs::read(registry.blob_file(digest)).unwrap();
        let toc = toc_json_of(&blob);
        expected.push(Expected::of(&blob, &toc));
    }
    let proxy = FaultProxy::start(registry.addr());
    let reference = format!("{}/team/esgz:v1", proxy.addr());
    let tree = lazy_equals_pulled(tmp.path(), &proxy, &reference, &expected);
    // ctr-remote adds its landmark file; the tree shows it like the tar does.
    assert!(tree.contains_key(".no.prefetch.landmark"), "{tree:#?}");
    assert!(!tree.contains_key("etc/remove-me"));
}

/// The TOC JSON of an eStargz blob (its last tar entry), read the slow way.
fn toc_json_of(blob: &[u8]) -> Vec<u8> {
    let mut archive = tar::Archive::new(flate2::read::MultiGzDecoder::new(blob));
    let mut last = None;
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        if entry.path().unwrap().to_str() == Some("stargz.index.json") {
            let mut json = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut json).unwrap();
            last = Some(json);
        }
    }
    last.expect("no stargz.index.json in the blob")
}
