//! Prometheus text exposition of the daemon's per-mount metrics.
//!
//! The daemon fills one [`MountMetrics`] per mount (references to counters
//! the mount already keeps: the FUSE adapter's [`FsMetrics`] and each
//! remote layer's [`FetchStats`]); [`render`] turns them into the text
//! format 0.0.4, and [`MetricsEndpoint`] answers `GET /metrics` with it.
//!
//! The endpoint is off unless `--metrics ADDR` is given, and it has no
//! authentication, so it only listens where the host's own permissions
//! protect it: a Unix socket (mode 0600) or a loopback address.
//! [`MetricsAddr`] refuses anything else.
//!
//! The HTTP side is a few dozen lines of std: one request per connection,
//! `Connection: close`, a thread per connection (at most
//! [`MAX_CONNECTIONS`] at once). A scraper asks every few seconds; a web
//! framework would be most of the daemon's dependencies for that.
//!
//! What the cache metrics count: the in-memory span cache has no hit or
//! miss counters, so `rmount_chunk_cache_*` are the chunk-level counters
//! of remote layers: a hit is a verified chunk read from the disk tier, a
//! miss one fetched from the registry. Layers of a mount that are fully in
//! the store have no `FetchStats` and add nothing.

use crate::fs::metrics::{FsMetrics, FsSnapshot, BUCKETS, BUCKET_BOUNDS_NS};
use crate::layer::FetchStats;
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Connections served at once; more are closed unanswered.
pub const MAX_CONNECTIONS: usize = 8;
/// Longest request head read (request line and headers).
const MAX_REQUEST: usize = 8 * 1024;
/// How long a client may take to send its request, or to read the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// What the daemon knows about one mount, for [`render`].
#[derive(Debug, Clone)]
pub struct MountMetrics {
    /// Where it is mounted (the `mountpoint` label).
    pub mountpoint: PathBuf,
    /// The image reference it shows (the `image` label).
    pub image: String,
    /// Its FUSE adapter's op counters.
    pub ops: Arc<FsMetrics>,
    /// The fetch counters of its remote layers (none for a local image).
    /// A layer shared by several mounts counts in each of them.
    pub layers: Vec<Arc<FetchStats>>,
}

/// Sums of the fetch counters of one mount's layers.
#[derive(Default)]
struct FetchTotals {
    bytes: u64,
    fetches: u64,
    hits: u64,
    misses: u64,
    corrupt: u64,
}

impl FetchTotals {
    fn of(layers: &[Arc<FetchStats>]) -> Self {
        let mut t = FetchTotals::default();
        for l in layers {
            t.bytes += l.fetched_bytes.load(Ordering::Relaxed);
            t.fetches += l.fetches.load(Ordering::Relaxed);
            t.hits += l.disk_hits.load(Ordering::Relaxed);
            t.misses += l.misses.load(Ordering::Relaxed);
            t.corrupt += l.corrupt.load(Ordering::Relaxed);
        }
        t
    }
}

