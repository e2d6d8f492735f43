//! Memory protection keys: catch stray accesses to peer memory.
//!
//! Each peer region mapped here is tagged with a key whose access PKRU
//! denies, so a stale borrow of peer memory used after a call, or a handler
//! that reads another client's memory, faults at once with `SEGV_PKUERR`,
//! and the fault reporter names the region and the peer. Keys are a
//! bug-catcher, not a security boundary: `WRPKRU` is unprivileged.
//! Read-only mappings, seals and pointer validation are the hard isolation.
//!
//! # The rule: who may read peer memory, and when
//!
//! Reading a peer's memory takes an [`Access`], a grant of this thread's
//! PKRU that ends when it drops. Every function that reads peer memory
//! (queue words and records, sequence and parked flags, cursors, release
//! rings, argument and result views, pointer walks) takes a
//! [`PeerMem`](crate::types::PeerMem), which only
//! [`PeerRegion::mem`](crate::region::PeerRegion::mem) makes, from a region
//! and a live `Access`; the references it hands out cannot outlive either.
//! That is what makes the wrong thing hard to write: code without an
//! `Access` in scope has no way to name peer memory.
//!
//! Who holds which grant:
//!
//! | code | grant | PKRU writes |
//! |---|---|---|
//! | a blocking call (stub or raw client), on the caller's thread | [`PeerRegion::access`](crate::region::PeerRegion::access) from send to reply, spin and park included | 2 per call |
//! | a poller between handlers (looking at queues, parking on their words) | [`Access::all`]: every key rpal allocated | 0 per call (1 when a new key appears) |
//! | a sync handler and the reads around it | [`PeerRegion::access_only`](crate::region::PeerRegion::access_only): its caller's key alone | 2 per batch, 0 if the process has one peer key |
//! | an async handler's future | its caller's key, for each poll | 2 per poll |
//! | an async call (stub or `AsyncClient`), on the polling thread | the server's key, for each poll, never across an `.await` | 2 per poll |
//! | user code holding a `Returned` | nothing until `Returned::read` (in `rpal::rpc`), whose guard grants the key for its scope | 2 per read |
//!
//! Why guards around protocol steps rather than untagged control pages: a
//! queue's records and their sequence words live in blocks from the same
//! allocator as payload, so an untagged control page would still leave the
//! record reads to guard; and the grant is paid per call, not per read
//! (about 25-30 cycles per `WRPKRU` on current cores: under 0.05 us per
//! round trip with two writes on each side). A guard whose PKRU value
//! would not change writes nothing, so nested grants cost one `RDPKRU`.
//!
//! What user code may keep across calls: `Returned` handles (read them
//! through `read()`), and copies. A view (`&str`, `&[T]`, `&T` of peer
//! memory) lives only inside the handler call or `read()` scope that made
//! it; one smuggled out (through a raw pointer) faults on its next use.
//!
//! # Fail safe
//!
//! Where the CPU or kernel lacks keys, or `RPAL_PKEYS=off`, nothing is
//! tagged and every grant is a no-op. If a key cannot be had for one
//! region (none of the 15 free, `pkey_mprotect` refused), that region stays
//! untagged, rpal keeps working, and [`status`] reports it as
//! [`PkeyStatus::Degraded`].

use std::cell::Cell;
use std::io;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use crate::sys::pkey as raw;

/// `PKEY_DISABLE_ACCESS`.
const DISABLE_ACCESS: u32 = 1;
/// `si_code` of a protection-key fault (not exported by libc).
pub const SEGV_PKUERR: i32 = 4;

/// Whether protection keys are in use in this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PkeyStatus {
    /// Peer regions are tagged and guarded.
    Active,
    /// Keys are in use, but some peer regions could not be tagged and are
    /// read without a guard; the reason says why (the first failure).
    Degraded(String),
    /// Turned off by [`set_enabled`] or `RPAL_PKEYS=off`.
    Disabled,
    /// The CPU or kernel cannot do it; the reason says which.
    Unsupported(String),
}

static SWITCH: AtomicU8 = AtomicU8::new(0); // 0: unset, 1: on, 2: off
static PROBED: OnceLock<PkeyStatus> = OnceLock::new();
/// The first reason a region was left untagged, if any.
static DEGRADED: Mutex<Option<String>> = Mutex::new(None);
/// Access-disable bits of every key rpal has allocated in this process.
static RPAL_KEYS: AtomicU32 = AtomicU32::new(0);

