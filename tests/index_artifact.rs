//! Index artifacts against a real registry (Debian's `docker-registry`,
//! distribution 2.8, which has no Referrers API, so the OCI 1.1 tag
//! fallback is what is exercised), with skopeo as the independent client:
//!
//! * `rmount index build --push` publishes an artifact whose `subject` is
//!   the image manifest (OCI, Docker schema 2, and the host's platform
//!   manifest of a multi-platform index); the image's digest is unchanged;
//!   the `sha256-<hex>` tag lists the artifact; a second build pushes
//!   nothing;
//! * `fetch_index_artifact` brings back indexes byte-identical to the ones
//!   the store built;
//! * an image without an artifact yields no indexes; publishing next to an
//!   image that is not in the repository says to push it first;
//! * a newer artifact whose blobs index other layers is ignored for those
//!   layers, and a descriptor whose size does not match its blob is an error;
//! * (root and FUSE) a file list recorded by a lazy mount (`--record`) and
//!   published with `index build --push --prefetch-list` is saved by a lazy
//!   mount from a fresh store, whose `--prefetch recorded` fetches the
//!   listed file's chunks before anything is read; files of other layers
//!   are left out of the list, and a list that is not one is refused;
//! * a published list that does not verify or parse is skipped (and one
//!   saved before removed) while the indexes still come.

mod common;

use common::registry::*;
use common::*;
use rmount::digest::Digest;
use rmount::fs::record::published_list_path;
use rmount::layer::index_path;
use rmount::registry::{Action, AuthFile, ClientOptions, Hosts, Repository, RetryPolicy};
use rmount::transfer::fetch_index_artifact;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const TOOLS: &[&str] = &["docker-registry", "skopeo"];
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

fn ready() -> bool {
    TOOLS.iter().all(|t| require(t, which(t)))
}

fn d(path: &str, mode: u32) -> (Item, Meta) {
    (Item::Dir { path: path.into(), mode }, Meta::default())
}

fn f(path: &str, data: &[u8]) -> (Item, Meta) {
    (Item::File { path: path.into(), mode: 0o644, data: data.to_vec() }, Meta::default())
}

