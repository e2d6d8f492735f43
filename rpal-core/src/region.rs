//! Regions: sealed memfds mapped at the same address in every process.
//!
//! The owner maps its region read-write at its slot; peers map it read-only
//! at the same address, so pointers inside need no relocation. The memfd is
//! sealed against shrinking and growing, so a peer can never truncate it
//! and make us take SIGBUS.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::pkey::{self, Access, Pkey};
use crate::space::{Occupant, Occupied, SlotOwner, Space};
use crate::sys;

/// Smallest region: one page.
fn min_len() -> u64 {
    sys::page_size() as u64
}

/// A region this process owns, mapped read-write.
#[derive(Debug)]
pub struct Region {
    addr: u64,
    len: u64,
    token: u64,
    slot: usize,
    fd: OwnedFd,
    space: &'static Space,
}

impl Region {
    /// Creates a sealed memfd of `len` bytes (rounded up to pages), claims a
    /// slot for it and maps it there read-write.
    pub fn create(space: &'static Space, name: &str, len: u64) -> Result<Region> {
        let page = sys::page_size() as u64;
        let len = len.max(min_len()).div_ceil(page) * page;
        let slot_size = space.config().slot_size;
        if len > slot_size {
            return Err(Error::RegionFull {
                requested: len as usize,
                available: slot_size as usize,
                capacity: slot_size as usize,
            });
        }
        let mfd = memfd::MemfdOptions::default()
            .allow_sealing(true)
            .close_on_exec(true)
            .create(name)
            .map_err(|e| Error::io(format!("memfd_create({name})"), std::io::Error::other(e)))?;
        mfd.as_file()
            .set_len(len)
            .map_err(|e| Error::io(format!("size memfd {name} to {len}"), e))?;
        let seals = [memfd::FileSeal::SealShrink, memfd::FileSeal::SealGrow];
        mfd.add_seals(&seals)
            .map_err(|e| Error::io(format!("seal memfd {name}"), std::io::Error::other(e)))?;
        let fd: OwnedFd = mfd.into_file().into();

        let slot = space.claim_slot()?;
        let addr = space.slot_addr(slot);
        let occupied = space.occupy(addr, len, Occupant::Own, |_| {
            // SAFETY: the slot lies in our reserved window, the registry gave
            // it to us alone, and `occupy` proved nothing else is mapped there.
            unsafe { sys::map_shared_fixed(addr as usize, len as usize, fd.as_fd(), true) }
                .map_err(|e| Error::io(format!("map region {name} at {addr:#x}"), e))
        });
        let token = match occupied {
            Ok(o) => o.token(),
            Err(e) => {
                space.release_slot(slot);
                return Err(e);
            }
        };
        seal_after_mapping(&fd, name);
        Ok(Region {
            addr,
            len,
            token,
            slot,
            fd,
            space,
        })
    }

    /// Start address (the same in every process).
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the region is empty (never: regions are at least a page).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Registry slot.
    pub fn slot(&self) -> usize {
        self.slot
    }

    /// Whether `[addr, addr+len)` lies inside this region.
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        addr >= self.addr && addr.checked_add(len).is_some_and(|e| e <= self.addr + self.len)
    }
}

/// Seals a region's memfd once its owner has mapped it read-write: against
/// any new writable mapping or `write(2)` (`F_SEAL_FUTURE_WRITE`, Linux
/// 5.1), then against further seals. A peer is sent this very descriptor,
/// open read-write; without the seal it could map it writable and scribble
/// on our allocator and queues. Our own mapping, made before, stays
/// writable. A kernel without the seal keeps the old behaviour (logged).
fn seal_after_mapping(fd: &OwnedFd, name: &str) {
    let seal = |flags: libc::c_int| {
        // SAFETY: F_ADD_SEALS on a descriptor we own; no memory is passed.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, flags) }
    };
    if seal(libc::F_SEAL_FUTURE_WRITE) != 0 {
        tracing::warn!(
            name,
            error = %std::io::Error::last_os_error(),
            "this kernel cannot seal a memfd against future writes; a peer could map our region writable"
        );
    }
    let _ = seal(libc::F_SEAL_SEAL);
}

