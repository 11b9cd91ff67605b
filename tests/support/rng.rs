//! The deterministic generator of the tests and benches: xorshift64* (Vigna), enough for
//! test data and random kill points, reproducible from its seed.

use std::time::Duration;

/// xorshift64*: `x ^= x >> 12; x ^= x << 25; x ^= x >> 27`, output `x * 0x2545f4914f6cdd1d`.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator whose state starts at `seed | 1` (the state must not be zero).
    pub fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }

    /// Seeded from the environment variable `var` if set, else from the clock; prints the
    /// seed as `var=SEED` (with `what`), so that a failing run can be replayed.
    pub fn from_env_or_clock(var: &str, what: &str) -> Self {
        let seed = std::env::var(var)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            })
            | 1;
        eprintln!("  {what}: {var}={seed}");
        Rng(seed)
    }

    /// The next number.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// A duration uniformly in [0, max), in whole microseconds.
    pub fn duration_below(&mut self, max: Duration) -> Duration {
        let us = max.as_micros().max(1) as u64;
        Duration::from_micros(self.next() % us)
    }

    /// Fills `buf` with the next numbers, little-endian (the last one cut to fit).
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut it = buf.chunks_exact_mut(8);
        for w in &mut it {
            w.copy_from_slice(&self.next().to_le_bytes());
        }
        let rem = it.into_remainder();
        let v = self.next().to_le_bytes();
        let n = rem.len();
        rem.copy_from_slice(&v[..n]);
    }

    /// `len` bytes of [`Rng::fill`].
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.fill(&mut v);
        v
    }
}

/// `len` random bytes for `seed`; nearby seeds (0, 1, 2 …) give unrelated bytes (the seed
/// is multiplied by the golden ratio first).
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    Rng::new(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)).bytes(len)
}
