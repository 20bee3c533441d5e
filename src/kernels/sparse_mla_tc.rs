//! Tensor-core sparse MLA in absorbed (MQA) mode, bf16 (kernels/sparse_mla_tc.cu).
//!
//! Same function as `kernels::sparse_mla` (its f32 CUDA-core twin): q [N, H, DQK], one shared
//! key per token kv [NKV, DQK] whose first DV columns are the value, idx [N, K] u32 absolute kv
//! rows (u32::MAX, or any row >= NKV, is padding). Output [N, H, DV + 1] f32: the attention
//! output, then the natural-log LSE of the scaled scores (a query with no valid key gets a zero
//! output and LSE -inf; the f32 twin gives NaN there). Differentiable in q and kv; the gradient of
//! the LSE column is ignored, as in the twin.
//!
//! At the 671B shape on Hopper the forward and the head-mean probabilities run the wgmma kernels
//! of kernels/sparse_mla_wg.cu instead (`wgmma_forward`, `wgmma_probs`): the same tiles and sums,
//! the same output bits on every case tested.
//!
//! Numerics: bf16 operands on mma.sync (or wgmma) with f32 accumulation; softmax in f32 (base 2, ex2.approx);
//! P rounded to bf16 before P V; backward recomputes P from the LSE, rounds dO, P and scale * dS
//! to bf16 as operands, accumulates dq and dkv in f32 and returns them as bf16 (candle wants the
//! gradient dtype of the input).
//!
//! dkv summation: by default f32 atomics (order not deterministic). With a deterministic
//! `KernelPolicy` each (query, selected key) contribution is written to a chunk
//! buffer and summed per kv row in ascending (query, slot) order, chunk by chunk: bit-identical
//! from run to run (about twice the backward time).
//!
//! Merged queries (`merged_queries`, opt-in): at 8, 16 or 32 heads the forward and backward can
//! run 64 / H neighbouring queries as one 64-row block on the wgmma kernels over the union of
//! their selected keys (`merged_keys_plain` is the union's host twin), each row masked to its
//! own query's keys; at 16 heads the head-mean probabilities too (`merged_probs`: four queries a
//! block, one row group each, each query's sums stored to its own slots).
//!
//! `sparse_mla_head_mean_probs_bf16`: the sparse-stage KL target (head-mean probabilities at the
//! selected slots, from the forward's LSE), only the S = Q K^T product; deterministic always.

use candle_core::{Result, Tensor};

use crate::kernels::{Fused, KernelPolicy};

/// Largest DQK / DV the kernels handle (shared-memory budget of one 64-head block on an H100).
pub const MAX_DQK: usize = 576;
pub const MAX_DV: usize = 512;

/// Built for sm_90a (the default `DSA_CUDA_ARCH`; other builds carry no wgmma code) and not
/// switched off by the policy (`Fused::SparseWgmma`: every shape takes the mma.sync kernels).
fn wgmma_on(policy: KernelPolicy) -> bool {
    #[cfg(feature = "cuda")]
    let sm90a = env!("DSA_CUDA_ARCH_BUILT") == "sm_90a";
    #[cfg(not(feature = "cuda"))]
    let sm90a = false;
    sm90a && !policy.is_plain(Fused::SparseWgmma)
}

/// Does the forward of this shape run the wgmma kernel: 64-head blocks at DQK 576 and DV 512
/// (the 671B shape; H a multiple of 64).
pub fn wgmma_forward(policy: KernelPolicy, h: usize, dqk: usize, dv: usize) -> bool {
    h.is_multiple_of(64) && dqk == 576 && dv == 512 && wgmma_on(policy)
}

/// Does the backward of this shape compute S, dP and dQ on wgmma (kernels/sparse_mla_tc.cu,
/// sparse_mla_tc_bwd_wg; the dKV tile as on mma.sync): 64-head blocks at DQK 576 and DV 512, as
/// the forward.
pub fn wgmma_backward(policy: KernelPolicy, h: usize, dqk: usize, dv: usize) -> bool {
    wgmma_forward(policy, h, dqk, dv)
}

/// Does the backward at `h` heads run the few-head variant (H <= 32, one group of 16 or 32
/// heads a block): 4 or 2 times the warps of the plain mma.sync kernel, the extra ones sharing
/// the dKV tile's columns, 256 threads a block. Every value is computed by the same products
/// in the same order as by the plain kernel (bit for bit with the deterministic dkv).
pub fn few_heads_backward(policy: KernelPolicy, h: usize) -> bool {
    h <= 32 && !policy.is_plain(crate::kernels::Fused::SparseFewHeads)
}

/// Do the forward and backward of n queries at h heads (k slots each, nkv kv rows) merge
/// neighbouring queries (kernels/sparse_mla_tc.cu, sparse_mla_tc_merge_queries): G = 64 / h
/// consecutive queries become one block of 64 rows on the wgmma kernels, over the union of their
/// keys, each row taking only its query's keys (a key another query of the block selected scores
/// -inf for it). The products are 64 rows tall instead of 16 h / 16, and in the backward the dkv
/// of a key the G queries share is summed in the block (one f32 atomic per group, not per
/// query). The head-mean probabilities merge at 16 heads (`merged_probs`). At
/// h 8, 16 or 32, the 671B attention widths (DQK 576, DV 512), n a multiple of G, G k <= 16384
/// (the sort's shared memory) and nkv < 2^29 (a key and its query packed in 32 bits). Opt-in
/// (`Fused::OPT_IN`) until its gpu-selftest checks have passed on a GPU.
pub fn merged_queries(
    policy: KernelPolicy,
    h: usize,
    dqk: usize,
    dv: usize,
    n: usize,
    k: usize,
    nkv: usize,
) -> bool {
    matches!(h, 8 | 16 | 32)
        && n.is_multiple_of(64 / h)
        && (64 / h) * k <= 16384
        && nkv < (1 << 29)
        && wgmma_backward(policy, 64, dqk, dv)
        && !policy.is_plain(Fused::SparseMergeQueries)
}

/// The keys of merged queries (`merged_queries`), on the host: the plain twin of the kernel
/// `sparse_mla_tc_merge_queries`. For each group of `g` consecutive rows of `idx` [N, k]
/// (N a multiple of g), the valid entries (< nkv) of its rows ascending by kv row, a key taking
/// as many entries as the most times one row selected it, and per entry the mask of the rows
/// that selected it more times than the entry's rank among that key's entries (bit s: row s of
/// the group). Every row's selection, duplicates included, is the entries whose mask has its bit.
pub fn merged_keys_plain(idx: &[u32], k: usize, g: usize, nkv: usize) -> Vec<(Vec<u32>, Vec<u8>)> {
    idx.chunks(g * k)
        .map(|group| {
            let mut pairs: Vec<(u32, usize)> = group
                .iter()
                .enumerate()
                .filter(|&(_, &key)| (key as usize) < nkv)
                .map(|(i, &key)| (key, i / k))
                .collect();
            pairs.sort_unstable();
            let (mut keys, mut masks) = (vec![], vec![]);
            let mut i = 0;
            while i < pairs.len() {
                let key = pairs[i].0;
                let start = keys.len();
                let mut rank = 0;
                let mut j = i;
                while j < pairs.len() && pairs[j].0 == key {
                    rank = if j > i && pairs[j] == pairs[j - 1] {
                        rank + 1
                    } else {
                        0
                    };
                    if start + rank == keys.len() {
                        keys.push(key);
                        masks.push(0u8);
                    }
                    masks[start + rank] |= 1 << pairs[j].1;
                    j += 1;
                }
                i = j;
            }
            (keys, masks)
        })
        .collect()
}

/// The kernel behind `merged_keys_plain` on a CUDA device: idx [N, k] u32 -> per group (keys,
/// masks) as the twin gives them (for gpu-selftest).
pub fn merged_keys(idx: &Tensor, g: usize, nkv: usize) -> Result<Vec<(Vec<u32>, Vec<u8>)>> {
    #[cfg(feature = "cuda")]
    {
        cuda::merged_keys(idx, g, nkv)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (idx, g, nkv);
        candle_core::bail!("merged_keys needs the `cuda` feature")
    }
}

/// Do the head-mean probabilities of n queries at h heads run merged (`merged_queries`; the
/// probabilities' kernel takes 16-head queries four to a block, each row group one query; the
/// slots, below k <= 4096, fit the u16 slot map).
pub fn merged_probs(
    policy: KernelPolicy,
    h: usize,
    dqk: usize,
    dv: usize,
    n: usize,
    k: usize,
    nkv: usize,
) -> bool {
    h == 16 && merged_queries(policy, h, dqk, dv, n, k, nkv)
}

