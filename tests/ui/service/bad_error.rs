use rpal::prelude::*;

/// Not an error a caller can be told about: no `ServiceError`.
pub struct Opaque;

#[rpal::service]
pub trait Fallible {
    fn get(&self, k: u64) -> Result<u64, Opaque>;
    fn name(&self) -> Result<ShmString, Opaque>;
}

fn main() {}
