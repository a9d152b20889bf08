//! Registry commands: pull, push, login, logout. Progress bars (one per
//! blob plus a total) go to stderr and only when it is a terminal; the
//! result goes to stdout, as Docker prints it or as JSON.

use super::{LoginArgs, LogoutArgs, PullArgs, PushArgs, RegistryArgs};
use crate::digest::Digest;
use crate::platform::Platform;
use crate::reference::{Reference, DEFAULT_REGISTRY};
use crate::registry::{AuthFile, Client, ClientOptions, Credential, Hosts, RetryPolicy};
use crate::store::Store;
use crate::transfer::{self, BlobOutcome, LayerData, Progress, PullOptions, PushOptions};
use anyhow::{bail, Context, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::HashMap;
use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::sync::Mutex;

fn auth_file(path: Option<&Path>) -> AuthFile {
    path.map(AuthFile::at).unwrap_or_else(AuthFile::discover)
}

pub(super) fn client(args: &RegistryArgs) -> Result<Client> {
    let hosts_dir = args.hosts_dir.clone().unwrap_or_else(Hosts::default_dir);
    let options = ClientOptions {
        hosts: Hosts::new(Some(hosts_dir), args.insecure_registry.clone()),
        auth_file: auth_file(args.authfile.as_deref()),
        retry: RetryPolicy::default(),
    };
    Ok(Client::new(options)?)
}

pub(super) fn open_store(root: &Path) -> Result<Store> {
    Store::open(root).with_context(|| format!("opening the store at {}", root.display()))
}

pub fn pull(root: &Path, args: &PullArgs) -> Result<()> {
    let reference: Reference = args.reference.parse()?;
    let platform = match &args.platform {
        Some(p) => p.parse::<Platform>()?,
        None => Platform::host(),
    };
    let options = PullOptions {
        platform,
        all_platforms: args.all_platforms,
        jobs: args.max_concurrent_downloads,
        layers: LayerData::Blobs,
    };
    let store = open_store(root)?;
    let bars = Bars::new("Downloading", args.output.quiet);
    let pulled = transfer::pull(&store, &client(&args.registry)?, &reference, &options, &bars)
        .with_context(|| format!("pulling {reference}"))?;
    bars.clear();
    if args.output.json {
        let json = serde_json::json!({
            "reference": pulled.reference,
            "digest": pulled.digest.to_string(),
            "manifest": pulled.manifest.to_string(),
            "id": pulled.id.to_string(),
        });
        println!("{json}");
    } else {
        if !args.output.quiet {
            println!("Status: {} ({})", reference, bars.summary());
        }
        println!("Digest: {}", pulled.digest);
    }
    Ok(())
}

pub fn push(root: &Path, args: &PushArgs) -> Result<()> {
    let destination: Reference = args.destination.as_deref().unwrap_or(&args.reference).parse()?;
    let store = open_store(root)?;
    let options = PushOptions { chunk_size: args.chunk_size, jobs: args.max_concurrent_uploads };
    let bars = Bars::new("Pushing", args.output.quiet);
    let pushed = transfer::push(
        &store,
        &client(&args.registry)?,
        &args.reference,
        &destination,
        &options,
        &bars,
    )
    .with_context(|| format!("pushing {} to {destination}", args.reference))?;
    bars.clear();
    if args.output.json {
        let json = serde_json::json!({
            "reference": pushed.reference,
            "digest": pushed.digest.to_string(),
            "size": pushed.size,
        });
        println!("{json}");
    } else {
        if !args.output.quiet {
            println!("Pushed {} ({})", pushed.reference, bars.summary());
        }
        println!("Digest: {} size: {}", pushed.digest, pushed.size);
    }
    Ok(())
}

pub fn login(args: &LoginArgs) -> Result<()> {
    let server = normalize_server(args.server.as_deref());
    let stdin = std::io::stdin();
    let username = match &args.username {
        Some(u) => u.clone(),
        None if args.password_stdin => bail!("--password-stdin needs --username"),
        None => prompt("Username: ")?,
    };
    let password = match (&args.password, args.password_stdin) {
        (Some(p), _) => p.clone(),
        (None, true) => {
            let mut line = String::new();
            stdin.lock().read_line(&mut line).context("reading the password from stdin")?;
            line.trim_end_matches(['\n', '\r']).to_string()
        }
        (None, false) => prompt_hidden("Password: ")?,
    };
    if username.is_empty() || password.is_empty() {
        bail!("username and password must not be empty");
    }
    let credential = Credential { username, secret: password };
    client(&args.registry)?
        .login(&server, &credential)
        .with_context(|| format!("logging in to {server}"))?;
    let file = auth_file(args.registry.authfile.as_deref());
    file.store(&server, &credential)?;
    println!("Login Succeeded (credentials saved for {server} via {})", file.path().display());
    Ok(())
}

pub fn logout(args: &LogoutArgs) -> Result<()> {
    let server = normalize_server(args.server.as_deref());
    if auth_file(args.authfile.as_deref()).erase(&server)? {
        println!("Removing login credentials for {server}");
    } else {
        println!("Not logged in to {server}");
    }
    Ok(())
}

/// `https://host/v1/` or `host` → `host`; nothing → docker.io.
fn normalize_server(server: Option<&str>) -> String {
    let Some(server) = server else { return DEFAULT_REGISTRY.to_string() };
    let host = server.split_once("://").map_or(server, |(_, rest)| rest);
    let host = host.split('/').next().unwrap_or(host);
    match host {
        "index.docker.io" | "registry-1.docker.io" => DEFAULT_REGISTRY.to_string(),
        other => other.to_string(),
    }
}

fn prompt(label: &str) -> Result<String> {
    eprint!("{label}");
    std::io::stderr().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(line.trim().to_string())
}

/// Reads a line from the terminal without echoing it.
fn prompt_hidden(label: &str) -> Result<String> {
    use rustix::termios::{tcgetattr, tcsetattr, LocalModes, OptionalActions};
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        bail!("no terminal to ask for the password: use --password-stdin");
    }
    let saved = tcgetattr(&stdin)?;
    let mut quiet = saved.clone();
    quiet.local_modes.remove(LocalModes::ECHO);
    tcsetattr(&stdin, OptionalActions::Flush, &quiet)?;
    let line = prompt(label);
    tcsetattr(&stdin, OptionalActions::Flush, &saved)?;
    eprintln!();
    line
}

