//! Row gathers and row sums with a deterministic, parallel adjoint.
//!
//! Why: candle's `index_add` (the backward of `index_select`) gives each column one thread
//! that loops over every index in turn; on the GPU an MoE layer's per-expert gathers, the
//! combine of the expert outputs and the embedding's backward become long serial loops.
//! A `RowPlan` is a sparse row map, out row i = sum over its entries j of x[src[j]]: a gather
//! has one entry per row, its adjoint (scatter-add) is the transposed map. Both directions
//! run the same kernel (kernels/rows.cu) or the same CPU loop: one output row per worker,
//! the entries added in f32 (f64 for f64 input) in increasing order, rounded once. The plain
//! twin, `apply_plain`, is candle's `index_select` and `index_add`; in f32 both add the same
//! values in the same order, so they agree bit for bit.

use std::sync::{Arc, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// A sparse row map in CSR form: out row i sums x[src[j]] for j in off[i]..off[i + 1].
struct RowMap {
    /// `src` and `off` on the host: given when built there, copied from the device the first
    /// time a map built there meets the CPU loop or the plain twin.
    host: OnceLock<(Vec<u32>, Vec<u32>)>,
    in_rows: usize,
    out_rows: usize,
    /// One entry per output row, in order (a gather).
    is_gather: bool,
    /// `src` and `off` on the GPU, made once when the plan was built for a CUDA device (or built
    /// there).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    on_device: Option<(Tensor, Tensor)>,
}

impl RowMap {
    fn new(src: Vec<u32>, off: Vec<u32>, in_rows: usize, device: &Device) -> Result<Self> {
        let on_device = if device.is_cuda() {
            // Never an empty buffer on the device: a map without entries keeps one unused slot.
            let s = if src.is_empty() {
                vec![0u32]
            } else {
                src.clone()
            };
            Some((
                Tensor::from_vec(s.clone(), s.len(), device)?,
                Tensor::from_vec(off.clone(), off.len(), device)?,
            ))
        } else {
            None
        };
        let is_gather =
            src.len() + 1 == off.len() && off.iter().enumerate().all(|(i, &o)| o as usize == i);
        Ok(Self {
            out_rows: off.len() - 1,
            host: OnceLock::from((src, off)),
            in_rows,
            is_gather,
            on_device,
        })
    }

    /// (src, off) on the host.
    fn host(&self) -> Result<&(Vec<u32>, Vec<u32>)> {
        if let Some(h) = self.host.get() {
            return Ok(h);
        }
        let Some((src, off)) = &self.on_device else {
            bail!("row map: neither host nor device indices")
        };
        let off: Vec<u32> = off.to_vec1()?;
        let entries = *off.last().unwrap_or(&0) as usize;
        let src: Vec<u32> = src.narrow(0, 0, entries)?.to_vec1()?;
        let _ = self.host.set((src, off));
        Ok(self.host.get().expect("set above"))
    }

    fn out_rows(&self) -> usize {
        self.out_rows
    }

    /// The adjoint map: in row r's entries are the out rows that read it, in increasing order.
    fn transpose(&self, device: &Device) -> Result<Self> {
        let (msrc, moff) = self.host()?;
        let mut off = vec![0u32; self.in_rows + 1];
        msrc.iter().for_each(|&r| off[r as usize + 1] += 1);
        for r in 0..self.in_rows {
            off[r + 1] += off[r];
        }
        let mut next: Vec<u32> = off[..self.in_rows].to_vec();
        let mut src = vec![0u32; msrc.len()];
        for i in 0..self.out_rows() {
            for j in moff[i]..moff[i + 1] {
                let r = msrc[j as usize] as usize;
                src[next[r] as usize] = i as u32;
                next[r] += 1;
            }
        }
        Self::new(src, off, self.out_rows(), device)
    }
}

/// A row map and its adjoint, built once per set of indices and applied to any row-major
/// tensor whose first dimension is the map's input rows.
#[derive(Clone)]
pub struct RowPlan {
    map: Arc<RowMap>,
    adjoint: Arc<RowMap>,
}

impl RowPlan {
    /// out row i = x[ids[i]].
    pub fn gather(ids: &[u32], in_rows: usize, device: &Device) -> Result<Self> {
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= in_rows) {
            bail!("row gather: index {bad} is out of range for {in_rows} rows");
        }
        let off: Vec<u32> = (0..=ids.len() as u32).collect();
        let map = RowMap::new(ids.to_vec(), off, in_rows, device)?;
        let adjoint = map.transpose(device)?;
        Ok(Self {
            map: Arc::new(map),
            adjoint: Arc::new(adjoint),
        })
    }

    /// out row i = sum over j in off[i]..off[i + 1] of x[src[j]], added in that order (a
    /// scatter-add given by its groups, e.g. an embedding gradient's rows by token).
    pub fn sums(src: Vec<u32>, off: Vec<u32>, in_rows: usize, device: &Device) -> Result<Self> {
        if off.first() != Some(&0)
            || off.last().map(|&o| o as usize) != Some(src.len())
            || off.windows(2).any(|w| w[0] > w[1])
        {
            bail!(
                "row sums: offsets must rise from 0 to the {} entries",
                src.len()
            );
        }
        if let Some(&bad) = src.iter().find(|&&i| i as usize >= in_rows) {
            bail!("row sums: index {bad} is out of range for {in_rows} rows");
        }
        let map = RowMap::new(src, off, in_rows, device)?;
        let adjoint = map.transpose(device)?;
        Ok(Self {
            map: Arc::new(map),
            adjoint: Arc::new(adjoint),
        })
    }

    /// A plan whose indices were made on the GPU (u32, contiguous): the map (`src`, `off`) and
    /// its adjoint, which the caller guarantees is the map's transpose with each row's entries
    /// in increasing order (what `adjoint` of a host-built plan gives), so the sums are those
    /// of the host-built plan bit for bit. `gather` says which of the two is a plain gather
    /// (one entry per output row, `off` = 0, 1, 2, ...). Indices are trusted, not checked:
    /// they come from the kernels that computed them (`kernels::moe_route`).
    pub fn from_device(
        map: (Tensor, Tensor),
        adjoint: (Tensor, Tensor),
        in_rows: usize,
        out_rows: usize,
        gather: (bool, bool),
    ) -> Result<Self> {
        let side =
            |(src, off): (Tensor, Tensor), rows_in: usize, is_gather: bool| -> Result<RowMap> {
                if !off.device().is_cuda() || src.dtype() != DType::U32 || off.dtype() != DType::U32
                {
                    bail!("row plan from the device: u32 indices on a CUDA device");
                }
                let rows_out = off.elem_count().saturating_sub(1);
                // Never an empty buffer on the device (as `RowMap::new`).
                let src = if src.elem_count() == 0 {
                    Tensor::zeros(1, DType::U32, src.device())?
                } else {
                    src.contiguous()?
                };
                Ok(RowMap {
                    host: OnceLock::new(),
                    in_rows: rows_in,
                    out_rows: rows_out,
                    is_gather,
                    on_device: Some((src, off.contiguous()?)),
                })
            };
        let m = side(map, in_rows, gather.0)?;
        let a = side(adjoint, out_rows, gather.1)?;
        if m.out_rows != out_rows || a.out_rows != in_rows {
            bail!(
                "row plan from the device: {} and {} rows for a map of {in_rows} -> {out_rows} rows",
                m.out_rows,
                a.out_rows
            );
        }
        Ok(Self {
            map: Arc::new(m),
            adjoint: Arc::new(a),
        })
    }

    /// The transposed plan: a gather's scatter-add (out row r = the sum of the rows that
    /// gathered r, in the order they were gathered).
    pub fn adjoint(&self) -> Self {
        Self {
            map: self.adjoint.clone(),
            adjoint: self.map.clone(),
        }
    }

    pub fn out_rows(&self) -> usize {
        self.map.out_rows()
    }

    /// x [in_rows, ...] -> [out_rows, ...], differentiable (its gradient is the adjoint plan).
    /// The plain twin replaces it on a GPU whose policy runs the plain twins.
    pub fn apply(&self, kernels: crate::kernels::KernelPolicy, x: &Tensor) -> Result<Tensor> {
        if x.device().is_cuda() && !kernels.on(x.device()) {
            return self.apply_plain(x);
        }
        x.contiguous()?.apply_op1(RowSum {
            map: self.map.clone(),
            adjoint: self.adjoint.clone(),
        })
    }

    /// The same map with candle's ops: `index_select` of the entries, then `index_add` into
    /// zero rows (just the `index_select` for a plain gather).
    pub fn apply_plain(&self, x: &Tensor) -> Result<Tensor> {
        let m = &self.map;
        check_rows(x, m)?;
        let (msrc, moff) = m.host()?;
        let src = Tensor::new(msrc.as_slice(), x.device())?;
        let picked = x.index_select(&src, 0)?;
        if m.is_gather {
            return Ok(picked);
        }
        let dest: Vec<u32> = (0..m.out_rows())
            .flat_map(|i| (moff[i]..moff[i + 1]).map(move |_| i as u32))
            .collect();
        let mut dims = x.dims().to_vec();
        dims[0] = m.out_rows();
        Tensor::zeros(dims, x.dtype(), x.device())?.index_add(
            &Tensor::new(dest.as_slice(), x.device())?,
            &picked,
            0,
        )
    }
}

