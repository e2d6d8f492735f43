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
//! [`TimerWheel`] keeps deadlines for a thread that already makes one timed
//! wait (a poller's park).
//!
//! New connections are accepted and handshaken on a separate acceptor
//! thread (the handshake is a blocking exchange with a deadline), which
//! hands them to the poller with the fewest connections.

/// The wait backends the pollers park in: rpal's one way to sleep, defined
/// in `rpal-core` (the raw endpoints wait too) and re-exported here.
pub mod backend {
    pub use rpal_core::wait::{Backend, BackendChoice, Woken, sleep, with_caller};
}
mod poller;
mod pool;
pub mod spin;
mod stats;
mod wheel;

pub use backend::{Backend, BackendChoice};
pub use pool::{PollerConfig, Serving, serve};
pub use stats::{PollerSnapshot, PollerState, PollerStats};
pub use wheel::{Armed, TimerWheel};
