//! Registry harness: a real registry (Debian's `docker-registry`, the CNCF
//! distribution v2.8) on a free loopback port, plain or behind htpasswd or
//! token auth; a Docker token server signing RS256 JWTs with `openssl`; a
//! fault-injecting HTTP proxy; `skopeo`/`umoci` helpers as the independent
//! client; multi-platform OCI layouts; and an rmount runner that never sees
//! the host's credentials.

use super::{
    compress, describe, layer_tar, rmount_command, run_ok, sha256_hex, Compress, Item, Meta,
};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A port nobody listens on right now (another process may take it before
/// we do; `Registry` retries on a new port when its child exits early).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

// ---------------------------------------------------------------- HTTP bits

/// An HTTP message head: the start line, the header fields and the raw bytes.
#[derive(Debug)]
pub struct Head {
    pub line: String,
    pub headers: Vec<(String, String)>,
    pub raw: Vec<u8>,
}

impl Head {
    /// The first header called `name` (case-insensitive).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn content_length(&self) -> Option<usize> {
        self.get("content-length").and_then(|v| v.trim().parse().ok())
    }

    fn chunked(&self) -> bool {
        self.get("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    }
}

/// Reads a message head up to the blank line; `None` at a clean EOF or
/// when the peer does not speak plain HTTP (a client trying TLS first, as
/// skopeo does with `--tls-verify=false`, then gets a closed connection at
/// once instead of waiting for its handshake timeout).
pub fn read_head(r: &mut impl BufRead) -> io::Result<Option<Head>> {
    if r.fill_buf()?.first().is_some_and(|b| !b.is_ascii_alphabetic()) {
        return Ok(None);
    }
    let mut raw = Vec::new();
    let mut lines = Vec::new();
    loop {
        let mut line = Vec::new();
        if r.read_until(b'\n', &mut line)? == 0 {
            if raw.is_empty() {
                return Ok(None);
            }
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "EOF inside a head"));
        }
        raw.extend_from_slice(&line);
        let text = String::from_utf8_lossy(&line).trim_end_matches(['\r', '\n']).to_string();
        if text.is_empty() {
            break;
        }
        lines.push(text);
        if raw.len() > 256 * 1024 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "head too long"));
        }
    }
    let line = lines.first().cloned().unwrap_or_default();
    let headers = lines
        .iter()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok(Some(Head { line, headers, raw }))
}

/// Reads a request body as it was sent (Content-Length bytes, or the raw
/// chunked encoding up to and including its trailer).
fn read_body(r: &mut impl BufRead, head: &Head) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    if head.chunked() {
        loop {
            let mut size_line = Vec::new();
            r.read_until(b'\n', &mut size_line)?;
            body.extend_from_slice(&size_line);
            let text = String::from_utf8_lossy(&size_line);
            let hex = text.trim().split(';').next().unwrap_or("").to_string();
            let size = usize::from_str_radix(&hex, 16)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
            if size == 0 {
                loop {
                    let mut trailer = Vec::new();
                    if r.read_until(b'\n', &mut trailer)? == 0 {
                        return Ok(body);
                    }
                    body.extend_from_slice(&trailer);
                    if trailer == b"\r\n" || trailer == b"\n" {
                        return Ok(body);
                    }
                }
            }
            let start = body.len();
            body.resize(start + size + 2, 0);
            r.read_exact(&mut body[start..])?;
        }
    } else if let Some(n) = head.content_length() {
        body.resize(n, 0);
        r.read_exact(&mut body)?;
    }
    Ok(body)
}

/// A minimal HTTP/1.1 exchange (`Connection: close`, body read to EOF):
/// returns the status, the response head and the body.
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> io::Result<(u16, Head, Vec<u8>)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req += &format!("{k}: {v}\r\n");
    }
    req += "\r\n";
    s.write_all(req.as_bytes())?;
    let mut r = BufReader::new(s);
    let head = read_head(&mut r)?
        .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "no response"))?;
    let status = status_of(&head.line);
    let mut body = Vec::new();
    if method != "HEAD" {
        r.read_to_end(&mut body)?;
    }
    Ok((status, head, body))
}

fn status_of(line: &str) -> u16 {
    line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        401 => "Unauthorized",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

fn respond(s: &mut TcpStream, code: u16, extra: &[(&str, String)], body: &[u8]) -> io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {code} {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        reason(code),
        body.len()
    );
    for (k, v) in extra {
        head += &format!("{k}: {v}\r\n");
    }
    head += "\r\n";
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    s.flush()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `a=1&b=2&b=3` as decoded pairs, repeats kept.
fn form_pairs(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// A listener thread that hands each connection to `handle` on its own
/// thread until `stop` is set (Drop of the owner sets it and pokes accept).
fn serve_forever(
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    handle: impl Fn(TcpStream) + Send + Sync + 'static,
) {
    let handle = Arc::new(handle);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let Ok(conn) = conn else { continue };
            let handle = handle.clone();
            std::thread::spawn(move || handle(conn));
        }
    });
}

fn stop_server(stop: &AtomicBool, addr: &str) {
    stop.store(true, Ordering::SeqCst);
    let _ = TcpStream::connect(addr);
}

// ---------------------------------------------------------------- registry

