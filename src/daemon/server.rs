//! The worker's main loop: adopt the mounts, then answer the control
//! socket, one thread per connection.

use super::keeper::{start_keeper, Handoff, KeeperLink, EXIT_PARK, EXIT_RESTART};
use super::metrics::MetricsEndpoint;
use super::protocol::{
    decode_request, encode, ErrorKind, Outcome, Reply, Request, ResponseEnvelope, MAX_LINE,
    PROTOCOL_VERSION,
};
use super::table::{Daemon, DaemonOptions};
use super::{DaemonError, DaemonPaths};
use crate::fs::Overlay;
use crate::snapshotter::service::SnapshotService;
use crate::snapshotter::{SnapshotError, Snapshots};
use crate::store::Store;
use crate::sys::fuse_takeover::inherited_fd;
use rustix::fd::AsFd;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::Duration;

/// Runs the worker (started by the keeper with a [`Handoff`]); returns only
/// on a setup error.
pub fn run_worker(
    store: Store,
    paths: DaemonPaths,
    options: &DaemonOptions,
) -> Result<i32, DaemonError> {
    let handoff = Handoff::from_env()?
        .ok_or_else(|| DaemonError::Protocol("the worker is started by `rmount daemon`".into()))?;
    let (Some(control), Some(snapshotter), Some(link)) =
        (handoff.control, handoff.snapshotter, handoff.link)
    else {
        return Err(DaemonError::Protocol("the handoff lacks a listening socket or link".into()));
    };
    let listener =
        UnixListener::from(inherited_fd(control).map_err(DaemonError::io("the control socket"))?);
    let snapshotter = UnixListener::from(
        inherited_fd(snapshotter).map_err(DaemonError::io("the snapshotter socket"))?,
    );
    let link = KeeperLink::inherited(link)?;
    let mut held = Vec::new();
    for mount in handoff.mounts {
        match inherited_fd(mount.fd) {
            Ok(fd) => held.push((mount, fd)),
            Err(e) => {
                tracing::error!(mountpoint = %mount.mountpoint.display(), error = %e, "a held mount's fd is unusable")
            }
        }
    }
    crate::sys::malloc::return_large_buffers_to_the_os();
    let snapshots_root = paths.snapshots();
    let daemon = Arc::new(Daemon::new(store, paths, link, handoff.keeper_pid, options));
    let started = super::table::unix_now();
    daemon.reattach(held);
    let snapshots = Arc::new(open_snapshots(&snapshots_root)?);
    if let Err(e) = crate::snapshotter::remote::mount_missing(&snapshots, daemon.as_ref()) {
        tracing::error!("{e}");
    }
    let service =
        SnapshotService::new(snapshots.clone(), Some(daemon.clone()), options.active_union);
    let rehome_snapshotter =
        snapshotter.try_clone().map_err(DaemonError::io("the snapshotter socket"))?;
    std::thread::spawn(move || {
        if let Err(e) = crate::snapshotter::service::serve(service, snapshotter) {
            tracing::error!("the containerd snapshotter stopped: {e}");
        }
    });
    let source = daemon.clone();
    let _metrics = match &options.metrics {
        Some(addr) => Some(
            MetricsEndpoint::serve(addr.clone(), move || source.metrics())
                .map_err(DaemonError::io(format!("serving metrics at {addr}")))?,
        ),
        None => None,
    };
    tracing::info!(mounts = daemon.list().len(), "daemon worker ready");
    super::systemd::notify_ready(handoff.keeper_pid);
    on_signals(daemon.clone());
    let orphan = daemon.clone();
    let control = listener.try_clone().map_err(DaemonError::io("the control socket"))?;
    std::thread::spawn(move || {
        orphan.wait_keeper_gone();
        rehome(&orphan, [&control, &rehome_snapshotter]);
    });
    let reaper = daemon.clone();
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(500));
        reaper.reap();
    });
    let owner = rustix::process::geteuid();
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let daemon = daemon.clone();
        let snapshots = snapshots.clone();
        let keeper_pid = handoff.keeper_pid;
        std::thread::spawn(move || {
            let context = Context { daemon, snapshots, keeper_pid, started };
            if let Err(e) = context.serve(stream, owner) {
                tracing::debug!("control connection: {e}");
            }
        });
    }
    Ok(1)
}

