//! One poller thread: sweep its connections, spin an adaptive budget, park.

use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rpal_core::pkey::Access;

use rpal_core::{Error, Handler, ServerConn};

use crate::backend::Backend;
use crate::stats::{PollerState, PollerStats, add, sub};
use crate::wheel::TimerWheel;
use crate::{PollerConfig, spin};

/// How long a client that hung up has to show its death (an exiting process
/// closes its files before its pidfd turns readable), so that it counts as
/// died rather than closed. Waited for across parks, never in one.
const HANG_UP_GRACE: Duration = Duration::from_millis(200);

/// Where the acceptor hands new connections to a poller.
#[derive(Default)]
pub(crate) struct Inbox {
    new: Mutex<Vec<ServerConn>>,
    pending: AtomicBool,
    /// Bumped on every delivery and at shutdown; the poller sleeps on it too.
    pub wake: AtomicU32,
    pub shutdown: AtomicBool,
}

impl Inbox {
    pub(crate) fn deliver(&self, conn: ServerConn) {
        self.new.lock().unwrap_or_else(|p| p.into_inner()).push(conn);
        self.pending.store(true, Ordering::Release);
        self.ring();
    }

    pub(crate) fn ring(&self) {
        // Release: the delivery (or shutdown flag) happens before the poller
        // sees the wake word move; pairs with the Acquire load in `Poller::park`.
        self.wake.fetch_add(1, Ordering::Release);
        rpal_core::sys::futex_wake(&self.wake, 1);
    }

