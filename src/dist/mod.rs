//! Several processes training one model: the job layout (`launch`), the collectives between
//! ranks (`Collective`; the TCP backend in `tcp`), and the `[parallel]` layout checks.
//!
//! Every collective is defined through `all_gather`; reductions sum in rank order on every
//! rank, so all ranks hold bit-identical results whatever the network timing.

pub mod context;
pub mod expert;
pub mod launch;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod tcp;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};

pub use launch::Launch;

pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;

    /// What carries the traffic, for the logs.
    fn backend(&self) -> &'static str {
        "TCP (CPU memory)"
    }

    /// Every rank's bytes, in rank order.
    fn all_gather(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>>;

    /// Element-wise sum over ranks, added in rank order.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        let all: Vec<usize> = (0..self.world()).collect();
        self.all_reduce_sum_among(buf, &all)
    }

    /// Element-wise sum over the ranks in `members` (ascending, this rank among them), added
    /// in rank order. Every rank of the job calls it at the same moment, each with its own
    /// group (the groups partition the job).
    fn all_reduce_sum_among(&mut self, buf: &mut [f32], members: &[usize]) -> Result<()> {
        if self.world() == 1 {
            return Ok(());
        }
        let bytes: Vec<u8> = buf.iter().flat_map(|x| x.to_le_bytes()).collect();
        let all = self.all_gather(&bytes)?;
        for &r in members {
            if all[r].len() != bytes.len() {
                bail!(
                    "all-reduce: rank {r} sent {} values, rank {} has {}",
                    all[r].len() / 4,
                    self.rank(),
                    buf.len()
                );
            }
        }
        for (i, x) in buf.iter_mut().enumerate() {
            let mut acc = 0f32;
            for &r in members {
                acc += f32::from_le_bytes(all[r][4 * i..4 * i + 4].try_into().expect("4 bytes"));
            }
            *x = acc;
        }
        Ok(())
    }

    /// `t` (f32) summed element-wise over `members`, on `t`'s device. The default goes
    /// through host memory; NCCL sums on the GPU.
    fn all_reduce_tensor_among(
        &mut self,
        t: &candle_core::Tensor,
        members: &[usize],
    ) -> Result<candle_core::Tensor> {
        let mut v = t
            .flatten_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1::<f32>()?;
        self.all_reduce_sum_among(&mut v, members)?;
        Ok(candle_core::Tensor::from_vec(v, t.shape(), t.device())?)
    }

    /// A channel for the token rows of expert parallelism among `members` (this rank among
    /// them). Every rank of the job calls it once, at the same moment.
    fn row_exchange(&mut self, members: &[usize]) -> Result<Arc<dyn expert::RowExchange>>;

    /// Rank `root`'s bytes on every rank.
    fn broadcast(&mut self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
        if self.world() == 1 {
            return Ok(());
        }
        let mine = if self.rank() == root {
            buf.clone()
        } else {
            vec![]
        };
        *buf = self.all_gather(&mine)?.swap_remove(root);
        Ok(())
    }

    /// Send `parts[r]` to rank r; returns what each rank sent to this one, in rank order.
    fn all_to_all(&mut self, parts: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
        let world = self.world();
        if parts.len() != world {
            bail!(
                "all-to-all needs one part per rank ({world}), got {}",
                parts.len()
            );
        }
        let mut packed = vec![];
        for p in &parts {
            packed.extend((p.len() as u64).to_le_bytes());
            packed.extend(p);
        }
        let all = self.all_gather(&packed)?;
        let me = self.rank();
        all.into_iter()
            .map(|from| {
                let mut at = 0;
                for r in 0..world {
                    let n = u64::from_le_bytes(from[at..at + 8].try_into()?) as usize;
                    if r == me {
                        return Ok(from[at + 8..at + 8 + n].to_vec());
                    }
                    at += 8 + n;
                }
                bail!("all-to-all: short frame")
            })
            .collect()
    }

    fn barrier(&mut self) -> Result<()> {
        self.all_gather(&[]).map(|_| ())
    }
}

/// The collectives of a job of one process.
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_gather(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(vec![mine.to_vec()])
    }
    fn row_exchange(&mut self, _members: &[usize]) -> Result<Arc<dyn expert::RowExchange>> {
        Ok(Arc::new(expert::LocalExchange))
    }
}

