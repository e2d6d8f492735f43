#[rpal::service]
pub trait Receivers {
    fn by_value(self) -> u64;
    fn by_mut(&mut self) -> u64;
    fn no_self(a: u64) -> u64;
}

fn main() {}
