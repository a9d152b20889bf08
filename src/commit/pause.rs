//! Freezing a mount's serving process while its upper is read, so a commit
//! or export of a live mount sees one consistent state.
//!
//! Every change reaches the upper through the serving process (the FUSE
//! server), and each of its namespace operations is atomic on disk (built
//! in the work dir, renamed in). `SIGSTOP` therefore freezes the upper in a
//! consistent state: an operation in a syscall finishes it, the next one
//! waits; writers on the mount block until `SIGCONT`. The commit must never
//! touch the mountpoint itself meanwhile (it would wait for the frozen
//! server forever): it reads the upper dir and the blobs directly.
//!
//! [`Pause`] resumes the process on drop, so an error never leaves the
//! mount frozen. A `kill -9` of the committing process skips every drop,
//! so a watchdog covers that case: a tiny `sh` in its own process group
//! (a Ctrl-C of the commit must not kill it first) that blocks reading a
//! pipe only we hold, and sends `SIGCONT` when the pipe closes, which the
//! kernel does however we exit.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

/// The serving process is stopped while this lives.
#[derive(Debug)]
pub struct Pause {
    pid: rustix::process::Pid,
    /// The watchdog and the write end of its pipe (see the module doc).
    watchdog: Option<(Child, ChildStdin)>,
}

/// Starts the watchdog that resumes `pid` once our end of its pipe closes.
fn watchdog(pid: u32) -> Option<(Child, ChildStdin)> {
    let spawned = Command::new("sh")
        .args(["-c", "read _ ; kill -CONT \"$0\"", &pid.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn();
    match spawned {
        Ok(mut child) => {
            let stdin = child.stdin.take()?;
            Some((child, stdin))
        }
        Err(e) => {
            tracing::warn!("no watchdog for the paused process {pid} ({e}): if this process is killed, resume it with `kill -CONT {pid}`");
            None
        }
    }
}

/// How long to wait for every thread to reach the stopped state.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

impl Pause {
    /// Stops process `pid` and waits until all its threads are stopped.
    pub fn stop(pid: u32) -> std::io::Result<Pause> {
        let raw = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw);
        let pid_t = raw.ok_or_else(|| std::io::Error::other(format!("bad pid {pid}")))?;
        let watchdog = watchdog(pid);
        rustix::process::kill_process(pid_t, rustix::process::Signal::STOP)?;
        let pause = Pause { pid: pid_t, watchdog };
        let start = Instant::now();
        while !all_stopped(pid) {
            if start.elapsed() > STOP_TIMEOUT {
                return Err(std::io::Error::other(format!(
                    "the serving process {pid} did not stop within {STOP_TIMEOUT:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(pause)
    }
}

/// Are all threads of `pid` stopped (state `T` or `t`)? A process that is
/// gone counts as stopped: nothing of it can write any more.
fn all_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return true };
    tasks.flatten().all(|task| {
        std::fs::read_to_string(task.path().join("stat")).map_or(true, |stat| {
            stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with(['T', 't', 'Z', 'X']))
        })
    })
}

impl Drop for Pause {
    fn drop(&mut self) {
        if let Err(e) = rustix::process::kill_process(self.pid, rustix::process::Signal::CONT) {
            tracing::warn!("resuming the serving process {:?}: {e}", self.pid);
        }
        if let Some((mut child, mut stdin)) = self.watchdog.take() {
            let _ = stdin.write_all(b"done\n");
            drop(stdin);
            let _ = child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(pid: u32) -> char {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        stat.rsplit_once(") ").unwrap().1.chars().next().unwrap()
    }

    #[test]
    fn stops_and_resumes() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        {
            let _pause = Pause::stop(pid).unwrap();
            assert_eq!(state(pid), 'T');
        }
        std::thread::sleep(Duration::from_millis(20));
        assert_ne!(state(pid), 'T');
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn watchdog_resumes_when_the_pauser_dies() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        let pause = Pause::stop(pid).unwrap();
        assert_eq!(state(pid), 'T');
        // What a kill -9 of this process does: no Drop, the pipe just closes.
        let (mut dog, stdin) = {
            let mut pause = std::mem::ManuallyDrop::new(pause);
            pause.watchdog.take().unwrap()
        };
        drop(stdin);
        dog.wait().unwrap();
        assert_ne!(state(pid), 'T');
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
