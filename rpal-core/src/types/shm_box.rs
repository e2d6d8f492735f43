//! `ShmBox<T>`: one value in the owner's arena.

use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

use super::{PeerMem, ShmSafe, Walk, assert_owned, own_arena, read_once};
use crate::cred::PeerId;
use crate::error::Result;

/// A value of `T` in this process's arena, owned like a `Box`. Peers read it
/// in place with [`ShmBox::get`].
///
/// In shared memory it is just the value's address (`repr(C)`, 8 bytes), so
/// it can be a field of other [`ShmSafe`] types.
#[repr(C)]
pub struct ShmBox<T: ShmSafe> {
    addr: u64,
    _owns: PhantomData<T>,
}

impl<T: ShmSafe> ShmBox<T> {
    /// Moves `value` into the arena.
    pub fn new(value: T) -> Result<Self> {
        let p = own_arena()
            .alloc_raw(size_of::<T>().max(1), align_of::<T>())?
            .cast::<T>();
        // SAFETY: `p` is a fresh, aligned block of at least size_of::<T>() bytes.
        unsafe { p.as_ptr().write(value) };
        Ok(Self {
            addr: p.as_ptr() as u64,
            _owns: PhantomData,
        })
    }

    /// The value's address (the same in every process).
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// A peer's view of a `ShmBox` it received: checks that the value lies
    /// inside `peer`'s region and is aligned. Nested pointers are checked
    /// when they are followed (or all at once with [`Walk`]).
    pub fn get<'p>(&self, peer: PeerMem<'p>) -> Result<&'p T> {
        peer.view::<T>(read_once(&self.addr))
    }

    /// Hands the value over to `peer`: the block stays allocated until
    /// that peer releases it (or leaves). Returns its address, to send.
    pub fn lend(self, peer: PeerId) -> Result<u64> {
        let addr = self.addr;
        let ptr = NonNull::new(addr as *mut u8).expect("a ShmBox is never null");
        own_arena().lend(ptr, peer)?;
        std::mem::forget(self);
        Ok(addr)
    }

    fn ptr(&self) -> *mut T {
        assert_owned(self, self.addr, "ShmBox");
        self.addr as *mut T
    }
}

impl<T: ShmSafe> Deref for ShmBox<T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: `ptr` checked the block is ours; it holds an initialised T
        // for as long as this box lives.
        unsafe { &*self.ptr() }
    }
}

impl<T: ShmSafe> DerefMut for ShmBox<T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`; `&mut self` makes the access unique.
        unsafe { &mut *self.ptr() }
    }
}

impl<T: ShmSafe> Drop for ShmBox<T> {
    fn drop(&mut self) {
        let ptr = self.ptr();
        // SAFETY: we own the initialised value and drop it once; afterwards
        // nothing refers to the block, which goes back to the allocator.
        unsafe {
            std::ptr::drop_in_place(ptr);
            let _ = own_arena().free_raw(NonNull::new_unchecked(ptr.cast()));
        }
    }
}

impl<T: ShmSafe + std::fmt::Debug> std::fmt::Debug for ShmBox<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ShmBox").field(&**self).finish()
    }
}

// SAFETY: 8 bytes of address (any value is allowed; it is validated on use),
// no padding; `validate` checks the target and what it points to.
unsafe impl<T: ShmSafe> ShmSafe for ShmBox<T> {
    const HAS_POINTERS: bool = true;
    const LAYOUT: u64 = super::fingerprint::wrapper::<Self>("ShmBox", T::SHALLOW, 0);
    const SHALLOW: u64 = super::fingerprint::wrapper::<Self>("ShmBox", super::fingerprint::opaque::<T>(), 0);
    fn validate(&self, walk: &mut Walk<'_>) -> Result<()> {
        walk.visit::<T>(read_once(&self.addr), 1).map(drop)
    }
}
