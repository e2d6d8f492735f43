//! The same calls over a byte stream: TCP (peers on other hosts, and the
//! honest baseline) or a Unix stream socket.
//!
//! The connection opens with the same 256-byte hello as shared memory (no
//! region, no descriptor), so a client built against another trait gets
//! `ServiceMismatch` here too. Then each message is a frame:
//!
//! ```text
//! body_len u32 | call_id u64 | method u32 | status u32 | body (body_len bytes)
//! ```
//!
//! all little-endian. Bodies use [`super::wire`] in stream mode: pointed-to
//! data is copied in. The client writes frames under a lock and one reader
//! thread per connection hands replies to their callers; the server runs on
//! tokio, one task per connection, handlers inline.

mod client;
mod frame;
mod server;

pub use client::StreamChannel;
pub use server::{StreamServer, serve_stream};
