//! `commit`, `diff` and `export`: output only; the work is in
//! [`crate::commit`].

use super::{CommitArgs, CompressionArg, DiffArgs, ExportArgs};
use crate::commit::{self, image::Describe, Change, CommitOptions, Compression, Source};
use crate::store::Store;
use anyhow::{bail, Context, Result};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

fn open(root: &Path) -> Result<Store> {
    Store::open(root).with_context(|| format!("opening the store at {}", root.display()))
}

/// The live mount at `path`, paused while the result lives.
fn mounted(store: &Store, path: &Path) -> Result<Source> {
    let mountpoint =
        path.canonicalize().with_context(|| format!("mountpoint {}", path.display()))?;
    Ok(Source::mount(store, &mountpoint)?)
}

pub fn commit(root: &Path, args: &CommitArgs) -> Result<()> {
    let store = open(root)?;
    let changes = args.change.iter().map(|c| Change::parse(c)).collect::<Result<Vec<_>, _>>()?;
    // `--snapshot KEY NEWREF`: the one positional argument is the new name.
    let (mountpoint, new_reference) = match (&args.snapshot, &args.mountpoint) {
        (Some(_), Some(name)) if args.reference.is_none() => {
            (None, Some(name.to_string_lossy().into_owned()))
        }
        (Some(_), Some(_)) => bail!("--snapshot commits a snapshot, not the mount given too"),
        (_, mountpoint) => (mountpoint.clone(), args.reference.clone()),
    };
    if let Some(reference) = &new_reference {
        commit::normalise_reference(reference)?;
    }
    let compression = match (args.compression, args.level) {
        (CompressionArg::None, _) => Compression::None,
        (CompressionArg::Gzip, level) => {
            let level = level.unwrap_or(6);
            if !(0..=9).contains(&level) {
                bail!("--level {level}: gzip levels are 0 to 9");
            }
            Compression::Gzip(level as u32)
        }
        (CompressionArg::Zstd, level) => {
            let level = level.unwrap_or(3);
            if !(1..=22).contains(&level) {
                bail!("--level {level}: zstd levels are 1 to 22");
            }
            Compression::Zstd(level)
        }
    };
    let created = commit::image::created_now().map_err(anyhow::Error::msg)?;
    let mut created_by = String::from("rmount commit");
    for c in &args.change {
        created_by.push_str(&format!(" --change {c:?}"));
    }
    let options = CommitOptions {
        reference: new_reference,
        compression,
        describe: Describe {
            author: args.author.clone(),
            message: args.message.clone(),
            changes,
            created,
            created_by,
        },
    };
    let (source, what) = match (&args.snapshot, &mountpoint) {
        (Some(key), _) => (snapshot(root, &store, key)?, format!("snapshot {key}")),
        (None, Some(path)) => (mounted(&store, path)?, path.display().to_string()),
        (None, None) => bail!("commit what? give a MOUNT or --snapshot KEY"),
    };
    let done =
        commit::commit(&store, &source, &options).with_context(|| format!("committing {what}"))?;
    drop(source);
    for path in &done.skipped {
        eprintln!("rmount: skipped socket {path} (sockets cannot be in a layer)");
    }
    println!("{}", done.id);
    Ok(())
}

/// containerd's active snapshot `key`, as the store's daemon (which serves
/// the snapshotter) describes it.
fn snapshot(root: &Path, store: &Store, key: &str) -> Result<Source> {
    use crate::daemon::client::DaemonClient;
    use crate::daemon::protocol::{Reply, Request};
    let paths = super::daemon::paths(root);
    let mut client = DaemonClient::connect(&paths.socket)?;
    let Reply::Snapshot { snapshot } = client.call(Request::Snapshot { key: key.to_owned() })?
    else {
        bail!("the daemon answered something else than a snapshot");
    };
    Ok(Source::snapshot(store, &snapshot, &paths.socket)?)
}

pub fn diff(root: &Path, args: &DiffArgs) -> Result<()> {
    let store = open(root)?;
    let source = mounted(&store, &args.mountpoint)?;
    let changes = commit::diff(&source)?;
    drop(source);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&changes)?);
    } else {
        for c in changes {
            println!("{} {}", c.letter(), c.path);
        }
    }
    Ok(())
}

/// Is `path` on the filesystem mounted at `mountpoint`? Writing there while
/// its server is paused would hang, so `export` refuses it up front.
fn on_mount(path: &Path, mountpoint: &str) -> Result<bool> {
    let mount_dev = std::fs::metadata(mountpoint)?.dev();
    Ok(std::fs::metadata(path).is_ok_and(|m| m.dev() == mount_dev))
}

pub fn export(root: &Path, args: &ExportArgs) -> Result<()> {
    let store = open(root)?;
    let is_mount = Path::new(&args.source).is_dir()
        && Path::new(&args.source)
            .canonicalize()
            .ok()
            .and_then(|p| store.mount_at(&p).ok().flatten())
            .is_some();
    let to_stdout = args.output.as_os_str() == "-";
    let out: Box<dyn Write> = if to_stdout {
        if is_mount && on_mount(Path::new("/proc/self/fd/1"), &args.source)? {
            bail!("standard output is a file inside the mount being exported");
        }
        Box::new(std::io::stdout().lock())
    } else {
        let file = std::fs::File::create(&args.output)
            .with_context(|| format!("creating {}", args.output.display()))?;
        if is_mount && on_mount(&args.output, &args.source)? {
            drop(file);
            let _ = std::fs::remove_file(&args.output);
            bail!("{} is inside the mount being exported", args.output.display());
        }
        Box::new(file)
    };
    let mut out = std::io::BufWriter::with_capacity(1 << 20, out);
    let source = if is_mount {
        mounted(&store, Path::new(&args.source))?
    } else {
        Source::image(&store, &args.source)?
    };
    let plan = source.export(&mut out).with_context(|| format!("exporting {}", args.source))?;
    drop(source);
    out.flush()?;
    for path in &plan.skipped {
        eprintln!("rmount: skipped socket /{}", String::from_utf8_lossy(path));
    }
    Ok(())
}
