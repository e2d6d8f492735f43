//! Deferred replies. A handler that cannot answer at once (an async handler
//! running on tokio) takes a [`Deferred`] from its request and completes it
//! later, from any thread. The thread serving the connection (the poller)
//! writes the reply into its own queue: each process still writes only its
//! own arena, and only one thread ever writes one connection's replies.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::RemoteStatus;

/// Writes a deferred reply's body into `buf` (in place in the reply queue)
/// and says how long it is, or fails the call with a status.
pub type Completion = Box<dyn FnOnce(&mut [u8]) -> std::result::Result<Filled, RemoteStatus> + Send>;

/// What a [`Completion`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Filled {
    /// The body's length.
    pub len: usize,
    /// Whether the body ends with a lent-block table
    /// ([`crate::put_lent_table`]): the reply then carries
    /// [`crate::FLAG_LENDS`].
    pub lends: bool,
}

impl From<usize> for Filled {
    fn from(len: usize) -> Self {
        Self { len, lends: false }
    }
}

type Cancel = Box<dyn FnOnce() + Send>;

/// One finished deferred call: call id, method, how to write its reply.
pub(crate) type Done = (u64, u32, std::result::Result<Completion, RemoteStatus>);

/// Completions waiting for the connection's serving thread.
#[derive(Default)]
pub(crate) struct DeferredQueue {
    state: Mutex<DeferredState>,
    /// Set with each completion; the serving thread swaps it off.
    pending: AtomicBool,
    /// Wakes the serving thread (a poller bumps its wake word).
    wake: Mutex<Option<Arc<dyn Fn() + Send + Sync>>>,
}

#[derive(Default)]
struct DeferredState {
    done: Vec<Done>,
    /// How to stop each deferred call's work (abort its task), by call id.
    cancels: HashMap<u64, Cancel>,
    /// The connection is gone: completions are dropped, cancels run at once.
    closed: bool,
}

impl DeferredQueue {
    fn state(&self) -> MutexGuard<'_, DeferredState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn set_waker(&self, wake: Arc<dyn Fn() + Send + Sync>) {
        *self.wake.lock().unwrap_or_else(|p| p.into_inner()) = Some(wake);
    }

    /// Whether completions are waiting (a hint; [`DeferredQueue::take`] decides).
    #[inline]
    pub(crate) fn pending(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    fn push(&self, done: Done) {
        {
            let mut st = self.state();
            if st.closed {
                return;
            }
            st.done.push(done);
        }
        // Release: the completion is in the list before the flag is seen;
        // pairs with the Acquire swap in `take` and load in `pending`.
        self.pending.store(true, Ordering::Release);
        let wake = self.wake.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(w) = wake {
            w();
        }
    }

    /// Takes every completion; their cancel hooks are no longer needed.
    pub(crate) fn take(&self) -> Vec<Done> {
        if !self.pending.swap(false, Ordering::AcqRel) {
            return Vec::new();
        }
        let mut st = self.state();
        let done = std::mem::take(&mut st.done);
        for (id, _, _) in &done {
            st.cancels.remove(id);
        }
        done
    }

    /// Puts back completions the serving thread could not write yet.
    pub(crate) fn requeue(&self, mut done: Vec<Done>) {
        if done.is_empty() {
            return;
        }
        {
            let mut st = self.state();
            if st.closed {
                return;
            }
            done.append(&mut st.done);
            st.done = done;
        }
        // Release: as in `push`. No wake: the serving thread put them back.
        self.pending.store(true, Ordering::Release);
    }

    pub(crate) fn on_cancel(&self, id: u64, cancel: Cancel) {
        let mut st = self.state();
        if st.closed {
            drop(st);
            cancel();
        } else {
            st.cancels.insert(id, cancel);
        }
    }

    /// Stops call `id`'s work, if it registered a way to.
    pub(crate) fn cancel(&self, id: u64) {
        let c = self.state().cancels.remove(&id);
        if let Some(c) = c {
            c();
        }
    }

    /// The connection is gone: stop every deferred call's work.
    pub(crate) fn close(&self) {
        let cancels: Vec<Cancel> = {
            let mut st = self.state();
            st.closed = true;
            st.done.clear();
            st.cancels.drain().map(|(_, c)| c).collect()
        };
        for c in cancels {
            c();
        }
    }
}

/// A call whose reply comes later: from [`crate::Request::defer`]. Complete
/// it from any thread. Dropping it unanswered fails the call with
/// `HandlerPanicked` (that is what happens when the task holding it panics),
/// so a caller never waits for a reply that cannot come.
pub struct Deferred {
    call_id: u64,
    method: u32,
    queue: Arc<DeferredQueue>,
    answered: bool,
}

impl Deferred {
    pub(crate) fn new(call_id: u64, method: u32, queue: Arc<DeferredQueue>) -> Self {
        Self {
            call_id,
            method,
            queue,
            answered: false,
        }
    }

    /// The call id.
    pub fn call_id(&self) -> u64 {
        self.call_id
    }

    /// How to stop this call's work if its deadline passes or its client
    /// goes away first (typically aborting its task). Register it before
    /// the handler returns.
    pub fn on_cancel(&self, cancel: impl FnOnce() + Send + 'static) {
        self.queue.on_cancel(self.call_id, Box::new(cancel));
    }

    /// Answers the call: `write` fills the reply body on the serving thread.
    pub fn complete(mut self, write: Completion) {
        self.answered = true;
        self.queue.push((self.call_id, self.method, Ok(write)));
    }

    /// Fails the call with `status`.
    pub fn fail(mut self, status: RemoteStatus) {
        self.answered = true;
        self.queue.push((self.call_id, self.method, Err(status)));
    }
}

impl Drop for Deferred {
    fn drop(&mut self) {
        if !self.answered {
            self.queue
                .push((self.call_id, self.method, Err(RemoteStatus::HandlerPanicked)));
        }
    }
}

impl std::fmt::Debug for Deferred {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deferred")
            .field("call_id", &self.call_id)
            .field("method", &self.method)
            .finish()
    }
}
