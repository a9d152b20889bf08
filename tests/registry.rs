//! Pull and push against a real registry (Debian's `docker-registry`, the
//! CNCF distribution v2.8), with skopeo and umoci as the independent client:
//!
//! * images skopeo pushed (OCI, Docker schema 2, a multi-platform index)
//!   pull with rmount to the digest skopeo reports and mount to the tree
//!   umoci unpacks from skopeo's copy;
//! * what rmount pushes (a loaded image, a committed one, chunked, and a
//!   second repository through a cross-repository mount) reads back with
//!   skopeo to the same tree and config;
//! * htpasswd auth: helpful errors before `rmount login`, login from stdin,
//!   logout, config.json `auths`, `REGISTRY_AUTH_FILE` and credential helpers;
//! * token auth: short-lived tokens are refreshed in the middle of a pull;
//! * faults from a proxy: a reset resumes with a `Range` request, 500/429
//!   and a short body are retried, a corrupted blob fails on its digest and
//!   leaves nothing in the store.
//!
//! rmount always runs with HOME and DOCKER_CONFIG in temp dirs.

mod common;

use common::registry::*;
use common::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const USER: &str = "rmtest";
const PASS: &str = "pa55:word-with-colon";
const TOOLS: &[&str] = &["docker-registry", "skopeo", "umoci", "openssl", "htpasswd"];

fn ready() -> bool {
    require_root_fuse(TOOLS)
}

fn d(path: &str, mode: u32) -> (Item, Meta) {
    (Item::Dir { path: path.into(), mode }, Meta::default())
}

fn f(path: &str, mode: u32, data: &[u8]) -> (Item, Meta) {
    (Item::File { path: path.into(), mode, data: data.to_vec() }, Meta::default())
}

fn owned(item: (Item, Meta), uid: u64, gid: u64, mtime: u64) -> (Item, Meta) {
    (item.0, Meta { uid, gid, mtime, ..Meta::default() })
}

/// Two gzip layers with the shapes a registry round trip must keep: modes,
/// owners, a symlink, a hardlink, an empty file, a whiteout, an opaque
/// directory and a changed file. No device nodes, no absolute symlinks.
fn rich_image(seed: u64) -> ImageSpec<'static> {
    let l0 = vec![
        d("etc", 0o755),
        f("etc/os-release", 0o644, b"NAME=fixture\n"),
        f("etc/remove-me", 0o600, b"bye\n"),
        d("usr", 0o755),
        d("usr/bin", 0o755),
        f("usr/bin/tool", 0o755, &random_bytes(200_000, seed)),
        (Item::Symlink { path: "usr/bin/alias".into(), target: "tool".into() }, Meta::default()),
        (
            Item::Hardlink { path: "usr/bin/tool-link".into(), target: "usr/bin/tool".into() },
            Meta::default(),
        ),
        d("replaced", 0o755),
        d("replaced/sub", 0o700),
        f("replaced/sub/old", 0o644, b"old\n"),
        owned(d("home", 0o755), 0, 0, 1_650_000_000),
        owned(d("home/user", 0o700), 1000, 1000, 1_650_000_000),
        owned(
            f("home/user/.profile", 0o640, &pseudo_random(5000, seed)),
            1000,
            1000,
            1_650_000_001,
        ),
        f("empty", 0o644, b""),
    ];
    let l1 = vec![
        owned(d("etc", 0o755), 0, 0, 1_700_000_000),
        f("etc/os-release", 0o644, b"NAME=fixture\nVERSION=2\n"),
        (Item::Whiteout { path: "etc/remove-me".into() }, Meta::default()),
        d("replaced", 0o755),
        (Item::Opaque { path: "replaced".into() }, Meta::default()),
        f("replaced/new", 0o644, b"new\n"),
        f("top.txt", 0o644, format!("seed {seed}\n").as_bytes()),
    ];
    ImageSpec {
        os: "linux",
        arch: "amd64",
        cmd: &["/bin/sh", "-c", "echo fixture"],
        layers: vec![make_layer(&l0, Compress::Gzip), make_layer(&l1, Compress::Gzip)],
    }
}

/// One image per platform, with different contents.
fn platform_image(arch: &'static str, seed: u64) -> ImageSpec<'static> {
    let layer = vec![
        d("etc", 0o755),
        f("etc/platform", 0o644, format!("linux/{arch}\n").as_bytes()),
        d("bin", 0o755),
        f("bin/app", 0o755, &random_bytes(50_000 + seed as usize * 1000, seed)),
    ];
    let common = vec![d("share", 0o755), f("share/readme", 0o644, b"same on every platform\n")];
    ImageSpec {
        os: "linux",
        arch,
        cmd: &["/bin/app"],
        layers: vec![make_layer(&common, Compress::Gzip), make_layer(&layer, Compress::Gzip)],
    }
}

/// `n` small gzip layers.
fn layered_image(n: usize) -> ImageSpec<'static> {
    let layers = (0..n)
        .map(|i| {
            let items = vec![
                d("data", 0o755),
                f(&format!("data/layer{i}"), 0o644, &random_bytes(30_000, i as u64)),
            ];
            make_layer(&items, Compress::Gzip)
        })
        .collect();
    ImageSpec { os: "linux", arch: "amd64", cmd: &["/bin/sh"], layers }
}

/// A ~4 MiB incompressible gzip layer under a small one.
fn big_layer_image() -> ImageSpec<'static> {
    let big = vec![d("data", 0o755), f("data/big.bin", 0o644, &random_bytes(4 << 20, 42))];
    let small = vec![d("etc", 0o755), f("etc/hostname", 0o644, b"faults\n")];
    ImageSpec {
        os: "linux",
        arch: "amd64",
        cmd: &["/bin/sh"],
        layers: vec![make_layer(&big, Compress::Gzip), make_layer(&small, Compress::Gzip)],
    }
}

