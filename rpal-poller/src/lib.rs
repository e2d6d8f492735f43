//! rpal's event poller.
//!
//! Planned: poller threads that busy-poll their connections' queues, spin an
//! adaptive budget, then park through io_uring (`FUTEX_WAITV`, accept,
//! `POLL_ADD` on pidfds, a timeout), with `futex_waitv(2)` and epoll
//! fallbacks and tokio integration. Until that lands this crate exports
//! nothing; the first call path in `rpal-core` waits with its own
//! spin-then-park doorbell.
