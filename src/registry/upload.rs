//! Uploads as the OCI distribution spec describes them: `HEAD` to skip blobs
//! the repository has, a cross-repository mount (`POST …/uploads/?mount=&from=`)
//! so a blob already on the registry is linked rather than sent again, and
//! otherwise an upload session (`POST` → `202` + `Location`) finished by
//! `PUT …?digest=`, either with the whole blob or after `PATCH`ed chunks.
//!
//! The transport sends a request again after a connection error, `429` or
//! `5xx`, calling the request builder once per attempt, so every body here
//! can be made twice: a chunk is read into memory and shared, a whole blob
//! is reopened from its file, a small blob given as bytes is copied. A
//! retried `PATCH` whose first attempt did reach the registry leaves the
//! session at the wrong offset; the registry then answers `416`, and the
//! upload restarts once with a fresh session (Docker and containerd do the
//! same) rather than guessing the offset.
//!
//! Progress counts the bytes reqwest reads from a body, as a high-water
//! mark over the blob: bytes sent again by a retry or a restart are not
//! counted twice, so the total never exceeds the blob's size.

use super::client::check;
use super::hosts::{Capability, Endpoint};
use super::{RegistryError, Repository};
use crate::digest::Digest;
use reqwest::blocking::{Body, Response};
use reqwest::header::{CONTENT_RANGE, CONTENT_TYPE, LOCATION, RANGE};
use reqwest::StatusCode;
use std::fs::File;
use std::io::{self, Cursor, Read};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

const OCTET_STREAM: &str = "application/octet-stream";

/// One blob to upload, read from a local file.
#[derive(Debug, Clone)]
pub struct BlobPush {
    /// The blob's digest (the registry verifies the bytes against it).
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
    /// The file holding exactly those bytes; it is reopened for each attempt.
    pub path: PathBuf,
    /// Send blobs larger than this in `PATCH`ed chunks of this many bytes
    /// (raised to the registry's `OCI-Chunk-Min-Length`); `None` or `0`:
    /// one `PUT` with the whole blob.
    pub chunk_size: Option<u64>,
    /// A repository of the same registry that may have the blob: it is
    /// mounted from there when the registry allows it.
    pub mount_from: Option<String>,
}

/// How [`Repository::push_blob`] got a blob into the repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobPushed {
    /// The registry linked it from [`BlobPush::mount_from`]; no bytes moved.
    Mounted,
    /// Its bytes were uploaded.
    Uploaded,
}

/// What `POST …/blobs/uploads/` led to.
enum Start {
    /// The cross-repository mount worked: the blob is there.
    Mounted,
    /// An upload session to send the bytes to.
    Session(Session),
}

/// What the `PUT` that completes an upload carries.
#[derive(Clone, Copy)]
enum Final<'a> {
    /// Nothing: the bytes went in `PATCH`ed chunks.
    Empty,
    /// The whole blob, read from its file and counted.
    File(&'a BlobPush, &'a Sent),
    /// The whole blob, from memory.
    Bytes(&'a [u8]),
}

struct Session {
    /// Absolute URL of the session (it changes after every `PATCH`).
    location: String,
    /// `OCI-Chunk-Min-Length`: the smallest chunk the registry takes.
    min_chunk: u64,
}

/// The bytes-sent high-water mark of one blob and whom to tell about it.
#[derive(Clone)]
struct Sent {
    high: Arc<AtomicU64>,
    report: Arc<dyn Fn(u64) + Send + Sync>,
}

impl Sent {
    /// Byte `position` of the blob has been read for sending: reports what
    /// is new beyond the mark.
    fn reached(&self, position: u64) {
        let before = self.high.fetch_max(position, Ordering::Relaxed);
        if position > before {
            (self.report)(position - before);
        }
    }
}

/// A body reader that reports its position in the blob as it is read.
struct Counting<R> {
    inner: R,
    /// Offset in the blob of the next byte `inner` yields.
    position: u64,
    sent: Sent,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.position += n as u64;
        self.sent.reached(self.position);
        Ok(n)
    }
}