/// A gzip layer with a file spanning several checkpoints, and a small one
/// compressed as `top` says (Docker schema 2 has no zstd).
fn image_with(arch: &'static str, seed: u64, top: Compress) -> ImageSpec<'static> {
    let base = vec![d("data", 0o755), f("data/big.bin", &random_bytes(9 << 20, seed))];
    let top_items = vec![d("etc", 0o755), f("etc/hostname", format!("{arch}\n").as_bytes())];
    ImageSpec {
        os: "linux",
        arch,
        cmd: &["/bin/sh"],
        layers: vec![make_layer(&base, Compress::Gzip), make_layer(&top_items, top)],
    }
}

fn image(arch: &'static str, seed: u64) -> ImageSpec<'static> {
    image_with(arch, seed, Compress::Zstd)
}

fn layer_digests(image: &ImageSpec) -> Vec<Digest> {
    image
        .layers
        .iter()
        .map(|(blob, _, _)| format!("sha256:{}", sha256_hex(blob)))
        .map(digest)
        .collect()
}

fn digest(text: impl AsRef<str>) -> Digest {
    text.as_ref().parse().unwrap()
}

/// The library's view of `ADDR/NAME`, with no credentials and no mirrors.
fn repository(addr: &str, name: &str, dir: &Path) -> Repository {
    let options = ClientOptions {
        hosts: Hosts::new(None, Vec::new()),
        auth_file: AuthFile::at(dir.join("no-auth.json")),
        retry: RetryPolicy::default(),
    };
    let client = rmount::registry::Client::new(options).unwrap();
    client.repository(&format!("{addr}/{name}").parse().unwrap(), Action::Push).unwrap()
}

/// Puts `artifact` in `repository` and lists it in the tag-schema index of
/// `manifest` as the newest (`created` from its annotations, else 2999-01-01).
fn publish_newer(repository: &Repository, manifest: &str, artifact: &Value) {
    let bytes = artifact.to_string().into_bytes();
    let digest = repository.put_manifest(&Digest::of(&bytes).to_string(), OCI_MANIFEST, &bytes);
    let created = artifact["annotations"]["org.opencontainers.image.created"].as_str();
    let tag = format!("sha256-{}", &manifest[7..]);
    let mut listing: Value =
        serde_json::from_slice(&repository.manifest(&tag).unwrap().bytes).unwrap();
    listing["manifests"].as_array_mut().unwrap().push(json!({
        "mediaType": OCI_MANIFEST, "digest": digest.unwrap().to_string(), "size": bytes.len(),
        "artifactType": "application/vnd.rmount.index.v1",
        "annotations": {
            "org.opencontainers.image.created": created.unwrap_or("2999-01-01T00:00:00Z")
        },
    }));
    repository.put_manifest(&tag, OCI_INDEX, listing.to_string().as_bytes()).unwrap();
}

fn index_build(client: &Client, reference: &str, extra: &[&str]) -> Value {
    let mut args = vec!["index", "build", reference, "--json"];
    args.extend_from_slice(extra);
    let out = client.ok(&args);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("no JSON ({e}):\n{out}"))
}

/// Pulls `ADDR/REPO_TAG`, publishes its indexes, checks what the registry
/// holds with skopeo and fetches them back; returns the artifact digest.
fn publish_and_fetch(
    client: &Client,
    addr: &str,
    repo: &str,
    tag: &str,
    manifest: &str,
    layers: &[Digest],
) -> String {
    let reference = format!("{addr}/{repo}:{tag}");
    client.pull(&reference, &[]);
    let report = index_build(client, &reference, &["--push"]);
    assert_eq!(report["subject"], manifest, "{report}");
    assert_eq!(report["alreadyPublished"], false, "{report}");
    assert_eq!(report["layers"].as_array().unwrap().len(), layers.len(), "{report}");
    let artifact = report["artifact"].as_str().unwrap().to_string();

    let fallback = skopeo_inspect(addr, &format!("{repo}:sha256-{}", &manifest[7..]), true);
    assert_eq!(fallback["mediaType"], OCI_INDEX, "{fallback}");
    assert_eq!(fallback["manifests"][0]["digest"], artifact.as_str(), "{fallback}");
    assert_eq!(fallback["manifests"][0]["artifactType"], "application/vnd.rmount.index.v1");
    let published = skopeo_inspect(addr, &format!("{repo}@{artifact}"), true);
    assert_eq!(published["subject"]["digest"], manifest, "{published}");
    assert_eq!(published["config"]["mediaType"], "application/vnd.oci.empty.v1+json");

    let dir = tempfile::tempdir().unwrap();
    let repository = repository(addr, repo, dir.path());
    let fetched = dir.path().join("indexes");
    let saved = fetch_index_artifact(&repository, &digest(manifest), layers, &fetched).unwrap();
    assert_eq!(saved, layers);
    for layer in layers {
        let got = std::fs::read(index_path(&fetched, layer)).unwrap();
        let built = std::fs::read(index_path(&client.root.join("indexes"), layer)).unwrap();
        assert!(got == built, "the fetched index of {layer} differs from the one built");
    }

    let again = index_build(client, &reference, &["--push"]);
    assert_eq!(again["alreadyPublished"], true, "{again}");
    assert_eq!(again["artifact"], artifact.as_str());
    artifact
}

#[test]
fn published_indexes_come_back_verified_and_the_image_is_unchanged() {
    if !ready() {
        return;
    }
    let registry = Registry::plain();
    let addr = registry.addr();
    let tmp = tempfile::tempdir().unwrap();
    let client = Client::new(&tmp.path().join("client"));
    for (repo, format, top) in
        [("oci", None, Compress::Zstd), ("docker", Some("v2s2"), Compress::Gzip)]
    {
        let spec = image_with(host_arch(), 1, top);
        let layout = tmp.path().join(repo);
        write_image_layout(&layout, "v1", &spec);
        let extra: Vec<&str> = format.iter().flat_map(|f| ["--format", f]).collect();
        skopeo_push(&layout, "v1", addr, &format!("{repo}:v1"), &extra);
        let manifest = skopeo_digest(addr, &format!("{repo}:v1"));
        publish_and_fetch(&client, addr, repo, "v1", &manifest, &layer_digests(&spec));
        assert_eq!(skopeo_digest(addr, &format!("{repo}:v1")), manifest, "the image changed");
    }
}

#[test]
fn a_multi_platform_image_is_indexed_for_the_host_platform() {
    if !ready() {
        return;
    }
    let registry = Registry::plain();
    let addr = registry.addr();
    let tmp = tempfile::tempdir().unwrap();
    let other = if host_arch() == "arm64" { "amd64" } else { "arm64" };
    let specs = [image(other, 2), image(host_arch(), 3)];
    let layout = tmp.path().join("layout");
    let (index, manifests) = write_index_layout(&layout, "v1", &specs);
    skopeo_push(&layout, "v1", addr, "multi:v1", &["--all"]);
    let client = Client::new(&tmp.path().join("client"));
    publish_and_fetch(&client, addr, "multi", "v1", &manifests[1], &layer_digests(&specs[1]));
    assert_eq!(skopeo_digest(addr, "multi:v1"), index, "the index changed");
}

#[test]
fn without_an_artifact_there_is_nothing_and_publishing_needs_the_image() {
    if !ready() {
        return;
    }
    let registry = Registry::plain();
    let addr = registry.addr();
    let tmp = tempfile::tempdir().unwrap();
    let spec = image(host_arch(), 4);
    let layout = tmp.path().join("layout");
    let manifest = write_image_layout(&layout, "v1", &spec);
    skopeo_push(&layout, "v1", addr, "bare:v1", &[]);
    let repository = repository(addr, "bare", tmp.path());
    let fetched = tmp.path().join("indexes");
    let layers = layer_digests(&spec);
    let saved = fetch_index_artifact(&repository, &digest(&manifest), &layers, &fetched).unwrap();
    assert!(saved.is_empty());
    assert!(!fetched.exists());

    let client = Client::new(&tmp.path().join("client"));
    let reference = format!("{addr}/bare:v1");
    client.pull(&reference, &[]);
    let elsewhere = format!("{addr}/elsewhere");
    let err = client.fails(&["index", "build", &reference, "--push", "--dest", &elsewhere]);
    assert!(err.contains("push the image first"), "{err}");
    let err = client.fails(&["index", "build", "nothing-here:v1"]);
    assert!(err.contains("no such image"), "{err}");
}

#[test]
fn indexes_of_other_layers_are_ignored_and_a_wrong_size_is_an_error() {
    if !ready() {
        return;
    }
    let registry = Registry::plain();
    let addr = registry.addr();
    let tmp = tempfile::tempdir().unwrap();
    let spec = image(host_arch(), 5);
    let layout = tmp.path().join("layout");
    let manifest = write_image_layout(&layout, "v1", &spec);
    skopeo_push(&layout, "v1", addr, "app:v1", &[]);
    let client = Client::new(&tmp.path().join("client"));
    let layers = layer_digests(&spec);
    let artifact = publish_and_fetch(&client, addr, "app", "v1", &manifest, &layers);

    // A newer artifact whose blobs are annotated with each other's layer.
    let repository = repository(addr, "app", tmp.path());
    let genuine = repository.manifest(&artifact).unwrap();
    let mut swapped: Value = serde_json::from_slice(&genuine.bytes).unwrap();
    let key = "io.rmount.layer.digest";
    let (l0, l1) = (swapped["layers"][0].clone(), swapped["layers"][1].clone());
    swapped["layers"][0]["annotations"][key] = l1["annotations"][key].clone();
    swapped["layers"][1]["annotations"][key] = l0["annotations"][key].clone();
    let publish_newer = |artifact: &Value| publish_newer(&repository, &manifest, artifact);
    publish_newer(&swapped);
    let fetched = tmp.path().join("indexes");
    let saved = fetch_index_artifact(&repository, &digest(&manifest), &layers, &fetched).unwrap();
    assert!(saved.is_empty(), "indexes of other layers were accepted: {saved:?}");

    // A descriptor that misstates its blob's size cannot verify.
    let mut short: Value = serde_json::from_slice(&genuine.bytes).unwrap();
    let size = short["layers"][0]["size"].as_u64().unwrap();
    short["layers"][0]["size"] = json!(size - 1);
    short["annotations"]["org.opencontainers.image.created"] = json!("2999-01-02T00:00:00Z");
    publish_newer(&short);
    let err = fetch_index_artifact(&repository, &digest(&manifest), &layers, &fetched).unwrap_err();
    assert!(err.to_string().contains("digest mismatch"), "{err}");
}

// ------------------------------------------------------------ prefetch list

/// A read-only mount by `client`, unmounted on drop.
struct Mount<'a> {
    client: &'a Client,
    path: PathBuf,
}