/// The layer digests of an image spec, bottom first.
fn layer_digests(image: &ImageSpec) -> Vec<String> {
    image.layers.iter().map(|(blob, _, _)| format!("sha256:{}", sha256_hex(blob))).collect()
}

/// Writes `image` as an OCI layout `dir:tag` and pushes it with skopeo.
fn skopeo_publish(dir: &Path, image: &ImageSpec, addr: &str, repo_tag: &str, extra: &[&str]) {
    write_image_layout(dir, "v1", image);
    skopeo_push(dir, "v1", addr, repo_tag, extra);
}

fn unpacked(rootfs: &Path) -> BTreeMap<String, String> {
    describe_tree(rootfs)
}

fn pull_json(client: &Client, reference: &str, extra: &[&str]) -> Value {
    let mut args = vec!["pull", "--json"];
    args.extend_from_slice(extra);
    args.push(reference);
    let out = client.ok(&args);
    serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("rmount pull --json printed no JSON ({e}):\n{out}"))
}

/// Every blob of the stored image is at ROOT/blobs/sha256/<hex>, intact.
fn assert_blobs_stored(client: &Client, digests: &[String]) {
    for digest in digests {
        let path = client.blob_path(digest);
        let data = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("blob {digest} is not at {}: {e}", path.display()));
        assert_eq!(
            format!("sha256:{}", sha256_hex(&data)),
            *digest,
            "{} is corrupt",
            path.display()
        );
    }
}

fn assert_unauthorized(message: &str, what: &str) {
    assert!(
        message.contains("unauthorized") && message.contains("rmount login"),
        "{what}: the error should say `unauthorized` and suggest `rmount login`:\n{message}"
    );
}

// ------------------------------------------------------------------ harness

/// The harness alone: the registry in all three modes with skopeo as the
/// client, and the proxy's faults seen by a raw HTTP client.
#[test]
fn harness_registry_modes_and_skopeo_round_trips() {
    if !ready() {
        return;
    }
    let tmp = tempdir();
    let image = rich_image(1);

    // Plain: push, inspect, pull + unpack; through the proxy too.
    let plain = Registry::plain();
    write_image_layout(&tmp.path().join("layout"), "v1", &image);
    skopeo_push(&tmp.path().join("layout"), "v1", plain.addr(), "h/plain:v1", &[]);
    let inspect = skopeo_inspect(plain.addr(), "h/plain:v1", false);
    assert_eq!(inspect["Digest"].as_str().unwrap(), skopeo_digest(plain.addr(), "h/plain:v1"));
    let rootfs = skopeo_pull_unpack(plain.addr(), "h/plain:v1", &tmp.path().join("plain"));
    assert_eq!(std::fs::read(rootfs.join("replaced/new")).unwrap(), b"new\n");
    assert!(!rootfs.join("etc/remove-me").exists() && !rootfs.join("replaced/sub").exists());
    let proxy = FaultProxy::start(plain.addr());
    skopeo_push(&tmp.path().join("layout"), "v1", proxy.addr(), "h/proxied:v1", &[]);
    let via_proxy = skopeo_pull_unpack(proxy.addr(), "h/proxied:v1", &tmp.path().join("proxied"));
    assert_same_tree(&unpacked(&rootfs), &unpacked(&via_proxy));
    let log = proxy.requests();
    assert!(log.iter().any(|r| r.method == "PUT" && r.path.contains("/manifests/")), "{log:?}");
    assert!(log.iter().all(|r| r.status != 0), "{}", proxy.describe_requests());

    // htpasswd: refused without credentials, fine with them.
    let basic = Registry::htpasswd(USER, PASS);
    let (status, head, _) = http(basic.addr(), "GET", "/v2/", &[]).unwrap();
    assert_eq!(status, 401);
    assert!(head.get("www-authenticate").unwrap().starts_with("Basic"), "{:?}", head.headers);
    let creds = format!("{USER}:{PASS}");
    let dest = format!("docker://{}/h/basic:v1", basic.addr());
    let src = format!("oci:{}:v1", tmp.path().join("layout").display());
    let out = std::process::Command::new("skopeo")
        .args(["--insecure-policy", "copy", "--dest-tls-verify=false", &src, &dest])
        .env("HOME", tmp.path())
        .output()
        .unwrap();
    assert!(!out.status.success(), "push without credentials: {}", describe(&out));
    skopeo_push(
        &tmp.path().join("layout"),
        "v1",
        basic.addr(),
        "h/basic:v1",
        &["--dest-creds", &creds],
    );
    let rootfs = skopeo_pull_unpack_with(
        basic.addr(),
        "h/basic:v1",
        &tmp.path().join("basic"),
        &[],
        &["--src-creds", &creds],
    );
    assert!(rootfs.join("top.txt").exists());

    // Token: the registry trusts the token server's certificate.
    let tokens = TokenServer::with_credentials(300, USER, PASS);
    let registry = Registry::token(&tokens);
    let (status, head, _) = http(registry.addr(), "GET", "/v2/", &[]).unwrap();
    assert_eq!(status, 401);
    let challenge = head.get("www-authenticate").unwrap();
    assert!(challenge.contains(&tokens.realm()), "{challenge}");
    skopeo_push(
        &tmp.path().join("layout"),
        "v1",
        registry.addr(),
        "h/token:v1",
        &["--dest-creds", &creds],
    );
    assert!(tokens.issued() >= 1);
    let rootfs = skopeo_pull_unpack_with(
        registry.addr(),
        "h/token:v1",
        &tmp.path().join("token"),
        &[],
        &["--src-creds", &creds],
    );
    assert!(rootfs.join("top.txt").exists(), "{}", registry.log());
    // A token with the wrong credentials is refused by the token server.
    let (status, _, _) = http(
        tokens.addr(),
        "GET",
        "/token?service=x&scope=repository:h/token:pull",
        &[("Authorization", &format!("Basic {}", basic_auth(USER, "wrong")))],
    )
    .unwrap();
    assert_eq!(status, 401);

    // Multi-platform index: skopeo pushes it whole (--all) and picks per arch.
    let layout = tmp.path().join("multi");
    let (index_digest, manifests) = write_index_layout(
        &layout,
        "v1",
        &[platform_image("amd64", 1), platform_image("arm64", 2)],
    );
    skopeo_push(&layout, "v1", plain.addr(), "h/multi:v1", &["--all"]);
    assert_eq!(skopeo_digest(plain.addr(), "h/multi:v1"), index_digest);
    let raw = skopeo_inspect(plain.addr(), "h/multi:v1", true);
    assert_eq!(raw["manifests"].as_array().unwrap().len(), 2, "{raw}");
    assert_eq!(raw["manifests"][1]["digest"], manifests[1].as_str());
    let arm = skopeo_pull_unpack_with(
        plain.addr(),
        "h/multi:v1",
        &tmp.path().join("arm"),
        &["--override-arch", "arm64"],
        &[],
    );
    assert_eq!(std::fs::read(arm.join("etc/platform")).unwrap(), b"linux/arm64\n");
    // skopeo inspect reports the index's digest (as docker pull does).
    assert_eq!(skopeo_inspect(plain.addr(), "h/multi:v1", false)["Digest"], index_digest.as_str());

    // Token expiry: usable at once, refused after its lifetime (see the
    // leeway note in the token server).
    let short = TokenServer::start(3);
    let registry = Registry::token(&short);
    let (status, _, body) =
        http(short.addr(), "GET", "/token?service=x&scope=repository%3Ah%2Fx%3Apull", &[]).unwrap();
    assert_eq!(status, 200);
    let reply: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(reply["expires_in"], 3);
    let bearer = format!("Bearer {}", reply["token"].as_str().unwrap());
    let (status, _, _) =
        http(registry.addr(), "GET", "/v2/", &[("Authorization", &bearer)]).unwrap();
    assert_eq!(status, 200, "{}", registry.log());
    std::thread::sleep(Duration::from_millis(3500));
    let (status, _, _) =
        http(registry.addr(), "GET", "/v2/", &[("Authorization", &bearer)]).unwrap();
    assert_eq!(status, 401, "a token used past its lifetime");
}

