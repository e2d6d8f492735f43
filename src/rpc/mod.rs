//! The RPC layer under `#[rpal::service]`: channels that carry many calls
//! at once (shared memory or a byte stream), the body format, deadlines, and
//! the [`Dispatch`] trait a generated server implements.
//!
//! - [`wire`]: how arguments and results sit in a body, for both transports;
//! - [`ShmChannel`]: calls over shared memory, in place;
//! - [`StreamChannel`]: the same calls over TCP or a Unix stream, copied into frames;
//! - [`Channel`]: either, behind one type, which generated clients hold.

mod async_handler;
mod reconnect;
mod shm;
mod stream;
mod table;
mod wheel;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

pub use async_handler::{Dispatched, HandlerError, HandlerFuture, OwnedArgs, Reply, async_dispatch, failed, named};
pub use reconnect::{Reconnecting, not_up_yet, wait_for};
#[doc(hidden)]
pub use rpal_core::Client;
pub use rpal_core::PeerId;
pub use rpal_core::handshake::MethodInfo;
pub use rpal_core::types::fingerprint;
pub use rpal_poller::{Armed, TimerWheel};
pub use shm::ShmChannel;
pub use stream::{ServiceTable, StreamChannel, StreamLimits, StreamServer, fuzz_frames, serve_stream};
pub use table::Body;
pub use wire::{Mode, Reader, ReleaseSink, Returned, Scratch, ServiceValue, ShmPtr, Viewed, Writer};

use async_handler::Guarded;
use rpal_core::error::{RemoteStatus, Result};
use rpal_core::server::{Handler, Request};
use rpal_core::{PeerMem, PeerRegion};

/// What a reply reader may need besides the body: the server's region (to
/// validate result pointers) and a way to hand lent results back.
pub struct ReplyCtx<'a> {
    shm: Option<(PeerMem<'a>, &'a Arc<PeerRegion>)>,
    sink: Option<&'a dyn Sink>,
}

/// Makes release sinks for lent results.
pub(crate) trait Sink {
    fn sink(&self) -> Arc<dyn ReleaseSink>;
}

impl ReplyCtx<'_> {
    /// A context for a stream reply (no shared memory).
    pub fn stream() -> ReplyCtx<'static> {
        ReplyCtx { shm: None, sink: None }
    }

    /// Reads a pointer-type result: a view into the server's memory, or a
    /// copy when it came over a stream.
    pub fn returned<P: ShmPtr>(&self, r: &mut Reader<'_>) -> Result<Returned<P>> {
        match (self.shm, self.sink, r.raw_pointer()?) {
            (Some((mem, region)), Some(sink), Some((addr, count))) => {
                Returned::lent(mem, region, addr, count, sink.sink())
            }
            _ => Returned::copied(r),
        }
    }
}

/// The name and method-table hash a service announces at the handshake,
/// implemented by the `{Trait}Service` type that `#[rpal::service]`
/// generates (a trait, so that they cannot collide with the method id
/// constants beside them, such as `NAME` for a method `name`).
pub trait ServiceId {
    /// The service name.
    const NAME: &'static str;
    /// Hash of the method table.
    const METHOD_HASH: u64;
    /// Every method's name and id, for naming the methods that differ
    /// when a peer's table does not match.
    const METHODS: &'static [MethodInfo];
}

/// A server-side service: what `#[rpal::service]` generates around a
/// handler. Transports call [`Dispatch::dispatch`] for each request.
pub trait Dispatch: Send + Sync + 'static {
    /// The service name both sides must agree on.
    const SERVICE: &'static str;
    /// Hash of every method's name and signature; checked at the handshake.
    const METHOD_HASH: u64;
    /// Every method's name and id (sent to a peer whose table differs).
    const METHODS: &'static [MethodInfo] = &[];
    /// Whether some handler is async: a host then runs a tokio runtime
    /// for them, also for shared-memory peers.
    const HAS_ASYNC: bool = false;
    /// Handles one call: reads the arguments from `args`, then either runs
    /// a sync handler and writes its result to `reply` ([`Dispatched::Done`])
    /// or returns an async handler's future ([`Dispatched::Async`]), which
    /// owns its arguments and resolves to the reply. `peer` is who lent
    /// results go to.
    fn dispatch(
        this: &Arc<Self>,
        method: u32,
        args: &mut Reader<'_>,
        reply: &mut Writer<'_>,
        peer: PeerId,
    ) -> std::result::Result<Dispatched, RemoteStatus>;
}

