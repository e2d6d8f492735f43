//! `ShmVec<T>` and `ShmString`: growable buffers in the owner's arena.

use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

use super::{ShmSafe, Walk, assert_owned, lend_block, own_arena, peer_slice, read_once};
use crate::cred::PeerId;
use crate::error::{Error, Result};
use crate::types::PeerMem;

/// A growable vector of `T` in this process's arena. Peers read it in place
/// with [`ShmVec::get`]. In shared memory: address, length, capacity.
#[repr(C)]
pub struct ShmVec<T: ShmSafe> {
    addr: u64,
    len: u64,
    cap: u64,
    _owns: PhantomData<T>,
}

impl<T: ShmSafe> Default for ShmVec<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: ShmSafe> ShmVec<T> {
    /// An empty vector; allocates on the first push.
    pub const fn new() -> Self {
        Self {
            addr: 0,
            len: 0,
            cap: 0,
            _owns: PhantomData,
        }
    }

    /// An empty vector with room for `cap` values.
    pub fn with_capacity(cap: usize) -> Result<Self> {
        let mut v = Self::new();
        v.reserve(cap)?;
        Ok(v)
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Room before the next reallocation.
    pub fn capacity(&self) -> usize {
        self.cap as usize
    }

    /// Address of the first value (0 before the first allocation).
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Makes room for `more` values beyond the length (growth doubles).
    pub fn reserve(&mut self, more: usize) -> Result<()> {
        assert_owned(self, self.addr, "ShmVec");
        let overflow = || Error::InvalidPointer {
            addr: 0,
            len: u64::MAX,
            reason: "has a length that overflows",
        };
        let need = (self.len as usize).checked_add(more).ok_or_else(overflow)?;
        if need <= self.cap as usize {
            return Ok(());
        }
        let cap = need.max(self.cap as usize * 2).max(4);
        let bytes = cap.checked_mul(size_of::<T>()).ok_or_else(overflow)?;
        let arena = own_arena();
        let new = arena.alloc_raw(bytes.max(1), align_of::<T>())?;
        if let Some(old) = NonNull::new(self.addr as *mut u8) {
            // SAFETY: the old block holds `len` values; the new one has room for
            // `cap >= len`; they do not overlap. The values move (no drop).
            unsafe {
                std::ptr::copy_nonoverlapping(old.as_ptr(), new.as_ptr(), self.len as usize * size_of::<T>());
                arena.free_raw(old)?;
            }
        }
        self.addr = new.as_ptr() as u64;
        self.cap = cap as u64;
        Ok(())
    }

    /// Appends a value, growing if needed.
    pub fn push(&mut self, value: T) -> Result<()> {
        self.reserve(1)?;
        // SAFETY: `reserve` made room at index `len` in our own block.
        unsafe { (self.addr as *mut T).add(self.len as usize).write(value) };
        self.len += 1;
        Ok(())
    }

    /// Removes and returns the last value.
    pub fn pop(&mut self) -> Option<T> {
        assert_owned(self, self.addr, "ShmVec");
        if self.len == 0 {
            return None;
        }
        self.len -= 1;
        // SAFETY: index `len` held an initialised value, now outside the length.
        Some(unsafe { (self.addr as *mut T).add(self.len as usize).read() })
    }

    /// Appends copies of `values`.
    pub fn extend_from_slice(&mut self, values: &[T]) -> Result<()>
    where
        T: Copy,
    {
        self.reserve(values.len())?;
        // SAFETY: room for `values.len()` more values; T: Copy, so a bitwise copy is a copy.
        unsafe {
            std::ptr::copy_nonoverlapping(
                values.as_ptr(),
                (self.addr as *mut T).add(self.len as usize),
                values.len(),
            )
        };
        self.len += values.len() as u64;
        Ok(())
    }

    /// Drops every value, keeping the allocation.
    pub fn clear(&mut self) {
        while self.pop().is_some() {}
    }

    /// A peer's view: checks bounds, alignment and length overflow.
    pub fn get<'p>(&self, peer: PeerMem<'p>) -> Result<&'p [T]> {
        peer_slice(&self.addr, &self.len, peer)
    }

    /// Hands the buffer over to `peer` (see [`super::ShmBox::lend`]).
    pub fn lend(self, peer: PeerId) -> Result<(u64, u64)> {
        let (addr, len) = (self.addr, self.len);
        lend_block(addr, peer)?;
        std::mem::forget(self);
        Ok((addr, len))
    }

    fn raw(&self) -> *mut T {
        assert_owned(self, self.addr, "ShmVec");
        if self.addr == 0 {
            NonNull::dangling().as_ptr()
        } else {
            self.addr as *mut T
        }
    }
}

