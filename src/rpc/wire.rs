//! How arguments and results sit in a message body.
//!
//! A body is the method's fields in declaration order, each at an offset
//! aligned to its type. A value (`ShmSafe + Copy`) is its bytes. A pointer
//! type (`ShmBox`, `ShmSlice`, `ShmVec`, `ShmString`) is, in shared memory,
//! its address and element count (16 bytes: the data stays where the caller
//! built it); over a byte stream (TCP, Unix stream) it is the element count
//! followed by the elements themselves, copied into the frame.
//!
//! Readers check every length and pointer and fail with `Err` (never
//! panic), because the bytes come from another process.

use std::marker::PhantomData;
use std::ops::Deref;
use std::ptr::NonNull;
use std::sync::Arc;

use rpal_core::error::{Error, Result};
use rpal_core::pkey::Access;
use rpal_core::types::{ShmBox, ShmSafe, ShmSlice, ShmString, ShmVec};
use rpal_core::{Filled, PeerId, PeerMem, PeerRegion};

/// Where a body travels: in shared memory (pointers pass as pointers) or
/// over a byte stream (pointed-to data is copied inline).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Shared memory: pointer types pass as address + count.
    Shm,
    /// A byte stream: pointer types pass as count + elements.
    Stream,
}

/// Rounds `at` up to `align` (a power of two).
const fn align_up(at: usize, align: usize) -> usize {
    (at + align - 1) & !(align - 1)
}

/// The bytes of a `ShmSafe` value (it has no padding, so every byte is initialised).
#[inline]
fn bytes_of<T: ShmSafe>(v: &T) -> &[u8] {
    // SAFETY: ShmSafe types have no padding (trait obligation 1), so all
    // size_of::<T>() bytes are initialised; the slice borrows `v`.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }
}

/// The bytes of a slice of `ShmSafe` values.
fn bytes_of_slice<T: ShmSafe>(v: &[T]) -> &[u8] {
    // SAFETY: as in `bytes_of`; a slice of padding-free values has no gaps.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), size_of_val(v)) }
}

/// Copies of peer data that cannot be viewed in place, kept for as long as
/// their views live (one per call's arguments, one per string result).
///
/// A view of a peer's memory is read while the peer may rewrite it. For
/// `[T]` and `T` of `ShmSafe` types that is harmless: every bit pattern is
/// a valid value, so the handler sees old or new values, never an invalid
/// one. A `&str` is different: safe code (`chars()`, slicing) relies on it
/// staying UTF-8, which a peer could break after the check. So strings are
/// copied on receipt and checked in the copy: one copy of bytes the check
/// reads anyway. Data that must be zero-copy whatever its size goes as
/// `ShmSlice<u8>` (bytes, no invariant), validated by the handler if needed.
#[derive(Default)]
pub struct Scratch {
    // A Mutex, not a RefCell: an async handler's future holds views into
    // its arguments' copies across awaits, so this must be Sync. Never
    // contended (one call's arguments are read by one thread at a time).
    kept: std::sync::Mutex<Vec<Box<[u8]>>>,
}

impl Scratch {
    /// A copy of `bytes` (read from the peer's memory at `addr`), checked
    /// to be UTF-8; it lives as long as `self`.
    pub fn keep_str(&self, bytes: &[u8], addr: u64) -> Result<&str> {
        let copy: Box<[u8]> = bytes.into();
        std::str::from_utf8(&copy).map_err(|_| Error::InvalidUtf8 { addr })?;
        let view: *const [u8] = &*copy;
        self.kept.lock().unwrap_or_else(|p| p.into_inner()).push(copy);
        // SAFETY: the box's heap bytes never move and are never written or
        // freed before `self` drops (boxes are only pushed); they were
        // checked to be UTF-8 above, in our own memory, which no peer writes.
        Ok(unsafe { std::str::from_utf8_unchecked(&*view) })
    }

