//! Command-line parsing and output. No logic a library caller would need
//! lives here: each command calls into the library and prints the result,
//! as a table for people or as JSON with `--json`.

mod commit;
mod containerd;
mod daemon;
mod images;
mod index;
mod mount;
mod registry;

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

/// Mount OCI/Docker images as a filesystem, straight from their compressed layers.
#[derive(Debug, Parser)]
#[command(name = "rmount", version, about, long_about = None)]
#[command(after_help = "Short form: `rmount REF DIR` is `rmount mount REF DIR`.")]
pub struct Cli {
    /// State directory (store, indexes, mounts).
    /// [default: /var/lib/rmount as root, $XDG_DATA_HOME/rmount otherwise]
    #[arg(long, global = true, env = "RMOUNT_ROOT", value_name = "DIR")]
    pub root: Option<PathBuf>,

    /// More logging (-v info, -vv debug, -vvv trace); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Log format on stderr: `text` or `json` (one object per line).
    #[arg(long, global = true, env = "RMOUNT_LOG_FORMAT", value_name = "FORMAT")]
    #[arg(default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Pull an image from a registry into the store.
    Pull(PullArgs),
    /// Push an image from the store to a registry.
    Push(PushArgs),
    /// Log in to a registry (stores credentials where Docker does).
    Login(LoginArgs),
    /// Log out of a registry (removes the stored credentials).
    Logout(LogoutArgs),
    /// Load images from an OCI layout (directory or tar) or a `docker save` tarball.
    Load(LoadArgs),
    /// Save images to a tar archive (OCI layout or `docker save` format).
    Save(SaveArgs),
    /// List images.
    Images(ListArgs),
    /// Show details of one or more images as JSON.
    Inspect(InspectArgs),
    /// Show the history of an image.
    History(HistoryArgs),
    /// Create a tag DST that refers to SRC.
    Tag(TagArgs),
    /// Remove one or more images.
    Rmi(RmiArgs),
    /// Remove blobs that no image refers to.
    Prune(ListArgs),
    /// Show disk usage of images, layers, cache and mounts.
    Df(ListArgs),
    /// Mount an image at a directory (lazily from its registry if it is not in the store).
    Mount(MountArgs),
    /// Show what a lazy mount has fetched (per layer, cache hits, latency).
    Stats(StatsArgs),
    /// Unmount an image mounted by rmount.
    #[command(alias = "unmount")]
    Umount(UmountArgs),
    /// Create a new image from a mount's changes (or a containerd container's, with --snapshot).
    Commit(CommitArgs),
    /// Show the changes of a mount against its image (A added, C changed, D deleted).
    Diff(DiffArgs),
    /// Write a mount's merged filesystem (or an image's) as one tar.
    Export(ExportArgs),
    /// Build and publish random-access indexes of an image's layers (for lazy mounts).
    Index(IndexArgs),
    /// Run, stop or restart the daemon that serves every mount of the store.
    Daemon(DaemonArgs),
    /// List the daemon's mounts.
    #[command(alias = "mounts")]
    Ps(PsArgs),
    /// Work with a running containerd (pull images whose layers rmount serves lazily).
    Containerd(ContainerdArgs),
}

/// `rmount containerd`.
#[derive(Debug, Args)]
pub struct ContainerdArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: ContainerdCommand,
}

/// The `rmount containerd` subcommands.
#[derive(Debug, Subcommand)]
pub enum ContainerdCommand {
    /// Pull an image into containerd, its layers served lazily by rmount's
    /// snapshotter (like `ctr-remote image rpull`).
    ///
    /// The manifest and config go into containerd's content store; each
    /// layer is prepared on the snapshotter with the labels that ask for a
    /// remote snapshot, so it is neither downloaded nor unpacked. A layer
    /// the snapshotter cannot serve lazily is downloaded and unpacked by
    /// containerd as a plain pull would. Then `ctr run --snapshotter
    /// rmount REF …` runs it.
    Pull(ContainerdPullArgs),
}

