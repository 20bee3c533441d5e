//! The lightning indexer's scores at each query's selected keys on tensor cores, differentiable
//! (kernels/indexer_at_tc.cu): the sparse stage's indexer KL needs only these [N, K] scores.
//!
//!   I[n, j] = sum_h w[n, h] * ReLU(q[n, h, :] . k[idx[n, j], :])
//!
//! q [N, HI, DI] and k [NK, DI] are the f32 autograd inputs; the kernels read bf16 copies made
//! here (round to nearest even) and accumulate in f32, as the selection's scoring does, so the
//! KL scores the sets with the precision that chose them. w stays f32. The gradients come back
//! in f32: dq and dw written once per query (deterministic), dk summed with f32 atomics (the
//! order across queries is not fixed). The plain twin is the f32 kernel in kernels/indexer.cu
//! (CUDA) and the gather + matmul of `IndexerProj::scores_at` (CPU); `gpu-selftest --only
//! indexer` compares them.

use candle_core::{DType, Device, Result, Tensor};

/// Whether the tensor-core kernels cover HI heads of DI dims: HI <= 64, DI in {32, 64, 128},
/// and the policy uses them (else the f32 kernel runs).
pub fn supported(policy: crate::kernels::KernelPolicy, hi: usize, di: usize) -> bool {
    !policy.is_plain(crate::kernels::Fused::IndexerAt) && fits(hi, di)
}

/// The shapes the kernels are instantiated for.
fn fits(hi: usize, di: usize) -> bool {
    (1..=64).contains(&hi) && matches!(di, 32 | 64 | 128)
}

/// Scores at the selection, differentiable in q, w and k (all f32): q [N, HI, DI], w [N, HI],
/// k [NK, DI], idx [N, K] u32 absolute rows of k (u32::MAX = padding, scored 0) -> [N, K] f32.
pub fn indexer_scores_at_bf16(q: &Tensor, w: &Tensor, k: &Tensor, idx: &Tensor) -> Result<Tensor> {
    let (n, hi, di) = q.dims3()?;
    let (n2, hi2) = w.dims2()?;
    let (_, di2) = k.dims2()?;
    let (n3, _) = idx.dims2()?;
    if n2 != n
        || hi2 != hi
        || di2 != di
        || n3 != n
        || !fits(hi, di)
        || idx.dtype() != DType::U32
        || q.dtype() != DType::F32
        || w.dtype() != DType::F32
        || k.dtype() != DType::F32
    {
        candle_core::bail!(
            "indexer_scores_at_bf16: q {:?} {:?}, w {:?}, k {:?}, idx {:?} {:?} do not fit (f32 q [N, HI, DI], w [N, HI], k [NK, DI], u32 idx [N, K]; HI <= 64, DI 32, 64 or 128)",
            q.dims(), q.dtype(), w.dims(), k.dims(), idx.dims(), idx.dtype()
        );
    }
    #[cfg(feature = "cuda")]
    {
        let op = cuda::ScoresAtBf16 {
            idx: idx.contiguous()?,
            q16: q.detach().contiguous()?.to_dtype(DType::BF16)?,
            k16: k.detach().contiguous()?.to_dtype(DType::BF16)?,
        };
        q.apply_op3(&w.contiguous()?, k, op)
    }
    #[cfg(not(feature = "cuda"))]
    {
        candle_core::bail!("indexer_scores_at_bf16 kernel needs the `cuda` feature")
    }
}

/// The backward of `indexer_scores_at_bf16` without autograd: `grad` [N, K] f32 -> (dq
/// [N, HI, DI], dw [N, HI], dk [NK, DI]) f32, the kernels autograd runs (q and k rounded to
/// bf16 again, as the forward rounded them).
pub fn indexer_scores_at_bf16_backward(
    q: &Tensor,
    w: &Tensor,
    k: &Tensor,
    idx: &Tensor,
    grad: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    {
        use candle_core::CustomOp3;
        let op = cuda::ScoresAtBf16 {
            idx: idx.contiguous()?,
            q16: q.detach().contiguous()?.to_dtype(DType::BF16)?,
            k16: k.detach().contiguous()?.to_dtype(DType::BF16)?,
        };
        let (dq, dw, dk) = op.bwd(&q.contiguous()?, &w.contiguous()?, k, grad, grad)?;
        Ok((dq.expect("dq"), dw.expect("dw"), dk.expect("dk")))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (q, w, k, idx, grad);
        candle_core::bail!("indexer_scores_at_bf16 kernel needs the `cuda` feature")
    }
}