/// A `docker-registry serve` child on `127.0.0.1:PORT` with its own config
/// and storage in a temp dir; killed on drop. `stop` and `restart` take it
/// down and bring it back on the same port with the same storage.
pub struct Registry {
    /// `None` while stopped.
    child: Option<Child>,
    addr: String,
    dir: tempfile::TempDir,
}

impl Registry {
    /// No authentication.
    pub fn plain() -> Registry {
        Registry::start(String::new(), tempfile_dir())
    }

    /// HTTP basic auth against an htpasswd file (bcrypt, made by `htpasswd -Bbn`).
    pub fn htpasswd(user: &str, pass: &str) -> Registry {
        let dir = tempfile_dir();
        let line = run_ok(Command::new("htpasswd").args(["-Bbn", user, pass]));
        let file = dir.path().join("htpasswd");
        std::fs::write(&file, line.trim_end().to_string() + "\n").unwrap();
        let auth =
            format!("auth:\n  htpasswd:\n    realm: rmount-test\n    path: {}\n", file.display());
        Registry::start(auth, dir)
    }

    /// Bearer tokens from `tokens` (the registry trusts its certificate).
    pub fn token(tokens: &TokenServer) -> Registry {
        let auth = format!(
            "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
            tokens.realm(),
            tokens.service(),
            tokens.issuer(),
            tokens.cert().display()
        );
        Registry::start(auth, tempfile_dir())
    }

    fn start(auth: String, dir: tempfile::TempDir) -> Registry {
        let storage = dir.path().join("storage");
        std::fs::create_dir_all(&storage).unwrap();
        let mut last_log = String::new();
        for _ in 0..5 {
            let addr = format!("127.0.0.1:{}", free_port());
            let config = format!(
                "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                 http:\n  addr: {addr}\n  secret: rmount-test-secret\n{auth}",
                storage.display()
            );
            let config_path = dir.path().join("config.yml");
            std::fs::write(&config_path, config).unwrap();
            let log_path = dir.path().join("registry.log");
            std::fs::File::create(&log_path).unwrap();
            let mut child = spawn_registry(dir.path());
            if wait_ready(&mut child, &addr) {
                return Registry { child: Some(child), addr, dir };
            }
            let _ = child.kill();
            let _ = child.wait();
            last_log = std::fs::read_to_string(&log_path).unwrap_or_default();
        }
        panic!("docker-registry did not start:\n{last_log}");
    }