/// indicatif bars: one per blob, and a total.
pub(super) struct Bars {
    multi: MultiProgress,
    total: ProgressBar,
    blobs: Mutex<HashMap<Digest, ProgressBar>>,
    outcomes: Mutex<Vec<BlobOutcome>>,
}

impl Bars {
    pub(super) fn new(verb: &str, quiet: bool) -> Self {
        let target =
            if quiet { ProgressDrawTarget::hidden() } else { ProgressDrawTarget::stderr() };
        let multi = MultiProgress::with_draw_target(target);
        let style = ProgressStyle::with_template(
            "{prefix:>12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        let total = multi.add(ProgressBar::new(0).with_style(style).with_prefix(verb.to_string()));
        Self { multi, total, blobs: Mutex::new(HashMap::new()), outcomes: Mutex::new(Vec::new()) }
    }

    pub(super) fn clear(&self) {
        self.total.finish_and_clear();
        let _ = self.multi.clear();
    }

    /// "2 transferred, 1 already present, 1 mounted".
    fn summary(&self) -> String {
        let outcomes = self.outcomes.lock().unwrap_or_else(|p| p.into_inner());
        let count = |f: fn(&BlobOutcome) -> bool| outcomes.iter().filter(|o| f(o)).count();
        let transferred = count(|o| matches!(o, BlobOutcome::Transferred));
        let existing = count(|o| matches!(o, BlobOutcome::Existing));
        let mounted = count(|o| matches!(o, BlobOutcome::Mounted { .. }));
        let mut parts =
            vec![format!("{transferred} transferred"), format!("{existing} already present")];
        if mounted > 0 {
            parts.push(format!("{mounted} mounted from other repositories"));
        }
        parts.join(", ")
    }
}

impl Progress for Bars {
    fn blob_started(&self, digest: &Digest, size: u64) {
        let style =
            ProgressStyle::with_template("{prefix:>12} [{bar:30}] {bytes}/{total_bytes} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
        let bar = self.multi.insert_before(
            &self.total,
            ProgressBar::new(size).with_style(style).with_prefix(digest.short().to_string()),
        );
        self.total.inc_length(size);
        self.blobs.lock().unwrap_or_else(|p| p.into_inner()).insert(digest.clone(), bar);
    }

    fn blob_advanced(&self, digest: &Digest, bytes: u64) {
        if let Some(bar) = self.blobs.lock().unwrap_or_else(|p| p.into_inner()).get(digest) {
            bar.inc(bytes);
        }
        self.total.inc(bytes);
    }

    fn blob_finished(&self, digest: &Digest, outcome: &BlobOutcome) {
        let bar = self.blobs.lock().unwrap_or_else(|p| p.into_inner()).remove(digest);
        if let Some(bar) = bar {
            let rest = bar.length().unwrap_or(0).saturating_sub(bar.position());
            self.total.inc(rest);
            bar.set_position(bar.length().unwrap_or(0));
            bar.finish_with_message(match outcome {
                BlobOutcome::Transferred => "done".to_string(),
                BlobOutcome::Existing => "already exists".to_string(),
                BlobOutcome::Mounted { from } => format!("mounted from {from}"),
            });
        }
        self.outcomes.lock().unwrap_or_else(|p| p.into_inner()).push(outcome.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_normalize_like_docker_login() {
        assert_eq!(normalize_server(None), "docker.io");
        assert_eq!(normalize_server(Some("https://index.docker.io/v1/")), "docker.io");
        assert_eq!(normalize_server(Some("127.0.0.1:5000")), "127.0.0.1:5000");
        assert_eq!(normalize_server(Some("http://reg.lan:5000/v2/")), "reg.lan:5000");
    }
}
