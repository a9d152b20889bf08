//! Where requests for a registry go: mirrors first, then the registry
//! itself, configured like containerd's `hosts.toml`:
//!
//! ```text
//! HOSTS_DIR/<registry>/hosts.toml      e.g. /etc/rmount/hosts.d/docker.io/hosts.toml
//! HOSTS_DIR/_default/hosts.toml        used for registries without their own file
//!
//! server = "https://registry-1.docker.io"   # the upstream (optional)
//!
//! [host."http://127.0.0.1:5001"]           # tried first, in file order
//!   capabilities = ["pull", "resolve"]     # resolve = tags → digests; push
//! ```
//!
//! Pulls try every endpoint with the needed capability in order and fall
//! back to the next on any failure; pushes go to endpoints with `push`,
//! which by default is only the upstream. Plain HTTP is used only for an
//! `http://` URL in this file, for loopback registries, and for hosts given
//! with `--insecure-registry`: anything else is HTTPS with system roots.

use super::RegistryError;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// What an endpoint may be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capability {
    /// Fetching manifests by digest and blobs.
    Pull,
    /// Resolving tags to manifests.
    Resolve,
    /// Uploading blobs and manifests.
    Push,
}

/// One place to send a registry's requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `scheme://host[:port]`, no trailing slash, e.g. `http://127.0.0.1:5000`.
    pub base: String,
    /// `host[:port]`: the key for credentials and tokens.
    pub host: String,
    /// Whether this is a mirror (requests carry `?ns=<registry>`).
    pub mirror: bool,
    capabilities: Vec<Capability>,
}

impl Endpoint {
    /// May this endpoint serve `capability`?
    pub fn can(&self, capability: Capability) -> bool {
        self.capabilities.contains(&capability)
    }
}

/// The mirror configuration and the list of plain-HTTP registries.
#[derive(Debug, Clone, Default)]
pub struct Hosts {
    dir: Option<PathBuf>,
    insecure: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HostsFile {
    server: Option<String>,
    #[serde(default)]
    host: toml::map::Map<String, toml::Value>,
}

#[derive(Deserialize)]
struct HostEntry {
    #[serde(default = "all_pull")]
    capabilities: Vec<String>,
}

fn all_pull() -> Vec<String> {
    vec!["pull".into(), "resolve".into()]
}

impl Hosts {
    /// Mirrors from `dir` (if any); `insecure` registries use plain HTTP.
    pub fn new(dir: Option<PathBuf>, insecure: Vec<String>) -> Self {
        Self { dir, insecure }
    }

    /// The default hosts directory: `/etc/rmount/hosts.d` for root,
    /// `$XDG_CONFIG_HOME/rmount/hosts.d` otherwise.
    pub fn default_dir() -> PathBuf {
        if rustix::process::geteuid().is_root() {
            return PathBuf::from("/etc/rmount/hosts.d");
        }
        let config = std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
            .unwrap_or_else(|| PathBuf::from("."));
        config.join("rmount/hosts.d")
    }

    /// Endpoints for `registry`, in the order to try them.
    pub fn endpoints(&self, registry: &str) -> Result<Vec<Endpoint>, RegistryError> {
        let file = match &self.dir {
            Some(dir) => read_hosts_file(dir, registry)?,
            None => None,
        };
        let mut endpoints = Vec::new();
        let upstream = match file.as_ref().and_then(|f| f.server.clone()) {
            Some(server) => server,
            None => self.default_server(registry),
        };
        if let Some(file) = file {
            for (url, entry) in &file.host {
                let entry: HostEntry = entry.clone().try_into().map_err(|e| {
                    RegistryError::Config { registry: registry.into(), reason: e.to_string() }
                })?;
                let capabilities = entry
                    .capabilities
                    .iter()
                    .map(|c| parse_capability(registry, c))
                    .collect::<Result<_, _>>()?;
                endpoints.push(endpoint(registry, url, true, capabilities)?);
            }
        }
        let all = vec![Capability::Pull, Capability::Resolve, Capability::Push];
        endpoints.push(endpoint(registry, &upstream, false, all)?);
        Ok(endpoints)
    }

