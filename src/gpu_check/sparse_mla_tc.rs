//! GPU checks of the tensor-core sparse MLA (`kernels::sparse_mla_tc`, bf16) against the f32
//! CUDA-core kernel (`kernels::sparse_mla`) run on the same bf16-rounded inputs converted to
//! f32: forward output, LSE, dq and dkv under a random upstream gradient, on awkward sizes with
//! padded selections (duplicates included), a large-magnitude case, and the deterministic dkv
//! mode (two runs bit-identical, and equal to the atomic mode within tolerance). Cases at H a
//! multiple of 64 with DQK 576 and DV 512 run the wgmma forward and the backward with S, dP and dQ on
//! wgmma; `wg_forward` and `wg_backward` also compare those with the mma.sync kernels.
//!
//! Tolerances reflect bf16 P in P V and bf16 dO, P and scale * dS as backward operands, and
//! bf16 gradients: max relative error (max |a - b| / max |b|) < 2e-2 and cosine > 0.9999.

use anyhow::{anyhow, Result};
use candle_core::{DType, Device, Tensor, Var};

use super::{cosine, rel_err, Outcome};
use crate::kernels::sparse_mla_tc as tc;
use crate::kernels::{Fused, KernelPolicy};

const REL_TOL: f32 = 2e-2;
const COS_TOL: f32 = 0.9999;
/// dq's cosine at 128-192 heads and 130-2048 keys a query, for the wgmma backward: dq sums
/// hundreds of bf16-rounded dS' terms whose row sums cancel (sum_j P_j (dP_j - delta) = 0), so
/// its rounding error relative to |dq| grows with the keys. Measured on an H200 at H 128, K 2048:
/// 0.99985, bit-equal to the mma.sync backward's dq on the same inputs (the kernels compute the
/// same f32 dS' and add the same bf16 products in the same order), so this bounds the algorithm's bf16 error, not a kernel bug;
/// the bit-equality and dkv against the f32 kernel at `COS_TOL` are what catch one.
const DQ_COS_TOL_MANY_KEYS: f32 = 0.9997;

struct Case {
    name: &'static str,
    n: usize,
    h: usize,
    k: usize,
    dqk: usize,
    dv: usize,
    /// Fraction of padding slots (slot 0 is always valid, so no query is empty).
    pad: f64,
    /// Standard deviation of q (30: very peaked softmax).
    qmul: f64,
    seed: u64,
}

struct Inputs {
    q: Tensor,
    kv: Tensor,
    idx: Tensor,
    up: Tensor,
    scale: f64,
    dv: usize,
}

/// A random selection [N, K] of absolute rows: slot j of query t picks a row in 0..=max(t, 7)
/// (below `nkv`; duplicates allowed), slot 0 always valid, a fraction `pad` of the other slots
/// padding (u32::MAX); with `empty`, every 11th query (t % 11 == 5) has only padding. Returns the
/// slots and the queries without a valid slot.
fn selection(
    n: usize,
    k: usize,
    nkv: usize,
    pad: f64,
    empty: bool,
    seed: u64,
) -> (Vec<u32>, Vec<u32>) {
    let mut rng = crate::rng::SplitMix64::new(seed);
    let mut abs = vec![u32::MAX; n * k];
    let mut none = vec![];
    for t in 0..n {
        if empty && t % 11 == 5 {
            none.push(t as u32);
            continue;
        }
        let hi = t.max(7).min(nkv - 1) as u64 + 1;
        for j in 0..k {
            if j == 0 || rng.uniform() >= pad {
                abs[t * k + j] = (rng.next_u64() % hi) as u32;
            }
        }
    }
    (abs, none)
}

/// bf16 q [N, H, DQK] and kv [max(N, 8), DQK]; idx [N, K] from `selection` (no empty query).
fn inputs(c: &Case, gpu: &Device) -> Result<Inputs> {
    let nkv = c.n.max(8);
    let q = crate::rng::randn(&[c.n, c.h, c.dqk], c.seed, c.qmul, gpu)?.to_dtype(DType::BF16)?;
    let kv = crate::rng::randn(&[nkv, c.dqk], c.seed + 1, 1.0, gpu)?.to_dtype(DType::BF16)?;
    let (abs, _) = selection(c.n, c.k, nkv, c.pad, false, c.seed + 2);
    let idx = Tensor::from_vec(abs, (c.n, c.k), gpu)?;
    let up = crate::rng::randn(&[c.n, c.h, c.dv], c.seed + 3, 1.0, gpu)?;
    Ok(Inputs {
        q,
        kv,
        idx,
        up,
        scale: 192f64.powf(-0.5),
        dv: c.dv,
    })
}

struct Run {
    out: Tensor,
    dq: Tensor,
    dkv: Tensor,
}

