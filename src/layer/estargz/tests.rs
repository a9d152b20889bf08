//! eStargz from the TOC: the footer parser, the index a TOC gives (compared
//! with the tar scan of the same blob), chunk placement in both member
//! layouts, and corrupt chunks and TOCs refused.

use super::*;
use crate::cache::SpanCache;
use crate::layer::{build_index, decode_index, encode_index, LayerReader, LocalBlob};
use std::sync::Arc;

/// The integration tests' eStargz writer (external crates only).
#[path = "../../../tests/common/estargz.rs"]
mod writer;

use writer::{footer, to_estargz, to_estargz_with, Estargz, Layout};

fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// The layer tests' header, but with gid 100 (not the uid).
fn header(kind: tar::EntryType, mode: u32) -> tar::Header {
    let mut h = crate::layer::tests::header(kind, mode);
    h.set_gid(100);
    h
}

/// A layer with every kind of entry; `big.bin` spans several chunks.
fn sample_tar(big: &[u8]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = header(tar::EntryType::Directory, 0o755);
    b.append_data(&mut h, "./etc/", &[][..]).unwrap();
    let mut h = header(tar::EntryType::Regular, 0o644);
    h.set_size(5);
    b.append_data(&mut h, "./etc/hostname", &b"hello"[..]).unwrap();
    b.append_pax_extensions([("SCHILY.xattr.user.b", &b"2"[..]), ("SCHILY.xattr.user.a", b"1")])
        .unwrap();
    let mut h = header(tar::EntryType::Regular, 0o4755);
    h.set_size(big.len() as u64);
    b.append_data(&mut h, "big.bin", big).unwrap();
    let mut h = header(tar::EntryType::Regular, 0o600);
    b.append_data(&mut h, "etc/empty", &[][..]).unwrap();
    let mut h = header(tar::EntryType::Symlink, 0o777);
    b.append_link(&mut h, "etc/link", "/etc/hostname").unwrap();
    let mut h = header(tar::EntryType::Link, 0o644);
    b.append_link(&mut h, "etc/hard", "./etc/hostname").unwrap();
    crate::layer::tests::append_odd_entries(&mut b, header);
    let mut h = header(tar::EntryType::Fifo, 0o644);
    b.append_data(&mut h, "run/fifo", &[][..]).unwrap();
    // A later entry for the same path wins.
    let mut h = header(tar::EntryType::Regular, 0o640);
    h.set_size(7);
    b.append_data(&mut h, "etc/hostname", &b"goodbye"[..]).unwrap();
    b.into_inner().unwrap()
}

/// The index of `layer` from its footer and TOC alone.
fn toc_index(layer: &Estargz) -> Result<LayerIndex, LayerError> {
    let blob = &layer.blob;
    let size = blob.len() as u64;
    let toc_offset = read_footer(&blob[blob.len() - 51..]).unwrap();
    assert_eq!(toc_offset, layer.toc_offset);
    let toc = read_toc(&blob[toc_offset as usize..blob.len() - 51]).unwrap();
    assert_eq!(toc.json, layer.toc_json);
    assert_eq!(toc.digest().to_string(), layer.toc_digest);
    let diff_id = Digest::of(&layer.tar);
    index_from_toc(&toc, &Digest::of(blob), size, toc_offset, diff_id)
}

fn reader(index: LayerIndex, blob: &[u8]) -> (LayerReader, tempfile::NamedTempFile) {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut file, blob).unwrap();
    let source = Arc::new(LocalBlob(file.reopen().unwrap()));
    let cache = Arc::new(SpanCache::new(64 << 20));
    (LayerReader::with_index(Arc::new(index), source, cache), file)
}

fn read_file(reader: &LayerReader, entry: &Entry) -> Vec<u8> {
    let EntryKind::File { offset, size } = entry.kind else { panic!("{} is no file", entry.path) };
    let mut data = vec![0; size as usize];
    assert_eq!(reader.read_at(offset, &mut data).unwrap(), size as usize);
    data
}

/// Entries without file offsets (the TOC's are virtual, the scan's real).
fn shapes(entries: &[Entry]) -> Vec<Entry> {
    let mut out = entries.to_vec();
    for e in &mut out {
        if let EntryKind::File { size, .. } = e.kind {
            e.kind = EntryKind::File { offset: 0, size };
        }
    }
    out
}

