//! rpal: call another process on the same host like a library, by pointer.
//!
//! Processes share memory mapped at the same virtual address, so a pointer
//! means the same thing on both sides and arguments are never serialized.
//! See `docs/architecture.md` in the repository for the architecture. This
//! crate re-exports the parts in `rpal-core`; [`prelude`] has what a typical
//! program needs.
//!
//! ```no_run
//! use rpal::prelude::*;
//!
//! # fn main() -> rpal::Result<()> {
//! let mut client = Client::connect("/tmp/calc.sock", ClientOptions::new("calc"))?;
//! let reply = client.call(1, &40u64.to_le_bytes())?;
//! # let _ = reply; Ok(()) }
//! ```

pub use rpal_core::*;

mod async_client;
mod host;
pub mod rpc;

pub use async_client::AsyncClient;
pub use host::{Host, HostBuilder};
/// Derives [`ShmSafe`] after checking the type may be shared (see the trait's rules).
pub use rpal_macros::ShmSafe;
/// Turns a trait into a service: handler trait, method table, dispatcher, client.
pub use rpal_macros::service;
/// The poller crate: backends, spin slots, stats.
pub use rpal_poller as poller;
pub use rpal_poller::{BackendChoice, PollerConfig, PollerSnapshot, PollerState, Serving, serve};

/// The types most programs use.
pub mod prelude {
    pub use crate::rpc::{Returned, ServiceId};
    pub use crate::{AsyncClient, Host};
    pub use rpal_core::{
        Arena, Client, ClientOptions, Error, Handler, PeerMem, PeerPolicy, PeerRegion, RemoteStatus, Request, Result,
        Server, ServerOptions, ShmBox, ShmSafe, ShmSlice, ShmString, ShmVec, WaitConfig, Walk,
    };
    pub use rpal_macros::{ShmSafe, service};
    pub use rpal_poller::{PollerConfig, Serving, serve};
}
