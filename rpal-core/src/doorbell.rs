//! The spin-then-park doorbell: no system call while both sides are awake.
//!
//! The consumer waits on a 32-bit sequence word in the **producer's** memory
//! and announces that it sleeps with a `parked` flag in **its own** memory:
//!
//! - consumer: spin a budget; then `parked = 1`; SeqCst fence; re-read the
//!   sequence; if unchanged, `FUTEX_WAIT(seq, seen)`.
//! - producer: publish the record; store the sequence; SeqCst fence; read the
//!   consumer's `parked`; `FUTEX_WAKE(seq)` only if it is set.
//!
//! The two fences make this a Dekker handshake: at least one side sees the
//! other's store, so either the consumer sees the new sequence before it
//! sleeps, or the producer sees `parked` and wakes it. FUTEX_WAIT and
//! FUTEX_WAKE only read the word, so they work through a read-only mapping.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::sync::{Word32, fence};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::sys;
use crate::wait;
use std::os::fd::BorrowedFd;

/// How long a waiter spins before it parks, and how often a parked waiter
/// wakes to check that its peer is still alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitConfig {
    /// Spin this long before parking. Zero parks at once. Default 50 us.
    /// A spinning caller needs a core its server does not: pin both
    /// (`rpal::pin_to_cpu`) or park (see the README on pinning).
    pub spin: Duration,
    /// Longest single futex sleep; liveness is checked between sleeps.
    /// Default 100 ms. A server's death ends a sleep at once (the death
    /// watch), so this bounds only what the watch cannot see.
    pub park_slice: Duration,
}

impl Default for WaitConfig {
    fn default() -> Self {
        // A spin round trip is ~0.2 us and a sleep/wake ~17 us here: spinning
        // 50 us covers a burst of calls and costs at most ~3 wake-ups' time.
        Self {
            spin: Duration::from_micros(50),
            park_slice: Duration::from_millis(100),
        }
    }
}

impl WaitConfig {
    /// Parks at once: every wait pays a sleep and a wake-up.
    pub fn parked() -> Self {
        Self {
            spin: Duration::ZERO,
            ..Self::default()
        }
    }
}

/// Doorbell counters of one connection (process-local, written by the
/// thread that uses the connection, read by anyone).
#[derive(Debug, Default)]
pub struct DoorbellStats {
    /// Waits satisfied while spinning.
    pub spin_hits: AtomicU64,
    /// Waits that went to sleep at least once.
    pub parks: AtomicU64,
    /// Wake system calls made for a parked peer.
    pub wakes: AtomicU64,
    /// Sends that found the queue full (the peer behind) and waited for room.
    pub full_waits: AtomicU64,
}

/// A snapshot of [`DoorbellStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DoorbellSnapshot {
    /// Waits satisfied while spinning.
    pub spin_hits: u64,
    /// Waits that went to sleep at least once.
    pub parks: u64,
    /// Wake system calls made for a parked peer.
    pub wakes: u64,
    /// Sends that found the queue full and waited for room (backpressure).
    pub full_waits: u64,
}

impl DoorbellStats {
    /// Reads the counters.
    pub fn snapshot(&self) -> DoorbellSnapshot {
        DoorbellSnapshot {
            spin_hits: self.spin_hits.load(Ordering::Relaxed),
            parks: self.parks.load(Ordering::Relaxed),
            wakes: self.wakes.load(Ordering::Relaxed),
            full_waits: self.full_waits.load(Ordering::Relaxed),
        }
    }
}

/// When a wait gives up: `after` from when it starts counting, reported as a
/// timeout of `after`.
///
/// The clock starts at the first sleep, not when the deadline is made: a
/// call that is answered while spinning never reads the clock. A timeout may
/// therefore run up to one spin budget late.
#[derive(Debug, Clone)]
pub struct Deadline {
    started: std::cell::Cell<Option<Instant>>,
    /// The timeout that was asked for.
    pub after: Duration,
}

impl Deadline {
    /// A deadline `after` from the first sleep.
    pub fn after(after: Duration) -> Self {
        Self {
            started: std::cell::Cell::new(None),
            after,
        }
    }

    /// The instant the wait ends (starting the clock if needed).
    pub fn at(&self) -> Instant {
        let start = self.started.get().unwrap_or_else(|| {
            let now = Instant::now();
            self.started.set(Some(now));
            now
        });
        start + self.after
    }
}

