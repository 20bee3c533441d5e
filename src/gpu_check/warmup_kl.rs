//! GPU checks of `kernels::warmup_kl`: the dense attention forward (output and LSE), its
//! backward (dq, dk, dv; repeatable bit for bit), and the
//! streaming warm-up KL with its indexer gradients, against their plain candle twins on fresh
//! random inputs, plus the memory bound of the KL kernel at T = 32768; and all three with
//! document starts (against the twins with the same starts; all-zero starts against None).
//!
//! Inputs are bf16-rounded for both sides (q, k, v are bf16; qi and ki are f32 holding
//! bf16-exact values, so the kernel's bf16 staging of them is exact and the comparison measures
//! accumulation order and the bf16 rounding of the kernels' intermediate operands only).

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use super::{cosine, rel_err, Outcome};
use crate::kernels::warmup_kl as wk;

/// 671B softmax scale factor mscale^2 (YaRN factor 40).
fn mscale2() -> f64 {
    let m = 0.1 * 40f64.ln() + 1.0;
    m * m
}

fn randn_bf16(shape: &[usize], seed: u64, std: f64, gpu: &Device) -> Result<Tensor> {
    Ok(crate::rng::randn(shape, seed, std, gpu)?.to_dtype(DType::BF16)?)
}

fn finite(t: &Tensor) -> Result<bool> {
    Ok(t.to_dtype(DType::F32)?
        .abs()?
        .sum_all()?
        .to_scalar::<f32>()?
        .is_finite())
}

/// Max-abs relative error and cosine against the reference `b`. An all-zero reference (T = 1:
/// one key, so p = softmax(I) = 1, kl = 0 and every gradient is 0) is judged by the kernel's
/// absolute magnitude instead (< 1e-4).
fn compare(a: &Tensor, b: &Tensor, rel_tol: f32, cos_tol: f32) -> Result<(bool, String)> {
    if !finite(a)? {
        return Ok((false, "kernel output not finite".into()));
    }
    let amax = |t: &Tensor| -> Result<f32> {
        Ok(t.to_dtype(DType::F32)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?)
    };
    if amax(b)? < 1e-6 {
        let m = amax(a)?;
        return Ok((m < 1e-4, format!("ref 0, |kernel| max {m:.1e}")));
    }
    let e = rel_err(a, b)?;
    let c = cosine(a, b)?;
    Ok((
        e < rel_tol && c > cos_tol,
        format!("rel {e:.1e} cos {c:.6}"),
    ))
}