/// `rmount containerd pull`.
#[derive(Debug, Args)]
pub struct ContainerdPullArgs {
    /// Image to pull, e.g. `127.0.0.1:5000/app:v1`; containerd names it
    /// by the normalised form (`docker.io/library/nginx:latest`).
    #[arg(value_name = "REF")]
    pub reference: String,
    /// containerd's gRPC socket.
    #[arg(long, env = "CONTAINERD_ADDRESS", value_name = "SOCKET")]
    #[arg(default_value = "/run/containerd/containerd.sock")]
    pub address: PathBuf,
    /// containerd namespace.
    #[arg(short, long, env = "CONTAINERD_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// The snapshotter's name in containerd's config (`[proxy_plugins.NAME]`).
    #[arg(long, value_name = "NAME", default_value = "rmount")]
    pub snapshotter: String,
    /// Platform of a multi-platform image (os/arch[/variant]). [default: the host's]
    #[arg(long, value_name = "PLATFORM")]
    pub platform: Option<String>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// How to reach the registry.
    #[command(flatten)]
    pub registry: RegistryArgs,
}

/// `rmount daemon`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct DaemonArgs {
    /// Stop or restart instead of starting.
    #[command(subcommand)]
    pub command: Option<DaemonCommand>,
    /// Stay in the foreground (for systemd) instead of starting in the background.
    #[arg(long)]
    pub foreground: bool,
    /// Memory for decompressed file data, shared by all mounts, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 256)]
    pub cache_mem: u64,
    /// Bound of the on-disk chunk cache of lazy mounts (ROOT/cache/chunks).
    #[arg(long, value_name = "SIZE", default_value = "10G", value_parser = parse_size_arg)]
    pub cache_size: u64,
    /// Threads per mount that read and decompress.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub threads: usize,
    /// Serve Prometheus metrics at ADDR: `unix:/path.sock` or `127.0.0.1:PORT`
    /// (off by default; unauthenticated, so loopback only).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<crate::daemon::metrics::MetricsAddr>,
    /// What mounts a containerd container's rootfs over lazily served
    /// layers: kernel `overlayfs` (over FUSE lowers), or rmount's own
    /// writable `fuse` union where the kernel's overlayfs refuses FUSE lowers.
    #[arg(long, value_name = "KIND", default_value = "overlayfs", value_parser = ["overlayfs", "fuse"])]
    pub snapshot_union: String,
    /// Internal: run the worker process (started by the keeper).
    #[arg(long, hide = true)]
    pub worker: bool,
}

impl DaemonArgs {
    /// The settings of a daemon started on demand by another command.
    pub fn for_autostart(cache_mem: u64, cache_size: u64) -> Self {
        Self {
            command: None,
            foreground: false,
            cache_mem,
            cache_size,
            threads: 4,
            metrics: None,
            snapshot_union: "overlayfs".into(),
            worker: false,
        }
    }
}

