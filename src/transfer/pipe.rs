//! The download half of a layer pull, run beside the indexing pass: one
//! thread reads the blob from the registry and writes it to its temp file,
//! then hands it on in [`CHUNK`]-byte buffers through a bounded channel to
//! the indexer on the caller's thread. Inflating is what bounds a pull, so
//! everything else moves off its thread; the bound keeps memory at a few
//! chunks and lets a slow indexer throttle the download. The indexer sends
//! every buffer back to be filled again.

use std::fs::File;
use std::io::{self, Read, Write};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};

/// Bytes handed over at a time: large enough that the handover costs
/// nothing next to inflating them.
const CHUNK: usize = 1 << 20;
/// Chunks queued for the indexer: enough to ride out scheduling hiccups.
const DEPTH: usize = 4;
/// Bytes written between two `fdatasync`s of the temp file.
const SYNC_EVERY: usize = 16 << 20;

/// A piece of the blob; an empty one marks its end. An error says why the
/// download stopped (it is reported by the indexer, which then fails).
type Message = io::Result<Vec<u8>>;

/// The two ends: [`download`] fills the [`ChunkSender`], the indexer reads
/// the blob from the [`ChunkReader`].
pub fn channel() -> (ChunkSender, ChunkReader) {
    let (full, chunks) = mpsc::sync_channel(DEPTH);
    let (empty, recycled) = mpsc::channel();
    let sender = ChunkSender { full, recycled };
    (sender, ChunkReader { chunks, empty, current: Vec::new(), pos: 0, state: State::Reading })
}

/// Copies `source` into `file` and, while the reader listens, on to the
/// reader, calling `advanced` with the bytes written. Once the reader is
/// gone (the indexing failed) it still writes the rest, so the caller can
/// hash the whole blob to explain the failure. Returns whether all of
/// `source` reached `file`; a failure is passed on to the reader.
///
/// The file is flushed to disk as it grows, every [`SYNC_EVERY`] bytes and
/// at the end: this thread mostly waits for the indexer anyway, and the
/// fsync that makes the blob durable then finds next to nothing left to
/// write, instead of holding up the end of the pull for the whole blob.
pub fn download(
    mut source: impl Read,
    file: &mut File,
    mut chunks: ChunkSender,
    advanced: impl Fn(u64),
) -> bool {
    let mut unsynced = 0;
    loop {
        let mut chunk = chunks.buffer();
        let stored = fill(&mut source, &mut chunk).and_then(|()| {
            file.write_all(&chunk)?;
            unsynced += chunk.len();
            if chunk.is_empty() || unsynced >= SYNC_EVERY {
                unsynced = 0;
                file.sync_data()?;
            }
            Ok(())
        });
        if let Err(e) = stored {
            chunks.send(Err(e));
            return false;
        }
        let end = chunk.is_empty();
        advanced(chunk.len() as u64);
        chunks.send(Ok(chunk));
        if end {
            return true;
        }
    }
}

