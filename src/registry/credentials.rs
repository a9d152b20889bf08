//! Registry credentials, kept where Docker and Podman keep them.
//!
//! Users already log in with `docker login` or `podman login`, and many
//! keep their secrets in an OS keychain through `docker-credential-*`
//! helpers. Rather than a credential store of its own, rmount reads and
//! writes the same config file those tools use and runs the same helpers,
//! so one login serves every tool and no secret gets a second copy:
//!
//! - the file is `$REGISTRY_AUTH_FILE`, else `$DOCKER_CONFIG/config.json`,
//!   else `$HOME/.docker/config.json`;
//! - `auths` keys are matched like Docker's `ConvertToHostname`: the scheme
//!   and any path are ignored, so `https://host:5000/v1/` serves
//!   `host:5000`, and Docker Hub's `https://index.docker.io/v1/` serves
//!   `docker.io`, `index.docker.io` and `registry-1.docker.io`;
//! - a lookup asks `credHelpers[host]`, then `credsStore`, then reads the
//!   `auths` entry; a login stores through the first helper that applies,
//!   or else into `auths` (file mode 0600, other content kept); a logout
//!   erases everywhere a lookup would look, so it really logs out.
//!
//! Secrets never reach logs or error messages: [`Credential`]'s `Debug`
//! redacts them, and parse errors name the entry, never its content.

use crate::durable::AtomicFile;
use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::ser::PrettyFormatter;
use serde_json::{Map, Value};
use std::ffi::OsString;
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

/// The `auths` key (and helper server URL) Docker uses for Docker Hub.
const DOCKER_HUB_KEY: &str = "https://index.docker.io/v1/";
/// The name every Docker Hub alias normalises to.
const DOCKER_HUB: &str = "docker.io";
/// Host names that all mean Docker Hub.
const DOCKER_HUB_ALIASES: [&str; 4] =
    ["docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"];
/// The username that marks the secret as an identity token.
const TOKEN_USERNAME: &str = "<token>";
/// Helpers are programs named `docker-credential-<name>`.
const HELPER_PREFIX: &str = "docker-credential-";
/// What a helper prints when it holds nothing for the server.
const HELPER_NOT_FOUND: &str = "credentials not found";
/// Fields of an `auths` entry that hold a credential; a login replaces all of them.
const CREDENTIAL_FIELDS: [&str; 5] =
    ["auth", "username", "password", "identitytoken", "registrytoken"];
/// Longest helper output quoted in an error.
const MAX_QUOTED: usize = 300;

/// Standard base64, padding optional on input (some tools drop it).
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// A username and secret (password, or identity token when username is `<token>`).
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    /// The user name; `<token>` when [`Credential::secret`] is an identity token.
    pub username: String,
    /// The password, or the identity token.
    pub secret: String,
}

impl Credential {
    /// The identity token (an OAuth2 refresh token for the registry's token
    /// server) when the username is `<token>`; `None` for a password.
    pub fn identity_token(&self) -> Option<&str> {
        (self.username == TOKEN_USERNAME).then_some(self.secret.as_str())
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("username", &self.username)
            .field("secret", &format_args!("<redacted>"))
            .finish()
    }
}

/// Why credentials could not be read, stored or erased.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// The config file (or its directory) could not be read or written.
    #[error("cannot access registry credentials file {}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The config file, or a value meant for it, is unusable.
    #[error("registry credentials file {}: {reason}", path.display())]
    Invalid {
        /// The config file.
        path: PathBuf,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// A credential helper is missing or failed.
    #[error("credential helper {helper}: {reason}")]
    Helper {
        /// The program, e.g. `docker-credential-pass`.
        helper: String,
        /// What went wrong.
        reason: String,
    },
}

/// A Docker-compatible registry auth file (`config.json` or `auth.json`)
/// and the credential helpers it names.
#[derive(Debug, Clone)]
pub struct AuthFile {
    path: PathBuf,
    /// Where helpers are looked up: `None` searches `$PATH`; only tests set
    /// a directory, so they need not change the process environment.
    helper_dir: Option<PathBuf>,
}

impl AuthFile {
    /// The file Docker and Podman would use: `$REGISTRY_AUTH_FILE`, else
    /// `$DOCKER_CONFIG/config.json`, else `$HOME/.docker/config.json`
    /// (empty variables count as unset; without `$HOME`, `/` is home).
    pub fn discover() -> Self {
        Self::at(discover_path(|name| std::env::var_os(name)))
    }

