//! The shared address window and the host-wide slot registry.
//!
//! Every rpal process reserves the same virtual window (`PROT_NONE`,
//! `MAP_NORESERVE`) on first use, so nothing else can land there. The window
//! is cut into fixed-size slots; a region always starts at a slot. Which
//! process owns which slot is recorded in a small shared file per uid, so a
//! pointer into a region means the same thing in every process of the host.

mod config;
mod registry;

pub use config::{DEFAULT_BASE, DEFAULT_SLOT_SIZE, DEFAULT_SLOTS, SpaceConfig};
use registry::Registry;
pub use registry::SlotOwner;

use std::collections::BTreeMap;

use std::sync::{Mutex, OnceLock};

use crate::error::{Error, Result};
use crate::sys;

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
    /// old length is given if a dead peer's longer region must be covered;
    /// `took_over` says a dead peer's mapping was here.
    New {
        token: u64,
        longer_old: Option<u64>,
        took_over: bool,
    },
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
        Self::init(SpaceConfig::from_env()?)
    }

    /// The process-wide space if it is set up, without reading the
    /// environment: for hot paths (`from_env` reads variables and the
    /// registry's directory on every call, about 8 ns per element of a
    /// slice when it ran in each deref).
    #[inline]
    pub fn existing() -> Option<&'static Space> {
        GLOBAL.get().and_then(|s| s.as_ref().ok())
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

    /// The registry file's identity (device and inode, folded): two
    /// processes agree on slots only if they share the file itself, whatever
    /// path each opened it by.
    pub fn registry_id(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let id = self.registry.metadata().map_or(1, |m| {
            let h = crate::types::fingerprint::word(crate::types::fingerprint::start("registry", 0, 0), m.dev());
            crate::types::fingerprint::word(h, m.ino())
        });
        id.max(1)
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

    /// Every non-free entry of the registry (stale ones included: an entry
    /// is trusted only while a live process with its start time holds it).
    pub fn registry_entries(&self) -> Vec<(usize, SlotOwner)> {
        (0..self.cfg.slots as usize)
            .filter_map(|slot| self.registry.owner(slot).map(|o| (slot, o)))
            .collect()
    }

    /// Frees the registry entry of the slot at `addr` if it still names
    /// `owner` and that process is gone (see [`PeerRegion`](crate::PeerRegion)'s drop).
    pub(crate) fn forget_dead_owner(&self, addr: u64, owner: SlotOwner) {
        if let Some(slot) = self.slot_of(addr) {
            self.registry.forget_dead(slot, owner);
        }
    }

    /// What this process maps in the window now: each range's start,
    /// length and occupant (our arena, or a peer's region).
    pub fn mapped(&self) -> Vec<(u64, u64, Occupant)> {
        let map = self.mapped.lock().unwrap_or_else(|p| p.into_inner());
        map.iter().map(|(&a, m)| (a, m.len, m.who)).collect()
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
        let mut took_over = false;
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
                took_over = true;
            }
        }
        let token = self.next_token.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let found = Occupied::New {
            token,
            longer_old,
            took_over,
        };
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