impl<'a> Mount<'a> {
    fn new(client: &'a Client, reference: &str, path: &Path, extra: &[&str]) -> Mount<'a> {
        std::fs::create_dir_all(path).unwrap();
        let mut args = vec!["mount", reference, path.to_str().unwrap(), "--read-only"];
        args.extend_from_slice(extra);
        let out = client.run(&args);
        assert!(out.status.success(), "rmount {args:?} failed:\n{}", describe(&out));
        eprintln!("mounted {reference}; stderr:\n{}", String::from_utf8_lossy(&out.stderr));
        Mount { client, path: path.to_path_buf() }
    }

    fn stats(&self) -> Value {
        self.client.stats(&self.path)
    }

    fn unmount(self) {}
}

impl Drop for Mount<'_> {
    fn drop(&mut self) {
        self.client.umount_or_detach(&self.path);
    }
}

/// The `len` bytes of the file at `path`, read 1 MiB at a time from its end.
fn read_backwards(path: &Path, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(path).unwrap();
    let mut data = vec![0u8; len];
    let mut end = len;
    while end > 0 {
        let start = end.saturating_sub(1 << 20);
        file.read_exact_at(&mut data[start..end], start as u64).unwrap();
        end = start;
    }
    data
}

/// Two 9 MiB files in a gzip layer, a small file in a zstd layer.
fn two_file_image() -> ImageSpec<'static> {
    let base = vec![
        d("data", 0o755),
        f("data/listed.bin", &random_bytes(9 << 20, 6)),
        f("data/other.bin", &random_bytes(9 << 20, 7)),
    ];
    let top = vec![d("etc", 0o755), f("etc/hostname", b"prefetch\n")];
    ImageSpec {
        os: "linux",
        arch: host_arch(),
        cmd: &["/bin/sh"],
        layers: vec![make_layer(&base, Compress::Gzip), make_layer(&top, Compress::Zstd)],
    }
}