    fn take(&self) -> Vec<ServerConn> {
        self.pending.store(false, Ordering::Relaxed);
        std::mem::take(&mut *self.new.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

pub(crate) struct Poller<H> {
    conns: Vec<ServerConn>,
    /// A key per connection (parallel to `conns`), stable while it lives.
    keys: Vec<u64>,
    /// When each connection's client hung up (parallel to `conns`), if its
    /// death has not shown yet: see [`HANG_UP_GRACE`].
    hung_up: Vec<Option<Instant>>,
    next_key: u64,
    /// Deadlines of the deferred (async) calls this poller serves, as
    /// (connection key, call id). The park's one timeout (an io_uring
    /// TIMEOUT with that backend) is cut to the wheel's next tick, so there
    /// is no timer per call or per connection.
    deadlines: TimerWheel<(u64, u64)>,
    inbox: Arc<Inbox>,
    handler: H,
    backend: Backend,
    cfg: PollerConfig,
    stats: Arc<PollerStats>,
    budget: Duration,
    /// Bumped when the set of connections changes.
    generation: u64,
}

impl<H: Handler> Poller<H> {
    pub(crate) fn new(
        inbox: Arc<Inbox>,
        handler: H,
        backend: Backend,
        cfg: PollerConfig,
        stats: Arc<PollerStats>,
    ) -> Self {
        let budget = cfg.spin_max;
        Self {
            conns: Vec::new(),
            keys: Vec::new(),
            hung_up: Vec::new(),
            next_key: 0,
            deadlines: TimerWheel::new(),
            inbox,
            handler,
            backend,
            cfg,
            stats,
            budget,
            generation: 0,
        }
    }

    pub(crate) fn run(mut self) {
        // Between handlers the poller reads every client's queue words and
        // sleeps on them (the kernel reads them with this thread's rights),
        // so it holds access to every peer region; `ServerConn::poll` narrows
        // that to one client while its handlers run. Kept across the loop,
        // so a look at the queues costs no PKRU write.
        let mut access = Access::all();
        while !self.inbox.shutdown.load(Ordering::Acquire) {
            self.adopt();
            // Keys of connections adopted since (one RDPKRU when none is new).
            access.refresh();
            if !self.deadlines.is_empty() {
                self.fire_deadlines();
            }
            if self.sweep() > 0 {
                continue;
            }
            if self.spin() {
                continue;
            }
            self.park(&access);
        }
        self.stats.set_state(PollerState::Stopped);
    }

    fn adopt(&mut self) {
        if self.inbox.pending.load(Ordering::Acquire) {
            let new = self.inbox.take();
            add(&self.stats.connections, new.len() as u64);
            for conn in new {
                // A deferred call completing on another thread bumps our wake word.
                let inbox = Arc::downgrade(&self.inbox);
                conn.set_later_waker(Arc::new(move || {
                    if let Some(i) = inbox.upgrade() {
                        i.ring();
                    }
                }));
                self.conns.push(conn);
                self.keys.push(self.next_key);
                self.hung_up.push(None);
                self.next_key += 1;
            }
            self.generation += 1;
        }
    }

    fn drop_conn(&mut self, i: usize, why: Option<Error>) {
        let conn = self.conns.swap_remove(i);
        self.keys.swap_remove(i);
        self.hung_up.swap_remove(i);
        let pid = conn.peer().cred.pid;
        // A dead peer's slot may be taken over by a new process, whose region
        // then replaces the dead one's mapping here: what its connection reads
        // afterwards is someone else's memory, and the error that follows is
        // the death's, not a violation (nonblocking look at the pidfd).
        let dead = || rpal_core::sys::poll_ready(&[conn.peer().pidfd()]).unwrap_or(false);
        match why {
            None => add(&self.stats.closed, 1),
            Some(Error::PeerDied { .. }) => add(&self.stats.died, 1),
            Some(Error::Protocol { .. }) if dead() => add(&self.stats.died, 1),
            Some(Error::Closed { .. }) => add(&self.stats.closed, 1),
            Some(e) => {
                let counter = match e {
                    Error::Protocol { .. } => &self.stats.protocol_errors,
                    _ => &self.stats.other_errors,
                };
                add(counter, 1);
                tracing::warn!(pid, %e, "dropping a connection");
            }
        }
        sub(&self.stats.connections, 1);
        self.generation += 1;
        drop(conn);
    }

    /// Serves whatever is ready on every connection. Returns requests served.
    fn sweep(&mut self) -> usize {
        self.stats.set_state(PollerState::Working);
        add(&self.stats.sweeps, 1);
        let mut served = 0;
        let mut i = 0;
        while i < self.conns.len() {
            let c = &mut self.conns[i];
            let answered = if c.later_pending() { c.flush_later() } else { Ok(0) };
            match answered.and_then(|n| c.poll(&mut self.handler, self.cfg.batch).map(|p| (n, p))) {
                Ok((n, p)) if p.closed => {
                    // The calls before its goodbye were answered: they count.
                    served += n + p.served;
                    self.drop_conn(i, None);
                }
                Ok((n, p)) => {
                    served += n + p.served;
                    self.arm_deadlines(i);
                    i += 1;
                }
                Err(e) => self.drop_conn(i, Some(e)),
            }
        }
        add(&self.stats.served, served as u64);
        served
    }

    /// Puts connection `i`'s new deferred calls with a budget on the wheel.
    fn arm_deadlines(&mut self, i: usize) {
        let new = self.conns[i].take_deadlines();
        if new.is_empty() {
            return;
        }
        let now = Instant::now();
        for (call_id, budget) in new {
            self.deadlines.arm(now + budget, (self.keys[i], call_id));
        }
    }

    /// Fails deferred calls whose budget has passed (`DeadlineExceeded`)
    /// and aborts their work.
    fn fire_deadlines(&mut self) {
        let now = Instant::now();
        if self.deadlines.next_due().is_none_or(|t| t > now) {
            return;
        }
        let mut due = Vec::new();
        self.deadlines.expire(now, &mut due);
        for (key, call_id) in due {
            // A connection that is gone took its calls with it.
            if let Some(i) = self.keys.iter().position(|k| *k == key) {
                match self.conns[i].expire(call_id) {
                    Ok(true) => add(&self.stats.deadlines, 1),
                    Ok(false) => {}
                    Err(e) => self.drop_conn(i, Some(e)),
                }
            }
        }
    }

    /// A connection whose peer may be gone: serve what it sent before going
    /// (its goodbye included), then drop it if it is dead or hung up.
    fn settle(&mut self, i: usize) {
        loop {
            match self.conns[i].poll(&mut self.handler, self.cfg.batch) {
                Ok(p) if p.closed => {
                    add(&self.stats.served, p.served as u64);
                    return self.drop_conn(i, None);
                }
                Ok(p) if p.served > 0 => add(&self.stats.served, p.served as u64),
                Ok(_) => break,
                Err(e) => return self.drop_conn(i, Some(e)),
            }
        }
        match self.conns[i].check_alive() {
            Ok(()) => {}
            // A hang-up: wait (in later parks, not here) for the pidfd to
            // tell whether the client is dying, watching its socket no more.
            Err(Error::Closed { .. }) if self.hung_up[i].is_none() => self.hung_up[i] = Some(Instant::now()),
            Err(e) => self.drop_conn(i, Some(e)),
        }
    }

    /// Drops the connections that hung up more than [`HANG_UP_GRACE`] ago
    /// without dying; returns how long until the next one is due.
    fn bury(&mut self) -> Option<Duration> {
        let now = Instant::now();
        let mut next: Option<Duration> = None;
        let mut i = self.conns.len();
        while i > 0 {
            i -= 1;
            if let Some(at) = self.hung_up[i] {
                let left = (at + HANG_UP_GRACE).saturating_duration_since(now);
                if left.is_zero() {
                    let pid = self.conns[i].peer().cred.pid;
                    self.drop_conn(i, Some(Error::Closed { pid }));
                } else {
                    next = Some(next.map_or(left, |n| n.min(left)));
                }
            }
        }
        next
    }

    fn work_ready(&mut self) -> bool {
        self.inbox.pending.load(Ordering::Relaxed) || self.conns.iter_mut().any(|c| c.ready().unwrap_or(true))
    }

    /// Spins up to the adaptive budget waiting for work; true if some came.
    /// The budget grows when spinning pays off and shrinks when it does not.
    fn spin(&mut self) -> bool {
        if self.budget.is_zero() || self.conns.is_empty() {
            return false;
        }
        let Some(_slot) = spin::acquire() else { return false };
        self.stats.set_state(PollerState::Spinning);
        let start = Instant::now();
        loop {
            // Deferred replies are looked for once per 64 looks at the
            // queues: the hot loop stays on the request words.
            for _ in 0..64 {
                if self.work_ready() {
                    add(&self.stats.spin_hits, 1);
                    self.budget = (self.budget + self.budget / 2).min(self.cfg.spin_max);
                    self.stats
                        .spin_budget_ns
                        .store(self.budget.as_nanos() as u64, Ordering::Relaxed);
                    return true;
                }
                std::hint::spin_loop();
            }
            if self.conns.iter().any(|c| c.later_pending()) {
                return true;
            }
            if start.elapsed() >= self.budget {
                add(&self.stats.spin_misses, 1);
                self.budget = (self.budget / 2).max(self.cfg.spin_min);
                self.stats
                    .spin_budget_ns
                    .store(self.budget.as_nanos() as u64, Ordering::Relaxed);
                return false;
            }
        }
    }

    /// Sleeps in the backend until a client writes, a peer dies or hangs up,
    /// the acceptor delivers, or the park slice passes.
    fn park(&mut self, access: &Access) {
        let burial = self.bury();
        let mut owner: Vec<usize> = Vec::new();
        // Announce the sleep on every connection, then look once more
        // (the consumer half of the doorbell handshake; clients read
        // `parked` after a SeqCst fence before deciding to wake us).
        // Every flag first, one fence, then every word (the loom-modelled
        // `announce_park_all`).
        rpal_core::doorbell::announce_park_all(self.conns.iter().map(|c| c.parked_flag()));
        // Acquire: pairs with the Release in `Inbox::ring`.
        let wake = self.inbox.wake.load(Ordering::Acquire);
        let woken = {
            let mut words: Vec<(&AtomicU32, u32)> = Vec::with_capacity(self.conns.len() + 1);
            words.push((&self.inbox.wake, wake));
            let mut ready = self.inbox.pending.load(Ordering::Acquire) || self.inbox.shutdown.load(Ordering::Acquire);
            // A client that does not read its replies is not served, so its
            // pending requests are not work: look at it again in 1 ms.
            let mut slice = self.cfg.park_slice;
            if let Some(b) = burial {
                slice = slice.min(b);
            }
            if let Some(due) = self.deadlines.next_due() {
                slice = slice.min(due.saturating_duration_since(Instant::now()));
                ready |= slice.is_zero();
            }
            for c in &self.conns {
                // After the wake word's load: a completion after this look rings it.
                ready |= c.later_pending();
                if c.backpressured() {
                    slice = slice.min(Duration::from_millis(1));
                    continue;
                }
                match c.wait_target(access) {
                    Some(t) => words.push(t),
                    None => ready = true,
                }
            }
            if ready {
                None
            } else {
                // Each connection's pidfd, and its socket until it hung up
                // (a hung-up socket is readable for good); `owner[k]` is the
                // connection of descriptor k.
                let mut fds: Vec<BorrowedFd<'_>> = Vec::with_capacity(self.conns.len() * 2);
                for (ci, (c, hung)) in self.conns.iter().zip(&self.hung_up).enumerate() {
                    fds.push(c.peer().pidfd());
                    owner.push(ci);
                    if hung.is_none() {
                        fds.push(c.socket());
                        owner.push(ci);
                    }
                }
                self.stats.set_state(PollerState::Parked);
                add(&self.stats.parks, 1);
                Some(self.backend.wait(&words, &fds, self.generation, slice))
            }
        };
        for c in &self.conns {
            c.parked_flag().store(0, Ordering::Relaxed);
        }
        self.stats.set_state(PollerState::Working);
        match woken {
            None => {}
            Some(Ok(w)) => {
                if w.timed_out {
                    add(&self.stats.timeouts, 1);
                }
                // (Bounded: a backend's index never names a descriptor that is not here.)
                let mut suspects: Vec<usize> = w.ready_fds.iter().filter_map(|&k| owner.get(k).copied()).collect();
                suspects.sort_unstable();
                suspects.dedup();
                for i in suspects.into_iter().rev() {
                    self.settle(i);
                }
            }
            Some(Err(e)) => {
                tracing::error!(%e, backend = self.backend.name(), "poller backend failed; sleeping briefly");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}