/// Turns protection keys on or off for this process. Only the first call
/// before the first use of keys counts; returns whether this call decided.
pub fn set_enabled(on: bool) -> bool {
    SWITCH
        .compare_exchange(0, if on { 1 } else { 2 }, Ordering::Relaxed, Ordering::Relaxed)
        .is_ok()
        && PROBED.get().is_none()
}

/// Probes once and reports whether keys are active, and whether every
/// peer region got one.
pub fn status() -> PkeyStatus {
    match PROBED.get_or_init(probe) {
        PkeyStatus::Active => match &*DEGRADED.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(why) => PkeyStatus::Degraded(why.clone()),
            None => PkeyStatus::Active,
        },
        other => other.clone(),
    }
}

/// Whether keys are in use (active, or degraded for some regions).
#[inline]
pub fn is_active() -> bool {
    *PROBED.get_or_init(probe) == PkeyStatus::Active
}

/// Records that a region goes untagged, for [`status`].
pub(crate) fn degrade(why: String) {
    tracing::warn!(reason = %why, "peer region left without a protection key");
    DEGRADED.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(why);
}

fn probe() -> PkeyStatus {
    // A bad value is refused when the space is set up (`SpaceConfig::from_env`).
    let env_off = crate::settings::switch("RPAL_PKEYS").ok().flatten() == Some(false);
    if SWITCH.load(Ordering::Relaxed) == 2 || (SWITCH.load(Ordering::Relaxed) == 0 && env_off) {
        return PkeyStatus::Disabled;
    }
    if !raw::cpu_supports() {
        return PkeyStatus::Unsupported("the CPU lacks PKU or the OS did not enable it (no pku/ospke flag)".into());
    }
    match raw::alloc(0) {
        Ok(k) => {
            let _ = raw::free(k);
            match install_fault_reporter() {
                Ok(()) => PkeyStatus::Active,
                // Without the reporter a fault would still be caught, but
                // unexplained; run without keys rather than crash mutely.
                Err(e) => PkeyStatus::Unsupported(format!("could not install the SIGSEGV reporter: {e}")),
            }
        }
        Err(e) => PkeyStatus::Unsupported(format!("pkey_alloc failed: {e}")),
    }
}

/// The access-disable bit of `key` in PKRU.
const fn ad_bit(key: i32) -> u32 {
    DISABLE_ACCESS << (2 * key)
}

/// A protection key owned by this process.
#[derive(Debug)]
pub struct Pkey {
    key: i32,
    shared: bool,
}

/// The key that peers share once the 15 hardware keys run out.
static GROUP_KEY: OnceLock<Option<i32>> = OnceLock::new();

impl Pkey {
    /// Allocates a key whose access is denied in the calling thread (other
    /// threads deny new keys by default too). When the keys run out, returns
    /// a key shared by all overflow regions.
    pub fn alloc() -> io::Result<Pkey> {
        // Reserve the group key first, while keys are still free.
        // It joins RPAL_KEYS only once a region uses it: an unused key in the
        // mask would make every narrowing grant (`allow_only`) write PKRU.
        let group = *GROUP_KEY.get_or_init(|| raw::alloc(DISABLE_ACCESS).ok());
        let k = match raw::alloc(DISABLE_ACCESS) {
            Ok(key) => Pkey { key, shared: false },
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => match group {
                Some(key) => Pkey { key, shared: true },
                None => return Err(e),
            },
            Err(e) => return Err(e),
        };
        // AcqRel: a thread that sees the key in a region (through the
        // handshake's hand-off of the connection) sees it in the mask too.
        RPAL_KEYS.fetch_or(ad_bit(k.key), Ordering::AcqRel);
        Ok(k)
    }

    /// The key number.
    pub fn key(&self) -> i32 {
        self.key
    }

    /// Tags `[addr, addr+len)` with this key and protection `prot`.
    ///
    /// # Safety
    /// The range must be a mapping that no live Rust reference writes to if
    /// `prot` drops write access.
    pub unsafe fn protect(&self, addr: usize, len: usize, prot: i32) -> io::Result<()> {
        // SAFETY: forwarded to the caller.
        unsafe { raw::mprotect(addr, len, prot, self.key) }
    }

    /// Grants this thread access to memory of this key (on top of what it
    /// has) until the guard drops.
    pub fn allow(&self) -> Access {
        let bit = ad_bit(self.key);
        Access::change(|pkru| pkru & !bit)
    }