/// Forward and backward of loss = sum(out[..., :dv] * up) through `f`, with q and kv cast to
/// `dtype` first (bf16 for the tensor-core op, f32 for the twin).
fn run(
    x: &Inputs,
    dtype: DType,
    f: impl Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
) -> Result<Run> {
    let q = Var::from_tensor(&x.q.to_dtype(dtype)?)?;
    let kv = Var::from_tensor(&x.kv.to_dtype(dtype)?)?;
    let out = f(q.as_tensor(), kv.as_tensor())?;
    let grads = (out.narrow(2, 0, x.dv)? * &x.up)?.sum_all()?.backward()?;
    let dq = grads
        .get(q.as_tensor())
        .ok_or_else(|| anyhow!("no dq"))?
        .clone();
    let dkv = grads
        .get(kv.as_tensor())
        .ok_or_else(|| anyhow!("no dkv"))?
        .clone();
    Ok(Run { out, dq, dkv })
}

fn run_tc(x: &Inputs, kernels: KernelPolicy) -> Result<Run> {
    run(x, DType::BF16, |q, kv| {
        tc::sparse_mla_bf16(kernels, q, kv, &x.idx, x.scale, x.dv)
    })
}

fn run_twin(x: &Inputs) -> Result<Run> {
    run(x, DType::F32, |q, kv| {
        crate::kernels::sparse_mla(q, kv, &x.idx, x.scale, x.dv)
    })
}

fn bits(t: &Tensor) -> Result<Vec<u16>> {
    Ok(t.flatten_all()?
        .to_device(&Device::Cpu)?
        .to_vec1::<half::bf16>()?
        .into_iter()
        .map(|v| v.to_bits())
        .collect())
}

fn compare(c: &Case, gpu: &Device) -> Result<Outcome> {
    let x = inputs(c, gpu)?;
    let a = run_tc(&x, KernelPolicy::default())?;
    let b = run_twin(&x)?;
    let dv = c.dv;
    let e_o = rel_err(&a.out.narrow(2, 0, dv)?, &b.out.narrow(2, 0, dv)?)?;
    let c_o = cosine(&a.out.narrow(2, 0, dv)?, &b.out.narrow(2, 0, dv)?)?;
    let e_l = rel_err(&a.out.narrow(2, dv, 1)?, &b.out.narrow(2, dv, 1)?)?;
    let (e_dq, c_dq) = (rel_err(&a.dq, &b.dq)?, cosine(&a.dq, &b.dq)?);
    let (e_dkv, c_dkv) = (rel_err(&a.dkv, &b.dkv)?, cosine(&a.dkv, &b.dkv)?);
    let dtypes_ok = a.dq.dtype() == DType::BF16 && a.dkv.dtype() == DType::BF16;
    let worst = e_o.max(e_l).max(e_dq).max(e_dkv);
    let least = c_o.min(c_dq).min(c_dkv);
    // NaN compares false, so it fails here.
    let ok = dtypes_ok && worst < REL_TOL && least > COS_TOL;
    Ok(Outcome {
        name: c.name,
        ok,
        detail: format!(
            "N {} H {} K {} dqk {} dv {} q std {}: rel err out {e_o:.1e} lse {e_l:.1e} dq {e_dq:.1e} dkv {e_dkv:.1e} (< {REL_TOL:.0e}); \
             cosine out {c_o:.6} dq {c_dq:.6} dkv {c_dkv:.6} (> {COS_TOL}); grads bf16 {dtypes_ok}",
            c.n, c.h, c.k, c.dqk, c.dv, c.qmul
        ),
    })
}

/// The few-head backward (`tc::few_heads_backward`) against the plain mma.sync kernel on the
/// same inputs: with the deterministic dkv, dq and dkv bit for bit; with atomics, dkv within
/// the tolerance of the sums' order and dq bit for bit (it has no atomics).
fn few_heads(c: &Case, gpu: &Device) -> Result<Outcome> {
    let x = inputs(c, gpu)?;
    // One query a block (the merged-query path has its own checks).
    let on = KernelPolicy::default().without(Fused::SparseMergeQueries);
    let off = on.without(Fused::SparseFewHeads);
    let ran = tc::few_heads_backward(on, c.h) && !tc::few_heads_backward(off, c.h);
    let (a, b) = (run_tc(&x, on)?, run_tc(&x, off)?);
    let det = |p: KernelPolicy| run_tc(&x, p.with_deterministic(true));
    let (da, db) = (det(on)?, det(off)?);
    let det_same = bits(&da.dkv)? == bits(&db.dkv)? && bits(&da.dq)? == bits(&db.dq)?;
    let dq_same = bits(&a.dq)? == bits(&b.dq)?;
    let e = rel_err(&a.dkv, &b.dkv)?;
    Ok(Outcome {
        name: c.name,
        ok: ran && det_same && dq_same && e < 1e-2,
        detail: format!(
            "N {} H {} K {} dqk {}: deterministic dq and dkv bit-equal {det_same}; atomic dq bit-equal {dq_same}, dkv rel err {e:.1e} (< 1e-2); variant chosen {ran}",
            c.n, c.h, c.k, c.dqk
        ),
    })
}

