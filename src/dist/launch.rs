//! Where this process sits in a multi-process job: rank, world size, local rank and the
//! rendezvous address, read from SLURM's variables or from torchrun-style ones.
//!
//! Precedence: torchrun-style variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
//! MASTER_PORT) when RANK and WORLD_SIZE are set, since a launcher that sets them knows best;
//! otherwise SLURM's (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, the first host of
//! SLURM_JOB_NODELIST, MASTER_PORT or a port derived from SLURM_JOB_ID); otherwise a single
//! process.

use anyhow::{bail, Context, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    /// Rendezvous host and port (rank 0 listens there).
    pub master_addr: String,
    pub master_port: u16,
}

impl Launch {
    pub fn single() -> Self {
        Self {
            rank: 0,
            world: 1,
            local_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: 0,
        }
    }

    /// Read the job layout from the environment.
    pub fn from_env() -> Result<Self> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// `from_env` over any variable source (tests pass a map).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let num = |k: &str| -> Result<Option<usize>> {
            match var(k) {
                None => Ok(None),
                Some(v) => v
                    .trim()
                    .parse()
                    .map(Some)
                    .with_context(|| format!("environment variable {k}={v:?} is not a number")),
            }
        };
        let port = |default: Option<u16>| -> Result<u16> {
            match var("MASTER_PORT") {
                Some(v) => v.trim().parse().with_context(|| {
                    format!("environment variable MASTER_PORT={v:?} is not a port number")
                }),
                None => default.context("MASTER_PORT is not set"),
            }
        };
        let launch = if let (Some(rank), Some(world)) = (num("RANK")?, num("WORLD_SIZE")?) {
            Launch {
                rank,
                world,
                local_rank: num("LOCAL_RANK")?.unwrap_or(rank),
                master_addr: var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into()),
                master_port: if world > 1 {
                    port(None).context("torchrun-style launch (RANK, WORLD_SIZE set)")?
                } else {
                    0
                },
            }
        } else if let (Some(rank), Some(world)) = (num("SLURM_PROCID")?, num("SLURM_NTASKS")?) {
            let nodelist = var("SLURM_JOB_NODELIST")
                .or_else(|| var("SLURM_NODELIST"))
                .unwrap_or_else(|| "localhost".into());
            // A port from the job id keeps two jobs sharing a node apart (29500-30499).
            let derived = num("SLURM_JOB_ID")?
                .map(|id| 29500 + (id % 1000) as u16)
                .unwrap_or(29500);
            Launch {
                rank,
                world,
                local_rank: num("SLURM_LOCALID")?.unwrap_or(0),
                master_addr: var("MASTER_ADDR").unwrap_or(first_host(&nodelist)?),
                master_port: port(Some(derived))?,
            }
        } else {
            Launch::single()
        };
        if launch.world == 0 || launch.rank >= launch.world {
            bail!(
                "rank {} is not below the world size {}",
                launch.rank,
                launch.world
            );
        }
        Ok(launch)
    }
}

/// The first host of a SLURM node list: "gpu[003-005,010],login1" -> "gpu003".
pub fn first_host(nodelist: &str) -> Result<String> {
    let first = nodelist.trim();
    let (prefix, rest) = match first.find('[') {
        Some(i) if first[..i].find(',').is_none() => (&first[..i], &first[i + 1..]),
        _ => return Ok(first.split(',').next().unwrap_or_default().to_string()),
    };
    let inner = rest
        .split(']')
        .next()
        .with_context(|| format!("SLURM node list {nodelist:?}: unclosed '['"))?;
    let range = inner.split(',').next().unwrap_or_default();
    let start = range.split('-').next().unwrap_or_default();
    if start.is_empty() {
        bail!("SLURM node list {nodelist:?}: empty range");
    }
    Ok(format!("{prefix}{start}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn node_lists_give_their_first_host() {
        assert_eq!(first_host("gpu[003-005,010],login1").unwrap(), "gpu003");
        assert_eq!(first_host("node7").unwrap(), "node7");
        assert_eq!(first_host("a1,b[1-2]").unwrap(), "a1");
        assert_eq!(first_host("n[12]").unwrap(), "n12");
        assert!(first_host("n[").is_err());
    }

    #[test]
    fn torchrun_then_slurm_then_single() {
        let t = Launch::from_vars(vars(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "1234"),
        ]))
        .unwrap();
        assert_eq!(
            t,
            Launch {
                rank: 1,
                world: 2,
                local_rank: 1,
                master_addr: "h".into(),
                master_port: 1234
            }
        );
        let s = Launch::from_vars(vars(&[
            ("SLURM_PROCID", "3"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "3"),
            ("SLURM_JOB_NODELIST", "gpu[01-02]"),
            ("SLURM_JOB_ID", "4242"),
        ]))
        .unwrap();
        assert_eq!(
            s,
            Launch {
                rank: 3,
                world: 8,
                local_rank: 3,
                master_addr: "gpu01".into(),
                master_port: 29742
            }
        );
        assert_eq!(Launch::from_vars(vars(&[])).unwrap(), Launch::single());
        let err = Launch::from_vars(vars(&[
            ("RANK", "2"),
            ("WORLD_SIZE", "2"),
            ("MASTER_PORT", "1"),
        ]))
        .unwrap_err();
        assert!(format!("{err:#}").contains("rank 2 is not below the world size 2"));
        let err = Launch::from_vars(vars(&[("RANK", "0"), ("WORLD_SIZE", "2")])).unwrap_err();
        assert!(format!("{err:#}").contains("MASTER_PORT"), "{err:#}");
    }
}
