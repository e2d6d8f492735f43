//! Raw system calls, each behind a safe function.
//!
//! Every `libc` call of rpal-core lives here, so the rest of the crate reads
//! as safe code plus a few documented pointer casts.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::AtomicU32;
use std::time::Duration;

/// The machine's page size.
pub fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 { n as usize } else { 4096 }
}

fn check_map(addr: usize, len: usize, got: *mut libc::c_void) -> io::Result<()> {
    if got == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    if got as usize != addr {
        // Kernels before 4.17 treat MAP_FIXED_NOREPLACE as a hint; undo and refuse.
        // SAFETY: `got` is a fresh mapping the kernel just made for us and nobody else knows of.
        unsafe { libc::munmap(got, len) };
        return Err(io::Error::from_raw_os_error(libc::EEXIST));
    }
    Ok(())
}

/// Anonymous, uncommitted pages with protection `prot` at exactly `addr`;
/// `replace` allows replacing what is mapped there.
///
/// # Safety
/// With `replace`, the range must be address space this process reserved
/// for rpal, and the caller accepts that references into it see the new
/// contents (none must be used if `prot` removes read access).
unsafe fn map_anon(addr: usize, len: usize, prot: i32, replace: bool) -> io::Result<()> {
    let fixed = if replace {
        libc::MAP_FIXED
    } else {
        libc::MAP_FIXED_NOREPLACE
    };
    // SAFETY: forwarded to the caller; without `replace` nothing existing changes.
    let got = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | fixed,
            -1,
            0,
        )
    };
    check_map(addr, len, got)
}

/// Reserves `[addr, addr+len)` as inaccessible, uncommitted address space.
/// Fails with `EEXIST` if anything is mapped there already.
pub fn reserve(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping, so no
    // memory that Rust code refers to can be affected.
    unsafe { map_anon(addr, len, libc::PROT_NONE, false) }
}

/// Maps `fd` (offset 0, `len` bytes) shared at exactly `addr`, replacing what
/// is there.
///
/// # Safety
/// `[addr, addr+len)` must be address space this process reserved for rpal and
/// that no live Rust reference points into.
pub unsafe fn map_shared_fixed(addr: usize, len: usize, fd: BorrowedFd<'_>, writable: bool) -> io::Result<()> {
    let prot = if writable {
        libc::PROT_READ | libc::PROT_WRITE
    } else {
        libc::PROT_READ
    };
    // SAFETY: the caller guarantees the range is ours to replace.
    let got = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len,
            prot,
            libc::MAP_SHARED | libc::MAP_FIXED,
            fd.as_raw_fd(),
            0,
        )
    };
    check_map(addr, len, got)
}

/// Puts a reservation back over `[addr, addr+len)`, dropping whatever was mapped.
///
/// # Safety
/// No live Rust reference may point into the range.
pub unsafe fn unmap_to_reserved(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: the caller guarantees nothing refers to the range.
    unsafe { map_anon(addr, len, libc::PROT_NONE, true) }
}

/// Maps readable zero pages at `[addr, addr+len)`, replacing what is there:
/// a released or taken-over peer range, which stale readers may still touch.
///
/// # Safety
/// The range must be page-aligned, inside the rpal window, and hold only a
/// peer's read-only mapping (or the reservation): nothing of ours that Rust
/// code writes to or expects to keep its contents.
pub unsafe fn map_zero_readonly(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: per the caller's obligations every address that was readable
    // stays readable, and readers of peer memory already expect its contents
    // to change under them.
    unsafe { map_anon(addr, len, libc::PROT_READ, true) }
}

/// Maps a whole file shared read-write somewhere the kernel chooses.
pub fn map_file(fd: BorrowedFd<'_>, len: usize) -> io::Result<*mut u8> {
    // SAFETY: a fresh mapping at a kernel-chosen address affects no existing memory.
    let got = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    if got == libc::MAP_FAILED {
        Err(io::Error::last_os_error())
    } else {
        Ok(got.cast())
    }
}

/// Gives the pages of `[addr, addr+len)` of a shared memfd mapping back to
/// the kernel (`MADV_REMOVE`); they read as zeros afterwards.
///
/// # Safety
/// The range must be page-aligned pages of a shared mapping whose contents
/// nothing needs: no live reference points into it, and no peer is owed its
/// bytes (free arena blocks).
pub unsafe fn discard(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: forwarded to the caller; the mapping itself stays valid.
    if unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_REMOVE) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Result of a futex wait.
#[derive(Debug, PartialEq, Eq)]
pub enum FutexWait {
    /// Woken by a wake call (or spuriously).
    Woken,
    /// The word no longer held the expected value.
    Changed,
    /// The timeout passed.
    TimedOut,
}

