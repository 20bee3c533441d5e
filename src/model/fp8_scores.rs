//! The indexer's scores for the top-k selection in FP8 (`dsa.indexer_scores = "fp8"`), as
//! DeepSeek's deployed indexer computes them: each query head row q_I[t, j] and each key row
//! k_I[s] (after the RoPE and the key norm) is rotated by the normalised Hadamard matrix and
//! rounded to FP8 e4m3 with one power-of-two scale per row; the scores
//! I[t, s] = sum_j w[t, j] ReLU(q8[t, j] . k8[s]) are then taken from the rounded rows.
//! Only the selection reads them: the sparse-stage KL and its gradient keep the indexer's
//! unrounded scores (the straight path its training has always taken).
//!
//! Numerics, per row x [DI] (f32; DI a power of two):
//! - y = x H (f32 product; H[i, j] = (-1)^popcount(i & j) / sqrt(DI), orthogonal, so the
//!   unrounded q . k is unchanged);
//! - scale = the smallest power of two with max(amax(y), 2^-100) / scale <= 448 (exact, from
//!   the bits of amax);
//! - code = e4m3(y / scale) (the division is exact; one rounding to nearest even, clamped to
//!   +-448, which no value reaches past);
//! - back = code scale (exact).
//! Every back value has at most 4 significant bits, so it is exact in bf16 and the product of
//! two is exact in f32: the bf16 tensor-core scoring kernel and the f32 host scoring both
//! compute the FP8 scores with f32 sums, as an FP8 kernel accumulating in f32 would.
//! On a GPU the rounding is `kernels::fp8_rows` (`RowScale::PowerOfTwo`); `round_rows_host` is
//! its twin (`gpu-selftest --only fp8-scores`: bit for bit).

use candle_core::{bail, DType, Device, Result, Tensor};

use crate::kernels::fp8_rows::{self, RowScale};

/// How the indexer scores keys for the top-k selection (`dsa.indexer_scores`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SelectionScores {
    /// q_I and k_I as the model computes them: bf16 products on the tensor cores of bf16
    /// models on CUDA, f32 elsewhere.
    #[default]
    Bf16,
    /// Hadamard-rotated, e4m3 rows with power-of-two scales (the module comment).
    Fp8,
}

impl SelectionScores {
    pub const NAMES: [&'static str; 2] = ["bf16", "fp8"];

    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "bf16" => Some(Self::Bf16),
            "fp8" => Some(Self::Fp8),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Bf16 => "bf16",
            Self::Fp8 => "fp8",
        }
    }
}

/// The normalised Sylvester Hadamard matrix of order n (a power of two), [n, n] f32.
pub fn hadamard(n: usize, device: &Device) -> Result<Tensor> {
    if !n.is_power_of_two() {
        bail!("the FP8 selection scores rotate rows by a Hadamard matrix, whose order must be a power of two: the indexer's head dim is {n}");
    }
    let norm = (n as f64).powf(-0.5) as f32;
    let h: Vec<f32> = (0..n * n)
        .map(|e| {
            let (i, j) = (e / n, e % n);
            if (i & j).count_ones() % 2 == 0 {
                norm
            } else {
                -norm
            }
        })
        .collect();
    Tensor::from_vec(h, (n, n), device)
}

/// The smallest power of two s with a / s <= 448, for a >= 2^-100 (normal): with a = M 2^E
/// (M in [1, 2)), 2^(E - 8) when M <= 1.75 (448 = 1.75 2^8), else 2^(E - 7).
pub fn pow2_scale(a: f32) -> f32 {
    let bits = a.to_bits();
    let e = ((bits >> 23) & 0xff) as i32 - 127 - 8 + i32::from((bits & 0x7f_ffff) > 0x60_0000);
    f32::from_bits(((e + 127) as u32) << 23)
}

/// Rows y [rows, cols] (f32, already rotated) rounded as the module states: the host twin of
/// the kernel (`kernels::fp8_rows` with `RowScale::PowerOfTwo`, then back to f32).
pub fn round_rows_host(y: &[f32], cols: usize) -> Vec<f32> {
    y.chunks(cols)
        .flat_map(|row| {
            let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = pow2_scale(amax.max(f32::from_bits(0x0d80_0000))); // 2^-100
            row.iter().map(move |&v| {
                let q = (v / scale).clamp(-448.0, 448.0);
                float8::F8E4M3::from_f32(q).to_f32() * scale
            })
        })
        .collect()
}

/// x [.., DI] (any float dtype) -> the rows rotated and rounded as the module states, f32, same
/// shape: on a CUDA device by the kernel, elsewhere by `round_rows_host`.
pub fn round_for_scores(x: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let di = *dims.last().unwrap_or(&0);
    let rows = x.elem_count() / di.max(1);
    let y = x
        .to_dtype(DType::F32)?
        .reshape((rows, di))?
        .matmul(&hadamard(di, x.device())?)?;
    let back = if x.device().is_cuda() {
        let (codes, scales) = fp8_rows::quantize_rows(&y, RowScale::PowerOfTwo)?;
        fp8_rows::dequantize_rows(&codes, &scales, DType::F32)?
    } else {
        let host = round_rows_host(&y.flatten_all()?.to_vec1::<f32>()?, di);
        Tensor::from_vec(host, (rows, di), x.device())?
    };
    back.reshape(dims)
}

/// One field of the independent reference's fixture (tests/fixtures/fp8_scores.json, written by
/// tools/parity/make_fp8_scores_fixture.py): (rows, cols, its f32 values).
#[cfg(test)]
pub(crate) fn reference_rows(key: &str) -> (usize, usize, Vec<f32>) {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/fp8_scores.json"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("the fixture")).unwrap();
    let values = v[key]
        .as_array()
        .unwrap_or_else(|| panic!("no {key} in the fixture"))
        .iter()
        .map(|b| f32::from_bits(b.as_u64().unwrap() as u32))
        .collect();
    let dim = |k: &str| v[k].as_u64().unwrap() as usize;
    (dim("rows"), dim("cols"), values)
}