struct Context {
    daemon: Arc<Daemon>,
    snapshots: Arc<Snapshots>,
    keeper_pid: u32,
    started: u64,
}

/// What to do once a reply is sent.
enum After {
    Continue,
    /// Keep this mount frozen until the client closes the connection (a
    /// pause lease).
    FreezeUntilClosed(Arc<Overlay>),
    Exit(i32),
}

impl Context {
    fn serve(&self, stream: UnixStream, owner: rustix::process::Uid) -> std::io::Result<()> {
        let mut writer = stream.try_clone()?;
        let peer = rustix::net::sockopt::socket_peercred(&stream)?;
        let mut reader = BufReader::new(stream);
        if !(peer.uid.is_root() || peer.uid == owner) {
            // Read the request first: a client that is still writing when
            // the connection closes would see EPIPE, not this answer.
            reader.get_ref().set_read_timeout(Some(Duration::from_secs(5)))?;
            let _ = (&mut reader).take(MAX_LINE as u64).read_until(b'\n', &mut Vec::new());
            let outcome = Outcome::Error {
                kind: ErrorKind::Forbidden,
                message: format!("uid {} may not use this daemon", peer.uid.as_raw()),
            };
            return writer
                .write_all(&encode(&ResponseEnvelope { version: PROTOCOL_VERSION, outcome }));
        }
        loop {
            let mut line = Vec::new();
            let read = (&mut reader).take(MAX_LINE as u64).read_until(b'\n', &mut line)?;
            if read == 0 {
                return Ok(());
            }
            let (outcome, after) = match decode_request(&line) {
                Ok(request) => self.handle(request),
                Err(outcome) => (*outcome, After::Continue),
            };
            let reply = encode(&ResponseEnvelope { version: PROTOCOL_VERSION, outcome });
            match after {
                After::Continue => writer.write_all(&reply)?,
                After::FreezeUntilClosed(overlay) => {
                    // Frozen before the client hears so.
                    let _frozen = overlay.freeze();
                    writer.write_all(&reply)?;
                    let _ = reader.read_to_end(&mut Vec::new());
                    return Ok(());
                }
                After::Exit(code) => {
                    writer.write_all(&reply)?;
                    std::process::exit(code)
                }
            }
            if line.last() != Some(&b'\n') {
                // Longer than MAX_LINE: the rest of it is not a request.
                return Ok(());
            }
        }
    }

