//! Image commands: load, save, images, inspect, history, tag, rmi, prune, df.
//! Output mirrors Docker's; `--json` gives the same data for scripts.

use super::{HistoryArgs, InspectArgs, ListArgs, LoadArgs, RmiArgs, SaveArgs, SaveFormat, TagArgs};
use crate::reference::Reference;
use crate::store::{ArchiveFormat, Image, Removal, Store};
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::path::Path;

fn open(root: &Path) -> Result<Store> {
    Store::open(root).with_context(|| format!("opening the store at {}", root.display()))
}

/// Docker's human sizes: 1000-based, 3 significant digits.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes}B")
    } else {
        format!("{:.3}", value).trim_end_matches('0').trim_end_matches('.').to_string()
            + UNITS[unit]
    }
}

/// "3 days ago", like Docker's CREATED column.
fn ago(created: Option<&str>) -> String {
    let Some(time) = created.and_then(|c| chrono::DateTime::parse_from_rfc3339(c).ok()) else {
        return "N/A".into();
    };
    let secs = (chrono::Utc::now() - time.to_utc()).num_seconds().max(0);
    let (n, unit) = match secs {
        s if s < 60 => (s, "second"),
        s if s < 3600 => (s / 60, "minute"),
        s if s < 86400 => (s / 3600, "hour"),
        s if s < 86400 * 14 => (s / 86400, "day"),
        s if s < 86400 * 60 => (s / (86400 * 7), "week"),
        s if s < 86400 * 730 => (s / (86400 * 30), "month"),
        s => (s / (86400 * 365), "year"),
    };
    format!("{n} {unit}{} ago", if n == 1 { "" } else { "s" })
}

fn print_table(rows: &[Vec<String>]) {
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, cell)| {
                if c + 1 == row.len() {
                    cell.clone()
                } else {
                    format!("{cell:<w$}", w = widths[c])
                }
            })
            .collect();
        println!("{}", line.join("   ").trim_end());
    }
}

fn image_size(image: &Image) -> u64 {
    image.layers.iter().map(|l| l.size).sum()
}

fn created(image: &Image) -> Option<String> {
    image.raw_config.get("created").and_then(Value::as_str).map(String::from)
}

pub fn load(root: &Path, args: &LoadArgs) -> Result<()> {
    let store = open(root)?;
    let loaded =
        store.load(&args.input).with_context(|| format!("loading {}", args.input.display()))?;
    for image in loaded {
        match (&image.reference, args.quiet) {
            (_, true) => println!("{}", image.id),
            (Some(r), false) => println!("Loaded image: {r}"),
            (None, false) => println!("Loaded image ID: {}", image.id),
        }
    }
    Ok(())
}

pub fn save(root: &Path, args: &SaveArgs) -> Result<()> {
    let store = open(root)?;
    let format = match args.format {
        SaveFormat::OciArchive => ArchiveFormat::OciArchive,
        SaveFormat::DockerArchive => ArchiveFormat::DockerArchive,
    };
    store
        .save(&args.references, &args.output, format)
        .with_context(|| format!("saving to {}", args.output.display()))
}