/// Merged queries (`tc::merged_queries`: 64 / H neighbouring queries a block over the union of
/// their keys, forward and backward) against one query a block on the same inputs (padded sets
/// with duplicate keys), and against the f32 kernel at `compare`'s tolerances (dq's cosine at
/// `DQ_COS_TOL_MANY_KEYS`): the output, dq and the LSE add their keys in another order (ascending
/// kv row, not slot order) and dkv sums a group's queries before its atomic, so none is
/// bit-equal; with the deterministic dkv two merged runs are.
fn merged(c: &Case, gpu: &Device) -> Result<Outcome> {
    let x = inputs(c, gpu)?;
    let nkv = c.n.max(8);
    let on = KernelPolicy::default().with(Fused::SparseMergeQueries);
    let off = on.without(Fused::SparseMergeQueries);
    let ran = tc::merged_queries(on, c.h, c.dqk, c.dv, c.n, c.k, nkv)
        && !tc::merged_queries(off, c.h, c.dqk, c.dv, c.n, c.k, nkv);
    let (a, b, f) = (run_tc(&x, on)?, run_tc(&x, off)?, run_twin(&x)?);
    let dv = c.dv;
    let (e_o, e_l) = (
        rel_err(&a.out.narrow(2, 0, dv)?, &b.out.narrow(2, 0, dv)?)?,
        rel_err(&a.out.narrow(2, dv, 1)?, &b.out.narrow(2, dv, 1)?)?,
    );
    let f_o = rel_err(&a.out.narrow(2, 0, dv)?, &f.out.narrow(2, 0, dv)?)?;
    let (e_dq, c_dq) = (rel_err(&a.dq, &b.dq)?, cosine(&a.dq, &b.dq)?);
    let (e_dkv, c_dkv) = (rel_err(&a.dkv, &b.dkv)?, cosine(&a.dkv, &b.dkv)?);
    let (f_dq, f_dkv) = (rel_err(&a.dq, &f.dq)?, rel_err(&a.dkv, &f.dkv)?);
    let (fc_dq, fc_dkv) = (cosine(&a.dq, &f.dq)?, cosine(&a.dkv, &f.dkv)?);
    let det = on.with_deterministic(true);
    let (d1, d2) = (run_tc(&x, det)?, run_tc(&x, det)?);
    let det_same = bits(&d1.dkv)? == bits(&d2.dkv)? && bits(&d1.dq)? == bits(&d2.dq)?;
    let e_det = rel_err(&d1.dkv, &a.dkv)?;
    // The head-mean probabilities (16 heads: four queries a block, one row group each) from one
    // forward output: the same products and sums per query, so the same bits.
    // At 16 heads the probabilities must take the merged kernel too.
    let probs_ran = tc::merged_probs(on, c.h, c.dqk, c.dv, c.n, c.k, nkv);
    let probs_chosen = probs_ran == (c.h == 16);
    let probs_same = if probs_ran {
        let (qb, kvb) = (x.q.to_dtype(DType::BF16)?, x.kv.to_dtype(DType::BF16)?);
        let probs = |k: KernelPolicy| {
            tc::sparse_mla_head_mean_probs_bf16(k, &qb, &kvb, &x.idx, &b.out, x.scale, x.dv)
        };
        super::f32_bits(&probs(on)?)? == super::f32_bits(&probs(off)?)?
    } else {
        true
    };
    let ok = ran
        && e_o.max(e_l).max(e_dq).max(e_dkv).max(e_det) < 1e-2
        && f_o < REL_TOL
        && c_dq.min(c_dkv) > COS_TOL
        && f_dq.max(f_dkv) < REL_TOL
        && fc_dq > DQ_COS_TOL_MANY_KEYS
        && fc_dkv > COS_TOL
        && det_same
        && probs_chosen
        && probs_same;
    Ok(Outcome {
        name: c.name,
        ok,
        detail: format!(
            "N {} H {} K {}: vs one query a block rel err out {e_o:.1e} lse {e_l:.1e} dq {e_dq:.1e} dkv {e_dkv:.1e} (< 1e-2) cosine dq {c_dq:.6} dkv {c_dkv:.6}; \
             vs f32 rel err out {f_o:.1e} dq {f_dq:.1e} dkv {f_dkv:.1e} cosine dq {fc_dq:.6} dkv {fc_dkv:.6}; deterministic runs bit-equal {det_same}, \
             vs atomic {e_det:.1e}; merged path chosen {ran}; head-mean probabilities merged {probs_ran}, bit-equal {probs_same}",
            c.n, c.h, c.k
        ),
    })
}