/// The TOC index describes the layer exactly as the tar scan of the same
/// blob does, and every file reads back the same bytes through it.
fn same_as_scan(layout: Layout) {
    let big = bytes(300_000, 7);
    let layer = to_estargz_with(&sample_tar(&big), 64 << 10, layout);
    let scanned = build_index(layer.blob.as_slice(), &Digest::of(&layer.blob)).unwrap();
    let index = toc_index(&layer).unwrap();
    assert_eq!(index.diff_id, scanned.diff_id);
    assert_eq!(shapes(&index.entries), shapes(&scanned.entries));
    let AccessMap::Estargz(map) = &index.access else { panic!("not an eStargz map") };
    // 5 chunks of big.bin, 2 small files, the overwritten hostname, the TOC.
    assert_eq!(map.chunks.len(), 5 + 3 + 1);
    assert_eq!(index.uncompressed_size, map.chunks.iter().map(|c| c.len).sum::<u64>());
    let (toc_reader, _f1) = reader(index.clone(), &layer.blob);
    let (tar_reader, _f2) = reader(scanned.clone(), &layer.blob);
    for (a, b) in index.entries.iter().zip(&scanned.entries) {
        if matches!(a.kind, EntryKind::File { .. }) {
            assert_eq!(read_file(&toc_reader, a), read_file(&tar_reader, b), "{}", a.path);
        }
    }
    let find = |p: &str| index.entries.iter().find(|e| &*e.path == p).unwrap();
    assert_eq!(read_file(&toc_reader, find("big.bin")), big);
    assert_eq!(read_file(&toc_reader, find("etc/hostname")), b"goodbye");
    assert_eq!(read_file(&toc_reader, find("stargz.index.json")), layer.toc_json);
    let xattrs: Vec<&str> = find("big.bin").xattrs.iter().map(|x| &*x.name).collect();
    assert_eq!(xattrs, ["user.a", "user.b"]);
    assert_eq!(find("etc/hard").kind, EntryKind::Hardlink { target: "etc/hostname".into() });
    assert_eq!(find("etc/gone").kind, EntryKind::Whiteout);
    assert_eq!(find("opaque").kind, EntryKind::Opaque);
    assert_eq!((find("big.bin").mode, find("big.bin").uid), (0o4755, 1000));
    // Reads that cross chunk boundaries inside big.bin.
    let EntryKind::File { offset, .. } = find("big.bin").kind else { unreachable!() };
    let mut buf = vec![0; 70_000];
    toc_reader.read_at(offset + 60_000, &mut buf).unwrap();
    assert_eq!(buf, big[60_000..130_000]);
}

#[test]
fn toc_index_matches_the_tar_scan() {
    same_as_scan(Layout::Snapshotter);
}

#[test]
fn data_behind_its_tar_header_is_found() {
    same_as_scan(Layout::HeaderWithData);
}

#[test]
fn index_round_trips_through_persistence() {
    let layer = to_estargz(&sample_tar(&bytes(1000, 3)), 4 << 20);
    let index = toc_index(&layer).unwrap();
    let decoded = decode_index(&encode_index(&index), &index.blob_digest).unwrap();
    let (AccessMap::Estargz(a), AccessMap::Estargz(b)) = (&index.access, &decoded.access) else {
        panic!("not eStargz after decoding")
    };
    assert_eq!(a.chunks, b.chunks);
    assert_eq!(index.entries, decoded.entries);
}

#[test]
fn footer_parses_and_rejects() {
    assert_eq!(read_footer(&footer(0x1234_5678_9abc)).unwrap(), 0x1234_5678_9abc);
    let mut longer = vec![7u8; 100];
    longer.extend_from_slice(&footer(99));
    assert_eq!(read_footer(&longer).unwrap(), 99);
    assert!(read_footer(&footer(1)[1..]).is_err(), "too short");
    let mut bad_magic = footer(5);
    bad_magic[37] = b'X';
    assert!(read_footer(&bad_magic).is_err());
    let mut bad_id = footer(5);
    bad_id[13] = b'Z';
    assert!(read_footer(&bad_id).is_err());
    let mut bad_hex = footer(5);
    bad_hex[16] = b'g';
    assert!(read_footer(&bad_hex).is_err());
    // A plain gzip member of the same size is no footer.
    let plain = writer::to_estargz(&[0u8; 1024], 1024).blob;
    assert!(read_footer(&plain[..plain.len() - 51]).is_err());
}

