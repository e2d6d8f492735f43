//! One conformance suite for every wait backend (`rpal_core::wait`, seen
//! as `rpal::poller::backend`): the same tests, instantiated per backend
//! and for the caller backend a blocking call sleeps in. A backend the
//! kernel lacks is skipped with the reason.
//!
//! The contract, as the pollers and callers rely on it:
//! - a sleep ends when a watched word moves from its value (written by
//!   another process, through a shared mapping that the sleeper maps
//!   read-only, as rpal maps its peers), or at once if it already differs;
//! - a descriptor that turned readable is reported, by its index, by the
//!   first sleep that ends after it did; a quiet one never is;
//! - with nothing happening, a sleep lasts its timeout (io_uring,
//!   futex_waitv) or the backend's sweep interval (epoll: 1 ms), never much
//!   longer, and says it timed out;
//! - more words than one kernel call takes (128) are all watched.
//!
//! Writers are real child processes (this binary re-run with a role).

mod common;

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rpal::poller::{Backend, BackendChoice};

/// Longest any test waits for an event it caused (generous: the suite runs
/// under emulation too).
fn patience() -> Duration {
    Duration::from_secs(10 * common::time_scale())
}

/// A file of `n` words mapped shared: read-only here (as a peer's region),
/// read-write in the writer child.
struct Words {
    path: PathBuf,
    ptr: *mut AtomicU32,
    n: usize,
}

impl Words {
    fn new(name: &str, n: usize) -> Words {
        let path = common::test_dir().join(format!("wait-{name}"));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.set_len((n * 4).next_multiple_of(4096) as u64).unwrap();
        let ptr = map(&f, n, libc::PROT_READ);
        Words { path, ptr, n }
    }

    fn word(&self, i: usize) -> &AtomicU32 {
        assert!(i < self.n);
        // SAFETY: the mapping holds `n` aligned u32 words and lives as long
        // as `self`; the kernel and the writer only ever access them atomically.
        unsafe { &*self.ptr.add(i) }
    }

    /// Starts a child that stores 1 into word `i` after `delay_ms` and
    /// wakes its waiters.
    fn store_later(&self, test: &str, i: usize, delay_ms: u64) -> common::ChildGuard {
        common::spawn(
            test,
            "writer",
            &[
                ("RPAL_TEST_FILE", self.path.display().to_string()),
                ("RPAL_TEST_WORD", i.to_string()),
                ("RPAL_TEST_WORDS", self.n.to_string()),
                ("RPAL_TEST_DELAY_MS", delay_ms.to_string()),
            ],
        )
    }
}

impl Drop for Words {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; no reference
        // from `word` outlives `self`.
        unsafe { libc::munmap(self.ptr.cast(), (self.n * 4).next_multiple_of(4096)) };
        let _ = std::fs::remove_file(&self.path);
    }
}

fn map(f: &File, n: usize, prot: i32) -> *mut AtomicU32 {
    // SAFETY: a fresh shared mapping of the whole file; the kernel picks the address.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            (n * 4).next_multiple_of(4096),
            prot,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
    p.cast()
}

/// The writer child: maps the file read-write, waits, stores, wakes (a
/// shared, not process-private, futex wake: the sleeper is another process).
fn writer_child() {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(common::arg("RPAL_TEST_FILE"))
        .unwrap();
    let n: usize = common::arg("RPAL_TEST_WORDS").parse().unwrap();
    let i: usize = common::arg("RPAL_TEST_WORD").parse().unwrap();
    let delay: u64 = common::arg("RPAL_TEST_DELAY_MS").parse().unwrap();
    let p = map(&f, n, libc::PROT_READ | libc::PROT_WRITE);
    std::thread::sleep(Duration::from_millis(delay));
    // SAFETY: `p` maps `n` words and `i < n` (checked by the parent).
    let w = unsafe { &*p.add(i) };
    w.store(1, Ordering::Release);
    // SAFETY: FUTEX_WAKE only reads the address, which is mapped.
    unsafe { libc::syscall(libc::SYS_futex, w.as_ptr(), libc::FUTEX_WAKE, i32::MAX) };
}

