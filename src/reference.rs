//! Image references, parsed and normalised like Docker:
//! `nginx` → `docker.io/library/nginx:latest`, `host:5000/a/b:tag`,
//! `name@sha256:…`, `name:tag@sha256:…`.

use crate::digest::Digest;
use std::fmt;
use std::str::FromStr;

/// The registry Docker assumes when a reference names none.
pub const DEFAULT_REGISTRY: &str = "docker.io";
const DEFAULT_TAG: &str = "latest";

/// A normalised image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// Registry host (with port), e.g. `docker.io`, `127.0.0.1:5000`.
    pub registry: String,
    /// Repository path, e.g. `library/nginx`.
    pub repository: String,
    /// Tag; `latest` when neither tag nor digest was given.
    pub tag: Option<String>,
    /// Pinned manifest digest.
    pub digest: Option<Digest>,
}

/// Why a string is not an image reference; names the offending part.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReferenceError {
    /// Empty input.
    #[error("empty image reference")]
    Empty,
    /// A repository path component breaks Docker's rules.
    #[error("invalid repository name {component:?} in {reference:?}: use lowercase letters, digits and separators (. _ __ -)")]
    Repository {
        /// The whole input.
        reference: String,
        /// The bad component.
        component: String,
    },
    /// The tag breaks Docker's rules.
    #[error("invalid tag {tag:?} in {reference:?}: up to 128 of [A-Za-z0-9_.-], not starting with . or -")]
    Tag {
        /// The whole input.
        reference: String,
        /// The bad tag.
        tag: String,
    },
    /// The registry host is malformed.
    #[error("invalid registry {registry:?} in {reference:?}")]
    Registry {
        /// The whole input.
        reference: String,
        /// The bad host.
        registry: String,
    },
    /// The digest is malformed.
    #[error("invalid digest in {reference:?}: {source}")]
    Digest {
        /// The whole input.
        reference: String,
        /// Why.
        source: crate::digest::DigestError,
    },
}

impl Reference {
    /// `registry/repository` as Docker prints it in full.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The repository as `docker images` shows it (`nginx`, `user/app`,
    /// `127.0.0.1:5000/team/app`).
    pub fn familiar_name(&self) -> String {
        if self.registry == DEFAULT_REGISTRY {
            self.repository.strip_prefix("library/").unwrap_or(&self.repository).to_string()
        } else {
            self.name()
        }
    }

    /// The same reference without its digest (what a tag points at).
    pub fn without_digest(&self) -> Reference {
        Reference { digest: None, ..self.clone() }
    }
}

impl FromStr for Reference {
    type Err = ReferenceError;

    fn from_str(input: &str) -> Result<Self, ReferenceError> {
        if input.is_empty() {
            return Err(ReferenceError::Empty);
        }
        let (rest, digest) = match input.split_once('@') {
            Some((rest, d)) => {
                let digest = d.parse().map_err(|source| ReferenceError::Digest {
                    reference: input.to_string(),
                    source,
                })?;
                (rest, Some(digest))
            }
            None => (input, None),
        };
        // A tag follows the last ':' after the last '/' (a ':' before it is a port).
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
            None => (rest, None),
        };
        if let Some(tag) = tag {
            if !valid_tag(tag) {
                return Err(ReferenceError::Tag { reference: input.into(), tag: tag.into() });
            }
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), rest.to_string())
            }
            _ => (DEFAULT_REGISTRY.to_string(), name.to_string()),
        };
        if !valid_registry(&registry) {
            return Err(ReferenceError::Registry { reference: input.into(), registry });
        }
        let repository = if registry == DEFAULT_REGISTRY && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        if let Some(bad) = repository.split('/').find(|c| !valid_component(c)) {
            return Err(ReferenceError::Repository {
                reference: input.into(),
                component: bad.into(),
            });
        }
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_string()),
            (None, Some(_)) => None,
            (None, None) => Some(DEFAULT_TAG.to_string()),
        };
        Ok(Reference { registry, repository, tag, digest })
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

