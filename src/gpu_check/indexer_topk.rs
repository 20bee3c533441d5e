//! GPU checks of the indexer scoring and top-k kernels (kernels/indexer_topk.cu) against their
//! plain twins: `IndexerProj::scores_rows` in f32 on the same bf16-rounded inputs, and
//! `dsa::topk_causal_row` on the host over the very scores the kernel saw (exact equality);
//! with document starts, `dsa::topk_key_range` over each row's keys (exact equality too).

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use super::Outcome;
use crate::kernels::indexer_topk::{
    indexer_scores_rows, indexer_topk, indexer_topk_chunked, topk_rows,
};
use crate::model::indexer::IndexerProj;

pub fn checks(gpu: &Device) -> Result<Vec<Outcome>> {
    let mut out = scores_match_twin(gpu)?;
    out.extend(topk_matches_twin(gpu)?);
    out.extend(deterministic(gpu)?);
    out.extend(topk_with_starts(gpu)?);
    Ok(out)
}

fn host_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?)
}

fn host_u32(t: &Tensor) -> Result<Vec<u32>> {
    Ok(t.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<u32>()?)
}

/// Random q [r, hi, di] bf16 (N(0, std^2) before rounding), w [r, hi] f32, k [t, di] bf16.
fn inputs(
    r: usize,
    t: usize,
    hi: usize,
    di: usize,
    std: f64,
    seed: u64,
    gpu: &Device,
) -> Result<(Tensor, Tensor, Tensor)> {
    let q = crate::rng::randn(&[r, hi, di], seed, std, gpu)?.to_dtype(DType::BF16)?;
    let w = crate::rng::randn(&[r, hi], seed + 1, 1.0, gpu)?;
    let k = crate::rng::randn(&[t, di], seed + 2, 1.0, gpu)?.to_dtype(DType::BF16)?;
    Ok((q, w, k))
}

/// (1) Scores: max |kernel - twin| / max |twin| over the causal entries < 1e-4, every causal
/// entry finite, and exactly -inf above the diagonal. The twin is f32 (matmul, ReLU, weighted
/// head sum) on the same bf16-rounded q and k.
fn scores_match_twin(gpu: &Device) -> Result<Vec<Outcome>> {
    let mut out = vec![];
    // (R, T, HI, DI, q0, std of q). Case 2 passes k as a transposed (non-contiguous) view;
    // case 1 has large magnitudes; HI 40 leaves the second head warp partly empty.
    let cases = [
        (1usize, 1usize, 64usize, 128usize, 0usize, 1.0f64),
        (97, 97, 64, 128, 0, 30.0),
        (33, 1025, 3, 32, 992, 1.0),
        (256, 4097, 64, 128, 3841, 1.0),
        (50, 300, 40, 64, 250, 1.0),
    ];
    for (i, &(r, t, hi, di, q0, std)) in cases.iter().enumerate() {
        let seed = 1000 + 10 * i as u64;
        let (q, w, mut k) = inputs(r, t, hi, di, std, seed, gpu)?;
        if i == 2 {
            k = crate::rng::randn(&[di, t], seed + 3, 1.0, gpu)?
                .to_dtype(DType::BF16)?
                .t()?;
        }
        let a = host_f32(&indexer_scores_rows(&q, &w, &k, q0)?)?;
        let proj = IndexerProj {
            q: q.to_dtype(DType::F32)?.unsqueeze(0)?,
            k: k.to_dtype(DType::F32)?.unsqueeze(0)?,
            w: w.unsqueeze(0)?,
        };
        let b = host_f32(&proj.scores_rows(0, r)?.squeeze(0)?)?;
        let (mut diff, mut scale, mut mask_bad, mut nonfinite) = (0f32, 0f32, 0usize, 0usize);
        for rr in 0..r {
            for s in 0..t {
                let (x, y) = (a[rr * t + s], b[rr * t + s]);
                if s <= q0 + rr {
                    if !x.is_finite() {
                        nonfinite += 1;
                    }
                    diff = diff.max((x - y).abs());
                    scale = scale.max(y.abs());
                } else if x != f32::NEG_INFINITY {
                    mask_bad += 1;
                }
            }
        }
        let e = diff / scale.max(1e-30);
        out.push(Outcome {
            name: "indexer scores rows kernel vs twin",
            ok: e < 1e-4 && mask_bad == 0 && nonfinite == 0 && scale > 0.0,
            detail: format!(
                "R {r} T {t} HI {hi} DI {di} q0 {q0} std {std}: max err / max |I| {e:.1e} (< 1e-4, max |I| {scale:.2e}); \
                 {nonfinite} non-finite causal, {mask_bad} non-(-inf) above the diagonal (both 0)"
            ),
        });
    }
    Ok(out)
}

