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
            let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
            let kept: Vec<&str> = text
                .lines()
                .filter(|l| serde_json::from_str::<StepMetrics>(l).is_ok_and(|m| m.step <= resume_step))
                .collect();
            let mut out = kept.join("\n");
            if !out.is_empty() {
                out.push('\n');
            }
            // Replaced whole: a crash here leaves the old file or the new one, never half.
            let tmp = dir.join(".metrics.jsonl.tmp");
            std::fs::write(&tmp, out).and_then(|()| std::fs::rename(&tmp, &path)).with_context(|| format!("cannot write {}", path.display()))?;
        }
        Ok(Self { path })
    }

    pub fn append(&self, m: &StepMetrics) -> Result<()> {
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&self.path)
            .with_context(|| format!("cannot open {}", self.path.display()))?;
        writeln!(f, "{}", serde_json::to_string(m)?).with_context(|| format!("cannot write {}", self.path.display()))
    }
}

/// Read a metrics file back (tests, plots).
pub fn read(path: &Path) -> Result<Vec<StepMetrics>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), i + 1)))
        .collect()
}
