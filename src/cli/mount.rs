//! Mount commands: mount (in a background serving process unless
//! `--foreground`) and umount.

use super::registry::{client, Bars};
use super::{DaemonArgs, MountArgs, PrefetchArg, StatsArgs, UmountArgs};
use crate::daemon::client::DaemonClient;
use crate::daemon::protocol::{MountSpec, PrefetchSpec, RegistrySettings, Reply, Request};
use crate::fs::lazy::open_disk_cache;
use crate::fs::mount::mountpoint_to_unmount;
use crate::fs::{serve, unmount_image};
use crate::platform::Platform;
use crate::reference::Reference;
use crate::registry::{AuthFile, Hosts};
use crate::store::{Store, StoreError};
use crate::transfer::{self, LayerData, PullOptions};
use anyhow::{bail, Context, Result};
use std::ffi::OsStr;
use std::io::IsTerminal;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Set in the serving child: print `ready` on stdout once the mount works.
const NOTIFY_ENV: &str = "RMOUNT_NOTIFY_READY";

pub fn mount(root: &Path, args: &MountArgs) -> Result<()> {
    let store = Store::open(root)?;
    match store.resolve(&args.reference) {
        Ok(_) => {}
        Err(StoreError::NotFound(_)) if args.reference.parse::<Reference>().is_ok() => {
            lazy_pull(&store, args)?
        }
        // Fail fast, with the store's own message.
        Err(e) => return Err(e.into()),
    }
    let spec = mount_spec(&store, args)?;
    if args.foreground {
        return serve_here(&store, args, &spec);
    }
    if args.no_daemon {
        return spawn_server(&store, root, args);
    }
    let settings = DaemonArgs::for_autostart(args.cache_mem, args.cache_size);
    let mut client = super::daemon::connect_or_start(root, &settings)?;
    client
        .call(Request::Mount(Box::new(spec)))
        .with_context(|| format!("mounting {} at {}", args.reference, args.mountpoint.display()))?;
    Ok(())
}

/// Serves the mount in this process until it is unmounted.
fn serve_here(store: &Store, args: &MountArgs, spec: &MountSpec) -> Result<()> {
    let disk = open_disk_cache(store.root(), args.cache_size);
    let options = spec.options(store, 4, disk).map_err(anyhow::Error::msg)?;
    let notify = std::env::var_os(NOTIFY_ENV).is_some();
    let cache_bytes = args.cache_mem << 20;
    serve(store, &spec.reference, &spec.mountpoint, &options, cache_bytes, || {
        if notify {
            let mut out = std::io::stdout();
            let _ = out.write_all(b"ready\n").and_then(|()| out.flush());
        } else {
            eprintln!("{} mounted at {}", args.reference, args.mountpoint.display());
        }
    })
    .with_context(|| format!("mounting {}", args.reference))
}

/// The mount as the daemon (or a serving process) needs it: every path
/// absolute, the default upper claimed, registry settings resolved here.
fn mount_spec(store: &Store, args: &MountArgs) -> Result<MountSpec> {
    let mountpoint = args
        .mountpoint
        .canonicalize()
        .with_context(|| format!("mountpoint {}", args.mountpoint.display()))?;
    let upper = match (&args.upper, args.read_only) {
        (_, true) => None,
        (Some(upper), false) => {
            let work = args.work.clone().unwrap_or_else(|| sibling_work_dir(upper));
            Some((absolute(upper)?, absolute(&work)?))
        }
        (None, false) => {
            let image = store.resolve(&args.reference)?;
            Some(store.claim_default_upper(&mountpoint, &image.config_digest)?)
        }
    };
    let prefetch = match args.prefetch {
        PrefetchArg::None => PrefetchSpec::None,
        PrefetchArg::All => PrefetchSpec::All,
        PrefetchArg::Recorded => PrefetchSpec::Recorded {
            list: args.prefetch_list.as_deref().map(absolute).transpose()?,
        },
    };
    let registry = &args.registry;
    Ok(MountSpec {
        reference: args.reference.clone(),
        mountpoint,
        upper,
        fetch_timeout_secs: args.fetch_timeout,
        prefetch,
        prefetch_rate: args.prefetch_rate,
        record: args.record.as_deref().map(absolute).transpose()?,
        registry: RegistrySettings {
            insecure: registry.insecure_registry.clone(),
            hosts_dir: match &registry.hosts_dir {
                Some(dir) => absolute(dir)?,
                None => Hosts::default_dir(),
            },
            auth_file: match &registry.authfile {
                Some(file) => absolute(file)?,
                None => AuthFile::discover().path().to_path_buf(),
            },
        },
        layers: None,
    })
}

