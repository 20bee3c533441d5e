//! `dsa-train gpu-selftest`: the GPU test suite, run on the GPU machine (CI has no GPU).
//!
//! Each check runs the same computation on the CPU in f32 (the reference: the plain twins,
//! themselves checked against transformers by the parity tests) and on the GPU, on fresh
//! random inputs, and compares. It is a subcommand rather than a `cargo test` binary so that
//! one stripped executable carries both the suite and the benchmarks to the GPU host.

mod fp8_dequant;
mod fp8_dispatch;
mod fp8_scores;
mod grad_sum;
mod indexer_topk;
mod join_rows;
mod moe_route;
mod rms_norm;
mod rope;
mod rows;
mod sparse_mla_tc;
mod swiglu;
mod warmup_kl;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};

use crate::kernels::{Fused, KernelPolicy};
use crate::model::{AttentionMode, LoadOptions, Model, Pass};
use crate::recipe::Recipe;

pub(crate) struct Outcome {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

pub(crate) fn rel_err(a: &Tensor, b: &Tensor) -> Result<f32> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let diff = (&a - &b)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    Ok(diff / scale.max(1e-30))
}

/// ||a - b||_2 / ||b||_2 in f32 on the host.
pub(crate) fn rel_l2(a: &Tensor, b: &Tensor) -> Result<f32> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let diff = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt();
    Ok(diff / b.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt().max(1e-30))
}

pub(crate) fn cosine(a: &Tensor, b: &Tensor) -> Result<f32> {
    let a = a
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?;
    let b = b
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?;
    let dot = (&a * &b)?.sum_all()?.to_scalar::<f32>()?;
    let na = a.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
    let nb = b.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
    Ok(dot / (na * nb))
}

fn tokens(b: usize, t: usize, vocab: usize, seed: u64, device: &Device) -> Result<Tensor> {
    let mut rng = crate::rng::SplitMix64::new(seed);
    let v: Vec<u32> = (0..b * t)
        .map(|_| (rng.next_u64() % vocab as u64) as u32)
        .collect();
    Ok(Tensor::from_vec(v, (b, t), device)?)
}

/// Logits of the tiny V3.2 model on CPU f32 vs GPU f32 and bf16, both attention modes.
fn forward_matches_cpu(dir: &Path, gpu: &Device) -> Result<Vec<Outcome>> {
    let cpu = Model::load(dir, &LoadOptions::default())?;
    let g32 = Model::load(
        dir,
        &LoadOptions {
            device: gpu.clone(),
            ..Default::default()
        },
    )?;
    let g16 = Model::load(
        dir,
        &LoadOptions {
            device: gpu.clone(),
            dtype: DType::BF16,
            ..Default::default()
        },
    )?;
    let mut out = vec![];
    for (mode, name32, name16) in [
        (
            AttentionMode::Dense,
            "dense forward f32",
            "dense forward bf16",
        ),
        (
            AttentionMode::Sparse,
            "sparse forward f32",
            "sparse forward bf16",
        ),
    ] {
        let opts = Pass::eval(mode, 16);
        let x = tokens(2, 97, cpu.cfg.vocab_size, 11, &Device::Cpu)?;
        let reference = cpu.forward(&x, &opts)?.logits;
        let a = g32.forward(&x.to_device(gpu)?, &opts)?.logits;
        let e = rel_err(&a, &reference)?;
        out.push(Outcome {
            name: name32,
            ok: e < 1e-4,
            detail: format!("max rel err {e:.2e} (< 1e-4)"),
        });
        // bf16 with a selection that keeps every key (top-k >= T), against the CPU f32 path:
        // with a real selection a bf16 model may legitimately pick other keys at near-ties
        // (reported, not asserted).
        let all_keys = Pass::eval(mode, 97);
        let b = g16.forward(&x.to_device(gpu)?, &all_keys)?.logits;
        let c = cosine(&b, &cpu.forward(&x, &all_keys)?.logits)?;
        let with_sel = cosine(&g16.forward(&x.to_device(gpu)?, &opts)?.logits, &reference)?;
        out.push(Outcome {
            name: name16,
            ok: c > 1.0 - 5e-3,
            detail: format!("top-k >= T: cosine {c:.6} (> 0.995); with top-16: {with_sel:.4}"),
        });
    }
    Ok(out)
}

