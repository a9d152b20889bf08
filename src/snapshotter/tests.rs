//! containerd's snapshotter test-suite semantics, rewritten as unit tests.

use super::*;

fn store() -> (tempfile::TempDir, Snapshots) {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Snapshots::open(dir.path()).expect("open");
    (dir, s)
}

/// The unmount hook for stores without remote snapshots.
fn no_remote(_: &Path) -> Result<()> {
    unreachable!("no remote snapshot here")
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn fs_dir(m: &Mount) -> PathBuf {
    assert_eq!(m.kind, "bind");
    PathBuf::from(&m.source)
}

fn option<'a>(m: &'a Mount, prefix: &str) -> Option<&'a str> {
    m.options.iter().find_map(|o| o.strip_prefix(prefix))
}

/// Prepares `key` on `parent`, writes `file` into it and commits it as `name`.
fn layer(s: &Snapshots, name: &str, parent: Option<&str>, file: &str) {
    let key = format!("{name}-active");
    let mounts = s.prepare(&key, parent, BTreeMap::new()).expect("prepare");
    let upper = match mounts[0].kind.as_str() {
        "bind" => fs_dir(&mounts[0]),
        _ => PathBuf::from(option(&mounts[0], "upperdir=").expect("upperdir")),
    };
    fs::write(upper.join(file), name).expect("write");
    s.commit(name, &key, BTreeMap::new()).expect("commit");
}

#[test]
fn prepare_commit_stat() {
    let (_d, s) = store();
    let mounts = s.prepare("a", None, labels(&[("x", "1")])).unwrap();
    assert_eq!(mounts.len(), 1);
    assert_eq!(mounts[0].kind, "bind");
    assert_eq!(mounts[0].options, ["rw", "rbind"]);
    assert!(fs_dir(&mounts[0]).is_dir());
    let info = s.stat("a").unwrap();
    assert_eq!((info.kind, info.parent.as_deref()), (Kind::Active, None));
    assert_eq!(info.labels, labels(&[("x", "1")]));

    s.commit("base", "a", labels(&[("y", "2")])).unwrap();
    assert!(matches!(s.stat("a"), Err(SnapshotError::NotFound(_))));
    let base = s.stat("base").unwrap();
    assert_eq!(base.kind, Kind::Committed);
    assert_eq!(base.labels, labels(&[("y", "2")]));
    assert!(matches!(s.mounts("base"), Err(SnapshotError::FailedPrecondition(_))));

    s.prepare("b", Some("base"), BTreeMap::new()).unwrap();
    let b = s.stat("b").unwrap();
    assert_eq!((b.kind, b.parent.as_deref()), (Kind::Active, Some("base")));
    assert_eq!(s.mounts("b").unwrap(), s.mounts("b").unwrap());
    assert_eq!(s.mounts("b").unwrap()[0].kind, "overlay");
}

#[test]
fn transitivity_lowerdirs_nearest_first() {
    let (_d, s) = store();
    layer(&s, "l1", None, "one");
    layer(&s, "l2", Some("l1"), "two");
    layer(&s, "l3", Some("l2"), "three");
    let mounts = s.prepare("top", Some("l3"), BTreeMap::new()).unwrap();
    assert_eq!(mounts.len(), 1);
    let m = &mounts[0];
    assert_eq!((m.kind.as_str(), m.source.as_str()), ("overlay", "overlay"));
    let lowers: Vec<PathBuf> =
        option(m, "lowerdir=").unwrap().split(':').map(PathBuf::from).collect();
    assert_eq!(lowers.len(), 3);
    for (dir, file) in lowers.iter().zip(["three", "two", "one"]) {
        assert!(dir.join(file).is_file(), "{dir:?} lacks {file}");
    }
    let upper = PathBuf::from(option(m, "upperdir=").unwrap());
    let work = PathBuf::from(option(m, "workdir=").unwrap());
    assert!(upper.is_dir() && work.is_dir());
    assert_eq!(upper.parent(), work.parent());

    // A view over the chain is a read-only overlay with only lowerdirs.
    let view = s.view("v", Some("l3"), BTreeMap::new()).unwrap();
    assert_eq!(view[0].kind, "overlay");
    assert_eq!(view[0].options.len(), 1);
    assert_eq!(option(&view[0], "lowerdir=").unwrap().split(':').count(), 3);
}

