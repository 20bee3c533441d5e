//! GPU check of the indexer's FP8 selection rounding (`model::fp8_scores`: rows rotated, then
//! e4m3 with power-of-two scales by kernels/fp8_rows.cu) against its host twin
//! (`fp8_scores::round_rows_host`) on the same rotated rows, bit for bit: query and key rows at
//! the 671B indexer's head dim 128 of magnitudes 2^-20 to 2^20, an all-zero row, rows whose
//! amax sits on 448 2^e and just above it (where the scale doubles).

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use super::{f32_bits, Outcome};
use crate::kernels::fp8_rows::{dequantize_rows, quantize_rows, RowScale};
use crate::model::fp8_scores::{hadamard, round_rows_host};

pub fn checks(gpu: &Device) -> Result<Vec<Outcome>> {
    let mut out = vec![];
    for (rows, seed) in [(7usize, 3u64), (4096, 4)] {
        let di = 128;
        let x = crate::rng::randn(&[rows, di], seed, 1.0, &Device::Cpu)?;
        let mags: Vec<f32> = (0..rows).map(|r| 2f32.powi((r % 41) as i32 - 20)).collect();
        let x = x.broadcast_mul(&Tensor::from_slice(&mags, (rows, 1), &Device::Cpu)?)?;
        let y = x.matmul(&hadamard(di, &Device::Cpu)?)?;
        let mut v = y.flatten_all()?.to_vec1::<f32>()?;
        v[..di].iter_mut().for_each(|e| *e = 0.0);
        if rows > 3 {
            // amax exactly 448 2^-3 (scale 2^-3), then one ulp above it (scale 2^-2).
            v[di] = 56.0;
            v[2 * di] = f32::from_bits(56f32.to_bits() + 1);
        }
        let want = round_rows_host(&v, di);
        let (codes, scales) = quantize_rows(
            &Tensor::from_slice(&v, (rows, di), gpu)?,
            RowScale::PowerOfTwo,
        )?;
        let got = dequantize_rows(&codes, &scales, DType::F32)?;
        let host = Tensor::from_vec(want, (rows, di), &Device::Cpu)?;
        let equal = f32_bits(&got)? == f32_bits(&host)?;
        let pow2 = scales
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .all(|s| s.to_bits() & 0x7f_ffff == 0);
        out.push(Outcome {
            name: "fp8 selection rounding kernel vs the host twin",
            ok: equal && pow2,
            detail: format!(
                "[{rows}, {di}] rotated rows: rows back {}; scales powers of two {pow2}",
                if equal { "bit-equal" } else { "DIFFER" }
            ),
        });
    }
    Ok(out)
}
