//! NCCL between GPU ranks (cudarc's bindings; libnccl is opened at the first collective).
//!
//! The TCP star of `tcp` still does the rendezvous and carries the small host messages (stop
//! flags, losses, loads, ZeRO-1 gathers); NCCL carries the gradient sums and the expert
//! exchange, the traffic that grows with the model. A communicator is made per group of ranks
//! the first time that group is used: its first member draws the NCCL unique id and the TCP
//! star hands it to the others (every rank is inside such a call at the same moment, as each
//! belongs to exactly one group of a partition).
//!
//! Numerics: NCCL's ring sums are the same on every rank of a group but their order is not
//! rank order, so results differ from the CPU backend's in the last bits.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits,
};
use candle_core::cuda_backend::cudarc::nccl::safe::{
    group_end, group_start, Comm, Id, NcclType, ReduceOp,
};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaDevice, CudaStorage, DType, Layout};

use super::expert::RowExchange;
use super::tcp::TcpCollective;
use super::Collective;

/// An NCCL communicator. NCCL allows one thread at a time per communicator; the Mutex
/// around every use gives that, which is why moving it between threads is sound.
struct SharedComm(Mutex<Comm>);
unsafe impl Send for SharedComm {}
unsafe impl Sync for SharedComm {}

pub struct NcclCollective {
    host: TcpCollective,
    device: CudaDevice,
    groups: HashMap<Vec<usize>, Arc<SharedComm>>,
}

fn nccl_err(what: &str, e: impl std::fmt::Debug) -> anyhow::Error {
    anyhow!("NCCL {what} failed: {e:?} (set NCCL_DEBUG=INFO for NCCL's own account)")
}

/// cudarc opens libnccl by the names `libnccl.so`, `libnccl.so.<CUDA major>`, ... but not
/// `libnccl.so.2`, the only name many systems ship; a missing library would panic inside
/// cudarc at the first collective, so look first and say what to do.
pub fn check_library() -> Result<()> {
    let names = [
        "libnccl.so",
        "libnccl.so.13",
        "libnccl.so.12",
        "libnccl.so.11",
        "libnccl.so.1",
    ];
    let mut dirs: Vec<std::path::PathBuf> = std::env::var("LD_LIBRARY_PATH")
        .unwrap_or_default()
        .split(':')
        .filter(|d| !d.is_empty())
        .map(Into::into)
        .collect();
    dirs.extend(
        [
            "/lib/x86_64-linux-gnu",
            "/usr/lib/x86_64-linux-gnu",
            "/lib64",
            "/usr/lib64",
            "/usr/lib",
            "/usr/local/cuda/lib64",
        ]
        .map(Into::into),
    );
    if dirs
        .iter()
        .any(|d| names.iter().any(|n| d.join(n).exists()))
    {
        return Ok(());
    }
    let so2 = dirs
        .iter()
        .map(|d| d.join("libnccl.so.2"))
        .find(|p| p.exists());
    match so2 {
        Some(p) => bail!(
            "NCCL: found {} but not libnccl.so, the name the binary opens: `mkdir -p ~/nccl-lib && ln -sf {} ~/nccl-lib/libnccl.so` and add ~/nccl-lib to LD_LIBRARY_PATH (scripts/slurm/train.sbatch and scripts/gpu/run_parallel.sh do this)",
            p.display(), p.display()
        ),
        None => bail!("NCCL: no libnccl.so in LD_LIBRARY_PATH or the system library folders; install NCCL or add its lib folder to LD_LIBRARY_PATH"),
    }
}

impl NcclCollective {
    pub fn new(host: TcpCollective, device: CudaDevice) -> Self {
        Self {
            host,
            device,
            groups: HashMap::new(),
        }
    }

    fn stream(&self) -> Arc<CudaStream> {
        self.device.cuda_stream()
    }