    fn handle(&self, request: Request) -> (Outcome, After) {
        let ok = |result| Outcome::Ok { result };
        let done = |result: Result<Reply, DaemonError>| match result {
            Ok(result) => Outcome::Ok { result },
            Err(DaemonError::Refused { kind, message }) => Outcome::Error { kind, message },
            Err(e) => Outcome::Error { kind: ErrorKind::Failed, message: e.to_string() },
        };
        match request {
            Request::Ping => (
                ok(Reply::Pong {
                    socket: self.daemon.paths().socket.clone(),
                    snapshotter_socket: self.daemon.paths().snapshotter.clone(),
                    pid: std::process::id(),
                    keeper_pid: self.keeper_pid,
                    rmount_version: env!("CARGO_PKG_VERSION").into(),
                    started: self.started,
                }),
                After::Continue,
            ),
            Request::Mount(spec) => (
                done(self.daemon.mount(*spec).map(|mount| Reply::Mounted { mount })),
                After::Continue,
            ),
            Request::Unmount { mountpoint, force, discard } => (
                done(self.daemon.unmount(&mountpoint, force, discard).map(|()| Reply::Unmounted)),
                After::Continue,
            ),
            Request::List => (ok(Reply::Mounts { mounts: self.daemon.list() }), After::Continue),
            Request::Snapshot { key } => match self.snapshots.active_on_image(&key) {
                Ok(snapshot) => (ok(Reply::Snapshot { snapshot }), After::Continue),
                Err(e) => {
                    let kind = match e {
                        SnapshotError::NotFound(_) => ErrorKind::NotFound,
                        _ => ErrorKind::Failed,
                    };
                    (Outcome::Error { kind, message: e.to_string() }, After::Continue)
                }
            },
            Request::Stats { mountpoint } => (
                done(self.daemon.stats(&mountpoint).map(|stats| Reply::Stats { stats })),
                After::Continue,
            ),
            Request::Pause { mountpoint } => match self.daemon.overlay(&mountpoint) {
                Some(overlay) => (ok(Reply::Paused), After::FreezeUntilClosed(overlay)),
                None => (
                    Outcome::Error {
                        kind: ErrorKind::NotFound,
                        message: format!(
                            "{} is not a writable mount of this daemon",
                            mountpoint.display()
                        ),
                    },
                    After::Continue,
                ),
            },
            Request::Stop { keep_mounts: false } => {
                self.daemon.shutdown(true);
                (ok(Reply::Stopping), After::Exit(0))
            }
            Request::Stop { keep_mounts: true } => (ok(Reply::Stopping), After::Exit(EXIT_PARK)),
            Request::Restart => (ok(Reply::Stopping), After::Exit(EXIT_RESTART)),
        }
    }
}

/// The snapshot store. A worker that just handed over to a new keeper may
/// still hold its lock for a moment: retry briefly.
fn open_snapshots(root: &std::path::Path) -> Result<Snapshots, DaemonError> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match Snapshots::open(root) {
            Ok(snapshots) => return Ok(snapshots),
            Err(SnapshotError::Db(e))
                if matches!(*e, redb::Error::DatabaseAlreadyOpen)
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => return Err(DaemonError::Protocol(format!("the snapshot store: {e}"))),
        }
    }
}

/// The keeper died: nothing else holds the mounts' fds, so our own death
/// would end them. Start a new keeper with every fd and leave; its worker
/// adopts the mounts as after a restart.
fn rehome(daemon: &Daemon, listeners: [&UnixListener; 2]) {
    tracing::error!("the daemon's keeper died; handing the mounts to a new one");
    let devices = daemon.devices();
    let mounts: Vec<_> = devices
        .iter()
        .map(|(key, mountpoint, fd)| (key.clone(), mountpoint.clone(), fd.as_fd()))
        .collect();
    // Our own arguments without `--worker` start a keeper.
    let args: Vec<std::ffi::OsString> =
        std::env::args_os().skip(1).filter(|arg| arg != "--worker").collect();
    match start_keeper(&args, listeners.map(|l| l.as_fd()), &mounts) {
        Ok(()) => std::process::exit(0),
        Err(e) => tracing::error!("cannot start a new keeper ({e}); serving on without one"),
    }
}

/// SIGTERM/SIGINT: unmount everything, keeping the records (the next start
/// mounts them again). SIGUSR2 (the keeper's SIGHUP): restart.
fn on_signals(daemon: Arc<Daemon>) {
    use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR2};
    match signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGUSR2]) {
        Ok(mut signals) => {
            std::thread::spawn(move || {
                if let Some(signal) = signals.forever().next() {
                    if signal == SIGUSR2 {
                        std::process::exit(EXIT_RESTART);
                    }
                    tracing::info!(
                        "stopping: unmounting everything (the mounts come back on the next start)"
                    );
                    daemon.shutdown(false);
                    std::process::exit(0);
                }
            });
        }
        Err(e) => tracing::warn!("cannot handle signals: {e}"),
    }
}
