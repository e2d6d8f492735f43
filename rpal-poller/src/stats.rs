//! Poller counters: written by the poller thread alone (plain stores, no
//! locked read-modify-writes), read by anyone.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

/// What a poller thread is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollerState {
    /// Handling requests or sweeping its connections.
    Working,
    /// Spinning its budget, waiting for work without sleeping.
    Spinning,
    /// Asleep in its backend: uses no CPU.
    Parked,
    /// Shut down.
    Stopped,
}

/// Live counters of one poller.
#[derive(Debug, Default)]
pub struct PollerStats {
    pub(crate) state: AtomicU8,
    pub(crate) connections: AtomicU64,
    pub(crate) served: AtomicU64,
    pub(crate) sweeps: AtomicU64,
    pub(crate) spin_hits: AtomicU64,
    pub(crate) spin_misses: AtomicU64,
    pub(crate) spin_budget_ns: AtomicU64,
    pub(crate) parks: AtomicU64,
    pub(crate) timeouts: AtomicU64,
    pub(crate) deadlines: AtomicU64,
    pub(crate) closed: AtomicU64,
    pub(crate) died: AtomicU64,
    pub(crate) protocol_errors: AtomicU64,
    pub(crate) other_errors: AtomicU64,
}

pub(crate) fn add(c: &AtomicU64, n: u64) {
    c.store(c.load(Ordering::Relaxed) + n, Ordering::Relaxed);
}

pub(crate) fn sub(c: &AtomicU64, n: u64) {
    c.store(c.load(Ordering::Relaxed).saturating_sub(n), Ordering::Relaxed);
}

impl PollerStats {
    pub(crate) fn set_state(&self, s: PollerState) {
        self.state.store(s as u8, Ordering::Relaxed);
    }

    /// Reads the counters.
    pub fn snapshot(&self, backend: &'static str) -> PollerSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        PollerSnapshot {
            backend,
            state: match self.state.load(Ordering::Relaxed) {
                0 => PollerState::Working,
                1 => PollerState::Spinning,
                2 => PollerState::Parked,
                _ => PollerState::Stopped,
            },
            connections: g(&self.connections),
            served: g(&self.served),
            sweeps: g(&self.sweeps),
            spin_hits: g(&self.spin_hits),
            spin_misses: g(&self.spin_misses),
            spin_budget_ns: g(&self.spin_budget_ns),
            parks: g(&self.parks),
            timeouts: g(&self.timeouts),
            deadlines: g(&self.deadlines),
            closed: g(&self.closed),
            died: g(&self.died),
            protocol_errors: g(&self.protocol_errors),
            other_errors: g(&self.other_errors),
        }
    }
}

/// A snapshot of one poller's counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PollerSnapshot {
    /// Which backend parks this poller (`io_uring`, `futex_waitv`, `epoll`).
    pub backend: &'static str,
    /// What it is doing now.
    pub state: PollerState,
    /// Connections it owns.
    pub connections: u64,
    /// Requests handled.
    pub served: u64,
    /// Sweeps over its connections.
    pub sweeps: u64,
    /// Spins that found work before the budget ran out.
    pub spin_hits: u64,
    /// Spins that ran out and parked.
    pub spin_misses: u64,
    /// The current adaptive spin budget.
    pub spin_budget_ns: u64,
    /// Times it went to sleep.
    pub parks: u64,
    /// Sleeps that ended by timeout.
    pub timeouts: u64,
    /// Deferred (async) calls failed with `DeadlineExceeded` by its wheel.
    pub deadlines: u64,
    /// Connections closed by their client.
    pub closed: u64,
    /// Connections whose client died (pidfd).
    pub died: u64,
    /// Connections dropped for breaking the protocol (`Error::Protocol`).
    pub protocol_errors: u64,
    /// Connections dropped for any other error (an invalid pointer in the
    /// queue, an I/O failure, ...).
    pub other_errors: u64,
}
