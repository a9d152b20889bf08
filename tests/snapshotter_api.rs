//! containerd's snapshotter test-suite expectations, against rmount's
//! Snapshots gRPC server on a real Unix socket, with the returned mounts
//! performed for real (kernel overlayfs and bind mounts, as containerd
//! would): files written through an active snapshot show in its children,
//! deletions hide lower files, views are read-only, a parent with children
//! cannot be removed, and each error reaches the client as the gRPC code
//! containerd's errdefs expects.

mod common;

use pb::snapshots_client::SnapshotsClient;
use rmount::containerd::api::services::snapshots::v1 as pb;
use rmount::containerd::api::types::Mount;
use rmount::snapshotter::service::{self, ActiveUnion, SnapshotService};
use rmount::snapshotter::Snapshots;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use tonic::transport::Channel;
use tonic::Code;

const SNAPSHOTTER: &str = "rmount";

/// A server on a temp socket and a client to it.
struct Api {
    dir: tempfile::TempDir,
    runtime: tokio::runtime::Runtime,
    client: SnapshotsClient<Channel>,
    mounted: Vec<PathBuf>,
    mounts_made: usize,
}

impl Drop for Api {
    fn drop(&mut self) {
        for target in self.mounted.iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(target).status();
        }
    }
}

fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

impl Api {
    fn start() -> Api {
        let dir = common::tempdir();
        let snapshots = Arc::new(Snapshots::open(&dir.path().join("store")).expect("open store"));
        let socket = dir.path().join("snapshotter.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
        let service = SnapshotService::new(snapshots, None, ActiveUnion::Overlayfs);
        std::thread::spawn(move || service::serve(service, listener));
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let client = runtime
            .block_on(async {
                let channel = tonic::transport::Endpoint::try_from("http://[::]:50051")?
                    .connect_with_connector(tower::service_fn(move |_| {
                        let socket = socket.clone();
                        async move {
                            let stream = tokio::net::UnixStream::connect(socket).await?;
                            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                        }
                    }))
                    .await?;
                Ok::<_, tonic::transport::Error>(SnapshotsClient::new(channel))
            })
            .expect("connect");
        Api { dir, runtime, client, mounted: Vec::new(), mounts_made: 0 }
    }

    fn prepare(&mut self, key: &str, parent: &str) -> Result<Vec<Mount>, tonic::Status> {
        let request = pb::PrepareSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: key.into(),
            parent: parent.into(),
            labels: labels(&[("containerd.io/gc.root", "test")]),
        };
        let mut client = self.client.clone();
        self.runtime.block_on(client.prepare(request)).map(|r| r.into_inner().mounts)
    }

