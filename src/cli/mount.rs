//! Mount commands: mount, umount. (FS helper: implement.)

use super::{MountArgs, UmountArgs};
use anyhow::{bail, Result};
use std::path::Path;

pub fn mount(root: &Path, args: &MountArgs) -> Result<()> {
    let _ = (root, args);
    bail!("not implemented yet")
}
pub fn umount(root: &Path, args: &UmountArgs) -> Result<()> {
    let _ = (root, args);
    bail!("not implemented yet")
}
