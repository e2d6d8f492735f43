//! What a handler sees of one request, and the handler trait.

use std::cell::{Cell, RefCell};
use std::sync::Arc;
use std::time::Duration;

use crate::cred::PeerId;
use crate::deferred::{Deferred, DeferredQueue};
use crate::error::RemoteStatus;
use crate::region::PeerRegion;
use crate::types::PeerMem;

/// One request, as the handler sees it. The payload and every pointer in it
/// live in the client's memory: read them through [`Request::mem`], which
/// validates, and copy what must stay stable. The handler runs with access
/// to this client's region alone (protection keys): views of it are valid
/// for the handler's run, and no other peer's memory is readable.
pub struct Request<'a> {
    /// Method id.
    pub method: u32,
    /// Call id, unique per connection.
    pub call_id: u64,
    /// The inline payload, in place in the client's region.
    pub payload: &'a [u8],
    /// The client's region (an `Arc`, so work that outlives the request,
    /// like an async handler, can keep it mapped).
    pub peer: &'a Arc<PeerRegion>,
    /// The client process: results lent to it are booked under this.
    pub client: PeerId,
    /// The client's memory, readable during the handler's run.
    pub(super) mem: PeerMem<'a>,
    /// How long the caller will wait for the reply, if it set a deadline.
    pub budget: Option<Duration>,
    pub(super) releases: &'a RefCell<Vec<u64>>,
    pub(super) later: &'a Arc<DeferredQueue>,
    pub(super) deferred: &'a Cell<bool>,
    pub(super) lends: &'a Cell<bool>,
}

impl<'a> Request<'a> {
    /// The client's memory, for following pointers in the payload.
    pub fn mem(&self) -> PeerMem<'a> {
        self.mem
    }

    /// Answers later: the handler returns (its reply buffer is not used)
    /// and the returned [`Deferred`] is completed from any thread. The
    /// serving thread writes the reply then; if the caller's budget passes
    /// first it fails the call with `DeadlineExceeded` and runs the
    /// deferred call's cancel hook. Not for one-way messages.
    pub fn defer(&self) -> Deferred {
        self.deferred.set(true);
        Deferred::new(self.call_id, self.method, self.later.clone())
    }

    /// How to stop a deferred call's work (abort its task) if its deadline
    /// passes or its client goes away before it completes.
    pub fn on_cancel(&self, cancel: impl FnOnce() + Send + 'static) {
        self.later.on_cancel(self.call_id, Box::new(cancel));
    }

    /// Says the reply body the handler returns ends with a lent-block table
    /// ([`crate::put_lent_table`]): it goes out with [`crate::FLAG_LENDS`],
    /// so the caller can give the blocks back even if it stopped waiting.
    pub fn lends(&self) {
        self.lends.set(true);
    }

    /// Says we are done with the client's block at `addr` (one it lent us).
    /// Published with the reply; the client frees it when it sees it.
    pub fn release(&self, addr: u64) {
        self.releases.borrow_mut().push(addr);
    }
}

/// Serves requests: fill `reply` (in place in our arena) and return its
/// length, or fail the call with a status.
pub trait Handler {
    /// Handles one request.
    fn handle(&mut self, req: &Request<'_>, reply: &mut [u8]) -> std::result::Result<usize, RemoteStatus>;
}

impl<F> Handler for F
where
    F: FnMut(&Request<'_>, &mut [u8]) -> std::result::Result<usize, RemoteStatus>,
{
    fn handle(&mut self, req: &Request<'_>, reply: &mut [u8]) -> std::result::Result<usize, RemoteStatus> {
        self(req, reply)
    }
}
