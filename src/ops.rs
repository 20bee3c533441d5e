//! Differentiable building blocks written from candle's primitive ops.
//!
//! candle's fused `rope_i`, `softmax_last_dim`, `rms_norm` and `layer_norm` have no backward,
//! so a gradient through them would silently stop. Everything here is built
//! from ops that autograd knows; normalisations and softmax run in f32 whatever the input
//! dtype and return the input dtype. The fused kernels (`kernels::*`) are tested against
//! these plain versions.

use candle_core::{DType, Result, Tensor, D};

use crate::kernels::KernelPolicy;

/// `x @ w^T` for `x` of any rank `[..., in]` and `w` `[out, in]`.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let inner = dims[dims.len() - 1];
    let lead: usize = dims[..dims.len() - 1].iter().product();
    let y = x.reshape((lead, inner))?.matmul(&w.t()?)?;
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().unwrap() = w.dim(0)?;
    y.reshape(out_dims)
}

/// RMSNorm over the last dim: `w * x / sqrt(mean(x^2) + eps)`, statistics in f32; the
/// normalised value is cast back to x's dtype before the scale (as DeepSeek and HF do). On a
/// GPU the fused op of `kernels::rms_norm` (same roundings, one pass each way), else the plain one.
pub fn rms_norm(k: KernelPolicy, x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if crate::kernels::rms_norm::supported(k, x, w) {
        return crate::kernels::rms_norm::rms_norm(x, w, eps);
    }
    rms_norm_plain(x, w, eps)
}

/// `rms_norm` from candle's ops (the fused kernel's twin, and the CPU's path).
pub fn rms_norm_plain(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x32 = x.to_dtype(DType::F32)?;
    let ms = x32.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x32.broadcast_div(&(ms + eps)?.sqrt()?)?.to_dtype(dtype)?;
    normed.broadcast_mul(&w.to_dtype(dtype)?)
}

/// LayerNorm over the last dim with scale and bias, all in f32 (the indexer's k_norm).
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x32 = x.to_dtype(DType::F32)?;
    let centred = x32.broadcast_sub(&x32.mean_keepdim(D::Minus1)?)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed
        .broadcast_mul(&w.to_dtype(DType::F32)?)?
        .broadcast_add(&b.to_dtype(DType::F32)?)?
        .to_dtype(dtype)
}

/// Log-sum-exp over the last dim (keepdim), in f32. The max is detached: the result does not
/// depend on it, and a detached shift keeps the gradient exactly softmax.
pub fn logsumexp_last(x: &Tensor) -> Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    let m = x.max_keepdim(D::Minus1)?.detach();
    x.broadcast_sub(&m)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        .broadcast_add(&m)
}

/// Softmax over the last dim in f32 (output f32).
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Log-softmax over the last dim in f32: `x - logsumexp(x)`. Its gradient for a target
/// distribution p is `softmax(x) - p`, with no log of an underflowed probability anywhere.
pub fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    x.broadcast_sub(&logsumexp_last(&x)?)
}

/// Logistic sigmoid `1 / (1 + exp(-x))`; for x << 0, exp overflows to inf and the result is 0.
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    (x.neg()?.exp()? + 1.0)?.recip()
}

/// SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`.
pub fn swiglu(
    k: KernelPolicy,
    x: &Tensor,
    gate: &Tensor,
    up: &Tensor,
    down: &Tensor,
) -> Result<Tensor> {
    linear(&silu_mul(k, &linear(x, gate)?, &linear(x, up)?)?, down)
}

/// silu(g) * u in g's dtype (silu in f32, rounded, then the product), differentiable. On a GPU
/// the fused op of `kernels::swiglu` (the same bits), else `silu_mul_plain`.
pub fn silu_mul(k: KernelPolicy, g: &Tensor, u: &Tensor) -> Result<Tensor> {
    if crate::kernels::swiglu::supported(k, g, u) {
        return crate::kernels::swiglu::silu_mul(g, u);
    }
    silu_mul_plain(g, u)
}

/// `silu_mul` from candle's ops (the fused kernel's twin, and the CPU's path).
pub fn silu_mul_plain(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    g.silu()? * u
}

