//! rpal: call another process on the same host like a library, by pointer.
//!
//! Processes share memory mapped at the same virtual address, so a pointer
//! means the same thing on both sides and arguments are never serialized.
//! A service is a trait; [`service`] generates its client and dispatcher,
//! and a [`Host`] serves it over shared memory, TCP and Unix streams at
//! once. See `docs/architecture.md` in the repository for how it works.
//!
//! ```no_run
//! use rpal::prelude::*;
//!
//! #[rpal::service]
//! pub trait Calc {
//!     /// `a + b`.
//!     fn add(&self, a: u64, b: u64) -> u64;
//! }
//!
//! struct Calculator;
//! impl Calc for Calculator {
//!     fn add(&self, a: u64, b: u64) -> u64 {
//!         a + b
//!     }
//! }
//!
//! # fn main() -> rpal::Result<()> {
//! // In the server process:
//! let host = ServeCalc::new(Calculator).host().shm("/tmp/calc.sock").start()?;
//! // In the client process:
//! let calc = CalcClient::connect("/tmp/calc.sock")?;
//! assert_eq!(calc.add(1, 2)?, 3);
//! # drop(host); Ok(()) }
//! ```
//!
//! The modules: [`prelude`] (what a service needs), [`pkey`] (protection
//! keys), [`poller`] (how servers wait), [`raw`] (the byte-level endpoints
//! under the services).

mod async_client;
mod host;
mod rpc;

/// Derives [`ShmSafe`] after checking the type may be shared (see the trait's rules).
pub use rpal_macros::ShmSafe;
/// Turns a trait into a service: handler trait, method table, dispatcher, client.
pub use rpal_macros::service;

pub use host::{Host, HostBuilder};
pub use rpal_core::{
    Arena, DoorbellSnapshot, Error, LentQuota, PeerCred, PeerId, PeerMem, PeerPolicy, PeerRegion, PkeyStatus, Quota,
    Quotas, RemoteStatus, Result, ServiceError, ShmBox, ShmSafe, ShmSlice, ShmString, ShmVec, WaitConfig, Walk,
    WalkLimits,
};
pub use rpal_core::{ClientOptions, ServerOptions};
pub use rpal_poller::{BackendChoice, PollerConfig, PollerSnapshot, PollerState, Serving};
pub use rpc::{Channel, Dispatch, Returned, ServiceId, ShmPtr, StreamLimits, Viewed};

/// Pins the calling thread to CPU `cpu` (`sched_setaffinity`). A caller
/// and its server pinned to different CPUs spin without disturbing each
/// other; see the README on what pinning does to p50 and p99.
pub fn pin_to_cpu(cpu: usize) -> std::io::Result<()> {
    rpal_core::sys::pin_to_cpu(cpu)
}

/// CPUs online (at least 1).
pub fn cpus_online() -> usize {
    rpal_core::sys::cpus_online()
}

/// Protection keys: which peer memory this thread may read now.
pub mod pkey {
    pub use rpal_core::pkey::{Access, PkeyStatus, SEGV_PKUERR, is_active, pkru_writes, set_enabled, status};
}

/// How servers wait: pollers, their backends and spin slots.
pub mod poller {
    pub use rpal_poller::{
        Armed, Backend, BackendChoice, PollerConfig, PollerSnapshot, PollerState, PollerStats, Serving, TimerWheel,
        backend, serve, spin,
    };
}

/// The byte-level API under the services: endpoints that send and receive
/// raw message bodies, the queue, the handshake and the address space. The
/// generated clients and dispatchers are built on these.
pub mod raw {
    pub use crate::async_client::AsyncClient;
    pub use crate::rpc::{method_id, method_id_typed, service_hash, service_hash_ids};
    pub use rpal_core::handshake;
    pub use rpal_core::queue::{self, Bounds, Consumer, Producer};
    pub use rpal_core::{
        Client, Completion, Deferred, FLAG_LENDS, Filled, Handler, INLINE_CAPACITY, LAYOUT_HASH, METHOD_CLOSE,
        Occupant, PROTOCOL_VERSION, Peer, Polled, Region, Request, Server, ServerConn, ServerStats, SlotOwner, Space,
        SpaceConfig, budget_bits, budget_of,
    };
    pub use rpal_poller::serve;
}

/// What generated code uses; not part of the API.
#[doc(hidden)]
pub mod __private {
    pub use crate::rpc::*;
}

/// What a service needs: the macros, the shm types, the host, errors.
pub mod prelude {
    pub use crate::{
        Error, Host, PollerConfig, RemoteStatus, Result, Returned, ServiceError, ServiceId, ShmBox, ShmSafe, ShmSlice,
        ShmString, ShmVec, service,
    };
}
