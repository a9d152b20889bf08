//! Taking over a connection: a second overlay over the same image and upper
//! (the "new process") serves the inode and handle numbers the first one
//! handed out, as if it had handed them out itself.

use super::*;
use crate::cache::SpanCache;
use crate::digest::Digest;
use crate::fs::union::UnionTree;
use crate::layer::{build_index, LayerReader, LocalBlob};
use std::io::Write;

/// The image: one plain tar layer, written to `dir/layer.tar`.
fn image(dir: &std::path::Path) -> ImageFs {
    let path = dir.join("layer.tar");
    if !path.exists() {
        let mut b = tar::Builder::new(Vec::new());
        let header = |kind, mode, size| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(1_700_000_000);
            h.set_size(size);
            h
        };
        let dirs = ["etc", "usr", "usr/share", "usr/share/doc", "keep", "deep", "deep/er"];
        for d in dirs {
            b.append_data(&mut header(tar::EntryType::Directory, 0o755, 0), d, &[][..]).unwrap();
        }
        let files: [(&str, &[u8]); 6] = [
            ("etc/hostname", b"hello"),
            ("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
            ("usr/share/doc/readme", b"read me"),
            ("keep/gone", b"soon deleted"),
            ("deep/er/leaf", b"leaf"),
            ("data.bin", &[7; 10_000]),
        ];
        for (name, data) in files {
            let mut h = header(tar::EntryType::Regular, 0o644, data.len() as u64);
            b.append_data(&mut h, name, data).unwrap();
        }
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        b.append_link(&mut h, "etc/link", "hostname").unwrap();
        let mut h = header(tar::EntryType::Link, 0o644, 0);
        b.append_link(&mut h, "keep/hard", "etc/hostname").unwrap();
        let bytes = b.into_inner().unwrap();
        std::fs::File::create(&path).unwrap().write_all(&bytes).unwrap();
    }
    let bytes = std::fs::read(&path).unwrap();
    let index = Arc::new(build_index(&bytes[..], &Digest::of(&bytes)).unwrap());
    let blob = Arc::new(LocalBlob(std::fs::File::open(&path).unwrap()));
    let reader = LayerReader::with_index(index.clone(), blob, Arc::new(SpanCache::new(1 << 24)));
    ImageFs::new(UnionTree::build(vec![index]), vec![reader])
}

/// A new overlay ("process") over the image in `dir` and its upper.
fn process(dir: &std::path::Path) -> Overlay {
    let dirs = UpperDirs { upper: dir.join("upper"), work: dir.join("work") };
    Overlay::new(image(dir), &dirs).unwrap()
}

const ROOT: Caller = Caller { uid: 0, gid: 0 };

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

/// Looks a slash-separated path up from the root.
fn walk(overlay: &Overlay, path: &str) -> u64 {
    path.split('/').fold(ROOT_INO, |dir, name| overlay.lookup(dir, os(name)).unwrap().ino.0)
}

/// What must not change across a takeover (not atime: reads move it).
fn facts(attr: &FileAttr) -> (u64, FileType, u64, u16, u32, u32, SystemTime) {
    (attr.ino.0, attr.kind, attr.size, attr.perm, attr.nlink, attr.uid, attr.mtime)
}

fn errno(e: FsError) -> fuser::Errno {
    e.errno()
}

fn names(entries: &[(u64, OsString, FileAttr)]) -> Vec<(String, u64)> {
    entries.iter().map(|(_, n, a)| (n.to_string_lossy().into_owned(), a.ino.0)).collect()
}

