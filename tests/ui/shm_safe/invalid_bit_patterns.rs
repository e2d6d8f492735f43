use rpal::ShmSafe;

#[repr(C)]
#[derive(ShmSafe)]
struct Flags {
    ready: bool,
    letter: char,
    maybe: Option<u64>,
    pair: (u32, u32),
}

fn main() {}
