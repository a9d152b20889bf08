//! `rmount containerd pull`: has a running containerd hold an image whose
//! layers rmount's snapshotter serves lazily (like `ctr-remote image rpull`).

use super::{ContainerdArgs, ContainerdCommand, ContainerdPullArgs};
use crate::containerd::{self, ContainerdClient, LayerOutcome, PullOptions};
use crate::platform::Platform;
use crate::reference::Reference;
use anyhow::{Context, Result};
use std::time::Instant;

pub fn containerd(args: &ContainerdArgs) -> Result<()> {
    match &args.command {
        ContainerdCommand::Pull(a) => pull(a),
    }
}

fn pull(args: &ContainerdPullArgs) -> Result<()> {
    let started = Instant::now();
    let reference: Reference = args.reference.parse()?;
    let platform = match &args.platform {
        Some(p) => p.parse::<Platform>()?,
        None => Platform::host(),
    };
    let registry = super::registry::client(&args.registry)?;
    let mut client = ContainerdClient::connect(&args.address, &args.namespace)?;
    let options = PullOptions { snapshotter: args.snapshotter.clone(), platform };
    let pulled = containerd::pull(&mut client, &registry, &reference, &options)
        .with_context(|| format!("pulling {reference} into containerd"))?;
    let elapsed = started.elapsed();
    if args.json {
        let mut json = serde_json::to_value(&pulled)?;
        json["elapsedSeconds"] = serde_json::json!(elapsed.as_secs_f64());
        println!("{json}");
    } else {
        println!(
            "{} ({}): {} layers on {}: {} lazy, {} unpacked, {} already there; {:.2}s",
            pulled.image,
            pulled.digest,
            pulled.layers.len(),
            pulled.snapshotter,
            pulled.count(LayerOutcome::Lazy),
            pulled.count(LayerOutcome::Unpacked),
            pulled.count(LayerOutcome::Existing),
            elapsed.as_secs_f64(),
        );
    }
    Ok(())
}