/// Adapts a [`Dispatch`] to the shared-memory server's [`Handler`]: the
/// arguments are read in place in the client's memory and the result is
/// written in place in our reply queue. Sync handlers run inline on the
/// poller; async ones are spawned on `rt` and answered through a
/// [`rpal_core::Deferred`], which the poller writes back (and times out).
pub struct ShmHandler<D> {
    dispatch: Arc<D>,
    rt: Option<tokio::runtime::Handle>,
}

impl<D> ShmHandler<D> {
    /// Serves `dispatch`; async handlers run on `rt` (required if it has any).
    pub fn new(dispatch: Arc<D>, rt: Option<tokio::runtime::Handle>) -> Self {
        Self { dispatch, rt }
    }
}

impl<D> Clone for ShmHandler<D> {
    fn clone(&self) -> Self {
        Self {
            dispatch: self.dispatch.clone(),
            rt: self.rt.clone(),
        }
    }
}

impl<D: Dispatch> Handler for ShmHandler<D> {
    #[inline]
    fn handle(&mut self, req: &Request<'_>, reply: &mut [u8]) -> std::result::Result<usize, RemoteStatus> {
        let copies = Scratch::default();
        let mut args = Reader::shm_shared(req.payload, req.mem(), req.peer, &copies);
        let mut out = Writer::fixed(reply);
        let dispatched = match D::dispatch(&self.dispatch, req.method, &mut args, &mut out, req.client) {
            Ok(d) => d,
            Err(status) => {
                out.take_back(req.client); // failed after a lend: the caller never sees it
                return Err(status);
            }
        };
        match dispatched {
            Dispatched::Done => {
                let filled = out.finish_reply(req.client).ok_or(RemoteStatus::BadReply)?;
                if filled.lends {
                    req.lends();
                }
                Ok(filled.len)
            }
            Dispatched::Async(fut) => self.spawn(req, fut, req.client),
        }
    }
}

impl<D: Dispatch> ShmHandler<D> {
    /// Runs an async handler's future on tokio and answers through the
    /// poller when it resolves.
    #[cold]
    fn spawn(&self, req: &Request<'_>, fut: HandlerFuture, peer: PeerId) -> std::result::Result<usize, RemoteStatus> {
        let Some(rt) = &self.rt else {
            tracing::error!(
                method = req.method,
                "an async handler needs a tokio runtime; serve it with a Host"
            );
            return Err(RemoteStatus::HandlerPanicked);
        };
        let deferred = req.defer();
        let guarded = Guarded {
            region: Some(req.peer.clone()),
            fut,
        };
        let task = rt.spawn(async move {
            // A panic here drops `deferred` unanswered: the caller gets
            // HandlerPanicked.
            match guarded.await {
                Err(message) => deferred.complete(Box::new(move |_| {
                    rpal_core::error::set_failure_message(message);
                    Err(RemoteStatus::HandlerPanicked)
                })),
                Ok(Ok(r)) => deferred.complete(Box::new(move |buf| {
                    let mut w = Writer::fixed(buf);
                    if let Err(status) = r.write(&mut w, peer) {
                        w.take_back(peer);
                        return Err(status);
                    }
                    w.finish_reply(peer).ok_or(RemoteStatus::BadReply)
                })),
                Ok(Err(status)) => deferred.fail(status),
            }
        });
        // The poller aborts the task if the caller's budget passes or the
        // client goes away first.
        req.on_cancel(move || task.abort());
        Ok(0)
    }
}

/// The status of a call whose result could not be lent to its caller: the
/// caller's lent quota names itself; anything else is a bad reply.
#[cold]
pub fn lend_status(e: rpal_core::Error) -> RemoteStatus {
    match e {
        rpal_core::Error::QuotaExceeded { quota, .. } => RemoteStatus::QuotaExceeded(quota),
        _ => RemoteStatus::BadReply,
    }
}

