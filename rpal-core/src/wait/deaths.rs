//! Deaths of the peers a caller waits on, noticed at once by every backend.
//!
//! A futex cannot wait on a descriptor, and `futex_waitv` is what callers
//! sleep in (see [`Backend::for_caller`](super::Backend::for_caller)): on
//! its own, a caller would see its server's pidfd only when its park slice
//! ends. So one thread per process, started by the first [`watch`], waits
//! in `poll(2)` on the pidfds of every server we are connected to. When one
//! turns readable, it moves a process-wide futex word and wakes every sleeper on it;
//! each `futex_waitv` sleep with descriptors includes that word, and looks
//! at its descriptors when it moves. The cost while nobody dies: one atomic
//! load per sleep, and a parked thread in the process.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

/// Moves once for each watched peer that dies.
static EPOCH: AtomicU32 = AtomicU32::new(0);

/// The word that moves when a watched peer dies.
pub(crate) fn epoch_word() -> &'static AtomicU32 {
    &EPOCH
}

/// Its current value (Acquire: pairs with the watcher's Release bump, so a
/// sleeper that sees the new value sees the pidfd readable).
pub(crate) fn epoch() -> u32 {
    EPOCH.load(Ordering::Acquire)
}

enum Cmd {
    Add(u64, OwnedFd),
    Remove(u64),
}

struct Watcher {
    cmds: Mutex<Vec<Cmd>>,
    bell: OwnedFd,
}

static WATCHER: OnceLock<io::Result<Watcher>> = OnceLock::new();
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A peer's pidfd under watch; dropping it ends the watch.
#[derive(Debug)]
pub struct Watch {
    id: u64,
}

/// Watches `pidfd` (duplicated: the caller keeps its own) until the
/// returned [`Watch`] is dropped. Fails only if the watcher thread or its
/// eventfd cannot be made; callers then still notice deaths at their park
/// slice.
pub fn watch(pidfd: BorrowedFd<'_>) -> io::Result<Watch> {
    let w = watcher()?;
    let fd = pidfd.try_clone_to_owned()?;
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    lock(&w.cmds).push(Cmd::Add(id, fd));
    crate::sys::eventfd_signal(w.bell.as_fd());
    Ok(Watch { id })
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some(Ok(w)) = WATCHER.get() {
            // The watcher closes the descriptor: a number it polls is never reused under it.
            lock(&w.cmds).push(Cmd::Remove(self.id));
            crate::sys::eventfd_signal(w.bell.as_fd());
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn watcher() -> io::Result<&'static Watcher> {
    let w = WATCHER.get_or_init(|| {
        let bell = crate::sys::eventfd_nonblocking()?;
        std::thread::Builder::new().name("rpal-deaths".into()).spawn(run)?;
        Ok(Watcher {
            cmds: Mutex::new(Vec::new()),
            bell,
        })
    });
    w.as_ref().map_err(|e| io::Error::new(e.kind(), e.to_string()))
}

/// The watcher thread: polls the bell and every live pidfd, forever.
fn run() {
    // The OnceLock is set once `watcher` returns; wait for it.
    let w = loop {
        match WATCHER.get() {
            Some(Ok(w)) => break w,
            Some(Err(_)) => return,
            None => std::thread::yield_now(),
        }
    };
    let mut watched: Vec<(u64, OwnedFd)> = Vec::new();
    loop {
        crate::sys::drain_eventfd(w.bell.as_fd());
        for cmd in std::mem::take(&mut *lock(&w.cmds)) {
            match cmd {
                Cmd::Add(id, fd) => watched.push((id, fd)),
                Cmd::Remove(id) => watched.retain(|(i, _)| *i != id),
            }
        }
        let mut fds: Vec<BorrowedFd<'_>> = vec![w.bell.as_fd()];
        fds.extend(watched.iter().map(|(_, fd)| fd.as_fd()));
        let ready = match crate::sys::poll_readable_blocking(&fds) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(%e, "rpal death watcher stops; callers notice deaths at their park slice");
                return;
            }
        };
        let dead: Vec<RawFd> = ready.iter().filter(|&&i| i > 0).map(|&i| fds[i].as_raw_fd()).collect();
        drop(fds);
        if !dead.is_empty() {
            // A dead peer stays readable: stop polling it (its Watch may
            // outlive it), then tell every sleeper.
            watched.retain(|(_, fd)| !dead.contains(&fd.as_raw_fd()));
            EPOCH.fetch_add(1, Ordering::Release);
            crate::sys::futex_wake(&EPOCH, i32::MAX);
        }
    }
}

/// Which descriptors a thread last looked at, and at which epoch: a sleep
/// looks at its descriptors first only if a death happened since.
#[derive(Debug, Default)]
pub(crate) struct Seen {
    last: Vec<(RawFd, u32)>,
}

impl Seen {
    /// Whether some of `fds` were not looked at since epoch `now`.
    pub(crate) fn stale(&self, fds: &[BorrowedFd<'_>], now: u32) -> bool {
        fds.iter()
            .any(|f| !self.last.iter().any(|&(raw, e)| raw == f.as_raw_fd() && e == now))
    }

    /// Records that `fds` were looked at, at epoch `at`.
    pub(crate) fn looked(&mut self, fds: &[BorrowedFd<'_>], at: u32) {
        for f in fds {
            let raw = f.as_raw_fd();
            match self.last.iter_mut().find(|(r, _)| *r == raw) {
                Some(entry) => entry.1 = at,
                None => {
                    // A few peers per thread; forgetting one costs a poll.
                    if self.last.len() >= 16 {
                        self.last.remove(0);
                    }
                    self.last.push((raw, at));
                }
            }
        }
    }
}
