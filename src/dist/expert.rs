//! Expert parallelism: the routed experts of every MoE layer are split into `ep` contiguous
//! ranges (rank i of an expert-parallel group holds experts [i E/ep, (i+1) E/ep), as
//! DeepSeek's convert.py splits them); token rows travel to the rank of their expert and the
//! expert outputs travel back (two all-to-alls per MoE layer, and two more in the backward).
//!
//! `all_to_all_rows` is a candle custom op, so the exchange is part of the autograd graph:
//! its backward is the same exchange with send and receive counts swapped. Every rank of a
//! group therefore runs the same sequence of exchanges in the forward and in the backward;
//! the MoE keeps the graph the same shape on every rank (an exchange of zero rows still takes
//! part) so that no rank waits for a partner that skipped one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

use super::Collective;

/// Nanoseconds spent in exchanges since the last `take_exchange_seconds` (a measurement, read
/// by the step's metrics; nothing numeric depends on it).
static EXCHANGE_NANOS: AtomicU64 = AtomicU64::new(0);
/// Bytes of token rows this process sent to other ranks since the last `take_exchange_bytes`.
static EXCHANGE_BYTES: AtomicU64 = AtomicU64::new(0);

/// Seconds spent in expert exchanges (this process) since the last call.
pub fn take_exchange_seconds() -> f64 {
    EXCHANGE_NANOS.swap(0, Ordering::Relaxed) as f64 * 1e-9
}

/// Bytes of token rows this process sent to the other ranks of its expert group in exchanges
/// (forward, recomputation and backward) since the last call: what `check` estimates as the
/// expert exchange per device.
pub fn take_exchange_bytes() -> u64 {
    EXCHANGE_BYTES.swap(0, Ordering::Relaxed)
}

/// Time `f` as exchange time.
pub fn timed<T>(f: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let out = f();
    EXCHANGE_NANOS.fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
    out
}

/// Moves bytes (and, on GPUs with NCCL, device rows) between the ranks of one group.
pub trait RowExchange: Send + Sync {
    /// Ranks in the group.
    fn size(&self) -> usize;
    /// This rank's index in the group.
    fn index(&self) -> usize;
    /// `parts[i]` goes to group index i; returns what each group index sent here, in order.
    fn host(&self, parts: Vec<Vec<u8>>) -> anyhow::Result<Vec<Vec<u8>>>;
    /// Device rows: `x` holds consecutive blocks of `send[i]` rows of `row_bytes` for group
    /// index i; returns the `recv[i]`-row blocks from each index, concatenated in order.
    #[cfg(feature = "cuda")]
    fn device(
        &self,
        _x: &candle_core::CudaStorage,
        _layout: &Layout,
        _dtype: DType,
        _send: &[usize],
        _recv: &[usize],
        _row_elems: usize,
    ) -> candle_core::Result<candle_core::CudaStorage> {
        candle_core::bail!(
            "expert and context parallelism on GPUs need the NCCL backend (build with --features nccl)"
        )
    }
}

/// The routed experts this rank holds, and the channel to the other holders.
#[derive(Clone)]
pub struct ExpertShard {
    pub first: usize,
    pub count: usize,
    pub exchange: Arc<dyn RowExchange>,
}

impl ExpertShard {
    /// The shard of group index `exchange.index()` for `total` experts.
    pub fn new(total: usize, exchange: Arc<dyn RowExchange>) -> anyhow::Result<Self> {
        let ep = exchange.size();
        if !total.is_multiple_of(ep) {
            anyhow::bail!("parallel.ep = {ep} does not divide the {total} routed experts (n_routed_experts in config.json)");
        }
        let count = total / ep;
        Ok(Self {
            first: exchange.index() * count,
            count,
            exchange,
        })
    }

    pub fn holds(&self, expert: usize) -> bool {
        (self.first..self.first + self.count).contains(&expert)
    }
}

/// The trivial group of one rank (tests, single process).
pub struct LocalExchange;

impl RowExchange for LocalExchange {
    fn size(&self) -> usize {
        1
    }
    fn index(&self) -> usize {
        0
    }
    fn host(&self, parts: Vec<Vec<u8>>) -> anyhow::Result<Vec<Vec<u8>>> {
        Ok(parts)
    }
}