    fn view(&mut self, key: &str, parent: &str) -> Result<Vec<Mount>, tonic::Status> {
        let request = pb::ViewSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: key.into(),
            parent: parent.into(),
            labels: HashMap::new(),
        };
        let mut client = self.client.clone();
        self.runtime.block_on(client.view(request)).map(|r| r.into_inner().mounts)
    }

    fn mounts(&mut self, key: &str) -> Result<Vec<Mount>, tonic::Status> {
        let request = pb::MountsRequest { snapshotter: SNAPSHOTTER.into(), key: key.into() };
        let mut client = self.client.clone();
        self.runtime.block_on(client.mounts(request)).map(|r| r.into_inner().mounts)
    }

    fn commit(&mut self, name: &str, key: &str) -> Result<(), tonic::Status> {
        let request = pb::CommitSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            name: name.into(),
            key: key.into(),
            labels: labels(&[("committed", "yes")]),
        };
        let mut client = self.client.clone();
        self.runtime.block_on(client.commit(request)).map(drop)
    }

    fn remove(&mut self, key: &str) -> Result<(), tonic::Status> {
        let request =
            pb::RemoveSnapshotRequest { snapshotter: SNAPSHOTTER.into(), key: key.into() };
        let mut client = self.client.clone();
        self.runtime.block_on(client.remove(request)).map(drop)
    }

    fn stat(&mut self, key: &str) -> Result<pb::Info, tonic::Status> {
        let request = pb::StatSnapshotRequest { snapshotter: SNAPSHOTTER.into(), key: key.into() };
        let mut client = self.client.clone();
        self.runtime
            .block_on(client.stat(request))
            .map(|r| r.into_inner().info.expect("stat has info"))
    }

    fn list(&mut self, filters: &[&str]) -> Result<Vec<String>, tonic::Status> {
        let request = pb::ListSnapshotsRequest {
            snapshotter: SNAPSHOTTER.into(),
            filters: filters.iter().map(|f| f.to_string()).collect(),
        };
        let mut client = self.client.clone();
        self.runtime.block_on(async {
            let mut stream = client.list(request).await?.into_inner();
            let mut names = Vec::new();
            while let Some(batch) = stream.message().await? {
                names.extend(batch.info.into_iter().map(|i| i.name));
            }
            names.sort();
            Ok(names)
        })
    }

    fn usage(&mut self, key: &str) -> Result<pb::UsageResponse, tonic::Status> {
        let request = pb::UsageRequest { snapshotter: SNAPSHOTTER.into(), key: key.into() };
        let mut client = self.client.clone();
        self.runtime.block_on(client.usage(request)).map(|r| r.into_inner())
    }

    fn update_labels(
        &mut self,
        key: &str,
        kind: pb::Kind,
        new: &[(&str, &str)],
        paths: &[&str],
    ) -> Result<pb::Info, tonic::Status> {
        let request = pb::UpdateSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            info: Some(pb::Info {
                name: key.into(),
                kind: kind as i32,
                labels: labels(new),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: paths.iter().map(|p| p.to_string()).collect(),
            }),
        };
        let mut client = self.client.clone();
        self.runtime.block_on(client.update(request)).map(|r| r.into_inner().info.unwrap())
    }

    /// Performs `mounts` at a new dir, as containerd's `mount.All` would.
    fn mount(&mut self, mounts: &[Mount]) -> PathBuf {
        assert_eq!(mounts.len(), 1, "one mount per snapshot: {mounts:?}");
        let m = &mounts[0];
        self.mounts_made += 1;
        let target = self.dir.path().join(format!("mnt{}", self.mounts_made));
        std::fs::create_dir(&target).unwrap();
        let status = match m.r#type.as_str() {
            "bind" => {
                let ro = m.options.iter().any(|o| o == "ro");
                Command::new("mount")
                    .args(["--bind", "-o", if ro { "bind,ro" } else { "bind" }])
                    .arg(&m.source)
                    .arg(&target)
                    .status()
            }
            "overlay" => Command::new("mount")
                .args(["-t", "overlay", "overlay", "-o", &m.options.join(",")])
                .arg(&target)
                .status(),
            other => panic!("unexpected mount type {other}"),
        };
        assert!(status.expect("mount").success(), "mounting {m:?}");
        self.mounted.push(target.clone());
        target
    }

    fn unmount(&mut self, target: &Path) {
        assert!(Command::new("umount").arg(target).status().unwrap().success());
        self.mounted.retain(|t| t != target);
    }
}

fn code<T: std::fmt::Debug>(result: Result<T, tonic::Status>) -> Code {
    result.expect_err("expected an error").code()
}

fn ready() -> bool {
    common::require("root (euid 0)", rustix::process::geteuid().is_root())
}