#[test]
fn a_recorded_list_published_with_the_indexes_is_prefetched_by_a_fresh_lazy_mount() {
    if !require_root_fuse(TOOLS) {
        return;
    }
    let registry = Registry::plain();
    let addr = registry.addr();
    let tmp = tempfile::tempdir().unwrap();
    let spec = two_file_image();
    let layers = layer_digests(&spec);
    let listed = random_bytes(9 << 20, 6);
    let layout = tmp.path().join("layout");
    let manifest = write_image_layout(&layout, "v1", &spec);
    skopeo_push(&layout, "v1", addr, "app:v1", &[]);
    let reference = format!("{addr}/app:v1");

    // The publisher: indexes first, so the recording mount is lazy.
    let publisher = Client::new(&tmp.path().join("publisher"));
    publisher.pull(&reference, &[]);
    let first = index_build(&publisher, &reference, &["--push"]);
    assert_eq!(first["prefetchFiles"], 0, "{first}");

    // A lazy mount records the one file read through it.
    let recorder = publisher.with_root(&tmp.path().join("recorder"));
    let list = tmp.path().join("list.json");
    let mnt = tmp.path().join("mnt-record");
    let mount = Mount::new(&recorder, &reference, &mnt, &["--record", list.to_str().unwrap()]);
    assert!(std::fs::read(mnt.join("data/listed.bin")).unwrap() == listed);
    mount.unmount();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !list.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let recorded: Value = serde_json::from_slice(&std::fs::read(&list).unwrap()).unwrap();
    let files = recorded["files"].as_array().unwrap();
    assert_eq!(files.len(), 1, "{recorded:#}");
    assert_eq!(files[0]["layer"], layers[0].to_string().as_str(), "{recorded:#}");
    assert!(files[0]["path"].as_str().unwrap().ends_with("data/listed.bin"), "{recorded:#}");

    // Publishing the list makes a new artifact; the list is one more blob.
    let list_arg = list.to_str().unwrap();
    let report = index_build(&publisher, &reference, &["--push", "--prefetch-list", list_arg]);
    assert_eq!(report["alreadyPublished"], false, "{report}");
    assert_eq!(report["prefetchFiles"], 1, "{report}");
    assert_ne!(report["artifact"], first["artifact"], "{report}");
    let artifact = report["artifact"].as_str().unwrap();
    let published = skopeo_inspect(addr, &format!("app@{artifact}"), true);
    let blobs = published["layers"].as_array().unwrap();
    assert_eq!(blobs.len(), layers.len() + 1, "{published:#}");
    let list_blob = &blobs[layers.len()];
    assert_eq!(list_blob["mediaType"], "application/vnd.rmount.prefetch-list.v1+json");

    // The same list with a file of a foreign layer: that file is left out
    // with a warning, which leaves the published list, so nothing is pushed.
    let mut foreign = recorded.clone();
    let other_layer = format!("sha256:{}", "e".repeat(64));
    foreign["files"].as_array_mut().unwrap().push(json!({"layer": other_layer, "path": "x"}));
    let foreign_list = tmp.path().join("foreign.json");
    std::fs::write(&foreign_list, foreign.to_string()).unwrap();
    let args = ["index", "build", &reference, "--push", "--prefetch-list"];
    let out = publisher.run(&[&args[..], &[foreign_list.to_str().unwrap()]].concat());
    assert!(out.status.success(), "{}", describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("prefetch list: 1 files"), "{stdout}");
    assert!(stdout.contains("already published"), "{stdout}");
    assert!(stderr.contains(&other_layer) && stderr.contains("leaving out"), "{stderr}");
    // Not a list at all: refused, naming the file.
    let bad = tmp.path().join("bad.json");
    std::fs::write(&bad, r#"{"version": 2, "files": []}"#).unwrap();
    let err = publisher.fails(&[&args[..], &[bad.to_str().unwrap()]].concat());
    assert!(err.contains("bad.json") && err.contains("version 2"), "{err}");

    // A fresh store: the lazy pull saves the list, and the mount prefetches
    // the listed file's chunks with nothing read.
    let fresh = publisher.with_root(&tmp.path().join("fresh"));
    let mnt = tmp.path().join("mnt-fresh");
    let mount = Mount::new(&fresh, &reference, &mnt, &["--prefetch", "recorded"]);
    let saved = fresh.root.join("indexes/prefetch").join(format!("{}.json", &manifest[7..]));
    let saved = std::fs::read(&saved).unwrap_or_else(|e| panic!("{}: {e}", saved.display()));
    assert_eq!(Digest::of(&saved).to_string(), list_blob["digest"].as_str().unwrap());
    std::thread::sleep(Duration::from_millis(1500));
    let mut stats = mount.stats();
    let deadline = Instant::now() + Duration::from_secs(10);
    while num(&stats, "fetchedBytes") == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        stats = mount.stats();
    }
    eprintln!("stats before any read: {stats:#}");
    assert!(num(&stats, "fetchedBytes") > 0, "{stats:#}");
    assert!(num(layer_stats(&stats, &layers[0].to_string()), "chunksCached") > 0, "{stats:#}");
    assert_eq!(
        num(layer_stats(&stats, &layers[1].to_string()), "chunksCached"),
        0,
        "not listed: {stats:#}"
    );

    // The listed file's chunks are all there: reading it fetches nothing.
    // It is read backwards, so no sequential read-ahead starts either.
    let fetches = num(&stats, "fetches");
    assert!(read_backwards(&mnt.join("data/listed.bin"), listed.len()) == listed);
    std::thread::sleep(Duration::from_millis(1500));
    let after = mount.stats();
    assert_eq!(num(&after, "fetches"), fetches, "reading the listed file fetched: {after:#}");
    mount.unmount();
}

