//! Per-step metrics: one JSON object per line in `<output_dir>/metrics.jsonl`.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepMetrics {
    /// Optimizer steps completed, including this one.
    pub step: u64,
    pub stage: String,
    /// Mean next-token cross-entropy of the step's tokens (sparse stage only).
    pub lm_loss: Option<f64>,
    /// Mean over main layers of the per-query indexer KL, averaged over the step's tokens.
    pub indexer_kl: f64,
    pub lr: f64,
    pub indexer_lr: f64,
    /// Gradient norm (before clipping) of the group this stage trains by its main loss: the
    /// indexer in warm-up, the main model in the sparse stage.
    pub grad_norm: f64,
    pub indexer_grad_norm: f64,
    /// Tokens consumed so far.
    pub tokens: u64,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
    /// Seconds of the step spent in the trainer's collectives between ranks (gradient sums,
    /// ZeRO-1 parameter gathers, stop flags); 0 in a single process.
    #[serde(default)]
    pub comm_s: f64,
    /// Seconds in the expert-parallel exchanges (row counts and token rows, forward and
    /// backward; on GPUs timed between device synchronisations); 0 without ep.
    #[serde(default)]
    pub exchange_s: f64,
    /// Bytes of token rows this rank sent to the other ranks of its expert group in the step's
    /// exchanges; 0 without ep.
    #[serde(default)]
    pub exchange_bytes: u64,
    /// Bytes of latent kv rows, indexer keys and their gradients this rank sent to the other
    /// ranks of its context group in the step; 0 without cp.
    #[serde(default)]
    pub context_bytes: u64,
    /// Bytes of layer weight rows this rank sent to the other holders under ZeRO-3 (each layer
    /// gathered for the first pass and again for the backward); 0 otherwise.
    #[serde(default)]
    pub gather_bytes: u64,
    /// Expert balance: over the MoE layers, the largest ratio of the most-loaded routed
    /// expert's tokens to the mean per expert (1 = perfectly balanced); None without MoE.
    #[serde(default)]
    pub max_expert_load: Option<f64>,
}

/// Over layers, the largest max/mean ratio of per-expert token counts (layers with no routed
/// tokens skipped).
pub fn max_expert_load(loads: &[Vec<u64>]) -> Option<f64> {
    loads
        .iter()
        .filter(|l| !l.is_empty() && l.iter().sum::<u64>() > 0)
        .map(|l| {
            *l.iter().max().unwrap_or(&0) as f64 / (l.iter().sum::<u64>() as f64 / l.len() as f64)
        })
        .max_by(|a, b| a.total_cmp(b))
}

/// Memory in use, GiB: the device's (all of it: allocations and the pools' cached blocks) on a
/// GPU, the process's resident set on the CPU.
pub fn memory_in_use_gib(device: &candle_core::Device) -> Option<f64> {
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        let (free, total) =
            candle_core::cuda_backend::cudarc::driver::result::mem_get_info().ok()?;
        return Some((total - free) as f64 / (1u64 << 30) as f64);
    }
    let _ = device;
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: f64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as f64;
    Some(pages * page / (1u64 << 30) as f64)
}

/// The progress line for logs without a terminal: UTC time, losses, lr, speed, FLOP/s per
/// device (the `check` count of a step's FLOPs over its time), memory and expert balance.
pub fn log_line(
    m: &StepMetrics,
    steps: u64,
    flops_per_device_step: Option<f64>,
    mem_gib: Option<f64>,
) -> String {
    let mut s = format!(
        "{} step {}/{steps}",
        super::run_dir::utc_time(std::time::SystemTime::now()),
        m.step
    );
    if let Some(l) = m.lm_loss {
        s += &format!(" lm {l:.4}");
    }
    s += &format!(
        " kl {:.4} lr {:.2e} | {:.0} ms/step {:.0} tok/s",
        m.indexer_kl,
        m.lr,
        m.elapsed_s * 1e3,
        m.tokens_per_s
    );
    if let Some(f) = flops_per_device_step {
        let rate = f / m.elapsed_s;
        s += &if rate >= 1e12 {
            format!(" {:.1} TFLOP/s", rate / 1e12)
        } else {
            format!(" {:.2} GFLOP/s", rate / 1e9)
        };
    }
    if let Some(g) = mem_gib {
        s += &format!(" mem {g:.1} GiB");
    }
    if let Some(e) = m.max_expert_load {
        s += &format!(" expert load max/mean {e:.2}");
    }
    s
}

pub struct MetricsLog {
    path: PathBuf,
}

impl MetricsLog {
    /// Open `<dir>/metrics.jsonl`, dropping lines past `resume_step` (they came from steps after
    /// the checkpoint being resumed, which will be recomputed) and a torn last line. Only a
    /// resume of this folder's own run gets here with lines to drop (`run_dir::start_point`).
    pub fn open(dir: &Path, resume_step: u64) -> Result<Self> {
        let path = dir.join("metrics.jsonl");
        if path.exists() {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let kept: Vec<&str> = text
                .lines()
                .filter(|l| {
                    serde_json::from_str::<StepMetrics>(l).is_ok_and(|m| m.step <= resume_step)
                })
                .collect();
            let mut out = kept.join("\n");
            if !out.is_empty() {
                out.push('\n');
            }
            // Replaced whole: a crash here leaves the old file or the new one, never half.
            let tmp = dir.join(".metrics.jsonl.tmp");
            std::fs::write(&tmp, out)
                .and_then(|()| std::fs::rename(&tmp, &path))
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        Ok(Self { path })
    }

    pub fn append(&self, m: &StepMetrics) -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .with_context(|| format!("cannot open {}", self.path.display()))?;
        writeln!(f, "{}", serde_json::to_string(m)?)
            .with_context(|| format!("cannot write {}", self.path.display()))
    }
}

/// Read a metrics file back (tests, plots).
pub fn read(path: &Path) -> Result<Vec<StepMetrics>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), i + 1))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expert_load_is_the_worst_layer_max_over_mean() {
        assert_eq!(max_expert_load(&[]), None);
        assert_eq!(max_expert_load(&[vec![0, 0]]), None);
        assert_eq!(
            max_expert_load(&[vec![1, 1, 1, 1], vec![4, 0, 0, 0], vec![]]),
            Some(4.0)
        );
        assert_eq!(max_expert_load(&[vec![3, 1]]), Some(1.5));
    }
}
