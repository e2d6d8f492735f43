//! The window's geometry and the registry's location, from the defaults
//! and `RPAL_WINDOW_BASE`, `RPAL_WINDOW_SLOTS`, `RPAL_REGISTRY`.

use std::path::PathBuf;

use crate::sys;

/// Default window start: high in the 47-bit user space, far from the heap,
/// stacks and the places where the kernel puts mmaps by default.
pub const DEFAULT_BASE: u64 = 0x5000_0000_0000;
/// Default slot size: the largest region one process can own.
pub const DEFAULT_SLOT_SIZE: u64 = 1 << 32;
/// Default slot count: a 4 TiB window.
pub const DEFAULT_SLOTS: u64 = 1024;

/// Most slots `RPAL_WINDOW_SLOTS` accepts: a 128 TiB window, the whole
/// 47-bit user half (with the base, the window must also end below it).
pub const MAX_SLOTS: u64 = 1 << 15;
/// The end of the 47-bit user half of the address space.
const USER_TOP: u64 = 1 << 47;

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
    /// The default, overridden by `RPAL_WINDOW_SLOTS`, `RPAL_WINDOW_BASE`
    /// and `RPAL_REGISTRY` when set; a value they do not accept is
    /// [`crate::Error::BadSetting`] (see [`crate::settings`]).
    pub fn from_env() -> crate::Result<Self> {
        use crate::settings;
        let mut cfg = Self::default();
        if let Some(slots) = settings::whole("RPAL_WINDOW_SLOTS", 1, MAX_SLOTS)? {
            cfg.slots = slots;
        }
        let (slot, len) = (cfg.slot_size, cfg.window_len());
        let base = settings::address("RPAL_WINDOW_BASE", |b| {
            // The window must sit in the 47-bit user half, above the first slot.
            if b == 0 || b % slot != 0 || b.checked_add(len).is_none_or(|end| end > USER_TOP) {
                Err(format!(
                    "a non-zero multiple of the slot size ({slot:#x}) with the {} window below {USER_TOP:#x}",
                    settings::show_size(len)
                ))
            } else {
                Ok(())
            }
        })?;
        if let Some(base) = base {
            cfg.base = base;
        }
        // The default base with many slots can reach past the user half too.
        if cfg.base.checked_add(cfg.window_len()).is_none_or(|end| end > USER_TOP) {
            return Err(crate::Error::BadSetting {
                name: "RPAL_WINDOW_SLOTS".into(),
                value: cfg.slots.to_string(),
                accepted: format!(
                    "at most {} slots above the window base {:#x} (the window must end below {USER_TOP:#x})",
                    (USER_TOP - cfg.base) / cfg.slot_size,
                    cfg.base
                ),
            });
        }
        if let Some(path) = settings::path("RPAL_REGISTRY")? {
            cfg.registry = path;
        }
        // Read by the protection-key probe; refused here, where it can fail.
        settings::switch("RPAL_PKEYS")?;
        Ok(cfg)
    }

    /// Window length in bytes.
    pub fn window_len(&self) -> u64 {
        self.slot_size * self.slots
    }
}
