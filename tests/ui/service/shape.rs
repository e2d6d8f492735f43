#[rpal::service]
pub trait Shape<T> {
    type Assoc;
    fn generic<U>(&self, u: u64) -> u64;
    fn with_body(&self) -> u64 {
        1
    }
    fn pattern(&self, (a, b): [u64; 2]) -> u64;
}

fn main() {}