/// Do the head-mean probabilities of this shape run the wgmma kernel: H = 128 at DQK 576.
pub fn wgmma_probs(policy: KernelPolicy, h: usize, dqk: usize) -> bool {
    h == 128 && dqk == 576 && wgmma_on(policy)
}

/// Shapes the tensor-core path handles: DQK and DV multiples of 64, DV <= DQK, DQK <= 576,
/// DV <= 512, any H >= 1. Callers fall back to the f32 kernel otherwise.
pub fn supported(dqk: usize, dv: usize, h: usize) -> bool {
    h >= 1
        && dv >= 64
        && dqk.is_multiple_of(64)
        && dv.is_multiple_of(64)
        && dv <= dqk
        && dqk <= MAX_DQK
        && dv <= MAX_DV
}

/// Sparse MLA forward: q [N, H, DQK] bf16, kv [NKV, DQK] bf16, idx [N, K] u32 -> [N, H, DV + 1]
/// f32 (output, then LSE). Differentiable in q and kv (gradients bf16).
pub fn sparse_mla_bf16(
    policy: KernelPolicy,
    q: &Tensor,
    kv: &Tensor,
    idx: &Tensor,
    scale: f64,
    dv: usize,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        let (q, kv, idx) = (q.contiguous()?, kv.contiguous()?, idx.contiguous()?);
        q.apply_op3(
            &kv,
            &idx,
            cuda::SparseMlaTc {
                scale: scale as f32,
                dv,
                policy,
            },
        )
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (policy, q, kv, idx, scale, dv);
        candle_core::bail!("sparse_mla_bf16 kernel needs the `cuda` feature")
    }
}

/// The backward of `sparse_mla_bf16` without autograd: `fwd_out` its result [N, H, DV + 1]
/// f32 and `grad` that result's gradient [N, H, DV + 1] f32 (the LSE column is ignored) ->
/// (dq [N, H, DQK], dkv [NKV, DQK]) bf16, the same kernel autograd runs (deterministic when
/// the policy asks for it).
pub fn sparse_mla_bf16_backward(
    policy: KernelPolicy,
    q: &Tensor,
    kv: &Tensor,
    idx: &Tensor,
    fwd_out: &Tensor,
    grad: &Tensor,
    scale: f64,
    dv: usize,
) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    {
        use candle_core::CustomOp3;
        let (q, kv, idx) = (q.contiguous()?, kv.contiguous()?, idx.contiguous()?);
        let (dq, dkv, _) = cuda::SparseMlaTc {
            scale: scale as f32,
            dv,
            policy,
        }
        .bwd(&q, &kv, &idx, fwd_out, grad)?;
        Ok((dq.expect("dq"), dkv.expect("dkv")))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (policy, q, kv, idx, fwd_out, grad, scale, dv);
        candle_core::bail!("sparse_mla_bf16 kernel needs the `cuda` feature")
    }
}

/// Head-mean probabilities of the sparse attention at its selected slots (the sparse-stage KL
/// target; not differentiated): q [N, H, DQK] bf16, kv [NKV, DQK] bf16, idx [N, K] u32 and the
/// forward's result fwd_out [N, H, DV + 1] f32 (column DV: the natural-log LSE) -> [N, K] f32,
/// pmean[n, j] = (1/H) sum_h exp(scale q[n, h] . kv[idx[n, j]] - lse[n, h]) for valid slots
/// (idx < NKV), 0 at padding slots and for queries without a valid slot. Same shapes as
/// `sparse_mla_bf16` (`supported`). Twin: `kernels::sparse_mla_head_mean_probs` (f32).
/// Numerics: S in f32 from bf16 products (mma.sync; wgmma at H 128, DQK 576, same bits), p = 2^(S scale log2 e - lse log2 e) in f32
/// (ex2.approx); heads summed in a fixed order without atomics, so bit-identical run to run.
pub fn sparse_mla_head_mean_probs_bf16(
    policy: KernelPolicy,
    q: &Tensor,
    kv: &Tensor,
    idx: &Tensor,
    fwd_out: &Tensor,
    scale: f64,
    dv: usize,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        let (q, kv, idx) = (q.contiguous()?, kv.contiguous()?, idx.contiguous()?);
        if let (Ok((n, _, _)), Ok((_, 0))) = (q.dims3(), idx.dims2()) {
            // No slots: nothing to launch (and no zero-length device buffers).
            return Tensor::zeros((n, 0), candle_core::DType::F32, q.device());
        }
        let op = cuda::SparseMlaTcProbs {
            policy,
            scale: scale as f32,
            dv,
            fwd_out: fwd_out.contiguous()?.detach(),
        };
        q.apply_op3_no_bwd(&kv, &idx, &op)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (policy, q, kv, idx, fwd_out, scale, dv);
        candle_core::bail!("sparse_mla_head_mean_probs_bf16 kernel needs the `cuda` feature")
    }
}

#[cfg(feature = "cuda")]
use crate::profile::time_median;

/// Benchmark at sequence length `l` at the 671B shape (DQK 576, DV 512, top-k 2048) for each
/// head count of `heads` (`bench kernels --heads`: 128, 64 and 16 unless told); query t
/// selects min(2048, t + 1) distinct keys among 0..=t: all of them while t < 2048, a random
/// subset after. FLOP counts with P = number of valid (query, key) pairs:
/// forward 2 P H (DQK + DV), backward 2 P H (2 DV + 3 DQK) (S, dP, dQ, dK and dV products).
/// head-mean probabilities 2 P H DQK (the S product only).
/// The backward is timed without autograd glue (the bwd op alone, prep included).
pub fn bench(dev: &candle_core::Device, l: usize, heads: &[usize]) -> anyhow::Result<Vec<String>> {
    #[cfg(feature = "cuda")]
    {
        bench_cuda(dev, l, heads)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (dev, l, heads);
        anyhow::bail!("sparse_mla_tc bench needs the `cuda` feature")
    }
}

#[cfg(feature = "cuda")]
fn bench_cuda(dev: &candle_core::Device, l: usize, heads: &[usize]) -> anyhow::Result<Vec<String>> {
    use candle_core::DType;
    if !dev.is_cuda() || l == 0 {
        anyhow::bail!("sparse_mla_tc bench needs a CUDA device and l >= 1");
    }
    let (dqk, topk) = (576usize, 2048usize);
    let kk = topk.min(l);
    // The last `nq` queries of a length-l context: a query's cost does not depend on l (k keys
    // each), only the gather's spread does, and all l queries at 128 heads would not fit.
    let nq = l.min(16384);
    let mut rng = crate::rng::SplitMix64::new(l as u64 ^ 0x5eed);
    let mut idx = vec![u32::MAX; nq * kk];
    let mut pairs = 0f64;
    // Partial Fisher-Yates over 0..=t, undone after each row so the pool stays the identity.
    let mut pool: Vec<u32> = (0..(l - nq) as u32).collect();
    let mut swaps = vec![0usize; kk];
    for t in l - nq..l {
        let row = t - (l - nq);
        pool.push(t as u32);
        let m = kk.min(t + 1);
        pairs += m as f64;
        if t < kk {
            for j in 0..=t {
                idx[row * kk + j] = j as u32;
            }
            continue;
        }
        for j in 0..kk {
            let r = j + (rng.next_u64() % (pool.len() - j) as u64) as usize;
            pool.swap(j, r);
            swaps[j] = r;
            idx[row * kk + j] = pool[j];
        }
        for j in (0..kk).rev() {
            pool.swap(j, swaps[j]);
        }
    }
    let idx_host = idx;
    let idx = Tensor::from_slice(&idx_host, (nq, kk), dev)?;
    let kv = Tensor::randn(0f32, 1f32, (l, dqk), dev)?.to_dtype(DType::BF16)?;
    // Every head count on the same sets (by default the 671B model's 128 heads, V3.2's 64-head
    // case of TileLang's examples, and the bench model's 16, V2-Lite's count).
    let mut lines = vec![];
    for &h in heads {
        lines.extend(bench_heads(dev, l, h, (&idx, &idx_host), &kv, pairs, nq)?);
    }
    Ok(lines)
}

