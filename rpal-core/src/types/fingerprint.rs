//! Layout fingerprints: a 64-bit summary of a shared type's size,
//! alignment, and each field's name, offset and own fingerprint, computed
//! at compile time. Method ids fold in the fingerprints of their argument
//! and result types, so two builds that disagree about a struct disagree
//! about the method, and the handshake refuses them before any call.
//!
//! FNV-1a over 64-bit words and strings: cheap in `const` context, and a
//! collision needs two layouts built to collide, not a changed field.

const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const PRIME: u64 = 0x0000_0100_0000_01b3;

/// Folds `v` into `h`, byte by byte.
pub const fn word(mut h: u64, v: u64) -> u64 {
    let mut i = 0;
    while i < 8 {
        h ^= (v >> (i * 8)) & 0xff;
        h = h.wrapping_mul(PRIME);
        i += 1;
    }
    h
}

/// Folds `s` and a terminator into `h` (so `"ab","c"` and `"a","bc"` differ).
pub const fn text(mut h: u64, s: &str) -> u64 {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        h ^= b[i] as u64;
        h = h.wrapping_mul(PRIME);
        i += 1;
    }
    word(h, b.len() as u64)
}

/// The start of a fingerprint for a type called `kind` of `size` bytes
/// and alignment `align`.
pub const fn start(kind: &str, size: usize, align: usize) -> u64 {
    word(word(text(OFFSET, kind), size as u64), align as u64)
}

/// Folds one field into a struct's fingerprint: its name, offset and type.
pub const fn field(h: u64, name: &str, offset: usize, ty: u64) -> u64 {
    word(word(text(h, name), offset as u64), ty)
}

/// A primitive type named `name`: `u64` and `f64` have the same size but
/// differ here.
pub const fn primitive<T>(name: &str) -> u64 {
    start(name, size_of::<T>(), align_of::<T>())
}

/// A type whose fingerprint knows only its size and alignment: the default
/// of a hand-written [`ShmSafe`](super::ShmSafe) impl.
pub const fn opaque<T>() -> u64 {
    primitive::<T>("opaque")
}

/// A wrapper (`ShmBox`, `ShmSlice`, arrays...) around a type with
/// fingerprint `inner`, with `n` as its count where it has one.
pub const fn wrapper<T>(kind: &str, inner: u64, n: usize) -> u64 {
    word(word(primitive::<T>(kind), inner), n as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_size_types_differ_and_fields_count_by_name_and_place() {
        assert_ne!(primitive::<u64>("u64"), primitive::<f64>("f64"));
        let a = field(field(start("s", 16, 8), "hits", 0, 1), "misses", 8, 1);
        let b = field(field(start("s", 16, 8), "misses", 0, 1), "hits", 8, 1);
        assert_ne!(a, b, "a swapped pair of fields");
        assert_ne!(text(OFFSET, "ab"), text(text(OFFSET, "a"), "b"));
    }
}
