//! Mount commands: mount (in a background serving process unless
//! `--foreground`) and umount.

use super::{MountArgs, UmountArgs};
use crate::fs::{serve, unmount_image, MountOptions, UpperDirs};
use crate::store::Store;
use anyhow::{bail, Context, Result};
use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Set in the serving child: print `ready` on stdout once the mount works.
const NOTIFY_ENV: &str = "RMOUNT_NOTIFY_READY";

pub fn mount(root: &Path, args: &MountArgs) -> Result<()> {
    let store = Store::open(root)?;
    if args.foreground {
        let upper = match (&args.upper, args.read_only) {
            (_, true) => None,
            (Some(upper), false) => Some(UpperDirs {
                upper: upper.clone(),
                work: args.work.clone().unwrap_or_else(|| sibling_work_dir(upper)),
            }),
            (None, false) => {
                let image = store.resolve(&args.reference)?;
                let mountpoint = args.mountpoint.canonicalize()?;
                let (upper, work) = store.claim_default_upper(&mountpoint, &image.config_digest)?;
                Some(UpperDirs { upper, work })
            }
        };
        let options = MountOptions { cache_bytes: args.cache_mem << 20, threads: 4, upper };
        let notify = std::env::var_os(NOTIFY_ENV).is_some();
        return serve(&store, &args.reference, &args.mountpoint, &options, || {
            if notify {
                let mut out = std::io::stdout();
                let _ = out.write_all(b"ready\n").and_then(|()| out.flush());
            } else {
                eprintln!("{} mounted at {}", args.reference, args.mountpoint.display());
            }
        })
        .with_context(|| format!("mounting {}", args.reference));
    }
    spawn_server(&store, root, args)
}

/// Starts `rmount mount --foreground` as a detached child and waits until it
/// reports the mount ready, or fails with the child's error.
fn spawn_server(store: &Store, root: &Path, args: &MountArgs) -> Result<()> {
    // Fail fast, with the store's own message, on an unknown image.
    store.resolve(&args.reference)?;
    let mountpoint = args
        .mountpoint
        .canonicalize()
        .with_context(|| format!("mountpoint {}", args.mountpoint.display()))?;
    let log_path = store.mount_log_path(&mountpoint);
    if let Some(dir) = log_path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let exe = std::env::current_exe().context("finding the rmount binary")?;
    let mut child = Command::new(exe)
        .arg("--root")
        .arg(root)
        .arg("mount")
        .arg(&args.reference)
        .arg(&mountpoint)
        .arg("--foreground")
        .arg("--cache-mem")
        .arg(args.cache_mem.to_string())
        .args(args.read_only.then_some("--read-only"))
        .args(args.upper.iter().flat_map(|u| [OsStr::new("--upper"), u.as_os_str()]))
        .args(args.work.iter().flat_map(|w| [OsStr::new("--work"), w.as_os_str()]))
        .env(NOTIFY_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        // Its own process group: a Ctrl-C in this terminal must not stop it.
        .process_group(0)
        .spawn()
        .context("starting the serving process")?;
    let stdout = child.stdout.take().context("serving process has no stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    if line.trim() == "ready" {
        return Ok(());
    }
    let _ = child.wait();
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let message = log.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
    let message = message.strip_prefix("rmount: ").unwrap_or(message);
    bail!("{message} (log: {})", log_path.display())
}

pub fn umount(root: &Path, args: &UmountArgs) -> Result<()> {
    let store = Store::open(root)?;
    unmount_image(&store, &args.mountpoint, args.force, args.discard)
        .with_context(|| format!("unmounting {}", args.mountpoint.display()))
}

/// The default work directory for `--upper DIR`: `DIR.work` beside it, on
/// the same filesystem as overlayfs requires.
fn sibling_work_dir(upper: &Path) -> PathBuf {
    let mut name = upper.file_name().unwrap_or_default().to_owned();
    name.push(".work");
    upper.with_file_name(name)
}