/// The evaluation pass in blocks of query rows (`Pass::eval_rows`, `dsa-train eval`)
/// against the whole-sequence pass on the GPU, both attention modes: f32 asserted to the CPU
/// test's tolerances (logits 1e-4 relative, per-query KL 1e-3 relative, recall 1e-4 absolute);
/// bf16 by the logits' cosine (> 0.999) and the mean recall difference over every query of
/// every layer (< 2e-3): the dense blocked pass selects with the bf16 tensor-core scoring and
/// the whole pass with f32 scores, so a near-tie can swap one key of a set and move that one
/// query's recall by the key's mass (3e-2 seen in a 97-token row); a wrong set or offset moves
/// the mean by far more. The largest difference must stay below 0.1 (a wrong block boundary
/// moves one query by more).
fn eval_blocks_match_whole(dir: &Path, gpu: &Device) -> Result<Vec<Outcome>> {
    let mut out = vec![];
    for (dtype, mode, name) in [
        (DType::F32, AttentionMode::Dense, "blocked eval dense f32"),
        (DType::F32, AttentionMode::Sparse, "blocked eval sparse f32"),
        (DType::BF16, AttentionMode::Dense, "blocked eval dense bf16"),
        (
            DType::BF16,
            AttentionMode::Sparse,
            "blocked eval sparse bf16",
        ),
    ] {
        let model = Model::load(
            dir,
            &LoadOptions {
                device: gpu.clone(),
                dtype,
                ..Default::default()
            },
        )?;
        let x = tokens(2, 97, model.cfg.vocab_size, 12, gpu)?;
        let whole_opts = Pass::eval(mode, 16);
        let whole = model.forward(&x, &whole_opts)?;
        let blocked = model.forward(&x, &whole_opts.clone().in_rows(7))?;
        let (mut kl, mut recall, mut recall_mean) = (0f32, 0f32, 0f32);
        for (b, w) in blocked.layers.iter().zip(&whole.layers) {
            let (kb, kw) = (
                b.indexer_kl.as_ref().expect("KL"),
                w.indexer_kl.as_ref().expect("KL"),
            );
            kl = kl.max(rel_err(kb, kw)?);
            let (rb, rw) = (
                b.recall.as_ref().expect("recall"),
                w.recall.as_ref().expect("recall"),
            );
            let diff = (rb - rw)?.abs()?.flatten_all()?.to_dtype(DType::F32)?;
            recall = recall.max(diff.max(0)?.to_scalar::<f32>()?);
            recall_mean = recall_mean.max(diff.mean_all()?.to_scalar::<f32>()?);
        }
        let (ok, detail) = if dtype == DType::F32 {
            let e = rel_err(&blocked.logits, &whole.logits)?;
            (e < 1e-4 && kl < 1e-3 && recall < 1e-4, format!("logits rel err {e:.2e} (< 1e-4), KL {kl:.2e} (< 1e-3), recall {recall:.2e} (< 1e-4)"))
        } else {
            let c = cosine(&blocked.logits, &whole.logits)?;
            (
                c > 0.999 && recall_mean < 2e-3 && recall < 0.1,
                format!("logits cosine {c:.6} (> 0.999), recall mean diff {recall_mean:.2e} (< 2e-3), max {recall:.2e} (< 0.1), KL rel err {kl:.2e}"),
            )
        };
        out.push(Outcome { name, ok, detail });
    }
    Ok(out)
}

/// Three training steps of each stage in f32 on CPU and GPU give the same losses.
fn train_steps_match_cpu(dir: &Path, tokens_file: &Path, gpu_name: &str) -> Result<Vec<Outcome>> {
    let mut out = vec![];
    // Recomputing layers (the default), and the dense and sparse stages' layers backpropagated
    // from the activations their first pass kept.
    for (stage, recompute, name) in [
        ("dense", true, "dense (pre-training) steps f32"),
        ("dense", false, "dense steps f32, saved activations"),
        ("warmup", true, "warm-up steps f32"),
        ("sparse", true, "sparse steps f32"),
        ("sparse", false, "sparse steps f32, saved activations"),
    ] {
        let mut losses = vec![];
        for device in ["cpu", gpu_name] {
            let text = format!(
                "[run]\noutput_dir = \"{}\"\nprogress = false\n[model]\npath = \"{}\"\ndtype = \"f32\"\ndevice = \"{device}\"\n\
                 [data]\npath = \"{}\"\nseq_len = 64\n[train]\nstage = \"{stage}\"\nsteps = 3\nlr = 3e-3\nglobal_batch_seqs = 2\nrecompute = {recompute}\n\
                 [dsa]\nindex_topk = 16\n[checkpoint]\nevery = 0\n",
                dir.parent().unwrap().join("unused").display(), dir.display(), tokens_file.display()
            );
            let mut trainer = crate::train::Trainer::new(Recipe::parse(&text, &[])?, None)?;
            let mut l = vec![];
            for _ in 0..3 {
                let m = trainer.train_step()?;
                l.push(m.lm_loss.unwrap_or(0.0) + m.indexer_kl);
            }
            losses.push(l);
        }
        let worst = losses[0]
            .iter()
            .zip(&losses[1])
            .map(|(a, b)| ((a - b) / a).abs())
            .fold(0.0, f64::max);
        out.push(Outcome {
            name,
            ok: worst < 1e-3,
            detail: format!(
                "losses cpu {:?} gpu {:?}, max rel diff {worst:.2e} (< 1e-3)",
                losses[0], losses[1]
            ),
        });
    }
    Ok(out)
}