    fn default_server(&self, registry: &str) -> String {
        if registry == crate::reference::DEFAULT_REGISTRY {
            return "https://registry-1.docker.io".into();
        }
        let plain = is_loopback(registry) || self.insecure.iter().any(|h| h == registry);
        format!("{}://{registry}", if plain { "http" } else { "https" })
    }
}

fn read_hosts_file(dir: &Path, registry: &str) -> Result<Option<HostsFile>, RegistryError> {
    for name in [registry, "_default"] {
        let path = dir.join(name).join("hosts.toml");
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(RegistryError::Config {
                    registry: registry.into(),
                    reason: format!("{}: {e}", path.display()),
                })
            }
        };
        let file = toml::from_str(&text).map_err(|e| RegistryError::Config {
            registry: registry.into(),
            reason: format!("{}: {e}", path.display()),
        })?;
        return Ok(Some(file));
    }
    Ok(None)
}

fn parse_capability(registry: &str, name: &str) -> Result<Capability, RegistryError> {
    match name {
        "pull" => Ok(Capability::Pull),
        "resolve" => Ok(Capability::Resolve),
        "push" => Ok(Capability::Push),
        other => Err(RegistryError::Config {
            registry: registry.into(),
            reason: format!("unknown capability {other:?} (use pull, resolve, push)"),
        }),
    }
}

fn endpoint(
    registry: &str,
    url: &str,
    mirror: bool,
    capabilities: Vec<Capability>,
) -> Result<Endpoint, RegistryError> {
    let bad = |reason: &str| RegistryError::Config {
        registry: registry.into(),
        reason: format!("{url:?}: {reason}"),
    };
    let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("expected http(s)://host"))?;
    if scheme != "http" && scheme != "https" {
        return Err(bad("the scheme must be http or https"));
    }
    let host = rest.trim_end_matches('/').trim_end_matches("/v2");
    if host.is_empty() || host.contains('/') {
        return Err(bad("expected scheme://host[:port] without a path"));
    }
    Ok(Endpoint { base: format!("{scheme}://{host}"), host: host.into(), mirror, capabilities })
}

/// `localhost`, `127.x.x.x` and `[::1]`, with or without a port.
pub fn is_loopback(registry: &str) -> bool {
    let host = match registry.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => registry,
    };
    host == "localhost"
        || host == "[::1]"
        || host.parse::<std::net::Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_https_except_loopback_and_insecure() {
        let hosts = Hosts::new(None, vec!["reg.lan:5000".into()]);
        let base = |r: &str| hosts.endpoints(r).unwrap()[0].base.clone();
        assert_eq!(base("docker.io"), "https://registry-1.docker.io");
        assert_eq!(base("quay.io"), "https://quay.io");
        assert_eq!(base("127.0.0.1:5000"), "http://127.0.0.1:5000");
        assert_eq!(base("localhost"), "http://localhost");
        assert_eq!(base("reg.lan:5000"), "http://reg.lan:5000");
        assert_eq!(base("127.example.com"), "https://127.example.com");
    }

    #[test]
    fn mirrors_come_first_in_file_order_and_upstream_last() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("docker.io")).unwrap();
        std::fs::write(
            dir.path().join("docker.io/hosts.toml"),
            "server = \"https://registry-1.docker.io\"\n\
             [host.\"http://127.0.0.1:5002\"]\ncapabilities = [\"pull\"]\n\
             [host.\"https://mirror.example/v2\"]\n",
        )
        .unwrap();
        let hosts = Hosts::new(Some(dir.path().into()), vec![]);
        let eps = hosts.endpoints("docker.io").unwrap();
        let bases: Vec<_> = eps.iter().map(|e| e.base.as_str()).collect();
        assert_eq!(
            bases,
            ["http://127.0.0.1:5002", "https://mirror.example", "https://registry-1.docker.io"]
        );
        assert!(eps[0].mirror && !eps[0].can(Capability::Resolve) && eps[0].can(Capability::Pull));
        assert!(eps[1].can(Capability::Resolve) && !eps[1].can(Capability::Push));
        assert!(!eps[2].mirror && eps[2].can(Capability::Push));
        // Other registries are not affected.
        assert_eq!(hosts.endpoints("quay.io").unwrap().len(), 1);
    }

    #[test]
    fn bad_files_name_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("_default")).unwrap();
        let hosts = Hosts::new(Some(dir.path().into()), vec![]);
        for (text, expect) in [
            ("[host.\"ftp://x\"]\n", "scheme"),
            ("[host.\"https://x\"]\ncapabilities = [\"fly\"]\n", "fly"),
            ("server = 3\n", "server"),
            ("sever = \"https://x\"\n", "sever"),
        ] {
            std::fs::write(dir.path().join("_default/hosts.toml"), text).unwrap();
            let err = hosts.endpoints("quay.io").unwrap_err().to_string();
            assert!(err.contains(expect), "{text:?}: {err}");
        }
    }
}
