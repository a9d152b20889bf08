//! Streams a [`Plan`] into a tar with a fixed header format, so the same
//! plan always gives the same bytes: ustar headers (no user/group names,
//! no atime/ctime), a PAX extended header before an entry only when it is
//! needed (xattrs as `SCHILY.xattr.*`, `path`/`linkpath` longer than the
//! 100-byte fields), records in a fixed order, and the two zero blocks at
//! the end. File data is read 1 MiB at a time, from the upper file or the
//! lower blob, never held whole in memory.

use super::plan::{Data, Kind, LayerEntry, Plan};
use crate::fs::ImageFs;
use crate::sys::upper::Dir;
use rustix::fs::OFlags;
use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;

const BLOCK: usize = 512;
const CHUNK: u32 = 1 << 20;

/// Writes the tar of `plan` to `out`. `upper` is the root the plan's upper
/// paths start from; `lower` serves lower data.
pub fn write_tar(
    plan: &Plan,
    upper: Option<&Dir>,
    lower: &ImageFs,
    out: &mut dyn Write,
) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK as usize];
    for entry in &plan.entries {
        write_entry(entry, upper, lower, out, &mut buf)?;
    }
    out.write_all(&[0u8; BLOCK * 2])
}

/// The name as it appears in the tar: markers get their OCI names,
/// directories a trailing `/`, the root is `./`.
fn tar_name(entry: &LayerEntry) -> Vec<u8> {
    let (dir, base) = match entry.path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&entry.path[..=i], &entry.path[i + 1..]),
        None => (&b""[..], &entry.path[..]),
    };
    match &entry.kind {
        Kind::Whiteout => [dir, b".wh.", base].concat(),
        Kind::Opaque if entry.path.is_empty() => b".wh..wh..opq".to_vec(),
        Kind::Opaque => [&entry.path[..], b"/.wh..wh..opq"].concat(),
        Kind::Dir if entry.path.is_empty() => b"./".to_vec(),
        Kind::Dir => [&entry.path[..], b"/"].concat(),
        _ => entry.path.clone(),
    }
}