/// RoPE on interleaved pairs (2i, 2i+1) with frequency i: the layout of DeepSeek's MLA.
/// `x`: [B, T, H, R]; `cos`, `sin`: [T, R/2]. On a GPU the fused op of `kernels::rope` (the
/// same bits), else the plain one.
pub fn rope_interleaved(k: KernelPolicy, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if cos.rank() == 3 {
        return per_sequence_rope(x, cos, sin, |x, c, s| rope_interleaved(k, x, c, s));
    }
    if crate::kernels::rope::supported(k, x, cos, sin) {
        return crate::kernels::rope::rope(x, cos, sin, crate::kernels::rope::Pairs::Interleaved);
    }
    rope_interleaved_plain(x, cos, sin)
}

/// `rope_interleaved` from candle's ops (the fused kernel's twin, and the CPU's path).
pub fn rope_interleaved_plain(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if cos.rank() == 3 {
        return per_sequence_rope(x, cos, sin, rope_interleaved_plain);
    }
    let (b, t, h, r) = x.dims4()?;
    let pairs = x.reshape((b, t, h, r / 2, 2))?;
    let x0 = pairs.narrow(4, 0, 1)?.squeeze(4)?; // [B, T, H, R/2]
    let x1 = pairs.narrow(4, 1, 1)?.squeeze(4)?;
    let cos = cos.reshape((1, t, 1, r / 2))?.to_dtype(x.dtype())?;
    let sin = sin.reshape((1, t, 1, r / 2))?.to_dtype(x.dtype())?;
    let y0 = (x0.broadcast_mul(&cos)? - x1.broadcast_mul(&sin)?)?;
    let y1 = (x0.broadcast_mul(&sin)? + x1.broadcast_mul(&cos)?)?;
    Tensor::stack(&[y0, y1], 4)?.reshape((b, t, h, r))
}

/// A RoPE op with per-sequence tables cos, sin [T, B, R/2] (document masking: each token's
/// position inside its document) on x [B, T, H, R]: the B sequences become one of B*T tokens
/// with tables [B*T, R/2], the same rotation per element as with per-window tables.
fn per_sequence_rope(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    op: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (b, t, h, r) = x.dims4()?;
    let flat = |table: &Tensor| -> Result<Tensor> {
        let (tt, bb, half) = table.dims3()?;
        if (tt, bb) != (t, b) {
            candle_core::bail!(
                "RoPE tables [{tt}, {bb}, {half}] do not cover x {:?} ([T, B, R/2] expected)",
                x.dims()
            );
        }
        table.transpose(0, 1)?.contiguous()?.reshape((b * t, half))
    };
    let y = op(
        &x.contiguous()?.reshape((1, b * t, h, r))?,
        &flat(cos)?,
        &flat(sin)?,
    )?;
    y.reshape((b, t, h, r))
}

/// RoPE on the two halves (i, i + R/2) with frequency i: the layout of the DSA indexer.
/// `x`: [B, T, H, R]; `cos`, `sin`: [T, R/2]. On a GPU the fused op of `kernels::rope`.
pub fn rope_half(k: KernelPolicy, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if cos.rank() == 3 {
        return per_sequence_rope(x, cos, sin, |x, c, s| rope_half(k, x, c, s));
    }
    if crate::kernels::rope::supported(k, x, cos, sin) {
        return crate::kernels::rope::rope(x, cos, sin, crate::kernels::rope::Pairs::Halves);
    }
    rope_half_plain(x, cos, sin)
}

/// `rope_half` from candle's ops (the fused kernel's twin, and the CPU's path).
pub fn rope_half_plain(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if cos.rank() == 3 {
        return per_sequence_rope(x, cos, sin, rope_half_plain);
    }
    let (_, t, _, r) = x.dims4()?;
    let x1 = x.narrow(3, 0, r / 2)?;
    let x2 = x.narrow(3, r / 2, r / 2)?;
    let cos = cos.reshape((1, t, 1, r / 2))?.to_dtype(x.dtype())?;
    let sin = sin.reshape((1, t, 1, r / 2))?.to_dtype(x.dtype())?;
    let y1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let y2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
    Tensor::cat(&[y1, y2], 3)
}

// ---------------------------------------------------------------------------------------
// The backward of each op above, written out (the explicit layer backward of
// `model::blocks` is built from these). Each has candle's autograd of its forward as the
// twin; `tests` compares them. Gradients come back in the dtypes of the forward's inputs.
// ---------------------------------------------------------------------------------------