/// Reads a method's arguments to the end: a body of another size was built
/// for another signature (`BadRequest`).
#[inline]
pub fn args_done(r: &Reader<'_>) -> std::result::Result<(), RemoteStatus> {
    r.finish().map_err(|_| RemoteStatus::BadRequest)
}

/// A method id: FNV-1a of its name and signature (as `name(args)->ret`
/// with no spaces), never 0 or the reserved close id. `#[rpal::service]`
/// computes the same at compile time.
pub const fn method_id(sig: &str) -> u32 {
    let b = sig.as_bytes();
    let mut h: u32 = 0x811c_9dc5;
    let mut i = 0;
    while i < b.len() {
        h ^= b[i] as u32;
        h = h.wrapping_mul(0x0100_0193);
        i += 1;
    }
    if h == 0 || h == u32::MAX { h ^ 0x5bd1_e995 } else { h }
}

/// The id of a generated method: [`method_id`] of its signature text,
/// with the layout fingerprint ([`ShmSafe::LAYOUT`](rpal_core::ShmSafe::LAYOUT))
/// of every argument and result type folded in. A struct that gains a
/// field, swaps two, or changes a field's type changes the id of every
/// method that carries it, so the handshake refuses a peer built before
/// the change instead of letting it read the bytes wrongly.
pub const fn method_id_typed(sig: &str, layouts: &[u64]) -> u32 {
    let mut h = fingerprint::text(method_id(sig) as u64, sig);
    let mut i = 0;
    while i < layouts.len() {
        h = fingerprint::word(h, layouts[i]);
        i += 1;
    }
    let id = (h ^ (h >> 32)) as u32;
    if id == 0 || id == u32::MAX {
        id ^ 0x5bd1_e995
    } else {
        id
    }
}

/// The method hash of a generated service: its name and its method ids,
/// in the order of their sorted signatures (so the hash covers every
/// argument and result layout, through the ids). Never 0 ("unchecked").
pub const fn service_hash_ids(service: &str, ids: &[u32]) -> u64 {
    let mut h = fingerprint::text(0xcbf2_9ce4_8422_2325, service);
    let mut i = 0;
    while i < ids.len() {
        h = fingerprint::word(h, ids[i] as u64);
        i += 1;
    }
    if h == 0 { 1 } else { h }
}

/// A service's method hash: FNV-1a (64-bit) of its name and its sorted
/// method signatures. 0 is reserved for "unchecked", so it is never produced.
pub fn service_hash(service: &str, sigs: &[&str]) -> u64 {
    let mut sorted = sigs.to_vec();
    sorted.sort_unstable();
    service_hash_sorted(service, &sorted)
}

/// [`service_hash`] of signatures already sorted (byte order): a `const
/// fn`, which the code `#[rpal::service]` generates calls, so the hash has
/// one implementation.
pub const fn service_hash_sorted(service: &str, sorted: &[&str]) -> u64 {
    /// FNV-1a over `part` and a `;` after it.
    const fn fold(mut h: u64, part: &str) -> u64 {
        let b = part.as_bytes();
        let mut i = 0;
        while i <= b.len() {
            h ^= if i < b.len() { b[i] } else { b';' } as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
            i += 1;
        }
        h
    }
    let mut h = fold(0xcbf2_9ce4_8422_2325, service);
    let mut i = 0;
    while i < sorted.len() {
        h = fold(h, sorted[i]);
        i += 1;
    }
    if h == 0 { 1 } else { h }
}

/// A connection a generated client calls through: shared memory or a
/// stream. Cloning shares the connection.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Channel {
    /// Shared memory (same host, by pointer).
    Shm(Arc<ShmChannel>),
    /// TCP or a Unix stream socket (bytes copied into frames).
    Stream(Arc<StreamChannel>),
    /// Either, made again after the peer died or hung up (see
    /// [`Reconnecting`]).
    Reconnecting(Arc<Reconnecting>),
}

