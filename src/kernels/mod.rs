//! Custom CUDA kernels (kernels/*.cu) wrapped as candle ops, with their backward.
//!
//! Each kernel has a plain twin written with candle ops (the sparse MLA kernel's twin is the
//! candle path of `model::attention::Mla::sparse`); `dsa-train gpu-selftest` compares them on
//! fresh random inputs on the GPU. Which of the two runs is a `KernelPolicy` the caller holds
//! (policy.rs); without the `cuda` feature, or on the CPU, the plain path runs.

use candle_core::{Result, Tensor};

// One module per new kernel family (each with its .cu file in kernels/).
pub mod adamw;
pub mod fp8_dequant;
pub mod fp8_rows;
pub mod grad_sum;
pub mod indexer_at_tc;
pub mod indexer_topk;
pub mod join_rows;
pub mod lm_loss;
pub mod moe_route;
pub mod policy;
pub mod rms_norm;
pub mod rope;
pub mod sparse_mla_tc;
pub mod swiglu;
pub mod warmup_kl;

pub use policy::{Fused, KernelPolicy};

/// Sparse MLA forward over selected keys: q [N, H, DQK] f32, kv [NKV, DQK] f32 (its first `dv`
/// columns are the values), idx [N, K] u32 absolute kv rows (u32::MAX = padding).
/// Returns [N, H, dv + 1]: the output and, in the last column, the LSE of the scaled scores.
/// Differentiable in q and kv.
pub fn sparse_mla(q: &Tensor, kv: &Tensor, idx: &Tensor, scale: f64, dv: usize) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        q.apply_op3(
            kv,
            idx,
            cuda::SparseMla {
                scale: scale as f32,
                dv,
            },
        )
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (q, kv, idx, scale, dv);
        candle_core::bail!("sparse_mla kernel needs the `cuda` feature")
    }
}

/// The backward of `sparse_mla` without autograd: `fwd_out` its result [N, H, dv + 1] and
/// `grad` that result's gradient [N, H, dv + 1] f32 (the LSE column is ignored) -> (dq
/// [N, H, DQK], dkv [NKV, DQK]), f32, the same kernel autograd runs.
pub fn sparse_mla_backward(
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
        let (dq, dkv, _) = cuda::SparseMla {
            scale: scale as f32,
            dv,
        }
        .bwd(q, kv, idx, fwd_out, grad)?;
        Ok((dq.expect("dq"), dkv.expect("dkv")))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (q, kv, idx, fwd_out, grad, scale, dv);
        candle_core::bail!("sparse_mla kernel needs the `cuda` feature")
    }
}

/// Head-mean attention probabilities over the selected keys [N, K], from the forward's LSE
/// (the sparse-stage KL target; not differentiated).
pub fn sparse_mla_head_mean_probs(
    q: &Tensor,
    kv: &Tensor,
    idx: &Tensor,
    fwd_out: &Tensor,
    scale: f64,
    dv: usize,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        q.apply_op3_no_bwd(
            kv,
            idx,
            &cuda::SparseMlaProbs {
                scale: scale as f32,
                dv,
                fwd_out: fwd_out.detach(),
            },
        )
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (q, kv, idx, fwd_out, scale, dv);
        candle_core::bail!("sparse_mla kernel needs the `cuda` feature")
    }
}

/// Indexer scores at the selected keys: q [N, HI, DI], w [N, HI], k [NK, DI] (all f32),
/// idx [N, K] u32 absolute rows (u32::MAX = padding, scored 0) -> [N, K]. Differentiable in q,
/// w and k; never stores [N, HI, K] or the gathered keys.
pub fn indexer_scores_at(q: &Tensor, w: &Tensor, k: &Tensor, idx: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        q.apply_op3(w, k, cuda::IndexerScoresAt { idx: idx.clone() })
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (q, w, k, idx);
        candle_core::bail!("indexer_scores_at kernel needs the `cuda` feature")
    }
}

