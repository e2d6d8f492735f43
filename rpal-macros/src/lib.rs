//! rpal's procedural macros.
//!
//! Planned: `#[rpal::service]` and `#[derive(ShmSafe)]`. Nothing is exported
//! until they are real.
