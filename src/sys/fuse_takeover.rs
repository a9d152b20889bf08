//! Serving a FUSE connection that another process initialized: the heart of
//! restarting the daemon without breaking its mounts.
//!
//! The kernel keeps a FUSE connection alive as long as one open file refers
//! to its `/dev/fuse` device, so a process that holds a duplicate of the fd
//! (the daemon's keeper) keeps every mount answering while the serving
//! process is replaced. The new process must then serve that fd without
//! the `INIT` handshake, which the kernel sends only once per connection.
//! fuser 0.18 can only wrap an fd by reading `INIT` from it, so
//! [`adopt_session`] lets it handshake over a socket that carries a
//! synthetic `INIT`, then swaps the real device in under the same fd
//! number with `dup3` before any request is read. Requests the previous
//! process had read but not answered are queued again with
//! `FUSE_NOTIFY_RESEND` (Linux 6.9+): [`resend_pending`].

use fuser::{Config, Filesystem, Session, SessionACL};
use rustix::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use rustix::net::{
    recvmsg, sendmsg, socketpair, AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage,
    RecvFlags, SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::{ManuallyDrop, MaybeUninit};

/// `FUSE_INIT`.
const OPCODE_INIT: u32 = 26;
/// `FUSE_NOTIFY_RESEND`.
const NOTIFY_RESEND: i32 = 7;

/// The `INIT` request a kernel of this era sends: `fuse_in_header` (40
/// bytes) then `fuse_init_in` (64 bytes), offering every capability, so the
/// filesystem's `init` asks for exactly what it asked for the first time
/// (the kernel granted that then; it does not renegotiate).
fn synthetic_init() -> Vec<u8> {
    let mut message = Vec::with_capacity(104);
    let u32s = |m: &mut Vec<u8>, values: &[u32]| {
        values.iter().for_each(|v| m.extend_from_slice(&v.to_ne_bytes()))
    };
    u32s(&mut message, &[104, OPCODE_INIT]);
    message.extend_from_slice(&1u64.to_ne_bytes()); // unique
    message.extend_from_slice(&0u64.to_ne_bytes()); // nodeid
    u32s(&mut message, &[0, 0, 0, 0]); // uid, gid, pid, padding
                                       // Version 7.45, 4 MiB read-ahead, every flag in `flags` (which
                                       // includes FUSE_INIT_EXT) and `flags2`.
    u32s(&mut message, &[7, 45, 4 << 20, u32::MAX, u32::MAX]);
    u32s(&mut message, &[0; 11]);
    message
}

/// A fuser session over `device`, a `/dev/fuse` fd whose connection is
/// already initialized (see the module doc). `config.clone_fd` must be
/// off: cloned fds are private to this process, and requests in flight on
/// them would be aborted if it died.
pub fn adopt_session<FS: Filesystem>(
    filesystem: FS,
    device: OwnedFd,
    acl: SessionACL,
    config: Config,
) -> io::Result<Session<FS>> {
    let (ours, theirs) =
        socketpair(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None)?;
    rustix::io::write(&ours, &synthetic_init())?;
    let session = Session::from_fd(filesystem, theirs, acl, config)?;
    // The handshake's reply went to `ours`; dropping it discards it.
    drop(ours);
    let number = session.as_fd().as_raw_fd();
    // SAFETY: `number` is the session's own open fd; we only borrow it as
    // an `OwnedFd` for `dup3` (which replaces the file it refers to
    // atomically) and never close it: `ManuallyDrop`.
    let mut slot = ManuallyDrop::new(unsafe { OwnedFd::from_raw_fd(number) });
    rustix::io::dup3(&device, &mut slot, rustix::io::DupFlags::CLOEXEC)?;
    Ok(session)
}

/// Asks the kernel to queue again every request of this connection that a
/// previous server read but never answered (`FUSE_NOTIFY_RESEND`).
pub fn resend_pending(device: BorrowedFd<'_>) -> io::Result<()> {
    let mut header = Vec::with_capacity(16);
    header.extend_from_slice(&16u32.to_ne_bytes());
    header.extend_from_slice(&NOTIFY_RESEND.to_ne_bytes());
    header.extend_from_slice(&0u64.to_ne_bytes());
    rustix::io::write(device, &header)?;
    Ok(())
}

/// Sends `payload` and, if given, one fd over a Unix socket (`SCM_RIGHTS`).
pub fn send_with_fd(
    socket: BorrowedFd<'_>,
    payload: &[u8],
    fd: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut ancillary = SendAncillaryBuffer::new(&mut space);
    let fds = fd.map(|fd| [fd]);
    if let Some(fds) = &fds {
        ancillary.push(SendAncillaryMessage::ScmRights(fds));
    }
    sendmsg(socket, &[IoSlice::new(payload)], &mut ancillary, SendFlags::NOSIGNAL)?;
    Ok(())
}

/// Receives one message (at most 64 KiB) and the fd it carries, if any.
/// An empty payload means the peer closed the socket.
pub fn recv_with_fd(socket: BorrowedFd<'_>) -> io::Result<(Vec<u8>, Option<OwnedFd>)> {
    let mut buffer = vec![0u8; 64 << 10];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut ancillary = RecvAncillaryBuffer::new(&mut space);
    let received = recvmsg(
        socket,
        &mut [IoSliceMut::new(&mut buffer)],
        &mut ancillary,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fd = None;
    for message in ancillary.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = message {
            fd = fds.into_iter().next().or(fd);
        }
    }
    buffer.truncate(received.bytes);
    Ok((buffer, fd))
}

/// Makes `fd` survive `exec` (clears `FD_CLOEXEC`), for handing it to a
/// new process by inheritance.
pub fn inherit_across_exec(fd: BorrowedFd<'_>) -> io::Result<()> {
    rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty())?;
    Ok(())
}

/// Takes ownership of an fd this process inherited (listed to it by number).
pub fn inherited_fd(number: i32) -> io::Result<OwnedFd> {
    // Refuse numbers that are not open, so we never adopt a stranger's fd
    // by a typo; stdio is never ours to take.
    if number < 3 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "fd number below 3"));
    }
    // SAFETY: only a borrow to check the fd is open.
    let borrowed = unsafe { BorrowedFd::borrow_raw(number) };
    let flags = rustix::io::fcntl_getfd(borrowed)?;
    // SAFETY: the fd is open, and the process that exec'd us listed it as
    // ours alone; it is marked close-on-exec again right away.
    let fd = unsafe { OwnedFd::from_raw_fd(number) };
    rustix::io::fcntl_setfd(&fd, flags | rustix::io::FdFlags::CLOEXEC)?;
    Ok(fd)
}