    /// The auth file at `path` (which need not exist yet).
    pub fn at(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into(), helper_dir: None }
    }

    /// Looks helpers up in `dir` only, instead of `$PATH`.
    #[cfg(test)]
    fn with_helper_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.helper_dir = Some(dir.into());
        self
    }

    /// The config file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The credential for `registry` (a `host[:port]` like `127.0.0.1:5000`
    /// or `docker.io`): from `credHelpers[registry]`, then `credsStore`,
    /// then the `auths` entry. A missing file means no credential.
    pub fn get(&self, registry: &str) -> Result<Option<Credential>, CredentialError> {
        let host = hostname(registry);
        if host.is_empty() {
            return Ok(None);
        }
        let Some(root) = self.load()? else {
            return Ok(None);
        };
        let server = server_url(&host);
        for helper in self.helpers(&root, registry, &host)? {
            if let Some(credential) = self.helper_get(&helper, &server)? {
                return Ok(Some(credential));
            }
        }
        let Some(auths) = self.object(&root, "auths")? else {
            return Ok(None);
        };
        for key in matching_keys(auths, registry, &host) {
            if let Some(credential) = self.parse_entry(key, &auths[key])? {
                return Ok(Some(credential));
            }
        }
        Ok(None)
    }

    /// Saves `credential` for `registry`: through the credential helper if
    /// one applies, else into `auths` (Docker Hub under
    /// `https://index.docker.io/v1/`), keeping every other key and field;
    /// the file is replaced atomically with mode 0600, its directories
    /// created with mode 0700.
    pub fn store(&self, registry: &str, credential: &Credential) -> Result<(), CredentialError> {
        let host = hostname(registry);
        if host.is_empty() {
            return Err(self.invalid(format!(
                "cannot store credentials for registry {registry:?}: it names no host"
            )));
        }
        if credential.identity_token().is_none() && credential.username.contains(':') {
            return Err(self.invalid(format!(
                "cannot store credentials for {host}: username {:?} contains ':', which \
                 HTTP basic authentication cannot carry",
                credential.username
            )));
        }
        let mut root = self.load()?.unwrap_or_default();
        let server = server_url(&host);
        if let Some(helper) = self.helpers(&root, registry, &host)?.first() {
            return self.helper_store(helper, &server, credential);
        }
        let auths = root.entry("auths").or_insert(Value::Null);
        if auths.is_null() {
            *auths = Value::Object(Map::new());
        }
        let Value::Object(auths) = auths else {
            return Err(self.invalid(auths_not_object()));
        };
        let entry = auths.entry(server).or_insert(Value::Null);
        // Keep what else the entry holds (`email`, …); a malformed entry is replaced.
        let mut fields = match entry.take() {
            Value::Object(fields) => fields,
            _ => Map::new(),
        };
        for field in CREDENTIAL_FIELDS {
            fields.remove(field);
        }
        match credential.identity_token() {
            Some(token) => fields.insert("identitytoken".into(), token.into()),
            None => {
                let pair = format!("{}:{}", credential.username, credential.secret);
                fields.insert("auth".into(), BASE64.encode(pair).into())
            }
        };
        *entry = Value::Object(fields);
        self.save(&root)
    }

    /// Removes the credentials for `registry` wherever [`AuthFile::get`]
    /// would find them: every `auths` key naming that host, and the
    /// applicable helpers. Returns whether anything was removed.
    pub fn erase(&self, registry: &str) -> Result<bool, CredentialError> {
        let host = hostname(registry);
        if host.is_empty() {
            return Ok(false);
        }
        let Some(mut root) = self.load()? else {
            return Ok(false);
        };
        let helpers = self.helpers(&root, registry, &host)?;
        let keys: Vec<String> = match self.object(&root, "auths")? {
            Some(auths) => {
                matching_keys(auths, registry, &host).into_iter().map(str::to_owned).collect()
            }
            None => Vec::new(),
        };
        let mut removed = false;
        if let Some(Value::Object(auths)) = root.get_mut("auths") {
            for key in &keys {
                removed |= auths.remove(key).is_some();
            }
        }
        if removed {
            self.save(&root)?;
        }
        let server = server_url(&host);
        for helper in &helpers {
            removed |= self.helper_erase(helper, &server)?;
        }
        Ok(removed)
    }

    /// The parsed file; `None` if it does not exist.
    fn load(&self) -> Result<Option<Map<String, Value>>, CredentialError> {
        match fs::read(&self.path) {
            Ok(data) => parse_config(&data).map(Some).map_err(|reason| self.invalid(reason)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(CredentialError::Io { path: self.path.clone(), source }),
        }
    }

    /// Writes `root` over the file (through a symlink, like Docker), mode 0600.
    fn save(&self, root: &Map<String, Value>) -> Result<(), CredentialError> {
        let mut data = Vec::new();
        let mut serializer =
            serde_json::Serializer::with_formatter(&mut data, PrettyFormatter::with_indent(b"\t"));
        root.serialize(&mut serializer)
            .map_err(|e| self.invalid(format!("cannot encode the new contents: {e}")))?;
        data.push(b'\n');
        let mut dest = resolve_symlinks(&self.path);
        if dest.parent().is_some_and(|dir| dir.as_os_str().is_empty()) {
            // A bare file name: durable writes need a directory to sync.
            dest = Path::new(".").join(dest);
        }
        write_private(&dest, &data)
    }

    /// The object at `root[field]`; `None` if absent or null.
    fn object<'a>(
        &self,
        root: &'a Map<String, Value>,
        field: &str,
    ) -> Result<Option<&'a Map<String, Value>>, CredentialError> {
        match root.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(map)) => Ok(Some(map)),
            Some(_) if field == "auths" => Err(self.invalid(auths_not_object())),
            Some(_) => Err(self.invalid(format!(
                "{field:?} must be a JSON object like {{\"registry.example.com\": \"helper\"}}"
            ))),
        }
    }

    /// The helpers to ask for `host`, in order: `credHelpers[host]`, then
    /// `credsStore`. Empty names mean "none", as in Docker.
    fn helpers(
        &self,
        root: &Map<String, Value>,
        registry: &str,
        host: &str,
    ) -> Result<Vec<String>, CredentialError> {
        let mut names: Vec<(String, String)> = Vec::new();
        if let Some(map) = self.object(root, "credHelpers")? {
            if let Some(key) = matching_keys(map, registry, host).first() {
                match &map[*key] {
                    Value::String(name) => {
                        names.push((name.clone(), format!("credHelpers[{key:?}]")))
                    }
                    Value::Null => {}
                    _ => {
                        return Err(self.invalid(format!(
                            "credHelpers[{key:?}] must be a helper name like \"pass\" \
                             (for the program docker-credential-pass)"
                        )))
                    }
                }
            }
        }
        match root.get("credsStore") {
            None | Some(Value::Null) => {}
            Some(Value::String(name)) => names.push((name.clone(), "credsStore".into())),
            Some(_) => {
                return Err(self.invalid(
                    "\"credsStore\" must be a helper name like \"pass\" (for the program \
                     docker-credential-pass)"
                        .into(),
                ))
            }
        }
        let mut helpers: Vec<String> = Vec::new();
        for (name, field) in names {
            let name = name.trim();
            if name.is_empty() || helpers.iter().any(|h| h == name) {
                continue;
            }
            if name.contains('/') || name.contains('\0') {
                return Err(self.invalid(format!(
                    "{field} is {name:?}, but a helper name is the part after \
                     \"docker-credential-\" in a program on PATH and has no '/'"
                )));
            }
            helpers.push(name.to_owned());
        }
        Ok(helpers)
    }

    /// Decodes one `auths` entry; `None` if it holds no credential (like
    /// the `{}` Docker leaves when a helper keeps the secret).
    fn parse_entry(&self, key: &str, entry: &Value) -> Result<Option<Credential>, CredentialError> {
        let bad = |what: &str| self.invalid(format!("auths entry {key:?}: {what}"));
        let fields = match entry {
            Value::Object(fields) => fields,
            Value::Null => return Ok(None),
            _ => {
                return Err(bad(
                    "must be a JSON object like {\"auth\": \"<base64 of username:password>\"}",
                ))
            }
        };
        let text = |name: &str| match fields.get(name) {
            None | Some(Value::Null) => Ok(String::new()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(bad(&format!("{name:?} must be a string"))),
        };
        let token = text("identitytoken")?;
        if !token.is_empty() {
            return Ok(Some(Credential { username: TOKEN_USERNAME.into(), secret: token }));
        }
        let auth = text("auth")?;
        let auth = auth.trim();
        let (username, secret) = if auth.is_empty() {
            (text("username")?, text("password")?)
        } else {
            const FIX: &str = "it must be the base64 of \"username:password\" (log in again, \
                               or set it to the output of `printf %s 'user:password' | base64`)";
            let decoded = BASE64
                .decode(auth)
                .map_err(|_| bad(&format!("\"auth\" is not valid base64; {FIX}")))?;
            let decoded = String::from_utf8(decoded)
                .map_err(|_| bad(&format!("\"auth\" does not decode to text; {FIX}")))?;
            let Some((username, secret)) = decoded.split_once(':') else {
                return Err(bad(&format!("\"auth\" decodes to text without a ':'; {FIX}")));
            };
            (username.to_owned(), secret.to_owned())
        };
        if username.is_empty() && secret.is_empty() {
            return Ok(None);
        }
        Ok(Some(Credential { username, secret }))
    }

    /// Asks helper `name` for the credential of `server`.
    fn helper_get(&self, name: &str, server: &str) -> Result<Option<Credential>, CredentialError> {
        #[derive(Deserialize)]
        struct Reply {
            #[serde(rename = "Username", default)]
            username: Option<String>,
            #[serde(rename = "Secret", default)]
            secret: Option<String>,
        }
        let output = self.run_helper(name, "get", server.as_bytes())?;
        if !output.status.success() {
            return if says_not_found(&output) {
                Ok(None)
            } else {
                Err(helper_failed(name, "get", &output))
            };
        }
        // Only the position of a JSON error is reported: the text may hold the secret.
        let reply: Reply = serde_json::from_slice(&output.stdout).map_err(|e| {
            helper_error(
                name,
                format!(
                    "`get` printed no valid credentials JSON (error at line {}, column {}); \
                     expected {{\"ServerURL\": …, \"Username\": …, \"Secret\": …}}",
                    e.line(),
                    e.column()
                ),
            )
        })?;
        let username = reply.username.unwrap_or_default();
        let secret = reply.secret.unwrap_or_default();
        if username.is_empty() && secret.is_empty() {
            return Ok(None);
        }
        Ok(Some(Credential { username, secret }))
    }

    /// Hands `credential` for `server` to helper `name`.
    fn helper_store(
        &self,
        name: &str,
        server: &str,
        credential: &Credential,
    ) -> Result<(), CredentialError> {
        #[derive(Serialize)]
        struct Request<'a> {
            #[serde(rename = "ServerURL")]
            server_url: &'a str,
            #[serde(rename = "Username")]
            username: &'a str,
            #[serde(rename = "Secret")]
            secret: &'a str,
        }
        let request = Request {
            server_url: server,
            username: &credential.username,
            secret: &credential.secret,
        };
        let input = serde_json::to_vec(&request)
            .map_err(|e| helper_error(name, format!("cannot encode the request: {e}")))?;
        let output = self.run_helper(name, "store", &input)?;
        if output.status.success() {
            Ok(())
        } else {
            Err(helper_failed(name, "store", &output))
        }
    }

    /// Asks helper `name` to forget `server`; whether it held anything.
    fn helper_erase(&self, name: &str, server: &str) -> Result<bool, CredentialError> {
        let output = self.run_helper(name, "erase", server.as_bytes())?;
        if output.status.success() {
            Ok(true)
        } else if says_not_found(&output) {
            Ok(false)
        } else {
            Err(helper_failed(name, "erase", &output))
        }
    }

    /// Runs `docker-credential-<name> <action>` with `input` on stdin.
    fn run_helper(
        &self,
        name: &str,
        action: &str,
        input: &[u8],
    ) -> Result<Output, CredentialError> {
        let program = self.find_helper(name)?;
        let mut child = spawn(&program, action)
            .map_err(|e| helper_error(name, format!("cannot run {}: {e}", program.display())))?;
        if let Some(mut stdin) = child.stdin.take() {
            // A helper may exit without reading its input; its status tells.
            match stdin.write_all(input) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {}
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(helper_error(name, format!("cannot write to `{action}`: {e}")));
                }
            }
        }
        child
            .wait_with_output()
            .map_err(|e| helper_error(name, format!("waiting for `{action}`: {e}")))
    }

    /// The helper program's path: the first executable
    /// `docker-credential-<name>` in an absolute `$PATH` directory.
    fn find_helper(&self, name: &str) -> Result<PathBuf, CredentialError> {
        let program = format!("{HELPER_PREFIX}{name}");
        let dirs: Vec<PathBuf> = match &self.helper_dir {
            Some(dir) => vec![dir.clone()],
            None => std::env::var_os("PATH")
                .map(|path| std::env::split_paths(&path).collect())
                .unwrap_or_default(),
        };
        // Relative entries (and the empty one, meaning ".") are skipped, as Go's exec does.
        dirs.iter()
            .filter(|dir| dir.is_absolute())
            .map(|dir| dir.join(&program))
            .find(|path| is_executable(path))
            .ok_or_else(|| {
                helper_error(
                    name,
                    format!(
                        "{program} not found on PATH; install it, or remove {name:?} from \
                         \"credsStore\"/\"credHelpers\" in {}",
                        self.path.display()
                    ),
                )
            })
    }

    fn invalid(&self, reason: String) -> CredentialError {
        CredentialError::Invalid { path: self.path.clone(), reason }
    }
}

