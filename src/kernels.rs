//! Custom CUDA kernels (kernels/*.cu) wrapped as candle ops, with their backward.
//!
//! Each kernel has a plain twin written with candle ops (the sparse MLA kernel's twin is the
//! candle path of `model::attention::Mla::sparse`); `dsa-train gpu-selftest` compares them on
//! fresh random inputs on the GPU. Without the `cuda` feature, or on the CPU, `available`
//! is false and callers take the plain path.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{Device, Result, Tensor};

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Use the kernels when the device supports them (tests switch them off to run the twins).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::SeqCst);
}

/// Can the custom kernels run on `device`?
pub fn available(device: &Device) -> bool {
    cfg!(feature = "cuda") && device.is_cuda() && ENABLED.load(Ordering::SeqCst)
}

/// Sparse MLA forward over selected keys: q [N, H, DQK] f32, kv [NKV, DQK] f32 (its first `dv`
/// columns are the values), idx [N, K] u32 absolute kv rows (u32::MAX = padding).
/// Returns [N, H, dv + 1]: the output and, in the last column, the LSE of the scaled scores.
/// Differentiable in q and kv.
pub fn sparse_mla(q: &Tensor, kv: &Tensor, idx: &Tensor, scale: f64, dv: usize) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        q.apply_op3(kv, idx, cuda::SparseMla { scale: scale as f32, dv })
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (q, kv, idx, scale, dv);
        candle_core::bail!("sparse_mla kernel needs the `cuda` feature")
    }
}

/// Head-mean attention probabilities over the selected keys [N, K], from the forward's LSE
/// (the sparse-stage KL target; not differentiated).
pub fn sparse_mla_head_mean_probs(q: &Tensor, kv: &Tensor, idx: &Tensor, fwd_out: &Tensor, scale: f64, dv: usize) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        q.apply_op3_no_bwd(kv, idx, &cuda::SparseMlaProbs { scale: scale as f32, dv, fwd_out: fwd_out.detach() })
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (q, kv, idx, fwd_out, scale, dv);
        candle_core::bail!("sparse_mla kernel needs the `cuda` feature")
    }
}

