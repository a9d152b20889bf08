//! Snapshots of a whole mounted tree, and their differences.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use rustix::fs::{self as rfs, Mode, OFlags};

use super::exec::{describe_meta, errno_name, user_xattr_names, Fail, R};
use super::join;

/// A line per path of the tree under `mountpoint` (the root is `/`):
/// `describe_meta`, plus symlink targets, sha256 of regular files, `user.`
/// xattrs of files and dirs, and for non-directories sharing an inode the
/// sorted list of the group's paths (grouping compared, not inode numbers).
/// Walks with `*at()` calls on directory fds and never follows a symlink.
pub fn snapshot(mountpoint: &Path, recent: i64) -> BTreeMap<String, String> {
    let root =
        rfs::open(mountpoint, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
            .unwrap_or_else(|e| panic!("open {}: {e}", mountpoint.display()));
    let mut tree = Tree { recent, lines: BTreeMap::new(), inodes: HashMap::new() };
    let meta = File::from(root.try_clone().unwrap()).metadata().unwrap();
    let line = describe_meta(&meta, recent) + &xattr_suffix(&root);
    tree.lines.insert("/".to_string(), line);
    tree.walk(&root, "");
    for group in tree.inodes.values_mut().filter(|g| g.len() > 1) {
        group.sort();
        let members = group.join(",");
        for path in group.iter() {
            if let Some(line) = tree.lines.get_mut(path) {
                line.push_str(&format!(" links=[{members}]"));
            }
        }
    }
    tree.lines
}

struct Tree {
    recent: i64,
    lines: BTreeMap<String, String>,
    /// (st_dev, st_ino) of non-directories → their paths.
    inodes: HashMap<(u64, u64), Vec<String>>,
}

impl Tree {
    /// Adds a line per entry below `dir`. What cannot be read becomes an
    /// `ERROR` line (a broken candidate must show up as a difference, not
    /// abort the run).
    fn walk(&mut self, dir: &OwnedFd, rel: &str) {
        let mut names = Vec::new();
        let entries = match rfs::Dir::read_from(dir) {
            Ok(entries) => entries,
            Err(e) => {
                self.lines.insert(format!("{rel}/"), format!("ERROR readdir: {}", errno_name(e)));
                return;
            }
        };
        for entry in entries {
            match entry {
                Ok(entry) => names.push(entry.file_name().to_string_lossy().into_owned()),
                Err(e) => {
                    let error = format!("ERROR readdir: {}", errno_name(e));
                    self.lines.insert(format!("{rel}/"), error);
                    break;
                }
            }
        }
        names.retain(|n| n != "." && n != "..");
        names.sort();
        for name in names {
            let path = join(rel, &name);
            let line = match self.entry(dir, &name, &path) {
                Ok(line) => line,
                Err(Fail::Errno(e)) => format!("ERROR {}", errno_name(e)),
                Err(Fail::Note(s)) => format!("ERROR {s}"),
            };
            self.lines.insert(path, line);
        }
    }

    fn entry(&mut self, dir: &OwnedFd, name: &str, path: &str) -> R<String> {
        let at = |flags: OFlags| {
            rfs::openat(dir, name, flags | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())
        };
        let meta = File::from(at(OFlags::PATH)?).metadata()?;
        let ft = meta.file_type();
        let mut line = describe_meta(&meta, self.recent);
        if ft.is_symlink() {
            let target = rfs::readlinkat(dir, name, Vec::new())?;
            line += &format!(" target={:?}", target.to_string_lossy());
        } else if ft.is_file() {
            let fd = at(OFlags::RDONLY)?;
            line += &xattr_suffix(&fd);
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut File::from(fd), &mut data)?;
            line += &format!(" sha256={}", crate::common::sha256_hex(&data));
        } else if ft.is_dir() {
            let fd = at(OFlags::RDONLY | OFlags::DIRECTORY)?;
            line += &xattr_suffix(&fd);
            self.walk(&fd, path);
        }
        if !ft.is_dir() {
            self.inodes.entry((meta.dev(), meta.ino())).or_default().push(path.to_string());
        }
        Ok(line)
    }
}

/// ` xattrs=[name=hex,…]` of the `user.` xattrs of an open file or dir.
fn xattr_suffix(fd: &impl AsFd) -> String {
    let mut names = vec![0u8; 64 * 1024];
    let n = rfs::flistxattr(fd, &mut names[..]).unwrap_or(0);
    let mut shown = Vec::new();
    for name in user_xattr_names(&names[..n]) {
        let mut value = vec![0u8; 64 * 1024];
        let len = rfs::fgetxattr(fd, name.as_str(), &mut value[..]).unwrap_or(0);
        shown.push(format!("{name}={}", hex::encode(&value[..len])));
    }
    if shown.is_empty() {
        String::new()
    } else {
        format!(" xattrs=[{}]", shown.join(","))
    }
}

/// A path whose line differs between two snapshots (`None`: missing).
#[derive(Clone, Debug)]
pub struct TreeDiff {
    pub path: String,
    pub a: Option<String>,
    pub b: Option<String>,
}

/// Differences between two snapshots, in path order.
pub fn diff_trees(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> Vec<TreeDiff> {
    let paths: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    paths
        .into_iter()
        .filter(|p| a.get(*p) != b.get(*p))
        .map(|p| TreeDiff { path: p.clone(), a: a.get(p).cloned(), b: b.get(p).cloned() })
        .collect()
}

/// Names of what differs between two outcome or snapshot lines: `result`
/// (ok versus an errno), the `name=` of a differing field, `value` for
/// other tokens, `presence` when one side has no line. The lines are
/// compared segment by segment (` | `); only the first differing segment
/// counts. Used to tell one bug from another while shrinking.
pub fn differing_fields(a: Option<&str>, b: Option<&str>) -> String {
    let (Some(a), Some(b)) = (a, b) else {
        return "presence".into();
    };
    let Some((seg, (sa, sb))) =
        a.split(" | ").zip(b.split(" | ")).enumerate().find(|(_, (x, y))| x != y)
    else {
        return "segments".into();
    };
    let mut fields: Vec<String> = Vec::new();
    let (ta, tb): (Vec<&str>, Vec<&str>) =
        (sa.split_whitespace().collect(), sb.split_whitespace().collect());
    for (i, (x, y)) in ta.iter().zip(&tb).enumerate().filter(|(_, (x, y))| x != y) {
        let name = match (x.split_once('='), y.split_once('=')) {
            (Some((nx, _)), Some((ny, _))) if nx == ny => nx.to_string(),
            _ if i == 0 && seg == 0 => "result".into(),
            _ if i == 0 => "type".into(),
            _ => "value".into(),
        };
        if !fields.contains(&name) {
            fields.push(name);
        }
    }
    if ta.len() != tb.len() {
        fields.push("shape".into());
    }
    format!("{} {}", if seg == 0 { "result" } else { "state" }, fields.join(","))
}
