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
