use rpal::prelude::*;

struct Plain {
    a: u64,
}

/// Shareable, but not `Copy`: it cannot be copied out by value.
#[derive(ShmSafe)]
#[repr(C)]
struct NotCopy {
    a: u64,
}

#[rpal::service]
pub trait NotShared {
    fn take(&self, p: Plain) -> u64;
    fn give(&self) -> NotCopy;
}

fn main() {}
