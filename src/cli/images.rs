//! Image commands: load, save, images, inspect, history, tag, rmi, prune, df.
//! (Store helper: implement.)

use super::{HistoryArgs, InspectArgs, ListArgs, LoadArgs, RmiArgs, SaveArgs, TagArgs};
use anyhow::{bail, Result};
use std::path::Path;

pub fn load(root: &Path, args: &LoadArgs) -> Result<()> {
    let _ = (root, args);
    bail!("not implemented yet")
}
pub fn save(root: &Path, args: &SaveArgs) -> Result<()> {
    let _ = (root, args);
    bail!("not implemented yet")
}
pub fn list(root: &Path, args: &ListArgs) -> Result<()> {
    let _ = (root, args);
    bail!("not implemented yet")
}
pub fn inspect(root: &Path, args: &InspectArgs) -> Result<()> {
    let _ = (root, args);
    bail!("not implemented yet")
}
pub fn history(root: &Path, args: &HistoryArgs) -> Result<()> {
    let _ = (root, args);
    bail!("not implemented yet")
}
pub fn tag(root: &Path, args: &TagArgs) -> Result<()> {
    let _ = (root, args);
    bail!("not implemented yet")
}
pub fn rmi(root: &Path, args: &RmiArgs) -> Result<()> {
    let _ = (root, args);
    bail!("not implemented yet")
}
pub fn prune(root: &Path, args: &ListArgs) -> Result<()> {
    let _ = (root, args);
    bail!("not implemented yet")
}
pub fn df(root: &Path, args: &ListArgs) -> Result<()> {
    let _ = (root, args);
    bail!("not implemented yet")
}
