//! RMSNorm with its backward as one candle op (kernels/rms_norm.cu), for the activations of
//! every layer (the input and post-attention norms, MLA's q_a and kv_a norms, the final norm).
//!
//! The plain twin (`ops::rms_norm_plain`) is nine candle ops forward; autograd then runs about
//! thirty kernels backward, each edge with its zero-filled gradient and an add. Here the forward
//! is one pass per row and the backward three (each row's scale s, dx, per-chunk dw sums) plus
//! the sum over chunks, with the twin's roundings (kernels/rms_norm.cu states them). The row
//! sums run in another order, so fused and plain agree to f32 rounding of s (and one step of
//! the dtype in T(n), two in y, in rare elements), not bit for bit; `gpu-selftest --only rms-norm` compares them,
//! and both against f64.

use candle_core::{DType, Result, Tensor};

/// Whether the fused op takes x [..., D] and w [D]: bf16 or f32 on CUDA, D in 1..2^31, and
/// the policy uses the fused RMSNorm.
pub fn supported(policy: crate::kernels::KernelPolicy, x: &Tensor, w: &Tensor) -> bool {
    let d = x.dims().last().copied().unwrap_or(0);
    policy.uses(crate::kernels::Fused::RmsNorm, x.device())
        && matches!(x.dtype(), DType::BF16 | DType::F32)
        && matches!(w.dtype(), DType::BF16 | DType::F32)
        && w.dims() == [d]
        && d > 0
        && d < i32::MAX as usize
}

/// `w * x / sqrt(mean(x^2) + eps)` over the last dim, in x's dtype, differentiable in x and w
/// (the gradient of w in w's dtype, through candle's cast).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let d = *dims.last().unwrap_or(&0);
    let rows = x.elem_count() / d.max(1);
    let x2 = x.contiguous()?.reshape((rows, d))?;
    let w = w.to_dtype(x.dtype())?.contiguous()?;
    #[cfg(feature = "cuda")]
    {
        x2.apply_op2(&w, cuda::RmsNorm { eps: eps as f32 })?
            .reshape(dims)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (x2, w, eps);
        candle_core::bail!("the fused RMSNorm needs the `cuda` feature")
    }
}