pub fn list(root: &Path, args: &ListArgs) -> Result<()> {
    let store = open(root)?;
    let images = store.images()?;
    let split = |image: &Image| -> (String, String) {
        match image.reference.as_deref().and_then(|r| r.parse::<Reference>().ok()) {
            Some(r) => (r.familiar_name(), r.tag.unwrap_or_else(|| "<none>".into())),
            None => ("<none>".into(), "<none>".into()),
        }
    };
    if args.json {
        let rows: Vec<Value> = images
            .iter()
            .map(|i| {
                let (repo, tag) = split(i);
                json!({
                    "Repository": repo, "Tag": tag, "Reference": i.reference,
                    "ID": i.config_digest.to_string(), "Digest": i.manifest_digest.to_string(),
                    "Created": created(i), "Size": image_size(i),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let mut rows =
        vec![["REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE"].map(String::from).to_vec()];
    for image in &images {
        let (repo, tag) = split(image);
        rows.push(vec![
            repo,
            tag,
            image.config_digest.short().to_string(),
            ago(created(image).as_deref()),
            human_size(image_size(image)),
        ]);
    }
    print_table(&rows);
    Ok(())
}

fn inspect_json(store: &Store, image: &Image) -> Value {
    let names: Vec<String> = store
        .images()
        .unwrap_or_default()
        .into_iter()
        .filter(|i| i.config_digest == image.config_digest)
        .filter_map(|i| i.reference)
        .collect();
    let repo_tags: Vec<String> = names
        .iter()
        .filter_map(|n| n.parse::<Reference>().ok())
        .filter_map(|r| r.tag.clone().map(|t| format!("{}:{t}", r.familiar_name())))
        .collect();
    let repo_digests: Vec<String> = names
        .iter()
        .filter_map(|n| n.parse::<Reference>().ok())
        .map(|r| format!("{}@{}", r.familiar_name(), image.manifest_digest))
        .collect();
    let c = &image.raw_config;
    json!({
        "Id": image.config_digest.to_string(),
        "RepoTags": repo_tags,
        "RepoDigests": repo_digests,
        "Created": c.get("created"),
        "Author": c.get("author").cloned().unwrap_or(Value::String(String::new())),
        "Config": c.get("config"),
        "Architecture": c.get("architecture"),
        "Variant": c.get("variant"),
        "Os": c.get("os"),
        "Size": image_size(image),
        "RootFS": {
            "Type": "layers",
            "Layers": c.get("rootfs").and_then(|r| r.get("diff_ids")),
        },
        "Layers": image.layers.iter().map(|l| json!({
            "Digest": l.digest.to_string(), "MediaType": l.media_type, "Size": l.size,
        })).collect::<Vec<_>>(),
        "Manifest": { "Digest": image.manifest_digest.to_string(), "MediaType": image.manifest_media_type },
    })
}

pub fn inspect(root: &Path, args: &InspectArgs) -> Result<()> {
    let store = open(root)?;
    let mut out = Vec::new();
    for reference in &args.references {
        out.push(inspect_json(&store, &store.resolve(reference)?));
    }
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

pub fn history(root: &Path, args: &HistoryArgs) -> Result<()> {
    let store = open(root)?;
    let image = store.resolve(&args.reference)?;
    let history =
        image.raw_config.get("history").and_then(Value::as_array).cloned().unwrap_or_default();
    // Walk newest first, pairing non-empty entries with layers from the top.
    let mut layers = image.layers.iter().rev();
    let mut rows = Vec::new();
    for (i, h) in history.iter().enumerate().rev() {
        let empty = h.get("empty_layer").and_then(Value::as_bool).unwrap_or(false);
        let size = if empty { 0 } else { layers.next().map_or(0, |l| l.size) };
        let id = if i + 1 == history.len() {
            image.config_digest.short().to_string()
        } else {
            "<missing>".into()
        };
        let text = |k: &str| h.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
        rows.push((id, text("created"), text("created_by"), size, text("comment"), empty));
    }
    if args.json {
        let out: Vec<Value> = rows
            .iter()
            .map(|(id, created, by, size, comment, empty)| {
                json!({
                    "ID": id, "Created": created, "CreatedBy": by, "Size": size,
                    "Comment": comment, "EmptyLayer": empty,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let mut table =
        vec![["IMAGE", "CREATED", "CREATED BY", "SIZE", "COMMENT"].map(String::from).to_vec()];
    for (id, created, by, size, comment, _) in rows {
        let by = if args.no_trunc || by.chars().count() <= 45 {
            by
        } else {
            by.chars().take(44).collect::<String>() + "…"
        };
        table.push(vec![id, ago(Some(&created)), by, human_size(size), comment]);
    }
    print_table(&table);
    Ok(())
}

pub fn tag(root: &Path, args: &TagArgs) -> Result<()> {
    open(root)?.tag(&args.source, &args.target)?;
    Ok(())
}

pub fn rmi(root: &Path, args: &RmiArgs) -> Result<()> {
    let store = open(root)?;
    for reference in &args.references {
        for removal in store.remove_image(reference, args.force)? {
            match removal {
                Removal::Untagged(name) => println!("Untagged: {name}"),
                Removal::Deleted(id) => println!("Deleted: {id}"),
            }
        }
    }
    Ok(())
}

pub fn prune(root: &Path, args: &ListArgs) -> Result<()> {
    let report = open(root)?.prune()?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for blob in &report.blobs_removed {
            println!("deleted: {blob}");
        }
        println!("Total reclaimed space: {}", human_size(report.reclaimed_bytes));
    }
    Ok(())
}

pub fn df(root: &Path, args: &ListArgs) -> Result<()> {
    let usage = open(root)?.disk_usage()?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&usage)?);
        return Ok(());
    }
    print_table(&[
        ["TYPE", "TOTAL", "SIZE", "RECLAIMABLE"].map(String::from).to_vec(),
        vec![
            "Images".into(),
            usage.images.to_string(),
            human_size(usage.images_bytes),
            human_size(usage.reclaimable_bytes),
        ],
        vec![
            "Layers".into(),
            usage.layers.to_string(),
            human_size(usage.layers_bytes),
            format!("(shared {})", human_size(usage.shared_bytes)),
        ],
        vec!["Index cache".into(), "".into(), human_size(usage.index_cache_bytes), "".into()],
        vec!["Mounts".into(), usage.mounts.to_string(), "".into(), "".into()],
    ]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes_like_docker() {
        assert_eq!(human_size(0), "0B");
        assert_eq!(human_size(999), "999B");
        assert_eq!(human_size(1000), "1kB");
        assert_eq!(human_size(77_800_000), "77.8MB");
        assert_eq!(human_size(1_234_567_890), "1.235GB");
    }
}
