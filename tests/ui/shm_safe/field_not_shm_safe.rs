use rpal::ShmSafe;

#[repr(C)]
#[derive(ShmSafe)]
struct Job {
    id: u64,
    timeout: std::time::Duration,
}

fn main() {}
