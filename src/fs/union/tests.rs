//! Union semantics on hand-built layers: whiteouts, opaque dirs,
//! replacement both ways, implied parents, hardlinks, nlink.

use super::*;
use crate::digest::Digest;
use crate::layer::{AccessMap, Compression};

fn entry(path: &str, kind: EntryKind) -> Entry {
    Entry { path: path.into(), kind, mode: 0o755, uid: 0, gid: 0, mtime: 1, xattrs: Box::default() }
}

fn file(path: &str) -> Entry {
    entry(path, EntryKind::File { offset: 0, size: 1 })
}

fn dir(path: &str) -> Entry {
    entry(path, EntryKind::Dir)
}

fn layer(entries: Vec<Entry>) -> Arc<LayerIndex> {
    Arc::new(LayerIndex {
        blob_digest: Digest::of(b"x"),
        diff_id: Digest::of(b"x"),
        compression: Compression::None,
        uncompressed_size: 0,
        entries,
        access: AccessMap::Plain(Default::default()),
    })
}

/// Every path of the tree, with a marker for directories.
fn paths(tree: &UnionTree) -> Vec<String> {
    fn walk(tree: &UnionTree, ino: u64, prefix: &str, out: &mut Vec<String>) {
        for (name, child) in tree.node(ino).unwrap().children.iter() {
            let path = format!("{prefix}{name}");
            let node = tree.node(*child).unwrap();
            out.push(if node.is_dir { format!("{path}/") } else { path.clone() });
            if node.is_dir {
                walk(tree, *child, &format!("{path}/"), out);
            }
        }
    }
    let mut out = Vec::new();
    walk(tree, ROOT_INO, "", &mut out);
    out
}

#[test]
fn whiteouts_hide_files_and_dirs() {
    let tree = UnionTree::build(vec![
        layer(vec![dir("a"), file("a/f"), file("a/g"), dir("d"), file("d/x")]),
        layer(vec![entry("a/f", EntryKind::Whiteout), entry("d", EntryKind::Whiteout)]),
    ]);
    assert_eq!(paths(&tree), ["a/", "a/g"]);
}

#[test]
fn opaque_dir_hides_lower_content_only() {
    let tree = UnionTree::build(vec![
        layer(vec![dir("a"), file("a/old"), file("top")]),
        layer(vec![dir("a"), entry("a", EntryKind::Opaque), file("a/new")]),
    ]);
    assert_eq!(paths(&tree), ["a/", "a/new", "top"]);
    // Merged from one layer only (opaque): nlink = 2 + subdirs.
    let a = tree.lookup(ROOT_INO, "a").unwrap();
    assert_eq!(tree.node(a).unwrap().nlink, 2);
}

#[test]
fn replacement_both_ways() {
    let tree = UnionTree::build(vec![
        layer(vec![dir("d"), file("d/x"), file("f")]),
        layer(vec![file("d"), dir("f"), file("f/y")]),
    ]);
    assert_eq!(paths(&tree), ["d", "f/", "f/y"]);
}

#[test]
fn dir_over_file_stops_merging_below_it() {
    let tree = UnionTree::build(vec![
        layer(vec![dir("p"), file("p/deep")]),
        layer(vec![file("p")]),
        layer(vec![dir("p"), file("p/top")]),
    ]);
    assert_eq!(paths(&tree), ["p/", "p/top"]);
}

#[test]
fn implied_parents_and_merged_nlink() {
    let tree = UnionTree::build(vec![
        layer(vec![dir("a"), dir("a/b"), file("a/b/c")]),
        layer(vec![file("a/b/d"), file("x/y/z")]),
    ]);
    assert_eq!(paths(&tree), ["a/", "a/b/", "a/b/c", "a/b/d", "x/", "x/y/", "x/y/z"]);
    let a = tree.lookup(ROOT_INO, "a").unwrap();
    let b = tree.lookup(a, "b").unwrap();
    // "a/b" is listed explicitly only in the lower layer: its metadata wins.
    assert_eq!(tree.entry(tree.node(b).unwrap()).unwrap().path.as_ref(), "a/b");
    assert_eq!(tree.node(b).unwrap().nlink, 1);
    let x = tree.lookup(ROOT_INO, "x").unwrap();
    assert!(tree.node(x).unwrap().source.is_none());
    assert_eq!(tree.node(x).unwrap().nlink, 3);
}

