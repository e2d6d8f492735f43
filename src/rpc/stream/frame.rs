//! The frame format: a 20-byte header (body length, call id, method,
//! status, little-endian) and the body.

/// Frame header: body length, call id, method, status.
pub(super) const FRAME_HEADER: usize = 20;
/// Largest body accepted from a peer (a hostile length must not make us
/// allocate without bound).
pub const MAX_FRAME: usize = 256 << 20;

pub(super) fn encode_header(buf: &mut [u8], len: usize, id: u64, method: u32, status: u32) {
    buf[0..4].copy_from_slice(&(len as u32).to_le_bytes());
    buf[4..12].copy_from_slice(&id.to_le_bytes());
    buf[12..16].copy_from_slice(&method.to_le_bytes());
    buf[16..20].copy_from_slice(&status.to_le_bytes());
}

pub(super) fn decode_header(h: &[u8; FRAME_HEADER]) -> (usize, u64, u32, u32) {
    let u32_at = |at: usize| u32::from_le_bytes(h[at..at + 4].try_into().expect("4 bytes"));
    (
        u32_at(0) as usize,
        u64::from_le_bytes(h[4..12].try_into().expect("8 bytes")),
        u32_at(12),
        u32_at(16),
    )
}

/// Fills in a reply frame's header; a failed call's body is its message.
pub(super) fn finish_frame(frame: &mut [u8], id: u64, method: u32, status: u32) {
    // An error frame's body is its message, which `error_body` wrote.
    let n = frame.len() - FRAME_HEADER;
    encode_header(frame, n, id, method, status);
}
