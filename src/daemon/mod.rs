//! The rmount daemon: one process holding every mount of a store, with one
//! shared set of layer indexes and one chunk cache, controlled over a Unix
//! socket, and restartable (even upgradable) without breaking its mounts.
//!
//! Two processes make a daemon:
//!
//! * the **keeper** ([`keeper`]) is tiny and long-lived. It owns the control
//!   socket's listening fd and a duplicate of every mount's `/dev/fuse` fd,
//!   which keeps each FUSE connection alive whatever happens to the worker.
//!   It starts the worker, starts it again if it dies, and re-executes
//!   itself (same PID, new binary) for an upgrade. A worker whose keeper
//!   died starts a new keeper with every fd and leaves;
//! * the **worker** ([`table`], [`server`]) does the work: it answers the
//!   control socket ([`protocol`]), serves every mount, and on start adopts
//!   the connections the keeper hands it, asking the kernel to resend the
//!   requests its predecessor never answered.
//!
//! Mounts are recorded durably under `ROOT/daemon/mounts/`, so a daemon
//! started after a reboot or a crash of both processes mounts them again.
//! docs/daemon.md says what survives what.

pub mod client;
pub mod keeper;
mod lazy_layers;
pub mod metrics;
pub mod protocol;
pub mod server;
pub mod systemd;
pub mod table;

use crate::digest::Digest;
use std::path::{Path, PathBuf};

/// Errors of the daemon and of talking to it.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A file or socket operation failed.
    #[error("{what}: {cause}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause (part of the message, so not also a `source`, which
        /// would print it twice in an error chain).
        cause: std::io::Error,
    },
    /// No daemon answers at the socket.
    #[error("no rmount daemon answers at {0} (start one with `rmount daemon`)")]
    NotRunning(PathBuf),
    /// The daemon said no.
    #[error("{message}")]
    Refused {
        /// Which kind of failure.
        kind: protocol::ErrorKind,
        /// Its explanation.
        message: String,
    },
    /// The daemon answered something this client does not understand.
    #[error("unexpected answer from the daemon: {0}")]
    Protocol(String),
    /// Another daemon already serves this store.
    #[error("an rmount daemon already serves this store (socket {0})")]
    AlreadyRunning(PathBuf),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

impl DaemonError {
    fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DaemonError {
        let what = what.into();
        move |cause| DaemonError::Io { what, cause }
    }
}

/// Where a store's daemon keeps its socket and state.
#[derive(Debug, Clone)]
pub struct DaemonPaths {
    /// The control socket.
    pub socket: PathBuf,
    /// The containerd Snapshots API socket, beside the control socket:
    /// `snapshotter.sock` for the default store, else `snapshotter-<hash>.sock`.
    pub snapshotter: PathBuf,
    /// `ROOT/daemon`: mount records, the keeper's pid, the log.
    pub state: PathBuf,
}

impl DaemonPaths {
    /// The paths of the daemon of the store at `root`. The default store's
    /// socket is `rmount.sock` in the runtime directory (`/run/rmount` as
    /// root, `$XDG_RUNTIME_DIR/rmount` otherwise); another store's has the
    /// store's hash in its name, so each store has its own daemon.
    ///
    /// A running (or last run) daemon's socket, recorded in
    /// `ROOT/daemon/socket`, wins: a caller whose own runtime directory
    /// differs (another user) still finds the store's daemon, and is then
    /// refused by its socket's permissions rather than told nothing runs.
    pub fn for_root(root: &Path, default_root: &Path) -> Self {
        let runtime = match rustix::process::geteuid().is_root() {
            true => Some(PathBuf::from("/run/rmount")),
            false => std::env::var_os("XDG_RUNTIME_DIR").map(|d| PathBuf::from(d).join("rmount")),
        };
        let state = root.join("daemon");
        let runtime = runtime.unwrap_or_else(|| state.clone());
        let name = match root == default_root {
            true => "rmount.sock".to_string(),
            false => {
                let hash = Digest::of(root.as_os_str().as_encoded_bytes());
                format!("rmount-{}.sock", &hash.hex()[..12])
            }
        };
        let recorded = std::fs::read_to_string(state.join("socket")).ok();
        let socket =
            recorded.map(|text| PathBuf::from(text.trim_end())).filter(|p| p.is_absolute());
        let socket = socket.unwrap_or_else(|| runtime.join(name));
        let snapshotter_name = socket
            .file_name()
            .map(|n| n.to_string_lossy().replacen("rmount", "snapshotter", 1))
            .unwrap_or_else(|| "snapshotter.sock".into());
        Self { snapshotter: socket.with_file_name(snapshotter_name), socket, state }
    }

    /// The Snapshots metadata and dirs: `ROOT/snapshots`.
    pub fn snapshots(&self) -> PathBuf {
        self.state.with_file_name("snapshots")
    }

    /// Records the socket a daemon listens on (see [`DaemonPaths::for_root`]).
    pub fn record_socket(&self) -> Result<(), DaemonError> {
        let file = self.state.join("socket");
        let text = self.socket.as_os_str().as_encoded_bytes();
        crate::durable::write_atomic(&file, text)
            .map_err(DaemonError::io(format!("writing {}", file.display())))
    }

    /// Durable mount records.
    pub fn mounts_dir(&self) -> PathBuf {
        self.state.join("mounts")
    }

    /// The keeper's pid.
    pub fn keeper_pid(&self) -> PathBuf {
        self.state.join("keeper.pid")
    }

    /// The daemon's log when started in the background.
    pub fn log(&self) -> PathBuf {
        self.state.join("daemon.log")
    }
}
