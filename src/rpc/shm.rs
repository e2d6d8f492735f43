//! Many calls in flight on one shared-memory connection, from any number of
//! threads and tasks.
//!
//! The connection (one queue each way) sits behind one lock that is never
//! held while waiting. A caller locks, writes its request in place, rings,
//! and reads whatever replies have arrived: its own in place (no copy),
//! others' copied into their table slots, whose waiters it wakes. Then it
//! unlocks and waits on the reply queue's sequence word (spin, then futex)
//! together with its own wake word, so it wakes for either a new reply or
//! for another thread having read its reply. Async tasks are woken by a
//! pump thread, started on the first async call, that does the same reads.
//! Every sleep, a caller's and the pump's, goes through the one wait
//! abstraction (`rpal_core::wait`), watching the server's pidfd too.

use std::future::poll_fn;
use std::os::fd::{AsFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use super::table::{Dead, Table, Waiter, thread_wake};
use super::wheel::{Expire, Wheel};
use super::wire::{Reader, ReleaseSink, Scratch, Writer};
use super::{ReplyCtx, Sink};
use rpal_core::INLINE_CAPACITY;
use rpal_core::client::Client;
use rpal_core::doorbell::{self, WaitConfig};
use rpal_core::error::{Error, Result};
use rpal_core::sys;
use rpal_core::wait;
use rpal_core::{PeerMem, PeerRegion};

/// A word in memory the channel keeps mapped (our endpoint, or the
/// server's region), usable outside the lock.
#[derive(Clone, Copy)]
struct WordRef(NonNull<AtomicU32>);

// SAFETY: an atomic in a mapping the channel owns; shared by reference only.
unsafe impl Send for WordRef {}
// SAFETY: as above.
unsafe impl Sync for WordRef {}

impl WordRef {
    fn new(w: &AtomicU32) -> Self {
        Self(NonNull::from(w))
    }

    /// # Safety
    /// The channel that produced the word must be alive (it keeps the
    /// mapping; released peer ranges stay mapped as zeros until then), and
    /// for a word in the server's region the calling thread must hold access
    /// to it (protection keys) while it uses the reference.
    unsafe fn get<'a>(self) -> &'a AtomicU32 {
        // SAFETY: per the caller's obligation the mapping is live.
        unsafe { self.0.as_ref() }
    }
}

struct Inner {
    client: Client,
    table: Table,
}

/// A shared-memory connection that carries many calls at once. Cheap to
/// share (`Arc`); every method takes `&self`.
pub struct ShmChannel {
    inner: Mutex<Inner>,
    /// The server's region: every call grants access to it for its thread.
    region: Arc<PeerRegion>,
    wait: WaitConfig,
    pid: i32,
    /// Our `parked` word, counted: each sleeper adds one, so the server
    /// wakes us while anyone sleeps.
    parked: WordRef,
    /// Releases of the server's blocks, made without the lock (from `Drop`
    /// of a result), published at the next send or read.
    releases: Mutex<Vec<u64>>,
    has_releases: AtomicBool,
    /// Threads waiting for `inner`: a caller spinning with the lock held
    /// lets go as soon as this is non-zero.
    contenders: AtomicU32,
    pump_started: AtomicBool,
    pump_wake: Arc<AtomicU32>,
    /// The server's pidfd (our own duplicate), watched by every sleep
    /// without the lock.
    pidfd: OwnedFd,
}

impl std::fmt::Debug for ShmChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmChannel")
            .field("server_pid", &self.pid)
            .finish_non_exhaustive()
    }
}

