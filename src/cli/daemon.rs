//! `rmount daemon` (start, stop, restart, the keeper and worker processes)
//! and `rmount ps`; and reaching the daemon from other commands, starting
//! it when none runs.

use super::{DaemonArgs, DaemonCommand, PsArgs};
use crate::daemon::client::DaemonClient;
use crate::daemon::protocol::{Reply, Request};
use crate::daemon::table::DaemonOptions;
use crate::daemon::{keeper, server, DaemonError, DaemonPaths};
use crate::snapshotter::service::ActiveUnion;
use crate::store::Store;
use anyhow::{bail, Context, Result};
use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// How long a starting daemon may take to answer.
const START_TIMEOUT: Duration = Duration::from_secs(15);

pub fn paths(root: &Path) -> DaemonPaths {
    DaemonPaths::for_root(root, &super::default_root())
}

pub fn daemon(root: &Path, args: &DaemonArgs) -> Result<()> {
    let paths = paths(root);
    match &args.command {
        Some(DaemonCommand::Stop { keep_mounts }) => stop(&paths, *keep_mounts),
        Some(DaemonCommand::Restart) => restart(&paths),
        Some(DaemonCommand::Status { json }) => status(&paths, *json),
        None if args.worker => {
            let store = Store::open(root)?;
            let code = server::run_worker(store, paths, &options(args))?;
            std::process::exit(code)
        }
        None if args.foreground => {
            Store::open(root)?;
            std::fs::create_dir_all(&paths.state)?;
            paths.record_socket()?;
            let code = keeper::run(&paths, daemon_argv(root, args))?;
            std::process::exit(code)
        }
        None => {
            let pong = start(root, args)?;
            if let Reply::Pong { pid, keeper_pid, .. } = pong {
                eprintln!(
                    "rmount daemon running (worker {pid}, keeper {keeper_pid}); socket {}",
                    paths.socket.display()
                );
            }
            Ok(())
        }
    }
}

fn options(args: &DaemonArgs) -> DaemonOptions {
    DaemonOptions {
        cache_bytes: args.cache_mem << 20,
        disk_bytes: args.cache_size,
        threads: args.threads,
        metrics: args.metrics.clone(),
        active_union: match args.snapshot_union.as_str() {
            "fuse" => ActiveUnion::Fuse,
            _ => ActiveUnion::Overlayfs,
        },
    }
}

/// The arguments that run this daemon's keeper in the foreground (the
/// keeper adds `--worker` for its worker).
fn daemon_argv(root: &Path, args: &DaemonArgs) -> Vec<OsString> {
    let mut argv: Vec<OsString> =
        vec!["--root".into(), root.into(), "daemon".into(), "--foreground".into()];
    argv.push(format!("--cache-mem={}", args.cache_mem).into());
    argv.push(format!("--cache-size={}", args.cache_size).into());
    argv.push(format!("--threads={}", args.threads).into());
    if let Some(metrics) = &args.metrics {
        argv.push(format!("--metrics={metrics}").into());
    }
    argv.push(format!("--snapshot-union={}", args.snapshot_union).into());
    argv
}

/// Starts the daemon in the background unless one answers; resumes a
/// parked keeper (`stop --keep-mounts`) if there is one. Returns its pong.
pub fn start(root: &Path, args: &DaemonArgs) -> Result<Reply> {
    let paths = paths(root);
    if let Ok((_, pong)) = DaemonClient::wait_ready(&paths.socket, Duration::ZERO) {
        return Ok(pong);
    }
    // Commands racing to start the daemon (ten `rmount REF DIR` at once)
    // start one: the others wait here, then find it answering.
    Store::open(root)?;
    std::fs::create_dir_all(&paths.state)?;
    let lock_path = paths.state.join("start.lock");
    let lock = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
        .with_context(|| format!("locking {}", lock_path.display()))?;
    if let Ok((_, pong)) = DaemonClient::wait_ready(&paths.socket, Duration::ZERO) {
        return Ok(pong);
    }
    if let Some(pid) = parked_keeper(&paths) {
        rustix::process::kill_process(pid, rustix::process::Signal::USR1)
            .context("waking the parked daemon")?;
    } else {
        let log_path = paths.log();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let exe = std::env::current_exe().context("finding the rmount binary")?;
        Command::new(exe)
            .args(daemon_argv(root, args))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            // Its own process group: a Ctrl-C in this terminal must not stop it.
            .process_group(0)
            .spawn()
            .context("starting the daemon")?;
    }
    let (_, pong) = DaemonClient::wait_ready(&paths.socket, START_TIMEOUT)
        .with_context(|| format!("the daemon did not start; see {}", paths.log().display()))?;
    Ok(pong)
}