#[test]
fn view_of_one_committed_parent_is_ro_bind() {
    let (_d, s) = store();
    layer(&s, "base", None, "f");
    let mounts = s.view("v", Some("base"), BTreeMap::new()).unwrap();
    assert_eq!(mounts.len(), 1);
    assert_eq!(mounts[0].kind, "bind");
    assert_eq!(mounts[0].options, ["ro", "rbind"]);
    assert!(fs_dir(&mounts[0]).join("f").is_file());
    assert_eq!(s.stat("v").unwrap().kind, Kind::View);

    let empty = s.view("empty", None, BTreeMap::new()).unwrap();
    assert_eq!(empty[0].options, ["ro", "rbind"]);
}

#[test]
fn remove_parent_refused_until_child_removed() {
    let (_d, s) = store();
    layer(&s, "base", None, "f");
    s.prepare("child", Some("base"), BTreeMap::new()).unwrap();
    assert!(matches!(s.remove("base", no_remote), Err(SnapshotError::FailedPrecondition(_))));
    assert!(s.stat("base").is_ok());
    s.remove("child", no_remote).unwrap();
    assert!(matches!(s.stat("child"), Err(SnapshotError::NotFound(_))));
    s.remove("base", no_remote).unwrap();
    assert!(s.walk(|_| true).unwrap().is_empty());
    assert_eq!(fs::read_dir(s.snapshots_dir()).unwrap().count(), 0);
    assert!(matches!(s.remove("base", no_remote), Err(SnapshotError::NotFound(_))));
}

#[test]
fn commit_refusals() {
    let (_d, s) = store();
    layer(&s, "base", None, "f");
    s.view("v", Some("base"), BTreeMap::new()).unwrap();
    assert!(matches!(
        s.commit("x", "v", BTreeMap::new()),
        Err(SnapshotError::FailedPrecondition(_))
    ));
    assert!(matches!(
        s.commit("x", "base", BTreeMap::new()),
        Err(SnapshotError::FailedPrecondition(_))
    ));
    assert!(matches!(s.commit("x", "nope", BTreeMap::new()), Err(SnapshotError::NotFound(_))));
    s.prepare("a", None, BTreeMap::new()).unwrap();
    assert!(matches!(s.commit("base", "a", BTreeMap::new()), Err(SnapshotError::AlreadyExists(_))));
    assert_eq!(s.stat("a").unwrap().kind, Kind::Active);
}

#[test]
fn duplicate_key_and_bad_parents() {
    let (_d, s) = store();
    s.prepare("a", None, BTreeMap::new()).unwrap();
    assert!(matches!(s.prepare("a", None, BTreeMap::new()), Err(SnapshotError::AlreadyExists(_))));
    assert!(matches!(s.view("a", None, BTreeMap::new()), Err(SnapshotError::AlreadyExists(_))));
    assert!(matches!(
        s.prepare("b", Some("nope"), BTreeMap::new()),
        Err(SnapshotError::NotFound(_))
    ));
    assert!(matches!(
        s.prepare("b", Some("a"), BTreeMap::new()),
        Err(SnapshotError::InvalidArgument(_))
    ));
    assert!(matches!(s.prepare("", None, BTreeMap::new()), Err(SnapshotError::InvalidArgument(_))));
    // Failed creates leave neither records nor dirs behind.
    assert_eq!(s.walk(|_| true).unwrap().len(), 1);
    assert_eq!(fs::read_dir(s.snapshots_dir()).unwrap().count(), 1);
}

