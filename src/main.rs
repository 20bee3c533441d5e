//! The `dsa-train` command line. Every user error ends as one `error:` line on stderr and exit
//! status 1 (2 for malformed arguments); results go to stdout.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};

use dsa_train::config::IndexerDefaults;
use dsa_train::eval::{self, EvalArgs};
use dsa_train::export::{self, ExportOptions};
use dsa_train::model::AttentionMode;

#[derive(Parser)]
#[command(name = "dsa-train", version, about = "Continued pre-training of DeepSeek models with DeepSeek Sparse Attention")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Attention {
    Dense,
    Sparse,
}

#[derive(Subcommand)]
enum Command {
    /// Evaluate a checkpoint on a token file: LM loss, indexer KL, attention-mass recall.
    /// A summary goes to stderr; the last line of stdout is one JSON object.
    Eval {
        /// Checkpoint directory (config.json + safetensors, HF layout).
        #[arg(long)]
        model: PathBuf,
        /// Raw little-endian u32 token ids.
        #[arg(long)]
        tokens: PathBuf,
        /// Window length; the stream is cut into consecutive windows, the remainder dropped.
        #[arg(long, default_value_t = 4096)]
        seq_len: usize,
        #[arg(long, value_enum, default_value_t = Attention::Dense)]
        attention: Attention,
        /// Keys per query for selection (default: index_topk of the config).
        #[arg(long)]
        topk: Option<usize>,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// f32 or bf16.
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// Indexer heads when config.json has no index_n_heads (V3.1 checkpoints).
        #[arg(long, default_value_t = 64)]
        index_n_heads: usize,
        /// Indexer head dim when config.json has no index_head_dim.
        #[arg(long, default_value_t = 128)]
        index_head_dim: usize,
        /// Seed of the deterministic indexer initialisation for checkpoints without one.
        #[arg(long, default_value_t = 0)]
        init_seed: u64,
        /// Do not load the MTP layer(s).
        #[arg(long)]
        no_mtp: bool,
        /// Evaluate only the first N windows.
        #[arg(long)]
        max_windows: Option<usize>,
    },
    /// Benchmarks (numbers for docs/benchmarks.md; never timed tests).
    Bench {
        #[command(subcommand)]
        which: BenchCommand,
    },
    /// Export a checkpoint as a DeepSeek-V3.2-Exp Hugging Face checkpoint (indexer included).
    /// For now the input is a Hugging Face checkpoint directory.
    Export {
        /// Checkpoint directory (config.json + safetensors, HF layout).
        #[arg(long)]
        checkpoint: PathBuf,
        /// New (or empty) output directory.
        #[arg(long)]
        output: PathBuf,
        /// Store the main model's projections as FP8 with 128x128 block scales (DeepSeek's
        /// format); without it they are bf16.
        #[arg(long)]
        fp8: bool,
        /// Indexer heads when config.json has no index_n_heads (V3.1 checkpoints).
        #[arg(long, default_value_t = 64)]
        index_n_heads: usize,
        /// Indexer head dim when config.json has no index_head_dim.
        #[arg(long, default_value_t = 128)]
        index_head_dim: usize,
        /// index_topk to write when config.json has none.
        #[arg(long, default_value_t = 2048)]
        index_topk: usize,
        /// Seed of the deterministic indexer initialisation for checkpoints without one.
        #[arg(long, default_value_t = 0)]
        init_seed: u64,
        /// Largest shard in MB (10^6 bytes); a tensor never splits.
        #[arg(long, default_value_t = 5000)]
        max_shard_mb: usize,
    },
    /// Plot a run's metrics.jsonl (indexer KL, LM loss, lr, throughput, ...) into a PNG.
    Plot {
        /// metrics.jsonl of a run.
        #[arg(long)]
        metrics: PathBuf,
        /// PNG to write.
        #[arg(long)]
        output: PathBuf,
    },
    /// Write the embedded default (a tiny V3.1-style FP8 checkpoint and a synthetic corpus).
    Tiny {
        /// Output directory; receives model/ and tokens.bin.
        #[arg(long, default_value = "checkpoints/tiny")]
        output: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Load plus dequantise an FP8 checkpoint to bf16 (generated into --dir when empty).
    Load {
        #[arg(long, default_value = "checkpoints/bench-fp8")]
        dir: PathBuf,
        /// Size of the generated checkpoint in GiB.
        #[arg(long, default_value_t = 1.0)]
        gib: f64,
        #[arg(long, default_value_t = 3)]
        repeats: usize,
    },
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Eval {
            model, tokens, seq_len, attention, topk, device, dtype, index_n_heads, index_head_dim, init_seed, no_mtp, max_windows,
        } => {
            let args = EvalArgs {
                model,
                tokens,
                seq_len,
                attention: match attention {
                    Attention::Dense => AttentionMode::Dense,
                    Attention::Sparse => AttentionMode::Sparse,
                },
                topk,
                device: dsa_train::parse_device(&device)?,
                dtype: dsa_train::parse_dtype(&dtype)?,
                indexer: IndexerDefaults { n_heads: index_n_heads, head_dim: index_head_dim, topk: topk.unwrap_or(2048) },
                init_seed,
                skip_mtp: no_mtp,
                max_windows,
            };
            let report = eval::run(&args)?;
            eprintln!(
                "[eval] {} tokens in {} windows of {}, {} attention, top-k {}: lm_loss {:.6}, indexer KL {:.6}, recall {:.4}",
                report.tokens, report.windows, report.seq_len, report.attention, report.topk,
                report.lm_loss, report.indexer_kl, report.attention_mass_recall
            );
            for (l, (kl, r)) in report.indexer_kl_per_layer.iter().zip(&report.attention_mass_recall_per_layer).enumerate() {
                eprintln!("[eval]   layer {l:>3}: KL {kl:.6}  recall {r:.4}");
            }
            println!("{}", serde_json::to_string(&report)?);
        }
        Command::Bench { which: BenchCommand::Load { dir, gib, repeats } } => {
            println!("{}", dsa_train::bench::bench_load(&dir, gib, repeats.max(1))?);
        }
        Command::Export { checkpoint, output, fp8, index_n_heads, index_head_dim, index_topk, init_seed, max_shard_mb } => {
            let indexer = IndexerDefaults { n_heads: index_n_heads, head_dim: index_head_dim, topk: index_topk };
            let opts = ExportOptions { fp8, max_shard_bytes: max_shard_mb.saturating_mul(1_000_000) };
            let cfg = export::export_hf_checkpoint(&checkpoint, &output, &indexer, init_seed, &opts)?;
            eprintln!(
                "[export] wrote {} ({} layers, {}x{} indexer heads, top-k {}, {})",
                output.display(), cfg.num_hidden_layers, cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk,
                if fp8 { "FP8 weights" } else { "bf16 weights" }
            );
        }
        Command::Plot { metrics, output } => {
            dsa_train::plot::plot_metrics(&metrics, &output)?;
            eprintln!("[plot] wrote {}", output.display());
        }
        Command::Tiny { output, seed } => {
            dsa_train::tiny::write_default(&output, seed)?;
            eprintln!("[tiny] wrote {}/model and {}/tokens.bin", output.display(), output.display());
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
