//! SwiGLU's elementwise part (kernels/swiglu.cu): h = silu(g) * u forward, (dg, du) from dh
//! backward, one pass each instead of the plain twins' chains of candle ops
//! (`ops::silu_mul_plain`, `ops::silu_mul_backward_plain`), with the twins' roundings (the .cu
//! file states them): equal bit for bit, which `gpu-selftest --only swiglu` checks.

use candle_core::{DType, Result, Tensor};

/// Whether the fused ops take g and u: bf16 or f32 on CUDA, same shape and dtype, and the
/// policy uses the fused SwiGLU.
pub fn supported(policy: crate::kernels::KernelPolicy, g: &Tensor, u: &Tensor) -> bool {
    policy.uses(crate::kernels::Fused::Swiglu, g.device())
        && matches!(g.dtype(), DType::BF16 | DType::F32)
        && g.dtype() == u.dtype()
        && g.dims() == u.dims()
}

/// silu(g) * u, differentiable in g and u.
pub fn silu_mul(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        g.contiguous()?.apply_op2(&u.contiguous()?, cuda::SiluMul)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (g, u);
        candle_core::bail!("the fused SwiGLU needs the `cuda` feature")
    }
}

/// The backward of `silu_mul` without autograd: dh -> (dg, du) in g's dtype.
pub fn silu_mul_backward(g: &Tensor, u: &Tensor, dh: &Tensor) -> Result<(Tensor, Tensor)> {
    if dh.dims() != g.dims() || u.dims() != g.dims() {
        candle_core::bail!(
            "silu_mul_backward: g {:?}, u {:?} and dh {:?} must have one shape",
            g.dims(),
            u.dims(),
            dh.dims()
        );
    }
    #[cfg(feature = "cuda")]
    {
        cuda::backward(
            &g.contiguous()?,
            &u.contiguous()?,
            &dh.to_dtype(g.dtype())?.contiguous()?,
        )
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (g, u, dh);
        candle_core::bail!("the fused SwiGLU needs the `cuda` feature")
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{
        bail, CpuStorage, CudaStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
    };
    use half::bf16;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/swiglu.ptx"));
    const MODULE: &str = "dsa_swiglu";
    const THREADS: u32 = 256;

    fn suffix(d: DType) -> Result<&'static str> {
        match d {
            DType::BF16 => Ok("bf16"),
            DType::F32 => Ok("f32"),
            d => bail!("the fused SwiGLU takes bf16 or f32, got {d:?}"),
        }
    }

    fn config(n: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (
                (n as u64).div_ceil(THREADS as u64).clamp(1, 1 << 20) as u32,
                1,
                1,
            ),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    pub struct SiluMul;

    impl CustomOp2 for SiluMul {
        fn name(&self) -> &'static str {
            "dsa-silu-mul"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            bail!("dsa-silu-mul runs on CUDA only; the CPU uses ops::silu_mul_plain")
        }

        fn cuda_fwd(
            &self,
            s1: &CudaStorage,
            l1: &Layout,
            s2: &CudaStorage,
            l2: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let n = l1.shape().elem_count();
            let dev = s1.device();
            let f = crate::kernels::cuda::load_from(
                dev,
                MODULE,
                PTX,
                &format!("silu_mul_{}", suffix(s1.dtype())?),
                0,
            )?;
            let stream = dev.cuda_stream();
            let n64 = n as i64;
            macro_rules! launch {
                ($t:ty) => {{
                    // SAFETY: every element is written below.
                    let h = unsafe { dev.alloc::<$t>(n) }?;
                    if n > 0 {
                        let g = crate::kernels::cuda::view::<$t>(s1, l1, "g")?;
                        let u = crate::kernels::cuda::view::<$t>(s2, l2, "u")?;
                        let mut lb = stream.launch_builder(&f);
                        lb.arg(&g).arg(&u).arg(&h).arg(&n64);
                        // SAFETY: g, u contiguous of n elements (checked by `view`), h of n; candle's stream.
                        unsafe { lb.launch(config(n)) }.w()?;
                    }
                    CudaStorage::wrap_cuda_slice(h, dev.clone())
                }};
            }
            let h = match s1.dtype() {
                DType::BF16 => launch!(bf16),
                _ => launch!(f32),
            };
            Ok((h, l1.shape().clone()))
        }

        fn bwd(
            &self,
            g: &Tensor,
            u: &Tensor,
            _res: &Tensor,
            grad: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>)> {
            let (dg, du) = backward(g, u, &grad.contiguous()?.detach())?;
            Ok((Some(dg), Some(du)))
        }
    }

    /// g, u, dh contiguous of one shape and dtype -> (dg, du).
    pub(super) fn backward(g: &Tensor, u: &Tensor, dh: &Tensor) -> Result<(Tensor, Tensor)> {
        let flat = g.apply_op3_no_bwd(u, dh, &SiluMulBwd)?;
        let n = g.elem_count();
        Ok((
            flat.narrow(0, 0, n)?.reshape(g.shape())?,
            flat.narrow(0, n, n)?.reshape(g.shape())?,
        ))
    }

    /// dg then du in one flat buffer [2 n].
    struct SiluMulBwd;

    impl CustomOp3 for SiluMulBwd {
        fn name(&self) -> &'static str {
            "dsa-silu-mul-bwd"
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
            bail!("dsa-silu-mul-bwd runs on CUDA only")
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
            let n = l1.shape().elem_count();
            let dev = s1.device();
            let f = crate::kernels::cuda::load_from(
                dev,
                MODULE,
                PTX,
                &format!("silu_mul_bwd_{}", suffix(s1.dtype())?),
                0,
            )?;
            let stream = dev.cuda_stream();
            let n64 = n as i64;
            macro_rules! launch {
                ($t:ty) => {{
                    // SAFETY: both halves are written below.
                    let out = unsafe { dev.alloc::<$t>(2 * n) }?;
                    if n > 0 {
                        let g = crate::kernels::cuda::view::<$t>(s1, l1, "g")?;
                        let u = crate::kernels::cuda::view::<$t>(s2, l2, "u")?;
                        let dh = crate::kernels::cuda::view::<$t>(s3, l3, "dh")?;
                        let mut lb = stream.launch_builder(&f);
                        lb.arg(&g).arg(&u).arg(&dh).arg(&out).arg(&n64);
                        // SAFETY: inputs contiguous of n elements; the kernel writes dg and du as
                        // the two halves of out (2 n); candle's stream.
                        unsafe { lb.launch(config(n)) }.w()?;
                    }
                    CudaStorage::wrap_cuda_slice(out, dev.clone())
                }};
            }
            let out = match s1.dtype() {
                DType::BF16 => launch!(bf16),
                _ => launch!(f32),
            };
            Ok((out, Shape::from(2 * n)))
        }
    }
}