    /// This rank's communicator for `members`, made on first use.
    fn comm(&mut self, members: &[usize]) -> Result<Arc<SharedComm>> {
        if let Some(c) = self.groups.get(members) {
            return Ok(c.clone());
        }
        // NCCL allocates its buffers outside the memory pool, which keeps freed memory
        // (`cuda_runtime`): hand that back first so the communicator finds room.
        crate::cuda_runtime::trim_pools();
        let me = self.host.rank();
        let index = members
            .iter()
            .position(|&m| m == me)
            .with_context(|| format!("rank {me} is not in the group {members:?}"))?;
        let leader = members[0];
        let mine: Vec<u8> = if me == leader {
            let id = Id::new().map_err(|e| nccl_err("unique id", e))?;
            id.internal().iter().map(|&c| c as u8).collect()
        } else {
            vec![]
        };
        let all = self.host.all_gather(&mine)?;
        let bytes = &all[leader];
        if bytes.len() != 128 {
            bail!(
                "NCCL rendezvous: rank {leader} sent an id of {} bytes",
                bytes.len()
            );
        }
        let mut internal = [0 as std::ffi::c_char; 128];
        for (d, &b) in internal.iter_mut().zip(bytes) {
            *d = b as std::ffi::c_char;
        }
        // NCCL takes the thread's current device: make it this rank's GPU.
        self.stream()
            .context()
            .bind_to_thread()
            .map_err(|e| nccl_err("binding the GPU", e))?;
        let comm = Comm::from_rank(self.stream(), index, members.len(), Id::uninit(internal))
            .map_err(|e| nccl_err(&format!("communicator for ranks {members:?}"), e))?;
        let c = Arc::new(SharedComm(Mutex::new(comm)));
        self.groups.insert(members.to_vec(), c.clone());
        Ok(c)
    }
}

impl Collective for NcclCollective {
    fn backend(&self) -> &'static str {
        "NCCL"
    }
    fn rank(&self) -> usize {
        self.host.rank()
    }
    fn world(&self) -> usize {
        self.host.world()
    }
    fn all_gather(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.host.all_gather(mine)
    }

    /// The sum on the GPU: host values up, NCCL all-reduce, values down.
    fn all_reduce_sum_among(&mut self, buf: &mut [f32], members: &[usize]) -> Result<()> {
        if members.len() == 1 || buf.is_empty() {
            return Ok(());
        }
        let comm = self.comm(members)?;
        let stream = self.stream();
        let mut d = stream.clone_htod(buf).map_err(|e| nccl_err("upload", e))?;
        comm.0
            .lock()
            .map_err(|_| anyhow!("NCCL communicator poisoned"))?
            .all_reduce_in_place(&mut d, &ReduceOp::Sum)
            .map_err(|e| nccl_err("all-reduce", e))?;
        let back = stream.clone_dtoh(&d).map_err(|e| nccl_err("download", e))?;
        buf.copy_from_slice(&back);
        Ok(())
    }

    /// On the GPU: NCCL all-reduce from the tensor's memory into a new buffer.
    fn all_reduce_tensor_among(
        &mut self,
        t: &candle_core::Tensor,
        members: &[usize],
    ) -> Result<candle_core::Tensor> {
        if members.len() == 1 {
            return Ok(t.clone());
        }
        if !t.device().is_cuda() || t.dtype() != DType::F32 {
            let mut v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            self.all_reduce_sum_among(&mut v, members)?;
            return Ok(candle_core::Tensor::from_vec(v, t.shape(), t.device())?);
        }
        let comm = self.comm(members)?;
        Ok(t.contiguous()?.apply_op1_no_bwd(&AllReduceSum { comm })?)
    }

    fn row_exchange(&mut self, members: &[usize]) -> Result<Arc<dyn RowExchange>> {
        let comm = self.comm(members)?;
        let index = members
            .iter()
            .position(|&m| m == self.rank())
            .expect("checked by comm()");
        Ok(Arc::new(NcclExchange {
            comm,
            index,
            size: members.len(),
            stream: self.stream(),
        }))
    }
}

/// NCCL sum of an f32 tensor as a candle op (its output is a new device buffer).
struct AllReduceSum {
    comm: Arc<SharedComm>,
}

