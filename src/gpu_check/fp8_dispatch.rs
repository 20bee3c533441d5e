//! GPU check of the MoE's FP8 dispatch rounding (`model::dispatch`: per-row amax, scale =
//! amax / 448, e4m3 codes, back to the dtype) against the same ops on the host: rows of very
//! different magnitudes, an all-zero row and a row with one outlier, from bf16 and f32, at
//! widths not a multiple of 8. Bit-equal or not (candle's casts round to nearest even and
//! saturate on both devices; the f32 quotients are correctly rounded on both).

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use super::Outcome;
use crate::model::dispatch::{dequantize_rows, quantize_rows};

pub fn checks(gpu: &Device) -> Result<Vec<Outcome>> {
    let mut out = vec![];
    for (rows, cols) in [(1usize, 7usize), (37, 300), (1024, 7168)] {
        let base = crate::rng::randn(&[rows, cols], (rows * 7 + cols) as u64, 1.0, &Device::Cpu)?;
        let mags: Vec<f32> = (0..rows)
            .map(|r| 2f32.powi((r % 40) as i32 - 20) * (1.0 + (r % 3) as f32 / 3.0))
            .collect();
        let x = base.broadcast_mul(&Tensor::from_slice(&mags, (rows, 1), &Device::Cpu)?)?;
        let mut v = x.flatten_all()?.to_vec1::<f32>()?;
        if rows > 2 {
            v[cols..2 * cols].iter_mut().for_each(|e| *e = 0.0);
            v[2 * cols + 1] = 3e4;
        }
        let x = Tensor::from_vec(v, (rows, cols), &Device::Cpu)?;
        let mut equal = true;
        for dtype in [DType::BF16, DType::F32] {
            let host = x.to_dtype(dtype)?;
            let (c, s) = quantize_rows(&host)?;
            let want = dequantize_rows(&c, &s, dtype)?;
            let (c, s) = quantize_rows(&host.to_device(gpu)?)?;
            let got = dequantize_rows(&c, &s, dtype)?.to_device(&Device::Cpu)?;
            equal &= super::f32_bits(&got)? == super::f32_bits(&want)?;
        }
        out.push(Outcome {
            name: "fp8 dispatch rounding on the GPU vs the host",
            ok: equal,
            detail: format!(
                "[{rows}, {cols}] rows, bf16 and f32, per-row scales: {}",
                if equal { "bit-equal" } else { "DIFFER" }
            ),
        });
    }
    Ok(out)
}
