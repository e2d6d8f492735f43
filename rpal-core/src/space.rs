//! The shared address window and the host-wide slot registry.
//!
//! Every rpal process reserves the same virtual window (`PROT_NONE`,
//! `MAP_NORESERVE`) on first use, so nothing else can land there. The window
//! is cut into fixed-size slots; a region always starts at a slot. Which
//! process owns which slot is recorded in a small shared file per uid, so a
//! pointer into a region means the same thing in every process of the host.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use crate::error::{Error, Result};
use crate::sys;

/// Default window start: high in the 47-bit user space, far from the heap,
/// stacks and the places where the kernel puts mmaps by default.
pub const DEFAULT_BASE: u64 = 0x5000_0000_0000;
/// Default slot size: the largest region one process can own.
pub const DEFAULT_SLOT_SIZE: u64 = 1 << 32;
/// Default slot count: a 4 TiB window.
pub const DEFAULT_SLOTS: u64 = 1024;

const REGISTRY_MAGIC: u64 = u64::from_le_bytes(*b"RPALSLOT");
const REGISTRY_VERSION: u64 = 1;

/// Window geometry and registry location. Every process of a host must agree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpaceConfig {
    /// Window start; a multiple of `slot_size`.
    pub base: u64,
    /// Bytes per slot; a multiple of the page size.
    pub slot_size: u64,
    /// Number of slots.
    pub slots: u64,
    /// The registry file shared by the host's rpal processes of this uid.
    pub registry: PathBuf,
}

impl Default for SpaceConfig {
    fn default() -> Self {
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        Self {
            base: DEFAULT_BASE,
            slot_size: DEFAULT_SLOT_SIZE,
            slots: DEFAULT_SLOTS,
            registry: dir.join(format!("rpal-{}.slots", sys::getuid())),
        }
    }
}

impl SpaceConfig {
    /// The default, overridden by `RPAL_WINDOW_BASE` (hex or decimal),
    /// `RPAL_WINDOW_SLOTS` and `RPAL_REGISTRY` (a file path) when set.
    pub fn from_env() -> Self {
        let mut cfg = Self::default();
        if let Some(base) = std::env::var("RPAL_WINDOW_BASE").ok().and_then(|v| parse_u64(&v)) {
            cfg.base = base;
        }
        if let Some(slots) = std::env::var("RPAL_WINDOW_SLOTS").ok().and_then(|v| parse_u64(&v)) {
            cfg.slots = slots.max(1);
        }
        if let Ok(path) = std::env::var("RPAL_REGISTRY") {
            cfg.registry = PathBuf::from(path);
        }
        cfg
    }

    /// Window length in bytes.
    pub fn window_len(&self) -> u64 {
        self.slot_size * self.slots
    }
}

fn parse_u64(s: &str) -> Option<u64> {
    let s = s.trim();
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(&hex.replace('_', ""), 16).ok(),
        None => s.replace('_', "").parse().ok(),
    }
}

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
struct Registry {
    path: PathBuf,
    header: &'static RegistryHeader,
    entries: &'static [SlotEntry],
}

