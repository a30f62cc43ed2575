//! A small seeded generator (SplitMix64) so every evaluation run mixes the same texts.

/// Deterministic pseudo-random numbers.
#[derive(Debug, Clone)]
pub struct SeededRandom(u64);

impl SeededRandom {
    pub fn new(seed: u64) -> SeededRandom {
        SeededRandom(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut mixed = self.0;
        mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        mixed ^ (mixed >> 31)
    }

    /// A number in `0..bound` (`bound` > 0).
    pub fn below(&mut self, bound: usize) -> usize {
        (self.next_u64() % bound as u64) as usize
    }

    /// True with probability `chance`.
    pub fn chance(&mut self, chance: f64) -> bool {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < chance
    }

    /// One element of a non-empty slice.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_sequence_and_bounds_hold() {
        let mut first = SeededRandom::new(7);
        let mut second = SeededRandom::new(7);
        for _ in 0..100 {
            assert_eq!(first.next_u64(), second.next_u64());
            assert!(first.below(3) < 3);
            second.below(3);
        }
        let hits = (0..10_000).filter(|_| first.chance(0.25)).count();
        assert!((2_000..3_000).contains(&hits), "{hits}");
    }
}
