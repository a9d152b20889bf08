//! Blob downloads that survive broken connections. A [`BlobStream`] reads
//! a byte range of a blob; when the connection resets or the body ends
//! early it asks again with `Range: bytes=<next byte>-`, so the caller's
//! hash of the bytes so far stays valid and nothing is fetched twice. A
//! `206` must carry a `Content-Range` starting where we asked; a server
//! that ignores `Range` (`200`) is handled by skipping what we already have.
//! The stream never yields bytes past the range's end. Verifying the
//! content is the caller's job (its digest is known only at the end).

use super::client::check;
use super::hosts::{Capability, Endpoint};
use super::transport::error_chain;
use super::{error_message, RegistryError, Repository};
use crate::digest::Digest;
use reqwest::blocking::Response;
use reqwest::header::{CONTENT_RANGE, RANGE};
use reqwest::StatusCode;
use std::io::{self, Read};

/// A resuming reader of `[start, end)` of a blob.
pub struct BlobStream {
    repository: Repository,
    endpoint: Endpoint,
    digest: Digest,
    /// The next byte to yield.
    offset: u64,
    end: u64,
    /// Whether `end` is the blob's size (then no `Range` is needed at 0).
    whole: bool,
    body: Option<Response>,
    /// Failures since the last byte arrived.
    failures: u32,
    resumes: u32,
}

impl Repository {
    /// Streams the whole blob `digest` of `size` bytes.
    pub fn blob(&self, digest: &Digest, size: u64) -> Result<BlobStream, RegistryError> {
        self.blob_stream(digest, 0, size, true)
    }

    /// Reads `len` bytes of blob `digest` from `offset` with a range request.
    pub fn read_range(
        &self,
        digest: &Digest,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, RegistryError> {
        let mut stream = self.blob_stream(digest, offset, offset + len, false)?;
        let mut data = Vec::with_capacity(len as usize);
        let mut chunk = vec![0u8; 256 * 1024];
        loop {
            match stream.fill(&mut chunk)? {
                0 => return Ok(data),
                n => data.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Reads a whole small blob (a config) and checks its digest; `what`
    /// names it in the error.
    pub fn read_verified(
        &self,
        digest: &Digest,
        size: u64,
        what: &str,
    ) -> Result<Vec<u8>, RegistryError> {
        let data = self.read_range(digest, 0, size)?;
        let actual = Digest::of(&data);
        if &actual != digest {
            return Err(RegistryError::DigestMismatch {
                what: format!("{what} of {}", self.full_name()),
                expected: digest.to_string(),
                actual,
            });
        }
        Ok(data)
    }

    fn blob_stream(
        &self,
        digest: &Digest,
        start: u64,
        end: u64,
        whole: bool,
    ) -> Result<BlobStream, RegistryError> {
        self.on_endpoints(Capability::Pull, |endpoint| {
            let mut stream = BlobStream {
                repository: self.clone(),
                endpoint: endpoint.clone(),
                digest: digest.clone(),
                offset: start,
                end,
                whole,
                body: None,
                failures: 0,
                resumes: 0,
            };
            // Open now, so a missing blob fails over to the next endpoint.
            stream.body = Some(stream.open()?);
            Ok(stream)
        })
    }
}

impl BlobStream {
    /// How many times the download was resumed after a broken connection.
    pub fn resumes(&self) -> u32 {
        self.resumes
    }

    fn url(&self) -> String {
        self.repository.url(&self.endpoint, &format!("blobs/{}", self.digest))
    }

    /// A response whose body starts at `self.offset`.
    fn open(&self) -> Result<Response, RegistryError> {
        let url = self.url();
        let ranged = !(self.whole && self.offset == 0);
        let range = format!("bytes={}-{}", self.offset, self.end.saturating_sub(1));
        let response = self.repository.send(&self.endpoint, None, &url, &|http| {
            let request = http.get(&url);
            if ranged {
                request.header(RANGE, &range)
            } else {
                request
            }
        })?;
        match response.status() {
            StatusCode::NOT_FOUND => {
                let body = response.bytes().unwrap_or_default();
                Err(RegistryError::NotFound {
                    what: format!("blob {}", self.digest),
                    repository: self.repository.full_name(),
                    message: error_message(&body),
                })
            }
            StatusCode::PARTIAL_CONTENT => {
                let start = content_range_start(&response);
                if start != Some(self.offset) {
                    return Err(RegistryError::Invalid {
                        what: url,
                        reason: format!(
                            "asked for {range}, got Content-Range {:?}",
                            response.headers().get(CONTENT_RANGE)
                        ),
                    });
                }
                Ok(response)
            }
            _ => {
                let mut response = check(response, &url)?;
                // The server ignored Range: skip what we already have.
                let skipped =
                    io::copy(&mut (&mut response).take(self.offset), &mut io::sink()).map_err(
                        |e| RegistryError::Unreachable { url: url.clone(), reason: e.to_string() },
                    )?;
                if skipped < self.offset {
                    return Err(RegistryError::Invalid {
                        what: url,
                        reason: format!("blob ends at {skipped}, before byte {}", self.offset),
                    });
                }
                Ok(response)
            }
        }
    }

    /// Reads into `buf`, resuming after failures; 0 at the end of the range.
    fn fill(&mut self, buf: &mut [u8]) -> Result<usize, RegistryError> {
        loop {
            let want = (self.end - self.offset).min(buf.len() as u64) as usize;
            if want == 0 {
                return Ok(0);
            }
            let body = match &mut self.body {
                Some(body) => body,
                None => self.body.insert(self.open()?),
            };
            let failure = match body.read(&mut buf[..want]) {
                Ok(0) => format!("the connection closed at byte {} of {}", self.offset, self.end),
                Ok(n) => {
                    self.offset += n as u64;
                    self.failures = 0;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => error_chain(&e),
            };
            self.body = None;
            self.failures += 1;
            let policy = self.repository.retry_policy();
            if self.failures >= policy.attempts {
                return Err(RegistryError::Unreachable {
                    url: self.url(),
                    reason: format!("download gave up after {} tries: {failure}", self.failures),
                });
            }
            tracing::info!(blob = %self.digest, offset = self.offset, %failure, "resuming download");
            self.resumes += 1;
            std::thread::sleep(policy.backoff(self.failures - 1));
        }
    }
}

impl Read for BlobStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.fill(buf).map_err(io::Error::other)
    }
}

/// The first byte of `Content-Range: bytes START-END/TOTAL`.
fn content_range_start(response: &Response) -> Option<u64> {
    let value = response.headers().get(CONTENT_RANGE)?.to_str().ok()?;
    parse_content_range_start(value)
}

fn parse_content_range_start(value: &str) -> Option<u64> {
    let range = value.trim().strip_prefix("bytes")?.trim_start();
    range.split_once('-')?.0.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_starts_parse() {
        assert_eq!(parse_content_range_start("bytes 100-199/1000"), Some(100));
        assert_eq!(parse_content_range_start("bytes 0-0/*"), Some(0));
        assert_eq!(parse_content_range_start("bytes */1000"), None);
        assert_eq!(parse_content_range_start("items 1-2/3"), None);
        assert_eq!(parse_content_range_start(""), None);
    }
}
