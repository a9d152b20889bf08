//! Round trips through the indexing pass and random reads, for every
//! compression, plus the bad inputs each must reject.

use super::*;
use crate::cache::SpanCache;
use std::io::Write;
use std::sync::Arc;

/// Compressible but not trivially so: a repeating text with a counter.
fn big_data(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 64);
    let mut i: u64 = 0;
    while out.len() < len {
        let x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
        writeln!(out, "line {i} value {x:x} lorem ipsum").unwrap();
        i += 1;
    }
    out.truncate(len);
    out
}

/// A GNU header of `kind` and `mode`, owned by 1000:1000, size 0 (also the
/// eStargz tests' base header).
pub(super) fn header(kind: tar::EntryType, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(1000);
    h.set_gid(1000);
    h.set_mtime(1_700_000_000);
    h.set_size(0);
    h
}

/// A whiteout, an opaque marker, a name over 100 bytes and a char device,
/// with headers from `header` (the eStargz tests' sample has them too).
pub(super) fn append_odd_entries(
    b: &mut tar::Builder<Vec<u8>>,
    header: fn(tar::EntryType, u32) -> tar::Header,
) {
    let mut h = header(tar::EntryType::Regular, 0);
    b.append_data(&mut h, "etc/.wh.gone", &[][..]).unwrap();
    let mut h = header(tar::EntryType::Regular, 0);
    b.append_data(&mut h, "opaque/.wh..wh..opq", &[][..]).unwrap();
    let long = format!("deep/{}/file", "n".repeat(200));
    let mut h = header(tar::EntryType::Regular, 0o600);
    h.set_size(3);
    b.append_data(&mut h, &long, &b"abc"[..]).unwrap();
    let mut h = header(tar::EntryType::Char, 0o600);
    h.set_device_major(1).unwrap();
    h.set_device_minor(3).unwrap();
    b.append_data(&mut h, "dev/null", &[][..]).unwrap();
}

fn sample_tar(big: &[u8]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = header(tar::EntryType::Directory, 0o755);
    b.append_data(&mut h, "./etc/", &[][..]).unwrap();
    let mut h = header(tar::EntryType::Regular, 0o644);
    h.set_size(5);
    b.append_data(&mut h, "./etc/hostname", &b"hello"[..]).unwrap();
    let mut h = header(tar::EntryType::Regular, 0o4755);
    h.set_size(big.len() as u64);
    b.append_data(&mut h, "big.bin", big).unwrap();
    let mut h = header(tar::EntryType::Symlink, 0o777);
    b.append_link(&mut h, "etc/link", "/etc/hostname").unwrap();
    let mut h = header(tar::EntryType::Link, 0o644);
    b.append_link(&mut h, "etc/hard", "etc/hostname").unwrap();
    append_odd_entries(&mut b, header);
    b.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn zstd_frames(data: &[u8], frame: usize) -> Vec<u8> {
    data.chunks(frame).flat_map(|c| ::zstd::encode_all(c, 3).unwrap()).collect()
}

struct Opened {
    reader: LayerReader,
    _dir: tempfile::TempDir,
}

fn open(blob: &[u8]) -> Result<Opened, LayerError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("blob");
    std::fs::write(&path, blob).unwrap();
    let digest = Digest::of(blob);
    let cache = Arc::new(SpanCache::new(64 << 20));
    let reader = LayerReader::open(&path, &digest, &dir.path().join("idx"), cache)?;
    Ok(Opened { reader, _dir: dir })
}

