//! MoE routing on the device (kernels/moe_route.cu): each token's group-limited top-k choice,
//! then the routed (token, slot) pairs sorted by expert, with no copy of the router's scores
//! to the host and no host loop over tokens.
//!
//! Twins, here on the host and bit for bit (`gpu-selftest --only moe-route`):
//! - `route`: `model::moe::route_token` per token (the same f32 sums, total_cmp order, ties to
//!   the lower index);
//! - `sort`: `expert_order`, a stable counting sort (expert-major, slot order within an expert:
//!   the per-expert lists of the host routing, concatenated);
//! - `token_rows`: `token_rows_plain` (each token's K rows in the sorted order, ascending: the
//!   order in which the transposed row map sums them);
//!
//! Integers only after the choice: every output is exact, so "bit for bit" is equality.

use candle_core::{Result, Tensor};

/// The routed slots s = t K + j sorted by expert (`sort`): `order` [S] the slot ids, `token`
/// [S] their tokens (order / K), `position` [S] where each slot went (the inverse of `order`),
/// `offsets` [E + 1] (expert e's rows are `offsets[e]..offsets[e + 1]`). All u32, on the
/// device of the choice.
pub struct ExpertOrder {
    pub order: Tensor,
    pub token: Tensor,
    pub position: Tensor,
    pub offsets: Tensor,
}

/// Host twin of `sort`: (order, position, offsets) of the slots `chosen` [N K], each < `e`.
pub fn expert_order(chosen: &[u32], e: usize) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let mut offsets = vec![0u32; e + 1];
    chosen.iter().for_each(|&x| offsets[x as usize + 1] += 1);
    for x in 0..e {
        offsets[x + 1] += offsets[x];
    }
    let mut next: Vec<u32> = offsets[..e].to_vec();
    let mut order = vec![0u32; chosen.len()];
    let mut position = vec![0u32; chosen.len()];
    for (slot, &x) in chosen.iter().enumerate() {
        let p = next[x as usize];
        order[p as usize] = slot as u32;
        position[slot] = p;
        next[x as usize] += 1;
    }
    (order, position, offsets)
}

/// Host twin of `token_rows`: token t's K sorted rows, ascending, [N K].
pub fn token_rows_plain(position: &[u32], k: usize) -> Vec<u32> {
    position
        .chunks(k)
        .flat_map(|rows| {
            let mut r = rows.to_vec();
            r.sort_unstable();
            r
        })
        .collect()
}

/// The groups a token may take are a bit mask in the kernel: at most this many.
pub const MAX_GROUPS: usize = 64;
/// `token_rows` sorts a token's rows in registers: at most this many experts per token.
pub const MAX_TOP_K: usize = 32;

/// Whether the kernels take this routing: a CUDA build, scores on a CUDA device, the policy's
/// `moe-route` on, and the shape within the kernels' limits.
pub fn supported(
    policy: crate::kernels::KernelPolicy,
    scores: &Tensor,
    n_group: usize,
    top_k: usize,
) -> bool {
    cfg!(feature = "cuda")
        && policy.uses(crate::kernels::Fused::MoeRoute, scores.device())
        && n_group <= MAX_GROUPS
        && top_k <= MAX_TOP_K
}

/// scores [N, E] f32 (the router's sigmoid scores), bias [E] f32 -> the chosen experts
/// [N, top_k] u32, best first, as `route_token` chooses them.
pub fn route(
    scores: &Tensor,
    bias: &Tensor,
    n_group: usize,
    topk_group: usize,
    top_k: usize,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        cuda::route(scores, bias, n_group, topk_group, top_k)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (scores, bias, n_group, topk_group, top_k);
        candle_core::bail!("the moe-route kernel needs a CUDA build")
    }
}

/// chosen [N, K] u32 (each < e) -> the slots sorted by expert (`ExpertOrder`).
pub fn sort(chosen: &Tensor, e: usize) -> Result<ExpertOrder> {
    #[cfg(feature = "cuda")]
    {
        cuda::sort(chosen, e)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (chosen, e);
        candle_core::bail!("the moe-route kernel needs a CUDA build")
    }
}

