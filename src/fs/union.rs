//! The union tree: the merged view of a layer stack, built once in memory
//! from the layer indexes (no directory walks, no I/O), exactly as kernel
//! overlayfs shows the same layers as `lowerdir`s:
//!
//! * for each name, the topmost layer that mentions it decides;
//! * a whiteout hides the name in every layer below;
//! * a non-directory hides everything below; a directory merges with the
//!   directories of the same name below it, down to the first layer where the
//!   name is a non-directory (hidden) or where the directory is opaque;
//! * hardlinks of one layer share one inode; `nlink` is the layer's link
//!   count (overlayfs reports the lower file's); a directory merged from
//!   several layers has `nlink` 1 (overlayfs does not count), otherwise
//!   2 + its subdirectories in that layer.
//!
//! Inode numbers are indexes into the node table plus one (the root is 1):
//! stable for the life of the mount and the same for every mount of the same
//! layers. Nodes are numbered depth first, each directory's children in
//! bytewise name order (a `BTreeSet`); the hash maps of the build are only
//! looked up, never iterated, so nothing depends on hash order. A process
//! that takes over a FUSE connection relies on this: the kernel still holds
//! the numbers the previous process handed out.

use crate::layer::{Entry, EntryKind, LayerIndex};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

/// A node's place in the layer stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EntryRef {
    /// Index into the layer stack (0 = bottom).
    pub layer: u16,
    /// Index into that layer's `entries`.
    pub entry: u32,
}

/// One inode of the merged tree.
#[derive(Debug)]
pub struct Node {
    /// The entry that gives metadata and data; `None` for a directory that no
    /// layer lists explicitly (implied by a deeper path).
    pub source: Option<EntryRef>,
    /// Link count as `stat` reports it.
    pub nlink: u32,
    /// Parent directory's inode (the root is its own parent).
    pub parent: u64,
    /// For directories: children sorted by name, as (name, inode).
    pub children: Box<[(Box<str>, u64)]>,
    /// Is a directory.
    pub is_dir: bool,
}

/// The merged view of a layer stack.
pub struct UnionTree {
    layers: Vec<Arc<LayerIndex>>,
    nodes: Vec<Node>,
}

/// The inode number of the root directory.
pub const ROOT_INO: u64 = 1;

/// Per-layer lookup tables, only needed while building.
struct LayerView<'a> {
    by_path: HashMap<&'a str, u32>,
    opaque: HashSet<&'a str>,
    /// Child names of each directory path (including implied directories).
    children: HashMap<&'a str, Vec<&'a str>>,
    /// Number of names linking to each file entry (itself + its hardlinks).
    links: HashMap<u32, u32>,
}

/// What a layer says about a path.
enum Says {
    Nothing,
    Whiteout,
    Dir(Option<u32>),
    NonDir(u32),
}

impl<'a> LayerView<'a> {
    fn new(index: &'a LayerIndex) -> Self {
        let mut view = LayerView {
            by_path: HashMap::with_capacity(index.entries.len()),
            opaque: HashSet::new(),
            children: HashMap::new(),
            links: HashMap::new(),
        };
        view.ensure_dir("");
        for (i, entry) in index.entries.iter().enumerate() {
            let path: &str = &entry.path;
            match &entry.kind {
                EntryKind::Opaque => {
                    view.opaque.insert(path);
                    view.ensure_dir(path);
                    continue;
                }
                EntryKind::Hardlink { target } => {
                    if let Some(&t) = view.by_path.get(&**target) {
                        let t = resolve_link(index, t, &view.by_path);
                        *view.links.entry(t).or_insert(1) += 1;
                    }
                }
                _ => {}
            }
            view.by_path.insert(path, i as u32);
            if !path.is_empty() {
                let (parent, name) = split(path);
                view.ensure_dir(parent);
                view.children.entry(parent).or_default().push(name);
            }
        }
        // A directory listed explicitly after an implied mention appears twice.
        for names in view.children.values_mut() {
            names.sort_unstable();
            names.dedup();
        }
        view
    }