/// containerd's checkSnapshotterBasic and checkDeletedFilesInChildSnapshot:
/// write, commit, stack, delete in a child, view the result.
#[test]
fn layers_stack_and_deletions_hide_lower_files() {
    if !ready() {
        return;
    }
    let mut api = Api::start();
    let mounts = api.prepare("prep", "").unwrap();
    assert_eq!(mounts[0].r#type, "bind", "a parentless active snapshot is a bind mount");
    let mnt = api.mount(&mounts);
    std::fs::write(mnt.join("foo"), "foo\n").unwrap();
    std::fs::create_dir_all(mnt.join("a/b")).unwrap();
    std::fs::write(mnt.join("a/b/gone"), "soon deleted").unwrap();
    api.unmount(&mnt);
    api.commit("committed", "prep").unwrap();
    assert_eq!(code(api.stat("prep")), Code::NotFound, "the key goes with the commit");
    let info = api.stat("committed").unwrap();
    assert_eq!(info.kind, pb::Kind::Committed as i32);
    assert_eq!(info.labels.get("committed").map(String::as_str), Some("yes"));

    let mounts = api.prepare("next", "committed").unwrap();
    assert_eq!(mounts[0].r#type, "overlay");
    let mnt = api.mount(&mounts);
    assert_eq!(std::fs::read_to_string(mnt.join("foo")).unwrap(), "foo\n");
    std::fs::remove_file(mnt.join("a/b/gone")).unwrap();
    std::fs::write(mnt.join("bar"), "bar\n").unwrap();
    api.unmount(&mnt);
    api.commit("next-committed", "next").unwrap();
    assert_eq!(api.stat("next-committed").unwrap().parent, "committed");

    let view = api.view("view", "next-committed").unwrap();
    let mnt = api.mount(&view);
    assert_eq!(std::fs::read_to_string(mnt.join("foo")).unwrap(), "foo\n");
    assert_eq!(std::fs::read_to_string(mnt.join("bar")).unwrap(), "bar\n");
    assert!(mnt.join("a/b").is_dir());
    assert!(!mnt.join("a/b/gone").exists(), "a file deleted in a child stays deleted");
    // checkSnapshotterViewReadonly: a view cannot be written.
    let err = std::fs::write(mnt.join("new"), "x").expect_err("view is read-only");
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    assert_eq!(api.stat("view").unwrap().kind, pb::Kind::View as i32);
    assert_eq!(api.mounts("view").unwrap(), view, "Mounts repeats what View returned");

    assert_eq!(api.list(&[]).unwrap(), ["committed", "next-committed", "view"]);
    assert_eq!(api.list(&["parent==committed"]).unwrap(), ["next-committed"]);
    assert_eq!(api.list(&["kind==view", "name==committed"]).unwrap(), ["committed", "view"]);
}

/// checkSnapshotterTransitivity: a snapshot sees every ancestor's files,
/// the nearest layer winning.
#[test]
fn transitivity_nearest_layer_wins() {
    if !ready() {
        return;
    }
    let mut api = Api::start();
    let mut parent = String::new();
    for layer in 0..4 {
        let key = format!("active-{layer}");
        let mounts = api.prepare(&key, &parent).unwrap();
        let mnt = api.mount(&mounts);
        std::fs::write(mnt.join("shared"), format!("layer {layer}")).unwrap();
        std::fs::write(mnt.join(format!("only-{layer}")), "x").unwrap();
        api.unmount(&mnt);
        parent = format!("layer-{layer}");
        api.commit(&parent, &key).unwrap();
    }
    let view = api.view("top-view", &parent).unwrap();
    let mnt = api.mount(&view);
    assert_eq!(std::fs::read_to_string(mnt.join("shared")).unwrap(), "layer 3");
    for layer in 0..4 {
        assert!(mnt.join(format!("only-{layer}")).is_file(), "layer {layer}'s file");
    }
}

/// checkRemoveIntermediateSnapshot and the errdefs mapping of refusals.
#[test]
fn refusals_reach_the_client_as_grpc_codes() {
    if !ready() {
        return;
    }
    let mut api = Api::start();
    api.prepare("base-active", "").unwrap();
    api.commit("base", "base-active").unwrap();
    api.prepare("child", "base").unwrap();

    assert_eq!(code(api.remove("base")), Code::FailedPrecondition, "parent with a child");
    assert!(api.stat("base").is_ok(), "the refused removal removed nothing");
    assert_eq!(code(api.prepare("child", "base")), Code::AlreadyExists);
    assert_eq!(code(api.prepare("orphan", "no-such-parent")), Code::NotFound);
    assert_eq!(code(api.stat("nothing")), Code::NotFound);
    assert_eq!(code(api.commit("base", "child")), Code::AlreadyExists, "name taken");
    api.view("v", "base").unwrap();
    assert_eq!(code(api.commit("v-committed", "v")), Code::FailedPrecondition, "a view");
    assert_eq!(code(api.mounts("base")), Code::FailedPrecondition, "committed has no mounts");
    assert_eq!(code(api.list(&["size==1"])), Code::InvalidArgument);

    api.remove("child").unwrap();
    api.remove("v").unwrap();
    api.remove("base").unwrap();
    assert!(api.list(&[]).unwrap().is_empty());
    let dirs = std::fs::read_dir(api.dir.path().join("store/snapshots")).unwrap().count();
    assert_eq!(dirs, 0, "removal deletes the snapshots' dirs");
}

/// checkUpdate and Usage: labels change per field path; usage counts the
/// snapshot's own bytes, measured again at commit.
#[test]
fn update_labels_and_usage() {
    if !ready() {
        return;
    }
    let mut api = Api::start();
    let mounts = api.prepare("a", "").unwrap();
    let mnt = api.mount(&mounts);
    std::fs::write(mnt.join("big"), vec![7u8; 1 << 20]).unwrap();
    api.unmount(&mnt);
    let usage = api.usage("a").unwrap();
    assert!(usage.size >= 1 << 20 && usage.inodes >= 2, "{usage:?}");

    let info =
        api.update_labels("a", pb::Kind::Active, &[("team", "blue")], &["labels.team"]).unwrap();
    assert_eq!(info.labels.get("team").map(String::as_str), Some("blue"));
    assert_eq!(info.labels.get("containerd.io/gc.root").map(String::as_str), Some("test"));
    let info = api.update_labels("a", pb::Kind::Active, &[("only", "this")], &[]).unwrap();
    assert_eq!(info.labels, labels(&[("only", "this")]), "no mask replaces every label");
    assert_eq!(api.stat("a").unwrap().labels, info.labels);
    assert_eq!(
        code(api.update_labels("a", pb::Kind::Active, &[], &["parent"])),
        Code::InvalidArgument
    );

    api.commit("done", "a").unwrap();
    assert_eq!(api.usage("done").unwrap(), usage);
}
