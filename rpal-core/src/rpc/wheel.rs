//! Per-call deadlines of async calls: one hashed timing wheel and one timer
//! thread per process, not one timer per call.
//!
//! A deadline goes into the bucket of its millisecond tick (512 buckets,
//! each entry remembers its full tick, so far deadlines just wait for their
//! lap). The thread sleeps until the next non-empty tick with a single
//! timed wait, and sleeps indefinitely when nothing is armed. A call that
//! finishes first disarms its entry (a slab slot freed in O(1)); the stale
//! key left in the bucket is skipped by its generation.
//!
//! Blocking calls need no entry: the blocked thread is its own timer.

use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use crate::error::Error;

const BUCKETS: usize = 512;
const TICK: Duration = Duration::from_millis(1);

/// Something whose call `id` can time out.
pub(crate) trait Expire: Send + Sync {
    /// Fails call `id` with `err` if it is still in flight.
    fn expire(&self, id: u64, err: Error);
}

struct Entry {
    tick: u64,
    generation: u32,
    after: Duration,
    id: u64,
    target: Weak<dyn Expire>,
}

#[derive(Default)]
struct State {
    buckets: Vec<Vec<(usize, u32)>>,
    entries: Vec<Option<Entry>>,
    free: Vec<usize>,
    generations: Vec<u32>,
    armed: usize,
    /// Every tick below this one has fired.
    now_tick: u64,
}

/// The process's wheel.
pub(crate) struct Wheel {
    start: Instant,
    state: Mutex<State>,
    cv: Condvar,
}

/// A deadline entry; dropping it does not disarm (call [`Wheel::disarm`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Armed {
    key: usize,
    generation: u32,
}

impl Wheel {
    /// The process-wide wheel; its thread starts on first use.
    pub(crate) fn global() -> &'static Arc<Wheel> {
        static WHEEL: OnceLock<Arc<Wheel>> = OnceLock::new();
        WHEEL.get_or_init(|| {
            let w = Arc::new(Wheel {
                start: Instant::now(),
                state: Mutex::new(State {
                    buckets: (0..BUCKETS).map(|_| Vec::new()).collect(),
                    ..State::default()
                }),
                cv: Condvar::new(),
            });
            let run = w.clone();
            std::thread::Builder::new()
                .name("rpal-deadlines".into())
                .spawn(move || run.run())
                .expect("spawn the deadline thread");
            w
        })
    }

    fn tick_of(&self, at: Instant) -> u64 {
        // Round up: a deadline never fires early.
        let ns = at.saturating_duration_since(self.start).as_nanos();
        ns.div_ceil(TICK.as_nanos()) as u64
    }

    /// Arms a deadline `after` from now for call `id` of `target`.
    pub(crate) fn arm(&self, after: Duration, id: u64, target: Weak<dyn Expire>) -> Armed {
        let tick = self.tick_of(Instant::now() + after);
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let tick = tick.max(st.now_tick);
        let key = st.free.pop().unwrap_or_else(|| {
            st.entries.push(None);
            st.generations.push(0);
            st.entries.len() - 1
        });
        let generation = st.generations[key];
        st.entries[key] = Some(Entry {
            tick,
            generation,
            after,
            id,
            target,
        });
        st.buckets[tick as usize % BUCKETS].push((key, generation));
        st.armed += 1;
        drop(st);
        self.cv.notify_one();
        Armed { key, generation }
    }

    /// Arms `timeout` (if any) for call `id` of `target`: what an async
    /// call does before it waits.
    pub(crate) fn arm_call<T: Expire + 'static>(target: &Arc<T>, timeout: Option<Duration>, id: u64) -> Option<Armed> {
        timeout.map(|d| {
            let weak: Weak<dyn Expire> = Arc::downgrade(&(target.clone() as Arc<dyn Expire>));
            Self::global().arm(d, id, weak)
        })
    }

    /// Disarms an entry whose call finished first.
    pub(crate) fn disarm(&self, a: Armed) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.remove(a.key, a.generation);
    }

    /// Entries armed and not yet fired or disarmed.
    #[cfg(test)]
    fn armed(&self) -> usize {
        self.state.lock().unwrap().armed
    }

    fn run(&self) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let now = self.tick_of(Instant::now());
            let mut due = Vec::new();
            // Fire every tick up to now (at most one lap: older entries sit
            // in the same buckets and are found by their tick).
            let from = st.now_tick.max(now.saturating_sub(BUCKETS as u64 - 1));
            for t in from..=now {
                let b = t as usize % BUCKETS;
                let bucket = std::mem::take(&mut st.buckets[b]);
                let mut keep = Vec::new();
                for (key, generation) in bucket {
                    match st.entries.get(key).and_then(|e| e.as_ref()) {
                        Some(e) if e.generation == generation && e.tick <= now => {
                            let e = st.remove(key, generation).expect("entry present");
                            due.push(e);
                        }
                        Some(e) if e.generation == generation => keep.push((key, generation)),
                        _ => {} // disarmed
                    }
                }
                st.buckets[b] = keep;
            }
            st.now_tick = now + 1;
            if !due.is_empty() {
                drop(st);
                for e in due {
                    if let Some(t) = e.target.upgrade() {
                        t.expire(e.id, Error::Timeout(e.after));
                    }
                }
                st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                continue;
            }
            if st.armed == 0 {
                st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            // Sleep until the next non-empty bucket (one timed wait).
            let next = (1..=BUCKETS as u64)
                .map(|d| now + d)
                .find(|t| !st.buckets[*t as usize % BUCKETS].is_empty())
                .unwrap_or(now + BUCKETS as u64);
            let at = self.start + TICK * next as u32;
            let left = at.saturating_duration_since(Instant::now());
            st = self.cv.wait_timeout(st, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

impl State {
    fn remove(&mut self, key: usize, generation: u32) -> Option<Entry> {
        let slot = self.entries.get_mut(key)?;
        if slot.as_ref()?.generation != generation {
            return None;
        }
        let e = slot.take();
        self.generations[key] = self.generations[key].wrapping_add(1);
        self.free.push(key);
        self.armed -= 1;
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[derive(Default)]
    struct Record(AtomicU64);
    impl Expire for Record {
        fn expire(&self, id: u64, _err: Error) {
            self.0.fetch_add(id, Ordering::SeqCst);
        }
    }

    #[test]
    fn fires_armed_deadlines_and_skips_disarmed_ones() {
        let w = Wheel::global();
        let r = Arc::new(Record::default());
        let weak: Weak<dyn Expire> = Arc::downgrade(&(r.clone() as Arc<dyn Expire>));
        let before = w.armed();
        let a = w.arm(Duration::from_millis(5), 1, weak.clone());
        let _b = w.arm(Duration::from_millis(10), 10, weak.clone());
        let c = w.arm(Duration::from_millis(600), 100, weak.clone()); // more than one lap
        w.disarm(a);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(r.0.load(Ordering::SeqCst), 10, "only the armed 10 ms deadline fired");
        w.disarm(c);
        assert!(w.armed() <= before, "nothing stays armed");
    }
}
