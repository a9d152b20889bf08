//! gzip on all cores, pigz-style: the input is cut into fixed 1 MiB
//! chunks, each compressed on a worker thread as raw deflate (zlib-rs, a
//! pure-Rust zlib) primed with the previous chunk's last 32 KiB as preset
//! dictionary, and ended with a sync flush (byte-aligned, not final), the
//! last one with a final block. Concatenated, they are one valid deflate
//! stream in one gzip member, with a fixed header (no name, mtime 0) and the
//! CRC-32 combined from the chunks' CRCs.
//!
//! The output depends only on the input, the level and the chunk size, not
//! on the number of threads or their timing, so commits stay reproducible.
//!
//! Memory is bounded: at most `2 × threads` chunks are in flight; the
//! writer waits for the oldest before queueing more.

use flate2::{Compress, Compression, FlushCompress, Status};
use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Uncompressed bytes per chunk.
const CHUNK: usize = 1 << 20;

/// The deflate window: how much of the previous chunk primes the next.
const WINDOW: usize = 32 << 10;

/// gzip header: magic, deflate, no flags, mtime 0, no extra flags, OS unknown.
const HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];

struct Job {
    data: Vec<u8>,
    /// The last 32 KiB before `data`: the preset dictionary.
    dict: Vec<u8>,
    last: bool,
    reply: SyncSender<io::Result<Done>>,
}

struct Done {
    compressed: Vec<u8>,
    crc: crc32fast::Hasher,
}

/// A `Write` that gzips into `inner` on `threads` worker threads.
pub struct ParallelGzip<W: Write> {
    inner: Option<W>,
    buf: Vec<u8>,
    /// The last [`WINDOW`] bytes of the previous chunk.
    dict: Vec<u8>,
    jobs: Option<SyncSender<Job>>,
    pending: VecDeque<Receiver<io::Result<Done>>>,
    workers: Vec<JoinHandle<()>>,
    max_pending: usize,
    crc: crc32fast::Hasher,
    total: u64,
    header_written: bool,
}

impl<W: Write> ParallelGzip<W> {
    /// Compresses at `level` (0–9) on `threads` threads (at least one).
    pub fn new(inner: W, level: u32, threads: usize) -> Self {
        let threads = threads.max(1);
        let level = level.min(9);
        let (tx, rx) = mpsc::sync_channel::<Job>(threads);
        let rx = Arc::new(Mutex::new(rx));
        let workers = (0..threads)
            .map(|_| {
                let rx = rx.clone();
                std::thread::spawn(move || loop {
                    let job = match rx.lock().map(|r| r.recv()) {
                        Ok(Ok(job)) => job,
                        _ => return,
                    };
                    let done = compress_chunk(&job.data, &job.dict, level, job.last);
                    let _ = job.reply.send(done);
                })
            })
            .collect();
        ParallelGzip {
            inner: Some(inner),
            buf: Vec::with_capacity(CHUNK),
            dict: Vec::new(),
            jobs: Some(tx),
            pending: VecDeque::new(),
            workers,
            max_pending: threads * 2,
            crc: crc32fast::Hasher::new(),
            total: 0,
            header_written: false,
        }
    }

    fn inner(&mut self) -> &mut W {
        self.inner.as_mut().expect("inner present until finish")
    }

    fn submit(&mut self, last: bool) -> io::Result<()> {
        let data = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        let dict =
            std::mem::replace(&mut self.dict, data[data.len().saturating_sub(WINDOW)..].to_vec());
        let (reply, result) = mpsc::sync_channel(1);
        let jobs = self.jobs.as_ref().expect("jobs open until finish");
        jobs.send(Job { data, dict, last, reply })
            .map_err(|_| io::Error::other("gzip worker threads are gone"))?;
        self.pending.push_back(result);
        while self.pending.len() >= self.max_pending {
            self.collect_one()?;
        }
        Ok(())
    }

    fn collect_one(&mut self) -> io::Result<()> {
        let Some(result) = self.pending.pop_front() else { return Ok(()) };
        let done = result.recv().map_err(|_| io::Error::other("a gzip worker thread died"))??;
        if !self.header_written {
            self.inner().write_all(&HEADER)?;
            self.header_written = true;
        }
        self.crc.combine(&done.crc);
        self.inner().write_all(&done.compressed)
    }

    /// Writes the rest, the trailer, and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.submit(true)?;
        while !self.pending.is_empty() {
            self.collect_one()?;
        }
        let crc = std::mem::replace(&mut self.crc, crc32fast::Hasher::new()).finalize();
        let isize = (self.total & 0xffff_ffff) as u32;
        let mut inner = self.inner.take().expect("inner present until finish");
        inner.write_all(&crc.to_le_bytes())?;
        inner.write_all(&isize.to_le_bytes())?;
        Ok(inner)
    }
}

impl<W: Write> Write for ParallelGzip<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        self.total += n as u64;
        if self.buf.len() == CHUNK {
            self.submit(false)?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<W: Write> Drop for ParallelGzip<W> {
    fn drop(&mut self) {
        self.jobs = None;
        self.pending.clear();
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

/// Raw deflate of one chunk primed with `dict`: sync-flushed, or finished
/// if `last`.
fn compress_chunk(data: &[u8], dict: &[u8], level: u32, last: bool) -> io::Result<Done> {
    let mut crc = crc32fast::Hasher::new();
    crc.update(data);
    let mut c = Compress::new(Compression::new(level), false);
    if !dict.is_empty() {
        c.set_dictionary(dict).map_err(io::Error::other)?;
    }
    let mut out = Vec::with_capacity(data.len() / 2 + 1024);
    let flush = if last { FlushCompress::Finish } else { FlushCompress::Sync };
    loop {
        let consumed = c.total_in() as usize;
        if out.capacity() - out.len() < 1024 {
            out.reserve(out.capacity().max(64 << 10));
        }
        let status =
            c.compress_vec(&data[consumed..], &mut out, flush).map_err(io::Error::other)?;
        let all_in = c.total_in() as usize == data.len();
        let room_left = out.len() < out.capacity();
        match status {
            Status::StreamEnd => break,
            _ if !last && all_in && room_left => break,
            _ => {}
        }
    }
    Ok(Done { compressed: out, crc })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn gunzip(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        // One member only: a plain (not multi-member) decoder must read it all.
        flate2::read::GzDecoder::new(data).read_to_end(&mut out).unwrap();
        out
    }

    fn gzip(data: &[u8], threads: usize) -> Vec<u8> {
        let mut w = ParallelGzip::new(Vec::new(), 6, threads);
        // Uneven writes cross chunk boundaries.
        for piece in data.chunks(333_333) {
            w.write_all(piece).unwrap();
        }
        w.finish().unwrap()
    }

    #[test]
    fn round_trips_and_is_independent_of_threads() {
        let mut data = Vec::new();
        let mut x = 1u64;
        while data.len() < 3 * CHUNK + 12_345 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let bytes = x.to_le_bytes();
            data.extend_from_slice(if x >> 62 == 0 { b"alpha beta " } else { &bytes[..3] });
        }
        let one = gzip(&data, 1);
        assert_eq!(gunzip(&one), data);
        assert_eq!(gzip(&data, 3), one);
        assert_eq!(gunzip(&gzip(&data[..CHUNK], 2)), &data[..CHUNK]);
    }

    #[test]
    fn empty_input_is_a_valid_gzip() {
        let out = gzip(b"", 2);
        assert_eq!(gunzip(&out), b"");
    }
}