impl AsFd for Region {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        let (addr, len) = (self.addr as usize, self.len as usize);
        self.space.release(self.addr, self.token, || {
            // SAFETY: references into an owned region borrow the `Region` (or
            // the 'static arena, which is never dropped), so none outlive it.
            let _ = unsafe { sys::unmap_to_reserved(addr, len) };
        });
        self.space.release_slot(self.slot);
    }
}

/// A peer's region, mapped read-only here at the peer's address.
///
/// Its memory is read through a `PeerMem` (in `types`), made by
/// `PeerRegion::mem` from the region and a live [`Access`] (see [`crate::pkey`] for who holds
/// which). Everything read through it is validated: [`PeerRegion::check`]
/// proves a `(ptr, len)` lies inside the region with the right alignment.
/// The bytes behind a view can still change while you hold it (the peer
/// owns them): copy what must stay stable, and never use peer values as
/// pointers or lengths without checking them here first.
#[derive(Debug)]
pub struct PeerRegion {
    addr: u64,
    len: u64,
    token: u64,
    pid: i32,
    /// The registry's entry for the peer's slot when we mapped it: cleared
    /// with our last handle if that process has died (see `Drop`).
    owner: SlotOwner,
    fd: OwnedFd,
    pkey: Option<Arc<Pkey>>,
    space: &'static Space,
}

/// The protection key of each peer range, by address (`None`: untagged),
/// and how many [`PeerRegion`] handles there are on it, over every mapping
/// the range has had. A range keeps its key while any handle lives: when a
/// dead peer's range is taken over, its connections (not yet dropped) read
/// the new mapping under the key they hold, so the new mapping must carry
/// it, even after the new owner's own handles are gone and a third peer
/// maps there.
static RANGE_KEYS: Mutex<BTreeMap<u64, RangeKey>> = Mutex::new(BTreeMap::new());

/// A range's key (`None`: untagged) and its handle count.
type RangeKey = (Option<Arc<Pkey>>, usize);

