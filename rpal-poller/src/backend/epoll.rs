//! The epoll backend, for kernels without futex_waitv: epoll watches the
//! descriptors (peer death, hang-ups), but futex words cannot be watched, so
//! a sleep lasts at most 1 ms and the poller sweeps its queues after each.
//! Correct everywhere, but an idle server wakes 1000 times a second.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

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
        // SAFETY: plain system call.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self {
            fd,
            generation: u64::MAX,
        })
    }

    fn add(&self, fd: RawFd, index: usize) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: index as u64,
        };
        // SAFETY: `ev` is a live epoll_event; the descriptors are borrowed from live connections.
        if unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
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
                self.add(fd.as_raw_fd(), i)?;
            }
            self.generation = generation;
        }
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; fds.len().max(1)];
        let ms = timeout.min(SLEEP).as_millis().max(1) as i32;
        // SAFETY: `events` is a live buffer of `len` entries.
        let n = unsafe { libc::epoll_wait(self.fd.as_raw_fd(), events.as_mut_ptr(), events.len() as i32, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::EINTR) {
                Ok(Woken::default())
            } else {
                Err(e)
            };
        }
        let ready_fds = events[..n as usize]
            .iter()
            .map(|e| e.u64 as usize)
            .filter(|&i| i < fds.len())
            .collect();
        Ok(Woken {
            ready_fds,
            timed_out: n == 0,
        })
    }
}
