//! The TCP rendezvous and the CPU collective backend built on it.
//!
//! Rendezvous: rank 0 listens on MASTER_PORT; every other rank connects (retrying until the
//! deadline) and says hello (magic, rank, world). Rank 0 checks that each rank arrives once
//! and that all agree on the world size, then answers every rank with the same payload (the
//! NCCL unique id on GPUs; empty here). An absent rank is named in the error.
//!
//! Collectives (a test vehicle, not a production path): a star through rank 0. Everything is
//! an all-gather: each rank sends its bytes to rank 0, which sends every rank's bytes back in
//! rank order. Reductions then happen on every rank in rank order, so every rank computes
//! bit-identical results and the sum order never depends on timing.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::launch::Launch;
use super::Collective;

const MAGIC: &[u8; 4] = b"DSA1";

pub struct TcpCollective {
    rank: usize,
    world: usize,
    /// Rank 0: one stream per rank (None at index 0). Others: the stream to rank 0 at index 0.
    peers: Vec<Option<TcpStream>>,
    /// What rank 0 handed out at the rendezvous.
    pub payload: Vec<u8>,
    /// The job, for the further connections of expert exchanges.
    launch: Launch,
}

fn write_frame(s: &mut TcpStream, bytes: &[u8]) -> std::io::Result<()> {
    s.write_all(&(bytes.len() as u64).to_le_bytes())?;
    s.write_all(bytes)
}

fn read_frame(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 8];
    s.read_exact(&mut len)?;
    let mut buf = vec![0u8; u64::from_le_bytes(len) as usize];
    s.read_exact(&mut buf)?;
    Ok(buf)
}