    /// Makes `dir` and its ancestors known directories of this layer.
    fn ensure_dir(&mut self, dir: &'a str) {
        if self.children.contains_key(dir) {
            return;
        }
        self.children.insert(dir, Vec::new());
        if !dir.is_empty() {
            let (parent, name) = split(dir);
            self.ensure_dir(parent);
            self.children.entry(parent).or_default().push(name);
        }
    }

    fn says(&self, index: &LayerIndex, path: &str) -> Says {
        match self.by_path.get(path) {
            Some(&i) => match index.entries[i as usize].kind {
                EntryKind::Whiteout => Says::Whiteout,
                EntryKind::Dir => Says::Dir(Some(i)),
                _ => Says::NonDir(i),
            },
            None if self.children.contains_key(path) || self.opaque.contains(path) => {
                Says::Dir(None)
            }
            None => Says::Nothing,
        }
    }
}

fn split(path: &str) -> (&str, &str) {
    path.rsplit_once('/').unwrap_or(("", path))
}

fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_string()
    } else {
        format!("{parent}/{name}")
    }
}

/// Follows hardlink entries to the file they name.
fn resolve_link(index: &LayerIndex, mut entry: u32, by_path: &HashMap<&str, u32>) -> u32 {
    for _ in 0..64 {
        match &index.entries[entry as usize].kind {
            EntryKind::Hardlink { target } => match by_path.get(&**target) {
                Some(&t) if t != entry => entry = t,
                _ => break,
            },
            _ => break,
        }
    }
    entry
}

struct Builder<'a> {
    layers: &'a [Arc<LayerIndex>],
    views: Vec<LayerView<'a>>,
    nodes: Vec<Node>,
    /// Inode of each (layer, file entry) already placed, so hardlinks share it.
    placed: HashMap<(u16, u32), u64>,
}

impl Builder<'_> {
    fn push(&mut self, node: Node) -> u64 {
        self.nodes.push(node);
        self.nodes.len() as u64
    }

    /// Fills in directory `ino` at `path`, merged from `stack` (top first).
    fn merge_dir(&mut self, ino: u64, path: &str, stack: &[usize]) {
        let mut names = BTreeSet::new();
        for &l in stack {
            if let Some(list) = self.views[l].children.get(path) {
                names.extend(list.iter().copied());
            }
        }
        let mut children = Vec::with_capacity(names.len());
        for name in names {
            let child_path = join(path, name);
            let mut dirs = Vec::new();
            let mut leaf = None;
            for &l in stack {
                match self.views[l].says(&self.layers[l], &child_path) {
                    Says::Nothing => continue,
                    Says::Whiteout => break,
                    Says::Dir(_) => {
                        dirs.push(l);
                        if self.views[l].opaque.contains(child_path.as_str()) {
                            break;
                        }
                    }
                    Says::NonDir(entry) => {
                        if dirs.is_empty() {
                            leaf = Some((l, entry));
                        }
                        break;
                    }
                }
            }
            let child = match (leaf, dirs.is_empty()) {
                (Some((l, entry)), _) => self.place_leaf(l, entry, ino),
                (None, false) => self.place_dir(&child_path, &dirs, ino),
                (None, true) => continue,
            };
            children.push((Box::<str>::from(name), child));
        }
        self.nodes[(ino - 1) as usize].children = children.into_boxed_slice();
    }

    fn place_leaf(&mut self, layer: usize, entry: u32, parent: u64) -> u64 {
        let index = &self.layers[layer];
        let target = resolve_link(index, entry, &self.views[layer].by_path);
        let key = (layer as u16, target);
        if let Some(&ino) = self.placed.get(&key) {
            return ino;
        }
        let nlink = self.views[layer].links.get(&target).copied().unwrap_or(1);
        let source = Some(EntryRef { layer: layer as u16, entry: target });
        let ino =
            self.push(Node { source, nlink, parent, children: Box::default(), is_dir: false });
        self.placed.insert(key, ino);
        ino
    }

    fn place_dir(&mut self, path: &str, stack: &[usize], parent: u64) -> u64 {
        // Metadata from the topmost layer that lists the directory itself.
        let source = stack.iter().find_map(|&l| match self.views[l].says(&self.layers[l], path) {
            Says::Dir(Some(entry)) => Some(EntryRef { layer: l as u16, entry }),
            _ => None,
        });
        let nlink = if stack.len() > 1 { 1 } else { 2 + self.subdirs(stack[0], path) };
        let ino = self.push(Node { source, nlink, parent, children: Box::default(), is_dir: true });
        self.merge_dir(ino, path, stack);
        ino
    }

    /// Subdirectories of `path` in one layer (as the extracted layer has them).
    fn subdirs(&self, layer: usize, path: &str) -> u32 {
        let view = &self.views[layer];
        let Some(names) = view.children.get(path) else { return 0 };
        names
            .iter()
            .filter(|n| matches!(view.says(&self.layers[layer], &join(path, n)), Says::Dir(_)))
            .count() as u32
    }
}