impl RowPlan {
    /// out row i = the sum over its entries j of x[src[j]] * w[src[j]]: x [in_rows, d] and
    /// w [in_rows, 1] of one dtype, each product rounded to it (as `broadcast_mul` rounds it),
    /// the sums as `apply`'s. The MoE combine (expert rows weighted, summed per token) in one
    /// pass (kernels/rows.cu) where the policy allows; the plain twin, `apply(x * w)`, gives the
    /// same bits. Differentiable in x and w (the backward: `gather_scaled_dot` of the adjoint:
    /// dx = w adjoint(grad), dw = the rows' dot products of adjoint(grad) with x).
    pub fn apply_weighted(
        &self,
        kernels: crate::kernels::KernelPolicy,
        x: &Tensor,
        w: &Tensor,
    ) -> Result<Tensor> {
        if !weighted_kernel(kernels, x, w, self.map.in_rows, self.map.in_rows) {
            return self.apply(kernels, &x.broadcast_mul(w)?);
        }
        x.contiguous()?.apply_op2(
            &w.contiguous()?,
            WeightedRowSum {
                plan: self.clone(),
                kernels,
            },
        )
    }

    /// (g * w, the dot product of each row of g with y's) for g = `apply(x)`: w [out_rows, 1]
    /// in x's dtype and y [out_rows, d] -> [out_rows, d] in x's dtype and [out_rows, 1] f32
    /// (products and sums in f32). The MoE combine's backward (the gradient of the weighted
    /// rows, and of their weights) without materialising g: one pass each on a GPU where the
    /// plan is a gather (one entry per output row); not differentiable. The plain twin: candle's
    /// product and an f32 sum (another order of additions, so the dot products agree to f32
    /// rounding; the scaled rows bit for bit).
    pub fn gather_scaled_dot(
        &self,
        kernels: crate::kernels::KernelPolicy,
        x: &Tensor,
        w: &Tensor,
        y: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let m = &self.map;
        if m.is_gather
            && weighted_kernel(kernels, x, w, m.in_rows, m.out_rows())
            && y.dtype() == x.dtype()
            && y.dims() == [m.out_rows(), x.dim(1)?]
        {
            let x = x.contiguous()?;
            let gw = x.apply_op2_no_bwd(&w.contiguous()?, &GatherScale(m.clone()))?;
            let dot = x.apply_op2_no_bwd(&y.contiguous()?, &GatherDot(m.clone()))?;
            return Ok((gw, dot));
        }
        let g = self.apply(kernels, x)?;
        let dot = (g.to_dtype(DType::F32)? * y.to_dtype(DType::F32)?)?.sum_keepdim(1)?;
        Ok((g.broadcast_mul(w)?, dot))
    }
}