#[test]
fn update_labels_by_fieldpath() {
    let (_d, s) = store();
    s.prepare("a", None, labels(&[("keep", "1"), ("drop", "2"), ("change", "3")])).unwrap();
    let mut info = s.stat("a").unwrap();
    info.labels = labels(&[("change", "new"), ("add", "4"), ("ignored", "5")]);
    let got = s.update(&info, &["labels.change", "labels.add", "labels.drop"]).unwrap();
    let want = labels(&[("keep", "1"), ("change", "new"), ("add", "4")]);
    assert_eq!(got.labels, want);
    assert!(got.updated >= got.created);
    assert_eq!(s.stat("a").unwrap(), got);

    info.labels = labels(&[("only", "x")]);
    assert_eq!(s.update(&info, &["labels"]).unwrap().labels, labels(&[("only", "x")]));
    info.labels = labels(&[("all", "y")]);
    assert_eq!(s.update(&info, &[]).unwrap().labels, labels(&[("all", "y")]));

    assert!(matches!(s.update(&info, &["parent"]), Err(SnapshotError::InvalidArgument(_))));
    info.name = "nope".into();
    assert!(matches!(s.update(&info, &[]), Err(SnapshotError::NotFound(_))));
}

#[test]
fn usage_counts_bytes_in_active_and_keeps_it_on_commit() {
    use std::os::unix::fs::MetadataExt;
    let (_d, s) = store();
    let mounts = s.prepare("a", None, BTreeMap::new()).unwrap();
    let dir = fs_dir(&mounts[0]);
    let allocated = |paths: &[&str]| -> u64 {
        paths.iter().map(|p| fs::symlink_metadata(dir.join(p)).unwrap().blocks() * 512).sum()
    };
    assert_eq!(s.usage("a").unwrap(), Usage { size: allocated(&[""]), inodes: 1 });
    fs::write(dir.join("f"), vec![7u8; 10_000]).unwrap();
    fs::create_dir(dir.join("d")).unwrap();
    fs::write(dir.join("d/g"), vec![7u8; 234]).unwrap();
    fs::hard_link(dir.join("f"), dir.join("d/f-again")).unwrap();
    // containerd's measure: allocated blocks of each inode once, dirs too.
    let want = Usage { size: allocated(&["", "f", "d", "d/g"]), inodes: 4 };
    assert!(want.size >= 10_234);
    assert_eq!(s.usage("a").unwrap(), want);
    s.commit("c", "a", BTreeMap::new()).unwrap();
    assert_eq!(s.usage("c").unwrap(), want);
    assert!(matches!(s.usage("a"), Err(SnapshotError::NotFound(_))));
}

#[test]
fn cleanup_removes_orphans_only() {
    let (_d, s) = store();
    layer(&s, "base", None, "f");
    s.prepare("a", Some("base"), BTreeMap::new()).unwrap();
    let base = s.snapshots_dir();
    for orphan in ["999", "new-3-42", "rm-7"] {
        fs::create_dir_all(base.join(orphan).join("fs")).unwrap();
    }
    let mut removed = s.cleanup().unwrap();
    removed.sort();
    let want: Vec<PathBuf> = ["999", "new-3-42", "rm-7"].iter().map(|o| base.join(o)).collect();
    assert_eq!(removed, want);
    assert_eq!(fs::read_dir(&base).unwrap().count(), 2);
    assert!(s.mounts("a").is_ok());
    assert!(s.cleanup().unwrap().is_empty());
}

#[test]
fn stale_dir_under_an_unissued_id_is_replaced() {
    // A crash after the rename but before the commit leaves `snapshots/<id>`
    // for an id the database hands out again.
    let (_d, s) = store();
    fs::create_dir_all(s.dir_of(1).join("fs/stale")).unwrap();
    let mounts = s.prepare("a", None, BTreeMap::new()).unwrap();
    let dir = fs_dir(&mounts[0]);
    assert_eq!(dir, s.dir_of(1).join("fs"));
    assert_eq!(fs::read_dir(dir).unwrap().count(), 0);
}

