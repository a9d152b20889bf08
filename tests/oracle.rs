//! The union oracle: the same layers mounted by kernel overlayfs (extracted,
//! whiteouts converted to overlay's format) and by rmount (straight from the
//! blobs) must show the same tree: names, types, modes, owners, sizes,
//! mtimes, link targets, hardlink groups, xattrs, bytes, and the same errno
//! for hidden names. Random reads across the big files must match too.

mod common;

use common::*;
use std::os::unix::fs::FileExt;
use std::path::Path;

fn d(path: &str, mode: u32) -> (Item, Meta) {
    (Item::Dir { path: path.into(), mode }, Meta::default())
}

fn f(path: &str, data: &[u8]) -> (Item, Meta) {
    (Item::File { path: path.into(), mode: 0o644, data: data.to_vec() }, Meta::default())
}

fn with(item: (Item, Meta), meta: Meta) -> (Item, Meta) {
    (item.0, meta)
}

fn layers() -> Vec<(Vec<(Item, Meta)>, Compress)> {
    let long_component = "c".repeat(150);
    let long_dir = format!("deep/{}", "d".repeat(120));
    let long_path = format!("{long_dir}/{}", "e".repeat(140));
    let xattr_meta = Meta {
        xattrs: vec![
            ("user.rmount.test".into(), b"hello".to_vec()),
            ("trusted.rmount".into(), vec![0, 1, 2, 255]),
        ],
        ..Meta::default()
    };
    let l0 = vec![
        d("etc", 0o755),
        f("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"),
        f("etc/empty", b""),
        d("usr", 0o755),
        d("usr/bin", 0o755),
        (
            Item::File { path: "usr/bin/suid".into(), mode: 0o4755, data: b"#!/bin/sh\n".to_vec() },
            Meta::default(),
        ),
        (
            Item::File { path: "usr/bin/sgid".into(), mode: 0o2711, data: b"x".to_vec() },
            Meta::default(),
        ),
        (
            Item::Symlink { path: "usr/bin/abs".into(), target: "/etc/passwd".into() },
            Meta::default(),
        ),
        (
            Item::Symlink { path: "usr/bin/rel".into(), target: "../../etc/passwd".into() },
            Meta::default(),
        ),
        (Item::Dir { path: "tmp".into(), mode: 0o1777 }, Meta::default()),
        d("hl", 0o755),
        d("hl/a", 0o755),
        d("hl/b", 0o700),
        f("hl/a/one", b"shared by hardlinks\n"),
        (Item::Hardlink { path: "hl/b/two".into(), target: "hl/a/one".into() }, Meta::default()),
        (Item::Hardlink { path: "hl/three".into(), target: "hl/a/one".into() }, Meta::default()),
        d("dev", 0o755),
        (Item::Char { path: "dev/null".into(), major: 1, minor: 3 }, Meta::default()),
        (Item::Block { path: "dev/loop9".into(), major: 7, minor: 9 }, Meta::default()),
        (Item::Fifo { path: "dev/fifo".into() }, Meta::default()),
        with(
            f("owned", b"odd owner"),
            Meta { uid: 1234, gid: 5678, mtime: 1_234_567_890, ..Meta::default() },
        ),
        with(f("xattr-file", b"has xattrs"), xattr_meta.clone()),
        with(d("xattr-dir", 0o750), xattr_meta),
        d("deep", 0o755),
        d(&long_dir, 0o755),
        f(&long_path, b"long path"),
        f(&long_component, b"long name"),
        d("gone-dir", 0o755),
        f("gone-dir/inside", b"hidden later"),
        f("gone-file", b"hidden later"),
        d("opq", 0o755),
        f("opq/old", b"hidden by opaque"),
        d("opq/sub", 0o755),
        d("dir2file", 0o755),
        f("dir2file/x", b"x"),
        f("file2dir", b"becomes a dir"),
        f("recreated", b"version one"),
        f("big-gzip", &pseudo_random(110 << 20, 1)),
    ];
    let l1 = vec![
        (Item::Whiteout { path: "gone-dir".into() }, Meta::default()),
        (Item::Whiteout { path: "gone-file".into() }, Meta::default()),
        d("opq", 0o711),
        (Item::Opaque { path: "opq".into() }, Meta::default()),
        f("opq/new", b"only this survives"),
        f("dir2file", b"now a file"),
        d("file2dir", 0o755),
        f("file2dir/child", b"child"),
        (Item::Whiteout { path: "recreated".into() }, Meta::default()),
        f("big-zstd", &pseudo_random(40 << 20, 2)),
        d("etc", 0o755),
        f("etc/added-in-l1", b"l1"),
    ];
    let l2 = vec![
        f("recreated", b"version two, longer"),
        d("hl", 0o755),
        (Item::Whiteout { path: "hl/three".into() }, Meta::default()),
        d("etc", 0o700),
        f("etc/passwd", b"root:x:0:0:changed:/root:/bin/sh\n"),
    ];
    let l3 = vec![
        d("usr", 0o755),
        d("usr/bin", 0o755),
        (Item::Symlink { path: "usr/bin/suid".into(), target: "abs".into() }, Meta::default()),
        f("top-only", b"top"),
        d("etc", 0o700),
        (Item::Whiteout { path: "etc/added-in-l1".into() }, Meta::default()),
    ];
    vec![(l0, Compress::Gzip), (l1, Compress::Zstd), (l2, Compress::None), (l3, Compress::Gzip)]
}

