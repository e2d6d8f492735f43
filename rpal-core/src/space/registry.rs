//! The host-wide slot registry: a small shared file per uid recording which
//! process owns which slot of the window (pid, start time, generation).

use std::fs::OpenOptions;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use super::SpaceConfig;
use crate::error::{Error, Result};
use crate::sys;

const REGISTRY_MAGIC: u64 = u64::from_le_bytes(*b"RPALSLOT");
const REGISTRY_VERSION: u64 = 1;

/// Registry header, at offset 0 of the registry file.
#[repr(C)]
struct RegistryHeader {
    magic: AtomicU64,
    version: AtomicU64,
    base: AtomicU64,
    slot_size: AtomicU64,
    slots: AtomicU64,
}

/// One slot's owner record.
///
/// `owner` packs `generation << 32 | pid` so that claiming a slot is one CAS;
/// pid 0 means free. `start` packs the low 24 bits of the generation with the
/// owner's start time (`gen << 40 | ticks`), written right after the claim.
/// A `start` whose generation differs from `owner`'s is a previous owner's:
/// the claim is still in progress, and must not be judged by that old start
/// time (it would make a live new owner look like a reused pid).
#[repr(C)]
struct SlotEntry {
    owner: AtomicU64,
    start: AtomicU64,
}

const fn pack(generation: u32, pid: i32) -> u64 {
    ((generation as u64) << 32) | (pid as u32 as u64)
}
const fn owner_pid(word: u64) -> i32 {
    word as u32 as i32
}
const fn generation(word: u64) -> u32 {
    (word >> 32) as u32
}
const START_BITS: u32 = 40;
const fn pack_start(generation: u32, ticks: u64) -> u64 {
    ((generation as u64 & 0xff_ffff) << START_BITS) | (ticks & ((1 << START_BITS) - 1))
}
/// The start time recorded for the claim of `generation`, if it is written.
const fn start_of(generation: u32, start: u64) -> Option<u64> {
    if start >> START_BITS == generation as u64 & 0xff_ffff && start != 0 {
        Some(start & ((1 << START_BITS) - 1))
    } else {
        None
    }
}

/// A region's owner as recorded in the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotOwner {
    /// Owner process.
    pub pid: i32,
    /// Owner's start time (clock ticks since boot), 0 while claiming.
    pub start_time: u64,
    /// Claim generation of the slot.
    pub generation: u32,
}

/// The host-wide slot registry, mapped into this process.
pub(super) struct Registry {
    path: PathBuf,
    header: &'static RegistryHeader,
    entries: &'static [SlotEntry],
}

