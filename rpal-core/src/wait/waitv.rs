//! The `futex_waitv(2)` backend (Linux 5.16+). The kernel waits on at most
//! 128 words per call: with more, a sleep covers a rotating window of them
//! and lasts at most 1 ms, so the rest are swept that often. Descriptors are
//! checked after each sleep.

use std::io;
use std::os::fd::BorrowedFd;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

use super::{Woken, readable};

const WAITV_MAX: usize = 128;
const OVERFLOW_SLEEP: Duration = Duration::from_millis(1);

/// State of the futex_waitv backend.
pub struct Waitv {
    rotate: usize,
    seen: super::deaths::Seen,
}

impl Waitv {
    /// Probes the system call with a word whose value does not match (the
    /// kernel answers `EAGAIN` when it supports the call).
    pub fn new() -> io::Result<Self> {
        let w = AtomicU32::new(1);
        match crate::sys::futex_waitv(&[(&w, 0)], Some(Duration::ZERO)) {
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "futex_waitv needs Linux 5.16",
            )),
            _ => Ok(Self {
                rotate: 0,
                seen: Default::default(),
            }),
        }
    }

    pub(super) fn wait(
        &mut self,
        words: &[(&AtomicU32, u32)],
        fds: &[BorrowedFd<'_>],
        timeout: Duration,
    ) -> io::Result<Woken> {
        // With descriptors (a peer's pidfd), the sleep also ends when a
        // watched peer dies (see `deaths`); a death since this thread last
        // looked at them is looked for first, without sleeping.
        let epoch = (!fds.is_empty()).then(super::deaths::epoch);
        if let Some(e) = epoch.filter(|&e| self.seen.stale(fds, e)) {
            let ready = readable(fds);
            self.seen.looked(fds, e);
            if !ready.is_empty() {
                return Ok(Woken {
                    ready_fds: ready,
                    timed_out: false,
                });
            }
        }
        let (mut window, mut timeout) = if words.len() <= WAITV_MAX {
            (words.to_vec(), timeout)
        } else {
            // Always keep the first word (the poller's wake word); rotate the rest.
            let rest = &words[1..];
            self.rotate = (self.rotate + WAITV_MAX - 1) % rest.len();
            let mut w = vec![words[0]];
            w.extend((0..WAITV_MAX - 1).map(|i| rest[(self.rotate + i) % rest.len()]));
            (w, timeout.min(OVERFLOW_SLEEP))
        };
        if let Some(e) = epoch {
            if window.len() == WAITV_MAX {
                window.pop(); // swept within OVERFLOW_SLEEP, like an overflow
                timeout = timeout.min(OVERFLOW_SLEEP);
            }
            window.push((super::deaths::epoch_word(), e));
        }
        let r = crate::sys::futex_waitv(&window, Some(timeout));
        let timed_out = matches!(&r, Err(e) if e.raw_os_error() == Some(libc::ETIMEDOUT));
        match r {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::ETIMEDOUT | libc::EINTR)) => {}
            Err(e) => return Err(e),
        }
        let at = super::deaths::epoch();
        let ready_fds = readable(fds);
        self.seen.looked(fds, at);
        Ok(Woken { ready_fds, timed_out })
    }
}