/// A group exchange over a collective that spans the whole job: every rank of the job takes
/// part in each exchange (all groups exchange at the same moment), sending nothing to ranks
/// outside its group. The CPU test vehicle; NCCL has its own.
pub struct CollectiveExchange {
    comm: Mutex<Box<dyn Collective>>,
    members: Vec<usize>,
    index: usize,
}

impl CollectiveExchange {
    pub fn new(comm: Box<dyn Collective>, members: Vec<usize>) -> anyhow::Result<Self> {
        let index = members
            .iter()
            .position(|&m| m == comm.rank())
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "rank {} is not in its expert group {members:?}",
                    comm.rank()
                )
            })?;
        Ok(Self {
            comm: Mutex::new(comm),
            members,
            index,
        })
    }
}

impl RowExchange for CollectiveExchange {
    fn size(&self) -> usize {
        self.members.len()
    }
    fn index(&self) -> usize {
        self.index
    }
    fn host(&self, parts: Vec<Vec<u8>>) -> anyhow::Result<Vec<Vec<u8>>> {
        let mut comm = self
            .comm
            .lock()
            .map_err(|_| anyhow::anyhow!("expert exchange: a previous exchange panicked"))?;
        let mut global = vec![vec![]; comm.world()];
        for (part, &m) in parts.into_iter().zip(&self.members) {
            global[m] = part;
        }
        let got = comm.all_to_all(global)?;
        Ok(self.members.iter().map(|&m| got[m].clone()).collect())
    }
}

/// Send consecutive blocks of `send[i]` rows of `x` ([S, D]) to group index i; returns the
/// received rows ([sum recv, D]), blocks in group order. Differentiable.
pub fn all_to_all_rows(
    x: &Tensor,
    exchange: &Arc<dyn RowExchange>,
    send: &[usize],
    recv: &[usize],
) -> candle_core::Result<Tensor> {
    all_to_all_rows_counted(x, exchange, send, recv, &EXCHANGE_BYTES)
}

/// `all_to_all_rows`, counting the bytes sent to other ranks in `sent` (expert parallelism
/// counts its own; context parallelism its own).
pub fn all_to_all_rows_counted(
    x: &Tensor,
    exchange: &Arc<dyn RowExchange>,
    send: &[usize],
    recv: &[usize],
    sent: &'static AtomicU64,
) -> candle_core::Result<Tensor> {
    let rows: usize = send.iter().sum();
    if x.dim(0)? != rows {
        candle_core::bail!(
            "all_to_all_rows: {} rows but the send counts add up to {rows}",
            x.dim(0)?
        );
    }
    x.contiguous()?.apply_op1(AllToAllRows {
        exchange: exchange.clone(),
        send: send.to_vec(),
        recv: recv.to_vec(),
        sent,
    })
}

struct AllToAllRows {
    exchange: Arc<dyn RowExchange>,
    send: Vec<usize>,
    recv: Vec<usize>,
    sent: &'static AtomicU64,
}

fn to_le_bytes(s: &CpuStorage, start: usize, len: usize) -> candle_core::Result<Vec<u8>> {
    Ok(match s {
        CpuStorage::F32(v) => v[start..start + len]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        CpuStorage::F64(v) => v[start..start + len]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        CpuStorage::BF16(v) => v[start..start + len]
            .iter()
            .flat_map(|x| x.to_bits().to_le_bytes())
            .collect(),
        CpuStorage::F16(v) => v[start..start + len]
            .iter()
            .flat_map(|x| x.to_bits().to_le_bytes())
            .collect(),
        CpuStorage::U32(v) => v[start..start + len]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        // FP8 codes (the MoE's FP8 dispatch): one byte each.
        CpuStorage::F8E4M3(v) => v[start..start + len].iter().map(|x| x.to_bits()).collect(),
        other => candle_core::bail!(
            "all_to_all_rows: dtype {:?} is not exchanged",
            other.dtype()
        ),
    })
}

fn from_le_bytes(dtype: DType, b: &[u8]) -> candle_core::Result<CpuStorage> {
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4")))
                .collect(),
        ),
        DType::F64 => CpuStorage::F64(
            b.chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8")))
                .collect(),
        ),
        DType::BF16 => CpuStorage::BF16(
            b.chunks_exact(2)
                .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
        ),
        DType::F16 => CpuStorage::F16(
            b.chunks_exact(2)
                .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
        ),
        DType::U32 => CpuStorage::U32(
            b.chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().expect("4")))
                .collect(),
        ),
        DType::F8E4M3 => {
            CpuStorage::F8E4M3(b.iter().map(|&x| float8::F8E4M3::from_bits(x)).collect())
        }
        other => candle_core::bail!("all_to_all_rows: dtype {other:?} is not exchanged"),
    })
}

