//! The epoll backend, for kernels without futex_waitv: epoll watches the
//! descriptors (peer death, hang-ups), but futex words cannot be watched, so
//! a sleep lasts at most 1 ms and the poller sweeps its queues after each.
//! Correct everywhere, but an idle server wakes 1000 times a second.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use crate::sys::epoll;

use super::Woken;

const SLEEP: Duration = Duration::from_millis(1);

/// An epoll instance, and the generation of the descriptor set registered in it.
pub struct Epoll {
    fd: OwnedFd,
    generation: u64,
}

impl Epoll {
    /// A new epoll instance.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            fd: epoll::create()?,
            generation: u64::MAX,
        })
    }

    pub(super) fn wait(&mut self, fds: &[BorrowedFd<'_>], generation: u64, timeout: Duration) -> io::Result<Woken> {
        if generation != self.generation {
            // The set changed (indices moved too): a fresh epoll instance.
            // Deleting registrations one by one cannot work: a dropped
            // connection's descriptors are closed already, and an epoll
            // registration outlives its descriptor while the file is open
            // elsewhere, reporting its old index (found as an out-of-range
            // index in the poller test).
            *self = Self::new()?;
            for (i, fd) in fds.iter().enumerate() {
                epoll::add(self.fd.as_fd(), *fd, i as u64)?;
            }
            self.generation = generation;
        }
        let ready = epoll::wait(self.fd.as_fd(), fds.len(), timeout.min(SLEEP))?;
        let timed_out = ready.is_empty();
        let ready_fds = ready
            .into_iter()
            .map(|i| i as usize)
            .filter(|&i| i < fds.len())
            .collect();
        Ok(Woken { ready_fds, timed_out })
    }
}