/// Rendezvous timeout: DSA_RENDEZVOUS_TIMEOUT seconds, default 300.
pub fn rendezvous_timeout() -> Duration {
    Duration::from_secs(
        std::env::var("DSA_RENDEZVOUS_TIMEOUT")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(300),
    )
}

/// The GPU of a rank: `cuda:LOCAL_RANK`, or `cuda:0` where CUDA_VISIBLE_DEVICES leaves each
/// task one GPU (srun --gpus-per-task=1).
pub fn rank_gpu(launch: &Launch) -> String {
    let visible = std::env::var("CUDA_VISIBLE_DEVICES")
        .map(|v| v.split(',').filter(|s| !s.is_empty()).count())
        .unwrap_or(usize::MAX);
    if visible == 1 {
        "cuda:0".into()
    } else {
        format!("cuda:{}", launch.local_rank)
    }
}

/// Join the job the environment describes (a single process needs no network). Ranks on
/// GPUs talk through NCCL when the binary has it, the CPU backend otherwise.
pub fn connect(launch: &Launch, device: &candle_core::Device) -> Result<Box<dyn Collective>> {
    if launch.world == 1 {
        return Ok(Box::new(SingleProcess));
    }
    let star = tcp::TcpCollective::rendezvous(launch, rendezvous_timeout(), vec![])?;
    match device {
        #[cfg(feature = "nccl")]
        candle_core::Device::Cuda(d) => {
            nccl::check_library()?;
            Ok(Box::new(nccl::NcclCollective::new(star, d.clone())))
        }
        #[cfg(not(feature = "nccl"))]
        candle_core::Device::Cuda(_) => {
            crate::elog!("[dist] this binary has no NCCL (build with --features nccl): GPU ranks exchange through the CPU backend");
            Ok(Box::new(star))
        }
        _ => Ok(Box::new(star)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn launch(rank: usize, world: usize, port: u16) -> Launch {
        Launch {
            rank,
            world,
            local_rank: rank,
            master_addr: "127.0.0.1".into(),
            master_port: port,
        }
    }

    #[test]
    fn three_ranks_agree_bit_for_bit() {
        let port = free_port();
        let handles: Vec<_> = (0..3)
            .map(|r| {
                std::thread::spawn(move || {
                    let mut c = tcp::TcpCollective::rendezvous(
                        &launch(r, 3, port),
                        Duration::from_secs(20),
                        b"id".to_vec(),
                    )
                    .unwrap();
                    assert_eq!(c.payload, b"id".to_vec());
                    let mut v = vec![r as f32 + 0.1, 1e-8 * r as f32, -(r as f32)];
                    c.all_reduce_sum(&mut v).unwrap();
                    let mut b = if r == 2 { b"from two".to_vec() } else { vec![] };
                    c.broadcast(&mut b, 2).unwrap();
                    let got = c
                        .all_to_all((0..3).map(|to| vec![r as u8, to as u8]).collect())
                        .unwrap();
                    c.barrier().unwrap();
                    (v, b, got)
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let expect = [0.1f32 + 1.1 + 2.1, 0.0 + 1e-8 + 2e-8, -3.0];
        for (r, (v, b, got)) in results.iter().enumerate() {
            assert_eq!(
                v.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                results[0].0.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
            assert!(
                v.iter().zip(expect).all(|(a, e)| (a - e).abs() < 1e-6),
                "{v:?}"
            );
            assert_eq!(b, b"from two");
            assert_eq!(
                got,
                &(0..3)
                    .map(|from| vec![from as u8, r as u8])
                    .collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn a_missing_rank_is_named() {
        let port = free_port();
        let h = std::thread::spawn(move || {
            tcp::TcpCollective::rendezvous(&launch(1, 3, port), Duration::from_secs(2), vec![])
                .map(|_| ())
        });
        let err =
            tcp::TcpCollective::rendezvous(&launch(0, 3, port), Duration::from_secs(2), vec![])
                .err()
                .expect("rank 2 never comes");
        assert!(
            format!("{err:#}").contains("rank(s) 2 of 3 did not arrive"),
            "{err:#}"
        );
        let _ = h.join();
        let err = tcp::TcpCollective::rendezvous(
            &launch(1, 2, free_port()),
            Duration::from_secs(1),
            vec![],
        )
        .err()
        .expect("no rank 0");
        assert!(
            format!("{err:#}").contains("did not answer within 1 s"),
            "{err:#}"
        );
    }
}