/// The backward of `indexer_scores_at` without autograd: `grad` [N, K] f32 -> (dq [N, HI, DI],
/// dw [N, HI], dk [NK, DI]) f32, the kernel autograd runs.
pub fn indexer_scores_at_backward(
    q: &Tensor,
    w: &Tensor,
    k: &Tensor,
    idx: &Tensor,
    grad: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    {
        use candle_core::CustomOp3;
        let (dq, dw, dk) = cuda::IndexerScoresAt { idx: idx.clone() }.bwd(q, w, k, grad, grad)?;
        Ok((dq.expect("dq"), dw.expect("dw"), dk.expect("dk")))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (q, w, k, idx, grad);
        candle_core::bail!("indexer_scores_at kernel needs the `cuda` feature")
    }
}

#[cfg(feature = "cuda")]
pub(crate) mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaFunction, CudaView, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaDevice, WrapErr};
    use candle_core::{
        bail, CpuStorage, CudaStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor,
    };

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/sparse_mla.ptx"));
    const WARPS: u32 = 4;
    const HEADS_PER_BLOCK: usize = 8;
    const TILE: usize = 32;
    const MAX_DQK: usize = 576;
    const MAX_DV: usize = 512;

    /// Load kernel `name` of a PTX module and allow it `smem_bytes` of dynamic shared memory.
    /// Every kernel family loads its functions through this (0 bytes: no dynamic shared memory).
    pub(crate) fn load_from(
        dev: &CudaDevice,
        module: &str,
        ptx: &str,
        name: &str,
        smem_bytes: usize,
    ) -> Result<CudaFunction> {
        let f = dev
            .get_or_load_custom_func(name, module, ptx)?
            .into_cuda_function();
        if smem_bytes > 0 {
            f.set_attribute(
                CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem_bytes as i32,
            )
            .w()?;
        }
        Ok(f)
    }

    fn load(dev: &CudaDevice, name: &str, smem_bytes: usize) -> Result<CudaFunction> {
        load_from(dev, "dsa_sparse_mla", PTX, name, smem_bytes)
    }

    /// A contiguous f32 (or u32) view of a storage, checked.
    pub(crate) fn view<'a, T: candle_core::cuda_backend::CudaDType>(
        s: &'a CudaStorage,
        l: &Layout,
        what: &str,
    ) -> Result<CudaView<'a, T>> {
        if !l.is_contiguous() {
            bail!(
                "kernel input {what} must be contiguous, got strides {:?} for shape {:?}",
                l.stride(),
                l.shape()
            );
        }
        Ok(s.as_cuda_slice::<T>()?.slice(l.start_offset()..))
    }

    /// `view` of a tensor's storage (as `storage_and_layout` hands it), checked to be on the GPU.
    pub(crate) fn storage_view<'a, T: candle_core::cuda_backend::CudaDType>(
        st: &'a Storage,
        l: &Layout,
        what: &str,
    ) -> Result<CudaView<'a, T>> {
        match st {
            Storage::Cuda(s) => view::<T>(s, l, what),
            _ => bail!("kernel input {what} is not on the GPU"),
        }
    }

    struct Dims {
        n: usize,
        h: usize,
        k: usize,
        dqk: usize,
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
        let (_, dqk2) = l2.shape().dims2()?;
        let (n3, k) = l3.shape().dims2()?;
        if dqk != dqk2 || n3 != n || dv > dqk || dqk > MAX_DQK || dv > MAX_DV {
            bail!("sparse_mla: q {:?}, kv {:?}, idx {:?} and dv {dv} do not fit (dqk <= {MAX_DQK}, dv <= {MAX_DV})",
                l1.shape(), l2.shape(), l3.shape());
        }
        if s1.dtype() != DType::F32 || s2.dtype() != DType::F32 || s3.dtype() != DType::U32 {
            bail!(
                "sparse_mla: expects f32 q and kv and u32 indices, got {:?} {:?} {:?}",
                s1.dtype(),
                s2.dtype(),
                s3.dtype()
            );
        }
        Ok(Dims { n, h, k, dqk })
    }

    fn grid(d: &Dims) -> (u32, u32, u32) {
        (d.n as u32, d.h.div_ceil(HEADS_PER_BLOCK) as u32, 1)
    }

    pub struct SparseMla {
        pub scale: f32,
        pub dv: usize,
    }

    impl CustomOp3 for SparseMla {
        fn name(&self) -> &'static str {
            "dsa-sparse-mla"
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
            bail!("dsa-sparse-mla runs on CUDA only; the CPU uses the plain twin")
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
            let out = dev.alloc_zeros::<f32>(d.n * d.h * (self.dv + 1))?;
            let smem = (TILE * (d.dqk + 1) + HEADS_PER_BLOCK * d.dqk) * 4;
            let f = load(dev, "sparse_mla_fwd_f32", smem)?;
            let (q, kv, idx) = (
                view::<f32>(s1, l1, "q")?,
                view::<f32>(s2, l2, "kv")?,
                view::<u32>(s3, l3, "idx")?,
            );
            let (n, h, k, dqk, dv) = (
                d.n as i32,
                d.h as i32,
                d.k as i32,
                d.dqk as i32,
                self.dv as i32,
            );
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&q)
                .arg(&kv)
                .arg(&idx)
                .arg(&out)
                .arg(&n)
                .arg(&h)
                .arg(&k)
                .arg(&dqk)
                .arg(&dv)
                .arg(&self.scale);
            let cfg = LaunchConfig {
                grid_dim: grid(&d),
                block_dim: (WARPS * 32, 1, 1),
                shared_mem_bytes: smem as u32,
            };
            // SAFETY: every pointer is a live device buffer of the size the kernel indexes
            // (checked shapes above); the launch is on candle's stream, ordered with its ops.
            unsafe { b.launch(cfg) }.w()?;
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
            let dv = self.dv;
            let grad = grad_res.contiguous()?;
            // delta[n, h] = dout . out over the value dims (the LSE column carries no gradient).
            let delta = (grad.narrow(2, 0, dv)? * res.narrow(2, 0, dv)?)?
                .sum(2)?
                .contiguous()?;
            let op = SparseMlaBwd {
                scale: self.scale,
                dv,
                fwd_out: res.detach(),
                dout: grad.detach(),
                delta,
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

    /// Backward: one flat f32 buffer holding dq then dkv.
    struct SparseMlaBwd {
        scale: f32,
        dv: usize,
        fwd_out: Tensor,
        dout: Tensor,
        delta: Tensor,
    }

    impl CustomOp3 for SparseMlaBwd {
        fn name(&self) -> &'static str {
            "dsa-sparse-mla-bwd"
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
            bail!("dsa-sparse-mla-bwd runs on CUDA only")
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
            let nkv = l2.shape().dims2()?.0;
            let dev = s1.device();
            let total = d.n * d.h * d.dqk + nkv * d.dqk;
            let out = dev.alloc_zeros::<f32>(total)?;
            let (fo_s, fo_l) = self.fwd_out.storage_and_layout();
            let (do_s, do_l) = self.dout.storage_and_layout();
            let (de_s, de_l) = self.delta.storage_and_layout();
            let fwd_out = storage_view::<f32>(&fo_s, fo_l, "forward output")?;
            let dout = storage_view::<f32>(&do_s, do_l, "output gradient")?;
            let delta = storage_view::<f32>(&de_s, de_l, "delta")?;
            let smem = (TILE * (d.dqk + 1) + HEADS_PER_BLOCK * (d.dqk + self.dv + 2 * TILE)) * 4;
            let f = load(dev, "sparse_mla_bwd_f32", smem)?;
            let (q, kv, idx) = (
                view::<f32>(s1, l1, "q")?,
                view::<f32>(s2, l2, "kv")?,
                view::<u32>(s3, l3, "idx")?,
            );
            let dq = out.slice(0..d.n * d.h * d.dqk);
            let dkv = out.slice(d.n * d.h * d.dqk..);
            let (n, h, k, dqk, dv) = (
                d.n as i32,
                d.h as i32,
                d.k as i32,
                d.dqk as i32,
                self.dv as i32,
            );
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&q)
                .arg(&kv)
                .arg(&idx)
                .arg(&fwd_out)
                .arg(&dout)
                .arg(&delta)
                .arg(&dq)
                .arg(&dkv);
            b.arg(&n)
                .arg(&h)
                .arg(&k)
                .arg(&dqk)
                .arg(&dv)
                .arg(&self.scale);
            let cfg = LaunchConfig {
                grid_dim: grid(&d),
                block_dim: (WARPS * 32, 1, 1),
                shared_mem_bytes: smem as u32,
            };
            // SAFETY: as for the forward; dq and dkv are disjoint ranges of one zeroed buffer.
            unsafe { b.launch(cfg) }.w()?;
            drop(b);
            Ok((
                CudaStorage::wrap_cuda_slice(out, dev.clone()),
                Shape::from(total),
            ))
        }
    }

    const INDEXER_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/indexer.ptx"));

    /// Shapes of q [N, HI, DI], w [N, HI], k [NK, DI], idx [N, K].
    fn indexer_dims(
        l1: &Layout,
        l2: &Layout,
        l3: &Layout,
        idx: &Tensor,
    ) -> Result<(usize, usize, usize, usize)> {
        let (n, hi, di) = l1.shape().dims3()?;
        let (n2, hi2) = l2.shape().dims2()?;
        let (_, di3) = l3.shape().dims2()?;
        let (n4, k) = idx.dims2()?;
        if n2 != n
            || hi2 != hi
            || di3 != di
            || n4 != n
            || di > 128
            || hi > 64
            || idx.dtype() != DType::U32
        {
            bail!("indexer_scores_at: q {:?}, w {:?}, k {:?}, idx {:?} do not fit (DI <= 128, HI <= 64, u32 idx)",
                l1.shape(), l2.shape(), l3.shape(), idx.shape());
        }
        Ok((n, hi, di, k))
    }

    pub struct IndexerScoresAt {
        pub idx: Tensor,
    }

    impl CustomOp3 for IndexerScoresAt {
        fn name(&self) -> &'static str {
            "dsa-indexer-scores-at"
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
            bail!("dsa-indexer-scores-at runs on CUDA only; the CPU uses the plain twin")
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
            let (n, hi, di, k) = indexer_dims(l1, l2, l3, &self.idx)?;
            let dev = s1.device();
            let out = dev.alloc_zeros::<f32>(n * k)?;
            let (i_s, i_l) = self.idx.storage_and_layout();
            let idx = storage_view::<u32>(&i_s, i_l, "idx")?;
            let smem = (hi * di + TILE * (di + 1) + WARPS as usize * TILE) * 4;
            let f = load_from(
                dev,
                "dsa_indexer",
                INDEXER_PTX,
                "indexer_scores_at_f32",
                smem,
            )?;
            let (q, w, kk) = (
                view::<f32>(s1, l1, "q")?,
                view::<f32>(s2, l2, "w")?,
                view::<f32>(s3, l3, "k")?,
            );
            let (n32, hi32, di32, k32) = (n as i32, hi as i32, di as i32, k as i32);
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&q)
                .arg(&w)
                .arg(&kk)
                .arg(&idx)
                .arg(&out)
                .arg(&n32)
                .arg(&hi32)
                .arg(&di32)
                .arg(&k32);
            // SAFETY: shapes checked above; rows in idx are < NK (they come from the selection).
            unsafe {
                b.launch(LaunchConfig {
                    grid_dim: (n as u32, 1, 1),
                    block_dim: (WARPS * 32, 1, 1),
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
            w: &Tensor,
            k: &Tensor,
            _res: &Tensor,
            grad: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            let op = IndexerScoresAtBwd {
                idx: self.idx.clone(),
                grad: grad.contiguous()?.detach(),
            };
            let flat = q.apply_op3_no_bwd(w, k, &op)?;
            let (n, hi, di) = q.dims3()?;
            let nk = k.dim(0)?;
            let dq = flat.narrow(0, 0, n * hi * di)?.reshape((n, hi, di))?;
            let dw = flat.narrow(0, n * hi * di, n * hi)?.reshape((n, hi))?;
            let dk = flat
                .narrow(0, n * hi * di + n * hi, nk * di)?
                .reshape((nk, di))?;
            Ok((Some(dq), Some(dw), Some(dk)))
        }
    }

    struct IndexerScoresAtBwd {
        idx: Tensor,
        grad: Tensor,
    }

    impl CustomOp3 for IndexerScoresAtBwd {
        fn name(&self) -> &'static str {
            "dsa-indexer-scores-at-bwd"
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
            bail!("dsa-indexer-scores-at-bwd runs on CUDA only")
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
            let (n, hi, di, k) = indexer_dims(l1, l2, l3, &self.idx)?;
            let nk = l3.shape().dims2()?.0;
            let dev = s1.device();
            let total = n * hi * di + n * hi + nk * di;
            let out = dev.alloc_zeros::<f32>(total)?;
            let (i_s, i_l) = self.idx.storage_and_layout();
            let idx = storage_view::<u32>(&i_s, i_l, "idx")?;
            let (g_s, g_l) = self.grad.storage_and_layout();
            let grad = storage_view::<f32>(&g_s, g_l, "score gradient")?;
            let smem = (hi * di + TILE * (di + 1) + hi * TILE) * 4;
            let f = load_from(
                dev,
                "dsa_indexer",
                INDEXER_PTX,
                "indexer_scores_at_bwd_f32",
                smem,
            )?;
            let (q, w, kk) = (
                view::<f32>(s1, l1, "q")?,
                view::<f32>(s2, l2, "w")?,
                view::<f32>(s3, l3, "k")?,
            );
            let dq = out.slice(0..n * hi * di);
            let dw = out.slice(n * hi * di..n * hi * di + n * hi);
            let dk = out.slice(n * hi * di + n * hi..);
            let (n32, hi32, di32, k32) = (n as i32, hi as i32, di as i32, k as i32);
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
                .arg(&n32)
                .arg(&hi32)
                .arg(&di32)
                .arg(&k32);
            // SAFETY: as for the forward; dq, dw and dk are disjoint ranges of one zeroed buffer.
            unsafe {
                b.launch(LaunchConfig {
                    grid_dim: (n as u32, 1, 1),
                    block_dim: (WARPS * 32, 1, 1),
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

    pub struct SparseMlaProbs {
        pub scale: f32,
        pub dv: usize,
        pub fwd_out: Tensor,
    }

    impl CustomOp3 for SparseMlaProbs {
        fn name(&self) -> &'static str {
            "dsa-sparse-mla-probs"
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
            bail!("dsa-sparse-mla-probs runs on CUDA only")
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
            let out = dev.alloc_zeros::<f32>(d.n * d.k)?;
            let (fo_s, fo_l) = self.fwd_out.storage_and_layout();
            let fwd_out = storage_view::<f32>(&fo_s, fo_l, "forward output")?;
            let smem = (TILE * (d.dqk + 1) + WARPS as usize * TILE) * 4;
            let f = load(dev, "sparse_mla_probs_f32", smem)?;
            let (q, kv, idx) = (
                view::<f32>(s1, l1, "q")?,
                view::<f32>(s2, l2, "kv")?,
                view::<u32>(s3, l3, "idx")?,
            );
            let (n, h, k, dqk, dv) = (
                d.n as i32,
                d.h as i32,
                d.k as i32,
                d.dqk as i32,
                self.dv as i32,
            );
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&q)
                .arg(&kv)
                .arg(&idx)
                .arg(&fwd_out)
                .arg(&out)
                .arg(&n)
                .arg(&h)
                .arg(&k)
                .arg(&dqk)
                .arg(&dv)
                .arg(&self.scale);
            let cfg = LaunchConfig {
                grid_dim: (d.n as u32, 1, 1),
                block_dim: (WARPS * 32, 1, 1),
                shared_mem_bytes: smem as u32,
            };
            // SAFETY: as for the forward.
            unsafe { b.launch(cfg) }.w()?;
            drop(b);
            Ok((
                CudaStorage::wrap_cuda_slice(out, dev.clone()),
                Shape::from((d.n, d.k)),
            ))
        }
    }
}