#[test]
fn harness_fault_proxy_injects_each_fault() {
    if !ready() {
        return;
    }
    let tmp = tempdir();
    let registry = Registry::plain();
    let image = big_layer_image();
    skopeo_publish(&tmp.path().join("layout"), &image, registry.addr(), "h/faults:v1", &[]);
    let big = &layer_digests(&image)[0];
    let want = &image.layers[0].0;
    let proxy = FaultProxy::start(registry.addr());
    let path = format!("/v2/h/faults/blobs/{big}");
    let get = |headers: &[(&str, &str)]| http(proxy.addr(), "GET", &path, headers);

    let (status, _, body) = get(&[]).unwrap();
    assert_eq!((status, body.len()), (200, want.len()));
    assert!(body == *want);

    proxy.fault(&format!("GET {path}"), Fault::Status { code: 429, retry_after: Some(1) });
    let (status, head, _) = get(&[]).unwrap();
    assert_eq!((status, head.get("retry-after")), (429, Some("1")));

    proxy.fault(&path, Fault::Truncate { after_body_bytes: 1000 });
    let (status, _, body) = get(&[]).unwrap();
    assert_eq!((status, body.len()), (200, 1000));
    assert!(body[..] == want[..1000]);

    proxy.fault(&path, Fault::Reset { after_body_bytes: 100_000 });
    let err = get(&[]).expect_err("a reset connection");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");

    let (status, _, body) = get(&[("Range", "bytes=1000-")]).unwrap();
    assert_eq!(status, 206);
    assert!(body[..] == want[1000..]);

    proxy.fault_when(&[&path, "x-test: delay"], Fault::Delay { ms: 600 });
    let start = Instant::now();
    get(&[]).unwrap();
    assert!(start.elapsed() < Duration::from_millis(500), "delayed without the header");
    get(&[("X-Test", "delay")]).unwrap();
    assert!(start.elapsed() >= Duration::from_millis(600));

    proxy.fault(&path, Fault::Corrupt);
    let (status, _, body) = get(&[]).unwrap();
    assert_eq!((status, body.len()), (200, want.len()));
    let diff: Vec<usize> = (0..body.len()).filter(|&i| body[i] != want[i]).collect();
    assert_eq!(diff, vec![want.len() / 2]);
    // The same blob byte in a range that holds it, none in one that does not.
    let (status, _, body) = get(&[("Range", "bytes=1000-")]).unwrap();
    assert_eq!(status, 206);
    let diff: Vec<usize> = (0..body.len()).filter(|&i| body[i] != want[1000 + i]).collect();
    assert_eq!(diff, vec![want.len() / 2 - 1000]);
    let (_, _, body) = get(&[("Range", "bytes=0-999")]).unwrap();
    assert!(body[..] == want[..1000]);
    assert!(proxy.pending_faults().is_empty());
    let log = proxy.requests();
    assert_eq!(log.len(), 10, "{}", proxy.describe_requests());
    assert_eq!(log[4].range_start(), Some(1000));
    assert_eq!(log[1].status, 429);
}

// ------------------------------------------------- a. pulling what skopeo pushed

