/// Two methods whose signatures hash to the same method id (found by
/// search): refused at compile time, not merged on the wire.
#[rpal::service]
pub trait Clash {
    /// One.
    fn m24b8(&self);
    /// The other.
    fn m34f12(&self);
}

fn main() {}