/// A keeper that holds mounts with no worker (it has no socket).
fn parked_keeper(paths: &DaemonPaths) -> Option<rustix::process::Pid> {
    let pid: u32 = std::fs::read_to_string(paths.keeper_pid()).ok()?.trim().parse().ok()?;
    if !crate::store::process_alive(pid) {
        return None;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let ours = cmdline.split(|b| *b == 0).any(|arg| arg == b"daemon");
    ours.then(|| rustix::process::Pid::from_raw(pid as i32)).flatten()
}

/// A connection to the store's daemon, started with `settings` when none
/// runs.
pub fn connect_or_start(root: &Path, settings: &DaemonArgs) -> Result<DaemonClient> {
    let paths = paths(root);
    match DaemonClient::connect(&paths.socket) {
        Ok(client) => return Ok(client),
        Err(DaemonError::NotRunning(_)) => {}
        Err(e) => return Err(e.into()),
    }
    start(root, settings)?;
    Ok(DaemonClient::connect(&paths.socket)?)
}

fn stop(paths: &DaemonPaths, keep_mounts: bool) -> Result<()> {
    let mut client = match DaemonClient::connect(&paths.socket) {
        Ok(client) => client,
        Err(DaemonError::NotRunning(_)) => {
            eprintln!("no daemon is running");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let keeper = match client.call(Request::Ping)? {
        Reply::Pong { keeper_pid, .. } => keeper_pid,
        other => bail!("unexpected answer {other:?}"),
    };
    client.call(Request::Stop { keep_mounts })?;
    if !keep_mounts {
        crate::fs::mount::wait_for_exit(keeper, Duration::from_secs(30));
    }
    Ok(())
}

/// Hands every mount to a new daemon process (the binary now installed),
/// and waits until it answers.
fn restart(paths: &DaemonPaths) -> Result<()> {
    let mut client = DaemonClient::connect(&paths.socket)?;
    let old = match client.call(Request::Ping)? {
        Reply::Pong { pid, .. } => pid,
        other => bail!("unexpected answer {other:?}"),
    };
    client.call(Request::Restart)?;
    let start = std::time::Instant::now();
    loop {
        if let Ok((_, Reply::Pong { pid, .. })) =
            DaemonClient::wait_ready(&paths.socket, START_TIMEOUT)
        {
            if pid != old {
                eprintln!("rmount daemon restarted (worker {pid})");
                return Ok(());
            }
        }
        if start.elapsed() > START_TIMEOUT {
            bail!("the daemon did not come back; see {}", paths.log().display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn status(paths: &DaemonPaths, json: bool) -> Result<()> {
    let mut client = DaemonClient::connect(&paths.socket)?;
    let pong = client.call(Request::Ping)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&pong)?);
    } else if let Reply::Pong { pid, keeper_pid, rmount_version, .. } = pong {
        println!(
            "rmount {rmount_version} daemon: worker {pid}, keeper {keeper_pid}, socket {}",
            paths.socket.display()
        );
    }
    Ok(())
}

pub fn ps(root: &Path, args: &PsArgs) -> Result<()> {
    let paths = paths(root);
    let mounts = match DaemonClient::connect(&paths.socket) {
        Ok(mut client) => match client.call(Request::List)? {
            Reply::Mounts { mounts } => mounts,
            other => bail!("unexpected answer {other:?}"),
        },
        Err(DaemonError::NotRunning(_)) => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&mounts)?);
        return Ok(());
    }
    println!(
        "{:<32} {:<36} {:<4} {:>8} {:>9}  UPPER",
        "MOUNTPOINT", "IMAGE", "MODE", "FETCHED", "UPTIME"
    );
    for m in mounts {
        println!(
            "{:<32} {:<36} {:<4} {:>7}% {:>9}  {}",
            m.mountpoint.display(),
            m.reference,
            if m.read_only { "ro" } else { "rw" },
            m.fetched_percent,
            uptime(m.uptime_secs),
            m.upper.as_ref().map_or("-".into(), |u| u.display().to_string()),
        );
    }
    Ok(())
}

fn uptime(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{}s", s / 60, s % 60),
        s => format!("{}h{}m", s / 3600, s % 3600 / 60),
    }
}
