//! [`PeerMem`]: a peer's memory while this thread may read it, and every
//! validated view of it. Above `region` (it borrows a [`PeerRegion`]) and
//! below the shm types that read through it.

use super::{ShmSafe, Walk};
use crate::error::{Error, Result};
use crate::pkey::{Access, Pkey};
use crate::region::PeerRegion;

impl PeerRegion {
    /// The region's memory, readable while `access` lives.
    #[inline]
    pub fn mem<'a>(&'a self, access: &'a Access) -> PeerMem<'a> {
        let _ = access;
        debug_assert!(
            self.pkey().is_none_or(Pkey::allowed_here),
            "PeerRegion::mem with an Access that does not cover pid {}'s region",
            self.pid()
        );
        PeerMem { region: self }
    }
}

/// A peer's memory while this thread may read it: a [`PeerRegion`] and a
/// live [`Access`], joined by [`PeerRegion::mem`]. Every view it hands out
/// borrows both, so none outlives the grant.
///
/// It is `Send` so that an async handler's future, which holds views of its
/// arguments across `.await`, can move between threads: whichever thread
/// polls it re-grants the access first.
#[derive(Debug, Clone, Copy)]
pub struct PeerMem<'a> {
    region: &'a PeerRegion,
}

impl<'a> PeerMem<'a> {
    /// The memory of `region` without a token in hand.
    ///
    /// # Safety
    /// Every read through the result (and the views it hands out) must
    /// happen on a thread that holds access to the region at that moment,
    /// for example inside a future whose every poll is wrapped in a grant.
    /// (A read without one faults where keys are active.)
    #[doc(hidden)]
    pub unsafe fn assume(region: &'a PeerRegion) -> Self {
        Self { region }
    }

    /// The region.
    pub fn region(&self) -> &'a PeerRegion {
        self.region
    }

    /// The owning peer's pid.
    pub fn pid(&self) -> i32 {
        self.region.pid()
    }

    /// As [`PeerRegion::check`].
    pub fn check(&self, addr: u64, len: u64, align: u64) -> Result<()> {
        self.region.check(addr, len, align)
    }

    /// A validated view of one `T` at `addr` in the peer's region.
    pub fn view<T: ShmSafe>(&self, addr: u64) -> Result<&'a T> {
        self.check(addr, size_of::<T>() as u64, align_of::<T>() as u64)?;
        // SAFETY: `check` proved the bytes lie inside our read-only mapping,
        // which lives as long as the region borrow, and are aligned; this
        // thread may read them (the `Access` borrow); `T: ShmSafe` accepts any
        // bit pattern (ShmSafe rule 2). The peer may change the bytes concurrently (documented
        // on the type): we hand out plain data, never a pointer we follow.
        Ok(unsafe { &*(addr as *const T) })
    }

    /// A validated view of `count` values of `T` at `addr`.
    pub fn slice<T: ShmSafe>(&self, addr: u64, count: u64) -> Result<&'a [T]> {
        let Some(bytes) = count.checked_mul(size_of::<T>() as u64) else {
            return Err(Error::InvalidPointer {
                addr,
                len: u64::MAX,
                reason: "has a length that overflows",
            });
        };
        self.check(addr, bytes, align_of::<T>() as u64)?;
        // SAFETY: as in `view`, for `count` contiguous values.
        Ok(unsafe { std::slice::from_raw_parts(addr as *const T, count as usize) })
    }

    /// A `T` at `addr` with every nested pointer validated, following them
    /// all within the default [`crate::types::WalkLimits`].
    pub fn walk<T: ShmSafe>(&self, addr: u64) -> Result<&'a T> {
        Ok(&Walk::new(*self).visit::<T>(addr, 1)?[0])
    }

    /// A validated byte view.
    pub fn bytes(&self, addr: u64, len: u64) -> Result<&'a [u8]> {
        self.slice::<u8>(addr, len)
    }

    /// A copy of the string at `addr`, UTF-8-checked in the copy. (There is
    /// no `&str` view of a peer's memory: the peer could break its UTF-8
    /// after the check, while safe code relies on it.)
    pub fn copy_str(&self, addr: u64, len: u64) -> Result<String> {
        String::from_utf8(self.bytes(addr, len)?.to_vec()).map_err(|_| Error::InvalidUtf8 { addr })
    }
}