/// One PAX record: `"<len> <key>=<value>\n"`, where len counts itself.
fn pax_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    let rest = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = rest + 1;
    while len.to_string().len() + rest != len {
        len = len.to_string().len() + rest;
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

fn set_name_field(field: &mut [u8], value: &[u8]) {
    let n = value.len().min(field.len());
    field[..n].copy_from_slice(&value[..n]);
}

fn write_entry(
    entry: &LayerEntry,
    upper: Option<&Dir>,
    lower: &ImageFs,
    out: &mut dyn Write,
    buf: &mut [u8],
) -> io::Result<()> {
    let name = tar_name(entry);
    let marker = matches!(entry.kind, Kind::Whiteout | Kind::Opaque);
    let mut header = tar::Header::new_ustar();
    let meta = &entry.meta;
    let (entry_type, size, link): (tar::EntryType, u64, Option<&[u8]>) = match &entry.kind {
        Kind::Dir => (tar::EntryType::Directory, 0, None),
        Kind::File { size, .. } => (tar::EntryType::Regular, *size, None),
        Kind::Symlink(target) => (tar::EntryType::Symlink, 0, Some(target.as_bytes())),
        Kind::Hardlink(target) => (tar::EntryType::Link, 0, Some(&target[..])),
        Kind::Char(rdev) | Kind::Block(rdev) => {
            header.set_device_major(rustix::fs::major(*rdev))?;
            header.set_device_minor(rustix::fs::minor(*rdev))?;
            let t = if matches!(entry.kind, Kind::Char(_)) {
                tar::EntryType::Char
            } else {
                tar::EntryType::Block
            };
            (t, 0, None)
        }
        Kind::Fifo => (tar::EntryType::Fifo, 0, None),
        Kind::Whiteout | Kind::Opaque => (tar::EntryType::Regular, 0, None),
    };
    header.set_entry_type(entry_type);
    header.set_size(size);
    if marker {
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
    } else {
        header.set_mode(meta.mode & 0o7777);
        header.set_uid(u64::from(meta.uid));
        header.set_gid(u64::from(meta.gid));
        header.set_mtime(meta.mtime.max(0) as u64);
    }

    let mut pax = Vec::new();
    let ustar = header.as_ustar_mut().expect("a ustar header");
    if name.len() > ustar.name.len() {
        pax_record(&mut pax, b"path", &name);
    }
    set_name_field(&mut ustar.name, &name);
    if let Some(link) = link {
        if link.len() > ustar.linkname.len() {
            pax_record(&mut pax, b"linkpath", link);
        }
        set_name_field(&mut ustar.linkname, link);
    }
    if !marker {
        if meta.mtime < 0 {
            pax_record(&mut pax, b"mtime", meta.mtime.to_string().as_bytes());
        }
        for (key, value) in &meta.xattrs {
            pax_record(&mut pax, &[b"SCHILY.xattr.", key.as_bytes()].concat(), value);
        }
    }
    if !pax.is_empty() {
        let mut x = tar::Header::new_ustar();
        x.set_entry_type(tar::EntryType::XHeader);
        x.set_size(pax.len() as u64);
        x.set_mode(0o644);
        x.set_uid(0);
        x.set_gid(0);
        x.set_mtime(0);
        let xname = [b"PaxHeaders/".as_slice(), &name[..name.len().min(80)]].concat();
        set_name_field(&mut x.as_ustar_mut().expect("a ustar header").name, &xname);
        x.set_cksum();
        out.write_all(x.as_bytes())?;
        out.write_all(&pax)?;
        pad(out, pax.len() as u64)?;
    }
    header.set_cksum();
    out.write_all(header.as_bytes())?;
    if let Kind::File { data, size } = &entry.kind {
        copy_data(data, *size, upper, lower, out, buf)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", display(&entry.path))))?;
        pad(out, *size)?;
    }
    Ok(())
}

fn display(path: &[u8]) -> String {
    format!("/{}", String::from_utf8_lossy(path))
}

fn pad(out: &mut dyn Write, len: u64) -> io::Result<()> {
    let rem = (len % BLOCK as u64) as usize;
    if rem != 0 {
        out.write_all(&[0u8; BLOCK][..BLOCK - rem])?;
    }
    Ok(())
}

/// Copies exactly `size` bytes of a file's data to `out`; a file that is
/// shorter than planned (changed during the commit) is an error.
fn copy_data(
    data: &Data,
    size: u64,
    upper: Option<&Dir>,
    lower: &ImageFs,
    out: &mut dyn Write,
    buf: &mut [u8],
) -> io::Result<()> {
    let short = || io::Error::new(io::ErrorKind::UnexpectedEof, "file shrank during the commit");
    match data {
        Data::Upper(comps) => {
            let root = upper.ok_or_else(|| io::Error::other("no upper directory"))?;
            let (name, parents) = comps.split_last().ok_or_else(short)?;
            let parents: Vec<&OsStr> = parents.iter().map(|c| c.as_os_str()).collect();
            let dir = root.open_beneath(&parents)?;
            let file = dir.open_file(name, OFlags::RDONLY, 0)?;
            let mut reader = file.take(size);
            let mut done = 0u64;
            loop {
                let n = match reader.read(buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                };
                out.write_all(&buf[..n])?;
                done += n as u64;
            }
            if done != size {
                return Err(short());
            }
        }
        Data::Lower(ino) => {
            let mut offset = 0u64;
            while offset < size {
                let want = (size - offset).min(u64::from(CHUNK)) as u32;
                let chunk = lower.read(*ino, offset, want).map_err(io::Error::other)?;
                if chunk.is_empty() {
                    return Err(short());
                }
                out.write_all(&chunk)?;
                offset += chunk.len() as u64;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_record_lengths_count_themselves() {
        for value_len in [0usize, 1, 5, 6, 7, 90, 94, 95, 96, 995, 996, 997, 5000] {
            let mut out = Vec::new();
            let value = vec![b'v'; value_len];
            pax_record(&mut out, b"k", &value);
            let space = out.iter().position(|&b| b == b' ').unwrap();
            let len: usize = std::str::from_utf8(&out[..space]).unwrap().parse().unwrap();
            assert_eq!(len, out.len(), "value of {value_len} bytes");
        }
    }

    #[test]
    fn marker_and_dir_names() {
        let e = |path: &str, kind| LayerEntry {
            path: path.as_bytes().to_vec(),
            kind,
            meta: Default::default(),
        };
        assert_eq!(tar_name(&e("a/b", Kind::Whiteout)), b"a/.wh.b");
        assert_eq!(tar_name(&e("top", Kind::Whiteout)), b".wh.top");
        assert_eq!(tar_name(&e("a", Kind::Opaque)), b"a/.wh..wh..opq");
        assert_eq!(tar_name(&e("", Kind::Opaque)), b".wh..wh..opq");
        assert_eq!(tar_name(&e("", Kind::Dir)), b"./");
        assert_eq!(tar_name(&e("a/b", Kind::Dir)), b"a/b/");
    }
}
