//! The keeper: the daemon's long-lived process, which holds what must
//! outlive the worker: the control socket's listening fd and a duplicate of
//! every mount's `/dev/fuse` fd (a FUSE connection lives as long as one fd
//! of it is open, so while the keeper lives no mount answers `ENOTCONN`).
//!
//! The worker tells the keeper about each mount over a socket pair
//! ([`KeeperLink`], fds passed with `SCM_RIGHTS`). How the worker ends
//! decides what the keeper does next:
//!
//! | worker ended | keeper |
//! | --- | --- |
//! | exit 0 (stopped; it unmounted everything) | exits |
//! | [`EXIT_RESTART`] (`rmount daemon restart`, or `SIGHUP` to the keeper) | re-executes itself from the binary now at its path, same PID, handing everything on |
//! | [`EXIT_PARK`] (`rmount daemon stop --keep-mounts`) | closes the control socket and waits, holding the mounts, for `SIGUSR1` (sent by the next `rmount daemon`), then re-executes itself |
//! | killed or crashed | starts a new worker at once with every fd; it adopts the mounts |
//!
//! Everything crosses `exec` by inheritance, listed in the environment
//! variable [`HANDOFF_ENV`] as JSON.

use super::{DaemonError, DaemonPaths};
use crate::sys::fuse_takeover::{inherit_across_exec, inherited_fd, recv_with_fd, send_with_fd};
use rustix::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::unix::net::UnixListener;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The worker's exit code asking the keeper to re-execute itself.
pub const EXIT_RESTART: i32 = 75;
/// The worker's exit code asking the keeper to hold the mounts and wait.
pub const EXIT_PARK: i32 = 76;
/// What a process of the daemon inherits.
pub const HANDOFF_ENV: &str = "RMOUNT_DAEMON_HANDOFF";

/// Worker crashes within [`CRASH_WINDOW`] after which the keeper gives up.
const MAX_CRASHES: usize = 5;
const CRASH_WINDOW: Duration = Duration::from_secs(60);

/// What crosses an `exec`: fd numbers and what they are.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Handoff {
    /// The control socket's listening fd.
    pub control: Option<i32>,
    /// The containerd snapshotter socket's listening fd.
    #[serde(default)]
    pub snapshotter: Option<i32>,
    /// The worker's end of the link to the keeper.
    pub link: Option<i32>,
    /// The keeper's pid (for the worker).
    pub keeper_pid: u32,
    /// Each held mount's `/dev/fuse` fd.
    pub mounts: Vec<HeldMount>,
}

/// A mount the keeper holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeldMount {
    /// Its key ([`crate::store::Store::mount_key`]).
    pub key: String,
    /// Its mountpoint.
    pub mountpoint: PathBuf,
    /// The fd number in the receiving process.
    pub fd: i32,
}

impl Handoff {
    /// The handoff this process was started with, if any.
    pub fn from_env() -> Result<Option<Handoff>, DaemonError> {
        let Some(text) = std::env::var_os(HANDOFF_ENV) else { return Ok(None) };
        let text = text.to_string_lossy();
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| DaemonError::Protocol(format!("{HANDOFF_ENV}: {e}")))
    }
}

/// Link messages, worker → keeper.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum LinkMessage {
    /// Hold the fd sent along for this mount.
    Hold { key: String, mountpoint: PathBuf },
    /// Forget this mount.
    Drop { key: String },
}

/// The worker's side of the link.
#[derive(Debug)]
pub struct KeeperLink {
    socket: OwnedFd,
}

impl KeeperLink {
    /// The link inherited as fd `number`.
    pub fn inherited(number: i32) -> Result<Self, DaemonError> {
        let socket = inherited_fd(number).map_err(DaemonError::io("the keeper link"))?;
        Ok(Self { socket })
    }

    /// Blocks until the keeper's end closes: the keeper never writes, so
    /// that means it died (the worker outlives it only then).
    pub fn wait_keeper_gone(&self) {
        loop {
            match recv_with_fd(self.socket.as_fd()) {
                Ok((payload, _)) if payload.is_empty() => return,
                Err(e) if e.kind() != std::io::ErrorKind::Interrupted => return,
                _ => {}
            }
        }
    }

    /// Asks the keeper to hold `device` for the mount `key`.
    pub fn hold(
        &self,
        key: &str,
        mountpoint: &Path,
        device: BorrowedFd<'_>,
    ) -> Result<(), DaemonError> {
        let message = LinkMessage::Hold { key: key.into(), mountpoint: mountpoint.into() };
        self.send(&message, Some(device))
    }

