//! Round-trip benchmarks between two real processes pinned to different
//! cores: the raw floors (spin, futex), rpal, and loopback TCP, all with the
//! same payload written by the caller and read back by the callee.
//!
//! The parent is the caller; each transport's callee runs in a child process
//! started from the same executable with `--child ROLE ARGS...`.

mod alloc;
mod child;
mod idle;
mod measure;
mod queue;
mod raw;
pub mod stub;
mod transports;

pub use alloc::*;
pub use child::*;
pub use idle::*;
pub use measure::*;
pub use queue::*;
pub use raw::*;
pub use transports::*;