/// `rmount daemon` subcommands.
#[derive(Debug, Subcommand)]
pub enum DaemonCommand {
    /// Unmount everything (changes are kept) and stop the daemon.
    Stop {
        /// Leave the mounts in place, held by the keeper, for an upgrade: the
        /// next `rmount daemon` takes them over. Programs using them wait
        /// meanwhile; nothing fails.
        #[arg(long)]
        keep_mounts: bool,
    },
    /// Hand every mount to a new daemon process running the rmount binary
    /// installed now (an upgrade), without unmounting anything.
    Restart,
    /// Show whether the daemon runs, its processes and socket.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `rmount ps`.
#[derive(Debug, Args)]
pub struct PsArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// How to reach registries; shared by pull, push and login.
#[derive(Debug, Args)]
pub struct RegistryArgs {
    /// Use plain HTTP for this registry (host[:port]); repeatable. Loopback
    /// registries (localhost, 127.0.0.1) use plain HTTP without it.
    #[arg(long, value_name = "HOST")]
    pub insecure_registry: Vec<String>,
    /// Mirror configuration: DIR/<registry>/hosts.toml, containerd's layout
    /// (see docs/registry.md). [default: /etc/rmount/hosts.d as root,
    /// $XDG_CONFIG_HOME/rmount/hosts.d otherwise]
    #[arg(long, env = "RMOUNT_HOSTS_DIR", value_name = "DIR")]
    pub hosts_dir: Option<PathBuf>,
    /// Credentials file. [default: $REGISTRY_AUTH_FILE, else
    /// $DOCKER_CONFIG/config.json, else ~/.docker/config.json]
    #[arg(long, value_name = "FILE")]
    pub authfile: Option<PathBuf>,
}

/// Output of pull and push.
#[derive(Debug, Args)]
pub struct TransferOutput {
    /// No progress output.
    #[arg(short, long)]
    pub quiet: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `rmount pull`.
#[derive(Debug, Args)]
pub struct PullArgs {
    /// Image to pull, e.g. `nginx:1.27` or `127.0.0.1:5000/team/app@sha256:…`.
    #[arg(value_name = "REF")]
    pub reference: String,
    /// Platform of a multi-platform image (os/arch[/variant]). [default: the host's]
    #[arg(long, value_name = "PLATFORM")]
    pub platform: Option<String>,
    /// Pull every platform of a multi-platform image.
    #[arg(short, long, conflicts_with = "platform")]
    pub all_platforms: bool,
    /// Layers downloaded at once.
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub max_concurrent_downloads: usize,
    /// Progress and result output.
    #[command(flatten)]
    pub output: TransferOutput,
    /// How to reach the registry.
    #[command(flatten)]
    pub registry: RegistryArgs,
}

/// `rmount push`.
#[derive(Debug, Args)]
pub struct PushArgs {
    /// Stored image to push.
    #[arg(value_name = "REF")]
    pub reference: String,
    /// Where to push it. [default: REF]
    #[arg(value_name = "DEST")]
    pub destination: Option<String>,
    /// Upload blobs larger than this in chunks of this size (PATCH
    /// requests) instead of in one request, e.g. 16M.
    #[arg(long, value_name = "SIZE", value_parser = parse_size_arg)]
    pub chunk_size: Option<u64>,
    /// Blobs uploaded at once.
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub max_concurrent_uploads: usize,
    /// Progress and result output.
    #[command(flatten)]
    pub output: TransferOutput,
    /// How to reach the registry.
    #[command(flatten)]
    pub registry: RegistryArgs,
}

/// `rmount login`.
#[derive(Debug, Args)]
pub struct LoginArgs {
    /// Registry host, e.g. `registry.example.com` or `127.0.0.1:5000`. [default: docker.io]
    #[arg(value_name = "REGISTRY")]
    pub server: Option<String>,
    /// Username (asked for when omitted).
    #[arg(short, long)]
    pub username: Option<String>,
    /// Password (visible in `ps`; prefer --password-stdin).
    #[arg(short, long, conflicts_with = "password_stdin")]
    pub password: Option<String>,
    /// Read the password from standard input.
    #[arg(long)]
    pub password_stdin: bool,
    /// How to reach the registry.
    #[command(flatten)]
    pub registry: RegistryArgs,
}

/// `rmount logout`.
#[derive(Debug, Args)]
pub struct LogoutArgs {
    /// Registry host. [default: docker.io]
    #[arg(value_name = "REGISTRY")]
    pub server: Option<String>,
    /// Credentials file (as for login).
    #[arg(long, value_name = "FILE")]
    pub authfile: Option<PathBuf>,
}

/// Layer compressions `rmount commit` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CompressionArg {
    /// gzip (what Docker writes).
    Gzip,
    /// zstd.
    Zstd,
    /// A plain tar.
    None,
}

/// `rmount commit`.
#[derive(Debug, Args)]
pub struct CommitArgs {
    /// The writable mount whose changes become the new layer (with
    /// `--snapshot`, leave it out: `rmount commit --snapshot KEY [NEWREF]`).
    #[arg(value_name = "MOUNT", required_unless_present = "snapshot")]
    pub mountpoint: Option<PathBuf>,
    /// Name of the new image (untagged if omitted).
    #[arg(value_name = "NEWREF")]
    pub reference: Option<String>,
    /// Commit message (the history entry's comment).
    #[arg(short, long)]
    pub message: Option<String>,
    /// Author (e.g. "Jane Doe <jane@example.com>").
    #[arg(short, long)]
    pub author: Option<String>,
    /// Apply a Dockerfile instruction to the config (CMD, ENTRYPOINT, ENV,
    /// EXPOSE, LABEL, USER, WORKDIR, VOLUME, STOPSIGNAL, ONBUILD); repeatable.
    #[arg(short, long, value_name = "INSTRUCTION")]
    pub change: Vec<String>,
    /// Layer compression.
    #[arg(long, value_enum, default_value_t = CompressionArg::Gzip)]
    pub compression: CompressionArg,
    /// Compression level (gzip 0-9, default 6; zstd 1-22, default 3).
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub level: Option<i32>,
    /// Commit a containerd container's active snapshot instead of a mount:
    /// its key (as the rmount snapshotter has it, or just the container id),
    /// on an image rmount serves lazily.
    #[arg(long, value_name = "KEY")]
    pub snapshot: Option<String>,
}

/// `rmount diff`.
#[derive(Debug, Args)]
pub struct DiffArgs {
    /// The writable mount.
    #[arg(value_name = "MOUNT")]
    pub mountpoint: PathBuf,
    /// Print JSON (Docker's API form: Path, Kind 0 changed / 1 added / 2 deleted).
    #[arg(long)]
    pub json: bool,
}

/// `rmount export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// A mount (its merged view) or an image reference.
    #[arg(value_name = "MOUNT|REF")]
    pub source: String,
    /// Output tar file (`-` for stdout).
    #[arg(short, long, value_name = "FILE")]
    pub output: PathBuf,
}