use crate::profile::time_median;

/// Benchmark at the 671B indexer shape (HI 64, DI 128, top-k 2048) for one sequence of `l`
/// queries with causal random selections, beside the f32 kernel it replaces. FLOPs: forward
/// 2 HI DI per (query, selected key); backward 3x that (the scores again, dq, dk). Padding
/// slots (queries t < k have t + 1 keys) are not counted.
pub fn bench(dev: &Device, l: usize) -> anyhow::Result<Vec<String>> {
    let (hi, di, topk) = (64usize, 128usize, 2048usize);
    let kk = topk.min(l);
    let mut rng = crate::rng::SplitMix64::new(31);
    let mut abs = vec![u32::MAX; l * kk];
    let mut pairs = 0f64;
    for t in 0..l {
        let m = (t + 1).min(kk);
        pairs += m as f64;
        for j in 0..m {
            abs[t * kk + j] = if t < kk {
                j as u32
            } else {
                (rng.next_u64() % (t as u64 + 1)) as u32
            };
        }
    }
    let idx = Tensor::from_vec(abs, (l, kk), dev)?;
    let q = candle_core::Var::from_tensor(&crate::rng::randn(&[l, hi, di], 41, 1.0, dev)?)?;
    let w = candle_core::Var::from_tensor(&crate::rng::randn(&[l, hi], 42, 0.01, dev)?)?;
    let k = candle_core::Var::from_tensor(&crate::rng::randn(&[l, di], 43, 1.0, dev)?)?;
    let up = crate::rng::randn(&[l, kk], 44, 1.0, dev)?;
    let reps = if l >= 32768 { 3 } else { 5 };
    let fwd = time_median(dev, reps, || {
        Ok(
            indexer_scores_at_bf16(q.as_tensor(), w.as_tensor(), k.as_tensor(), &idx)
                .map(|_| ())?,
        )
    })?;
    let both = time_median(dev, reps, || {
        let s = indexer_scores_at_bf16(q.as_tensor(), w.as_tensor(), k.as_tensor(), &idx)?;
        (s * &up)?.sum_all()?.backward()?;
        Ok(())
    })?;
    let f32_fwd = time_median(dev, reps, || {
        Ok(
            crate::kernels::indexer_scores_at(q.as_tensor(), w.as_tensor(), k.as_tensor(), &idx)
                .map(|_| ())?,
        )
    })?;
    let f32_both = time_median(dev, reps, || {
        let s =
            crate::kernels::indexer_scores_at(q.as_tensor(), w.as_tensor(), k.as_tensor(), &idx)?;
        (s * &up)?.sum_all()?.backward()?;
        Ok(())
    })?;
    let flops = 2.0 * (hi * di) as f64 * pairs;
    let tf = |f: f64, s: f64| f / s / 1e12;
    Ok(vec![
        format!(
            "indexer scores-at-selection L {l} (HI {hi}, DI {di}, k {kk}) bf16 mma: fwd {:.3} ms = {:.0} TFLOP/s, bwd {:.3} ms = {:.0} TFLOP/s",
            fwd * 1e3, tf(flops, fwd), (both - fwd).max(1e-9) * 1e3, tf(3.0 * flops, (both - fwd).max(1e-9))
        ),
        format!(
            "indexer scores-at-selection L {l} f32 kernel (the one replaced): fwd {:.3} ms = {:.1} TFLOP/s, bwd {:.3} ms = {:.1} TFLOP/s; bf16 mma fwd+bwd {:.1}x faster",
            f32_fwd * 1e3, tf(flops, f32_fwd), (f32_both - f32_fwd).max(1e-9) * 1e3, tf(3.0 * flops, (f32_both - f32_fwd).max(1e-9)), f32_both / both
        ),
    ])
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{bail, CpuStorage, CudaStorage, CustomOp3, Layout, Result, Shape, Tensor};
    use half::bf16;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/indexer_at_tc.ptx"));
    const MODULE: &str = "dsa_indexer_at_tc";
    // Must match kernels/indexer_at_tc.cu.
    const THREADS: u32 = 128;
    const KT: usize = 128;
    const STAGES: usize = 2;
    const WARPS: usize = 4;

    /// 8-head n-tiles of the kernel instance for HI heads: 1, 2, 4 or 8.
    fn n_tiles(hi: usize) -> usize {
        hi.div_ceil(8).next_power_of_two()
    }

    /// Shapes (N, HI, DI, K, NK) from the f32 inputs' layouts and the index tensor.
    fn dims(
        l1: &Layout,
        l2: &Layout,
        l3: &Layout,
        idx: &Tensor,
    ) -> Result<(usize, usize, usize, usize, usize)> {
        let (n, hi, di) = l1.shape().dims3()?;
        let (n2, hi2) = l2.shape().dims2()?;
        let (nk, di3) = l3.shape().dims2()?;
        let (n4, k) = idx.dims2()?;
        if n2 != n
            || hi2 != hi
            || di3 != di
            || n4 != n
            || !super::fits(hi, di)
            || n >= i32::MAX as usize
            || k >= i32::MAX as usize
        {
            bail!(
                "indexer_scores_at_bf16: q {:?}, w {:?}, k {:?}, idx {:?} do not fit",
                l1.shape(),
                l2.shape(),
                l3.shape(),
                idx.shape()
            );
        }
        Ok((n, hi, di, k, nk))
    }

    pub struct ScoresAtBf16 {
        pub idx: Tensor,
        pub q16: Tensor,
        pub k16: Tensor,
    }

    impl CustomOp3 for ScoresAtBf16 {
        fn name(&self) -> &'static str {
            "dsa-indexer-scores-at-bf16"
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
            bail!("dsa-indexer-scores-at-bf16 runs on CUDA only; the CPU uses the plain twin")
        }

        fn cuda_fwd(
            &self,
            s1: &CudaStorage,
            l1: &Layout,
            s2: &CudaStorage,
            l2: &Layout,
            _s3: &CudaStorage,
            l3: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let (n, hi, di, k, _) = dims(l1, l2, l3, &self.idx)?;
            let dev = s1.device();
            // SAFETY: the kernel writes every one of the n * k entries.
            let out = unsafe { dev.alloc::<f32>(n * k) }?;
            if n == 0 || k == 0 {
                return Ok((
                    CudaStorage::wrap_cuda_slice(out, dev.clone()),
                    Shape::from((n, k)),
                ));
            }
            let nt = n_tiles(hi);
            let rowb = di * 2 + 16;
            let smem = nt * 8 * rowb + STAGES * KT * rowb + STAGES * KT * 4;
            let f = crate::kernels::cuda::load_from(
                dev,
                MODULE,
                PTX,
                &format!("indexer_at_fwd_bf16_nt{nt}_ks{}", di / 16),
                smem,
            )?;
            let (q_s, q_l) = self.q16.storage_and_layout();
            let (k_s, k_l) = self.k16.storage_and_layout();
            let (i_s, i_l) = self.idx.storage_and_layout();
            let q = crate::kernels::cuda::storage_view::<bf16>(&q_s, q_l, "q")?;
            let kk = crate::kernels::cuda::storage_view::<bf16>(&k_s, k_l, "k")?;
            let idx = crate::kernels::cuda::storage_view::<u32>(&i_s, i_l, "idx")?;
            let w = crate::kernels::cuda::view::<f32>(s2, l2, "w")?;
            let (hi32, k32) = (hi as i32, k as i32);
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&q)
                .arg(&w)
                .arg(&kk)
                .arg(&idx)
                .arg(&out)
                .arg(&hi32)
                .arg(&k32);
            // SAFETY: q16 [n, hi, di] and k16 [nk, di] are contiguous bf16 copies made for this op
            // (offset 0: 16-byte aligned rows), w [n, hi] f32 contiguous, idx [n, k] rows < nk or
            // u32::MAX (the selection's); out holds n * k f32; the launch is on candle's stream.
            unsafe {
                b.launch(LaunchConfig {
                    grid_dim: (n as u32, 1, 1),
                    block_dim: (THREADS, 1, 1),
                    shared_mem_bytes: smem as u32,
                })
            }
            .w()?;
            drop(b);
            Ok((
                CudaStorage::wrap_cuda_slice(out, dev.clone()),
                Shape::from((n, k)),
            ))
        }

        fn bwd(
            &self,
            q: &Tensor,
            _w: &Tensor,
            k: &Tensor,
            _res: &Tensor,
            grad: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            let op = ScoresAtBf16Bwd {
                idx: self.idx.clone(),
                q16: self.q16.clone(),
                k16: self.k16.clone(),
                grad: grad
                    .contiguous()?
                    .to_dtype(candle_core::DType::F32)?
                    .detach(),
            };
            let flat = q.apply_op3_no_bwd(_w, k, &op)?;
            let (n, hi, di) = q.dims3()?;
            let nk = k.dim(0)?;
            let dk0 = dk_offset(n, hi, di);
            let dq = flat.narrow(0, 0, n * hi * di)?.reshape((n, hi, di))?;
            let dw = flat.narrow(0, n * hi * di, n * hi)?.reshape((n, hi))?;
            let dk = flat.narrow(0, dk0, nk * di)?.reshape((nk, di))?;
            Ok((Some(dq), Some(dw), Some(dk)))
        }
    }

    /// Where dk starts in the backward's one buffer [dq | dw | (pad) | dk]: an even offset, so
    /// that its float2 atomics are 8-byte aligned (dq's float2 stores are: DI is even).
    fn dk_offset(n: usize, hi: usize, di: usize) -> usize {
        (n * hi * di + n * hi).next_multiple_of(2)
    }

    struct ScoresAtBf16Bwd {
        idx: Tensor,
        q16: Tensor,
        k16: Tensor,
        grad: Tensor,
    }

    impl CustomOp3 for ScoresAtBf16Bwd {
        fn name(&self) -> &'static str {
            "dsa-indexer-scores-at-bf16-bwd"
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
            bail!("dsa-indexer-scores-at-bf16-bwd runs on CUDA only")
        }

        fn cuda_fwd(
            &self,
            s1: &CudaStorage,
            l1: &Layout,
            s2: &CudaStorage,
            l2: &Layout,
            _s3: &CudaStorage,
            l3: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let (n, hi, di, k, nk) = dims(l1, l2, l3, &self.idx)?;
            let dev = s1.device();
            let total = dk_offset(n, hi, di) + nk * di;
            // Zeroed: dk is summed with atomics; dq and dw are written in full.
            let out = dev.alloc_zeros::<f32>(total)?;
            if n == 0 || k == 0 {
                return Ok((
                    CudaStorage::wrap_cuda_slice(out, dev.clone()),
                    Shape::from(total),
                ));
            }
            let nt = n_tiles(hi);
            let qrows = 16 * nt.div_ceil(2);
            let rowb = di * 2 + 16;
            let smem = qrows * rowb
                + STAGES * KT * rowb
                + qrows * (KT * 2 + 16)
                + STAGES * KT * 4
                + WARPS * nt * 8 * 4;
            let f = crate::kernels::cuda::load_from(
                dev,
                MODULE,
                PTX,
                &format!("indexer_at_bwd_bf16_nt{nt}_ks{}", di / 16),
                smem,
            )?;
            let (q_s, q_l) = self.q16.storage_and_layout();
            let (k_s, k_l) = self.k16.storage_and_layout();
            let (i_s, i_l) = self.idx.storage_and_layout();
            let (g_s, g_l) = self.grad.storage_and_layout();
            let q = crate::kernels::cuda::storage_view::<bf16>(&q_s, q_l, "q")?;
            let kk = crate::kernels::cuda::storage_view::<bf16>(&k_s, k_l, "k")?;
            let idx = crate::kernels::cuda::storage_view::<u32>(&i_s, i_l, "idx")?;
            let grad = crate::kernels::cuda::storage_view::<f32>(&g_s, g_l, "score gradient")?;
            let w = crate::kernels::cuda::view::<f32>(s2, l2, "w")?;
            let dq = out.slice(0..n * hi * di);
            let dw = out.slice(n * hi * di..n * hi * di + n * hi);
            let dk = out.slice(dk_offset(n, hi, di)..);
            let (hi32, k32) = (hi as i32, k as i32);
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&q)
                .arg(&w)
                .arg(&kk)
                .arg(&idx)
                .arg(&grad)
                .arg(&dq)
                .arg(&dw)
                .arg(&dk)
                .arg(&hi32)
                .arg(&k32);
            // SAFETY: as for the forward; grad [n, k] f32 contiguous; dq, dw and dk are disjoint
            // ranges of one zeroed buffer, dq and dk at even offsets (`dk_offset`) for the
            // kernel's 8-byte float2 stores and atomics.
            unsafe {
                b.launch(LaunchConfig {
                    grid_dim: (n as u32, 1, 1),
                    block_dim: (THREADS, 1, 1),
                    shared_mem_bytes: smem as u32,
                })
            }
            .w()?;
            drop(b);
            Ok((
                CudaStorage::wrap_cuda_slice(out, dev.clone()),
                Shape::from(total),
            ))
        }
    }
}
