// The prelude is used only by the trait: a failed macro must not leave it
// reported as an unused import.
use rpal::prelude::*;

#[rpal::service]
pub trait PrivateMemory {
    fn fine(&self, s: ShmString) -> u64;
    fn reference(&self, data: &[u8]) -> u64;
    fn string(&self, s: String) -> u64;
    fn vec(&self) -> Vec<u8>;
    fn boxed(&self, b: Box<u64>);
    fn option(&self, o: Option<u64>);
    fn flag(&self, b: bool);
    fn tuple(&self, t: (u64, u64));
}

fn main() {}