/// `rmount load`.
#[derive(Debug, Args)]
pub struct LoadArgs {
    /// OCI layout directory, OCI archive or docker-archive tarball.
    #[arg(short, long, value_name = "FILE|DIR")]
    pub input: PathBuf,
    /// Print only image ids.
    #[arg(short, long)]
    pub quiet: bool,
}

/// Archive formats `rmount save` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SaveFormat {
    /// OCI image layout in a tar (`oci-archive:` in skopeo).
    OciArchive,
    /// `docker save` format (`docker-archive:` in skopeo).
    DockerArchive,
}

/// `rmount save`.
#[derive(Debug, Args)]
pub struct SaveArgs {
    /// Images to save.
    #[arg(required = true, value_name = "REF")]
    pub references: Vec<String>,
    /// Output file.
    #[arg(short, long, value_name = "FILE")]
    pub output: PathBuf,
    /// Archive format.
    #[arg(long, value_enum, default_value_t = SaveFormat::OciArchive)]
    pub format: SaveFormat,
}

/// Listing commands: `images`, `prune`, `df`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `rmount inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Images to inspect.
    #[arg(required = true, value_name = "REF")]
    pub references: Vec<String>,
}

/// `rmount history`.
#[derive(Debug, Args)]
pub struct HistoryArgs {
    /// The image.
    #[arg(value_name = "REF")]
    pub reference: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Do not truncate output.
    #[arg(long)]
    pub no_trunc: bool,
}

/// `rmount tag`.
#[derive(Debug, Args)]
pub struct TagArgs {
    /// Existing image.
    #[arg(value_name = "SRC")]
    pub source: String,
    /// New reference.
    #[arg(value_name = "DST")]
    pub target: String,
}

/// `rmount rmi`.
#[derive(Debug, Args)]
pub struct RmiArgs {
    /// Images to remove.
    #[arg(required = true, value_name = "REF")]
    pub references: Vec<String>,
    /// Remove even while mounted.
    #[arg(short, long)]
    pub force: bool,
}