/// The warm-up on the GPU (bf16) with `model.frozen_fp8` (the FP8 bytes on the device, and in
/// host memory) against the dense-loaded warm-up: the layers' FP8-held weights dequantised on
/// the device give the same steps bit for bit (the indexer KL of each step and every trained
/// tensor after three).
fn frozen_fp8_warm_up_matches_dense(
    dir: &Path,
    tokens_file: &Path,
    gpu_name: &str,
) -> Result<Vec<Outcome>> {
    let mut runs = vec![];
    for (fp8, offload) in [(false, false), (true, false), (true, true)] {
        let text = format!(
            "[run]\noutput_dir = \"{}\"\nprogress = false\n[model]\npath = \"{}\"\ndtype = \"bf16\"\ndevice = \"{gpu_name}\"\nfrozen_fp8 = {fp8}\nfrozen_fp8_offload = {offload}\n\
             [data]\npath = \"{}\"\nseq_len = 64\n[train]\nstage = \"warmup\"\nsteps = 3\nlr = 3e-3\nglobal_batch_seqs = 2\n\
             [dsa]\nindex_topk = 16\n[checkpoint]\nevery = 0\n",
            dir.parent().unwrap().join("unused").display(), dir.display(), tokens_file.display()
        );
        let mut trainer = crate::train::Trainer::new(Recipe::parse(&text, &[])?, None)?;
        let held = trainer.model.frozen_fp8.held().0;
        let kl = (0..3)
            .map(|_| Ok(trainer.train_step()?.indexer_kl))
            .collect::<Result<Vec<f64>>>()?;
        let mut bits = vec![];
        for s in &trainer.slots {
            bits.extend(
                s.var
                    .as_tensor()
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .iter()
                    .map(|x| x.to_bits()),
            );
        }
        runs.push((held, kl, bits));
    }
    Ok(["on the device", "in host memory"]
        .iter()
        .zip(&runs[1..])
        .map(|(place, run)| {
            let same = run.2 == runs[0].2;
            Outcome {
                name: "warm-up with frozen FP8 weights vs dense-loaded (bf16)",
                ok: run.0 > 0 && run.1 == runs[0].1 && same,
                detail: format!(
                    "{} tensors held in FP8 {place}; KL per step {:?} vs {:?}; trained tensors {}",
                    run.0,
                    run.1,
                    runs[0].1,
                    if same { "bit-equal" } else { "DIFFER" }
                ),
            }
        })
        .collect())
}

/// The sparse MLA kernel against its plain twin (candle ops on the same GPU, f32) on fresh random
/// inputs of awkward sizes with padded selections: output, head-mean probabilities, and the
/// gradients of q and kv under a random upstream gradient.
fn sparse_kernel_matches_twin(gpu: &Device) -> Result<Vec<Outcome>> {
    use candle_core::Var;
    let mut out = vec![];
    let mut rng = crate::rng::SplitMix64::new(77);
    for (n, h, k, dqk, dv) in [
        (97usize, 16usize, 64usize, 576usize, 512usize),
        (1, 3, 5, 160, 144),
        (300, 20, 40, 576, 512),
    ] {
        // kv rows: at least 8, so a single query still sees distinct keys.
        let nkv = n.max(8);
        let scale = (dqk as f64).powf(-0.5);
        let q = Var::from_tensor(&crate::rng::randn(&[n, h, dqk], rng.next_u64(), 1.0, gpu)?)?;
        let kv = Var::from_tensor(&crate::rng::randn(&[nkv, dqk], rng.next_u64(), 1.0, gpu)?)?;
        // Causal-style selections: row t may pick among 0..=t; a third of the slots are padding.
        let mut abs = vec![u32::MAX; n * k];
        for t in 0..n {
            for j in 0..k {
                if rng.uniform() > 0.33 || j == 0 {
                    abs[t * k + j] = (rng.next_u64() % (t.max(nkv - 1) as u64 + 1)) as u32;
                }
            }
        }
        let idx = Tensor::from_vec(abs.clone(), (n, k), gpu)?;
        let upstream = crate::rng::randn(&[n, h, dv], rng.next_u64(), 1.0, gpu)?;
        // Kernel.
        let fused = crate::kernels::sparse_mla(q.as_tensor(), kv.as_tensor(), &idx, scale, dv)?;
        let o_k = fused.narrow(2, 0, dv)?;
        let pm_k = crate::kernels::sparse_mla_head_mean_probs(
            q.as_tensor(),
            kv.as_tensor(),
            &idx,
            &fused,
            scale,
            dv,
        )?;
        let g_k = (&o_k * &upstream)?.sum_all()?.backward()?;
        // Twin: gather, masked softmax in f32, weighted values.
        let rows: Vec<u32> = abs
            .iter()
            .map(|&a| if a == u32::MAX { 0 } else { a })
            .collect();
        let bias: Vec<f32> = abs
            .iter()
            .map(|&a| {
                if a == u32::MAX {
                    crate::dsa::MASKED
                } else {
                    0.0
                }
            })
            .collect();
        let rows = Tensor::from_vec(rows, n * k, gpu)?;
        let bias = Tensor::from_vec(bias, (n, 1, k), gpu)?;
        let sel = kv
            .as_tensor()
            .index_select(&rows, 0)?
            .reshape((n, k, dqk))?;
        let scores = (q.as_tensor().matmul(&sel.t()?)? * scale)?.broadcast_add(&bias)?;
        let probs = crate::ops::softmax_last(&scores)?;
        let o_t = probs.matmul(&sel.narrow(2, 0, dv)?.contiguous()?)?;
        let pm_t = probs.mean(1)?;
        let g_t = (&o_t * &upstream)?.sum_all()?.backward()?;
        let e_o = rel_err(&o_k, &o_t)?;
        let e_p = rel_err(&pm_k, &pm_t)?;
        let e_dq = rel_err(
            g_k.get(q.as_tensor()).unwrap(),
            g_t.get(q.as_tensor()).unwrap(),
        )?;
        let e_dkv = rel_err(
            g_k.get(kv.as_tensor()).unwrap(),
            g_t.get(kv.as_tensor()).unwrap(),
        )?;
        let worst = e_o.max(e_p).max(e_dq).max(e_dkv);
        out.push(Outcome {
            name: "sparse MLA kernel vs twin",
            ok: worst < 1e-4,
            detail: format!("N {n} H {h} K {k} dqk {dqk} dv {dv}: rel err out {e_o:.1e} probs {e_p:.1e} dq {e_dq:.1e} dkv {e_dkv:.1e} (< 1e-4)"),
        });
    }
    Ok(out)
}

