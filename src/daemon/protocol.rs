//! The control protocol: one JSON object per line each way over the
//! daemon's Unix socket, a request then its response, as many as the client
//! likes per connection. Every message carries `"version"`; a daemon
//! refuses a version it does not speak with an `unsupported-version` error
//! (see docs/daemon.md for the full schema and examples).
//!
//! ```text
//! → {"version":1,"op":"list"}
//! ← {"version":1,"status":"ok","result":{"type":"mounts","mounts":[…]}}
//! → {"version":1,"op":"unmount","mountpoint":"/mnt/x"}
//! ← {"version":1,"status":"error","kind":"failed","message":"…"}
//! ```

use crate::fs::record::{published_list_path, PrefetchList};
use crate::fs::{MountOptions, Prefetch, RemoteOptions, UpperDirs};
use crate::registry::{AuthFile, Client, ClientOptions, Hosts, RetryPolicy};
use crate::store::Store;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// The longest request line accepted (a mount request is well under 4 KiB).
pub const MAX_LINE: usize = 1 << 20;

/// A request with its version.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RequestEnvelope {
    /// Protocol version of the sender.
    pub version: u32,
    /// The request.
    #[serde(flatten)]
    pub request: Request,
}

/// What a client can ask.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Is the daemon there? Answers [`Reply::Pong`].
    Ping,
    /// Mount an image (already resolved in the store, lazily or not).
    Mount(Box<MountSpec>),
    /// Unmount a mount; `discard` also deletes its upper and work dirs.
    Unmount {
        /// The mountpoint (absolute).
        mountpoint: PathBuf,
        /// Detach at once even when busy.
        #[serde(default)]
        force: bool,
        /// Delete the changes too.
        #[serde(default)]
        discard: bool,
    },
    /// Every mount: [`Reply::Mounts`].
    List,
    /// What a lazy mount has fetched: [`Reply::Stats`].
    Stats {
        /// The mountpoint (absolute).
        mountpoint: PathBuf,
    },
    /// Freeze a writable mount's namespace until this connection closes
    /// (a commit reads the upper meanwhile): [`Reply::Paused`].
    Pause {
        /// The mountpoint (absolute).
        mountpoint: PathBuf,
    },
    /// An active containerd snapshot on an image the daemon serves lazily,
    /// by key: [`Reply::Snapshot`].
    Snapshot {
        /// Its key, or the last `/` part of it.
        key: String,
    },
    /// Stop the daemon: unmount everything (changes kept) and exit, or with
    /// `keep_mounts`, leave the mounts to the keeper until a new daemon
    /// takes them over.
    Stop {
        /// Leave the mounts in place (an upgrade).
        #[serde(default)]
        keep_mounts: bool,
    },
    /// Hand every mount to a new daemon process started from the binary
    /// now installed at the daemon's path (an upgrade that breaks no
    /// mount).
    Restart,
}

/// One mount, as asked for (also what the daemon records durably, so a
/// restarted daemon can serve it again).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MountSpec {
    /// The image reference (or id) in the store.
    pub reference: String,
    /// Absolute, canonical mountpoint.
    pub mountpoint: PathBuf,
    /// Upper and work directories, absolute; `None` mounts read-only.
    pub upper: Option<(PathBuf, PathBuf)>,
    /// Seconds a read keeps retrying a failed fetch before `EIO`.
    pub fetch_timeout_secs: u64,
    /// What to fetch in the background after mounting.
    pub prefetch: PrefetchSpec,
    /// Bytes per second the prefetch may use.
    pub prefetch_rate: Option<u64>,
    /// Where to save the list of files read when the mount ends.
    pub record: Option<PathBuf>,
    /// How to reach the registry for layers not in the store.
    pub registry: RegistrySettings,
    /// Only the image's bottom this many layers (a lazily served
    /// containerd snapshot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers: Option<usize>,
}

/// `--prefetch`, with the list file resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum PrefetchSpec {
    /// Only what is read.
    None,
    /// Every chunk.
    All,
    /// The files of a recorded list, first; `list: None` is the list the
    /// image's index artifact published.
    Recorded {
        /// The list file.
        list: Option<PathBuf>,
    },
}