#[test]
fn reopen_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let (before, mounts_before) = {
        let s = Snapshots::open(dir.path()).unwrap();
        layer(&s, "base", None, "f");
        s.prepare("a", Some("base"), labels(&[("k", "v")])).unwrap();
        s.view("v", None, BTreeMap::new()).unwrap();
        (s.walk(|_| true).unwrap(), s.mounts("a").unwrap())
    };
    let s = Snapshots::open(dir.path()).unwrap();
    assert_eq!(s.walk(|_| true).unwrap(), before);
    assert_eq!(s.mounts("a").unwrap(), mounts_before);
    let actives = s.walk(|i| i.kind == Kind::Active).unwrap();
    assert_eq!(actives.len(), 1);
    assert_eq!(actives[0].name, "a");
    // Ids keep increasing across opens: no new snapshot reuses a dir.
    let m = s.prepare("b", None, BTreeMap::new()).unwrap();
    assert_eq!(fs_dir(&m[0]), s.dir_of(4).join("fs"));
    assert!(s.cleanup().unwrap().is_empty());
}

#[test]
fn overlay_mount_for_real() {
    if !rustix::process::geteuid().is_root() {
        println!("skipped: mounting overlayfs needs root");
        return;
    }
    let (d, s) = store();
    layer(&s, "l1", None, "one");
    layer(&s, "l2", Some("l1"), "two");
    let mounts = s.prepare("top", Some("l2"), BTreeMap::new()).unwrap();
    let m = &mounts[0];
    let target = d.path().join("merged");
    fs::create_dir(&target).unwrap();
    let data = std::ffi::CString::new(m.options.join(",")).unwrap();
    if let Err(e) = rustix::mount::mount(
        m.source.as_str(),
        &target,
        m.kind.as_str(),
        rustix::mount::MountFlags::empty(),
        data.as_c_str(),
    ) {
        println!("skipped: kernel overlayfs mount failed: {e}");
        return;
    }
    let checks = || -> io::Result<()> {
        assert_eq!(fs::read_to_string(target.join("one"))?, "l1");
        assert_eq!(fs::read_to_string(target.join("two"))?, "l2");
        fs::write(target.join("new"), "written")?;
        Ok(())
    };
    let result = checks();
    rustix::mount::unmount(&target, rustix::mount::UnmountFlags::empty()).unwrap();
    result.unwrap();
    let upper = PathBuf::from(option(m, "upperdir=").unwrap());
    assert_eq!(fs::read_to_string(upper.join("new")).unwrap(), "written");
    assert!(!upper.join("one").exists());
}

#[test]
fn remote_parents_cut_the_lowerdirs_and_fuse_unions_bind_their_rootfs() {
    let (_d, s) = store();
    let remote = |layers| RemoteLayers { image: "r/i@sha256:00".into(), layers };
    let base = s.create_remote("lazy-1", None, BTreeMap::new(), remote(1)).unwrap();
    let top = s.create_remote("lazy-2", Some("lazy-1"), BTreeMap::new(), remote(2)).unwrap();
    assert!(base.ends_with("fs") && top.ends_with("fs"));
    assert_eq!(s.remote_of("lazy-2").unwrap(), Some(remote(2)));
    assert_eq!(s.served_at("lazy-2").unwrap(), Some(top.clone()));

    // Kernel overlayfs: one lowerdir, the nearest lazy snapshot's fs.
    let mounts = s.prepare("ctr", Some("lazy-2"), BTreeMap::new()).unwrap();
    assert_eq!(option(&mounts[0], "lowerdir=").map(PathBuf::from), Some(top.clone()));
    assert_eq!(s.served_at("ctr").unwrap(), None);

    // rmount's FUSE union: a bind of the snapshot's rootfs.
    let (mounts, dir, under) = s.prepare_fuse_union("fuse", "lazy-2", BTreeMap::new()).unwrap();
    assert_eq!(under, remote(2));
    assert_eq!(fs_dir(&mounts[0]), dir.join("rootfs"));
    assert!(dir.join("rootfs").is_dir() && dir.join("fs").is_dir());
    assert_eq!(s.mounts("fuse").unwrap(), mounts);
    assert_eq!(s.served_at("fuse").unwrap(), Some(dir.join("rootfs")));
    let mut unmounted = Vec::new();
    s.remove("fuse", |p| {
        unmounted.push(p.to_path_buf());
        Ok(())
    })
    .unwrap();
    assert_eq!(unmounted, [dir.join("rootfs")]);
    assert!(matches!(
        s.prepare_fuse_union("x", "ctr-missing", BTreeMap::new()),
        Err(SnapshotError::NotFound(_))
    ));
}