/// `FUTEX_WAIT` on a shared (not process-private) word, so it works across
/// processes and through read-only mappings.
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) -> FutexWait {
    let ts = timeout.map(|d| libc::timespec {
        tv_sec: d.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: d.subsec_nanos() as libc::c_long,
    });
    let tsp = ts.as_ref().map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `word` is a valid, aligned u32 for the duration of the call; the
    // kernel only reads it. `tsp` is null or points to a live timespec.
    let r = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            tsp,
            0usize,
            0u32,
        )
    };
    if r == 0 {
        return FutexWait::Woken;
    }
    match io::Error::last_os_error().raw_os_error() {
        Some(libc::EAGAIN) => FutexWait::Changed,
        Some(libc::ETIMEDOUT) => FutexWait::TimedOut,
        _ => FutexWait::Woken, // EINTR and friends: the caller re-checks the word.
    }
}

/// `FUTEX_WAKE` (shared) of up to `n` waiters on `word`. Returns how many woke.
pub fn futex_wake(word: &AtomicU32, n: i32) -> usize {
    // SAFETY: `word` is a valid, aligned u32; FUTEX_WAKE does not touch its value.
    let r = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            n,
            0usize,
            0usize,
            0u32,
        )
    };
    r.max(0) as usize
}

/// `pidfd_open(2)`: a descriptor that becomes readable when `pid` exits.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with integer arguments.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

/// `SO_PEERPIDFD` (Linux 6.5): a pidfd of the very process at the other
/// end of a Unix socket, with no window for its pid to be reused.
/// `ENOPROTOOPT` on older kernels (callers fall back to [`pidfd_open`]).
pub fn peer_pidfd(sock: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    const SO_PEERPIDFD: libc::c_int = 77;
    let mut fd: libc::c_int = -1;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `fd` and `len` are valid for writes of the sizes given.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&raw mut fd).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    if fd < 0 {
        return Err(io::Error::from_raw_os_error(libc::ESRCH));
    }
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Indices of the `fds` that are readable, hung up or in error, without
/// blocking: one `poll` for all of them.
pub fn poll_readable(fds: &[BorrowedFd<'_>]) -> io::Result<Vec<usize>> {
    poll_within(fds, 0)
}

/// As [`poll_readable`], waiting until one is (no timeout).
pub fn poll_readable_blocking(fds: &[BorrowedFd<'_>]) -> io::Result<Vec<usize>> {
    poll_within(fds, -1)
}

/// `poll(2)` for readability with a timeout in ms (-1: none).
fn poll_within(fds: &[BorrowedFd<'_>], timeout_ms: libc::c_int) -> io::Result<Vec<usize>> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|f| libc::pollfd {
            fd: f.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `p` is a live array of `p.len()` pollfd structs.
    let r = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, timeout_ms) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(p.iter()
        .enumerate()
        .filter(|(_, p)| p.revents != 0)
        .map(|(i, _)| i)
        .collect())
}

/// Whether any of `fds` is readable or hung up, without blocking.
pub fn poll_ready(fds: &[BorrowedFd<'_>]) -> io::Result<bool> {
    poll_readable(fds).map(|ready| !ready.is_empty())
}

/// Waits up to `timeout` for `fd` to become readable.
pub fn poll_wait(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: `p` is one live pollfd.
    let r = unsafe { libc::poll(&mut p, 1, ms) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r > 0)
    }
}

/// A non-blocking, close-on-exec eventfd.
pub fn eventfd_nonblocking() -> io::Result<OwnedFd> {
    // SAFETY: plain system call.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds 1 to an eventfd's counter (wakes its poller). Best effort: a full
/// counter is readable already.
pub fn eventfd_signal(fd: BorrowedFd<'_>) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: `one` is a live 8-byte buffer, the size an eventfd write wants.
    unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), 8) };
}

/// Reads (and so resets) an eventfd's counter; does nothing if it is zero.
pub fn drain_eventfd(fd: BorrowedFd<'_>) {
    let mut buf = [0u8; 8];
    // SAFETY: `buf` is a live 8-byte buffer, the size an eventfd read wants.
    unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
}

/// `shutdown(fd, SHUT_RDWR)`: wakes threads blocked on the socket. Best effort.
pub fn shutdown_socket(fd: BorrowedFd<'_>) {
    // SAFETY: shutdown(2) on a descriptor we borrow; no memory involved.
    unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) };
}