impl AllToAllRows {
    fn out_shape(&self, layout: &Layout) -> candle_core::Result<(Shape, usize)> {
        let dims = layout.dims();
        let row: usize = dims[1..].iter().product();
        let mut out = dims.to_vec();
        out[0] = self.recv.iter().sum();
        Ok((Shape::from(out), row))
    }
}

impl AllToAllRows {
    /// Count the bytes leaving this rank: the blocks for the other group indices.
    fn count_sent(&self, row_elems: usize, dtype: DType) {
        let me = self.exchange.index();
        let rows: usize = self
            .send
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != me)
            .map(|(_, &n)| n)
            .sum();
        let bytes = rows * row_elems * dtype.size_in_bytes();
        self.sent.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

impl CustomOp1 for AllToAllRows {
    fn name(&self) -> &'static str {
        "all-to-all-rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (shape, row) = self.out_shape(layout)?;
        let Some((start, _)) = layout.contiguous_offsets() else {
            candle_core::bail!("all_to_all_rows needs a contiguous input")
        };
        let mut parts = Vec::with_capacity(self.send.len());
        let mut at = start;
        for &n in &self.send {
            parts.push(to_le_bytes(s, at, n * row)?);
            at += n * row;
        }
        self.count_sent(row, s.dtype());
        let got = timed(|| self.exchange.host(parts))
            .map_err(|e| candle_core::Error::Msg(format!("row exchange: {e:#}")))?;
        let elem = s.dtype().size_in_bytes();
        for (i, (g, &n)) in got.iter().zip(&self.recv).enumerate() {
            if g.len() != n * row * elem {
                candle_core::bail!(
                    "expert exchange: group rank {i} sent {} bytes, expected {} rows of {row}",
                    g.len(),
                    n
                );
            }
        }
        Ok((from_le_bytes(s.dtype(), &got.concat())?, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendDevice;
        let (shape, row) = self.out_shape(layout)?;
        self.count_sent(row, s.dtype());
        // Synchronised on both sides so that the time is the exchange's alone.
        s.device().synchronize()?;
        let out = timed(|| -> candle_core::Result<_> {
            let out = self
                .exchange
                .device(s, layout, s.dtype(), &self.send, &self.recv, row)?;
            s.device().synchronize()?;
            Ok(out)
        })?;
        Ok((out, shape))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        // The rows came from where the gradient must go: the same exchange, reversed.
        grad.contiguous()?
            .apply_op1(AllToAllRows {
                exchange: self.exchange.clone(),
                send: self.recv.clone(),
                recv: self.send.clone(),
                sent: self.sent,
            })
            .map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two ranks seen from rank 0, the partner sending back what it got (same block sizes).
    struct Echo;

    impl RowExchange for Echo {
        fn size(&self) -> usize {
            2
        }
        fn index(&self) -> usize {
            0
        }
        fn host(&self, parts: Vec<Vec<u8>>) -> anyhow::Result<Vec<Vec<u8>>> {
            Ok(parts)
        }
    }

    #[test]
    fn the_bytes_sent_to_other_ranks_are_counted_both_ways() {
        let exchange: Arc<dyn RowExchange> = Arc::new(Echo);
        let x = candle_core::Var::new(
            (0..32).map(|v| v as f32).collect::<Vec<_>>(),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let x2 = x.as_tensor().reshape((8, 4)).unwrap();
        take_exchange_bytes();
        // 3 rows stay on this rank, 5 rows of 4 f32 leave it: 80 bytes.
        let y = all_to_all_rows(&x2, &exchange, &[3, 5], &[3, 5]).unwrap();
        assert_eq!(y.to_vec2::<f32>().unwrap(), x2.to_vec2::<f32>().unwrap());
        assert_eq!(take_exchange_bytes(), 80);
        // The backward sends the gradient of those rows back the same way.
        y.sum_all().unwrap().backward().unwrap();
        assert_eq!(take_exchange_bytes(), 80);
    }
}