/// The merged queries' keys (kernel `sparse_mla_tc_merge_queries`) against their host twin
/// (`tc::merged_keys_plain`), entry for entry: selections with duplicates and padding (and rows
/// of padding only) in groups of 2, 4 and 8 rows, k up to 2048 (the sort's largest size).
fn merged_keys(gpu: &Device) -> Result<Vec<Outcome>> {
    let mut out = vec![];
    for (rows, k, g, seed) in [
        (300usize, 2048usize, 4usize, 71u64),
        (66, 97, 2, 72),
        (80, 64, 8, 73),
        (16, 2048, 8, 74),
    ] {
        let nkv = rows.max(8);
        let (mut abs, _) = selection(rows, k, nkv, 1.0 / 3.0, false, seed);
        abs.iter_mut()
            .skip(5 * k)
            .take(k)
            .for_each(|v| *v = u32::MAX); // row 5: padding only
        let want = tc::merged_keys_plain(&abs, k, g, nkv);
        let got = tc::merged_keys(&Tensor::from_slice(&abs, (rows, k), gpu)?, g, nkv)?;
        let same = got == want;
        let entries: usize = want.iter().map(|(keys, _)| keys.len()).sum();
        out.push(Outcome {
            name: "tc sparse MLA, merged queries' keys vs host twin",
            ok: same,
            detail: format!(
                "{rows} rows of k {k} in groups of {g}: {entries} entries, {}",
                if same { "equal" } else { "DIFFER" }
            ),
        });
    }
    Ok(out)
}

/// Deterministic mode: two backward runs give bit-identical dq and dkv, close to atomic mode.
fn deterministic(c: &Case, gpu: &Device) -> Result<Outcome> {
    let x = inputs(c, gpu)?;
    let det = KernelPolicy::default().with_deterministic(true);
    let atomic = run_tc(&x, KernelPolicy::default());
    let r1 = run_tc(&x, det);
    let r2 = run_tc(&x, det);
    let (atomic, r1, r2) = (atomic?, r1?, r2?);
    let same_dkv = bits(&r1.dkv)? == bits(&r2.dkv)?;
    let same_dq = bits(&r1.dq)? == bits(&r2.dq)?;
    let e = rel_err(&r1.dkv, &atomic.dkv)?;
    let cs = cosine(&r1.dkv, &atomic.dkv)?;
    Ok(Outcome {
        name: c.name,
        ok: same_dkv && same_dq && e < REL_TOL && cs > COS_TOL,
        detail: format!(
            "N {} H {} K {}: two runs bit-identical dkv {same_dkv} dq {same_dq}; vs atomic dkv rel err {e:.1e} cosine {cs:.6}",
            c.n, c.h, c.k
        ),
    })
}

/// Head-mean probabilities (`sparse_mla_head_mean_probs_bf16`) against the f32 kernel
/// (`kernels::sparse_mla_head_mean_probs`) on the same bf16-rounded q and kv (as f32) and the
/// same LSE (the tensor-core forward's): max |a - b| / max |b| < 1e-2; every row with a valid
/// slot sums to 1 within 1e-3 (each head's probabilities over its selected slots sum to 1, so
/// their mean does too); padding slots and queries without a valid slot (every 11th query when
/// `empty` is set) are exactly 0; two runs bit-identical.
struct ProbsCase {
    name: &'static str,
    n: usize,
    h: usize,
    k: usize,
    dqk: usize,
    dv: usize,
    pad: f64,
    qmul: f64,
    empty: bool,
    seed: u64,
}

