struct Plain {
    a: u64,
}

#[rpal::service]
pub trait NotShared {
    fn take(&self, p: Plain) -> u64;
}

fn main() {}