impl PeerRegion {
    /// Validates a peer's memfd and announced placement, then maps it
    /// read-only at `addr`.
    ///
    /// Checks: the fd is a memfd sealed against shrink and grow, its size is
    /// `len`, `[addr, addr+len)` is slot-aligned inside the window, nothing is
    /// mapped there here, and the registry says `pid` owns that slot.
    pub fn map(space: &'static Space, fd: OwnedFd, addr: u64, len: u64, pid: i32) -> Result<PeerRegion> {
        let bad = |reason: String| Error::InvalidRegion { addr, len, reason };
        let seals =
            nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GET_SEALS).map_err(|e| Error::InvalidDescriptor {
                reason: format!("fd {} is not a sealable memfd (F_GET_SEALS: {e})", fd.as_raw_fd()),
            })?;
        let need = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
        if seals & need != need {
            return Err(Error::InvalidDescriptor {
                reason: format!(
                    "memfd lacks shrink/grow seals (seals {seals:#x}); the peer could truncate it under us"
                ),
            });
        }
        let size = nix::sys::stat::fstat(&fd)
            .map_err(|e| Error::InvalidDescriptor {
                reason: format!("fstat of the peer's memfd: {e}"),
            })?
            .st_size as u64;
        if size != len {
            return Err(Error::InvalidDescriptor {
                reason: format!("memfd is {size} bytes but the peer announced {len}"),
            });
        }
        let page = sys::page_size() as u64;
        if len < min_len() || len % page != 0 || len > space.config().slot_size {
            return Err(bad(format!(
                "length must be whole pages, at most one slot ({:#x})",
                space.config().slot_size
            )));
        }
        if !space.in_window(addr, len) {
            return Err(bad(format!(
                "outside the rpal window {:#x}+{:#x}",
                space.config().base,
                space.config().window_len()
            )));
        }
        let slot = space.slot_of(addr).expect("in window");
        if space.slot_addr(slot) != addr {
            return Err(bad("not at the start of a slot".into()));
        }
        let owner = match space.slot_owner(slot) {
            Some(owner) if owner.pid == pid => owner,
            other => {
                return Err(bad(format!(
                    "the registry says slot {slot} belongs to {}, not to peer pid {pid}",
                    other.map_or("nobody".to_string(), |o| format!("pid {}", o.pid))
                )));
            }
        };
        let occupied = space.occupy(addr, len, Occupant::Peer { pid }, |found| {
            let Occupied::New { longer_old, .. } = found else {
                return Ok(()); // another connection to the same process mapped it already
            };
            // SAFETY: the range is inside our reserved window, and `occupy`
            // proved nothing else of ours is mapped there (or only a dead
            // peer's region, which this replaces).
            unsafe { sys::map_shared_fixed(addr as usize, len as usize, fd.as_fd(), false) }
                .map_err(|e| Error::io(format!("map peer {pid}'s region at {addr:#x}"), e))?;
            if let Some(old_len) = longer_old {
                // A dead peer's longer region was here: keep its tail readable
                // (zeros) for whoever still holds views into it.
                // SAFETY: the tail held only the dead peer's read-only mapping.
                // Ignored on purpose: if this fails the old mapping stays,
                // which is as readable (and as wrong) as zeros.
                let _ = unsafe { sys::map_zero_readonly((addr + len) as usize, (old_len - len) as usize) };
            }
            Ok(())
        })?;
        let token = occupied.token();
        let pkey = {
            let mut keys = RANGE_KEYS.lock().unwrap_or_else(|p| p.into_inner());
            let pkey = match (keys.get(&addr), occupied) {
                // Another connection to the same process mapped (and tagged) it already.
                (Some((k, _)), Occupied::Shared { .. }) => k.clone(),
                // A mapping that replaces one still read here takes its key.
                (Some((Some(k), _)), Occupied::New { .. }) => Self::retag(k.clone(), addr, len, pid),
                (Some((None, _)), Occupied::New { .. }) => None,
                (None, Occupied::New { .. }) if pkey::is_active() => Self::guard(addr, len, pid),
                (None, _) => None,
            };
            keys.entry(addr).or_insert((pkey.clone(), 0)).1 += 1;
            pkey
        };
        Ok(PeerRegion {
            addr,
            len,
            token,
            pid,
            owner,
            fd,
            pkey,
            space,
        })
    }

    /// Tags a freshly mapped peer region with a protection key (shared by
    /// every handle on that mapping).
    fn guard(addr: u64, len: u64, pid: i32) -> Option<Arc<Pkey>> {
        let k = match Pkey::alloc() {
            Ok(k) => k,
            Err(e) => {
                pkey::degrade(format!("no protection key for pid {pid}'s region at {addr:#x}: {e}"));
                return None;
            }
        };
        // SAFETY: the mapping is read-only and fresh; no reference into it exists yet.
        if let Err(e) = unsafe { k.protect(addr as usize, len as usize, libc::PROT_READ) } {
            pkey::degrade(format!("pkey_mprotect of pid {pid}'s region at {addr:#x} failed: {e}"));
            return None;
        }
        pkey::register_region(addr, len, pid, k.key());
        Some(Arc::new(k))
    }

    /// Tags a mapping that took over a dead peer's range with that range's
    /// key `k` (see [`PeerRegion::map`]).
    fn retag(k: Arc<Pkey>, addr: u64, len: u64, pid: i32) -> Option<Arc<Pkey>> {
        // SAFETY: the mapping is read-only and fresh; readers of the old
        // mapping hold `k` already and only load through validated views.
        if let Err(e) = unsafe { k.protect(addr as usize, len as usize, libc::PROT_READ) } {
            // Untagged (key 0), the range stays readable by every thread.
            pkey::degrade(format!("pkey_mprotect of pid {pid}'s region at {addr:#x} failed: {e}"));
            return None;
        }
        pkey::unregister_region(addr);
        pkey::register_region(addr, len, pid, k.key());
        Some(k)
    }

    /// Start address.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the region is empty (never: regions are at least a page).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The owning peer's pid.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The peer's memfd, as it came in the handshake: sealed against
    /// shrink and grow (its owner's checks), and against new writable
    /// mappings where the kernel has `F_SEAL_FUTURE_WRITE`.
    pub fn memfd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The protection key guarding this region, if keys are active.
    pub fn pkey(&self) -> Option<&Pkey> {
        self.pkey.as_deref()
    }

    /// Grants this thread access to the region (on top of what it has)
    /// until the guard drops. A no-op when the region has no key.
    #[inline]
    pub fn access(&self) -> Access {
        match &self.pkey {
            Some(k) => k.allow(),
            None => Access::none(),
        }
    }

    /// Grants this thread access to this region and denies it every other
    /// peer region, until the guard drops: what code run on this peer's
    /// behalf (its handlers) runs under, so it cannot read another peer's
    /// memory by mistake.
    #[inline]
    pub fn access_only(&self) -> Access {
        match &self.pkey {
            Some(k) => k.allow_only(),
            None => Access::none(),
        }
    }

    /// Checks that `[addr, addr+len)` lies inside the region and `addr` is
    /// aligned to `align` (a power of two).
    pub fn check(&self, addr: u64, len: u64, align: u64) -> Result<()> {
        check_range(self.addr, self.len, addr, len, align)
    }
}