fn probs(c: &ProbsCase, gpu: &Device) -> Result<Outcome> {
    const TOL: f32 = 1e-2;
    const SUM_TOL: f32 = 1e-3;
    let nkv = c.n.max(8);
    let q = crate::rng::randn(&[c.n, c.h, c.dqk], c.seed, c.qmul, gpu)?.to_dtype(DType::BF16)?;
    let kv = crate::rng::randn(&[nkv, c.dqk], c.seed + 1, 1.0, gpu)?.to_dtype(DType::BF16)?;
    let (abs, _) = selection(c.n, c.k, nkv, c.pad, c.empty, c.seed + 2);
    let idx = Tensor::from_vec(abs.clone(), (c.n, c.k), gpu)?;
    let scale = 192f64.powf(-0.5);
    let k = KernelPolicy::default();
    let fwd = tc::sparse_mla_bf16(k, &q, &kv, &idx, scale, c.dv)?;
    let a = tc::sparse_mla_head_mean_probs_bf16(k, &q, &kv, &idx, &fwd, scale, c.dv)?;
    let a2 = tc::sparse_mla_head_mean_probs_bf16(k, &q, &kv, &idx, &fwd, scale, c.dv)?;
    let b = crate::kernels::sparse_mla_head_mean_probs(
        &q.to_dtype(DType::F32)?,
        &kv.to_dtype(DType::F32)?,
        &idx,
        &fwd,
        scale,
        c.dv,
    )?;
    // At H 128 the wgmma kernel ran: also against the mma.sync kernel on the same inputs.
    let wg = tc::wgmma_probs(k, c.h, c.dqk);
    let e_mma = if wg {
        let mma = k.without(Fused::SparseWgmma);
        let m = tc::sparse_mla_head_mean_probs_bf16(mma, &q, &kv, &idx, &fwd, scale, c.dv);
        rel_err(&a, &m?)?
    } else {
        0.0
    };
    let shape_ok = a.dims() == [c.n, c.k] && a.dtype() == DType::F32;
    let e = rel_err(&a, &b)?;
    let av = a.flatten_all()?.to_device(&Device::Cpu)?.to_vec1::<f32>()?;
    let a2v = a2
        .flatten_all()?
        .to_device(&Device::Cpu)?
        .to_vec1::<f32>()?;
    let same =
        av.len() == a2v.len() && av.iter().zip(&a2v).all(|(x, y)| x.to_bits() == y.to_bits());
    let (mut worst_sum, mut pad_max) = (0f32, 0f32);
    for t in 0..c.n {
        let row = &av[t * c.k..(t + 1) * c.k];
        let slots = &abs[t * c.k..(t + 1) * c.k];
        let mut sum = 0f32;
        for (p, &i) in row.iter().zip(slots) {
            if i == u32::MAX {
                pad_max = pad_max.max(p.abs());
            } else {
                sum += p;
            }
        }
        if slots.iter().any(|&i| i != u32::MAX) {
            // f32::max ignores NaN: map it to infinity so that it fails.
            let d = (sum - 1.0).abs();
            worst_sum = if d.is_nan() {
                f32::INFINITY
            } else {
                worst_sum.max(d)
            };
        }
    }
    let ok = shape_ok && e < TOL && worst_sum < SUM_TOL && pad_max == 0.0 && same && e_mma < TOL;
    Ok(Outcome {
        name: c.name,
        ok,
        detail: format!(
            "N {} H {} K {} dqk {} q std {}: rel err {e:.1e} (< {TOL:.0e}); worst |row sum - 1| {worst_sum:.1e} (< {SUM_TOL:.0e}); \
             max at padding {pad_max:.1e} (= 0); two runs bit-identical {same}; shape/dtype ok {shape_ok}{}",
            c.n,
            c.h,
            c.k,
            c.dqk,
            c.qmul,
            if wg { format!("; wgmma kernel, vs mma.sync {e_mma:.1e} (< {TOL:.0e})") } else { String::new() }
        ),
    })
}

/// The wgmma forward (64-head blocks at DQK 576, DV 512) against the f32 kernel and against the
/// mma.sync forward on the same inputs, forward only: output and LSE of the queries with a valid
/// slot within 2e-2 of the f32 kernel (max relative error) and 1e-2 of mma.sync (both round P to
/// bf16); queries without one (every 11th when `empty`) give a zero row and LSE -inf; two runs
/// bit-identical.
struct WgCase {
    name: &'static str,
    n: usize,
    h: usize,
    k: usize,
    pad: f64,
    qmul: f64,
    empty: bool,
    seed: u64,
}

fn wg_forward(c: &WgCase, gpu: &Device) -> Result<Outcome> {
    let (dqk, dv) = (576, 512);
    let k = KernelPolicy::default();
    if !tc::wgmma_forward(k, c.h, dqk, dv) {
        return Ok(Outcome {
            name: c.name,
            ok: false,
            detail: format!("H {} does not take the wgmma forward (switched off?)", c.h),
        });
    }
    let nkv = c.n.max(8);
    let q = crate::rng::randn(&[c.n, c.h, dqk], c.seed, c.qmul, gpu)?.to_dtype(DType::BF16)?;
    let kv = crate::rng::randn(&[nkv, dqk], c.seed + 1, 1.0, gpu)?.to_dtype(DType::BF16)?;
    let (abs, empty) = selection(c.n, c.k, nkv, c.pad, c.empty, c.seed + 2);
    let full: Vec<u32> = (0..c.n as u32).filter(|t| !empty.contains(t)).collect();
    let idx = Tensor::from_vec(abs, (c.n, c.k), gpu)?;
    let scale = 192f64.powf(-0.5);
    let wg = tc::sparse_mla_bf16(k, &q, &kv, &idx, scale, dv)?;
    let wg2 = tc::sparse_mla_bf16(k, &q, &kv, &idx, scale, dv)?;
    let mma = tc::sparse_mla_bf16(k.without(Fused::SparseWgmma), &q, &kv, &idx, scale, dv)?;
    let f32 = crate::kernels::sparse_mla(
        &q.to_dtype(DType::F32)?,
        &kv.to_dtype(DType::F32)?,
        &idx,
        scale,
        dv,
    )?;
    let same = {
        let a = wg
            .flatten_all()?
            .to_device(&Device::Cpu)?
            .to_vec1::<f32>()?;
        let b = wg2
            .flatten_all()?
            .to_device(&Device::Cpu)?
            .to_vec1::<f32>()?;
        a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits())
    };
    let rows = Tensor::from_vec(full.clone(), full.len(), gpu)?;
    let pick = |t: &Tensor| t.index_select(&rows, 0);
    let (a, b, m) = (pick(&wg)?, pick(&f32)?, pick(&mma)?);
    let e_o = rel_err(&a.narrow(2, 0, dv)?, &b.narrow(2, 0, dv)?)?;
    let e_l = rel_err(&a.narrow(2, dv, 1)?, &b.narrow(2, dv, 1)?)?;
    let e_m = rel_err(&a, &m)?;
    let c_o = cosine(&a.narrow(2, 0, dv)?, &b.narrow(2, 0, dv)?)?;
    let empty_ok = if empty.is_empty() {
        true
    } else {
        let e = wg
            .index_select(&Tensor::from_vec(empty.clone(), empty.len(), gpu)?, 0)?
            .to_device(&Device::Cpu)?;
        let outs = e.narrow(2, 0, dv)?.flatten_all()?.to_vec1::<f32>()?;
        let lses = e.narrow(2, dv, 1)?.flatten_all()?.to_vec1::<f32>()?;
        outs.iter().all(|&v| v == 0.0) && lses.iter().all(|&v| v == f32::NEG_INFINITY)
    };
    let ok = e_o < REL_TOL && e_l < REL_TOL && e_m < 1e-2 && c_o > COS_TOL && empty_ok && same;
    Ok(Outcome {
        name: c.name,
        ok,
        detail: format!(
            "N {} H {} K {} q std {}: vs f32 rel err out {e_o:.1e} lse {e_l:.1e} (< {REL_TOL:.0e}) cosine {c_o:.6}; vs mma.sync {e_m:.1e} (< 1e-2); \
             {} empty queries zero with LSE -inf {empty_ok}; two runs bit-identical {same}",
            c.n, c.h, c.k, c.qmul, empty.len()
        ),
    })
}