    /// Grants this thread access to memory of this key and denies it every
    /// other key rpal allocated, until the guard drops: what user code
    /// serving this peer runs under.
    pub fn allow_only(&self) -> Access {
        let bit = ad_bit(self.key);
        Access::change(|pkru| (pkru | RPAL_KEYS.load(Ordering::Acquire)) & !bit)
    }

    /// Whether this thread may read memory of this key now.
    pub fn allowed_here(&self) -> bool {
        raw::read_pkru() & ad_bit(self.key) == 0
    }

    /// Denies this thread access to memory of this key.
    pub fn deny_in_this_thread(&self) {
        let bit = ad_bit(self.key);
        let prev = raw::read_pkru();
        if prev & bit == 0 {
            // SAFETY: PKU is supported; any later access faults, which is the intent.
            unsafe { write_pkru(prev | bit) };
        }
    }
}

impl Drop for Pkey {
    fn drop(&mut self) {
        if !self.shared {
            RPAL_KEYS.fetch_and(!ad_bit(self.key), Ordering::AcqRel);
            let _ = raw::free(self.key);
        }
    }
}

thread_local! {
    /// PKRU writes made by this thread (a thread-local counter: no shared
    /// cache line on the hot path).
    static PKRU_WRITES: Cell<u64> = const { Cell::new(0) };
}

/// PKRU writes (`WRPKRU`) this thread has made: what access grants cost.
pub fn pkru_writes() -> u64 {
    PKRU_WRITES.with(Cell::get)
}

/// # Safety
/// As [`raw::write_pkru`].
unsafe fn write_pkru(value: u32) {
    PKRU_WRITES.with(|c| c.set(c.get() + 1));
    // SAFETY: forwarded to the caller.
    unsafe { raw::write_pkru(value) };
}

/// A grant of access to peer memory for this thread (protection keys),
/// taken back when it drops. It is the token that
/// [`PeerRegion::mem`](crate::region::PeerRegion::mem) needs, so peer memory
/// can only be named while one is alive. A no-op where keys are not active.
///
/// Guards must drop in the reverse order of their making on a thread (as
/// scopes do): each restores the PKRU value it found.
#[must_use = "access ends when the guard drops"]
pub struct Access {
    /// PKRU to restore on drop, if this guard changed it.
    restore: Option<u32>,
    // PKRU is per thread: the guard must drop on the thread that made it.
    _thread: PhantomData<*const ()>,
}

impl Access {
    /// A guard that changes nothing (keys off, an unguarded region, or data
    /// that is not in peer memory).
    #[inline]
    pub fn none() -> Access {
        Access {
            restore: None,
            _thread: PhantomData,
        }
    }

    /// Sets PKRU to `next(current)` (if keys are active), restoring it on drop.
    #[inline]
    fn change(next: impl FnOnce(u32) -> u32) -> Access {
        let prev = raw::read_pkru();
        let want = next(prev);
        if want == prev {
            return Access::none();
        }
        // SAFETY: a `Pkey` exists (or keys are active), so PKU is supported.
        // A grant cannot make a valid access fault; a denial makes later
        // accesses to those keys fault, which is its purpose.
        unsafe { write_pkru(want) };
        Access {
            restore: Some(prev),
            _thread: PhantomData,
        }
    }

    /// Access to every peer region rpal has mapped in this process: for the
    /// runtime's own threads while they run no user code (a poller looking
    /// at its queues and parking on their words). Keys allocated later are
    /// added by [`Access::refresh`].
    pub fn all() -> Access {
        if !is_active() {
            return Access::none();
        }
        Access::change(|pkru| pkru & !RPAL_KEYS.load(Ordering::Acquire))
    }

    /// Adds keys allocated since this grant was made (by handshakes on other
    /// threads): one `RDPKRU`, and a write only if a key is new.
    pub fn refresh(&mut self) {
        if !is_active() {
            return;
        }
        let now = raw::read_pkru();
        let want = now & !RPAL_KEYS.load(Ordering::Acquire);
        if want != now {
            // SAFETY: keys are active, so PKU is supported; this only grants.
            unsafe { write_pkru(want) };
            self.restore.get_or_insert(now);
        }
    }
}

