//! The crate's one seeded random-number facility for its own streams: SplitMix64 (Steele, Lea &
//! Flood, OOPSLA 2014) with the constants of Vigna's reference implementation. Used as a
//! counter-based hash — draw `i` of the stream at `base` is `splitmix64(base + i)` — so any
//! position can be drawn without the ones before it (dropout masks, stochastic rounding, the
//! per-step device seed), and as a plain sequential generator (generated benchmark data).
//! Shuffles use `rand`'s seeded `StdRng`.

/// The golden-ratio increment of the state.
pub const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// The output function (a 64-bit finalizer): a bijection that mixes every input bit.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One SplitMix64 step from state `z`: `mix(z + γ)`.
pub fn splitmix64(z: u64) -> u64 {
    mix(z.wrapping_add(GAMMA))
}

/// The sequential generator.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GAMMA);
        mix(self.0)
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let (u, v) = (self.unit().max(1e-300), self.unit());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference implementation (prng.di.unimi.it/splitmix64.c) seeded with 0 and 1234567.
    #[test]
    fn matches_the_reference_outputs() {
        let mut g = SplitMix64(0);
        assert_eq!([g.next_u64(), g.next_u64(), g.next_u64()], [0xE220_A839_7B1D_CDAF, 0x6E78_9E6A_A1B9_65F4, 0x06C4_5D18_8009_454F]);
        let mut g = SplitMix64(1234567);
        assert_eq!([g.next_u64(), g.next_u64()], [6457827717110365317, 3203168211198807973]);
        assert_eq!(splitmix64(0), 0xE220_A839_7B1D_CDAF);
    }
}
