//! The io_uring backend: one `FUTEX_WAITV` op per 128 words, a `POLL_ADD`
//! per descriptor and a timeout, submitted together; the first completion
//! ends the sleep and the rest are cancelled and reaped before returning, so
//! the kernel never holds a pointer into memory we reuse.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::AtomicU32;
use std::time::Duration;

use io_uring::{IoUring, opcode, types};

use super::Woken;

const FUTEX2_SIZE_U32: u32 = 2;
const WAITV_MAX: usize = 128;
const TAG_WAITV: u64 = 1 << 62;
const TAG_POLL: u64 = 2 << 62;
const TAG_TIMEOUT: u64 = 3 << 62;
const TAG_MASK: u64 = 3 << 62;

/// A ring and the buffers its operations point at.
pub struct Uring {
    ring: IoUring,
    entries: u32,
    /// `futex_waitv` entries; the kernel reads them until every op completes.
    futexv: Vec<types::FutexWaitV>,
    /// The timeout's timespec; read by the kernel until the op completes.
    ts: Box<types::Timespec>,
}

impl Uring {
    /// A ring, after probing that `FUTEX_WAITV`, `POLL_ADD` and `TIMEOUT`
    /// are supported (Linux 6.7+), and that io_uring is not disabled.
    pub fn new() -> io::Result<Self> {
        let ring = IoUring::new(64)?;
        let mut probe = io_uring::Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for (code, name) in [
            (opcode::FutexWaitV::CODE, "FUTEX_WAITV"),
            (opcode::PollAdd::CODE, "POLL_ADD"),
            (opcode::Timeout::CODE, "TIMEOUT"),
        ] {
            if !probe.is_supported(code) {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("io_uring lacks {name} (needs Linux 6.7)"),
                ));
            }
        }
        Ok(Self {
            ring,
            entries: 64,
            futexv: Vec::new(),
            ts: Box::new(types::Timespec::new()),
        })
    }

    pub(super) fn wait(
        &mut self,
        words: &[(&AtomicU32, u32)],
        fds: &[BorrowedFd<'_>],
        timeout: Duration,
    ) -> io::Result<Woken> {
        let chunks = words.len().div_ceil(WAITV_MAX);
        let ops = chunks + fds.len() + 1;
        if ops as u32 > self.entries {
            // The size is recorded only once the bigger ring exists: a failed
            // resize (out of descriptors or memory) is an error for this
            // sleep, and the old ring stays usable.
            let entries = (ops as u32).next_power_of_two();
            self.ring = IoUring::new(entries)?;
            self.entries = entries;
        }
        self.futexv.clear();
        self.futexv.extend(words.iter().map(|(w, v)| {
            types::FutexWaitV::new()
                .val(*v as u64)
                .uaddr(w.as_ptr() as u64)
                .flags(FUTEX2_SIZE_U32)
        }));
        *self.ts = types::Timespec::new()
            .sec(timeout.as_secs())
            .nsec(timeout.subsec_nanos());
        let mut pushed = 0;
        {
            let mut sq = self.ring.submission();
            let mut push = |e: io_uring::squeue::Entry| {
                // SAFETY: every buffer an entry points at (`futexv`, `ts`)
                // lives in `self` and is not touched until all ops complete
                // (we reap every completion below before returning). The ring
                // has room: it was sized for `ops` entries and is empty (if it
                // had none, the op is left out and counted out below).
                if unsafe { sq.push(&e) }.is_ok() {
                    pushed += 1;
                }
            };
            for (k, chunk) in self.futexv.chunks(WAITV_MAX).enumerate() {
                push(
                    opcode::FutexWaitV::new(chunk.as_ptr(), chunk.len() as u32)
                        .build()
                        .user_data(TAG_WAITV | k as u64),
                );
            }
            for (i, fd) in fds.iter().enumerate() {
                push(
                    opcode::PollAdd::new(types::Fd(fd.as_raw_fd()), libc::POLLIN as u32)
                        .build()
                        .user_data(TAG_POLL | i as u64),
                );
            }
            push(
                opcode::Timeout::new(&*self.ts as *const types::Timespec)
                    .build()
                    .user_data(TAG_TIMEOUT),
            );
        }
        // Only what was queued is waited for and reaped: a full queue (it
        // cannot be, it was sized above) fails this sleep, never hangs it.
        let full = pushed < ops;
        let ops = pushed;
        self.ring.submit_and_wait(1)?;
        let mut woken = Woken::default();
        let mut done = self.reap(&mut woken);
        if done < ops {
            // Cancel what is still pending and wait for every completion: the
            // kernel must be done with `futexv` and `ts` before we reuse them.
            if self
                .ring
                .submitter()
                .register_sync_cancel(None, types::CancelBuilder::any())
                .is_err()
            {
                let e = opcode::AsyncCancel2::new(types::CancelBuilder::any())
                    .build()
                    .user_data(0);
                // SAFETY: a cancel op points at no buffer; the ring has room
                // (completed ops freed their entries).
                unsafe {
                    self.ring
                        .submission()
                        .push(&e)
                        .map_err(|_| io::Error::other("ring full"))?
                };
            }
            while done < ops {
                self.ring.submit_and_wait(1)?;
                done += self.reap(&mut woken);
            }
        }
        if full {
            return Err(io::Error::other("io_uring submission queue full"));
        }
        Ok(woken)
    }

    /// Takes completions off the ring; returns how many of ours there were.
    fn reap(&mut self, woken: &mut Woken) -> usize {
        let mut n = 0;
        for cqe in self.ring.completion() {
            let ud = cqe.user_data();
            match ud & TAG_MASK {
                TAG_POLL => {
                    n += 1;
                    if cqe.result() > 0 {
                        woken.ready_fds.push((ud & !TAG_MASK) as usize);
                    }
                }
                TAG_TIMEOUT => {
                    n += 1;
                    woken.timed_out |= cqe.result() == -libc::ETIME;
                }
                TAG_WAITV => n += 1,
                _ => {} // our cancel op
            }
        }
        n
    }
}
