//! The calls in flight on one connection, by call id.
//!
//! Ids are handed out in order under the connection's lock, so the table is
//! a deque indexed by `id - base`: insert, find and remove are O(1), and a
//! finished call at the front lets the deque shrink. A reply for an id we
//! gave out but no longer track (timed out, cancelled) is discarded; a reply
//! for an id never given out is a protocol violation.

use std::collections::VecDeque;
use std::sync::atomic::AtomicU32;
use std::task::Waker;

use rpal_core::error::{Error, Result};
use rpal_core::{LentTable, doorbell, sys};

/// A reply body copied out of the transport, 16-byte aligned.
pub struct Body {
    buf: Box<[u128]>,
    len: usize,
}

impl Body {
    /// A copy of `bytes`.
    pub fn copy(bytes: &[u8]) -> Self {
        let mut buf = vec![0u128; bytes.len().div_ceil(16)].into_boxed_slice();
        bytemuck::cast_slice_mut::<u128, u8>(&mut buf)[..bytes.len()].copy_from_slice(bytes);
        Self { buf, len: bytes.len() }
    }

    /// A zeroed body of `len` bytes, to read into.
    pub fn zeroed(len: usize) -> Self {
        Self {
            buf: vec![0u128; len.div_ceil(16)].into_boxed_slice(),
            len,
        }
    }

    /// Starts a body of `len` bytes that is read in pieces (see [`Growing`]).
    pub fn growing(len: usize) -> Growing {
        Growing {
            buf: Vec::new(),
            len,
            got: 0,
        }
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice::<u128, u8>(&self.buf)[..self.len]
    }

    /// The bytes, to fill.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut::<u128, u8>(&mut self.buf)[..self.len]
    }
}

/// A body being read from a stream, whose memory grows as its bytes
/// arrive (doubling from 64 KiB), so that a header announcing a large body
/// costs nothing until the bytes come.
pub struct Growing {
    buf: Vec<u128>,
    len: usize,
    got: usize,
}

impl Growing {
    /// Where the next bytes go (empty once the body is whole).
    pub fn spare(&mut self) -> &mut [u8] {
        let want = self.len.min((self.got * 2).max(64 << 10));
        if want.div_ceil(16) > self.buf.len() {
            self.buf.resize(want.div_ceil(16), 0);
        }
        &mut bytemuck::cast_slice_mut::<u128, u8>(&mut self.buf)[self.got..want]
    }

    /// Records `n` bytes read into [`Growing::spare`].
    pub fn filled(&mut self, n: usize) {
        self.got += n;
    }

    /// Whether every byte has arrived.
    pub fn done(&self) -> bool {
        self.got >= self.len
    }

    /// The whole body.
    pub fn finish(mut self) -> Body {
        self.buf.resize(self.len.div_ceil(16), 0);
        Body {
            buf: self.buf.into_boxed_slice(),
            len: self.len,
        }
    }
}

/// A blocked thread's wake word: a thread-local word. The thread stays inside
/// the call (and so alive) while its slot holds the word.
#[derive(Clone, Copy)]
pub(crate) struct ThreadWake(std::ptr::NonNull<AtomicU32>);

// SAFETY: points to an atomic that outlives every use (see the type's doc).
unsafe impl Send for ThreadWake {}

impl ThreadWake {
    pub(crate) fn word(&self) -> &AtomicU32 {
        // SAFETY: the owning thread is blocked in the call that holds this
        // wake; its thread-local outlives the call.
        unsafe { self.0.as_ref() }
    }
}

/// Who waits for a call.
pub(crate) enum Waiter {
    /// A blocked thread sleeping on its wake word.
    Thread(ThreadWake),
    /// An async task.
    Task(Option<Waker>),
}

impl Waiter {
    fn wake(&mut self) {
        match self {
            Waiter::Thread(wake) => {
                let wake = wake.word();
                // The slot's state was written (under the table lock) before:
                // the loom-modelled hand-off of `rpal_core::doorbell`.
                doorbell::ring_bell(wake);
                sys::futex_wake(wake, 1);
            }
            Waiter::Task(w) => {
                if let Some(w) = w.take() {
                    w.wake();
                }
            }
        }
    }
}

/// One call in flight.
pub(crate) struct Slot {
    method: u32,
    done: Option<Result<Body>>,
    /// `done` came from the server (not from our deadline): another reply
    /// to the same id is a protocol error, while a reply after our own
    /// timeout is just late.
    replied: bool,
    waiter: Waiter,
    /// The blocks `done`'s body lends us: given back if it is never read.
    lent: Vec<u64>,
}

/// Why a connection stopped carrying calls; each in-flight call gets it.
#[derive(Debug, Clone)]
pub(crate) enum Dead {
    PeerDied(i32),
    Closed(i32),
    Lost(String),
    Protocol(i32, String),
}