    /// Kills the registry (SIGKILL, as a crash): connections in flight are
    /// cut, and nothing listens on its port until `restart`.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the registry again on the same port with the same config and
    /// storage (a no-op while it runs). Retries for a few seconds in case
    /// the port is briefly not free; panics if it never answers.
    pub fn restart(&mut self) {
        if self.child.is_some() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut child = spawn_registry(self.dir.path());
            if wait_ready(&mut child, &self.addr) {
                self.child = Some(child);
                return;
            }
            let _ = child.kill();
            let _ = child.wait();
            if Instant::now() > deadline {
                panic!("docker-registry did not restart on {}:\n{}", self.addr, self.log());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Is the registry process running?
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// What the registry logged (warnings and errors).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// The registry's storage root.
    pub fn storage(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// The file holding a blob's bytes in the registry's storage:
    /// `docker/registry/v2/blobs/sha256/<2 hex>/<hex>/data`.
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.storage()
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// XORs the byte at `offset` of a stored blob with `mask` (in place,
    /// same size: the registry serves the altered bytes under the old
    /// digest, as a bit flip on its disk would). Calling it again with the
    /// same mask restores the blob. Returns the byte's old value.
    pub fn flip_blob_byte(&self, digest: &str, offset: u64, mask: u8) -> u8 {
        use std::os::unix::fs::FileExt;
        let path = self.blob_file(digest);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("blob {digest} at {}: {e}", path.display()));
        let mut byte = [0u8];
        file.read_exact_at(&mut byte, offset).unwrap();
        file.write_all_at(&[byte[0] ^ mask], offset).unwrap();
        file.sync_all().unwrap();
        byte[0]
    }
}

/// Spawns `docker-registry serve DIR/config.yml`, appending to DIR/registry.log.
fn spawn_registry(dir: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("registry.log"))
        .unwrap();
    Command::new("docker-registry")
        .arg("serve")
        .arg(dir.join("config.yml"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawn docker-registry")
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits until `GET /v2/` answers with any status; false if the child
/// exited (its port was taken) or nothing answered for 15 s.
fn wait_ready(child: &mut Child, addr: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        if http(addr, "GET", "/v2/", &[]).is_ok_and(|(status, _, _)| status != 0) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn tempfile_dir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("rmount-registry-").tempdir().unwrap()
}

// ------------------------------------------------------------ token server

struct TokenConfig {
    key: PathBuf,
    /// base64 (standard) DER of the self-signed certificate, for `x5c`.
    cert_der_b64: String,
    lifetime: u64,
    credentials: Option<(String, String)>,
    service: String,
    issuer: String,
}

/// A Docker token server (the `/token` endpoint of the distribution token
/// protocol) on a loopback port: `GET /token?service=S&scope=…` (scope may
/// repeat) or the OAuth2 `POST /token` form, with optional Basic auth.
/// Tokens are RS256 JWTs signed by `openssl dgst -sha256 -sign` with a key
/// and self-signed certificate made at start; the certificate travels in
/// the JWT's `x5c` header, which distribution 2.8 checks against the
/// `rootcertbundle` it is configured with.
pub struct TokenServer {
    addr: String,
    dir: tempfile::TempDir,
    issued: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    service: String,
    issuer: String,
}

impl TokenServer {
    /// Anonymous tokens valid for `lifetime_secs`.
    pub fn start(lifetime_secs: u64) -> TokenServer {
        TokenServer::launch(lifetime_secs, None)
    }

    /// Tokens only for requests with Basic `user:pass` (401 otherwise).
    pub fn with_credentials(lifetime_secs: u64, user: &str, pass: &str) -> TokenServer {
        TokenServer::launch(lifetime_secs, Some((user.to_string(), pass.to_string())))
    }

    fn launch(lifetime: u64, credentials: Option<(String, String)>) -> TokenServer {
        let dir = tempfile_dir();
        let (key, cert) = (dir.path().join("key.pem"), dir.path().join("cert.pem"));
        run_ok(
            Command::new("openssl")
                .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"])
                .args(["-subj", "/CN=rmount-test-token-issuer", "-keyout"])
                .arg(&key)
                .arg("-out")
                .arg(&cert)
                .stderr(Stdio::null()),
        );
        // A PEM body is the base64 of the DER.
        let pem = std::fs::read_to_string(&cert).unwrap();
        let cert_der_b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (service, issuer) =
            ("rmount-test-registry".to_string(), "rmount-test-issuer".to_string());
        let config = Arc::new(TokenConfig {
            key,
            cert_der_b64,
            lifetime,
            credentials,
            service: service.clone(),
            issuer: issuer.clone(),
        });
        let issued = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let counter = issued.clone();
        serve_forever(listener, stop.clone(), move |conn| {
            if let Err(e) = serve_token(&config, &counter, conn) {
                eprintln!("token server: {e}");
            }
        });
        TokenServer { addr, dir, issued, stop, service, issuer }
    }

    /// `127.0.0.1:PORT` of the token server.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The realm URL the registry sends clients to.
    pub fn realm(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    pub fn service(&self) -> &str {
        &self.service
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The PEM certificate the registry's `rootcertbundle` points at.
    pub fn cert(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }

    /// How many tokens were handed out.
    pub fn issued(&self) -> usize {
        self.issued.load(Ordering::SeqCst)
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        stop_server(&self.stop, &self.addr);
    }
}

fn serve_token(config: &TokenConfig, issued: &AtomicUsize, mut conn: TcpStream) -> io::Result<()> {
    use base64::Engine as _;
    let mut r = BufReader::new(conn.try_clone()?);
    let Some(head) = read_head(&mut r)? else { return Ok(()) };
    let body = read_body(&mut r, &head)?;
    let target = head.line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    if path != "/token" {
        return respond(&mut conn, 404, &[], b"not found\n");
    }
    // GET: query parameters; POST (OAuth2): form fields, scopes space-separated.
    let mut params = form_pairs(query);
    if head.line.starts_with("POST") {
        params.extend(form_pairs(&String::from_utf8_lossy(&body)));
    }
    let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let mut user = param("username");
    let mut pass = param("password");
    if let Some(basic) = head.get("authorization").and_then(|v| v.strip_prefix("Basic ")) {
        let decoded =
            base64::engine::general_purpose::STANDARD.decode(basic.trim()).unwrap_or_default();
        let decoded = String::from_utf8_lossy(&decoded).into_owned();
        if let Some((u, p)) = decoded.split_once(':') {
            user = Some(u.to_string());
            pass = Some(p.to_string());
        }
    }
    if let Some((want_user, want_pass)) = &config.credentials {
        if user.as_deref() != Some(want_user) || pass.as_deref() != Some(want_pass) {
            let body = br#"{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}"#;
            let challenge = ("WWW-Authenticate", "Basic realm=\"rmount-test-token\"".to_string());
            return respond(&mut conn, 401, &[challenge], body);
        }
    }
    // Grant everything asked for: `repository:NAME:pull,push` (NAME may hold ':' in a port).
    let mut access = Vec::new();
    for (_, scopes) in params.iter().filter(|(k, _)| k == "scope") {
        for scope in scopes.split(' ').filter(|s| !s.is_empty()) {
            let Some((rest, actions)) = scope.rsplit_once(':') else { continue };
            let Some((kind, name)) = rest.split_once(':') else { continue };
            let actions: Vec<&str> = actions.split(',').collect();
            access.push(json!({"type": kind, "name": name, "actions": actions}));
        }
    }
    let n = issued.fetch_add(1, Ordering::SeqCst) + 1;
    let now = now_secs();
    // distribution 2.8 accepts a token until exp + 60 s and from nbf - 60 s
    // (its clock-skew leeway): for a token that really stops working after
    // `lifetime` s, exp is set 60 s earlier than that; nbf is in the past
    // by more than the leeway. Clients see the true lifetime in expires_in.
    let claims = json!({
        "iss": config.issuer,
        "sub": user.clone().unwrap_or_default(),
        "aud": config.service,
        "exp": (now + config.lifetime).saturating_sub(60),
        "nbf": now - 70,
        "iat": now,
        "jti": format!("rmount-test-{n}-{now}"),
        "access": access,
    });
    let header = json!({"typ": "JWT", "alg": "RS256", "x5c": [config.cert_der_b64]});
    let b64 = &base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let signing_input = format!(
        "{}.{}",
        b64.encode(serde_json::to_vec(&header).unwrap()),
        b64.encode(serde_json::to_vec(&claims).unwrap())
    );
    let signature = openssl_sign(&config.key, signing_input.as_bytes())?;
    let token = format!("{signing_input}.{}", b64.encode(signature));
    let reply = json!({
        "token": token,
        "access_token": token,
        "expires_in": config.lifetime,
        "issued_at": rfc3339(now),
    });
    let ct = ("Content-Type", "application/json".to_string());
    respond(&mut conn, 200, &[ct], &serde_json::to_vec(&reply).unwrap())
}

fn openssl_sign(key: &Path, data: &[u8]) -> io::Result<Vec<u8>> {
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child.stdin.take().unwrap().write_all(data)?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!("openssl dgst: {}", describe(&out))));
    }
    Ok(out.stdout)
}

/// `YYYY-MM-DDTHH:MM:SSZ` for a Unix time (civil-from-days, proleptic Gregorian).
pub fn rfc3339(secs: u64) -> String {
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem / 60 % 60, rem % 60)
}

// ------------------------------------------------------------- fault proxy

/// What the proxy does to the next request that matches (`FaultProxy::fault`).
#[derive(Clone, Debug)]
pub enum Fault {
    /// Forward the response head and this many body bytes, then reset the
    /// connection (SO_LINGER 0: RST).
    Reset { after_body_bytes: usize },
    /// Answer with this status (and `Retry-After`) without forwarding.
    Status { code: u16, retry_after: Option<u32> },
    /// Like `Reset`, but end with a clean FIN: a short body.
    Truncate { after_body_bytes: usize },
    /// Wait before forwarding.
    Delay { ms: u64 },
    /// Persistent, not one-shot: flip the blob's middle byte in every
    /// matching response (for a `206` only if its `Content-Range` holds it),
    /// so the blob is wrong by one byte however it is fetched.
    Corrupt,
    /// Persistent, like `Corrupt`, at a given offset of the blob (byte 4 of
    /// a gzip blob is in the header's MTIME: the blob still decompresses
    /// to the same tar, and only its digest tells).
    CorruptAt { offset: u64 },
}

/// One request the proxy saw, in arrival order.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    /// The request target (path and query).
    pub path: String,
    /// The `Range` header, if any.
    pub range: Option<String>,
    /// The status sent back (0 if none was).
    pub status: u16,
    /// The fault applied, if any.
    pub fault: Option<Fault>,
    /// When the request arrived.
    pub at: Instant,
}

impl Request {
    /// The first byte of a `Range: bytes=N-…` request.
    pub fn range_start(&self) -> Option<u64> {
        self.range.as_deref()?.strip_prefix("bytes=")?.split('-').next()?.trim().parse().ok()
    }
}

struct ProxyState {
    upstream: String,
    /// One-shot faults, first match wins; each with its lowercase patterns.
    faults: Mutex<Vec<(Vec<String>, Fault)>>,
    corrupt: Mutex<Vec<(Vec<String>, Fault)>>,
    log: Mutex<Vec<Request>>,
}

/// A loopback HTTP proxy in front of a registry: one request per client
/// connection (`Connection: close` both ways), every request logged, faults
/// injected into matching requests.
pub struct FaultProxy {
    addr: String,
    state: Arc<ProxyState>,
    stop: Arc<AtomicBool>,
}

impl FaultProxy {
    pub fn start(upstream: &str) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let state = Arc::new(ProxyState {
            upstream: upstream.to_string(),
            faults: Mutex::new(Vec::new()),
            corrupt: Mutex::new(Vec::new()),
            log: Mutex::new(Vec::new()),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let s = state.clone();
        serve_forever(listener, stop.clone(), move |conn| {
            if let Err(e) = proxy_one(&s, conn) {
                eprintln!("fault proxy: {e}");
            }
        });
        FaultProxy { addr, state, stop }
    }

    /// `127.0.0.1:PORT` of the proxy.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Applies `fault` to the next request whose head contains `pattern`
    /// (case-insensitive; the request line `GET /v2/… HTTP/1.1` comes first,
    /// so `"GET /v2/x/blobs/"` names method and path). `Corrupt` applies to
    /// every matching request; other faults once each, in the order added.
    pub fn fault(&self, pattern: &str, fault: Fault) {
        self.fault_when(&[pattern], fault);
    }

    /// Like `fault`, for requests whose head contains all of `patterns`
    /// (e.g. `["GET /v2/x/blobs/", "authorization: bearer"]`).
    pub fn fault_when(&self, patterns: &[&str], fault: Fault) {
        let patterns = patterns.iter().map(|p| p.to_ascii_lowercase()).collect();
        if matches!(fault, Fault::Corrupt | Fault::CorruptAt { .. }) {
            self.state.corrupt.lock().unwrap().push((patterns, fault));
        } else {
            self.state.faults.lock().unwrap().push((patterns, fault));
        }
    }

    /// One-shot faults not triggered yet.
    pub fn pending_faults(&self) -> Vec<Fault> {
        self.state.faults.lock().unwrap().iter().map(|(_, f)| f.clone()).collect()
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<Request> {
        self.state.log.lock().unwrap().clone()
    }

    pub fn clear_requests(&self) {
        self.state.log.lock().unwrap().clear();
    }

    /// The log as text, for assertion messages.
    pub fn describe_requests(&self) -> String {
        self.requests()
            .iter()
            .map(|r| {
                let range = r.range.as_deref().map(|v| format!(" Range: {v}")).unwrap_or_default();
                let fault = r.fault.as_ref().map(|f| format!(" [{f:?}]")).unwrap_or_default();
                format!("{} {} -> {}{range}{fault}", r.method, r.path, r.status)
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        stop_server(&self.stop, &self.addr);
    }
}

fn proxy_one(state: &ProxyState, mut client: TcpStream) -> io::Result<()> {
    let mut r = BufReader::new(client.try_clone()?);
    let Some(head) = read_head(&mut r)? else { return Ok(()) };
    let body = read_body(&mut r, &head)?;
    let mut parts = head.line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or(""));
    let text = String::from_utf8_lossy(&head.raw).to_ascii_lowercase();
    let matches = |patterns: &Vec<String>| patterns.iter().all(|p| text.contains(p.as_str()));
    let fault = {
        let mut faults = state.faults.lock().unwrap();
        let i = faults.iter().position(|(p, _)| matches(p));
        i.map(|i| faults.remove(i).1)
    };
    let corrupt = {
        let corrupt = state.corrupt.lock().unwrap();
        corrupt.iter().find(|(p, _)| matches(p)).map(|(_, f)| f.clone())
    };
    let index = {
        let mut log = state.log.lock().unwrap();
        log.push(Request {
            method,
            path: path.to_string(),
            range: head.get("range").map(str::to_string),
            status: 0,
            fault: fault.clone().or(corrupt.clone()),
            at: Instant::now(),
        });
        log.len() - 1
    };
    let set_status = |code: u16| state.log.lock().unwrap()[index].status = code;

    let limit = match fault {
        Some(Fault::Delay { ms }) => {
            std::thread::sleep(Duration::from_millis(ms));
            None
        }
        Some(Fault::Status { code, retry_after }) => {
            set_status(code);
            let extra: Vec<(&str, String)> =
                retry_after.map(|s| ("Retry-After", s.to_string())).into_iter().collect();
            let body =
                format!(r#"{{"errors":[{{"code":"UNKNOWN","message":"injected {code}"}}]}}"#);
            return respond(&mut client, code, &extra, body.as_bytes());
        }
        Some(Fault::Reset { after_body_bytes } | Fault::Truncate { after_body_bytes }) => {
            Some(after_body_bytes)
        }
        _ => None,
    };

    // Forward with `Connection: close`, so the response ends at upstream EOF.
    let mut upstream = TcpStream::connect(&state.upstream)?;
    let mut forwarded = head.line.clone() + "\r\n";
    for (k, v) in &head.headers {
        let k_lower = k.to_ascii_lowercase();
        if !matches!(k_lower.as_str(), "connection" | "keep-alive" | "proxy-connection") {
            forwarded += &format!("{k}: {v}\r\n");
        }
    }
    forwarded += "Connection: close\r\n\r\n";
    upstream.write_all(forwarded.as_bytes())?;
    upstream.write_all(&body)?;
    let mut up = BufReader::new(upstream);
    let Some(response) = read_head(&mut up)? else { return Ok(()) };
    set_status(status_of(&response.line));
    client.write_all(&response.raw)?;
    let flip_at = corrupt.and_then(|fault| flip_offset(&response, &fault));

    let mut sent = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let mut n = up.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if let Some(limit) = limit {
            n = n.min(limit - sent);
        }
        if let Some(at) = flip_at {
            if at >= sent && at < sent + n {
                buf[at - sent] ^= 0x55;
            }
        }
        client.write_all(&buf[..n])?;
        sent += n;
        if limit == Some(sent) {
            break;
        }
    }
    client.flush()?;
    match fault {
        Some(Fault::Reset { .. }) => {
            // Let the client read what was sent, then RST instead of FIN.
            std::thread::sleep(Duration::from_millis(100));
            set_linger_zero(&client);
        }
        _ => {
            let _ = client.shutdown(Shutdown::Write);
        }
    }
    Ok(())
}

/// Where in this response's body the byte to corrupt is: the blob offset
/// (`Corrupt`: the middle) minus where the body starts in the blob.
fn flip_offset(response: &Head, fault: &Fault) -> Option<usize> {
    let length = response.content_length()? as u64;
    // `Content-Range: bytes START-END/TOTAL` for a 206; the whole blob otherwise.
    let (start, total) = match response.get("content-range") {
        Some(range) => {
            let (span, total) = range.trim_start_matches("bytes ").split_once('/')?;
            (span.split('-').next()?.parse().ok()?, total.parse().ok()?)
        }
        None => (0, length),
    };
    let offset = match fault {
        Fault::CorruptAt { offset } => *offset,
        _ => total / 2,
    };
    (offset >= start && offset < start + length).then(|| (offset - start) as usize)
}

/// SO_LINGER {on, 0}: close() sends RST.
fn set_linger_zero(s: &TcpStream) {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: a valid socket fd and a correctly sized option value.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt SO_LINGER");
}

// ------------------------------------------------------ skopeo and umoci

/// Runs `skopeo --insecure-policy ARGS…` with the host's credentials out of
/// the way (HOME and XDG_RUNTIME_DIR in a temp dir).
pub fn skopeo(args: &[&str]) -> String {
    let home = tempfile_dir();
    run_ok(
        Command::new("skopeo")
            .arg("--insecure-policy")
            .args(args)
            .env("HOME", home.path())
            .env("XDG_RUNTIME_DIR", home.path())
            .env_remove("REGISTRY_AUTH_FILE")
            .env_remove("DOCKER_CONFIG"),
    )
}

/// Pushes `oci:LAYOUT:TAG` to `docker://ADDR/REPO_TAG` over plain HTTP;
/// `extra` e.g. `["--format", "v2s2"]`, `["--all"]`, `["--dest-creds", "u:p"]`.
pub fn skopeo_push(layout: &Path, tag: &str, addr: &str, repo_tag: &str, extra: &[&str]) {
    let src = format!("oci:{}:{tag}", layout.display());
    let dst = format!("docker://{addr}/{repo_tag}");
    let mut args = vec!["copy", "--dest-tls-verify=false"];
    args.extend_from_slice(extra);
    args.extend([src.as_str(), dst.as_str()]);
    skopeo(&args);
}

/// Copies `docker://ADDR/REPO_TAG` into an OCI layout under `dir` and
/// unpacks it with umoci; returns the rootfs.
pub fn skopeo_pull_unpack(addr: &str, repo_tag: &str, dir: &Path) -> PathBuf {
    skopeo_pull_unpack_with(addr, repo_tag, dir, &[], &[])
}

/// `skopeo_pull_unpack` with global skopeo options (e.g.
/// `["--override-arch", "arm64"]`) and copy options (e.g. `["--src-creds", "u:p"]`).
pub fn skopeo_pull_unpack_with(
    addr: &str,
    repo_tag: &str,
    dir: &Path,
    global: &[&str],
    extra: &[&str],
) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let layout = dir.join("layout");
    let src = format!("docker://{addr}/{repo_tag}");
    let dst = format!("oci:{}:pulled", layout.display());
    let mut args = global.to_vec();
    args.extend(["copy", "--src-tls-verify=false"]);
    args.extend_from_slice(extra);
    args.extend([src.as_str(), dst.as_str()]);
    skopeo(&args);
    let bundle = dir.join("bundle");
    run_ok(
        Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(format!("{}:pulled", layout.display()))
            .arg(&bundle),
    );
    bundle.join("rootfs")
}

/// `skopeo inspect [--raw] docker://ADDR/REPO_TAG` as JSON.
pub fn skopeo_inspect(addr: &str, repo_tag: &str, raw: bool) -> Value {
    skopeo_inspect_with(addr, repo_tag, raw, &[])
}

/// `skopeo_inspect` with extra options (`--config`, `--creds u:p`).
pub fn skopeo_inspect_with(addr: &str, repo_tag: &str, raw: bool, extra: &[&str]) -> Value {
    let src = format!("docker://{addr}/{repo_tag}");
    let mut args = vec!["inspect", "--tls-verify=false"];
    if raw {
        args.push("--raw");
    }
    args.extend_from_slice(extra);
    args.push(&src);
    serde_json::from_str(&skopeo(&args)).unwrap()
}

/// The digest of the manifest (or index) the registry serves for the tag:
/// sha256 of `skopeo inspect --raw`'s exact bytes.
pub fn skopeo_digest(addr: &str, repo_tag: &str) -> String {
    skopeo_digest_with(addr, repo_tag, &[])
}

pub fn skopeo_digest_with(addr: &str, repo_tag: &str, extra: &[&str]) -> String {
    let src = format!("docker://{addr}/{repo_tag}");
    let mut args = vec!["inspect", "--tls-verify=false", "--raw"];
    args.extend_from_slice(extra);
    args.push(&src);
    format!("sha256:{}", sha256_hex(skopeo(&args).as_bytes()))
}

// ------------------------------------------------------- OCI layouts

/// Writes `data` as a blob of the layout at `dir`; returns its digest.
pub fn put_blob(dir: &Path, data: &[u8]) -> String {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let hex = sha256_hex(data);
    std::fs::write(blobs.join(&hex), data).unwrap();
    format!("sha256:{hex}")
}

/// One image of a layout: its platform, config `Cmd` and layers (bottom
/// first: (blob, media type, uncompressed tar)).
pub struct ImageSpec<'a> {
    pub os: &'a str,
    pub arch: &'a str,
    pub cmd: &'a [&'a str],
    pub layers: Vec<(Vec<u8>, &'static str, Vec<u8>)>,
}

/// Writes an image's layers, config and OCI manifest into the layout at
/// `dir`; returns the manifest's descriptor (with its platform).
pub fn write_image_blobs(dir: &Path, image: &ImageSpec) -> Value {
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for (blob, media_type, tar) in &image.layers {
        let digest = put_blob(dir, blob);
        descs.push(json!({"mediaType": media_type, "digest": digest, "size": blob.len()}));
        diff_ids.push(format!("sha256:{}", sha256_hex(tar)));
    }
    let config = json!({
        "created": "2024-01-01T00:00:00Z", "architecture": image.arch, "os": image.os,
        "config": {"Cmd": image.cmd},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": image.layers.iter().map(|_| json!({"created_by": "fixture"})).collect::<Vec<_>>(),
    });
    let config = serde_json::to_vec(&config).unwrap();
    let manifest = json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": put_blob(dir, &config), "size": config.len()},
        "layers": descs,
    });
    let manifest = serde_json::to_vec(&manifest).unwrap();
    json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": put_blob(dir, &manifest), "size": manifest.len(),
        "platform": {"os": image.os, "architecture": image.arch},
    })
}

