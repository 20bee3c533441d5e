//! Rotary position embedding as one candle op with its backward (kernels/rope.cu), for MLA's
//! q_pe and k_pe (interleaved pairs) and the indexer's queries and keys (halves).
//!
//! The plain twins (`ops::rope_interleaved_plain`, `ops::rope_half_plain`) are about ten candle
//! ops each way; the kernel is one pass each way with the twins' roundings, so the two agree
//! bit for bit forward and backward (`gpu-selftest --only rope` requires it).

use candle_core::{DType, Result, Tensor};

/// Which dims of a row of R form a rotated pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pairs {
    /// (2i, 2i+1): DeepSeek's MLA.
    Interleaved,
    /// (i, i + R/2): the DSA indexer.
    Halves,
}

/// Whether x [B, T, H, R] (R even, > 0) and f32 cos, sin [T, R/2] fit together: what the
/// kernel's indexing assumes.
fn shapes_fit(x: &Tensor, cos: &Tensor, sin: &Tensor) -> bool {
    let Ok((_, t, _, r)) = x.dims4() else {
        return false;
    };
    r > 0
        && r % 2 == 0
        && cos.dims() == [t, r / 2]
        && sin.dims() == cos.dims()
        && cos.dtype() == DType::F32
        && sin.dtype() == DType::F32
}

/// Whether the fused op takes these: `shapes_fit`, bf16 or f32 x on CUDA, and the policy uses
/// the fused RoPE.
pub fn supported(
    policy: crate::kernels::KernelPolicy,
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> bool {
    policy.uses(crate::kernels::Fused::Rope, x.device())
        && matches!(x.dtype(), DType::BF16 | DType::F32)
        && shapes_fit(x, cos, sin)
}

/// x [B, T, H, R] rotated by the angles of cos/sin [T, R/2] (f32), in x's dtype; differentiable in x.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, pairs: Pairs) -> Result<Tensor> {
    if !shapes_fit(x, cos, sin) {
        candle_core::bail!(
            "the fused RoPE needs x [B, T, H, R] with R even and f32 cos, sin [T, R/2]; got x {:?}, cos {:?} {:?}, sin {:?} {:?}",
            x.dims(), cos.dims(), cos.dtype(), sin.dims(), sin.dtype()
        );
    }
    let x = x.contiguous()?;
    let (cos, sin) = (cos.contiguous()?.detach(), sin.contiguous()?.detach());
    #[cfg(feature = "cuda")]
    {
        x.apply_op3(
            &cos,
            &sin,
            cuda::Rope {
                pairs,
                inverse: false,
            },
        )
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (x, cos, sin, pairs);
        candle_core::bail!("the fused RoPE needs the `cuda` feature")
    }
}