/// The registry flags of a command, resolved in the client's environment
/// (the daemon's own `$DOCKER_CONFIG` or `$HOME` may differ).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistrySettings {
    /// Registries reached over plain HTTP.
    pub insecure: Vec<String>,
    /// The `hosts.toml` directory.
    pub hosts_dir: PathBuf,
    /// The credentials file.
    pub auth_file: PathBuf,
}

impl RegistrySettings {
    /// The settings of this process's environment: default hosts dir,
    /// discovered credentials, no extra plain-HTTP registries.
    pub fn from_environment() -> Self {
        Self {
            insecure: Vec::new(),
            hosts_dir: Hosts::default_dir(),
            auth_file: AuthFile::discover().path().to_path_buf(),
        }
    }

    /// A client with these settings.
    pub fn client(&self) -> Result<Client, crate::registry::RegistryError> {
        Client::new(ClientOptions {
            hosts: Hosts::new(Some(self.hosts_dir.clone()), self.insecure.clone()),
            auth_file: AuthFile::at(&self.auth_file),
            retry: RetryPolicy::default(),
        })
    }
}

impl MountSpec {
    /// The options to serve this mount with. `remote` is filled in when
    /// some layer of the image is not in the store; `disk` is the shared
    /// disk tier of the chunk cache.
    pub fn options(
        &self,
        store: &Store,
        threads: usize,
        disk: Option<std::sync::Arc<crate::cache::DiskCache>>,
    ) -> Result<MountOptions, String> {
        let image = store.resolve(&self.reference).map_err(|e| e.to_string())?;
        let lazy = !image.layers.iter().all(|l| store.blob_path(&l.digest).exists());
        let remote = match lazy {
            false => None,
            true => Some(RemoteOptions {
                client: self.registry.client().map_err(|e| e.to_string())?,
                disk,
                fetch_timeout: Duration::from_secs(self.fetch_timeout_secs),
                prefetch: self.prefetch(store, &image.manifest_digest)?,
                prefetch_rate: self.prefetch_rate,
            }),
        };
        Ok(MountOptions {
            threads,
            upper: self
                .upper
                .as_ref()
                .map(|(upper, work)| UpperDirs { upper: upper.clone(), work: work.clone() }),
            remote,
            record: self.record.clone(),
            metrics: None,
            layers: self.layers,
            // A containerd snapshot's files meet containerd's differ.
            answer_xattrs: self.layers.is_some(),
        })
    }

    fn prefetch(
        &self,
        store: &Store,
        manifest: &crate::digest::Digest,
    ) -> Result<Prefetch, String> {
        let explicit = match &self.prefetch {
            PrefetchSpec::None => return Ok(Prefetch::None),
            PrefetchSpec::All => return Ok(Prefetch::All),
            PrefetchSpec::Recorded { list } => list.clone(),
        };
        let path =
            explicit.clone().unwrap_or_else(|| published_list_path(&store.index_dir(), manifest));
        match std::fs::read(&path) {
            Ok(bytes) => PrefetchList::parse(&bytes)
                .map(Prefetch::Recorded)
                .map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if explicit.is_none() && e.kind() == std::io::ErrorKind::NotFound => {
                tracing::warn!(
                    "the image's index artifact has no prefetch list; prefetching nothing"
                );
                Ok(Prefetch::None)
            }
            Err(e) => Err(format!("reading {}: {e}", path.display())),
        }
    }
}

/// A response with its version.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResponseEnvelope {
    /// Protocol version of the daemon.
    pub version: u32,
    /// The outcome.
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// Success with a reply, or an error.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "kebab-case")]
pub enum Outcome {
    /// Done.
    Ok {
        /// What it gives back.
        result: Reply,
    },
    /// Not done.
    Error {
        /// Which kind of failure.
        kind: ErrorKind,
        /// What went wrong and what to do, for a person.
        message: String,
    },
}

/// Kinds of errors, for scripts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// The line is not a request this daemon understands.
    BadRequest,
    /// The request's protocol version is not spoken here.
    UnsupportedVersion,
    /// The caller may not use this daemon.
    Forbidden,
    /// No such mount.
    NotFound,
    /// The request was valid but failed.
    Failed,
}

