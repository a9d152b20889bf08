//! containerd's Snapshots API v1 over gRPC (tonic), as a proxy snapshotter
//! plugin: each call runs the [`Snapshots`] operation on tokio's blocking
//! pool and maps [`SnapshotError`] to the gRPC code containerd's `errdefs`
//! turns back into its own error kinds.

use super::remote::{self, LazyLayers, LazyRequest};
use super::{Filter, Info, Kind, Mount, SnapshotError, Snapshots};
use crate::containerd::api::services::snapshots::v1 as pb;
use crate::containerd::api::types;
use chrono::{DateTime, Utc};
use pb::snapshots_server::SnapshotsServer;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// Infos per `List` reply message.
const LIST_BATCH: usize = 100;

/// What mounts an active snapshot whose parent is served lazily.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ActiveUnion {
    /// Kernel overlayfs over the FUSE-mounted layers (containerd mounts it).
    #[default]
    Overlayfs,
    /// rmount's own writable FUSE union, for kernels whose overlayfs
    /// refuses a FUSE lower (containerd bind-mounts it).
    Fuse,
}

/// The gRPC service.
#[derive(Clone)]
pub struct SnapshotService {
    snapshots: Arc<Snapshots>,
    lazy: Option<Arc<dyn LazyLayers>>,
    union: ActiveUnion,
}

impl SnapshotService {
    /// Serves `snapshots`; with `lazy`, layers whose `Prepare` labels say
    /// which image they belong to are served lazily (see [`remote`]), and
    /// active snapshots on them are mounted as `union` says.
    pub fn new(
        snapshots: Arc<Snapshots>,
        lazy: Option<Arc<dyn LazyLayers>>,
        union: ActiveUnion,
    ) -> Self {
        Self { snapshots, lazy, union }
    }

    /// The tonic server for this service.
    pub fn into_server(self) -> SnapshotsServer<SnapshotService> {
        SnapshotsServer::new(self)
    }

    /// Runs `op` on the blocking pool with this service's state.
    async fn run<T: Send + 'static>(
        &self,
        op: impl FnOnce(&SnapshotService) -> Result<T, SnapshotError> + Send + 'static,
    ) -> Result<Response<T>, Status> {
        let this = self.clone();
        match tokio::task::spawn_blocking(move || op(&this)).await {
            Ok(Ok(value)) => Ok(Response::new(value)),
            Ok(Err(e)) => Err(status(e)),
            Err(e) => Err(Status::internal(format!("snapshotter task failed: {e}"))),
        }
    }

    fn prepare(
        &self,
        key: &str,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, SnapshotError> {
        tracing::debug!(key, parent, ?labels, "prepare");
        if let (Some(lazy), Some(request)) = (&self.lazy, LazyRequest::from_labels(&labels)) {
            if remote::try_lazy(&self.snapshots, lazy.as_ref(), parent, &request, labels.clone())? {
                return Err(SnapshotError::AlreadyExists(format!(
                    "target snapshot {} (served lazily by rmount)",
                    request.target
                )));
            }
        }
        if let (ActiveUnion::Fuse, Some(lazy), Some(parent)) = (self.union, &self.lazy, parent) {
            if self.snapshots.remote_of(parent)?.is_some() {
                return remote::prepare_fuse_union(
                    &self.snapshots,
                    lazy.as_ref(),
                    key,
                    parent,
                    labels,
                );
            }
        }
        self.snapshots.prepare(key, parent, labels)
    }
}

/// The gRPC status for a snapshotter error.
fn status(e: SnapshotError) -> Status {
    let message = e.to_string();
    match e {
        SnapshotError::NotFound(_) => Status::not_found(message),
        SnapshotError::AlreadyExists(_) => Status::already_exists(message),
        SnapshotError::FailedPrecondition(_) => Status::failed_precondition(message),
        SnapshotError::InvalidArgument(_) => Status::invalid_argument(message),
        SnapshotError::Db(_) | SnapshotError::Corrupt(_) | SnapshotError::Io { .. } => {
            Status::internal(message)
        }
    }
}

fn parent(parent: &str) -> Option<&str> {
    (!parent.is_empty()).then_some(parent)
}

fn sorted(labels: HashMap<String, String>) -> BTreeMap<String, String> {
    labels.into_iter().collect()
}

fn mounts(mounts: Vec<Mount>) -> Vec<types::Mount> {
    mounts
        .into_iter()
        .map(|m| types::Mount {
            r#type: m.kind,
            source: m.source,
            target: String::new(),
            options: m.options,
        })
        .collect()
}

fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 }
}

fn to_proto(info: Info) -> pb::Info {
    pb::Info {
        name: info.name,
        parent: info.parent.unwrap_or_default(),
        kind: match info.kind {
            Kind::View => pb::Kind::View,
            Kind::Active => pb::Kind::Active,
            Kind::Committed => pb::Kind::Committed,
        } as i32,
        created_at: Some(timestamp(info.created)),
        updated_at: Some(timestamp(info.updated)),
        labels: info.labels.into_iter().collect(),
    }
}