impl candle_core::CustomOp1 for AllReduceSum {
    fn name(&self) -> &'static str {
        "nccl-all-reduce-sum"
    }
    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        candle_core::bail!("nccl-all-reduce-sum runs on GPU tensors only")
    }
    fn cuda_fwd(
        &self,
        s: &CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(CudaStorage, candle_core::Shape)> {
        let run = || -> Result<CudaStorage> {
            let n = l.shape().elem_count();
            let src = s
                .as_cuda_slice::<f32>()?
                .slice(l.start_offset()..l.start_offset() + n);
            let comm = self
                .comm
                .0
                .lock()
                .map_err(|_| anyhow!("NCCL communicator poisoned"))?;
            let stream = comm.stream();
            stream
                .context()
                .bind_to_thread()
                .map_err(|e| nccl_err("binding the GPU", e))?;
            let mut out = stream
                .alloc_zeros::<f32>(n.max(1))
                .map_err(|e| nccl_err("alloc", e))?;
            comm.all_reduce(&src, &mut out, &ReduceOp::Sum)
                .map_err(|e| nccl_err("all-reduce", e))?;
            Ok(CudaStorage::wrap_cuda_slice(out, s.device.clone()))
        };
        let out = run().map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
        Ok((out, l.shape().clone()))
    }
}

struct NcclExchange {
    comm: Arc<SharedComm>,
    index: usize,
    size: usize,
    stream: Arc<CudaStream>,
}

impl NcclExchange {
    /// Grouped point-to-point: block i of `src` (`send[i]` elements) to peer i, block i of the
    /// result (`recv[i]` elements) from peer i.
    fn exchange<T: NcclType + DeviceRepr + ValidAsZeroBits>(
        &self,
        src: &candle_core::cuda_backend::cudarc::driver::CudaView<'_, T>,
        send: &[usize],
        recv: &[usize],
    ) -> Result<CudaSlice<T>> {
        let total: usize = recv.iter().sum();
        // Not zeroed: the receives below write every element of 0..total (the one extra
        // element of an empty result is never read).
        let mut out =
            unsafe { self.stream.alloc::<T>(total.max(1)) }.map_err(|e| nccl_err("alloc", e))?;
        self.exchange_into(src, send, recv, &mut out.as_view_mut())?;
        Ok(out)
    }

    /// `exchange`, receiving into `out` (at least the sum of `recv` elements).
    fn exchange_into<T: NcclType + DeviceRepr + ValidAsZeroBits>(
        &self,
        src: &candle_core::cuda_backend::cudarc::driver::CudaView<'_, T>,
        send: &[usize],
        recv: &[usize],
        out: &mut candle_core::cuda_backend::cudarc::driver::CudaViewMut<'_, T>,
    ) -> Result<()> {
        let comm = self
            .comm
            .0
            .lock()
            .map_err(|_| anyhow!("NCCL communicator poisoned"))?;
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| nccl_err("binding the GPU", e))?;
        group_start().map_err(|e| nccl_err("group start", e))?;
        let posted = (|| -> Result<()> {
            let (mut s_at, mut r_at) = (0, 0);
            for peer in 0..self.size {
                if send[peer] > 0 {
                    comm.send(&src.slice(s_at..s_at + send[peer]), peer as i32)
                        .map_err(|e| nccl_err("send", e))?;
                }
                if recv[peer] > 0 {
                    comm.recv(&mut out.slice_mut(r_at..r_at + recv[peer]), peer as i32)
                        .map_err(|e| nccl_err("recv", e))?;
                }
                s_at += send[peer];
                r_at += recv[peer];
            }
            Ok(())
        })();
        // Closed whatever happened, so a failed post does not leave the group open.
        let closed = group_end().map_err(|e| nccl_err("group end", e));
        posted?;
        closed?;
        Ok(())
    }

    /// FP8 rows (the MoE's FP8 dispatch) travel as bytes: NCCL has no e4m3 type, and the
    /// codes are moved, not reduced.
    fn fp8_rows(
        &self,
        x: &CudaStorage,
        layout: &Layout,
        send: &[usize],
        recv: &[usize],
        row: usize,
    ) -> Result<CudaStorage> {
        let src = x
            .as_cuda_slice::<float8::F8E4M3>()?
            .slice(layout.start_offset()..);
        let bytes = unsafe { src.transmute::<u8>(src.len()) }
            .ok_or_else(|| anyhow!("FP8 rows as bytes"))?;
        let scale = |v: &[usize]| v.iter().map(|n| n * row).collect::<Vec<_>>();
        let total = recv.iter().sum::<usize>() * row;
        let mut out = unsafe { self.stream.alloc::<float8::F8E4M3>(total.max(1)) }
            .map_err(|e| nccl_err("alloc", e))?;
        {
            let mut out_bytes = unsafe { out.transmute_mut::<u8>(total.max(1)) }
                .ok_or_else(|| anyhow!("FP8 rows as bytes"))?;
            self.exchange_into(&bytes, &scale(send), &scale(recv), &mut out_bytes)?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, x.device().clone()))
    }

    fn rows<T: NcclType + DeviceRepr + ValidAsZeroBits + CudaDType>(
        &self,
        x: &CudaStorage,
        layout: &Layout,
        send: &[usize],
        recv: &[usize],
        row: usize,
    ) -> Result<CudaStorage> {
        let src = x.as_cuda_slice::<T>()?.slice(layout.start_offset()..);
        let scale = |v: &[usize]| v.iter().map(|n| n * row).collect::<Vec<_>>();
        // With nothing to receive the buffer has one unused element (no zero-size
        // allocations); the tensor's shape [0, D] never reads it.
        let out = self.exchange(&src, &scale(send), &scale(recv))?;
        Ok(CudaStorage::wrap_cuda_slice(out, x.device().clone()))
    }
}