fn write_layout_index(dir: &Path, mut top: Value, tag: &str) {
    top["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
    let index = json!({"schemaVersion": 2, "manifests": [top]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

/// An OCI layout at `dir` whose `tag` is one image; returns the manifest digest.
pub fn write_image_layout(dir: &Path, tag: &str, image: &ImageSpec) -> String {
    let mut desc = write_image_blobs(dir, image);
    desc.as_object_mut().unwrap().remove("platform");
    let digest = desc["digest"].as_str().unwrap().to_string();
    write_layout_index(dir, desc, tag);
    digest
}

/// An OCI layout at `dir` whose `tag` is an image index over `images`
/// (one per platform); returns the index digest and each manifest digest.
pub fn write_index_layout(dir: &Path, tag: &str, images: &[ImageSpec]) -> (String, Vec<String>) {
    let manifests: Vec<Value> = images.iter().map(|i| write_image_blobs(dir, i)).collect();
    let digests = manifests.iter().map(|m| m["digest"].as_str().unwrap().to_string()).collect();
    let index = json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests,
    });
    let index = serde_json::to_vec(&index).unwrap();
    let digest = put_blob(dir, &index);
    let desc = json!({"mediaType": "application/vnd.oci.image.index.v1+json",
                      "digest": digest, "size": index.len()});
    write_layout_index(dir, desc, tag);
    (digest, digests)
}

/// The first items of the lazy-mount tree fixtures: `etc` with an
/// `os-release` of `NAME={name}` and a file a later layer whites out;
/// `usr/bin` with `tool` (of `tool`'s bytes), a relative symlink and a
/// hardlink to it, and a script with a `user.origin` xattr of `{name}-test`;
/// and an empty `replaced` directory for a later layer to make opaque.
pub fn system_items(name: &str, tool: Vec<u8>) -> Vec<(Item, Meta)> {
    let dir = |path: &str| (Item::Dir { path: path.into(), mode: 0o755 }, Meta::default());
    let file = |path: &str, mode, data: &[u8]| {
        (Item::File { path: path.into(), mode, data: data.to_vec() }, Meta::default())
    };
    vec![
        dir("etc"),
        file("etc/os-release", 0o644, format!("NAME={name}\n").as_bytes()),
        file("etc/remove-me", 0o600, b"bye\n"),
        dir("usr"),
        dir("usr/bin"),
        (Item::File { path: "usr/bin/tool".into(), mode: 0o755, data: tool }, Meta::default()),
        (Item::Symlink { path: "usr/bin/alias".into(), target: "tool".into() }, Meta::default()),
        (
            Item::Hardlink { path: "usr/bin/tool-link".into(), target: "usr/bin/tool".into() },
            Meta::default(),
        ),
        (
            Item::File {
                path: "usr/bin/tagged".into(),
                mode: 0o755,
                data: b"#!/bin/sh\n".to_vec(),
            },
            Meta {
                xattrs: vec![("user.origin".into(), format!("{name}-test").into_bytes())],
                ..Meta::default()
            },
        ),
        dir("replaced"),
    ]
}

/// A layer as (blob, media type, tar) from items.
pub fn make_layer(items: &[(Item, Meta)], how: Compress) -> (Vec<u8>, &'static str, Vec<u8>) {
    let tar = layer_tar(items);
    let (blob, media_type) = compress(&tar, how);
    (blob, media_type, tar)
}

/// Incompressible deterministic bytes (xorshift64*).
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The platform rmount pulls by default here: `linux/<GOARCH>`.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

// ------------------------------------------------------- rmount runner

/// Runs rmount against its own store, with HOME and DOCKER_CONFIG in temp
/// dirs (never the host's credentials), no inherited REGISTRY_AUTH_FILE or
/// RUST_LOG, and an empty mirror configuration dir.
pub struct Client {
    pub root: PathBuf,
    pub home: PathBuf,
    /// `$DOCKER_CONFIG`: `config.json` lives here.
    pub docker_config: PathBuf,
    env: Vec<(String, Option<String>)>,
    /// Kill a run that takes longer than this.
    pub timeout: Duration,
}

impl Client {
    /// Store, home and Docker config under `dir`.
    pub fn new(dir: &Path) -> Client {
        let client = Client {
            root: dir.join("root"),
            home: dir.join("home"),
            docker_config: dir.join("docker-config"),
            env: Vec::new(),
            timeout: Duration::from_secs(180),
        };
        std::fs::create_dir_all(&client.home).unwrap();
        std::fs::create_dir_all(&client.docker_config).unwrap();
        client
    }

    /// Sets an environment variable for every run.
    pub fn env(&mut self, key: &str, value: impl Into<String>) -> &mut Client {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), Some(value.into())));
        self
    }

    /// Leaves an environment variable (even DOCKER_CONFIG) unset for every run.
    pub fn unset(&mut self, key: &str) -> &mut Client {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), None));
        self
    }

    /// The same HOME, Docker config and environment with another store.
    pub fn with_root(&self, root: &Path) -> Client {
        Client {
            root: root.to_path_buf(),
            home: self.home.clone(),
            docker_config: self.docker_config.clone(),
            env: self.env.clone(),
            timeout: self.timeout,
        }
    }

    /// `$DOCKER_CONFIG/config.json`.
    pub fn config_json(&self) -> PathBuf {
        self.docker_config.join("config.json")
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = rmount_command();
        cmd.arg("--root")
            .arg(&self.root)
            .args(args)
            .env("HOME", &self.home)
            .env("DOCKER_CONFIG", &self.docker_config)
            .env_remove("REGISTRY_AUTH_FILE")
            .env_remove("XDG_RUNTIME_DIR")
            .env_remove("RUST_LOG")
            // No mirror configuration from the host (/etc/rmount/hosts.d).
            .env("RMOUNT_HOSTS_DIR", self.home.join("hosts.d"));
        for (k, v) in &self.env {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        cmd
    }

    /// Runs `rmount --root ROOT ARGS…` (stdin from `input`).
    pub fn run_input(&self, args: &[&str], input: &[u8]) -> Output {
        let mut cmd = self.command(args);
        output_with_timeout(&mut cmd, input, self.timeout)
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.run_input(args, b"")
    }

    /// Runs and panics with the output unless it succeeds; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "rmount {args:?} failed:\n{}", describe(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs and panics unless it fails; returns stderr and stdout together.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(!out.status.success(), "rmount {args:?} should have failed:\n{}", describe(&out));
        format!("{}{}", String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&out.stdout))
    }

    /// `rmount pull EXTRA… REF`; returns the printed digest.
    pub fn pull(&self, reference: &str, extra: &[&str]) -> String {
        let mut args = vec!["pull"];
        args.extend_from_slice(extra);
        args.push(reference);
        digest_line(&self.ok(&args))
    }

    /// `rmount push EXTRA… REF [DEST]`; returns the printed digest.
    pub fn push(&self, reference: &str, dest: Option<&str>, extra: &[&str]) -> String {
        let mut args = vec!["push"];
        args.extend_from_slice(extra);
        args.push(reference);
        args.extend(dest);
        digest_line(&self.ok(&args))
    }

    /// `ROOT/blobs/sha256/<hex>` for a digest.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.root.join("blobs/sha256").join(hex)
    }

    /// `rmount stats MNT --json`, parsed.
    pub fn stats(&self, mnt: &Path) -> Value {
        let out = self.ok(&["stats", mnt.to_str().unwrap(), "--json"]);
        serde_json::from_str(out.trim())
            .unwrap_or_else(|e| panic!("rmount stats --json printed no JSON ({e}):\n{out}"))
    }

    /// Every ROOT/mounts/*.log (the serving processes' stderr).
    pub fn mount_logs(&self) -> String {
        let Ok(dir) = std::fs::read_dir(self.root.join("mounts")) else { return String::new() };
        dir.flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
            .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
            .collect()
    }

    /// `rmount umount PATH`, for a mount guard's drop: a failure is logged
    /// and the mount detached with `umount -l` instead of panicking.
    pub fn umount_or_detach(&self, path: &Path) {
        let out = self.run(&["umount", path.to_str().unwrap()]);
        if !out.status.success() {
            eprintln!("unmounting {} failed: {}", path.display(), describe(&out));
            let _ = Command::new("umount").arg("-l").arg(path).status();
        }
    }
}