impl Dead {
    pub(crate) fn error(&self) -> Error {
        match self {
            Dead::PeerDied(pid) => Error::PeerDied { pid: *pid },
            Dead::Closed(pid) => Error::Closed { pid: *pid },
            Dead::Lost(detail) => Error::ConnectionLost { detail: detail.clone() },
            Dead::Protocol(pid, detail) => Error::Protocol {
                pid: *pid,
                detail: detail.clone(),
            },
        }
    }

    pub(crate) fn of(e: &Error) -> Dead {
        match e {
            Error::PeerDied { pid } => Dead::PeerDied(*pid),
            Error::Closed { pid } => Dead::Closed(*pid),
            Error::Protocol { pid, detail } => Dead::Protocol(*pid, detail.clone()),
            other => Dead::Lost(other.to_string()),
        }
    }
}

/// The table.
#[derive(Default)]
pub(crate) struct Table {
    base: u64,
    slots: VecDeque<Option<Slot>>,
    next_id: u64,
    pub dead: Option<Dead>,
}

impl Table {
    pub(crate) fn new(first_id: u64) -> Self {
        Self {
            base: first_id,
            slots: VecDeque::new(),
            next_id: first_id,
            dead: None,
        }
    }

    /// Fails unless the connection still carries calls.
    pub(crate) fn check(&self) -> Result<()> {
        match &self.dead {
            Some(d) => Err(d.error()),
            None => Ok(()),
        }
    }

    /// Notes that call `id` went out without a slot: its caller holds the
    /// connection until the reply and reads it itself.
    pub(crate) fn sent_untracked(&mut self, id: u64) {
        self.next_id = self.next_id.max(id + 1);
    }

    /// Tracks call `id` (ids are given out in order; ids skipped by
    /// untracked calls become empty slots).
    pub(crate) fn insert(&mut self, id: u64, method: u32, waiter: Waiter) {
        if self.slots.is_empty() {
            self.base = id;
        }
        while self.base + (self.slots.len() as u64) < id {
            self.slots.push_back(None);
        }
        self.slots.push_back(Some(Slot {
            method,
            done: None,
            replied: false,
            waiter,
            lent: Vec::new(),
        }));
        self.next_id = self.next_id.max(id + 1);
    }

    fn index(&self, id: u64) -> Option<usize> {
        id.checked_sub(self.base)
            .map(|i| i as usize)
            .filter(|&i| i < self.slots.len())
    }

    /// The id the next call gets.
    pub(crate) fn next_id(&self) -> u64 {
        self.next_id
    }

    /// Stops tracking `id`; a reply that comes later is discarded. Returns
    /// the blocks lent by a reply that came and was never read: the caller
    /// gives them back.
    #[must_use = "lent blocks of an unread reply must be released"]
    pub(crate) fn remove(&mut self, id: u64) -> Vec<u64> {
        let lent = match self.index(id) {
            Some(i) => self.slots[i].take().map(|s| s.lent).unwrap_or_default(),
            None => Vec::new(),
        };
        while matches!(self.slots.front(), Some(None)) {
            self.slots.pop_front();
            self.base += 1;
        }
        lent
    }

    /// The outcome of `id` if it is known, and stops tracking it. What the
    /// body lends is the reader's to give back (through `Returned`).
    pub(crate) fn take(&mut self, id: u64) -> Option<Result<Body>> {
        let i = self.index(id)?;
        let slot = self.slots[i].as_mut()?;
        let done = slot.done.take()?;
        slot.lent.clear();
        let _ = self.remove(id);
        Some(done)
    }

    /// Replaces the task waker of `id`.
    pub(crate) fn set_waker(&mut self, id: u64, waker: &Waker) {
        if let Some(Some(slot)) = self.index(id).map(|i| &mut self.slots[i]) {
            if let Waiter::Task(w) = &mut slot.waiter {
                match w {
                    Some(old) if old.will_wake(waker) => {}
                    _ => *w = Some(waker.clone()),
                }
            }
        }
    }

    /// Records the reply to `id` (status, body, and the blocks it lends)
    /// and wakes its waiter. Returns an error for an id that was never given
    /// out, and `false` for a reply nobody waits for any more (late): the
    /// caller gives back the blocks it lends.
    pub(crate) fn complete(
        &mut self,
        id: u64,
        status: u32,
        body: &[u8],
        lent: LentTable<'_>,
        pid: i32,
    ) -> Result<bool> {
        self.complete_with(id, status, || Body::copy(body), lent, pid)
    }