/// The backward of `linear` (`y = x @ w^T`): dx = dy @ w, shaped like x, and, when
/// `weight_grad`, dw = dy^T @ x [out, in] (a frozen weight's is not computed). Both products in
/// the dtype of x (matmul accumulators: f32 on cuBLAS, the dtype's own on the CPU).
pub fn linear_backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    weight_grad: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let (out, inp) = w.dims2()?;
    let lead = dy.elem_count() / out.max(1);
    let dy2 = dy.reshape((lead, out))?;
    let dx = dy2.matmul(w)?.reshape(x.shape())?;
    let dw = if weight_grad {
        Some(dy2.t()?.matmul(&x.reshape((lead, inp))?)?)
    } else {
        None
    };
    Ok((dx, dw))
}

/// The weight's half of `linear_backward` alone: dw = dy^T @ x [out, in] (for inputs that take
/// no gradient, such as the indexer's detached ones).
pub fn linear_weight_grad(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let inp = x.dims().last().copied().unwrap_or(1);
    let out = dy.dims().last().copied().unwrap_or(1);
    let lead = dy.elem_count() / out.max(1);
    dy.reshape((lead, out))?
        .t()?
        .matmul(&x.reshape((lead, inp))?)
}

/// The backward of `rms_norm`: (dx in x's dtype, dw in w's). On a GPU the fused op's backward
/// (`kernels::rms_norm::rms_norm_backward`), else `rms_norm_backward_plain`.
pub fn rms_norm_backward(
    k: KernelPolicy,
    x: &Tensor,
    w: &Tensor,
    eps: f64,
    dy: &Tensor,
) -> Result<(Tensor, Tensor)> {
    if crate::kernels::rms_norm::supported(k, x, w) {
        return crate::kernels::rms_norm::rms_norm_backward(x, w, eps, dy);
    }
    rms_norm_backward_plain(x, w, eps, dy)
}

