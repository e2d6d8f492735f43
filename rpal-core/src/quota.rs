//! Per-peer quotas: how much of this process one peer may hold.
//!
//! Every resource a peer can make us spend has a limit here, sized so that
//! one peer's worst case leaves room for the others. Going over fails that
//! peer's call or connection with [`Error::QuotaExceeded`], which names the
//! quota and the setting that raises it; other peers are not touched.
//!
//! [`Error::QuotaExceeded`]: crate::Error::QuotaExceeded

use std::collections::HashMap;
use std::sync::Mutex;

use crate::cred::PeerId;
use crate::error::{Error, Result};

/// A resource with a per-peer (or per-server) limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Quota {
    /// Blocks of our reply queue a client has not read yet.
    ReplyBacklog,
    /// Blocks lent to one peer and not released.
    LentBlocks,
    /// Bytes lent to one peer and not released.
    LentBytes,
    /// Deferred (async) calls of one connection not answered yet.
    DeferredCalls,
    /// Live connections of one peer process.
    ConnectionsPerPeer,
    /// Live connections of a server, all peers together.
    Connections,
    /// Handshakes under way at once.
    Handshakes,
    /// Handshakes of one peer process under way at once.
    HandshakesPerPeer,
    /// Releases we owe a peer that does not consume its release ring.
    PendingReleases,
    /// Bytes of one stream frame.
    FrameBytes,
    /// Calls in flight on one stream connection.
    StreamCalls,
    /// Stream (TCP, Unix stream) connections of a server at once.
    StreamConnections,
}

impl Quota {
    /// Every quota, in code order.
    pub const ALL: [Quota; 12] = [
        Quota::ReplyBacklog,
        Quota::LentBlocks,
        Quota::LentBytes,
        Quota::DeferredCalls,
        Quota::ConnectionsPerPeer,
        Quota::Connections,
        Quota::Handshakes,
        Quota::PendingReleases,
        Quota::FrameBytes,
        Quota::StreamCalls,
        Quota::HandshakesPerPeer,
        Quota::StreamConnections,
    ];

    /// What the quota limits, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Quota::ReplyBacklog => "unread reply blocks per connection",
            Quota::LentBlocks => "lent blocks per peer",
            Quota::LentBytes => "lent bytes per peer",
            Quota::DeferredCalls => "deferred calls in flight per connection",
            Quota::ConnectionsPerPeer => "connections per peer process",
            Quota::Connections => "connections per server",
            Quota::Handshakes => "handshakes in progress",
            Quota::HandshakesPerPeer => "handshakes in progress per peer process",
            Quota::StreamConnections => "stream connections per server",
            Quota::PendingReleases => "releases waiting for the peer to consume its ring",
            Quota::FrameBytes => "bytes per stream frame",
            Quota::StreamCalls => "calls in flight per stream connection",
        }
    }

    /// The setting that raises it.
    pub fn setting(self) -> &'static str {
        match self {
            Quota::ReplyBacklog => "ServerOptions::quotas.reply_backlog_blocks",
            Quota::LentBlocks => "Arena::set_lent_quota (LentQuota::blocks)",
            Quota::LentBytes => "Arena::set_lent_quota (LentQuota::bytes)",
            Quota::DeferredCalls => "ServerOptions::quotas.deferred_calls",
            Quota::ConnectionsPerPeer => "ServerOptions::quotas.connections_per_peer",
            Quota::Connections => "ServerOptions::quotas.connections",
            Quota::Handshakes => "ServerOptions::quotas.handshakes",
            Quota::HandshakesPerPeer => "ServerOptions::quotas.handshakes_per_peer",
            Quota::StreamConnections => "StreamLimits::connections",
            Quota::PendingReleases => "none: the peer must consume its release ring",
            Quota::FrameBytes => "StreamLimits::max_frame",
            Quota::StreamCalls => "StreamLimits::calls_in_flight",
        }
    }

    /// The quota's wire code (in a reply status or a handshake reject).
    pub fn code(self) -> u32 {
        Quota::ALL.iter().position(|q| *q == self).unwrap_or(0) as u32 + 1
    }

    /// The quota a wire code names.
    pub fn from_code(code: u32) -> Option<Quota> {
        Quota::ALL.get((code as usize).checked_sub(1)?).copied()
    }

    /// The error for going over this quota's `limit`.
    pub fn exceeded(self, limit: u64) -> Error {
        Error::QuotaExceeded { quota: self, limit }
    }
}

impl std::fmt::Display for Quota {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A server's quotas ([`ServerOptions::quotas`](crate::ServerOptions)).
/// Lent memory is limited per process, by the arena
/// ([`LentQuota`], [`Arena::set_lent_quota`](crate::Arena::set_lent_quota)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quotas {
    /// Reply-queue blocks (64 KiB each) a client may leave unread before
    /// the server stops taking its requests (they wait; nothing is lost).
    /// 32 blocks is 2 MiB, 1/32 of the default arena.
    pub reply_backlog_blocks: usize,
    /// Deferred calls one connection may have in flight; more are answered
    /// at once with `QuotaExceeded`.
    pub deferred_calls: usize,
    /// Live connections per peer process; more are refused at the handshake.
    pub connections_per_peer: usize,
    /// Live connections of the server, all peers together.
    pub connections: usize,
    /// Handshakes run at once (a thread each); a connection beyond that is
    /// refused at once.
    pub handshakes: usize,
    /// Handshakes of one peer process run at once: a peer that stalls its
    /// handshakes holds only these, and others still get through.
    pub handshakes_per_peer: usize,
}

