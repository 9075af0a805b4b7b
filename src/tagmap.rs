//! `TagMap`: a hash map keyed by the sequential `u64` tags that I/O paths hand out.
//!
//! Tags are unique counters, so SipHash's protection against chosen keys buys nothing and costs
//! several percent of a queue poller's time; a Fibonacci multiply spreads sequential tags over the
//! whole hash (hashbrown uses the top bits as control bytes) at the cost of one instruction.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Hasher for `u64` tags.
#[derive(Default, Clone, Copy)]
pub struct TagHasher(u64);

impl Hasher for TagHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// A map from tags to in-flight records.
pub type TagMap<V> = HashMap<u64, V, BuildHasherDefault<TagHasher>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_tags_spread_and_round_trip() {
        let mut m: TagMap<u64> = TagMap::default();
        for t in 0..10_000u64 {
            m.insert(t, t * 3);
        }
        assert!((0..10_000u64).all(|t| m.get(&t) == Some(&(t * 3))));
        let top = |t: u64| {
            let mut h = TagHasher::default();
            h.write_u64(t);
            h.finish() >> 57
        };
        let distinct: std::collections::HashSet<u64> = (0..128).map(top).collect();
        assert!(distinct.len() > 64, "top bits must vary for sequential tags");
    }
}