/// May the weighted kernels take x [x_rows, d] and w [w_rows, 1]? (f32 or bf16, one dtype,
/// the row counts the map reads.)
fn weighted_kernel(
    kernels: crate::kernels::KernelPolicy,
    x: &Tensor,
    w: &Tensor,
    x_rows: usize,
    w_rows: usize,
) -> bool {
    kernels.uses(crate::kernels::Fused::MoeCombine, x.device())
        && matches!(x.dtype(), DType::F32 | DType::BF16)
        && w.dtype() == x.dtype()
        && x.rank() == 2
        && x.dims()[0] == x_rows
        && w.dims() == [w_rows, 1]
}

/// `RowPlan::apply_weighted`'s op (CUDA only: the CPU and the plain policy take the twin).
struct WeightedRowSum {
    plan: RowPlan,
    kernels: crate::kernels::KernelPolicy,
}

impl candle_core::CustomOp2 for WeightedRowSum {
    fn name(&self) -> &'static str {
        "dsa-weighted-row-sum"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        bail!("dsa-weighted-row-sum runs on CUDA only; the CPU takes apply(x * w)")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::weighted(cuda::Weighted::Sum, s1, l1, s2, l2, &self.plan.map)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = self.plan.adjoint().gather_scaled_dot(
            self.kernels,
            &grad.detach(),
            &w.detach(),
            &x.detach(),
        )?;
        Ok((Some(dx), Some(dw.to_dtype(w.dtype())?)))
    }
}

