//! The lightning indexer of DSA: a small multi-head scorer that decides which keys each query
//! attends to.
//!
//! q_I = wq_b(qr) [B, T, HI, DI];  k_I = LayerNorm(wk(x)) [B, T, DI] (one key per token);
//! the first R dims of both get half-split RoPE (rope dims FIRST, unlike MLA's interleave);
//! w = weights_proj(x) * HI^-1/2 * DI^-1/2 [B, T, HI];
//! I[t, s] = sum_j w[t, j] * ReLU(q_I[t, j] . k_I[s]), and `dsa::MASKED` for s > t.
//! Everything runs in f32 (DeepSeek keeps weights_proj in f32; the scores feed a top-k whose
//! ties must not depend on bf16 rounding). DeepSeek's inference code also applies a Hadamard
//! rotation and FP8 quantisation to q_I and k_I; the rotation is orthogonal, so in f32 it
//! changes nothing and is skipped.

use candle_core::{DType, Result, Tensor};

use crate::ops::{layer_norm, linear, rope_half};

pub struct Indexer {
    pub wq_b: Tensor,
    pub wk: Tensor,
    pub k_norm_weight: Tensor,
    pub k_norm_bias: Tensor,
    pub weights_proj: Tensor,
    pub heads: usize,
    pub head_dim: usize,
    pub rope: usize,
}

/// LayerNorm epsilon of k_norm (DeepSeek's value).
const K_NORM_EPS: f64 = 1e-6;

impl Indexer {
    /// Apply the half-split RoPE to the first `rope` dims of `x` [B, T, H, DI].
    fn rope_prefix(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let d = x.dim(3)?;
        let roped = rope_half(&x.narrow(3, 0, self.rope)?.contiguous()?, cos, sin)?;
        if d == self.rope {
            return Ok(roped);
        }
        Tensor::cat(&[&roped, &x.narrow(3, self.rope, d - self.rope)?], 3)
    }

    /// Index scores [B, T, T] f32 with `causal` ([T, T] bias) added.
    pub fn scores(&self, x: &Tensor, qr: &Tensor, cos: &Tensor, sin: &Tensor, causal: &Tensor) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (hi, di) = (self.heads, self.head_dim);
        let x = x.to_dtype(DType::F32)?;
        let qr = qr.to_dtype(DType::F32)?;
        let q = linear(&qr, &self.wq_b)?.reshape((b, t, hi, di))?;
        let q = self.rope_prefix(&q, cos, sin)?; // [B, T, HI, DI]
        let k = layer_norm(&linear(&x, &self.wk)?, &self.k_norm_weight, &self.k_norm_bias, K_NORM_EPS)?;
        let k = self.rope_prefix(&k.reshape((b, t, 1, di))?, cos, sin)?.reshape((b, t, di))?; // [B, T, DI]
        let w = (linear(&x, &self.weights_proj)? * ((hi as f64).powf(-0.5) * (di as f64).powf(-0.5)))?; // [B, T, HI]
        let qk = q.reshape((b, t * hi, di))?.contiguous()?.matmul(&k.t()?.contiguous()?)?.relu()?; // [B, T*HI, T]
        let qk = qk.reshape((b, t, hi, t))?;
        let scores = w.unsqueeze(2)?.contiguous()?.matmul(&qk)?.squeeze(2)?; // [B, T, T]
        scores.broadcast_add(causal)
    }
}