impl Registry {
    fn open(cfg: &SpaceConfig) -> Result<Self> {
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
    fn claim(&self) -> Result<usize> {
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
    fn release(&self, slot: usize) {
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

    fn owner(&self, slot: usize) -> Option<SlotOwner> {
        let e = self.entries.get(slot)?;
        let word = e.owner.load(Ordering::Acquire);
        (owner_pid(word) != 0).then(|| SlotOwner {
            pid: owner_pid(word),
            start_time: start_of(generation(word), e.start.load(Ordering::Acquire)).unwrap_or(0),
            generation: generation(word),
        })
    }
}

/// What occupies a range of the window in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Occupant {
    /// Our own arena, mapped read-write.
    Own,
    /// A peer's region, mapped read-only.
    Peer {
        /// The peer's pid.
        pid: i32,
    },
}

/// This process's view of the window: the reservation, the registry, and
/// which ranges are mapped here.
pub struct Space {
    cfg: SpaceConfig,
    registry: Registry,
    mapped: Mutex<BTreeMap<u64, Mapping>>,
    next_token: std::sync::atomic::AtomicU64,
}

/// One range mapped here, the token of whoever mapped it last, and how
/// many handles share it (several connections to one peer process).
#[derive(Debug, Clone, Copy)]
struct Mapping {
    len: u64,
    who: Occupant,
    token: u64,
    refs: u32,
}

/// What [`Space::occupy`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Occupied {
    /// The range was free (or held by a dead peer, taken over): map it. The
    /// old length is given if a dead peer's longer region must be covered.
    New { token: u64, longer_old: Option<u64> },
    /// The same live peer's region is mapped here already: share it.
    Shared { token: u64 },
}

impl Occupied {
    pub(crate) fn token(self) -> u64 {
        match self {
            Occupied::New { token, .. } | Occupied::Shared { token } => token,
        }
    }
}

impl std::fmt::Debug for Space {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Space").field("cfg", &self.cfg).finish_non_exhaustive()
    }
}

static GLOBAL: OnceLock<std::result::Result<Space, String>> = OnceLock::new();

