//! The routed rows' way to the experts (the MoE dispatch): in the model's dtype, or in FP8.
//!
//! With `parallel.fp8_dispatch` the rows a MoE layer hands its routed experts are rounded to
//! FP8 e4m3 with one scale per row (per token copy), as DeepSeek-V3 dispatches: under expert
//! parallelism what crosses the fabric is the codes (1 byte a value) and the scales (4 bytes a
//! row), half the bf16 rows; the outputs come back ("combine") in the model dtype, and every
//! gradient travels in the model dtype. The rounding is applied to every routed row, whether
//! it leaves the rank or not, so a run computes the same values at every ep (one process
//! included): the expert sees Q(x), a property of the run, not of its layout.
//!
//! Numerics, per row x of S rows [D] (x in the model dtype):
//! - amax = max |x| (exact, f32); scale = max(amax, 2^-100) / 448, rounded once to f32;
//! - code = e4m3(x / scale): the f32 quotient rounded once, clamped to +-448, then rounded to
//!   nearest even into e4m3 (3 mantissa bits: relative error at most 2^-4; subnormal codes
//!   below 2^-6, absolute error at most scale 2^-10);
//! - back = f32(code) * scale rounded once to f32, then once to the model dtype.
//!
//! The gradient is the straight-through one: d(loss)/dx is taken as d(loss)/d(back), as the
//! explicit backward (`Moe::backward`) does. The FP8 rows carry no autograd graph, so a stage
//! that trains the main model through candle's autograd would lose the routed experts' path
//! to x: validation asks for `train.recompute = true` (the explicit backward) there.

use std::sync::Arc;

use candle_core::{DType, Result, Tensor};

use crate::dist::expert::{all_to_all_rows, RowExchange};
use crate::fp8::E4M3_MAX;

/// The format of the rows the routed experts receive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dispatch {
    /// The model's dtype, unrounded.
    #[default]
    Dtype,
    /// FP8 e4m3 codes and one f32 scale per row.
    Fp8,
}

/// The smallest amax a scale is made from (an all-zero row codes as zeros, scale 2^-100 / 448).
pub(crate) const AMAX_FLOOR: f64 = 7.888609052210118e-31; // 2^-100

/// Rows x [S, D] -> (codes [S, D] F8E4M3, scales [S, 1] f32), as the module comment states.
/// On a GPU the kernel (`kernels::fp8_rows`), else candle's ops on the host: its twin.
pub fn quantize_rows(x: &Tensor) -> Result<(Tensor, Tensor)> {
    if x.device().is_cuda() {
        return crate::kernels::fp8_rows::quantize_rows(
            x,
            crate::kernels::fp8_rows::RowScale::Amax,
        );
    }
    let xf = x.to_dtype(DType::F32)?;
    let amax = xf.abs()?.max_keepdim(1)?; // [S, 1]
                                          // A division (correctly rounded), not candle's `/ f64`, which multiplies by 1/448.
    let max = Tensor::new(&[[E4M3_MAX]], x.device())?;
    let scale = amax.maximum(AMAX_FLOOR)?.broadcast_div(&max)?;
    let codes = xf
        .broadcast_div(&scale)?
        .clamp(-E4M3_MAX, E4M3_MAX)?
        .to_dtype(DType::F8E4M3)?;
    Ok((codes, scale))
}

/// (codes [S, D], scales [S, 1]) -> rows [S, D] in `dtype`.
pub fn dequantize_rows(codes: &Tensor, scales: &Tensor, dtype: DType) -> Result<Tensor> {
    if codes.device().is_cuda() {
        return crate::kernels::fp8_rows::dequantize_rows(codes, scales, dtype);
    }
    codes
        .to_dtype(DType::F32)?
        .broadcast_mul(scales)?
        .to_dtype(dtype)
}

