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

pub use client::{ServiceTable, StreamChannel};
pub use server::{StreamServer, serve_stream};

/// Fuzzing entry (see `rpal_core::fuzz`): the stream frame decoder over
/// `data` as a peer's byte stream, with a 1 MiB frame limit; returns how
/// many frames were read before the stream ended or broke a limit.
#[doc(hidden)]
pub fn fuzz_frames(data: &[u8]) -> usize {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime");
    let limits = StreamLimits {
        max_frame: 1 << 20,
        ..StreamLimits::default()
    };
    rt.block_on(async {
        let mut rd = data;
        let mut n = 0;
        while let Ok((_, _, _, body)) = server::read_frame(&mut rd, &limits).await {
            assert!(body.bytes().len() <= limits.max_frame);
            n += 1;
        }
        n
    })
}

use std::time::Duration;

/// What one stream peer may hold of a server, and how long it may keep it
/// waiting ([`HostBuilder::stream_limits`](crate::HostBuilder::stream_limits)).
/// Going over a size limit answers that call with
/// `RemoteStatus::QuotaExceeded`; a peer past a deadline is disconnected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamLimits {
    /// Largest frame body accepted (default 16 MiB). A body's memory is
    /// taken as its bytes arrive, never from the header's word alone.
    pub max_frame: usize,
    /// Longest a connection may stay silent between frames (default 5 min).
    pub idle: Duration,
    /// Longest the rest of a frame may take once its header has come, and
    /// a reply's write may wait for the peer to read (default 10 s).
    pub io: Duration,
    /// Deadline of the hello (default 5 s).
    pub handshake: Duration,
    /// Stream connections at once, all peers together (default 256).
    pub connections: usize,
    /// Async calls in flight per connection (default 1024).
    pub calls_in_flight: usize,
}

impl Default for StreamLimits {
    fn default() -> Self {
        Self {
            max_frame: 16 << 20,
            idle: Duration::from_secs(300),
            io: Duration::from_secs(10),
            handshake: Duration::from_secs(5),
            connections: 256,
            calls_in_flight: 1024,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fuzz_frames;
    use proptest::prelude::*;

    /// A frame: header (body length, call id, method, status) and body.
    fn frame(body: &[u8], id: u64) -> Vec<u8> {
        let mut f = vec![0u8; super::frame::FRAME_HEADER];
        super::frame::encode_header(&mut f, body.len(), id, 1, 0);
        f.extend_from_slice(body);
        f
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// The proptest twin of the `frames` fuzz target.
        #[test]
        fn any_stream_decodes_or_stops(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = fuzz_frames(&data);
        }

        /// Whole frames are read, whatever follows them.
        #[test]
        fn whole_frames_then_garbage(bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..8),
                                     tail in proptest::collection::vec(any::<u8>(), 0..40)) {
            let mut data = Vec::new();
            for (i, b) in bodies.iter().enumerate() {
                data.extend(frame(b, i as u64));
            }
            let whole = bodies.len();
            data.extend(tail);
            prop_assert!(fuzz_frames(&data) >= whole);
        }
    }

    /// A header that claims more than the limit stops the decoder at once.
    #[test]
    fn a_header_over_the_limit_stops() {
        let mut data = vec![0u8; super::frame::FRAME_HEADER];
        super::frame::encode_header(&mut data, (1 << 20) + 1, 9, 1, 0);
        assert_eq!(fuzz_frames(&data), 0);
    }
}