    /// As [`Table::complete`], with the body made only if someone waits for it.
    pub(crate) fn complete_with(
        &mut self,
        id: u64,
        status: u32,
        body: impl FnOnce() -> Body,
        lent: LentTable<'_>,
        pid: i32,
    ) -> Result<bool> {
        if id >= self.next_id || id == 0 {
            return Err(Error::Protocol {
                pid,
                detail: format!("reply to call {id}, which was never made"),
            });
        }
        let Some(Some(slot)) = self.index(id).map(|i| &mut self.slots[i]) else {
            return Ok(false); // the late reply of a call that timed out or was dropped
        };
        if slot.replied {
            return Err(Error::Protocol {
                pid,
                detail: format!("second reply to call {id}"),
            });
        }
        slot.replied = true;
        if slot.done.is_some() {
            return Ok(false); // our deadline failed it first: late, discarded
        }
        slot.lent = lent.addrs().collect();
        slot.done = Some(if status == 0 {
            Ok(body())
        } else {
            Err(Error::remote(slot.method, status, body().bytes()))
        });
        slot.waiter.wake();
        Ok(true)
    }

    /// Fails `id` with `err` (its deadline passed) and wakes its waiter.
    pub(crate) fn fail(&mut self, id: u64, err: Error) {
        if let Some(Some(slot)) = self.index(id).map(|i| &mut self.slots[i]) {
            if slot.done.is_none() {
                slot.done = Some(Err(err));
                slot.waiter.wake();
            }
        }
    }

    /// The connection is gone: every call in flight fails with `why`, and
    /// so does every later call.
    pub(crate) fn kill(&mut self, why: Dead) {
        for slot in self.slots.iter_mut().flatten() {
            if slot.done.is_none() {
                slot.done = Some(Err(why.error()));
                slot.waiter.wake();
            }
        }
        self.dead.get_or_insert(why);
    }

    /// Calls in flight.
    pub(crate) fn in_flight(&self) -> usize {
        self.slots.iter().flatten().filter(|s| s.done.is_none()).count()
    }

    /// Whether an async task waits for a call still in flight.
    pub(crate) fn tasks_waiting(&self) -> bool {
        self.slots
            .iter()
            .flatten()
            .any(|s| s.done.is_none() && matches!(s.waiter, Waiter::Task(_)))
    }
}

thread_local! {
    static BELL: AtomicU32 = const { AtomicU32::new(0) };
}

/// This thread's wake word: the word it sleeps on while another thread reads
/// replies for it. Cleared, ready for a new call.
pub(crate) fn thread_wake() -> ThreadWake {
    BELL.with(|b| {
        doorbell::reset_bell(b);
        ThreadWake(std::ptr::NonNull::from(b))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn late_replies_are_discarded_and_double_replies_refused() {
        let none = LentTable::default;
        let mut t = Table::new(1);
        for id in 1..=3 {
            t.insert(id, 7, Waiter::Task(None));
        }
        // Our deadline fails call 1; the server's answer comes after it.
        t.fail(1, Error::Timeout(std::time::Duration::from_millis(5)));
        assert!(
            !t.complete(1, 5, &[], none(), 9).unwrap(),
            "a late reply is not a protocol error"
        );
        assert!(matches!(t.take(1), Some(Err(Error::Timeout(_)))));
        // A reply, then another to the same call: the server is broken.
        assert!(t.complete(2, 0, &[1, 2], none(), 9).unwrap());
        assert!(matches!(t.complete(2, 0, &[3], none(), 9), Err(Error::Protocol { .. })));
        assert_eq!(t.take(2).unwrap().unwrap().bytes(), &[1, 2]);
        // An id never given out.
        assert!(matches!(t.complete(99, 0, &[], none(), 9), Err(Error::Protocol { .. })));
        // A call whose caller gave up (removed): its reply is dropped.
        assert!(t.remove(3).is_empty());
        assert!(!t.complete(3, 0, &[], none(), 9).unwrap());
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn blocks_lent_by_an_unread_reply_come_back_to_the_caller() {
        let mut buf = [0u8; 64];
        let end = rpal_core::put_lent_table(&mut buf, 16, &[0x4000, 0x8000]).unwrap();
        let (_, body, lent) = rpal_core::split_reply(rpal_core::FLAG_LENDS, &buf[..end], 9).unwrap();
        let mut t = Table::new(1);
        t.insert(1, 7, Waiter::Task(None));
        t.insert(2, 7, Waiter::Task(None));
        // Read: the reader's to release.
        assert!(t.complete(1, 0, body, lent, 9).unwrap());
        assert_eq!(t.take(1).unwrap().unwrap().bytes().len(), 16);
        // Arrived, then its caller dropped it unread: handed back.
        assert!(t.complete(2, 0, body, lent, 9).unwrap());
        assert_eq!(t.remove(2), vec![0x4000, 0x8000]);
    }
}