fn from_proto(info: pb::Info) -> Result<Info, SnapshotError> {
    let kind = match pb::Kind::try_from(info.kind) {
        Ok(pb::Kind::View) => Kind::View,
        Ok(pb::Kind::Active) => Kind::Active,
        Ok(pb::Kind::Committed) => Kind::Committed,
        _ => return Err(SnapshotError::InvalidArgument(format!("snapshot kind {}", info.kind))),
    };
    Ok(Info {
        name: info.name,
        parent: parent(&info.parent).map(str::to_owned),
        kind,
        labels: sorted(info.labels),
        created: Utc::now(),
        updated: Utc::now(),
    })
}

#[tonic::async_trait]
impl pb::snapshots_server::Snapshots for SnapshotService {
    async fn prepare(
        &self,
        request: Request<pb::PrepareSnapshotRequest>,
    ) -> Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let r = request.into_inner();
        self.run(move |s| {
            let made = s.prepare(&r.key, parent(&r.parent), sorted(r.labels))?;
            Ok(pb::PrepareSnapshotResponse { mounts: mounts(made) })
        })
        .await
    }

    async fn view(
        &self,
        request: Request<pb::ViewSnapshotRequest>,
    ) -> Result<Response<pb::ViewSnapshotResponse>, Status> {
        let r = request.into_inner();
        self.run(move |s| {
            let made = s.snapshots.view(&r.key, parent(&r.parent), sorted(r.labels))?;
            Ok(pb::ViewSnapshotResponse { mounts: mounts(made) })
        })
        .await
    }

    async fn mounts(
        &self,
        request: Request<pb::MountsRequest>,
    ) -> Result<Response<pb::MountsResponse>, Status> {
        let r = request.into_inner();
        self.run(move |s| Ok(pb::MountsResponse { mounts: mounts(s.snapshots.mounts(&r.key)?) }))
            .await
    }

    async fn commit(
        &self,
        request: Request<pb::CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        self.run(move |s| {
            remote::commit(&s.snapshots, s.lazy.as_deref(), &r.name, &r.key, sorted(r.labels))
        })
        .await
    }

    async fn remove(
        &self,
        request: Request<pb::RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        self.run(move |s| remote::remove(&s.snapshots, s.lazy.as_deref(), &r.key)).await
    }

    async fn stat(
        &self,
        request: Request<pb::StatSnapshotRequest>,
    ) -> Result<Response<pb::StatSnapshotResponse>, Status> {
        let r = request.into_inner();
        self.run(move |s| {
            Ok(pb::StatSnapshotResponse { info: Some(to_proto(s.snapshots.stat(&r.key)?)) })
        })
        .await
    }

    async fn update(
        &self,
        request: Request<pb::UpdateSnapshotRequest>,
    ) -> Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let r = request.into_inner();
        self.run(move |s| {
            let info = r.info.ok_or_else(|| SnapshotError::InvalidArgument("no info".into()))?;
            let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
            let paths: Vec<&str> = paths.iter().map(String::as_str).collect();
            let updated = s.snapshots.update(&from_proto(info)?, &paths)?;
            Ok(pb::UpdateSnapshotResponse { info: Some(to_proto(updated)) })
        })
        .await
    }

    type ListStream =
        tokio_stream::Iter<std::vec::IntoIter<Result<pb::ListSnapshotsResponse, Status>>>;

    async fn list(
        &self,
        request: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let r = request.into_inner();
        let infos = self
            .run(move |s| {
                let filter = Filter::parse(&r.filters)?;
                s.snapshots.walk(|info| filter.matches(info))
            })
            .await?
            .into_inner();
        let mut batches: Vec<Result<pb::ListSnapshotsResponse, Status>> = Vec::new();
        let mut infos = infos.into_iter().map(to_proto).peekable();
        while infos.peek().is_some() {
            let info = infos.by_ref().take(LIST_BATCH).collect();
            batches.push(Ok(pb::ListSnapshotsResponse { info }));
        }
        Ok(Response::new(tokio_stream::iter(batches)))
    }

    async fn usage(
        &self,
        request: Request<pb::UsageRequest>,
    ) -> Result<Response<pb::UsageResponse>, Status> {
        let r = request.into_inner();
        self.run(move |s| {
            let usage = s.snapshots.usage(&r.key)?;
            Ok(pb::UsageResponse { size: usage.size as i64, inodes: usage.inodes as i64 })
        })
        .await
    }

    async fn cleanup(&self, _request: Request<pb::CleanupRequest>) -> Result<Response<()>, Status> {
        self.run(|s| {
            for path in s.snapshots.cleanup()? {
                tracing::info!(path = %path.display(), "removed an orphan snapshot dir");
            }
            Ok(())
        })
        .await
    }
}

/// Serves `service` on the Unix socket `listener` until the process ends,
/// on a small tokio runtime of its own.
pub fn serve(
    service: SnapshotService,
    listener: std::os::unix::net::UnixListener,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("snapshotter")
        .enable_io()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::UnixListener::from_std(listener)?;
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        tonic::transport::Server::builder()
            .add_service(service.into_server())
            .serve_with_incoming(incoming)
            .await
            .map_err(std::io::Error::other)
    })
}