/// Reads into `chunk` until it holds [`CHUNK`] bytes or `source` ends.
fn fill(source: &mut impl Read, chunk: &mut Vec<u8>) -> io::Result<()> {
    // A recycled chunk keeps its length, so this rarely writes anything.
    chunk.resize(CHUNK, 0);
    let mut len = 0;
    while len < CHUNK {
        match source.read(&mut chunk[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    chunk.truncate(len);
    Ok(())
}

/// The download's end of the channel.
pub struct ChunkSender {
    full: SyncSender<Message>,
    /// Chunks the reader is done with.
    recycled: Receiver<Vec<u8>>,
}

impl ChunkSender {
    /// A buffer to fill: one the reader is done with, else a new one.
    fn buffer(&mut self) -> Vec<u8> {
        self.recycled.try_recv().unwrap_or_else(|_| Vec::with_capacity(CHUNK))
    }

    /// Hands `message` to the reader, unless it is gone.
    fn send(&mut self, message: Message) {
        // A reader that is gone has stopped reading: nothing to tell it.
        let _ = self.full.send(message);
    }
}

/// Where a [`ChunkReader`] is.
enum State {
    Reading,
    /// The end marker arrived.
    Ended,
    /// The download failed (and said why once).
    Failed,
}

/// The indexer's end of the channel: the blob as a reader.
pub struct ChunkReader {
    chunks: Receiver<Message>,
    /// Where finished chunks go back to the download.
    empty: Sender<Vec<u8>>,
    current: Vec<u8>,
    /// Bytes of `current` already read.
    pos: usize,
    state: State,
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.current.len() {
            match self.state {
                State::Ended => return Ok(0),
                State::Failed => return Err(io::Error::other("the download failed")),
                State::Reading => {}
            }
            let next = match self.chunks.recv() {
                Ok(Ok(chunk)) => chunk,
                Ok(Err(e)) => {
                    self.state = State::Failed;
                    return Err(e);
                }
                // Only a panic ends the download without a message.
                Err(mpsc::RecvError) => {
                    self.state = State::Failed;
                    return Err(io::Error::other("the download stopped"));
                }
            };
            if next.is_empty() {
                self.state = State::Ended;
            }
            let done = std::mem::replace(&mut self.current, next);
            // The download may have finished already; then the buffer is freed.
            let _ = self.empty.send(done);
            self.pos = 0;
        }
        let n = buf.len().min(self.current.len() - self.pos);
        buf[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Seek;

    /// A source that fails after `fail_at` bytes, in reads of odd sizes.
    struct Failing<'a> {
        data: &'a [u8],
        fail_at: usize,
    }

    impl Read for Failing<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.fail_at == 0 {
                return Err(io::Error::other("connection reset"));
            }
            let n = buf.len().min(self.data.len()).min(self.fail_at).min(7777);
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            self.fail_at -= n;
            Ok(n)
        }
    }

    /// Downloads `data` (failing after `fail_at` bytes) while reading it
    /// all, or while not reading at all: whether the download finished,
    /// the file, and what was read.
    fn run(data: &[u8], fail_at: usize, read_all: bool) -> (bool, Vec<u8>, io::Result<Vec<u8>>) {
        let (sender, mut reader) = channel();
        let mut file = tempfile::tempfile().unwrap();
        let (whole, read) = std::thread::scope(|scope| {
            let source = Failing { data, fail_at };
            let file = &mut file;
            let download = scope.spawn(move || download(source, file, sender, |_| {}));
            let mut read = Vec::new();
            let result = if read_all {
                reader.read_to_end(&mut read).map(|_| read)
            } else {
                drop(reader);
                Ok(read)
            };
            (download.join().unwrap(), result)
        });
        let mut written = Vec::new();
        file.seek(io::SeekFrom::Start(0)).unwrap();
        file.read_to_end(&mut written).unwrap();
        (whole, written, read)
    }

    #[test]
    fn the_reader_and_the_file_get_every_byte_across_chunk_boundaries() {
        for len in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, (DEPTH + 3) * CHUNK + 5] {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let (whole, file, read) = run(&data, usize::MAX, true);
            assert!(whole, "length {len}");
            assert!(file == data, "length {len}");
            assert!(read.unwrap() == data, "length {len}");
        }
    }

    #[test]
    fn a_failed_download_fails_the_reader_not_as_an_end() {
        let data = vec![3u8; 3 * CHUNK];
        let (whole, _, read) = run(&data, CHUNK + 10, true);
        assert!(!whole);
        assert_eq!(read.unwrap_err().to_string(), "connection reset");
    }

    #[test]
    fn the_file_gets_the_whole_blob_after_the_reader_gives_up() {
        let data: Vec<u8> = (0..(DEPTH + 3) * CHUNK).map(|i| (i % 13) as u8).collect();
        let (whole, file, _) = run(&data, usize::MAX, false);
        assert!(whole);
        assert!(file == data);
    }
}
