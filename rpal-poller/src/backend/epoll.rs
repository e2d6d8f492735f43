//! The epoll backend, for kernels without futex_waitv: epoll watches the
//! descriptors (peer death, hang-ups), but futex words cannot be watched, so
//! a sleep lasts at most 1 ms and the poller sweeps its queues after each.
//! Correct everywhere, but an idle server wakes 1000 times a second.

use std::collections::HashSet;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use super::Woken;

const SLEEP: Duration = Duration::from_millis(1);

/// An epoll instance and the descriptors registered in it.
pub struct Epoll {
    fd: OwnedFd,
    registered: HashSet<RawFd>,
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
            registered: HashSet::new(),
            generation: u64::MAX,
        })
    }

    fn ctl(&self, op: i32, fd: RawFd, index: usize) {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: index as u64,
        };
        // SAFETY: `ev` is a live epoll_event; the descriptors are borrowed from live connections.
        unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, fd, &mut ev) };
    }

    pub(super) fn wait(&mut self, fds: &[BorrowedFd<'_>], generation: u64, timeout: Duration) -> io::Result<Woken> {
        if generation != self.generation {
            // The set changed: re-register everything (indices moved too).
            for &fd in &self.registered {
                self.ctl(libc::EPOLL_CTL_DEL, fd, 0);
            }
            self.registered.clear();
            for (i, fd) in fds.iter().enumerate() {
                self.ctl(libc::EPOLL_CTL_ADD, fd.as_raw_fd(), i);
                self.registered.insert(fd.as_raw_fd());
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
        let ready_fds = events[..n as usize].iter().map(|e| e.u64 as usize).collect();
        Ok(Woken {
            ready_fds,
            timed_out: n == 0,
        })
    }
}