/// The metrics of `mounts` in the Prometheus text format 0.0.4.
///
/// Every family has its `# HELP` and `# TYPE` lines and its samples in one
/// block. Op metrics appear only for op kinds a mount has served.
pub fn render(mounts: &[MountMetrics]) -> String {
    let mut out = String::with_capacity(1024 + mounts.len() * 2048);
    let fetch: Vec<(String, FetchTotals)> = mounts
        .iter()
        .map(|m| {
            let labels = format!(
                "mountpoint=\"{}\",image=\"{}\"",
                escape(&m.mountpoint.to_string_lossy()),
                escape(&m.image)
            );
            (labels, FetchTotals::of(&m.layers))
        })
        .collect();
    let ops: Vec<(String, FsSnapshot)> = mounts
        .iter()
        .map(|m| (escape(&m.mountpoint.to_string_lossy()), m.ops.snapshot()))
        .collect();

    header(&mut out, "rmount_mounts", "gauge", "Mounts served by this daemon.");
    let _ = writeln!(out, "rmount_mounts {}", mounts.len());

    type Field = fn(&FetchTotals) -> u64;
    let counters: [(&str, &str, Field); 5] = [
        ("rmount_fetch_bytes_total", "Compressed bytes fetched from registries.", |t| t.bytes),
        ("rmount_fetches_total", "Range requests that delivered a verified chunk.", |t| t.fetches),
        ("rmount_chunk_cache_hits_total", "Chunks read from the verified disk tier.", |t| t.hits),
        (
            "rmount_chunk_cache_misses_total",
            "Chunks not on disk, fetched (or failed to be) from the registry.",
            |t| t.misses,
        ),
        (
            "rmount_corrupt_chunks_total",
            "Fetched chunks refused because they did not match their digest.",
            |t| t.corrupt,
        ),
    ];
    for (name, help, field) in counters {
        header(&mut out, name, "counter", help);
        for (labels, totals) in &fetch {
            let _ = writeln!(out, "{name}{{{labels}}} {}", field(totals));
        }
    }
    header(
        &mut out,
        "rmount_chunk_cache_hit_ratio",
        "gauge",
        "Disk-tier hits / (hits + misses) since the mount started; absent before the first chunk.",
    );
    for (labels, t) in &fetch {
        let lookups = t.hits + t.misses;
        if lookups > 0 {
            let ratio = t.hits as f64 / lookups as f64;
            let _ = writeln!(out, "rmount_chunk_cache_hit_ratio{{{labels}}} {ratio}");
        }
    }

    let served = || {
        ops.iter().flat_map(|(mountpoint, snap)| {
            snap.ops.iter().filter(|o| o.count > 0).map(move |o| (mountpoint, o))
        })
    };
    header(&mut out, "rmount_fuse_ops_total", "counter", "FUSE requests answered.");
    for (mountpoint, o) in served() {
        let op = o.op.name();
        let _ = writeln!(
            out,
            "rmount_fuse_ops_total{{mountpoint=\"{mountpoint}\",op=\"{op}\"}} {}",
            o.count
        );
    }
    let name = "rmount_fuse_op_duration_seconds";
    header(&mut out, name, "histogram", "Time rmount spent handling a FUSE request (until its reply, or its hand-off to a worker thread).");
    let bounds: Vec<String> = BUCKET_BOUNDS_NS.iter().map(|&ns| seconds(ns)).collect();
    for (mountpoint, o) in served() {
        let labels = format!("mountpoint=\"{mountpoint}\",op=\"{}\"", o.op.name());
        for (i, count) in o.buckets.iter().enumerate() {
            let le = if i + 1 == BUCKETS { "+Inf" } else { &bounds[i] };
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {count}");
        }
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", seconds(o.sum_ns));
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", o.count);
    }
    out
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Nanoseconds as decimal seconds, shortest form (`0.00025`, `1`).
fn seconds(ns: u64) -> String {
    (ns as f64 / 1e9).to_string()
}

/// A label value escaped per the text format: `\` `"` and newline.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Where the metrics endpoint listens: `unix:/ABSOLUTE/PATH`, or a
/// loopback `IP:PORT` (`127.0.0.1:9100`, `[::1]:9100`, `localhost:9100`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsAddr {
    /// A Unix socket, created with mode 0600.
    Unix(PathBuf),
    /// A loopback TCP address (port 0: any free port).
    Tcp(SocketAddr),
}

/// Why a metrics address was refused.
#[derive(Debug, thiserror::Error)]
pub enum MetricsAddrError {
    /// Neither `unix:PATH` nor `IP:PORT`.
    #[error("metrics address {0:?}: expected unix:/PATH or a loopback IP:PORT (127.0.0.1:9100, [::1]:9100)")]
    Invalid(String),
    /// A Unix socket path that is not absolute.
    #[error("metrics address {0:?}: the socket path must be absolute")]
    RelativePath(String),
    /// A TCP address other than loopback.
    #[error(
        "metrics address {0}: not a loopback address; the metrics endpoint has no \
         authentication, so it listens only on 127.0.0.0/8, ::1 or a unix socket"
    )]
    NotLoopback(SocketAddr),
}

impl FromStr for MetricsAddr {
    type Err = MetricsAddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() || !path.starts_with('/') {
                return Err(MetricsAddrError::RelativePath(s.to_owned()));
            }
            return Ok(MetricsAddr::Unix(PathBuf::from(path)));
        }
        let addr = match s.strip_prefix("localhost:") {
            Some(port) => port
                .parse::<u16>()
                .map(|p| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), p))
                .map_err(|_| MetricsAddrError::Invalid(s.to_owned()))?,
            None => s.parse::<SocketAddr>().map_err(|_| MetricsAddrError::Invalid(s.to_owned()))?,
        };
        let ip = addr.ip().to_canonical();
        if !ip.is_loopback() {
            return Err(MetricsAddrError::NotLoopback(addr));
        }
        Ok(MetricsAddr::Tcp(SocketAddr::new(ip, addr.port())))
    }
}

