//! Benchmarks run from the command line (`dsa-train bench ...`); never timed tests.
//!
//! `bench load`: read plus dequantise a DeepSeek-shaped FP8 checkpoint into bf16 model
//! parameters through the same path `eval` and `train` use (`weights::load_params`), reported
//! as checkpoint bytes per second. The checkpoint is generated first when the folder is empty;
//! the timed runs then read it from the page cache (the number measures decoding, not disk).

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::json;

use crate::checkpoint::{Checkpoint, FP8_BLOCK};
use crate::config::{IndexerDefaults, ModelConfig};
use crate::weights::{load_params, model_weights};

/// A DeepSeek-V3-shaped config whose FP8 checkpoint is about `gib` GiB (hidden 2048, 4
/// layers, 1 dense; the expert count sets the size).
pub fn sized_config(gib: f64) -> serde_json::Value {
    let (hidden, moe_inter) = (2048usize, 1024usize);
    let per_expert = 3 * hidden * moe_inter; // bytes in FP8
    let experts = ((gib * (1u64 << 30) as f64 - 150e6) / (3.0 * per_expert as f64))
        .round()
        .max(8.0) as usize;
    let experts = experts.div_ceil(8) * 8;
    let mut c = crate::tiny::tiny_config(false);
    let o = c.as_object_mut().unwrap();
    for (k, v) in [
        ("hidden_size", json!(hidden)),
        ("num_hidden_layers", json!(4)),
        ("intermediate_size", json!(5632)),
        ("moe_intermediate_size", json!(moe_inter)),
        ("num_attention_heads", json!(16)),
        ("q_lora_rank", json!(768)),
        ("kv_lora_rank", json!(512)),
        ("qk_nope_head_dim", json!(128)),
        ("qk_rope_head_dim", json!(64)),
        ("v_head_dim", json!(128)),
        ("n_routed_experts", json!(experts)),
        ("n_group", json!(8)),
        ("topk_group", json!(4)),
        ("num_experts_per_tok", json!(8)),
        ("vocab_size", json!(32768)),
        ("num_nextn_predict_layers", json!(0)),
    ] {
        o.insert(k.into(), v);
    }
    c
}