    /// Tells the keeper the mount `key` is gone.
    pub fn forget(&self, key: &str) -> Result<(), DaemonError> {
        self.send(&LinkMessage::Drop { key: key.into() }, None)
    }

    fn send(&self, message: &LinkMessage, fd: Option<BorrowedFd<'_>>) -> Result<(), DaemonError> {
        let payload = serde_json::to_vec(message).unwrap_or_default();
        send_with_fd(self.socket.as_fd(), &payload, fd)
            .map_err(DaemonError::io("telling the keeper"))
    }
}

enum Event {
    Link(Vec<u8>, Option<OwnedFd>),
    LinkClosed,
    Exited(std::process::ExitStatus),
    Signal(i32),
}

/// The keeper's state: the fds it holds.
struct Keeper {
    exe: PathBuf,
    args: Vec<OsString>,
    /// The listening sockets: `None` while parked.
    listeners: Option<Listeners>,
    paths: DaemonPaths,
    mounts: BTreeMap<String, (PathBuf, OwnedFd)>,
}

/// The daemon's listening sockets, which outlive its workers so that
/// clients queue rather than fail while a worker restarts.
struct Listeners {
    /// The control socket.
    control: OwnedFd,
    /// The containerd Snapshots API socket.
    snapshotter: OwnedFd,
}

impl Listeners {
    /// The listeners a handoff names, or new ones bound at `paths`.
    fn inherit_or_bind(handoff: &Handoff, paths: &DaemonPaths) -> Result<Self, DaemonError> {
        let take = |number: Option<i32>, path: &Path, what: &str| match number {
            Some(number) => inherited_fd(number).map_err(DaemonError::io(what)),
            None => bind_private(path),
        };
        Ok(Listeners {
            control: take(handoff.control, &paths.socket, "the control socket")?,
            snapshotter: take(handoff.snapshotter, &paths.snapshotter, "the snapshotter socket")?,
        })
    }
}

/// Runs the keeper until the daemon stops; returns the exit code. `args`
/// are the arguments that start a worker (the keeper appends `--worker`)
/// and, without it, the keeper itself again.
pub fn run(paths: &DaemonPaths, args: Vec<OsString>) -> Result<i32, DaemonError> {
    let handoff = Handoff::from_env()?.unwrap_or_default();
    let mut mounts = BTreeMap::new();
    for held in &handoff.mounts {
        match inherited_fd(held.fd) {
            Ok(fd) => {
                mounts.insert(held.key.clone(), (held.mountpoint.clone(), fd));
            }
            Err(e) => {
                tracing::error!(mountpoint = %held.mountpoint.display(), error = %e, "lost a mount's fd across exec")
            }
        }
    }
    let listeners = Listeners::inherit_or_bind(&handoff, paths)?;
    let pid_file = paths.keeper_pid();
    crate::durable::write_atomic(&pid_file, std::process::id().to_string().as_bytes())
        .map_err(DaemonError::io(format!("writing {}", pid_file.display())))?;
    let exe = current_binary();
    let mut keeper = Keeper { exe, args, listeners: Some(listeners), paths: paths.clone(), mounts };
    let (events, inbox) = mpsc::channel();
    forward_signals(events.clone());
    let mut crashes: Vec<Instant> = Vec::new();
    loop {
        let (code, worker) = keeper.run_worker(&events, &inbox)?;
        match code {
            Some(0) => {
                // Stopped: nobody listens on the sockets any more.
                keeper.remove_socket_files();
                return Ok(0);
            }
            Some(EXIT_RESTART) => return Err(keeper.exec_self()),
            Some(EXIT_PARK) => {
                keeper.park(&inbox);
                return Err(keeper.exec_self());
            }
            _ => {
                crashes.retain(|t| t.elapsed() < CRASH_WINDOW);
                crashes.push(Instant::now());
                tracing::error!(pid = worker, status = ?code, mounts = keeper.mounts.len(), "the daemon's worker died; starting a new one");
                if crashes.len() > MAX_CRASHES {
                    tracing::error!("the worker died {MAX_CRASHES} times in a minute; giving up (the mounts end)");
                    keeper.remove_socket_files();
                    return Ok(1);
                }
            }
        }
    }
}

