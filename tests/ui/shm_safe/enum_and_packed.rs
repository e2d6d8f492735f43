use rpal::ShmSafe;

#[repr(C)]
#[derive(ShmSafe)]
enum State {
    Idle,
    Busy,
}

#[repr(C, packed)]
#[derive(ShmSafe)]
struct Packed {
    a: u8,
    b: u64,
}

fn main() {}