#[test]
fn pull_oci_image_pushed_by_skopeo_mounts_like_umoci_unpacks_it() {
    if !ready() {
        return;
    }
    let tmp = tempdir();
    let registry = Registry::plain();
    let image = rich_image(2);
    skopeo_publish(&tmp.path().join("layout"), &image, registry.addr(), "team/oci:v1", &[]);
    let client = Client::new(&tmp.path().join("client"));
    let reference = format!("{}/team/oci:v1", registry.addr());

    let digest = client.pull(&reference, &[]);
    let inspect = skopeo_inspect(registry.addr(), "team/oci:v1", false);
    assert_eq!(digest, inspect["Digest"].as_str().unwrap());
    assert_eq!(digest, skopeo_digest(registry.addr(), "team/oci:v1"));
    assert_blobs_stored(&client, &layer_digests(&image));

    let expected =
        unpacked(&skopeo_pull_unpack(registry.addr(), "team/oci:v1", &tmp.path().join("s")));
    assert_same_tree(&expected, &mounted_tree(&client.root, &reference, &tmp.path().join("mnt")));
    assert!(client.ok(&["images"]).contains(&format!("{}/team/oci", registry.addr())));

    // Again, as JSON: already there, same digest.
    let json = pull_json(&client, &reference, &["-q"]);
    assert_eq!(json["digest"], digest.as_str(), "{json}");
    assert_eq!(json["reference"], reference.as_str(), "{json}");
    assert!(json["id"].as_str().is_some_and(|id| id.starts_with("sha256:")), "{json}");
}

#[test]
fn pull_docker_schema2_image_pushed_by_skopeo() {
    if !ready() {
        return;
    }
    let tmp = tempdir();
    let registry = Registry::plain();
    let image = rich_image(3);
    skopeo_publish(
        &tmp.path().join("layout"),
        &image,
        registry.addr(),
        "team/docker:v1",
        &["--format", "v2s2"],
    );
    let raw = skopeo_inspect(registry.addr(), "team/docker:v1", true);
    assert_eq!(raw["mediaType"], "application/vnd.docker.distribution.manifest.v2+json");
    let client = Client::new(&tmp.path().join("client"));
    let reference = format!("{}/team/docker:v1", registry.addr());

    let digest = client.pull(&reference, &[]);
    assert_eq!(
        digest,
        skopeo_inspect(registry.addr(), "team/docker:v1", false)["Digest"].as_str().unwrap()
    );
    let expected =
        unpacked(&skopeo_pull_unpack(registry.addr(), "team/docker:v1", &tmp.path().join("s")));
    assert_same_tree(&expected, &mounted_tree(&client.root, &reference, &tmp.path().join("mnt")));
}

#[test]
fn pull_multi_platform_index_picks_the_host_platform_or_the_asked_one() {
    if !ready() {
        return;
    }
    let tmp = tempdir();
    let registry = Registry::plain();
    let (amd, arm) = (platform_image("amd64", 1), platform_image("arm64", 2));
    let (index_digest, _) = write_index_layout(&tmp.path().join("layout"), "v1", &[amd, arm]);
    skopeo_push(&tmp.path().join("layout"), "v1", registry.addr(), "team/multi:v1", &["--all"]);
    let reference = format!("{}/team/multi:v1", registry.addr());
    assert_eq!(skopeo_digest(registry.addr(), "team/multi:v1"), index_digest);

    // The default is the host's platform; the digest is the index's, as skopeo
    // inspect (and docker pull) report it.
    let host = Client::new(&tmp.path().join("host"));
    let pulled = pull_json(&host, &reference, &[]);
    assert_eq!(pulled["digest"], index_digest.as_str(), "{pulled}");
    let host_arch = host_arch();
    let mounted = Mounted::rmount(&host.root, &reference, &tmp.path().join("mnt-host"));
    assert_eq!(
        std::fs::read_to_string(mounted.path.join("etc/platform")).unwrap(),
        format!("linux/{host_arch}\n")
    );
    let expected =
        unpacked(&skopeo_pull_unpack(registry.addr(), "team/multi:v1", &tmp.path().join("s-host")));
    assert_same_tree(&expected, &describe_tree(&mounted.path));
    drop(mounted);

    // --platform linux/arm64 (or amd64 on an arm64 host) gets the other one.
    let other = if host_arch == "arm64" { "amd64" } else { "arm64" };
    let cross = Client::new(&tmp.path().join("cross"));
    let digest = cross.pull(&reference, &["--platform", &format!("linux/{other}")]);
    assert_eq!(digest, index_digest);
    let mounted = Mounted::rmount(&cross.root, &reference, &tmp.path().join("mnt-cross"));
    assert_eq!(
        std::fs::read_to_string(mounted.path.join("etc/platform")).unwrap(),
        format!("linux/{other}\n")
    );
    let expected = unpacked(&skopeo_pull_unpack_with(
        registry.addr(),
        "team/multi:v1",
        &tmp.path().join("s-cross"),
        &["--override-arch", other],
        &[],
    ));
    assert_same_tree(&expected, &describe_tree(&mounted.path));
    drop(mounted);
    let cross_json = pull_json(&cross, &reference, &["--platform", &format!("linux/{other}")]);
    assert_ne!(pulled["id"], cross_json["id"], "both platforms pulled as the same image");

    // --all-platforms stores every platform's layers.
    let all = Client::new(&tmp.path().join("all"));
    assert_eq!(all.pull(&reference, &["--all-platforms"]), index_digest);
    let everything: Vec<String> = [platform_image("amd64", 1), platform_image("arm64", 2)]
        .iter()
        .flat_map(layer_digests)
        .collect();
    assert_blobs_stored(&all, &everything);
}

// ------------------------------------------------------- b. pushing

