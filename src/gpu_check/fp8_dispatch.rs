//! GPU check of the MoE's FP8 dispatch rounding (kernels/fp8_rows.cu) against its host twin
//! (`model::dispatch` on the CPU: candle's ops, held to the module's stated recipe by its unit
//! tests). Rows of magnitudes 2^-18 to 2^18, an all-zero row, a row with one large value, and a
//! row of exact e4m3 midpoints (ties, normal and subnormal, signed zeros) at amax 448 (scale
//! 1); bf16 and f32 rows; codes, scales and the rows back, bit for bit.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use super::{f32_bits, Outcome};
use crate::model::dispatch::{dequantize_rows, quantize_rows};

/// Rows [rows, cols] as the module comment describes (f32 values exact in bf16 where the ties
/// row is concerned).
fn rows_with_edges(rows: usize, cols: usize, seed: u64) -> Result<Vec<f32>> {
    let base = crate::rng::randn(&[rows, cols], seed, 1.0, &Device::Cpu)?;
    let mut v = base.flatten_all()?.to_vec1::<f32>()?;
    for r in 0..rows {
        let mag = 2f32.powi((r % 37) as i32 - 18);
        v[r * cols..(r + 1) * cols]
            .iter_mut()
            .for_each(|e| *e *= mag);
    }
    if rows > 3 {
        v[cols..2 * cols].iter_mut().for_each(|e| *e = 0.0);
        v[2 * cols + cols / 2] = 3.0e4;
        // Midpoints between neighbouring e4m3 values (scale 1: amax 448): 1 + 1/16 ties down to
        // 1, 1 + 3/16 up to 1.25, -(2 + 1/8) to -2, 3 2^-10 (subnormal) up to 2^-8, 2^-10 to 0,
        // 15 2^-10 to 2^-6 (the smallest normal), then -0 and 0.
        let ties = [
            448.0,
            1.0625,
            1.1875,
            -2.125,
            3.0 * 2f32.powi(-10),
            2f32.powi(-10),
            -(15.0 * 2f32.powi(-10)),
            -0.0,
            0.0,
            240.0,
        ];
        for (c, t) in ties.iter().enumerate().take(cols) {
            v[3 * cols + c] = *t;
        }
    }
    Ok(v)
}

pub fn checks(gpu: &Device) -> Result<Vec<Outcome>> {
    let mut out = vec![];
    for (rows, cols) in [(1usize, 1usize), (37, 300), (130, 7168), (2048, 7168)] {
        let v = rows_with_edges(rows, cols, (rows * 7 + cols) as u64)?;
        let mut equal = true;
        let mut moved = 0usize;
        for dtype in [DType::BF16, DType::F32] {
            let host = Tensor::from_slice(&v, (rows, cols), &Device::Cpu)?.to_dtype(dtype)?;
            let (want_codes, want_scales) = quantize_rows(&host)?;
            let want = dequantize_rows(&want_codes, &want_scales, dtype)?;
            let (codes, scales) = quantize_rows(&host.to_device(gpu)?)?;
            let got = dequantize_rows(&codes, &scales, dtype)?;
            equal &= codes.dtype() == DType::F8E4M3
                && codes.dims() == [rows, cols]
                && scales.dims() == [rows, 1]
                && f32_bits(&codes)? == f32_bits(&want_codes)?
                && f32_bits(&scales)? == f32_bits(&want_scales)?
                && got.dtype() == dtype
                && f32_bits(&got)? == f32_bits(&want)?;
            moved += f32_bits(&got)?
                .iter()
                .zip(f32_bits(&host)?)
                .filter(|(a, b)| **a != *b)
                .count();
        }
        // Not the identity (a kernel that copied its input would round nothing).
        let rounds = rows * cols < 8 || moved > rows * cols / 2;
        out.push(Outcome {
            name: "fp8-dispatch rounding kernel vs the host path",
            ok: equal && rounds,
            detail: format!(
                "[{rows}, {cols}] bf16 and f32 rows: codes, scales and rows back {}; {moved} values moved",
                if equal { "bit-equal" } else { "DIFFER" }
            ),
        });
    }
    Ok(out)
}