/// The backward with S, dP and dQ on wgmma (64-head blocks at DQK 576, DV 512) against the f32
/// kernel (the tolerances of `compare`, dq's cosine at `DQ_COS_TOL_MANY_KEYS`) and against the
/// all-mma.sync backward on the same inputs: both compute the same f32 S and dP and add dQ's
/// products tile by tile in the same k order, so dq must be bit-equal; dkv within 1e-2 (its atomics add in any order).
fn wg_backward(c: &Case, gpu: &Device) -> Result<Outcome> {
    let k = KernelPolicy::default();
    if !tc::wgmma_backward(k, c.h, c.dqk, c.dv) {
        return Ok(Outcome {
            name: c.name,
            ok: false,
            detail: format!("H {} does not take the wgmma backward (switched off?)", c.h),
        });
    }
    let x = inputs(c, gpu)?;
    let a = run_tc(&x, k)?;
    let m = run_tc(&x, k.without(Fused::SparseWgmma))?;
    let b = run_twin(&x)?;
    let (e_dq, c_dq) = (rel_err(&a.dq, &b.dq)?, cosine(&a.dq, &b.dq)?);
    let (e_dkv, c_dkv) = (rel_err(&a.dkv, &b.dkv)?, cosine(&a.dkv, &b.dkv)?);
    let (m_dq, m_dkv) = (rel_err(&a.dq, &m.dq)?, rel_err(&a.dkv, &m.dkv)?);
    let dq_bits = bits(&a.dq)? == bits(&m.dq)?;
    let ok = e_dq.max(e_dkv) < REL_TOL
        && c_dq > DQ_COS_TOL_MANY_KEYS
        && c_dkv > COS_TOL
        && m_dkv < 1e-2
        && dq_bits;
    Ok(Outcome {
        name: c.name,
        ok,
        detail: format!(
            "N {} H {} K {} q std {}: vs f32 rel err dq {e_dq:.1e} dkv {e_dkv:.1e} (< {REL_TOL:.0e}) cosine dq {c_dq:.6} (> {DQ_COS_TOL_MANY_KEYS}) dkv {c_dkv:.6} (> {COS_TOL}); \
             vs mma.sync dq {m_dq:.1e} bit-equal {dq_bits}, dkv {m_dkv:.1e} (< 1e-2)",
            c.n, c.h, c.k, c.qmul
        ),
    })
}

