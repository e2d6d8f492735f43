//! Entry points for fuzzing (the cargo-fuzz targets in `fuzz/`) and for
//! their proptest twins (run in CI on stable): each feeds bytes a peer
//! could send to the code that decodes them, and must end in `Ok` or a
//! typed error, never a panic, a hang or a read outside the input.
//! Not part of the API.

use crate::error::{Error, Result};
use crate::handshake::{Hello, MESSAGE_LEN};
use crate::queue::{Bounds, Consumer, Shm};

/// Memory standing in for a peer's region: 64-byte aligned, as blocks are.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u8; 64]);

/// Bounds over one buffer: what a consumer may read.
#[derive(Clone, Copy)]
struct Buffer<'a> {
    lines: &'a [Line],
}

// SAFETY: `check` accepts only ranges inside `lines`, which is borrowed
// (so readable and unchanged in place) for 'a.
unsafe impl<'a> Bounds<'a> for Buffer<'a> {
    fn check(&self, addr: u64, len: u64, align: u64) -> Result<()> {
        let base = self.lines.as_ptr() as u64;
        crate::region::check_range(base, size_of_val(self.lines) as u64, addr, len, align)
    }
}

/// The record decoder: a queue consumer reading blocks made of `data`.
/// The first 8 bytes pick the head block's offset; the rest is the
/// region's contents. Reads up to 1024 records.
pub fn records(data: &[u8]) -> Result<usize> {
    let (pick, rest) = data.split_at(data.len().min(8));
    let mut lines = vec![Line([0; 64]); rest.len().div_ceil(64).max(1)];
    for (i, b) in rest.iter().enumerate() {
        lines[i / 64].0[i % 64] = *b;
    }
    let base = lines.as_ptr() as u64;
    let mut off = [0u8; 8];
    off[..pick.len()].copy_from_slice(pick);
    // Any offset: the consumer must refuse those outside or misaligned.
    let head = base.wrapping_add(u64::from_le_bytes(off) % (size_of_val(&lines[..]) as u64 + 128));
    let bounds = Buffer { lines: &lines };
    let mut c = Consumer::<Shm>::new_in(Shm, bounds, head, 0)?;
    let mut n = 0;
    for _ in 0..1024 {
        match c.next(bounds)? {
            Some(_) => n += 1,
            None => break,
        }
    }
    Ok(n)
}

/// The hello decoder, on the first 256 bytes of `data` (zero-padded).
pub fn hello(data: &[u8]) -> Result<Hello> {
    let mut m = [0u8; MESSAGE_LEN];
    let n = data.len().min(MESSAGE_LEN);
    m[..n].copy_from_slice(&data[..n]);
    let h = Hello::decode(&m, "fuzz")?;
    // What decodes must encode back to the same fields.
    let again = Hello::decode(&h.encode(), "fuzz")?;
    if again != h {
        return Err(Error::Protocol {
            pid: 0,
            detail: "a decoded hello does not survive encoding".into(),
        });
    }
    Ok(h)
}

/// The pointer validator: a region (base, size) and a pointer (addr, len,
/// align) from 40 bytes. Checks that an accepted range really lies inside.
pub fn pointer(data: &[u8]) -> Result<()> {
    let mut w = [0u64; 5];
    for (i, chunk) in data.chunks(8).take(5).enumerate() {
        let mut b = [0u8; 8];
        b[..chunk.len()].copy_from_slice(chunk);
        w[i] = u64::from_le_bytes(b);
    }
    let [base, size, addr, len, align] = w;
    let align = 1u64 << (align % 13);
    crate::region::check_range(base, size, addr, len, align)?;
    let inside = addr >= base
        && addr
            .checked_add(len)
            .is_some_and(|end| end <= base.saturating_add(size))
        && addr % align == 0;
    assert!(
        inside,
        "the validator accepted {addr:#x}+{len:#x} outside {base:#x}+{size:#x}"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn records_never_panic(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = records(&data);
        }

        #[test]
        fn hellos_never_panic(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = hello(&data);
        }

        #[test]
        fn a_real_hello_with_any_text_decodes(text in ".{0,200}", addr in any::<u64>()) {
            let mut h = Hello::new(crate::handshake::Kind::Hello);
            h.region_addr = addr;
            h.text = text;
            let got = hello(&h.encode()).unwrap();
            prop_assert_eq!(got.region_addr, addr);
        }

        #[test]
        fn pointers_are_accepted_only_inside(data in proptest::collection::vec(any::<u8>(), 40)) {
            let _ = pointer(&data);
        }

        #[test]
        fn pointers_near_the_edges(base in any::<u64>(), size in 0u64..1 << 20, addr_off in 0u64..1 << 21, len in 0u64..1 << 21) {
            let mut data = Vec::new();
            for w in [base, size, base.wrapping_add(addr_off), len, 0] {
                data.extend_from_slice(&w.to_le_bytes());
            }
            let _ = pointer(&data);
        }
    }

    /// A queue the real producer wrote decodes to its records.
    #[test]
    fn records_of_a_real_block_decode() {
        let _serial = crate::arena::tests::SERIAL.lock();
        let mut p = crate::queue::Producer::new().unwrap();
        for i in 0..10u8 {
            p.push(&[i; 24]).unwrap();
        }
        // The head block's bytes, as a peer would have them.
        // SAFETY: the producer's head block is ours, live, BLOCK_SIZE long.
        let block = unsafe { std::slice::from_raw_parts(p.head() as *const u8, crate::queue::BLOCK_SIZE) };
        let mut data = vec![0u8; 8];
        data.extend_from_slice(block);
        assert_eq!(records(&data).unwrap(), 10);
    }
}