impl std::fmt::Display for MetricsAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MetricsAddr::Unix(path) => write!(f, "unix:{}", path.display()),
            MetricsAddr::Tcp(addr) => write!(f, "{addr}"),
        }
    }
}

type Source = dyn Fn() -> Vec<MountMetrics> + Send + Sync;

/// A running metrics endpoint. Dropping it stops the listener and removes
/// its socket file (if it is still the one it created).
pub struct MetricsEndpoint {
    addr: MetricsAddr,
    stop: Arc<AtomicBool>,
    /// A duplicate of the listening socket's fd: `shutdown(2)` on it wakes
    /// the thread blocked in `accept(2)` (with `EINVAL`). Connecting to
    /// the address instead could reach another listener that replaced
    /// our socket file.
    waker: OwnedFd,
    thread: Option<JoinHandle<()>>,
    /// `(st_dev, st_ino)` of the socket file this endpoint created.
    socket_file: Option<(u64, u64)>,
}

impl std::fmt::Debug for MetricsEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsEndpoint").field("addr", &self.addr).finish_non_exhaustive()
    }
}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl MetricsEndpoint {
    /// Listens on `addr` and answers `GET /metrics` with [`render`] of
    /// what `source` returns, on a background thread. A stale socket file
    /// at a `unix:` path is replaced; a live one (something accepts
    /// connections there) or a file that is not a socket is an error.
    pub fn serve(
        addr: MetricsAddr,
        source: impl Fn() -> Vec<MountMetrics> + Send + Sync + 'static,
    ) -> io::Result<MetricsEndpoint> {
        let (listener, bound, socket_file) = match &addr {
            MetricsAddr::Unix(path) => {
                let (listener, id) = bind_unix(path)?;
                (Listener::Unix(listener), addr.clone(), Some(id))
            }
            MetricsAddr::Tcp(a) => {
                let listener = TcpListener::bind(a)
                    .map_err(|e| io::Error::new(e.kind(), format!("metrics endpoint {a}: {e}")))?;
                let local = listener.local_addr()?;
                (Listener::Tcp(listener), MetricsAddr::Tcp(local), None)
            }
        };
        let waker = match &listener {
            Listener::Unix(l) => OwnedFd::from(l.try_clone()?),
            Listener::Tcp(l) => OwnedFd::from(l.try_clone()?),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let source: Arc<Source> = Arc::new(source);
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("rmount-metrics".into())
                .spawn(move || accept_loop(listener, &stop, source))?
        };
        tracing::info!(addr = %bound, "metrics endpoint listening");
        Ok(MetricsEndpoint { addr: bound, stop, waker, thread: Some(thread), socket_file })
    }

    /// Where it listens (for `127.0.0.1:0`, with the port chosen).
    pub fn addr(&self) -> &MetricsAddr {
        &self.addr
    }
}

impl Drop for MetricsEndpoint {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // If the shutdown fails (it should not), the thread stays parked in
        // accept() and is left behind rather than hanging this drop.
        let woke = rustix::net::shutdown(&self.waker, rustix::net::Shutdown::Read).is_ok();
        if let Some(thread) = self.thread.take().filter(|_| woke) {
            let _ = thread.join();
        }
        if let (MetricsAddr::Unix(path), Some(id)) = (&self.addr, self.socket_file) {
            // Only our own file: a restarted daemon may have replaced it.
            if std::fs::symlink_metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == id) {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// Binds a socket at `path` with mode 0600 from the start: bound under a
/// temporary name, `chmod`ed, then renamed over `path` (which also replaces
/// a stale socket atomically).
fn bind_unix(path: &Path) -> io::Result<(UnixListener, (u64, u64))> {
    let context = |e: io::Error, what: &str| {
        io::Error::new(e.kind(), format!("metrics socket {}: {what}{e}", path.display()))
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("metrics socket {}: exists and is not a socket", path.display()),
            ));
        }
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "metrics socket {}: another process is listening there",
                        path.display()
                    ),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {} // stale
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(context(e, "checking the existing socket: ")),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(context(e, "")),
    }
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("metrics socket {}: no file name", path.display()),
        )
    })?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(|e| context(e, "bind: "))?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(context(e, ""));
    }
    let meta = std::fs::symlink_metadata(path).map_err(|e| context(e, ""))?;
    Ok((listener, (meta.dev(), meta.ino())))
}

