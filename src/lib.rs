//! dsa-train: continued pre-training of DeepSeek-V3.1-Terminus with DeepSeek Sparse Attention.
//!
//! Module map, in dependency order:
//! - `config`: the checkpoint's config.json, validated; `cuda_runtime`: driver settings per GPU.
//! - `fp8`, `checkpoint`, `hf_writer`: FP8 block codec; reading and writing HF safetensors.
//! - `weights`: the one table of tensor names and shapes; indexer initialisation; loading.
//! - `ops`, `rope`, `rows`: differentiable building blocks, YaRN RoPE tables, row gathers
//!   and sums with a parallel deterministic adjoint.
//! - `dsa`, `losses`, `grad_rows`: top-k selection and recall; the LM and indexer KL losses;
//!   the LM head's and embedding's weight gradients a block of rows at a time.
//! - `model`: MLA (dense and absorbed sparse), the lightning indexer, MoE, the decoder.
//! - `data`, `eval`, `tiny`: token data (prepare, stream, sampler), the `eval` command, the
//!   generated tiny checkpoint.
//! - `recipe`, `train`: TOML recipes; the two DSA stages, optimizer, checkpoints (verified,
//!   `train::integrity`), the run folder (`train::run_dir`), `check`.
//! - `export`, `plot`: writing a V3.2-Exp checkpoint; drawing a run's metrics.jsonl.
//! - `bench`, `profile`: benchmarks; `DSA_PROFILE=1` time per named region of a step, the
//!   median timer and device-memory readings the benchmarks share.
//! - `paths`: one spelling per place on disk (resolved, relative).
//! - `signals`: stop requests (SIGINT, SIGTERM, SIGUSR1, SIGHUP, SIGPIPE) for `train` and
//!   `data prepare`; `elog!`: log lines that never panic.

// Lints this codebase departs from on purpose: `!(x > 0.0)` comparisons reject NaN with the
// rest; kernels' and backwards' argument lists mirror their maths; doc lists wrap without
// indentation; `vec![0..n]` is a list of row ranges that ZeRO later splits.
#![allow(
    clippy::neg_cmp_op_on_partial_ord,
    clippy::too_many_arguments,
    clippy::type_complexity,
    clippy::doc_lazy_continuation,
    clippy::single_range_in_vec_init
)]

/// A line on stderr that never panics: a closed pipe (`| head`, a killed `tee`) or a full
/// disk (`2>/dev/full`) loses the line, never the run.
#[macro_export]
macro_rules! elog {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod cuda_runtime;
pub mod data;
pub mod dist;
pub mod dsa;
pub mod eval;
pub mod export;
pub mod fp8;
pub mod gpu_check;
pub mod grad_rows;
pub mod hf_writer;
pub mod init;
pub mod kernels;
pub mod losses;
pub mod model;
pub mod ops;
pub mod paths;
pub mod plot;
pub mod profile;
pub mod recipe;
pub mod rng;
pub mod rope;
pub mod rows;
pub mod signals;
pub mod tiny;
pub mod train;
pub mod weights;

use anyhow::{bail, Result};
use candle_core::{DType, Device};

/// Parse a `--device` value: `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = match s.strip_prefix("cuda:") {
                Some(n) => n
                    .parse()
                    .map_err(|_| anyhow::anyhow!("--device {s}: expected cuda:N"))?,
                None => 0,
            };
            if !cfg!(feature = "cuda") {
                bail!("--device {s}: this binary was built without the `cuda` feature (cargo build --release --features cuda)");
            }
            // One Device (one CUDA stream) per GPU for the whole process, so that the
            // trainer's work and NCCL's are ordered on the same stream.
            static DEVICES: std::sync::Mutex<Vec<(usize, Device)>> =
                std::sync::Mutex::new(Vec::new());
            let mut known = DEVICES
                .lock()
                .map_err(|_| anyhow::anyhow!("device table poisoned"))?;
            if let Some((_, d)) = known.iter().find(|(o, _)| *o == ordinal) {
                return Ok(d.clone());
            }
            let d = Device::new_cuda(ordinal)?;
            cuda_runtime::configure(&d)?;
            known.push((ordinal, d.clone()));
            Ok(d)
        }
        other => bail!("--device {other}: expected cpu, cuda or cuda:N"),
    }
}

/// Parse a `--dtype` value.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        other => bail!("--dtype {other}: expected f32 or bf16"),
    }
}