impl Keeper {
    /// Starts a worker with every fd, follows its link until it exits;
    /// returns its exit code (`None`: killed by a signal) and pid.
    fn run_worker(
        &mut self,
        events: &mpsc::Sender<Event>,
        inbox: &mpsc::Receiver<Event>,
    ) -> Result<(Option<i32>, u32), DaemonError> {
        let (ours, theirs) = rustix::net::socketpair(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::SEQPACKET,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .map_err(|e| DaemonError::io("creating the keeper link")(e.into()))?;
        let handoff = self.handoff(Some(theirs.as_raw_fd()));
        let mut command = Command::new(&self.exe);
        command
            .args(&self.args)
            .arg("--worker")
            .env(HANDOFF_ENV, serde_json::to_string(&handoff).unwrap_or_default());
        let mut child = spawn_with_fds(&mut command, &self.inheritable(Some(theirs.as_fd())))?;
        drop(theirs);
        let pid = child.id();
        spawn_link_reader(ours, events.clone());
        let waiter = events.clone();
        std::thread::spawn(move || {
            if let Ok(status) = child.wait() {
                let _ = waiter.send(Event::Exited(status));
            }
        });
        let (mut exited, mut link_open) = (None, true);
        while exited.is_none() || link_open {
            let Ok(event) = inbox.recv() else { break };
            match event {
                Event::Link(payload, fd) => self.on_link(&payload, fd),
                Event::LinkClosed => link_open = false,
                Event::Exited(status) => exited = Some(status),
                Event::Signal(signal) => {
                    // SIGHUP: restart; SIGTERM/SIGINT: stop. The worker does
                    // it. SIGUSR1 only wakes a parked keeper.
                    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
                    let forward = match signal {
                        SIGHUP => rustix::process::Signal::USR2,
                        SIGTERM | SIGINT => rustix::process::Signal::TERM,
                        _ => continue,
                    };
                    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
                        let _ = rustix::process::kill_process(pid, forward);
                    }
                }
            }
        }
        let status = exited.and_then(|s| if s.signal().is_some() { None } else { s.code() });
        Ok((status, pid))
    }

    fn on_link(&mut self, payload: &[u8], fd: Option<OwnedFd>) {
        match (serde_json::from_slice::<LinkMessage>(payload), fd) {
            (Ok(LinkMessage::Hold { key, mountpoint }), Some(fd)) => {
                self.mounts.insert(key, (mountpoint, fd));
            }
            (Ok(LinkMessage::Drop { key }), _) => {
                self.mounts.remove(&key);
            }
            (message, _) => {
                tracing::warn!(?message, "ignoring a malformed message from the worker")
            }
        }
    }

    fn handoff(&self, link: Option<i32>) -> Handoff {
        Handoff {
            control: self.listeners.as_ref().map(|l| l.control.as_raw_fd()),
            snapshotter: self.listeners.as_ref().map(|l| l.snapshotter.as_raw_fd()),
            link,
            keeper_pid: std::process::id(),
            mounts: self
                .mounts
                .iter()
                .map(|(key, (mountpoint, fd))| HeldMount {
                    key: key.clone(),
                    mountpoint: mountpoint.clone(),
                    fd: fd.as_raw_fd(),
                })
                .collect(),
        }
    }

    /// The fds a new process must inherit.
    fn inheritable<'a>(&'a self, extra: Option<BorrowedFd<'a>>) -> Vec<BorrowedFd<'a>> {
        let mut fds: Vec<BorrowedFd<'a>> = self.mounts.values().map(|(_, fd)| fd.as_fd()).collect();
        if let Some(listeners) = &self.listeners {
            fds.extend([listeners.control.as_fd(), listeners.snapshotter.as_fd()]);
        }
        fds.extend(extra);
        fds
    }

    fn remove_socket_files(&self) {
        let _ = std::fs::remove_file(&self.paths.socket);
        let _ = std::fs::remove_file(&self.paths.snapshotter);
    }

    /// Holds the mounts with no worker and no control socket until
    /// `SIGUSR1` (a new daemon start) or `SIGTERM` (give up).
    fn park(&mut self, inbox: &mpsc::Receiver<Event>) {
        self.listeners = None;
        self.remove_socket_files();
        tracing::info!(
            mounts = self.mounts.len(),
            "parked: holding the mounts until `rmount daemon` starts again"
        );
        while let Ok(event) = inbox.recv() {
            match event {
                Event::Signal(signal_hook::consts::SIGUSR1) => return,
                Event::Signal(_) => std::process::exit(0),
                _ => {}
            }
        }
    }

