//! Random access into gzip blobs (the zran technique). The indexing pass
//! inflates the blob once and, at a deflate block boundary about every
//! [`SPAN_SIZE`] bytes of output, records a checkpoint: where the next block
//! starts (byte and bit), how much output came before, and the last 32 KiB
//! of output (the window later blocks may refer back into). A read then
//! inflates one span from its checkpoint instead of the whole blob.

use super::SPAN_SIZE;
use crate::digest::Digest;
use crate::sys::inflate::{Framing, InflateError, Inflater};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::collections::VecDeque;
use std::io::{self, Read};
use std::ops::Range;

const WINDOW: usize = 32 * 1024;
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
/// gzip member trailer: CRC32 + ISIZE.
const TRAILER: usize = 8;

/// Where inflating can resume.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Compressed bytes before the block (the block starts in the byte
    /// before this offset when `bits` is non-zero).
    pub in_offset: u64,
    /// Bits of the byte at `in_offset - 1` that belong to the block.
    pub bits: u8,
    /// Uncompressed bytes before the block.
    pub out_offset: u64,
    /// The last (up to) 32 KiB of output before the block.
    pub window: Box<[u8]>,
    /// sha256 of the compressed bytes of the span starting here.
    pub span_digest: Digest,
}

/// Checkpoints of one gzip blob; the first is the start of the blob.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GzipMap {
    /// In increasing offset order; `checkpoints[0]` is offset 0 (gzip header).
    pub checkpoints: Vec<Checkpoint>,
    /// Total compressed size.
    pub compressed_size: u64,
}

impl GzipMap {
    /// Number of spans.
    pub fn span_count(&self) -> usize {
        self.checkpoints.len()
    }

    /// Uncompressed start of span `i`.
    pub fn span_start(&self, i: usize) -> u64 {
        self.checkpoints[i].out_offset
    }

    /// The compressed bytes span `i` is inflated from (including the byte
    /// it shares with the span before); `checkpoints[i].span_digest` is
    /// their sha256.
    pub fn span_input_range(&self, i: usize) -> Range<u64> {
        let cp = &self.checkpoints[i];
        let end = self.checkpoints.get(i + 1).map_or(self.compressed_size, |n| n.in_offset);
        cp.in_offset - u64::from(cp.bits > 0)..end
    }

    /// Inflates span `i`, whose uncompressed length is `len`, from `input`:
    /// the bytes [`GzipMap::span_input_range`] names.
    pub fn decode_span(&self, input: &[u8], i: usize, len: usize) -> io::Result<Vec<u8>> {
        let cp = &self.checkpoints[i];
        let (mut inflater, mut pos) = if i == 0 {
            (Inflater::new(Framing::Gzip).map_err(corrupt)?, 0)
        } else {
            let mut inflater = Inflater::new(Framing::Raw).map_err(corrupt)?;
            if cp.bits > 0 {
                inflater.prime(cp.bits, input[0]).map_err(corrupt)?;
            }
            inflater.set_dictionary(&cp.window).map_err(corrupt)?;
            (inflater, usize::from(cp.bits > 0))
        };
        let mut framing = if i == 0 { Framing::Gzip } else { Framing::Raw };
        let mut out = vec![0; len];
        let mut produced = 0;
        while produced < len {
            let step = inflater.inflate(&input[pos..], &mut out[produced..]).map_err(corrupt)?;
            pos += step.consumed;
            produced += step.produced;
            if step.stream_end {
                // A new gzip member follows (multi-member blob).
                if framing == Framing::Raw {
                    pos += TRAILER;
                }
                framing = Framing::Gzip;
                inflater.reset(Framing::Gzip).map_err(corrupt)?;
            } else if step.consumed == 0 && step.produced == 0 {
                return Err(super::corrupt("gzip span ends early"));
            }
        }
        Ok(out)
    }
}

fn corrupt(e: InflateError) -> io::Error {
    super::corrupt(format!("gzip: {e}"))
}

/// The indexing pass: a reader of the uncompressed stream that records
/// checkpoints as it goes. Reads its input exactly once.
pub struct GzipIndexer<R> {
    source: R,
    inflater: Inflater,
    input: Box<[u8]>,
    in_pos: usize,
    in_len: usize,
    output: Box<[u8]>,
    out_pos: usize,
    out_len: usize,
    /// Compressed bytes consumed so far.
    total_in: u64,
    /// Uncompressed bytes produced so far.
    total_out: u64,
    window: VecDeque<u8>,
    /// Hash of the compressed bytes of the current span.
    span_hasher: Sha256,
    checkpoints: Vec<Checkpoint>,
    /// Data of checkpoints whose span digest is not known yet.
    open: Option<(u64, u8, u64, Box<[u8]>)>,
    finished: bool,
}

