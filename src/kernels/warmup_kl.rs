//! Kernels of the dense warm-up stage (kernels/warmup_kl.cu).
//!
//! - `dense_attention_fwd`: dense causal attention (MHA mode) forward with the per-head
//!   log-sum-exp, bf16 in and out, on the tensor cores (forward only: the main model is frozen
//!   during warm-up).
//! - `warmup_kl`: the warm-up indexer loss `kl[t] = KL(p[t,:] || softmax(I[t,:]))` over the
//!   causal keys, where `p` is the head mean of the attention probabilities (recomputed from
//!   q, k and the forward's LSE) and `I[t,s] = sum_j w[t,j] ReLU(qi[t,j] . ki[s])`, together with
//!   the gradients of `g * sum_t kl[t]` into qi, w and ki. Streaming: no L x L tensor is ever
//!   stored and no workspace is allocated besides the outputs.
//!
//! Numerics (see the .cu header): bf16 tensor-core products with f32 accumulation; qi and ki
//! (f32) are rounded to bf16 when staged in shared memory (the plain twin keeps them f32), the
//! gradient operand `dI * w * 1[z > 0]` is rounded to bf16 for the dqi/dki products; softmaxes,
//! LSEs, the KL and dw are f32; masked entries (s > t, or s < start) are -inf / p = 0. The ReLU
//! gradient mask is strict (`> 0`). dki is accumulated with f32 atomics across query blocks
//! (summation order not deterministic); kl, dqi and dw are deterministic.
//!
//! - `dense_attention_bwd`: the dense causal attention's backward (dq, dk, dv in f32) from the
//!   forward's output and LSE, on the tensor cores, deterministic (each output row has one
//!   writer); the dense pre-training stage trains through it. Its plain twin is
//!   `model::dense_recompute::backward_blocks`.
//!
//! Plain twins (`dense_attention_fwd_plain`, `warmup_kl_plain`) are candle ops materialising
//! [B, H, T, T]: for tests and for shapes the kernels do not take (`supported`).
//!
//! Document masking: every function takes `starts`, None or u32 [B, T] (contiguous, on the
//! inputs' device): query t of sequence b then sees the keys start[b, t] ..= t only (the first
//! token of its document on), in the attention, its LSE, the KL's two softmaxes and every
//! gradient. None is start 0 everywhere (plain causal attention, bit for bit what all-zero
//! starts give). The caller guarantees start[b, t] <= t (`dsa::KeyStarts` checks it on the
//! host); the kernels read the starts but do not check them.

use candle_core::{DType, Device, Result, Tensor, Var, D};

/// Gradients and per-query loss of the warm-up KL.
pub struct WarmupKl {
    /// [B, T] f32: KL(p_t || softmax(I_t)) per query (not multiplied by g).
    pub kl: Tensor,
    /// [B, T, HI, DI] f32: d(g * sum kl) / d qi.
    pub dqi: Tensor,
    /// [B, T, HI] f32: d(g * sum kl) / d w.
    pub dw: Tensor,
    /// [B, T, DI] f32: d(g * sum kl) / d ki.
    pub dki: Tensor,
}

/// Dimensions the kernels take: DQK and DV multiples of 16 up to 256, 1 <= HI <= 64, DI a
/// multiple of 16 up to 128 (the 671B shape 192/128/64/128 and the tiny test models'
/// 48/32/4/32 both fit). Callers take the plain twins otherwise.
pub fn supported(dqk: usize, dv: usize, hi: usize, di: usize) -> bool {
    let m16 = |x: usize, max: usize| x >= 16 && x <= max && x.is_multiple_of(16);
    m16(dqk, 256) && m16(dv, 256) && (1..=64).contains(&hi) && m16(di, 128)
}

/// Dense causal attention forward: q, k [B, H, T, DQK] bf16, v [B, H, T, DV] bf16, scores
/// `scale * q.k`, starts None or u32 [B, T]. Returns out [B, H, T, DV] bf16 and lse [B, H, T]
/// f32 (natural log of the sum over the query's keys start <= s <= t of exp(scale * q.k)).
pub fn dense_attention_fwd(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    starts: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    {
        cuda::dense_attention_fwd(q, k, v, scale, starts)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (q, k, v, scale, starts);
        candle_core::bail!(
            "dense_attention_fwd kernel needs the `cuda` feature (use dense_attention_fwd_plain)"
        )
    }
}

/// Head dims the backward kernel takes: DQK and DV multiples of 16 with DQK <= 192 and
/// DV <= 128 (its register budget: dk and dv accumulators of (DQKP + DVP) / 2 floats per
/// thread; the 671B shape is 192 + 128).
pub fn backward_supported(dqk: usize, dv: usize) -> bool {
    let m16 = |x: usize, max: usize| x >= 16 && x <= max && x.is_multiple_of(16);
    m16(dqk, 192) && m16(dv, 128)
}

/// (DQKP, DVP): the instantiated padded head dims of kernels/warmup_kl.cu's DENSE_BWD.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn bwd_padded(dqk: usize, dv: usize) -> Option<(usize, usize)> {
    let dqkp = [64usize, 128, 192].into_iter().find(|&p| dqk <= p)?;
    let dvp = [32usize, 64, 128].into_iter().find(|&p| dv <= p)?;
    Some((dqkp, dvp))
}

/// Dense causal attention backward: q, k [B, H, T, DQK], v [B, H, T, DV], the forward's out
/// [B, H, T, DV] and lse [B, H, T] (natural log, f32), the output gradient dout [B, H, T, DV];
/// q, k, v, dout bf16; starts None or u32 [B, T], the forward's. Returns (dq, dk, dv) in f32,
/// bitwise repeatable run to run. delta = rowsum(dout * out) is computed here in f32 from the
/// bf16 out and dout.
#[allow(clippy::too_many_arguments)]
pub fn dense_attention_bwd(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    dout: &Tensor,
    scale: f64,
    starts: Option<&Tensor>,
) -> Result<(Tensor, Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    {
        let delta = (dout.to_dtype(DType::F32)? * out.to_dtype(DType::F32)?)?.sum(D::Minus1)?; // [B, H, T]
        cuda::dense_attention_bwd(q, k, v, dout, lse, &delta, scale, starts)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (q, k, v, out, lse, dout, scale, starts);
        candle_core::bail!("dense_attention_bwd kernel needs the `cuda` feature (use dense_recompute::backward_blocks)")
    }
}