/// The twin's selection of every row, sorted ascending and padded with u32::MAX to min(topk, T).
fn host_topk(scores: &[f32], r: usize, t: usize, q0: usize, topk: usize) -> Vec<u32> {
    let kk = topk.min(t);
    let mut out = vec![u32::MAX; r * kk];
    for rr in 0..r {
        let row = &scores[rr * t..(rr + 1) * t];
        let mut sel = crate::dsa::topk_causal_row(row, (q0 + rr).min(t - 1), kk);
        sel.sort_unstable();
        out[rr * kk..][..sel.len()].copy_from_slice(&sel);
    }
    out
}

/// Scores with many exact ties: causal entries drawn by `value(u, v)` from two uniforms; junk
/// (1e30) above the diagonal, which the selection must ignore.
/// A score of mostly ties: 1 with probability 1/6, else +0 or -0 (which must tie with +0).
fn ones_and_signed_zeros(u: f64, u2: f64) -> f32 {
    if u < 1.0 / 6.0 {
        1.0
    } else if u2 < 0.5 {
        -0.0
    } else {
        0.0
    }
}

fn tied_scores(
    r: usize,
    t: usize,
    q0: usize,
    seed: u64,
    value: impl Fn(f64, f64) -> f32,
) -> Vec<f32> {
    let mut rng = crate::rng::SplitMix64::new(seed);
    let mut v = vec![0f32; r * t];
    for rr in 0..r {
        for s in 0..t {
            v[rr * t + s] = if s <= q0 + rr {
                let (u, u2) = (rng.uniform(), rng.uniform());
                value(u, u2)
            } else {
                1e30
            };
        }
    }
    v
}

/// Coarse grid floor(6u) - 2 with half the zeros as -0.0, 1% -inf and 0.5% NaN.
fn grid_value(u: f64, u2: f64) -> f32 {
    if u2 < 0.01 {
        f32::NEG_INFINITY
    } else if u2 < 0.015 {
        f32::NAN
    } else {
        let x = (u * 6.0).floor() as f32 - 2.0;
        if x == 0.0 && u2 > 0.5 {
            -0.0
        } else {
            x
        }
    }
}

