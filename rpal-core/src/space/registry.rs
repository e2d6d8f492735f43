//! The host-wide slot registry: a small shared file per uid recording which
//! process owns which slot of the window (pid, start time, generation).
//!
//! The file is read and written with `pread`/`pwrite` under an advisory
//! (OFD) lock, never mapped: a same-uid process may truncate or scribble on
//! it, and then the worst it does is deny slots (short reads count as free
//! entries, garbage as stale ones), never a SIGBUS in every rpal process.
//! A claim writes owner and start time in one locked write, so no entry is
//! ever half-claimed, and an entry is trusted only while a live process with
//! that start time sits behind its pid.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::SpaceConfig;
use crate::error::{Error, Result};
use crate::sys;

const REGISTRY_MAGIC: u64 = u64::from_le_bytes(*b"RPALSLOT");
const REGISTRY_VERSION: u64 = 2;
/// Header: magic, version, base, slot size, slots (u64 each).
const HEADER: usize = 5 * 8;
/// Entry: owner word (`generation << 32 | pid`; pid 0 is free), start time.
const ENTRY: usize = 16;
/// Longest we wait for another process's lock: a process that holds it
/// longer (stopped, or hostile) denies slots, and the error says so. Long
/// enough for hundreds of processes starting at once on a loaded host.
const LOCK_WAIT: Duration = Duration::from_secs(10);

const fn pack(generation: u32, pid: i32) -> u64 {
    ((generation as u64) << 32) | (pid as u32 as u64)
}
const fn owner_pid(word: u64) -> i32 {
    word as u32 as i32
}
const fn generation(word: u64) -> u32 {
    (word >> 32) as u32
}

/// A region's owner as recorded in the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotOwner {
    /// Owner process.
    pub pid: i32,
    /// Owner's start time (clock ticks since boot).
    pub start_time: u64,
    /// Claim generation of the slot.
    pub generation: u32,
}

/// The host-wide slot registry, opened by this process.
pub(super) struct Registry {
    path: PathBuf,
    file: File,
    slots: usize,
}

/// The registry's lock, held while it lives.
struct Locked<'a>(&'a Registry);

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        let _ = self.0.fcntl_lock(libc::F_UNLCK as i16);
    }
}

