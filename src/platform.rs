//! Platforms (`os/arch[/variant]`) and choosing one manifest from an image
//! index or Docker manifest list, the way `docker pull --platform` does.

use oci_spec::image::{Descriptor, ImageIndex};
use std::fmt;
use std::str::FromStr;

/// A platform to pull or mount: `linux/amd64`, `linux/arm64/v8`, `linux/arm/v7`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    /// Operating system, e.g. `linux`.
    pub os: String,
    /// OCI architecture name, e.g. `amd64`.
    pub architecture: String,
    /// CPU variant, e.g. `v7`; `None` matches any.
    pub variant: Option<String>,
}

/// A platform string that is not `os/arch[/variant]`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid platform {0:?}: expected os/arch[/variant], e.g. linux/amd64 or linux/arm/v7")]
pub struct PlatformError(String);

impl Platform {
    /// The platform this program runs on.
    pub fn host() -> Self {
        Self { os: "linux".into(), architecture: host_arch().into(), variant: None }
    }

    /// Does an index entry's platform match? A missing variant matches any,
    /// and arm64's default variant `v8` equals no variant.
    pub fn matches(&self, candidate: &oci_spec::image::Platform) -> bool {
        let normal = |v: Option<&str>| match (self.architecture.as_str(), v) {
            ("arm64", Some("v8")) => None,
            (_, v) => v.map(str::to_string),
        };
        candidate.os().to_string() == self.os
            && candidate.architecture().to_string() == self.architecture
            && (self.variant.is_none()
                || normal(self.variant.as_deref()) == normal(candidate.variant().as_deref()))
    }

    /// The manifest of `index` for this platform: the first exact match,
    /// else an entry without a platform (a single-platform index).
    pub fn choose<'a>(&self, index: &'a ImageIndex) -> Option<&'a Descriptor> {
        let manifests = index.manifests();
        manifests
            .iter()
            .find(|d| d.platform().as_ref().is_some_and(|p| self.matches(p)))
            .or_else(|| manifests.iter().find(|d| d.platform().is_none()))
    }
}

impl FromStr for Platform {
    type Err = PlatformError;
    fn from_str(s: &str) -> Result<Self, PlatformError> {
        let parts: Vec<&str> = s.split('/').collect();
        let valid = |p: &&&str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric());
        match parts.as_slice() {
            [os, arch] if [os, arch].iter().all(valid) => {
                Ok(Self { os: os.to_string(), architecture: arch.to_string(), variant: None })
            }
            [os, arch, variant] if [os, arch, variant].iter().all(valid) => Ok(Self {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: Some(variant.to_string()),
            }),
            _ => Err(PlatformError(s.to_string())),
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        match &self.variant {
            Some(v) => write!(f, "/{v}"),
            None => Ok(()),
        }
    }
}

/// The host's OCI architecture name.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        other => other,
    }
}

/// `os/arch[/variant]` of an index entry, for messages listing what exists.
pub fn describe(descriptor: &Descriptor) -> String {
    match descriptor.platform() {
        Some(p) => {
            let base = format!("{}/{}", p.os(), p.architecture());
            match p.variant() {
                Some(v) => format!("{base}/{v}"),
                None => base,
            }
        }
        None => "unknown platform".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::image::{Arch, Os, PlatformBuilder};

    fn oci(arch: Arch, variant: Option<&str>) -> oci_spec::image::Platform {
        let mut b = PlatformBuilder::default().os(Os::Linux).architecture(arch);
        if let Some(v) = variant {
            b = b.variant(v.to_string());
        }
        b.build().expect("platform")
    }

    #[test]
    fn parses_two_and_three_parts_and_rejects_the_rest() {
        assert_eq!("linux/amd64".parse::<Platform>().unwrap().to_string(), "linux/amd64");
        assert_eq!("linux/arm/v7".parse::<Platform>().unwrap().variant.as_deref(), Some("v7"));
        for bad in ["", "linux", "linux/", "/amd64", "a/b/c/d", "linux/amd 64"] {
            assert!(bad.parse::<Platform>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn variant_matching_treats_arm64_v8_as_default() {
        let arm64: Platform = "linux/arm64/v8".parse().unwrap();
        assert!(arm64.matches(&oci(Arch::ARM64, None)));
        assert!(arm64.matches(&oci(Arch::ARM64, Some("v8"))));
        let armv7: Platform = "linux/arm/v7".parse().unwrap();
        assert!(!armv7.matches(&oci(Arch::ARM, Some("v6"))));
        let any_arm: Platform = "linux/arm".parse().unwrap();
        assert!(any_arm.matches(&oci(Arch::ARM, Some("v6"))));
        assert!(!any_arm.matches(&oci(Arch::Amd64, None)));
    }
}
