//! A small synchronous client of containerd's gRPC API (the content,
//! images, leases, diff and snapshots services), over its Unix socket.
//!
//! Every request carries `containerd-namespace` and, once a lease is set,
//! `containerd-lease` (an [`Interceptor`](tonic::service::Interceptor)), so
//! content and snapshots created meanwhile are safe from containerd's
//! garbage collector. The calls block: the client owns a small tokio
//! runtime, so callers (and rmount's blocking registry client) need none.

use super::api::services::content::v1 as content;
use super::api::services::diff::v1 as diff;
use super::api::services::images::v1 as images;
use super::api::services::leases::v1 as leases;
use super::api::services::snapshots::v1 as snapshots;
use super::api::types::{Descriptor, Mount};
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

/// Bytes per `WriteContentRequest` when streaming a blob into containerd
/// (its gRPC server accepts messages up to 16 MiB).
const WRITE_CHUNK: usize = 1 << 20;

/// The GC label that makes a lease expire on its own.
pub const LEASE_EXPIRE_LABEL: &str = "containerd.io/gc.expire";

/// Errors talking to containerd.
#[derive(Debug, thiserror::Error)]
pub enum ContainerdError {
    /// The socket does not answer.
    #[error("cannot connect to containerd at {address}: {reason} (is containerd running? --address names its socket)")]
    Connect {
        /// The socket.
        address: PathBuf,
        /// Why.
        reason: String,
    },
    /// A call failed.
    #[error("containerd {call}: {message} ({code:?})")]
    Call {
        /// The service method, e.g. `snapshots.Prepare`.
        call: &'static str,
        /// The gRPC status code.
        code: Code,
        /// containerd's message.
        message: String,
    },
    /// A namespace or lease that cannot travel as gRPC metadata.
    #[error("invalid {what} {value:?}: {reason}")]
    Invalid {
        /// `namespace` or `lease`.
        what: &'static str,
        /// The value.
        value: String,
        /// Why.
        reason: String,
    },
    /// The async runtime could not start, or reading data to send failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}

impl ContainerdError {
    /// The gRPC code of a failed call (`None` for other errors).
    pub fn code(&self) -> Option<Code> {
        match self {
            ContainerdError::Call { code, .. } => Some(*code),
            _ => None,
        }
    }

    fn call(call: &'static str) -> impl FnOnce(Status) -> ContainerdError {
        move |status| ContainerdError::Call {
            call,
            code: status.code(),
            message: status.message().to_string(),
        }
    }
}

type Result<T, E = ContainerdError> = std::result::Result<T, E>;

/// Adds containerd's namespace and lease headers to every request.
#[derive(Clone)]
pub struct Headers {
    namespace: MetadataValue<Ascii>,
    lease: Option<MetadataValue<Ascii>>,
}

impl tonic::service::Interceptor for Headers {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        let metadata = request.metadata_mut();
        metadata.insert("containerd-namespace", self.namespace.clone());
        if let Some(lease) = &self.lease {
            metadata.insert("containerd-lease", lease.clone());
        }
        Ok(request)
    }
}

type Service = InterceptedService<Channel, Headers>;

/// What `Prepare` answered.
#[derive(Debug, Clone)]
pub enum Prepared {
    /// The mounts of the new active snapshot (unpack into them).
    Mounts(Vec<Mount>),
    /// `ALREADY_EXISTS`: the snapshotter made the target itself (a remote snapshot).
    AlreadyExists,
}

/// A connection to containerd in one namespace.
pub struct ContainerdClient {
    runtime: tokio::runtime::Runtime,
    channel: Channel,
    address: PathBuf,
    headers: Headers,
}

fn metadata_value(what: &'static str, value: &str) -> Result<MetadataValue<Ascii>> {
    value.parse().map_err(|e: tonic::metadata::errors::InvalidMetadataValue| {
        ContainerdError::Invalid { what, value: value.to_string(), reason: e.to_string() }
    })
}

