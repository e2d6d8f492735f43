//! Size classes: 16-byte steps up to 128 bytes, then four classes per
//! doubling (at most 25% waste), up to 4 GiB. Sizes include the 16-byte
//! block header.

/// Smallest block: header plus 16 bytes of payload.
pub const MIN_BLOCK: usize = 32;
const SMALL_LIMIT: usize = 128;
const SMALL_CLASSES: usize = (SMALL_LIMIT - MIN_BLOCK) / 16 + 1; // 32..=128
/// Number of classes (up to 4 GiB blocks).
pub const COUNT: usize = SMALL_CLASSES + 4 * (32 - 7);

/// The class of a block of `size` bytes (header included), if any.
pub fn of(size: usize) -> Option<usize> {
    if size <= SMALL_LIMIT {
        return Some(size.max(MIN_BLOCK).div_ceil(16) - MIN_BLOCK / 16);
    }
    // p: the largest power of two below `size`; four steps of p/4 above it.
    let log = usize::BITS - 1 - (size - 1).leading_zeros();
    let p = 1usize << log;
    let step = p / 4;
    let k = (size - p).div_ceil(step); // 1..=4
    let idx = SMALL_CLASSES + (log as usize - 7) * 4 + (k - 1);
    (idx < COUNT).then_some(idx)
}

/// Block size of class `idx`.
pub const fn size(idx: usize) -> usize {
    if idx < SMALL_CLASSES {
        return MIN_BLOCK + idx * 16;
    }
    let i = idx - SMALL_CLASSES;
    let p = 1usize << (7 + i / 4);
    p + (i % 4 + 1) * (p / 4)
}

/// How many freed blocks of class `idx` a thread keeps for itself before
/// returning them to the shared list. Big blocks go straight back.
pub const fn cache_depth(idx: usize) -> usize {
    match size(idx) {
        0..=1024 => 64,
        1025..=16384 => 16,
        16385..=262144 => 4,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_cover_sizes_tightly() {
        let mut prev = 0;
        for idx in 0..COUNT {
            let s = size(idx);
            assert!(s > prev, "class sizes grow");
            assert_eq!(s % 16, 0);
            assert_eq!(of(s), Some(idx), "size {s}");
            assert_eq!(of(prev + 1), Some(idx), "size {}", prev + 1);
            // Waste is at most 25% above the small classes.
            if s > SMALL_LIMIT {
                assert!((s - (prev + 1)) * 4 <= s, "class {idx} too coarse");
            }
            prev = s;
        }
        assert_eq!(size(COUNT - 1), 1 << 32);
        assert_eq!(of((1 << 32) + 1), None);
        assert_eq!(of(1), Some(0));
        assert_eq!(size(of(80).unwrap()), 80);
    }
}
