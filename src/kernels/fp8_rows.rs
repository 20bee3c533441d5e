//! Rows [S, D] in bf16 or f32 to e4m3 codes with one f32 scale per row, and back, on the GPU
//! (kernels/fp8_rows.cu): the MoE's FP8 dispatch (scale amax / 448; its twin is the host path
//! of `model::dispatch`, candle's casts on the CPU) and the indexer's FP8 selection scores
//! (`RowScale::PowerOfTwo`; twin `model::fp8_scores::round_rows_host`). The .cu file states
//! the roundings, the twins' steps, so they agree bit for bit (`gpu-selftest --only
//! fp8-dispatch`, `--only fp8-scores`). candle 0.11.1's own CUDA cast to F8E4M3 cannot be used:
//! it looks its kernel up under a name the kernel does not have.

use candle_core::{DType, Result, Tensor};

/// How a row's scale is chosen from its largest magnitude amax (floored at 2^-100).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowScale {
    /// amax / 448, one f32 division (the MoE's FP8 dispatch).
    Amax,
    /// The smallest power of two with amax / scale <= 448 (exact; the codes times the scale
    /// are exact in bf16).
    PowerOfTwo,
}

/// x [S, D] (bf16 or f32; another dtype goes through f32) on a CUDA device -> (codes [S, D]
/// F8E4M3, scales [S, 1] f32).
pub fn quantize_rows(x: &Tensor, scale: RowScale) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    {
        match x.dtype() {
            DType::BF16 | DType::F32 => cuda::quantize_rows(x, scale),
            _ => cuda::quantize_rows(&x.to_dtype(DType::F32)?, scale),
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (x, scale);
        candle_core::bail!("the fp8-rows kernel needs a CUDA build")
    }
}

/// (codes [S, D] F8E4M3, scales [S, 1] f32) on a CUDA device -> rows [S, D] in `dtype` (bf16 or
/// f32; another dtype goes through f32).
pub fn dequantize_rows(codes: &Tensor, scales: &Tensor, dtype: DType) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        match dtype {
            DType::BF16 | DType::F32 => cuda::dequantize_rows(codes, scales, dtype),
            other => cuda::dequantize_rows(codes, scales, DType::F32)?.to_dtype(other),
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (codes, scales, dtype);
        candle_core::bail!("the fp8-rows kernel needs a CUDA build")
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDevice, WrapErr};
    use candle_core::op::BackpropOp;
    use candle_core::{bail, CudaStorage, DType, Result, Storage, Tensor};
    use float8::F8E4M3;
    use half::bf16;

    use crate::kernels::cuda::{load_from, storage_view};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fp8_rows.ptx"));

    fn func(
        dev: &CudaDevice,
        name: &str,
    ) -> Result<candle_core::cuda_backend::cudarc::driver::CudaFunction> {
        load_from(dev, "dsa_fp8_rows", PTX, name, 0)
    }

    fn tensor(storage: CudaStorage, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        Tensor::from_storage(Storage::Cuda(storage), n.max(1), BackpropOp::none(), false)
            .narrow(0, 0, n)?
            .reshape(shape)
    }

    pub fn quantize_rows(x: &Tensor, scale: super::RowScale) -> Result<(Tensor, Tensor)> {
        let (rows, cols) = x.dims2()?;
        if cols == 0 {
            bail!("fp8-rows: rows of no values");
        }
        let dev: CudaDevice = x.device().as_cuda_device()?.clone();
        let x = x.contiguous()?;
        let (xs, xl) = x.storage_and_layout();
        let stream = dev.cuda_stream();
        // SAFETY: the kernel writes every code and every scale (one warp per row).
        let mut codes = unsafe { dev.alloc::<F8E4M3>((rows * cols).max(1)) }?;
        let mut scales = unsafe { dev.alloc::<f32>(rows.max(1)) }?;
        let (r64, c64) = (rows as i64, cols as i64);
        let pow2 = i32::from(scale == super::RowScale::PowerOfTwo);
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(8).max(1) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        macro_rules! go {
            ($t:ty, $name:expr) => {{
                let xv = storage_view::<$t>(&xs, xl, "x")?;
                let f = func(&dev, $name)?;
                let mut b = stream.launch_builder(&f);
                b.arg(&xv)
                    .arg(&mut codes)
                    .arg(&mut scales)
                    .arg(&r64)
                    .arg(&c64)
                    .arg(&pow2);
                // SAFETY: x holds rows * cols values, codes rows * cols bytes, scales rows
                // f32; candle's stream orders the launch.
                unsafe { b.launch(cfg) }.w()?;
            }};
        }
        if rows * cols > 0 {
            match x.dtype() {
                DType::BF16 => go!(bf16, "fp8_rows_quantize_bf16"),
                DType::F32 => go!(f32, "fp8_rows_quantize_f32"),
                other => bail!("fp8-rows: rows in {other:?} (bf16 or f32)"),
            }
        }
        drop(xs);
        let codes = tensor(
            CudaStorage::wrap_cuda_slice(codes, dev.clone()),
            &[rows, cols],
        )?;
        let scales = tensor(CudaStorage::wrap_cuda_slice(scales, dev), &[rows, 1])?;
        Ok((codes, scales))
    }

    pub fn dequantize_rows(codes: &Tensor, scales: &Tensor, dtype: DType) -> Result<Tensor> {
        let (rows, cols) = codes.dims2()?;
        if codes.dtype() != DType::F8E4M3
            || scales.dtype() != DType::F32
            || scales.dims() != [rows, 1]
        {
            bail!(
                "fp8-rows: codes {:?} {:?} with scales {:?} {:?} (F8E4M3 and f32 [{rows}, 1])",
                codes.dims(),
                codes.dtype(),
                scales.dims(),
                scales.dtype()
            );
        }
        let dev: CudaDevice = codes.device().as_cuda_device()?.clone();
        let (codes, scales) = (codes.contiguous()?, scales.contiguous()?);
        let (cs, cl) = codes.storage_and_layout();
        let (ss, sl) = scales.storage_and_layout();
        let cv = storage_view::<F8E4M3>(&cs, cl, "codes")?;
        let sv = storage_view::<f32>(&ss, sl, "scales")?;
        let n = rows * cols;
        let (r64, c64) = (rows as i64, cols as i64);
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(256).max(1) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let stream = dev.cuda_stream();
        macro_rules! go {
            ($t:ty, $name:expr) => {{
                // SAFETY: every element of out is written (one thread per value).
                let mut out = unsafe { dev.alloc::<$t>(n.max(1)) }?;
                if n > 0 {
                    let f = func(&dev, $name)?;
                    let mut b = stream.launch_builder(&f);
                    b.arg(&cv).arg(&sv).arg(&mut out).arg(&r64).arg(&c64);
                    // SAFETY: codes hold rows * cols bytes, scales rows f32, out rows * cols
                    // values; candle's stream orders the launch.
                    unsafe { b.launch(cfg) }.w()?;
                }
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        let storage = match dtype {
            DType::BF16 => go!(bf16, "fp8_rows_dequantize_bf16"),
            _ => go!(f32, "fp8_rows_dequantize_f32"),
        };
        drop((cs, ss));
        tensor(storage, &[rows, cols])
    }
}