impl ContainerdClient {
    /// Connects to containerd's socket `address`, for namespace `namespace`.
    pub fn connect(address: &Path, namespace: &str) -> Result<Self> {
        if namespace.is_empty() {
            return Err(ContainerdError::Invalid {
                what: "namespace",
                value: String::new(),
                reason: "empty".into(),
            });
        }
        let headers = Headers { namespace: metadata_value("namespace", namespace)?, lease: None };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("containerd-client")
            .enable_all()
            .build()
            .map_err(|source| ContainerdError::Io {
                what: "starting the containerd client's runtime".into(),
                source,
            })?;
        let connect_error =
            |reason: String| ContainerdError::Connect { address: address.to_path_buf(), reason };
        // The URI is a placeholder: the connector dials the socket.
        let endpoint = Endpoint::try_from("http://[::]:50051")
            .map_err(|e| connect_error(e.to_string()))?
            .connect_timeout(Duration::from_secs(10));
        let socket = address.to_path_buf();
        let channel = runtime
            .block_on(endpoint.connect_with_connector(tower::service_fn(move |_| {
                let socket = socket.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(socket).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                }
            })))
            .map_err(|e| connect_error(error_chain(&e)))?;
        Ok(Self { runtime, channel, address: address.to_path_buf(), headers })
    }

    /// The socket this client talks to.
    pub fn address(&self) -> &Path {
        &self.address
    }

    /// Sends `containerd-lease: ID` with every request from now on (`None`: no lease).
    pub fn set_lease(&mut self, lease: Option<&str>) -> Result<()> {
        self.headers.lease = lease.map(|l| metadata_value("lease", l)).transpose()?;
        Ok(())
    }

    fn content(&self) -> content::content_client::ContentClient<Service> {
        content::content_client::ContentClient::with_interceptor(
            self.channel.clone(),
            self.headers.clone(),
        )
    }

    fn snapshots(&self) -> snapshots::snapshots_client::SnapshotsClient<Service> {
        snapshots::snapshots_client::SnapshotsClient::with_interceptor(
            self.channel.clone(),
            self.headers.clone(),
        )
    }

    fn images(&self) -> images::images_client::ImagesClient<Service> {
        images::images_client::ImagesClient::with_interceptor(
            self.channel.clone(),
            self.headers.clone(),
        )
    }

    fn leases(&self) -> leases::leases_client::LeasesClient<Service> {
        leases::leases_client::LeasesClient::with_interceptor(
            self.channel.clone(),
            self.headers.clone(),
        )
    }

    fn diff(&self) -> diff::diff_client::DiffClient<Service> {
        diff::diff_client::DiffClient::with_interceptor(self.channel.clone(), self.headers.clone())
    }

    /// Creates lease `id` that expires by itself after `expire` (should this
    /// process die before deleting it).
    pub fn create_lease(&self, id: &str, expire: Duration) -> Result<()> {
        let expire = chrono::Duration::from_std(expire).unwrap_or(chrono::Duration::hours(1));
        let at = (chrono::Utc::now() + expire).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let request = leases::CreateRequest {
            id: id.to_string(),
            labels: HashMap::from([(LEASE_EXPIRE_LABEL.to_string(), at)]),
        };
        let mut client = self.leases();
        self.runtime
            .block_on(client.create(request))
            .map_err(ContainerdError::call("leases.Create"))?;
        Ok(())
    }

    /// Deletes lease `id`; what it protected is then held by its GC
    /// references only.
    pub fn delete_lease(&self, id: &str) -> Result<()> {
        let request = leases::DeleteRequest { id: id.to_string(), sync: false };
        let mut client = self.leases();
        self.runtime
            .block_on(client.delete(request))
            .map_err(ContainerdError::call("leases.Delete"))?;
        Ok(())
    }

    /// The content store's record of `digest`, if it has it.
    pub fn content_info(&self, digest: &str) -> Result<Option<content::Info>> {
        let mut client = self.content();
        let request = content::InfoRequest { digest: digest.to_string() };
        match self.runtime.block_on(client.info(request)) {
            Ok(response) => Ok(response.into_inner().info),
            Err(status) if status.code() == Code::NotFound => Ok(None),
            Err(status) => Err(ContainerdError::call("content.Info")(status)),
        }
    }

    /// Sets `labels` on the content `digest` (other labels stay).
    pub fn update_content_labels(
        &self,
        digest: &str,
        labels: &HashMap<String, String>,
    ) -> Result<()> {
        if labels.is_empty() {
            return Ok(());
        }
        let request = content::UpdateRequest {
            info: Some(content::Info {
                digest: digest.to_string(),
                labels: labels.clone(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: labels.keys().map(|k| format!("labels.{k}")).collect(),
            }),
        };
        let mut client = self.content();
        self.runtime
            .block_on(client.update(request))
            .map_err(ContainerdError::call("content.Update"))?;
        Ok(())
    }

    /// Writes `data` (which must hash to `digest`) into the content store
    /// with `labels`, in one request. Returns false when containerd has it
    /// already (its labels are then updated).
    pub fn write_content(
        &self,
        write_ref: &str,
        digest: &str,
        data: &[u8],
        labels: &HashMap<String, String>,
    ) -> Result<bool> {
        self.write_content_from(write_ref, digest, data.len() as u64, data, labels)
    }

    /// Streams `size` bytes from `reader` into the content store as blob
    /// `digest`, `labels` set at the commit. containerd verifies size and
    /// digest before the blob becomes visible. Returns false when containerd
    /// has it already (its labels are then updated).
    pub fn write_content_from(
        &self,
        write_ref: &str,
        digest: &str,
        size: u64,
        mut reader: impl Read,
        labels: &HashMap<String, String>,
    ) -> Result<bool> {
        let (sender, receiver) = tokio::sync::mpsc::channel::<content::WriteContentRequest>(4);
        let mut client = self.content();
        // The call and its answers run on the runtime, while this thread reads and sends.
        let call = self.runtime.spawn(async move {
            let stream = tokio_stream::wrappers::ReceiverStream::new(receiver);
            let mut answers = client.write(stream).await?.into_inner();
            let mut last = None;
            while let Some(answer) = answers.message().await? {
                last = Some(answer);
            }
            Ok::<_, Status>(last)
        });
        let total = i64::try_from(size).unwrap_or(i64::MAX);
        let mut offset: u64 = 0;
        let mut buf = vec![0u8; WRITE_CHUNK];
        let mut read_error = None;
        loop {
            // Fill a whole chunk unless the data ends first.
            let mut filled = 0;
            while filled < buf.len() {
                match reader.read(&mut buf[filled..]) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        read_error = Some(e);
                        break;
                    }
                }
            }
            if read_error.is_some() {
                break;
            }
            let last = filled < buf.len() || offset + filled as u64 >= size;
            let request = content::WriteContentRequest {
                action: if last {
                    content::WriteAction::Commit
                } else {
                    content::WriteAction::Write
                } as i32,
                r#ref: write_ref.to_string(),
                total,
                expected: digest.to_string(),
                offset: i64::try_from(offset).unwrap_or(i64::MAX),
                data: buf[..filled].to_vec(),
                labels: if last { labels.clone() } else { HashMap::new() },
            };
            offset += filled as u64;
            // A closed channel means the call ended (an error): its result says why.
            if sender.blocking_send(request).is_err() || last {
                break;
            }
        }
        drop(sender);
        let outcome = self.runtime.block_on(call).map_err(|e| ContainerdError::Io {
            what: format!("writing {digest} to containerd"),
            source: std::io::Error::other(e.to_string()),
        })?;
        if let Some(source) = read_error {
            self.abort_write(write_ref);
            return Err(ContainerdError::Io { what: format!("reading {digest}"), source });
        }
        match outcome {
            Ok(_) => Ok(true),
            Err(status) if status.code() == Code::AlreadyExists => {
                self.update_content_labels(digest, labels)?;
                Ok(false)
            }
            Err(status) => {
                self.abort_write(write_ref);
                Err(ContainerdError::call("content.Write")(status))
            }
        }
    }

    /// Drops an unfinished write (best effort).
    fn abort_write(&self, write_ref: &str) {
        let mut client = self.content();
        let request = content::AbortRequest { r#ref: write_ref.to_string() };
        if let Err(status) = self.runtime.block_on(client.abort(request)) {
            if status.code() != Code::NotFound {
                tracing::debug!(write_ref, error = %status.message(), "aborting a content write");
            }
        }
    }

    /// `Stat` of snapshot `key`; `None` when it does not exist.
    pub fn stat_snapshot(&self, snapshotter: &str, key: &str) -> Result<Option<snapshots::Info>> {
        let request =
            snapshots::StatSnapshotRequest { snapshotter: snapshotter.into(), key: key.into() };
        let mut client = self.snapshots();
        match self.runtime.block_on(client.stat(request)) {
            Ok(response) => Ok(response.into_inner().info),
            Err(status) if status.code() == Code::NotFound => Ok(None),
            Err(status) => Err(ContainerdError::call("snapshots.Stat")(status)),
        }
    }

    /// `Prepare`s active snapshot `key` on `parent` (`""`: none).
    pub fn prepare_snapshot(
        &self,
        snapshotter: &str,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Prepared> {
        let request = snapshots::PrepareSnapshotRequest {
            snapshotter: snapshotter.into(),
            key: key.into(),
            parent: parent.into(),
            labels,
        };
        let mut client = self.snapshots();
        match self.runtime.block_on(client.prepare(request)) {
            Ok(response) => Ok(Prepared::Mounts(response.into_inner().mounts)),
            Err(status) if status.code() == Code::AlreadyExists => Ok(Prepared::AlreadyExists),
            Err(status) => Err(ContainerdError::call("snapshots.Prepare")(status)),
        }
    }

    /// `Commit`s active snapshot `key` as `name`.
    pub fn commit_snapshot(
        &self,
        snapshotter: &str,
        name: &str,
        key: &str,
        labels: HashMap<String, String>,
    ) -> Result<()> {
        let request = snapshots::CommitSnapshotRequest {
            snapshotter: snapshotter.into(),
            name: name.into(),
            key: key.into(),
            labels,
        };
        let mut client = self.snapshots();
        self.runtime
            .block_on(client.commit(request))
            .map_err(ContainerdError::call("snapshots.Commit"))?;
        Ok(())
    }

    /// `Remove`s snapshot `key`.
    pub fn remove_snapshot(&self, snapshotter: &str, key: &str) -> Result<()> {
        let request =
            snapshots::RemoveSnapshotRequest { snapshotter: snapshotter.into(), key: key.into() };
        let mut client = self.snapshots();
        self.runtime
            .block_on(client.remove(request))
            .map_err(ContainerdError::call("snapshots.Remove"))?;
        Ok(())
    }

    /// Has containerd's applier unpack `layer` (in the content store) into `mounts`.
    pub fn apply(&self, layer: Descriptor, mounts: Vec<Mount>) -> Result<Option<Descriptor>> {
        let request = diff::ApplyRequest { diff: Some(layer), mounts, ..Default::default() };
        let mut client = self.diff();
        let response = self
            .runtime
            .block_on(client.apply(request))
            .map_err(ContainerdError::call("diff.Apply"))?;
        Ok(response.into_inner().applied)
    }

    /// Creates image `name` pointing at `target`, or points the existing
    /// one there. Returns true when it was created.
    pub fn put_image(
        &self,
        name: &str,
        target: Descriptor,
        labels: HashMap<String, String>,
    ) -> Result<bool> {
        let image =
            images::Image { name: name.into(), labels, target: Some(target), ..Default::default() };
        let mut client = self.images();
        let create =
            images::CreateImageRequest { image: Some(image.clone()), ..Default::default() };
        match self.runtime.block_on(client.create(create)) {
            Ok(_) => Ok(true),
            Err(status) if status.code() == Code::AlreadyExists => {
                let mut paths = vec!["target".to_string()];
                paths.extend(image.labels.keys().map(|k| format!("labels.{k}")));
                let update = images::UpdateImageRequest {
                    image: Some(image),
                    update_mask: Some(prost_types::FieldMask { paths }),
                    ..Default::default()
                };
                self.runtime
                    .block_on(client.update(update))
                    .map_err(ContainerdError::call("images.Update"))?;
                Ok(false)
            }
            Err(status) => Err(ContainerdError::call("images.Create")(status)),
        }
    }
}

/// An error with its sources, `a: b: c`.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let more = e.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        source = e.source();
    }
    text
}