/// `rmount mount`.
#[derive(Debug, Args)]
pub struct MountArgs {
    /// Image to mount.
    #[arg(value_name = "REF")]
    pub reference: String,
    /// Mountpoint (an existing directory).
    #[arg(value_name = "DIR")]
    pub mountpoint: PathBuf,
    /// Mount read-only (no upper layer).
    #[arg(long, conflicts_with_all = ["upper", "work"])]
    pub read_only: bool,
    /// Directory for the changes (the overlayfs `upperdir`); remounting with
    /// the same one continues where it left off.
    /// [default: ROOT/containers/<mountpoint key>/upper]
    #[arg(long, value_name = "DIR")]
    pub upper: Option<PathBuf>,
    /// Scratch directory on the same filesystem as --upper (the overlayfs
    /// `workdir`). [default: a sibling of the upper dir named `<name>.work`]
    #[arg(long, value_name = "DIR", requires = "upper")]
    pub work: Option<PathBuf>,
    /// Serve the mount in this process until it is unmounted.
    #[arg(long)]
    pub foreground: bool,
    /// Serve the mount from a process of its own instead of the daemon
    /// (debugging; `--foreground` implies it).
    #[arg(long, env = "RMOUNT_NO_DAEMON", value_parser = clap::builder::FalseyValueParser::new())]
    pub no_daemon: bool,
    /// Memory for decompressed spans, in MiB: the whole daemon's when this
    /// command starts it (a running daemon keeps its own), or this mount's
    /// with --no-daemon.
    #[arg(long, value_name = "MIB", default_value_t = 256)]
    pub cache_mem: u64,
    /// Disk space for chunks fetched by lazy mounts (ROOT/cache/chunks),
    /// shared by every mount; 0 keeps them in memory only. Like
    /// --cache-mem, it sets a daemon this command starts.
    #[arg(long, value_name = "SIZE", default_value = "10G", value_parser = parse_size_arg)]
    pub cache_size: u64,
    /// Seconds a read keeps retrying a failed fetch before it fails with EIO.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub fetch_timeout: u64,
    /// After mounting, fetch the rest of a lazily mounted image in the background.
    #[arg(long, value_enum, default_value_t = PrefetchArg::None)]
    pub prefetch: PrefetchArg,
    /// Bandwidth limit of --prefetch all, bytes per second (e.g. 20M).
    #[arg(long, value_name = "SIZE", value_parser = parse_size_arg)]
    pub prefetch_rate: Option<u64>,
    /// The file list for --prefetch recorded. [default: the list published
    /// with the image's index artifact]
    #[arg(long, value_name = "FILE")]
    pub prefetch_list: Option<PathBuf>,
    /// Save the list of files read through the mount to FILE when it is
    /// unmounted (for `rmount index build --prefetch-list`).
    #[arg(long, value_name = "FILE")]
    pub record: Option<PathBuf>,
    /// Platform of a multi-platform image not in the store (os/arch[/variant]).
    #[arg(long, value_name = "PLATFORM")]
    pub platform: Option<String>,
    /// How to reach the registry of an image that is not in the store.
    #[command(flatten)]
    pub registry: RegistryArgs,
}

/// What a lazy mount fetches before it is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PrefetchArg {
    /// Only what is read.
    None,
    /// Everything, in the background, after the mount is ready.
    All,
    /// The files a recorded workload read (--prefetch-list, or the list
    /// published with the index artifact), in parallel, after the mount is ready.
    Recorded,
}

fn parse_size_arg(text: &str) -> Result<u64, String> {
    crate::cache::parse_size(text)
}

/// `rmount index`.
#[derive(Debug, Args)]
pub struct IndexArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: IndexCommand,
}

/// The `rmount index` subcommands.
#[derive(Debug, Subcommand)]
pub enum IndexCommand {
    /// Index the layers of a stored image; with --push, publish the indexes to its registry.
    ///
    /// The indexes travel as an OCI artifact whose subject is the image's
    /// manifest: the image, its digest and its signatures stay unchanged,
    /// and lazy mounts fetch the indexes instead of downloading whole layers
    /// to build them.
    Build(IndexBuildArgs),
}

/// `rmount index build`.
#[derive(Debug, Args)]
pub struct IndexBuildArgs {
    /// Stored image (pull or load it first).
    #[arg(value_name = "REF")]
    pub reference: String,
    /// Publish the indexes in the registry (the image must be pushed there).
    #[arg(long)]
    pub push: bool,
    /// Repository to publish to. [default: REF's]
    #[arg(long, value_name = "DEST", requires = "push")]
    pub dest: Option<String>,
    /// Embed the files a workload read (what `rmount mount --record FILE`
    /// wrote) for `rmount mount --prefetch recorded`; files of layers that
    /// are not the image's are left out.
    #[arg(long, value_name = "FILE")]
    pub prefetch_list: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// How to reach the registry.
    #[command(flatten)]
    pub registry: RegistryArgs,
}