impl<T: ShmSafe> Deref for ShmVec<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: our own block with `len` initialised values (or empty).
        unsafe { std::slice::from_raw_parts(self.raw(), self.len as usize) }
    }
}

impl<T: ShmSafe> DerefMut for ShmVec<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`; `&mut self` makes the access unique.
        unsafe { std::slice::from_raw_parts_mut(self.raw(), self.len as usize) }
    }
}

impl<T: ShmSafe> Drop for ShmVec<T> {
    fn drop(&mut self) {
        let p = self.raw();
        if self.addr != 0 {
            // SAFETY: we own `len` values and drop them once; then the block is unused.
            unsafe {
                std::ptr::drop_in_place(std::ptr::slice_from_raw_parts_mut(p, self.len as usize));
                let _ = own_arena().free_raw(NonNull::new_unchecked(p.cast()));
            }
        }
    }
}

impl<T: ShmSafe + std::fmt::Debug> std::fmt::Debug for ShmVec<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

// SAFETY: three u64 (any value allowed, validated on use), no padding.
unsafe impl<T: ShmSafe> ShmSafe for ShmVec<T> {
    const HAS_POINTERS: bool = true;
    const LAYOUT: u64 = super::fingerprint::wrapper::<Self>("ShmVec", T::SHALLOW, 0);
    const SHALLOW: u64 = super::fingerprint::wrapper::<Self>("ShmVec", super::fingerprint::opaque::<T>(), 0);
    fn validate(&self, walk: &mut Walk<'_>) -> Result<()> {
        walk.visit::<T>(read_once(&self.addr), read_once(&self.len)).map(drop)
    }
}

/// A UTF-8 string in this process's arena. Peers read a copy of it with
/// [`ShmString::get`] (bounds, then UTF-8 in the copy), or its bytes in
/// place with [`ShmString::get_bytes`].
#[repr(C)]
#[derive(Default)]
pub struct ShmString {
    bytes: ShmVec<u8>,
}

impl ShmString {
    /// An empty string.
    pub const fn new() -> Self {
        Self { bytes: ShmVec::new() }
    }

    /// A copy of `s` in the arena.
    pub fn copy_from(s: &str) -> Result<Self> {
        let mut out = Self::new();
        out.push_str(s)?;
        Ok(out)
    }

    /// Appends `s`.
    pub fn push_str(&mut self, s: &str) -> Result<()> {
        self.bytes.extend_from_slice(s.as_bytes())
    }

    /// Empties the string, keeping its capacity.
    pub fn clear(&mut self) {
        self.bytes.clear();
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// A peer's string, copied: bounds checked, then UTF-8 checked in the
    /// copy (a `&str` into the peer's memory could stop being UTF-8 while it
    /// is read). For the bytes in place, see [`ShmString::get_bytes`].
    pub fn get(&self, peer: PeerMem<'_>) -> Result<String> {
        let bytes = self.bytes.get(peer)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| Error::InvalidUtf8 {
            addr: read_once(&self.bytes.addr),
        })
    }

    /// A peer's string as bytes in place, bounds checked (no UTF-8 check:
    /// the peer may change them while they are read; bytes have no
    /// invariant to break).
    pub fn get_bytes<'p>(&self, peer: PeerMem<'p>) -> Result<&'p [u8]> {
        self.bytes.get(peer)
    }

    /// Hands the string over to `peer`.
    pub fn lend(self, peer: PeerId) -> Result<(u64, u64)> {
        self.bytes.lend(peer)
    }
}

impl TryFrom<&str> for ShmString {
    type Error = Error;
    fn try_from(s: &str) -> Result<Self> {
        Self::copy_from(s)
    }
}

impl Deref for ShmString {
    type Target = str;
    fn deref(&self) -> &str {
        assert_owned(self, self.bytes.addr, "ShmString");
        // SAFETY: ours (checked above), and only `push_str` writes the
        // bytes, always whole `str`s.
        unsafe { std::str::from_utf8_unchecked(&self.bytes) }
    }
}

impl std::fmt::Debug for ShmString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&**self, f)
    }
}

// SAFETY: one ShmVec<u8> (no padding); `validate` checks bounds and UTF-8.
unsafe impl ShmSafe for ShmString {
    const HAS_POINTERS: bool = true;
    const LAYOUT: u64 = super::fingerprint::wrapper::<Self>("ShmString", 0, 0);
    fn validate(&self, walk: &mut Walk<'_>) -> Result<()> {
        let bytes = walk.visit::<u8>(read_once(&self.bytes.addr), read_once(&self.bytes.len))?;
        std::str::from_utf8(bytes).map(drop).map_err(|_| Error::InvalidUtf8 {
            addr: read_once(&self.bytes.addr),
        })
    }
}