#[test]
fn a_new_process_serves_the_old_inodes_and_handles() {
    let tmp = tempfile::tempdir().unwrap();
    let old = process(tmp.path());
    // Lower objects, untouched and copied up.
    let etc = walk(&old, "etc");
    let hostname = walk(&old, "etc/hostname");
    let hard = walk(&old, "keep/hard");
    assert_eq!(hard, hostname);
    let link = walk(&old, "etc/link");
    let read_fh = old.open(hostname, libc::O_RDONLY).unwrap();
    let passwd = walk(&old, "etc/passwd");
    let passwd_fh = old.open(passwd, libc::O_RDWR).unwrap();
    old.write(passwd, passwd_fh, 0, b"ROOT").unwrap();
    let data = walk(&old, "data.bin");
    old.set_attr(data, None, SetAttr { mode: Some(0o600), ..Default::default() }).unwrap();
    // New objects, a deep one among them.
    let (new_attr, new_fh) = old
        .create(ROOT_INO, os("new.txt"), NewObject::File { mode: 0o644, flags: libc::O_RDWR }, ROOT)
        .unwrap();
    let (new, new_fh) = (new_attr.ino.0, new_fh.unwrap());
    old.write(new, new_fh, 0, b"fresh").unwrap();
    let (a, _) = old.create(ROOT_INO, os("a"), NewObject::Dir { mode: 0o755 }, ROOT).unwrap();
    let (b, _) = old.create(a.ino.0, os("b"), NewObject::Dir { mode: 0o700 }, ROOT).unwrap();
    let file = NewObject::File { mode: 0o600, flags: libc::O_WRONLY };
    let (inner, inner_fh) = old.create(b.ino.0, os("inner"), file, ROOT).unwrap();
    let inner_fh = inner_fh.unwrap();
    old.write(inner.ino.0, inner_fh, 0, b"inside").unwrap();
    assert!(inner.ino.0 >= old.upper_base && inner.ino.0 < SPARE_INOS);
    // A lower file below a renamed lower directory, found through its redirect.
    let readme = walk(&old, "usr/share/doc/readme");
    let readme_fh = old.open(readme, libc::O_RDONLY).unwrap();
    let share = walk(&old, "usr/share");
    old.rename(share, os("doc"), ROOT_INO, os("docs"), fuser::RenameFlags::empty()).unwrap();
    // A copied-up file renamed (found through its origin), a metacopy
    // file renamed (through its redirect).
    old.rename(etc, os("passwd"), ROOT_INO, os("pw"), fuser::RenameFlags::empty()).unwrap();
    old.rename(ROOT_INO, os("data.bin"), a.ino.0, os("data"), fuser::RenameFlags::empty()).unwrap();
    // Deleted: a lower file, and a lower name replaced by a new object.
    let gone = walk(&old, "keep/gone");
    let keep = walk(&old, "keep");
    old.unlink(keep, os("gone")).unwrap();
    let leaf = walk(&old, "deep/er/leaf");
    let er = walk(&old, "deep/er");
    old.unlink(er, os("leaf")).unwrap();
    old.create(er, os("leaf"), NewObject::Dir { mode: 0o755 }, ROOT).unwrap();

    let known = [
        etc,
        hostname,
        link,
        passwd,
        data,
        new,
        a.ino.0,
        b.ino.0,
        inner.ino.0,
        readme,
        share,
        keep,
        er,
    ];
    let before: Vec<_> = known.iter().map(|&ino| facts(&old.attr(ino, None).unwrap())).collect();
    let listing = names(&old.dir_entries(etc, 0).unwrap());
    let old_fhs = [read_fh, passwd_fh, new_fh, inner_fh, readme_fh];
    drop(old);

    // Every inode separately, each the first request of a fresh process.
    for (&ino, before) in known.iter().zip(&before) {
        let fresh = process(tmp.path());
        assert_eq!(&facts(&fresh.attr(ino, None).unwrap()), before, "inode {ino}");
    }
    let new_process = process(tmp.path());
    for (&ino, before) in known.iter().zip(&before).rev() {
        assert_eq!(&facts(&new_process.attr(ino, None).unwrap()), before, "inode {ino}");
    }
    assert_eq!(names(&process(tmp.path()).dir_entries(etc, 0).unwrap()), listing);
    let fresh = process(tmp.path());
    assert_eq!(fresh.lookup(b.ino.0, os("inner")).unwrap().ino, inner.ino);
    assert_eq!(fresh.readlink(link).unwrap(), b"hostname");
    let fresh = process(tmp.path());
    assert_eq!(fresh.xattr_names(data).unwrap(), b"");

    // The old handles, unknown to every fresh process.
    let fresh = process(tmp.path());
    assert_eq!(fresh.read(hostname, read_fh, 0, 100).unwrap(), b"hello");
    assert_eq!(fresh.read(readme, readme_fh, 0, 100).unwrap(), b"read me");
    let fresh = process(tmp.path());
    assert_eq!(&fresh.read(passwd, passwd_fh, 0, 8).unwrap(), b"ROOT:x:0");
    let fresh = process(tmp.path());
    assert_eq!(fresh.write(new, new_fh, 5, b"er").unwrap(), 2);
    assert_eq!(fresh.read(new, new_fh, 0, 100).unwrap(), b"fresher");
    fresh.fsync(new, new_fh, false).unwrap();
    fresh.fallocate(new, new_fh, 0, 4096, 0).unwrap();
    let fresh = process(tmp.path());
    fresh.fsync(inner.ino.0, inner_fh, true).unwrap();
    let set = SetAttr { size: Some(3), ..Default::default() };
    assert_eq!(fresh.set_attr(inner.ino.0, Some(inner_fh), set).unwrap().size, 3);
    assert_eq!(fresh.read(inner.ino.0, inner_fh, 0, 100).unwrap(), b"ins");
    assert_eq!(fresh.attr(inner.ino.0, Some(inner_fh)).unwrap().size, 3);
    // Closing what it never opened is fine; so is reading it again after.
    for fh in old_fhs {
        fresh.release(fh);
    }
    // Handles it opens never take an old number.
    let mine = fresh.open(hostname, libc::O_RDONLY).unwrap();
    assert!(old_fhs.iter().all(|&old| mine > old), "{mine} vs {old_fhs:?}");

    // The deleted ones are stale, everywhere they are named.
    let fresh = process(tmp.path());
    for ino in [gone, leaf, SPARE_INOS + 1, fresh.upper_base + (1 << 40), 0] {
        assert_eq!(errno(fresh.attr(ino, None).unwrap_err()), fuser::Errno::ESTALE, "{ino}");
        let err = fresh.lookup(ino, os("x")).unwrap_err();
        assert_eq!(errno(err), fuser::Errno::ESTALE);
        let err = fresh.read(ino, 12345, 0, 1).unwrap_err();
        assert_eq!(errno(err), fuser::Errno::ESTALE);
    }
    // What replaced them has a number of its own.
    assert_ne!(walk(&fresh, "deep/er/leaf"), leaf);
}