/// What a successful request gives back.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", rename_all_fields = "camelCase")]
pub enum Reply {
    /// The daemon is there.
    Pong {
        /// The control socket.
        socket: PathBuf,
        /// The containerd Snapshots API socket.
        #[serde(default)]
        snapshotter_socket: PathBuf,
        /// The serving process.
        pid: u32,
        /// The keeper, which holds the mounts across restarts.
        keeper_pid: u32,
        /// rmount's version.
        rmount_version: String,
        /// Seconds since the Unix epoch at which this process started.
        started: u64,
    },
    /// A mount was made.
    Mounted {
        /// It.
        mount: MountInfo,
    },
    /// A mount is gone.
    Unmounted,
    /// An active containerd snapshot.
    Snapshot {
        /// It.
        snapshot: crate::snapshotter::ActiveOnImage,
    },
    /// Every mount.
    Mounts {
        /// Sorted by mountpoint.
        mounts: Vec<MountInfo>,
    },
    /// A lazy mount's fetch statistics (as `rmount stats --json` prints them).
    Stats {
        /// They.
        stats: serde_json::Value,
    },
    /// The mount is frozen until the connection closes.
    Paused,
    /// The daemon is stopping (or handing over).
    Stopping,
}

/// One mount, as `rmount ps` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MountInfo {
    /// Mountpoint.
    pub mountpoint: PathBuf,
    /// Image reference.
    pub reference: String,
    /// Image id (config digest).
    pub image_id: String,
    /// Mounted read-only.
    pub read_only: bool,
    /// Upper dir of a writable mount.
    pub upper: Option<PathBuf>,
    /// Some layer is read from the registry.
    pub lazy: bool,
    /// Share of the image's layer bytes held locally (100 unless lazy).
    pub fetched_percent: f64,
    /// Seconds since the Unix epoch at which it was first mounted.
    pub mounted_at: u64,
    /// Seconds since then.
    pub uptime_secs: u64,
}

/// `request` as one line.
pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    let mut line = serde_json::to_vec(message).unwrap_or_default();
    line.push(b'\n');
    line
}

/// Parses a request line: the error is the response to send back.
pub fn decode_request(line: &[u8]) -> Result<Request, Box<Outcome>> {
    #[derive(Deserialize)]
    struct Version {
        version: Option<u32>,
    }
    let bad = |message: String| Box::new(Outcome::Error { kind: ErrorKind::BadRequest, message });
    let version: Version =
        serde_json::from_slice(line).map_err(|e| bad(format!("not a JSON request: {e}")))?;
    match version.version {
        Some(PROTOCOL_VERSION) => {}
        Some(other) => {
            return Err(Box::new(Outcome::Error {
                kind: ErrorKind::UnsupportedVersion,
                message: format!(
                "protocol version {other} is not supported; this daemon speaks {PROTOCOL_VERSION}"
            ),
            }))
        }
        None => return Err(bad("missing \"version\"".into())),
    }
    serde_json::from_slice::<RequestEnvelope>(line)
        .map(|envelope| envelope.request)
        .map_err(|e| bad(format!("not a valid request: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_bad_lines_get_errors() {
        let line = encode(&RequestEnvelope {
            version: PROTOCOL_VERSION,
            request: Request::Unmount { mountpoint: "/mnt/x".into(), force: false, discard: true },
        });
        let text = String::from_utf8(line.clone()).unwrap();
        assert!(text.contains(r#""op":"unmount""#), "{text}");
        assert!(matches!(
            decode_request(&line),
            Ok(Request::Unmount { discard: true, force: false, .. })
        ));
        assert!(matches!(decode_request(br#"{"version":1,"op":"list"}"#), Ok(Request::List)));
        for (bad, kind) in [
            (&b"{not json"[..], ErrorKind::BadRequest),
            (br#"{"op":"list"}"#, ErrorKind::BadRequest),
            (br#"{"version":1,"op":"launch-missiles"}"#, ErrorKind::BadRequest),
            (br#"{"version":99,"op":"list"}"#, ErrorKind::UnsupportedVersion),
        ] {
            match decode_request(bad).map_err(|e| *e) {
                Err(Outcome::Error { kind: got, message }) => {
                    assert_eq!(got, kind, "{message}");
                    assert!(!message.is_empty());
                }
                other => panic!("{} gave {other:?}", String::from_utf8_lossy(bad)),
            }
        }
    }
}
