//! The mount descriptions a snapshot is used through, computed as data (the
//! snapshotter never mounts anything itself), with containerd's overlay rules.

use std::path::Path;

use super::Kind;

/// One mount to perform, in containerd's `mount.Mount` shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    /// The filesystem type: `"overlay"` or `"bind"`.
    pub kind: String,
    /// What to mount: a directory for `bind`, `"overlay"` for overlay.
    pub source: String,
    /// Mount options, e.g. `ro`, `rbind`, `lowerdir=…`.
    pub options: Vec<String>,
}

/// A bind mount of `dir`, read-only or not.
pub(crate) fn bind(dir: &Path, read_only: bool) -> Mount {
    Mount {
        kind: "bind".to_owned(),
        source: dir.to_string_lossy().into_owned(),
        options: vec![if read_only { "ro" } else { "rw" }.to_owned(), "rbind".to_owned()],
    }
}

/// The mounts of a snapshot of `kind` whose own dir is `dir` (holding `fs`
/// and `work`) on top of `parents`' dirs, nearest parent first.
pub(crate) fn mounts_for(kind: Kind, dir: &Path, parents: &[&Path]) -> Vec<Mount> {
    let fs = |d: &Path| d.join("fs").to_string_lossy().into_owned();
    let lowerdir = || {
        let lowers: Vec<String> = parents.iter().map(|p| fs(p)).collect();
        format!("lowerdir={}", lowers.join(":"))
    };
    match (kind, parents) {
        (Kind::Active, []) => vec![bind(&dir.join("fs"), false)],
        (_, []) => vec![bind(&dir.join("fs"), true)],
        (Kind::View, [only]) => vec![bind(&only.join("fs"), true)],
        (Kind::Active, _) => vec![Mount {
            kind: "overlay".to_owned(),
            source: "overlay".to_owned(),
            options: vec![
                format!("workdir={}", dir.join("work").to_string_lossy()),
                format!("upperdir={}", fs(dir)),
                lowerdir(),
            ],
        }],
        (_, _) => vec![Mount {
            kind: "overlay".to_owned(),
            source: "overlay".to_owned(),
            options: vec![lowerdir()],
        }],
    }
}
