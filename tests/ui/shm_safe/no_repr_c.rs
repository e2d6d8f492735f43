use rpal::ShmSafe;

#[derive(ShmSafe)]
struct Point {
    x: u64,
    y: u64,
}

fn main() {}