#[test]
fn corrupt_chunk_is_an_error_not_data() {
    let big = bytes(300_000, 11);
    let layer = to_estargz(&sample_tar(&big), 64 << 10);
    let index = toc_index(&layer).unwrap();
    let AccessMap::Estargz(map) = &index.access else { unreachable!() };
    let third = map.chunks.iter().find(|c| c.len == 64 << 10 && c.out_offset > 0).unwrap();
    let (range, check) = index.access.chunk(map.chunks.iter().position(|c| c == third).unwrap());
    let mut blob = layer.blob.clone();
    let good = &blob[range.start as usize..range.end as usize];
    assert!(check.verify(good).is_ok());
    assert_eq!(third.decode(good).unwrap().len(), 64 << 10);
    // A flipped byte in the deflate data (past the 10-byte gzip header).
    blob[range.start as usize + 200] ^= 0x55;
    let bad = &blob[range.start as usize..range.end as usize];
    assert!(check.verify(bad).is_err());
    let (toc_reader, _f) = reader(index.clone(), &blob);
    let mut buf = vec![0; 100];
    let err = toc_reader.read_at(third.out_offset, &mut buf).unwrap_err();
    assert!(matches!(err, LayerError::Corrupt { .. }), "{err}");
    // Valid gzip of other bytes fails the digest, however it inflates.
    let other = writer::to_estargz(&sample_tar(&bytes(300_000, 12)), 64 << 10).blob;
    let mut swapped = layer.blob.clone();
    let len = (range.end - range.start) as usize;
    swapped[range.start as usize..range.end as usize]
        .copy_from_slice(&other[range.start as usize..][..len]);
    assert!(check.verify(&swapped[range.start as usize..range.end as usize]).is_err());
}

#[test]
fn placement_prefers_inner_offset_and_needs_the_digest() {
    let data = bytes(1000, 5);
    let mut member = vec![9u8; 300];
    member.extend_from_slice(&data);
    member.extend_from_slice(&[0; 212]);
    let gz = {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut e, &member).unwrap();
        e.finish().unwrap()
    };
    let chunk = EstargzChunk {
        in_offset: 0,
        in_end: gz.len() as u64,
        inner_offset: 300,
        out_offset: 0,
        len: 1000,
        digest: Digest::of(&data),
    };
    assert_eq!(chunk.decode(&gz).unwrap(), data);
    // Without the inner offset there is no tar header to find it behind.
    let lost = EstargzChunk { inner_offset: 0, ..chunk.clone() };
    assert!(lost.decode(&gz).is_err());
    let wrong = EstargzChunk { digest: Digest::of(b"x"), ..chunk };
    assert!(wrong.decode(&gz).is_err());
    assert!(wrong.decode(b"not gzip at all").is_err());
}

/// The index of a hand-written TOC over a valid blob of `blob_size` bytes.
fn index_of_json(json: &str, toc_offset: u64, blob_size: u64) -> Result<LayerIndex, LayerError> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_size(json.len() as u64);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    tar.append_data(&mut h, "stargz.index.json", json.as_bytes()).unwrap();
    let member = {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut e, &tar.into_inner().unwrap()).unwrap();
        e.finish().unwrap()
    };
    let toc = read_toc(&member).unwrap();
    index_from_toc(&toc, &Digest::of(b"blob"), blob_size, toc_offset, Digest::of(b"tar"))
}

#[test]
fn inconsistent_tocs_are_refused() {
    let d = Digest::of(b"c");
    let reg = |extra: &str| {
        format!(
            r#"{{"version":1,"entries":[{{"name":"f","type":"reg","size":10,"offset":100{extra}}}]}}"#
        )
    };
    let ok = reg(&format!(r#","chunkDigest":"{d}""#));
    assert!(index_of_json(&ok, 1000, 2000).is_ok());
    let err = |json: &str| index_of_json(json, 1000, 2000).unwrap_err().to_string();
    assert!(err(&reg("")).contains("no chunkDigest"));
    assert!(err(&reg(&format!(r#","chunkDigest":"{d}","chunkSize":4"#))).contains("cover 4 of"));
    assert!(index_of_json(&ok, 90, 2000).unwrap_err().to_string().contains("not before the TOC"));
    assert!(index_of_json(&ok, 1960, 2000).unwrap_err().to_string().contains("does not fit"));
    assert!(err(r#"{"version":2,"entries":[]}"#).contains("version 2"));
    assert!(err(r#"{"version":1,"entries":[{"name":"x","type":"sock"}]}"#).contains("sock"));
    assert!(err(r#"{"version":1,"entries":[{"name":"../x","type":"dir"}]}"#).contains("escapes"));
    let link = r#"{"version":1,"entries":[{"name":"a","type":"hardlink","linkName":"b"}]}"#;
    assert!(err(link).contains("not earlier"));
    let chunk = format!(
        r#"{{"version":1,"entries":[{{"name":"f","type":"chunk","offset":100,"chunkOffset":4,"chunkDigest":"{d}"}}]}}"#
    );
    assert!(err(&chunk).contains("follows no file"));
    assert!(err(r#"{"version":1,"entries":[{"name":"d","type":"dir","modtime":"x"}]}"#)
        .contains("modtime"));
    assert!(err("[]").contains("malformed TOC JSON"));
}