fn pidfd_open(pid: i32) -> OwnedFd {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    assert!(fd >= 0, "pidfd_open: {}", std::io::Error::last_os_error());
    // SAFETY: a descriptor we just received and own.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

/// The backend under test, or `None` (skipped, with the reason) if this
/// kernel lacks it.
fn make(choice: Option<BackendChoice>) -> Option<Backend> {
    let made = match choice {
        Some(c) => Backend::new(c),
        None => Backend::for_caller(),
    };
    match made {
        Ok(b) => Some(b),
        Err(e) => {
            let name = choice.map_or("the caller backend".to_string(), |c| format!("the {c:?} backend"));
            common::skip(&format!("{name} is unavailable here: {e}"));
            None
        }
    }
}

/// Sleeps in slices until `done` holds; panics after `patience()`. Every
/// sleep must end by its own timeout (plus scheduling slack).
fn sleep_until(
    b: &mut Backend,
    words: &[(&AtomicU32, u32)],
    fds: &[BorrowedFd<'_>],
    slice: Duration,
    mut done: impl FnMut(&rpal::poller::backend::Woken) -> bool,
) -> rpal::poller::backend::Woken {
    let t0 = Instant::now();
    let mut generation = 0;
    loop {
        let s0 = Instant::now();
        let w = b.wait(words, fds, generation, slice).unwrap();
        generation = 1; // the set is the same from the second sleep on
        assert!(
            s0.elapsed() < slice + patience(),
            "a sleep of {slice:?} lasted {:?}",
            s0.elapsed()
        );
        if done(&w) {
            return w;
        }
        assert!(t0.elapsed() < patience(), "the event never ended a sleep");
    }
}

fn a_word_that_already_differs_ends_the_sleep(choice: Option<BackendChoice>) {
    let Some(mut b) = make(choice) else { return };
    let w = AtomicU32::new(5);
    let t0 = Instant::now();
    let r = b.wait(&[(&w, 4)], &[], 0, patience() * 2).unwrap();
    assert!(
        t0.elapsed() < patience(),
        "slept {:?} on a word that differed",
        t0.elapsed()
    );
    assert!(r.ready_fds.is_empty());
}

fn another_process_storing_a_word_ends_the_sleep(test: &str, choice: Option<BackendChoice>) {
    let Some(mut b) = make(choice) else { return };
    let words = Words::new(&format!("store-{choice:?}"), 2);
    let mut child = words.store_later(test, 1, 50);
    let watched = [(words.word(0), 0), (words.word(1), 0)];
    // Long slices: io_uring and futex_waitv must be woken by the store, not
    // by a timeout; epoll sweeps every millisecond.
    sleep_until(&mut b, &watched, &[], patience(), |_| {
        words.word(1).load(Ordering::Acquire) == 1
    });
    assert_eq!(words.word(0).load(Ordering::Acquire), 0);
    child.expect_success();
}

fn a_readable_descriptor_is_reported_by_its_index(choice: Option<BackendChoice>) {
    let Some(mut b) = make(choice) else { return };
    let (quiet, _quiet_peer) = std::os::unix::net::UnixStream::pair().unwrap();
    let (ready, ready_peer) = std::os::unix::net::UnixStream::pair().unwrap();
    let w = AtomicU32::new(0);
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(30));
        use std::io::Write;
        (&ready_peer).write_all(b"x").unwrap();
        ready_peer
    });
    let fds = [quiet.as_fd(), ready.as_fd()];
    let woken = sleep_until(&mut b, &[(&w, 0)], &fds, Duration::from_millis(100), |w| {
        !w.ready_fds.is_empty()
    });
    assert_eq!(woken.ready_fds, vec![1], "only the written socket is ready");
    drop(writer.join().unwrap());
}

