//! Strided row copies (kernels/join_rows.cu): x1 [A, B, W1] and optionally x2 [A, B, W2], each
//! any view whose last dim is contiguous (a transpose of the first two dims, a narrow of the
//! last), joined along the last dim into one contiguous [A, B, W1 + W2] tensor of `dtype`.
//! The absorbed attention's moves between token-major [T, H, C] and head-major [H, T, C]
//! layouts, and its query's join of the latent and RoPE parts, go through here.
//!
//! Numerics: a copy, with one cast to `dtype` (nearest even) when it differs: the twin's bits.
//! Differentiable: the gradient of each input is its columns of the output's gradient, cast
//! back to the input's dtype.

use candle_core::{DType, Result, Tensor};

/// `[x1, x2]` along the last dim, contiguous, in `dtype` (x2 None: x1 alone). Each input
/// [d_0, ..., d_{r-1}] is read as [A, B, W] with A the product of its first `split` dims and B
/// of the rest but the last: each group's dims must nest (a view such as a permutation of the
/// dims of a contiguous tensor, or a narrow of its last dim). Returns [A, B, W1 + W2]. The
/// kernel runs where `policy` allows it, else `join_rows_plain`.
pub fn join_rows(
    policy: crate::kernels::KernelPolicy,
    x1: &Tensor,
    x2: Option<&Tensor>,
    split: usize,
    dtype: DType,
) -> Result<Tensor> {
    let (a, b, _) = groups(x1, split)?;
    if let Some(x2) = x2 {
        let (a2, b2, _) = groups(x2, split)?;
        if (a2, b2) != (a, b) {
            candle_core::bail!(
                "join_rows: inputs of {:?} and {:?} do not share their first dims",
                x1.dims(),
                x2.dims()
            );
        }
    }
    if fused(policy, x1, x2, split, dtype) {
        #[cfg(feature = "cuda")]
        {
            let (w2, x2) = match x2 {
                Some(x2) => (x2.dims().last().copied().unwrap_or(0), x2),
                None => (0, x1),
            };
            return x1.apply_op2(x2, cuda::JoinRows { dtype, w2, split });
        }
    }
    join_rows_plain(x1, x2, split, dtype)
}

/// The twin: candle's reshape (a copy for a view), cat, cast and contiguous copy.
pub fn join_rows_plain(
    x1: &Tensor,
    x2: Option<&Tensor>,
    split: usize,
    dtype: DType,
) -> Result<Tensor> {
    let as3 = |x: &Tensor| -> Result<Tensor> {
        let (a, b, w) = groups(x, split)?;
        x.reshape((a, b, w))
    };
    let joined = match x2 {
        Some(x2) => Tensor::cat(&[as3(x1)?.to_dtype(dtype)?, as3(x2)?.to_dtype(dtype)?], 2)?,
        None => as3(x1)?,
    };
    joined.to_dtype(dtype)?.contiguous()
}

/// (A, B, W) of x read with its first `split` dims as A.
fn groups(x: &Tensor, split: usize) -> Result<(usize, usize, usize)> {
    let d = x.dims();
    if d.len() < 3 || split == 0 || split >= d.len() - 1 {
        candle_core::bail!("join_rows: split {split} of a tensor of shape {d:?} (rank >= 3, 1 <= split <= rank - 2)");
    }
    Ok((
        d[..split].iter().product(),
        d[split..d.len() - 1].iter().product(),
        d[d.len() - 1],
    ))
}

/// The stride of a group of dims read as one, if they nest (dims of size 1 aside).
fn group_stride(dims: &[usize], strides: &[usize]) -> Option<usize> {
    let kept: Vec<(usize, usize)> = dims
        .iter()
        .zip(strides)
        .filter(|(d, _)| **d != 1)
        .map(|(d, s)| (*d, *s))
        .collect();
    for w in kept.windows(2) {
        if w[0].1 != w[1].1 * w[1].0 {
            return None;
        }
    }
    Some(kept.last().map_or(0, |(_, s)| *s))
}

/// x's (A stride, B stride) when it reads as [A, B, W] in place (last dim contiguous or of size 1).
fn strides3(x: &Tensor, split: usize) -> Option<(usize, usize)> {
    strides3_of(x.dims(), x.layout().stride(), split)
}