/// The auth file path from environment variables read through `var`.
fn discover_path(var: impl Fn(&str) -> Option<OsString>) -> PathBuf {
    let set = |name: &str| var(name).filter(|value| !value.is_empty());
    if let Some(file) = set("REGISTRY_AUTH_FILE") {
        return PathBuf::from(file);
    }
    if let Some(dir) = set("DOCKER_CONFIG") {
        return PathBuf::from(dir).join("config.json");
    }
    let home = set("HOME").map_or_else(|| PathBuf::from("/"), PathBuf::from);
    home.join(".docker").join("config.json")
}

/// Parses the file's bytes; empty (or blank) means an empty config, as in Docker.
fn parse_config(data: &[u8]) -> Result<Map<String, Value>, String> {
    let data = data.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(data);
    if data.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice(data) {
        Ok(Value::Object(root)) => Ok(root),
        Ok(_) => Err("the top level must be a JSON object like {\"auths\": {}}".into()),
        Err(e) => Err(format!(
            "not valid JSON ({e}); fix the syntax (`jq . FILE` shows where), or move the file \
             away and log in again"
        )),
    }
}

fn auths_not_object() -> String {
    "\"auths\" must be a JSON object like {\"registry.example.com\": {\"auth\": \"…\"}}".into()
}

/// Docker's `ConvertToHostname`: `https://host:5000/v1/` → `host:5000`,
/// lowercased, with every Docker Hub alias as `docker.io`.
fn hostname(key: &str) -> String {
    let key = key.trim();
    let rest = key.split_once("://").map_or(key, |(_, rest)| rest);
    let host = rest.split_once('/').map_or(rest, |(host, _)| host).to_ascii_lowercase();
    if DOCKER_HUB_ALIASES.contains(&host.as_str()) {
        DOCKER_HUB.to_owned()
    } else {
        host
    }
}

/// The `auths` key written for `host`, and the server URL helpers get.
fn server_url(host: &str) -> String {
    if host == DOCKER_HUB {
        DOCKER_HUB_KEY.to_owned()
    } else {
        host.to_owned()
    }
}

/// The keys of `map` naming `host`, best first: the key we write, the
/// registry exactly as asked for, then the rest in sorted order.
fn matching_keys<'a>(map: &'a Map<String, Value>, registry: &str, host: &str) -> Vec<&'a str> {
    let server = server_url(host);
    let mut keys: Vec<&str> =
        map.keys().map(String::as_str).filter(|key| hostname(key) == host).collect();
    keys.sort_by_key(|key| (*key != server, *key != registry, *key));
    keys
}