/// A number in `rmount stats --json` output (the whole or a layer's).
pub fn num(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("stats field {key} is not a number: {v:#}"))
}

/// The stats entry of one layer.
pub fn layer_stats<'a>(stats: &'a Value, digest: &str) -> &'a Value {
    stats["layers"]
        .as_array()
        .unwrap_or_else(|| panic!("stats have no layers array: {stats:#}"))
        .iter()
        .find(|l| l["digest"] == digest)
        .unwrap_or_else(|| panic!("no layer {digest} in stats: {stats:#}"))
}

/// The `sha256:…` of the last stdout line `Digest: sha256:…` (anything
/// after the digest, like push's ` size: N`, is ignored).
pub fn digest_line(stdout: &str) -> String {
    let last = stdout.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
    let digest = last
        .trim()
        .strip_prefix("Digest: ")
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("last stdout line is not `Digest: …`:\n{stdout}"));
    assert!(
        digest.starts_with("sha256:") && digest.len() == 71,
        "bad digest {digest:?} in:\n{stdout}"
    );
    digest.to_string()
}

/// Runs `cmd` with `input` on stdin; kills it after `timeout` (the output
/// then says so).
pub fn output_with_timeout(cmd: &mut Command, input: &[u8], timeout: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stdout.read_to_end(&mut v);
        v
    });
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stderr.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            timed_out = true;
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = writer.join();
    let stdout = out_reader.join().unwrap();
    let mut stderr = err_reader.join().unwrap();
    if timed_out {
        stderr.extend_from_slice(format!("\n[killed after {timeout:?}]\n").as_bytes());
    }
    Output { status, stdout, stderr }
}

// ------------------------------------------------------- trees

/// The tree of `reference` mounted read-only from `root`.
pub fn mounted_tree(root: &Path, reference: &str, mnt: &Path) -> BTreeMap<String, String> {
    let mounted = super::Mounted::rmount(root, reference, mnt);
    super::describe_tree(&mounted.path)
}

/// Base64 of `user:pass`, as config.json's `auth` holds it.
pub fn basic_auth(user: &str, pass: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
}
