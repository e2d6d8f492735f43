//! Deadlines without one timer per call: [`TimerWheel`], a hashed timing
//! wheel whose owner waits for its next due tick in the one timed wait it
//! already makes. Each poller owns one for the deferred calls it serves (its
//! io_uring park timeout is the wheel's next tick); the RPC layer's async
//! calls share one per process, with one thread (`rpal::rpc`).
//!
//! A deadline goes into the bucket of its millisecond tick (512 buckets,
//! each entry remembers its full tick, so far deadlines just wait for their
//! lap). The thread sleeps until the next non-empty tick with a single
//! timed wait, and sleeps indefinitely when nothing is armed. A call that
//! finishes first disarms its entry (a slab slot freed in O(1)); the stale
//! key left in the bucket is skipped by its generation.

use std::time::{Duration, Instant};

const BUCKETS: usize = 512;
const TICK: Duration = Duration::from_millis(1);

/// A hashed timing wheel of items due at given instants (1 ms ticks,
/// rounded up: nothing fires early). Arming and disarming are O(1); finding
/// the next due tick scans at most one lap of buckets. It does not sleep:
/// its owner waits until [`TimerWheel::next_due`] with the one timed wait
/// it already has (a poller's park, the deadline thread's condvar).
pub struct TimerWheel<T> {
    start: Instant,
    buckets: Vec<Vec<(usize, u32)>>,
    entries: Vec<Option<(u64, u32, T)>>,
    free: Vec<usize>,
    generations: Vec<u32>,
    armed: usize,
    /// Every tick below this one has fired.
    now_tick: u64,
}

/// An armed entry; dropping it does not disarm (see [`TimerWheel::disarm`]).
#[derive(Debug, Clone, Copy)]
pub struct Armed {
    key: usize,
    generation: u32,
}

impl<T> Default for TimerWheel<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> TimerWheel<T> {
    /// An empty wheel.
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            buckets: (0..BUCKETS).map(|_| Vec::new()).collect(),
            entries: Vec::new(),
            free: Vec::new(),
            generations: Vec::new(),
            armed: 0,
            now_tick: 0,
        }
    }

    fn tick_of(&self, at: Instant) -> u64 {
        // Round up: a deadline never fires early.
        let ns = at.saturating_duration_since(self.start).as_nanos();
        ns.div_ceil(TICK.as_nanos()) as u64
    }

    /// Arms `item` to fire at `at`.
    pub fn arm(&mut self, at: Instant, item: T) -> Armed {
        let tick = self.tick_of(at).max(self.now_tick);
        let key = self.free.pop().unwrap_or_else(|| {
            self.entries.push(None);
            self.generations.push(0);
            self.entries.len() - 1
        });
        let generation = self.generations[key];
        self.entries[key] = Some((tick, generation, item));
        // A far deadline shares its bucket with nearer ones; its full tick
        // makes it wait for its lap.
        self.buckets[tick as usize % BUCKETS].push((key, generation));
        self.armed += 1;
        Armed { key, generation }
    }

    /// Disarms an entry that has not fired; returns its item. The key left
    /// in its bucket is skipped later by its generation.
    pub fn disarm(&mut self, a: Armed) -> Option<T> {
        let slot = self.entries.get_mut(a.key)?;
        if slot.as_ref()?.1 != a.generation {
            return None;
        }
        let (_, _, item) = slot.take()?;
        self.generations[a.key] = self.generations[a.key].wrapping_add(1);
        self.free.push(a.key);
        self.armed -= 1;
        Some(item)
    }

    /// Entries armed and not yet fired or disarmed.
    pub fn len(&self) -> usize {
        self.armed
    }

    /// Whether nothing is armed.
    pub fn is_empty(&self) -> bool {
        self.armed == 0
    }

    /// Moves every item due at `now` into `out`.
    pub fn expire(&mut self, now: Instant, out: &mut Vec<T>) {
        // The last whole tick that has passed: entries up to it are due.
        let passed = (now.saturating_duration_since(self.start).as_nanos() / TICK.as_nanos()) as u64;
        let now = passed.max(self.now_tick.saturating_sub(1));
        // Fire every tick up to now (at most one lap: older entries sit in
        // the same buckets and are found by their tick).
        let from = self.now_tick.max(now.saturating_sub(BUCKETS as u64 - 1));
        for t in from..=now {
            let b = t as usize % BUCKETS;
            let mut i = 0;
            while i < self.buckets[b].len() {
                let (key, generation) = self.buckets[b][i];
                match &self.entries[key] {
                    Some((tick, g, _)) if *g == generation && *tick <= now => {
                        self.buckets[b].swap_remove(i);
                        if let Some(item) = self.disarm(Armed { key, generation }) {
                            out.push(item);
                        }
                    }
                    Some((_, g, _)) if *g == generation => i += 1,
                    _ => {
                        self.buckets[b].swap_remove(i); // disarmed
                    }
                }
            }
        }
        self.now_tick = now + 1;
    }

    /// When the next armed entry is due (`None` if nothing is armed). May
    /// be early by up to a lap for an entry far away: the owner wakes,
    /// finds nothing due, and asks again.
    pub fn next_due(&self) -> Option<Instant> {
        if self.armed == 0 {
            return None;
        }
        let next = (0..BUCKETS as u64)
            .map(|d| self.now_tick + d)
            .find(|t| !self.buckets[*t as usize % BUCKETS].is_empty())
            .unwrap_or(self.now_tick + BUCKETS as u64);
        Some(self.start + Duration::from_millis(next))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timer_wheel_fires_in_order_never_early_and_across_laps() {
        let mut w = TimerWheel::new();
        let t0 = w.start;
        let ms = Duration::from_millis;
        let a = w.arm(t0 + ms(3), "a");
        w.arm(t0 + ms(7), "b");
        w.arm(t0 + ms(700), "far"); // more than one lap away
        w.arm(t0 + ms(3), "a2");
        assert_eq!(w.len(), 4);
        assert_eq!(w.disarm(a), Some("a"));
        assert_eq!(w.disarm(a), None, "a stale handle disarms nothing");
        assert_eq!(w.next_due(), Some(t0 + ms(3)));
        let mut out = Vec::new();
        w.expire(t0 + ms(2), &mut out);
        assert!(out.is_empty(), "nothing fires early");
        w.expire(t0 + ms(3), &mut out);
        assert_eq!(out, ["a2"]);
        w.expire(t0 + ms(200), &mut out);
        assert_eq!(out, ["a2", "b"]);
        w.expire(t0 + ms(600), &mut out);
        assert_eq!(out.len(), 2, "the far entry waits for its lap");
        assert!(w.next_due().is_some());
        w.expire(t0 + ms(701), &mut out);
        assert_eq!(out, ["a2", "b", "far"]);
        assert!(w.is_empty() && w.next_due().is_none());
        // Armed in the past: due at the next look.
        w.arm(t0, "late");
        w.expire(t0 + ms(702), &mut out);
        assert_eq!(out.last(), Some(&"late"));
    }
}
