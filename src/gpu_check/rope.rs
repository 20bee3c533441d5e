//! The fused RoPE (`kernels::rope`) against its plain twins (`ops::rope_interleaved_plain`,
//! `ops::rope_half_plain`) on the GPU: the output and the gradient of sum(y g) for a random g
//! must be equal bit for bit, for both pair layouts, bf16 and f32.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};

use super::Outcome;
use crate::kernels::rope::Pairs;

use super::f32_bits as bits;

pub(super) fn checks(gpu: &Device) -> Result<Vec<Outcome>> {
    let mut out = vec![];
    let mut rng = crate::rng::SplitMix64::new(127);
    // (layout, dtype, [B, T, H, R], x std): MLA's q_pe (16 heads) and k_pe (one head), the
    // indexer's queries (64 heads, f32) and keys, one pair, large values; the tables of a
    // sequence longer than T, narrowed to rows 5.. (an offset view, as the query blocks take).
    let cases: [(Pairs, DType, [usize; 4], f64); 6] = [
        (Pairs::Interleaved, DType::BF16, [1, 97, 16, 64], 1.0),
        (Pairs::Interleaved, DType::F32, [2, 1025, 1, 64], 3.0),
        (Pairs::Halves, DType::F32, [1, 300, 64, 64], 1.0),
        (Pairs::Halves, DType::BF16, [2, 33, 1, 64], 100.0),
        (Pairs::Interleaved, DType::F32, [1, 1, 1, 2], 1.0),
        (Pairs::Halves, DType::BF16, [1, 4097, 3, 8], 1.0),
    ];
    for (pairs, dtype, shape, std) in cases {
        let [_, t, _, r] = shape;
        let angles = (crate::rng::randn(&[t + 5, r / 2], rng.next_u64(), 1.0, gpu)? * 1e3)?;
        let (cos, sin) = (
            angles.cos()?.narrow(0, 5, t)?,
            angles.sin()?.narrow(0, 5, t)?,
        );
        let x = crate::rng::randn(&shape, rng.next_u64(), std, gpu)?.to_dtype(dtype)?;
        let g = crate::rng::randn(&shape, rng.next_u64(), 1.0, gpu)?.to_dtype(dtype)?;
        let run = |fused: bool| -> Result<(Tensor, Tensor)> {
            let xv = Var::from_tensor(&x)?;
            let y = match (fused, pairs) {
                (true, _) => crate::kernels::rope::rope(xv.as_tensor(), &cos, &sin, pairs)?,
                (false, Pairs::Interleaved) => {
                    crate::ops::rope_interleaved_plain(xv.as_tensor(), &cos, &sin)?
                }
                (false, Pairs::Halves) => crate::ops::rope_half_plain(xv.as_tensor(), &cos, &sin)?,
            };
            let grads = (y.to_dtype(DType::F32)? * g.to_dtype(DType::F32)?)?
                .sum_all()?
                .backward()?;
            let dx = grads
                .get(xv.as_tensor())
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("no gradient"))?;
            Ok((y, dx))
        };
        let ((yf, dxf), (yp, dxp)) = (run(true)?, run(false)?);
        let count = |a: &Tensor, b: &Tensor| -> Result<usize> {
            Ok(bits(a)?
                .iter()
                .zip(bits(b)?)
                .filter(|(p, q)| **p != *q)
                .count())
        };
        let (dy, ddx) = (count(&yf, &yp)?, count(&dxf, &dxp)?);
        out.push(Outcome {
            name: "fused RoPE vs twin (bitwise)",
            ok: dy == 0 && ddx == 0 && yf.dims() == yp.dims(),
            detail: format!("{pairs:?} {dtype:?} {shape:?} std {std}: {dy} outputs and {ddx} gradients differ of {}", x.elem_count()),
        });
    }
    Ok(out)
}
