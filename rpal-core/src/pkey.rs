//! Memory protection keys: catch stray accesses to peer memory.
//!
//! Each peer region mapped here is tagged with a key whose access is denied
//! in PKRU, except inside an [`AccessGuard`] (the runtime holds one while it
//! serves that peer). A stale borrow used after a call then faults at once
//! with `SEGV_PKUERR`, and the fault reporter names the region and peer.
//! Keys are a bug-catcher, not a security boundary: `WRPKRU` is unprivileged.
//! Read-only mappings, seals and pointer validation are the hard isolation.

use std::io;
use std::marker::PhantomData;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU8, AtomicU64, Ordering};

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
    /// Turned off by [`set_enabled`] or `RPAL_PKEYS=off`.
    Disabled,
    /// The CPU or kernel cannot do it; the reason says which.
    Unsupported(String),
}

static SWITCH: AtomicU8 = AtomicU8::new(0); // 0: unset, 1: on, 2: off
static STATUS: OnceLock<PkeyStatus> = OnceLock::new();

/// Turns protection keys on or off for this process. Only the first call
/// before the first use of keys counts; returns whether this call decided.
pub fn set_enabled(on: bool) -> bool {
    SWITCH
        .compare_exchange(0, if on { 1 } else { 2 }, Ordering::Relaxed, Ordering::Relaxed)
        .is_ok()
        && STATUS.get().is_none()
}

/// Probes once and reports whether keys are active.
pub fn status() -> &'static PkeyStatus {
    STATUS.get_or_init(probe)
}

/// Shorthand for `status() == Active`.
pub fn is_active() -> bool {
    *status() == PkeyStatus::Active
}

fn probe() -> PkeyStatus {
    let env_off = std::env::var("RPAL_PKEYS").is_ok_and(|v| matches!(v.as_str(), "0" | "off" | "false" | "no"));
    if SWITCH.load(Ordering::Relaxed) == 2 || (SWITCH.load(Ordering::Relaxed) == 0 && env_off) {
        return PkeyStatus::Disabled;
    }
    if !raw::cpu_supports() {
        return PkeyStatus::Unsupported("the CPU lacks PKU or the OS did not enable it (no pku/ospke flag)".into());
    }
    match raw::alloc(0) {
        Ok(k) => {
            let _ = raw::free(k);
            install_fault_reporter();
            PkeyStatus::Active
        }
        Err(e) => PkeyStatus::Unsupported(format!("pkey_alloc failed: {e}")),
    }
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
        let group = *GROUP_KEY.get_or_init(|| raw::alloc(DISABLE_ACCESS).ok());
        match raw::alloc(DISABLE_ACCESS) {
            Ok(key) => Ok(Pkey { key, shared: false }),
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => match group {
                Some(key) => Ok(Pkey { key, shared: true }),
                None => Err(e),
            },
            Err(e) => Err(e),
        }
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

    /// Allows this thread to read memory of this key until the guard drops.
    pub fn allow(&self) -> AccessGuard {
        let prev = raw::read_pkru();
        let next = prev & !(DISABLE_ACCESS << (2 * self.key));
        if next != prev {
            // SAFETY: PKU is supported (a Pkey exists); granting access cannot fault.
            unsafe { raw::write_pkru(next) };
        }
        AccessGuard {
            prev,
            _thread: PhantomData,
        }
    }

    /// Denies this thread access to memory of this key. Runtime threads call
    /// this for themselves, since PKRU is per thread.
    pub fn deny_in_this_thread(&self) {
        let prev = raw::read_pkru();
        // SAFETY: PKU is supported; any later access faults, which is the intent.
        unsafe { raw::write_pkru(prev | (DISABLE_ACCESS << (2 * self.key))) };
    }
}

impl Drop for Pkey {
    fn drop(&mut self) {
        if !self.shared {
            let _ = raw::free(self.key);
        }
    }
}

/// Access to one key, granted for this thread, restored on drop.
#[must_use = "access ends when the guard drops"]
pub struct AccessGuard {
    prev: u32,
    // PKRU is per thread: the guard must drop on the thread that made it.
    _thread: PhantomData<*const ()>,
}

impl Drop for AccessGuard {
    fn drop(&mut self) {
        // SAFETY: restores the PKRU value this thread had when the guard was made.
        unsafe { raw::write_pkru(self.prev) };
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
static PREV_ACTION: OnceLock<libc::sigaction> = OnceLock::new();
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

fn install_fault_reporter() {
    if INSTALLED.swap(true, Ordering::AcqRel) {
        return;
    }
    // SAFETY: sigaction is plain data; zeroed is a valid empty action.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = on_segv as *const () as usize;
    act.sa_flags = libc::SA_SIGINFO;
    // SAFETY: sigaction is plain data.
    let mut prev: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: both structs are live; the handler is async-signal-safe (atomics and write(2) only).
    if unsafe { libc::sigaction(libc::SIGSEGV, &act, &mut prev) } == 0 {
        let _ = PREV_ACTION.set(prev);
    }
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

fn put_str(buf: &mut [u8], at: &mut usize, s: &[u8]) {
    buf[*at..*at + s.len()].copy_from_slice(s);
    *at += s.len();
}

extern "C" fn on_segv(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as u64) };
    if code == SEGV_PKUERR {
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
                put_hex(&mut buf, &mut at, e.pid.load(Ordering::Acquire) as u64);
                put_str(&mut buf, &mut at, b" touched outside an access guard");
                break;
            }
        }
        put_str(&mut buf, &mut at, b"\n");
        // SAFETY: write(2) is async-signal-safe; `buf[..at]` is initialised.
        unsafe { libc::write(2, buf.as_ptr().cast(), at) };
    }
    // Restore the previous disposition; returning re-runs the faulting
    // instruction, which then faults under it (by default: killed by SIGSEGV).
    let prev = PREV_ACTION
        .get()
        .map_or(std::ptr::null(), |p| p as *const libc::sigaction);
    let dfl = {
        // SAFETY: sigaction is plain data.
        let mut d: libc::sigaction = unsafe { std::mem::zeroed() };
        d.sa_sigaction = libc::SIG_DFL;
        d
    };
    let act = if prev.is_null() {
        &dfl as *const libc::sigaction
    } else {
        prev
    };
    // SAFETY: sigaction is async-signal-safe and `act` points to a live struct.
    unsafe { libc::sigaction(libc::SIGSEGV, act, std::ptr::null_mut()) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_is_reported() {
        // Whatever the machine, the probe gives an answer with a reason.
        match status() {
            PkeyStatus::Active | PkeyStatus::Disabled => {}
            PkeyStatus::Unsupported(reason) => assert!(!reason.is_empty()),
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