fn valid_tag(tag: &str) -> bool {
    let first_ok = tag.chars().next().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
    first_ok
        && tag.len() <= 128
        && tag.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

fn valid_registry(host: &str) -> bool {
    let (name, port) = match host.rsplit_once(':') {
        Some((n, p)) => (n, Some(p)),
        None => (host, None),
    };
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()));
    port_ok
        && !name.is_empty()
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '[' | ']'))
}

/// Docker's path component rule: lowercase alphanumerics separated by one
/// `.` or `_`, two `_`, or any number of `-`.
fn valid_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    if bytes.is_empty() || !bytes[0].is_ascii_alphanumeric() {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            i += 1;
            continue;
        }
        let sep_len = match c {
            b'.' => 1,
            b'_' if bytes.get(i + 1) == Some(&b'_') => 2,
            b'_' => 1,
            b'-' => bytes[i..].iter().take_while(|&&b| b == b'-').count(),
            _ => return false,
        };
        i += sep_len;
        if !bytes.get(i).is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit()) {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(s: &str) -> String {
        s.parse::<Reference>().unwrap().to_string()
    }

    #[test]
    fn normalises_like_docker() {
        assert_eq!(norm("nginx"), "docker.io/library/nginx:latest");
        assert_eq!(norm("nginx:1.27"), "docker.io/library/nginx:1.27");
        assert_eq!(norm("user/app"), "docker.io/user/app:latest");
        assert_eq!(norm("host:5000/a/b:tag"), "host:5000/a/b:tag");
        assert_eq!(norm("localhost/x"), "localhost/x:latest");
        assert_eq!(norm("127.0.0.1:5000/team/app:v1"), "127.0.0.1:5000/team/app:v1");
        let d = Digest::of(b"x");
        assert_eq!(norm(&format!("nginx@{d}")), format!("docker.io/library/nginx@{d}"));
        assert_eq!(norm(&format!("nginx:1@{d}")), format!("docker.io/library/nginx:1@{d}"));
        assert_eq!(norm("a__b/c-d--e/f.g_h"), "docker.io/a__b/c-d--e/f.g_h:latest");
    }

    #[test]
    fn familiar_names() {
        let r: Reference = "nginx".parse().unwrap();
        assert_eq!(r.familiar_name(), "nginx");
        let r: Reference = "user/app".parse().unwrap();
        assert_eq!(r.familiar_name(), "user/app");
        let r: Reference = "host:5000/a".parse().unwrap();
        assert_eq!(r.familiar_name(), "host:5000/a");
    }

    #[test]
    fn rejects_bad_parts() {
        assert_eq!("".parse::<Reference>(), Err(ReferenceError::Empty));
        assert!(
            matches!("Nginx".parse::<Reference>(), Err(ReferenceError::Repository { component, .. }) if component == "Nginx")
        );
        assert!(matches!("a/b_-c".parse::<Reference>(), Err(ReferenceError::Repository { .. })));
        assert!(matches!("a/b.".parse::<Reference>(), Err(ReferenceError::Repository { .. })));
        assert!(matches!("nginx:-x".parse::<Reference>(), Err(ReferenceError::Tag { .. })));
        let long = format!("nginx:{}", "a".repeat(129));
        assert!(matches!(long.parse::<Reference>(), Err(ReferenceError::Tag { .. })));
        assert!(matches!(
            "nginx@sha256:12".parse::<Reference>(),
            Err(ReferenceError::Digest { .. })
        ));
        assert!(matches!(
            "host:x5/a".parse::<Reference>(),
            Err(ReferenceError::Tag { .. } | ReferenceError::Registry { .. })
        ));
        assert!(matches!("a b".parse::<Reference>(), Err(ReferenceError::Repository { .. })));
    }
}