/// Fail unless `got` equals the fixture's `key` field bit for bit.
#[cfg(test)]
pub(crate) fn assert_reference_bits(got: &[f32], key: &str) {
    let want = reference_rows(key).2;
    assert_eq!(got.len(), want.len(), "{key}: length");
    let differ = got
        .iter()
        .zip(&want)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    assert_eq!(
        differ,
        0,
        "{differ} of {} values differ from the reference's {key}",
        want.len()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against an independent reference (tools/parity/make_fp8_scores_fixture.py: Sylvester's
    /// Hadamard recursion in float64, the scale from math.frexp, ml_dtypes' e4m3 cast): the
    /// rotation within f32 rounding, the rounding of the same rotated rows bit for bit.
    #[test]
    fn rounding_matches_the_independent_reference() -> Result<()> {
        let (rows, cols, x) = reference_rows("x");
        let (y, want) = (reference_rows("y").2, reference_rows("rounded").2);
        let ours = Tensor::from_vec(x, (rows, cols), &Device::Cpu)?
            .matmul(&hadamard(cols, &Device::Cpu)?)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        // Rows 1 and 2 were edited after the rotation (their amax set by hand): skip them here.
        for r in (0..rows).filter(|r| *r != 1 && *r != 2) {
            let (a, b) = (&ours[r * cols..][..cols], &y[r * cols..][..cols]);
            let norm = b.iter().map(|v| v * v).sum::<f32>().sqrt();
            let err = a
                .iter()
                .zip(b)
                .map(|(p, q)| (p - q).abs())
                .fold(0f32, f32::max);
            assert!(
                err <= 1e-6 * norm.max(f32::MIN_POSITIVE),
                "row {r}: rotation off by {err}"
            );
        }
        assert_reference_bits(&round_rows_host(&y, cols), "rounded");
        assert!(y.iter().zip(&want).filter(|(a, b)| a != b).count() > want.len() / 2);
        Ok(())
    }

    #[test]
    fn the_scale_is_the_smallest_power_of_two_that_fits() {
        for &a in &[
            448.0f32, 449.0, 1.0, 1.75, 1.7500001, 3.5e-20, 7.9e-31, 1e30, 0.875,
        ] {
            let s = pow2_scale(a);
            assert_eq!(s.to_bits() & 0x7f_ffff, 0, "{a}: {s} is a power of two");
            assert!(a / s <= 448.0, "{a} / {s}");
            assert!(a / (s / 2.0) > 448.0, "{a}: {s} is the smallest");
        }
    }

    #[test]
    fn rotated_rounded_rows_are_exact_in_bf16_and_keep_the_scores_close() -> Result<()> {
        let dev = Device::Cpu;
        let h = hadamard(8, &dev)?;
        // Orthogonal: H H^T = I.
        let eye = h.matmul(&h.t()?)?.to_vec2::<f32>()?;
        for (i, row) in eye.iter().enumerate() {
            for (j, v) in row.iter().enumerate() {
                assert!(
                    (v - f32::from(i == j)).abs() < 1e-6,
                    "H H^T [{i}, {j}] = {v}"
                );
            }
        }
        // Queries and keys of very different magnitudes, one row of zeros.
        let q = (crate::rng::randn(&[3, 5, 4, 128], 11, 1.0, &dev)? * 37.0)?;
        let k = (crate::rng::randn(&[3, 9, 128], 12, 1.0, &dev)? * 1e-3)?;
        let mut kv = k.flatten_all()?.to_vec1::<f32>()?;
        kv[..128].iter_mut().for_each(|v| *v = 0.0);
        let k = Tensor::from_vec(kv, (3, 9, 128), &dev)?;
        let (q8, k8) = (round_for_scores(&q)?, round_for_scores(&k)?);
        assert_eq!(q8.dims(), q.dims());
        for t in [&q8, &k8] {
            let v = t.flatten_all()?.to_vec1::<f32>()?;
            let via_bf16 = t
                .to_dtype(DType::BF16)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            assert_eq!(v, via_bf16, "exact in bf16");
        }
        assert!(k8
            .get(0)?
            .get(0)?
            .to_vec1::<f32>()?
            .iter()
            .all(|&v| v == 0.0));
        // The rotation keeps q . k; the rounding moves it by at most 2^-3 |q| |k| (each rounded
        // element within 2^-4 of its value, then Cauchy-Schwarz), far less in practice.
        let dots = |a: &Tensor, b: &Tensor| -> Result<Tensor> {
            a.reshape((3, 20, 128))?.matmul(&b.transpose(1, 2)?)
        };
        let (exact, rounded) = (dots(&q, &k)?, dots(&q8, &k8)?);
        let norm = |a: &Tensor, rows: usize| -> Result<Tensor> {
            a.sqr()?
                .sum_keepdim(candle_core::D::Minus1)?
                .sqrt()?
                .reshape((3, rows, 1))
        };
        let norms = norm(&q, 20)?.matmul(&norm(&k, 9)?.transpose(1, 2)?)?;
        let err = ((exact - &rounded)?.abs()? / (norms + 1e-30)?)?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(err < 0.125, "largest error relative to |q| |k|: {err}");
        let moved = (q8.reshape((60, 128))?.matmul(&hadamard(128, &dev)?)?
            - q.reshape((60, 128))?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
        assert!(moved > 0.0, "the rounding is not the identity");
        Ok(())
    }
}
