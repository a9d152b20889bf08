//! `rmount index build`: the layer indexes of a stored image, and with
//! `--push` their publication as an artifact referring to the image (see
//! `transfer::index_artifact`), with `--prefetch-list` a recorded file list
//! besides. One row per layer, then the list's size and what was pushed.

use super::images::human_size;
use super::registry::{client, open_store};
use super::{IndexArgs, IndexBuildArgs, IndexCommand};
use crate::fs::record::PrefetchList;
use crate::reference::Reference;
use crate::transfer::{self, IndexArtifactReport};
use anyhow::{anyhow, Context, Result};
use serde_json::json;
use std::path::Path;

pub fn index(root: &Path, args: &IndexArgs) -> Result<()> {
    match &args.command {
        IndexCommand::Build(a) => build(root, a),
    }
}

fn build(root: &Path, args: &IndexBuildArgs) -> Result<()> {
    let destination = args.dest.as_deref().map(str::parse::<Reference>).transpose()?;
    let prefetch_list = args.prefetch_list.as_deref().map(read_list).transpose()?;
    let store = open_store(root)?;
    let report = transfer::build_index_artifact(
        &store,
        &client(&args.registry)?,
        &args.reference,
        destination.as_ref(),
        args.push,
        prefetch_list.as_ref(),
    )
    .with_context(|| format!("indexing {}", args.reference))?;
    if args.json {
        println!("{}", to_json(&report));
    } else {
        print_report(&args.reference, &report);
    }
    Ok(())
}

/// Reads and checks a recorded file list (`rmount mount --record FILE`).
fn read_list(path: &Path) -> Result<PrefetchList> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    PrefetchList::parse(&bytes).map_err(|e| {
        anyhow!(
            "{} is not a prefetch list (as `rmount mount --record` writes): {e}",
            path.display()
        )
    })
}

fn to_json(report: &IndexArtifactReport) -> serde_json::Value {
    let layers: Vec<_> = report
        .layers
        .iter()
        .map(|l| json!({"digest": l.digest.to_string(), "size": l.size, "indexSize": l.index_size}))
        .collect();
    json!({
        "artifact": report.artifact.as_ref().map(ToString::to_string),
        "subject": report.subject.to_string(),
        "repository": report.repository,
        "alreadyPublished": report.already_published,
        "layers": layers,
        "prefetchFiles": report.prefetch_list.as_ref().map_or(0, |l| l.files),
    })
}

fn print_report(reference: &str, report: &IndexArtifactReport) {
    let mut rows = vec![["LAYER".to_string(), "SIZE".to_string(), "INDEX".to_string()]];
    for l in &report.layers {
        rows.push([l.digest.short().to_string(), human_size(l.size), human_size(l.index_size)]);
    }
    let width = |c: usize| rows.iter().map(|r| r[c].len()).max().unwrap_or(0);
    let (w0, w1) = (width(0), width(1));
    for [layer, size, index] in &rows {
        println!("{layer:<w0$}   {size:<w1$}   {index}");
    }
    if let Some(list) = &report.prefetch_list {
        println!("prefetch list: {} files", list.files);
    }
    let subject = match &report.repository {
        Some(repository) => format!("{repository}@{}", report.subject),
        None => format!("{reference} ({})", report.subject),
    };
    match (&report.artifact, report.already_published) {
        (None, _) => println!("Built the indexes of {subject}; publish them with --push"),
        (Some(artifact), true) => {
            println!("Index artifact {artifact} for {subject} is already published")
        }
        (Some(artifact), false) => {
            if let Some(tag) = &report.fallback_tag {
                println!("Listed under tag {tag} (the registry has no Referrers API)");
            }
            println!("Pushed index artifact {artifact} for {subject}");
        }
    }
}
