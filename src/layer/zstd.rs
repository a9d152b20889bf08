//! Random access into zstd blobs. zstd cannot resume inside a frame (block
//! entropy tables and repeat offsets carry over), so the checkpoints are the
//! frame boundaries. A frame longer than [`SPAN_SIZE`] is cut into spans that
//! all decode from the frame start; decoding one emits every span it passes,
//! so the cache absorbs the cost for sequential and repeated reads.

use super::SPAN_SIZE;
use crate::digest::Digest;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::io::{self, BufRead, BufReader, Read};
use std::ops::Range;
use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};

/// One zstd frame of a blob.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Frame {
    /// Compressed offset of the frame.
    pub in_offset: u64,
    /// Uncompressed offset of its output.
    pub out_offset: u64,
    /// sha256 of the frame's compressed bytes.
    pub digest: Digest,
}

/// Frames of one zstd blob.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ZstdMap {
    /// In offset order.
    pub frames: Vec<Frame>,
    /// Total compressed size (end of the last frame).
    pub compressed_size: u64,
    /// Total uncompressed size.
    pub uncompressed_size: u64,
}

/// A span: a piece of at most [`SPAN_SIZE`] bytes of one frame's output.
#[derive(Debug, Clone, Copy)]
pub struct ZstdSpan {
    /// The frame it belongs to.
    pub frame: usize,
    /// Uncompressed start.
    pub out_start: u64,
}

impl ZstdMap {
    /// The spans, in order (derived, not stored: cheap to rebuild).
    pub fn spans(&self) -> Vec<ZstdSpan> {
        let mut spans = Vec::new();
        for (i, frame) in self.frames.iter().enumerate() {
            let end = self.frames.get(i + 1).map_or(self.uncompressed_size, |f| f.out_offset);
            let mut start = frame.out_offset;
            loop {
                spans.push(ZstdSpan { frame: i, out_start: start });
                start += SPAN_SIZE as u64;
                if start >= end {
                    break;
                }
            }
        }
        spans
    }

    /// The compressed bytes of frame `i`; `frames[i].digest` is their sha256.
    pub fn frame_range(&self, i: usize) -> Range<u64> {
        let end = self.frames.get(i + 1).map_or(self.compressed_size, |f| f.in_offset);
        self.frames[i].in_offset..end
    }

    /// Decodes `spans[target]` from `frame`, a reader of its frame's bytes
    /// ([`ZstdMap::frame_range`]), calling `emit(span index, data)` for it and
    /// for every span of the same frame decoded on the way.
    pub fn decode_span(
        &self,
        frame: &mut dyn Read,
        spans: &[ZstdSpan],
        target: usize,
        emit: &mut dyn FnMut(usize, Vec<u8>),
    ) -> io::Result<()> {
        let frame_index = spans[target].frame;
        let first = spans.iter().position(|s| s.frame == frame_index).unwrap_or(target);
        let span_len = |i: usize| -> usize {
            let end = spans.get(i + 1).map_or(self.uncompressed_size, |s| s.out_start);
            (end - spans[i].out_start) as usize
        };
        let mut decoder = Decoder::new()?;
        let mut input = BufReader::with_capacity(1 << 20, frame);
        let mut current = first;
        let mut out = vec![0u8; span_len(current)];
        let mut filled = 0;
        while current <= target {
            let available = input.fill_buf()?;
            if available.is_empty() {
                return Err(super::corrupt("zstd frame ends early"));
            }
            let mut src = InBuffer::around(available);
            let mut progress = false;
            while src.pos() < available.len() || filled == out.len() {
                if filled == out.len() {
                    emit(current, std::mem::take(&mut out));
                    if current == target {
                        return Ok(());
                    }
                    current += 1;
                    out = vec![0u8; span_len(current)];
                    filled = 0;
                }
                let mut dst = OutBuffer::around(&mut out[filled..]);
                let before = src.pos();
                decoder
                    .run(&mut src, &mut dst)
                    .map_err(|e| super::corrupt(format!("zstd: {e}")))?;
                let produced = dst.pos();
                filled += produced;
                if produced == 0 && src.pos() == before {
                    break;
                }
                progress = true;
            }
            let used = src.pos();
            input.consume(used);
            if !progress {
                return Err(super::corrupt("zstd frame makes no progress"));
            }
        }
        Ok(())
    }
}

/// The indexing pass: a reader of the uncompressed stream that records frame
/// boundaries as it goes. Reads its input exactly once.
pub struct ZstdIndexer<R> {
    source: R,
    decoder: Decoder<'static>,
    input: Box<[u8]>,
    in_pos: usize,
    in_len: usize,
    total_in: u64,
    total_out: u64,
    /// Start of the frame being decoded and the hash of its bytes so far.
    frame_start: (u64, u64),
    frame_hasher: Sha256,
    frame_in_progress: bool,
    frames: Vec<Frame>,
}

impl<R: Read> ZstdIndexer<R> {
    /// Starts the pass over `source`.
    pub fn new(source: R) -> io::Result<Self> {
        Ok(Self {
            source,
            decoder: Decoder::new()?,
            input: vec![0; 256 * 1024].into(),
            in_pos: 0,
            in_len: 0,
            total_in: 0,
            total_out: 0,
            frame_start: (0, 0),
            frame_hasher: Sha256::new(),
            frame_in_progress: false,
            frames: Vec::new(),
        })
    }

    /// The frame map, once the stream has been read to its end, and the source.
    pub fn finish(self) -> (ZstdMap, R) {
        let map = ZstdMap {
            frames: self.frames,
            compressed_size: self.total_in,
            uncompressed_size: self.total_out,
        };
        (map, self.source)
    }

    fn end_frame(&mut self) {
        let hasher = std::mem::take(&mut self.frame_hasher);
        let (in_offset, out_offset) = self.frame_start;
        self.frames.push(Frame { in_offset, out_offset, digest: Digest::from_hasher(hasher) });
        self.frame_start = (self.total_in, self.total_out);
        self.frame_in_progress = false;
    }
}

impl<R: Read> Read for ZstdIndexer<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.in_pos == self.in_len {
                self.in_len = self.source.read(&mut self.input)?;
                self.in_pos = 0;
                if self.in_len == 0 {
                    if self.frame_in_progress {
                        return Err(super::corrupt("zstd stream is truncated"));
                    }
                    return Ok(0);
                }
            }
            let mut src = InBuffer::around(&self.input[self.in_pos..self.in_len]);
            let mut dst = OutBuffer::around(&mut *buf);
            let hint = self
                .decoder
                .run(&mut src, &mut dst)
                .map_err(|e| super::corrupt(format!("zstd: {e}")))?;
            let consumed = src.pos();
            let produced = dst.pos();
            self.frame_hasher.update(&self.input[self.in_pos..self.in_pos + consumed]);
            self.in_pos += consumed;
            self.total_in += consumed as u64;
            self.total_out += produced as u64;
            self.frame_in_progress |= consumed > 0;
            if hint == 0 && self.frame_in_progress {
                self.end_frame();
            }
            if produced > 0 || buf.is_empty() {
                return Ok(produced);
            }
        }
    }
}