fn check_layer(blob: &[u8], tar: &[u8], big: &[u8]) -> LayerReader {
    let opened = open(blob).unwrap();
    let reader = opened.reader;
    let index = reader.index().clone();
    assert_eq!(index.diff_id, Digest::of(tar));
    assert_eq!(index.uncompressed_size, tar.len() as u64);
    let find = |p: &str| index.entries.iter().find(|e| &*e.path == p).unwrap();
    let EntryKind::File { offset, size } = find("big.bin").kind else { panic!("not a file") };
    assert_eq!(size, big.len() as u64);
    assert_eq!(find("big.bin").mode, 0o4755);
    assert_eq!(find("etc/gone").kind, EntryKind::Whiteout);
    assert_eq!(find("opaque").kind, EntryKind::Opaque);
    assert_eq!(find("etc/hard").kind, EntryKind::Hardlink { target: "etc/hostname".into() });
    assert_eq!(find("etc/link").kind, EntryKind::Symlink { target: "/etc/hostname".into() });
    assert_eq!(find("dev/null").kind, EntryKind::CharDevice { rdev: libc::makedev(1, 3) });
    assert!(index.entries.iter().any(|e| e.path.len() > 200));
    // Deterministic pseudo-random reads, across span boundaries and at the end.
    let mut state: u64 = 42;
    let mut next = |m: u64| {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 33) % m
    };
    for _ in 0..200 {
        let start = next(size);
        let len = next(3 << 20).min(size - start) as usize;
        let mut buf = vec![0; len];
        assert_eq!(reader.read_at(offset + start, &mut buf).unwrap(), len);
        assert!(buf == big[start as usize..start as usize + len], "mismatch at {start}+{len}");
    }
    for pos in
        [0, SPAN_SIZE as u64 - 1, SPAN_SIZE as u64, size - 1].into_iter().filter(|&p| p < size)
    {
        let mut b = [0u8; 2];
        assert_eq!(reader.read_at(offset + pos, &mut b).unwrap(), 2);
        let end = (pos as usize + 2).min(big.len());
        assert_eq!(&b[..end - pos as usize], &big[pos as usize..end]);
    }
    let mut tail = [0u8; 10];
    assert_eq!(reader.read_at(tar.len() as u64 - 3, &mut tail).unwrap(), 3);
    assert_eq!(reader.read_at(tar.len() as u64, &mut tail).unwrap(), 0);
    reader
}

#[test]
fn gzip_layer_reads_back() {
    let big = big_data(13 << 20);
    let tar = sample_tar(&big);
    let reader = check_layer(&gzip(&tar), &tar, &big);
    let AccessMap::Gzip(map) = &reader.index().access else { panic!("not gzip") };
    assert!(map.checkpoints.len() >= 3, "{} checkpoints", map.checkpoints.len());
}

#[test]
fn multi_member_gzip_reads_back() {
    let big = big_data(9 << 20);
    let tar = sample_tar(&big);
    let blob: Vec<u8> = tar.chunks(3 << 20).flat_map(gzip).collect();
    check_layer(&blob, &tar, &big);
}

#[test]
fn zstd_single_and_multi_frame_read_back() {
    let big = big_data(11 << 20);
    let tar = sample_tar(&big);
    check_layer(&zstd_frames(&tar, usize::MAX), &tar, &big);
    check_layer(&zstd_frames(&tar, 1 << 20), &tar, &big);
}

#[test]
fn plain_tar_reads_back() {
    let big = big_data(1 << 20);
    let tar = sample_tar(&big);
    check_layer(&tar, &tar, &big);
}

#[test]
fn persisted_index_is_reused_and_corrupt_one_rebuilt() {
    let big = big_data(1 << 20);
    let blob = gzip(&sample_tar(&big));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("blob");
    std::fs::write(&path, &blob).unwrap();
    let digest = Digest::of(&blob);
    let idx = dir.path().join("idx");
    let cache = Arc::new(SpanCache::new(1 << 20));
    let first = LayerReader::open(&path, &digest, &idx, cache.clone()).unwrap();
    let loaded = load_index(&idx, &digest).expect("persisted");
    assert_eq!(loaded.entries, first.index().entries);
    let file = persist::index_path(&idx, &digest);
    std::fs::write(&file, b"RMIDX\0garbage").unwrap();
    assert!(load_index(&idx, &digest).is_none());
    let again = LayerReader::open(&path, &digest, &idx, cache).unwrap();
    assert_eq!(again.index().entries, first.index().entries);
}