/// (2) Top-k: the kernel's selection equals `dsa::topk_causal_row` (sorted ascending, padded)
/// EXACTLY, on tied grid scores and on the scoring kernel's own output.
fn topk_matches_twin(gpu: &Device) -> Result<Vec<Outcome>> {
    let mut out = vec![];
    // (name, topk, T, R, q0, scores). Two-level rows (5/6 zeros, so the threshold bucket holds
    // ~16.7K keys) overflow the shared-memory candidate cache and take the global-memory path;
    // all-zero rows tie everywhere.
    let mut cases: Vec<(&'static str, usize, usize, usize, usize, Vec<f32>)> = vec![];
    for (i, &(topk, t)) in [(1usize, 1usize), (5, 97), (2048, 4097), (64, 1025)]
        .iter()
        .enumerate()
    {
        cases.push((
            "grid",
            topk,
            t,
            t,
            0,
            tied_scores(t, t, 0, 50 + i as u64, grid_value),
        ));
    }
    cases.push((
        "grid, q0 900",
        64,
        1025,
        125,
        900,
        tied_scores(125, 1025, 900, 60, grid_value),
    ));
    cases.push((
        "two-level, cache overflow",
        5000,
        20000,
        8,
        19992,
        tied_scores(8, 20000, 19992, 61, ones_and_signed_zeros),
    ));
    cases.push((
        "all zeros",
        100,
        3000,
        5,
        2995,
        tied_scores(5, 3000, 2995, 62, |_, u2| if u2 < 0.5 { -0.0 } else { 0.0 }),
    ));
    for &(topk, t) in &[(1usize, 1usize), (5, 97), (2048, 4097), (64, 1025)] {
        let (q, w, k) = inputs(t, t, 64, 128, 1.0, 70 + t as u64, gpu)?;
        cases.push((
            "kernel scores",
            topk,
            t,
            t,
            0,
            host_f32(&indexer_scores_rows(&q, &w, &k, 0)?)?,
        ));
    }
    for (what, topk, t, r, q0, scores) in cases {
        let dev_scores = Tensor::from_vec(scores.clone(), (r, t), gpu)?;
        let got = host_u32(&topk_rows(&dev_scores, q0, topk, None)?)?;
        let want = host_topk(&scores, r, t, q0, topk);
        let (bad, first) = row_diff(&got, &want, r, topk.min(t));
        out.push(Outcome {
            name: "indexer top-k kernel vs twin",
            ok: bad == 0 && got.len() == want.len(),
            detail: format!(
                "{what}: k {topk} T {t} R {r} q0 {q0}: {bad} of {r} rows differ (exact){first}"
            ),
        });
    }
    Ok(out)
}

/// (3) Determinism: two runs of the scores are bit-identical, two runs of `indexer_topk` equal,
/// and so do the chunked path (7 rows per chunk) and scores-then-top-k.
fn deterministic(gpu: &Device) -> Result<Vec<Outcome>> {
    let (r, t, hi, di, q0, topk) = (256usize, 4097usize, 64usize, 128usize, 3841usize, 2048usize);
    let (q, w, k) = inputs(r, t, hi, di, 1.0, 90, gpu)?;
    let s1: Vec<u32> = host_f32(&indexer_scores_rows(&q, &w, &k, q0)?)?
        .iter()
        .map(|x| x.to_bits())
        .collect();
    let s2: Vec<u32> = host_f32(&indexer_scores_rows(&q, &w, &k, q0)?)?
        .iter()
        .map(|x| x.to_bits())
        .collect();
    let a = host_u32(&indexer_topk(&q, &w, &k, q0, topk, None)?)?;
    let b = host_u32(&indexer_topk(&q, &w, &k, q0, topk, None)?)?;
    let c = host_u32(&indexer_topk_chunked(
        &q,
        &w,
        &k,
        q0,
        topk,
        None,
        7 * 4 * t,
    )?)?;
    let d = host_u32(&topk_rows(
        &indexer_scores_rows(&q, &w, &k, q0)?,
        q0,
        topk,
        None,
    )?)?;
    let (same_s, same_ab, same_ac, same_ad) = (s1 == s2, a == b, a == c, a == d);
    Ok(vec![Outcome {
        name: "indexer scores + top-k deterministic",
        ok: same_s && same_ab && same_ac && same_ad,
        detail: format!(
            "R {r} T {t} q0 {q0} k {topk}: scores bit-identical {same_s}, indexer_topk twice {same_ab}, \
             chunked (7 rows) {same_ac}, scores then top-k {same_ad}"
        ),
    }])
}

/// Each query's first key when the keys 0.. are cut into documents of the given lengths
/// (summing to at least `q0 + r`): starts of the rows q0..q0+r.
fn doc_starts(docs: &[usize], q0: usize, r: usize) -> Vec<u32> {
    let mut first = Vec::with_capacity(q0 + r);
    for (i, &len) in docs.iter().enumerate() {
        let s0: usize = docs[..i].iter().sum();
        first.extend(std::iter::repeat_n(s0 as u32, len));
    }
    assert!(
        first.len() >= q0 + r,
        "documents cover {} keys, not {}",
        first.len(),
        q0 + r
    );
    first[q0..q0 + r].to_vec()
}

/// The twin's selection among each row's keys start[r]..=q0 + r, sorted ascending and padded
/// with u32::MAX to min(topk, T).
fn host_topk_in(
    scores: &[f32],
    r: usize,
    t: usize,
    q0: usize,
    topk: usize,
    starts: &[u32],
) -> Vec<u32> {
    let kk = topk.min(t);
    let mut out = vec![u32::MAX; r * kk];
    for rr in 0..r {
        let row = &scores[rr * t..(rr + 1) * t];
        let last = (q0 + rr).min(t - 1);
        let mut sel = crate::dsa::topk_key_range(row, starts[rr] as usize, last, kk);
        sel.sort_unstable();
        out[rr * kk..][..sel.len()].copy_from_slice(&sel);
    }
    out
}

/// Rows of `got` that differ from `want` ([r, kk] each), and where the first one does.
fn row_diff(got: &[u32], want: &[u32], r: usize, kk: usize) -> (usize, String) {
    let bad: Vec<usize> = (0..r)
        .filter(|&rr| got[rr * kk..(rr + 1) * kk] != want[rr * kk..(rr + 1) * kk])
        .collect();
    let first = bad.first().map(|&rr| {
        let m = (0..kk)
            .find(|&j| got[rr * kk + j] != want[rr * kk + j])
            .unwrap_or(0);
        format!(
            "; first bad row {rr} at slot {m}: got {} want {}",
            got[rr * kk + m],
            want[rr * kk + m]
        )
    });
    (bad.len(), first.unwrap_or_default())
}

/// (4) Document starts: the kernel's selection among keys start[r]..=q0 + r equals
/// `dsa::topk_key_range` (sorted, padded) exactly, with several documents per sequence: a
/// length-1 document, documents shorter than top-k (selected whole, then padding), documents
/// longer (the radix select from an offset, once past the candidate cache), on tied grid scores
/// and on the scoring kernel's own output; `indexer_topk` (one chunk and 7-row chunks, which
/// narrow the starts) equals scores-then-top-k; all-zero starts give the None result bit for bit.
fn topk_with_starts(gpu: &Device) -> Result<Vec<Outcome>> {
    let mut out = vec![];
    // (name, topk, T, R, q0, document lengths, scores).
    let mut cases: Vec<(
        &'static str,
        usize,
        usize,
        usize,
        usize,
        Vec<usize>,
        Vec<f32>,
    )> = vec![];
    let docs = vec![1usize, 40, 3, 1, 300, 60, 1, 618, 1];
    cases.push((
        "grid, 9 documents",
        64,
        1025,
        1025,
        0,
        docs.clone(),
        tied_scores(1025, 1025, 0, 80, grid_value),
    ));
    cases.push((
        "grid, q0 900, a document across q0",
        64,
        1025,
        125,
        900,
        docs,
        tied_scores(125, 1025, 900, 81, grid_value),
    ));
    cases.push((
        "two-level, cache overflow after an offset",
        5000,
        20000,
        8,
        19992,
        vec![1234, 1, 18765],
        tied_scores(8, 20000, 19992, 82, ones_and_signed_zeros),
    ));
    let kdocs = vec![1usize, 700, 2047, 1, 1348];
    let (q, w, k) = inputs(4097, 4097, 64, 128, 1.0, 83, gpu)?;
    cases.push((
        "kernel scores, k 2048",
        2048,
        4097,
        4097,
        0,
        kdocs,
        host_f32(&indexer_scores_rows(&q, &w, &k, 0)?)?,
    ));
    for (what, topk, t, r, q0, docs, scores) in cases {
        let st = doc_starts(&docs, q0, r);
        let dev_scores = Tensor::from_vec(scores.clone(), (r, t), gpu)?;
        let dev_st = Tensor::from_vec(st.clone(), r, gpu)?;
        let got = host_u32(&topk_rows(&dev_scores, q0, topk, Some(&dev_st))?)?;
        let want = host_topk_in(&scores, r, t, q0, topk, &st);
        let kk = topk.min(t);
        let (bad, first) = row_diff(&got, &want, r, kk);
        out.push(Outcome {
            name: "indexer top-k kernel vs twin, document starts",
            ok: bad == 0 && got.len() == want.len(),
            detail: format!("{what}: k {topk} T {t} R {r} q0 {q0} documents {docs:?}: {bad} of {r} rows differ (exact){first}"),
        });
        let zeros = Tensor::zeros(r, DType::U32, gpu)?;
        let z = host_u32(&topk_rows(&dev_scores, q0, topk, Some(&zeros))?)?;
        let n = host_u32(&topk_rows(&dev_scores, q0, topk, None)?)?;
        out.push(Outcome {
            name: "indexer top-k, all-zero starts equal None",
            ok: z == n,
            detail: format!("{what}: k {topk} T {t} R {r} q0 {q0}: equal {}", z == n),
        });
    }
    // The fused path and its chunking with starts, against scores-then-top-k and the twin.
    let (r, t, q0, topk) = (256usize, 4097usize, 3841usize, 2048usize);
    let (q, w, k) = inputs(r, t, 64, 128, 1.0, 84, gpu)?;
    let docs = vec![1usize, 1000, 2899, 1, 196];
    let st = doc_starts(&docs, q0, r);
    let dev_st = Tensor::from_vec(st.clone(), r, gpu)?;
    let scores = indexer_scores_rows(&q, &w, &k, q0)?;
    let a = host_u32(&indexer_topk(&q, &w, &k, q0, topk, Some(&dev_st))?)?;
    let c = host_u32(&indexer_topk_chunked(
        &q,
        &w,
        &k,
        q0,
        topk,
        Some(&dev_st),
        7 * 4 * t,
    )?)?;
    let d = host_u32(&topk_rows(&scores, q0, topk, Some(&dev_st))?)?;
    let want = host_topk_in(&host_f32(&scores)?, r, t, q0, topk, &st);
    let (bad, first) = row_diff(&a, &want, r, topk.min(t));
    out.push(Outcome {
        name: "indexer top-k with document starts: fused, chunked, twin",
        ok: a == c && a == d && bad == 0,
        detail: format!(
            "R {r} T {t} q0 {q0} k {topk} documents {docs:?}: chunked (7 rows) equal {}, scores then top-k equal {}; \
             {bad} rows differ from the twin (exact){first}",
            a == c,
            a == d
        ),
    });
    Ok(out)
}