/// Follows symlinks at `path` (not in its directories) so a write replaces
/// the target, keeping a dotfile-managed link intact.
fn resolve_symlinks(path: &Path) -> PathBuf {
    let mut path = path.to_path_buf();
    for _ in 0..40 {
        let Ok(target) = fs::read_link(&path) else { break };
        path = match path.parent() {
            Some(dir) => dir.join(target),
            None => target,
        };
    }
    path
}

/// Writes a secret file atomically: directories 0700, the file 0600 from
/// before its first byte (so it is never readable by others, not even briefly).
fn write_private(dest: &Path, data: &[u8]) -> Result<(), CredentialError> {
    if let Some(dir) = dest.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| CredentialError::Io { path: dir.to_path_buf(), source })?;
    }
    let io_error = |source| CredentialError::Io { path: dest.to_path_buf(), source };
    let mut file = AtomicFile::create(dest).map_err(io_error)?;
    file.file().set_permissions(fs::Permissions::from_mode(0o600)).map_err(io_error)?;
    file.write_all(data).map_err(io_error)?;
    file.commit().map_err(io_error)
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// Spawns the helper with piped stdio. A freshly written executable can
/// briefly be "busy" while another thread's fork still holds it open, so
/// that error is retried.
fn spawn(program: &Path, action: &str) -> io::Result<Child> {
    let mut attempts = 0;
    loop {
        let result = Command::new(program)
            .arg(action)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        match result {
            Err(e) if e.kind() == io::ErrorKind::ExecutableFileBusy && attempts < 50 => {
                attempts += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            result => return result,
        }
    }
}

/// Whether a failed helper said it simply holds nothing for the server.
fn says_not_found(output: &Output) -> bool {
    [&output.stdout, &output.stderr]
        .iter()
        .any(|text| String::from_utf8_lossy(text).to_lowercase().contains(HELPER_NOT_FOUND))
}

fn helper_error(name: &str, reason: String) -> CredentialError {
    CredentialError::Helper { helper: format!("{HELPER_PREFIX}{name}"), reason }
}

/// The error for a helper that exited unsuccessfully, quoting its message.
fn helper_failed(name: &str, action: &str, output: &Output) -> CredentialError {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let message = [stderr.trim(), stdout.trim()].into_iter().find(|m| !m.is_empty());
    let message = match message {
        None => "no message".to_owned(),
        Some(m) if m.chars().count() > MAX_QUOTED => {
            format!("{}…", m.chars().take(MAX_QUOTED).collect::<String>())
        }
        Some(m) => m.to_owned(),
    };
    helper_error(name, format!("`{action}` failed ({}): {message}", output.status))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use tempfile::TempDir;

    fn cred(username: &str, secret: &str) -> Credential {
        Credential { username: username.into(), secret: secret.into() }
    }

    fn b64(text: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(text)
    }

    /// An auth file in a fresh temp dir, holding `json`.
    fn file_with(json: &str) -> (TempDir, AuthFile) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        fs::write(&path, json).unwrap();
        (dir, AuthFile::at(path))
    }

    fn read_json(path: &Path) -> Value {
        serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn invalid_reason(err: CredentialError) -> String {
        match err {
            CredentialError::Invalid { reason, .. } => reason,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    /// A helper keeping one file per server URL next to itself; it records
    /// each action's raw stdin in `stdin-<action>` and appends to `log`.
    const STORE_HELPER: &str = r#"#!/bin/sh
dir=$(dirname "$0")
cat > "$dir/stdin-$1"
input=$(cat "$dir/stdin-$1")
echo "$1" >> "$dir/log"
key() { printf %s "$1" | tr -c 'A-Za-z0-9' _; }
case "$1" in
get)
  f="$dir/cred-$(key "$input")"
  if [ -f "$f" ]; then cat "$f"; else echo "credentials not found in native keychain"; exit 1; fi ;;
store)
  url=$(printf %s "$input" | sed -n 's/.*"ServerURL":"\([^"]*\)".*/\1/p')
  printf %s "$input" > "$dir/cred-$(key "$url")" ;;
erase)
  f="$dir/cred-$(key "$input")"
  if [ -f "$f" ]; then rm "$f"; else echo "credentials not found in native keychain"; exit 1; fi ;;
*) echo "unknown action $1" >&2; exit 2 ;;
esac
"#;

    /// Writes `docker-credential-<name>` with `script` into `dir`.
    fn install_helper(dir: &Path, name: &str, script: &str) {
        let path = dir.join(format!("{HELPER_PREFIX}{name}"));
        fs::write(&path, script).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// A config `json` plus a `bin` dir with the store helper as `name`.
    fn with_helper(json: &str, name: &str) -> (TempDir, AuthFile, PathBuf) {
        let (dir, file) = file_with(json);
        let bin = dir.path().join("bin");
        fs::create_dir(&bin).unwrap();
        install_helper(&bin, name, STORE_HELPER);
        let file = file.with_helper_dir(&bin);
        (dir, file, bin)
    }

    fn log(bin: &Path) -> Vec<String> {
        fs::read_to_string(bin.join("log")).unwrap_or_default().lines().map(str::to_owned).collect()
    }

    // ---- names and discovery ----

    #[test]
    fn hostname_normalises_like_docker() {
        let cases = [
            ("127.0.0.1:5000", "127.0.0.1:5000"),
            ("https://127.0.0.1:5000/v1/", "127.0.0.1:5000"),
            ("http://registry.example.com/", "registry.example.com"),
            ("http://registry.example.com", "registry.example.com"),
            ("registry.example.com/v2/", "registry.example.com"),
            ("quay.io/org/repo", "quay.io"),
            ("Registry.Example.COM", "registry.example.com"),
            ("  ghcr.io  ", "ghcr.io"),
            ("https://index.docker.io/v1/", "docker.io"),
            ("index.docker.io", "docker.io"),
            ("registry-1.docker.io", "docker.io"),
            ("https://registry-1.docker.io/v2/", "docker.io"),
            ("registry.hub.docker.com", "docker.io"),
            ("docker.io", "docker.io"),
            ("docker.io:5000", "docker.io:5000"),
            ("[::1]:5000", "[::1]:5000"),
            ("", ""),
            ("https://", ""),
        ];
        for (input, want) in cases {
            assert_eq!(hostname(input), want, "hostname({input:?})");
        }
        assert_eq!(server_url("docker.io"), DOCKER_HUB_KEY);
        assert_eq!(server_url("host:5000"), "host:5000");
    }

    #[test]
    fn discovery_follows_docker_and_podman_precedence() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| OsString::from(v))
        };
        let all = &[
            ("REGISTRY_AUTH_FILE", "/run/auth.json"),
            ("DOCKER_CONFIG", "/etc/docker-cfg"),
            ("HOME", "/home/u"),
        ];
        assert_eq!(discover_path(env(all)), Path::new("/run/auth.json"));
        let no_auth_file = &[
            ("REGISTRY_AUTH_FILE", ""),
            ("DOCKER_CONFIG", "/etc/docker-cfg"),
            ("HOME", "/home/u"),
        ];
        assert_eq!(discover_path(env(no_auth_file)), Path::new("/etc/docker-cfg/config.json"));
        let home_only = &[("DOCKER_CONFIG", ""), ("HOME", "/home/u")];
        assert_eq!(discover_path(env(home_only)), Path::new("/home/u/.docker/config.json"));
        assert_eq!(discover_path(env(&[])), Path::new("/.docker/config.json"));
        // The real environment yields some non-empty path.
        assert!(!AuthFile::discover().path().as_os_str().is_empty());
    }

    #[test]
    fn debug_redacts_the_secret() {
        let shown = format!("{:?}", cred("alice", "hunter2"));
        assert!(shown.contains("alice"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
        let shown = format!("{:?}", cred(TOKEN_USERNAME, "refresh-xyz"));
        assert!(!shown.contains("refresh-xyz"), "{shown}");
    }

    #[test]
    fn identity_token_only_for_token_username() {
        assert_eq!(cred("<token>", "t").identity_token(), Some("t"));
        assert_eq!(cred("alice", "p").identity_token(), None);
        assert_eq!(cred("<TOKEN>", "p").identity_token(), None);
    }

    // ---- reading ----

    #[test]
    fn missing_file_means_no_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let file = AuthFile::at(dir.path().join("nope/config.json"));
        assert_eq!(file.get("docker.io").unwrap(), None);
        assert!(!file.erase("docker.io").unwrap());
        assert!(!dir.path().join("nope").exists(), "erase must not create anything");
    }

    #[test]
    fn empty_or_blank_file_is_an_empty_config() {
        for text in ["", "  \n\t", "\u{feff}", "{}", "{\"auths\": null}", "{\"auths\": {}}"] {
            let (_dir, file) = file_with(text);
            assert_eq!(file.get("ghcr.io").unwrap(), None, "{text:?}");
        }
    }

    #[test]
    fn auth_field_decodes_user_and_password() {
        let json = format!(r#"{{"auths": {{"127.0.0.1:5000": {{"auth": "{}"}}}}}}"#, b64("bob:pw"));
        let (_dir, file) = file_with(&json);
        assert_eq!(file.get("127.0.0.1:5000").unwrap(), Some(cred("bob", "pw")));
        assert_eq!(file.get("127.0.0.1:5001").unwrap(), None);
        assert_eq!(file.get("127.0.0.1").unwrap(), None);
    }

    #[test]
    fn password_may_contain_colons_and_auth_may_lack_padding() {
        // "u:a:b" → "dTphOmI=" ; unpadded and with surrounding blanks.
        let json = r#"{"auths": {"h": {"auth": " dTphOmI \n"}}}"#;
        let (_dir, file) = file_with(json);
        assert_eq!(file.get("h").unwrap(), Some(cred("u", "a:b")));
        let json = format!(r#"{{"auths": {{"h": {{"auth": "{}"}}}}}}"#, b64("u:"));
        let (_dir, file) = file_with(&json);
        assert_eq!(file.get("h").unwrap(), Some(cred("u", "")));
    }

    #[test]
    fn username_and_password_fields_are_used_without_auth() {
        let json = r#"{"auths": {"h:1": {"username": "carol", "password": "s3cret"}}}"#;
        let (_dir, file) = file_with(json);
        assert_eq!(file.get("h:1").unwrap(), Some(cred("carol", "s3cret")));
    }

    #[test]
    fn auth_wins_over_username_and_password_fields() {
        let json = format!(
            r#"{{"auths": {{"h": {{"auth": "{}", "username": "x", "password": "y"}}}}}}"#,
            b64("real:pw")
        );
        let (_dir, file) = file_with(&json);
        assert_eq!(file.get("h").unwrap(), Some(cred("real", "pw")));
    }

    #[test]
    fn identity_token_wins_and_is_marked() {
        let json = format!(
            r#"{{"auths": {{"h": {{"auth": "{}", "identitytoken": "refresh"}}}}}}"#,
            b64("user:")
        );
        let (_dir, file) = file_with(&json);
        let got = file.get("h").unwrap().unwrap();
        assert_eq!(got, cred(TOKEN_USERNAME, "refresh"));
        assert_eq!(got.identity_token(), Some("refresh"));
    }

    #[test]
    fn keys_with_scheme_and_path_match_the_host() {
        for key in ["https://h.example:5000/v1/", "http://h.example:5000", "h.example:5000/v2/"] {
            let json = format!(r#"{{"auths": {{"{key}": {{"auth": "{}"}}}}}}"#, b64("u:p"));
            let (_dir, file) = file_with(&json);
            assert_eq!(file.get("h.example:5000").unwrap(), Some(cred("u", "p")), "{key}");
            assert_eq!(file.get("H.EXAMPLE:5000").unwrap(), Some(cred("u", "p")), "{key}");
            assert_eq!(file.get("h.example").unwrap(), None, "{key}: port must match");
        }
    }

    #[test]
    fn docker_hub_aliases_all_match() {
        for key in [DOCKER_HUB_KEY, "docker.io", "index.docker.io", "https://registry-1.docker.io/"]
        {
            let json = format!(r#"{{"auths": {{"{key}": {{"auth": "{}"}}}}}}"#, b64("hub:pw"));
            let (_dir, file) = file_with(&json);
            for registry in ["docker.io", "index.docker.io", "registry-1.docker.io"] {
                assert_eq!(
                    file.get(registry).unwrap(),
                    Some(cred("hub", "pw")),
                    "key {key}, registry {registry}"
                );
            }
            assert_eq!(file.get("quay.io").unwrap(), None);
        }
    }

    #[test]
    fn canonical_key_wins_over_aliases() {
        let json = format!(
            r#"{{"auths": {{
                "docker.io": {{"auth": "{}"}},
                "https://index.docker.io/v1/": {{"auth": "{}"}},
                "index.docker.io": {{"auth": "{}"}}
            }}}}"#,
            b64("podman:a"),
            b64("docker:b"),
            b64("other:c")
        );
        let (_dir, file) = file_with(&json);
        assert_eq!(file.get("docker.io").unwrap(), Some(cred("docker", "b")));
        // The exact key asked for comes next.
        let json = format!(
            r#"{{"auths": {{"http://h:1": {{"auth": "{}"}}, "h:1": {{"auth": "{}"}}}}}}"#,
            b64("old:a"),
            b64("new:b")
        );
        let (_dir, file) = file_with(&json);
        assert_eq!(file.get("h:1").unwrap(), Some(cred("new", "b")));
    }

    #[test]
    fn empty_entries_are_skipped() {
        let json = format!(
            r#"{{"auths": {{"h:1": {{}}, "https://h:1/": {{"auth": "{}"}}, "x": null}}}}"#,
            b64("u:p")
        );
        let (_dir, file) = file_with(&json);
        assert_eq!(file.get("h:1").unwrap(), Some(cred("u", "p")));
        assert_eq!(file.get("x").unwrap(), None);
        let (_dir, file) = file_with(r#"{"auths": {"h": {"email": "a@b", "auth": ""}}}"#);
        assert_eq!(file.get("h").unwrap(), None);
        let (_dir, file) =
            file_with(&format!(r#"{{"auths": {{"h": {{"auth": "{}"}}}}}}"#, b64(":")));
        assert_eq!(file.get("h").unwrap(), None);
    }

    #[test]
    fn bad_json_names_the_file_and_the_fix() {
        let (_dir, file) = file_with("{\"auths\": {\n  \"h\": {\"auth\": \"x\"},\n}");
        let err = file.get("h").unwrap_err();
        let shown = err.to_string();
        assert!(shown.contains(&file.path().display().to_string()), "{shown}");
        assert!(shown.contains("not valid JSON"), "{shown}");
        assert!(shown.contains("line 3"), "{shown}");
        assert!(matches!(err, CredentialError::Invalid { .. }));
        // Writes refuse too rather than clobber the file.
        assert!(file.store("h", &cred("u", "p")).is_err());
        assert!(file.erase("h").is_err());
    }

    #[test]
    fn wrong_shapes_are_invalid() {
        let cases = [
            ("[]", "top level"),
            ("\"auths\"", "top level"),
            (r#"{"auths": []}"#, "\"auths\" must be a JSON object"),
            (r#"{"auths": {"h": "dTpw"}}"#, "auths entry \"h\""),
            (r#"{"auths": {"h": {"auth": 5}}}"#, "\"auth\" must be a string"),
            (r#"{"auths": {"h": {"username": ["u"]}}}"#, "\"username\" must be a string"),
            (r#"{"credHelpers": ["x"]}"#, "\"credHelpers\" must be a JSON object"),
            (r#"{"credHelpers": {"h": 1}}"#, "credHelpers[\"h\"]"),
            (r#"{"credsStore": true}"#, "\"credsStore\" must be"),
            (r#"{"credsStore": "../evil"}"#, "has no '/'"),
        ];
        for (json, want) in cases {
            let (_dir, file) = file_with(json);
            let reason = invalid_reason(file.get("h").unwrap_err());
            assert!(reason.contains(want), "{json}: {reason}");
        }
    }

    #[test]
    fn bad_auth_values_say_what_to_fix_without_leaking() {
        let cases = [
            ("not base64!!".to_string(), "not valid base64"),
            (base64::engine::general_purpose::STANDARD.encode([0xff, 0xfe, b':']), "text"),
            (b64("nocolonsecret"), "without a ':'"),
        ];
        for (auth, want) in cases {
            let json = format!(r#"{{"auths": {{"https://h:1/v1/": {{"auth": "{auth}"}}}}}}"#);
            let (_dir, file) = file_with(&json);
            let reason = invalid_reason(file.get("h:1").unwrap_err());
            assert!(reason.contains(want), "{reason}");
            assert!(reason.contains("https://h:1/v1/"), "names the entry: {reason}");
            assert!(reason.contains("username:password"), "says the format: {reason}");
            assert!(!reason.contains(&auth) && !reason.contains("nocolonsecret"), "{reason}");
        }
    }

    #[test]
    fn a_broken_entry_for_another_registry_does_not_matter() {
        let json = format!(
            r#"{{"auths": {{"other": {{"auth": "!!"}}, "h": {{"auth": "{}"}}}}, "x": [1]}}"#,
            b64("u:p")
        );
        let (_dir, file) = file_with(&json);
        assert_eq!(file.get("h").unwrap(), Some(cred("u", "p")));
    }

    #[test]
    fn empty_registry_finds_nothing() {
        let (_dir, file) = file_with(r#"{"auths": {"": {"username": "u", "password": "p"}}}"#);
        assert_eq!(file.get("").unwrap(), None);
        assert!(!file.erase("").unwrap());
        assert!(matches!(file.store("", &cred("u", "p")), Err(CredentialError::Invalid { .. })));
    }

    #[test]
    fn unreadable_path_is_an_io_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = AuthFile::at(dir.path());
        let err = file.get("h").unwrap_err();
        assert!(matches!(err, CredentialError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains(&dir.path().display().to_string()));
    }

    // ---- writing ----

    #[test]
    fn store_creates_private_file_and_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/config.json");
        let file = AuthFile::at(&path);
        file.store("127.0.0.1:5000", &cred("bob", "pw")).unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&dir.path().join("a")), 0o700);
        assert_eq!(mode(&dir.path().join("a/b")), 0o700);
        assert_eq!(
            read_json(&path),
            serde_json::json!({"auths": {"127.0.0.1:5000": {"auth": b64("bob:pw")}}})
        );
        assert_eq!(file.get("127.0.0.1:5000").unwrap(), Some(cred("bob", "pw")));
        // Only the file itself is left behind: no temp files.
        assert_eq!(fs::read_dir(dir.path().join("a/b")).unwrap().count(), 1);
    }

    #[test]
    fn store_preserves_everything_else_and_tightens_mode() {
        let json = format!(
            r#"{{
                "auths": {{
                    "other.io": {{"auth": "{}", "email": "o@x"}},
                    "h:1": {{"auth": "{}", "email": "me@x", "identitytoken": "old",
                             "registrytoken": "old", "username": "old"}}
                }},
                "credHelpers": {{"gcr.io": "gcloud"}},
                "HttpHeaders": {{"User-Agent": "x"}},
                "psFormat": "table {{{{.ID}}}}",
                "experimental": "enabled",
                "proxies": {{"default": {{"httpProxy": "http://p:3128"}}}}
            }}"#,
            b64("o:pw"),
            b64("old:pw")
        );
        let (_dir, file) = file_with(&json);
        fs::set_permissions(file.path(), fs::Permissions::from_mode(0o644)).unwrap();
        let before = read_json(file.path());
        file.store("h:1", &cred("new", "pw2")).unwrap();
        let after = read_json(file.path());
        assert_eq!(mode(file.path()), 0o600);
        let mut want = before.clone();
        want["auths"]["h:1"] = serde_json::json!({"auth": b64("new:pw2"), "email": "me@x"});
        assert_eq!(after, want);
        assert_eq!(file.get("h:1").unwrap(), Some(cred("new", "pw2")));
        assert_eq!(file.get("other.io").unwrap(), Some(cred("o", "pw")));
    }

    #[test]
    fn store_docker_hub_under_the_docker_key() {
        let (_dir, file) = file_with(r#"{"auths": {}}"#);
        file.store("registry-1.docker.io", &cred("hub", "pw")).unwrap();
        let json = read_json(file.path());
        assert_eq!(json["auths"][DOCKER_HUB_KEY]["auth"], b64("hub:pw"));
        assert_eq!(json["auths"].as_object().unwrap().len(), 1);
        assert_eq!(file.get("docker.io").unwrap(), Some(cred("hub", "pw")));
    }

    #[test]
    fn store_normalises_a_url_registry() {
        let (_dir, file) = file_with("");
        file.store("https://Reg.Example:5000/v2/", &cred("u", "p")).unwrap();
        let json = read_json(file.path());
        assert!(json["auths"]["reg.example:5000"].is_object(), "{json}");
    }

    #[test]
    fn store_overrides_an_alias_key() {
        let json = format!(r#"{{"auths": {{"http://h:1/": {{"auth": "{}"}}}}}}"#, b64("old:a"));
        let (_dir, file) = file_with(&json);
        file.store("h:1", &cred("new", "b")).unwrap();
        assert_eq!(file.get("h:1").unwrap(), Some(cred("new", "b")));
    }

    #[test]
    fn store_identity_token_round_trips() {
        let (_dir, file) = file_with("{}");
        file.store("h", &cred(TOKEN_USERNAME, "refresh")).unwrap();
        let json = read_json(file.path());
        assert_eq!(json["auths"]["h"], serde_json::json!({"identitytoken": "refresh"}));
        assert_eq!(file.get("h").unwrap().unwrap().identity_token(), Some("refresh"));
        // A password login replaces the token.
        file.store("h", &cred("u", "p")).unwrap();
        assert_eq!(read_json(file.path())["auths"]["h"], serde_json::json!({"auth": b64("u:p")}));
    }

    #[test]
    fn store_handles_odd_secrets() {
        let (_dir, file) = file_with("");
        for secret in ["", "a:b:c", "ünïcødé \"quoted\" \\ \n", &"x".repeat(10_000)] {
            file.store("h", &cred("u", secret)).unwrap();
            assert_eq!(file.get("h").unwrap(), Some(cred("u", secret)));
        }
    }

    #[test]
    fn store_rejects_colon_in_username() {
        let (_dir, file) = file_with("{}");
        let reason = invalid_reason(file.store("h", &cred("a:b", "p")).unwrap_err());
        assert!(reason.contains("':'"), "{reason}");
        assert_eq!(read_json(file.path()), serde_json::json!({}), "file untouched");
    }

    #[test]
    fn store_refuses_to_clobber_a_non_object_auths() {
        let (_dir, file) = file_with(r#"{"auths": "oops"}"#);
        assert!(file.store("h", &cred("u", "p")).is_err());
        assert_eq!(fs::read_to_string(file.path()).unwrap(), r#"{"auths": "oops"}"#);
    }

    #[test]
    fn store_replaces_a_malformed_entry() {
        let (_dir, file) = file_with(r#"{"auths": {"h": "junk"}}"#);
        file.store("h", &cred("u", "p")).unwrap();
        assert_eq!(file.get("h").unwrap(), Some(cred("u", "p")));
    }

    #[test]
    fn store_writes_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("dotfiles/docker.json");
        fs::create_dir(dir.path().join("dotfiles")).unwrap();
        fs::write(&real, r#"{"credsStore": ""}"#).unwrap();
        let link = dir.path().join("config.json");
        symlink("dotfiles/docker.json", &link).unwrap();
        let file = AuthFile::at(&link);
        file.store("h", &cred("u", "p")).unwrap();
        assert!(fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert_eq!(read_json(&real)["auths"]["h"]["auth"], b64("u:p"));
        assert_eq!(read_json(&real)["credsStore"], "");
        assert_eq!(mode(&real), 0o600);
    }

    #[test]
    fn erase_removes_every_alias_and_reports_it() {
        let json = format!(
            r#"{{"auths": {{
                "https://index.docker.io/v1/": {{"auth": "{a}"}},
                "docker.io": {{"auth": "{a}"}},
                "registry-1.docker.io/v2/": {{}},
                "quay.io": {{"auth": "{a}"}}
            }}, "keep": 1}}"#,
            a = b64("u:p")
        );
        let (_dir, file) = file_with(&json);
        assert!(file.erase("index.docker.io").unwrap());
        assert_eq!(file.get("docker.io").unwrap(), None);
        let json = read_json(file.path());
        assert_eq!(json["auths"].as_object().unwrap().keys().collect::<Vec<_>>(), ["quay.io"]);
        assert_eq!(json["keep"], 1);
        assert_eq!(mode(file.path()), 0o600);
        assert!(!file.erase("docker.io").unwrap(), "nothing left to erase");
        assert!(file.erase("quay.io").unwrap());
        assert_eq!(read_json(file.path())["auths"], serde_json::json!({}));
    }

    #[test]
    fn erase_without_a_match_leaves_the_file_alone() {
        let text = "{ \"auths\": {\"a\": {}} , \"odd\":   true }";
        let (_dir, file) = file_with(text);
        assert!(!file.erase("b").unwrap());
        assert_eq!(fs::read_to_string(file.path()).unwrap(), text);
    }

    // ---- credential helpers ----

    #[test]
    fn cred_helper_round_trip() {
        let (_dir, file, bin) =
            with_helper(r#"{"credHelpers": {"h.example:5000": "test"}}"#, "test");
        let original = fs::read(file.path()).unwrap();
        assert_eq!(file.get("h.example:5000").unwrap(), None);
        assert_eq!(fs::read(bin.join("stdin-get")).unwrap(), b"h.example:5000");

        file.store("h.example:5000", &cred("alice", "pw:1")).unwrap();
        let request: Value =
            serde_json::from_slice(&fs::read(bin.join("stdin-store")).unwrap()).unwrap();
        let want = serde_json::json!({
            "ServerURL": "h.example:5000",
            "Username": "alice",
            "Secret": "pw:1"
        });
        assert_eq!(request, want);
        assert_eq!(fs::read(file.path()).unwrap(), original, "the secret stays out of the file");
        assert_eq!(file.get("h.example:5000").unwrap(), Some(cred("alice", "pw:1")));

        assert!(file.erase("h.example:5000").unwrap());
        assert_eq!(fs::read(bin.join("stdin-erase")).unwrap(), b"h.example:5000");
        assert_eq!(file.get("h.example:5000").unwrap(), None);
        assert!(!file.erase("h.example:5000").unwrap());
        assert_eq!(log(&bin), ["get", "store", "get", "erase", "get", "erase"]);
    }

    #[test]
    fn creds_store_serves_docker_hub_with_dockers_server_url() {
        let (_dir, file, bin) = with_helper(r#"{"credsStore": "desk"}"#, "desk");
        file.store("docker.io", &cred("hub", "pw")).unwrap();
        assert_eq!(file.get("registry-1.docker.io").unwrap(), Some(cred("hub", "pw")));
        assert_eq!(fs::read(bin.join("stdin-get")).unwrap(), DOCKER_HUB_KEY.as_bytes());
        assert!(read_json(file.path()).get("auths").is_none());
    }

    #[test]
    fn cred_helper_key_may_be_a_url_and_only_applies_to_its_host() {
        let json = format!(
            r#"{{"credHelpers": {{"https://h:1/v1/": "test"}},
                "auths": {{"other": {{"auth": "{}"}}}}}}"#,
            b64("o:p")
        );
        let (_dir, file, bin) = with_helper(&json, "test");
        file.store("h:1", &cred("u", "p")).unwrap();
        assert_eq!(file.get("h:1").unwrap(), Some(cred("u", "p")));
        assert_eq!(file.get("other").unwrap(), Some(cred("o", "p")));
        assert_eq!(log(&bin), ["store", "get"], "other is not the helper's business");
    }

    #[test]
    fn cred_helper_then_creds_store_then_file() {
        let json = format!(
            r#"{{"credHelpers": {{"h": "first"}}, "credsStore": "second",
                "auths": {{"h": {{"auth": "{}"}}}}}}"#,
            b64("file:pw")
        );
        let (dir, file, bin) = with_helper(&json, "first");
        install_helper(&bin, "second", STORE_HELPER);
        // Neither helper knows h: the file entry answers.
        assert_eq!(file.get("h").unwrap(), Some(cred("file", "pw")));
        assert_eq!(log(&bin), ["get", "get"]);
        // A login goes to the first helper only, and is found there.
        file.store("h", &cred("helper", "pw")).unwrap();
        assert_eq!(file.get("h").unwrap(), Some(cred("helper", "pw")));
        // Logout clears the helpers and the file entry.
        assert!(file.erase("h").unwrap());
        assert_eq!(file.get("h").unwrap(), None);
        assert!(read_json(file.path())["auths"].as_object().unwrap().is_empty());
        drop(dir);
    }

    #[test]
    fn empty_helper_names_mean_the_file() {
        let (_dir, file) =
            file_with(r#"{"credsStore": "", "credHelpers": {"h": ""}, "auths": {}}"#);
        let file = file.with_helper_dir("/nonexistent");
        file.store("h", &cred("u", "p")).unwrap();
        assert_eq!(file.get("h").unwrap(), Some(cred("u", "p")));
        assert_eq!(read_json(file.path())["auths"]["h"]["auth"], b64("u:p"));
    }

    #[test]
    fn missing_helper_says_so() {
        let (dir, file) = file_with(r#"{"credsStore": "nope"}"#);
        let file = file.with_helper_dir(dir.path());
        for result in [
            file.get("h").map(|_| ()),
            file.store("h", &cred("u", "p")),
            file.erase("h").map(|_| ()),
        ] {
            match result.unwrap_err() {
                CredentialError::Helper { helper, reason } => {
                    assert_eq!(helper, "docker-credential-nope");
                    assert!(
                        reason.contains("docker-credential-nope not found on PATH"),
                        "{reason}"
                    );
                    assert!(reason.contains("credsStore"), "{reason}");
                }
                other => panic!("{other:?}"),
            }
        }
        // A file of that name that is not executable does not count.
        install_helper(dir.path(), "nope", STORE_HELPER);
        fs::set_permissions(
            dir.path().join("docker-credential-nope"),
            fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        assert!(matches!(file.get("h"), Err(CredentialError::Helper { .. })));
    }

    #[test]
    fn find_helper_searches_path_skipping_relative_dirs() {
        // The real PATH: a name nobody installs is reported missing.
        let file = AuthFile::at("/nonexistent/config.json");
        let err = file.find_helper("rmount-test-surely-absent").unwrap_err();
        assert!(err.to_string().contains("not found on PATH"), "{err}");
        let file = AuthFile::at("/x").with_helper_dir("relative/bin");
        assert!(file.find_helper("anything").is_err());
    }

    #[test]
    fn helper_failure_is_reported_with_its_message() {
        let (_dir, file, bin) = with_helper(r#"{"credsStore": "bad"}"#, "unused");
        install_helper(
            &bin,
            "bad",
            "#!/bin/sh\ncat >/dev/null\necho 'keychain locked' >&2\nexit 3\n",
        );
        for (result, action) in [
            (file.get("h").map(|_| ()), "get"),
            (file.store("h", &cred("u", "p")), "store"),
            (file.erase("h").map(|_| ()), "erase"),
        ] {
            let err = result.unwrap_err();
            let shown = err.to_string();
            assert!(matches!(err, CredentialError::Helper { .. }), "{shown}");
            assert!(shown.contains("docker-credential-bad"), "{shown}");
            assert!(shown.contains(&format!("`{action}` failed")), "{shown}");
            assert!(shown.contains("keychain locked"), "{shown}");
            assert!(shown.contains('3'), "exit status: {shown}");
        }
    }

    #[test]
    fn helper_that_ignores_stdin_and_says_nothing() {
        let (_dir, file, bin) = with_helper(r#"{"credsStore": "quiet"}"#, "unused");
        install_helper(&bin, "quiet", "#!/bin/sh\nexit 1\n");
        let shown = file.get("h").unwrap_err().to_string();
        assert!(shown.contains("no message"), "{shown}");
    }

    #[test]
    fn helper_long_output_is_truncated() {
        let (_dir, file, bin) = with_helper(r#"{"credsStore": "loud"}"#, "unused");
        let script = "#!/bin/sh\ni=0\n\
                      while [ $i -lt 200 ]; do printf 'é-long-'; i=$((i+1)); done\n\
                      exit 1\n";
        install_helper(&bin, "loud", script);
        let shown = file.get("h").unwrap_err().to_string();
        assert!(shown.ends_with('…'), "{shown}");
        assert!(shown.chars().count() < MAX_QUOTED + 200, "{shown}");
    }

    #[test]
    fn helper_identity_token_and_empty_answers() {
        let (_dir, file, bin) = with_helper(r#"{"credsStore": "tok"}"#, "unused");
        install_helper(
            &bin,
            "tok",
            r#"#!/bin/sh
cat >/dev/null
echo '{"ServerURL":"h","Username":"<token>","Secret":"rt"}'
"#,
        );
        let got = file.get("h").unwrap().unwrap();
        assert_eq!(got.identity_token(), Some("rt"));

        // Empty username and secret (or nulls) mean "nothing here".
        for reply in [
            r#"{"ServerURL":"h","Username":"","Secret":""}"#,
            r#"{"Username":null,"Secret":null}"#,
            "{}",
        ] {
            install_helper(&bin, "tok", &format!("#!/bin/sh\ncat >/dev/null\necho '{reply}'\n"));
            assert_eq!(file.get("h").unwrap(), None, "{reply}");
        }
    }

    #[test]
    fn helper_garbage_output_is_an_error_without_the_text() {
        let (_dir, file, bin) = with_helper(r#"{"credsStore": "junk"}"#, "unused");
        for reply in ["hunter2-not-json", "{\"Username\": \"u\", \"Secret\": 42}", ""] {
            install_helper(&bin, "junk", &format!("#!/bin/sh\ncat >/dev/null\necho '{reply}'\n"));
            let shown = file.get("h").unwrap_err().to_string();
            assert!(shown.contains("no valid credentials JSON"), "{shown}");
            assert!(!shown.contains("hunter2"), "{shown}");
        }
    }

    #[test]
    fn not_found_detection_is_lenient() {
        let (_dir, file, bin) = with_helper(r#"{"credsStore": "nf"}"#, "unused");
        for script in [
            "#!/bin/sh\necho 'Credentials not found'\nexit 1\n",
            "#!/bin/sh\necho 'credentials not found in native keychain' >&2\nexit 1\n",
        ] {
            install_helper(&bin, "nf", script);
            assert_eq!(file.get("h").unwrap(), None, "{script}");
            assert!(!file.erase("h").unwrap(), "{script}");
        }
    }
}
