//! The one error type of filesystem requests and its errno table: every
//! request handler returns `Result<_, FsError>` and replies with `errno()`.

use crate::layer::LayerError;
use fuser::Errno;

/// Why a filesystem request failed; each maps to one errno.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// No such inode or name.
    #[error("no such file or directory")]
    NotFound,
    /// The inode is not a directory.
    #[error("not a directory")]
    NotDir,
    /// The inode is a directory where a non-directory is needed.
    #[error("is a directory")]
    IsDir,
    /// The name already exists.
    #[error("file exists")]
    Exists,
    /// The directory still shows entries.
    #[error("directory not empty")]
    NotEmpty,
    /// The inode is not a symlink / not a regular file, or a bad argument.
    #[error("invalid argument")]
    Invalid,
    /// The operation is refused (e.g. overlay-private xattrs).
    #[error("operation not permitted")]
    NotPermitted,
    /// No such extended attribute.
    #[error("no such attribute")]
    NoAttr,
    /// The caller's buffer is too small.
    #[error("buffer too small")]
    Range,
    /// A write on the read-only mount.
    #[error("read-only file system")]
    ReadOnly,
    /// `ESTALE`: the inode the kernel names (one a previous server handed
    /// out) does not exist any more. The kernel answers a path walk that
    /// meets it by walking again and revalidating every name
    /// (`LOOKUP_REVAL`), learning the current inodes.
    #[error("stale file handle")]
    Stale,
    /// Reading layer data failed.
    #[error(transparent)]
    Layer(#[from] LayerError),
    /// A system call on the upper directory failed; its errno is passed on.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl From<rustix::io::Errno> for FsError {
    fn from(e: rustix::io::Errno) -> Self {
        FsError::Io(e.into())
    }
}

impl FsError {
    /// The errno the kernel gets.
    pub fn errno(&self) -> Errno {
        match self {
            FsError::NotFound => Errno::ENOENT,
            FsError::NotDir => Errno::ENOTDIR,
            FsError::IsDir => Errno::EISDIR,
            FsError::Exists => Errno::EEXIST,
            FsError::NotEmpty => Errno::ENOTEMPTY,
            FsError::Invalid => Errno::EINVAL,
            FsError::NotPermitted => Errno::EPERM,
            FsError::NoAttr => Errno::NO_XATTR,
            FsError::Range => Errno::ERANGE,
            FsError::ReadOnly => Errno::EROFS,
            FsError::Stale => Errno::ESTALE,
            FsError::Layer(e) => {
                tracing::error!("{e}");
                Errno::EIO
            }
            FsError::Io(e) => match e.raw_os_error() {
                Some(code) => Errno::from_i32(code),
                None => {
                    tracing::error!("{e}");
                    Errno::EIO
                }
            },
        }
    }
}
