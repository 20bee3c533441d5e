//! GPU check of the indexer's FP8 selection rounding (`model::fp8_scores`: rows rotated, then
//! e4m3 with power-of-two scales by kernels/fp8_rows.cu) against its host twin
//! (`fp8_scores::round_rows_host`) on the same rotated rows, bit for bit: query and key rows at
//! the 671B indexer's head dim 128 of magnitudes 2^-20 to 2^20, an all-zero row, rows whose
//! amax sits on 448 2^e and just above it (where the scale doubles). Then the e4m3 scoring kernel
//! (`kernels::indexer_topk::indexer_topk_fp8`) against its twin, the rounded rows through the
//! bf16 kernel (exact in bf16, f32 sums): the scores within the tensor cores' FP8 accumulation
//! (max |a - b| / max |b| < 1e-3) and the top-k sets (mean recall of the twin's set > 0.99), at
//! the 671B indexer's 64 x 128 and at 32 x 64, rows past the causal diagonal, a document start.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use super::{f32_bits, Outcome};
use crate::kernels::fp8_rows::{dequantize_rows, quantize_rows, RowScale};
use crate::kernels::indexer_topk::{
    indexer_scores_rows, indexer_scores_rows_fp8, indexer_topk, indexer_topk_fp8,
};
use crate::model::fp8_scores::{hadamard, quantize_for_scores, round_for_scores, round_rows_host};

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
    for (r, t, hi, di, q0) in [
        (96usize, 1000usize, 64usize, 128usize, 904usize),
        (300, 4096, 32, 64, 3796),
    ] {
        out.push(scoring_kernel(gpu, (r, t, hi, di, q0))?);
    }
    Ok(out)
}

/// The e4m3 scoring kernel against the rounded rows through the bf16 kernel, for the last `r`
/// query rows (from q0) of `t` keys.
fn scoring_kernel(
    gpu: &Device,
    (r, t, hi, di, q0): (usize, usize, usize, usize, usize),
) -> Result<Outcome> {
    let q = crate::rng::randn(&[r, hi, di], 31, 1.0, gpu)?;
    let k = crate::rng::randn(&[t, di], 32, 1.0, gpu)?;
    let w = crate::rng::randn(&[r, hi], 33, (hi as f64 * di as f64).powf(-0.5), gpu)?;
    let topk = 256.min(t);
    let (q8, k8) = (quantize_for_scores(&q)?, quantize_for_scores(&k)?);
    let got = indexer_scores_rows_fp8(&q8, &w, &k8, q0)?;
    let (qr, kr) = (
        round_for_scores(&q)?.to_dtype(DType::BF16)?,
        round_for_scores(&k)?.to_dtype(DType::BF16)?,
    );
    let want = indexer_scores_rows(&qr, &w, &kr, q0)?;
    // The causal entries only (both write -inf past the diagonal).
    let finite = want.ge(-1e30)?;
    let zero = want.zeros_like()?;
    let (g, wv) = (
        finite.where_cond(&got, &zero)?,
        finite.where_cond(&want, &zero)?,
    );
    let err = super::rel_err(&g, &wv)?;
    let infs_agree = got
        .ge(-1e30)?
        .eq(&finite)?
        .to_dtype(DType::F32)?
        .mean_all()?
        .to_scalar::<f32>()?
        == 1.0;
    // A document starting at key 100 for the second half of the rows.
    let starts: Vec<u32> = (0..r).map(|i| if i < r / 2 { 0 } else { 100 }).collect();
    let starts = Tensor::from_vec(starts, r, gpu)?;
    let sets = indexer_topk_fp8(&q8, &w, &k8, q0, topk, Some(&starts))?;
    let twin = indexer_topk(&qr, &w, &kr, q0, topk, Some(&starts))?;
    let sel = |x: &Tensor| -> candle_core::Result<crate::dsa::Selection> {
        crate::dsa::Selection::from_absolute(x.unsqueeze(0)?, t)
    };
    let agree = crate::dsa::agreement_rows(&sel(&sets)?, &sel(&twin)?)?;
    let recall = agree.narrow(2, 1, 1)?.mean_all()?.to_scalar::<f32>()?;
    let same = agree.narrow(2, 0, 1)?.mean_all()?.to_scalar::<f32>()?;
    Ok(Outcome {
        name: "fp8 indexer scoring kernel vs the rounded rows through the bf16 kernel",
        ok: err < 1e-3 && infs_agree && recall > 0.99,
        detail: format!(
            "{r} rows from {q0} of {t} keys, {hi} x {di}: scores rel err {err:.1e} (< 1e-3), masks agree {infs_agree}; \
             top-{topk} sets equal {same:.4}, recall {recall:.4} (> 0.99)"
        ),
    })
}
