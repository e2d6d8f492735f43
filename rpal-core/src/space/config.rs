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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hex_and_decimal() {
        assert_eq!(parse_u64("0x5000_0000_0000"), Some(0x5000_0000_0000));
        assert_eq!(parse_u64("4096"), Some(4096));
        assert_eq!(parse_u64("zz"), None);
    }
}