/// The inverse rotation (the angles negated): `rope`'s backward, without autograd.
pub fn rope_inverse(dy: &Tensor, cos: &Tensor, sin: &Tensor, pairs: Pairs) -> Result<Tensor> {
    if !shapes_fit(dy, cos, sin) {
        candle_core::bail!("the fused RoPE's inverse needs dy [B, T, H, R] with R even and f32 cos, sin [T, R/2]; got dy {:?}", dy.dims());
    }
    let dy = dy.contiguous()?;
    let (cos, sin) = (cos.contiguous()?.detach(), sin.contiguous()?.detach());
    #[cfg(feature = "cuda")]
    {
        dy.apply_op3_no_bwd(
            &cos,
            &sin,
            &cuda::Rope {
                pairs,
                inverse: true,
            },
        )
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (dy, cos, sin, pairs);
        candle_core::bail!("the fused RoPE needs the `cuda` feature")
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{
        bail, CpuStorage, CudaStorage, CustomOp3, DType, Layout, Result, Shape, Tensor,
    };
    use half::bf16;

    use super::Pairs;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/rope.ptx"));
    const MODULE: &str = "dsa_rope";
    const THREADS: u32 = 256;

    /// The rotation of x (inputs x, cos, sin); `inverse` rotates by the negative angles.
    pub struct Rope {
        pub pairs: Pairs,
        pub inverse: bool,
    }

    impl CustomOp3 for Rope {
        fn name(&self) -> &'static str {
            "dsa-rope"
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
            bail!("dsa-rope runs on CUDA only; the CPU uses ops::rope_*_plain")
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
            let (b, t, h, r) = l1.shape().dims4()?;
            let dev = s1.device();
            let suffix = match s1.dtype() {
                DType::BF16 => "bf16",
                DType::F32 => "f32",
                d => bail!("the fused RoPE takes bf16 or f32, got {d:?}"),
            };
            let f =
                crate::kernels::cuda::load_from(dev, MODULE, PTX, &format!("rope_{suffix}"), 0)?;
            let pairs = (b * t * h * r / 2) as i64;
            let (t32, h32, half) = (t as i32, h as i32, (r / 2) as i32);
            let (interleaved, inverse) = (
                i32::from(self.pairs == Pairs::Interleaved),
                i32::from(self.inverse),
            );
            let blocks = (pairs as u64).div_ceil(THREADS as u64).clamp(1, 1 << 20) as u32;
            let cfg = LaunchConfig {
                grid_dim: (blocks, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let cos = crate::kernels::cuda::view::<f32>(s2, l2, "cos")?;
            let sin = crate::kernels::cuda::view::<f32>(s3, l3, "sin")?;
            let stream = dev.cuda_stream();
            macro_rules! launch {
                ($t:ty) => {{
                    // SAFETY: the kernel writes both elements of every pair, i.e. every element.
                    let y = unsafe { dev.alloc::<$t>(b * t * h * r) }?;
                    if pairs > 0 {
                        let x = crate::kernels::cuda::view::<$t>(s1, l1, "x")?;
                        let mut lb = stream.launch_builder(&f);
                        lb.arg(&x).arg(&cos).arg(&sin).arg(&y).arg(&pairs).arg(&t32).arg(&h32).arg(&half).arg(&interleaved).arg(&inverse);
                        // SAFETY: x [B, T, H, R] contiguous of the kernel's dtype, cos/sin [T, R/2]
                        // f32 contiguous (checked by `supported`), y as large as x; candle's stream.
                        unsafe { lb.launch(cfg) }.w()?;
                    }
                    CudaStorage::wrap_cuda_slice(y, dev.clone())
                }};
            }
            let y = match s1.dtype() {
                DType::BF16 => launch!(bf16),
                _ => launch!(f32),
            };
            Ok((y, l1.shape().clone()))
        }

        fn bwd(
            &self,
            _x: &Tensor,
            cos: &Tensor,
            sin: &Tensor,
            _res: &Tensor,
            grad: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            let dx = grad.contiguous()?.detach().apply_op3_no_bwd(
                cos,
                sin,
                &Rope {
                    pairs: self.pairs,
                    inverse: !self.inverse,
                },
            )?;
            Ok((Some(dx), None, None))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    // Shapes the kernel's indexing cannot take end in an error before any launch (on every build).
    #[test]
    fn mismatched_shapes_are_an_error_not_a_launch() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 4, 2, 6), DType::F32, &dev).unwrap();
        let table =
            |rows: usize, cols: usize| Tensor::zeros((rows, cols), DType::F32, &dev).unwrap();
        let (cos, sin) = (table(4, 3), table(4, 3));
        assert!(shapes_fit(&x, &cos, &sin));
        for (c, s) in [
            (table(3, 3), table(3, 3)),
            (table(4, 3), table(3, 3)),
            (table(4, 2), table(4, 2)),
            (cos.clone(), sin.to_dtype(DType::BF16).unwrap()),
        ] {
            assert!(!shapes_fit(&x, &c, &s));
            let err = rope(&x, &c, &s, Pairs::Halves).unwrap_err().to_string();
            assert!(err.contains("R even"), "{err}");
        }
        let odd = Tensor::zeros((1, 4, 2, 5), DType::F32, &dev).unwrap();
        assert!(!shapes_fit(&odd, &table(4, 2), &table(4, 2)));
        assert!(
            !supported(crate::kernels::KernelPolicy::default(), &x, &cos, &sin),
            "no kernels on the CPU"
        );
    }
}