/// The pointer validator: errors unless `[addr, addr+len)` lies inside
/// `[base, base+size)` and `addr` is aligned to `align` (0 counts as 1).
/// Every pointer and length read from a peer passes through it.
pub(crate) fn check_range(base: u64, size: u64, addr: u64, len: u64, align: u64) -> Result<()> {
    let bad = |reason| Err(Error::InvalidPointer { addr, len, reason });
    if addr % align.max(1) != 0 {
        return bad("is not aligned for its type");
    }
    let Some(end) = addr.checked_add(len) else {
        return bad("has a length that overflows the address space");
    };
    if addr < base || end > base.saturating_add(size) {
        return bad("lies outside the peer's region");
    }
    Ok(())
}

impl Drop for PeerRegion {
    fn drop(&mut self) {
        // Unmapped with the last handle on it, unless a new peer took the
        // range over (its owner died): then the mapping is theirs now.
        let (addr, len) = (self.addr, self.len);
        let unmapped = self.space.release(self.addr, self.token, || {
            // Readable zeros rather than a hole: a connection to a dead peer
            // whose range was taken over (and since released) may still be
            // read by its poller until the death is noticed; it then reads
            // zeros, which fail validation, instead of faulting.
            // SAFETY: the range held only this peer's read-only mapping,
            // released with its last handle. Ignored on purpose: if this
            // fails the peer's mapping stays, still readable.
            let _ = unsafe { sys::map_zero_readonly(addr as usize, len as usize) };
        });
        if unmapped {
            // A peer killed outright cannot free its registry entry. Whoever
            // held its region last does, once the process is gone (the slot
            // is then free at once, not only when no free one is left).
            self.space.forget_dead_owner(self.addr, self.owner);
        }
        // The range's key goes with its last handle, of any mapping.
        let mut keys = RANGE_KEYS.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = keys.get_mut(&addr) {
            e.1 -= 1;
            if e.1 == 0 {
                if e.0.is_some() {
                    pkey::unregister_region(addr);
                }
                keys.remove(&addr);
            }
        }
    }
}