/// Streaming warm-up KL and its indexer gradients. q, k [B, H, T, DQK] bf16 and lse [B, H, T]
/// f32 (from `dense_attention_fwd` with the same `scale` and `starts`); qi [B, T, HI, DI],
/// w [B, T, HI], ki [B, T, DI] f32; `g` weighs the loss whose gradients are returned
/// (g * sum_t kl[t]); starts None or u32 [B, T]: both softmaxes run over the query's keys.
#[allow(clippy::too_many_arguments)]
pub fn warmup_kl(
    q: &Tensor,
    k: &Tensor,
    lse: &Tensor,
    scale: f64,
    qi: &Tensor,
    w: &Tensor,
    ki: &Tensor,
    g: f64,
    starts: Option<&Tensor>,
) -> Result<WarmupKl> {
    #[cfg(feature = "cuda")]
    {
        cuda::warmup_kl(q, k, lse, scale, qi, w, ki, g, starts)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (q, k, lse, scale, qi, w, ki, g, starts);
        candle_core::bail!("warmup_kl kernel needs the `cuda` feature (use warmup_kl_plain)")
    }
}

/// Plain twin of `dense_attention_fwd` (candle ops, f32 softmax, [B, H, T, T] scores):
/// out [B, H, T, DV] in f32 (cast as needed) and lse [B, H, T] f32.
pub fn dense_attention_fwd_plain(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    starts: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let scores = scaled_causal_scores(q, k, scale, starts)?;
    let lse = crate::ops::logsumexp_last(&scores)?.squeeze(D::Minus1)?;
    let out = crate::ops::softmax_last(&scores)?.matmul(&v.to_dtype(DType::F32)?.contiguous()?)?;
    Ok((out, lse))
}

/// Plain twin of `warmup_kl`: head-mean dense probabilities, dense indexer scores with the
/// causal (or document) bias, `losses::kl_rows`, autograd (all f32, qi/ki not rounded).
/// Materialises [B, H, T, T] and [B, T * HI, T]: small T only.
#[allow(clippy::too_many_arguments)]
pub fn warmup_kl_plain(
    q: &Tensor,
    k: &Tensor,
    scale: f64,
    qi: &Tensor,
    w: &Tensor,
    ki: &Tensor,
    g: f64,
    starts: Option<&Tensor>,
) -> Result<WarmupKl> {
    let (_, _, t, _) = q.dims4()?;
    let bias = key_bias(t, starts, q.device())?; // [T, T] or [B, T, T], as the scores [B, T, T]
    let p = crate::ops::softmax_last(&scaled_causal_scores(q, k, scale, starts)?)?
        .mean(1)?
        .detach(); // [B, T, T]
    let qv = Var::from_tensor(&qi.to_dtype(DType::F32)?.contiguous()?)?;
    let wv = Var::from_tensor(&w.to_dtype(DType::F32)?.contiguous()?)?;
    let kv = Var::from_tensor(&ki.to_dtype(DType::F32)?.contiguous()?)?;
    let proj = crate::model::indexer::IndexerProj {
        q: qv.as_tensor().clone(),
        k: kv.as_tensor().clone(),
        w: wv.as_tensor().clone(),
    };
    let kl = crate::losses::kl_rows(&p, &proj.scores(&bias)?)?; // [B, T]
    let grads = (kl.sum_all()? * g)?.backward()?;
    let get = |v: &Var| -> Result<Tensor> {
        match grads.get(v.as_tensor()) {
            Some(x) => Ok(x.detach()),
            None => v.as_tensor().zeros_like(),
        }
    };
    Ok(WarmupKl {
        kl: kl.detach(),
        dqi: get(&qv)?,
        dw: get(&wv)?,
        dki: get(&kv)?,
    })
}

/// The mask bias of the plain twins: causal [T, T] without starts, else [B, T, T] (0 where
/// start[b, t] <= s <= t, `dsa::MASKED` elsewhere).
fn key_bias(t: usize, starts: Option<&Tensor>, device: &Device) -> Result<Tensor> {
    if let Some(st) = starts {
        if st.dtype() != DType::U32 || st.rank() != 2 || st.dim(1)? != t {
            candle_core::bail!(
                "dense attention: key starts {:?} {:?} must be u32 [B, {t}]",
                st.dims(),
                st.dtype()
            );
        }
    }
    crate::dsa::key_bias_rows(0, t, t, starts, device)
}

/// scale * q k^T + mask bias (`dsa::MASKED` above the diagonal and, with starts, before each
/// query's first key), f32 [B, H, T, T].
fn scaled_causal_scores(
    q: &Tensor,
    k: &Tensor,
    scale: f64,
    starts: Option<&Tensor>,
) -> Result<Tensor> {
    let (_, _, t, _) = q.dims4()?;
    if k.dims() != q.dims() {
        candle_core::bail!(
            "dense attention: k {:?} must have the shape of q {:?}",
            k.shape(),
            q.shape()
        );
    }
    let bias = key_bias(t, starts, q.device())?;
    // [B, T, T] broadcasts over the heads as [B, 1, T, T].
    let bias = if bias.rank() == 3 {
        bias.unsqueeze(1)?
    } else {
        bias
    };
    let q32 = q.to_dtype(DType::F32)?.contiguous()?;
    let k32 = k.to_dtype(DType::F32)?.contiguous()?;
    (q32.matmul(&k32.t()?)? * scale)?.broadcast_add(&bias)
}

