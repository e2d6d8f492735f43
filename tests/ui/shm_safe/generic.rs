use rpal::ShmSafe;

#[repr(C)]
#[derive(ShmSafe)]
struct Wrapper<T> {
    value: T,
}

fn main() {}