    /// Replaces this process with the binary now at our path, keeping the
    /// pid and every fd. Returns only on failure.
    fn exec_self(&self) -> DaemonError {
        let handoff = self.handoff(None);
        for fd in self.inheritable(None) {
            if let Err(e) = inherit_across_exec(fd) {
                return DaemonError::io("passing fds on")(e);
            }
        }
        let error = Command::new(&self.exe)
            .args(&self.args)
            .env(HANDOFF_ENV, serde_json::to_string(&handoff).unwrap_or_default())
            .exec();
        DaemonError::io(format!("re-executing {}", self.exe.display()))(error)
    }
}

/// Spawns `command` with `fds` inherited. They are inheritable only for
/// the moment of the spawn; a process spawned meanwhile by another thread
/// could inherit them too (the keeper spawns from one thread; the worker
/// only when its keeper is gone).
fn spawn_with_fds(
    command: &mut Command,
    fds: &[BorrowedFd<'_>],
) -> Result<std::process::Child, DaemonError> {
    for fd in fds {
        inherit_across_exec(*fd).map_err(DaemonError::io("passing fds on"))?;
    }
    let child = command.spawn().map_err(DaemonError::io("starting a daemon process"));
    for fd in fds {
        let _ = rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::CLOEXEC);
    }
    child
}

/// Starts a new keeper holding `listeners` and `mounts` (its worker adopts
/// them): what a worker does when its keeper died, so that its own death
/// cannot take the mounts down afterwards. `args` start the keeper.
pub fn start_keeper(
    args: &[OsString],
    listeners: [BorrowedFd<'_>; 2],
    mounts: &[(String, PathBuf, BorrowedFd<'_>)],
) -> Result<(), DaemonError> {
    let [control, snapshotter] = listeners;
    let handoff = Handoff {
        control: Some(control.as_raw_fd()),
        snapshotter: Some(snapshotter.as_raw_fd()),
        link: None,
        keeper_pid: 0,
        mounts: mounts
            .iter()
            .map(|(key, mountpoint, fd)| HeldMount {
                key: key.clone(),
                mountpoint: mountpoint.clone(),
                fd: fd.as_raw_fd(),
            })
            .collect(),
    };
    let mut command = Command::new(current_binary());
    command
        .args(args)
        .env(HANDOFF_ENV, serde_json::to_string(&handoff).unwrap_or_default())
        .stdin(std::process::Stdio::null())
        .process_group(0);
    let mut fds: Vec<BorrowedFd<'_>> = mounts.iter().map(|(_, _, fd)| *fd).collect();
    fds.extend(listeners);
    spawn_with_fds(&mut command, &fds).map(drop)
}

/// Where our binary is now: `/proc/self/exe` names the file we started
/// from, with " (deleted)" once an upgrade replaced it; the new one is at
/// the same path.
fn current_binary() -> PathBuf {
    let link = std::fs::read_link("/proc/self/exe").unwrap_or_else(|_| PathBuf::from("rmount"));
    let text = link.to_string_lossy();
    match text.strip_suffix(" (deleted)") {
        Some(path) => PathBuf::from(path),
        None => link,
    }
}

/// Binds a daemon socket (mode 0600), replacing a stale socket file but
/// refusing when a daemon answers there.
fn bind_private(path: &Path) -> Result<OwnedFd, DaemonError> {
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(DaemonError::AlreadyRunning(path.to_path_buf()));
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(DaemonError::io(format!("creating {}", dir.display())))?;
    }
    let _ = std::fs::remove_file(path);
    // Bind under a private umask so the socket is never reachable by others,
    // not even between bind and chmod.
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let bound = UnixListener::bind(path);
    rustix::process::umask(old);
    let listener = bound.map_err(DaemonError::io(format!("binding {}", path.display())))?;
    Ok(OwnedFd::from(listener))
}

fn spawn_link_reader(socket: OwnedFd, events: mpsc::Sender<Event>) {
    std::thread::spawn(move || loop {
        match recv_with_fd(socket.as_fd()) {
            Ok((payload, fd)) if !payload.is_empty() => {
                if events.send(Event::Link(payload, fd)).is_err() {
                    return;
                }
            }
            Ok(_) | Err(_) => {
                let _ = events.send(Event::LinkClosed);
                return;
            }
        }
    });
}

fn forward_signals(events: mpsc::Sender<Event>) {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
    match signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP, SIGUSR1]) {
        Ok(mut signals) => {
            std::thread::spawn(move || {
                for signal in signals.forever() {
                    if events.send(Event::Signal(signal)).is_err() {
                        return;
                    }
                }
            });
        }
        Err(e) => tracing::warn!("cannot handle signals: {e}"),
    }
}