/// A file opened on first read, so building a request cannot fail; an
/// error surfaces as a failed body, like a broken connection.
struct LazyFile {
    path: PathBuf,
    file: Option<io::Take<File>>,
    len: u64,
}

impl Read for LazyFile {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let file = match &mut self.file {
            Some(file) => file,
            None => self.file.insert(File::open(&self.path)?.take(self.len)),
        };
        file.read(buf)
    }
}

impl Repository {
    /// Does the repository have the blob `digest`? (`HEAD`: `200` yes, `404` no.)
    pub fn has_blob(&self, digest: &Digest) -> Result<bool, RegistryError> {
        self.on_endpoints(Capability::Push, |endpoint| {
            let url = self.url(endpoint, &format!("blobs/{digest}"));
            let response = self.send(endpoint, None, &url, &|http| http.head(&url))?;
            if response.status() == StatusCode::NOT_FOUND {
                return Ok(false);
            }
            check(response, &url).map(|_| true)
        })
    }

    /// Puts `blob` into the repository: mounted from
    /// [`BlobPush::mount_from`] when possible, else uploaded (chunked or
    /// whole). `progress` is told how many more bytes were sent (perhaps
    /// from another thread), never more than the blob's size in total. It
    /// does not check whether the repository has the blob already
    /// ([`Repository::has_blob`]).
    pub fn push_blob(
        &self,
        blob: &BlobPush,
        progress: impl Fn(u64) + Send + Sync + 'static,
    ) -> Result<BlobPushed, RegistryError> {
        let sent = Sent { high: Arc::new(AtomicU64::new(0)), report: Arc::new(progress) };
        self.on_endpoints(Capability::Push, |endpoint| self.push_blob_to(endpoint, blob, &sent))
    }

