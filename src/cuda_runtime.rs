//! How the process sets up the CUDA driver for each GPU it uses.
//!
//! Two defaults of cudarc (the driver layer under candle) cost time and buy nothing here,
//! because all the work on a GPU comes from one host thread through one stream (candle's
//! per-thread stream, `parse_device`), on which the trainer, the kernels and NCCL are ordered:
//! - event tracking: every allocation creates two CUDA events, for synchronising buffers
//!   shared between streams (recorded only once a second stream exists, which never happens
//!   here). Tracking is switched off: two driver calls fewer per allocation.
//! - the default memory pool's release threshold is 0: at every synchronisation (a host read
//!   of a scalar, the MoE routing's host copy) the pool hands all freed memory back to the
//!   driver, and the next allocations map it again. The threshold is raised to "never", so
//!   freed blocks are reused; `trim_pools` returns them on demand: before an NCCL
//!   communicator is made (NCCL allocates outside the pool) and before the memory log reads
//!   the driver's free memory (so its figures stay "memory in use").
//!
//! `DSA_CUDA_DEFAULTS=1` in the environment keeps cudarc's defaults (for side-by-side
//! measurements of this module).
//!
//! `set_tf32` (the recipe's `kernels.tf32`) lets cuBLAS run f32 matrix products on tensor
//! cores (TF32: inputs rounded to 10 mantissa bits, f32 accumulation), for bf16 models, whose
//! f32 products (the indexer's projections, the plain twins of the kernels) take bf16-valued
//! inputs or f32 intermediates that a bf16 kernel would round further; opt-in (measured
//! 1.00-1.05x side by side on an H200, docs/benchmarks.md), and never for the f32 runs that
//! must match the CPU. cuBLAS holds this setting per process, so the trainer sets it once.

use candle_core::Device;

/// Apply the settings above to a CUDA device just created (nothing on the CPU).
pub fn configure(device: &Device) -> candle_core::Result<()> {
    if std::env::var("DSA_CUDA_DEFAULTS").is_ok_and(|v| v == "1") {
        return Ok(());
    }
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        // SAFETY: every buffer of this device is used from one thread on its one stream
        // (module comment); no second stream is ever made.
        unsafe { d.disable_event_tracking() };
        // A pool that cannot be configured costs speed, not correctness: say so and go on.
        if let Err(e) = imp::keep_freed_memory(d) {
            crate::elog!("[cuda] the memory pool keeps returning freed memory to the driver ({e}); set DSA_CUDA_DEFAULTS=1 to silence this");
        }
    }
    let _ = device;
    Ok(())
}

/// TF32 for cuBLAS's f32 products on or off (module comment); nothing on the CPU.
pub fn set_tf32(device: &Device, on: bool) {
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        candle_core::cuda::set_gemm_reduced_precision_f32(on);
    }
    let _ = (device, on);
}

/// Return the memory the pools keep to the driver (after the device work has finished), so
/// that the driver's free-memory figure is the memory in use.
pub fn trim_pools() {
    #[cfg(feature = "cuda")]
    imp::trim();
}

/// The most memory the pools have had allocated at once since the last `reset_peak` (the
/// driver's high-water mark of the default pools, summed), in bytes; None without CUDA pools.
pub fn peak_bytes() -> Option<u64> {
    #[cfg(feature = "cuda")]
    return imp::peak();
    #[cfg(not(feature = "cuda"))]
    None
}

/// Start a new high-water mark for `peak_bytes`.
pub fn reset_peak() {
    #[cfg(feature = "cuda")]
    imp::reset_peak();
}

#[cfg(feature = "cuda")]
mod imp {
    use std::sync::Mutex;

    use candle_core::cuda_backend::cudarc::driver::sys;
    use candle_core::cuda_backend::CudaDevice;

    /// The default pools configured so far (raw CUmemoryPool handles as integers).
    static POOLS: Mutex<Vec<usize>> = Mutex::new(Vec::new());

    fn check(r: sys::CUresult, what: &str) -> candle_core::Result<()> {
        if r != sys::CUresult::CUDA_SUCCESS {
            candle_core::bail!("CUDA {what}: {r:?}");
        }
        Ok(())
    }

    pub fn keep_freed_memory(d: &CudaDevice) -> candle_core::Result<()> {
        let stream = d.cuda_stream();
        let dev = stream.context().cu_device();
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        let mut never: u64 = u64::MAX;
        // SAFETY: plain driver calls on a live device; `pool` and `never` outlive them.
        unsafe {
            check(
                sys::cuDeviceGetDefaultMemPool(&mut pool, dev),
                "default memory pool",
            )?;
            check(
                sys::cuMemPoolSetAttribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    &mut never as *mut u64 as *mut std::ffi::c_void,
                ),
                "memory pool release threshold",
            )?;
        }
        if let Ok(mut pools) = POOLS.lock() {
            if !pools.contains(&(pool as usize)) {
                pools.push(pool as usize);
            }
        }
        Ok(())
    }

    pub fn peak() -> Option<u64> {
        let pools = POOLS.lock().ok()?;
        if pools.is_empty() {
            return None;
        }
        let mut total = 0u64;
        for &p in pools.iter() {
            let mut v: u64 = 0;
            // SAFETY: p is a live default pool handle; v outlives the call.
            let r = unsafe {
                sys::cuMemPoolGetAttribute(
                    p as sys::CUmemoryPool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                    &mut v as *mut u64 as *mut std::ffi::c_void,
                )
            };
            if r != sys::CUresult::CUDA_SUCCESS {
                return None;
            }
            total += v;
        }
        Some(total)
    }

    pub fn reset_peak() {
        if let Ok(pools) = POOLS.lock() {
            for &p in pools.iter() {
                let mut zero: u64 = 0;
                // SAFETY: as in `peak`; setting the high-water mark to 0 is how the driver resets it.
                unsafe {
                    let _ = sys::cuMemPoolSetAttribute(
                        p as sys::CUmemoryPool,
                        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                        &mut zero as *mut u64 as *mut std::ffi::c_void,
                    );
                }
            }
        }
    }

    pub fn trim() {
        if let Ok(pools) = POOLS.lock() {
            for &p in pools.iter() {
                // SAFETY: p is a default pool handle from cuDeviceGetDefaultMemPool, valid for
                // the life of the process; trimming keeps blocks that are still allocated.
                unsafe {
                    let _ = sys::cuMemPoolTrimTo(p as sys::CUmemoryPool, 0);
                }
            }
        }
    }
}