/// Free device memory in bytes (cudarc's mem_get_info), for memory checks.
pub fn device_free_bytes(dev: &Device) -> Result<usize> {
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda_backend::WrapErr;
        let (free, _) = dev
            .as_cuda_device()?
            .cuda_stream()
            .context()
            .mem_get_info()
            .w()?;
        Ok(free)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = dev;
        candle_core::bail!("device_free_bytes needs the `cuda` feature")
    }
}

use crate::profile::time_median;

/// `bench kernels` lines at sequence length `l`, the 671B shape: B 1, H 128, DQK 192, DV 128,
/// indexer HI 64 x DI 128, softmax scale 192^-1/2 * mscale^2.
/// FLOP counts, with pairs = L (L + 1) / 2 causal (query, key) pairs:
/// - attention forward: 2 * H * (DQK + DV) * pairs (QK^T and PV);
/// - attention backward: 2 * H * (3 DQK + 2 DV) * pairs (FlashAttention-2's count: QK^T, dO V^T,
///   P^T dO, dS K, dS^T Q); the deterministic two-kernel form executes QK^T and dO V^T twice;
/// - warm-up KL: (2 * H * DQK + 5 * 2 * HI * DI) * pairs: the attention QK^T recomputed once,
///   and five indexer-sized products per pair (pass 1: logits; pass 2: logits, the logits again
///   for the ReLU mask, dqi, dki). Exponentials and element-wise work are not counted.
/// Extra memory of warmup_kl: measured with mem_get_info before and after the call (minus its
/// outputs), beside the computed figure (the kernel allocates nothing besides the outputs).
pub fn bench(dev: &Device, l: usize) -> anyhow::Result<Vec<String>> {
    if !dev.is_cuda() || !cfg!(feature = "cuda") {
        anyhow::bail!("the warm-up kernels bench needs a CUDA device and a --features cuda build");
    }
    let (b, h, dqk, dv, hi, di) = (1usize, 128usize, 192usize, 128usize, 64usize, 128usize);
    let mscale = 0.1 * 40f64.ln() + 1.0;
    let scale = (dqk as f64).powf(-0.5) * mscale * mscale;
    let bf = |shape: &[usize]| -> Result<Tensor> {
        Tensor::randn(0f32, 1f32, shape, dev)?.to_dtype(DType::BF16)
    };
    let q = bf(&[b, h, l, dqk])?;
    let k = bf(&[b, h, l, dqk])?;
    let v = bf(&[b, h, l, dv])?;
    let pairs = b as f64 * l as f64 * (l as f64 + 1.0) / 2.0;
    let reps = if l >= 65536 { 2 } else { 5 };
    let mut lines = vec![];
    let ta = time_median(dev, reps, || {
        dense_attention_fwd(&q, &k, &v, scale, None)?;
        Ok(())
    })?;
    let f_attn = 2.0 * h as f64 * (dqk + dv) as f64 * pairs;
    lines.push(format!(
        "dense causal attention fwd (B {b}, H {h}, dqk {dqk}, dv {dv}, bf16): {:.2} ms = {:.1} TFLOP/s (2 H (dqk+dv) x causal pairs)",
        ta * 1e3, f_attn / ta / 1e12
    ));
    let (o, lse) = dense_attention_fwd(&q, &k, &v, scale, None)?;
    let dout = bf(&[b, h, l, dv])?;
    let tb = time_median(dev, reps, || {
        dense_attention_bwd(&q, &k, &v, &o, &lse, &dout, scale, None)?;
        Ok(())
    })?;
    let f_bwd = 2.0 * h as f64 * (3 * dqk + 2 * dv) as f64 * pairs;
    let f_exec = 2.0 * h as f64 * (4 * dqk + 3 * dv) as f64 * pairs;
    lines.push(format!(
        "dense causal attention bwd (dq, dk, dv; deterministic): {:.2} ms = {:.1} TFLOP/s (2 H (3 dqk + 2 dv) x causal pairs; \
         {:.1} TFLOP/s executed, 2 H (4 dqk + 3 dv): q.k and dout.v are computed twice)",
        tb * 1e3, f_bwd / tb / 1e12, f_exec / tb / 1e12
    ));
    drop((v, o, dout));
    let qi = Tensor::randn(0f32, 1f32, (b, l, hi, di), dev)?;
    let w = (Tensor::randn(0f32, 1f32, (b, l, hi), dev)? * ((hi * di) as f64).powf(-0.5))?;
    let ki = Tensor::randn(0f32, 1f32, (b, l, di), dev)?;
    let g = 1.0 / l as f64;
    dev.synchronize()?;
    let free0 = device_free_bytes(dev)?;
    let r = warmup_kl(&q, &k, &lse, scale, &qi, &w, &ki, g, None)?;
    dev.synchronize()?;
    let free1 = device_free_bytes(dev)?;
    let outputs =
        4 * (r.kl.elem_count() + r.dqi.elem_count() + r.dw.elem_count() + r.dki.elem_count());
    let kl_mean = r.kl.mean_all()?.to_scalar::<f32>()?;
    drop(r);
    let extra = free0.saturating_sub(free1).saturating_sub(outputs);
    let tk = time_median(dev, reps, || {
        warmup_kl(&q, &k, &lse, scale, &qi, &w, &ki, g, None)?;
        Ok(())
    })?;
    let f_kl = (2.0 * h as f64 * dqk as f64 + 5.0 * 2.0 * (hi * di) as f64) * pairs;
    let mib = |x: usize| x as f64 / (1u64 << 20) as f64;
    lines.push(format!(
        "warm-up KL + indexer grads (H {h}, dqk {dqk}, HI {hi}, DI {di}): {:.2} ms = {:.1} TFLOP/s \
         ((2 H dqk + 5 x 2 HI DI) x causal pairs); extra device memory measured {:.1} MiB beyond {:.1} MiB of outputs \
         (computed: 0, no workspace); mean kl {kl_mean:.4}",
        tk * 1e3, f_kl / tk / 1e12, mib(extra), mib(outputs)
    ));
    Ok(lines)
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaFunction, CudaView, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
    use candle_core::op::BackpropOp;
    use candle_core::{bail, CudaStorage, DType, Layout, Result, Shape, Storage, Tensor};
    use half::bf16;

    use super::WarmupKl;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/warmup_kl.ptx"));
    const MODULE: &str = "dsa_warmup_kl";
    // Tile constants of kernels/warmup_kl.cu.
    const FA_BM: usize = 64;
    const FA_BN: usize = 64;
    const FA_THREADS: u32 = 128;
    const BW_BK: usize = 64;
    const BW_BQ: usize = 32;
    const BW_THREADS: u32 = 128;
    const KL_BM: usize = 128;
    const KL_BC: usize = 64;
    const KL_THREADS: u32 = 256;

    fn load(dev: &CudaDevice, name: &str, smem: usize) -> Result<CudaFunction> {
        crate::kernels::cuda::load_from(dev, MODULE, PTX, name, smem)
    }

    fn smem_limit(dev: &CudaDevice) -> Result<usize> {
        let n = dev
            .cuda_stream()
            .context()
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .w()?;
        Ok(n.max(0) as usize)
    }

    /// On the GPU, of `dtype`, contiguous, and starting at a 16-byte boundary (the kernels read
    /// 16-byte vectors); copies only when needed.
    fn prep(t: &Tensor, dtype: DType, what: &str) -> Result<Tensor> {
        if t.dtype() != dtype {
            bail!(
                "warmup_kl kernels: {what} must be {dtype:?}, got {:?} (shape {:?})",
                t.dtype(),
                t.shape()
            );
        }
        if !t.device().is_cuda() {
            bail!("warmup_kl kernels: {what} is not on a CUDA device (use the plain twin)");
        }
        let t = t.contiguous()?;
        if t.layout().start_offset() % (16 / dtype.size_in_bytes()) != 0 {
            return t.affine(1.0, 0.0); // a fresh, aligned buffer (x * 1 + 0 is exact)
        }
        Ok(t)
    }

    fn view<'a, T: CudaDType>(st: &'a Storage, l: &Layout, what: &str) -> Result<CudaView<'a, T>> {
        match st {
            Storage::Cuda(s) => Ok(s.as_cuda_slice::<T>()?.slice(l.start_offset()..)),
            _ => bail!("warmup_kl kernels: {what} is not on a CUDA device"),
        }
    }

    fn wrap<T: CudaDType>(
        s: candle_core::cuda_backend::cudarc::driver::CudaSlice<T>,
        dev: &CudaDevice,
        shape: impl Into<Shape>,
    ) -> Tensor {
        Tensor::from_storage(
            Storage::Cuda(CudaStorage::wrap_cuda_slice(s, dev.clone())),
            shape,
            BackpropOp::none(),
            false,
        )
    }

    /// Key starts u32 [b, t], contiguous, on q's device: checked, not copied.
    fn check_starts(starts: Option<&Tensor>, q: &Tensor, b: usize, t: usize) -> Result<()> {
        let Some(st) = starts else {
            return Ok(());
        };
        if st.dtype() != DType::U32
            || st.dims() != [b, t]
            || !st.is_contiguous()
            || !st.device().same_device(q.device())
        {
            bail!(
                "warmup_kl kernels: key starts {:?} {:?} (contiguous: {}) must be contiguous u32 [{b}, {t}] on the inputs' device",
                st.dims(),
                st.dtype(),
                st.is_contiguous()
            );
        }
        Ok(())
    }

    /// Pushes the starts' device pointer, or a null pointer (every start 0) for None.
    fn push_starts<'a>(
        lb: &mut candle_core::cuda_backend::cudarc::driver::LaunchArgs<'a>,
        starts: &'a Option<CudaView<'a, u32>>,
    ) {
        match starts {
            Some(v) => lb.arg(v),
            None => lb.arg(&0u64),
        };
    }

    fn check_i32(x: usize, what: &str) -> Result<i32> {
        i32::try_from(x).map_err(|_| {
            candle_core::Error::Msg(format!(
                "warmup_kl kernels: {what} = {x} does not fit in i32"
            ))
        })
    }

    pub fn dense_attention_fwd(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f64,
        starts: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let (b, h, t, dqk) = q.dims4()?;
        let (bv, hv, tv, dv) = v.dims4()?;
        if k.dims() != q.dims() || (bv, hv, tv) != (b, h, t) || t == 0 || b == 0 || h == 0 {
            bail!("dense_attention_fwd: q {:?}, k {:?}, v {:?} do not fit ([B, H, T, DQK], same, [B, H, T, DV], T > 0)", q.shape(), k.shape(), v.shape());
        }
        check_starts(starts, q, b, t)?;
        if !(dqk % 16 == 0 && (16..=256).contains(&dqk) && dv % 16 == 0 && (16..=256).contains(&dv))
            || b > 65535
            || h > 65535
        {
            bail!("dense_attention_fwd: q {:?} / v {:?}: needs DQK, DV multiples of 16 in 16..=256 and B, H <= 65535", q.shape(), v.shape());
        }
        let (q, k, v) = (
            prep(q, DType::BF16, "q")?,
            prep(k, DType::BF16, "k")?,
            prep(v, DType::BF16, "v")?,
        );
        let dev = q.device().as_cuda_device()?.clone();
        let dvp = [32usize, 64, 128, 256]
            .into_iter()
            .find(|&p| dv <= p)
            .unwrap_or(256);
        let smem = (FA_BM * (dqk + 8) + 2 * FA_BN * (dqk + 8) + 2 * FA_BN * (dv + 8)) * 2;
        if smem > smem_limit(&dev)? {
            bail!("dense_attention_fwd: DQK {dqk} / DV {dv} need {smem} bytes of shared memory, more than the device has");
        }
        let f = load(&dev, &format!("dense_attn_fwd_dv{dvp}"), smem)?;
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let qv = view::<bf16>(&qs, ql, "q")?;
        let kv = view::<bf16>(&ks, kl, "k")?;
        let vv = view::<bf16>(&vs, vl, "v")?;
        let st_guard = starts.map(|st| st.storage_and_layout());
        let sv = match &st_guard {
            Some((ss, sl)) => Some(view::<u32>(ss, sl, "starts")?),
            None => None,
        };
        let mut out = dev.alloc_zeros::<bf16>(b * h * t * dv)?;
        let mut lse = dev.alloc_zeros::<f32>(b * h * t)?;
        let (t32, h32, dqk32, dv32) = (check_i32(t, "T")?, h as i32, dqk as i32, dv as i32);
        let scale_log2 = (scale * std::f64::consts::LOG2_E) as f32;
        let cfg = LaunchConfig {
            grid_dim: (t.div_ceil(FA_BM) as u32, h as u32, b as u32),
            block_dim: (FA_THREADS, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let stream = dev.cuda_stream();
        let mut lb = stream.launch_builder(&f);
        lb.arg(&qv).arg(&kv).arg(&vv);
        push_starts(&mut lb, &sv);
        lb.arg(&mut out)
            .arg(&mut lse)
            .arg(&t32)
            .arg(&h32)
            .arg(&dqk32)
            .arg(&dv32)
            .arg(&scale_log2);
        // SAFETY: q, k are [B, H, T, DQK] and v [B, H, T, DV] contiguous bf16 starting 16-byte
        // aligned (checked above), starts (if any) contiguous u32 [B, T]; out and lse are fresh
        // buffers of B H T DV and B H T elements; the launch is on candle's stream, ordered with
        // its other work.
        unsafe { lb.launch(cfg) }.w()?;
        drop(lb);
        Ok((wrap(out, &dev, (b, h, t, dv)), wrap(lse, &dev, (b, h, t))))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn dense_attention_bwd(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        dout: &Tensor,
        lse: &Tensor,
        delta: &Tensor,
        scale: f64,
        starts: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, h, t, dqk) = q.dims4()?;
        let (bv, hv, tv, dv) = v.dims4()?;
        let shapes = || {
            format!(
                "q {:?}, k {:?}, v {:?}, dout {:?}, lse {:?}",
                q.shape(),
                k.shape(),
                v.shape(),
                dout.shape(),
                lse.shape()
            )
        };
        if k.dims() != q.dims()
            || (bv, hv, tv) != (b, h, t)
            || dout.dims() != v.dims()
            || lse.dims() != [b, h, t]
            || delta.dims() != [b, h, t]
            || t == 0
            || b == 0
            || h == 0
        {
            bail!("dense_attention_bwd: {} do not fit ([B, H, T, DQK], same, [B, H, T, DV], same, [B, H, T], T > 0)", shapes());
        }
        let Some((dqkp, dvp)) = super::bwd_padded(dqk, dv)
            .filter(|_| super::backward_supported(dqk, dv) && b <= 65535 && h <= 65535)
        else {
            bail!("dense_attention_bwd: {}: needs DQK <= 192, DV <= 128, multiples of 16, and B, H <= 65535", shapes());
        };
        check_starts(starts, q, b, t)?;
        let (q, k, v, dout) = (
            prep(q, DType::BF16, "q")?,
            prep(k, DType::BF16, "k")?,
            prep(v, DType::BF16, "v")?,
            prep(dout, DType::BF16, "dout")?,
        );
        let (lse, delta) = (
            prep(lse, DType::F32, "lse")?,
            prep(delta, DType::F32, "delta")?,
        );
        let dev = q.device().as_cuda_device()?.clone();
        let (sq, sv) = (dqk + 8, dv + 8);
        let smem_kv = (BW_BK * (sq + sv) + 2 * BW_BQ * (sq + sv)) * 2;
        let smem_q = (FA_BM * (sq + sv) + 2 * FA_BN * (sq + sv)) * 2;
        if smem_kv.max(smem_q) > smem_limit(&dev)? {
            bail!("dense_attention_bwd: DQK {dqk} / DV {dv} need {} bytes of shared memory, more than the device has", smem_kv.max(smem_q));
        }
        let f_kv = load(&dev, &format!("dense_attn_bwd_dkdv_{dqkp}_{dvp}"), smem_kv)?;
        let f_q = load(&dev, &format!("dense_attn_bwd_dq_{dqkp}_{dvp}"), smem_q)?;
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (ds, dl) = dout.storage_and_layout();
        let (ls, ll) = lse.storage_and_layout();
        let (es, el) = delta.storage_and_layout();
        let qv = view::<bf16>(&qs, ql, "q")?;
        let kv = view::<bf16>(&ks, kl, "k")?;
        let vv = view::<bf16>(&vs, vl, "v")?;
        let dov = view::<bf16>(&ds, dl, "dout")?;
        let lv = view::<f32>(&ls, ll, "lse")?;
        let ev = view::<f32>(&es, el, "delta")?;
        let st_guard = starts.map(|st| st.storage_and_layout());
        let sv = match &st_guard {
            Some((ss, sl)) => Some(view::<u32>(ss, sl, "starts")?),
            None => None,
        };
        // Every element is written exactly once (rows below T, all DQK / DV columns: multiples
        // of 16), never accumulated into, so the buffers need no zeroing.
        // SAFETY: uninitialised device memory that the kernels overwrite in full before any read.
        let (mut dq, mut dk, mut dvv) = unsafe {
            (
                dev.alloc::<f32>(b * h * t * dqk)?,
                dev.alloc::<f32>(b * h * t * dqk)?,
                dev.alloc::<f32>(b * h * t * dv)?,
            )
        };
        let (t32, h32, dqk32, dv32) = (check_i32(t, "T")?, h as i32, dqk as i32, dv as i32);
        let scale32 = scale as f32;
        let scale_log2 = (scale * std::f64::consts::LOG2_E) as f32;
        let stream = dev.cuda_stream();
        let cfg_kv = LaunchConfig {
            grid_dim: (t.div_ceil(BW_BK) as u32, h as u32, b as u32),
            block_dim: (BW_THREADS, 1, 1),
            shared_mem_bytes: smem_kv as u32,
        };
        let mut lb = stream.launch_builder(&f_kv);
        lb.arg(&qv).arg(&kv).arg(&vv).arg(&dov).arg(&lv).arg(&ev);
        push_starts(&mut lb, &sv);
        lb.arg(&mut dk).arg(&mut dvv);
        lb.arg(&t32)
            .arg(&h32)
            .arg(&dqk32)
            .arg(&dv32)
            .arg(&scale32)
            .arg(&scale_log2);
        // SAFETY: q, k [B, H, T, DQK], v and dout [B, H, T, DV] bf16, lse and delta [B, H, T]
        // f32, all contiguous and 16-byte aligned (checked above), starts (if any) contiguous
        // u32 [B, T]; dk, dv fresh buffers of the
        // sizes the kernel indexes; candle's stream orders the launch with its other work.
        unsafe { lb.launch(cfg_kv) }.w()?;
        drop(lb);
        let cfg_q = LaunchConfig {
            grid_dim: (t.div_ceil(FA_BM) as u32, h as u32, b as u32),
            block_dim: (BW_THREADS, 1, 1),
            shared_mem_bytes: smem_q as u32,
        };
        let mut lb = stream.launch_builder(&f_q);
        lb.arg(&qv).arg(&kv).arg(&vv).arg(&dov).arg(&lv).arg(&ev);
        push_starts(&mut lb, &sv);
        lb.arg(&mut dq);
        lb.arg(&t32)
            .arg(&h32)
            .arg(&dqk32)
            .arg(&dv32)
            .arg(&scale32)
            .arg(&scale_log2);
        // SAFETY: as above; dq is a fresh buffer of B H T DQK f32.
        unsafe { lb.launch(cfg_q) }.w()?;
        drop(lb);
        Ok((
            wrap(dq, &dev, (b, h, t, dqk)),
            wrap(dk, &dev, (b, h, t, dqk)),
            wrap(dvv, &dev, (b, h, t, dv)),
        ))
    }

    /// Dynamic shared memory of warmup_kl_bf16 with `nbuf` attention buffers (mirror of kl_carve).
    fn kl_smem(dqk: usize, di: usize, hi: usize, nbuf: usize) -> usize {
        let (sq, si) = (dqk + 8, di + 8);
        let region_a = nbuf * (KL_BM + KL_BC) * sq * 2;
        let region_b = KL_BM * di * 4 + KL_BM * si * 2 + KL_BM * (KL_BC + 8) * 2;
        region_a.max(region_b) + KL_BC * si * 2 + KL_BM * hi * 4
    }

    #[allow(clippy::too_many_arguments)]
    pub fn warmup_kl(
        q: &Tensor,
        k: &Tensor,
        lse: &Tensor,
        scale: f64,
        qi: &Tensor,
        w: &Tensor,
        ki: &Tensor,
        g: f64,
        starts: Option<&Tensor>,
    ) -> Result<WarmupKl> {
        let (b, h, t, dqk) = q.dims4()?;
        let shapes = || {
            format!(
                "q {:?}, k {:?}, lse {:?}, qi {:?}, w {:?}, ki {:?}",
                q.shape(),
                k.shape(),
                lse.shape(),
                qi.shape(),
                w.shape(),
                ki.shape()
            )
        };
        if qi.rank() != 4 || w.rank() != 3 || ki.rank() != 3 || lse.rank() != 3 {
            bail!("warmup_kl: expects q, k [B, H, T, DQK], lse [B, H, T], qi [B, T, HI, DI], w [B, T, HI], ki [B, T, DI]; got {}", shapes());
        }
        let (hi, di) = (qi.dim(2)?, qi.dim(3)?);
        let fits = k.dims() == q.dims()
            && lse.dims() == [b, h, t]
            && qi.dims() == [b, t, hi, di]
            && w.dims() == [b, t, hi]
            && ki.dims() == [b, t, di]
            && t > 0
            && b > 0
            && h > 0
            && b <= 65535
            && dqk % 16 == 0
            && (16..=256).contains(&dqk)
            && (1..=64).contains(&hi)
            && di % 16 == 0
            && (16..=128).contains(&di);
        if !fits {
            bail!("warmup_kl: {} do not fit (DQK a multiple of 16 <= 256, 1 <= HI <= 64, DI a multiple of 16 <= 128, T > 0)", shapes());
        }
        check_starts(starts, q, b, t)?;
        let q = prep(q, DType::BF16, "q")?;
        let k = prep(k, DType::BF16, "k")?;
        let lse = prep(lse, DType::F32, "lse")?;
        let qi = prep(qi, DType::F32, "qi")?;
        let w = prep(w, DType::F32, "w")?;
        let ki = prep(ki, DType::F32, "ki")?;
        let dev = q.device().as_cuda_device()?.clone();
        let limit = smem_limit(&dev)?;
        let nbuf = if kl_smem(dqk, di, hi, 2) <= limit {
            2
        } else {
            1
        };
        let smem = kl_smem(dqk, di, hi, nbuf);
        if smem > limit {
            bail!("warmup_kl: DQK {dqk}, HI {hi}, DI {di} need {smem} bytes of shared memory, the device allows {limit}");
        }
        let f = load(&dev, "warmup_kl_bf16", smem)?;
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl_) = k.storage_and_layout();
        let (ls, ll) = lse.storage_and_layout();
        let (qis, qil) = qi.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (kis, kil) = ki.storage_and_layout();
        let qv = view::<bf16>(&qs, ql, "q")?;
        let kv = view::<bf16>(&ks, kl_, "k")?;
        let lv = view::<f32>(&ls, ll, "lse")?;
        let qiv = view::<f32>(&qis, qil, "qi")?;
        let wv = view::<f32>(&ws, wl, "w")?;
        let kiv = view::<f32>(&kis, kil, "ki")?;
        let st_guard = starts.map(|st| st.storage_and_layout());
        let sv = match &st_guard {
            Some((ss, sl)) => Some(view::<u32>(ss, sl, "starts")?),
            None => None,
        };
        // All outputs start at zero: dqi and dki are accumulated into (dki with atomics).
        let mut kl = dev.alloc_zeros::<f32>(b * t)?;
        let mut dqi = dev.alloc_zeros::<f32>(b * t * hi * di)?;
        let mut dw = dev.alloc_zeros::<f32>(b * t * hi)?;
        let mut dki = dev.alloc_zeros::<f32>(b * t * di)?;
        let (t32, h32, dqk32, hi32, di32, nbuf32) = (
            check_i32(t, "T")?,
            check_i32(h, "H")?,
            dqk as i32,
            hi as i32,
            di as i32,
            nbuf as i32,
        );
        let scale_log2 = (scale * std::f64::consts::LOG2_E) as f32;
        let g32 = g as f32;
        let cfg = LaunchConfig {
            grid_dim: (t.div_ceil(KL_BM) as u32, b as u32, 1),
            block_dim: (KL_THREADS, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let stream = dev.cuda_stream();
        let mut lb = stream.launch_builder(&f);
        lb.arg(&qv).arg(&kv).arg(&lv).arg(&qiv).arg(&wv).arg(&kiv);
        push_starts(&mut lb, &sv);
        lb.arg(&mut kl).arg(&mut dqi).arg(&mut dw).arg(&mut dki);
        lb.arg(&t32)
            .arg(&h32)
            .arg(&dqk32)
            .arg(&hi32)
            .arg(&di32)
            .arg(&scale_log2)
            .arg(&g32)
            .arg(&nbuf32);
        // SAFETY: every input is contiguous, of the checked shape and dtype, 16-byte aligned
        // (starts, if any, contiguous u32 [B, T]); the outputs are fresh zeroed buffers of the sizes the kernel indexes; candle's stream.
        unsafe { lb.launch(cfg) }.w()?;
        drop(lb);
        Ok(WarmupKl {
            kl: wrap(kl, &dev, (b, t)),
            dqi: wrap(dqi, &dev, (b, t, hi, di)),
            dw: wrap(dw, &dev, (b, t, hi)),
            dki: wrap(dki, &dev, (b, t, di)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain twins against direct f64 loops over the maths of the module doc (the CUDA
    /// kernels are compared with the twins by `gpu-selftest`).
    #[test]
    fn plain_twins_match_f64_loops() {
        let dev = Device::Cpu;
        let (b, h, t, dqk, dv, hi, di) = (2usize, 3usize, 9usize, 8usize, 4usize, 3usize, 5usize);
        let (scale, g) = (0.4, 0.7);
        let r = |shape: &[usize], seed: u64| crate::rng::randn(shape, seed, 1.0, &dev).unwrap();
        let (q, k, v) = (
            r(&[b, h, t, dqk], 1),
            r(&[b, h, t, dqk], 2),
            r(&[b, h, t, dv], 3),
        );
        let (qi, w, ki) = (r(&[b, t, hi, di], 4), r(&[b, t, hi], 5), r(&[b, t, di], 6));
        let (out, lse) = dense_attention_fwd_plain(&q, &k, &v, scale, None).unwrap();
        let res = warmup_kl_plain(&q, &k, scale, &qi, &w, &ki, g, None).unwrap();
        let f = |x: &Tensor| -> Vec<f64> {
            x.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .into_iter()
                .map(f64::from)
                .collect()
        };
        let (q, k, v, qi, w, ki) = (f(&q), f(&k), f(&v), f(&qi), f(&w), f(&ki));
        let (out, lse, kl, dqi, dw, dki) = (
            f(&out),
            f(&lse),
            f(&res.kl),
            f(&res.dqi),
            f(&res.dw),
            f(&res.dki),
        );
        let close = |a: f64, e: f64, what: &str| {
            assert!(
                (a - e).abs() <= 1e-4 * (1.0 + e.abs()),
                "{what}: {a} vs {e}"
            )
        };
        let mut gdqi = vec![0.0; dqi.len()];
        let mut gdw = vec![0.0; dw.len()];
        let mut gdki = vec![0.0; dki.len()];
        for bb in 0..b {
            for tt in 0..t {
                let mut p = vec![0.0; tt + 1];
                for hh in 0..h {
                    let base = (bb * h + hh) * t;
                    let a: Vec<f64> = (0..=tt)
                        .map(|s| {
                            (0..dqk)
                                .map(|d| q[(base + tt) * dqk + d] * k[(base + s) * dqk + d])
                                .sum::<f64>()
                                * scale
                        })
                        .collect();
                    let m = a.iter().cloned().fold(f64::MIN, f64::max);
                    let z: f64 = a.iter().map(|x| (x - m).exp()).sum();
                    close(lse[base + tt], m + z.ln(), "lse");
                    for d in 0..dv {
                        let o: f64 = (0..=tt)
                            .map(|s| (a[s] - m).exp() / z * v[(base + s) * dv + d])
                            .sum();
                        close(out[(base + tt) * dv + d], o, "out");
                    }
                    for s in 0..=tt {
                        p[s] += (a[s] - m).exp() / z / h as f64;
                    }
                }
                let row = bb * t + tt;
                let zq = |j: usize, s: usize| {
                    (0..di)
                        .map(|d| qi[(row * hi + j) * di + d] * ki[(bb * t + s) * di + d])
                        .sum::<f64>()
                };
                let logits: Vec<f64> = (0..=tt)
                    .map(|s| (0..hi).map(|j| w[row * hi + j] * zq(j, s).max(0.0)).sum())
                    .collect();
                let m = logits.iter().cloned().fold(f64::MIN, f64::max);
                let lz = m + logits.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
                let expect: f64 = (0..=tt)
                    .filter(|&s| p[s] > 0.0)
                    .map(|s| p[s] * (p[s].ln() - (logits[s] - lz)))
                    .sum();
                close(kl[row], expect, "kl");
                for s in 0..=tt {
                    let d_i = g * ((logits[s] - lz).exp() - p[s]);
                    for j in 0..hi {
                        let z = zq(j, s);
                        if z <= 0.0 {
                            continue;
                        }
                        gdw[row * hi + j] += d_i * z;
                        for d in 0..di {
                            gdqi[(row * hi + j) * di + d] +=
                                d_i * w[row * hi + j] * ki[(bb * t + s) * di + d];
                            gdki[(bb * t + s) * di + d] +=
                                d_i * w[row * hi + j] * qi[(row * hi + j) * di + d];
                        }
                    }
                }
            }
        }
        for (got, want, what) in [
            (&dqi, &gdqi, "dqi"),
            (&dw, &gdw, "dw"),
            (&dki, &gdki, "dki"),
        ] {
            for (a, e) in got.iter().zip(want.iter()) {
                close(*a, *e, what);
            }
        }
    }

    /// With document starts, the plain twins give each document's rows (out, lse, kl, dqi, dw)
    /// and keys (dki) what the document alone gives without starts: no query sees an earlier
    /// document in the attention or in the indexer's softmax, and no key gets gradient from a
    /// later document. All-zero starts equal None exactly.
    #[test]
    fn plain_twins_with_document_starts_equal_each_document_alone() {
        let dev = Device::Cpu;
        let (b, h, t, dqk, dv, hi, di) = (2usize, 2usize, 13usize, 8usize, 4usize, 3usize, 5usize);
        let (scale, g) = (0.4, 0.7);
        let docs = [vec![4usize, 1, 8], vec![6, 7]];
        let mut host = vec![];
        for seq in &docs {
            let mut s0 = 0u32;
            for &len in seq {
                host.extend(std::iter::repeat_n(s0, len));
                s0 += len as u32;
            }
        }
        let starts = Tensor::from_vec(host, (b, t), &dev).unwrap();
        let r = |shape: &[usize], seed: u64| crate::rng::randn(shape, seed, 1.0, &dev).unwrap();
        let (q, k, v) = (
            r(&[b, h, t, dqk], 11),
            r(&[b, h, t, dqk], 12),
            r(&[b, h, t, dv], 13),
        );
        let (qi, w, ki) = (
            r(&[b, t, hi, di], 14),
            r(&[b, t, hi], 15),
            r(&[b, t, di], 16),
        );
        let (out, lse) = dense_attention_fwd_plain(&q, &k, &v, scale, Some(&starts)).unwrap();
        let res = warmup_kl_plain(&q, &k, scale, &qi, &w, &ki, g, Some(&starts)).unwrap();
        let err = |a: &Tensor, e: &Tensor| -> f32 {
            let d = (a - e).unwrap().abs().unwrap().flatten_all().unwrap();
            let m = e.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            d.max(0).unwrap().to_scalar::<f32>().unwrap() / (1.0 + m.to_scalar::<f32>().unwrap())
        };
        // Both sequences hold several documents, so the starts must change the rows.
        let causal = warmup_kl_plain(&q, &k, scale, &qi, &w, &ki, g, None).unwrap();
        assert!(
            err(&res.kl, &causal.kl) > 1e-3,
            "the starts changed nothing"
        );
        for (bi, seq) in docs.iter().enumerate() {
            let mut s0 = 0;
            for &len in seq {
                // Rows of the document: dim 2 of [B, H, T, .], dim 1 of [B, T, ..].
                let heads = |x: &Tensor| x.narrow(0, bi, 1).unwrap().narrow(2, s0, len).unwrap();
                let toks = |x: &Tensor| x.narrow(0, bi, 1).unwrap().narrow(1, s0, len).unwrap();
                let (o1, l1) =
                    dense_attention_fwd_plain(&heads(&q), &heads(&k), &heads(&v), scale, None)
                        .unwrap();
                let alone = warmup_kl_plain(
                    &heads(&q),
                    &heads(&k),
                    scale,
                    &toks(&qi),
                    &toks(&w),
                    &toks(&ki),
                    g,
                    None,
                )
                .unwrap();
                for (what, got, want) in [
                    ("out", heads(&out), o1),
                    ("lse", heads(&lse), l1),
                    ("kl", toks(&res.kl), alone.kl),
                    ("dqi", toks(&res.dqi), alone.dqi),
                    ("dw", toks(&res.dw), alone.dw),
                    ("dki", toks(&res.dki), alone.dki),
                ] {
                    let e = err(&got, &want);
                    assert!(
                        e < 1e-5,
                        "sequence {bi}, document at {s0} (length {len}): {what} {e}"
                    );
                }
                s0 += len;
            }
        }
        // All-zero starts: the same bits as None.
        let zeros = Tensor::zeros((b, t), DType::U32, &dev).unwrap();
        let bits = |x: &Tensor| -> Vec<u32> {
            x.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .into_iter()
                .map(f32::to_bits)
                .collect()
        };
        let (oz, lz) = dense_attention_fwd_plain(&q, &k, &v, scale, Some(&zeros)).unwrap();
        let (on, ln) = dense_attention_fwd_plain(&q, &k, &v, scale, None).unwrap();
        assert_eq!((bits(&oz), bits(&lz)), (bits(&on), bits(&ln)));
        let z = warmup_kl_plain(&q, &k, scale, &qi, &w, &ki, g, Some(&zeros)).unwrap();
        let n = warmup_kl_plain(&q, &k, scale, &qi, &w, &ki, g, None).unwrap();
        for (a, e) in [
            (&z.kl, &n.kl),
            (&z.dqi, &n.dqi),
            (&z.dw, &n.dw),
            (&z.dki, &n.dki),
        ] {
            assert_eq!(bits(a), bits(e));
        }
    }
}
