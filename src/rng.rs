//! A small seeded generator (splitmix64) for reproducible test inputs and generated checkpoints.
//! candle's own `randn` on the CPU draws from an unseeded thread RNG, so it cannot be used where
//! runs must repeat.

use candle_core::{Device, Result, Tensor};

pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal by Box-Muller.
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // (0, 1]: ln is finite
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    pub fn normal_vec(&mut self, n: usize, std: f64) -> Vec<f32> {
        (0..n).map(|_| (self.normal() * std) as f32).collect()
    }
}

/// An f32 tensor of N(0, std^2) values from `seed`.
pub fn randn(shape: &[usize], seed: u64, std: f64, device: &Device) -> Result<Tensor> {
    let n = shape.iter().product();
    Tensor::from_vec(SplitMix64::new(seed).normal_vec(n, std), shape, device)
}