#[test]
fn hardlinks_share_an_inode_and_count_links() {
    let tree = UnionTree::build(vec![layer(vec![
        dir("a"),
        dir("b"),
        file("a/f"),
        entry("b/g", EntryKind::Hardlink { target: "a/f".into() }),
        entry("b/h", EntryKind::Hardlink { target: "b/g".into() }),
    ])]);
    let a = tree.lookup(ROOT_INO, "a").unwrap();
    let b = tree.lookup(ROOT_INO, "b").unwrap();
    let f = tree.lookup(a, "f").unwrap();
    assert_eq!(tree.lookup(b, "g"), Some(f));
    assert_eq!(tree.lookup(b, "h"), Some(f));
    assert_eq!(tree.node(f).unwrap().nlink, 3);
}

#[test]
fn hardlink_to_a_hidden_name_still_serves_its_data() {
    let tree = UnionTree::build(vec![
        layer(vec![file("f"), entry("g", EntryKind::Hardlink { target: "f".into() })]),
        layer(vec![entry("f", EntryKind::Whiteout)]),
    ]);
    assert_eq!(paths(&tree), ["g"]);
    let g = tree.lookup(ROOT_INO, "g").unwrap();
    assert_eq!(tree.entry(tree.node(g).unwrap()).unwrap().path.as_ref(), "f");
}

#[test]
fn lookups_of_missing_names_fail() {
    let tree = UnionTree::build(vec![layer(vec![file("a")])]);
    assert_eq!(tree.lookup(ROOT_INO, "b"), None);
    assert_eq!(tree.lookup(999, "a"), None);
    assert!(tree.node(0).is_none());
}

/// Every inode with its path, parent and link count, in inode order.
fn numbering(tree: &UnionTree) -> Vec<(u64, Vec<String>, u64, u32)> {
    (1..=tree.len() as u64)
        .map(|ino| {
            let paths = tree.paths_of(ino);
            let paths = paths
                .iter()
                .map(|p| p.iter().map(|(name, _)| *name).collect::<Vec<_>>().join("/"))
                .collect();
            let node = tree.node(ino).unwrap();
            (ino, paths, node.parent, node.nlink)
        })
        .collect()
}

/// Layers with enough names in scrambled tar order that hash-map order
/// would show if it leaked into the numbering.
fn scrambled_layers() -> Vec<Arc<LayerIndex>> {
    let mut bottom = vec![dir("etc"), dir("usr"), file("usr/keep")];
    for i in (0..200).map(|i| (i * 37) % 200) {
        bottom.push(file(&format!("usr/f{i:03}")));
        bottom.push(file(&format!("d{}/sub{}/x{i}", i % 7, i % 3)));
    }
    bottom.push(entry("etc/hard", EntryKind::Hardlink { target: "usr/f010".into() }));
    let mut top = vec![
        entry("usr/f005", EntryKind::Whiteout),
        entry("d1", EntryKind::Opaque),
        file("d1/only"),
        dir("usr"),
    ];
    for i in (0..50).rev() {
        top.push(file(&format!("new/n{i}")));
    }
    vec![layer(bottom), layer(top)]
}

#[test]
fn numbering_is_the_same_for_every_build() {
    let first = numbering(&UnionTree::build(scrambled_layers()));
    for _ in 0..10 {
        // Fresh indexes each time: new hash maps with new random seeds.
        assert_eq!(numbering(&UnionTree::build(scrambled_layers())), first);
    }
    let other_thread =
        std::thread::spawn(|| numbering(&UnionTree::build(scrambled_layers()))).join().unwrap();
    assert_eq!(other_thread, first);
}

#[test]
fn numbering_is_depth_first_in_name_order() {
    let tree = UnionTree::build(vec![layer(vec![file("b"), dir("a"), file("a/z"), file("a/y")])]);
    assert_eq!(tree.lookup(ROOT_INO, "a"), Some(2));
    assert_eq!(tree.lookup(2, "y"), Some(3));
    assert_eq!(tree.lookup(2, "z"), Some(4));
    assert_eq!(tree.lookup(ROOT_INO, "b"), Some(5));
}

#[test]
fn paths_lead_back_to_the_inode() {
    let tree = UnionTree::build(scrambled_layers());
    let usr = tree.lookup(ROOT_INO, "usr").unwrap();
    let f = tree.lookup(usr, "f010").unwrap();
    let paths = numbering(&tree).swap_remove(f as usize - 1).1;
    assert_eq!(paths, ["etc/hard", "usr/f010"]);
    for ino in 1..=tree.len() as u64 {
        for path in tree.paths_of(ino) {
            let end = path.iter().try_fold(ROOT_INO, |dir, (name, step)| {
                let found = tree.lookup(dir, name)?;
                (found == *step).then_some(found)
            });
            assert_eq!(end, Some(ino));
        }
    }
    assert_eq!(tree.path_of(ROOT_INO), Some(Vec::new()));
    assert!(tree.paths_of(0).is_empty());
    assert!(tree.paths_of(tree.len() as u64 + 1).is_empty());
}