impl Registry {
    pub(super) fn open(cfg: &SpaceConfig) -> Result<Self> {
        let path = cfg.registry.clone();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| Error::io(format!("open slot registry {}", path.display()), e))?;
        let len = std::mem::size_of::<RegistryHeader>() + cfg.slots as usize * std::mem::size_of::<SlotEntry>();
        let cur = file
            .metadata()
            .map_err(|e| Error::io(format!("stat {}", path.display()), e))?
            .len();
        if cur < len as u64 {
            // Growing a zero file to the same length is idempotent, so racing creators agree.
            file.set_len(len as u64)
                .map_err(|e| Error::io(format!("size {}", path.display()), e))?;
        }
        let ptr = sys::map_file(file.as_fd(), len).map_err(|e| Error::io(format!("map {}", path.display()), e))?;
        // SAFETY: the mapping is `len` bytes, page aligned, lives for the process
        // (never unmapped), and is only accessed through atomics: the file is
        // shared with other processes that write it concurrently.
        let header = unsafe { &*(ptr as *const RegistryHeader) };
        // SAFETY: as above; the entries follow the header, inside `len`.
        let entries = unsafe {
            std::slice::from_raw_parts(
                ptr.add(std::mem::size_of::<RegistryHeader>()) as *const SlotEntry,
                cfg.slots as usize,
            )
        };
        let reg = Self { path, header, entries };
        reg.init_header(cfg)?;
        Ok(reg)
    }

    fn init_header(&self, cfg: &SpaceConfig) -> Result<()> {
        let h = self.header;
        // The first opener writes the geometry, then publishes the magic
        // (Release: pairs with the Acquire below in later openers).
        if h.magic.load(Ordering::Acquire) == 0
            && h.version
                .compare_exchange(0, u64::MAX, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            h.base.store(cfg.base, Ordering::Relaxed);
            h.slot_size.store(cfg.slot_size, Ordering::Relaxed);
            h.slots.store(cfg.slots, Ordering::Relaxed);
            h.version.store(REGISTRY_VERSION, Ordering::Relaxed);
            h.magic.store(REGISTRY_MAGIC, Ordering::Release);
        }
        // Another opener may be mid-initialisation: wait briefly for its magic.
        let t0 = std::time::Instant::now();
        while h.magic.load(Ordering::Acquire) != REGISTRY_MAGIC {
            if t0.elapsed() > std::time::Duration::from_secs(2) {
                return Err(self.mismatch("magic never written (corrupt or foreign file)"));
            }
            std::thread::yield_now();
        }
        let checks = [
            ("version", h.version.load(Ordering::Relaxed), REGISTRY_VERSION),
            ("base", h.base.load(Ordering::Relaxed), cfg.base),
            ("slot_size", h.slot_size.load(Ordering::Relaxed), cfg.slot_size),
            ("slots", h.slots.load(Ordering::Relaxed), cfg.slots),
        ];
        for (name, found, want) in checks {
            if found != want {
                return Err(self.mismatch(&format!("{name} is {found:#x}, this process wants {want:#x}")));
            }
        }
        Ok(())
    }

    fn mismatch(&self, detail: &str) -> Error {
        Error::RegistryMismatch {
            path: self.path.clone(),
            detail: detail.to_owned(),
        }
    }

    /// Whether the recorded owner is gone: pid dead, or pid reused (the
    /// process under that pid started at another time than recorded).
    /// `start` is `None` while a live owner's claim is in progress.
    fn is_stale(pid: i32, start: Option<u64>) -> bool {
        if !sys::pid_exists(pid) {
            return true;
        }
        start.is_some_and(|s| sys::proc_start_time(pid) != Some(s))
    }

    /// Claims a slot for this process and returns its index: a free one if
    /// any, else one whose owner is gone. Free slots come first so that a
    /// dead process's slot is reused as late as possible, giving its peers
    /// time to notice the death and unmap its region.
    pub(super) fn claim(&self) -> Result<usize> {
        let me = sys::getpid();
        let my_start = sys::proc_start_time(me).unwrap_or(1);
        for reclaim_stale in [false, true] {
            for (i, e) in self.entries.iter().enumerate() {
                let word = e.owner.load(Ordering::Acquire);
                let pid = owner_pid(word);
                if pid != 0 {
                    if !reclaim_stale {
                        continue;
                    }
                    // Acquire: pairs with the Release store of `start` in a claim.
                    let start = start_of(generation(word), e.start.load(Ordering::Acquire));
                    if !Self::is_stale(pid, start) {
                        continue;
                    }
                }
                let new_gen = generation(word).wrapping_add(1);
                let new = pack(new_gen, me);
                // AcqRel: the winner alone proceeds; losers move on.
                if e.owner
                    .compare_exchange(word, new, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
                {
                    // Release: pairs with the Acquire of `start` in `claim`/`owner`.
                    e.start.store(pack_start(new_gen, my_start), Ordering::Release);
                    return Ok(i);
                }
            }
        }
        Err(Error::NoFreeSlot {
            slots: self.entries.len(),
            registry: self.path.clone(),
        })
    }

    /// Frees a slot this process owns.
    pub(super) fn release(&self, slot: usize) {
        let e = &self.entries[slot];
        let word = e.owner.load(Ordering::Acquire);
        if owner_pid(word) == sys::getpid() {
            e.start.store(0, Ordering::Relaxed);
            // Release: our use of the slot happens before anyone's next claim.
            let _ = e
                .owner
                .compare_exchange(word, pack(generation(word), 0), Ordering::Release, Ordering::Relaxed);
        }
    }

    pub(super) fn owner(&self, slot: usize) -> Option<SlotOwner> {
        let e = self.entries.get(slot)?;
        let word = e.owner.load(Ordering::Acquire);
        (owner_pid(word) != 0).then(|| SlotOwner {
            pid: owner_pid(word),
            start_time: start_of(generation(word), e.start.load(Ordering::Acquire)).unwrap_or(0),
            generation: generation(word),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_round_trips() {
        let w = pack(7, 12345);
        assert_eq!(owner_pid(w), 12345);
        assert_eq!(generation(w), 7);
    }

    #[test]
    fn stale_detection() {
        // A live process with its real start time is not stale; a wrong start time is (pid reuse).
        let me = sys::getpid();
        let start = sys::proc_start_time(me).unwrap();
        assert!(!Registry::is_stale(me, Some(start)));
        assert!(Registry::is_stale(me, Some(start + 1)));
        // A claim in progress (start not written for this generation) is left alone.
        assert!(!Registry::is_stale(me, None));
        assert!(Registry::is_stale(i32::MAX, None));
        // A previous owner's start time does not count for the new generation.
        assert_eq!(start_of(7, pack_start(6, start)), None);
        assert_eq!(start_of(7, pack_start(7, start)), Some(start));
    }
}