fn strides3_of(d: &[usize], s: &[usize], split: usize) -> Option<(usize, usize)> {
    let r = d.len();
    if r < 3 || split == 0 || split >= r - 1 || (s[r - 1] != 1 && d[r - 1] != 1) {
        return None;
    }
    Some((
        group_stride(&d[..split], &s[..split])?,
        group_stride(&d[split..r - 1], &s[split..r - 1])?,
    ))
}

/// Does the kernel take these: CUDA, views that read as [A, B, W] in place, bf16 or f32 in and
/// out, both inputs of one dtype.
fn fused(
    policy: crate::kernels::KernelPolicy,
    x1: &Tensor,
    x2: Option<&Tensor>,
    split: usize,
    dtype: DType,
) -> bool {
    let ok =
        |x: &Tensor| strides3(x, split).is_some() && matches!(x.dtype(), DType::BF16 | DType::F32);
    policy.uses(crate::kernels::Fused::JoinRows, x1.device())
        && x1.elem_count() > 0
        && matches!(dtype, DType::BF16 | DType::F32)
        && ok(x1)
        && x2.is_none_or(|x2| ok(x2) && x2.dtype() == x1.dtype())
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{
        bail, CpuStorage, CudaStorage, CustomOp2, DType, Layout, Result, Shape, Tensor,
    };
    use half::bf16;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/join_rows.ptx"));
    const MODULE: &str = "dsa_join_rows";
    const THREADS: u32 = 128;

    /// x1 and x2 (x2's `w2` columns; 0: x1 alone) joined into `dtype`, each read as [A, B, W]
    /// with its first `split` dims as A.
    pub struct JoinRows {
        pub dtype: DType,
        pub w2: usize,
        pub split: usize,
    }

    /// A layout's (A, B, W) and (A stride, B stride).
    fn dims_of(l: &Layout, split: usize) -> Result<(usize, usize, usize, i64, i64)> {
        let d = l.dims();
        let r = d.len();
        let (sa, sb) = super::strides3_of(d, l.stride(), split).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "join_rows: shape {d:?} with strides {:?} does not read as [A, B, W] in place",
                l.stride()
            ))
        })?;
        Ok((
            d[..split].iter().product(),
            d[split..r - 1].iter().product(),
            d[r - 1],
            sa as i64,
            sb as i64,
        ))
    }

    fn suffix(d: DType) -> Result<&'static str> {
        match d {
            DType::BF16 => Ok("bf16"),
            DType::F32 => Ok("f32"),
            d => bail!("join_rows takes bf16 or f32, got {d:?}"),
        }
    }

    impl CustomOp2 for JoinRows {
        fn name(&self) -> &'static str {
            "dsa-join-rows"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            bail!(
                "dsa-join-rows runs on CUDA only; the CPU uses kernels::join_rows::join_rows_plain"
            )
        }

        fn cuda_fwd(
            &self,
            s1: &CudaStorage,
            l1: &Layout,
            s2: &CudaStorage,
            l2: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let (a, b, w1, s1a, s1b) = dims_of(l1, self.split)?;
            let (_, _, _, s2a, s2b) = dims_of(l2, self.split)?;
            let w = w1 + self.w2;
            let dev = s1.device();
            let name = format!("join_rows_{}_{}", suffix(s1.dtype())?, suffix(self.dtype)?);
            let f = crate::kernels::cuda::load_from(dev, MODULE, PTX, &name, 0)?;
            let rows = (a * b) as i64;
            let nb = b as i64;
            let (w1i, w2i) = (w1 as i32, self.w2 as i32);
            let cfg = LaunchConfig {
                grid_dim: ((rows as u64).clamp(1, 1 << 20) as u32, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let stream = dev.cuda_stream();
            macro_rules! launch {
                ($ti:ty, $to:ty) => {{
                    // SAFETY: written in full below (every row, every column).
                    let out = unsafe { dev.alloc::<$to>(a * b * w) }?;
                    if rows > 0 && w > 0 {
                        let x1 = s1.as_cuda_slice::<$ti>()?.slice(l1.start_offset()..);
                        let x2 = s2.as_cuda_slice::<$ti>()?.slice(l2.start_offset()..);
                        let mut lb = stream.launch_builder(&f);
                        lb.arg(&x1)
                            .arg(&x2)
                            .arg(&out)
                            .arg(&rows)
                            .arg(&nb)
                            .arg(&w1i)
                            .arg(&w2i)
                            .arg(&s1a)
                            .arg(&s1b)
                            .arg(&s2a)
                            .arg(&s2b);
                        // SAFETY: every read x[a s_a + b s_b + i] (i < w) lies inside the input's
                        // view (its layout's extent); out holds A B W values; candle's stream.
                        unsafe { lb.launch(cfg) }.w()?;
                    }
                    CudaStorage::wrap_cuda_slice(out, dev.clone())
                }};
            }
            let out = match (s1.dtype(), self.dtype) {
                (DType::BF16, DType::BF16) => launch!(bf16, bf16),
                (DType::BF16, DType::F32) => launch!(bf16, f32),
                (DType::F32, DType::BF16) => launch!(f32, bf16),
                (DType::F32, DType::F32) => launch!(f32, f32),
                (i, o) => bail!("join_rows: {i:?} -> {o:?} is not built"),
            };
            Ok((out, Shape::from((a, b, w))))
        }

        fn bwd(
            &self,
            x1: &Tensor,
            x2: &Tensor,
            _res: &Tensor,
            grad: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>)> {
            let w1 = x1.dims().last().copied().unwrap_or(0);
            let d1 = grad
                .narrow(2, 0, w1)?
                .to_dtype(x1.dtype())?
                .reshape(x1.shape())?;
            let d2 = if self.w2 > 0 {
                Some(
                    grad.narrow(2, w1, self.w2)?
                        .to_dtype(x2.dtype())?
                        .reshape(x2.shape())?,
                )
            } else {
                None
            };
            Ok((Some(d1), d2))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Which views read as [A, B, W] in place, and their strides.
    #[test]
    fn views_read_in_place_only_when_their_dims_nest() {
        // [T, H, C] transposed: A = H (stride C), B = T (stride H C).
        assert_eq!(
            strides3_of(&[16, 257, 512], &[512, 16 * 512, 1], 1),
            Some((512, 16 * 512))
        );
        // [B, T, H, N] narrowed from N+R and permuted to [H, B, T, N]: B and T nest.
        assert_eq!(
            strides3_of(&[8, 2, 77, 128], &[192, 77 * 8 * 192, 8 * 192, 1], 1),
            Some((192, 8 * 192))
        );
        // B and T that do not nest (T's stride is not H N): no.
        assert_eq!(
            strides3_of(&[8, 2, 77, 128], &[192, 1000, 8 * 192, 1], 1),
            None
        );
        // A broadcast column of width 1 reads in place; a strided last dim does not.
        assert_eq!(strides3_of(&[64, 7, 1], &[0, 0, 0], 1), Some((0, 0)));
        assert_eq!(strides3_of(&[64, 7, 2], &[14, 2, 2], 1), None);
        // Dims of size 1 are skipped when nesting.
        assert_eq!(
            strides3_of(&[1, 5, 3, 4], &[999, 12, 4, 1], 2),
            Some((12, 4))
        );
    }

    /// The plain path joins and casts as cat + to_dtype would.
    #[test]
    fn the_plain_join_is_cat_then_cast() {
        let dev = candle_core::Device::Cpu;
        let x = crate::rng::randn(&[3, 4, 5], 1, 1.0, &dev).unwrap();
        let y = join_rows(
            crate::kernels::KernelPolicy::default(),
            &x.transpose(0, 1).unwrap(),
            Some(&x.transpose(0, 1).unwrap().narrow(2, 0, 2).unwrap()),
            1,
            DType::BF16,
        )
        .unwrap();
        assert_eq!(y.dims(), [4, 3, 7]);
        let want = Tensor::cat(
            &[
                x.transpose(0, 1).unwrap(),
                x.transpose(0, 1).unwrap().narrow(2, 0, 2).unwrap(),
            ],
            2,
        )
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
        let d = (y.to_dtype(DType::F32).unwrap() - want.to_dtype(DType::F32).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0);
    }
}