/// The fused indexer-scores-at-selection kernels against their plain twin (gather + matmul),
/// with the gradients of q, w and k under a random upstream gradient: the f32 kernel to 1e-4
/// relative; the bf16 tensor-core kernel against the twin on the same bf16-rounded q and k
/// (scores and dw to 1e-4 of the largest: exact products, f32 sums; dq and dk to 5e-3 in the
/// 2-norm: the kernel rounds G = dI w [a > 0] to bf16 before its two products, and where a
/// product a = q.k is within f32 rounding of 0 the two sums can disagree on [a > 0], which moves
/// that one element by a whole |dI w k| term: at T 2100, k 2048 about 1e-2 of the largest dq).
/// Awkward sizes: T 97 to 2100; HI 3, 5, 8, 12, 20, 32, 64 (each kernel instance's head
/// tiling); K not a multiple of the 128-key tile, and K > T (every row padded).
fn indexer_kernel_matches_twin(gpu: &Device) -> Result<Vec<Outcome>> {
    use candle_core::Var;
    let mut out = vec![];
    let cases = [
        (false, 1usize, 300usize, 64usize, 128usize, 64usize),
        (false, 2, 97, 3, 40, 16),
        (true, 1, 300, 64, 128, 64),
        (true, 2, 97, 8, 64, 128),
        (true, 1, 1025, 5, 32, 300),
        (true, 1, 2100, 64, 128, 2048),
        // Every head-tile count: 12 heads (2 tiles of 8), 20 and 32 (4 tiles: two 16-head
        // m-tiles in the backward's dq and dk), 3 (1 tile).
        (true, 1, 700, 12, 128, 256),
        (true, 2, 333, 20, 64, 200),
        (true, 1, 500, 32, 128, 129),
        (true, 2, 97, 3, 32, 16),
    ];
    for (tc, b, t, hi, di, k) in cases {
        let round = |x: Tensor| -> Result<Tensor> {
            Ok(if tc {
                x.to_dtype(DType::BF16)?.to_dtype(DType::F32)?
            } else {
                x
            })
        };
        let q = Var::from_tensor(&round(crate::rng::randn(&[b, t, hi, di], 3, 1.0, gpu)?)?)?;
        let w = Var::from_tensor(&crate::rng::randn(&[b, t, hi], 4, 1.0, gpu)?)?;
        let kk = Var::from_tensor(&round(crate::rng::randn(&[b, t, di], 5, 1.0, gpu)?)?)?;
        let proj = crate::model::indexer::IndexerProj {
            q: q.as_tensor().clone(),
            k: kk.as_tensor().clone(),
            w: w.as_tensor().clone(),
        };
        let causal = crate::dsa::causal_bias(t, gpu)?;
        let sel = crate::dsa::select_topk(&proj.scores(&causal)?.detach(), k)?;
        let up = crate::rng::randn(&[b, t, k.min(t)], 6, 1.0, gpu)?;
        let a = proj.scores_at(&sel, KernelPolicy::default(), tc)?;
        let ga = (&a * &up)?.sum_all()?.backward()?;
        let p = proj.scores_at(&sel, KernelPolicy::PLAIN, tc)?;
        let gp = (&p * &up)?.sum_all()?.backward()?;
        let e = rel_err(&a, &p)?;
        let g = |v: &Var| -> Result<f32> {
            rel_err(
                ga.get(v.as_tensor()).unwrap(),
                gp.get(v.as_tensor()).unwrap(),
            )
        };
        let g2 = |v: &Var| -> Result<f32> {
            rel_l2(
                ga.get(v.as_tensor()).unwrap(),
                gp.get(v.as_tensor()).unwrap(),
            )
        };
        let ew = g(&w)?;
        let (eq, ek) = if tc {
            (g2(&q)?, g2(&kk)?)
        } else {
            (g(&q)?, g(&kk)?)
        };
        // The gradient must not vanish (a zero on both sides would compare equal).
        let dq_norm = ga
            .get(q.as_tensor())
            .unwrap()
            .abs()?
            .sum_all()?
            .to_dtype(DType::F32)?
            .to_scalar::<f32>()?;
        let (exact, rounded) = if tc { (1e-4, 5e-3) } else { (1e-4, 1e-4) };
        out.push(Outcome {
            name: if tc { "indexer scores-at-selection bf16 tensor-core kernel vs twin" } else { "indexer scores-at-selection kernel vs twin" },
            ok: e < exact && ew < exact && eq < rounded && ek < rounded && dq_norm > 0.0,
            detail: format!(
                "B {b} T {t} HI {hi} DI {di} k {k}: rel err scores {e:.1e} dw {ew:.1e} (< {exact:.0e}) dq {eq:.1e} dk {ek:.1e} (< {rounded:.0e}{}) (|dq|_1 {dq_norm:.3e})",
                if tc { ", 2-norm" } else { "" }
            ),
        });
    }
    Ok(out)
}

