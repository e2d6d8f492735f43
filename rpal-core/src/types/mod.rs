//! Zero-copy types: data built in shared memory and read by peers in place.
//!
//! The owner builds values with [`ShmBox`], [`ShmVec`], [`ShmSlice`] and
//! [`ShmString`] in its arena and uses them through `Deref`/`DerefMut` like
//! their heap cousins. A peer that receives one reads it through the
//! `get(mem)` methods (with the [`PeerMem`] of the peer, see [`crate::pkey`]), which check region bounds, alignment and length
//! overflow (and UTF-8, for strings) before handing out a borrowed view, or
//! validates a whole structure at once with [`Walk`], whose limits bound any
//! walk over a cycle a hostile peer may have built.

pub mod fingerprint;
mod peer_mem;
mod shm_box;
mod slice;
mod vec;

pub use peer_mem::PeerMem;
pub use shm_box::ShmBox;
pub use slice::ShmSlice;
pub use vec::{ShmString, ShmVec};

use crate::cred::PeerId;
use crate::error::{Error, Result};

/// Plain data that may live in shared memory and be read by a peer.
///
/// Derive it with `#[derive(ShmSafe)]`, which checks the rules below.
///
/// # Safety
/// Implement it only for a type that:
/// 1. is `#[repr(C)]` (or a primitive) and has no padding bytes, so both
///    processes agree on the layout and no uninitialised byte is shared;
/// 2. is valid for every bit pattern, since a peer may write anything
///    (no `bool`, `char`, enums, `NonZero*`);
/// 3. holds no references, raw pointers or handles to private memory or
///    resources (`Box`, `Vec`, `String`, `Rc`, file descriptors): only plain
///    data and rpal's shm types, whose pointers are checked on every use;
/// 4. checks every nested shm pointer in [`ShmSafe::validate`], and sets
///    [`ShmSafe::HAS_POINTERS`] when it has any.
pub unsafe trait ShmSafe: Sized + 'static {
    /// Whether values hold pointers that [`ShmSafe::validate`] must check.
    const HAS_POINTERS: bool = false;

    /// The type's layout fingerprint (see [`fingerprint`]): size, alignment
    /// and each field's name, offset and fingerprint. Method ids fold it
    /// in, so a peer built with another layout is refused at the
    /// handshake. The default knows only size and alignment; the derive
    /// and rpal's own types describe every field.
    const LAYOUT: u64 = fingerprint::opaque::<Self>();

    /// The fingerprint as a pointer to the type sees it: as
    /// [`ShmSafe::LAYOUT`], but a pointer field counts only its target's
    /// size and alignment. Pointer types fold this in, not `LAYOUT`, so a
    /// type that points to itself has a finite fingerprint. (A change that
    /// keeps the size, two pointers deep, is not seen.)
    const SHALLOW: u64 = Self::LAYOUT;

    /// Checks the nested pointers of a value read from a peer.
    fn validate(&self, walk: &mut Walk<'_>) -> Result<()> {
        let _ = walk;
        Ok(())
    }
}

macro_rules! plain {
    ($($t:ty),*) => {
        $(
            // SAFETY: primitive integers, floats and integer atomics have no
            // padding, accept every bit pattern and hold no pointers.
            unsafe impl ShmSafe for $t {
                const LAYOUT: u64 = fingerprint::primitive::<$t>(stringify!($t));
            }
        )*
    };
}
plain!(u8, u16, u32, u64, u128, usize, i8, i16, i32, i64, i128, isize, f32, f64);
plain!(
    std::sync::atomic::AtomicU8,
    std::sync::atomic::AtomicU16,
    std::sync::atomic::AtomicU32,
    std::sync::atomic::AtomicU64,
    std::sync::atomic::AtomicI32,
    std::sync::atomic::AtomicI64
);

// SAFETY: an array of ShmSafe values has no padding between elements (size
// is a multiple of alignment) and validates each element.
unsafe impl<T: ShmSafe, const N: usize> ShmSafe for [T; N] {
    const HAS_POINTERS: bool = T::HAS_POINTERS;
    const LAYOUT: u64 = fingerprint::wrapper::<Self>("array", T::LAYOUT, N);
    const SHALLOW: u64 = fingerprint::wrapper::<Self>("array", T::SHALLOW, N);
    fn validate(&self, walk: &mut Walk<'_>) -> Result<()> {
        if T::HAS_POINTERS {
            for x in self {
                x.validate(walk)?;
            }
        }
        Ok(())
    }
}