    /// Whether anything was copied.
    pub fn is_empty(&self) -> bool {
        self.kept.lock().unwrap_or_else(|p| p.into_inner()).is_empty()
    }
}

/// A pointer type that can be an argument or a result: its data passes by
/// address in shared memory and by copy over a stream.
pub trait ShmPtr: Sized + 'static {
    /// What the receiver sees: `T`, `[T]` or `str`.
    type View: ?Sized + 'static;
    /// The element type.
    type Elem: ShmSafe;
    /// Address and element count of the owner's data.
    fn raw(&self) -> (u64, u64);
    /// The data as bytes, for a stream.
    fn data(&self) -> &[u8];
    /// Gives the block to `peer` (it stays allocated until released).
    fn lend_to(self, peer: PeerId) -> Result<(u64, u64)>;
    /// A validated view of `count` elements at `addr` in a peer's memory.
    /// A view whose validity the peer could break after the check (a
    /// string: UTF-8) is of a copy kept in `copies`, validated there.
    fn view_peer<'p>(peer: PeerMem<'p>, addr: u64, count: u64, copies: &'p Scratch) -> Result<&'p Self::View>;
    /// A validated view of `count` elements in `bytes` (aligned for `Elem`).
    fn view_bytes(bytes: &[u8], count: u64) -> Result<&Self::View>;
}

/// A view of `count` elements of `T` in `bytes`, which must be aligned.
fn elems<T: ShmSafe>(bytes: &[u8], count: u64) -> Result<&[T]> {
    let n = usize::try_from(count).ok();
    if n.and_then(|n| n.checked_mul(size_of::<T>())) != Some(bytes.len()) || !bytes.as_ptr().cast::<T>().is_aligned() {
        return Err(Error::InvalidPointer {
            addr: 0,
            len: count,
            reason: "does not match the bytes that came with it",
        });
    }
    // SAFETY: length and alignment checked above; ShmSafe accepts every bit pattern.
    Ok(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), bytes.len() / size_of::<T>().max(1)) })
}

impl<T: ShmSafe> ShmPtr for ShmBox<T> {
    type View = T;
    type Elem = T;
    fn raw(&self) -> (u64, u64) {
        (self.addr(), 1)
    }
    fn data(&self) -> &[u8] {
        bytes_of::<T>(self)
    }
    fn lend_to(self, peer: PeerId) -> Result<(u64, u64)> {
        Ok((self.lend(peer)?, 1))
    }
    fn view_peer<'p>(peer: PeerMem<'p>, addr: u64, count: u64, _: &'p Scratch) -> Result<&'p T> {
        if count != 1 {
            return Err(Error::InvalidPointer {
                addr,
                len: count,
                reason: "is a ShmBox with a count other than 1",
            });
        }
        peer.view::<T>(addr)
    }
    fn view_bytes(bytes: &[u8], count: u64) -> Result<&T> {
        let s = elems::<T>(bytes, count)?;
        s.first().filter(|_| s.len() == 1).ok_or(Error::InvalidPointer {
            addr: 0,
            len: count,
            reason: "is a ShmBox with a count other than 1",
        })
    }
}

macro_rules! slice_like {
    ($ty:ty, $elem:ty, $owner:ident) => {
        impl<$owner: ShmSafe> ShmPtr for $ty {
            type View = [$elem];
            type Elem = $elem;
            fn raw(&self) -> (u64, u64) {
                (self.addr(), self.len() as u64)
            }
            fn data(&self) -> &[u8] {
                bytes_of_slice::<$elem>(self)
            }
            fn lend_to(self, peer: PeerId) -> Result<(u64, u64)> {
                self.lend(peer)
            }
            fn view_peer<'p>(peer: PeerMem<'p>, addr: u64, count: u64, _: &'p Scratch) -> Result<&'p [$elem]> {
                if count == 0 {
                    return Ok(&[]);
                }
                peer.slice::<$elem>(addr, count)
            }
            fn view_bytes(bytes: &[u8], count: u64) -> Result<&[$elem]> {
                elems::<$elem>(bytes, count)
            }
        }
    };
}
slice_like!(ShmSlice<T>, T, T);
slice_like!(ShmVec<T>, T, T);