/// The mean size of the union of `g` consecutive rows' valid entries of sets [rows, k]: the
/// keys a merged-query block visits (`merged_queries`).
#[cfg(feature = "cuda")]
fn mean_union(sets: &[u32], k: usize, g: usize) -> f64 {
    let groups = sets.len() / (k * g);
    let total: usize = (0..groups)
        .map(|u| {
            let mut keys: Vec<u32> = sets[u * g * k..(u + 1) * g * k]
                .iter()
                .copied()
                .filter(|&v| v != u32::MAX)
                .collect();
            keys.sort_unstable();
            keys.dedup();
            keys.len()
        })
        .sum();
    total as f64 / groups.max(1) as f64
}

/// `bench_cuda` at `h` heads on the sets `idx` [nq, k] of the last nq queries of l (on the
/// device, and on the host).
#[cfg(feature = "cuda")]
fn bench_heads(
    dev: &candle_core::Device,
    l: usize,
    h: usize,
    (idx, idx_host): (&Tensor, &[u32]),
    kv: &Tensor,
    pairs: f64,
    nq: usize,
) -> anyhow::Result<Vec<String>> {
    use candle_core::DType;
    let (dqk, dv, topk) = (576usize, 512usize, 2048usize);
    let q = Tensor::randn(0f32, 1f32, (nq, h, dqk), dev)?.to_dtype(DType::BF16)?;
    let scale = 192f64.powf(-0.5);
    // Where a wgmma kernel ran, the mma.sync one on the same inputs too (side by side). The
    // merged-query backward is timed where it applies (it is opt-in in training).
    let kernels = KernelPolicy::default().with(Fused::SparseMergeQueries);
    let mma = kernels.without(Fused::SparseWgmma);
    let mma_too =
        |wg: bool, f: &dyn Fn(KernelPolicy) -> anyhow::Result<()>| -> anyhow::Result<Option<f64>> {
            if !wg {
                return Ok(None);
            }
            time_median(dev, 5, || f(mma)).map(Some)
        };
    let run_fwd = |k: KernelPolicy| Ok(sparse_mla_bf16(k, &q, kv, idx, scale, dv).map(|_| ())?);
    let fwd = time_median(dev, 5, || run_fwd(kernels))?;
    let kk = idx.dim(1)?;
    let merged = merged_queries(kernels, h, dqk, dv, nq, kk, l);
    let fwd_kernel = if merged {
        "merged queries, wgmma"
    } else if wgmma_forward(kernels, h, dqk, dv) {
        "wgmma"
    } else {
        "mma.sync"
    };
    // Where the queries were merged, one query a block (mma.sync) on the same inputs.
    let fwd_mma = if merged {
        Some(time_median(dev, 5, || {
            run_fwd(kernels.without(Fused::SparseMergeQueries))
        })?)
    } else {
        mma_too(fwd_kernel == "wgmma", &run_fwd)?
    };
    let out = sparse_mla_bf16(kernels, &q, kv, idx, scale, dv)?;
    let dout = Tensor::randn(0f32, 1f32, (nq, h, dv + 1), dev)?;
    let (qr, kvr, idxr) = (&q, kv, idx);
    let run_bwd = |k: KernelPolicy| {
        let op = cuda::SparseMlaTcBwd {
            scale: scale as f32,
            dv,
            fwd_out: out.clone(),
            dout: dout.clone(),
            policy: k,
        };
        Ok(qr.apply_op3_no_bwd(kvr, idxr, &op).map(|_| ())?)
    };
    let mut bwd_times = vec![];
    for det in [false, true] {
        bwd_times.push(time_median(dev, 3, || {
            run_bwd(kernels.with_deterministic(det))
        })?);
    }
    let few = few_heads_backward(kernels, h);
    let bwd_kernel = if merged {
        "merged queries, S, dP, dQ on wgmma"
    } else if wgmma_backward(kernels, h, dqk, dv) {
        "S, dP, dQ on wgmma"
    } else if few {
        "mma.sync, 256 threads"
    } else {
        "mma.sync"
    };
    let bwd_mma = mma_too(bwd_kernel.starts_with("S, dP"), &run_bwd)?;
    // Where the queries were merged, one query a block (the few-head variant) on the same inputs.
    let one_a_block = if merged {
        let one = kernels.without(Fused::SparseMergeQueries);
        let mut t = vec![];
        for det in [false, true] {
            t.push(time_median(dev, 3, || {
                run_bwd(one.with_deterministic(det))
            })?);
        }
        let g = 64 / h;
        Some(vec![
            format!(
                "  bwd bf16 (one query a block, mma.sync, 256 threads, same inputs) atomic dkv {:.3} ms = {:.1} TFLOP/s, deterministic {:.3} ms = {:.1} TFLOP/s",
                t[0] * 1e3, f_bwd_of(pairs, h) / t[0] / 1e12, t[1] * 1e3, f_bwd_of(pairs, h) / t[1] / 1e12
            ),
            format!(
                "  merged queries: {g} a block over the union of their sets, {:.0} keys on average (k {kk}); TFLOP/s by the valid pairs",
                mean_union(idx_host, kk, g)
            ),
        ])
    } else {
        None
    };
    // Where the few-head variant ran, the plain 64- or 128-thread kernel on the same inputs.
    let bwd_plain = if few {
        let plain = kernels
            .without(Fused::SparseFewHeads)
            .without(Fused::SparseMergeQueries);
        let mut t = vec![];
        for det in [false, true] {
            t.push(time_median(dev, 3, || {
                run_bwd(plain.with_deterministic(det))
            })?);
        }
        Some(t)
    } else {
        None
    };
    let run_probs = |k: KernelPolicy| {
        Ok(sparse_mla_head_mean_probs_bf16(k, &q, kv, idx, &out, scale, dv).map(|_| ())?)
    };
    let probs = time_median(dev, 5, || run_probs(kernels))?;
    let merged_p = merged_probs(kernels, h, dqk, dv, nq, kk, l);
    let probs_kernel = if merged_p {
        "merged queries, mma.sync"
    } else if wgmma_probs(kernels, h, dqk) {
        "wgmma"
    } else {
        "mma.sync"
    };
    // Where a wgmma or merged kernel ran, one query a block on mma.sync on the same inputs.
    let probs_mma = if merged_p {
        Some(time_median(dev, 5, || {
            run_probs(kernels.without(Fused::SparseMergeQueries))
        })?)
    } else {
        mma_too(probs_kernel == "wgmma", &run_probs)?
    };
    let f_probs = 2.0 * pairs * h as f64 * dqk as f64;
    let f_fwd = 2.0 * pairs * h as f64 * (dqk + dv) as f64;
    let f_bwd = f_bwd_of(pairs, h);
    let mut lines = vec![
        format!("tensor-core sparse MLA (H {h}, dqk {dqk}, dv {dv}, k {topk}, the last {nq} queries of {l}: {pairs} valid pairs)"),
        format!("  fwd bf16 ({fwd_kernel}) {:.3} ms = {:.1} TFLOP/s", fwd * 1e3, f_fwd / fwd / 1e12),
        match fwd_mma {
            Some(t) => format!("  fwd bf16 (mma.sync, same inputs) {:.3} ms = {:.1} TFLOP/s", t * 1e3, f_fwd / t / 1e12),
            None => "  fwd bf16 (mma.sync): the kernel above".to_string(),
        },
        format!("  bwd bf16 ({bwd_kernel}, atomic dkv) {:.3} ms = {:.1} TFLOP/s", bwd_times[0] * 1e3, f_bwd / bwd_times[0] / 1e12),
        format!("  bwd bf16 ({bwd_kernel}, deterministic dkv) {:.3} ms = {:.1} TFLOP/s", bwd_times[1] * 1e3, f_bwd / bwd_times[1] / 1e12),
        match (bwd_mma, &bwd_plain) {
            (Some(t), _) => format!("  bwd bf16 (mma.sync, atomic dkv, same inputs) {:.3} ms = {:.1} TFLOP/s", t * 1e3, f_bwd / t / 1e12),
            (None, Some(t)) => format!(
                "  bwd bf16 (mma.sync, 64 threads a row group, same inputs) atomic dkv {:.3} ms = {:.1} TFLOP/s, deterministic {:.3} ms = {:.1} TFLOP/s",
                t[0] * 1e3, f_bwd / t[0] / 1e12, t[1] * 1e3, f_bwd / t[1] / 1e12
            ),
            (None, None) => "  bwd bf16 (mma.sync): the kernel above".to_string(),
        },
        format!("  head-mean probs bf16 ({probs_kernel}) {:.3} ms = {:.1} TFLOP/s", probs * 1e3, f_probs / probs / 1e12),
        match probs_mma {
            Some(t) => format!("  head-mean probs bf16 (mma.sync, same inputs) {:.3} ms = {:.1} TFLOP/s", t * 1e3, f_probs / t / 1e12),
            None => "  head-mean probs bf16 (mma.sync): the kernel above".to_string(),
        },
    ];
    if let Some(extra) = one_a_block {
        lines.splice(5..5, extra);
    }
    Ok(lines)
}

