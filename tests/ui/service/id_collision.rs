/// Two methods whose signatures hash to the same method id (found by
/// search): refused at compile time, not merged on the wire.
#[rpal::service]
pub trait Clash {
    /// One.
    fn ma6e3(&self);
    /// The other.
    fn mbe0c(&self);
}

fn main() {}