impl Registry {
    /// The registry file's metadata.
    pub(super) fn metadata(&self) -> std::io::Result<std::fs::Metadata> {
        self.file.metadata()
    }

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
        let reg = Self {
            path,
            file,
            slots: cfg.slots as usize,
        };
        reg.init_header(cfg)?;
        Ok(reg)
    }

    fn fcntl_lock(&self, kind: i16) -> std::io::Result<bool> {
        // SAFETY: flock is plain data; zero is a valid start for every field.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = kind;
        fl.l_whence = libc::SEEK_SET as i16;
        // Whole file (len 0); OFD locks belong to this open file, so threads
        // of one process exclude each other too.
        // SAFETY: a valid descriptor and a valid flock for F_OFD_SETLK.
        let r = unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
        if r == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EACCES) => Ok(false),
            _ => Err(e),
        }
    }

    /// Takes the lock, waiting at most [`LOCK_WAIT`] (it is held for a few
    /// microseconds at a time: a claim or a release, at process start and end).
    fn lock(&self) -> Result<Locked<'_>> {
        let t0 = Instant::now();
        let mut pause = Duration::from_micros(50);
        loop {
            match self.fcntl_lock(libc::F_WRLCK as i16) {
                Ok(true) => return Ok(Locked(self)),
                Ok(false) if t0.elapsed() < LOCK_WAIT => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(2));
                }
                Ok(false) => {
                    return Err(Error::io(
                        format!(
                            "lock slot registry {}: held by another process for over {LOCK_WAIT:?}",
                            self.path.display()
                        ),
                        std::io::ErrorKind::WouldBlock.into(),
                    ));
                }
                Err(e) => return Err(Error::io(format!("lock slot registry {}", self.path.display()), e)),
            }
        }
    }

    /// `n` u64 words at `offset`; bytes past the end of the file read as 0
    /// (a truncated registry is an empty one, not a fault).
    fn read_words(&self, offset: usize, n: usize) -> Vec<u64> {
        let mut buf = vec![0u8; n * 8];
        let mut got = 0;
        while got < buf.len() {
            match self.file.read_at(&mut buf[got..], (offset + got) as u64) {
                Ok(0) | Err(_) => break,
                Ok(k) => got += k,
            }
        }
        buf.chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect()
    }

    fn write_words(&self, offset: usize, words: &[u64]) -> Result<()> {
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        self.file
            .write_all_at(&bytes, offset as u64)
            .map_err(|e| Error::io(format!("write slot registry {}", self.path.display()), e))
    }

    fn init_header(&self, cfg: &SpaceConfig) -> Result<()> {
        let _lock = self.lock()?;
        let want = [REGISTRY_MAGIC, REGISTRY_VERSION, cfg.base, cfg.slot_size, cfg.slots];
        let h = self.read_words(0, 5);
        if h[0] == 0 {
            // A new (or truncated) registry: entries past the end read as free.
            return self.write_words(0, &want);
        }
        if h[0] != REGISTRY_MAGIC {
            return Err(self.mismatch("no rpal magic (a foreign or corrupt file)"));
        }
        if h[1..] != want[1..] && self.all_stale() {
            // Left by processes that are all gone (an older build, other
            // window settings): start afresh.
            let mut fresh = want.to_vec();
            fresh.resize(5 + self.slots * 2, 0);
            return self.write_words(0, &fresh);
        }
        for (i, name) in ["magic", "version", "base", "slot_size", "slots"]
            .iter()
            .enumerate()
            .skip(1)
        {
            if h[i] != want[i] {
                return Err(self.mismatch(&format!("{name} is {:#x}, this process wants {:#x}", h[i], want[i])));
            }
        }
        Ok(())
    }

    /// Whether no live process holds a slot (read under the lock).
    fn all_stale(&self) -> bool {
        let words = self.read_words(HEADER, self.slots * 2);
        words
            .chunks_exact(2)
            .all(|e| owner_pid(e[0]) == 0 || Self::is_stale(owner_pid(e[0]), e[1]))
    }

    fn mismatch(&self, detail: &str) -> Error {
        Error::RegistryMismatch {
            path: self.path.clone(),
            detail: detail.to_owned(),
        }
    }

    /// Whether the recorded owner is gone (pid dead, or reused: the process
    /// under that pid started at another time than recorded). An entry
    /// without a start time cannot be told from garbage: it is stale.
    fn is_stale(pid: i32, start: u64) -> bool {
        pid <= 0 || start == 0 || !sys::pid_exists(pid) || sys::proc_start_time(pid) != Some(start)
    }

    /// Claims a slot for this process and returns its index: a free one if
    /// any, else one whose owner is gone. Free slots come first so that a
    /// dead process's slot is reused as late as possible, giving its peers
    /// time to notice the death and unmap its region.
    pub(super) fn claim(&self) -> Result<usize> {
        let me = sys::getpid();
        let my_start = sys::proc_start_time(me).unwrap_or(1);
        let _lock = self.lock()?;
        let words = self.read_words(HEADER, self.slots * 2);
        let entry = |i: usize| (words[2 * i], words[2 * i + 1]);
        let free = (0..self.slots).find(|&i| owner_pid(entry(i).0) == 0);
        let pick = free.or_else(|| {
            (0..self.slots).find(|&i| {
                let (word, start) = entry(i);
                Self::is_stale(owner_pid(word), start)
            })
        });
        let Some(i) = pick else {
            let mut holders: Vec<i32> = (0..self.slots).map(|i| owner_pid(entry(i).0)).collect();
            holders.sort_unstable();
            holders.dedup();
            return Err(Error::NoFreeSlot {
                slots: self.slots,
                registry: self.path.clone(),
                holders,
            });
        };
        let new = pack(generation(entry(i).0).wrapping_add(1), me);
        self.write_words(HEADER + i * ENTRY, &[new, my_start])?;
        Ok(i)
    }

    /// Frees a slot this process owns.
    pub(super) fn release(&self, slot: usize) {
        let Ok(_lock) = self.lock() else { return };
        let [word, _] = self.read_words(HEADER + slot * ENTRY, 2)[..] else {
            return;
        };
        if owner_pid(word) == sys::getpid() {
            let _ = self.write_words(HEADER + slot * ENTRY, &[pack(generation(word), 0), 0]);
        }
    }

    /// Frees `slot` if its entry still records `owner` (same claim
    /// generation, pid and start time) and that process is gone. Anyone may
    /// do this: a stale entry is free to every claimer anyway, and a live
    /// owner's entry, or a newer claim of the slot, is left alone.
    pub(super) fn forget_dead(&self, slot: usize, owner: SlotOwner) {
        if slot >= self.slots {
            return;
        }
        let Ok(_lock) = self.lock() else { return };
        let at = HEADER + slot * ENTRY;
        let [word, start] = self.read_words(at, 2)[..] else {
            return;
        };
        let same = word == pack(owner.generation, owner.pid) && start == owner.start_time;
        // A zombie counts as gone here (it holds its pid, not its memory):
        // a peer killed outright is noticed before its parent reaps it.
        let gone = !sys::pid_alive(owner.pid) || sys::proc_start_time(owner.pid) != Some(start);
        if same && (gone || Self::is_stale(owner.pid, start)) {
            let _ = self.write_words(at, &[pack(owner.generation, 0), 0]);
        }
    }

    /// Who the registry says owns `slot` (not checked for staleness: the
    /// handshake compares it with the peer's kernel-given pid). Read without
    /// the lock, so a process holding it cannot stall handshakes: an entry
    /// is one 16-byte write, and two reads that agree are taken as it.
    pub(super) fn owner(&self, slot: usize) -> Option<SlotOwner> {
        if slot >= self.slots {
            return None;
        }
        let at = HEADER + slot * ENTRY;
        let mut last = self.read_words(at, 2);
        for _ in 0..8 {
            let again = self.read_words(at, 2);
            if again == last {
                break;
            }
            last = again;
        }
        let (word, start) = (last[0], last[1]);
        (owner_pid(word) != 0).then(|| SlotOwner {
            pid: owner_pid(word),
            start_time: start,
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
        // A live process with its real start time is not stale; a wrong
        // start time is (pid reuse), and so is none at all (garbage).
        let me = sys::getpid();
        let start = sys::proc_start_time(me).unwrap();
        assert!(!Registry::is_stale(me, start));
        assert!(Registry::is_stale(me, start + 1));
        assert!(Registry::is_stale(me, 0));
        assert!(Registry::is_stale(i32::MAX, start));
        assert!(Registry::is_stale(-1, start));
    }

    /// A registry truncated under us, or filled with garbage, is read as
    /// free or stale entries: claims still work, nothing faults.
    #[test]
    fn a_truncated_or_scribbled_registry_is_survived() {
        let dir = std::env::temp_dir().join(format!("rpal-reg-test-{}", std::process::id()));
        let cfg = SpaceConfig {
            registry: dir.clone(),
            ..SpaceConfig::default()
        };
        let reg = Registry::open(&cfg).unwrap();
        let a = reg.claim().unwrap();
        assert_eq!(reg.owner(a).map(|o| o.pid), Some(sys::getpid()));
        // Truncated to nothing: the header is rewritten, every slot free.
        reg.file.set_len(0).unwrap();
        assert_eq!(reg.owner(a), None);
        let reg2 = Registry::open(&cfg).unwrap();
        let b = reg2.claim().unwrap();
        assert_eq!(reg2.owner(b).map(|o| o.pid), Some(sys::getpid()));
        // Every entry garbage (live pid 1 with no valid start time): stale.
        let mut junk = Vec::new();
        for _ in 0..cfg.slots {
            junk.extend([pack(3, 1), 0]);
        }
        reg2.write_words(HEADER, &junk).unwrap();
        assert!(reg2.claim().is_ok(), "garbage entries count as stale");
        let _ = std::fs::remove_file(&dir);
    }
}