/// Bounds of a [`Walk`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalkLimits {
    /// Most blocks (pointer targets) visited.
    pub max_visits: usize,
    /// Deepest nesting of pointers.
    pub max_depth: usize,
}

impl Default for WalkLimits {
    fn default() -> Self {
        Self {
            max_visits: 1 << 20,
            max_depth: 256,
        }
    }
}

/// A bounded walk that validates a peer's structure, pointer by pointer.
pub struct Walk<'a> {
    peer: PeerMem<'a>,
    limits: WalkLimits,
    visits: usize,
    depth: usize,
}

impl<'a> Walk<'a> {
    /// A walk over `peer`'s region with the default limits.
    pub fn new(peer: PeerMem<'a>) -> Self {
        Self::with_limits(peer, WalkLimits::default())
    }

    /// A walk with explicit limits.
    pub fn with_limits(peer: PeerMem<'a>, limits: WalkLimits) -> Self {
        Self {
            peer,
            limits,
            visits: 0,
            depth: 0,
        }
    }

    /// Blocks visited so far.
    pub fn visits(&self) -> usize {
        self.visits
    }

    /// The region walked.
    pub fn peer(&self) -> PeerMem<'a> {
        self.peer
    }

    /// Checks `count` values of `T` at `addr` and, recursively, what they
    /// point to. Returns the validated values.
    pub fn visit<T: ShmSafe>(&mut self, addr: u64, count: u64) -> Result<&'a [T]> {
        self.visits += 1;
        let limit = |reason| Error::WalkLimit {
            visits: self.visits,
            depth: self.depth,
            reason,
        };
        if self.visits > self.limits.max_visits {
            return Err(limit("too many blocks (a cycle, or a structure too large)"));
        }
        if self.depth >= self.limits.max_depth {
            return Err(limit("nested too deep (a cycle, or a structure too deep)"));
        }
        let items = if count == 0 {
            &[][..]
        } else {
            self.peer.slice::<T>(addr, count)?
        };
        if T::HAS_POINTERS {
            self.depth += 1;
            for item in items {
                item.validate(self)?;
            }
            self.depth -= 1;
        }
        Ok(items)
    }
}

/// Reads a `u64` that lives in a peer's memory exactly once.
pub(crate) fn read_once(x: &u64) -> u64 {
    // SAFETY: `x` is a valid reference; a volatile read takes one snapshot of
    // a value the peer may be changing, which we then validate.
    unsafe { std::ptr::read_volatile(x) }
}

/// A peer's view of `len` values of `T` at `addr` (both read once from peer
/// memory): bounds, alignment and length overflow checked; empty is fine.
pub(crate) fn peer_slice<'p, T: ShmSafe>(addr: &u64, len: &u64, peer: PeerMem<'p>) -> Result<&'p [T]> {
    let len = read_once(len);
    if len == 0 {
        return Ok(&[]);
    }
    peer.slice::<T>(read_once(addr), len)
}

/// Lends our block at `addr` (0: no block) to `peer`.
pub(crate) fn lend_block(addr: u64, peer: PeerId) -> Result<()> {
    match std::ptr::NonNull::new(addr as *mut u8) {
        Some(p) => own_arena().lend(p, peer),
        None => Ok(()),
    }
}

/// The process's arena, for the owner-side methods of the shm types.
pub(crate) fn own_arena() -> &'static crate::arena::Arena {
    crate::arena::Arena::global().expect("shm values exist only once the process arena does")
}

/// Panics unless the value is ours: its header (`header`, the value itself)
/// is not in a peer's memory, and its data (`addr`) is in our own arena.
/// Owner-side access to a value that belongs to a peer is a programming
/// error (use `get(mem)`, which validates). Both halves matter: a peer can
/// lay out a header in its own memory whose address points into *our*
/// arena, with a length of its choosing, inside a struct we view.
pub(crate) fn assert_owned<H>(header: &H, addr: u64, what: &str) {
    let at = header as *const H as u64;
    let arena = own_arena();
    let in_peer = !arena.region().contains(at, 1)
        && crate::space::Space::existing().is_some_and(|s| s.in_window(at, size_of::<H>() as u64));
    if in_peer {
        panic!("a {what} in a peer's memory (at {at:#x}): read it with .get(mem), which validates it");
    }
    if addr != 0 && !arena.region().contains(addr, 1) {
        panic!("{what} at {addr:#x} belongs to a peer: read it with .get(mem), which validates it");
    }
}