/// Rows `idx` of `src` [N, D] (f32), differentiable in `src`: [M, D]. On CUDA the backward is a
/// parallel scatter-add (candle's index_add walks the indices serially per thread); elsewhere
/// it is candle's `index_select`.
pub fn gather_rows(src: &Tensor, idx: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if available(src.device()) {
        return src.apply_op2(idx, cuda::GatherRows);
    }
    src.index_select(idx, 0)
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum;
    use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaView, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDevice, WrapErr};
    use candle_core::{bail, CpuStorage, CudaStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/sparse_mla.ptx"));
    const WARPS: u32 = 4;
    const HEADS_PER_BLOCK: usize = 8;
    const TILE: usize = 32;
    const MAX_DQK: usize = 576;
    const MAX_DV: usize = 512;

    fn load(dev: &CudaDevice, name: &str, smem_bytes: usize) -> Result<CudaFunction> {
        let f = dev.get_or_load_custom_func(name, "dsa_sparse_mla", PTX)?.into_cuda_function();
        f.set_attribute(CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem_bytes as i32).w()?;
        Ok(f)
    }

    /// A contiguous f32 (or u32) view of a storage, checked.
    fn view<'a, T: candle_core::cuda_backend::CudaDType>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<CudaView<'a, T>> {
        if !l.is_contiguous() {
            bail!("sparse_mla: {what} must be contiguous, got strides {:?} for shape {:?}", l.stride(), l.shape());
        }
        Ok(s.as_cuda_slice::<T>()?.slice(l.start_offset()..))
    }

    struct Dims {
        n: usize,
        h: usize,
        k: usize,
        dqk: usize,
    }

    fn check(l1: &Layout, s1: &CudaStorage, l2: &Layout, s2: &CudaStorage, l3: &Layout, s3: &CudaStorage, dv: usize) -> Result<Dims> {
        let (n, h, dqk) = l1.shape().dims3()?;
        let (_, dqk2) = l2.shape().dims2()?;
        let (n3, k) = l3.shape().dims2()?;
        if dqk != dqk2 || n3 != n || dv > dqk || dqk > MAX_DQK || dv > MAX_DV {
            bail!("sparse_mla: q {:?}, kv {:?}, idx {:?} and dv {dv} do not fit (dqk <= {MAX_DQK}, dv <= {MAX_DV})",
                l1.shape(), l2.shape(), l3.shape());
        }
        if s1.dtype() != DType::F32 || s2.dtype() != DType::F32 || s3.dtype() != DType::U32 {
            bail!("sparse_mla: expects f32 q and kv and u32 indices, got {:?} {:?} {:?}", s1.dtype(), s2.dtype(), s3.dtype());
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

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            bail!("dsa-sparse-mla runs on CUDA only; the CPU uses the plain twin")
        }

        fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout, s3: &CudaStorage, l3: &Layout) -> Result<(CudaStorage, Shape)> {
            let d = check(l1, s1, l2, s2, l3, s3, self.dv)?;
            let dev = s1.device();
            let out = dev.alloc_zeros::<f32>(d.n * d.h * (self.dv + 1))?;
            let smem = (TILE * (d.dqk + 1) + HEADS_PER_BLOCK * d.dqk) * 4;
            let f = load(dev, "sparse_mla_fwd_f32", smem)?;
            let (q, kv, idx) = (view::<f32>(s1, l1, "q")?, view::<f32>(s2, l2, "kv")?, view::<u32>(s3, l3, "idx")?);
            let (n, h, k, dqk, dv) = (d.n as i32, d.h as i32, d.k as i32, d.dqk as i32, self.dv as i32);
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&q).arg(&kv).arg(&idx).arg(&out).arg(&n).arg(&h).arg(&k).arg(&dqk).arg(&dv).arg(&self.scale);
            let cfg = LaunchConfig { grid_dim: grid(&d), block_dim: (WARPS * 32, 1, 1), shared_mem_bytes: smem as u32 };
            // SAFETY: every pointer is a live device buffer of the size the kernel indexes
            // (checked shapes above); the launch is on candle's stream, ordered with its ops.
            unsafe { b.launch(cfg) }.w()?;
            Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from((d.n, d.h, self.dv + 1))))
        }

        fn bwd(&self, q: &Tensor, kv: &Tensor, idx: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            let dv = self.dv;
            let grad = grad_res.contiguous()?;
            // delta[n, h] = dout . out over the value dims (the LSE column carries no gradient).
            let delta = (grad.narrow(2, 0, dv)? * res.narrow(2, 0, dv)?)?.sum(2)?.contiguous()?;
            let op = SparseMlaBwd { scale: self.scale, dv, fwd_out: res.detach(), dout: grad.detach(), delta };
            let flat = q.apply_op3_no_bwd(kv, idx, &op)?;
            let (n, h, dqk) = q.dims3()?;
            let nkv = kv.dim(0)?;
            let dq = flat.narrow(0, 0, n * h * dqk)?.reshape((n, h, dqk))?;
            let dkv = flat.narrow(0, n * h * dqk, nkv * dqk)?.reshape((nkv, dqk))?;
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

    fn cuda_view<'a>(st: &'a Storage, l: &Layout, what: &str) -> Result<CudaView<'a, f32>> {
        match st {
            Storage::Cuda(s) => view::<f32>(s, l, what),
            _ => bail!("sparse_mla: {what} is not on the GPU"),
        }
    }

    impl CustomOp3 for SparseMlaBwd {
        fn name(&self) -> &'static str {
            "dsa-sparse-mla-bwd"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            bail!("dsa-sparse-mla-bwd runs on CUDA only")
        }

        fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout, s3: &CudaStorage, l3: &Layout) -> Result<(CudaStorage, Shape)> {
            let d = check(l1, s1, l2, s2, l3, s3, self.dv)?;
            let nkv = l2.shape().dims2()?.0;
            let dev = s1.device();
            let total = d.n * d.h * d.dqk + nkv * d.dqk;
            let out = dev.alloc_zeros::<f32>(total)?;
            let (fo_s, fo_l) = self.fwd_out.storage_and_layout();
            let (do_s, do_l) = self.dout.storage_and_layout();
            let (de_s, de_l) = self.delta.storage_and_layout();
            let fwd_out = cuda_view(&fo_s, fo_l, "forward output")?;
            let dout = cuda_view(&do_s, do_l, "output gradient")?;
            let delta = cuda_view(&de_s, de_l, "delta")?;
            let smem = (TILE * (d.dqk + 1) + HEADS_PER_BLOCK * (d.dqk + self.dv + 2 * TILE)) * 4;
            let f = load(dev, "sparse_mla_bwd_f32", smem)?;
            let (q, kv, idx) = (view::<f32>(s1, l1, "q")?, view::<f32>(s2, l2, "kv")?, view::<u32>(s3, l3, "idx")?);
            let dq = out.slice(0..d.n * d.h * d.dqk);
            let dkv = out.slice(d.n * d.h * d.dqk..);
            let (n, h, k, dqk, dv) = (d.n as i32, d.h as i32, d.k as i32, d.dqk as i32, self.dv as i32);
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&q).arg(&kv).arg(&idx).arg(&fwd_out).arg(&dout).arg(&delta).arg(&dq).arg(&dkv);
            b.arg(&n).arg(&h).arg(&k).arg(&dqk).arg(&dv).arg(&self.scale);
            let cfg = LaunchConfig { grid_dim: grid(&d), block_dim: (WARPS * 32, 1, 1), shared_mem_bytes: smem as u32 };
            // SAFETY: as for the forward; dq and dkv are disjoint ranges of one zeroed buffer.
            unsafe { b.launch(cfg) }.w()?;
            drop(b);
            Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from(total)))
        }
    }

    const GATHER_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/gather.ptx"));

    fn launch_rows(name: &str, src: &CudaView<f32>, idx: &CudaView<u32>, out: &CudaView<f32>, m: usize, d: usize, dev: &CudaDevice) -> Result<()> {
        let f = dev.get_or_load_custom_func(name, "dsa_gather", GATHER_PTX)?.into_cuda_function();
        let (m64, d32) = (m as i64, d as i32);
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(src).arg(idx).arg(out).arg(&m64).arg(&d32);
        let blocks = (m * d).div_ceil(256).max(1) as u32;
        // SAFETY: idx holds rows < N (they come from the selection); buffers are sized M x D
        // and N x D as the kernel indexes them.
        unsafe { b.launch(LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }) }.w()?;
        Ok(())
    }

    pub struct GatherRows;

    impl candle_core::CustomOp2 for GatherRows {
        fn name(&self) -> &'static str {
            "dsa-gather-rows"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            bail!("dsa-gather-rows runs on CUDA only; the CPU uses index_select")
        }

        fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> Result<(CudaStorage, Shape)> {
            let (_, d) = l1.shape().dims2()?;
            let m = l2.shape().dims1()?;
            let dev = s1.device();
            let out = dev.alloc_zeros::<f32>(m * d)?;
            launch_rows("gather_rows_f32", &view::<f32>(s1, l1, "src")?, &view::<u32>(s2, l2, "idx")?, &out.slice(..), m, d, dev)?;
            Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from((m, d))))
        }

        fn bwd(&self, src: &Tensor, idx: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
            let g = src.apply_op2_no_bwd(idx, &ScatterAddRows { grad: grad.contiguous()?.detach() })?;
            Ok((Some(g), None))
        }
    }

    struct ScatterAddRows {
        grad: Tensor,
    }

    impl candle_core::CustomOp2 for ScatterAddRows {
        fn name(&self) -> &'static str {
            "dsa-scatter-add-rows"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            bail!("dsa-scatter-add-rows runs on CUDA only")
        }

        fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> Result<(CudaStorage, Shape)> {
            let (n, d) = l1.shape().dims2()?;
            let m = l2.shape().dims1()?;
            let dev = s1.device();
            let out = dev.alloc_zeros::<f32>(n * d)?;
            let (g_s, g_l) = self.grad.storage_and_layout();
            let grad = cuda_view(&g_s, g_l, "gradient")?;
            launch_rows("scatter_add_rows_f32", &grad, &view::<u32>(s2, l2, "idx")?, &out.slice(..), m, d, dev)?;
            Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from((n, d))))
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

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            bail!("dsa-sparse-mla-probs runs on CUDA only")
        }

        fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout, s3: &CudaStorage, l3: &Layout) -> Result<(CudaStorage, Shape)> {
            let d = check(l1, s1, l2, s2, l3, s3, self.dv)?;
            let dev = s1.device();
            let out = dev.alloc_zeros::<f32>(d.n * d.k)?;
            let (fo_s, fo_l) = self.fwd_out.storage_and_layout();
            let fwd_out = cuda_view(&fo_s, fo_l, "forward output")?;
            let smem = (TILE * (d.dqk + 1) + WARPS as usize * TILE) * 4;
            let f = load(dev, "sparse_mla_probs_f32", smem)?;
            let (q, kv, idx) = (view::<f32>(s1, l1, "q")?, view::<f32>(s2, l2, "kv")?, view::<u32>(s3, l3, "idx")?);
            let (n, h, k, dqk, dv) = (d.n as i32, d.h as i32, d.k as i32, d.dqk as i32, self.dv as i32);
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&q).arg(&kv).arg(&idx).arg(&fwd_out).arg(&out).arg(&n).arg(&h).arg(&k).arg(&dqk).arg(&dv).arg(&self.scale);
            let cfg = LaunchConfig { grid_dim: (d.n as u32, 1, 1), block_dim: (WARPS * 32, 1, 1), shared_mem_bytes: smem as u32 };
            // SAFETY: as for the forward.
            unsafe { b.launch(cfg) }.w()?;
            drop(b);
            Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from((d.n, d.k))))
        }
    }
}