/// The scaled gather of `RowPlan::gather_scaled_dot` (CUDA only).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct GatherScale(Arc<RowMap>);
/// The dot products of `RowPlan::gather_scaled_dot` (CUDA only).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct GatherDot(Arc<RowMap>);

macro_rules! cuda_only_op2 {
    ($op:ty, $name:literal, $kind:ident) => {
        impl candle_core::CustomOp2 for $op {
            fn name(&self) -> &'static str {
                $name
            }

            fn cpu_fwd(
                &self,
                _: &CpuStorage,
                _: &Layout,
                _: &CpuStorage,
                _: &Layout,
            ) -> Result<(CpuStorage, Shape)> {
                bail!(concat!(
                    $name,
                    " runs on CUDA only; the CPU takes the plain twin"
                ))
            }

            #[cfg(feature = "cuda")]
            fn cuda_fwd(
                &self,
                s1: &candle_core::CudaStorage,
                l1: &Layout,
                s2: &candle_core::CudaStorage,
                l2: &Layout,
            ) -> Result<(candle_core::CudaStorage, Shape)> {
                cuda::weighted(cuda::Weighted::$kind, s1, l1, s2, l2, &self.0)
            }
        }
    };
}
cuda_only_op2!(GatherScale, "dsa-gather-scale", Scale);
cuda_only_op2!(GatherDot, "dsa-gather-dot", Dot);

fn check_rows(x: &Tensor, m: &RowMap) -> Result<()> {
    if x.rank() == 0 || x.dim(0)? != m.in_rows {
        bail!(
            "row map: input {:?} does not have the map's {} rows",
            x.shape(),
            m.in_rows
        );
    }
    Ok(())
}

struct RowSum {
    map: Arc<RowMap>,
    adjoint: Arc<RowMap>,
}

impl RowSum {
    /// (rows, values per row) of the input, and the output shape.
    fn shapes(&self, l: &Layout) -> Result<(usize, Shape)> {
        let dims = l.shape().dims();
        if dims.is_empty() || dims[0] != self.map.in_rows {
            bail!(
                "row map: input {:?} does not have the map's {} rows",
                l.shape(),
                self.map.in_rows
            );
        }
        let mut out = dims.to_vec();
        out[0] = self.map.out_rows();
        Ok((dims[1..].iter().product(), Shape::from(out)))
    }
}

/// The CPU loop: one output row per rayon task, entries added in order in `A`.
fn sum_rows<T: Copy + Send + Sync, A: Copy + Send + Sync + std::ops::AddAssign>(
    x: &[T],
    m: (&[u32], &[u32]),
    d: usize,
    zero: A,
    up: impl Fn(T) -> A + Sync,
    down: impl Fn(A) -> T + Sync,
    fill: T,
) -> Vec<T> {
    let mut out = vec![fill; (m.1.len() - 1) * d];
    if d == 0 {
        return out;
    }
    let (src, off) = m;
    out.par_chunks_mut(d).enumerate().for_each(|(i, row)| {
        let mut acc = vec![zero; d];
        for j in off[i]..off[i + 1] {
            let s = src[j as usize] as usize * d;
            acc.iter_mut()
                .zip(&x[s..s + d])
                .for_each(|(a, &v)| *a += up(v));
        }
        row.iter_mut().zip(acc).for_each(|(o, a)| *o = down(a));
    });
    out
}

