use rpal::ShmSafe;

#[repr(C)]
#[derive(ShmSafe)]
struct Header {
    kind: u8,
    len: u64,
}

fn main() {}