/// `rmount stats`.
#[derive(Debug, Args)]
pub struct StatsArgs {
    /// Mountpoint.
    #[arg(value_name = "DIR")]
    pub mountpoint: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `rmount umount`.
#[derive(Debug, Args)]
pub struct UmountArgs {
    /// Mountpoint.
    #[arg(value_name = "DIR")]
    pub mountpoint: PathBuf,
    /// Force the unmount even if the filesystem is busy.
    #[arg(short, long)]
    pub force: bool,
    /// Delete the mount's upper layer (its changes) after unmounting.
    #[arg(long)]
    pub discard: bool,
}

// Packed by hand: rustfmt puts one per line once an element is longer than 10 characters.
#[rustfmt::skip]
const SUBCOMMANDS: &[&str] = &[
    "pull", "push", "login", "logout", "load", "save", "images", "inspect", "history", "tag",
    "rmi", "prune", "df", "mount", "stats", "umount", "unmount", "commit", "diff", "export",
    "index", "daemon", "ps", "mounts", "containerd", "help",
];

/// Rewrites `rmount [OPTS] REF DIR …` into `rmount [OPTS] mount REF DIR …`.
fn expand_short_form(mut args: Vec<String>) -> Vec<String> {
    let mut i = 1;
    while i < args.len() {
        let a = &args[i];
        if a == "--root" || a == "--log-format" {
            i += 2;
            continue;
        }
        if a.starts_with('-') {
            i += 1;
            continue;
        }
        if !SUBCOMMANDS.contains(&a.as_str()) {
            args.insert(i, "mount".to_string());
        }
        break;
    }
    args
}

fn default_root() -> PathBuf {
    if rustix::process::geteuid().is_root() {
        return PathBuf::from("/var/lib/rmount");
    }
    let data = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    data.join("rmount")
}

fn init_logging(verbose: u8, format: &str) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if format == "json" {
        fmt.json().with_ansi(false).init();
    } else {
        fmt.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init();
    }
}

/// Entry point of the `rmount` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse_from(expand_short_form(std::env::args().collect()));
    // A daemon's log is read after the fact: it keeps the info lines (which
    // mounts it serves, restarts) unless told otherwise.
    let verbose = match cli.command {
        Command::Daemon(_) => {
            // Its keeper and worker processes log the same way.
            std::env::set_var("RMOUNT_LOG_FORMAT", &cli.log_format);
            cli.verbose.max(1)
        }
        _ => cli.verbose,
    };
    init_logging(verbose, &cli.log_format);
    let root = cli.root.clone().unwrap_or_else(default_root);
    let result = match cli.command {
        Command::Pull(a) => registry::pull(&root, &a),
        Command::Push(a) => registry::push(&root, &a),
        Command::Login(a) => registry::login(&a),
        Command::Logout(a) => registry::logout(&a),
        Command::Load(a) => images::load(&root, &a),
        Command::Save(a) => images::save(&root, &a),
        Command::Images(a) => images::list(&root, &a),
        Command::Inspect(a) => images::inspect(&root, &a),
        Command::History(a) => images::history(&root, &a),
        Command::Tag(a) => images::tag(&root, &a),
        Command::Rmi(a) => images::rmi(&root, &a),
        Command::Prune(a) => images::prune(&root, &a),
        Command::Df(a) => images::df(&root, &a),
        Command::Mount(a) => mount::mount(&root, &a),
        Command::Umount(a) => mount::umount(&root, &a),
        Command::Stats(a) => mount::stats(&root, &a),
        Command::Commit(a) => commit::commit(&root, &a),
        Command::Diff(a) => commit::diff(&root, &a),
        Command::Export(a) => commit::export(&root, &a),
        Command::Index(a) => index::index(&root, &a),
        Command::Daemon(a) => daemon::daemon(&root, &a),
        Command::Ps(a) => daemon::ps(&root, &a),
        Command::Containerd(a) => containerd::containerd(&a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rmount: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn short_form_becomes_mount() {
        assert_eq!(expand_short_form(v("rmount nginx /mnt")), v("rmount mount nginx /mnt"));
        assert_eq!(
            expand_short_form(v("rmount --root /r -v nginx /mnt")),
            v("rmount --root /r -v mount nginx /mnt")
        );
        assert_eq!(expand_short_form(v("rmount images --json")), v("rmount images --json"));
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