/// `futex_waitv(2)` over `words` (address, expected value), with an optional
/// relative timeout. Returns the index of a woken word, or the error
/// (`EAGAIN`: a value differed; `ETIMEDOUT`; `ENOSYS` before Linux 5.16).
pub fn futex_waitv(words: &[(&AtomicU32, u32)], timeout: Option<Duration>) -> io::Result<usize> {
    #[repr(C)]
    struct Waiter {
        val: u64,
        uaddr: u64,
        flags: u32,
        reserved: u32,
    }
    const FUTEX2_SIZE_U32: u32 = 2;
    let waiters: Vec<Waiter> = words
        .iter()
        .map(|(w, v)| Waiter {
            val: *v as u64,
            uaddr: w.as_ptr() as u64,
            flags: FUTEX2_SIZE_U32,
            reserved: 0,
        })
        .collect();
    // futex_waitv takes an absolute CLOCK_MONOTONIC deadline.
    let deadline = timeout.map(|d| {
        // SAFETY: timespec is plain data.
        let mut now: libc::timespec = unsafe { std::mem::zeroed() };
        // SAFETY: `now` is a live timespec.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
        let ns = now.tv_nsec as u64 + d.subsec_nanos() as u64;
        libc::timespec {
            tv_sec: now.tv_sec + d.as_secs() as libc::time_t + (ns / 1_000_000_000) as libc::time_t,
            tv_nsec: (ns % 1_000_000_000) as libc::c_long,
        }
    });
    let tsp = deadline
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `waiters` is a live array of `len` futex_waitv structs pointing
    // at live words; `tsp` is null or a live timespec.
    let r = unsafe {
        libc::syscall(
            libc::SYS_futex_waitv,
            waiters.as_ptr(),
            waiters.len() as u32,
            0u32,
            tsp,
            libc::CLOCK_MONOTONIC,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// Whether a process with this pid exists (it may be a zombie).
pub fn pid_exists(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks for existence and permission.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Whether `pid` is a running process (not gone, not a zombie).
pub fn pid_alive(pid: i32) -> bool {
    if !pid_exists(pid) {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the first field after the command name's closing ')'.
        Ok(stat) => {
            stat.rfind(')')
                .and_then(|i| stat[i + 1..].split_ascii_whitespace().next())
                != Some("Z")
        }
        Err(_) => false,
    }
}

/// A process's start time in clock ticks since boot (field 22 of
/// `/proc/<pid>/stat`), which tells a pid's reuse apart from its first owner.
pub fn proc_start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parens: skip past the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    // Fields after the name start at field 3; starttime is field 22.
    rest.split_ascii_whitespace().nth(22 - 3)?.parse().ok()
}

/// Current process id.
pub fn getpid() -> i32 {
    std::process::id() as i32
}

/// Current user id.
pub fn getuid() -> u32 {
    // SAFETY: getuid cannot fail.
    unsafe { libc::getuid() }
}

/// Pins the calling thread to one CPU.
pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes inside `set`; `cpu` is bounded by the caller's CPU count.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a live cpu_set_t of the size we pass.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Number of CPUs online (not limited by this thread's affinity, which a
/// pinned parent passes on to its children).
pub fn cpus_online() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if n > 0 { n as usize } else { 1 }
}

pub mod epoll {
    //! epoll(7), for the poller's fallback backend.

    use std::io;
    use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
    use std::time::Duration;

    /// A new close-on-exec epoll instance.
    pub fn create() -> io::Result<OwnedFd> {
        // SAFETY: plain system call.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Watches `fd` for readability, reporting `data` when it is.
    pub fn add(ep: BorrowedFd<'_>, fd: BorrowedFd<'_>, data: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: data,
        };
        // SAFETY: `ev` is a live epoll_event; both descriptors are borrowed, so open.
        if unsafe { libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, fd.as_raw_fd(), &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits up to `timeout` (whole milliseconds, at least 1) and returns
    /// the `data` of up to `max` ready descriptors; empty on timeout or a
    /// signal.
    pub fn wait(ep: BorrowedFd<'_>, max: usize, timeout: Duration) -> io::Result<Vec<u64>> {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; max.max(1)];
        let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: `events` is a live buffer of `len` entries.
        let n = unsafe { libc::epoll_wait(ep.as_raw_fd(), events.as_mut_ptr(), events.len() as i32, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::EINTR) {
                Ok(Vec::new())
            } else {
                Err(e)
            };
        }
        Ok(events[..n as usize].iter().map(|e| e.u64).collect())
    }
}

pub mod segv {
    //! A SIGSEGV hook that explains a fault, then lets it kill as before.

    use std::io;
    use std::sync::OnceLock;

    static PREV: OnceLock<libc::sigaction> = OnceLock::new();
    static REPORT: OnceLock<fn(i32, u64)> = OnceLock::new();

    /// Installs a SIGSEGV handler that calls `report(si_code, si_addr)`,
    /// then restores the previous disposition, so the faulting instruction
    /// re-runs under it (by default: the process dies of SIGSEGV). `report`
    /// runs in a signal handler: it must be async-signal-safe. Once per process.
    pub fn install(report: fn(i32, u64)) -> io::Result<()> {
        if REPORT.set(report).is_err() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "a SIGSEGV reporter is installed already",
            ));
        }
        // SAFETY: sigaction is plain data; zeroed is a valid empty action.
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        act.sa_sigaction = on_segv as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO;
        // SAFETY: sigaction is plain data.
        let mut prev: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: both structs are live; the handler is async-signal-safe
        // (atomics, `report`, write(2) and sigaction only).
        if unsafe { libc::sigaction(libc::SIGSEGV, &act, &mut prev) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // Ignored on purpose: REPORT's `set` above made this the only call.
        let _ = PREV.set(prev);
        Ok(())
    }

    /// Writes `bytes` to stderr with one write(2): async-signal-safe.
    pub fn write_stderr(bytes: &[u8]) {
        // SAFETY: `bytes` is a live buffer of its length.
        // Ignored on purpose: nothing can be done about a failed report.
        let _ = unsafe { libc::write(2, bytes.as_ptr().cast(), bytes.len()) };
    }

    extern "C" fn on_segv(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
        // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
        let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as u64) };
        if let Some(report) = REPORT.get() {
            report(code, addr);
        }
        // SAFETY: sigaction is plain data.
        let mut dfl: libc::sigaction = unsafe { std::mem::zeroed() };
        dfl.sa_sigaction = libc::SIG_DFL;
        let act: *const libc::sigaction = PREV.get().map_or(&dfl, |p| p);
        // SAFETY: sigaction is async-signal-safe and `act` points to a live
        // struct. Ignored on purpose: if it fails the fault repeats into this
        // handler, which is no worse than the fault itself.
        let _ = unsafe { libc::sigaction(libc::SIGSEGV, act, std::ptr::null_mut()) };
    }
}

