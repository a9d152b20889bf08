//! `rmount index build`: the layer indexes of a stored image, and with
//! `--push` their publication as an artifact referring to the image (see
//! `transfer::index_artifact`). One row per layer, then what was pushed.

use super::images::human_size;
use super::registry::{client, open_store};
use super::{IndexArgs, IndexBuildArgs, IndexCommand};
use crate::reference::Reference;
use crate::transfer::{self, IndexArtifactReport};
use anyhow::{Context, Result};
use serde_json::json;
use std::path::Path;

pub fn index(root: &Path, args: &IndexArgs) -> Result<()> {
    match &args.command {
        IndexCommand::Build(a) => build(root, a),
    }
}

fn build(root: &Path, args: &IndexBuildArgs) -> Result<()> {
    let destination = args.dest.as_deref().map(str::parse::<Reference>).transpose()?;
    let store = open_store(root)?;
    let report = transfer::build_index_artifact(
        &store,
        &client(&args.registry)?,
        &args.reference,
        destination.as_ref(),
        args.push,
    )
    .with_context(|| format!("indexing {}", args.reference))?;
    if args.json {
        println!("{}", to_json(&report));
    } else {
        print_report(&args.reference, &report);
    }
    Ok(())
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
