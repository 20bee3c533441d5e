//! Frozen FP8 weights dequantised on the GPU (kernels/fp8_dequant.cu): e4m3 bytes [rows, cols]
//! times their 128 x 128 block scales, rounded once to bf16 or f32. The twin is the loader's
//! host loop (`model::fp8_frozen::dequantize_plain`); the same f32 product and rounding, so
//! the two agree bit for bit (`gpu-selftest --only fp8-dequant`).

use candle_core::{DType, Result, Tensor};

/// bytes u8 [rows, cols], scales f32 [ceil(rows / 128), ceil(cols / 128)] on one CUDA device ->
/// the weight [rows, cols] in `dtype` (bf16 or f32; another dtype goes through f32).
pub fn dequantize(bytes: &Tensor, scales: &Tensor, dtype: DType) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        match dtype {
            DType::BF16 | DType::F32 => cuda::dequantize(bytes, scales, dtype),
            other => cuda::dequantize(bytes, scales, DType::F32)?.to_dtype(other),
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (bytes, scales, dtype);
        candle_core::bail!("the fp8-dequant kernel needs a CUDA build")
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{CudaView, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
    use candle_core::op::BackpropOp;
    use candle_core::{bail, CudaStorage, DType, Layout, Result, Storage, Tensor};
    use half::bf16;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fp8_dequant.ptx"));

    fn view<'a, T: CudaDType>(st: &'a Storage, l: &Layout, what: &str) -> Result<CudaView<'a, T>> {
        match st {
            Storage::Cuda(s) if l.is_contiguous() => {
                Ok(s.as_cuda_slice::<T>()?.slice(l.start_offset()..))
            }
            _ => bail!("fp8-dequant: {what} must be contiguous on a CUDA device"),
        }
    }

    pub fn dequantize(bytes: &Tensor, scales: &Tensor, dtype: DType) -> Result<Tensor> {
        let (rows, cols) = bytes.dims2()?;
        let want = [rows.div_ceil(128), cols.div_ceil(128)];
        if bytes.dtype() != DType::U8 || scales.dtype() != DType::F32 || scales.dims() != want {
            bail!(
                "fp8-dequant: bytes {:?} {:?} with scales {:?} {:?} (u8 and f32 {want:?})",
                bytes.dims(),
                bytes.dtype(),
                scales.dims(),
                scales.dtype()
            );
        }
        let dev: CudaDevice = bytes.device().as_cuda_device()?.clone();
        let (bytes, scales) = (bytes.contiguous()?, scales.contiguous()?);
        let (bs, bl) = bytes.storage_and_layout();
        let (ss, sl) = scales.storage_and_layout();
        let bv = view::<u8>(&bs, bl, "bytes")?;
        let sv = view::<f32>(&ss, sl, "scales")?;
        let n = (rows * cols).max(1);
        let quads = cols.div_ceil(4);
        let cfg = LaunchConfig {
            grid_dim: ((rows * quads).div_ceil(256).max(1) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (r64, c64) = (rows as i64, cols as i64);
        let stream = dev.cuda_stream();
        macro_rules! go {
            ($t:ty, $name:expr) => {{
                // SAFETY: every element of out is written (one thread per 4 values of a row).
                let mut out = unsafe { dev.alloc::<$t>(n) }?;
                if rows * cols > 0 {
                    let f =
                        crate::kernels::cuda::load_from(&dev, "dsa_fp8_dequant", PTX, $name, 0)?;
                    let mut b = stream.launch_builder(&f);
                    b.arg(&bv).arg(&sv).arg(&mut out).arg(&r64).arg(&c64);
                    // SAFETY: bytes hold rows * cols u8, scales their blocks, out rows * cols
                    // values; candle's stream orders the launch.
                    unsafe { b.launch(cfg) }.w()?;
                }
                Storage::Cuda(CudaStorage::wrap_cuda_slice(out, dev.clone()))
            }};
        }
        let storage = match dtype {
            DType::BF16 => go!(bf16, "fp8_dequant_bf16"),
            _ => go!(f32, "fp8_dequant_f32"),
        };
        drop((bs, ss));
        Tensor::from_storage(storage, n, BackpropOp::none(), false)
            .narrow(0, 0, rows * cols)?
            .reshape((rows, cols))
    }
}
