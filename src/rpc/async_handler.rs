//! Async handlers: what a dispatcher returns for a method whose handler is
//! a future, and what that future owns so it can outlive the request record.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use super::table::Body;
use super::wire::{Reader, Scratch, Writer};
use rpal_core::error::RemoteStatus;
use rpal_core::{PeerId, PeerMem, PeerRegion};

/// A result computed by an async handler, waiting to be written into a
/// reply (in place in our queue over shared memory, into a frame over a
/// stream). The [`PeerId`] is the caller, for results lent to it.
pub struct Reply(Box<WriteReply>);

type WriteReply = dyn FnOnce(&mut Writer<'_>, PeerId) -> Result<(), RemoteStatus> + Send;

impl Reply {
    /// A reply that `write` fills.
    pub fn new(write: impl FnOnce(&mut Writer<'_>, PeerId) -> Result<(), RemoteStatus> + Send + 'static) -> Self {
        Self(Box::new(write))
    }

    /// The reply of a handler that returned the error `e`: its code and
    /// message, written when the reply is.
    pub fn failed<E: HandlerError + ?Sized>(e: &E) -> Self {
        let (status, message) = (RemoteStatus::Failed(e.code()), e.to_string());
        Self::new(move |_, _| {
            rpal_core::error::set_failure_message(message);
            Err(status)
        })
    }

    /// Writes the reply body.
    pub fn write(self, w: &mut Writer<'_>, peer: PeerId) -> Result<(), RemoteStatus> {
        (self.0)(w, peer)
    }
}

/// The error type of a fallible service method: what
/// [`ServiceError`](rpal_core::ServiceError) asks, named for the message a
/// type that is not one gets.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be the error of a service method",
    label = "does not implement `rpal::ServiceError`",
    note = "its message and code cross to the caller: implement `Display` and `rpal::ServiceError` (whose `code` defaults to 1) for `{Self}`, or return `rpal::Result<T>`"
)]
pub trait HandlerError: std::fmt::Display {
    /// [`ServiceError::code`](rpal_core::ServiceError::code).
    fn code(&self) -> u32;
}

impl<E: rpal_core::ServiceError + ?Sized> HandlerError for E {
    fn code(&self) -> u32 {
        rpal_core::ServiceError::code(self)
    }
}

/// The status of a sync handler that returned the error `e`, its message
/// recorded for the reply this thread writes next.
#[cold]
pub fn failed<E: HandlerError + ?Sized>(e: &E) -> RemoteStatus {
    // The user's code first: if it panics, no message is left behind.
    let status = RemoteStatus::Failed(e.code());
    rpal_core::error::set_failure_message(e.to_string());
    status
}

/// Names the method of a failed call (for generated clients).
#[cold]
pub fn named(method: &'static str) -> impl FnOnce(rpal_core::Error) -> rpal_core::Error {
    move |e| e.in_method(method)
}

/// The future of an async handler: resolves to its reply.
pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<Reply, RemoteStatus>> + Send>>;

/// What dispatching one call did.
pub enum Dispatched {
    /// The reply is written.
    Done,
    /// An async handler: run the future (on tokio); its output is the reply.
    Async(HandlerFuture),
}

/// A call's arguments, owned: the request record is reused as soon as the
/// dispatcher returns, but an async handler reads its arguments later.
/// Values are in a copy of the body; pointer arguments still point into
/// the client's region, which this keeps mapped.
pub struct OwnedArgs {
    body: Body,
    region: Option<Arc<PeerRegion>>,
    /// The copies of string arguments, kept while the future runs.
    copies: Scratch,
}

impl OwnedArgs {
    /// Takes the arguments of `r`, a reader nothing was read from yet.
    pub fn take(r: &Reader<'_>) -> Result<Self, RemoteStatus> {
        let (body, region) = r.parts();
        if region.is_some() != r.is_shm() {
            // A shared-memory reader built without a region handle cannot
            // keep the client's memory mapped for later.
            return Err(RemoteStatus::BadRequest);
        }
        Ok(Self {
            body: Body::copy(body),
            region: region.cloned(),
            copies: Scratch::default(),
        })
    }

    /// A reader over the arguments (validating pointers as the first did).
    /// Its views of the client's memory are read inside the handler's
    /// future, which runs only under `Guarded` (every poll re-grants this
    /// thread access to the client's region).
    pub fn reader(&self) -> Reader<'_> {
        match &self.region {
            // SAFETY: `OwnedArgs` are made only by `async_dispatch`, whose future
            // the shared-memory handler runs inside `Guarded`: every read
            // through the views happens during a poll, with access granted.
            Some(region) => Reader::shm_shared(
                self.body.bytes(),
                unsafe { PeerMem::assume(region) },
                region,
                &self.copies,
            ),
            None => Reader::stream(self.body.bytes()),
        }
    }

    /// The client's region, when the arguments came over shared memory.
    pub fn region(&self) -> Option<&Arc<PeerRegion>> {
        self.region.as_ref()
    }
}

/// What a dispatcher does for an async method: takes the arguments and
/// makes the handler's future from them. Never inlined, so an async method
/// does not make the dispatcher (on every sync call's path) bigger.
#[inline(never)]
pub fn async_dispatch<F, Fut>(args: &Reader<'_>, make: F) -> Result<Dispatched, RemoteStatus>
where
    F: FnOnce(OwnedArgs) -> Fut,
    Fut: Future<Output = Result<Reply, RemoteStatus>> + Send + 'static,
{
    let owned = OwnedArgs::take(args)?;
    Ok(Dispatched::Async(Box::pin(make(owned))))
}

/// Grants the polling thread access to a peer's region, and to no other
/// (protection keys), for each poll of `fut`: an async handler reads
/// pointer arguments in place from whichever tokio thread runs it.
pub(crate) struct Guarded<F> {
    pub region: Option<Arc<PeerRegion>>,
    pub fut: F,
}

impl<F: Future + Unpin> Future for Guarded<F> {
    /// The future's output, or its panic's message.
    type Output = std::result::Result<F::Output, String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let _access = self.region.as_ref().map(|r| r.access_only());
        let fut = &mut self.fut;
        // A panicking handler is not polled again: the caller gets its message.
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Pin::new(fut).poll(cx))) {
            Ok(p) => p.map(Ok),
            Err(p) => Poll::Ready(Err(rpal_core::error::panic_message(&*p))),
        }
    }
}