pub fn checks(gpu: &Device) -> Result<Vec<Outcome>> {
    let mut out = vec![];
    // (B, H, T, DQK, DV, HI, DI, q/k std, w std): the bench dims at awkward lengths (1, 97,
    // 1025 = 8 query blocks + 1 row, 17 key chunks), one case with large magnitudes (peaked
    // attention and indexer softmaxes), and the tiny test-model dims.
    let cases = [
        (
            1usize, 16usize, 1usize, 192usize, 128usize, 64usize, 128usize, 1.0f64, 0.1f64,
        ),
        (2, 16, 97, 192, 128, 64, 128, 3.0, 1.0),
        (1, 4, 1025, 192, 128, 64, 128, 1.0, 0.1),
        (2, 3, 97, 48, 32, 4, 32, 2.0, 0.5),
    ];
    let g = 0.37;
    for (i, &(b, h, t, dqk, dv, hi, di, sd, wsd)) in cases.iter().enumerate() {
        let seed = 7100 + 10 * i as u64;
        let scale = (dqk as f64).powf(-0.5) * mscale2();
        let q = randn_bf16(&[b, h, t, dqk], seed, sd, gpu)?;
        let k = randn_bf16(&[b, h, t, dqk], seed + 1, sd, gpu)?;
        let v = randn_bf16(&[b, h, t, dv], seed + 2, 1.0, gpu)?;
        let qi = randn_bf16(&[b, t, hi, di], seed + 3, 1.0, gpu)?.to_dtype(DType::F32)?;
        let ki = randn_bf16(&[b, t, di], seed + 4, 1.0, gpu)?.to_dtype(DType::F32)?;
        let w = crate::rng::randn(&[b, t, hi], seed + 5, wsd, gpu)?;

        let (o_k, lse_k) = wk::dense_attention_fwd(&q, &k, &v, scale, None)?;
        let (o_t, lse_t) = wk::dense_attention_fwd_plain(&q, &k, &v, scale, None)?;
        let (ok_o, d_o) = compare(&o_k, &o_t, 1e-2, 0.9999)?;
        let (ok_l, d_l) = compare(&lse_k, &lse_t, 1e-2, 0.9999)?;
        out.push(Outcome {
            name: "dense attention fwd kernel vs twin",
            ok: ok_o && ok_l,
            detail: format!("B {b} H {h} T {t} dqk {dqk} dv {dv} std {sd}: out {d_o}; lse {d_l} (rel < 1e-2, cos > 0.9999)"),
        });

        // The kernel reads the kernel's LSE; the twin recomputes the softmax from scratch.
        let kk = wk::warmup_kl(&q, &k, &lse_k, scale, &qi, &w, &ki, g, None)?;
        let tw = wk::warmup_kl_plain(&q, &k, scale, &qi, &w, &ki, g, None)?;
        let (ok, parts) = compare_kl(&kk, &tw)?;
        out.push(Outcome {
            name: "warm-up KL kernel vs twin",
            ok,
            detail: format!(
                "B {b} H {h} T {t} dqk {dqk} HI {hi} DI {di} std {sd}/{wsd} g {g}: {} (rel < 2e-2, cos > 0.999)",
                parts.join("; ")
            ),
        });
    }
    out.extend(backward_checks(gpu)?);
    out.extend(document_checks(gpu)?);
    out.push(memory_check(gpu)?);
    Ok(out)
}

/// The dense attention backward kernel against its plain twin (`backward_blocks`, f32) from the
/// same forward output and LSE, on fresh random inputs: T = 1, 97 and 1025 (a partial last
/// tile), 4097 with large magnitudes (peaked softmax rows), the tiny, mini and bench head dims;
/// and its promise of bitwise repeatability (two runs compared exactly).
fn backward_checks(gpu: &Device) -> Result<Vec<Outcome>> {
    let mut out = vec![];
    let cases = [
        (1usize, 2usize, 1usize, 192usize, 128usize, 1.0f64),
        (2, 3, 97, 48, 32, 2.0),
        (2, 8, 1025, 96, 64, 1.0),
        (1, 2, 4097, 192, 128, 3.0),
        (1, 3, 130, 64, 128, 1.5),
    ];
    for (i, &(b, h, t, dqk, dv, sd)) in cases.iter().enumerate() {
        let seed = 7300 + 10 * i as u64;
        let scale = (dqk as f64).powf(-0.5) * mscale2();
        let q = randn_bf16(&[b, h, t, dqk], seed, sd, gpu)?;
        let k = randn_bf16(&[b, h, t, dqk], seed + 1, sd, gpu)?;
        let v = randn_bf16(&[b, h, t, dv], seed + 2, 1.0, gpu)?;
        let dout = randn_bf16(&[b, h, t, dv], seed + 3, 1.0, gpu)?;
        let (o, lse) = wk::dense_attention_fwd(&q, &k, &v, scale, None)?;
        let ours = wk::dense_attention_bwd(&q, &k, &v, &o, &lse, &dout, scale, None)?;
        let again = wk::dense_attention_bwd(&q, &k, &v, &o, &lse, &dout, scale, None)?;
        let twin = crate::model::dense_recompute::backward_blocks(
            &q, &k, &v, &o, &lse, &dout, scale, 256, None,
        )?;
        let (ok, parts) = compare_named(&[
            ("dq", &ours.0, &twin.0),
            ("dk", &ours.1, &twin.1),
            ("dv", &ours.2, &twin.2),
        ])?;
        let mut same = true;
        for (a, r) in [
            (&ours.0, &again.0),
            (&ours.1, &again.1),
            (&ours.2, &again.2),
        ] {
            same &= (a - r)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? == 0.0;
        }
        out.push(Outcome {
            name: "dense attention bwd kernel vs twin",
            ok: ok && same,
            detail: format!("B {b} H {h} T {t} dqk {dqk} dv {dv} std {sd}: {} (rel < 2e-2, cos > 0.999); two runs bitwise equal: {same}", parts.join("; ")),
        });
    }
    Ok(out)
}

