//! The process's wheel of async calls' deadlines and its thread: one
//! [`TimerWheel`] (from `rpal-poller`) and one timed wait for all of them.
//! Blocking calls need no entry: the blocked thread is its own timer.

use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use rpal_core::Error;
use rpal_poller::{Armed, TimerWheel};

/// Something whose call `id` can time out.
pub(crate) trait Expire: Send + Sync {
    /// Fails call `id` with `err` if it is still in flight.
    fn expire(&self, id: u64, err: Error);
}

struct Entry {
    after: Duration,
    id: u64,
    target: Weak<dyn Expire>,
}

/// The process's wheel of async calls' deadlines, and its thread.
pub(crate) struct Wheel {
    state: Mutex<TimerWheel<Entry>>,
    cv: Condvar,
}

impl Wheel {
    /// The process-wide wheel; its thread starts on first use.
    pub(crate) fn global() -> &'static Arc<Wheel> {
        static WHEEL: OnceLock<Arc<Wheel>> = OnceLock::new();
        WHEEL.get_or_init(|| {
            let w = Arc::new(Wheel {
                state: Mutex::new(TimerWheel::new()),
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

    /// Arms a deadline `after` from now for call `id` of `target`.
    pub(crate) fn arm(&self, after: Duration, id: u64, target: Weak<dyn Expire>) -> Armed {
        let at = Instant::now() + after;
        let a = self
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .arm(at, Entry { after, id, target });
        self.cv.notify_one();
        a
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
        self.state.lock().unwrap_or_else(|p| p.into_inner()).disarm(a);
    }

    /// Entries armed and not yet fired or disarmed.
    #[cfg(test)]
    fn armed(&self) -> usize {
        self.state.lock().unwrap().len()
    }

    fn run(&self) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut due = Vec::new();
        loop {
            st.expire(Instant::now(), &mut due);
            if !due.is_empty() {
                drop(st);
                for e in due.drain(..) {
                    if let Some(t) = e.target.upgrade() {
                        t.expire(e.id, Error::Timeout(e.after));
                    }
                }
                st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                continue;
            }
            st = match st.next_due() {
                None => self.cv.wait(st).unwrap_or_else(|p| p.into_inner()),
                // One timed wait until the next non-empty tick.
                Some(at) => {
                    let left = at.saturating_duration_since(Instant::now());
                    self.cv.wait_timeout(st, left).unwrap_or_else(|p| p.into_inner()).0
                }
            };
        }
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
        // No timing assumption beyond "arm then disarm takes under 50 ms",
        // so it holds under emulation too: wait for the armed one to fire,
        // then past the disarmed one's deadline.
        let a = w.arm(Duration::from_millis(50), 1, weak.clone());
        let _b = w.arm(Duration::from_millis(10), 10, weak.clone());
        let c = w.arm(Duration::from_secs(120), 100, weak.clone()); // more than one lap
        w.disarm(a);
        let t0 = std::time::Instant::now();
        while r.0.load(Ordering::SeqCst) == 0 && t0.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(r.0.load(Ordering::SeqCst), 10, "only the armed 10 ms deadline fired");
        w.disarm(c);
        assert!(w.armed() <= before, "nothing stays armed");
    }
}
