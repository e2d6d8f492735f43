//! A message: one queue record, a 16-byte header (call id, method, status
//! with the caller's deadline budget) and the body.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::queue::{Consumer, Producer};
use crate::types::PeerMem;

/// Message header: call id, method, status.
pub const MSG_HEADER: usize = 16;
/// Body bytes a reply (and a default request) may carry inline. Larger data
/// travels by pointer into the sender's arena, or with a sized call.
pub const INLINE_CAPACITY: usize = 4096 - MSG_HEADER;
/// Reserved method id: the client is closing the connection.
pub const METHOD_CLOSE: u32 = u32::MAX;
/// Request status bit: the client expects no reply.
pub(crate) const FLAG_ONEWAY: u32 = 1 << 31;
/// Request status bits 0..24: the caller's remaining budget in milliseconds
/// (0: no deadline). Relative, so it means the same over TCP between hosts;
/// the time the request waits in the queue is not counted.
const BUDGET_MASK: u32 = 0x00ff_ffff;

/// The status bits that carry a request's deadline `budget` (rounded up to
/// whole milliseconds; budgets over about 4.6 hours saturate).
pub fn budget_bits(budget: Option<Duration>) -> u32 {
    match budget {
        None => 0,
        Some(d) => d.as_micros().div_ceil(1000).clamp(1, BUDGET_MASK as u128) as u32,
    }
}

/// The deadline budget a request's status bits carry.
pub fn budget_of(status: u32) -> Option<Duration> {
    match status & BUDGET_MASK {
        0 => None,
        ms => Some(Duration::from_millis(ms as u64)),
    }
}
/// One message, read in place from the peer's queue.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Msg<'a> {
    pub call_id: u64,
    pub method: u32,
    pub status: u32,
    pub body: &'a [u8],
}

/// Reads the next message, if one is ready. `rx` and `mem` are separate
/// borrows so the caller can answer while holding the message.
pub(crate) fn next_msg<'a>(rx: &mut Consumer, mem: PeerMem<'a>) -> Result<Option<Msg<'a>>> {
    let Some(rec) = rx.next(mem)? else { return Ok(None) };
    if rec.len() < MSG_HEADER {
        return Err(Error::Protocol {
            pid: mem.pid(),
            detail: format!("message of {} bytes is shorter than its header", rec.len()),
        });
    }
    let (head, body) = rec.split_at(MSG_HEADER);
    let u32_at = |at: usize| u32::from_le_bytes(head[at..at + 4].try_into().expect("4 bytes"));
    Ok(Some(Msg {
        call_id: u64::from_le_bytes(head[0..8].try_into().expect("8 bytes")),
        method: u32_at(8),
        status: u32_at(12),
        body,
    }))
}

/// Appends one message to `tx`: `write` fills the body (at most `cap`
/// bytes) and returns its length and the status to send.
pub(crate) fn write_msg(
    tx: &mut Producer,
    method: u32,
    call_id: u64,
    cap: usize,
    write: impl FnOnce(&mut [u8]) -> (usize, u32),
) -> Result<()> {
    let buf = tx.reserve(MSG_HEADER + cap)?;
    let (n, status) = write(&mut buf[MSG_HEADER..]);
    if n > cap {
        return Err(Error::TooLarge { len: n, capacity: cap });
    }
    put_header(buf, call_id, method, status);
    tx.commit(MSG_HEADER + n);
    Ok(())
}

/// Writes a message header (call id, method, status) at the start of `buf`.
pub(crate) fn put_header(buf: &mut [u8], call_id: u64, method: u32, status: u32) {
    buf[0..8].copy_from_slice(&call_id.to_le_bytes());
    buf[8..12].copy_from_slice(&method.to_le_bytes());
    buf[12..16].copy_from_slice(&status.to_le_bytes());
}

/// Reply status bit: the body ends with a table of the blocks the reply
/// lends its caller (see [`put_lent_table`]), so that a caller that no
/// longer waits for it (timed out, dropped its future) still gives them
/// back. Requests use the same bit for the one-way flag; the directions
/// never meet.
pub const FLAG_LENDS: u32 = 1 << 31;

/// At most this many lent blocks in one reply's table (a result lends one
/// block per pointer it carries; 64 leaves room for nested results).
pub const MAX_LENT_PER_REPLY: usize = 64;