impl ShmPtr for ShmString {
    type View = str;
    type Elem = u8;
    fn raw(&self) -> (u64, u64) {
        let s: &str = self;
        (s.as_ptr() as u64 * u64::from(!s.is_empty()), s.len() as u64)
    }
    fn data(&self) -> &[u8] {
        self.as_bytes()
    }
    fn lend_to(self, peer: PeerId) -> Result<(u64, u64)> {
        self.lend(peer)
    }
    fn view_peer<'p>(peer: PeerMem<'p>, addr: u64, count: u64, copies: &'p Scratch) -> Result<&'p str> {
        if count == 0 {
            return Ok("");
        }
        // Copied, then checked: the peer may rewrite its bytes at any time,
        // and a `&str` must stay UTF-8 for as long as it is read.
        copies.keep_str(peer.bytes(addr, count)?, addr)
    }
    fn view_bytes(bytes: &[u8], count: u64) -> Result<&str> {
        let b = elems::<u8>(bytes, count)?;
        std::str::from_utf8(b).map_err(|_| Error::InvalidUtf8 { addr: 0 })
    }
}

/// A type a service method takes or returns by value: `ShmSafe + Copy`,
/// copied between the processes. Generated code reads and writes values
/// through this trait only, so a type that is not one is reported once,
/// at the type in the service trait, with what to do.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be passed by value to or from a service method",
    label = "not `ShmSafe + Copy`",
    note = "values are copied between processes: give `{Self}` `#[derive(Clone, Copy, ShmSafe)]` and `#[repr(C)]`, or pass shared data as `ShmBox<T>`, `ShmSlice<T>`, `ShmVec<T>` or `ShmString`"
)]
pub trait ServiceValue: Sized {
    /// The type's layout fingerprint ([`ShmSafe::LAYOUT`]).
    const LAYOUT: u64;
    /// Writes the value into a body.
    fn write(&self, w: &mut Writer<'_>);
    /// Reads a value out of a body.
    fn read(r: &mut Reader<'_>) -> Result<Self>;
}

impl<T: ShmSafe + Copy> ServiceValue for T {
    const LAYOUT: u64 = <T as ShmSafe>::LAYOUT;
    #[inline]
    fn write(&self, w: &mut Writer<'_>) {
        w.value(self);
    }
    #[inline]
    fn read(r: &mut Reader<'_>) -> Result<Self> {
        r.value()
    }
}

/// Writes a body. In shared memory it writes in place (into the queue
/// record); over a stream it appends to a growable buffer.
pub struct Writer<'a> {
    out: Out<'a>,
    /// Bytes written, counted from the body's start (alignment is relative to it).
    at: usize,
    /// Where the body starts in a growable buffer (after a frame header).
    origin: usize,
    mode: Mode,
    /// Set if a field did not fit the fixed buffer.
    overflow: bool,
    /// Blocks lent by this body (shared memory; to the peer the reply goes
    /// to, which `finish_reply` and `take_back` are told): the last `lent`
    /// entries of this thread's `LENT` list. Not in the record's unused
    /// tail: a consumer reads the word after a committed record as the next
    /// record's sequence word. No heap and no drop glue in the writer: the
    /// busy round trip measured 40 ns slower with a `Vec` and a `Drop` here.
    lent: usize,
}

enum Out<'a> {
    Fixed(&'a mut [u8]),
    Grow(&'a mut Vec<u8>),
}

impl<'a> Writer<'a> {
    /// A writer into a fixed buffer (a queue record): shared-memory mode.
    #[inline]
    pub fn fixed(buf: &'a mut [u8]) -> Self {
        Self {
            out: Out::Fixed(buf),
            at: 0,
            origin: 0,
            mode: Mode::Shm,
            overflow: false,
            lent: 0,
        }
    }

    /// A writer that appends a body to `buf` (after whatever it holds, such
    /// as a frame header): stream mode.
    pub fn stream(buf: &'a mut Vec<u8>) -> Self {
        let origin = buf.len();
        Self {
            out: Out::Grow(buf),
            at: 0,
            origin,
            mode: Mode::Stream,
            overflow: false,
            lent: 0,
        }
    }

    /// The transport mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Bytes written so far (`None` if a field did not fit).
    #[inline]
    pub fn finish(&self) -> Option<usize> {
        (!self.overflow).then_some(self.at)
    }

    /// Ends a reply: bytes written, and whether a lent-block table follows
    /// them (it does when the body lent a block: the reply must then carry
    /// `FLAG_LENDS`). `None` if it did not fit; what it lent is then taken
    /// back, since the caller will never see it.
    /// (By reference: moving the writer out after the handler wrote it
    /// cost the busy round trip 50 ns in stalled stack reloads.)
    #[inline]
    pub fn finish_reply(&mut self, peer: PeerId) -> Option<Filled> {
        if self.lent == 0 {
            return (!self.overflow).then_some(Filled::from(self.at));
        }
        self.finish_lending(peer)
    }

    #[cold]
    fn finish_lending(&mut self, peer: PeerId) -> Option<Filled> {
        let (addrs, n) = self.lent_addrs();
        let table = match &mut self.out {
            Out::Fixed(buf) if !self.overflow => rpal_core::put_lent_table(buf, self.at, &addrs[..n]),
            _ => None,
        };
        match table {
            Some(len) => Some(Filled { len, lends: true }),
            None => {
                reclaim(&addrs[..n], peer);
                None
            }
        }
    }

    /// The blocks this body lent so far (and forgets them).
    fn lent_addrs(&mut self) -> ([u64; rpal_core::MAX_LENT_PER_REPLY], usize) {
        let mut addrs = [0u64; rpal_core::MAX_LENT_PER_REPLY];
        let n = LENT.with(|l| {
            let mut l = l.borrow_mut();
            let from = l.len().saturating_sub(self.lent);
            let n = l.len() - from;
            addrs[..n].copy_from_slice(&l[from..]);
            l.truncate(from);
            n
        });
        self.lent = 0;
        (addrs, n)
    }

    /// Takes back what this body lent: the reply carrying it will not be
    /// sent (the handler failed after a lend, or the body did not fit). A
    /// body that panics after a lend leaves its blocks lent until the peer's
    /// last connection ends.
    #[cold]
    pub fn take_back(&mut self, peer: PeerId) {
        if self.lent > 0 {
            let (addrs, n) = self.lent_addrs();
            reclaim(&addrs[..n], peer);
        }
    }

    #[inline]
    fn put(&mut self, align: usize, bytes: &[u8]) {
        let start = align_up(self.at, align.max(1));
        let end = start + bytes.len();
        match &mut self.out {
            Out::Fixed(buf) => {
                let Some(dst) = buf.get_mut(self.at..end) else {
                    self.overflow = true;
                    return;
                };
                let pad = start - self.at;
                if pad > 0 {
                    dst[..pad].fill(0);
                }
                dst[pad..].copy_from_slice(bytes);
            }
            Out::Grow(v) => {
                v.resize(self.origin + start, 0);
                v.extend_from_slice(bytes);
            }
        }
        self.at = end;
    }

    /// Bytes that `fill` writes into the next `cap` bytes of the body (it
    /// returns how many it wrote): the byte-level `AsyncClient`'s request.
    pub(crate) fn bytes_with(&mut self, cap: usize, fill: impl FnOnce(&mut [u8]) -> usize) {
        let start = self.at;
        match &mut self.out {
            Out::Fixed(buf) => {
                let Some(dst) = start.checked_add(cap).and_then(|end| buf.get_mut(start..end)) else {
                    self.overflow = true;
                    return;
                };
                let n = fill(dst).min(cap);
                self.at = start + n;
            }
            Out::Grow(v) => {
                v.resize(self.origin + start + cap, 0);
                let n = fill(&mut v[self.origin + start..]).min(cap);
                v.truncate(self.origin + start + n);
                self.at = start + n;
            }
        }
    }

    /// A value, by copy.
    #[inline]
    pub fn value<T: ShmSafe + Copy>(&mut self, v: &T) {
        self.put(align_of::<T>(), bytes_of(v));
    }

    /// A pointer type that stays with its owner: by address in shared
    /// memory, copied over a stream. The owner must keep it alive and
    /// unchanged until the call returns.
    pub fn borrowed<P: ShmPtr>(&mut self, p: &P) {
        let (addr, count) = p.raw();
        match self.mode {
            Mode::Shm => self.pointer(addr, count),
            Mode::Stream => self.inline::<P>(count, p.data()),
        }
    }

    /// A pointer type handed over to `peer`, which releases it when done
    /// (shared memory); over a stream it is copied and dropped here.
    pub fn lent<P: ShmPtr>(&mut self, p: P, peer: PeerId) -> Result<()> {
        match self.mode {
            Mode::Shm => {
                let Out::Fixed(buf) = &mut self.out else {
                    unreachable!("shared-memory bodies are written in place");
                };
                // Room for the pointer, the table (this block's slot
                // included) and its footer.
                let need = self.at.next_multiple_of(8) + 16 + 8 * (self.lent + 1) + 8;
                if self.lent >= rpal_core::MAX_LENT_PER_REPLY || need > buf.len() {
                    return Err(Error::TooLarge {
                        len: self.lent + 1,
                        capacity: rpal_core::MAX_LENT_PER_REPLY,
                    });
                }
                let (addr, count) = p.lend_to(peer)?;
                if addr != 0 {
                    LENT.with(|l| {
                        let mut l = l.borrow_mut();
                        if self.lent == 0 {
                            // Left by a body that panicked after a lend (its
                            // blocks stay lent until the peer leaves).
                            l.clear();
                        }
                        l.push(addr);
                    });
                    self.lent += 1;
                }
                self.pointer(addr, count);
            }
            Mode::Stream => self.inline::<P>(p.raw().1, p.data()),
        }
        Ok(())
    }

    fn pointer(&mut self, addr: u64, count: u64) {
        self.put(8, &addr.to_le_bytes());
        self.put(8, &count.to_le_bytes());
    }

    fn inline<P: ShmPtr>(&mut self, count: u64, data: &[u8]) {
        self.put(8, &count.to_le_bytes());
        self.put(align_of::<P::Elem>(), data);
    }
}

/// Frees our blocks lent to `peer` in a reply that will not be sent.
fn reclaim(addrs: &[u64], peer: PeerId) {
    if let Ok(arena) = rpal_core::Arena::global() {
        for &addr in addrs {
            let _ = arena.reclaim(addr, peer);
        }
    }
}

thread_local! {
    /// The blocks the body being written on this thread lent (see `Writer::lent`).
    static LENT: std::cell::RefCell<Vec<u64>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Reads a body: values by copy, pointer types as validated views.
pub struct Reader<'a> {
    body: &'a [u8],
    at: usize,
    peer: Option<PeerMem<'a>>,
    /// Where views that must be copies (strings) keep their copies.
    copies: Option<&'a Scratch>,
    /// The same region as `peer`, as a handle work that outlives the
    /// request can keep (see `OwnedArgs`).
    shared: Option<&'a Arc<PeerRegion>>,
}

/// The error every malformed body gives.
fn short(what: &'static str) -> Error {
    Error::InvalidPointer {
        addr: 0,
        len: 0,
        reason: what,
    }
}

impl<'a> Reader<'a> {
    /// A reader of a body in shared memory; pointers are checked against
    /// `peer`, and strings are copied into `copies`.
    #[inline]
    pub fn shm(body: &'a [u8], peer: PeerMem<'a>, copies: &'a Scratch) -> Self {
        Self {
            body,
            at: 0,
            peer: Some(peer),
            copies: Some(copies),
            shared: None,
        }
    }

    /// As [`Reader::shm`], with a handle on the region that an async
    /// handler's owned arguments can keep.
    #[inline]
    pub fn shm_shared(body: &'a [u8], peer: PeerMem<'a>, region: &'a Arc<PeerRegion>, copies: &'a Scratch) -> Self {
        Self {
            body,
            at: 0,
            peer: Some(peer),
            copies: Some(copies),
            shared: Some(region),
        }
    }

    /// Whether pointers are checked against a peer's region (shared memory).
    pub fn is_shm(&self) -> bool {
        self.peer.is_some()
    }

    /// The whole body and the peer's memory it may point into (in shared
    /// memory): what the byte-level `AsyncClient` hands its reader.
    pub(crate) fn raw(&self) -> (&'a [u8], Option<PeerMem<'a>>) {
        (self.body, self.peer)
    }

    /// The whole body and the region handle, if any.
    pub(crate) fn parts(&self) -> (&'a [u8], Option<&'a Arc<PeerRegion>>) {
        (self.body, self.shared)
    }

    /// A reader of a body from a stream (pointed-to data is inline; `body`
    /// must be 16-byte aligned so inline elements are aligned).
    pub fn stream(body: &'a [u8]) -> Self {
        Self {
            body,
            at: 0,
            peer: None,
            copies: None,
            shared: None,
        }
    }

    #[inline]
    fn take(&mut self, align: usize, len: usize) -> Result<&'a [u8]> {
        let start = align_up(self.at, align.max(1));
        let bytes = start
            .checked_add(len)
            .and_then(|end| self.body.get(start..end))
            .ok_or_else(|| short("runs past the end of the message body"))?;
        self.at = start + len;
        Ok(bytes)
    }

    fn word(&mut self) -> Result<u64> {
        let b = self.take(8, 8)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    /// A value, copied out (the peer may change its memory meanwhile).
    #[inline]
    pub fn value<T: ShmSafe + Copy>(&mut self) -> Result<T> {
        let b = self.take(align_of::<T>(), size_of::<T>())?;
        // SAFETY: `b` holds size_of::<T>() bytes; ShmSafe accepts every bit
        // pattern; the read is unaligned-safe.
        Ok(unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<T>()) })
    }

