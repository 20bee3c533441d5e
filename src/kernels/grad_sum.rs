//! A gradient added to its f32 sum in place on the GPU (kernels/grad_sum.cu): the sum's rows
//! `+= f32(g)` (or `= f32(g)` for the first gradient) in one pass, where the plain twin
//! (`train::accumulate::GradSum`'s candle path) converts g to an f32 copy, adds it to a narrowed
//! copy of the rows and writes them back with `slice_set`. The same one f32 addition per
//! element, so the sums are the twin's bit for bit (`gpu-selftest --only grad-sum`).

use candle_core::{DType, Result, Tensor};

/// Whether the kernel takes a sum's rows `sum` (f32, contiguous, on CUDA) and a gradient `g`
/// (f32 or bf16, contiguous, as many values), and the policy uses it.
pub fn supported(policy: crate::kernels::KernelPolicy, sum: &Tensor, g: &Tensor) -> bool {
    policy.uses(crate::kernels::Fused::GradSum, sum.device())
        && sum.dtype() == DType::F32
        && matches!(g.dtype(), DType::F32 | DType::BF16)
        && sum.is_contiguous()
        && g.is_contiguous()
        && sum.elem_count() == g.elem_count()
        && g.device().same_device(sum.device())
}

/// sum += f32(g) (`add`), or sum = f32(g), written into `sum`'s storage (a view of a buffer
/// its caller alone holds). Callers check `supported` first.
pub fn add_into(sum: &Tensor, g: &Tensor, add: bool) -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        sum.inplace_op2(g, &cuda::GradSumOp { add })
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (sum, g, add);
        candle_core::bail!("the grad-sum kernel needs a CUDA build")
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{bail, CpuStorage, CudaStorage, DType, InplaceOp2, Layout, Result};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/grad_sum.ptx"));

    pub(super) struct GradSumOp {
        pub add: bool,
    }

    impl InplaceOp2 for GradSumOp {
        fn name(&self) -> &'static str {
            "dsa-grad-sum"
        }

        fn cpu_fwd(
            &self,
            _: &mut CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<()> {
            bail!("dsa-grad-sum runs on CUDA only; the CPU takes GradSum's candle path")
        }

        fn cuda_fwd(
            &self,
            s1: &mut CudaStorage,
            l1: &Layout,
            s2: &CudaStorage,
            l2: &Layout,
        ) -> Result<()> {
            if !l1.is_contiguous() || !l2.is_contiguous() {
                bail!("grad-sum: the sum and the gradient must be contiguous");
            }
            let n = l1.shape().elem_count();
            if n != l2.shape().elem_count() || s1.dtype() != DType::F32 {
                bail!(
                    "grad-sum: an f32 sum of {:?} and a gradient of {:?}",
                    l1.shape(),
                    l2.shape()
                );
            }
            if n == 0 {
                return Ok(());
            }
            let dev = s1.device().clone();
            let (o1, o2) = (l1.start_offset(), l2.start_offset());
            // float4 stores need 16-byte alignment (offset multiple of 4 f32 values), four
            // bf16 loads 8-byte (offset multiple of 4 bf16 values); allocations are aligned.
            let vec =
                i32::from(n.is_multiple_of(4) && o1.is_multiple_of(4) && o2.is_multiple_of(4));
            let name = match s2.dtype() {
                DType::F32 => "grad_sum_f32",
                DType::BF16 => "grad_sum_bf16",
                other => bail!("grad-sum: a {other:?} gradient (f32 or bf16)"),
            };
            let f = crate::kernels::cuda::load_from(&dev, "dsa_grad_sum", PTX, name, 0)?;
            let per_thread = if vec == 1 { 4 } else { 1 };
            let blocks = (n / per_thread).div_ceil(256).clamp(1, 132 * 16) as u32;
            let cfg = LaunchConfig {
                grid_dim: (blocks, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let (n64, add) = (n as i64, i32::from(self.add));
            let stream = dev.cuda_stream();
            let mut sum = f32::as_cuda_slice_mut(s1)?.slice_mut(o1..o1 + n);
            let mut b = stream.launch_builder(&f);
            macro_rules! go {
                ($t:ty) => {{
                    let g = <$t>::as_cuda_slice(s2)?.slice(o2..o2 + n);
                    b.arg(&mut sum).arg(&g).arg(&n64).arg(&add).arg(&vec);
                    // SAFETY: sum and g hold n values from their offsets (checked above), the
                    // kernel touches indices below n only; candle's stream orders it.
                    unsafe { b.launch(cfg) }.w()?;
                }};
            }
            match s2.dtype() {
                DType::BF16 => go!(half::bf16),
                _ => go!(f32),
            }
            Ok(())
        }
    }
}