/// The backward's FLOPs at the 671B attention widths (DQK 576, DV 512) over `pairs` valid
/// (query, key) pairs at `h` heads: 2 P H (2 DV + 3 DQK).
#[cfg(feature = "cuda")]
fn f_bwd_of(pairs: f64, h: usize) -> f64 {
    2.0 * pairs * h as f64 * (2 * 512 + 3 * 576) as f64
}

#[cfg(feature = "cuda")]
pub(crate) mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaFunction, CudaSlice, CudaView, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaDevice, WrapErr};
    use candle_core::{
        bail, CpuStorage, CudaStorage, CustomOp3, DType, Layout, Result, Shape, Tensor,
    };
    use half::bf16;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/sparse_mla_tc.ptx"));
    const MODULE: &str = "dsa_sparse_mla_tc";
    const WG_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/sparse_mla_wg.ptx"));
    const WG_MODULE: &str = "dsa_sparse_mla_wg";
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    /// Queries per deterministic chunk at most, and the chunk buffer's budget (f32 elements).
    const DET_MAX_CHUNK: usize = 128;
    const DET_BUF_ELEMS: usize = 1 << 28;

    fn load(dev: &CudaDevice, name: &str, smem_bytes: usize) -> Result<CudaFunction> {
        crate::kernels::cuda::load_from(dev, MODULE, PTX, name, smem_bytes)
    }

    use crate::kernels::cuda::view;
    use crate::kernels::KernelPolicy;

    /// Uninitialised device buffer of at least one element (the kernels write before reading).
    fn alloc<T: candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
        dev: &CudaDevice,
        len: usize,
    ) -> Result<CudaSlice<T>> {
        // SAFETY: every consumer writes the elements it later reads (see each launch).
        unsafe { dev.alloc::<T>(len.max(1)) }
    }

    struct Dims {
        n: usize,
        h: usize,
        k: usize,
        dqk: usize,
        nkv: usize,
    }

    fn check(
        l1: &Layout,
        s1: &CudaStorage,
        l2: &Layout,
        s2: &CudaStorage,
        l3: &Layout,
        s3: &CudaStorage,
        dv: usize,
    ) -> Result<Dims> {
        let (n, h, dqk) = l1.shape().dims3()?;
        let (nkv, dqk2) = l2.shape().dims2()?;
        let (n3, k) = l3.shape().dims2()?;
        if dqk != dqk2
            || n3 != n
            || n == 0
            || nkv == 0
            || nkv >= u32::MAX as usize
            || !super::supported(dqk, dv, h)
        {
            bail!(
                "sparse_mla_bf16: q {:?}, kv {:?}, idx {:?} and dv {dv} do not fit (q [N, H, DQK], kv [NKV, DQK], idx [N, K], \
                 N, NKV >= 1, DQK and DV multiples of 64, 64 <= DV <= DQK, DQK <= {}, DV <= {})",
                l1.shape(),
                l2.shape(),
                l3.shape(),
                super::MAX_DQK,
                super::MAX_DV
            );
        }
        // cp.async reads 16-byte pieces of q and kv rows: their storage must start 16-byte aligned
        // (rows are multiples of 64 elements, so every row is then aligned too).
        if !l1.start_offset().is_multiple_of(8) || !l2.start_offset().is_multiple_of(8) {
            bail!(
                "sparse_mla_bf16: q and kv must start at a multiple of 8 elements of their storage (16 bytes), got offsets {} and {}",
                l1.start_offset(),
                l2.start_offset()
            );
        }
        if s1.dtype() != DType::BF16 || s2.dtype() != DType::BF16 || s3.dtype() != DType::U32 {
            bail!(
                "sparse_mla_bf16: expects bf16 q and kv and u32 indices, got {:?} {:?} {:?}",
                s1.dtype(),
                s2.dtype(),
                s3.dtype()
            );
        }
        Ok(Dims { n, h, k, dqk, nkv })
    }

    /// Row groups (of 16 heads) per block: 4 when H > 32, else just enough for H.
    fn row_groups(h: usize) -> usize {
        if h > 32 {
            4
        } else if h > 16 {
            2
        } else {
            1
        }
    }

    // Dynamic shared memory, laid out as in the .cu file.
    fn fwd_smem(rg: usize, dqk: usize) -> usize {
        let rows = 16 * rg;
        rows * dqk * 2 + 2 * 64 * dqk * 2 + rows * 128 + 8 * 16 * 4 + 2 * rows * 4
    }

    /// The wgmma forward: Q, two KV tiles (64 rows each), the P tile, row maxima and sums, the
    /// tiles' key masks, and 1024 bytes to align the swizzle blocks: 231552 bytes at DQK 576,
    /// 896 bytes under the 227 KB a block may have on an H100 or H200 (no room for another
    /// buffer).
    fn wg_fwd_smem(dqk: usize) -> usize {
        3 * 64 * dqk * 2 + 64 * 128 + 2 * 2 * 64 * 4 + 2 * 64 + 1024
    }

    /// The wgmma head-mean probabilities: three KV tiles, the column sums, alignment.
    fn wg_probs_smem(dqk: usize) -> usize {
        3 * 64 * dqk * 2 + 2 * 8 * 64 * 4 + 1024
    }

    /// The backward: Q, dO, two KV tiles of 32 keys, the P|dS tile, the tiles' key rows, 1024
    /// bytes to align the swizzle blocks, and for the wgmma variant the f32 P exchange (16 x 128)
    /// and the tiles' key masks: 230720 bytes at the 671B shape.
    fn bwd_smem(rg: usize, dqk: usize, dv: usize, wg: bool) -> usize {
        let rows = 16 * rg;
        rows * dqk * 2
            + rows * dv * 2
            + 2 * 32 * dqk * 2
            + rows * 128
            + 2 * 32 * 4
            + 1024
            + if wg { 16 * 128 * 4 + 2 * 32 } else { 0 }
    }

    fn check_smem(dev: &CudaDevice, bytes: usize) -> Result<()> {
        let limit = dev
            .cuda_stream()
            .context()
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .w()? as usize;
        if bytes > limit {
            bail!("sparse_mla_bf16: needs {bytes} bytes of shared memory per block, the device allows {limit}");
        }
        Ok(())
    }

    fn blocks(total: usize, per: usize, cap: usize) -> u32 {
        total.div_ceil(per).clamp(1, cap) as u32
    }

    /// Compacted indices [N, K] (valid entries first, original order) and counts [N].
    fn compact(
        dev: &CudaDevice,
        idx: &CudaView<u32>,
        d: &Dims,
    ) -> Result<(CudaSlice<u32>, CudaSlice<u32>)> {
        let cidx = alloc::<u32>(dev, d.n * d.k)?;
        let cnt = alloc::<u32>(dev, d.n)?;
        let f = load(dev, "sparse_mla_tc_compact", 0)?;
        let (n, k, nkv) = (d.n as i32, d.k as i32, d.nkv as u32);
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(idx).arg(&cidx).arg(&cnt).arg(&n).arg(&k).arg(&nkv);
        // SAFETY: idx is [N, K]; cidx [N, K] and cnt [N] are written (entries past cnt unused).
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (d.n.div_ceil(8) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .w()?;
        drop(b);
        Ok((cidx, cnt))
    }

    /// The queries a kernel runs: each query with its compacted keys, or (merged) each group of
    /// 64 / H neighbouring queries as one query of 64 heads over the union of their keys. The
    /// q, dO, output, LSE and delta rows are the same memory either way.
    struct KernelQueries {
        cidx: CudaSlice<u32>,
        cnt: CudaSlice<u32>,
        /// Merged: each union entry's mask of the group's queries that selected it.
        cmask: Option<CudaSlice<u8>>,
        n: usize,
        h: usize,
        k: usize,
    }

    fn kernel_queries(
        dev: &CudaDevice,
        idx: &CudaView<u32>,
        d: &Dims,
        merged: bool,
    ) -> Result<KernelQueries> {
        Ok(if merged {
            let g = 64 / d.h;
            let m = merge_queries(dev, idx, d, g, false)?;
            KernelQueries {
                cidx: m.uidx,
                cnt: m.ucnt,
                cmask: Some(m.umask),
                n: d.n / g,
                h: 64,
                k: g * d.k,
            }
        } else {
            let (cidx, cnt) = compact(dev, idx, d)?;
            KernelQueries {
                cidx,
                cnt,
                cmask: None,
                n: d.n,
                h: d.h,
                k: d.k,
            }
        })
    }

    /// The merged queries' keys (`super::merged_queries`): for each group of `g` consecutive
    /// queries, the union of their valid slots ascending by kv row [N / g, g K] u32, each
    /// entry's mask of the queries that selected it [N / g, g K] u8 (an entry per selection of
    /// a duplicated key), and the count per group [N / g].
    /// With `slots`, also each entry's slot in each query of its group [N / g, g K, g] u16
    /// (0xFFFF where the query did not select it; K < 2^16).
    fn merge_queries(
        dev: &CudaDevice,
        idx: &CudaView<u32>,
        d: &Dims,
        g: usize,
        slots: bool,
    ) -> Result<MergedKeys> {
        let groups = d.n / g;
        let cap = g * d.k;
        let uidx = alloc::<u32>(dev, groups * cap)?;
        let umask = alloc::<u8>(dev, groups * cap)?;
        let ucnt = alloc::<u32>(dev, groups)?;
        let uslot = if slots {
            Some(alloc::<u16>(dev, groups * cap * g)?)
        } else {
            None
        };
        let p2 = cap.next_power_of_two();
        let smem = p2 * if slots { 8 } else { 4 };
        let name = if slots {
            "sparse_mla_tc_merge_queries_slots"
        } else {
            "sparse_mla_tc_merge_queries"
        };
        let f = load(dev, name, smem)?;
        let (k, g32, nkv, p2_32) = (d.k as i32, g as i32, d.nkv as u32, p2 as i32);
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(idx).arg(&uidx).arg(&umask);
        if let Some(us) = &uslot {
            b.arg(us);
        }
        b.arg(&ucnt).arg(&k).arg(&g32).arg(&nkv).arg(&p2_32);
        // SAFETY: idx is [N, K] with N = groups g; uidx, umask (and uslot) [groups, g K (, g)]
        // are written up to each group's count, ucnt [groups] fully; smem bytes of dynamic
        // shared memory for the p2 sort entries.
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (groups as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: smem as u32,
            })
        }
        .w()?;
        drop(b);
        Ok(MergedKeys {
            uidx,
            umask,
            uslot,
            ucnt,
        })
    }

    /// What `merge_queries` writes.
    struct MergedKeys {
        uidx: CudaSlice<u32>,
        umask: CudaSlice<u8>,
        uslot: Option<CudaSlice<u16>>,
        ucnt: CudaSlice<u32>,
    }

    /// `super::merged_keys`: the kernel's output copied to the host, group by group.
    pub fn merged_keys(idx: &Tensor, g: usize, nkv: usize) -> Result<Vec<(Vec<u32>, Vec<u8>)>> {
        let (n, k) = idx.dims2()?;
        if g == 0 || g > 8 || !n.is_multiple_of(g) || g * k > 16384 || nkv >= 1 << 29 {
            bail!("merged_keys: {n} rows of {k} slots in groups of {g} (1..=8, dividing the rows, g k <= 16384), nkv {nkv} < 2^29");
        }
        let dev = idx.device().as_cuda_device()?.clone();
        let idx = idx.contiguous()?;
        let (st, l) = idx.storage_and_layout();
        let view = crate::kernels::cuda::storage_view::<u32>(&st, l, "idx")?;
        let d = Dims {
            n,
            h: 64 / g,
            k,
            dqk: 0,
            nkv,
        };
        let m = merge_queries(&dev, &view, &d, g, false)?;
        drop(st);
        let stream = dev.cuda_stream();
        let keys: Vec<u32> = stream.clone_dtoh(&m.uidx).w()?;
        let masks: Vec<u8> = stream.clone_dtoh(&m.umask).w()?;
        let counts: Vec<u32> = stream.clone_dtoh(&m.ucnt).w()?;
        Ok(counts
            .iter()
            .enumerate()
            .map(|(u, &c)| {
                let at = u * g * k;
                let c = c as usize;
                (keys[at..at + c].to_vec(), masks[at..at + c].to_vec())
            })
            .collect())
    }

    /// As `compact`, plus the slot of each compacted entry [N, K] (valid entries only).
    fn compact_pos(
        dev: &CudaDevice,
        idx: &CudaView<u32>,
        d: &Dims,
    ) -> Result<(CudaSlice<u32>, CudaSlice<u32>, CudaSlice<u32>)> {
        let cidx = alloc::<u32>(dev, d.n * d.k)?;
        let cpos = alloc::<u32>(dev, d.n * d.k)?;
        let cnt = alloc::<u32>(dev, d.n)?;
        let f = load(dev, "sparse_mla_tc_compact_pos", 0)?;
        let (n, k, nkv) = (d.n as i32, d.k as i32, d.nkv as u32);
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(idx)
            .arg(&cidx)
            .arg(&cpos)
            .arg(&cnt)
            .arg(&n)
            .arg(&k)
            .arg(&nkv);
        // SAFETY: idx is [N, K]; cidx, cpos [N, K] and cnt [N] are written (entries past cnt unused).
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (d.n.div_ceil(8) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .w()?;
        drop(b);
        Ok((cidx, cpos, cnt))
    }

    /// Row groups (of 16 heads) per head-mean-probs block: 8 when H > 64 (one pass up to 128
    /// heads), else just enough for H.
    fn probs_row_groups(h: usize) -> usize {
        if h > 64 {
            8
        } else {
            row_groups(h)
        }
    }

    /// Head-mean-probs shared memory: three kv stages and the double-buffered column sums.
    fn probs_smem(rg: usize, dqk: usize) -> usize {
        3 * 64 * dqk * 2 + 2 * rg * 64 * 4
    }

    pub struct SparseMlaTc {
        pub scale: f32,
        pub dv: usize,
        pub policy: KernelPolicy,
    }

    impl CustomOp3 for SparseMlaTc {
        fn name(&self) -> &'static str {
            "dsa-sparse-mla-tc"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            bail!("dsa-sparse-mla-tc runs on CUDA only; the CPU uses the plain twin")
        }

        fn cuda_fwd(
            &self,
            s1: &CudaStorage,
            l1: &Layout,
            s2: &CudaStorage,
            l2: &Layout,
            s3: &CudaStorage,
            l3: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let d = check(l1, s1, l2, s2, l3, s3, self.dv)?;
            let dev = s1.device();
            let (q, kv, idx) = (
                view::<bf16>(s1, l1, "q")?,
                view::<bf16>(s2, l2, "kv")?,
                view::<u32>(s3, l3, "idx")?,
            );
            let out_len = d.n * d.h * (self.dv + 1);
            let merged = super::merged_queries(self.policy, d.h, d.dqk, self.dv, d.n, d.k, d.nkv);
            if merged || super::wgmma_forward(self.policy, d.h, d.dqk, self.dv) {
                let KernelQueries {
                    cidx,
                    cnt,
                    cmask,
                    n: bq,
                    h: bh,
                    k: bk,
                } = kernel_queries(dev, &idx, &d, merged)?;
                // SAFETY: every element is written by the kernel below (each block stores its
                // 64 rows of DV + 1 floats whole), so no zeroing pass (about 1 ms of 26 at 32K).
                let out = unsafe { dev.alloc::<f32>(out_len) }?;
                let smem = wg_fwd_smem(d.dqk);
                check_smem(dev, smem)?;
                let f = crate::kernels::cuda::load_from(
                    dev,
                    WG_MODULE,
                    WG_PTX,
                    "sparse_mla_wg_fwd_576_512",
                    smem,
                )?;
                // One block per (query, 64 heads); the blocks of a query adjacent (they gather
                // the same rows: L2 hits). A persistent grid (one block per multiprocessor
                // walking the items, prefetching the next one's Q and first tile) measured 1-2 %
                // slower on an H200; prefetching the tile after next into L2, 2-5 % slower.
                let grid = bq * bh / 64;
                if grid > i32::MAX as usize {
                    bail!("sparse_mla_bf16: {} queries x {} heads is more than one launch takes (2^31 blocks of 64 heads)", d.n, d.h);
                }
                let (n, h, k) = (bq as i32, bh as i32, bk as i32);
                let sl2 = self.scale * LOG2E;
                let (null_mask, hq) = (0u64, d.h.min(64) as i32);
                let stream = dev.cuda_stream();
                let mut b = stream.launch_builder(&f);
                b.arg(&q)
                    .arg(&kv)
                    .arg(&cidx)
                    .arg(&cnt)
                    .arg(&out)
                    .arg(&n)
                    .arg(&h)
                    .arg(&k)
                    .arg(&sl2);
                match &cmask {
                    Some(m) => b.arg(m),
                    None => b.arg(&null_mask),
                };
                b.arg(&hq);
                let cfg = LaunchConfig {
                    grid_dim: (grid as u32, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: smem as u32,
                };
                // SAFETY: shapes checked (H a multiple of 64, or merged queries: 64 rows a block;
                // DQK 576, DV 512); compacted or merged rows are < NKV; cmask (merged) is
                // [bq, bk]; out is [N, H, DV + 1] and every element is written.
                unsafe { b.launch(cfg) }.w()?;
                drop(b);
                return Ok((
                    CudaStorage::wrap_cuda_slice(out, dev.clone()),
                    Shape::from((d.n, d.h, self.dv + 1)),
                ));
            }
            let (cidx, cnt) = compact(dev, &idx, &d)?;
            let out = dev.alloc_zeros::<f32>(out_len)?;
            let rg = row_groups(d.h);
            let smem = fwd_smem(rg, d.dqk);
            check_smem(dev, smem)?;
            let f = load(dev, &format!("sparse_mla_tc_fwd_rg{rg}"), smem)?;
            let (n, h, k, dqk, dv) = (
                d.n as i32,
                d.h as i32,
                d.k as i32,
                d.dqk as i32,
                self.dv as i32,
            );
            let sl2 = self.scale * LOG2E;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&q)
                .arg(&kv)
                .arg(&cidx)
                .arg(&cnt)
                .arg(&out)
                .arg(&n)
                .arg(&h)
                .arg(&k)
                .arg(&dqk)
                .arg(&dv)
                .arg(&sl2);
            let cfg = LaunchConfig {
                grid_dim: (d.n as u32, d.h.div_ceil(16 * rg) as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: smem as u32,
            };
            // SAFETY: shapes checked above; compacted rows are < NKV; out is [N, H, DV + 1].
            unsafe { b.launch(cfg) }.w()?;
            drop(b);
            Ok((
                CudaStorage::wrap_cuda_slice(out, dev.clone()),
                Shape::from((d.n, d.h, self.dv + 1)),
            ))
        }

        fn bwd(
            &self,
            q: &Tensor,
            kv: &Tensor,
            idx: &Tensor,
            res: &Tensor,
            grad_res: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            let op = SparseMlaTcBwd {
                scale: self.scale,
                dv: self.dv,
                fwd_out: res.detach(),
                dout: grad_res.to_dtype(DType::F32)?.contiguous()?.detach(),
                policy: self.policy,
            };
            let flat = q.apply_op3_no_bwd(kv, idx, &op)?;
            let (n, h, dqk) = q.dims3()?;
            let nkv = kv.dim(0)?;
            let dq = flat.narrow(0, 0, n * h * dqk)?.reshape((n, h, dqk))?;
            let dkv = flat
                .narrow(0, n * h * dqk, nkv * dqk)?
                .reshape((nkv, dqk))?;
            Ok((Some(dq), Some(dkv), None))
        }
    }

    /// Backward: one flat bf16 buffer holding dq [N, H, DQK] then dkv [NKV, DQK].
    pub struct SparseMlaTcBwd {
        pub scale: f32,
        pub dv: usize,
        /// The forward's result [N, H, DV + 1] f32 (output and LSE).
        pub fwd_out: Tensor,
        /// Its gradient [N, H, DV + 1] f32 (the LSE column is ignored).
        pub dout: Tensor,
        /// wgmma where it applies; deterministic dkv when asked.
        pub policy: KernelPolicy,
    }

    impl CustomOp3 for SparseMlaTcBwd {
        fn name(&self) -> &'static str {
            "dsa-sparse-mla-tc-bwd"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            bail!("dsa-sparse-mla-tc-bwd runs on CUDA only")
        }

        fn cuda_fwd(
            &self,
            s1: &CudaStorage,
            l1: &Layout,
            s2: &CudaStorage,
            l2: &Layout,
            s3: &CudaStorage,
            l3: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let d = check(l1, s1, l2, s2, l3, s3, self.dv)?;
            let dv = self.dv;
            let want = [d.n, d.h, dv + 1];
            for (t, what) in [
                (&self.fwd_out, "forward output"),
                (&self.dout, "output gradient"),
            ] {
                if t.dims() != &want[..] || t.dtype() != DType::F32 {
                    bail!(
                        "sparse_mla_bf16 backward: {what} is {:?} {:?}, expected f32 {want:?}",
                        t.dtype(),
                        t.shape()
                    );
                }
            }
            let dev = s1.device();
            let stream = dev.cuda_stream();
            let (fo_s, fo_l) = self.fwd_out.storage_and_layout();
            let (go_s, go_l) = self.dout.storage_and_layout();
            let fwd_out = crate::kernels::cuda::storage_view::<f32>(&fo_s, fo_l, "forward output")?;
            let dout = crate::kernels::cuda::storage_view::<f32>(&go_s, go_l, "output gradient")?;
            let (q, kv, idx) = (
                view::<bf16>(s1, l1, "q")?,
                view::<bf16>(s2, l2, "kv")?,
                view::<u32>(s3, l3, "idx")?,
            );
            let nh = d.n * d.h;

            // dO in bf16, delta, LSE in base 2.
            let dob = alloc::<bf16>(dev, nh * dv)?;
            let lse2 = alloc::<f32>(dev, nh)?;
            let delta = alloc::<f32>(dev, nh)?;
            {
                let f = load(dev, "sparse_mla_tc_bwd_prep", 0)?;
                let (nh32, dv32) = (nh as i32, dv as i32);
                let mut b = stream.launch_builder(&f);
                b.arg(&fwd_out)
                    .arg(&dout)
                    .arg(&dob)
                    .arg(&lse2)
                    .arg(&delta)
                    .arg(&nh32)
                    .arg(&dv32);
                // SAFETY: out and dout are [N H, DV + 1]; dob [N H, DV], lse2 and delta [N H] are written.
                unsafe {
                    b.launch(LaunchConfig {
                        grid_dim: (nh.div_ceil(8) as u32, 1, 1),
                        block_dim: (256, 1, 1),
                        shared_mem_bytes: 0,
                    })
                }
                .w()?;
            }
            let merged = super::merged_queries(self.policy, d.h, d.dqk, dv, d.n, d.k, d.nkv);
            let KernelQueries {
                cidx,
                cnt,
                cmask,
                n: bq,
                h: bh,
                k: bk,
            } = kernel_queries(dev, &idx, &d, merged)?;

            let dq_len = nh * d.dqk;
            let out = dev.alloc_zeros::<bf16>(dq_len + d.nkv * d.dqk)?;
            let dkv32 = dev.alloc_zeros::<f32>(d.nkv * d.dqk)?;
            let rg = row_groups(bh);
            let hgroups = bh.div_ceil(16 * rg);
            let wg = super::wgmma_backward(self.policy, bh, d.dqk, dv);
            let smem = bwd_smem(rg, d.dqk, dv, wg);
            check_smem(dev, smem)?;
            // Up to 32 heads (one head group): the variant with 256 threads, whose extra warps
            // share the dKV tile's columns (`few_heads_backward`).
            let cw = super::few_heads_backward(self.policy, bh).then_some(4 / rg);
            let (f, threads) = match (wg, cw) {
                (true, _) => (load(dev, "sparse_mla_tc_bwd_wg", smem)?, 256),
                (false, Some(cw)) => (
                    load(dev, &format!("sparse_mla_tc_bwd_rg{rg}_cw{cw}"), smem)?,
                    64 * rg * cw,
                ),
                (false, None) => (
                    load(dev, &format!("sparse_mla_tc_bwd_rg{rg}"), smem)?,
                    64 * rg,
                ),
            };
            let dq = out.slice(0..dq_len);
            let (n32, h32, k32, dqk32, dv32) =
                (bq as i32, bh as i32, bk as i32, d.dqk as i32, dv as i32);
            let (scale, sl2) = (self.scale, self.scale * LOG2E);
            // The wgmma kernel's row masks (null: every row every key) and heads per query.
            let (null_mask, hq) = (0u64, d.h.min(64) as i32);
            let launch_bwd = |detbuf: &CudaSlice<f32>,
                              n0: usize,
                              nlen: usize,
                              det: i32,
                              chunk: usize|
             -> Result<()> {
                let (n0, nlen32, chunk32) = (n0 as i32, nlen as i32, chunk as i32);
                let mut b = stream.launch_builder(&f);
                b.arg(&q)
                    .arg(&kv)
                    .arg(&cidx)
                    .arg(&cnt)
                    .arg(&dob)
                    .arg(&lse2)
                    .arg(&delta)
                    .arg(&dq)
                    .arg(&dkv32)
                    .arg(detbuf);
                b.arg(&n32)
                    .arg(&h32)
                    .arg(&k32)
                    .arg(&dqk32)
                    .arg(&dv32)
                    .arg(&scale)
                    .arg(&sl2)
                    .arg(&n0)
                    .arg(&nlen32)
                    .arg(&det)
                    .arg(&chunk32);
                if wg {
                    match &cmask {
                        Some(m) => b.arg(m),
                        None => b.arg(&null_mask),
                    };
                    b.arg(&hq);
                }
                let cfg = LaunchConfig {
                    grid_dim: (nlen as u32, hgroups as u32, 1),
                    block_dim: (threads as u32, 1, 1),
                    shared_mem_bytes: smem as u32,
                };
                // SAFETY: shapes checked; each block writes its own dq rows; dkv32 [NKV, DQK]
                // takes atomics (det 0); detbuf [hgroups, chunk, K, DQK] takes plain stores of
                // the chunk's valid (query, slot) pairs (det 1); cmask (merged) is [bq, bk].
                unsafe { b.launch(cfg) }.w()?;
                Ok(())
            };

            if !self.policy.deterministic {
                launch_bwd(&dkv32, 0, bq, 0, 0)?;
            } else {
                let per_query = (hgroups * bk.max(1) * d.dqk).max(1);
                let chunk = (DET_BUF_ELEMS / per_query).clamp(1, DET_MAX_CHUNK).min(bq);
                let detbuf = alloc::<f32>(dev, hgroups * chunk * bk * d.dqk)?;
                let mut rowcount = dev.alloc_zeros::<u32>(d.nkv)?;
                let offset = alloc::<u32>(dev, d.nkv)?;
                let cursor = alloc::<u32>(dev, d.nkv)?;
                let list = alloc::<u32>(dev, chunk * bk)?;
                let f_count = load(dev, "sparse_mla_tc_det_count", 0)?;
                let f_scan = load(dev, "sparse_mla_tc_det_scan", 0)?;
                let f_fill = load(dev, "sparse_mla_tc_det_fill", 0)?;
                let f_reduce = load(dev, "sparse_mla_tc_det_reduce", 0)?;
                let nkv32 = d.nkv as i32;
                let (hg32, chunk32) = (hgroups as i32, chunk as i32);
                let mut n0 = 0;
                while n0 < bq {
                    let nlen = chunk.min(bq - n0);
                    launch_bwd(&detbuf, n0, nlen, 1, chunk)?;
                    if n0 > 0 {
                        stream.memset_zeros(&mut rowcount).w()?;
                    }
                    let (n0_32, nlen32) = (n0 as i32, nlen as i32);
                    let grid = blocks(nlen * bk, 256, 65_535);
                    let cfg = |g: u32, t: u32| LaunchConfig {
                        grid_dim: (g, 1, 1),
                        block_dim: (t, 1, 1),
                        shared_mem_bytes: 0,
                    };
                    // SAFETY (the four launches): cidx/cnt are [N, K]/[N] with rows < NKV;
                    // rowcount, offset, cursor are [NKV]; list holds the chunk's valid entries
                    // (<= nlen K); detbuf was filled for every valid entry by the launch above.
                    let mut b = stream.launch_builder(&f_count);
                    b.arg(&cidx)
                        .arg(&cnt)
                        .arg(&rowcount)
                        .arg(&n0_32)
                        .arg(&nlen32)
                        .arg(&k32);
                    unsafe { b.launch(cfg(grid, 256)) }.w()?;
                    let mut b = stream.launch_builder(&f_scan);
                    b.arg(&rowcount).arg(&offset).arg(&cursor).arg(&nkv32);
                    unsafe { b.launch(cfg(1, 1024)) }.w()?;
                    let mut b = stream.launch_builder(&f_fill);
                    b.arg(&cidx)
                        .arg(&cnt)
                        .arg(&offset)
                        .arg(&cursor)
                        .arg(&list)
                        .arg(&n0_32)
                        .arg(&nlen32)
                        .arg(&k32);
                    unsafe { b.launch(cfg(grid, 256)) }.w()?;
                    let mut b = stream.launch_builder(&f_reduce);
                    b.arg(&detbuf)
                        .arg(&rowcount)
                        .arg(&offset)
                        .arg(&list)
                        .arg(&dkv32);
                    b.arg(&nkv32)
                        .arg(&k32)
                        .arg(&dqk32)
                        .arg(&chunk32)
                        .arg(&hg32)
                        .arg(&nlen32);
                    unsafe { b.launch(cfg(d.nkv.min(1 << 20) as u32, 256)) }.w()?;
                    n0 += nlen;
                }
            }

            // dkv f32 -> bf16 into the second part of the output.
            {
                let len = d.nkv * d.dqk;
                let dst = out.slice(dq_len..);
                let f = load(dev, "sparse_mla_tc_to_bf16", 0)?;
                let mut b = stream.launch_builder(&f);
                b.arg(&dkv32).arg(&dst).arg(&len);
                // SAFETY: both buffers hold `len` elements.
                unsafe {
                    b.launch(LaunchConfig {
                        grid_dim: (blocks(len, 256, 65_535), 1, 1),
                        block_dim: (256, 1, 1),
                        shared_mem_bytes: 0,
                    })
                }
                .w()?;
            }
            Ok((
                CudaStorage::wrap_cuda_slice(out, dev.clone()),
                Shape::from(dq_len + d.nkv * d.dqk),
            ))
        }
    }

    /// Head-mean probabilities [N, K] f32 (see `sparse_mla_head_mean_probs_bf16`); no backward.
    pub struct SparseMlaTcProbs {
        pub policy: KernelPolicy,
        pub scale: f32,
        pub dv: usize,
        /// The forward's result [N, H, DV + 1] f32 (contiguous; column DV is the LSE).
        pub fwd_out: Tensor,
    }

    impl CustomOp3 for SparseMlaTcProbs {
        fn name(&self) -> &'static str {
            "dsa-sparse-mla-tc-probs"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            bail!("dsa-sparse-mla-tc-probs runs on CUDA only; the CPU uses the plain twin")
        }

        fn cuda_fwd(
            &self,
            s1: &CudaStorage,
            l1: &Layout,
            s2: &CudaStorage,
            l2: &Layout,
            s3: &CudaStorage,
            l3: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let d = check(l1, s1, l2, s2, l3, s3, self.dv)?;
            let dv = self.dv;
            let want = [d.n, d.h, dv + 1];
            if self.fwd_out.dims() != &want[..] || self.fwd_out.dtype() != DType::F32 {
                bail!(
                    "sparse_mla_head_mean_probs_bf16: forward output is {:?} {:?}, expected f32 {want:?}",
                    self.fwd_out.dtype(),
                    self.fwd_out.shape()
                );
            }
            let dev = s1.device();
            let stream = dev.cuda_stream();
            let (fo_s, fo_l) = self.fwd_out.storage_and_layout();
            let fwd_out = crate::kernels::cuda::storage_view::<f32>(&fo_s, fo_l, "forward output")?;
            let (q, kv, idx) = (
                view::<bf16>(s1, l1, "q")?,
                view::<bf16>(s2, l2, "kv")?,
                view::<u32>(s3, l3, "idx")?,
            );
            if super::merged_probs(self.policy, d.h, d.dqk, dv, d.n, d.k, d.nkv) {
                // Groups of 4 queries of 16 heads over their keys' union, each query's column
                // sums to its own slots (kernels/sparse_mla_tc.cu, probs_impl).
                let MergedKeys {
                    uidx,
                    umask,
                    uslot,
                    ucnt,
                } = merge_queries(dev, &idx, &d, 4, true)?;
                let Some(uslot) = uslot else {
                    bail!("sparse_mla_head_mean_probs_bf16: the merged keys came without slots");
                };
                let smem = probs_smem(4, d.dqk);
                check_smem(dev, smem)?;
                let f = load(dev, "sparse_mla_tc_probs_merged", smem)?;
                // Zero-filled: padding slots and queries without a valid slot are never written.
                let pmean = dev.alloc_zeros::<f32>(d.n * d.k)?;
                let groups = d.n / 4;
                let (n32, k32, kq32, dqk32, dv32) = (
                    groups as i32,
                    (4 * d.k) as i32,
                    d.k as i32,
                    d.dqk as i32,
                    dv as i32,
                );
                let sl2 = self.scale * LOG2E;
                let mut b = stream.launch_builder(&f);
                b.arg(&q)
                    .arg(&kv)
                    .arg(&uidx)
                    .arg(&ucnt)
                    .arg(&umask)
                    .arg(&uslot)
                    .arg(&fwd_out)
                    .arg(&pmean);
                b.arg(&n32)
                    .arg(&k32)
                    .arg(&kq32)
                    .arg(&dqk32)
                    .arg(&dv32)
                    .arg(&sl2);
                // SAFETY: shapes checked above (H 16, N a multiple of 4); union rows < NKV,
                // slots < K; fwd_out is [N, H, DV + 1]; pmean is [N, K].
                unsafe {
                    b.launch(LaunchConfig {
                        grid_dim: (groups as u32, 1, 1),
                        block_dim: (256, 1, 1),
                        shared_mem_bytes: smem as u32,
                    })
                }
                .w()?;
                drop(b);
                return Ok((
                    CudaStorage::wrap_cuda_slice(pmean, dev.clone()),
                    Shape::from((d.n, d.k)),
                ));
            }
            let (cidx, cpos, cnt) = compact_pos(dev, &idx, &d)?;

            if super::wgmma_probs(self.policy, d.h, d.dqk) {
                let smem = wg_probs_smem(d.dqk);
                check_smem(dev, smem)?;
                let f = crate::kernels::cuda::load_from(
                    dev,
                    WG_MODULE,
                    WG_PTX,
                    "sparse_mla_wg_probs_576_h128",
                    smem,
                )?;
                // Zero-filled: padding slots and queries without a valid slot are never written.
                let pmean = dev.alloc_zeros::<f32>(d.n * d.k)?;
                let (n32, k32, dv32) = (d.n as i32, d.k as i32, dv as i32);
                let sl2 = self.scale * LOG2E;
                let mut b = stream.launch_builder(&f);
                b.arg(&q)
                    .arg(&kv)
                    .arg(&cidx)
                    .arg(&cpos)
                    .arg(&cnt)
                    .arg(&fwd_out)
                    .arg(&pmean)
                    .arg(&n32)
                    .arg(&k32)
                    .arg(&dv32)
                    .arg(&sl2);
                let cfg = LaunchConfig {
                    grid_dim: (d.n as u32, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: smem as u32,
                };
                // SAFETY: shapes checked above (H 128, DQK 576); compacted rows are < NKV and
                // positions < K; fwd_out is [N, H, DV + 1]; pmean is [N, K].
                unsafe { b.launch(cfg) }.w()?;
                drop(b);
                return Ok((
                    CudaStorage::wrap_cuda_slice(pmean, dev.clone()),
                    Shape::from((d.n, d.k)),
                ));
            }
            let rg = probs_row_groups(d.h);
            let passes = d.h.div_ceil(16 * rg);
            let smem = probs_smem(rg, d.dqk);
            check_smem(dev, smem)?;
            let f = load(dev, &format!("sparse_mla_tc_probs_rg{rg}"), smem)?;
            let len = d.n * d.k;
            // Zero-filled: padding slots and queries without a valid slot are never written.
            let pmean = dev.alloc_zeros::<f32>(len)?;
            let part = if passes > 1 {
                Some(dev.alloc_zeros::<f32>(passes * len)?)
            } else {
                None
            };
            let (n32, h32, k32, dqk32, dv32) =
                (d.n as i32, d.h as i32, d.k as i32, d.dqk as i32, dv as i32);
            let sl2 = self.scale * LOG2E;
            {
                let dst = part.as_ref().unwrap_or(&pmean);
                let mut b = stream.launch_builder(&f);
                b.arg(&q)
                    .arg(&kv)
                    .arg(&cidx)
                    .arg(&cpos)
                    .arg(&cnt)
                    .arg(&fwd_out)
                    .arg(dst);
                b.arg(&n32)
                    .arg(&h32)
                    .arg(&k32)
                    .arg(&dqk32)
                    .arg(&dv32)
                    .arg(&sl2);
                let cfg = LaunchConfig {
                    grid_dim: (d.n as u32, passes as u32, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: smem as u32,
                };
                // SAFETY: shapes checked above; compacted rows are < NKV and positions < K;
                // fwd_out is [N, H, DV + 1]; dst is [N, K] (one pass) or [passes, N, K].
                unsafe { b.launch(cfg) }.w()?;
            }
            if let Some(part) = &part {
                let f_sum = load(dev, "sparse_mla_tc_probs_sum", 0)?;
                let passes32 = passes as i32;
                let mut b = stream.launch_builder(&f_sum);
                b.arg(part).arg(&pmean).arg(&passes32).arg(&len).arg(&h32);
                // SAFETY: part is [passes, N K], pmean [N K].
                unsafe {
                    b.launch(LaunchConfig {
                        grid_dim: (blocks(len, 256, 65_535), 1, 1),
                        block_dim: (256, 1, 1),
                        shared_mem_bytes: 0,
                    })
                }
                .w()?;
            }
            Ok((
                CudaStorage::wrap_cuda_slice(pmean, dev.clone()),
                Shape::from((d.n, d.k)),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::merged_keys_plain;

    #[test]
    fn merged_keys_hold_every_rows_selection_once_in_ascending_order() {
        // A hand case: rows 0 and 1 of one group (k 4, nkv 10; 99 and u32::MAX are padding).
        let idx = [5, 2, 5, 99, 2, 7, u32::MAX, 5];
        let got = merged_keys_plain(&idx, 4, 2, 10);
        assert_eq!(got.len(), 1);
        // key 2: both rows once; key 5: row 0 twice, row 1 once -> two entries; key 7: row 1.
        assert_eq!(got[0].0, vec![2, 5, 5, 7]);
        assert_eq!(got[0].1, vec![0b11, 0b11, 0b01, 0b10]);

        // Random groups with duplicates and padding: each row's multiset comes back.
        let mut rng = crate::rng::SplitMix64::new(7);
        for &(g, k, nkv) in &[(4usize, 33usize, 40usize), (2, 64, 8), (8, 5, 1000)] {
            let rows = 3 * g;
            let idx: Vec<u32> = (0..rows * k)
                .map(|_| match rng.next_u64() % 5 {
                    0 => u32::MAX,
                    _ => (rng.next_u64() % (nkv as u64 + 3)) as u32, // some >= nkv: padding too
                })
                .collect();
            let got = merged_keys_plain(&idx, k, g, nkv);
            assert_eq!(got.len(), 3);
            for (u, (keys, masks)) in got.iter().enumerate() {
                assert!(keys.windows(2).all(|w| w[0] <= w[1]), "ascending");
                assert!(keys.len() <= g * k);
                for s in 0..g {
                    let mut want: Vec<u32> = idx[(u * g + s) * k..(u * g + s + 1) * k]
                        .iter()
                        .copied()
                        .filter(|&v| (v as usize) < nkv)
                        .collect();
                    want.sort_unstable();
                    let mine: Vec<u32> = keys
                        .iter()
                        .zip(masks)
                        .filter(|(_, m)| *m & (1 << s) != 0)
                        .map(|(key, _)| *key)
                        .collect();
                    assert_eq!(mine, want, "group {u} row {s}");
                }
                // No entry without a row, and no more entries of a key than one row needs.
                assert!(masks.iter().all(|&m| m != 0));
            }
        }
    }
}
