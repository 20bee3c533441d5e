//! The fused SwiGLU elementwise ops (`kernels::swiglu`) against their plain twins
//! (`ops::silu_mul_plain`, `ops::silu_mul_backward_plain`) on the GPU: h, dg and du equal bit
//! for bit, bf16 and f32, on values that reach exp's tails (|g| up to about 100), and the
//! gradient autograd takes through the fused op equal to the explicit backward's.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};

use super::Outcome;

use super::f32_bits as bits;

fn values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

pub(super) fn checks(gpu: &Device) -> Result<Vec<Outcome>> {
    let mut out = vec![];
    for (dtype, shape, std) in [
        (DType::BF16, vec![97, 2048], 3.0),
        (DType::F32, vec![33, 1000], 3.0),
        (DType::BF16, vec![5, 7, 64], 40.0),
    ] {
        let g = crate::rng::randn(&shape, 1, std, gpu)?.to_dtype(dtype)?;
        let u = crate::rng::randn(&shape, 2, 1.0, gpu)?.to_dtype(dtype)?;
        let dh = crate::rng::randn(&shape, 3, 1.0, gpu)?.to_dtype(dtype)?;
        let same_h = bits(&crate::kernels::swiglu::silu_mul(&g, &u)?)?
            == bits(&crate::ops::silu_mul_plain(&g, &u)?)?;
        let (dg, du) = crate::kernels::swiglu::silu_mul_backward(&g, &u, &dh)?;
        let (dg0, du0) = crate::ops::silu_mul_backward_plain(&g, &u, &dh)?;
        let same_d = bits(&dg)? == bits(&dg0)? && bits(&du)? == bits(&du0)?;
        // Autograd through the fused op takes the same backward.
        let (gv, uv) = (Var::from_tensor(&g)?, Var::from_tensor(&u)?);
        let grads = (crate::kernels::swiglu::silu_mul(gv.as_tensor(), uv.as_tensor())?
            .to_dtype(DType::F32)?
            * dh.to_dtype(DType::F32)?)?
        .sum_all()?
        .backward()?;
        // By value, not by bits: candle's autograd sums each gradient into a zero, which turns
        // an underflowed -0 (dg at g far below 0) into +0.
        let same_a = match (grads.get(gv.as_tensor()), grads.get(uv.as_tensor())) {
            (Some(a), Some(b)) => values(a)? == values(&dg)? && values(b)? == values(&du)?,
            _ => false,
        };
        out.push(Outcome {
            name: "fused SwiGLU vs twin",
            ok: same_h && same_d && same_a,
            detail: format!("{dtype:?} {shape:?}, |g| ~ {std}: forward {}, backward {}, autograd through the fused op {}", eq(same_h), eq(same_d), eq(same_a)),
        });
    }
    Ok(out)
}

fn eq(same: bool) -> &'static str {
    if same {
        "bit-equal"
    } else {
        "DIFFERS"
    }
}