    /// A pointer type's view: in the peer's region (validated) or inline.
    pub fn view<P: ShmPtr>(&mut self) -> Result<&'a P::View> {
        match self.peer {
            Some(peer) => {
                let addr = self.word()?;
                let count = self.word()?;
                let copies = self.copies.expect("a shared-memory reader has a scratch");
                P::view_peer(peer, addr, count, copies)
            }
            None => {
                let count = self.word()?;
                let len = usize::try_from(count)
                    .ok()
                    .and_then(|n| n.checked_mul(size_of::<P::Elem>()))
                    .ok_or_else(|| short("has an element count that overflows"))?;
                let bytes = self.take(align_of::<P::Elem>(), len)?;
                P::view_bytes(bytes, count)
            }
        }
    }

    /// A pointer type's address and count, in shared memory (for results
    /// the caller keeps a handle to); `None` over a stream.
    pub fn raw_pointer(&mut self) -> Result<Option<(u64, u64)>> {
        match self.peer {
            Some(_) => Ok(Some((self.word()?, self.word()?))),
            None => Ok(None),
        }
    }

    /// Errors unless the whole body was read: a body of the wrong size was
    /// built for another signature.
    #[inline]
    pub fn finish(&self) -> Result<()> {
        if self.at == self.body.len() {
            Ok(())
        } else {
            Err(short("has a size that does not match the method's arguments"))
        }
    }
}