impl Drop for Access {
    #[inline]
    fn drop(&mut self) {
        if let Some(prev) = self.restore {
            // SAFETY: restores the PKRU value this thread had when the guard
            // was made (keys are active: the guard changed PKRU).
            unsafe { write_pkru(prev) };
        }
    }
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("changed", &self.restore.is_some())
            .finish()
    }
}

// ---- fault reporter -------------------------------------------------------

struct FaultEntry {
    start: AtomicU64,
    len: AtomicU64,
    pid: AtomicI32,
    key: AtomicI32,
}

const FAULT_SLOTS: usize = 64;
#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: FaultEntry = FaultEntry {
    start: AtomicU64::new(0),
    len: AtomicU64::new(0),
    pid: AtomicI32::new(0),
    key: AtomicI32::new(0),
};
static FAULT_TABLE: [FaultEntry; FAULT_SLOTS] = [EMPTY; FAULT_SLOTS];
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// Records a guarded peer region so a fault in it can be explained.
pub(crate) fn register_region(start: u64, len: u64, pid: i32, key: i32) {
    for e in &FAULT_TABLE {
        // Claim a free entry with a CAS on `start`; the other fields are
        // written after, so the handler may briefly see a half entry and
        // report less detail, never touch bad memory.
        if e.start
            .compare_exchange(0, start, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            e.len.store(len, Ordering::Release);
            e.pid.store(pid, Ordering::Release);
            e.key.store(key, Ordering::Release);
            return;
        }
    }
}

/// Forgets a region recorded by [`register_region`].
pub(crate) fn unregister_region(start: u64) {
    for e in &FAULT_TABLE {
        if e.start.load(Ordering::Acquire) == start {
            e.len.store(0, Ordering::Release);
            e.start.store(0, Ordering::Release);
        }
    }
}

fn install_fault_reporter() -> io::Result<()> {
    if INSTALLED.swap(true, Ordering::AcqRel) {
        return Ok(());
    }
    crate::sys::segv::install(report_fault)
}

fn put_hex(buf: &mut [u8], at: &mut usize, v: u64) {
    let digits = b"0123456789abcdef";
    for b in b"0x" {
        buf[*at] = *b;
        *at += 1;
    }
    for i in (0..16).rev() {
        buf[*at] = digits[((v >> (i * 4)) & 0xf) as usize];
        *at += 1;
    }
}

fn put_dec(buf: &mut [u8], at: &mut usize, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut n = 0;
    loop {
        digits[n] = b'0' + (v % 10) as u8;
        n += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for i in (0..n).rev() {
        buf[*at] = digits[i];
        *at += 1;
    }
}

fn put_str(buf: &mut [u8], at: &mut usize, s: &[u8]) {
    buf[*at..*at + s.len()].copy_from_slice(s);
    *at += s.len();
}

/// Explains a SIGSEGV (called by `sys::segv`'s handler, which then
/// restores the previous disposition): for a protection-key fault, which
/// region and peer were touched. Async-signal-safe: atomics and one write.
fn report_fault(code: i32, addr: u64) {
    if code != SEGV_PKUERR {
        return;
    }
    let mut buf = [0u8; 200];
    let mut at = 0;
    put_str(&mut buf, &mut at, b"rpal: SEGV_PKUERR at ");
    put_hex(&mut buf, &mut at, addr);
    for e in &FAULT_TABLE {
        let start = e.start.load(Ordering::Acquire);
        let len = e.len.load(Ordering::Acquire);
        if start != 0 && addr >= start && addr - start < len {
            put_str(&mut buf, &mut at, b": peer region ");
            put_hex(&mut buf, &mut at, start);
            put_str(&mut buf, &mut at, b" of pid ");
            put_dec(&mut buf, &mut at, e.pid.load(Ordering::Acquire) as u32 as u64);
            put_str(&mut buf, &mut at, b" touched outside an access guard");
            break;
        }
    }
    put_str(&mut buf, &mut at, b"\n");
    crate::sys::segv::write_stderr(&buf[..at]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_is_reported() {
        // Whatever the machine, the probe gives an answer with a reason.
        match status() {
            PkeyStatus::Active | PkeyStatus::Disabled => {}
            PkeyStatus::Unsupported(reason) | PkeyStatus::Degraded(reason) => assert!(!reason.is_empty()),
        }
    }

    #[test]
    fn hex_formatting() {
        let mut b = [0u8; 20];
        let mut at = 0;
        put_hex(&mut b, &mut at, 0x5000_0000_1234);
        assert_eq!(&b[..at], b"0x0000500000001234");
    }
}