impl ShmChannel {
    /// Wraps a connected client.
    pub fn new(client: Client) -> Result<Arc<Self>> {
        let wait = client.wait_config();
        let pid = client.peer().cred.pid;
        let parked = WordRef::new(client.parked_flag());
        let table = Table::new(client.next_call_id());
        let region = client.peer().region.clone();
        let pidfd = client
            .peer()
            .pidfd()
            .try_clone_to_owned()
            .map_err(|e| Error::io("duplicate the server's pidfd", e))?;
        Ok(Arc::new(Self {
            inner: Mutex::new(Inner { client, table }),
            region,
            wait,
            pid,
            parked,
            releases: Mutex::new(Vec::new()),
            has_releases: AtomicBool::new(false),
            contenders: AtomicU32::new(0),
            pump_started: AtomicBool::new(false),
            pump_wake: Arc::new(AtomicU32::new(0)),
            pidfd,
        }))
    }

    /// The server's pid.
    pub fn server_pid(&self) -> i32 {
        self.pid
    }

    /// Calls in flight now.
    pub fn in_flight(&self) -> usize {
        self.lock().table.in_flight()
    }

    /// Runs `f` on the underlying client (under the lock): stats, test hooks.
    pub fn with_client<R>(&self, f: impl FnOnce(&mut Client) -> R) -> R {
        f(&mut self.lock().client)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic in a caller's `read` leaves the connection consistent
        // (the table and queues change only in non-panicking code).
        if let Ok(g) = self.inner.try_lock() {
            return g;
        }
        // Relaxed: only a hint to a spinning holder; the mutex orders the rest.
        self.contenders.fetch_add(1, Ordering::Relaxed);
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        self.contenders.fetch_sub(1, Ordering::Relaxed);
        g
    }

    /// Spins with the lock held while the reply is not there, nobody else
    /// wants the connection, and the spin budget lasts. True if something
    /// arrived.
    fn spin_locked(&self, word: WordRef, seen: u32) -> bool {
        // SAFETY: the caller holds the lock, so the channel and its mappings live.
        let word = unsafe { word.get() };
        let mut start = None;
        loop {
            for _ in 0..1024 {
                // Acquire: pairs with the server's Release publication.
                if word.load(Ordering::Acquire) != seen {
                    return true;
                }
                if self.contenders.load(Ordering::Relaxed) != 0 {
                    return false;
                }
                std::hint::spin_loop();
            }
            if start.get_or_insert_with(Instant::now).elapsed() >= self.wait.spin {
                return false;
            }
        }
    }

    /// Whether our request queue has room now; an error from the peer's
    /// words (a cursor that lies) ends the connection for every call.
    #[inline]
    fn has_room(&self, inner: &mut Inner) -> Result<bool> {
        inner.client.has_room().map_err(|e| self.fail_conn(inner, e))
    }

    /// One look of a wait for room: publishes our releases, reads replies
    /// (a server held back by our unread replies or by blocks we owe it can
    /// then go on), and says whether there is room; `Timeout` once `limit`
    /// has passed since `start`.
    fn room_step(self: &Arc<Self>, inner: &mut Inner, start: Instant, limit: Option<Duration>) -> Result<bool> {
        if self.has_releases.load(Ordering::Relaxed) {
            self.flush_releases(inner);
        }
        let mut nothing: Option<fn(&mut Reader<'_>, &ReplyCtx<'_>) -> Result<()>> = None;
        self.drain(inner, 0, &mut nothing, &mut None)?;
        inner.table.check()?;
        if self.has_room(inner)? {
            return Ok(true);
        }
        let waited = start.elapsed();
        if let Some(limit) = limit.filter(|l| waited >= *l) {
            return Err(Error::Timeout(limit));
        }
        if waited > self.wait.park_slice {
            if let Err(e) = inner.client.check_alive() {
                return Err(self.fail_conn(inner, e));
            }
        }
        Ok(false)
    }