impl Default for Quotas {
    fn default() -> Self {
        Self {
            reply_backlog_blocks: 32,
            deferred_calls: 1024,
            // A connection costs about 130 KiB of our arena (its endpoint and
            // first queue block): 64 of one peer are 8 MiB, 1/8 of the arena.
            connections_per_peer: 64,
            connections: 256,
            handshakes: 128,
            handshakes_per_peer: 8,
        }
    }
}

/// Memory one peer may hold lent from this process's arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LentQuota {
    /// Blocks.
    pub blocks: usize,
    /// Bytes (block sizes, headers included).
    pub bytes: u64,
}

impl LentQuota {
    /// The default for an arena of `capacity` bytes: an eighth of it, so
    /// one peer that never releases leaves 7/8 to the others.
    pub fn for_capacity(capacity: u64) -> Self {
        Self {
            blocks: 16384,
            bytes: capacity / 8,
        }
    }
}

/// Counts of something per peer and in total, against two limits: the
/// connection counter of a server (per [`PeerId`]) and its handshake
/// counter (per pid: a handshake place lives only until its deadline).
#[derive(Debug)]
pub(crate) struct Counter<K = PeerId> {
    counts: Mutex<(usize, HashMap<K, usize>)>,
}

impl<K> Default for Counter<K> {
    fn default() -> Self {
        Self {
            counts: Mutex::new((0, HashMap::new())),
        }
    }
}

impl<K: Copy + Eq + std::hash::Hash> Counter<K> {
    /// Takes one unit for `peer`, unless that would pass `per_peer` (for it)
    /// or `total` (for all).
    pub(crate) fn take(&self, peer: K, per_peer: (Quota, usize), total: (Quota, usize)) -> Result<()> {
        let mut g = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if g.0 >= total.1 {
            return Err(total.0.exceeded(total.1 as u64));
        }
        let n = g.1.entry(peer).or_default();
        if *n >= per_peer.1 {
            return Err(per_peer.0.exceeded(per_peer.1 as u64));
        }
        *n += 1;
        g.0 += 1;
        Ok(())
    }

    /// Gives back one unit of `peer`; true if it was that peer's last.
    pub(crate) fn give(&self, peer: K) -> bool {
        let mut g = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        g.0 = g.0.saturating_sub(1);
        match g.1.get_mut(&peer) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                g.1.remove(&peer);
                true
            }
            None => true,
        }
    }

    /// Units held by `peer`.
    pub(crate) fn of(&self, peer: K) -> usize {
        let g = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        g.1.get(&peer).copied().unwrap_or(0)
    }

    /// Units held, all peers together.
    pub(crate) fn total(&self) -> usize {
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).0
    }
}

impl Counter<PeerId> {
    /// Units held by any process with `pid` (before its start time is
    /// known: the acceptor's cheap first look).
    pub(crate) fn of_pid(&self, pid: i32) -> usize {
        let g = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        g.1.iter().filter(|(k, _)| k.pid == pid).map(|(_, n)| n).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for q in Quota::ALL {
            assert_eq!(Quota::from_code(q.code()), Some(q));
        }
        assert_eq!(Quota::from_code(0), None);
        assert_eq!(Quota::from_code(99), None);
    }

    #[test]
    fn counter_enforces_both_limits() {
        let c = Counter::<i32>::default();
        let per = (Quota::ConnectionsPerPeer, 2);
        let all = (Quota::Connections, 3);
        c.take(1, per, all).unwrap();
        c.take(1, per, all).unwrap();
        assert!(matches!(
            c.take(1, per, all),
            Err(Error::QuotaExceeded {
                quota: Quota::ConnectionsPerPeer,
                limit: 2
            })
        ));
        c.take(2, per, all).unwrap();
        assert!(matches!(
            c.take(3, per, all),
            Err(Error::QuotaExceeded {
                quota: Quota::Connections,
                ..
            })
        ));
        assert!(!c.give(1));
        assert!(c.give(1), "the peer's last unit");
        assert_eq!((c.of(1), c.of(2), c.total()), (0, 1, 1));
        // Keyed by process, not pid: a later process with the same pid
        // starts from nothing, and the acceptor's first look sees both.
        let ids = Counter::<PeerId>::default();
        let (old, new) = (PeerId { pid: 7, start: 1 }, PeerId { pid: 7, start: 2 });
        ids.take(old, per, all).unwrap();
        ids.take(old, per, all).unwrap();
        ids.take(new, per, all).unwrap();
        assert_eq!((ids.of(old), ids.of(new), ids.of_pid(7)), (2, 1, 3));
    }
}