/// Starts `rmount mount --foreground` as a detached child and waits until it
/// reports the mount ready, or fails with the child's error.
fn spawn_server(store: &Store, root: &Path, args: &MountArgs) -> Result<()> {
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
        .args(["--cache-size", &args.cache_size.to_string()])
        .args(["--fetch-timeout", &args.fetch_timeout.to_string()])
        .args(match args.prefetch {
            PrefetchArg::None => None,
            PrefetchArg::All => Some("--prefetch=all"),
            PrefetchArg::Recorded => Some("--prefetch=recorded"),
        })
        .args(path_flag("--prefetch-list", args.prefetch_list.as_deref())?)
        .args(path_flag("--record", args.record.as_deref())?)
        .args(args.prefetch_rate.map(|r| format!("--prefetch-rate={r}")))
        .args(args.registry.insecure_registry.iter().map(|h| format!("--insecure-registry={h}")))
        .args(
            args.registry.hosts_dir.iter().flat_map(|d| [OsStr::new("--hosts-dir"), d.as_os_str()]),
        )
        .args(args.registry.authfile.iter().flat_map(|f| [OsStr::new("--authfile"), f.as_os_str()]))
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

/// Brings what a lazy mount needs into the store: manifest, config and
/// each layer's index (a layer without an index anywhere is downloaded).
fn lazy_pull(store: &Store, args: &MountArgs) -> Result<()> {
    let reference: Reference = args.reference.parse()?;
    let platform = match &args.platform {
        Some(p) => p.parse::<Platform>()?,
        None => Platform::host(),
    };
    let options =
        PullOptions { platform, all_platforms: false, jobs: 3, layers: LayerData::IndexesOrBlobs };
    let bars = Bars::new("Indexing", !std::io::stderr().is_terminal());
    transfer::pull(store, &client(&args.registry)?, &reference, &options, &bars)
        .with_context(|| format!("resolving {reference} in its registry"))?;
    bars.clear();
    Ok(())
}

/// `FLAG PATH` with the path made absolute, for the serving process.
fn path_flag(flag: &str, path: Option<&Path>) -> Result<Vec<std::ffi::OsString>> {
    Ok(match path {
        Some(p) => vec![flag.into(), absolute(p)?.into_os_string()],
        None => Vec::new(),
    })
}

/// `path` made absolute against the current directory (the serving process
/// keeps running after the command returns).
fn absolute(path: &Path) -> Result<PathBuf> {
    Ok(std::path::absolute(path)?)
}

pub fn stats(root: &Path, args: &StatsArgs) -> Result<()> {
    let store = Store::open(root)?;
    let mountpoint = args
        .mountpoint
        .canonicalize()
        .with_context(|| format!("mountpoint {}", args.mountpoint.display()))?;
    let Some(record) = store.mount_at(&mountpoint)? else {
        bail!("{} is not an rmount mount (see `rmount ps`)", mountpoint.display());
    };
    let stats: serde_json::Value = match &record.daemon {
        Some(socket) => {
            let (mut client, _) = DaemonClient::wait_ready(socket, Duration::from_secs(15))?;
            match client.call(Request::Stats { mountpoint })? {
                Reply::Stats { stats } => stats,
                other => bail!("unexpected answer from the daemon: {other:?}"),
            }
        }
        None => serde_json::from_str(&stats_file(&store, &mountpoint)?)?,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&stats)?);
        return Ok(());
    }
    let num = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(0.0);
    println!(
        "{}: fetched {} in {} requests, {}% of the image local; disk cache {} hits, {} misses; fetch latency p50 {} ms, p99 {} ms",
        stats["reference"].as_str().unwrap_or("?"),
        super::images::human_size(num(&stats, "fetchedBytes") as u64),
        num(&stats, "fetches"),
        num(&stats, "fetchedPercent"),
        num(&stats, "cacheHits"),
        num(&stats, "cacheMisses"),
        num(&stats["fetchLatencyMs"], "p50"),
        num(&stats["fetchLatencyMs"], "p99"),
    );
    println!(
        "{:<14} {:>10} {:>7} {:>14} {:>10} {:>7}",
        "LAYER", "SIZE", "REMOTE", "CHUNKS CACHED", "FETCHED", "LOCAL%"
    );
    for layer in stats["layers"].as_array().into_iter().flatten() {
        let digest = layer["digest"].as_str().unwrap_or("");
        println!(
            "{:<14} {:>10} {:>7} {:>14} {:>10} {:>7}",
            digest.trim_start_matches("sha256:").chars().take(12).collect::<String>(),
            super::images::human_size(num(layer, "size") as u64),
            if layer["remote"].as_bool().unwrap_or(false) { "yes" } else { "no" },
            format!("{}/{}", num(layer, "chunksCached"), num(layer, "chunks")),
            super::images::human_size(num(layer, "fetchedBytes") as u64),
            num(layer, "fetchedPercent"),
        );
    }
    Ok(())
}

/// The statistics a mount's own serving process writes every second.
fn stats_file(store: &Store, mountpoint: &Path) -> Result<String> {
    let path = store.mount_stats_path(mountpoint);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "{} reads every layer from the store: there is nothing fetched to show",
            mountpoint.display()
        ),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

pub fn umount(root: &Path, args: &UmountArgs) -> Result<()> {
    let store = Store::open(root)?;
    let context = || format!("unmounting {}", args.mountpoint.display());
    let mountpoint = mountpoint_to_unmount(&args.mountpoint).with_context(context)?;
    let Some(socket) = store.mount_at(&mountpoint)?.and_then(|record| record.daemon) else {
        return unmount_image(&store, &mountpoint, args.force, args.discard).with_context(context);
    };
    // A daemon that is restarting answers within seconds.
    let (mut client, _) = DaemonClient::wait_ready(&socket, Duration::from_secs(15))?;
    let request = Request::Unmount { mountpoint, force: args.force, discard: args.discard };
    client.call(request).with_context(context)?;
    Ok(())
}

/// The default work directory for `--upper DIR`: `DIR.work` beside it, on
/// the same filesystem as overlayfs requires.
fn sibling_work_dir(upper: &Path) -> PathBuf {
    let mut name = upper.file_name().unwrap_or_default().to_owned();
    name.push(".work");
    upper.with_file_name(name)
}
