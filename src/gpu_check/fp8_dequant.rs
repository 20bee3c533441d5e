//! GPU check of the frozen FP8 weights' dequantisation (kernels/fp8_dequant.cu) against the
//! loader's host loop (`model::fp8_frozen::dequantize_plain`): random e4m3 bytes (every
//! pattern but the two NaNs, subnormals included) and random power-of-two and general scales,
//! to bf16 and f32, at shapes with partial scale blocks and rows not a multiple of 4 values.
//! Bit-equal or not.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use super::Outcome;
use crate::model::fp8_frozen::dequantize_plain;
use crate::rng::SplitMix64;

pub fn checks(gpu: &Device) -> Result<Vec<Outcome>> {
    let mut out = vec![];
    for (rows, cols) in [
        (1usize, 1usize),
        (130, 7),
        (256, 257),
        (2048, 7168),
        (7168, 1536),
    ] {
        let mut rng = SplitMix64::new((rows * 31 + cols) as u64);
        let bytes: Vec<u8> = (0..rows * cols)
            .map(|_| loop {
                let b = (rng.next_u64() >> 56) as u8;
                if b & 0x7f != 0x7f {
                    break b;
                }
            })
            .collect();
        let blocks = rows.div_ceil(128) * cols.div_ceil(128);
        let scales: Vec<f32> = (0..blocks)
            .map(|i| {
                let e = (rng.next_u64() % 20) as i32 - 14;
                let pow2 = 2f32.powi(e);
                // Every other block a general scale (a product that rounds in f32).
                if i % 2 == 0 {
                    pow2
                } else {
                    pow2 * (1.0 + (rng.next_u64() >> 41) as f32 / (1u64 << 23) as f32)
                }
            })
            .collect();
        let b_gpu = Tensor::from_vec(bytes.clone(), (rows, cols), gpu)?;
        let s_shape = (rows.div_ceil(128), cols.div_ceil(128));
        let s_gpu = Tensor::from_vec(scales.clone(), s_shape, gpu)?;
        let b_cpu = Tensor::from_vec(bytes, (rows, cols), &Device::Cpu)?;
        let s_cpu = Tensor::from_vec(scales, s_shape, &Device::Cpu)?;
        let mut equal = true;
        for dtype in [DType::BF16, DType::F32] {
            let got = crate::kernels::fp8_dequant::dequantize(&b_gpu, &s_gpu, dtype)?;
            let want = dequantize_plain(&b_cpu, &s_cpu, dtype)?;
            equal &=
                got.dims() == [rows, cols] && super::f32_bits(&got)? == super::f32_bits(&want)?;
        }
        out.push(Outcome {
            name: "fp8-dequant kernel vs the loader's host loop",
            ok: equal,
            detail: format!(
                "[{rows}, {cols}] e4m3 with 128 x 128 scales to bf16 and f32: {}",
                if equal { "bit-equal" } else { "DIFFER" }
            ),
        });
    }
    Ok(out)
}
