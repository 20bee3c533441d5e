//! The `dsa-train` command line. Every user error ends as one `error:` line on stderr and exit
//! status 1 (2 for malformed arguments); results go to stdout.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

use dsa_train::config::IndexerDefaults;
use dsa_train::eval::{self, EvalArgs};
use dsa_train::export::{self, ExportOptions};
use dsa_train::model::AttentionMode;
use dsa_train::recipe::Recipe;
use dsa_train::train::Resume;

#[derive(Parser)]
#[command(
    name = "dsa-train",
    version,
    about = "Continued pre-training of DeepSeek models with DeepSeek Sparse Attention"
)]
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
        /// Raw little-endian u32 token ids, or a directory written by `data prepare`.
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
        /// Indexer heads when config.json has no index_n_heads (V3.1 checkpoints; default 64).
        /// A step-N folder uses its run's recipe.
        #[arg(long)]
        index_n_heads: Option<usize>,
        /// Indexer head dim when config.json has no index_head_dim (default 128).
        #[arg(long)]
        index_head_dim: Option<usize>,
        /// Seed of the deterministic indexer initialisation for checkpoints without one
        /// (default 0).
        #[arg(long)]
        init_seed: Option<u64>,
        /// Do not load the MTP layer(s).
        #[arg(long)]
        no_mtp: bool,
        /// Evaluate only the first N windows.
        #[arg(long)]
        max_windows: Option<usize>,
        /// Document masking: each query sees only its own document (as data.document_mask
        /// trains); documents end with --eos-id (default: the prepared data's eos_id).
        #[arg(long)]
        document_mask: bool,
        /// The end-of-document token for --document-mask.
        #[arg(long)]
        eos_id: Option<u32>,
        /// How the selection scores keys: bf16 or fp8 (as dsa.indexer_scores trains; default:
        /// a step's recipe's, else bf16); with fp8 the report adds, per layer, how often the
        /// FP8 sets equal the bf16 ones and their recall of them.
        #[arg(long)]
        indexer_scores: Option<String>,
    },
    /// Train a recipe: the dense warm-up or the sparse stage (train.stage).
    Train {
        recipe: PathBuf,
        /// Override a recipe key: --set section.key=value (repeatable; the type must match).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// Resume: `auto` (newest complete checkpoint in run.output_dir, else start fresh) or a
        /// step-N folder.
        #[arg(long)]
        resume: Option<String>,
    },
    /// Validate a recipe and print what it will do (parameters, tokens, memory, FLOPs).
    Check {
        recipe: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// The job's rank count to check the layout against (default: the launcher's, else
        /// parallel.dp, else the smallest world the recipe's layout and batch allow).
        #[arg(long, alias = "gpus")]
        world: Option<usize>,
        /// Memory of one GPU in GiB: adds a verdict (fits or not, by how much, the largest
        /// consumer); exit status 1 when the layout does not fit.
        #[arg(long = "gpu-mem", value_name = "GIB")]
        gpu_mem: Option<f64>,
        /// GiB of each GPU kept for what the estimate leaves out (CUDA context, NCCL buffers,
        /// allocator slack).
        #[arg(long, value_name = "GIB", default_value_t = 4.0)]
        reserve: f64,
        /// With --gpu-mem: list the layouts of this many GPUs (ep, ZeRO, block_rows, offload)
        /// that fit, fastest first by an estimated step time.
        #[arg(long)]
        search: bool,
    },
    /// The GPU test suite: CPU f32 twins against the GPU path on fresh random inputs.
    GpuSelftest {
        #[arg(long, default_value = "cuda")]
        device: String,
        /// Run only the check groups whose name contains this (e.g. rows, dense, train).
        #[arg(long)]
        only: Option<String>,
    },
    /// Benchmarks (numbers for docs/benchmarks.md; never timed tests).
    Bench {
        #[command(subcommand)]
        which: BenchCommand,
    },
    /// Export a checkpoint as a DeepSeek-V3.2-Exp Hugging Face checkpoint (indexer included).
    /// The input is a Hugging Face checkpoint directory or a training `step-N` checkpoint.
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
    /// Check a training step-N folder against the checksums in its COMPLETE marker (what a
    /// resume checks): after copying a run, or before trusting an old one.
    Verify {
        /// A step-N folder.
        checkpoint: PathBuf,
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
    /// Token data: `data prepare` tokenises text into shards (docs/data.md).
    Data {
        #[command(subcommand)]
        which: DataCommand,
    },
    /// Write the embedded default (a tiny V3.1-style FP8 checkpoint and a synthetic corpus), or
    /// with --preset bench-1k the GPU benchmark model (bench-1k-h128: the same with 128 heads;
    /// slice-671b: two layers of the 671B model at its real widths, 2.0B parameters).
    Tiny {
        /// Output directory; receives model/ and tokens.bin.
        #[arg(long, default_value = "checkpoints/tiny")]
        output: PathBuf,
        #[arg(long, default_value = "tiny")]
        preset: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Write the random starting checkpoint of a model trained from scratch (train.stage =
    /// "dense"), from a DeepSeek-V3-style config.json (initializer_range, default 0.02).
    Init {
        /// The model's config.json.
        #[arg(long)]
        config: PathBuf,
        /// A new (or empty) folder for the HF checkpoint.
        #[arg(long)]
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
    /// Save and verify a training checkpoint of --gib GiB (checksum cost, docs/training.md).
    Checkpoint {
        #[arg(long, default_value = "checkpoints/bench-ckpt")]
        dir: PathBuf,
        #[arg(long, default_value_t = 1.0)]
        gib: f64,
        #[arg(long, default_value_t = 3)]
        repeats: usize,
    },
    /// Time the DSA kernels at the 671B attention shape (GPU only): TFLOP/s per kernel.
    Kernels {
        #[arg(long, default_value = "cuda")]
        device: String,
        /// Sequence lengths, comma-separated.
        #[arg(long, default_value = "8192,32768")]
        lens: String,
        /// Time only the kernel families whose name contains this (e.g. "dense", "sparse MLA",
        /// "v1" for the f32 version-1 baseline); all by default.
        #[arg(long)]
        only: Option<String>,
        /// Head counts of the tensor-core sparse MLA, comma-separated (the 671B model's 128,
        /// V3.2's 64 of TileLang's examples, the bench model's 16), all on the same sets.
        #[arg(long, default_value = "128,64,16")]
        heads: String,
    },
    /// Time whole training steps of a recipe (no checkpoints written): median tokens/s.
    Step {
        recipe: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// Timed steps (after 2 untimed warm-up steps).
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// The GPU's bf16 dense peak in TFLOP/s, for the MFU (989: H100 SXM and H200).
        #[arg(long, default_value_t = 989.0)]
        peak_tflops: f64,
    },
}

#[derive(Subcommand)]
enum DataCommand {
    /// Tokenise .txt files (one document each) and .jsonl files (one {"text": ...} per line)
    /// into DIR/tokens-NNNNN.bin shards and DIR/index.json, with BOS/EOS around each document.
    Prepare {
        /// A Hugging Face tokenizer.json, or a model folder holding one (DeepSeek's checkpoints
        /// ship it; scripts/fetch_tokenizer.sh fetches DeepSeek-V3's otherwise).
        #[arg(long)]
        tokenizer: PathBuf,
        /// Input files, read in the order given: .txt (one document per file), .jsonl (one
        /// object per line) or .parquet (one row per document).
        #[arg(long, num_args = 1.., required = true)]
        input: Vec<PathBuf>,
        /// The JSONL field, or the Parquet column, that holds each document's text.
        #[arg(long, default_value = "text")]
        text_key: String,
        /// Output directory (must not already hold an index.json).
        #[arg(long)]
        output: PathBuf,
        /// BOS id (default: the tokenizer's <｜begin▁of▁sentence｜>).
        #[arg(long)]
        bos_id: Option<u32>,
        /// EOS id (default: the tokenizer's <｜end▁of▁sentence｜>).
        #[arg(long)]
        eos_id: Option<u32>,
        /// Tokens per shard (the default makes 1 GiB shards).
        #[arg(long, default_value_t = dsa_train::data::prepare::DEFAULT_SHARD_TOKENS)]
        shard_tokens: u64,
    },
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Eval {
            model,
            tokens,
            seq_len,
            attention,
            topk,
            device,
            dtype,
            index_n_heads,
            index_head_dim,
            init_seed,
            no_mtp,
            max_windows,
            document_mask,
            eos_id,
            indexer_scores,
        } => {
            use dsa_train::model::fp8_scores::SelectionScores;
            let selection_scores = match indexer_scores {
                Some(name) => SelectionScores::parse(&name).ok_or_else(|| {
                    anyhow::anyhow!(
                        "--indexer-scores {name}: one of {}",
                        SelectionScores::NAMES.join(", ")
                    )
                })?,
                None => {
                    dsa_train::train::ckpt::trained_selection_scores(&model)?.unwrap_or_default()
                }
            };
            if eos_id.is_some() && !document_mask {
                anyhow::bail!("--eos-id is used only with --document-mask");
            }
            if topk == Some(0) {
                anyhow::bail!("--topk 0: top-k must be positive");
            }
            // A step evaluates the model its run trained: the recipe's indexer and top-k; a
            // flag that contradicts it is an error, not a silent override.
            let (indexer, init_seed, topk) = match dsa_train::train::ckpt::trained_settings(&model)?
            {
                Some((trained, seed)) => {
                    for (flag, given, want) in [
                        (
                            "--index-n-heads",
                            index_n_heads.map(|x| x as u64),
                            trained.n_heads as u64,
                        ),
                        (
                            "--index-head-dim",
                            index_head_dim.map(|x| x as u64),
                            trained.head_dim as u64,
                        ),
                        ("--init-seed", init_seed, seed),
                    ] {
                        if given.is_some_and(|g| g != want) {
                            anyhow::bail!("{flag} {} contradicts {}/recipe.toml ({want}), which trained this step", given.unwrap_or(0), model.display());
                        }
                    }
                    let k = topk.unwrap_or(trained.topk);
                    (IndexerDefaults { topk: k, ..trained }, seed, Some(k))
                }
                None => (
                    IndexerDefaults {
                        n_heads: index_n_heads.unwrap_or(64),
                        head_dim: index_head_dim.unwrap_or(128),
                        topk: topk.unwrap_or(2048),
                    },
                    init_seed.unwrap_or(0),
                    topk,
                ),
            };
            let document_eos = match (document_mask, eos_id) {
                (false, _) => None,
                (true, Some(id)) => Some(id),
                (true, None) => Some(dsa_train::eval::eos_of(&tokens)?),
            };
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
                indexer,
                init_seed,
                skip_mtp: no_mtp,
                max_windows,
                document_eos,
                selection_scores,
            };
            let report = eval::run(&args)?;
            dsa_train::elog!(
                "[eval] {} tokens in {} windows of {}, {} attention, top-k {}: lm_loss {:.6}, indexer KL {:.6}, recall {:.4} (ceiling {:.4})",
                report.tokens, report.windows, report.seq_len, report.attention, report.topk,
                report.lm_loss, report.indexer_kl, report.attention_mass_recall, report.attention_mass_recall_ceiling
            );
            for (l, kl) in report.indexer_kl_per_layer.iter().enumerate() {
                let (r, c) = (
                    report.attention_mass_recall_per_layer[l],
                    report.attention_mass_recall_ceiling_per_layer[l],
                );
                dsa_train::elog!(
                    "[eval]   layer {l:>3}: KL {kl:.6}  recall {r:.4}  ceiling {c:.4}"
                );
            }
            if let (Some(same), Some(rec)) = (
                &report.fp8_selection_identical_per_layer,
                &report.fp8_selection_recall_per_layer,
            ) {
                for (l, (s, r)) in same.iter().zip(rec).enumerate() {
                    dsa_train::elog!("[eval]   layer {l:>3}: FP8 sets equal to bf16's {s:.4}, their recall of bf16's {r:.4}");
                }
            }
            print_result(&serde_json::to_string(&report)?)?;
        }
        Command::Train {
            recipe,
            sets,
            resume,
        } => {
            let r = Recipe::load(&recipe, &sets)?;
            let resume = resume.map(|s| {
                if s == "auto" {
                    Resume::Auto
                } else {
                    Resume::Path(PathBuf::from(s))
                }
            });
            let out = dsa_train::train::train(r, resume)?;
            dsa_train::elog!(
                "[train] {} at step {}{}",
                if out.stopped_by_signal {
                    "stopped"
                } else {
                    "finished"
                },
                out.steps_done,
                out.last_checkpoint
                    .map_or(String::new(), |d| format!("; checkpoint {}", d.display()))
            );
        }
        Command::Check {
            recipe,
            sets,
            world,
            gpu_mem,
            reserve,
            search,
        } => {
            let mut r = Recipe::load(&recipe, &sets)?;
            let launched = dsa_train::dist::Launch::from_env()?.world;
            let world = world.unwrap_or_else(|| {
                if launched > 1 {
                    launched
                } else {
                    r.parallel.smallest_world(r.micro_batches())
                }
            });
            // `train`'s own checks, then the estimate for the layout they resolve.
            let layout = dsa_train::train::validate(&r, world)
                .with_context(|| format!("recipe {} on {world} rank(s)", recipe.display()))?;
            r.parallel.dp = layout.dp;
            let plan = dsa_train::train::plan::plan(&r)?;
            print_result(&r.to_toml())?;
            print_result(&dsa_train::train::plan::report(&r, &plan))?;
            if search && gpu_mem.is_none() {
                anyhow::bail!("check --search needs --gpu-mem (the memory of one GPU, in GiB)");
            }
            if let Some(gib) = gpu_mem {
                use dsa_train::train::fit::{
                    search as search_layouts, search_report, Machine, Rates,
                };
                if !(gib.is_finite() && gib > 0.0 && reserve.is_finite() && reserve >= 0.0) {
                    anyhow::bail!("check: --gpu-mem {gib} and --reserve {reserve} must be positive numbers of GiB");
                }
                let machine = Machine {
                    gpus: layout.world,
                    gpu_mem_gib: gib,
                    reserve_gib: reserve,
                };
                let (fits, verdict) = machine.verdict(&plan);
                print_result(&verdict)?;
                if search {
                    let src = dsa_train::train::ckpt::resolve_model(&PathBuf::from(&r.model.path))?;
                    let cfg = r.model_config(&src.hf_dir)?;
                    let rates = Rates::default();
                    let validate =
                        |r: &Recipe, world: usize| dsa_train::train::validate(r, world).map(|_| ());
                    let found = search_layouts(&r, &cfg, &machine, &rates, &validate);
                    print_result(&search_report(&found, &machine, &rates, 10))?;
                }
                if !fits {
                    anyhow::bail!(
                        "recipe {}: the layout does not fit {gib} GiB GPUs (verdict above)",
                        recipe.display()
                    );
                }
            }
        }
        Command::Bench {
            which: BenchCommand::Checkpoint { dir, gib, repeats },
        } => {
            print_result(&dsa_train::bench::bench_checkpoint(&dir, gib, repeats)?)?;
        }
        Command::Bench {
            which: BenchCommand::Load { dir, gib, repeats },
        } => {
            print_result(&dsa_train::bench::bench_load(&dir, gib, repeats.max(1))?)?;
        }
        Command::GpuSelftest { device, only } => {
            dsa_train::gpu_check::run(&device, only.as_deref())?
        }
        Command::Bench {
            which:
                BenchCommand::Kernels {
                    device,
                    lens,
                    only,
                    heads,
                },
        } => {
            let lens = dsa_train::bench::parse_counts("--lens", &lens)?;
            let heads = dsa_train::bench::parse_counts("--heads", &heads)?;
            print_result(&dsa_train::bench::bench_kernels(
                &device,
                &lens,
                &heads,
                only.as_deref(),
            )?)?;
        }
        Command::Bench {
            which:
                BenchCommand::Step {
                    recipe,
                    sets,
                    steps,
                    peak_tflops,
                },
        } => {
            let r = Recipe::load(&recipe, &sets)?;
            print_result(&dsa_train::bench::bench_step(r, steps, peak_tflops)?)?;
        }
        Command::Data {
            which:
                DataCommand::Prepare {
                    tokenizer,
                    input,
                    output,
                    bos_id,
                    eos_id,
                    shard_tokens,
                    text_key,
                },
        } => {
            let args = dsa_train::data::PrepareArgs {
                tokenizer,
                inputs: input,
                output,
                bos_id,
                eos_id,
                shard_tokens,
                progress: true,
                text_key,
            };
            let report = dsa_train::data::prepare(&args)?;
            dsa_train::elog!(
                "[data] {} tokens of {} documents in {} shards to {} ({:.1} s, {:.0} tokens/s)",
                report.total_tokens,
                report.total_documents,
                report.shards,
                report.output,
                report.seconds,
                report.tokens_per_second
            );
            print_result(&serde_json::to_string(&report)?)?;
        }
        Command::Export {
            checkpoint,
            output,
            fp8,
            index_n_heads,
            index_head_dim,
            index_topk,
            init_seed,
            max_shard_mb,
        } => {
            let indexer = IndexerDefaults {
                n_heads: index_n_heads,
                head_dim: index_head_dim,
                topk: index_topk,
            };
            let opts = ExportOptions {
                fp8,
                max_shard_bytes: max_shard_mb.saturating_mul(1_000_000),
            };
            let cfg =
                export::export_hf_checkpoint(&checkpoint, &output, &indexer, init_seed, &opts)?;
            dsa_train::elog!(
                "[export] wrote {} ({} layers, {}x{} indexer heads, top-k {}, {})",
                output.display(),
                cfg.num_hidden_layers,
                cfg.index_n_heads,
                cfg.index_head_dim,
                cfg.index_topk,
                if fp8 { "FP8 weights" } else { "bf16 weights" }
            );
        }
        Command::Verify { checkpoint } => {
            use dsa_train::train::integrity;
            let t0 = std::time::Instant::now();
            if integrity::read_marker(&checkpoint)?.is_none() {
                integrity::verify(&checkpoint, integrity::Use::Resume)?; // names a damaged empty marker
                anyhow::bail!(
                    "{} was written without checksums (format 1): it cannot be verified",
                    checkpoint.display()
                );
            }
            integrity::verify(&checkpoint, integrity::Use::Resume)?;
            // And the steps under it (its base links), as a resume reads them.
            let chain = dsa_train::train::ckpt::resolve_model(&checkpoint)?;
            chain.verify_share(0, 1)?;
            let files = integrity::read_marker(&checkpoint)?
                .map(|m| m.files)
                .unwrap_or_default();
            let bytes: u64 = files.values().map(|f| f.bytes).sum();
            let secs = t0.elapsed().as_secs_f64();
            print_result(&format!(
                "{}: {} files, {:.2} GiB, checksums match, and those of the {} step(s) under it ({secs:.2} s, {:.2} GB/s)",
                checkpoint.display(), files.len(), bytes as f64 / (1u64 << 30) as f64, chain.overlays.len().saturating_sub(1),
                bytes as f64 / secs.max(1e-9) / 1e9
            ))?;
        }
        Command::Plot { metrics, output } => {
            dsa_train::plot::plot_metrics(&metrics, &output)?;
            dsa_train::elog!("[plot] wrote {}", output.display());
        }
        Command::Init {
            config,
            output,
            seed,
        } => {
            let n = dsa_train::init::write_initial_checkpoint(&config, &output, seed)?;
            dsa_train::elog!(
                "[init] wrote {} ({:.1}M parameters, seed {seed})",
                output.display(),
                n as f64 / 1e6
            );
        }
        Command::Tiny {
            output,
            preset,
            seed,
        } => {
            dsa_train::tiny::write_preset(&output, &preset, seed)?;
            dsa_train::elog!(
                "[tiny] wrote {}/model and {}/tokens.bin",
                output.display(),
                output.display()
            );
        }
    }
    Ok(())
}

/// A result on stdout. Unlike a log line, a result that cannot be written is an error (exit 1):
/// `| head` or a full disk must not pass for success.
fn print_result(text: &str) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")
        .and_then(|()| out.flush())
        .context("cannot write the result to stdout")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the context chain joined by ": ", each cause cut at its first line
            // (candle's errors may append a backtrace after the message).
            let text: Vec<String> = e
                .chain()
                .map(|c| {
                    c.to_string()
                        .lines()
                        .next()
                        .unwrap_or("")
                        .trim_end()
                        .to_string()
                })
                .collect();
            dsa_train::elog!("error: {}", text.join(": "));
            ExitCode::FAILURE
        }
    }
}
