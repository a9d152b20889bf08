//! Telling systemd (when it started us with `Type=notify`) that the daemon
//! serves, and which process is the main one: the keeper, which can change
//! when a worker hands the mounts to a new keeper.

use std::os::unix::net::UnixDatagram;

/// Sends `READY=1` and `MAINPID=<keeper>` to `$NOTIFY_SOCKET`, if set.
/// Failure only costs a warning: the daemon serves either way.
pub fn notify_ready(keeper_pid: u32) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let message = format!("READY=1\nMAINPID={keeper_pid}\n");
    let sent = UnixDatagram::unbound().and_then(|socket| {
        let bytes = path.as_encoded_bytes();
        match bytes.strip_prefix(b"@") {
            // An abstract socket name.
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                let address = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                socket.send_to_addr(message.as_bytes(), &address)
            }
            None => socket.send_to(message.as_bytes(), &path),
        }
    });
    if let Err(e) = sent {
        tracing::warn!("cannot notify systemd at {}: {e}", path.to_string_lossy());
    }
}