/// Loads `image` (tagged `reference` in its layout) into the client's store.
fn load(client: &Client, dir: &Path, image: &ImageSpec, reference: &str) {
    write_image_layout(dir, reference, image);
    let out = client.ok(&["load", "-i", dir.to_str().unwrap()]);
    assert!(out.contains(reference), "{out}");
}

fn pushes_of_blobs(log: &[Request]) -> Vec<String> {
    log.iter()
        .filter(|r| {
            (r.method == "PATCH" || r.method == "PUT") && r.path.contains("/blobs/uploads/")
        })
        .map(|r| format!("{} {}", r.method, r.path))
        .collect()
}

#[test]
fn push_loaded_image_reads_back_with_skopeo_and_mounts_across_repositories() {
    if !ready() {
        return;
    }
    let tmp = tempdir();
    let registry = Registry::plain();
    let proxy = FaultProxy::start(registry.addr());
    let client = Client::new(&tmp.path().join("client"));
    let image = rich_image(4);
    let local = "localhost/rich:v1";
    load(&client, &tmp.path().join("layout"), &image, local);
    let stored = mounted_tree(&client.root, local, &tmp.path().join("mnt"));

    // Explicit DEST to a first repository.
    let dest = format!("{}/pushed/rich:v1", proxy.addr());
    let digest = client.push(local, Some(&dest), &[]);
    assert_eq!(digest, skopeo_digest(registry.addr(), "pushed/rich:v1"));
    let back = skopeo_pull_unpack(registry.addr(), "pushed/rich:v1", &tmp.path().join("back"));
    assert_same_tree(&stored, &unpacked(&back));
    let config = skopeo_inspect_with(registry.addr(), "pushed/rich:v1", false, &["--config"]);
    assert_eq!(config["config"]["Cmd"], json!(["/bin/sh", "-c", "echo fixture"]));

    // Same registry, another repository: every blob is mounted from a
    // repository the store names on that registry (as docker push does for
    // a tagged image), none is sent again.
    client.ok(&["tag", local, &dest]);
    proxy.clear_requests();
    let second = format!("{}/other/copy:v1", proxy.addr());
    assert_eq!(client.push(local, Some(&second), &[]), digest);
    let log = proxy.requests();
    let mounts: Vec<&Request> = log
        .iter()
        .filter(|r| r.method == "POST" && r.path.contains("mount=") && r.path.contains("from="))
        .collect();
    assert!(!mounts.is_empty(), "no cross-repository mount:\n{}", proxy.describe_requests());
    assert!(mounts.iter().all(|r| r.status == 201), "{}", proxy.describe_requests());
    let sent = pushes_of_blobs(&log);
    assert!(sent.is_empty(), "blobs uploaded again: {sent:?}\n{}", proxy.describe_requests());
    assert_eq!(skopeo_digest(registry.addr(), "other/copy:v1"), digest);
    let back = skopeo_pull_unpack(registry.addr(), "other/copy:v1", &tmp.path().join("back2"));
    assert_same_tree(&stored, &unpacked(&back));

    // A fresh registry with 64 KiB chunks: several PATCHes, same image.
    let fresh = Registry::plain();
    let fresh_proxy = FaultProxy::start(fresh.addr());
    let chunked = format!("{}/chunked/rich:v1", fresh_proxy.addr());
    assert_eq!(client.push(local, Some(&chunked), &["--chunk-size", "65536"]), digest);
    let log = fresh_proxy.requests();
    let patches = log.iter().filter(|r| r.method == "PATCH").count();
    // The bottom layer (200 kB of random bytes, gzipped) alone needs 4
    // chunks of 64 KiB.
    assert!(patches >= 4, "{patches} PATCH requests:\n{}", fresh_proxy.describe_requests());
    let back = skopeo_pull_unpack(fresh.addr(), "chunked/rich:v1", &tmp.path().join("back3"));
    assert_same_tree(&stored, &unpacked(&back));
}

#[test]
fn push_committed_image_reads_back_with_skopeo() {
    if !ready() {
        return;
    }
    let tmp = tempdir();
    let registry = Registry::plain();
    let client = Client::new(&tmp.path().join("client"));
    load(&client, &tmp.path().join("layout"), &rich_image(5), "localhost/base:v1");

    // Change the image in a writable mount: only paths the fixture has as
    // real directories (no symlink is followed out of the mount).
    let (upper, work) = (tmp.path().join("upper"), tmp.path().join("work"));
    let mnt = Mounted::rmount_rw(
        &client.root,
        "localhost/base:v1",
        &tmp.path().join("rw"),
        &upper,
        &work,
    );
    std::fs::write(mnt.path.join("added.txt"), b"written in the mount\n").unwrap();
    std::fs::create_dir(mnt.path.join("newdir")).unwrap();
    std::fs::write(mnt.path.join("newdir/big"), random_bytes(300_000, 9)).unwrap();
    std::fs::remove_file(mnt.path.join("etc/os-release")).unwrap();
    let committed = "localhost/committed:v1";
    client.ok(&[
        "commit",
        mnt.path.to_str().unwrap(),
        committed,
        "--change",
        r#"CMD ["/bin/true"]"#,
    ]);
    drop(mnt);
    let stored = mounted_tree(&client.root, committed, &tmp.path().join("ro"));
    assert!(stored.contains_key("newdir/big") && !stored.contains_key("etc/os-release"));

    let digest =
        client.push(committed, Some(&format!("{}/team/committed:v2", registry.addr())), &[]);
    assert_eq!(digest, skopeo_digest(registry.addr(), "team/committed:v2"));
    let back = skopeo_pull_unpack(registry.addr(), "team/committed:v2", &tmp.path().join("back"));
    assert_same_tree(&stored, &unpacked(&back));
    let config = skopeo_inspect_with(registry.addr(), "team/committed:v2", false, &["--config"]);
    assert_eq!(config["config"]["Cmd"], json!(["/bin/true"]), "{config}");
    let inspect = skopeo_inspect(registry.addr(), "team/committed:v2", false);
    assert_eq!(inspect["Layers"].as_array().unwrap().len(), 3, "{inspect}");

    // Pushed under its own name (DEST omitted) when that names the registry.
    let own = format!("{}/team/own:v1", registry.addr());
    client.ok(&["tag", committed, &own]);
    assert_eq!(client.push(&own, None, &[]), digest);
    assert_eq!(skopeo_digest(registry.addr(), "team/own:v1"), digest);
}