const HIDDEN: &[&str] = &[
    "gone-dir",
    "gone-dir/inside",
    "gone-file",
    "opq/old",
    "opq/sub",
    "dir2file/x",
    "hl/three",
    "etc/added-in-l1",
];

fn errno_of(root: &Path, rel: &str) -> Option<i32> {
    std::fs::symlink_metadata(root.join(rel)).err().and_then(|e| e.raw_os_error())
}

#[test]
fn rmount_matches_kernel_overlayfs() {
    if !require_root_fuse(&["tar"]) {
        return;
    }
    let tmp = tempdir();
    let root = tmp.path().join("state");
    let layers = layers();
    let mut blobs = Vec::new();
    let mut lowers = Vec::new();
    for (i, (items, how)) in layers.iter().enumerate() {
        let tar = layer_tar(items);
        let lower = tmp.path().join(format!("lower{i}"));
        extract_for_overlay(&tar, &lower);
        lowers.push(lower);
        let (blob, media_type) = compress(&tar, *how);
        blobs.push((blob, media_type, tar));
    }
    lowers.reverse();
    write_oci_layout(&tmp.path().join("layout"), "oracle:test", &blobs);
    drop(blobs);
    rmount_ok(&root, &["load", "-i", tmp.path().join("layout").to_str().unwrap()]);

    let kernel = Mounted::overlay(&lowers, &tmp.path().join("kernel"));
    let ours = Mounted::rmount(&root, "oracle:test", &tmp.path().join("ours"));
    let expected = describe_tree(&kernel.path);
    assert!(expected.len() > 30, "oracle tree is suspiciously small: {expected:?}");
    assert_same_tree(&expected, &describe_tree(&ours.path));
    for hidden in HIDDEN {
        assert!(errno_of(&kernel.path, hidden).is_some(), "{hidden} is visible in the oracle");
        assert_eq!(errno_of(&ours.path, hidden), errno_of(&kernel.path, hidden), "{hidden}");
    }

    // Random reads across the big files, against the extracted copies.
    for (name, lower) in [("big-gzip", &lowers[3]), ("big-zstd", &lowers[2])] {
        let want = std::fs::File::open(lower.join(name)).unwrap();
        let got = std::fs::File::open(ours.path.join(name)).unwrap();
        let len = want.metadata().unwrap().len();
        let mut x: u64 = 0x1234_5678;
        for _ in 0..300 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let offset = (x >> 20) % len;
            let size = ((x >> 8) % (3 << 20)) as usize;
            let mut a = vec![0; size];
            let mut b = vec![0; size];
            let na = want.read_at(&mut a, offset).unwrap();
            let nb = got.read_at(&mut b, offset).unwrap();
            assert_eq!(na, nb, "{name}: length at {offset}+{size}");
            assert!(a[..na] == b[..nb], "{name}: bytes differ at {offset}+{size}");
        }
    }
}
