//! What the integration tests share.

/// Deterministic xorshift64, so failures reproduce. Each test adds the draws it needs in its own
/// `impl Rng` block.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

pub mod ranks;