impl<R: Read> GzipIndexer<R> {
    /// Starts the pass over `source` (positioned at the gzip header).
    pub fn new(source: R) -> io::Result<Self> {
        Ok(Self {
            source,
            inflater: Inflater::new(Framing::Gzip).map_err(corrupt)?,
            input: vec![0; 256 * 1024].into(),
            in_pos: 0,
            in_len: 0,
            output: vec![0; 256 * 1024].into(),
            out_pos: 0,
            out_len: 0,
            total_in: 0,
            total_out: 0,
            window: VecDeque::with_capacity(2 * WINDOW),
            span_hasher: Sha256::new(),
            checkpoints: Vec::new(),
            open: Some((0, 0, 0, Box::default())),
            finished: false,
        })
    }

    /// The checkpoints, once the stream has been read to its end, and the source.
    pub fn finish(mut self) -> (GzipMap, R) {
        self.close_span();
        let map = GzipMap { checkpoints: self.checkpoints, compressed_size: self.total_in };
        (map, self.source)
    }

    fn close_span(&mut self) {
        if let Some((in_offset, bits, out_offset, window)) = self.open.take() {
            let hasher = std::mem::take(&mut self.span_hasher);
            let span_digest = Digest::from_hasher(hasher);
            self.checkpoints.push(Checkpoint { in_offset, bits, out_offset, window, span_digest });
        }
    }

    fn checkpoint(&mut self, bits: u8) {
        self.close_span();
        let window: Vec<u8> = self.window.iter().copied().collect();
        self.open = Some((self.total_in, bits, self.total_out, window.into()));
        if bits > 0 {
            // The span's bytes start with the shared partial byte.
            let last = self.input[self.in_pos - 1];
            self.span_hasher.update([last]);
        }
    }

    fn last_out_offset(&self) -> u64 {
        self.open.as_ref().map_or(0, |o| o.2)
    }

    fn fill_input(&mut self) -> io::Result<bool> {
        if self.in_pos < self.in_len {
            return Ok(true);
        }
        self.in_len = self.source.read(&mut self.input)?;
        self.in_pos = 0;
        Ok(self.in_len > 0)
    }

    /// After the end of a member: is another member next?
    fn next_member(&mut self) -> io::Result<bool> {
        if !self.fill_input()? {
            return Ok(false);
        }
        if self.in_len - self.in_pos < 2 {
            // Keep the odd byte and read more, so the magic can be checked.
            self.input.copy_within(self.in_pos..self.in_len, 0);
            self.in_len -= self.in_pos;
            self.in_pos = 0;
            let n = self.source.read(&mut self.input[self.in_len..])?;
            self.in_len += n;
        }
        Ok(self.input[self.in_pos..self.in_len].starts_with(&GZIP_MAGIC))
    }

    /// Inflates more output into `self.output`; false at the end of the data.
    fn produce(&mut self) -> io::Result<bool> {
        while !self.finished {
            if !self.fill_input()? {
                return Err(super::corrupt("gzip stream is truncated"));
            }
            let step = self
                .inflater
                .inflate(&self.input[self.in_pos..self.in_len], &mut self.output)
                .map_err(corrupt)?;
            self.span_hasher.update(&self.input[self.in_pos..self.in_pos + step.consumed]);
            self.in_pos += step.consumed;
            self.total_in += step.consumed as u64;
            self.total_out += step.produced as u64;
            let produced = &self.output[..step.produced];
            if produced.len() >= WINDOW {
                self.window.clear();
                self.window.extend(&produced[produced.len() - WINDOW..]);
            } else {
                self.window.extend(produced);
                let excess = self.window.len().saturating_sub(WINDOW);
                self.window.drain(..excess);
            }
            if step.stream_end {
                if self.next_member()? {
                    self.inflater.reset(Framing::Gzip).map_err(corrupt)?;
                } else {
                    self.finished = true;
                }
            } else if step.at_block_boundary
                && self.total_out - self.last_out_offset() >= SPAN_SIZE as u64
            {
                self.checkpoint(step.unused_bits);
            }
            if step.produced > 0 {
                self.out_pos = 0;
                self.out_len = step.produced;
                return Ok(true);
            }
        }
        Ok(false)
    }
}

impl<R: Read> Read for GzipIndexer<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.out_pos == self.out_len && !self.produce()? {
            return Ok(0);
        }
        let n = buf.len().min(self.out_len - self.out_pos);
        buf[..n].copy_from_slice(&self.output[self.out_pos..self.out_pos + n]);
        self.out_pos += n;
        Ok(n)
    }
}
