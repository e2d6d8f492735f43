//! rpal-core: shared memory and the transport under it, in every rpal
//! process (no async runtime: the RPC layer above lives in `rpal`).
//!
//! - [`space`]: the shared address window and the host-wide slot registry;
//! - [`region`]: sealed memfd regions at the same address everywhere;
//! - [`arena`]: the process's own region and its allocator;
//! - [`pkey`]: protection keys that catch stray accesses to peer memory;
//! - [`doorbell`]: spin-then-park waiting with no syscall while both sides are awake;
//! - [`handshake`]: the Unix-socket control plane;
//! - [`client`] and [`server`]: the raw endpoints, one queue each way per connection.

pub mod alloc;
pub mod arena;
pub mod client;
mod conn;
mod cred;
mod deferred;
pub mod doorbell;
pub mod error;
#[doc(hidden)]
pub mod fuzz;
pub mod handshake;
#[cfg(all(test, not(rpal_loom)))]
mod heap_models;
pub mod pkey;
pub mod queue;
pub mod quota;
pub mod region;
pub mod server;
pub mod settings;
pub mod space;
pub mod sync;
// Raw system calls: public to the sibling crates only (not re-exported by
// `rpal`, not documented).
#[doc(hidden)]
pub mod sys;
pub mod types;
pub mod wait;

pub use arena::Arena;
pub use client::{Client, ClientOptions};
pub use conn::{
    FLAG_LENDS, INLINE_CAPACITY, LAYOUT_HASH, LentTable, MAX_LENT_PER_REPLY, METHOD_CLOSE, Peer, budget_bits,
    budget_of, put_lent_table, split_reply,
};
pub use cred::{PeerCred, PeerId};
pub use deferred::{Completion, Deferred, Filled};
pub use doorbell::{DoorbellSnapshot, WaitConfig};
pub use error::{Error, RemoteStatus, Result, ServiceError};
pub use handshake::{PROTOCOL_VERSION, PeerPolicy};
pub use pkey::PkeyStatus;
pub use quota::{LentQuota, Quota, Quotas};
pub use region::{PeerRegion, Region};
pub use server::{Handler, Polled, Request, Server, ServerConn, ServerOptions, ServerStats};
pub use space::{Occupant, SlotOwner, Space, SpaceConfig};
pub use types::{PeerMem, ShmBox, ShmSafe, ShmSlice, ShmString, ShmVec, Walk, WalkLimits};
