//! Device-side lightning-indexer scoring of whole query rows and the deterministic causal top-k
//! (kernels/indexer_topk.cu): the O(L^2) part of the sparse stage.
//!
//! For query rows q0..q0+R of one sequence and keys 0..T-1:
//!   I[r, s] = sum_{h < HI} w[r, h] * ReLU(q[r, h, :] . k[s, :])   for s <= q0 + r, else -inf,
//! computed on tensor cores (bf16 inputs, f32 accumulation, fixed summation order, so the
//! scores are bit-identical run to run). S_r = the min(k, n_r) keys of start_r..=q0 + r with
//! the highest I (n_r of them; start_r = 0 for plain causal attention, the first key of the
//! query's document under document masking); equal scores go to the lower index; +0.0 and -0.0
//! are equal; NaN ranks with -inf. The scores do not depend on start_r: the selection ignores
//! the entries before it.
//! The plain twins: `model::indexer::IndexerProj::scores_rows` (scores) and
//! `dsa::topk_key_range` (selection); `gpu-selftest` compares them (src/gpu_check/indexer_topk.rs).

use candle_core::{DType, Device, Result, Tensor};

/// Bound on the [rows, T] f32 score buffer that `indexer_topk` holds at a time.
const MAX_SCORE_BYTES: usize = 256 << 20;

/// Shapes (R, HI, DI, T) of q [R, HI, DI] bf16, w [R, HI] f32, k [T, DI] bf16, checked.
fn score_dims(
    q: &Tensor,
    w: &Tensor,
    k: &Tensor,
    q0: usize,
) -> Result<(usize, usize, usize, usize)> {
    let bad = || {
        candle_core::Error::Msg(format!(
            "indexer_scores_rows: q {:?} {:?}, w {:?} {:?}, k {:?} {:?} do not fit (q [R, HI, DI] bf16, w [R, HI] f32, \
             k [T, DI] bf16, HI <= 64, DI a multiple of 16 <= 128, q0 + R and T < 2^31)",
            q.dims(), q.dtype(), w.dims(), w.dtype(), k.dims(), k.dtype()
        ))
    };
    let (r, hi, di) = q.dims3().map_err(|_| bad())?;
    let (r2, hi2) = w.dims2().map_err(|_| bad())?;
    let (t, di2) = k.dims2().map_err(|_| bad())?;
    let fits = r2 == r
        && hi2 == hi
        && di2 == di
        && (1..=64).contains(&hi)
        && di % 16 == 0
        && (16..=128).contains(&di)
        && q.dtype() == DType::BF16
        && w.dtype() == DType::F32
        && k.dtype() == DType::BF16
        && q0 + r < i32::MAX as usize
        && t < i32::MAX as usize;
    if !fits {
        return Err(bad());
    }
    if !q.device().same_device(w.device()) || !q.device().same_device(k.device()) {
        candle_core::bail!("indexer_scores_rows: q, w and k must be on one device");
    }
    Ok((r, hi, di, t))
}

/// `t` made contiguous, with its first element at a multiple of `align` elements (the kernels
/// read q as 4-byte words and k with 16-byte copies). A misaligned view is copied; the bf16 ->
/// f32 -> bf16 round trip is exact.
fn aligned_bf16(t: &Tensor, align: usize) -> Result<Tensor> {
    let t = t.contiguous()?;
    if t.layout().start_offset() % align == 0 {
        Ok(t)
    } else {
        t.to_dtype(DType::F32)?.to_dtype(DType::BF16)
    }
}

/// Indexer scores of query rows q0..q0+R against keys 0..T-1: q [R, HI, DI] bf16, w [R, HI] f32,
/// k [T, DI] bf16 -> [R, T] f32, f32::NEG_INFINITY where s > q0 + r. HI <= 64, DI a multiple of
/// 16 up to 128. Not differentiable (the selection is not).
pub fn indexer_scores_rows(q: &Tensor, w: &Tensor, k: &Tensor, q0: usize) -> Result<Tensor> {
    let (r, _, _, t) = score_dims(q, w, k, q0)?;
    if r == 0 || t == 0 {
        return Tensor::zeros((r, t), DType::F32, q.device());
    }
    #[cfg(feature = "cuda")]
    {
        let q = aligned_bf16(q, 2)?;
        let k = aligned_bf16(k, 8)?;
        let w = w.contiguous()?;
        q.apply_op3_no_bwd(&w, &k, &cuda::ScoresRows { q0 })
    }
    #[cfg(not(feature = "cuda"))]
    {
        candle_core::bail!("indexer_scores_rows kernel needs the `cuda` feature")
    }
}

