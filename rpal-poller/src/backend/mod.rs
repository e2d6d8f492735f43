//! How a parked poller sleeps: io_uring, `futex_waitv(2)`, or epoll.
//!
//! Every backend waits for the first of: a change of any watched futex word
//! (the next-record words of the clients' queues, and the poller's own wake word),
//! readiness of any watched descriptor (peers' pidfds and sockets), or a
//! timeout. They differ in how much of that the kernel can watch at once:
//!
//! | backend | futex words | descriptors | needs |
//! |---|---|---|---|
//! | `io_uring` | all (one `FUTEX_WAITV` op per 128) | all (`POLL_ADD`) | Linux 6.7 |
//! | `futex_waitv` | 128 per sleep; beyond that, 1 ms sleeps | checked after each sleep | Linux 5.16 |
//! | `epoll` | none: sleeps 1 ms and sweeps | all | any Linux |

mod epoll;
mod uring;
mod waitv;

use std::io;
use std::os::fd::BorrowedFd;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

/// Which backend to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendChoice {
    /// The best one the kernel supports (probed).
    #[default]
    Auto,
    /// io_uring `FUTEX_WAITV` + `POLL_ADD` + timeout.
    IoUring,
    /// The `futex_waitv(2)` system call.
    FutexWaitv,
    /// epoll on descriptors, with 1 ms sleeps between sweeps.
    Epoll,
}

/// What woke a sleep.
#[derive(Debug, Default)]
pub struct Woken {
    /// Indices (into the descriptor list) of descriptors that are readable.
    pub ready_fds: Vec<usize>,
    /// The sleep ended by its timeout.
    pub timed_out: bool,
}

/// A backend instance, owned by one poller thread.
pub enum Backend {
    /// See [`BackendChoice::IoUring`].
    IoUring(Box<uring::Uring>),
    /// See [`BackendChoice::FutexWaitv`].
    FutexWaitv(waitv::Waitv),
    /// See [`BackendChoice::Epoll`].
    Epoll(epoll::Epoll),
}

impl Backend {
    /// Creates the chosen backend; `Auto` takes the first that works of
    /// io_uring, futex_waitv and epoll. Errors say why a forced choice is
    /// unavailable.
    pub fn new(choice: BackendChoice) -> io::Result<Backend> {
        match choice {
            BackendChoice::IoUring => uring::Uring::new().map(|u| Backend::IoUring(Box::new(u))),
            BackendChoice::FutexWaitv => waitv::Waitv::new().map(Backend::FutexWaitv),
            BackendChoice::Epoll => epoll::Epoll::new().map(Backend::Epoll),
            BackendChoice::Auto => match uring::Uring::new() {
                Ok(u) => Ok(Backend::IoUring(Box::new(u))),
                Err(e) => {
                    tracing::info!(%e, "io_uring unavailable; trying futex_waitv");
                    match waitv::Waitv::new() {
                        Ok(w) => Ok(Backend::FutexWaitv(w)),
                        Err(e) => {
                            tracing::info!(%e, "futex_waitv unavailable; using epoll");
                            epoll::Epoll::new().map(Backend::Epoll)
                        }
                    }
                }
            },
        }
    }

    /// The backend's name, as reported in stats.
    pub fn name(&self) -> &'static str {
        match self {
            Backend::IoUring(_) => "io_uring",
            Backend::FutexWaitv(_) => "futex_waitv",
            Backend::Epoll(_) => "epoll",
        }
    }

    /// Sleeps until a word differs from its value, a descriptor is readable,
    /// or `timeout` passes. `generation` changes whenever the set of
    /// descriptors does (backends that keep registrations use it).
    pub fn wait(
        &mut self,
        words: &[(&AtomicU32, u32)],
        fds: &[BorrowedFd<'_>],
        generation: u64,
        timeout: Duration,
    ) -> io::Result<Woken> {
        match self {
            Backend::IoUring(b) => b.wait(words, fds, timeout),
            Backend::FutexWaitv(b) => b.wait(words, fds, timeout),
            Backend::Epoll(b) => b.wait(fds, generation, timeout),
        }
    }
}

/// Indices of the readable descriptors among `fds`, without blocking.
pub(crate) fn readable(fds: &[BorrowedFd<'_>]) -> Vec<usize> {
    fds.iter()
        .enumerate()
        .filter(|(_, fd)| rpal_core::sys::poll_ready(std::slice::from_ref(*fd)).unwrap_or(false))
        .map(|(i, _)| i)
        .collect()
}
