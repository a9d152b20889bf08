//! A small fixed pool of threads for requests that may block (a read that
//! must decompress a span first), so that the FUSE loop can go on answering
//! everything else. A reply moves to the worker with its job.

use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};

type Job = Box<dyn FnOnce() + Send + 'static>;

/// Threads taking jobs from one queue; they end when the pool is dropped.
pub struct Workers {
    queue: Mutex<Sender<Job>>,
}

impl Workers {
    /// Starts `threads` workers (at least one).
    pub fn new(threads: usize) -> Self {
        let (queue, jobs) = channel::<Job>();
        let jobs = Arc::new(Mutex::new(jobs));
        for i in 0..threads.max(1) {
            let jobs = jobs.clone();
            let spawned =
                std::thread::Builder::new().name(format!("rmount-io-{i}")).spawn(move || {
                    loop {
                        // Hold the queue only to take a job, not while running it.
                        let job = match jobs.lock() {
                            Ok(jobs) => jobs.recv(),
                            Err(poisoned) => poisoned.into_inner().recv(),
                        };
                        match job {
                            Ok(job) => job(),
                            Err(_) => break,
                        }
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!("cannot start an I/O worker: {e}");
            }
        }
        Self { queue: Mutex::new(queue) }
    }

    /// Runs `job` on a worker (or here, if the workers are gone).
    pub fn run(&self, job: impl FnOnce() + Send + 'static) {
        let sent = match self.queue.lock() {
            Ok(queue) => queue.send(Box::new(job)),
            Err(poisoned) => poisoned.into_inner().send(Box::new(job)),
        };
        if let Err(std::sync::mpsc::SendError(job)) = sent {
            job();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_run_on_the_workers() {
        let workers = Workers::new(2);
        let (done, results) = channel();
        for i in 0..10 {
            let done = done.clone();
            workers.run(move || done.send(i).unwrap());
        }
        let mut got: Vec<i32> = (0..10).map(|_| results.recv().unwrap()).collect();
        got.sort();
        assert_eq!(got, (0..10).collect::<Vec<_>>());
    }
}