/// Who takes a lent result back: the connection it came over.
pub trait ReleaseSink: Send + Sync {
    /// Says the caller is done with the peer's block at `addr`.
    fn release(&self, addr: u64);
}

/// A pointer-type result on the caller's side: a view into the server's
/// memory (released to the server when dropped) or, over a stream, an owned
/// copy.
///
/// Keep it as long as you like, on any thread; read it through
/// [`Returned::read`], whose guard grants this thread access to the
/// server's region (protection keys) for as long as it lives. References
/// into the data cannot outlive the guard; one smuggled out through a raw
/// pointer faults with `SEGV_PKUERR` where keys are active.
pub struct Returned<P: ShmPtr> {
    view: NonNull<P::View>,
    keep: Keep,
    _p: PhantomData<P>,
}

enum Keep {
    /// In the server's region (kept mapped here); `addr` goes back to it on drop.
    Lent {
        addr: u64,
        sink: Arc<dyn ReleaseSink>,
        region: Arc<PeerRegion>,
    },
    /// A copy; the view points into it.
    Owned(#[allow(dead_code)] Box<[u128]>),
    /// A copy made on receipt (a string); the view points into it.
    Copied(#[allow(dead_code)] Scratch),
}

// SAFETY: the view is read-only data that outlives the handle (a peer
// region kept mapped by the connection, or an owned buffer); `P::View` is
// plain data (ShmSafe elements or str).
unsafe impl<P: ShmPtr> Send for Returned<P> {}
// SAFETY: as for Send; only shared reads happen through `&Returned`.
unsafe impl<P: ShmPtr> Sync for Returned<P> {}

impl<P: ShmPtr> Returned<P> {
    /// A result that lives in the server's region, read from a shm reply
    /// through `mem`, the memory of `region`.
    pub fn lent(
        mem: PeerMem<'_>,
        region: &Arc<PeerRegion>,
        addr: u64,
        count: u64,
        sink: Arc<dyn ReleaseSink>,
    ) -> Result<Self> {
        let copies = Scratch::default();
        let view = match P::view_peer(mem, addr, count, &copies) {
            Ok(v) => NonNull::from(v),
            Err(e) => {
                if addr != 0 {
                    sink.release(addr); // hand it back: we will never read it
                }
                return Err(e);
            }
        };
        if !copies.is_empty() {
            // Read from a copy (a string): the server's block goes back now.
            if addr != 0 {
                sink.release(addr);
            }
            return Ok(Self {
                view,
                keep: Keep::Copied(copies),
                _p: PhantomData,
            });
        }
        Ok(Self {
            view,
            keep: Keep::Lent {
                addr,
                sink,
                region: region.clone(),
            },
            _p: PhantomData,
        })
    }

    /// A result copied out of a stream reply.
    pub fn copied(reader: &mut Reader<'_>) -> Result<Self> {
        let v = reader.view::<P>()?;
        let len = size_of_val(v);
        let mut buf = vec![0u128; len.div_ceil(16)].into_boxed_slice();
        // SAFETY: `buf` holds at least `len` bytes; the source is `len` readable bytes.
        unsafe { std::ptr::copy_nonoverlapping((v as *const P::View).cast::<u8>(), buf.as_mut_ptr().cast(), len) };
        let bytes: &[u8] = bytemuck::cast_slice(&buf[..]);
        let count = count_of::<P>(len);
        let view = NonNull::from(P::view_bytes(&bytes[..len], count)?);
        Ok(Self {
            view,
            keep: Keep::Owned(buf),
            _p: PhantomData,
        })
    }

    /// Whether the data is still in the server's memory (not a copy).
    pub fn is_shared(&self) -> bool {
        matches!(self.keep, Keep::Lent { .. })
    }
}

/// Elements in `len` bytes of `P::Elem`.
fn count_of<P: ShmPtr>(len: usize) -> u64 {
    (len / size_of::<P::Elem>().max(1)) as u64
}

impl<P: ShmPtr> Returned<P> {
    /// The data, readable while the guard lives: it grants this thread
    /// access to the server's region (nothing to grant for a copy).
    #[inline]
    pub fn read(&self) -> Viewed<'_, P::View> {
        let (access, region) = match &self.keep {
            Keep::Lent { region, .. } => (region.access(), Some(&**region)),
            Keep::Owned(_) | Keep::Copied(_) => (Access::none(), None),
        };
        // SAFETY: `view` was validated when the handle was made and points
        // into memory `keep` holds (see the Send impl); `access` lets this
        // thread read it while the returned guard (which borrows `self`) lives.
        let view = unsafe { self.view.as_ref() };
        Viewed {
            view,
            region,
            _access: access,
        }
    }

    /// A copy of the data, owned (for data that must outlive the handle or
    /// stay stable while the server could change it).
    pub fn to_owned(&self) -> <P::View as ToOwned>::Owned
    where
        P::View: ToOwned,
    {
        self.read().to_owned()
    }
}

/// A view of data in a peer's memory, with this thread's access to it:
/// derefs to the data until it drops. Not `Send`: access is per thread.
pub struct Viewed<'a, V: ?Sized> {
    view: &'a V,
    /// The server's region the view lies in (`None`: a copy).
    region: Option<&'a PeerRegion>,
    _access: Access,
}