#[test]
fn lookups_and_listings_under_an_unknown_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let old = process(tmp.path());
    let (d, _) = old.create(ROOT_INO, os("made"), NewObject::Dir { mode: 0o755 }, ROOT).unwrap();
    let file = NewObject::File { mode: 0o644, flags: libc::O_WRONLY };
    let (f, _) = old.create(d.ino.0, os("f"), file, ROOT).unwrap();
    let symlink = NewObject::Symlink { target: "f".into() };
    let (s, _) = old.create(d.ino.0, os("s"), symlink, ROOT).unwrap();
    let keep = walk(&old, "keep");
    let listing = names(&old.dir_entries(keep, 0).unwrap());
    let made = names(&old.dir_entries(d.ino.0, 0).unwrap());
    drop(old);

    let fresh = process(tmp.path());
    assert_eq!(fresh.lookup(d.ino.0, os("f")).unwrap().ino, f.ino);
    assert_eq!(fresh.lookup(d.ino.0, os("s")).unwrap().ino, s.ino);
    assert_eq!(names(&fresh.dir_entries(d.ino.0, 0).unwrap()), made);
    let fresh = process(tmp.path());
    assert_eq!(names(&fresh.dir_entries(keep, 0).unwrap()), listing);
    // Unknown directories as targets of namespace changes.
    let fresh = process(tmp.path());
    fresh.rename(keep, os("hard"), d.ino.0, os("h"), fuser::RenameFlags::empty()).unwrap();
    let fresh = process(tmp.path());
    let h = fresh.lookup(d.ino.0, os("h")).unwrap();
    assert_eq!(h.size, 5);
    let fresh = process(tmp.path());
    fresh.unlink(d.ino.0, os("s")).unwrap();
    assert_eq!(errno(process(tmp.path()).attr(s.ino.0, None).unwrap_err()), fuser::Errno::ESTALE);
}

#[test]
fn new_handle_numbers_start_past_the_old_ones() {
    let first = files::Handles::default();
    let a = first.add(1, Handle::Lower(1), 0);
    let b = first.add(1, Handle::Lower(1), 0);
    assert_eq!(b, a + 1);
    // A process taking over starts later (microseconds at the very least).
    std::thread::sleep(Duration::from_micros(10));
    let second = files::Handles::default();
    assert!(second.add(1, Handle::Lower(1), 0) > b);
}

#[test]
fn a_gone_number_is_not_handed_out_again() {
    let tmp = tempfile::tempdir().unwrap();
    let old = process(tmp.path());
    let file = NewObject::File { mode: 0o644, flags: libc::O_WRONLY };
    let (f, _) = old.create(ROOT_INO, os("f"), file, ROOT).unwrap();
    old.unlink(ROOT_INO, os("f")).unwrap();
    drop(old);

    let fresh = process(tmp.path());
    assert_eq!(errno(fresh.attr(f.ino.0, None).unwrap_err()), fuser::Errno::ESTALE);
    // The kernel still holds the number: a new object whose upper inode
    // number is the old one's gets a spare number instead.
    let mut stat = fresh.upper.root.stat(OsStr::new("")).unwrap();
    stat.st_ino = f.ino.0 - fresh.upper_base;
    let mut st = fresh.lock();
    assert!(fresh.fresh_ino(&mut st, &stat) > SPARE_INOS);
}