/// Appends the lent-block table to a reply body of `len` bytes in `buf`:
/// from the next 8-byte boundary, the addresses (u64 LE each), then a u64
/// LE of `count << 32 | len`. Returns the new body length, or `None` if it
/// does not fit (or `addrs` is too long).
pub fn put_lent_table(buf: &mut [u8], len: usize, addrs: &[u64]) -> Option<usize> {
    if addrs.len() > MAX_LENT_PER_REPLY || len > u32::MAX as usize {
        return None;
    }
    let start = len.next_multiple_of(8);
    let end = start + 8 * addrs.len() + 8;
    let table = buf.get_mut(len..end)?;
    table.fill(0);
    let (slots, footer) = table[start - len..].split_at_mut(8 * addrs.len());
    for (slot, a) in slots.chunks_exact_mut(8).zip(addrs) {
        slot.copy_from_slice(&a.to_le_bytes());
    }
    footer.copy_from_slice(&((addrs.len() as u64) << 32 | len as u64).to_le_bytes());
    Some(end)
}

/// The blocks a reply lends, read from its table: each address is a
/// claim of the sender, which the sender checks again when it is given
/// back (a forged one is refused there and costs only the liar).
#[derive(Debug, Clone, Copy, Default)]
pub struct LentTable<'a> {
    bytes: &'a [u8],
}

impl LentTable<'_> {
    /// The lent addresses.
    pub fn addrs(&self) -> impl Iterator<Item = u64> + '_ {
        self.bytes
            .chunks_exact(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    /// How many blocks the table names.
    pub fn len(&self) -> usize {
        self.bytes.len() / 8
    }

    /// Whether it names none.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// Splits a reply into its status (without [`FLAG_LENDS`]), its body
/// proper and its lent-block table. A table that does not add up is the
/// peer's protocol error.
#[inline]
pub fn split_reply(status: u32, body: &[u8], pid: i32) -> Result<(u32, &[u8], LentTable<'_>)> {
    // Only a success carries a table: an error code may use bit 31 itself
    // (`RemoteStatus::Other`), and is passed on as it is.
    if status != FLAG_LENDS {
        return Ok((status, body, LentTable::default()));
    }
    split_lending(status, body, pid)
}

#[cold]
fn split_lending(status: u32, body: &[u8], pid: i32) -> Result<(u32, &[u8], LentTable<'_>)> {
    let bad = |why: &str| Error::Protocol {
        pid,
        detail: format!("reply's lent-block table {why}"),
    };
    let at = body.len().checked_sub(8).ok_or_else(|| bad("is missing"))?;
    // One read of the footer: the peer may rewrite it, the copy stays.
    let footer = u64::from_le_bytes(body[at..].try_into().expect("8 bytes"));
    // In u64: on a 32-bit target a lying length could overflow usize.
    let (count, len) = (footer >> 32, footer & 0xffff_ffff);
    if count > MAX_LENT_PER_REPLY as u64 || len.next_multiple_of(8) + 8 * count != at as u64 {
        return Err(bad(&format!(
            "says {count} blocks after {len} bytes in a body of {}",
            body.len()
        )));
    }
    let (count, len) = (count as usize, len as usize); // both at most `at` now
    let table = &body[at - 8 * count..at];
    Ok((status & !FLAG_LENDS, &body[..len], LentTable { bytes: table }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lent_tables_round_trip_and_lies_are_refused() {
        for len in [0usize, 1, 7, 8, 15, 16, 100] {
            for n in [0usize, 1, 3] {
                let mut buf = vec![0xaau8; 256];
                let addrs: Vec<u64> = (0..n as u64).map(|i| 0x1000 + 16 * i).collect();
                let end = put_lent_table(&mut buf, len, &addrs).unwrap();
                let (status, body, table) = split_reply(FLAG_LENDS, &buf[..end], 1).unwrap();
                assert_eq!((status, body.len()), (0, len));
                assert_eq!(table.addrs().collect::<Vec<_>>(), addrs);
            }
        }
        // Without the flag the body is untouched, and so is an error code
        // that happens to use bit 31.
        let (_, body, table) = split_reply(0, &[1, 2, 3], 1).unwrap();
        assert_eq!((body.len(), table.len()), (3, 0));
        let (status, body, _) = split_reply(u32::MAX, &[], 1).unwrap();
        assert_eq!((status, body.len()), (u32::MAX, 0));
        // Too short, a count past the body, a length that does not add up.
        assert!(split_reply(FLAG_LENDS, &[0; 7], 1).is_err());
        let lie = |footer: u64, size: usize| {
            let mut b = vec![0u8; size];
            b[size - 8..].copy_from_slice(&footer.to_le_bytes());
            split_reply(FLAG_LENDS, &b, 1).is_err()
        };
        assert!(lie(5 << 32, 16));
        assert!(lie(u64::MAX, 64));
        assert!(lie(9, 16));
        assert!(lie((MAX_LENT_PER_REPLY as u64 + 1) << 32, 8 * (MAX_LENT_PER_REPLY + 2)));
        let mut small = [0u8; 12];
        assert!(put_lent_table(&mut small, 4, &[1]).is_none(), "no room");
    }
}
