use rpal::ShmSafe;

#[repr(C)]
#[derive(ShmSafe)]
struct Message {
    name: &'static str,
    body: Vec<u8>,
    title: String,
    extra: Box<u64>,
    raw: *const u8,
}

fn main() {}
