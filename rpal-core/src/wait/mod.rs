//! The one way rpal sleeps: until a futex word moves from the value it had,
//! a descriptor turns readable, or a timeout passes.
//!
//! Every waiter in rpal goes through a [`Backend`]: the server pollers
//! (all their clients' next-record words, the peers' pidfds and sockets, a
//! wake word), blocking callers (the reply word, the thread's wake word, the
//! server's pidfd) and the thread that wakes async tasks (the same, on behalf
//! of tokio wakers). The backends are probed; they differ in how much of the
//! set the kernel can watch at once:
//!
//! | backend | futex words | descriptors | needs |
//! |---|---|---|---|
//! | `io_uring` | all (one `FUTEX_WAITV` op per 128) | all (`POLL_ADD`) | Linux 6.7 |
//! | `futex_waitv` | 128 per sleep; beyond that, 1 ms sleeps | looked at (one `poll`) after each sleep | Linux 5.16 |
//! | `epoll` | none: sleeps 1 ms and sweeps | all | any Linux |
//!
//! A sleep may also end early, for no reason the caller can see (a signal,
//! a word that moved and moved back): every caller re-reads its words and
//! its own deadline after [`Backend::wait`] returns. The contract is checked
//! for every backend by one conformance suite (`tests/wait_backends.rs`).
//!
//! This lives in `rpal-core`, below the pollers, because the raw endpoints
//! here wait for replies too.

pub mod deaths;
mod epoll;
mod uring;
mod waitv;

use std::io;
use std::os::fd::BorrowedFd;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

/// Which backend to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
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

/// A backend instance, owned by one thread (a poller's, or a caller's: see
/// [`with_caller`]).
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

    /// The backend a blocking caller sleeps in: `futex_waitv` first (its
    /// few words and one pidfd fit one system call with no state to set up
    /// or tear down, where io_uring needs a submit and a cancel per sleep),
    /// then io_uring, then epoll.
    pub fn for_caller() -> io::Result<Backend> {
        match waitv::Waitv::new() {
            Ok(w) => Ok(Backend::FutexWaitv(w)),
            Err(e) => {
                tracing::info!(%e, "futex_waitv unavailable for callers; trying io_uring");
                match uring::Uring::new() {
                    Ok(u) => Ok(Backend::IoUring(Box::new(u))),
                    Err(_) => epoll::Epoll::new().map(Backend::Epoll),
                }
            }
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
    /// or `timeout` passes (or earlier, see the module docs). `generation`
    /// changes whenever the set of descriptors does (backends that keep
    /// registrations use it; a caller whose set changes on every sleep may
    /// pass a fresh value each time).
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

/// Indices of the readable descriptors among `fds`, without blocking (one
/// `poll`). A descriptor the kernel rejects counts as readable: its owner
/// looks at it and finds the error.
pub(crate) fn readable(fds: &[BorrowedFd<'_>]) -> Vec<usize> {
    if fds.is_empty() {
        return Vec::new();
    }
    crate::sys::poll_readable(fds).unwrap_or_else(|_| (0..fds.len()).collect())
}

thread_local! {
    /// Each thread's backend for waits as a caller, made on first use.
    static CALLER: std::cell::RefCell<Option<Backend>> = const { std::cell::RefCell::new(None) };
}

/// Sleeps as a caller (in the thread's own backend, see [`with_caller`])
/// until a word moves, a descriptor is readable or `timeout` passes. The
/// descriptor set counts as new at every call (callers watch a different
/// peer each time).
pub fn sleep(words: &[(&AtomicU32, u32)], fds: &[BorrowedFd<'_>], timeout: Duration) -> io::Result<Woken> {
    thread_local! {
        static GENERATION: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }
    let generation = GENERATION.with(|g| {
        g.set(g.get().wrapping_add(1));
        g.get()
    });
    with_caller(|b| b.wait(words, fds, generation, timeout))
}

/// Runs `f` with the calling thread's own caller backend
/// ([`Backend::for_caller`], probed once per thread). Errors if no backend
/// can be set up (epoll itself failed: out of descriptors).
pub fn with_caller<R>(f: impl FnOnce(&mut Backend) -> io::Result<R>) -> io::Result<R> {
    CALLER.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = Some(Backend::for_caller()?);
        }
        f(c.as_mut().expect("set above"))
    })
}