impl<V: ?Sized> Viewed<'_, V> {
    /// A shm value nested in this one (a field of a struct the server
    /// returned, such as `ShmString` in a `ShmBox<Entry>`), validated
    /// against the server's memory: `let name = guard.nested(&guard.name)?`.
    /// Nested values are never dereferenced in place; this is the way to
    /// read them. A result copied from a stream carries its top level only:
    /// its nested values are an `InvalidPointer` error, not a panic.
    pub fn nested<'s, N: Nested>(&'s self, field: &'s N) -> Result<N::Out<'s>> {
        match self.region {
            Some(r) => field.nested(r.mem(&self._access)),
            None => Err(Error::InvalidPointer {
                addr: 0,
                len: 0,
                reason: "points into the server's memory, which a result copied over a stream does not carry",
            }),
        }
    }
}

/// A pointer type that can sit inside a value a peer sent, read with
/// [`Viewed::nested`].
pub trait Nested {
    /// What reading it gives: `&T`, `&[T]`, or a `String` (a copy, checked).
    type Out<'p>;
    /// Validates and reads it in `mem`, the memory of the peer that sent it.
    fn nested<'p>(&self, mem: PeerMem<'p>) -> Result<Self::Out<'p>>;
}

impl<T: ShmSafe> Nested for ShmBox<T> {
    type Out<'p> = &'p T;
    fn nested<'p>(&self, mem: PeerMem<'p>) -> Result<&'p T> {
        self.get(mem)
    }
}