    fn push_blob_to(
        &self,
        endpoint: &Endpoint,
        blob: &BlobPush,
        sent: &Sent,
    ) -> Result<BlobPushed, RegistryError> {
        let mut start = match &blob.mount_from {
            Some(from) => match self.start_upload(endpoint, Some((&blob.digest, from))) {
                Err(e @ RegistryError::Unreachable { .. }) => return Err(e),
                // Refused (no pull access to `from`, say): upload instead.
                Err(e) => {
                    tracing::info!(blob = %blob.digest, %from, error = %e, "cannot mount; uploading");
                    self.start_upload(endpoint, None)?
                }
                Ok(start) => start,
            },
            None => self.start_upload(endpoint, None)?,
        };
        let mut restarted = false;
        loop {
            let session = match start {
                Start::Mounted => return Ok(BlobPushed::Mounted),
                Start::Session(session) => session,
            };
            match self.upload(endpoint, blob, &session, sent) {
                Ok(()) => return Ok(BlobPushed::Uploaded),
                Err(e) if !restarted && restartable(&e) => {
                    tracing::warn!(blob = %blob.digest, error = %e, "upload failed; starting over");
                    self.cancel(endpoint, &session.location);
                    restarted = true;
                    start = self.start_upload(endpoint, None)?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// `POST …/blobs/uploads/`, with `?mount=&from=` to try a mount first.
    fn start_upload(
        &self,
        endpoint: &Endpoint,
        mount: Option<(&Digest, &str)>,
    ) -> Result<Start, RegistryError> {
        let (path, scope) = match mount {
            Some((digest, from)) => (
                format!("blobs/uploads/?mount={digest}&from={from}"),
                // The token must also grant pull on the source repository.
                Some(self.scope().with_pull(from)),
            ),
            None => ("blobs/uploads/".to_string(), None),
        };
        let url = self.url(endpoint, &path);
        let response =
            self.send(endpoint, scope.as_ref(), &url, &|http| http.post(&url).body(Vec::new()))?;
        match response.status() {
            StatusCode::CREATED if mount.is_some() => Ok(Start::Mounted),
            StatusCode::ACCEPTED => {
                let min_chunk = header(&response, "oci-chunk-min-length")
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                let location = self.location(endpoint, &response, &url)?;
                Ok(Start::Session(Session { location, min_chunk }))
            }
            _ => Err(unexpected(response, &url, "202 Accepted")),
        }
    }

    /// Sends the bytes of `blob` to `session` and completes it.
    fn upload(
        &self,
        endpoint: &Endpoint,
        blob: &BlobPush,
        session: &Session,
        sent: &Sent,
    ) -> Result<(), RegistryError> {
        let chunk = blob.chunk_size.filter(|&c| c > 0).map(|c| c.max(session.min_chunk));
        match chunk {
            Some(chunk) if blob.size > chunk => {
                let location = self.send_chunks(endpoint, blob, &session.location, chunk, sent)?;
                self.complete(endpoint, &blob.digest, &location, Final::Empty)
            }
            _ => self.complete(endpoint, &blob.digest, &session.location, Final::File(blob, sent)),
        }
    }

    /// `PATCH`es the blob in chunks of `chunk` bytes; returns the final location.
    fn send_chunks(
        &self,
        endpoint: &Endpoint,
        blob: &BlobPush,
        location: &str,
        chunk: u64,
        sent: &Sent,
    ) -> Result<String, RegistryError> {
        let mut file = File::open(&blob.path).map_err(|e| unreadable(blob, &e))?;
        let mut location = location.to_string();
        let mut offset = 0;
        while offset < blob.size {
            let len = chunk.min(blob.size - offset);
            let mut data = vec![0; len as usize];
            file.read_exact(&mut data).map_err(|e| unreadable(blob, &e))?;
            let data: Arc<[u8]> = data.into();
            let end = offset + len - 1;
            let range = format!("{offset}-{end}");
            let url = location.clone();
            let response = self.send(endpoint, None, &url, &|http| {
                let body = Counting {
                    inner: Cursor::new(data.clone()),
                    position: offset,
                    sent: sent.clone(),
                };
                http.patch(&url)
                    .header(CONTENT_TYPE, OCTET_STREAM)
                    .header(CONTENT_RANGE, &range)
                    .body(Body::sized(body, len))
            })?;
            if response.status() != StatusCode::ACCEPTED {
                return Err(unexpected(response, &url, "202 Accepted"));
            }
            // `Range: 0-<last byte>`: what the registry holds now.
            let held = header(&response, RANGE.as_str());
            if let Some(held_end) = held.as_deref().and_then(range_end) {
                if held_end != end {
                    return Err(RegistryError::Invalid {
                        what: url,
                        reason: format!("after sending bytes {range} the registry holds {held:?}"),
                    });
                }
            }
            location = self.location(endpoint, &response, &url)?;
            offset += len;
        }
        Ok(location)
    }

    /// `PUT <location>?digest=` with `body`, which completes the upload.
    fn complete(
        &self,
        endpoint: &Endpoint,
        digest: &Digest,
        location: &str,
        body: Final<'_>,
    ) -> Result<(), RegistryError> {
        let url = with_query(location, "digest", &digest.to_string());
        let response = self.send(endpoint, None, &url, &|http| {
            let request = http.put(&url).header(CONTENT_TYPE, OCTET_STREAM);
            match body {
                Final::File(blob, sent) => {
                    let file = LazyFile { path: blob.path.clone(), file: None, len: blob.size };
                    let body = Counting { inner: file, position: 0, sent: sent.clone() };
                    request.body(Body::sized(body, blob.size))
                }
                Final::Bytes(data) => request.body(data.to_vec()),
                Final::Empty => request.body(Vec::new()),
            }
        })?;
        if response.status() != StatusCode::CREATED {
            return Err(unexpected(response, &url, "201 Created"));
        }
        if let Some(announced) = header(&response, "docker-content-digest") {
            if announced != digest.to_string() {
                return Err(RegistryError::DigestMismatch {
                    what: format!("blob upload to {}", self.full_name()),
                    expected: announced,
                    actual: digest.clone(),
                });
            }
        }
        Ok(())
    }

    /// Puts the small blob `data` (a config, an index artifact's payload)
    /// into the repository unless it has it already, in one `PUT` that the
    /// transport may send again; returns its digest. Like [`push_blob`],
    /// a failed session is started over once.
    ///
    /// [`push_blob`]: Repository::push_blob
    pub fn push_blob_bytes(&self, data: &[u8]) -> Result<Digest, RegistryError> {
        let digest = Digest::of(data);
        if self.has_blob(&digest)? {
            return Ok(digest);
        }
        self.on_endpoints(Capability::Push, |endpoint| {
            let mut restarted = false;
            loop {
                // Without `?mount=` the registry always opens a session.
                let Start::Session(session) = self.start_upload(endpoint, None)? else {
                    return Ok(digest.clone());
                };
                match self.complete(endpoint, &digest, &session.location, Final::Bytes(data)) {
                    Ok(()) => return Ok(digest.clone()),
                    Err(e) if !restarted && restartable(&e) => {
                        tracing::warn!(blob = %digest, error = %e, "upload failed; starting over");
                        self.cancel(endpoint, &session.location);
                        restarted = true;
                    }
                    Err(e) => return Err(e),
                }
            }
        })
    }

    /// Abandons an upload session; best effort, registries expire them anyway.
    fn cancel(&self, endpoint: &Endpoint, location: &str) {
        if let Err(e) = self.send(endpoint, None, location, &|http| http.delete(location)) {
            tracing::debug!(%location, error = %e, "cannot cancel the upload session");
        }
    }

    /// The absolute `Location` of an upload session answer.
    fn location(
        &self,
        endpoint: &Endpoint,
        response: &Response,
        url: &str,
    ) -> Result<String, RegistryError> {
        match header(response, LOCATION.as_str()) {
            Some(location) if !location.is_empty() => Ok(self.absolute(endpoint, &location)),
            _ => Err(RegistryError::Invalid {
                what: url.to_string(),
                reason: "the upload answer has no Location header".into(),
            }),
        }
    }

    /// Uploads a manifest or index under `reference` (a tag, or the digest
    /// of `bytes`) with `media_type` as its `Content-Type`. The bytes are
    /// sent unchanged, so their digest is the one returned; a
    /// `Docker-Content-Digest` answer that differs is an error.
    pub fn put_manifest(
        &self,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<Digest, RegistryError> {
        let digest = Digest::of(bytes);
        self.on_endpoints(Capability::Push, |endpoint| {
            let url = self.url(endpoint, &format!("manifests/{reference}"));
            let response = self.send(endpoint, None, &url, &|http| {
                http.put(&url).header(CONTENT_TYPE, media_type).body(bytes.to_vec())
            })?;
            let response = check(response, &url)?;
            if let Some(announced) = header(&response, "docker-content-digest") {
                if announced != digest.to_string() {
                    return Err(RegistryError::DigestMismatch {
                        what: format!("manifest {reference} pushed to {}", self.full_name()),
                        expected: announced,
                        actual: digest.clone(),
                    });
                }
            }
            Ok(digest.clone())
        })
    }
}

fn header(response: &Response, name: &str) -> Option<String> {
    response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
}

/// The error for an answer other than `wanted`: the registry's own error
/// for a failure status, else a protocol error.
fn unexpected(response: Response, url: &str, wanted: &str) -> RegistryError {
    let status = response.status();
    match check(response, url) {
        Err(e) => e,
        Ok(_) => RegistryError::Invalid {
            what: url.to_string(),
            reason: format!("expected {wanted}, the registry answered {status}"),
        },
    }
}

fn unreadable(blob: &BlobPush, error: &io::Error) -> RegistryError {
    RegistryError::Invalid {
        what: format!("blob {}", blob.digest),
        reason: format!("cannot read {}: {error}", blob.path.display()),
    }
}

/// Failures a fresh upload session may cure: a session the registry lost or
/// whose offset went wrong (`404`, `416`, `400`), a broken connection, a
/// garbled answer. Refusals (`401`, `403`) are not retried.
fn restartable(error: &RegistryError) -> bool {
    match error {
        RegistryError::Status { status, .. } => !matches!(status, 401 | 403),
        RegistryError::Unreachable { .. }
        | RegistryError::Invalid { .. }
        | RegistryError::NotFound { .. } => true,
        _ => false,
    }
}

/// `url` with `key=value` added to its query (a session URL often has one).
fn with_query(url: &str, key: &str, value: &str) -> String {
    let sep = match url.find('?') {
        None => "?",
        Some(_) if url.ends_with('?') || url.ends_with('&') => "",
        Some(_) => "&",
    };
    format!("{url}{sep}{key}={value}")
}

/// The last byte of a `Range: 0-<end>` answer (`bytes=` prefix allowed).
fn range_end(value: &str) -> Option<u64> {
    let value = value.trim();
    let value = value.strip_prefix("bytes=").unwrap_or(value);
    value.split_once('-')?.1.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn digests_are_appended_to_the_session_query() {
        let d = "sha256:ab";
        assert_eq!(
            with_query("http://r/v2/a/blobs/uploads/u", "digest", d),
            "http://r/v2/a/blobs/uploads/u?digest=sha256:ab"
        );
        assert_eq!(
            with_query("http://r/u?_state=xyz%3D", "digest", d),
            "http://r/u?_state=xyz%3D&digest=sha256:ab"
        );
        assert_eq!(with_query("http://r/u?", "digest", d), "http://r/u?digest=sha256:ab");
        assert_eq!(with_query("http://r/u?a=1&", "digest", d), "http://r/u?a=1&digest=sha256:ab");
    }

    #[test]
    fn range_answers_give_the_last_byte_held() {
        assert_eq!(range_end("0-65535"), Some(65535));
        assert_eq!(range_end("bytes=0-9"), Some(9));
        assert_eq!(range_end(" 0-0 "), Some(0));
        assert_eq!(range_end("0-"), None);
        assert_eq!(range_end("garbage"), None);
    }

    #[test]
    fn progress_counts_each_byte_once_across_retries() {
        let total = Arc::new(Mutex::new(Vec::new()));
        let seen = total.clone();
        let sent = Sent {
            high: Arc::new(AtomicU64::new(0)),
            report: Arc::new(move |n| seen.lock().unwrap().push(n)),
        };
        let read_all = |offset: u64, data: &[u8]| {
            let mut reader = Counting {
                inner: Cursor::new(data.to_vec()),
                position: offset,
                sent: sent.clone(),
            };
            io::copy(&mut reader, &mut io::sink()).unwrap();
        };
        read_all(0, &[0; 10]); // chunk 1
        read_all(0, &[0; 10]); // chunk 1 again (a retry): nothing new
        read_all(10, &[0; 5]); // chunk 2
        read_all(0, &[0; 15]); // a restart from scratch: nothing new
        let reports = total.lock().unwrap().clone();
        assert_eq!(reports.iter().sum::<u64>(), 15, "{reports:?}");
        assert!(reports.iter().all(|&n| n > 0));
    }

    #[test]
    fn lost_sessions_restart_but_refusals_do_not() {
        let status =
            |status| RegistryError::Status { url: "u".into(), status, message: "m".into() };
        assert!(restartable(&status(416)));
        assert!(restartable(&status(404)));
        assert!(restartable(&status(400)));
        assert!(!restartable(&status(403)));
        assert!(!restartable(&RegistryError::Unauthorized {
            registry: "r".into(),
            detail: "d".into()
        }));
        assert!(restartable(&RegistryError::Unreachable { url: "u".into(), reason: "r".into() }));
    }

    #[test]
    fn lazy_files_yield_at_most_len_bytes_and_report_open_errors_on_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        std::fs::write(&path, b"0123456789").unwrap();
        let mut data = Vec::new();
        LazyFile { path: path.clone(), file: None, len: 4 }.read_to_end(&mut data).unwrap();
        assert_eq!(data, b"0123");
        let mut missing = LazyFile { path: dir.path().join("nope"), file: None, len: 4 };
        assert!(missing.read(&mut [0; 4]).is_err());
    }
}