fn expect_err(blob: &[u8]) -> String {
    match open(blob) {
        Ok(_) => panic!("bad blob was accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn rejects_bad_layers() {
    let tar = sample_tar(&big_data(200_000));
    let gz = gzip(&tar);
    let msg = expect_err(&gz[..gz.len() / 2]);
    assert!(msg.contains("truncated"), "{msg}");
    let zs = zstd_frames(&tar, usize::MAX);
    let msg = expect_err(&zs[..zs.len() / 2]);
    assert!(msg.contains("truncated") || msg.contains("zstd"), "{msg}");
    let mut bad = gz.clone();
    bad[gz.len() / 2] ^= 0xff;
    expect_err(&bad);

    for name in ["../../etc/passwd", "/abs"] {
        let mut h = header(tar::EntryType::Regular, 0o644);
        h.set_size(1);
        // Bypass the builder's own path checks: write the name raw.
        let mut raw = h.as_bytes().to_vec();
        raw[..100].fill(0);
        raw[..name.len()].copy_from_slice(name.as_bytes());
        let mut h = tar::Header::from_byte_slice(&raw).clone();
        h.set_cksum();
        let mut t = h.as_bytes().to_vec();
        t.extend_from_slice(b"x");
        t.resize(512 * 2, 0);
        t.resize(512 * 4, 0);
        let msg = expect_err(&t);
        assert!(msg.contains(name) && msg.contains("escapes"), "{msg}");
    }

    let mut b = tar::Builder::new(Vec::new());
    let mut h = header(tar::EntryType::Link, 0o644);
    b.append_link(&mut h, "a", "missing").unwrap();
    let msg = expect_err(&b.into_inner().unwrap());
    assert!(msg.contains("missing"), "{msg}");
}

#[test]
fn entries_stay_compact() {
    assert!(std::mem::size_of::<Entry>() <= 96, "{}", std::mem::size_of::<Entry>());
}

#[test]
fn later_duplicate_wins() {
    let mut b = tar::Builder::new(Vec::new());
    for body in [&b"one"[..], &b"three"[..]] {
        let mut h = header(tar::EntryType::Regular, 0o644);
        h.set_size(body.len() as u64);
        b.append_data(&mut h, "f", body).unwrap();
    }
    let tar = b.into_inner().unwrap();
    let opened = open(&tar).unwrap();
    let entries = &opened.reader.index().entries;
    assert_eq!(entries.len(), 1);
    assert!(matches!(entries[0].kind, EntryKind::File { size: 5, .. }));
}

mod random_reads {
    use super::*;
    use proptest::prelude::*;
    use std::sync::OnceLock;

    /// The original bytes, and readers of layers holding them at an offset.
    type Fixtures = (Vec<u8>, Vec<(LayerReader, u64)>);

    /// One gzip and one zstd layer over the same 12 MiB file, built once.
    /// (The temp dirs go away at once: the readers keep their blobs open.)
    fn fixtures() -> &'static Fixtures {
        static FIXTURES: OnceLock<Fixtures> = OnceLock::new();
        FIXTURES.get_or_init(|| {
            let big = big_data(12 << 20);
            let tar = sample_tar(&big);
            let readers = [gzip(&tar), zstd_frames(&tar, 5 << 20)]
                .iter()
                .map(|blob| {
                    let opened = open(blob).unwrap();
                    let offset = opened
                        .reader
                        .index()
                        .entries
                        .iter()
                        .find_map(|e| match (&*e.path, &e.kind) {
                            ("big.bin", EntryKind::File { offset, .. }) => Some(*offset),
                            _ => None,
                        })
                        .unwrap();
                    (opened.reader, offset)
                })
                .collect();
            (big, readers)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn any_range_reads_the_original_bytes(start in 0usize..(12 << 20), len in 0usize..(9 << 20)) {
            let (big, readers) = fixtures();
            let len = len.min(big.len() - start);
            for (reader, offset) in readers {
                let mut buf = vec![0; len];
                let n = reader.read_at(offset + start as u64, &mut buf).unwrap();
                prop_assert_eq!(n, len);
                prop_assert!(buf == big[start..start + len]);
            }
        }
    }
}
