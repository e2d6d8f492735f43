//! `ShmSlice<T>`: a fixed-length run of values in the owner's arena.

use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

use super::{ShmSafe, Walk, assert_owned, lend_block, own_arena, peer_slice, read_once};
use crate::cred::PeerId;
use crate::error::{Error, Result};
use crate::types::PeerMem;

/// A fixed-length slice of `T` in this process's arena. Peers read it in
/// place with [`ShmSlice::get`]. In shared memory: address and length.
#[repr(C)]
pub struct ShmSlice<T: ShmSafe> {
    addr: u64,
    len: u64,
    _owns: PhantomData<T>,
}

impl<T: ShmSafe> ShmSlice<T> {
    /// `len` zeroed values (zero is a valid `T`: ShmSafe types accept every
    /// bit pattern).
    pub fn zeroed(len: usize) -> Result<Self> {
        if len == 0 {
            return Ok(Self {
                addr: 0,
                len: 0,
                _owns: PhantomData,
            });
        }
        let bytes = size_of::<T>().checked_mul(len).ok_or(Error::InvalidPointer {
            addr: 0,
            len: u64::MAX,
            reason: "has a length that overflows",
        })?;
        let p = own_arena().alloc_raw(bytes.max(1), align_of::<T>())?;
        // SAFETY: the block is fresh and `bytes` long.
        unsafe { std::ptr::write_bytes(p.as_ptr(), 0, bytes) };
        Ok(Self {
            addr: p.as_ptr() as u64,
            len: len as u64,
            _owns: PhantomData,
        })
    }

    /// A copy of `values`.
    pub fn from_slice(values: &[T]) -> Result<Self>
    where
        T: Copy,
    {
        let mut s = Self::zeroed(values.len())?;
        s.copy_from_slice(values);
        Ok(s)
    }

    /// Address of the first value (0 when empty).
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// A peer's view: checks bounds, alignment and length overflow.
    pub fn get<'p>(&self, peer: PeerMem<'p>) -> Result<&'p [T]> {
        peer_slice(&self.addr, &self.len, peer)
    }

    /// Hands the slice over to `peer` (see [`super::ShmBox::lend`]).
    pub fn lend(self, peer: PeerId) -> Result<(u64, u64)> {
        let (addr, len) = (self.addr, self.len);
        lend_block(addr, peer)?;
        std::mem::forget(self);
        Ok((addr, len))
    }

    fn raw(&self) -> (*mut T, usize) {
        assert_owned(self, self.addr, "ShmSlice");
        let p = if self.addr == 0 {
            NonNull::dangling().as_ptr()
        } else {
            self.addr as *mut T
        };
        (p, self.len as usize)
    }
}

impl<T: ShmSafe> Deref for ShmSlice<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        let (p, n) = self.raw();
        // SAFETY: our own block of `n` initialised values (or an empty slice).
        unsafe { std::slice::from_raw_parts(p, n) }
    }
}

impl<T: ShmSafe> DerefMut for ShmSlice<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        let (p, n) = self.raw();
        // SAFETY: as in `deref`; `&mut self` makes the access unique.
        unsafe { std::slice::from_raw_parts_mut(p, n) }
    }
}

impl<T: ShmSafe> Drop for ShmSlice<T> {
    fn drop(&mut self) {
        let (p, n) = self.raw();
        if self.addr != 0 {
            // SAFETY: we own the values and drop them once; then the block is unused.
            unsafe {
                std::ptr::drop_in_place(std::ptr::slice_from_raw_parts_mut(p, n));
                let _ = own_arena().free_raw(NonNull::new_unchecked(p.cast()));
            }
        }
    }
}

// SAFETY: two u64 (any value allowed, validated on use), no padding.
unsafe impl<T: ShmSafe> ShmSafe for ShmSlice<T> {
    const HAS_POINTERS: bool = true;
    const LAYOUT: u64 = super::fingerprint::wrapper::<Self>("ShmSlice", T::SHALLOW, 0);
    const SHALLOW: u64 = super::fingerprint::wrapper::<Self>("ShmSlice", super::fingerprint::opaque::<T>(), 0);
    fn validate(&self, walk: &mut Walk<'_>) -> Result<()> {
        walk.visit::<T>(read_once(&self.addr), read_once(&self.len)).map(drop)
    }
}