// ------------------------------------------------------- c. htpasswd auth

/// A `docker-credential-rmtest` that answers `get` with USER/PASS and logs
/// the server it was asked about.
fn credential_helper(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let log = dir.join("helper.log");
    let script = format!(
        "#!/bin/sh\nread -r server\necho \"$1 $server\" >> '{}'\n\
         [ \"$1\" = get ] || exit 1\n\
         printf '{{\"ServerURL\":\"%s\",\"Username\":\"{USER}\",\"Secret\":\"{PASS}\"}}\\n' \"$server\"\n",
        log.display()
    );
    let path = bin.join("docker-credential-rmtest");
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    bin
}

#[test]
fn htpasswd_registry_needs_login_and_reads_every_credential_source() {
    if !ready() {
        return;
    }
    let tmp = tempdir();
    let registry = Registry::htpasswd(USER, PASS);
    let addr = registry.addr();
    let creds = format!("{USER}:{PASS}");
    let image = rich_image(6);
    skopeo_publish(
        &tmp.path().join("layout"),
        &image,
        addr,
        "auth/app:v1",
        &["--dest-creds", &creds],
    );
    let remote_digest = skopeo_digest_with(addr, "auth/app:v1", &["--creds", &creds]);
    let reference = format!("{addr}/auth/app:v1");
    let client = Client::new(&tmp.path().join("client"));
    load(&client, &tmp.path().join("local"), &layered_image(2), "localhost/mine:v1");
    let dest = format!("{addr}/auth/mine:v1");

    // No credentials: a clear error.
    assert_unauthorized(&client.fails(&["pull", &reference]), "pull before login");
    assert_unauthorized(&client.fails(&["push", "localhost/mine:v1", &dest]), "push before login");

    // A wrong password is refused and not saved.
    let out = client.run_input(&["login", "-u", USER, "--password-stdin", addr], b"wrong\n");
    assert!(!out.status.success(), "login with a wrong password: {}", describe(&out));
    let saved = std::fs::read_to_string(client.config_json()).unwrap_or_default();
    assert!(!saved.contains(&basic_auth(USER, "wrong")), "{saved}");

    // Login from stdin, then pull and push work.
    let out = client.run_input(
        &["login", "-u", USER, "--password-stdin", addr],
        format!("{PASS}\n").as_bytes(),
    );
    assert!(out.status.success(), "login: {}", describe(&out));
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(client.config_json()).unwrap()).unwrap();
    assert_eq!(config["auths"][addr]["auth"], basic_auth(USER, PASS), "{config}");
    assert_eq!(client.pull(&reference, &[]), remote_digest);
    let pushed = client.push("localhost/mine:v1", Some(&dest), &[]);
    assert_eq!(pushed, skopeo_digest_with(addr, "auth/mine:v1", &["--creds", &creds]));
    let expected = unpacked(&skopeo_pull_unpack_with(
        addr,
        "auth/app:v1",
        &tmp.path().join("s"),
        &[],
        &["--src-creds", &creds],
    ));
    assert_same_tree(&expected, &mounted_tree(&client.root, &reference, &tmp.path().join("mnt")));

    // Logout: the entry is gone and a fresh store cannot pull again.
    client.ok(&["logout", addr]);
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(client.config_json()).unwrap()).unwrap();
    assert!(config["auths"].get(addr).is_none(), "{config}");
    let fresh = client.with_root(&tmp.path().join("root-after-logout"));
    assert_unauthorized(&fresh.fails(&["pull", &reference]), "pull after logout");

    // config.json written by hand.
    let by_hand = json!({"auths": {addr: {"auth": basic_auth(USER, PASS)}}});
    std::fs::write(client.config_json(), by_hand.to_string()).unwrap();
    let fresh = client.with_root(&tmp.path().join("root-config-json"));
    assert_eq!(fresh.pull(&reference, &[]), remote_digest);

    // REGISTRY_AUTH_FILE wins over $DOCKER_CONFIG (which has a wrong password).
    let wrong = json!({"auths": {addr: {"auth": basic_auth(USER, "wrong")}}});
    std::fs::write(client.config_json(), wrong.to_string()).unwrap();
    let auth_file = tmp.path().join("auth.json");
    std::fs::write(&auth_file, by_hand.to_string()).unwrap();
    let mut with_file = client.with_root(&tmp.path().join("root-auth-file"));
    with_file.env("REGISTRY_AUTH_FILE", auth_file.to_str().unwrap());
    assert_eq!(with_file.pull(&reference, &[]), remote_digest);

    // ~/.docker/config.json when DOCKER_CONFIG is unset.
    std::fs::create_dir_all(client.home.join(".docker")).unwrap();
    std::fs::write(client.home.join(".docker/config.json"), by_hand.to_string()).unwrap();
    let mut in_home = client.with_root(&tmp.path().join("root-home"));
    in_home.unset("DOCKER_CONFIG");
    assert_eq!(in_home.pull(&reference, &[]), remote_digest);

    // A credential helper named in credHelpers, found on PATH.
    let bin = credential_helper(tmp.path());
    std::fs::write(client.config_json(), json!({"credHelpers": {addr: "rmtest"}}).to_string())
        .unwrap();
    let mut helped = client.with_root(&tmp.path().join("root-helper"));
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    helped.env("PATH", path);
    assert_eq!(helped.pull(&reference, &[]), remote_digest);
    let calls = std::fs::read_to_string(tmp.path().join("helper.log")).unwrap_or_default();
    assert!(
        calls.lines().any(|l| l.starts_with("get ") && l.contains(addr)),
        "helper calls: {calls:?}"
    );
}