impl Channel {
    /// Calls `method`, blocking the thread until the reply, the deadline, or
    /// the peer's death.
    pub fn call<R>(
        &self,
        method: u32,
        timeout: Option<Duration>,
        write: impl FnOnce(&mut Writer<'_>) -> Result<()>,
        read: impl FnOnce(&mut Reader<'_>, &ReplyCtx<'_>) -> Result<R>,
    ) -> Result<R> {
        let r = match self {
            Channel::Shm(c) => c.call(method, timeout, write, read),
            Channel::Stream(c) => c.call(method, timeout, write, read),
            Channel::Reconnecting(re) => {
                let c = re.channel()?;
                let r = c.call(method, timeout, write, read);
                re.after(&c, &r);
                return r;
            }
        };
        as_timeout(r, timeout)
    }

    /// Calls `method` from an async task. Dropping the future cancels the
    /// call: its reply is discarded when it comes.
    pub async fn call_async<R>(
        &self,
        method: u32,
        timeout: Option<Duration>,
        write: impl FnOnce(&mut Writer<'_>) -> Result<()>,
        read: impl FnOnce(&mut Reader<'_>, &ReplyCtx<'_>) -> Result<R>,
    ) -> Result<R> {
        let r = match self {
            Channel::Shm(c) => c.call_async(method, timeout, write, read).await,
            Channel::Stream(c) => c.call_async(method, timeout, write, read).await,
            Channel::Reconnecting(re) => {
                let c = re.channel_async().await?;
                // Boxed: the future would otherwise contain itself.
                let r = Box::pin(c.call_async(method, timeout, write, read)).await;
                re.after(&c, &r);
                return r;
            }
        };
        as_timeout(r, timeout)
    }

    /// Whether calls go through shared memory.
    pub fn is_shm(&self) -> bool {
        match self {
            Channel::Shm(_) => true,
            Channel::Stream(_) => false,
            Channel::Reconnecting(re) => re.current().is_some_and(|c| c.is_shm()),
        }
    }

    /// Whether `self` and `other` are the same connection.
    pub fn same(&self, other: &Channel) -> bool {
        match (self, other) {
            (Channel::Shm(a), Channel::Shm(b)) => Arc::ptr_eq(a, b),
            (Channel::Stream(a), Channel::Stream(b)) => Arc::ptr_eq(a, b),
            (Channel::Reconnecting(a), Channel::Reconnecting(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    /// How many times a reconnecting channel connected again (0 for others).
    pub fn reconnects(&self) -> u64 {
        match self {
            Channel::Reconnecting(re) => re.reconnects(),
            _ => 0,
        }
    }

    /// Calls in flight on this connection.
    pub fn in_flight(&self) -> usize {
        match self {
            Channel::Shm(c) => c.in_flight(),
            Channel::Stream(c) => c.in_flight(),
            Channel::Reconnecting(re) => re.current().map_or(0, |c| c.in_flight()),
        }
    }
}

/// The server gave up at our deadline before our own timer did: to the
/// caller it is the same `Timeout`.
#[inline]
fn as_timeout<R>(r: Result<R>, timeout: Option<Duration>) -> Result<R> {
    match (r, timeout) {
        (
            Err(rpal_core::Error::Remote {
                status: RemoteStatus::DeadlineExceeded,
                ..
            }),
            Some(d),
        ) => Err(rpal_core::Error::Timeout(d)),
        (r, _) => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_ids_are_stable_and_avoid_reserved_values() {
        // Fixed values (FNV-1a, computed independently): changing the hash
        // breaks every deployed client.
        assert_eq!(method_id("add(u64,u64)->u64"), 0xba86_1b15);
        assert_eq!(method_id("add(u32,u64)->u64"), 0xe2c0_f812);
        assert_eq!(method_id(""), 0x811c_9dc5);
        // Signatures whose raw hash is 0 and u32::MAX (found by search): the
        // reserved values are remapped, and still fixed.
        assert_eq!(method_id("m20955f4(u64)->u641"), 0x5bd1_e995);
        assert_eq!(method_id("me283a5(u64)->u64-"), 0xa42e_166a);
        assert_eq!(service_hash("Calc", &["a", "b"]), 0x986e_6c5c_f337_0262);
        assert_eq!(
            service_hash("Calc", &["b", "a"]),
            0x986e_6c5c_f337_0262,
            "order does not matter"
        );
        assert_ne!(service_hash("Calc", &["a"]), service_hash("Calc2", &["a"]));
    }
}