/// The routed rows `x_sorted` [S, D] (sorted by expert) as the experts receive them: sent over
/// `exchange` (group, rows to each index, rows from each index) when the experts are sharded,
/// in `dispatch`'s format. Differentiable in the dtype format; the FP8 format returns
/// detached rows (the explicit backward carries the gradient).
pub fn send_to_experts(
    x_sorted: &Tensor,
    dispatch: Dispatch,
    exchange: Option<(&Arc<dyn RowExchange>, &[usize], &[usize])>,
) -> Result<Tensor> {
    match dispatch {
        Dispatch::Dtype => match exchange {
            Some((ex, send, recv)) => all_to_all_rows(x_sorted, ex, send, recv),
            None => Ok(x_sorted.clone()),
        },
        Dispatch::Fp8 => {
            let (codes, scales) = quantize_rows(&x_sorted.detach())?;
            let (codes, scales) = match exchange {
                Some((ex, send, recv)) => (
                    all_to_all_rows(&codes, ex, send, recv)?,
                    all_to_all_rows(&scales, ex, send, recv)?,
                ),
                None => (codes, scales),
            };
            dequantize_rows(&codes, &scales, x_sorted.dtype())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The module comment's recipe, element by element on the host (f64 where it is exact).
    fn reference(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        let mut out = vec![0f32; x.len()];
        for r in 0..rows {
            let row = &x[r * cols..(r + 1) * cols];
            let amax = row.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
            let scale = (amax.max(AMAX_FLOOR) / 448.0) as f32;
            for c in 0..cols {
                let q = (row[c] / scale).clamp(-448.0, 448.0);
                let code = float8::F8E4M3::from_f32(q).to_f32();
                out[r * cols + c] = code * scale;
            }
        }
        out
    }

    #[test]
    fn fp8_rows_round_as_stated_and_stay_within_the_format_bound() -> Result<()> {
        let dev = Device::Cpu;
        let (rows, cols) = (37, 300);
        // Rows of very different magnitudes, one all zero, one with a single large value.
        let base = crate::rng::randn(&[rows, cols], 41, 1.0, &dev)?;
        let mags: Vec<f32> = (0..rows).map(|r| 2f32.powi(r as i32 - 18)).collect();
        let x = base.broadcast_mul(&Tensor::from_slice(&mags, (rows, 1), &dev)?)?;
        let mut v = x.flatten_all()?.to_vec1::<f32>()?;
        v[3 * cols..4 * cols].iter_mut().for_each(|e| *e = 0.0);
        v[5 * cols + 7] = 1e4;
        let x = Tensor::from_slice(&v, (rows, cols), &dev)?;
        let (codes, scales) = quantize_rows(&x)?;
        assert_eq!(codes.dtype(), DType::F8E4M3);
        let got = dequantize_rows(&codes, &scales, DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert_eq!(got, reference(&v, rows, cols), "bit for bit");
        let scales = scales.flatten_all()?.to_vec1::<f32>()?;
        for r in 0..rows {
            for c in 0..cols {
                let (a, b) = (v[r * cols + c], got[r * cols + c]);
                let bound = a.abs() as f64 / 16.0 + scales[r] as f64 / 1024.0;
                assert!(
                    ((a - b).abs() as f64) <= bound * 1.0001,
                    "row {r} col {c}: {a} -> {b}"
                );
            }
        }
        assert!(got[3 * cols..4 * cols].iter().all(|&e| e == 0.0));
        // Not the identity: most values move.
        let moved = v.iter().zip(&got).filter(|(a, b)| a != b).count();
        assert!(moved > v.len() / 2, "{moved} of {}", v.len());
        Ok(())
    }

    /// Against an independent reference (tools/parity/make_fp8_scores_fixture.py: numpy's f32
    /// arithmetic and ml_dtypes' e4m3 cast), bit for bit.
    #[test]
    fn fp8_rows_match_the_independent_reference() -> Result<()> {
        let (rows, cols, x) = crate::model::fp8_scores::reference_rows("x");
        let x = Tensor::from_vec(x, (rows, cols), &Device::Cpu)?;
        let (codes, scales) = quantize_rows(&x)?;
        let got = dequantize_rows(&codes, &scales, DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        crate::model::fp8_scores::assert_reference_bits(&got, "dispatch");
        Ok(())
    }

    #[test]
    fn the_fp8_dispatch_carries_no_graph_and_the_dtype_dispatch_keeps_it() -> Result<()> {
        let dev = Device::Cpu;
        let var = candle_core::Var::from_tensor(&crate::rng::randn(&[4, 8], 3, 1.0, &dev)?)?;
        let x = (var.as_tensor() * 2.0)?;
        let kept = send_to_experts(&x, Dispatch::Dtype, None)?;
        assert_eq!(kept.to_vec2::<f32>()?, x.to_vec2::<f32>()?);
        let g = kept.sum_all()?.backward()?;
        assert!(g.get(var.as_tensor()).is_some());
        let sent = send_to_experts(&x, Dispatch::Fp8, None)?;
        assert!(!sent.track_op());
        let (codes, scales) = quantize_rows(&x)?;
        let want = dequantize_rows(&codes, &scales, DType::F32)?;
        assert_eq!(sent.to_vec2::<f32>()?, want.to_vec2::<f32>()?);
        Ok(())
    }
}