pub fn bench_load(dir: &Path, gib: f64, repeats: usize) -> Result<String> {
    if !dir.join("config.json").exists() {
        crate::elog!(
            "[bench] writing a ~{gib} GiB FP8 checkpoint to {} (one-off)",
            dir.display()
        );
        crate::tiny::write_random_checkpoint(dir, &sized_config(gib), 1, 512 << 20)?;
    }
    let cfg = ModelConfig::from_dir(dir, &IndexerDefaults::default())?;
    let specs: Vec<_> = model_weights(&cfg, false)
        .into_iter()
        .filter(|s| !s.indexer)
        .collect();
    let ckpt = Checkpoint::open(dir)?;
    let bytes: u64 = ckpt
        .names()
        .map(|n| {
            ckpt.info(n)
                .map(|i| (i.shape.iter().product::<usize>() * i.dtype.size()) as u64)
        })
        .sum::<Result<u64>>()?;
    let fp8_bytes: u64 = specs
        .iter()
        .filter(|s| s.storage() == crate::checkpoint::StDtype::F8E4M3)
        .map(|s| s.shape.iter().product::<usize>() as u64)
        .sum();
    let mut times = vec![];
    for r in 0..repeats + 1 {
        let ckpt = Checkpoint::open(dir)?; // fresh maps each run
        let t0 = Instant::now();
        let (params, _) = load_params(&ckpt, &specs, DType::BF16, &Device::Cpu, 0)?;
        let dt = t0.elapsed().as_secs_f64();
        drop(params);
        if r > 0 {
            times.push(dt); // the first run warms the page cache
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let median = times[times.len() / 2];
    Ok(format!(
        "load+dequantise to bf16: {:.2} GiB checkpoint ({:.2} GiB FP8, block {FP8_BLOCK}), {} threads, median of {}: {:.3} s = {:.2} GB/s",
        bytes as f64 / (1u64 << 30) as f64,
        fp8_bytes as f64 / (1u64 << 30) as f64,
        rayon::current_num_threads(),
        times.len(),
        median,
        bytes as f64 / median / 1e9
    ))
}

/// Write a training checkpoint of about `gib` GiB (f32 parameters and their two Adam moments)
/// into `dir` and time the save (writing, flushing, reading back for the checksums) and the
/// verification a resume runs (`integrity::verify`, page cache warm), median of `repeats`.
pub fn bench_checkpoint(dir: &Path, gib: f64, repeats: usize) -> Result<String> {
    use crate::train::{ckpt, integrity};
    let values = (gib * (1u64 << 30) as f64 / 12.0) as usize; // 4 bytes x (param + 2 moments)
    let per = 1usize << 24;
    let mut params = std::collections::BTreeMap::new();
    let mut moments = std::collections::BTreeMap::new();
    let mut left = values;
    let mut i = 0;
    while left > 0 {
        let n = left.min(per);
        let t = Tensor::rand(-1f32, 1f32, n, &Device::Cpu)?;
        moments.insert(format!("t{i}"), (t.affine(0.5, 0.0)?, t.sqr()?));
        params.insert(format!("t{i}"), t);
        left -= n;
        i += 1;
    }
    let snap = ckpt::Snapshot {
        state: ckpt::TrainState {
            format_version: ckpt::FORMAT_VERSION,
            dsa_train_version: env!("CARGO_PKG_VERSION").into(),
            stage: crate::recipe::Stage::Warmup,
            step: 1,
            tokens_seen: 0,
            data_cursor: Default::default(),
            blend_cursor: None,
            optimizer_steps: Default::default(),
            model_path: String::new(),
            base: None,
        },
        params,
        moments,
        param_rows: Default::default(),
        moment_rows: Default::default(),
        recipe_toml: String::new(),
    };
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let (mut save, mut verify) = (vec![], vec![]);
    let mut bytes = 0u64;
    for _ in 0..repeats.max(1) {
        let t0 = Instant::now();
        let step = ckpt::save(dir, &snap)?;
        save.push(t0.elapsed().as_secs_f64());
        let t0 = Instant::now();
        integrity::verify(&step, integrity::Use::Resume)?;
        verify.push(t0.elapsed().as_secs_f64());
        bytes =
            integrity::read_marker(&step)?.map_or(0, |m| m.files.values().map(|f| f.bytes).sum());
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let (s, v) = (median(&mut save), median(&mut verify));
    Ok(format!(
        "checkpoint of {:.2} GiB in {}, {} threads, median of {}: save {s:.3} s (write, flush, checksums) = {:.2} GB/s; verify {v:.3} s = {:.2} GB/s",
        bytes as f64 / (1u64 << 30) as f64, dir.display(), rayon::current_num_threads(), save.len(), bytes as f64 / s / 1e9, bytes as f64 / v / 1e9
    ))
}

/// Time `steps` (at least one) training steps of `recipe` after one untimed one; no
/// checkpoint is written. Besides tokens/s: the model FLOP utilisation against
/// `peak_tflops` (the bf16 dense peak: 989 for H100 SXM and H200), with the FLOPs of a step
/// counted as `dsa-train check` counts them (train::plan: 2 x active parameters per token,
/// attention over the selected or causal keys, indexer scoring; a training forward x3,
/// recomputation not counted), and the device memory peak of the timed steps (the CUDA
/// pools' high-water mark).
pub fn bench_step(recipe: crate::recipe::Recipe, steps: usize, peak_tflops: f64) -> Result<String> {
    let steps = steps.max(1);
    let flops = crate::train::plan::plan(&recipe)?.flops_per_step;
    let mut trainer = crate::train::Trainer::new(recipe.clone(), None)?;
    let mut times = vec![];
    let mut last = None;
    for i in 0..steps + 1 {
        let t0 = Instant::now();
        let m = trainer.train_step()?;
        trainer.sync_device()?;
        if i >= 1 {
            times.push(t0.elapsed().as_secs_f64());
        } else {
            crate::profile::reset(); // the regions of the timed steps only
            crate::cuda_runtime::reset_peak();
        }
        last = Some(m);
    }
    let peak = crate::cuda_runtime::peak_bytes().map_or(String::new(), |b| {
        format!(
            ", device memory peak {:.1} GiB",
            b as f64 / (1u64 << 30) as f64
        )
    });
    let regions = crate::profile::report(steps);
    if !regions.is_empty() {
        crate::elog!("[profile] DSA_PROFILE=1, per timed step (each region between device synchronisations):\n{regions}");
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let median = times[times.len() / 2];
    let tokens = (recipe.train.global_batch_seqs * recipe.data.seq_len) as f64;
    let m = last.expect("at least one step");
    Ok(format!(
        "{} stage, seq_len {}, {} seqs/step, {} {}, layers' backward {}: median step {:.3} s = {:.0} tokens/s, {:.1} TFLOP/s = MFU {:.1} % of {peak_tflops} ({:.2} GFLOP/token) (last: lm_loss {}, indexer_kl {:.4}){peak}{}",
        recipe.train.stage, recipe.data.seq_len, recipe.train.global_batch_seqs, recipe.model.device, recipe.model.dtype,
        match (recipe.train.stage, crate::train::backward_plan(&recipe)) {
            (crate::recipe::Stage::Warmup, _) => "none (frozen)",
            (_, crate::model::BackwardPlan::Recompute) => "recomputed",
            (_, crate::model::BackwardPlan::Autograd) => "by autograd",
            (_, crate::model::BackwardPlan::Saved) => "from saved activations",
        },
        median, tokens / median, flops / median / 1e12, 100.0 * flops / median / (peak_tflops * 1e12), flops / tokens / 1e9,
        m.lm_loss.map_or("-".into(), |l| format!("{l:.4}")), m.indexer_kl, crate::profile::device_memory_in_use()
    ))
}

/// A flag's value of comma-separated positive integers (`--lens 8192,32768`, `--heads 128,64`);
/// an error names the flag and the value, so a typo never runs a long benchmark at a wrong shape.
pub fn parse_counts(flag: &str, value: &str) -> Result<Vec<usize>> {
    let counts = value
        .split(',')
        .map(|x| x.trim().parse::<usize>().ok().filter(|&n| n > 0))
        .collect::<Option<Vec<_>>>();
    match counts {
        Some(c) if !c.is_empty() => Ok(c),
        _ => anyhow::bail!("{flag} {value:?}: expected comma-separated positive integers"),
    }
}

/// `bench kernels`: the DSA kernels at the 671B attention shape (128 heads, d_qk 576, d_v 512,
/// top-k 2048; indexer 64 x 128; the tensor-core sparse MLA at each count of `heads` on the
/// same sets) for each length, beside cuBLAS's bf16 matmul rate in the same run. FLOP counts
/// (multiply-add = 2): sparse MLA forward 2 S H k (576 + 512), backward
/// 2 S H k (2 x 512 + 3 x 576), indexer scores at the selection 2 S k HI DI (forward) and twice
/// that (backward), with k the number of selected keys summed over queries (min(k, t+1)).
pub fn bench_kernels(
    device_name: &str,
    lens: &[usize],
    heads: &[usize],
    only: Option<&str>,
) -> Result<String> {
    use candle_core::{Tensor, Var};
    let dev = crate::parse_device(device_name)?;
    if !crate::kernels::KernelPolicy::default().on(&dev) {
        anyhow::bail!("bench kernels needs a CUDA device and a --features cuda build");
    }
    // cuBLAS reference: bf16 4096^3.
    let a = crate::rng::randn(&[4096, 4096], 1, 1.0, &dev)?.to_dtype(DType::BF16)?;
    let b = crate::rng::randn(&[4096, 4096], 2, 1.0, &dev)?.to_dtype(DType::BF16)?;
    let t = crate::profile::time_median(&dev, 10, || Ok(a.matmul(&b).map(|_| ())?))?;
    let mut out = Emit(vec![]);
    out.push(format!(
        "cuBLAS bf16 matmul 4096^3: {:.3} ms = {:.0} TFLOP/s",
        t * 1e3,
        2.0 * 4096f64.powi(3) / t / 1e12
    ));
    let (h, dqk, dv, topk, hi, di) = (128usize, 576usize, 512usize, 2048usize, 64usize, 128usize);
    for &l in lens {
        // The tensor-core kernels (each module times its own; a failure such as running out of
        // memory at one length is reported and the next length still runs).
        type Bench<'a> = &'a dyn Fn(&Device, usize) -> Result<Vec<String>>;
        // The head counts only shape the sparse MLA (the indexer's 64 x 128 is fixed).
        let sparse_mla = |d: &Device, l: usize| crate::kernels::sparse_mla_tc::bench(d, l, heads);
        let families: [(&str, Bench); 4] = [
            ("indexer top-k", &crate::kernels::indexer_topk::bench),
            (
                "indexer scores at selection (tensor cores)",
                &crate::kernels::indexer_at_tc::bench,
            ),
            ("sparse MLA (tensor cores)", &sparse_mla),
            (
                "dense attention + warm-up KL",
                &crate::kernels::warmup_kl::bench,
            ),
        ];
        let wanted = |name: &str| only.is_none_or(|o| name.contains(o));
        for (name, bench) in families.into_iter().filter(|f| wanted(f.0)) {
            match bench(&dev, l) {
                Ok(lines) => lines
                    .into_iter()
                    .for_each(|x| out.push(format!("L {l}: {x}"))),
                Err(e) => out.push(format!("L {l}: {name}: failed: {e:#}")),
            }
        }
        // Version-1 f32 kernels (CUDA cores), the baseline: short lengths only (f32 inputs at
        // the 671B shape need 9 GiB per 32K queries).
        if l > 8192 || !wanted("v1 f32 kernels") {
            continue;
        }
        let mut rng = crate::rng::SplitMix64::new(l as u64);
        let kk = topk.min(l);
        let mut idx = vec![u32::MAX; l * kk];
        let mut pairs = 0f64;
        for t in 0..l {
            let n = kk.min(t + 1);
            pairs += n as f64;
            for j in 0..n {
                idx[t * kk + j] = if t < kk {
                    j as u32
                } else {
                    (rng.next_u64() % (t as u64 + 1)) as u32
                };
            }
        }
        let idx = Tensor::from_vec(idx, (l, kk), &dev)?;
        let q = Var::from_tensor(&crate::rng::randn(&[l, h, dqk], 3, 1.0, &dev)?)?;
        let kv = Var::from_tensor(&crate::rng::randn(&[l, dqk], 4, 1.0, &dev)?)?;
        let scale = (192f64).powf(-0.5);
        let fwd = crate::profile::time_median(&dev, 3, || {
            Ok(
                crate::kernels::sparse_mla(q.as_tensor(), kv.as_tensor(), &idx, scale, dv)
                    .map(|_| ())?,
            )
        })?;
        let o = crate::kernels::sparse_mla(q.as_tensor(), kv.as_tensor(), &idx, scale, dv)?;
        let g = crate::rng::randn(&[l, h, dv + 1], 5, 1.0, &dev)?;
        let loss = (o * g)?.sum_all()?;
        let bwd = crate::profile::time_median(&dev, 3, || Ok(loss.backward().map(|_| ())?))?;
        let f_fwd = 2.0 * pairs * h as f64 * (dqk + dv) as f64;
        let f_bwd = 2.0 * pairs * h as f64 * (2 * dv + 3 * dqk) as f64;
        out.push(format!(
            "L {l}: sparse MLA fwd {:.2} ms = {:.1} TFLOP/s; bwd (incl. autograd glue) {:.2} ms = {:.1} TFLOP/s",
            fwd * 1e3, f_fwd / fwd / 1e12, bwd * 1e3, f_bwd / bwd / 1e12
        ));
        drop((q, kv, loss));
        let qi = Var::from_tensor(&crate::rng::randn(&[l, hi, di], 6, 1.0, &dev)?)?;
        let wi = Var::from_tensor(&crate::rng::randn(&[l, hi], 7, 1.0, &dev)?)?;
        let ki = Var::from_tensor(&crate::rng::randn(&[l, di], 8, 1.0, &dev)?)?;
        let ifwd = crate::profile::time_median(&dev, 3, || {
            Ok(crate::kernels::indexer_scores_at(
                qi.as_tensor(),
                wi.as_tensor(),
                ki.as_tensor(),
                &idx,
            )
            .map(|_| ())?)
        })?;
        let s = crate::kernels::indexer_scores_at(
            qi.as_tensor(),
            wi.as_tensor(),
            ki.as_tensor(),
            &idx,
        )?
        .sum_all()?;
        let ibwd = crate::profile::time_median(&dev, 3, || Ok(s.backward().map(|_| ())?))?;
        let f_i = 2.0 * pairs * (hi * di) as f64;
        out.push(format!(
            "L {l}: indexer scores at selection fwd {:.2} ms = {:.1} TFLOP/s; bwd {:.2} ms = {:.1} TFLOP/s",
            ifwd * 1e3, f_i / ifwd / 1e12, ibwd * 1e3, 2.0 * f_i / ibwd / 1e12
        ));
    }
    Ok(out.0.join("\n"))
}

/// Lines of a long benchmark: each is printed to stderr as soon as it is measured (a later
/// failure, such as running out of memory at a longer length, keeps the earlier figures).
struct Emit(Vec<String>);

impl Emit {
    fn push(&mut self, line: String) {
        crate::elog!("[bench] {line}");
        self.0.push(line);
    }
}

#[cfg(test)]
mod tests {
    use super::parse_counts;

    #[test]
    fn parse_counts_reads_comma_lists_and_names_the_flag_on_bad_values() {
        assert_eq!(
            parse_counts("--heads", "128, 64,16").unwrap(),
            vec![128, 64, 16]
        );
        assert_eq!(parse_counts("--lens", "8192").unwrap(), vec![8192]);
        for bad in ["", "128,", "64,x", "0", "-16", "1.5"] {
            let e = parse_counts("--heads", bad).unwrap_err().to_string();
            assert!(e.starts_with("--heads "), "{bad:?}: {e}");
        }
    }
}