impl UnionTree {
    /// Merges `layers` (bottom first).
    pub fn build(layers: Vec<Arc<LayerIndex>>) -> Self {
        let views: Vec<LayerView<'_>> = layers.iter().map(|l| LayerView::new(l)).collect();
        let nodes = {
            let mut builder =
                Builder { layers: &layers, views, nodes: Vec::new(), placed: HashMap::new() };
            let mut stack: Vec<usize> = Vec::new();
            for l in (0..layers.len()).rev() {
                stack.push(l);
                if builder.views[l].opaque.contains("") {
                    break;
                }
            }
            builder.place_dir("", &stack, ROOT_INO);
            builder.nodes
        };
        UnionTree { layers, nodes }
    }

    /// The node of inode `ino`.
    pub fn node(&self, ino: u64) -> Option<&Node> {
        self.nodes.get(usize::try_from(ino).ok()?.checked_sub(1)?)
    }

    /// The layer entry behind `node`, if it has one.
    pub fn entry(&self, node: &Node) -> Option<&Entry> {
        let r = node.source?;
        self.layers.get(r.layer as usize)?.entries.get(r.entry as usize)
    }

    /// Looks `name` up in directory `parent`.
    pub fn lookup(&self, parent: u64, name: &str) -> Option<u64> {
        let children = &self.node(parent)?.children;
        children.binary_search_by(|(n, _)| (**n).cmp(name)).ok().map(|i| children[i].1)
    }

    /// The name of `ino` in directory `parent`, if it has one there.
    pub fn name_in(&self, parent: u64, ino: u64) -> Option<&str> {
        let children = &self.node(parent)?.children;
        children.iter().find(|(_, i)| *i == ino).map(|(name, _)| &**name)
    }

    /// The path of `ino` from the root through parent links, as (name,
    /// inode) steps (empty for the root). A hardlinked file is reached
    /// through the directory it was first placed in.
    pub fn path_of(&self, ino: u64) -> Option<Vec<(&str, u64)>> {
        let mut steps = Vec::new();
        let mut current = ino;
        while current != ROOT_INO {
            let parent = self.node(current)?.parent;
            steps.push((self.name_in(parent, current)?, current));
            current = parent;
        }
        steps.reverse();
        Some(steps)
    }

    /// Every path of `ino` (see [`path_of`](Self::path_of)). A file with
    /// several links is looked for in every directory: a one-off walk of
    /// the whole tree, for the rare caller that must find an inode by
    /// number (a process taking over a FUSE connection).
    pub fn paths_of(&self, ino: u64) -> Vec<Vec<(&str, u64)>> {
        let Some(node) = self.node(ino) else { return Vec::new() };
        if node.is_dir || node.nlink <= 1 {
            return self.path_of(ino).into_iter().collect();
        }
        let mut paths = Vec::new();
        for (i, dir) in self.nodes.iter().enumerate().filter(|(_, n)| n.is_dir) {
            for (name, _) in dir.children.iter().filter(|(_, child)| *child == ino) {
                if let Some(mut path) = self.path_of(i as u64 + 1) {
                    path.push((&**name, ino));
                    paths.push(path);
                }
            }
        }
        paths
    }

    /// Number of inodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Always false: the root exists.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The layer stack.
    pub fn layers(&self) -> &[Arc<LayerIndex>] {
        &self.layers
    }
}

#[cfg(test)]
mod tests;
