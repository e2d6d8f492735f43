//! rpal's event poller: a few threads serve many connections.
//!
//! Each poller thread owns a set of connections. It sweeps them (handling
//! every ready request, a batch per connection), then spins an adaptive
//! budget waiting for more, then parks: it marks itself parked on every
//! connection and sleeps in its [`backend`] on all the clients' next-record
//! words at once, the peers' pidfds and sockets, its own wake word, and a
//! timeout. An idle server therefore sleeps; a busy one never makes a system
//! call. At most `cores - 1` pollers spin at a time ([`spin`]).
//!
//! On the calling side, [`AsyncClient`] makes calls `async` for tokio: a
//! waiting task sleeps on a small io_uring ring registered with tokio's
//! reactor, and the server's doorbell wakes it; no task ever spins.
//!
//! New connections are accepted and handshaken on a separate acceptor
//! thread (the handshake is a blocking exchange with a deadline), which
//! hands them to the poller with the fewest connections.

mod async_client;
pub mod backend;
mod host;
mod poller;
mod pool;
pub mod spin;
mod stats;

pub use async_client::AsyncClient;
pub use backend::{Backend, BackendChoice};
pub use host::{Host, HostBuilder};
pub use pool::{PollerConfig, Serving, serve};
pub use stats::{PollerSnapshot, PollerState, PollerStats};