/// The backward of `rms_norm` without autograd: (dx in x's dtype, dw in w's), the same three
/// passes and sum as the op's own backward.
pub fn rms_norm_backward(
    x: &Tensor,
    w: &Tensor,
    eps: f64,
    dy: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let dims = x.dims().to_vec();
    let d = *dims.last().unwrap_or(&0);
    let rows = x.elem_count() / d.max(1);
    let x2 = x.contiguous()?.reshape((rows, d))?;
    let dy2 = dy.to_dtype(x.dtype())?.contiguous()?.reshape((rows, d))?;
    let wx = w.to_dtype(x.dtype())?.contiguous()?;
    #[cfg(feature = "cuda")]
    {
        let (dx, dw) = cuda::backward(&x2, &wx, eps as f32, &dy2)?;
        Ok((dx.reshape(dims)?, dw.to_dtype(w.dtype())?))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (x2, dy2, wx, eps, dims);
        candle_core::bail!("the fused RMSNorm needs the `cuda` feature")
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{
        bail, CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result,
        Shape, Tensor,
    };
    use half::bf16;

    /// Rows per chunk of the backward's dw partial sums (one partial row of D f32 per chunk).
    const DW_CHUNK_ROWS: usize = 256;
    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/rms_norm.ptx"));
    const MODULE: &str = "dsa_rms_norm";
    const ROWS_PER_BLOCK: usize = 8; // one warp per row, 256 threads

    fn suffix(dtype: DType) -> Result<&'static str> {
        match dtype {
            DType::BF16 => Ok("bf16"),
            DType::F32 => Ok("f32"),
            d => bail!("the fused RMSNorm takes bf16 or f32, got {d:?}"),
        }
    }

    fn row_config(rows: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows.div_ceil(ROWS_PER_BLOCK) as u32, 1, 1),
            block_dim: (32 * ROWS_PER_BLOCK as u32, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Rows per dw chunk: DW_CHUNK_ROWS, more when the grid's y extent (65535) would not hold the chunks.
    fn dw_chunk(rows: usize) -> usize {
        DW_CHUNK_ROWS.max(rows.div_ceil(65535))
    }

    fn inv_d(d: usize) -> f32 {
        (1.0 / d as f64) as f32 // candle's mean: the sum times 1/D rounded to f32
    }

    /// y = T(T(x / s) * w) for x [rows, D], w [D] in x's dtype.
    pub struct RmsNorm {
        pub eps: f32,
    }

    impl CustomOp2 for RmsNorm {
        fn name(&self) -> &'static str {
            "dsa-rms-norm"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            bail!("dsa-rms-norm runs on CUDA only; the CPU uses ops::rms_norm_plain")
        }

        fn cuda_fwd(
            &self,
            s1: &CudaStorage,
            l1: &Layout,
            s2: &CudaStorage,
            l2: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let (rows, d) = l1.shape().dims2()?;
            let dev = s1.device();
            let f = crate::kernels::cuda::load_from(
                dev,
                MODULE,
                PTX,
                &format!("rms_norm_fwd_{}", suffix(s1.dtype())?),
                0,
            )?;
            let (rows64, d32, inv_d, eps) = (rows as i64, d as i32, inv_d(d), self.eps);
            let stream = dev.cuda_stream();
            macro_rules! launch {
                ($t:ty) => {{
                    // SAFETY: the kernel writes every one of the rows * d outputs.
                    let y = unsafe { dev.alloc::<$t>(rows * d) }?;
                    if rows > 0 {
                        let x = crate::kernels::cuda::view::<$t>(s1, l1, "x")?;
                        let w = crate::kernels::cuda::view::<$t>(s2, l2, "w")?;
                        let mut b = stream.launch_builder(&f);
                        b.arg(&x).arg(&w).arg(&y).arg(&rows64).arg(&d32).arg(&inv_d).arg(&eps);
                        // SAFETY: x [rows, d] and w [d] contiguous of the kernel's dtype; on candle's stream.
                        unsafe { b.launch(row_config(rows)) }.w()?;
                    }
                    CudaStorage::wrap_cuda_slice(y, dev.clone())
                }};
            }
            let y = match s1.dtype() {
                DType::BF16 => launch!(bf16),
                _ => launch!(f32),
            };
            Ok((y, Shape::from((rows, d))))
        }

        fn bwd(
            &self,
            x: &Tensor,
            w: &Tensor,
            _res: &Tensor,
            grad: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>)> {
            let (dx, dw) = backward(x, w, self.eps, &grad.contiguous()?.detach())?;
            Ok((Some(dx), Some(dw)))
        }
    }

    /// x, dy [rows, d] and w [d] (x's dtype), contiguous -> (dx [rows, d], dw [d] in w's dtype).
    pub(super) fn backward(
        x: &Tensor,
        w: &Tensor,
        eps: f32,
        dy: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let scale = x.apply_op1_no_bwd(&RowScale { eps })?; // [rows] f32
        let dx = x.apply_op3_no_bwd(
            w,
            dy,
            &Dx {
                scale: scale.clone(),
            },
        )?;
        let partial = x.apply_op3_no_bwd(dy, &scale, &DwPartial)?; // [chunks, d] f32
        let dw = partial.sum(0)?.to_dtype(w.dtype())?;
        Ok((dx, dw))
    }

    /// s = sqrt(mean(x^2) + eps) of every row, f32 [rows].
    struct RowScale {
        eps: f32,
    }

    impl CustomOp1 for RowScale {
        fn name(&self) -> &'static str {
            "dsa-rms-norm-scale"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            bail!("dsa-rms-norm-scale runs on CUDA only")
        }

        fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout) -> Result<(CudaStorage, Shape)> {
            let (rows, d) = l1.shape().dims2()?;
            let dev = s1.device();
            let f = crate::kernels::cuda::load_from(
                dev,
                MODULE,
                PTX,
                &format!("rms_norm_scale_{}", suffix(s1.dtype())?),
                0,
            )?;
            // SAFETY: the kernel writes every row's scale.
            let scale = unsafe { dev.alloc::<f32>(rows) }?;
            if rows > 0 {
                let (rows64, d32, inv_d, eps) = (rows as i64, d as i32, inv_d(d), self.eps);
                let stream = dev.cuda_stream();
                let mut b = stream.launch_builder(&f);
                macro_rules! launch {
                    ($t:ty) => {{
                        let x = crate::kernels::cuda::view::<$t>(s1, l1, "x")?;
                        b.arg(&x)
                            .arg(&scale)
                            .arg(&rows64)
                            .arg(&d32)
                            .arg(&inv_d)
                            .arg(&eps);
                        // SAFETY: x [rows, d] contiguous of the kernel's dtype, scale [rows] f32.
                        unsafe { b.launch(row_config(rows)) }.w()?;
                    }};
                }
                match s1.dtype() {
                    DType::BF16 => launch!(bf16),
                    _ => launch!(f32),
                }
            }
            Ok((
                CudaStorage::wrap_cuda_slice(scale, dev.clone()),
                Shape::from(rows),
            ))
        }
    }

    /// dx [rows, d] from x, w, dy and the rows' scales.
    struct Dx {
        scale: Tensor,
    }

    impl CustomOp3 for Dx {
        fn name(&self) -> &'static str {
            "dsa-rms-norm-dx"
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
            bail!("dsa-rms-norm-dx runs on CUDA only")
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
            let (rows, d) = l1.shape().dims2()?;
            let dev = s1.device();
            let f = crate::kernels::cuda::load_from(
                dev,
                MODULE,
                PTX,
                &format!("rms_norm_bwd_dx_{}", suffix(s1.dtype())?),
                0,
            )?;
            let (sc_s, sc_l) = self.scale.storage_and_layout();
            let scale = crate::kernels::cuda::storage_view::<f32>(&sc_s, sc_l, "scale")?;
            let (rows64, d32, inv_d) = (rows as i64, d as i32, inv_d(d));
            let stream = dev.cuda_stream();
            macro_rules! launch {
                ($t:ty) => {{
                    // SAFETY: the kernel writes every one of the rows * d values.
                    let dx = unsafe { dev.alloc::<$t>(rows * d) }?;
                    if rows > 0 {
                        let x = crate::kernels::cuda::view::<$t>(s1, l1, "x")?;
                        let w = crate::kernels::cuda::view::<$t>(s2, l2, "w")?;
                        let dy = crate::kernels::cuda::view::<$t>(s3, l3, "dy")?;
                        let mut b = stream.launch_builder(&f);
                        b.arg(&x).arg(&w).arg(&dy).arg(&scale).arg(&dx).arg(&rows64).arg(&d32).arg(&inv_d);
                        // SAFETY: x, dy [rows, d], w [d] contiguous of the kernel's dtype, scale [rows] f32.
                        unsafe { b.launch(row_config(rows)) }.w()?;
                    }
                    CudaStorage::wrap_cuda_slice(dx, dev.clone())
                }};
            }
            let dx = match s1.dtype() {
                DType::BF16 => launch!(bf16),
                _ => launch!(f32),
            };
            Ok((dx, Shape::from((rows, d))))
        }
    }

    /// Per-chunk sums of dy * T(x / s) over rows, f32 [chunks, d] (x, dy, scale as inputs).
    struct DwPartial;

    impl CustomOp3 for DwPartial {
        fn name(&self) -> &'static str {
            "dsa-rms-norm-dw"
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
            bail!("dsa-rms-norm-dw runs on CUDA only")
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
            let (rows, d) = l1.shape().dims2()?;
            let dev = s1.device();
            let f = crate::kernels::cuda::load_from(
                dev,
                MODULE,
                PTX,
                &format!("rms_norm_bwd_dw_{}", suffix(s1.dtype())?),
                0,
            )?;
            let chunk = dw_chunk(rows);
            let chunks = rows.div_ceil(chunk).max(1);
            let partial = dev.alloc_zeros::<f32>(chunks * d)?; // zero rows stand for an empty input
            if rows > 0 {
                let scale = crate::kernels::cuda::view::<f32>(s3, l3, "scale")?;
                let (rows64, d32, chunk32) = (rows as i64, d as i32, chunk as i32);
                let stream = dev.cuda_stream();
                let cfg = LaunchConfig {
                    grid_dim: (d.div_ceil(32) as u32, chunks as u32, 1),
                    block_dim: (32, 8, 1),
                    shared_mem_bytes: 0,
                };
                let mut b = stream.launch_builder(&f);
                macro_rules! launch {
                    ($t:ty) => {{
                        let x = crate::kernels::cuda::view::<$t>(s1, l1, "x")?;
                        let dy = crate::kernels::cuda::view::<$t>(s2, l2, "dy")?;
                        b.arg(&x)
                            .arg(&dy)
                            .arg(&scale)
                            .arg(&partial)
                            .arg(&rows64)
                            .arg(&d32)
                            .arg(&chunk32);
                        // SAFETY: x, dy [rows, d] contiguous of the kernel's dtype, scale [rows],
                        // partial [chunks, d] f32 with chunks * chunk >= rows.
                        unsafe { b.launch(cfg) }.w()?;
                    }};
                }
                match s1.dtype() {
                    DType::BF16 => launch!(bf16),
                    _ => launch!(f32),
                }
            }
            Ok((
                CudaStorage::wrap_cuda_slice(partial, dev.clone()),
                Shape::from((chunks, d)),
            ))
        }
    }
}