/// How long a collective waits for a peer before calling it lost.
fn io_timeout() -> Duration {
    let secs = std::env::var("DSA_COLLECTIVE_TIMEOUT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1800u64);
    Duration::from_secs(secs)
}

impl TcpCollective {
    /// Join the job described by `launch`; `payload` (rank 0's) reaches every rank.
    pub fn rendezvous(launch: &Launch, timeout: Duration, payload: Vec<u8>) -> Result<Self> {
        Self::rendezvous_on(launch, timeout, payload, None)
    }

    /// As `rendezvous`; rank 0 listens on `listener` when given (already bound).
    fn rendezvous_on(
        launch: &Launch,
        timeout: Duration,
        payload: Vec<u8>,
        listener: Option<TcpListener>,
    ) -> Result<Self> {
        let (rank, world) = (launch.rank, launch.world);
        let deadline = Instant::now() + timeout;
        let mut peers: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
        let addr = format!("{}:{}", launch.master_addr, launch.master_port);
        if world == 1 {
            return Ok(Self {
                rank,
                world,
                peers,
                payload,
                launch: launch.clone(),
            });
        }
        let payload = if rank == 0 {
            let listener = match listener {
                Some(l) => l,
                None => TcpListener::bind(("0.0.0.0", launch.master_port)).with_context(|| {
                    format!(
                        "rank 0 cannot listen on port {} (MASTER_PORT; is it in use?)",
                        launch.master_port
                    )
                })?,
            };
            listener.set_nonblocking(true)?;
            let mut arrived = 1;
            while arrived < world {
                match listener.accept() {
                    Ok((mut s, from)) => {
                        s.set_nonblocking(false)?;
                        s.set_read_timeout(Some(Duration::from_secs(30)))?;
                        let hello = read_frame(&mut s)
                            .with_context(|| format!("rendezvous: bad hello from {from}"))?;
                        if hello.len() != 12 || &hello[..4] != MAGIC {
                            bail!(
                                "rendezvous on port {}: {from} is not a dsa-train rank",
                                launch.master_port
                            );
                        }
                        let r = u32::from_le_bytes(hello[4..8].try_into().unwrap()) as usize;
                        let w = u32::from_le_bytes(hello[8..12].try_into().unwrap()) as usize;
                        if w != world {
                            bail!("rendezvous: rank {r} ({from}) says the world size is {w}, rank 0 says {world}");
                        }
                        if r == 0 || r >= world || peers[r].is_some() {
                            bail!("rendezvous: rank {r} ({from}) arrived twice or is out of range for world size {world}");
                        }
                        peers[r] = Some(s);
                        arrived += 1;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() > deadline {
                            let missing: Vec<String> = (1..world)
                                .filter(|r| peers[*r].is_none())
                                .map(|r| r.to_string())
                                .collect();
                            bail!(
                                "rendezvous on port {}: rank(s) {} of {world} did not arrive within {} s",
                                launch.master_port, missing.join(", "), timeout.as_secs()
                            );
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(e).context("rendezvous: accept failed"),
                }
            }
            for s in peers.iter_mut().flatten() {
                write_frame(s, &payload)?;
            }
            payload
        } else {
            let mut stream = loop {
                let target = addr.to_socket_addrs().ok().and_then(|mut a| a.next());
                if let Some(target) = target {
                    if let Ok(s) = TcpStream::connect_timeout(&target, Duration::from_secs(2)) {
                        break s;
                    }
                }
                if Instant::now() > deadline {
                    bail!("rank {rank}: rank 0 at {addr} (MASTER_ADDR:MASTER_PORT) did not answer within {} s", timeout.as_secs());
                }
                std::thread::sleep(Duration::from_millis(200));
            };
            let mut hello = MAGIC.to_vec();
            hello.extend((rank as u32).to_le_bytes());
            hello.extend((world as u32).to_le_bytes());
            write_frame(&mut stream, &hello)?;
            stream.set_read_timeout(Some(
                deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_secs(1)),
            ))?;
            let payload = read_frame(&mut stream).with_context(|| {
                format!("rank {rank}: rank 0 at {addr} did not finish the rendezvous")
            })?;
            peers[0] = Some(stream);
            payload
        };
        for s in peers.iter_mut().flatten() {
            s.set_read_timeout(Some(io_timeout()))?;
            s.set_nodelay(true)?;
        }
        Ok(Self {
            rank,
            world,
            peers,
            payload,
            launch: launch.clone(),
        })
    }

    fn lost(&self, peer: usize, e: std::io::Error) -> anyhow::Error {
        anyhow::anyhow!(
            "rank {}: lost contact with rank {peer} during a collective ({e}); did that rank fail?",
            self.rank
        )
    }
}

impl Collective for TcpCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    /// A second star over the whole job, so that the exchanges inside the model never
    /// interleave with the trainer's own collectives. Rank 0 listens on a port the system
    /// picks and tells the others through the first star (a fixed MASTER_PORT + 1 could be
    /// taken by another job on a shared node).
    fn row_exchange(
        &mut self,
        members: &[usize],
    ) -> Result<std::sync::Arc<dyn super::expert::RowExchange>> {
        let listener = if self.rank == 0 {
            Some(
                TcpListener::bind(("0.0.0.0", 0))
                    .context("rank 0 cannot open a port for the expert exchange")?,
            )
        } else {
            None
        };
        let mut port = match &listener {
            Some(l) => l.local_addr()?.port().to_le_bytes().to_vec(),
            None => vec![],
        };
        self.broadcast(&mut port, 0)?;
        let mut launch = self.launch.clone();
        launch.master_port = u16::from_le_bytes(
            port.as_slice()
                .try_into()
                .context("expert exchange: bad port from rank 0")?,
        );
        let star =
            TcpCollective::rendezvous_on(&launch, super::rendezvous_timeout(), vec![], listener)
                .with_context(|| {
                    format!(
                        "opening the expert exchange on port {} of {}",
                        launch.master_port, launch.master_addr
                    )
                })?;
        Ok(std::sync::Arc::new(super::expert::CollectiveExchange::new(
            Box::new(star),
            members.to_vec(),
        )?))
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_gather(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        if self.world == 1 {
            return Ok(vec![mine.to_vec()]);
        }
        if self.rank == 0 {
            let mut all = vec![mine.to_vec()];
            for r in 1..self.world {
                let s = self.peers[r].as_mut().expect("rank 0 holds every peer");
                let got = read_frame(s).map_err(|e| self.lost(r, e))?;
                all.push(got);
            }
            // One frame back: the count, then each rank's frame.
            let mut packed = Vec::with_capacity(all.iter().map(|a| a.len() + 8).sum());
            for a in &all {
                packed.extend((a.len() as u64).to_le_bytes());
                packed.extend(a);
            }
            for r in 1..self.world {
                let s = self.peers[r].as_mut().expect("rank 0 holds every peer");
                write_frame(s, &packed).map_err(|e| self.lost(r, e))?;
            }
            Ok(all)
        } else {
            let s = self.peers[0].as_mut().expect("a rank holds rank 0");
            write_frame(s, mine).map_err(|e| self.lost(0, e))?;
            let s = self.peers[0].as_mut().expect("a rank holds rank 0");
            let packed = read_frame(s).map_err(|e| self.lost(0, e))?;
            let mut all = Vec::with_capacity(self.world);
            let mut at = 0;
            for _ in 0..self.world {
                let n = u64::from_le_bytes(
                    packed[at..at + 8]
                        .try_into()
                        .context("short all-gather frame")?,
                ) as usize;
                all.push(packed[at + 8..at + 8 + n].to_vec());
                at += 8 + n;
            }
            Ok(all)
        }
    }
}