/// `rms_norm_backward` in candle's ops. With s = sqrt(mean(x^2) + eps) and xh = x / s (f32):
/// dn = dy * w (rounded to x's dtype, as the forward's product), dx = (dn - xh mean(dn xh)) / s,
/// dw = sum over rows of dy * normed (normed = xh rounded to x's dtype, as the forward used),
/// every sum in f32.
pub fn rms_norm_backward_plain(
    x: &Tensor,
    w: &Tensor,
    eps: f64,
    dy: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let dtype = x.dtype();
    let dy = dy.to_dtype(dtype)?;
    let d = x.dims().last().copied().unwrap_or(1);
    let x32 = x.to_dtype(DType::F32)?;
    let s = (x32.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?;
    let xh = x32.broadcast_div(&s)?;
    let dn = dy
        .broadcast_mul(&w.to_dtype(dtype)?)?
        .to_dtype(DType::F32)?;
    let dot = (&dn * &xh)?.mean_keepdim(D::Minus1)?;
    let dx = dn
        .broadcast_sub(&xh.broadcast_mul(&dot)?)?
        .broadcast_div(&s)?
        .to_dtype(dtype)?;
    let normed = xh.to_dtype(dtype)?.to_dtype(DType::F32)?;
    let rows = x.elem_count() / d.max(1);
    let dw = (dy.to_dtype(DType::F32)? * normed)?
        .reshape((rows, d))?
        .sum(0)?
        .to_dtype(w.dtype())?;
    Ok((dx, dw))
}

/// The backward of `rope_interleaved`: the rotation by the opposite angles (exact: the
/// rotation is orthogonal and -sin is exact), the fused op's inverse on a GPU.
pub fn rope_interleaved_backward(
    k: KernelPolicy,
    dy: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Tensor> {
    if cos.rank() == 3 {
        return per_sequence_rope(dy, cos, sin, |x, c, s| {
            rope_interleaved_backward(k, x, c, s)
        });
    }
    if crate::kernels::rope::supported(k, dy, cos, sin) {
        return crate::kernels::rope::rope_inverse(
            dy,
            cos,
            sin,
            crate::kernels::rope::Pairs::Interleaved,
        );
    }
    rope_interleaved_plain(dy, cos, &sin.neg()?)
}

/// The backward of `rope_half`: the rotation by the opposite angles (exact), the fused op's
/// inverse on a GPU.
pub fn rope_half_backward(
    k: KernelPolicy,
    dy: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Tensor> {
    if cos.rank() == 3 {
        return per_sequence_rope(dy, cos, sin, |x, c, s| rope_half_backward(k, x, c, s));
    }
    if crate::kernels::rope::supported(k, dy, cos, sin) {
        return crate::kernels::rope::rope_inverse(
            dy,
            cos,
            sin,
            crate::kernels::rope::Pairs::Halves,
        );
    }
    rope_half_plain(dy, cos, &sin.neg()?)
}

/// The backward of `layer_norm` for an f32 input x (all in f32): with xh = (x - mean) / s,
/// s = sqrt(var + eps), dxh = dy w: dx = (dxh - mean(dxh) - xh mean(dxh xh)) / s,
/// dw = sum over rows of dy xh, db = sum over rows of dy. Returns (dx, dw, db).
pub fn layer_norm_backward(
    x: &Tensor,
    w: &Tensor,
    eps: f64,
    dy: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let d = x.dims().last().copied().unwrap_or(1);
    let rows = x.elem_count() / d.max(1);
    let x = x.to_dtype(DType::F32)?;
    let dy = dy.to_dtype(DType::F32)?;
    let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let s = (centred.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?;
    let xh = centred.broadcast_div(&s)?;
    let dxh = dy.broadcast_mul(&w.to_dtype(DType::F32)?)?;
    let dot = (&dxh * &xh)?.mean_keepdim(D::Minus1)?;
    let dx = dxh
        .broadcast_sub(&dxh.mean_keepdim(D::Minus1)?)?
        .broadcast_sub(&xh.broadcast_mul(&dot)?)?
        .broadcast_div(&s)?;
    let dw = (&dy * &xh)?
        .reshape((rows, d))?
        .sum(0)?
        .to_dtype(w.dtype())?;
    let db = dy.reshape((rows, d))?.sum(0)?.to_dtype(w.dtype())?;
    Ok((dx, dw, db))
}

/// What `swiglu_saved` keeps for `swiglu_backward`: the gate and up products [.., I] and the
/// hidden value silu(gate) * up [.., I], in the input's dtype.
pub struct SwigluSaved {
    gate: Tensor,
    up: Tensor,
    hidden: Tensor,
}

impl SwigluSaved {
    /// The SwiGLU's output `hidden @ down^T` (a backward that only needs the gradients skips it).
    pub fn output(&self, down: &Tensor) -> Result<Tensor> {
        linear(&self.hidden, down)
    }
}

/// The hidden layer of `swiglu` with what its backward reads (the same ops, so the same values).
pub fn swiglu_saved(
    k: KernelPolicy,
    x: &Tensor,
    gate: &Tensor,
    up: &Tensor,
) -> Result<SwigluSaved> {
    let g = linear(x, gate)?;
    let u = linear(x, up)?;
    let hidden = silu_mul(k, &g, &u)?;
    Ok(SwigluSaved {
        gate: g,
        up: u,
        hidden,
    })
}

/// `swiglu_saved` of E SwiGLUs at once: xs [E, cap, D] with stacked weights gate, up
/// [E, I, D] (batched products; the same dot products as E separate calls).
pub fn swiglu_batched_saved(
    k: KernelPolicy,
    xs: &Tensor,
    gate: &Tensor,
    up: &Tensor,
) -> Result<SwigluSaved> {
    let g = xs.matmul(&gate.transpose(1, 2)?)?;
    let u = xs.matmul(&up.transpose(1, 2)?)?;
    let hidden = silu_mul(k, &g, &u)?;
    Ok(SwigluSaved {
        gate: g,
        up: u,
        hidden,
    })
}

impl SwigluSaved {
    /// The output of `swiglu_batched_saved`'s SwiGLUs: hidden @ down^T per expert, down
    /// [E, D, I] -> [E, cap, D].
    pub fn output_batched(&self, down: &Tensor) -> Result<Tensor> {
        self.hidden.matmul(&down.transpose(1, 2)?)
    }
}

/// The backward of `swiglu_batched_saved` (+ `output_batched`): dy [E, cap, D] -> dx
/// [E, cap, D] and the stacked weights' gradients ([E, I, D], [E, I, D], [E, D, I]); the
/// elementwise part as in `swiglu_backward`.
pub fn swiglu_batched_backward(
    k: KernelPolicy,
    xs: &Tensor,
    saved: &SwigluSaved,
    gate: &Tensor,
    up: &Tensor,
    down: &Tensor,
    dy: &Tensor,
) -> Result<(Tensor, SwigluGrads)> {
    let dtype = xs.dtype();
    let dh = dy.matmul(down)?; // [E, cap, I]
    let d_down = dy.transpose(1, 2)?.matmul(&saved.hidden)?; // [E, D, I]
    let (dg, du) = swiglu_elementwise_backward(k, saved, &dh, dtype)?;
    let dx = (dg.matmul(gate)? + du.matmul(up)?)?;
    let d_gate = dg.transpose(1, 2)?.matmul(xs)?;
    let d_up = du.transpose(1, 2)?.matmul(xs)?;
    Ok((
        dx,
        SwigluGrads {
            gate: Some(d_gate),
            up: Some(d_up),
            down: Some(d_down),
        },
    ))
}

/// d(gate product), d(up product) from dh = d(hidden): `silu_mul_backward`.
fn swiglu_elementwise_backward(
    k: KernelPolicy,
    saved: &SwigluSaved,
    dh: &Tensor,
    dtype: DType,
) -> Result<(Tensor, Tensor)> {
    silu_mul_backward(k, &saved.gate, &saved.up, &dh.to_dtype(dtype)?)
}

/// The backward of `silu_mul`: (dg, du) in g's dtype. On a GPU the fused op's backward, else
/// `silu_mul_backward_plain`.
pub fn silu_mul_backward(
    k: KernelPolicy,
    g: &Tensor,
    u: &Tensor,
    dh: &Tensor,
) -> Result<(Tensor, Tensor)> {
    if crate::kernels::swiglu::supported(k, g, u) {
        return crate::kernels::swiglu::silu_mul_backward(g, u, dh);
    }
    silu_mul_backward_plain(g, u, dh)
}

/// `silu_mul_backward` in candle's ops: du = dh silu(g), dg = dh u silu'(g),
/// silu'(g) = sig(g) (1 + g (1 - sig(g))), in f32, each rounded once to g's dtype.
pub fn silu_mul_backward_plain(g: &Tensor, u: &Tensor, dh: &Tensor) -> Result<(Tensor, Tensor)> {
    let dtype = g.dtype();
    let g32 = g.to_dtype(DType::F32)?;
    let sig = sigmoid(&g32)?;
    let silu = (&g32 * &sig)?;
    let dh32 = dh.to_dtype(DType::F32)?;
    let du = (&dh32 * silu)?.to_dtype(dtype)?;
    let dsilu = (&sig * ((&g32 * sig.affine(-1.0, 1.0)?)? + 1.0)?)?;
    let dg = ((dh32 * u.to_dtype(DType::F32)?)? * dsilu)?.to_dtype(dtype)?;
    Ok((dg, du))
}

/// Gradients of a SwiGLU's three weights (None where not asked for).
pub struct SwigluGrads {
    pub gate: Option<Tensor>,
    pub up: Option<Tensor>,
    pub down: Option<Tensor>,
}

/// The backward of `swiglu`: dx and the weights' gradients (`want` = [gate, up, down]).
/// With g, u the gate and up products and h = silu(g) u: dh = dy @ down; du = dh silu(g);
/// dg = dh u silu'(g), silu'(g) = sig(g) (1 + g (1 - sig(g))), the elementwise part in f32 and
/// rounded once to the dtype; dx = dg @ gate + du @ up.
pub fn swiglu_backward(
    k: KernelPolicy,
    x: &Tensor,
    saved: &SwigluSaved,
    gate: &Tensor,
    up: &Tensor,
    down: &Tensor,
    dy: &Tensor,
    want: [bool; 3],
) -> Result<(Tensor, SwigluGrads)> {
    let (dh, d_down) = linear_backward(&saved.hidden, down, dy, want[2])?;
    let (dg, du) = swiglu_elementwise_backward(k, saved, &dh, x.dtype())?;
    let (dx_g, d_gate) = linear_backward(x, gate, &dg, want[0])?;
    let (dx_u, d_up) = linear_backward(x, up, &du, want[1])?;
    Ok((
        (dx_g + dx_u)?,
        SwigluGrads {
            gate: d_gate,
            up: d_up,
            down: d_down,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        crate::rng::randn(shape, seed, 1.0, &Device::Cpu).unwrap()
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn plain_ops_match_candles_fused_forward() {
        let k = KernelPolicy::PLAIN;
        let x = randn(&[3, 7, 33], 1);
        let w = randn(&[33], 2);
        let b = randn(&[33], 3);
        let fused = candle_nn::ops::rms_norm(&x, &w, 1e-6).unwrap();
        assert!(max_abs_diff(&rms_norm(k, &x, &w, 1e-6).unwrap(), &fused) < 1e-5);
        let fused = candle_nn::ops::layer_norm(&x, &w, &b, 1e-6).unwrap();
        assert!(max_abs_diff(&layer_norm(&x, &w, &b, 1e-6).unwrap(), &fused) < 1e-5);
        let fused = candle_nn::ops::softmax_last_dim(&x).unwrap();
        assert!(max_abs_diff(&softmax_last(&x).unwrap(), &fused) < 1e-6);
        let lsm = log_softmax_last(&x).unwrap().exp().unwrap();
        assert!(max_abs_diff(&lsm, &fused) < 1e-6);
    }

    #[test]
    fn rope_layouts_match_candles_fused_rope_and_are_a_permutation_of_each_other() {
        let k = KernelPolicy::PLAIN;
        let (b, t, h, r) = (2, 5, 3, 8);
        let x = randn(&[b, t, h, r], 4);
        let cos = randn(&[t, r / 2], 5);
        let sin = randn(&[t, r / 2], 6);
        // candle's rope_i / rope take [B, H, T, R].
        let xt = x.transpose(1, 2).unwrap().contiguous().unwrap();
        let fused_i = candle_nn::rotary_emb::rope_i(&xt, &cos, &sin)
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        assert!(max_abs_diff(&rope_interleaved(k, &x, &cos, &sin).unwrap(), &fused_i) < 1e-6);
        let fused_h = candle_nn::rotary_emb::rope(&xt, &cos, &sin)
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        assert!(max_abs_diff(&rope_half(k, &x, &cos, &sin).unwrap(), &fused_h) < 1e-6);
    }

    #[test]
    fn gradients_flow_through_every_op() {
        let k = KernelPolicy::PLAIN;
        // Each op's gradient is compared with a central finite difference in f64.
        let dev = Device::Cpu;
        let x0 = randn(&[2, 3, 6], 7).to_dtype(DType::F64).unwrap();
        let w = randn(&[6], 8).to_dtype(DType::F64).unwrap();
        let bias = randn(&[6], 9).to_dtype(DType::F64).unwrap();
        let cos = randn(&[3, 3], 10).to_dtype(DType::F64).unwrap();
        let sin = randn(&[3, 3], 11).to_dtype(DType::F64).unwrap();
        let probe = randn(&[2, 3, 6], 12).to_dtype(DType::F64).unwrap();
        type F = Box<dyn Fn(&Tensor) -> Result<Tensor>>;
        let (w2, b2, c2, s2, c3, s3) = (
            w.clone(),
            bias.clone(),
            cos.clone(),
            sin.clone(),
            cos.clone(),
            sin.clone(),
        );
        let w3 = w.clone();
        let fs: Vec<(&str, F)> = vec![
            ("rms_norm", Box::new(move |x| rms_norm(k, x, &w2, 1e-6))),
            (
                "layer_norm",
                Box::new(move |x| layer_norm(x, &w3, &b2, 1e-6)),
            ),
            (
                "log_softmax",
                Box::new(|x| log_softmax_last(x)?.to_dtype(DType::F64)),
            ),
            (
                "softmax",
                Box::new(|x| softmax_last(x)?.to_dtype(DType::F64)),
            ),
            ("sigmoid", Box::new(sigmoid)),
            (
                "rope_i",
                Box::new(move |x| rope_interleaved(k, &x.reshape((2, 3, 1, 6))?, &c2, &s2)),
            ),
            (
                "rope_h",
                Box::new(move |x| rope_half(k, &x.reshape((2, 3, 1, 6))?, &c3, &s3)),
            ),
        ];
        for (name, f) in fs {
            let var = Var::from_tensor(&x0).unwrap();
            let loss = (f(var.as_tensor()).unwrap().reshape((2, 3, 6)).unwrap() * &probe)
                .unwrap()
                .sum_all()
                .unwrap();
            let grads = loss.backward().unwrap();
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient"))
                .flatten_all()
                .unwrap();
            let g: Vec<f64> = g.to_vec1().unwrap();
            let base: Vec<f64> = x0.flatten_all().unwrap().to_vec1().unwrap();
            let eval = |v: &[f64]| -> f64 {
                let t = Tensor::from_slice(v, (2, 3, 6), &dev).unwrap();
                (f(&t).unwrap().reshape((2, 3, 6)).unwrap() * &probe)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            };
            for i in [0, 5, 17, 30] {
                let (mut p, mut m) = (base.clone(), base.clone());
                p[i] += 1e-3;
                m[i] -= 1e-3;
                let fd = (eval(&p) - eval(&m)) / 2e-3;
                // log_softmax/softmax run in f32 internally; allow f32 rounding in the difference.
                assert!(
                    (fd - g[i]).abs() < 1e-3 * (1.0 + fd.abs()),
                    "{name}[{i}]: fd {fd} vs autograd {}",
                    g[i]
                );
            }
        }
    }
}