// ------------------------------------------------------- d. token auth

#[test]
fn token_auth_refreshes_short_lived_tokens_during_a_slow_pull() {
    if !ready() {
        return;
    }
    let tmp = tempdir();
    let tokens = TokenServer::with_credentials(5, USER, PASS);
    let registry = Registry::token(&tokens);
    let creds = format!("{USER}:{PASS}");
    let image = layered_image(3);
    skopeo_publish(
        &tmp.path().join("layout"),
        &image,
        registry.addr(),
        "token/app:v1",
        &["--dest-creds", &creds],
    );
    let proxy = FaultProxy::start(registry.addr());
    let client = Client::new(&tmp.path().join("client"));
    let auths = json!({"auths": {proxy.addr(): {"auth": basic_auth(USER, PASS)}}});
    std::fs::write(client.config_json(), auths.to_string()).unwrap();

    // Only authorized requests are delayed (the first, anonymous one gets
    // its 401 at once). The manifest waits 2 s; each layer request waits
    // 6 s, longer than a token lives, so whatever token it carries (even one
    // refreshed just before it was sent) has expired when it reaches the
    // registry: all three layers get a 401 at about the same time, ~8 s into
    // the pull, and must be retried with a new token.
    let bearer = "authorization: bearer";
    proxy.fault_when(&["GET /v2/token/app/manifests/", bearer], Fault::Delay { ms: 2000 });
    for digest in layer_digests(&image) {
        proxy.fault_when(
            &[&format!("GET /v2/token/app/blobs/{digest}"), bearer],
            Fault::Delay { ms: 6000 },
        );
    }
    let before = tokens.issued();
    let start = Instant::now();
    let reference = format!("{}/token/app:v1", proxy.addr());
    let out = client.run(&["pull", &reference]);
    let elapsed = start.elapsed();
    assert!(
        out.status.success(),
        "pull with 5 s tokens failed after {elapsed:?} ({} tokens issued):\n{}\nproxy:\n{}",
        tokens.issued() - before,
        describe(&out),
        proxy.describe_requests()
    );
    let digest = digest_line(&String::from_utf8_lossy(&out.stdout));
    eprintln!(
        "{} tokens, {elapsed:?}; proxy log:\n{}",
        tokens.issued() - before,
        proxy.describe_requests()
    );
    assert!(elapsed > Duration::from_secs(7), "the pull took only {elapsed:?}");
    assert!(proxy.pending_faults().is_empty(), "{:?}", proxy.pending_faults());
    assert!(
        tokens.issued() - before > 1,
        "{} token(s) for a pull that outlived them:\n{}",
        tokens.issued() - before,
        proxy.describe_requests()
    );
    assert_eq!(digest, skopeo_digest_with(registry.addr(), "token/app:v1", &["--creds", &creds]));
    assert_blobs_stored(&client, &layer_digests(&image));
    let expected = unpacked(&skopeo_pull_unpack_with(
        registry.addr(),
        "token/app:v1",
        &tmp.path().join("s"),
        &[],
        &["--src-creds", &creds],
    ));
    assert_same_tree(&expected, &mounted_tree(&client.root, &reference, &tmp.path().join("mnt")));
}

// ------------------------------------------------------- e. faults

struct FaultSetup {
    tmp: tempfile::TempDir,
    _registry: Registry,
    proxy: FaultProxy,
    client: Client,
    image: ImageSpec<'static>,
    reference: String,
    /// `GET /v2/faults/app/blobs/<big layer digest>`.
    big_get: String,
}

fn fault_setup() -> FaultSetup {
    let tmp = tempdir();
    let registry = Registry::plain();
    let image = big_layer_image();
    skopeo_publish(&tmp.path().join("layout"), &image, registry.addr(), "faults/app:v1", &[]);
    let proxy = FaultProxy::start(registry.addr());
    let client = Client::new(&tmp.path().join("client"));
    let reference = format!("{}/faults/app:v1", proxy.addr());
    let big_get = format!("GET /v2/faults/app/blobs/{}", layer_digests(&image)[0]);
    FaultSetup { tmp, _registry: registry, proxy, client, image, reference, big_get }
}

impl FaultSetup {
    fn pull_ok(&self) {
        let out = self.client.run(&["pull", &self.reference]);
        assert!(
            out.status.success(),
            "pull failed:\n{}\nproxy:\n{}",
            describe(&out),
            self.proxy.describe_requests()
        );
        assert!(
            self.proxy.pending_faults().is_empty(),
            "faults never triggered: {:?}",
            self.proxy.pending_faults()
        );
        assert_blobs_stored(&self.client, &layer_digests(&self.image));
        eprintln!("proxy log:\n{}", self.proxy.describe_requests());
    }

    /// The big layer's GETs, in order.
    fn big_gets(&self) -> Vec<Request> {
        let path = self.big_get.trim_start_matches("GET ");
        self.proxy.requests().into_iter().filter(|r| r.method == "GET" && r.path == path).collect()
    }
}