/// The dense stage's attention (`model::dense_recompute`) on the GPU in bf16: the flash-style
/// forward kernel with the backward kernel and with the block-recomputing backward, against autograd of the whole f32
/// softmax on the same bf16-rounded inputs (the mini and bench models' head dims, awkward T).
fn dense_recompute_matches_whole(gpu: &Device) -> Result<Vec<Outcome>> {
    use candle_core::Var;
    let mut out = vec![];
    // The backward kernel, then the block-recomputing backward (its twin) on the same inputs.
    let cases = [
        (2usize, 8usize, 1025usize, 96usize, 64usize, 0usize),
        (1, 4, 97, 192, 128, 16),
    ];
    let policies = [
        ("backward kernel", KernelPolicy::default()),
        (
            "blocked backward",
            KernelPolicy::default().without(Fused::DenseBwd),
        ),
    ];
    for ((b, h, t, dqk, dv, rows), (which, kernels)) in cases
        .into_iter()
        .flat_map(|c| policies.into_iter().map(move |p| (c, p)))
    {
        let r = |dims: &[usize], seed: u64, std: f64| -> Result<Tensor> {
            Ok(crate::rng::randn(dims, seed, std, gpu)?.to_dtype(DType::BF16)?)
        };
        let (q, k, v) = (
            r(&[b, h, t, dqk], 1, 2.0)?,
            r(&[b, h, t, dqk], 2, 2.0)?,
            r(&[b, h, t, dv], 3, 1.0)?,
        );
        let up = crate::rng::randn(&[b, h, t, dv], 4, 1.0, gpu)?;
        let scale = 1.0 / (dqk as f64).sqrt();
        let (qb, kb, vb) = (
            Var::from_tensor(&q)?,
            Var::from_tensor(&k)?,
            Var::from_tensor(&v)?,
        );
        let ours = crate::model::dense_recompute::attention(
            kernels,
            qb.as_tensor(),
            kb.as_tensor(),
            vb.as_tensor(),
            scale,
            rows,
            None,
        )?;
        let g1 = (ours.to_dtype(DType::F32)? * &up)?.sum_all()?.backward()?;
        let f = |x: &Tensor| -> Result<Var> { Ok(Var::from_tensor(&x.to_dtype(DType::F32)?)?) };
        let (q32, k32, v32) = (f(&q)?, f(&k)?, f(&v)?);
        let causal = crate::dsa::causal_rows(0, t, t, gpu)?;
        let s = (q32.as_tensor().matmul(&k32.as_tensor().t()?)? * scale)?.broadcast_add(&causal)?;
        let reference = crate::ops::softmax_last(&s)?.matmul(v32.as_tensor())?;
        let g2 = (&reference * &up)?.sum_all()?.backward()?;
        let e_out = rel_err(&ours, &reference)?;
        let g = |a: &Var, b: &Var| -> Result<f32> {
            rel_err(
                g1.get(a.as_tensor()).expect("grad"),
                g2.get(b.as_tensor()).expect("grad"),
            )
        };
        let (eq, ek, ev) = (g(&qb, &q32)?, g(&kb, &k32)?, g(&vb, &v32)?);
        // bf16 output and gradients (8 bits of mantissa): 2e-2 of the largest value.
        let worst = e_out.max(eq).max(ek).max(ev);
        out.push(Outcome {
            name: "dense-stage attention (flash forward kernel) bf16 vs whole f32",
            ok: worst < 2e-2,
            detail: format!("{which}, B {b} H {h} T {t} d {dqk}/{dv}: rel err out {e_out:.1e} dq {eq:.1e} dk {ek:.1e} dv {ev:.1e} (< 2e-2)"),
        });
    }
    Ok(out)
}

