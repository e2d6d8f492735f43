//! The `RPAL_*` environment variables, parsed strictly: a value that does
//! not parse, or lies outside its range, is [`Error::BadSetting`] naming
//! the variable, the value and what is accepted. Nothing is silently
//! ignored or rounded.
//!
//! | variable | accepted | default |
//! |---|---|---|
//! | `RPAL_ARENA_SIZE` | a size from 1M to the slot size (4G), e.g. `64M`, `1G`, `0x4000000` | 64M |
//! | `RPAL_WINDOW_BASE` | an address, a multiple of the slot size, the window below 2^47 | `0x5000_0000_0000` |
//! | `RPAL_WINDOW_SLOTS` | 1 to 32768 (and the window below 2^47) | 1024 |
//! | `RPAL_REGISTRY` | a file path, not empty | `/dev/shm/rpal-<uid>.slots` |
//! | `RPAL_PKEYS` | `on`/`off` (also `1`/`0`, `true`/`false`, `yes`/`no`) | on where the CPU has them |

use std::path::PathBuf;

use crate::error::{Error, Result};

/// The value of `name`, if it is set (a value that is not Unicode is bad).
fn raw(name: &str) -> Result<Option<String>> {
    match std::env::var(name) {
        Ok(v) => Ok(Some(v)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(v)) => Err(bad(name, &v.to_string_lossy(), "a UTF-8 value")),
    }
}

fn bad(name: &str, value: &str, accepted: &str) -> Error {
    Error::BadSetting {
        name: name.to_owned(),
        value: value.to_owned(),
        accepted: accepted.to_owned(),
    }
}

/// A number: decimal or `0x` hex, `_` allowed between digits.
fn number(v: &str) -> Option<u64> {
    let v = v.trim().replace('_', "");
    match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => v.parse().ok(),
    }
}

/// A size: a number of bytes, or with a binary suffix `K`, `M`, `G`, `T`
/// (also `KB`/`KiB`, any case).
pub fn parse_size(v: &str) -> Option<u64> {
    let t = v.trim();
    let lower = t.to_ascii_lowercase();
    let digits_end = lower
        .find(|c: char| !(c.is_ascii_hexdigit() || c == 'x' || c == '_'))
        .unwrap_or(lower.len());
    // `0x..` has no suffix (its digits include b, e...).
    if lower.starts_with("0x") {
        return number(&lower);
    }
    let (num, suffix) = lower.split_at(digits_end);
    let shift = match suffix.trim() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return None,
    };
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit() || b == b'_') {
        return None;
    }
    number(num)?.checked_mul(1 << shift)
}

/// Shows a size the way the settings take it (`64M`, `4G`, or bytes).
pub fn show_size(n: u64) -> String {
    for (shift, s) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if n >= 1 << shift && n % (1 << shift) == 0 {
            return format!("{}{s}", n >> shift);
        }
    }
    n.to_string()
}

/// `name` as a size within `min..=max`, if set.
pub fn size(name: &str, min: u64, max: u64) -> Result<Option<u64>> {
    let Some(v) = raw(name)? else { return Ok(None) };
    let accepted = format!(
        "a size from {} to {} bytes, as a number or with a suffix (64M, 1G)",
        show_size(min),
        show_size(max)
    );
    match parse_size(&v) {
        Some(n) if (min..=max).contains(&n) => Ok(Some(n)),
        _ => Err(bad(name, &v, &accepted)),
    }
}

/// `name` as a whole number within `min..=max`, if set.
pub fn whole(name: &str, min: u64, max: u64) -> Result<Option<u64>> {
    let Some(v) = raw(name)? else { return Ok(None) };
    match number(&v) {
        Some(n) if (min..=max).contains(&n) => Ok(Some(n)),
        _ => Err(bad(name, &v, &format!("a whole number from {min} to {max}"))),
    }
}

/// `name` as an address that `check` accepts (saying what it wants), if set.
pub fn address(name: &str, check: impl Fn(u64) -> std::result::Result<(), String>) -> Result<Option<u64>> {
    let Some(v) = raw(name)? else { return Ok(None) };
    let Some(n) = number(&v) else {
        return Err(bad(name, &v, "an address, in hex (0x5000_0000_0000) or decimal"));
    };
    check(n).map_err(|want| bad(name, &v, &want))?;
    Ok(Some(n))
}

/// `name` as on/off, if set.
pub fn switch(name: &str) -> Result<Option<bool>> {
    let Some(v) = raw(name)? else { return Ok(None) };
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "on" | "true" | "yes" => Ok(Some(true)),
        "0" | "off" | "false" | "no" => Ok(Some(false)),
        _ => Err(bad(name, &v, "on or off (1/0, true/false, yes/no)")),
    }
}

/// `name` as a path, if set (not empty).
pub fn path(name: &str) -> Result<Option<PathBuf>> {
    let Some(v) = raw(name)? else { return Ok(None) };
    if v.trim().is_empty() {
        return Err(bad(name, &v, "a file path"));
    }
    Ok(Some(PathBuf::from(v)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_suffixes_and_refuse_the_rest() {
        assert_eq!(parse_size("64M"), Some(64 << 20));
        assert_eq!(parse_size("64m"), Some(64 << 20));
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("2 GiB"), Some(2 << 30));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("0x1000"), Some(4096));
        assert_eq!(parse_size("1_048_576"), Some(1 << 20));
        for bad in ["lots", "", "64Q", "M", "-1", "1.5G", "0xzz", "99999999999T"] {
            assert_eq!(parse_size(bad), None, "{bad:?}");
        }
        assert_eq!(show_size(64 << 20), "64M");
        assert_eq!(show_size(1 << 32), "4G");
        assert_eq!(show_size(1000), "1000");
    }
}