/// Adds one to a counter that only this thread writes: a plain load and
/// store, no locked read-modify-write on the hot path.
fn count(c: &AtomicU64) {
    c.store(c.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
}

/// Consumer half of the handshake: announce that we are about to sleep
/// waiting for `seq` to leave `seen`. Returns true if we may sleep now (the
/// word still holds `seen`); false if it changed meanwhile.
pub fn announce_park<W: Word32>(parked: &W, seq: &W, seen: u32) -> bool {
    parked.store(1, Ordering::Relaxed);
    // SeqCst fence: orders the `parked` store before the `seq` re-read
    // (store-load), the partner of the fence in `must_wake`.
    fence(Ordering::SeqCst);
    // Acquire: pairs with the producer's Release publication.
    seq.load(Ordering::Acquire) == seen
}

/// Consumer half for many queues at once (a poller): every `parked` flag
/// first, one fence, then the caller re-reads every queue's word and sleeps
/// only if none moved. The same Dekker pair as [`announce_park`], spread
/// over the connections.
pub fn announce_park_all<'a, W: Word32 + 'a>(parked: impl IntoIterator<Item = &'a W>) {
    for p in parked {
        p.store(1, Ordering::Relaxed);
    }
    // SeqCst fence: orders the `parked` stores before the caller's re-reads
    // of the queue words (store-load), the partner of the fence in `must_wake`.
    fence(Ordering::SeqCst);
}

/// Consumer half for a `parked` word shared by several sleepers (a
/// channel's callers): each adds one, so the producer wakes while any
/// sleeps. The caller then re-reads what it waits for, sleeps only if
/// nothing moved, and calls [`unannounce_counted`] when it wakes.
pub fn announce_park_counted<W: Word32>(parked: &W) {
    // SeqCst RMW and fence: the store-load order of `announce_park`,
    // partner of the fence in `must_wake`.
    parked.fetch_add(1, Ordering::SeqCst);
    fence(Ordering::SeqCst);
}

/// Ends one sleeper's [`announce_park_counted`].
pub fn unannounce_counted<W: Word32>(parked: &W) {
    parked.fetch_sub(1, Ordering::SeqCst);
}

/// Producer half, after publishing: whether the consumer may be asleep and
/// must be woken.
pub fn must_wake<W: Word32>(parked: &W) -> bool {
    // SeqCst fence: orders our publication before the `parked` load
    // (store-load), the partner of the fence in `announce_park`.
    fence(Ordering::SeqCst);
    parked.load(Ordering::Relaxed) != 0
}

/// A blocked caller's bell (the call table's hand-off): the word a thread
/// sleeps on while another thread of its process reads replies for it.
/// The reader hands the reply over in the caller's table slot (under the
/// table's lock), then rings; the caller looks in its slot (under the lock)
/// before every sleep, and sleeps only while the bell is silent. So a reply
/// handed over between the caller's look and its sleep is never missed: the
/// futex wait finds the bell rung and returns at once.
///
/// Clears the bell for a new call; before the call's slot is visible to
/// other threads (the table lock then orders it before any ring).
pub fn reset_bell<W: Word32>(bell: &W) {
    bell.store(0, Ordering::Relaxed);
}

/// The reader's half: rings `bell` after handing a reply over. The caller
/// then makes one `FUTEX_WAKE` on it.
pub fn ring_bell<W: Word32>(bell: &W) {
    // Release: pairs with the Acquire in `bell_rang`.
    bell.store(1, Ordering::Release);
}

/// The caller's half: whether its bell rang since the reset (look in the
/// slot, under the lock, then), else the caller may sleep on it (value 0).
pub fn bell_rang<W: Word32>(bell: &W) -> bool {
    // Acquire: pairs with the Release in `ring_bell`.
    bell.load(Ordering::Acquire) != 0
}

/// Producer side: publish `value` in `seq` (our memory) and wake the
/// consumer only if its `parked` flag (its memory) says it sleeps.
pub fn ring(seq: &AtomicU32, value: u32, peer_parked: &AtomicU32, stats: &DoorbellStats) {
    // Release: pairs with the Acquire loads of `seq` in `wait`; the record
    // written before this store is visible to a consumer that sees `value`.
    seq.store(value, Ordering::Release);
    if must_wake(peer_parked) {
        count(&stats.wakes);
        sys::futex_wake(seq, i32::MAX);
    }
}

/// Consumer side: waits until `seq` (producer's memory) differs from `seen`
/// and returns the new value. The sleep (in the thread's caller backend,
/// [`crate::wait`]) also ends when one of `watch` (the peer's pidfd) turns
/// readable; `alive` is then called, and after a sleep that found nothing,
/// and may end the wait with an error (peer died or hung up).
#[allow(clippy::too_many_arguments)] // the doorbell's words, policy, and the peer to watch
pub fn wait(
    seq: &AtomicU32,
    seen: u32,
    parked: &AtomicU32,
    cfg: &WaitConfig,
    deadline: Option<&Deadline>,
    stats: &DoorbellStats,
    watch: &[BorrowedFd<'_>],
    mut alive: impl FnMut() -> Result<()>,
) -> Result<u32> {
    // Acquire: pairs with the Release store in `ring`.
    let now = seq.load(Ordering::Acquire);
    if now != seen {
        count(&stats.spin_hits);
        return Ok(now);
    }
    if !cfg.spin.is_zero() {
        // The clock is read only every 1024 spins (a few microseconds), so a
        // wait answered quickly never pays for it.
        let mut start = None;
        loop {
            for _ in 0..1024 {
                std::hint::spin_loop();
                // Acquire: pairs with the Release store in `ring`.
                let now = seq.load(Ordering::Acquire);
                if now != seen {
                    count(&stats.spin_hits);
                    return Ok(now);
                }
            }
            let t0 = *start.get_or_insert_with(Instant::now);
            if t0.elapsed() >= cfg.spin {
                break;
            }
        }
    }
    count(&stats.parks);
    loop {
        if !announce_park(parked, seq, seen) {
            parked.store(0, Ordering::Relaxed);
            // Acquire: pairs with the Release store in `ring`.
            return Ok(seq.load(Ordering::Acquire));
        }
        let mut slice = cfg.park_slice;
        if let Some(d) = deadline {
            let left = d.at().saturating_duration_since(Instant::now());
            if left.is_zero() {
                parked.store(0, Ordering::Relaxed);
                return Err(Error::Timeout(d.after));
            }
            slice = slice.min(left);
        }
        let r = wait::sleep(&[(seq, seen)], watch, slice);
        parked.store(0, Ordering::Relaxed);
        // What the peer published before it died is read first: a record
        // (its goodbye, a last reply) beats its readable pidfd.
        // Acquire: pairs with the Release store in `ring`.
        let moved = seq.load(Ordering::Acquire);
        match r {
            _ if moved != seen => return Ok(moved),
            Ok(w) if w.timed_out || !w.ready_fds.is_empty() => alive()?,
            Ok(_) => {}
            Err(e) => return Err(Error::io("sleep on the peer's queue", e)),
        }
        // Acquire: pairs with the Release store in `ring`.
        let now = seq.load(Ordering::Acquire);
        if now != seen {
            return Ok(now);
        }
        if let Some(d) = deadline {
            if Instant::now() >= d.at() {
                return Err(Error::Timeout(d.after));
            }
        }
    }
}

#[cfg(all(test, rpal_loom))]
mod loom_models {
    //! `RUSTFLAGS="--cfg rpal_loom" cargo test -p rpal-core --release loom`
    use super::{announce_park, announce_park_all, announce_park_counted, bell_rang, must_wake, reset_bell, ring_bell};
    use loom::sync::atomic::AtomicU32;
    use loom::sync::{Arc, Condvar, Mutex};
    use std::sync::atomic::Ordering;

    /// A futex as the kernel implements it: the value check and the sleep
    /// happen under the same lock that a wake takes.
    #[derive(Default)]
    struct Futex {
        lock: Mutex<()>,
        cv: Condvar,
    }

    impl Futex {
        fn wait(&self, word: &AtomicU32, seen: u32) {
            let g = self.lock.lock().unwrap();
            if word.load(Ordering::Relaxed) == seen {
                drop(self.cv.wait(g).unwrap());
            }
        }
        fn wake(&self) {
            let _g = self.lock.lock().unwrap();
            self.cv.notify_all();
        }
    }

    /// A consumer that parks can never miss the producer's record: if it
    /// sleeps, the producer sees `parked` and wakes it (a lost wake-up would
    /// leave it blocked forever, which loom reports as a deadlock).
    #[test]
    fn loom_doorbell_never_loses_a_wakeup() {
        loom::model(|| {
            let seq = Arc::new(AtomicU32::new(0));
            let parked = Arc::new(AtomicU32::new(0));
            let futex = Arc::new(Futex::default());
            let producer = {
                let (seq, parked, futex) = (seq.clone(), parked.clone(), futex.clone());
                loom::thread::spawn(move || {
                    seq.store(1, Ordering::Release);
                    if must_wake(&*parked) {
                        futex.wake();
                    }
                })
            };
            while seq.load(Ordering::Acquire) == 0 {
                if announce_park(&*parked, &*seq, 0) {
                    futex.wait(&seq, 0);
                }
                parked.store(0, Ordering::Relaxed);
            }
            producer.join().unwrap();
        });
    }

    /// A poller's park over two queues: flags first, one fence, then both
    /// words. Whatever the interleaving, each producer either sees its
    /// consumer's flag (and wakes it) or the consumer sees its record.
    #[test]
    fn loom_park_over_many_queues_misses_no_producer() {
        loom::model(|| {
            let words = Arc::new([AtomicU32::new(0), AtomicU32::new(0)]);
            let parked = Arc::new([AtomicU32::new(0), AtomicU32::new(0)]);
            let producers: Vec<_> = (0..2)
                .map(|i| {
                    let (words, parked) = (words.clone(), parked.clone());
                    loom::thread::spawn(move || {
                        words[i].store(1, Ordering::Release);
                        must_wake(&parked[i])
                    })
                })
                .collect();
            announce_park_all(parked.iter());
            let saw: Vec<bool> = words.iter().map(|w| w.load(Ordering::Acquire) != 0).collect();
            for (i, p) in producers.into_iter().enumerate() {
                let woke = p.join().unwrap();
                assert!(woke || saw[i], "queue {i}: record unseen and no wake-up");
            }
        });
    }

    /// Two callers sleeping on one counted `parked` word (a channel's) and
    /// one producer: each caller either sees the reply word move or is
    /// counted in `parked` when the producer looks.
    #[test]
    fn loom_counted_park_misses_no_sleeper() {
        loom::model(|| {
            let word = Arc::new(AtomicU32::new(0));
            let parked = Arc::new(AtomicU32::new(0));
            let producer = {
                let (word, parked) = (word.clone(), parked.clone());
                loom::thread::spawn(move || {
                    word.store(1, Ordering::Release);
                    must_wake(&*parked)
                })
            };
            let callers: Vec<_> = (0..2)
                .map(|_| {
                    let (word, parked) = (word.clone(), parked.clone());
                    loom::thread::spawn(move || {
                        announce_park_counted(&*parked);
                        word.load(Ordering::Acquire) != 0
                    })
                })
                .collect();
            let woke = producer.join().unwrap();
            for c in callers {
                let saw = c.join().unwrap();
                assert!(woke || saw, "a sleeper neither saw the reply nor was woken");
            }
        });
    }

    /// The call table's hand-off: a caller waits for its reply, which another
    /// thread of its process reads and leaves in the caller's slot (the table
    /// is a one-slot table here, under a mutex as in `ShmChannel`), then
    /// rings the caller's bell. The caller looks in its slot before every
    /// sleep and sleeps only while the bell is silent; it must never sleep
    /// through the hand-off (loom reports that as a deadlock) and must get
    /// the reply that was handed over.
    #[test]
    fn loom_call_table_hand_off_wakes_its_caller() {
        loom::model(|| {
            let table = Arc::new(Mutex::new(None::<u64>));
            let bell = Arc::new(AtomicU32::new(7)); // left over from an earlier call
            let futex = Arc::new(Futex::default());
            // The caller's call starts: bell cleared, then its slot is entered.
            reset_bell(&*bell);
            let entered = table.lock().unwrap();
            drop(entered);
            let reader = {
                let (table, bell, futex) = (table.clone(), bell.clone(), futex.clone());
                loom::thread::spawn(move || {
                    *table.lock().unwrap() = Some(42);
                    ring_bell(&*bell);
                    futex.wake();
                })
            };
            let got = loop {
                if let Some(v) = table.lock().unwrap().take() {
                    break v;
                }
                if !bell_rang(&*bell) {
                    futex.wait(&bell, 0);
                }
            };
            assert_eq!(got, 42);
            reader.join().unwrap();
        });
    }
}

#[cfg(all(test, not(rpal_loom)))]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn wakes_a_parked_waiter_without_losing_it() {
        let seq = Arc::new(AtomicU32::new(0));
        let parked = Arc::new(AtomicU32::new(0));
        let stats = Arc::new(DoorbellStats::default());
        let (s2, p2, st2) = (seq.clone(), parked.clone(), stats.clone());
        let t = std::thread::spawn(move || {
            let mut seen = 0;
            while seen != 200 {
                seen = wait(&s2, seen, &p2, &WaitConfig::parked(), None, &st2, &[], || Ok(())).unwrap();
            }
            seen
        });
        for i in 1..=200 {
            // Let the waiter park on some rounds.
            if i % 50 == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
            ring(&seq, i, &parked, &stats);
        }
        assert_eq!(t.join().unwrap(), 200);
        assert!(stats.snapshot().parks > 0);
    }

    #[test]
    fn times_out() {
        let seq = AtomicU32::new(0);
        let parked = AtomicU32::new(0);
        let stats = DoorbellStats::default();
        let deadline = Deadline::after(Duration::from_millis(20));
        let r = wait(
            &seq,
            0,
            &parked,
            &WaitConfig::default(),
            Some(&deadline),
            &stats,
            &[],
            || Ok(()),
        );
        assert!(matches!(r, Err(Error::Timeout(_))), "{r:?}");
        assert_eq!(
            parked.load(Ordering::Relaxed),
            0,
            "a timed-out waiter clears its parked flag"
        );
    }
}