/// Deterministic causal top-k of score rows: scores [R, T] f32 (row r is query q0 + r; entries
/// past q0 + r are ignored) -> [R, min(topk, T)] u32 key positions in ascending order, padded at
/// the end with u32::MAX when the row has fewer than `topk` candidate keys.
/// `starts` (u32 [R], contiguous): row r's first key (document masking), so its candidates are
/// start[r]..=q0 + r and the entries before start[r] are ignored too; None: every start is 0.
/// The caller guarantees start[r] <= q0 + r (checking it would read the starts back to the
/// host); a start past its query selects nothing (all padding).
pub fn topk_rows(
    scores: &Tensor,
    q0: usize,
    topk: usize,
    starts: Option<&Tensor>,
) -> Result<Tensor> {
    let (r, t) = scores.dims2().map_err(|_| {
        candle_core::Error::Msg(format!(
            "topk_rows: scores must be [R, T], got {:?}",
            scores.dims()
        ))
    })?;
    if scores.dtype() != DType::F32
        || topk == 0
        || q0 + r >= i32::MAX as usize
        || t >= i32::MAX as usize
    {
        candle_core::bail!("topk_rows: scores {:?} {:?}, q0 {q0}, topk {topk} do not fit (f32 scores, topk >= 1, q0 + R and T < 2^31)",
            scores.dims(), scores.dtype());
    }
    if let Some(st) = starts {
        check_starts(st, r, scores.device())?;
    }
    let kk = topk.min(t);
    if r == 0 || t == 0 {
        return Tensor::zeros((r, kk), DType::U32, scores.device());
    }
    #[cfg(feature = "cuda")]
    {
        let op = cuda::TopkRows { q0, topk };
        let scores = scores.contiguous()?;
        match starts {
            Some(st) => scores.apply_op2_no_bwd(st, &op),
            None => scores.apply_op1_no_bwd(&op),
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        candle_core::bail!("topk_rows kernel needs the `cuda` feature")
    }
}

/// `starts`, u32 [R] on the scores' device: contiguous, one start per query row.
fn check_starts(starts: &Tensor, r: usize, device: &Device) -> Result<()> {
    if starts.dtype() != DType::U32
        || starts.dims() != [r]
        || !starts.is_contiguous()
        || !starts.device().same_device(device)
    {
        candle_core::bail!(
            "indexer top-k: key starts {:?} {:?} (contiguous: {}) must be contiguous u32 [{r}] (one per query row) on the scores' device",
            starts.dims(),
            starts.dtype(),
            starts.is_contiguous()
        );
    }
    Ok(())
}

/// Scores and top-k together: q [R, HI, DI] bf16, w [R, HI] f32, k [T, DI] bf16, starts None
/// or u32 [R] -> [R, min(topk, T)] u32 as `topk_rows`. Runs in sub-chunks of rows so that the
/// [rows, T] f32 score buffer stays within 256 MiB.
pub fn indexer_topk(
    q: &Tensor,
    w: &Tensor,
    k: &Tensor,
    q0: usize,
    topk: usize,
    starts: Option<&Tensor>,
) -> Result<Tensor> {
    indexer_topk_chunked(q, w, k, q0, topk, starts, MAX_SCORE_BYTES)
}

/// `indexer_topk` with the score-buffer bound as a parameter (the GPU check forces many chunks).
pub(crate) fn indexer_topk_chunked(
    q: &Tensor,
    w: &Tensor,
    k: &Tensor,
    q0: usize,
    topk: usize,
    starts: Option<&Tensor>,
    max_bytes: usize,
) -> Result<Tensor> {
    let (r, _, _, t) = score_dims(q, w, k, q0)?;
    if topk == 0 {
        candle_core::bail!("indexer_topk: topk must be positive");
    }
    if let Some(st) = starts {
        check_starts(st, r, q.device())?;
    }
    if r == 0 || t == 0 {
        return Tensor::zeros((r, topk.min(t)), DType::U32, q.device());
    }
    let (q, w, k) = (q.contiguous()?, w.contiguous()?, aligned_bf16(k, 8)?);
    let rows = (max_bytes / (4 * t)).clamp(1, r);
    let mut parts = Vec::with_capacity(r.div_ceil(rows));
    for c0 in (0..r).step_by(rows) {
        let n = rows.min(r - c0);
        let scores = indexer_scores_rows(&q.narrow(0, c0, n)?, &w.narrow(0, c0, n)?, &k, q0 + c0)?;
        let st = starts.map(|s| s.narrow(0, c0, n)).transpose()?;
        parts.push(topk_rows(&scores, q0 + c0, topk, st.as_ref())?);
    }
    if parts.len() == 1 {
        return Ok(parts.pop().unwrap());
    }
    Tensor::cat(&parts, 0)
}

use crate::profile::time_median;

/// Benchmark at the 671B indexer shape (HI 64, DI 128, top-k 2048) for one sequence of length
/// `l` (T = l, all l query rows, in the 256 MiB row chunks of `indexer_topk`).
/// FLOPs of scoring = 2 * HI * DI * (number of causal (r, s) pairs) = 2 * HI * DI * l (l + 1) / 2
/// (the ReLU, weighting and head sum are not counted; skipped tiles above the diagonal neither).
pub fn bench(dev: &Device, l: usize) -> anyhow::Result<Vec<String>> {
    let (hi, di, topk) = (64usize, 128usize, 2048usize);
    anyhow::ensure!(l > 0, "indexer bench needs l > 0");
    let q = crate::rng::randn(&[l, hi, di], 21, 1.0, dev)?.to_dtype(DType::BF16)?;
    let w = crate::rng::randn(
        &[l, hi],
        22,
        (hi as f64).powf(-0.5) * (di as f64).powf(-0.5),
        dev,
    )?;
    let k = crate::rng::randn(&[l, di], 23, 1.0, dev)?.to_dtype(DType::BF16)?;
    let rows = (MAX_SCORE_BYTES / (4 * l)).clamp(1, l);
    let reps = if l >= 16384 { 3 } else { 10 };
    let chunks: Vec<(usize, usize)> = (0..l)
        .step_by(rows)
        .map(|c0| (c0, rows.min(l - c0)))
        .collect();
    let score_time = time_median(dev, reps, || {
        for &(c0, n) in &chunks {
            indexer_scores_rows(&q.narrow(0, c0, n)?, &w.narrow(0, c0, n)?, &k, c0)?;
        }
        Ok(())
    })?;
    // Top-k alone: one buffer of real scores (the last chunk's rows, which see every key), read
    // at each chunk's offset, so each call does the causal work of that chunk.
    let last = *chunks.last().unwrap();
    let full = indexer_scores_rows(
        &q.narrow(0, last.0, last.1)?,
        &w.narrow(0, last.0, last.1)?,
        &k,
        l - last.1,
    )?;
    let topk_time = time_median(dev, reps, || {
        for &(c0, n) in &chunks {
            topk_rows(&full.narrow(0, 0, n)?, c0, topk, None)?;
        }
        Ok(())
    })?;
    drop(full);
    // TileLang's own top-k benchmark shape: 64 rows that each see all l keys (random scores).
    let wide = Tensor::randn(0f32, 1f32, (64, l), dev)?;
    let wide_time = time_median(dev, reps, || {
        topk_rows(&wide, l - 1, topk, None)?;
        Ok(())
    })?;
    drop(wide);
    let both_time = time_median(dev, reps, || {
        Ok(indexer_topk(&q, &w, &k, 0, topk, None).map(|_| ())?)
    })?;
    let flops = 2.0 * hi as f64 * di as f64 * (l as f64 * (l as f64 + 1.0) / 2.0);
    Ok(vec![
        format!(
            "indexer scores rows L {l} (HI {hi}, DI {di}, bf16 mma, {} chunk(s) of {rows} rows): {:.3} ms = {:.0} TFLOP/s",
            chunks.len(), score_time * 1e3, flops / score_time / 1e12
        ),
        format!("indexer top-k L {l} (k {topk}, {l} rows): {:.3} ms = {:.2} us/row", topk_time * 1e3, topk_time * 1e6 / l as f64),
        format!("indexer top-k, 64 rows of all {l} keys (TileLang's benchmark shape, k {topk}): {:.3} ms", wide_time * 1e3),
        format!("indexer scores + top-k L {l}: {:.3} ms ({:.0} TFLOP/s of scoring overall)", both_time * 1e3, flops / both_time / 1e12),
    ])
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaFunction, CudaView, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaDevice, WrapErr};
    use candle_core::{
        bail, CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result,
        Shape,
    };
    use half::bf16;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/indexer_topk.ptx"));
    const MODULE: &str = "dsa_indexer_topk";
    // Must match kernels/indexer_topk.cu.
    const SC_WARPS: usize = 8;
    const KT: usize = 64;
    const STAGES: usize = 3;
    const KCH: usize = 4096;
    const TK_THREADS: u32 = 512;
    const HIST_BINS: usize = 2048;
    /// Candidate keys cached in shared memory between the top-k's digit passes (48 KiB).
    const TK_CAP: usize = 12288;

    fn load(dev: &CudaDevice, name: &str, smem_bytes: usize) -> Result<CudaFunction> {
        crate::kernels::cuda::load_from(dev, MODULE, PTX, name, smem_bytes)
    }

    /// A contiguous view of a storage starting at a multiple of `align` elements, checked.
    fn view<'a, T: candle_core::cuda_backend::CudaDType>(
        s: &'a CudaStorage,
        l: &Layout,
        what: &str,
        align: usize,
    ) -> Result<CudaView<'a, T>> {
        if !l.is_contiguous() || !l.start_offset().is_multiple_of(align) {
            bail!("indexer_topk: {what} must be contiguous and start at a multiple of {align} elements, got strides {:?}, offset {} for shape {:?}",
                l.stride(), l.start_offset(), l.shape());
        }
        Ok(s.as_cuda_slice::<T>()?.slice(l.start_offset()..))
    }

    pub struct ScoresRows {
        pub q0: usize,
    }

    impl CustomOp3 for ScoresRows {
        fn name(&self) -> &'static str {
            "dsa-indexer-scores-rows"
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
            bail!("dsa-indexer-scores-rows runs on CUDA only; the CPU uses the plain twin (IndexerProj::scores_rows)")
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
            let (r, hi, di) = l1.shape().dims3()?;
            let (r2, hi2) = l2.shape().dims2()?;
            let (t, di3) = l3.shape().dims2()?;
            if r2 != r
                || hi2 != hi
                || di3 != di
                || hi == 0
                || hi > 64
                || di % 16 != 0
                || di == 0
                || di > 128
                || r == 0
                || t == 0
            {
                bail!(
                    "indexer_scores_rows: q {:?}, w {:?}, k {:?} do not fit",
                    l1.shape(),
                    l2.shape(),
                    l3.shape()
                );
            }
            if s1.dtype() != DType::BF16 || s2.dtype() != DType::F32 || s3.dtype() != DType::BF16 {
                bail!(
                    "indexer_scores_rows: expects bf16 q, f32 w, bf16 k, got {:?} {:?} {:?}",
                    s1.dtype(),
                    s2.dtype(),
                    s3.dtype()
                );
            }
            let dev = s1.device();
            let q = view::<bf16>(s1, l1, "q", 2)?;
            let w = view::<f32>(s2, l2, "w", 1)?;
            let k = view::<bf16>(s3, l3, "k", 8)?;
            // SAFETY: the kernel writes every one of the r * t entries (causal ones computed, the
            // rest -inf) before anything reads them.
            let out = unsafe { dev.alloc::<f32>(r * t) }?;
            let smem = STAGES * KT * (di * 2 + 16) + SC_WARPS * KT * 4;
            let f = load(
                dev,
                &format!("indexer_scores_rows_bf16_ks{}", di / 16),
                smem,
            )?;
            let wpr = if hi > 32 { 2usize } else { 1 };
            let groups = r.div_ceil(SC_WARPS / wpr);
            let splits = t.div_ceil(KCH);
            let (r32, hi32, t32, q032, wpr32) =
                (r as i32, hi as i32, t as i32, self.q0 as i32, wpr as i32);
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&q)
                .arg(&w)
                .arg(&k)
                .arg(&out)
                .arg(&r32)
                .arg(&hi32)
                .arg(&t32)
                .arg(&q032)
                .arg(&wpr32);
            let cfg = LaunchConfig {
                grid_dim: (groups as u32, splits as u32, 1),
                block_dim: ((SC_WARPS * 32) as u32, 1, 1),
                shared_mem_bytes: smem as u32,
            };
            // SAFETY: q, w, k are live contiguous buffers of the checked shapes, aligned as the
            // kernel reads them; out holds r * t f32; the launch is on candle's stream.
            unsafe { b.launch(cfg) }.w()?;
            drop(b);
            Ok((
                CudaStorage::wrap_cuda_slice(out, dev.clone()),
                Shape::from((r, t)),
            ))
        }
    }

    pub struct TopkRows {
        pub q0: usize,
        pub topk: usize,
    }

    impl TopkRows {
        /// One block per row; `starts` (u32 [r]) None passes a null pointer: every start 0.
        fn launch(
            &self,
            s: &CudaStorage,
            l: &Layout,
            starts: Option<CudaView<'_, u32>>,
        ) -> Result<(CudaStorage, Shape)> {
            let (r, t) = l.shape().dims2()?;
            if s.dtype() != DType::F32 || r == 0 || t == 0 || self.topk == 0 {
                bail!(
                    "topk_rows: scores {:?} {:?} with topk {} do not fit",
                    l.shape(),
                    s.dtype(),
                    self.topk
                );
            }
            let kk = self.topk.min(t);
            let dev = s.device();
            let scores = view::<f32>(s, l, "scores", 1)?;
            // SAFETY: the kernel writes all kk entries of every row (selection or padding).
            let out = unsafe { dev.alloc::<u32>(r * kk) }?;
            let smem = (HIST_BINS + TK_CAP) * 4;
            let f = load(dev, "topk_rows_f32", smem)?;
            let (r32, t32, q032, topk32, kk32, cap32) = (
                r as i32,
                t as i32,
                self.q0 as i32,
                self.topk.min(i32::MAX as usize) as i32,
                kk as i32,
                TK_CAP as i32,
            );
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&scores);
            match &starts {
                Some(st) => b.arg(st),
                None => b.arg(&0u64), // a null device pointer
            };
            b.arg(&out)
                .arg(&r32)
                .arg(&t32)
                .arg(&q032)
                .arg(&topk32)
                .arg(&kk32)
                .arg(&cap32);
            let cfg = LaunchConfig {
                grid_dim: (r as u32, 1, 1),
                block_dim: (TK_THREADS, 1, 1),
                shared_mem_bytes: smem as u32,
            };
            // SAFETY: scores is a live contiguous [r, t] f32 buffer, starts (if any) a live
            // contiguous u32 [r] one, out holds r * kk u32.
            unsafe { b.launch(cfg) }.w()?;
            drop(b);
            Ok((
                CudaStorage::wrap_cuda_slice(out, dev.clone()),
                Shape::from((r, kk)),
            ))
        }
    }

    impl CustomOp1 for TopkRows {
        fn name(&self) -> &'static str {
            "dsa-indexer-topk-rows"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            bail!("dsa-indexer-topk-rows runs on CUDA only; the CPU uses the plain twin (dsa::topk_key_range)")
        }

        fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
            self.launch(s, l, None)
        }
    }

    /// With per-row key starts: scores [R, T] f32, starts u32 [R].
    impl CustomOp2 for TopkRows {
        fn name(&self) -> &'static str {
            "dsa-indexer-topk-rows-starts"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            bail!("dsa-indexer-topk-rows runs on CUDA only; the CPU uses the plain twin (dsa::topk_key_range)")
        }

        fn cuda_fwd(
            &self,
            s: &CudaStorage,
            l: &Layout,
            s2: &CudaStorage,
            l2: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let r = l.shape().dims2()?.0;
            if s2.dtype() != DType::U32 || l2.shape().dims() != [r] {
                bail!(
                    "topk_rows: key starts {:?} {:?} must be u32 [{r}]",
                    l2.shape(),
                    s2.dtype()
                );
            }
            let starts = view::<u32>(s2, l2, "starts", 1)?;
            self.launch(s, l, Some(starts))
        }
    }
}