    /// Returns the lock once our request queue has room, and how long that
    /// took (it counts against the call's budget). While the server is too
    /// far behind, waits without the lock (other callers keep their own
    /// deadlines). At most the call's budget (or the channel's call
    /// timeout), then `Timeout`.
    #[cold]
    fn room<'a>(
        self: &'a Arc<Self>,
        mut inner: MutexGuard<'a, Inner>,
        budget: Option<Duration>,
    ) -> Result<(MutexGuard<'a, Inner>, Duration)> {
        inner.client.count_full_wait();
        let limit = budget.or(inner.client.call_timeout());
        let start = Instant::now();
        loop {
            if self.room_step(&mut inner, start, limit)? {
                return Ok((inner, start.elapsed()));
            }
            drop(inner);
            // The server does not wake producers: look again shortly.
            std::thread::sleep(Duration::from_micros(50));
            inner = self.lock();
        }
    }

    /// The async form of [`ShmChannel::room`]: between looks the task
    /// sleeps 1 ms on the timing wheel, so its executor thread is never
    /// held or spun. The lock it returns is the one it saw room under, so
    /// the send that follows never waits under it.
    async fn room_async(self: &Arc<Self>, budget: Option<Duration>) -> Result<(MutexGuard<'_, Inner>, Duration)> {
        let limit = {
            let mut inner = self.lock();
            if self.has_room(&mut inner)? {
                return Ok((inner, Duration::ZERO));
            }
            inner.client.count_full_wait();
            budget.or(inner.client.call_timeout())
        };
        let start = Instant::now();
        let nap = Arc::new(Nap(Mutex::new(None)));
        loop {
            {
                let mut inner = self.lock();
                if self.room_step(&mut inner, start, limit)? {
                    return Ok((inner, start.elapsed()));
                }
            }
            let mut armed = false;
            poll_fn(|cx| {
                if std::mem::replace(&mut armed, true) {
                    return Poll::Ready(());
                }
                *nap.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(cx.waker().clone());
                let weak: Weak<dyn Expire> = Arc::downgrade(&(nap.clone() as Arc<dyn Expire>));
                let _ = Wheel::global().arm(Duration::from_millis(1), 0, weak);
                Poll::Pending
            })
            .await;
        }
    }

    /// Sends a request whose body `write` fills, and tracks it.
    fn send(
        &self,
        inner: &mut Inner,
        method: u32,
        waiter: Option<Waiter>,
        budget: Option<Duration>,
        write: impl FnOnce(&mut Writer<'_>) -> Result<()>,
    ) -> Result<u64> {
        self.send_capped(inner, method, INLINE_CAPACITY, waiter, budget, write)
    }

    /// As [`ShmChannel::send`], with a body of at most `cap` bytes.
    fn send_capped(
        &self,
        inner: &mut Inner,
        method: u32,
        cap: usize,
        waiter: Option<Waiter>,
        budget: Option<Duration>,
        write: impl FnOnce(&mut Writer<'_>) -> Result<()>,
    ) -> Result<u64> {
        inner.table.check()?;
        if self.has_releases.load(Ordering::Relaxed) {
            self.flush_releases(inner);
        }
        let mut failed = None;
        let sent = inner.client.send_request_within(method, cap, budget, |buf| {
            let mut w = Writer::fixed(buf);
            match write(&mut w) {
                Ok(()) => w.finish().unwrap_or(cap + 1),
                Err(e) => {
                    failed = Some(e);
                    0
                }
            }
        });
        let id = match sent {
            Ok(id) => id,
            Err(e) => return Err(self.fail_conn(inner, e)),
        };
        match waiter {
            Some(w) if failed.is_none() => inner.table.insert(id, method, w),
            // Untracked (the caller keeps the lock), or the request went out
            // empty: its reply, if any, is discarded.
            _ => inner.table.sent_untracked(id),
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(id),
        }
    }

    /// Transport failures end the connection for every call; call-level
    /// errors (too large) pass through.
    fn fail_conn(&self, inner: &mut Inner, e: Error) -> Error {
        match e {
            Error::TooLarge { .. } | Error::Remote { .. } => e,
            e => {
                inner.table.kill(Dead::of(&e));
                e
            }
        }
    }

    /// Gives back the blocks of a reply nobody will read.
    fn release_all(&self, lent: Vec<u64>) {
        lent.into_iter().for_each(|a| self.release(a));
    }

    fn flush_releases(&self, inner: &mut Inner) {
        let mut r = self.releases.lock().unwrap_or_else(|p| p.into_inner());
        self.has_releases.store(false, Ordering::Relaxed);
        for addr in r.drain(..) {
            inner.client.release(addr);
        }
    }

    /// Reads every reply that has arrived. The reply to `mine` (if given)
    /// goes to `read` in place; the others to their slots.
    fn drain<R>(
        self: &Arc<Self>,
        inner: &mut Inner,
        mine: u64,
        read: &mut Option<impl FnOnce(&mut Reader<'_>, &ReplyCtx<'_>) -> Result<R>>,
        out: &mut Option<Result<R>>,
    ) -> Result<()> {
        let Inner { client, table } = inner;
        let pid = self.pid;
        let r = client.drain_replies(|id, status, body, mem| {
            let (status, body, lent) = rpal_core::split_reply(status, body, pid)?;
            if id == mine && read.is_some() {
                let _ = table.remove(id); // never stored: nothing to give back
                let read = read.take().expect("checked above");
                *out = Some(self.finish(status, body, mem, read));
                Ok(false) // ours: stop here, the rest is for their callers
            } else {
                if !table.complete(id, status, body, lent, pid)? && !lent.is_empty() {
                    // Late (timed out, dropped): nobody will read what it
                    // lends, so it goes back to the server now. A server
                    // that sends reply after reply to ids we gave up on
                    // cannot grow our list without end.
                    if self.releases.lock().unwrap_or_else(|p| p.into_inner()).len() + lent.len() > MAX_LATE_RELEASES {
                        return Err(Error::Protocol {
                            pid,
                            detail: format!("over {MAX_LATE_RELEASES} lent blocks in replies nobody waits for"),
                        });
                    }
                    lent.addrs().for_each(|a| self.release(a));
                }
                Ok(true)
            }
        });
        match r {
            Ok(_) => Ok(()),
            Err(e) => Err(self.fail_conn(inner, e)),
        }
    }

    /// Reads a reply with `read`; an error status becomes `Remote` (the
    /// caller fills in the method, see `fix_method`).
    fn finish<R>(
        self: &Arc<Self>,
        status: u32,
        body: &[u8],
        mem: PeerMem<'_>,
        read: impl FnOnce(&mut Reader<'_>, &ReplyCtx<'_>) -> Result<R>,
    ) -> Result<R> {
        if status != 0 {
            return Err(Error::remote(0, status, body));
        }
        let copies = Scratch::default();
        let mut r = Reader::shm(body, mem, &copies);
        let ctx = ReplyCtx {
            shm: Some((mem, &self.region)),
            sink: Some(self as &dyn Sink),
        };
        read(&mut r, &ctx)
    }

    /// Calls `method` and waits (spin, then park) for its reply, at most
    /// `timeout`. `write` builds the arguments in place in our queue;
    /// `read` reads the reply in place in the server's memory.
    pub fn call<R>(
        self: &Arc<Self>,
        method: u32,
        timeout: Option<Duration>,
        write: impl FnOnce(&mut Writer<'_>) -> Result<()>,
        read: impl FnOnce(&mut Reader<'_>, &ReplyCtx<'_>) -> Result<R>,
    ) -> Result<R> {
        // One grant of the server's region for the whole call, waits
        // included (the kernel reads the futex word with our rights).
        let access = self.region.access();
        let mut inner = self.lock();
        let mut budget = timeout;
        if !self.has_room(&mut inner)? {
            let waited;
            (inner, waited) = self.room(inner, timeout)?;
            // One deadline for the whole call: what the wait for room took
            // is gone from the budget (the server is told what is left).
            budget = timeout.map(|t| t.saturating_sub(waited).max(Duration::from_millis(1)));
        }
        let mut read = Some(read);
        let mut out = None;
        // Fast path: while no other thread wants the connection, keep the
        // lock, spin on the reply word, and read the reply in place. The
        // call then never enters the table and takes the lock once.
        let id = self.send(&mut inner, method, None, budget, write)?;
        inner.client.flush();
        let mut spun = false;
        if !self.wait.spin.is_zero() {
            let target = inner
                .client
                .reply_wait_target(&access)
                .map(|(w, v)| (WordRef::new(w), v));
            if let Some((word, seen)) = target {
                spun = !self.spin_locked(word, seen) && self.contenders.load(Ordering::Relaxed) == 0;
            }
            self.drain(&mut inner, id, &mut read, &mut out)?;
            if let Some(r) = out.take() {
                return fix_method(r, method);
            }
        }
        // Slow path: track the call so that whoever reads replies next can
        // hand ours over, and wait without the lock.
        // The deadline counts from here: reading the clock costs as much as
        // the whole fast path, and the spin above is bounded anyway.
        let deadline = budget.zip(timeout).map(|(left, d)| (Instant::now() + left, d));
        let wake = thread_wake();
        inner.table.insert(id, method, Waiter::Thread(wake));
        // Replies were just read (fast path), or the request just went out
        // (no spin): the first look would find nothing, so wait first.
        let mut just_looked = true;
        loop {
            if !std::mem::take(&mut just_looked) {
                self.drain(&mut inner, id, &mut read, &mut out)?;
            }
            if let Some(r) = out.take() {
                return fix_method(r, method);
            }
            if let Some(done) = inner.table.take(id) {
                // Another thread read our reply and copied it for us.
                let read = read.take().expect("not read yet");
                let mem = self.region.mem(&access);
                return done.and_then(|b| fix_method(self.finish(0, b.bytes(), mem, read), method));
            }
            let target = inner
                .client
                .reply_wait_target(&access)
                .map(|(w, v)| (WordRef::new(w), v));
            drop(inner);
            let waited = match target {
                Some((word, seen)) => self.wait(word, seen, wake.word(), deadline, !std::mem::take(&mut spun)),
                None => Ok(()),
            };
            inner = self.lock();
            if let Err(e) = waited {
                if matches!(e, Error::Timeout(_)) {
                    if let Some(done) = inner.table.take(id) {
                        let read = read.take().expect("not read yet");
                        let mem = self.region.mem(&access);
                        return done.and_then(|b| fix_method(self.finish(0, b.bytes(), mem, read), method));
                    }
                    self.release_all(inner.table.remove(id));
                } else {
                    inner.table.kill(Dead::of(&e));
                }
                return Err(e);
            }
        }
    }

    /// Waits until `word` leaves `seen` or `wake` moves, the deadline
    /// passes, or the server dies.
    fn wait(
        &self,
        word: WordRef,
        seen: u32,
        wake: &AtomicU32,
        deadline: Option<(Instant, Duration)>,
        spin: bool,
    ) -> Result<()> {
        // SAFETY: `self` is alive for the whole wait and keeps the mappings.
        let (word, parked) = unsafe { (word.get(), self.parked.get()) };
        let changed = || {
            // Acquire: pairs with the server's Release publication of the
            // reply (and with the Release store of a wake word in `Table`).
            word.load(Ordering::Acquire) != seen || doorbell::bell_rang(wake)
        };
        if spin && !self.wait.spin.is_zero() {
            // The clock is read only after the first 1024 spins, so a reply
            // that comes quickly never pays for it.
            let mut start = None;
            loop {
                for _ in 0..1024 {
                    if changed() {
                        return Ok(());
                    }
                    std::hint::spin_loop();
                }
                if start.get_or_insert_with(Instant::now).elapsed() >= self.wait.spin {
                    break;
                }
            }
        }
        let mut slice = self.wait.park_slice;
        if let Some((at, after)) = deadline {
            let left = at.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout(after));
            }
            slice = slice.min(left);
        }
        // The Dekker pair of the server's `must_wake` (it publishes, fences,
        // then reads `parked`), counted: the loom-modelled helper.
        doorbell::announce_park_counted(parked);
        // The one way to sleep (`rpal_core::wait`): the reply word, our wake
        // word, and the server's pidfd, so its death ends the sleep where
        // the backend can watch descriptors.
        let r = if changed() {
            None
        } else {
            Some(wait::sleep(&[(word, seen), (wake, 0)], &[self.pidfd.as_fd()], slice))
        };
        doorbell::unannounce_counted(parked);
        match r {
            // What the server published before it died is read first.
            _ if changed() => Ok(()),
            None => Ok(()),
            Some(Err(e)) => Err(Error::io("sleep on the reply queue", e)),
            Some(Ok(w)) if !w.ready_fds.is_empty() => Err(Error::PeerDied { pid: self.pid }),
            Some(Ok(w)) if w.timed_out => {
                if let Some((at, after)) = deadline {
                    if Instant::now() >= at {
                        return Err(Error::Timeout(after));
                    }
                }
                self.lock().client.check_alive()
            }
            Some(Ok(_)) => Ok(()),
        }
    }

    /// The async form of [`ShmChannel::call`]: the task is woken by the
    /// pump thread. Dropping the future forgets the call (its reply is
    /// discarded when it comes); a deadline sits in the process's timing wheel.
    pub async fn call_async<R>(
        self: &Arc<Self>,
        method: u32,
        timeout: Option<Duration>,
        write: impl FnOnce(&mut Writer<'_>) -> Result<()>,
        read: impl FnOnce(&mut Reader<'_>, &ReplyCtx<'_>) -> Result<R>,
    ) -> Result<R> {
        self.call_async_capped(method, INLINE_CAPACITY, timeout, write, read)
            .await
    }

    /// As [`ShmChannel::call_async`], with a request body of at most `cap`
    /// bytes (the byte-level `AsyncClient` sets it).
    pub(crate) async fn call_async_capped<R>(
        self: &Arc<Self>,
        method: u32,
        cap: usize,
        timeout: Option<Duration>,
        write: impl FnOnce(&mut Writer<'_>) -> Result<()>,
        read: impl FnOnce(&mut Reader<'_>, &ReplyCtx<'_>) -> Result<R>,
    ) -> Result<R> {
        let (id, budget) = {
            // Sent under the lock that saw room: the send never waits.
            let (mut inner, waited) = self.room_async(timeout).await?;
            let budget = timeout.map(|t| t.saturating_sub(waited).max(Duration::from_millis(1)));
            let id = self.send_capped(&mut inner, method, cap, Some(Waiter::Task(None)), budget, write)?;
            inner.client.flush();
            (id, budget)
        };
        let forget = Forget { chan: self, id };
        let armed = Wheel::arm_call(self, budget, id);
        self.kick_pump();
        let mut read = Some(read);
        let mut out = None;
        let r = poll_fn(|cx| {
            // Access for this poll only: never held across a suspension.
            let access = self.region.access();
            let mut inner = self.lock();
            if let Err(e) = self.drain(&mut inner, id, &mut read, &mut out) {
                return Poll::Ready(Err(e));
            }
            if let Some(r) = out.take() {
                return Poll::Ready(fix_method(r, method));
            }
            if let Some(done) = inner.table.take(id) {
                let read = read.take().expect("not read yet");
                let mem = self.region.mem(&access);
                return Poll::Ready(done.and_then(|b| fix_method(self.finish(0, b.bytes(), mem, read), method)));
            }
            inner.table.set_waker(id, cx.waker());
            Poll::Pending
        })
        .await;
        std::mem::forget(forget);
        if let Some(a) = armed {
            Wheel::global().disarm(a);
        }
        r
    }

    /// Starts the pump on the first async call, or wakes it from its idle sleep.
    fn kick_pump(self: &Arc<Self>) {
        // AcqRel: only one caller wins the swap and spawns; the pump itself
        // reaches the channel through the Arc, not through this flag.
        if !self.pump_started.swap(true, Ordering::AcqRel) {
            let weak = Arc::downgrade(self);
            let wake = self.pump_wake.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("rpal-pump-{}", self.pid))
                .spawn(move || pump(weak, wake));
            if let Err(e) = spawned {
                tracing::error!(%e, "could not start the reply pump; async calls will time out");
            }
        }
        // Release: pairs with the Acquire of the pump's futex check.
        self.pump_wake.store(1, Ordering::Release);
        sys::futex_wake(&self.pump_wake, 1);
    }
}

/// The pump: reads replies for async tasks and wakes them. It holds the
/// channel only while it works, so dropping the last handle ends it.
fn pump(weak: Weak<ShmChannel>, wake: Arc<AtomicU32>) {
    loop {
        wake.store(0, Ordering::Relaxed);
        let Some(chan) = weak.upgrade() else { return };
        // The pump reads and waits on the server's memory for this round.
        let access = chan.region.access();
        let mut inner = chan.lock();
        let mut nothing: Option<fn(&mut Reader<'_>, &ReplyCtx<'_>) -> Result<()>> = None;
        if chan.drain(&mut inner, 0, &mut nothing, &mut None).is_err() || inner.table.dead.is_some() {
            return;
        }
        if !inner.table.tasks_waiting() {
            drop(inner);
            drop(access);
            drop(chan);
            // Idle: sleep until an async call kicks us (wake = 1); with no
            // backend at all (out of descriptors), a short plain sleep.
            if wait::sleep(&[(&wake, 0)], &[], Duration::from_secs(1)).is_err() {
                std::thread::sleep(Duration::from_millis(1));
            }
            continue;
        }
        let target = inner
            .client
            .reply_wait_target(&access)
            .map(|(w, v)| (WordRef::new(w), v));
        drop(inner);
        if let Some((word, seen)) = target {
            if let Err(e) = chan.wait(word, seen, &wake, None, true) {
                chan.lock().table.kill(Dead::of(&e));
                return;
            }
        }
    }
}

/// Releases of late replies' blocks not yet published, at most: far more
/// than an honest server lends (its lent quota for us is 16384 blocks).
const MAX_LATE_RELEASES: usize = 1 << 16;

/// Wakes a task waiting for room when its nap on the timing wheel ends.
struct Nap(Mutex<Option<Waker>>);

impl Expire for Nap {
    fn expire(&self, _: u64, _: Error) {
        if let Some(w) = self.0.lock().unwrap_or_else(|p| p.into_inner()).take() {
            w.wake();
        }
    }
}

/// Forgets a call whose future was dropped before its reply.
struct Forget<'a> {
    chan: &'a Arc<ShmChannel>,
    id: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        let lent = self.chan.lock().table.remove(self.id);
        self.chan.release_all(lent);
    }
}

impl Expire for ShmChannel {
    fn expire(&self, id: u64, err: Error) {
        self.lock().table.fail(id, err);
    }
}

impl ReleaseSink for ShmChannel {
    fn release(&self, addr: u64) {
        self.releases.lock().unwrap_or_else(|p| p.into_inner()).push(addr);
        // Relaxed: a hint; the list itself is read under its lock, and a
        // release seen one call late is still published.
        self.has_releases.store(true, Ordering::Relaxed);
    }
}

impl Sink for Arc<ShmChannel> {
    fn sink(&self) -> Arc<dyn ReleaseSink> {
        self.clone()
    }
}

fn fix_method<R>(r: Result<R>, method: u32) -> Result<R> {
    match r {
        Err(Error::Remote {
            status, name, message, ..
        }) => Err(Error::Remote {
            method,
            name,
            status,
            message,
        }),
        r => r,
    }
}