/// The fused LM loss (`kernels::lm_loss`) against its plain twin on the GPU (f32 passes over
/// copies of the logits): the NLL to 1e-5 of the largest; every gradient element within 1e-5
/// of its twin's value (f32 logits) or one bf16 step, 2^-7 of it (bf16: both sides round f32
/// values that differ in the last bits); every gradient finite; and each gradient row sums to
/// 0 (softmax times w, minus w at the target) within 1e-4 w (1e-2 w in bf16). Awkward
/// vocabularies (7, 1000, 129280), 1 row, logits of std 30 (exp underflows for most of the row)
/// and a row with -inf logits among its first entries (they add 0; the twin's exp(-inf) is 0).
fn lm_loss_matches_twin(gpu: &Device) -> Result<Vec<Outcome>> {
    let mut out = vec![];
    let mut rng = crate::rng::SplitMix64::new(91);
    for (dtype, rows, vocab, std) in [
        (DType::BF16, 97usize, 129280usize, 2.0),
        (DType::F32, 33, 1000, 1.0),
        (DType::BF16, 1, 7, 1.0),
        (DType::F32, 5, 129280, 30.0),
    ] {
        let mut logits = crate::rng::randn(&[rows, vocab], rng.next_u64(), std, gpu)?;
        if std > 10.0 {
            // -inf in the first entries of row 0 (each thread's first element).
            let mask: Vec<f32> = (0..rows * vocab)
                .map(|i| {
                    if i < 1500 && i % 3 == 0 {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
                .collect();
            logits = (logits + Tensor::from_vec(mask, (rows, vocab), gpu)?)?;
        }
        let logits = logits.to_dtype(dtype)?;
        let targets: Vec<u32> = (0..rows)
            .map(|_| (rng.next_u64() % vocab as u64) as u32)
            .collect();
        let targets = Tensor::from_vec(targets, rows, gpu)?;
        let w = 0.37;
        let (nll_k, g_k) = crate::kernels::lm_loss::nll_rows_and_grad(&logits, &targets, w)?;
        let (nll_t, g_t) = crate::losses::nll_rows_and_grad_plain(
            &logits,
            &targets,
            w,
            crate::losses::LOSS_BLOCK,
        )?;
        let e_nll = rel_err(&nll_k, &nll_t)?;
        // Element by element: |kernel - twin| <= rel |twin| + 1e-7 w, rel = one bf16 step
        // (2^-7 of the value) for bf16 gradients, 1e-5 for f32; the worst ratio must be <= 1.
        let rel = if dtype == DType::F32 {
            1e-5
        } else {
            1.0 / 128.0
        };
        let (a, b) = (g_k.to_dtype(DType::F32)?, g_t.to_dtype(DType::F32)?);
        let bound = (b.abs()? * rel)?.affine(1.0, 1e-7 * w)?;
        let worst = (a - &b)?
            .abs()?
            .div(&bound)?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        let finite = g_k
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .all(|x| x.is_finite());
        let row_sum = g_k
            .to_dtype(DType::F32)?
            .sum(1)?
            .abs()?
            .max(0)?
            .to_scalar::<f32>()? as f64
            / w;
        out.push(Outcome {
            name: "fused LM loss vs twin",
            ok: e_nll < 1e-5 && worst <= 1.0 && finite && row_sum < 1e-4 * (if dtype == DType::BF16 { 100.0 } else { 1.0 }),
            detail: format!(
                "{dtype:?} {rows} x {vocab} std {std}: rel err nll {e_nll:.1e} (< 1e-5); grad within {worst:.2} of the bound {rel:.1e} |twin| (<= 1); max |row sum of grad| / w {row_sum:.1e}"
            ),
        });
    }
    Ok(out)
}

/// The fused AdamW step (`kernels::adamw`) against its plain twin (`adamw_update_plain`) on the
/// GPU and on the CPU: the new moments and weights must be equal element for element (== in f32,
/// so +0 and -0 are equal: candle's affine turns some -0 into +0). Sizes 1, 97 and 2^20 + 3,
/// clipped and not, with and without decay, an early and a late step.
fn adamw_matches_twin(gpu: &Device) -> Result<Vec<Outcome>> {
    use crate::kernels::adamw::AdamWScalars;
    let mut out = vec![];
    let mut rng = crate::rng::SplitMix64::new(57);
    for (n, grad_scale, decay, t) in [
        (1usize, 1.0, None, 1),
        (97, 0.37, Some(1e-4), 3),
        ((1 << 20) + 3, 1.0, Some(3e-5), 1000),
    ] {
        let r = |std: f64, rng: &mut crate::rng::SplitMix64| {
            crate::rng::randn(&[n], rng.next_u64(), std, &Device::Cpu)
        };
        let (g, m, w) = (r(1e-2, &mut rng)?, r(1e-3, &mut rng)?, r(0.05, &mut rng)?);
        let v = r(1e-3, &mut rng)?.sqr()?;
        let s = AdamWScalars {
            grad_scale,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            t,
            lr: 3e-4,
            decay,
        };
        let on = |x: &Tensor| x.to_device(gpu);
        let fused = crate::kernels::adamw::step(&on(&g)?, &on(&m)?, &on(&v)?, &on(&w)?, &s)?;
        let plain_gpu =
            crate::train::optim::adamw_update_plain(&on(&g)?, &on(&m)?, &on(&v)?, &on(&w)?, &s)?;
        let plain_cpu = crate::train::optim::adamw_update_plain(&g, &m, &v, &w, &s)?;
        let differ =
            |a: &(Tensor, Tensor, Tensor), b: &(Tensor, Tensor, Tensor)| -> Result<usize> {
                let mut count = 0;
                for (x, y) in [(&a.0, &b.0), (&a.1, &b.1), (&a.2, &b.2)] {
                    let (x, y): (Vec<f32>, Vec<f32>) = (
                        x.to_device(&Device::Cpu)?.to_vec1()?,
                        y.to_device(&Device::Cpu)?.to_vec1()?,
                    );
                    count += x.iter().zip(&y).filter(|(p, q)| p != q).count();
                }
                Ok(count)
            };
        let (d_gpu, d_cpu) = (differ(&fused, &plain_gpu)?, differ(&fused, &plain_cpu)?);
        out.push(Outcome {
            name: "fused AdamW vs twin",
            ok: d_gpu == 0 && d_cpu == 0,
            detail: format!("n {n} clip {grad_scale} decay {decay:?} t {t}: {d_gpu} values differ from the GPU twin, {d_cpu} from the CPU twin (of {} each, exact)", 3 * n),
        });
    }
    Ok(out)
}

/// The grouped routed experts (CUDA's default: batched matmuls over [E, cap, .]) against
/// one SwiGLU per expert on the GPU, output and gradients, at the bench model's expert shape
/// (16 experts, 1024 x 512) and an awkward one; f32 within 1e-5, bf16 within 2e-2 relative
/// (cuBLAS may block the batched and single products differently).
fn moe_grouped_matches_per_expert(gpu: &Device) -> Result<Vec<Outcome>> {
    let mut out = vec![];
    for (e, n, d, i) in [(16usize, 2048usize, 1024usize, 512usize), (3, 97, 24, 40)] {
        for (dtype, tol) in [(DType::F32, 1e-5f32), (DType::BF16, 2e-2)] {
            let err = crate::model::moe::grouped_against_plain(gpu, dtype, e, n, d, i, 3)?;
            out.push(Outcome {
                name: "grouped MoE experts vs one SwiGLU per expert",
                ok: err <= tol,
                detail: format!("{e} experts {d} x {i}, {n} tokens, {dtype:?}: output and gradients max rel err {err:.1e} (tolerance {tol:.0e})"),
            });
        }
    }
    Ok(out)
}

/// The sparse-stage layer's explicit backward (`model::blocks`) against candle's autograd
/// on the GPU, with the kernels the training step runs (the tensor-core sparse MLA at 576/512
/// in bf16, the f32 kernel in f32, fused RMSNorm and RoPE): a dense and a MoE layer of 16
/// heads, T 300, top-k 128, every sequence at once and blocks of 128 rows. f32: max relative
/// error <= 1e-5 (blocks: 1e-4, relative L2 5e-5); bf16 (both sides round differently):
/// relative L2 <= 2e-2.
fn layer_backward_matches_autograd(gpu: &Device) -> Result<Vec<Outcome>> {
    let mut c = crate::tiny::tiny_config(true);
    let o = c.as_object_mut().expect("object");
    for (k, v) in [
        ("hidden_size", 512),
        ("num_hidden_layers", 2),
        ("intermediate_size", 1024),
        ("moe_intermediate_size", 256),
        ("num_attention_heads", 16),
        ("num_key_value_heads", 16),
        ("q_lora_rank", 384),
        ("kv_lora_rank", 512),
        ("qk_nope_head_dim", 128),
        ("qk_rope_head_dim", 64),
        ("v_head_dim", 128),
        ("index_n_heads", 8),
        ("index_head_dim", 64),
        ("index_topk", 128),
    ] {
        o.insert(k.into(), v.into());
    }
    let cfg = crate::config::ModelConfig::from_json(
        &c.to_string(),
        &crate::config::IndexerDefaults::default(),
    )?;
    let mut out = vec![];
    // f32 blocks of 128 rows: the weights' token sums are split at other points (cuBLAS's
    // reductions per block shape, the blocks' sums), measured 2.9e-5 at most (H100).
    for (dtype, max_tol, l2_tol) in [
        (DType::F32, 1e-5f32, 1e-5f32),
        (DType::BF16, f32::INFINITY, 2e-2),
    ] {
        for rows in [0, 128] {
            let (max_tol, l2_tol) = if dtype == DType::F32 && rows > 0 {
                (1e-4, 5e-5)
            } else {
                (max_tol, l2_tol)
            };
            let r = crate::model::blocks::explicit_against_autograd(
                &cfg,
                gpu,
                dtype,
                crate::model::moe::ExpertCompute::Auto,
                300,
                128,
                rows,
                5,
            )?;
            out.push(Outcome {
                name: "explicit layer backward vs autograd",
                ok: r.max_rel <= max_tol && r.max_l2 <= l2_tol,
                detail: format!(
                    "sparse, {dtype:?}, rows {rows}: {} gradients, max rel err {:.1e} (in {}), rel L2 {:.1e} (tolerance {max_tol:.0e} max, {l2_tol:.0e} L2)",
                    r.compared, r.max_rel, r.worst, r.max_l2
                ),
            });
        }
        // The dense stage's layer (the dense attention's tensor-core backward in bf16).
        let r = crate::model::blocks::explicit_against_autograd_in(
            &cfg,
            gpu,
            dtype,
            crate::model::moe::ExpertCompute::Auto,
            crate::model::AttentionMode::Dense,
            300,
            128,
            0,
            6,
            false,
        )?;
        out.push(Outcome {
            name: "explicit layer backward vs autograd",
            ok: r.max_rel <= max_tol && r.max_l2 <= l2_tol,
            detail: format!("dense, {dtype:?}: {} gradients, max rel err {:.1e} (in {}), rel L2 {:.1e} (tolerance {max_tol:.0e} max, {l2_tol:.0e} L2)", r.compared, r.max_rel, r.worst, r.max_l2),
        });
    }
    Ok(out)
}

/// The sparse-stage indexer KL's explicit backward (`Indexer::sparse_kl_backward`) against its
/// autograd twin on the GPU, with the scores' f32 kernel and the tensor-core one, at the
/// 671B indexer shape (64 x 128, RoPE 64) and a small one: KL within 1e-5, weights'
/// gradients within 1e-4 (max relative; the kernels' dk atomics add in any order).
fn indexer_kl_backward_matches_autograd(gpu: &Device) -> Result<Vec<Outcome>> {
    let mut out = vec![];
    for (tensor_cores, shape, rows) in [
        (false, (1, 300, 256, 192, 64, 128, 64, 64), 128),
        (true, (1, 300, 256, 192, 64, 128, 64, 64), 128),
        (true, (2, 37, 40, 24, 3, 32, 16, 8), 5),
    ] {
        let (kl, grads) =
            crate::model::indexer::sparse_kl_against_autograd(gpu, tensor_cores, shape, rows, 9)?;
        out.push(Outcome {
            name: "explicit indexer KL backward vs autograd",
            ok: kl <= 1e-5 && grads <= 1e-4,
            detail: format!("tensor cores {tensor_cores}, (B, T, D, Q, HI, DI, R, k) {shape:?}, rows {rows}: KL rel err {kl:.1e}, weights' gradients max rel err {grads:.1e}"),
        });
    }
    Ok(out)
}

/// A tensor's values (on any device, any float dtype) as the bit patterns of their f32
/// values: equal bits, equal values (bf16 and f16 widen to f32 exactly).
pub(crate) fn f32_bits(t: &Tensor) -> Result<Vec<u32>> {
    Ok(t.to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .map(|v| v.to_bits())
        .collect())
}

/// Run every check (or those whose group name contains `only`); print one line each; fail if
/// any fails.
pub fn run(device_name: &str, only: Option<&str>) -> Result<()> {
    let gpu = crate::parse_device(device_name)?;
    if gpu.is_cpu() {
        bail!("gpu-selftest needs a GPU device (--device cuda)");
    }
    let dir: PathBuf =
        std::env::temp_dir().join(format!("dsa-gpu-selftest-{}", std::process::id()));
    let model = dir.join("model");
    crate::tiny::write_random_checkpoint(&model, &crate::tiny::tiny_config(true), 5, 1 << 20)?;
    let tokens_file = dir.join("tokens.bin");
    crate::data::write_token_file(
        &tokens_file,
        &crate::tiny::synthetic_corpus(512, 1 << 14, 5),
    )?;
    type Group<'a> = (&'static str, Box<dyn Fn() -> Result<Vec<Outcome>> + 'a>);
    let groups: Vec<Group> = vec![
        ("sparse-mla", Box::new(|| sparse_kernel_matches_twin(&gpu))),
        ("indexer", Box::new(|| indexer_kernel_matches_twin(&gpu))),
        // Checks of the kernel modules (one line per module).
        ("warmup-kl", Box::new(|| warmup_kl::checks(&gpu))),
        ("sparse-mla-tc", Box::new(|| sparse_mla_tc::checks(&gpu))),
        ("indexer-topk", Box::new(|| indexer_topk::checks(&gpu))),
        ("rows", Box::new(|| rows::checks(&gpu))),
        ("moe-route", Box::new(|| moe_route::checks(&gpu))),
        ("fp8-dequant", Box::new(|| fp8_dequant::checks(&gpu))),
        ("fp8-dispatch", Box::new(|| fp8_dispatch::checks(&gpu))),
        ("fp8-scores", Box::new(|| fp8_scores::checks(&gpu))),
        (
            "fp8-frozen",
            Box::new(|| frozen_fp8_warm_up_matches_dense(&model, &tokens_file, device_name)),
        ),
        (
            "moe-grouped",
            Box::new(|| moe_grouped_matches_per_expert(&gpu)),
        ),
        (
            "layer-backward",
            Box::new(|| layer_backward_matches_autograd(&gpu)),
        ),
        (
            "indexer-kl-backward",
            Box::new(|| indexer_kl_backward_matches_autograd(&gpu)),
        ),
        ("lm-loss", Box::new(|| lm_loss_matches_twin(&gpu))),
        ("adamw", Box::new(|| adamw_matches_twin(&gpu))),
        ("grad-sum", Box::new(|| grad_sum::checks(&gpu))),
        ("rms-norm", Box::new(|| rms_norm::checks(&gpu))),
        ("rope", Box::new(|| rope::checks(&gpu))),
        ("join-rows", Box::new(|| join_rows::checks(&gpu))),
        ("swiglu", Box::new(|| swiglu::checks(&gpu))),
        (
            "dense-recompute",
            Box::new(|| dense_recompute_matches_whole(&gpu)),
        ),
        ("forward", Box::new(|| forward_matches_cpu(&model, &gpu))),
        (
            "eval-blocks",
            Box::new(|| eval_blocks_match_whole(&model, &gpu)),
        ),
        (
            "train-steps",
            Box::new(|| train_steps_match_cpu(&model, &tokens_file, device_name)),
        ),
    ];
    let mut all = vec![];
    for (name, check) in &groups {
        if only.is_none_or(|o| name.contains(o)) {
            all.extend(check()?);
        }
    }
    if all.is_empty() {
        bail!(
            "gpu-selftest --only {}: no check group matches (groups: {})",
            only.unwrap_or(""),
            groups.iter().map(|g| g.0).collect::<Vec<_>>().join(", ")
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    let failed = all.iter().filter(|o| !o.ok).count();
    for o in &all {
        println!(
            "{} {}: {}",
            if o.ok { "PASS" } else { "FAIL" },
            o.name,
            o.detail
        );
    }
    println!(
        "gpu-selftest: {} passed, {failed} failed",
        all.len() - failed
    );
    if failed > 0 {
        bail!("{failed} GPU check(s) failed");
    }
    Ok(())
}