fn a_dead_processs_pidfd_is_ready(test: &str, choice: Option<BackendChoice>) {
    let Some(mut b) = make(choice) else { return };
    let words = Words::new(&format!("death-{choice:?}"), 1);
    // The writer stores into a word nobody watches here, then exits.
    let mut child = words.store_later(test, 0, 50);
    let pidfd = pidfd_open(child.pid());
    let unwatched = AtomicU32::new(0);
    let fds = [pidfd.as_fd()];
    let woken = sleep_until(&mut b, &[(&unwatched, 0)], &fds, Duration::from_millis(100), |w| {
        !w.ready_fds.is_empty()
    });
    assert_eq!(woken.ready_fds, vec![0]);
    child.expect_success();
}

fn with_nothing_happening_the_sleep_times_out(choice: Option<BackendChoice>) {
    let Some(mut b) = make(choice) else { return };
    let w = AtomicU32::new(0);
    let (quiet, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
    let timeout = Duration::from_millis(40);
    let t0 = Instant::now();
    let r = b.wait(&[(&w, 0)], &[quiet.as_fd()], 0, timeout).unwrap();
    let slept = t0.elapsed();
    assert!(
        r.timed_out,
        "{choice:?}: a sleep with nothing happening must say it timed out"
    );
    assert!(r.ready_fds.is_empty());
    // epoll cannot watch words, so it sleeps at most its 1 ms sweep; the
    // others sleep the whole timeout (no early return, no busy loop).
    if choice != Some(BackendChoice::Epoll) {
        assert!(slept >= timeout, "{choice:?}: woke after {slept:?} of {timeout:?}");
    }
    assert!(slept < timeout + patience(), "{choice:?}: overslept: {slept:?}");
}

fn every_word_of_many_is_watched(test: &str, choice: Option<BackendChoice>) {
    let Some(mut b) = make(choice) else { return };
    // 300 words: more than one futex_waitv call (128) takes; the last one,
    // and the first (a poller's wake word).
    for target in [299, 0] {
        let words = Words::new(&format!("many-{target}-{choice:?}"), 300);
        let mut child = words.store_later(test, target, 30);
        let watched: Vec<_> = (0..300).map(|i| (words.word(i), 0)).collect();
        sleep_until(&mut b, &watched, &[], Duration::from_millis(200), |_| {
            words.word(target).load(Ordering::Acquire) == 1
        });
        child.expect_success();
    }
}

/// The same tests for one backend (`None`: the caller backend).
macro_rules! conformance {
    ($module:ident, $choice:expr) => {
        mod $module {
            use super::*;

            fn name(test: &str) -> String {
                format!("{}::{test}", stringify!($module))
            }

            #[test]
            fn a_word_that_already_differs_ends_the_sleep() {
                super::a_word_that_already_differs_ends_the_sleep($choice);
            }

            #[test]
            fn another_process_storing_a_word_ends_the_sleep() {
                if common::role().is_some() {
                    return writer_child();
                }
                super::another_process_storing_a_word_ends_the_sleep(
                    &name("another_process_storing_a_word_ends_the_sleep"),
                    $choice,
                );
            }

            #[test]
            fn a_readable_descriptor_is_reported_by_its_index() {
                super::a_readable_descriptor_is_reported_by_its_index($choice);
            }

            #[test]
            fn a_dead_processs_pidfd_is_ready() {
                if common::role().is_some() {
                    return writer_child();
                }
                super::a_dead_processs_pidfd_is_ready(&name("a_dead_processs_pidfd_is_ready"), $choice);
            }

            #[test]
            fn with_nothing_happening_the_sleep_times_out() {
                super::with_nothing_happening_the_sleep_times_out($choice);
            }

            #[test]
            fn every_word_of_many_is_watched() {
                if common::role().is_some() {
                    return writer_child();
                }
                super::every_word_of_many_is_watched(&name("every_word_of_many_is_watched"), $choice);
            }
        }
    };
}

conformance!(io_uring, Some(BackendChoice::IoUring));
conformance!(futex_waitv, Some(BackendChoice::FutexWaitv));
conformance!(epoll, Some(BackendChoice::Epoll));
conformance!(caller, None);