/// Key starts u32 [B, T] of sequences cut into documents (`docs[b]`: lengths summing to T).
fn doc_starts(docs: &[Vec<usize>], t: usize, gpu: &Device) -> Result<Tensor> {
    let mut v = Vec::with_capacity(docs.len() * t);
    for seq in docs {
        anyhow::ensure!(
            seq.iter().sum::<usize>() == t,
            "documents {seq:?} do not cover {t} tokens"
        );
        let mut s0 = 0usize;
        for &len in seq {
            v.extend(std::iter::repeat_n(s0 as u32, len));
            s0 += len;
        }
    }
    Ok(Tensor::from_vec(v, (docs.len(), t), gpu)?)
}

/// Are a and b equal bit for bit (f32 bits of the values, so -0.0 differs from +0.0)?
fn same_bits(a: &Tensor, b: &Tensor) -> Result<bool> {
    let bits = |x: &Tensor| -> Result<Vec<u32>> {
        Ok(x.to_dtype(DType::F32)?
            .flatten_all()?
            .to_device(&Device::Cpu)?
            .to_vec1::<f32>()?
            .into_iter()
            .map(f32::to_bits)
            .collect())
    };
    Ok(a.dims() == b.dims() && bits(a)? == bits(b)?)
}

/// Document masking: the forward, backward and warm-up KL kernels with document starts against
/// their twins with the same starts (the tolerances of the causal checks above), on sequences of
/// several documents: length-1 documents (a sequence of them only: every query sees itself),
/// boundaries inside 64-key tiles, query tiles entirely inside a late document (their earlier
/// key tiles are skipped) and key blocks whose later query tiles all start after them (kernel
/// 3 skips those). Then all-zero starts against
/// None: forward, backward, kl, dqi and dw bit for bit; dki (f32 atomics across query blocks,
/// whose order is not repeatable even for two identical calls) within 1e-5 relative.
fn document_checks(gpu: &Device) -> Result<Vec<Outcome>> {
    let mut out = vec![];
    // (B, H, T, DQK, DV, HI, DI, q/k std, w std, documents of each sequence).
    let cases: Vec<(
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        f64,
        f64,
        Vec<Vec<usize>>,
    )> = vec![
        (
            2,
            4,
            300,
            192,
            128,
            64,
            128,
            1.0,
            0.1,
            vec![vec![1, 40, 100, 3, 156], vec![64, 1, 200, 35]],
        ),
        (1, 3, 97, 48, 32, 4, 32, 2.0, 0.5, vec![vec![10, 1, 86]]),
        (
            1,
            4,
            1025,
            192,
            128,
            64,
            128,
            3.0,
            1.0,
            vec![vec![130, 1, 700, 193, 1]],
        ),
        (
            2,
            2,
            513,
            64,
            64,
            8,
            64,
            1.0,
            0.3,
            vec![vec![1; 513], vec![256, 257]],
        ),
    ];
    let g = 0.37;
    for (i, (b, h, t, dqk, dv, hi, di, sd, wsd, docs)) in cases.into_iter().enumerate() {
        let seed = 7500 + 10 * i as u64;
        let scale = (dqk as f64).powf(-0.5) * mscale2();
        let starts = doc_starts(&docs, t, gpu)?;
        let zeros = Tensor::zeros((b, t), DType::U32, gpu)?;
        let q = randn_bf16(&[b, h, t, dqk], seed, sd, gpu)?;
        let k = randn_bf16(&[b, h, t, dqk], seed + 1, sd, gpu)?;
        let v = randn_bf16(&[b, h, t, dv], seed + 2, 1.0, gpu)?;
        let dout = randn_bf16(&[b, h, t, dv], seed + 3, 1.0, gpu)?;
        let qi = randn_bf16(&[b, t, hi, di], seed + 4, 1.0, gpu)?.to_dtype(DType::F32)?;
        let ki = randn_bf16(&[b, t, di], seed + 5, 1.0, gpu)?.to_dtype(DType::F32)?;
        let w = crate::rng::randn(&[b, t, hi], seed + 6, wsd, gpu)?;
        let shape = format!("B {b} H {h} T {t} dqk {dqk} dv {dv} HI {hi} DI {di} std {sd}/{wsd}");
        let ndocs: Vec<usize> = docs.iter().map(Vec::len).collect();

        let (o_k, lse_k) = wk::dense_attention_fwd(&q, &k, &v, scale, Some(&starts))?;
        let (o_t, lse_t) = wk::dense_attention_fwd_plain(&q, &k, &v, scale, Some(&starts))?;
        let (ok_o, d_o) = compare(&o_k, &o_t, 1e-2, 0.9999)?;
        let (ok_l, d_l) = compare(&lse_k, &lse_t, 1e-2, 0.9999)?;
        out.push(Outcome {
            name: "dense attention fwd kernel vs twin, document starts",
            ok: ok_o && ok_l,
            detail: format!(
                "{shape}, {ndocs:?} documents: out {d_o}; lse {d_l} (rel < 1e-2, cos > 0.9999)"
            ),
        });

        let mut bwd = None;
        if wk::backward_supported(dqk, dv) {
            let ours =
                wk::dense_attention_bwd(&q, &k, &v, &o_k, &lse_k, &dout, scale, Some(&starts))?;
            let twin = crate::model::dense_recompute::backward_blocks(
                &q,
                &k,
                &v,
                &o_k,
                &lse_k,
                &dout,
                scale,
                256,
                Some(&starts),
            )?;
            let (ok, parts) = compare_named(&[
                ("dq", &ours.0, &twin.0),
                ("dk", &ours.1, &twin.1),
                ("dv", &ours.2, &twin.2),
            ])?;
            out.push(Outcome {
                name: "dense attention bwd kernel vs twin, document starts",
                ok,
                detail: format!(
                    "{shape}, {ndocs:?} documents: {} (rel < 2e-2, cos > 0.999)",
                    parts.join("; ")
                ),
            });
            bwd = Some(ours);
        }

        let kk = wk::warmup_kl(&q, &k, &lse_k, scale, &qi, &w, &ki, g, Some(&starts))?;
        let tw = wk::warmup_kl_plain(&q, &k, scale, &qi, &w, &ki, g, Some(&starts))?;
        let (ok, parts) = compare_kl(&kk, &tw)?;
        out.push(Outcome {
            name: "warm-up KL kernel vs twin, document starts",
            ok,
            detail: format!(
                "{shape} g {g}, {ndocs:?} documents: {} (rel < 2e-2, cos > 0.999)",
                parts.join("; ")
            ),
        });

        // All-zero starts are None.
        let (o_n, lse_n) = wk::dense_attention_fwd(&q, &k, &v, scale, None)?;
        let (o_z, lse_z) = wk::dense_attention_fwd(&q, &k, &v, scale, Some(&zeros))?;
        let mut same = vec![
            ("out", same_bits(&o_z, &o_n)?),
            ("lse", same_bits(&lse_z, &lse_n)?),
        ];
        if bwd.is_some() {
            let n = wk::dense_attention_bwd(&q, &k, &v, &o_n, &lse_n, &dout, scale, None)?;
            let z = wk::dense_attention_bwd(&q, &k, &v, &o_n, &lse_n, &dout, scale, Some(&zeros))?;
            same.push(("dq", same_bits(&z.0, &n.0)?));
            same.push(("dk", same_bits(&z.1, &n.1)?));
            same.push(("dv", same_bits(&z.2, &n.2)?));
        }
        let n = wk::warmup_kl(&q, &k, &lse_n, scale, &qi, &w, &ki, g, None)?;
        let z = wk::warmup_kl(&q, &k, &lse_n, scale, &qi, &w, &ki, g, Some(&zeros))?;
        same.push(("kl", same_bits(&z.kl, &n.kl)?));
        same.push(("dqi", same_bits(&z.dqi, &n.dqi)?));
        same.push(("dw", same_bits(&z.dw, &n.dw)?));
        let e_dki = rel_err(&z.dki, &n.dki)?;
        let all = same.iter().all(|(_, s)| *s);
        out.push(Outcome {
            name: "dense attention and warm-up KL kernels, all-zero starts equal None",
            ok: all && e_dki < 1e-5,
            detail: format!(
                "{shape}: bit for bit {}; dki rel {e_dki:.1e} (< 1e-5: atomics)",
                same.iter()
                    .map(|(w, s)| format!("{w} {s}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        });
    }
    Ok(out)
}

/// Device memory taken by warmup_kl beyond its inputs and outputs at T = 32768 (B 1, H 16,
/// bench dims): free memory before and after the call (synchronised), minus the outputs.
fn memory_check(gpu: &Device) -> Result<Outcome> {
    let (b, h, t, dqk, dv, hi, di) = (
        1usize, 16usize, 32768usize, 192usize, 128usize, 64usize, 128usize,
    );
    let scale = (dqk as f64).powf(-0.5) * mscale2();
    let bf = |shape: &[usize]| -> Result<Tensor> {
        Ok(Tensor::randn(0f32, 1f32, shape, gpu)?.to_dtype(DType::BF16)?)
    };
    let (q, k, v) = (
        bf(&[b, h, t, dqk])?,
        bf(&[b, h, t, dqk])?,
        bf(&[b, h, t, dv])?,
    );
    let (_, lse) = wk::dense_attention_fwd(&q, &k, &v, scale, None)?;
    drop(v);
    let qi = Tensor::randn(0f32, 1f32, (b, t, hi, di), gpu)?;
    let w = (Tensor::randn(0f32, 1f32, (b, t, hi), gpu)? * ((hi * di) as f64).powf(-0.5))?;
    let ki = Tensor::randn(0f32, 1f32, (b, t, di), gpu)?;
    gpu.synchronize()?;
    let before = wk::device_free_bytes(gpu)?;
    let r = wk::warmup_kl(&q, &k, &lse, scale, &qi, &w, &ki, 1.0 / t as f64, None)?;
    gpu.synchronize()?;
    let after = wk::device_free_bytes(gpu)?;
    let outputs =
        4 * (r.kl.elem_count() + r.dqi.elem_count() + r.dw.elem_count() + r.dki.elem_count());
    let extra = before.saturating_sub(after).saturating_sub(outputs);
    let ok_finite = finite(&r.kl)? && finite(&r.dqi)? && finite(&r.dw)? && finite(&r.dki)?;
    let mib = |x: usize| x as f64 / (1u64 << 20) as f64;
    Ok(Outcome {
        name: "warm-up KL memory at T 32768",
        ok: extra < (256 << 20) && ok_finite,
        detail: format!(
            "B {b} H {h} dqk {dqk} HI {hi} DI {di}: {:.1} MiB beyond inputs and {:.1} MiB of outputs (< 256 MiB); outputs finite: {ok_finite}",
            mib(extra),
            mib(outputs)
        ),
    })
}

/// The warm-up KL kernel's four outputs against its twin's.
fn compare_kl(kernel: &wk::WarmupKl, twin: &wk::WarmupKl) -> anyhow::Result<(bool, Vec<String>)> {
    compare_named(&[
        ("kl", &kernel.kl, &twin.kl),
        ("dqi", &kernel.dqi, &twin.dqi),
        ("dw", &kernel.dw, &twin.dw),
        ("dki", &kernel.dki, &twin.dki),
    ])
}

/// Named (kernel, twin) pairs compared at rel < 2e-2 and cos > 0.999: whether all pass, and
/// one note per pair.
fn compare_named(pairs: &[(&str, &Tensor, &Tensor)]) -> anyhow::Result<(bool, Vec<String>)> {
    let (mut ok, mut parts) = (true, vec![]);
    for (what, a, r) in pairs {
        let (o, d) = compare(a, r, 2e-2, 0.999)?;
        ok &= o;
        parts.push(format!("{what} {d}"));
    }
    Ok((ok, parts))
}