impl CustomOp1 for RowSum {
    fn name(&self) -> &'static str {
        "dsa-row-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (d, shape) = self.shapes(l)?;
        let Some((start, end)) = l.contiguous_offsets() else {
            bail!("row map: input must be contiguous")
        };
        let (src, off) = self.map.host()?;
        let m = (src.as_slice(), off.as_slice());
        let out = match s {
            CpuStorage::F32(v) => {
                CpuStorage::F32(sum_rows(&v[start..end], m, d, 0f32, |x| x, |a| a, 0.0))
            }
            CpuStorage::F64(v) => {
                CpuStorage::F64(sum_rows(&v[start..end], m, d, 0f64, |x| x, |a| a, 0.0))
            }
            CpuStorage::BF16(v) => CpuStorage::BF16(sum_rows(
                &v[start..end],
                m,
                d,
                0f32,
                |x| x.to_f32(),
                half::bf16::from_f32,
                half::bf16::ZERO,
            )),
            CpuStorage::F16(v) => CpuStorage::F16(sum_rows(
                &v[start..end],
                m,
                d,
                0f32,
                |x| x.to_f32(),
                half::f16::from_f32,
                half::f16::ZERO,
            )),
            other => bail!(
                "row map: {:?} rows are not supported (f32, f64, bf16, f16)",
                other.dtype()
            ),
        };
        Ok((out, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (d, shape) = self.shapes(l)?;
        cuda::row_sum(s, l, &self.map, d, shape)
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let back = RowSum {
            map: self.adjoint.clone(),
            adjoint: self.map.clone(),
        };
        Ok(Some(grad.contiguous()?.apply_op1(back)?))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
    };
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{bail, CudaStorage, DType, Layout, Result, Shape, Storage, Tensor};

    use super::RowMap;
    use crate::kernels::cuda::{load_from, view};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/rows.ptx"));

    pub(super) fn row_sum(
        s: &CudaStorage,
        l: &Layout,
        m: &RowMap,
        d: usize,
        shape: Shape,
    ) -> Result<(CudaStorage, Shape)> {
        match s.dtype() {
            DType::F32 => launch::<f32>(s, l, m, d, shape, "rows_sum_f32"),
            DType::BF16 => launch::<half::bf16>(s, l, m, d, shape, "rows_sum_bf16"),
            DType::F16 => launch::<half::f16>(s, l, m, d, shape, "rows_sum_f16"),
            other => bail!("row map: {other:?} rows are not supported on the GPU (f32, bf16, f16)"),
        }
    }

    fn launch<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
        s: &CudaStorage,
        l: &Layout,
        m: &RowMap,
        d: usize,
        shape: Shape,
        name: &str,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = s.device();
        let rows = m.out_rows();
        let out = dev.alloc_zeros::<T>((rows * d).max(1))?; // never an empty device buffer
        if rows > 0 && d > 0 {
            let Some((src_t, off_t)) = &m.on_device else {
                bail!("row map: built for the CPU, applied on the GPU")
            };
            let (ss, sl) = src_t.storage_and_layout();
            let (os, ol) = off_t.storage_and_layout();
            let (Storage::Cuda(ss), Storage::Cuda(os)) = (&*ss, &*os) else {
                bail!("row map: its indices are not on the GPU")
            };
            let src = view::<u32>(ss, sl, "row map sources")?;
            let off = view::<u32>(os, ol, "row map offsets")?;
            let x = view::<T>(s, l, "rows")?;
            let f = load_from(dev, "dsa_rows", PTX, name, 0)?;
            let Ok(d32) = i32::try_from(d) else {
                bail!("row map: {d} values per row do not fit the kernel's int")
            };
            let Ok(grid) = u32::try_from(rows) else {
                bail!("row map: {rows} output rows do not fit one launch")
            };
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&x).arg(&src).arg(&off).arg(&out).arg(&d32);
            let threads = d.next_multiple_of(32).min(256) as u32;
            let cfg = LaunchConfig {
                grid_dim: (grid, 1, 1),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: x holds in_rows * d values (checked by the caller's shape), every src entry
            // is < in_rows (checked when the plan was built), off has rows + 1 entries and out
            // rows * d; the launch is on candle's stream, ordered with its other ops.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), shape))
    }

    /// The map's indices on the device (made when the plan was built for a CUDA device).
    fn indices(m: &RowMap) -> Result<(Tensor, Tensor)> {
        match &m.on_device {
            Some((src, off)) => Ok((src.clone(), off.clone())),
            None => bail!("row map: built for the CPU, applied on the GPU"),
        }
    }

    fn suffix(dtype: DType) -> Result<&'static str> {
        match dtype {
            DType::F32 => Ok("f32"),
            DType::BF16 => Ok("bf16"),
            other => bail!("weighted row maps: {other:?} is not supported on the GPU (f32, bf16)"),
        }
    }

    fn grid(rows: usize) -> Result<LaunchConfig> {
        let Ok(grid) = u32::try_from(rows) else {
            bail!("row map: {rows} output rows do not fit one launch")
        };
        Ok(LaunchConfig {
            grid_dim: (grid, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        })
    }

    /// The weighted kernels of kernels/rows.cu.
    pub(super) enum Weighted {
        /// `rows_wsum`: the map's weighted row sums, [out_rows, d] in x's dtype.
        Sum,
        /// `rows_gather_scale`: a gather's rows times a weight per row, [out_rows, d].
        Scale,
        /// `rows_gather_dot`: a gather's rows' dot products with y's, [out_rows, 1] f32.
        Dot,
    }

    /// Launch `kind` on x [in_rows, d] and `other` (the weights [in_rows or out_rows, 1], or
    /// y [out_rows, d]).
    pub(super) fn weighted(
        kind: Weighted,
        x: &CudaStorage,
        lx: &Layout,
        other: &CudaStorage,
        lo: &Layout,
        m: &RowMap,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = x.device();
        let rows = m.out_rows();
        let d = lx.shape().dims()[1];
        let kernel = match kind {
            Weighted::Sum => "rows_wsum",
            Weighted::Scale => "rows_gather_scale",
            Weighted::Dot => "rows_gather_dot",
        };
        let f = load_from(
            dev,
            "dsa_rows",
            PTX,
            &format!("{kernel}_{}", suffix(x.dtype())?),
            0,
        )?;
        let (src_t, off_t) = indices(m)?;
        let (ss, sl) = src_t.storage_and_layout();
        let (os, ol) = off_t.storage_and_layout();
        let (Storage::Cuda(ss), Storage::Cuda(os)) = (&*ss, &*os) else {
            bail!("row map: its indices are not on the GPU")
        };
        let src = view::<u32>(ss, sl, "row map sources")?;
        let off = view::<u32>(os, ol, "row map offsets")?;
        let d32 =
            i32::try_from(d).map_err(|_| candle_core::Error::Msg(format!("{d} values per row")))?;
        let stream = dev.cuda_stream();
        let launch = rows > 0 && d > 0;
        macro_rules! go {
            ($t:ty) => {{
                let xv = view::<$t>(x, lx, "rows")?;
                let ov = view::<$t>(other, lo, "weights or rows")?;
                let mut b = stream.launch_builder(&f);
                b.arg(&xv).arg(&ov).arg(&src);
                // SAFETY (each launch): x holds in_rows * d values and `other` its rows (shapes
                // checked by the caller), every src entry is < in_rows and off has rows + 1
                // entries (checked when the plan was built), the output rows * d (or rows);
                // candle's stream orders the launch with its other ops.
                match kind {
                    Weighted::Dot => {
                        let out = dev.alloc_zeros::<f32>(rows.max(1))?;
                        if launch {
                            b.arg(&out).arg(&d32);
                            unsafe { b.launch(grid(rows)?) }.w()?;
                        }
                        (
                            CudaStorage::wrap_cuda_slice(out, dev.clone()),
                            Shape::from((rows, 1)),
                        )
                    }
                    _ => {
                        let out = dev.alloc_zeros::<$t>((rows * d).max(1))?;
                        if launch {
                            if matches!(kind, Weighted::Sum) {
                                b.arg(&off);
                            }
                            b.arg(&out).arg(&d32);
                            unsafe { b.launch(grid(rows)?) }.w()?;
                        }
                        (
                            CudaStorage::wrap_cuda_slice(out, dev.clone()),
                            Shape::from((rows, d)),
                        )
                    }
                }
            }};
        }
        Ok(match x.dtype() {
            DType::BF16 => go!(half::bf16),
            _ => go!(f32),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Var};

    fn random(rows: usize, d: usize, seed: u64) -> Result<Tensor> {
        let mut r = crate::rng::SplitMix64::new(seed);
        Tensor::from_vec(
            (0..rows * d).map(|_| r.normal() as f32).collect::<Vec<_>>(),
            (rows, d),
            &Device::Cpu,
        )
    }

    #[test]
    fn gathers_and_their_adjoint_equal_index_select_and_index_add_bit_for_bit() -> Result<()> {
        let mut r = crate::rng::SplitMix64::new(7);
        for (in_rows, n, d) in [(1, 1, 1), (5, 97, 3), (97, 1025, 8), (300, 40, 1)] {
            let ids: Vec<u32> = (0..n)
                .map(|_| (r.next_u64() % in_rows as u64) as u32)
                .collect();
            let plan = RowPlan::gather(&ids, in_rows, &Device::Cpu)?;
            let x = Var::from_tensor(&random(in_rows, d, n as u64)?)?;
            let up = random(n, d, 99)?;
            let ours = plan.apply(crate::kernels::KernelPolicy::default(), x.as_tensor())?;
            let plain = plan.apply_plain(x.as_tensor())?;
            assert_eq!(
                ours.to_vec2::<f32>()?,
                plain.to_vec2::<f32>()?,
                "forward {in_rows} {n} {d}"
            );
            let g_ours = (ours * &up)?.sum_all()?.backward()?;
            let g_plain = (plain * &up)?.sum_all()?.backward()?;
            let (a, b) = (
                g_ours.get(x.as_tensor()).unwrap(),
                g_plain.get(x.as_tensor()).unwrap(),
            );
            assert_eq!(
                a.to_vec2::<f32>()?,
                b.to_vec2::<f32>()?,
                "gradient {in_rows} {n} {d}"
            );
            // The adjoint applied directly is the scatter-add of the plain path.
            let scattered = plan
                .adjoint()
                .apply(crate::kernels::KernelPolicy::default(), &up)?;
            let plain_scatter = plan.adjoint().apply_plain(&up)?;
            assert_eq!(scattered.to_vec2::<f32>()?, plain_scatter.to_vec2::<f32>()?);
        }
        Ok(())
    }

    #[test]
    fn bf16_rows_are_summed_in_f32_and_rounded_once() -> Result<()> {
        // 1 + 2^-8 + 2^-8 in bf16 (ulp 2^-7 at 1): added one at a time each step ties and
        // rounds back to 1 (index_add); one f32 sum gives 1 + 2^-7, which bf16 holds exactly.
        let x = Tensor::new(&[[1f32], [1.0 / 256.0], [1.0 / 256.0]], &Device::Cpu)?
            .to_dtype(DType::BF16)?;
        let sum = RowPlan::gather(&[0, 0, 0], 1, &Device::Cpu)?.adjoint();
        let at = |t: Tensor| -> Result<f32> { Ok(t.to_dtype(DType::F32)?.to_vec2::<f32>()?[0][0]) };
        assert_eq!(
            at(sum.apply(crate::kernels::KernelPolicy::default(), &x)?)?,
            1.0 + 1.0 / 128.0
        );
        assert_eq!(at(sum.apply_plain(&x)?)?, 1.0);
        Ok(())
    }

    #[test]
    fn an_index_past_the_rows_is_an_error() {
        let e = RowPlan::gather(&[0, 3], 3, &Device::Cpu)
            .err()
            .expect("error")
            .to_string();
        assert!(e.contains("index 3 is out of range for 3 rows"), "{e}");
        let plan = RowPlan::gather(&[0], 3, &Device::Cpu).unwrap();
        assert!(plan
            .apply(
                crate::kernels::KernelPolicy::default(),
                &Tensor::zeros((2, 1), DType::F32, &Device::Cpu).unwrap(),
            )
            .is_err());
    }
}
