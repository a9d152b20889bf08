//! Talking to a daemon: connect to its socket, send requests, read replies.

use super::protocol::{
    encode, Outcome, Reply, Request, RequestEnvelope, ResponseEnvelope, PROTOCOL_VERSION,
};
use super::DaemonError;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A connection to a daemon.
#[derive(Debug)]
pub struct DaemonClient {
    socket: PathBuf,
    stream: BufReader<UnixStream>,
}

impl DaemonClient {
    /// Connects to the daemon at `socket`.
    pub fn connect(socket: &Path) -> Result<Self, DaemonError> {
        match UnixStream::connect(socket) {
            Ok(stream) => Ok(Self { socket: socket.to_path_buf(), stream: BufReader::new(stream) }),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                Err(DaemonError::NotRunning(socket.to_path_buf()))
            }
            Err(e) => Err(DaemonError::io(format!("connecting to {}", socket.display()))(e)),
        }
    }

    /// Connects, waiting up to `limit` for a daemon that is starting (or
    /// restarting) to answer a ping.
    pub fn wait_ready(socket: &Path, limit: Duration) -> Result<(Self, Reply), DaemonError> {
        let start = Instant::now();
        loop {
            let attempt =
                Self::connect(socket).and_then(|mut c| c.call(Request::Ping).map(|r| (c, r)));
            match attempt {
                Ok(ready) => return Ok(ready),
                Err(e) if start.elapsed() >= limit => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    /// Sends `request` and reads its reply; an error reply becomes
    /// [`DaemonError::Refused`].
    pub fn call(&mut self, request: Request) -> Result<Reply, DaemonError> {
        let line = encode(&RequestEnvelope { version: PROTOCOL_VERSION, request });
        let what = || format!("talking to the daemon at {}", self.socket.display());
        self.stream.get_mut().write_all(&line).map_err(DaemonError::io(what()))?;
        let mut answer = String::new();
        let read = self.stream.read_line(&mut answer).map_err(DaemonError::io(what()))?;
        if read == 0 {
            return Err(DaemonError::Protocol("the daemon closed the connection".into()));
        }
        let response: ResponseEnvelope = serde_json::from_str(&answer)
            .map_err(|e| DaemonError::Protocol(format!("{e}: {}", answer.trim())))?;
        match response.outcome {
            Outcome::Ok { result } => Ok(result),
            Outcome::Error { kind, message } => Err(DaemonError::Refused { kind, message }),
        }
    }

    /// Blocks until the daemon closes the connection (or it breaks).
    pub fn wait_closed(mut self) {
        let mut rest = Vec::new();
        let _ = std::io::Read::read_to_end(&mut self.stream, &mut rest);
    }
}