impl Space {
    /// The process-wide space, set up from [`SpaceConfig::from_env`] on first use.
    pub fn global() -> Result<&'static Space> {
        Self::init(SpaceConfig::from_env())
    }

    /// Sets up the process-wide space with `cfg`, or returns the existing one
    /// if it was set up with the same configuration.
    pub fn init(cfg: SpaceConfig) -> Result<&'static Space> {
        let space = GLOBAL.get_or_init(|| Space::new(cfg.clone()).map_err(|e| e.to_string()));
        match space {
            Ok(s) if s.cfg == cfg => Ok(s),
            Ok(s) => Err(Error::RegistryMismatch {
                path: s.cfg.registry.clone(),
                detail: format!("this process already uses {:?}, not {cfg:?}", s.cfg),
            }),
            Err(msg) => Err(Error::io(
                "set up the rpal address space",
                std::io::Error::other(msg.clone()),
            )),
        }
    }

    fn new(cfg: SpaceConfig) -> Result<Self> {
        let page = sys::page_size() as u64;
        if cfg.slot_size == 0 || cfg.slot_size % page != 0 || cfg.base % cfg.slot_size != 0 || cfg.slots == 0 {
            return Err(Error::InvalidRegion {
                addr: cfg.base,
                len: cfg.window_len(),
                reason: "window base and slot size must be page- and slot-aligned and non-zero".into(),
            });
        }
        sys::reserve(cfg.base as usize, cfg.window_len() as usize).map_err(|source| Error::WindowUnavailable {
            base: cfg.base,
            len: cfg.window_len(),
            source,
        })?;
        let registry = Registry::open(&cfg)?;
        Ok(Self {
            cfg,
            registry,
            mapped: Mutex::new(BTreeMap::new()),
            next_token: std::sync::atomic::AtomicU64::new(1),
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &SpaceConfig {
        &self.cfg
    }

    /// Whether `[addr, addr+len)` lies inside the window.
    pub fn in_window(&self, addr: u64, len: u64) -> bool {
        let end = self.cfg.base + self.cfg.window_len();
        addr >= self.cfg.base && addr.checked_add(len).is_some_and(|e| e <= end)
    }

    /// Slot index of an address inside the window.
    pub fn slot_of(&self, addr: u64) -> Option<usize> {
        self.in_window(addr, 1)
            .then(|| ((addr - self.cfg.base) / self.cfg.slot_size) as usize)
    }

    /// Start address of a slot.
    pub fn slot_addr(&self, slot: usize) -> u64 {
        self.cfg.base + slot as u64 * self.cfg.slot_size
    }

    /// Who the registry says owns `slot`.
    pub fn slot_owner(&self, slot: usize) -> Option<SlotOwner> {
        self.registry.owner(slot)
    }

    /// Claims a slot for a region of this process.
    pub(crate) fn claim_slot(&self) -> Result<usize> {
        self.registry.claim()
    }

    /// Returns a slot of this process to the registry.
    pub(crate) fn release_slot(&self, slot: usize) {
        self.registry.release(slot)
    }

    /// Records `[addr, addr+len)` as mapped here, refusing overlaps, and
    /// returns the token that [`Space::vacate`] needs.
    ///
    /// Two overlaps are allowed. The same live peer's region, at the same
    /// place and size, is shared (a second connection to that process). And
    /// a peer's region at the same slot whose owner has died is taken over:
    /// its slot was reclaimed by a new process before we noticed the death;
    /// the new mapping replaces the old one (readers of the old region read
    /// the new memory, validated as always), and the old region's drop then
    /// leaves the range alone.
    ///
    /// `map` runs under the same lock as [`Space::release`]'s unmap, so a
    /// range being released and mapped anew at once can never lose the new
    /// mapping to the old one's unmap. It is given what was found; if it
    /// fails, the range is recorded as before.
    pub(crate) fn occupy(
        &self,
        addr: u64,
        len: u64,
        who: Occupant,
        mut map: impl FnMut(Occupied) -> Result<()>,
    ) -> Result<Occupied> {
        let mut guard = self.mapped.lock().unwrap_or_else(|p| p.into_inner());
        let table = &mut *guard;
        let end = addr + len;
        let mut longer_old = None;
        // The nearest range starting below `end` is the only one that can overlap,
        // because recorded ranges never overlap each other.
        if let Some((&start, old)) = table.range_mut(..end).next_back() {
            if start + old.len > addr {
                let (Occupant::Peer { pid: old_pid }, Occupant::Peer { pid }) = (old.who, who) else {
                    return Err(Error::AddressInUse {
                        addr,
                        len,
                        other: start,
                    });
                };
                if start != addr {
                    return Err(Error::AddressInUse {
                        addr,
                        len,
                        other: start,
                    });
                }
                if old_pid == pid && old.len == len && sys::pid_alive(pid) {
                    let found = Occupied::Shared { token: old.token };
                    map(found)?;
                    old.refs += 1;
                    return Ok(found);
                }
                if old_pid == pid || sys::pid_alive(old_pid) {
                    return Err(Error::AddressInUse {
                        addr,
                        len,
                        other: start,
                    });
                }
                tracing::debug!(addr, "a dead peer's range is taken over by its slot's new owner");
                longer_old = (old.len > len).then_some(old.len);
            }
        }
        let token = self.next_token.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let found = Occupied::New { token, longer_old };
        map(found)?;
        table.insert(
            addr,
            Mapping {
                len,
                who,
                token,
                refs: 1,
            },
        );
        Ok(found)
    }

    /// Drops one handle on a range recorded by [`Space::occupy`], if `token`
    /// still owns it; with the last handle, runs `unmap` (under the lock, see
    /// [`Space::occupy`]) and returns true.
    pub(crate) fn release(&self, addr: u64, token: u64, unmap: impl FnOnce()) -> bool {
        let mut map = self.mapped.lock().unwrap_or_else(|p| p.into_inner());
        match map.get_mut(&addr) {
            Some(m) if m.token == token => {
                m.refs -= 1;
                if m.refs == 0 {
                    map.remove(&addr);
                    unmap();
                    return true;
                }
                false
            }
            _ => false,
        }
    }

    /// What is mapped here at `addr`, if anything.
    pub fn occupant(&self, addr: u64) -> Option<(u64, u64, Occupant)> {
        let map = self.mapped.lock().unwrap_or_else(|p| p.into_inner());
        let (&start, m) = map.range(..=addr).next_back()?;
        (addr < start + m.len).then_some((start, m.len, m.who))
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
    fn parses_hex_and_decimal() {
        assert_eq!(parse_u64("0x5000_0000_0000"), Some(0x5000_0000_0000));
        assert_eq!(parse_u64("4096"), Some(4096));
        assert_eq!(parse_u64("zz"), None);
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