#[test]
fn a_bad_prefetch_list_is_skipped_and_the_indexes_still_come() {
    if !ready() {
        return;
    }
    let registry = Registry::plain();
    let addr = registry.addr();
    let tmp = tempfile::tempdir().unwrap();
    let spec = image(host_arch(), 8);
    let layers = layer_digests(&spec);
    let layout = tmp.path().join("layout");
    let manifest = write_image_layout(&layout, "v1", &spec);
    skopeo_push(&layout, "v1", addr, "app:v1", &[]);
    let reference = format!("{addr}/app:v1");
    let client = Client::new(&tmp.path().join("client"));
    client.pull(&reference, &[]);
    let list = tmp.path().join("list.json");
    let files = json!([{"layer": layers[1].to_string(), "path": "etc/hostname"}]);
    std::fs::write(&list, json!({"version": 1, "files": files}).to_string()).unwrap();
    let report = index_build(&client, &reference, &["--push", "--prefetch-list", list_path(&list)]);
    assert_eq!(report["prefetchFiles"], 1, "{report}");
    let artifact = report["artifact"].as_str().unwrap();

    let repository = repository(addr, "app", tmp.path());
    let fetched = tmp.path().join("indexes");
    let saved_list = published_list_path(&fetched, &digest(&manifest));
    let saved = fetch_index_artifact(&repository, &digest(&manifest), &layers, &fetched).unwrap();
    assert_eq!(saved, layers);
    let got: Value = serde_json::from_slice(&std::fs::read(&saved_list).unwrap()).unwrap();
    assert_eq!(got["files"], files);

    // Newer artifacts whose list blob is not a list (the empty config `{}`),
    // then whose list descriptor misstates the size: the indexes come, the
    // list is skipped and the one saved before is removed.
    let genuine: Value =
        serde_json::from_slice(&repository.manifest(artifact).unwrap().bytes).unwrap();
    let last = layers.len();
    let mut not_a_list = genuine.clone();
    not_a_list["layers"][last]["digest"] = genuine["config"]["digest"].clone();
    not_a_list["layers"][last]["size"] = genuine["config"]["size"].clone();
    not_a_list["annotations"]["org.opencontainers.image.created"] = json!("2999-01-01T00:00:00Z");
    let mut short = genuine.clone();
    let size = genuine["layers"][last]["size"].as_u64().unwrap();
    short["layers"][last]["size"] = json!(size - 1);
    short["annotations"]["org.opencontainers.image.created"] = json!("2999-01-02T00:00:00Z");
    for bad in [not_a_list, short] {
        std::fs::write(&saved_list, b"stale").unwrap();
        publish_newer(&repository, &manifest, &bad);
        let saved =
            fetch_index_artifact(&repository, &digest(&manifest), &layers, &fetched).unwrap();
        assert_eq!(saved, layers);
        assert!(!saved_list.exists(), "a stale list was kept for {bad}");
    }

    // Built again with the same list, a new artifact is pushed (the newest
    // one's list is bad), and its list is saved again.
    let again = index_build(&client, &reference, &["--push", "--prefetch-list", list_path(&list)]);
    assert_eq!(again["alreadyPublished"], false, "{again}");
    fetch_index_artifact(&repository, &digest(&manifest), &layers, &fetched).unwrap();
    assert!(saved_list.exists());
}

fn list_path(path: &Path) -> &str {
    path.to_str().unwrap()
}