fn accept_loop(listener: Listener, stop: &AtomicBool, source: Arc<Source>) {
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let accepted = match &listener {
            Listener::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
            Listener::Tcp(l) => l.accept().map(|(s, _)| Stream::Tcp(s)),
        };
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let stream = match accepted {
            Ok(stream) => stream,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!("metrics endpoint: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::SeqCst);
            continue; // closes it
        }
        let (active, source) = (active.clone(), source.clone());
        let spawned =
            std::thread::Builder::new().name("rmount-metrics-conn".into()).spawn(move || {
                let _slot = Slot(&active);
                if let Err(e) = answer(stream, &*source) {
                    tracing::debug!("metrics endpoint: {e}");
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("metrics endpoint: spawn: {e}");
        }
    }
}

/// Frees a connection slot when its thread ends (also by panic).
struct Slot<'a>(&'a AtomicUsize);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Reads one request head and answers it.
fn answer(mut stream: Stream, source: &Source) -> io::Result<()> {
    stream.set_timeouts(IO_TIMEOUT)?;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let complete = loop {
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            break true;
        }
        if head.len() > MAX_REQUEST {
            break false;
        }
        match stream.read(&mut buf) {
            Ok(0) => break false,
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    };
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (method, target, version) = (parts.next(), parts.next(), parts.next());
    let well_formed =
        complete && parts.next().is_none() && version.is_some_and(|v| v.starts_with("HTTP/1."));
    let (status, content_type, body) = if !well_formed {
        ("400 Bad Request", "text/plain; charset=utf-8", "bad request\n".to_owned())
    } else if method == Some("GET") && target.map(|t| t.split('?').next()) == Some(Some("/metrics"))
    {
        ("200 OK", "text/plain; version=0.0.4; charset=utf-8", render(&source()))
    } else {
        ("404 Not Found", "text/plain; charset=utf-8", "not found; try GET /metrics\n".to_owned())
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes())?;
    stream.flush()?;
    stream.shutdown()
}

impl Stream {
    fn set_timeouts(&self, timeout: Duration) -> io::Result<()> {
        match self {
            Stream::Unix(s) => {
                s.set_read_timeout(Some(timeout))?;
                s.set_write_timeout(Some(timeout))
            }
            Stream::Tcp(s) => {
                s.set_read_timeout(Some(timeout))?;
                s.set_write_timeout(Some(timeout))
            }
        }
    }

    fn shutdown(&self) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Write),
            Stream::Tcp(s) => s.shutdown(Shutdown::Write),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.flush(),
            Stream::Tcp(s) => s.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::metrics::Op;
    use std::collections::HashMap;

    /// One sample line: name, labels, value.
    type Sample = (String, HashMap<String, String>, f64);

    /// A strict reader of the text format: every sample belongs to a
    /// family whose HELP and TYPE came first, families are contiguous,
    /// label values unescape, values parse.
    fn parse(text: &str) -> (HashMap<String, String>, Vec<Sample>) {
        let mut types = HashMap::new();
        let mut closed: Vec<String> = Vec::new();
        let mut current = String::new();
        let mut samples = Vec::new();
        assert!(text.ends_with('\n'));
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap().to_owned();
                assert!(
                    !closed.contains(&name) && !types.contains_key(&name),
                    "family {name} twice"
                );
                if !current.is_empty() {
                    closed.push(std::mem::take(&mut current));
                }
                current = name;
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert_eq!(name, current, "TYPE right after its HELP");
                assert!(["counter", "gauge", "histogram"].contains(&kind));
                types.insert(name.to_owned(), kind.to_owned());
                continue;
            }
            assert!(!line.starts_with('#') && !line.is_empty(), "stray line {line:?}");
            let (name, rest) = match line.find('{') {
                Some(i) => (&line[..i], &line[i..]),
                None => line.split_at(line.find(' ').unwrap()),
            };
            let mut labels = HashMap::new();
            let mut rest = rest;
            if let Some(body) = rest.strip_prefix('{') {
                let mut chars = body.char_indices();
                loop {
                    let start = chars.clone().next().unwrap().0;
                    let eq = body[start..].find("=\"").unwrap() + start;
                    let key = body[start..eq].to_owned();
                    for _ in start..eq + 2 {
                        chars.next();
                    }
                    let mut value = String::new();
                    loop {
                        match chars.next().unwrap().1 {
                            '\\' => match chars.next().unwrap().1 {
                                'n' => value.push('\n'),
                                c @ ('\\' | '"') => value.push(c),
                                c => panic!("bad escape \\{c}"),
                            },
                            '"' => break,
                            '\n' => panic!("raw newline"),
                            c => value.push(c),
                        }
                    }
                    assert!(labels.insert(key, value).is_none(), "duplicate label");
                    match chars.next().unwrap() {
                        (_, ',') => continue,
                        (i, '}') => {
                            rest = &body[i + 1..];
                            break;
                        }
                        (_, c) => panic!("unexpected {c:?} in {line:?}"),
                    }
                }
            }
            let value: f64 = rest.strip_prefix(' ').unwrap().parse().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    name.strip_suffix(s).filter(|f| types.get(*f).is_some_and(|t| t == "histogram"))
                })
                .unwrap_or(name);
            assert_eq!(family, current, "sample {line:?} outside its family");
            samples.push((name.to_owned(), labels, value));
        }
        (types, samples)
    }

    fn mount(mountpoint: &str, image: &str) -> MountMetrics {
        MountMetrics {
            mountpoint: PathBuf::from(mountpoint),
            image: image.to_owned(),
            ops: Arc::new(FsMetrics::new()),
            layers: vec![Arc::new(FetchStats::default()), Arc::new(FetchStats::default())],
        }
    }

    fn sample<'a>(samples: &'a [Sample], name: &str, want: &[(&str, &str)]) -> Vec<&'a Sample> {
        samples
            .iter()
            .filter(|(n, labels, _)| {
                n == name
                    && want.iter().all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect()
    }

    #[test]
    fn render_is_well_formed_text_format() {
        let a = mount("/mnt/a", "docker.io/library/nginx:latest");
        let b = mount("/mnt/b", "localhost/app:1");
        a.layers[0].fetched_bytes.store(1000, Ordering::Relaxed);
        a.layers[1].fetched_bytes.store(24, Ordering::Relaxed);
        a.layers[0].disk_hits.store(3, Ordering::Relaxed);
        a.layers[1].misses.store(1, Ordering::Relaxed);
        a.layers[1].corrupt.store(2, Ordering::Relaxed);
        for us in [5, 20, 20, 300, 4000, 2_000_000] {
            a.ops.record(Op::Read, Duration::from_micros(us));
        }
        a.ops.record(Op::Lookup, Duration::from_micros(1));
        b.ops.record(Op::Getattr, Duration::from_micros(1));

        let text = render(&[a, b]);
        let (types, samples) = parse(&text);
        assert_eq!(types["rmount_mounts"], "gauge");
        assert_eq!(types["rmount_fuse_op_duration_seconds"], "histogram");
        assert_eq!(types["rmount_fetch_bytes_total"], "counter");
        assert_eq!(sample(&samples, "rmount_mounts", &[])[0].2, 2.0);
        let bytes = sample(&samples, "rmount_fetch_bytes_total", &[("mountpoint", "/mnt/a")]);
        assert_eq!(bytes[0].1["image"], "docker.io/library/nginx:latest");
        assert_eq!(bytes[0].2, 1024.0);
        assert_eq!(
            sample(&samples, "rmount_corrupt_chunks_total", &[("mountpoint", "/mnt/a")])[0].2,
            2.0
        );
        let ratio = sample(&samples, "rmount_chunk_cache_hit_ratio", &[]);
        assert_eq!(ratio.len(), 1, "no ratio for a mount without chunk lookups");
        assert_eq!(ratio[0].2, 0.75);

        // Only served ops appear.
        assert_eq!(sample(&samples, "rmount_fuse_ops_total", &[]).len(), 3);
        assert_eq!(sample(&samples, "rmount_fuse_ops_total", &[("op", "read")])[0].2, 6.0);
        assert!(sample(&samples, "rmount_fuse_ops_total", &[("op", "write")]).is_empty());

        // Histograms: cumulative, monotonic, +Inf == _count, le ascending.
        let name = "rmount_fuse_op_duration_seconds";
        for (mountpoint, op) in [("/mnt/a", "read"), ("/mnt/a", "lookup"), ("/mnt/b", "getattr")] {
            let want = [("mountpoint", mountpoint), ("op", op)];
            let buckets = sample(&samples, &format!("{name}_bucket"), &want);
            assert_eq!(buckets.len(), BUCKETS);
            let les: Vec<f64> = buckets.iter().map(|b| b.1["le"].parse().unwrap()).collect();
            assert!(les.windows(2).all(|w| w[0] < w[1]), "{les:?}");
            assert!(les.last().unwrap().is_infinite());
            assert!(buckets.windows(2).all(|w| w[0].2 <= w[1].2));
            let count = sample(&samples, &format!("{name}_count"), &want)[0].2;
            assert_eq!(buckets.last().unwrap().2, count);
        }
        let read = [("mountpoint", "/mnt/a"), ("op", "read")];
        let le = |v: &str| {
            sample(&samples, &format!("{name}_bucket"), &read)
                .into_iter()
                .find(|b| b.1["le"] == v)
                .unwrap()
                .2
        };
        assert_eq!(le("0.00001"), 1.0);
        assert_eq!(le("0.00005"), 3.0);
        assert_eq!(le("0.00025"), 3.0);
        assert_eq!(le("0.0005"), 4.0);
        assert_eq!(le("0.005"), 5.0);
        assert_eq!(le("1"), 5.0);
        assert_eq!(le("+Inf"), 6.0);
        let sum = sample(&samples, &format!("{name}_sum"), &read)[0].2;
        assert!((sum - 2.004345).abs() < 1e-9, "{sum}");
    }

    #[test]
    fn render_with_no_mounts() {
        let (types, samples) = parse(&render(&[]));
        assert_eq!(types.len(), 9);
        assert_eq!(samples.len(), 1);
        assert_eq!(samples[0].2, 0.0);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape(r#"a\b"c"#), r#"a\\b\"c"#);
        assert_eq!(escape("x\ny"), "x\\ny");
        assert_eq!(escape("plain é"), "plain é");
        let m = mount("/mnt/we\"ird\\dir\nname", "img\"x");
        m.ops.record(Op::Statfs, Duration::ZERO);
        let text = render(&[m]);
        let (_, samples) = parse(&text);
        let ops = sample(&samples, "rmount_fuse_ops_total", &[("op", "statfs")]);
        assert_eq!(ops[0].1["mountpoint"], "/mnt/we\"ird\\dir\nname");
        let bytes = sample(&samples, "rmount_fetch_bytes_total", &[]);
        assert_eq!(bytes[0].1["image"], "img\"x");
    }

    #[test]
    fn addresses_parse_and_non_loopback_is_refused() {
        let ok = |s: &str| s.parse::<MetricsAddr>().unwrap();
        assert_eq!(
            ok("unix:/run/rmount/metrics.sock"),
            MetricsAddr::Unix("/run/rmount/metrics.sock".into())
        );
        assert_eq!(ok("127.0.0.1:9100"), MetricsAddr::Tcp("127.0.0.1:9100".parse().unwrap()));
        assert_eq!(ok("127.1.2.3:9100"), MetricsAddr::Tcp("127.1.2.3:9100".parse().unwrap()));
        assert_eq!(ok("[::1]:9100"), MetricsAddr::Tcp("[::1]:9100".parse().unwrap()));
        assert_eq!(ok("localhost:9100"), MetricsAddr::Tcp("127.0.0.1:9100".parse().unwrap()));
        assert_eq!(ok("[::ffff:127.0.0.1]:1"), MetricsAddr::Tcp("127.0.0.1:1".parse().unwrap()));
        assert_eq!(ok("[::1]:9100").to_string(), "[::1]:9100");
        assert_eq!(ok("unix:/x.sock").to_string(), "unix:/x.sock");
        for bad in ["0.0.0.0:9100", "[::]:9100", "192.168.1.10:9100", "[::ffff:10.0.0.1]:1"] {
            let err = bad.parse::<MetricsAddr>().unwrap_err();
            assert!(matches!(err, MetricsAddrError::NotLoopback(_)), "{bad}: {err}");
            assert!(err.to_string().contains("no authentication"));
        }
        for bad in
            ["", "9100", "127.0.0.1", "localhost", "example.com:9100", "localhost:x", "tcp:1"]
        {
            assert!(
                matches!(bad.parse::<MetricsAddr>(), Err(MetricsAddrError::Invalid(_))),
                "{bad}"
            );
        }
        for bad in ["unix:", "unix:rel.sock"] {
            assert!(
                matches!(bad.parse::<MetricsAddr>(), Err(MetricsAddrError::RelativePath(_))),
                "{bad}"
            );
        }
    }

    fn request(stream: &mut (impl Read + Write), request: &str) -> String {
        stream.write_all(request.as_bytes()).unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    }

    fn source() -> impl Fn() -> Vec<MountMetrics> + Send + Sync + 'static {
        let m = mount("/mnt/served", "img");
        m.ops.record(Op::Readdir, Duration::from_micros(7));
        move || vec![m.clone()]
    }

    fn check_metrics_response(response: &str) {
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.contains("Content-Type: text/plain; version=0.0.4"));
        assert!(head.contains("Connection: close"));
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        let (_, samples) = parse(body);
        assert_eq!(sample(&samples, "rmount_fuse_ops_total", &[("op", "readdir")])[0].2, 1.0);
    }

    #[test]
    fn serves_over_loopback_tcp() {
        let endpoint = MetricsEndpoint::serve("127.0.0.1:0".parse().unwrap(), source()).unwrap();
        let MetricsAddr::Tcp(addr) = endpoint.addr().clone() else { panic!() };
        assert_ne!(addr.port(), 0);
        let get = |req: &str| request(&mut TcpStream::connect(addr).unwrap(), req);
        check_metrics_response(&get("GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n"));
        check_metrics_response(&get("GET /metrics?x=1 HTTP/1.0\r\n\r\n"));
        assert!(get("GET / HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404 "));
        assert!(get("POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404 "));
        assert!(get("garbage\r\n\r\n").starts_with("HTTP/1.1 400 "));
        // A client that sends half a request and hangs up gets nothing, and
        // the endpoint keeps serving.
        let mut half = TcpStream::connect(addr).unwrap();
        half.write_all(b"GET /met").unwrap();
        half.shutdown(Shutdown::Write).unwrap();
        let mut rest = String::new();
        half.read_to_string(&mut rest).unwrap();
        assert!(rest.starts_with("HTTP/1.1 400 "), "{rest}");
        check_metrics_response(&get("GET /metrics HTTP/1.1\r\n\r\n"));
        drop(endpoint);
        assert!(TcpStream::connect(addr).is_err(), "stopped on drop");
    }

    #[test]
    fn serves_over_a_unix_socket_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.sock");
        // A stale socket file (nobody listening) is replaced.
        drop(UnixListener::bind(&path).unwrap());
        assert!(UnixStream::connect(&path).is_err());
        let endpoint = MetricsEndpoint::serve(MetricsAddr::Unix(path.clone()), source()).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let response =
            request(&mut UnixStream::connect(&path).unwrap(), "GET /metrics HTTP/1.1\r\n\r\n");
        check_metrics_response(&response);

        // A live socket is not taken over.
        let err = MetricsEndpoint::serve(MetricsAddr::Unix(path.clone()), source()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        drop(endpoint);
        assert!(!path.exists(), "socket file removed on drop");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");

        // A regular file is never replaced.
        std::fs::write(&path, b"data").unwrap();
        let err = MetricsEndpoint::serve(MetricsAddr::Unix(path.clone()), source()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path).unwrap(), b"data");
    }

    #[test]
    fn drop_leaves_a_replaced_socket_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.sock");
        let ops = Arc::new(FsMetrics::new());
        let held = MountMetrics { ops: ops.clone(), ..mount("/m", "i") };
        let endpoint =
            MetricsEndpoint::serve(MetricsAddr::Unix(path.clone()), move || vec![held.clone()])
                .unwrap();
        std::fs::remove_file(&path).unwrap();
        let other = UnixListener::bind(&path).unwrap();
        drop(endpoint);
        assert_eq!(Arc::strong_count(&ops), 1, "the accept thread ended and dropped the source");
        assert!(path.exists());
        assert!(other.set_nonblocking(true).is_ok() && other.accept().is_err(), "no stray connect");
    }
}
