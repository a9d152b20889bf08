//! `tag` and `rmi`: adding and removing the names of stored images.

use super::{RefEntry, Store, StoreError};
use crate::digest::Digest;
use crate::reference::Reference;

/// What `rmi` did, line by line as Docker prints it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum Removal {
    /// A name was removed.
    Untagged(String),
    /// The image lost its last name and left the store's refs.
    Deleted(Digest),
}

impl Store {
    /// Gives the image `source` resolves to the name `target`.
    pub fn tag(&self, source: &str, target: &str) -> Result<String, StoreError> {
        let image = self.resolve(source)?;
        let name = target.parse::<Reference>()?.without_digest().to_string();
        self.set_ref(RefEntry {
            name: Some(name.clone()),
            manifest: image.manifest_digest,
            media_type: image.manifest_media_type,
            size: image.manifest_size,
        })?;
        Ok(name)
    }

    /// Removes a name, or with an id every name of that image. Refuses while
    /// the image is mounted unless `force`. Blobs stay until `prune`.
    pub fn remove_image(&self, reference: &str, force: bool) -> Result<Vec<Removal>, StoreError> {
        let image = self.resolve(reference)?;
        if !force {
            if let Some(m) = self.mounts()?.into_iter().find(|m| m.image_id == image.config_digest)
            {
                return Err(StoreError::InUse {
                    image: image.config_digest,
                    mountpoint: m.mountpoint,
                });
            }
        }
        let by_name = image.reference.clone();
        self.update_refs(|refs| {
            let mut removals = Vec::new();
            let same_image = |r: &RefEntry| {
                self.image_from_entry(r).is_ok_and(|i| i.config_digest == image.config_digest)
            };
            let targets: Vec<usize> = (0..refs.len())
                .filter(|&i| match &by_name {
                    Some(name) => refs[i].name.as_ref() == Some(name),
                    None => same_image(&refs[i]),
                })
                .collect();
            for &i in targets.iter().rev() {
                let removed = refs.remove(i);
                if let Some(name) = removed.name {
                    removals.push(Removal::Untagged(name));
                }
            }
            removals.reverse();
            if !refs.iter().any(same_image) {
                removals.push(Removal::Deleted(image.config_digest.clone()));
            }
            Ok(removals)
        })
    }
}
