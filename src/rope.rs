//! Rotary position tables with YaRN frequency scaling (DeepSeek-V3: dim 64, theta 1e4,
//! factor 40 from 4096 positions). MLA and the indexer share one table; they differ only in
//! which dims form a pair (see `ops::rope_interleaved` and `ops::rope_half`).
//!
//! f_i = theta^(-2i/dim). With YaRN, low = floor(corr(beta_fast)), high = ceil(corr(beta_slow)),
//! corr(r) = dim * ln(orig / (2 pi r)) / (2 ln theta), clamped to [0, dim-1];
//! ramp_i = clamp((i - low) / (high - low), 0, 1) and f'_i = f_i / factor * ramp_i + f_i * (1 - ramp_i).
//! cos and sin are multiplied by mscale(factor, mscale) / mscale(factor, mscale_all_dim), which
//! is 1 for DeepSeek's configs. Angles are computed in f64 and rounded once to f32.

use candle_core::{Device, Result, Tensor};

use crate::config::{yarn_mscale, ModelConfig};

/// Inverse frequencies f'_i, i < dim/2.
pub fn inv_freq(cfg: &ModelConfig) -> Vec<f64> {
    let dim = cfg.qk_rope_head_dim;
    let theta = cfg.rope_theta;
    let base: Vec<f64> = (0..dim / 2)
        .map(|i| theta.powf(-((2 * i) as f64) / dim as f64))
        .collect();
    let Some(y) = &cfg.rope_scaling else {
        return base;
    };
    let corr = |rotations: f64| {
        dim as f64
            * (y.original_max_position_embeddings as f64 / (rotations * 2.0 * std::f64::consts::PI))
                .ln()
            / (2.0 * theta.ln())
    };
    let low = corr(y.beta_fast).floor().max(0.0);
    let mut high = corr(y.beta_slow).ceil().min(dim as f64 - 1.0);
    if low == high {
        high += 0.001; // avoid a zero-width ramp
    }
    base.iter()
        .enumerate()
        .map(|(i, &f)| {
            let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
            f / y.factor * ramp + f * (1.0 - ramp)
        })
        .collect()
}

/// The cos/sin amplitude YaRN applies (1 for DeepSeek's mscale = mscale_all_dim = 1).
pub fn attention_factor(cfg: &ModelConfig) -> f64 {
    match &cfg.rope_scaling {
        None => 1.0,
        Some(y) if y.mscale != 0.0 && y.mscale_all_dim != 0.0 => {
            yarn_mscale(y.factor, y.mscale) / yarn_mscale(y.factor, y.mscale_all_dim)
        }
        Some(y) => yarn_mscale(y.factor, 1.0),
    }
}

/// cos and sin for positions `0..t`, each [t, dim/2] f32.
pub fn tables(cfg: &ModelConfig, t: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let freqs = inv_freq(cfg);
    let amp = attention_factor(cfg);
    let half = freqs.len();
    let mut cos = Vec::with_capacity(t * half);
    let mut sin = Vec::with_capacity(t * half);
    for pos in 0..t {
        for f in &freqs {
            let a = pos as f64 * f;
            cos.push((a.cos() * amp) as f32);
            sin.push((a.sin() * amp) as f32);
        }
    }
    Ok((
        Tensor::from_vec(cos, (t, half), device)?,
        Tensor::from_vec(sin, (t, half), device)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::IndexerDefaults;

    #[test]
    fn yarn_ramp_of_the_671b_config_is_10_to_23() {
        let cfg = ModelConfig::from_json(
            include_str!("../tests/data/deepseek-v3.1-terminus/config.json"),
            &IndexerDefaults::default(),
        )
        .unwrap();
        let f = inv_freq(&cfg);
        let base = |i: usize| 10000f64.powf(-((2 * i) as f64) / 64.0);
        // Below low = 10 the original frequencies survive; from high = 23 on they are divided by 40.
        for (i, fi) in f.iter().enumerate().take(11) {
            assert!((fi - base(i)).abs() < 1e-15, "{i}");
        }
        for (i, fi) in f.iter().enumerate().take(32).skip(23) {
            assert!((fi - base(i) / 40.0).abs() < 1e-15, "{i}");
        }
        let r = (16.0 - 10.0) / 13.0;
        assert!((f[16] - (base(16) / 40.0 * r + base(16) * (1.0 - r))).abs() < 1e-15);
        assert_eq!(attention_factor(&cfg), 1.0);
    }
}