/// position [N K] u32 (`ExpertOrder::position`) -> each token's K rows ascending [N K].
pub fn token_rows(position: &Tensor, k: usize) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        cuda::token_rows(position, k)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (position, k);
        candle_core::bail!("the moe-route kernel needs a CUDA build")
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaView, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
    use candle_core::op::BackpropOp;
    use candle_core::{bail, CudaStorage, DType, Layout, Result, Shape, Storage, Tensor};

    use super::ExpertOrder;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/moe_route.ptx"));
    /// Slots per chunk of the counting sort (CHUNK in the .cu file).
    const CHUNK: usize = 2048;

    fn load(
        dev: &CudaDevice,
        name: &str,
    ) -> Result<candle_core::cuda_backend::cudarc::driver::CudaFunction> {
        crate::kernels::cuda::load_from(dev, "dsa_moe_route", PTX, name, 0)
    }

    fn view<'a, T: CudaDType>(st: &'a Storage, l: &Layout, what: &str) -> Result<CudaView<'a, T>> {
        match st {
            Storage::Cuda(s) if l.is_contiguous() => {
                Ok(s.as_cuda_slice::<T>()?.slice(l.start_offset()..))
            }
            Storage::Cuda(_) => bail!("moe-route: {what} must be contiguous"),
            _ => bail!("moe-route: {what} is not on a CUDA device"),
        }
    }

    fn wrap<T: CudaDType>(s: CudaSlice<T>, dev: &CudaDevice, shape: impl Into<Shape>) -> Tensor {
        Tensor::from_storage(
            Storage::Cuda(CudaStorage::wrap_cuda_slice(s, dev.clone())),
            shape,
            BackpropOp::none(),
            false,
        )
    }

    fn grid(n: usize, threads: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (n.div_ceil(threads).max(1) as u32, 1, 1),
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    pub fn route(
        scores: &Tensor,
        bias: &Tensor,
        n_group: usize,
        topk_group: usize,
        top_k: usize,
    ) -> Result<Tensor> {
        let (n, e) = scores.dims2()?;
        if scores.dtype() != DType::F32
            || bias.dtype() != DType::F32
            || bias.dims() != [e]
            || n_group == 0
            || !e.is_multiple_of(n_group)
            || n_group > super::MAX_GROUPS
            || top_k == 0
            || top_k > e
        {
            bail!("moe-route: scores {:?} {:?}, bias {:?} {:?}, {n_group} groups, top {top_k} do not fit",
                scores.dims(), scores.dtype(), bias.dims(), bias.dtype());
        }
        let dev = scores.device().as_cuda_device()?.clone();
        let (scores, bias) = (scores.contiguous()?, bias.contiguous()?);
        let (ss, sl) = scores.storage_and_layout();
        let (bs, bl) = bias.storage_and_layout();
        let sv = view::<f32>(&ss, sl, "scores")?;
        let bv = view::<f32>(&bs, bl, "bias")?;
        // SAFETY: the kernel writes all top_k entries of each of the n tokens.
        let mut out = unsafe { dev.alloc::<u32>((n * top_k).max(1)) }?;
        if n > 0 {
            let f = load(&dev, "moe_route")?;
            let (n64, e32, g32, tg32, k32) = (
                n as i64,
                e as i32,
                n_group as i32,
                topk_group as i32,
                top_k as i32,
            );
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&sv)
                .arg(&bv)
                .arg(&mut out)
                .arg(&n64)
                .arg(&e32)
                .arg(&g32)
                .arg(&tg32)
                .arg(&k32);
            // SAFETY: scores [n, e] and bias [e] are live contiguous f32 buffers, out holds
            // n * top_k u32; candle's stream orders the launch.
            unsafe { b.launch(grid(n, 128)) }.w()?;
        }
        drop((ss, bs));
        wrap(out, &dev, (n, top_k)).narrow(0, 0, n)
    }

    pub fn sort(chosen: &Tensor, e: usize) -> Result<ExpertOrder> {
        if chosen.dtype() != DType::U32 || e == 0 {
            bail!(
                "moe-route sort: chosen {:?} {:?} over {e} experts",
                chosen.dims(),
                chosen.dtype()
            );
        }
        let (_, k) = chosen.dims2()?;
        let s = chosen.elem_count();
        if s >= u32::MAX as usize {
            bail!("moe-route sort: {s} routed slots do not fit u32 row ids");
        }
        let dev = chosen.device().as_cuda_device()?.clone();
        let chosen = chosen.flatten_all()?.contiguous()?;
        let (cs, cl) = chosen.storage_and_layout();
        let cv = view::<u32>(&cs, cl, "chosen")?;
        let chunks = s.div_ceil(CHUNK).max(1);
        let mut hist = dev.alloc_zeros::<u32>(chunks * e)?;
        let mut base = dev.alloc_zeros::<u32>(chunks * e)?;
        let mut offsets = dev.alloc_zeros::<u32>(e + 1)?;
        let mut order = dev.alloc_zeros::<u32>(s.max(1))?;
        let mut token = dev.alloc_zeros::<u32>(s.max(1))?;
        let mut position = dev.alloc_zeros::<u32>(s.max(1))?;
        let (s64, e32, c64, k32) = (s as i64, e as i32, chunks as i64, k as i32);
        let stream = dev.cuda_stream();
        let blocks = LaunchConfig {
            grid_dim: (chunks as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        {
            let f = load(&dev, "moe_count")?;
            let mut b = stream.launch_builder(&f);
            b.arg(&cv).arg(&s64).arg(&mut hist).arg(&e32);
            // SAFETY: chosen holds s u32 (read below s only), hist chunks * e.
            unsafe { b.launch(blocks) }.w()?;
        }
        {
            let f = load(&dev, "moe_scan")?;
            let mut b = stream.launch_builder(&f);
            b.arg(&hist)
                .arg(&mut base)
                .arg(&mut offsets)
                .arg(&c64)
                .arg(&e32);
            let one = LaunchConfig {
                grid_dim: (1, 1, 1),
                block_dim: (e.clamp(32, 1024) as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: hist and base hold chunks * e u32, offsets e + 1.
            unsafe { b.launch(one) }.w()?;
        }
        {
            let f = load(&dev, "moe_place")?;
            let mut b = stream.launch_builder(&f);
            b.arg(&cv)
                .arg(&s64)
                .arg(&base)
                .arg(&offsets)
                .arg(&mut order)
                .arg(&mut token)
                .arg(&mut position)
                .arg(&e32)
                .arg(&k32);
            // SAFETY: every slot below s is written once into order/token (positions < s by
            // construction of the offsets) and position; the buffers hold s u32.
            unsafe { b.launch(blocks) }.w()?;
        }
        drop(cs);
        let cut = |t: Tensor| t.narrow(0, 0, s);
        Ok(ExpertOrder {
            order: cut(wrap(order, &dev, s.max(1)))?,
            token: cut(wrap(token, &dev, s.max(1)))?,
            position: cut(wrap(position, &dev, s.max(1)))?,
            offsets: wrap(offsets, &dev, e + 1),
        })
    }

    pub fn token_rows(position: &Tensor, k: usize) -> Result<Tensor> {
        let s = position.elem_count();
        if position.dtype() != DType::U32 || k == 0 || k > super::MAX_TOP_K || !s.is_multiple_of(k)
        {
            bail!(
                "moe-route token rows: positions {:?} {:?} in rows of {k}",
                position.dims(),
                position.dtype()
            );
        }
        let n = s / k;
        let dev = position.device().as_cuda_device()?.clone();
        let position = position.contiguous()?;
        let (ps, pl) = position.storage_and_layout();
        let pv = view::<u32>(&ps, pl, "position")?;
        let mut rows = dev.alloc_zeros::<u32>(s.max(1))?;
        if n > 0 {
            let f = load(&dev, "moe_token_rows")?;
            let (n64, k32) = (n as i64, k as i32);
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&pv).arg(&mut rows).arg(&n64).arg(&k32);
            // SAFETY: position and rows hold n * k u32.
            unsafe { b.launch(grid(n, 128)) }.w()?;
        }
        drop(ps);
        wrap(rows, &dev, s.max(1)).narrow(0, 0, s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sort_is_the_per_expert_lists_concatenated() {
        // 5 tokens x 2 experts over 4 experts.
        let chosen = [2u32, 0, 2, 3, 1, 0, 3, 2, 0, 1];
        let (order, position, offsets) = expert_order(&chosen, 4);
        let mut lists = vec![vec![]; 4];
        chosen
            .iter()
            .enumerate()
            .for_each(|(s, &x)| lists[x as usize].push(s as u32));
        assert_eq!(order, lists.concat());
        assert_eq!(offsets, vec![0, 3, 5, 8, 10]);
        for (p, &s) in order.iter().enumerate() {
            assert_eq!(position[s as usize] as usize, p);
        }
        // Token 3 (slots 6, 7: experts 3 and 2) sums its rows in sorted order: 7's then 6's.
        let rows = token_rows_plain(&position, 2);
        assert_eq!(&rows[6..8], &[position[7], position[6]]);
        assert!(rows[6] < rows[7]);
    }
}