pub fn checks(gpu: &Device) -> Result<Vec<Outcome>> {
    let third = 1.0 / 3.0;
    let cases = [
        Case {
            name: "tc sparse MLA vs f32 kernel (H 128)",
            n: 97,
            h: 128,
            k: 64,
            dqk: 576,
            dv: 512,
            pad: third,
            qmul: 1.0,
            seed: 101,
        },
        Case {
            name: "tc sparse MLA vs f32 kernel (one query)",
            n: 1,
            h: 16,
            k: 5,
            dqk: 576,
            dv: 512,
            pad: third,
            qmul: 1.0,
            seed: 202,
        },
        Case {
            name: "tc sparse MLA vs f32 kernel (K 2048 > valid)",
            n: 300,
            h: 16,
            k: 2048,
            dqk: 576,
            dv: 512,
            pad: third,
            qmul: 1.0,
            seed: 303,
        },
        Case {
            name: "tc sparse MLA vs f32 kernel (q x 30)",
            n: 97,
            h: 128,
            k: 64,
            dqk: 576,
            dv: 512,
            pad: third,
            qmul: 30.0,
            seed: 404,
        },
        Case {
            name: "tc sparse MLA vs f32 kernel (H 20, K 97)",
            n: 33,
            h: 20,
            k: 97,
            dqk: 576,
            dv: 512,
            pad: third,
            qmul: 1.0,
            seed: 505,
        },
        Case {
            name: "tc sparse MLA vs f32 kernel (N 1025)",
            n: 1025,
            h: 16,
            k: 64,
            dqk: 576,
            dv: 512,
            pad: 0.1,
            qmul: 1.0,
            seed: 606,
        },
        Case {
            name: "tc sparse MLA vs f32 kernel (dqk 192, dv 128)",
            n: 50,
            h: 128,
            k: 40,
            dqk: 192,
            dv: 128,
            pad: third,
            qmul: 1.0,
            seed: 707,
        },
    ];
    let mut out = vec![];
    for c in &cases {
        out.push(compare(c, gpu)?);
    }
    let wg_cases = [
        WgCase {
            name: "wgmma sparse fwd (one query, H 64, K 5)",
            n: 1,
            h: 64,
            k: 5,
            pad: third,
            qmul: 1.0,
            empty: false,
            seed: 1101,
        },
        WgCase {
            name: "wgmma sparse fwd (K 2048 > valid, empty queries)",
            n: 300,
            h: 64,
            k: 2048,
            pad: third,
            qmul: 1.0,
            empty: true,
            seed: 1102,
        },
        WgCase {
            name: "wgmma sparse fwd (H 128, q x 30)",
            n: 97,
            h: 128,
            k: 64,
            pad: third,
            qmul: 30.0,
            empty: true,
            seed: 1103,
        },
        WgCase {
            name: "wgmma sparse fwd (H 192, N 1025, K 130)",
            n: 1025,
            h: 192,
            k: 130,
            pad: 0.1,
            qmul: 1.0,
            empty: false,
            seed: 1104,
        },
        WgCase {
            name: "wgmma sparse fwd (K 4097, 43 tiles)",
            n: 33,
            h: 128,
            k: 4097,
            pad: third,
            qmul: 1.0,
            empty: true,
            seed: 1105,
        },
    ];
    for c in &wg_cases {
        out.push(wg_forward(c, gpu)?);
    }
    for c in [
        Case {
            name: "wgmma sparse bwd (one query, H 64, K 5)",
            n: 1,
            h: 64,
            k: 5,
            dqk: 576,
            dv: 512,
            pad: third,
            qmul: 1.0,
            seed: 1201,
        },
        Case {
            name: "wgmma sparse bwd (H 128, K 2048 > valid, N 300)",
            n: 300,
            h: 128,
            k: 2048,
            dqk: 576,
            dv: 512,
            pad: third,
            qmul: 1.0,
            seed: 1202,
        },
        Case {
            name: "wgmma sparse bwd (H 192, N 1025, K 130)",
            n: 1025,
            h: 192,
            k: 130,
            dqk: 576,
            dv: 512,
            pad: 0.1,
            qmul: 1.0,
            seed: 1203,
        },
        Case {
            name: "wgmma sparse bwd (H 128, q x 30, K 4097)",
            n: 33,
            h: 128,
            k: 4097,
            dqk: 576,
            dv: 512,
            pad: third,
            qmul: 30.0,
            seed: 1204,
        },
    ] {
        out.push(wg_backward(&c, gpu)?);
    }
    for c in [
        Case {
            name: "tc sparse MLA deterministic dkv (H 128)",
            n: 97,
            h: 128,
            k: 64,
            dqk: 576,
            dv: 512,
            pad: third,
            qmul: 1.0,
            seed: 808,
        },
        // 300 queries at K 2048 take three chunks of 128.
        Case {
            name: "tc sparse MLA deterministic dkv (chunked)",
            n: 300,
            h: 16,
            k: 2048,
            dqk: 576,
            dv: 512,
            pad: third,
            qmul: 1.0,
            seed: 909,
        },
    ] {
        out.push(deterministic(&c, gpu)?);
    }
    // The few-head backward (256 threads a block) against the plain mma.sync kernel: each dkv
    // element is the same products in the same order, so with the deterministic dkv both give
    // the same bits; 12, 16, 20 and 32 heads, padded sets, K past the valid keys.
    for c in [
        Case {
            name: "tc sparse bwd, few-head variant vs plain (H 16, K 2048)",
            n: 300,
            h: 16,
            k: 2048,
            dqk: 576,
            dv: 512,
            pad: third,
            qmul: 1.0,
            seed: 1201,
        },
        Case {
            name: "tc sparse bwd, few-head variant vs plain (H 12, K 97)",
            n: 65,
            h: 12,
            k: 97,
            dqk: 576,
            dv: 512,
            pad: third,
            qmul: 1.0,
            seed: 1202,
        },
        Case {
            name: "tc sparse bwd, few-head variant vs plain (H 20, K 64)",
            n: 77,
            h: 20,
            k: 64,
            dqk: 576,
            dv: 512,
            pad: third,
            qmul: 1.0,
            seed: 1203,
        },
        Case {
            name: "tc sparse bwd, few-head variant vs plain (H 32, dqk 192)",
            n: 50,
            h: 32,
            k: 40,
            dqk: 192,
            dv: 128,
            pad: third,
            qmul: 1.0,
            seed: 1204,
        },
    ] {
        out.push(few_heads(&c, gpu)?);
    }
    out.extend(merged_keys(gpu)?);
    // Merged queries (forward and backward) at 16, 32 and 8 heads: long padded sets with duplicates, short sets, a
    // single group.
    for c in [
        Case {
            name: "tc sparse MLA, merged queries vs one a block (H 16, K 2048)",
            n: 300,
            h: 16,
            k: 2048,
            dqk: 576,
            dv: 512,
            pad: third,
            qmul: 1.0,
            seed: 1301,
        },
        Case {
            name: "tc sparse MLA, merged queries vs one a block (H 32, K 97)",
            n: 66,
            h: 32,
            k: 97,
            dqk: 576,
            dv: 512,
            pad: third,
            qmul: 3.0,
            seed: 1302,
        },
        Case {
            name: "tc sparse MLA, merged queries vs one a block (H 8, K 64)",
            n: 80,
            h: 8,
            k: 64,
            dqk: 576,
            dv: 512,
            pad: 0.5,
            qmul: 1.0,
            seed: 1303,
        },
        Case {
            name: "tc sparse MLA, merged queries vs one a block (H 16, one group)",
            n: 4,
            h: 16,
            k: 33,
            dqk: 576,
            dv: 512,
            pad: third,
            qmul: 1.0,
            seed: 1304,
        },
    ] {
        out.push(merged(&c, gpu)?);
    }
    for c in [
        ProbsCase {
            name: "tc head-mean probs vs f32 kernel (H 128)",
            n: 97,
            h: 128,
            k: 64,
            dqk: 576,
            dv: 512,
            pad: third,
            qmul: 1.0,
            empty: true,
            seed: 1001,
        },
        ProbsCase {
            name: "tc head-mean probs vs f32 kernel (K 2048 > valid)",
            n: 300,
            h: 16,
            k: 2048,
            dqk: 576,
            dv: 512,
            pad: third,
            qmul: 1.0,
            empty: true,
            seed: 1002,
        },
        ProbsCase {
            name: "tc head-mean probs vs f32 kernel (one query)",
            n: 1,
            h: 16,
            k: 5,
            dqk: 576,
            dv: 512,
            pad: third,
            qmul: 1.0,
            empty: false,
            seed: 1003,
        },
        ProbsCase {
            name: "tc head-mean probs vs f32 kernel (q x 30)",
            n: 97,
            h: 128,
            k: 64,
            dqk: 576,
            dv: 512,
            pad: third,
            qmul: 30.0,
            empty: true,
            seed: 1004,
        },
        // Row-group variants (H 20: 2 groups, H 40: 4) and two head passes (H 200 > 128).
        ProbsCase {
            name: "tc head-mean probs vs f32 kernel (H 20, K 97)",
            n: 33,
            h: 20,
            k: 97,
            dqk: 576,
            dv: 512,
            pad: third,
            qmul: 1.0,
            empty: true,
            seed: 1005,
        },
        ProbsCase {
            name: "tc head-mean probs vs f32 kernel (H 40, dqk 192)",
            n: 50,
            h: 40,
            k: 40,
            dqk: 192,
            dv: 128,
            pad: third,
            qmul: 1.0,
            empty: true,
            seed: 1006,
        },
        ProbsCase {
            name: "wgmma head-mean probs (H 128, K 2048 > valid, N 300)",
            n: 300,
            h: 128,
            k: 2048,
            dqk: 576,
            dv: 512,
            pad: third,
            qmul: 1.0,
            empty: true,
            seed: 1008,
        },
        ProbsCase {
            name: "wgmma head-mean probs (H 128, one query, K 5)",
            n: 1,
            h: 128,
            k: 5,
            dqk: 576,
            dv: 512,
            pad: third,
            qmul: 1.0,
            empty: false,
            seed: 1009,
        },
        ProbsCase {
            name: "tc head-mean probs vs f32 kernel (H 200, two passes)",
            n: 33,
            h: 200,
            k: 130,
            dqk: 576,
            dv: 512,
            pad: third,
            qmul: 1.0,
            empty: true,
            seed: 1007,
        },
    ] {
        out.push(probs(&c, gpu)?);
    }
    Ok(out)
}
