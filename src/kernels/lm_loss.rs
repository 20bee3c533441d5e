//! The LM loss of logit rows and its gradient in two fused passes per row (kernels/lm_loss.cu):
//! the [rows, vocab] f32 copies of the plain twin (`losses::nll_rows_and_grad`: max, shift,
//! exp, sum, scale, scatter and cast, each its own pass) never exist, which at a vocabulary of
//! 129280 is most of the LM head's time on a GPU.
//!
//! For row r with logits x (bf16 or f32, read as f32), target t and weight w:
//!   m = max x, s = sum exp(x - m), nll = log(s) + m - x[t],
//!   grad = (w / s) exp(x - m) - w [v == t]   in the logits' dtype (bf16 rounded to nearest even).
//! The same formula as the twin; the row sums run in another order, so the two agree to f32
//! rounding, not bit for bit. `gpu-selftest --only lm-loss` compares them.

use candle_core::{DType, Result, Tensor};

/// Whether the fused kernels take these logits: [N, V] bf16 or f32 on CUDA with V < 2^31 (and
/// the policy uses the fused LM loss).
pub fn supported(policy: crate::kernels::KernelPolicy, logits: &Tensor) -> bool {
    policy.uses(crate::kernels::Fused::LmLoss, logits.device())
        && matches!(logits.dtype(), DType::BF16 | DType::F32)
        && logits.dims().len() == 2
        && logits.dim(1).is_ok_and(|v| v > 0 && v < i32::MAX as usize)
}

/// NLL per row (f32 [N]) and d(weight * sum of NLL) / dlogits ([N, V], the logits' dtype).
pub fn nll_rows_and_grad(
    logits: &Tensor,
    targets: &Tensor,
    weight: f64,
) -> Result<(Tensor, Tensor)> {
    let (rows, _) = logits.dims2()?;
    if targets.dims() != [rows] || targets.dtype() != DType::U32 {
        candle_core::bail!(
            "the fused LM loss needs one u32 target per row ({:?} {:?} for {rows} rows)",
            targets.dims(),
            targets.dtype()
        );
    }
    #[cfg(feature = "cuda")]
    {
        let logits = logits.contiguous()?;
        let targets = targets.contiguous()?;
        let stats = logits.apply_op2_no_bwd(&targets, &cuda::CeStats)?; // [N, 3]: nll, max, sum
        let grad = logits.apply_op3_no_bwd(
            &targets,
            &stats,
            &cuda::CeGrad {
                weight: weight as f32,
            },
        )?;
        Ok((stats.narrow(1, 0, 1)?.squeeze(1)?.contiguous()?, grad))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = weight;
        candle_core::bail!("the fused LM loss needs the `cuda` feature")
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{
        bail, CpuStorage, CudaStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape,
    };
    use half::bf16;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/lm_loss.ptx"));
    const MODULE: &str = "dsa_lm_loss";
    const THREADS: u32 = 1024; // CE_THREADS in kernels/lm_loss.cu

    fn suffix(dtype: DType) -> Result<&'static str> {
        match dtype {
            DType::BF16 => Ok("bf16"),
            DType::F32 => Ok("f32"),
            d => bail!("the fused LM loss takes bf16 or f32 logits, got {d:?}"),
        }
    }

    fn config(rows: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    pub struct CeStats;

    impl CustomOp2 for CeStats {
        fn name(&self) -> &'static str {
            "dsa-lm-ce-stats"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            bail!("dsa-lm-ce-stats runs on CUDA only; the CPU uses losses::nll_rows_and_grad")
        }

        fn cuda_fwd(
            &self,
            s1: &CudaStorage,
            l1: &Layout,
            s2: &CudaStorage,
            l2: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let (rows, vocab) = l1.shape().dims2()?;
            let dev = s1.device();
            // SAFETY: the kernel writes the 3 values of every row.
            let stats = unsafe { dev.alloc::<f32>(rows * 3) }?;
            if rows > 0 {
                let f = crate::kernels::cuda::load_from(
                    dev,
                    MODULE,
                    PTX,
                    &format!("lm_ce_stats_{}", suffix(s1.dtype())?),
                    0,
                )?;
                let targets = crate::kernels::cuda::view::<u32>(s2, l2, "targets")?;
                let v32 = vocab as i32;
                let stream = dev.cuda_stream();
                macro_rules! launch {
                    ($t:ty) => {{
                        let logits = crate::kernels::cuda::view::<$t>(s1, l1, "logits")?;
                        let mut b = stream.launch_builder(&f);
                        b.arg(&logits).arg(&targets).arg(&stats).arg(&v32);
                        // SAFETY: logits [rows, vocab] contiguous of the kernel's dtype, targets
                        // [rows] u32 (a target >= vocab is not read: the kernel writes NaN),
                        // stats rows * 3 f32; on candle's stream.
                        unsafe { b.launch(config(rows)) }.w()?;
                    }};
                }
                match s1.dtype() {
                    DType::BF16 => launch!(bf16),
                    _ => launch!(f32),
                }
            }
            Ok((
                CudaStorage::wrap_cuda_slice(stats, dev.clone()),
                Shape::from((rows, 3)),
            ))
        }
    }

    pub struct CeGrad {
        pub weight: f32,
    }

    impl CustomOp3 for CeGrad {
        fn name(&self) -> &'static str {
            "dsa-lm-ce-grad"
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
            bail!("dsa-lm-ce-grad runs on CUDA only; the CPU uses losses::nll_rows_and_grad")
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
            let (rows, vocab) = l1.shape().dims2()?;
            let dev = s1.device();
            let f = crate::kernels::cuda::load_from(
                dev,
                MODULE,
                PTX,
                &format!("lm_ce_grad_{}", suffix(s1.dtype())?),
                0,
            )?;
            let targets = crate::kernels::cuda::view::<u32>(s2, l2, "targets")?;
            let stats = crate::kernels::cuda::view::<f32>(s3, l3, "stats")?;
            let v32 = vocab as i32;
            let stream = dev.cuda_stream();
            macro_rules! launch {
                ($t:ty) => {{
                    // SAFETY: the kernel writes every one of the rows * vocab entries.
                    let grad = unsafe { dev.alloc::<$t>(rows * vocab) }?;
                    if rows > 0 {
                        let logits = crate::kernels::cuda::view::<$t>(s1, l1, "logits")?;
                        let mut b = stream.launch_builder(&f);
                        b.arg(&logits)
                            .arg(&targets)
                            .arg(&stats)
                            .arg(&self.weight)
                            .arg(&grad)
                            .arg(&v32);
                        // SAFETY: as for the stats; stats [rows, 3] from CeStats on these logits.
                        unsafe { b.launch(config(rows)) }.w()?;
                    }
                    CudaStorage::wrap_cuda_slice(grad, dev.clone())
                }};
            }
            let out = match s1.dtype() {
                DType::BF16 => launch!(bf16),
                _ => launch!(f32),
            };
            Ok((out, Shape::from((rows, vocab))))
        }
    }
}