pub mod pkey {
    //! Memory protection key system calls and the PKRU register.

    use std::io;

    /// Whether the CPU has PKU and the OS enabled it (CPUID.7.0:ECX bits 3 and 4).
    pub fn cpu_supports() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            // CPUID is available on every x86_64 CPU.
            let max = std::arch::x86_64::__cpuid(0).eax;
            if max < 7 {
                return false;
            }
            // Leaf 7 exists (checked above).
            let ecx = std::arch::x86_64::__cpuid_count(7, 0).ecx;
            ecx & (1 << 3) != 0 && ecx & (1 << 4) != 0
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// `pkey_alloc(2)`.
    pub fn alloc(init_rights: u32) -> io::Result<i32> {
        // SAFETY: integer-only syscall.
        let r = unsafe { libc::syscall(libc::SYS_pkey_alloc, 0u32, init_rights) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as i32)
        }
    }

    /// `pkey_free(2)`.
    pub fn free(key: i32) -> io::Result<()> {
        // SAFETY: integer-only syscall.
        let r = unsafe { libc::syscall(libc::SYS_pkey_free, key) };
        if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }

    /// `pkey_mprotect(2)`.
    ///
    /// # Safety
    /// Changing protections must not invalidate memory that live Rust
    /// references write to (it may only make faults precise, not hide data).
    pub unsafe fn mprotect(addr: usize, len: usize, prot: i32, key: i32) -> io::Result<()> {
        // SAFETY: the caller upholds the contract above.
        let r = unsafe { libc::syscall(libc::SYS_pkey_mprotect, addr, len, prot, key) };
        if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }

    /// Reads PKRU. Only call when [`cpu_supports`] is true.
    #[cfg(target_arch = "x86_64")]
    pub fn read_pkru() -> u32 {
        let eax: u32;
        // SAFETY: RDPKRU needs ECX = 0 and only writes EAX/EDX; PKU support is
        // checked by every caller through `cpu_supports`.
        unsafe {
            std::arch::asm!("rdpkru", in("ecx") 0u32, out("eax") eax, out("edx") _, options(nomem, nostack, preserves_flags));
        }
        eax
    }

    /// Writes PKRU.
    ///
    /// # Safety
    /// PKU must be supported, and denying access to memory that the thread
    /// is about to use makes those accesses fault (that is the point).
    #[cfg(target_arch = "x86_64")]
    pub unsafe fn write_pkru(value: u32) {
        // SAFETY: WRPKRU needs ECX = EDX = 0; the caller checked PKU support.
        unsafe {
            std::arch::asm!("wrpkru", in("eax") value, in("ecx") 0u32, in("edx") 0u32, options(nostack, preserves_flags));
        }
    }

    /// Stub for other architectures: no PKRU.
    #[cfg(not(target_arch = "x86_64"))]
    pub fn read_pkru() -> u32 {
        0
    }

    /// Stub for other architectures: no PKRU.
    ///
    /// # Safety
    /// None; it does nothing.
    #[cfg(not(target_arch = "x86_64"))]
    pub unsafe fn write_pkru(_value: u32) {}
}
