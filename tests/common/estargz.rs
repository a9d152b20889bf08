//! A test-side eStargz writer: turns a tar into an eStargz blob the way
//! stargz-snapshotter's writer lays it out — each regular file's data
//! starts a gzip member (a new one every `chunk_size` bytes), its tar header
//! and padding sit in the member before and after, then the TOC
//! `stargz.index.json` as a tar entry in a member of its own, then the
//! 51-byte footer. Used by the integration tests and (through `#[path]`)
//! by the unit tests in `src/layer/estargz/tests.rs`, so it depends on
//! external crates only.
#![allow(dead_code)]

use base64::Engine as _;
use flate2::write::GzEncoder;
use serde_json::{json, Map, Value};
use sha2::{Digest as _, Sha256};
use std::io::{Read, Write};

/// Where a file's tar header goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// As stargz-snapshotter: the data starts its member (the header ends
    /// the member before).
    Snapshotter,
    /// The header starts the member and the data follows it in the same
    /// member (readers must find the data behind the header).
    HeaderWithData,
}

/// An eStargz blob and what its image needs.
pub struct Estargz {
    /// The compressed blob.
    pub blob: Vec<u8>,
    /// Its uncompressed tar stream (its sha256 is the diff_id).
    pub tar: Vec<u8>,
    /// `sha256:…` of the TOC JSON: the `toc.digest` annotation.
    pub toc_digest: String,
    /// Compressed offset of the TOC member.
    pub toc_offset: u64,
    /// The TOC JSON.
    pub toc_json: Vec<u8>,
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn gzip_member(data: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// The 51-byte footer pointing at the TOC member at `toc_offset`.
pub fn footer(toc_offset: u64) -> Vec<u8> {
    let mut f = vec![0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 0xff, 26, 0, b'S', b'G', 22, 0];
    f.extend_from_slice(format!("{toc_offset:016x}STARGZ").as_bytes());
    // An empty stored block (BFINAL), then CRC32 and ISIZE of nothing.
    f.extend_from_slice(&[1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(f.len(), 51);
    f
}

/// The blob being written: closed members and the open one's bytes.
struct Blob {
    out: Vec<u8>,
    open: Vec<u8>,
    tar: Vec<u8>,
}

impl Blob {
    fn write(&mut self, data: &[u8]) {
        self.open.extend_from_slice(data);
        self.tar.extend_from_slice(data);
    }

    /// Closes the open member (if it holds anything); returns the offset
    /// the next member starts at.
    fn close(&mut self) -> u64 {
        if !self.open.is_empty() {
            let member = gzip_member(&std::mem::take(&mut self.open));
            self.out.extend_from_slice(&member);
        }
        self.out.len() as u64
    }
}

fn rfc3339(secs: u64) -> String {
    match chrono::DateTime::from_timestamp(secs as i64, 0) {
        Some(t) if secs != 0 => t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        _ => String::new(),
    }
}

/// The eStargz form of `tar` (snapshotter layout).
pub fn to_estargz(tar: &[u8], chunk_size: usize) -> Estargz {
    to_estargz_with(tar, chunk_size, Layout::Snapshotter)
}

/// The eStargz form of `tar`, files chunked every `chunk_size` bytes.
pub fn to_estargz_with(tar: &[u8], chunk_size: usize, layout: Layout) -> Estargz {
    let mut blob = Blob { out: Vec::new(), open: Vec::new(), tar: Vec::new() };
    let mut entries: Vec<Value> = Vec::new();
    let mut archive = tar::Archive::new(tar);
    // Where the current entry's header blocks (PAX, long names) begin.
    let mut entry_start = 0usize;
    for item in archive.entries().unwrap() {
        let mut item = item.unwrap();
        let header = item.header().clone();
        let data_start = item.raw_file_position() as usize;
        let size = item.size() as usize;
        let padded = size.div_ceil(512) * 512;
        let name = String::from_utf8_lossy(&item.path_bytes()).into_owned();
        let mut ent = Map::new();
        ent.insert("name".into(), json!(name));
        ent.insert("mode".into(), json!(header.mode().unwrap()));
        ent.insert("uid".into(), json!(header.uid().unwrap()));
        ent.insert("gid".into(), json!(header.gid().unwrap()));
        let modtime = rfc3339(header.mtime().unwrap());
        if !modtime.is_empty() {
            ent.insert("modtime".into(), json!(modtime));
        }
        let mut xattrs = Map::new();
        if let Some(pax) = item.pax_extensions().unwrap() {
            for ext in pax {
                let ext = ext.unwrap();
                if let Some(x) = ext.key().unwrap().strip_prefix("SCHILY.xattr.") {
                    let value = base64::engine::general_purpose::STANDARD.encode(ext.value_bytes());
                    xattrs.insert(x.to_string(), json!(value));
                }
            }
        }
        if !xattrs.is_empty() {
            ent.insert("xattrs".into(), Value::Object(xattrs));
        }
        let link = item.link_name_bytes().map(|l| String::from_utf8_lossy(&l).into_owned());
        let kind = match header.entry_type() {
            tar::EntryType::Regular => "reg",
            tar::EntryType::Directory => "dir",
            tar::EntryType::Symlink => "symlink",
            tar::EntryType::Link => "hardlink",
            tar::EntryType::Char => "char",
            tar::EntryType::Block => "block",
            tar::EntryType::Fifo => "fifo",
            other => panic!("unsupported entry type {other:?}"),
        };
        ent.insert("type".into(), json!(kind));
        if let Some(link) = link.filter(|_| matches!(kind, "symlink" | "hardlink")) {
            ent.insert("linkName".into(), json!(link));
        }
        if matches!(kind, "char" | "block") {
            ent.insert("devMajor".into(), json!(header.device_major().unwrap().unwrap_or(0)));
            ent.insert("devMinor".into(), json!(header.device_minor().unwrap().unwrap_or(0)));
        }
        let headers = &tar[entry_start..data_start];
        entry_start = data_start + padded;
        if kind != "reg" || size == 0 {
            blob.write(headers);
            entries.push(Value::Object(ent));
            continue;
        }
        ent.insert("size".into(), json!(size));
        let mut data = Vec::new();
        item.read_to_end(&mut data).unwrap();
        ent.insert("digest".into(), json!(sha256(&data)));
        if layout == Layout::HeaderWithData {
            blob.close();
        }
        blob.write(headers);
        for (i, chunk) in data.chunks(chunk_size).enumerate() {
            let offset = match (layout, i) {
                (Layout::HeaderWithData, 0) => blob.out.len() as u64,
                _ => blob.close(),
            };
            let mut c = if i == 0 { std::mem::take(&mut ent) } else { Map::new() };
            if i > 0 {
                c.insert("name".into(), json!(name));
                c.insert("type".into(), json!("chunk"));
                c.insert("chunkOffset".into(), json!(i * chunk_size));
            }
            c.insert("offset".into(), json!(offset));
            let last = (i + 1) * chunk_size >= size;
            c.insert("chunkSize".into(), json!(if last { 0 } else { chunk_size }));
            c.insert("chunkDigest".into(), json!(sha256(chunk)));
            entries.push(Value::Object(c));
            blob.write(chunk);
        }
        blob.write(&vec![0; padded - size]);
    }
    let toc_offset = blob.close();
    let toc_json = serde_json::to_vec_pretty(&json!({"version": 1, "entries": entries})).unwrap();
    let mut toc_tar = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(toc_json.len() as u64);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    toc_tar.append_data(&mut h, "stargz.index.json", toc_json.as_slice()).unwrap();
    blob.write(&toc_tar.into_inner().unwrap());
    blob.close();
    blob.out.extend_from_slice(&footer(toc_offset));
    Estargz { blob: blob.out, tar: blob.tar, toc_digest: sha256(&toc_json), toc_offset, toc_json }
}