impl<T: ShmSafe> Nested for ShmSlice<T> {
    type Out<'p> = &'p [T];
    fn nested<'p>(&self, mem: PeerMem<'p>) -> Result<&'p [T]> {
        self.get(mem)
    }
}

impl<T: ShmSafe> Nested for ShmVec<T> {
    type Out<'p> = &'p [T];
    fn nested<'p>(&self, mem: PeerMem<'p>) -> Result<&'p [T]> {
        self.get(mem)
    }
}

impl Nested for ShmString {
    type Out<'p> = String;
    fn nested(&self, mem: PeerMem<'_>) -> Result<String> {
        self.get(mem)
    }
}

impl<V: ?Sized> Deref for Viewed<'_, V> {
    type Target = V;
    #[inline]
    fn deref(&self) -> &V {
        self.view
    }
}

impl<V: ?Sized + std::fmt::Debug> std::fmt::Debug for Viewed<'_, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.view, f)
    }
}

impl<P: ShmPtr> Drop for Returned<P> {
    fn drop(&mut self) {
        if let Keep::Lent { addr, sink, .. } = &self.keep {
            if *addr != 0 {
                sink.release(*addr);
            }
        }
    }
}

impl<P: ShmPtr> std::fmt::Debug for Returned<P>
where
    P::View: std::fmt::Debug,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&*self.read(), f)
    }
}