#[test]
fn pull_resumes_a_reset_blob_download_with_a_range_request() {
    if !ready() {
        return;
    }
    let s = fault_setup();
    s.proxy.fault(&s.big_get, Fault::Reset { after_body_bytes: 1 << 20 });
    s.pull_ok();
    let gets = s.big_gets();
    let reset = gets.iter().position(|r| matches!(r.fault, Some(Fault::Reset { .. }))).unwrap();
    let resumed = gets[reset + 1..].iter().find(|r| r.range_start().is_some_and(|n| n > 0));
    assert!(
        resumed.is_some(),
        "no GET resumed with Range: bytes=N- (N > 0):\n{}",
        s.proxy.describe_requests()
    );
    assert_eq!(resumed.unwrap().status, 206);
    // The mount reads the big file intact.
    let mounted = Mounted::rmount(&s.client.root, &s.reference, &s.tmp.path().join("mnt"));
    assert_eq!(
        hash_in_root(&mounted.path, Path::new("data/big.bin")),
        sha256_hex(&random_bytes(4 << 20, 42))
    );
}

#[test]
fn pull_retries_server_errors_and_rate_limits() {
    if !ready() {
        return;
    }
    let s = fault_setup();
    s.proxy.fault(&s.big_get, Fault::Status { code: 500, retry_after: None });
    s.proxy.fault(&s.big_get, Fault::Status { code: 429, retry_after: Some(1) });
    s.pull_ok();
    let gets = s.big_gets();
    let statuses: Vec<u16> = gets.iter().map(|r| r.status).collect();
    assert_eq!(&statuses[..2], &[500, 429], "{}", s.proxy.describe_requests());
    assert!(statuses[2..].iter().any(|&c| c == 200 || c == 206), "{statuses:?}");
    // Retry-After: 1 is honoured.
    let waited = gets[2].at - gets[1].at;
    assert!(
        waited >= Duration::from_millis(950),
        "retried {waited:?} after a 429 with Retry-After: 1"
    );
}

#[test]
fn pull_recovers_from_a_truncated_blob_body() {
    if !ready() {
        return;
    }
    let s = fault_setup();
    s.proxy.fault(&s.big_get, Fault::Truncate { after_body_bytes: 2 << 20 });
    s.pull_ok();
    assert!(s.big_gets().len() >= 2, "{}", s.proxy.describe_requests());
}

/// Pulls through a persistent corruption fault: the pull fails, says
/// "digest", stores no blob and tags nothing.
fn assert_corrupt_pull_fails(fault: Fault) {
    let s = fault_setup();
    s.proxy.fault(&s.big_get, fault);
    let message = s.client.fails(&["pull", &s.reference]);
    eprintln!("pull failed with: {message}");
    assert!(message.contains("digest"), "the error should name the digest mismatch:\n{message}");
    let big = &layer_digests(&s.image)[0];
    assert!(!s.client.blob_path(big).exists(), "the corrupt blob was stored");
    let images = s.client.run(&["images"]);
    let listed = String::from_utf8_lossy(&images.stdout).contains("faults/app");
    assert!(!listed, "tagged after a failed pull: {}", describe(&images));
}

/// Byte 4 is in the gzip header's MTIME: the layer still decompresses to
/// the same tar, only its digest is wrong.
#[test]
fn pull_of_a_blob_with_a_wrong_digest_fails_and_stores_nothing() {
    if !ready() {
        return;
    }
    assert_corrupt_pull_fails(Fault::CorruptAt { offset: 4 });
}

/// A flipped byte in the middle of the deflate stream.
#[test]
fn pull_of_a_blob_corrupted_mid_stream_fails_on_its_digest_and_stores_nothing() {
    if !ready() {
        return;
    }
    assert_corrupt_pull_fails(Fault::Corrupt);
}

#[test]
fn mirrors_from_hosts_toml_are_tried_in_order_before_the_upstream() {
    if !ready() {
        return;
    }
    let tmp = tempdir();
    let mirror = Registry::plain();
    let image = rich_image(7);
    skopeo_publish(&tmp.path().join("layout"), &image, mirror.addr(), "team/app:v1", &[]);
    let proxy = FaultProxy::start(mirror.addr());
    // Neither the upstream nor the first mirror listens: the pull must fall
    // through the dead mirror to the live one.
    let upstream = format!("127.0.0.1:{}", free_port());
    let dead = format!("127.0.0.1:{}", free_port());
    let hosts = tmp.path().join("hosts.d");
    std::fs::create_dir_all(hosts.join(&upstream)).unwrap();
    std::fs::write(
        hosts.join(&upstream).join("hosts.toml"),
        format!(
            "[host.\"http://{dead}\"]\ncapabilities = [\"pull\", \"resolve\"]\n\n\
             [host.\"http://{}\"]\ncapabilities = [\"pull\", \"resolve\"]\n",
            proxy.addr()
        ),
    )
    .unwrap();
    let mut client = Client::new(&tmp.path().join("client"));
    client.env("RMOUNT_HOSTS_DIR", hosts.to_string_lossy());
    let reference = format!("{upstream}/team/app:v1");

    let digest = client.pull(&reference, &[]);
    assert_eq!(digest, skopeo_digest(mirror.addr(), "team/app:v1"));
    assert_blobs_stored(&client, &layer_digests(&image));
    let log = proxy.requests();
    assert!(
        log.iter().any(|r| r.path.contains("/manifests/v1") && r.path.contains(&format!("ns={upstream}"))),
        "the mirror saw no manifest request with ns=:\n{}",
        proxy.describe_requests()
    );
    // The image is stored under the upstream's name, not the mirror's.
    assert!(client.ok(&["images"]).contains(&format!("{upstream}/team/app")));

    // Without the hosts file the upstream is tried, and its failure is explained.
    let mut plain = client.with_root(&tmp.path().join("other-root"));
    plain.env("RMOUNT_HOSTS_DIR", tmp.path().join("empty-hosts").to_string_lossy());
    let message = plain.fails(&["pull", &reference]);
    assert!(message.contains("cannot reach"), "{message}");
}
