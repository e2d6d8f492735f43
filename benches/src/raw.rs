//! The raw floors: spin and futex ping-pong on one shared page.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use rpal_core::sys;

use crate::*;

/// One shared page: a ping line and a pong line, each a sequence word and
/// an 8-byte payload, on separate 128-byte lines.
pub struct SharedPage {
    base: *mut u8,
    fd: OwnedFd,
}

const PING: usize = 0;
const PONG: usize = 128;
const STOP: u32 = u32::MAX;

impl SharedPage {
    /// A fresh page, inheritable by children (no close-on-exec).
    pub fn new() -> std::io::Result<Self> {
        let m = memfd::MemfdOptions::default()
            .close_on_exec(false)
            .create("rpal-bench-raw")
            .map_err(std::io::Error::other)?;
        m.as_file().set_len(4096)?;
        Ok(Self::from_fd(m.into_file().into()))
    }

    pub(crate) fn from_fd(fd: OwnedFd) -> Self {
        let base = sys::map_file(std::os::fd::AsFd::as_fd(&fd), 4096).expect("map the shared page");
        Self { base, fd }
    }

    /// The descriptor number to pass to the child.
    pub fn raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    fn seq(&self, line: usize) -> &AtomicU32 {
        // SAFETY: the page is mapped for our lifetime; the word is aligned and only used atomically.
        unsafe { &*(self.base.add(line) as *const AtomicU32) }
    }

    fn val(&self, line: usize) -> &AtomicU64 {
        // SAFETY: as in `seq`, 8 bytes further on.
        unsafe { &*(self.base.add(line + 8) as *const AtomicU64) }
    }

    fn wait_for(&self, line: usize, want: u32, futex: bool) -> u32 {
        loop {
            // Acquire: pairs with the Release store in `signal`.
            let now = self.seq(line).load(Ordering::Acquire);
            if now == want || now == STOP {
                return now;
            }
            if futex {
                sys::futex_wait(self.seq(line), now, None);
            } else {
                std::hint::spin_loop();
            }
        }
    }

    fn signal(&self, line: usize, value: u32, futex: bool) {
        // Release: publishes the payload written before; pairs with the Acquire in `wait_for`.
        self.seq(line).store(value, Ordering::Release);
        if futex {
            sys::futex_wake(self.seq(line), 1);
        }
    }

    pub(crate) fn echo_loop(&self, futex: bool) {
        let mut n = 1u32;
        while self.wait_for(PING, n, futex) != STOP {
            let v = self.val(PING).load(Ordering::Relaxed);
            self.val(PONG).store(!v, Ordering::Relaxed);
            self.signal(PONG, n, futex);
            n = n.wrapping_add(1) % STOP;
        }
    }
}

impl Drop for SharedPage {
    fn drop(&mut self) {
        // SAFETY: the mapping was made in `from_fd` and nothing borrows it past `self`.
        unsafe { libc::munmap(self.base.cast(), 4096) };
    }
}

/// Raw atomic ping-pong (busy) or futex ping-pong (always sleeps).
pub struct RawPingPong {
    page: SharedPage,
    futex: bool,
    n: u32,
    _child: ChildGuard,
}

impl RawPingPong {
    /// Starts the echoing child.
    pub fn start(exe: &Path, futex: bool) -> std::io::Result<Self> {
        let page = SharedPage::new()?;
        let role = if futex { "raw-futex" } else { "raw-spin" };
        let (child, _) = ChildGuard::start(exe, role, &[page.raw_fd().to_string()])?;
        Ok(Self {
            page,
            futex,
            n: 0,
            _child: child,
        })
    }
}

impl RoundTrip for RawPingPong {
    fn round_trip(&mut self, value: u64) -> u64 {
        self.n = (self.n + 1) % STOP;
        self.page.val(PING).store(value, Ordering::Relaxed);
        self.page.signal(PING, self.n, self.futex);
        self.page.wait_for(PONG, self.n, self.futex);
        self.page.val(PONG).load(Ordering::Relaxed)
    }
}

impl Drop for RawPingPong {
    fn drop(&mut self) {
        self.page.signal(PING, STOP, self.futex);
    }
}