impl RowExchange for NcclExchange {
    fn size(&self) -> usize {
        self.size
    }
    fn index(&self) -> usize {
        self.index
    }

    /// Host bytes through the GPU: the lengths first (fixed size), then the bytes.
    fn host(&self, parts: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
        let lens: Vec<u64> = parts.iter().map(|p| p.len() as u64).collect();
        let d_lens = self
            .stream
            .clone_htod(&lens)
            .map_err(|e| nccl_err("upload", e))?;
        let got_lens =
            self.exchange(&d_lens.slice(..), &vec![1; self.size], &vec![1; self.size])?;
        let got_lens: Vec<usize> = self
            .stream
            .clone_dtoh(&got_lens)
            .map_err(|e| nccl_err("download", e))?
            .into_iter()
            .map(|n| n as usize)
            .collect();
        let flat: Vec<u8> = parts.concat();
        let d_flat = self
            .stream
            .clone_htod(if flat.is_empty() {
                &[0u8][..]
            } else {
                &flat[..]
            })
            .map_err(|e| nccl_err("upload", e))?;
        let send: Vec<usize> = parts.iter().map(Vec::len).collect();
        let got = self.exchange(&d_flat.slice(..), &send, &got_lens)?;
        let got = self
            .stream
            .clone_dtoh(&got)
            .map_err(|e| nccl_err("download", e))?;
        let mut out = Vec::with_capacity(self.size);
        let mut at = 0;
        for n in got_lens {
            out.push(got[at..at + n].to_vec());
            at += n;
        }
        Ok(out)
    }

    fn device(
        &self,
        x: &CudaStorage,
        layout: &Layout,
        dtype: DType,
        send: &[usize],
        recv: &[usize],
        row: usize,
    ) -> candle_core::Result<CudaStorage> {
        let r = match dtype {
            DType::BF16 => self.rows::<half::bf16>(x, layout, send, recv, row),
            DType::F16 => self.rows::<half::f16>(x, layout, send, recv, row),
            DType::F32 => self.rows::<f32>(x, layout, send, recv, row),
            DType::F8E4M3 => self.fp8_rows(x, layout, send, recv, row),
            other => Err(anyhow!("expert exchange: dtype {other:?} is not exchanged")),
        };
        r.map_err(|e| candle_core::Error::Msg(format!("{e:#}")))
    }
}
