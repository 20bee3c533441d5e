//! `dsa-train eval`: language-modelling loss, indexer KL and attention-mass recall of a
//! checkpoint on a token stream.
//!
//! The stream is cut into consecutive, non-overlapping windows of `seq_len` tokens (the
//! remainder is dropped), one window per forward. Averages:
//! - `lm_loss`: mean next-token cross-entropy over every predicted position of every window;
//! - `indexer_kl_per_layer[l]`: mean over every query position of every window of the layer's
//!   KL (dense: against the head-mean dense attention over all causal keys; sparse: against the
//!   sparse attention's own head-mean probabilities over S_t); `indexer_kl` is their mean;
//! - `attention_mass_recall_per_layer[l]`: mean over positions with t + 1 > k of the dense
//!   attention mass inside S_t (1.0 when no position has t + 1 > k: S_t then holds every key);
//! - `attention_mass_recall_ceiling_per_layer[l]`: over the same positions, the most mass any
//!   k keys hold (the sum of the k largest dense probabilities): the recall a perfect indexer
//!   would reach, below 1 wherever the model's own attention is spread over more than k keys.
//! Sums are accumulated in f64.
//!
//! Memory: the forward runs with `Pass::eval_rows` (the attention, the dense
//! probabilities of the KL target and the recall, the indexer's scores and top-k a block of
//! query rows at a time) and the LM head runs on chunks of positions, so no [.., T, T] tensor
//! and no [T, vocab] logits exist: any length whose weights and O(T) activations fit.

use std::path::PathBuf;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::config::IndexerDefaults;
use crate::data::{read_token_file, TokenStream};
use crate::losses::{lm_chunk_positions, next_token_nll};
use crate::model::fp8_scores::SelectionScores;
use crate::model::{AttentionMode, ForwardContext, LoadOptions, Model, Pass};

#[derive(Debug, Clone)]
pub struct EvalArgs {
    pub model: PathBuf,
    pub tokens: PathBuf,
    pub seq_len: usize,
    pub attention: AttentionMode,
    pub topk: Option<usize>,
    pub device: Device,
    pub dtype: DType,
    pub indexer: IndexerDefaults,
    pub init_seed: u64,
    pub skip_mtp: bool,
    /// Evaluate at most this many windows (all when None).
    pub max_windows: Option<usize>,
    /// Document masking with this end-of-document token (`--document-mask`): each query
    /// sees only its own document's keys, as `data.document_mask` trains (None: off).
    pub document_eos: Option<u32>,
    /// How the selection scores keys (`--indexer-scores`, as `dsa.indexer_scores` trains).
    pub selection_scores: SelectionScores,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EvalReport {
    pub tokens: usize,
    pub windows: usize,
    pub seq_len: usize,
    pub attention: String,
    pub topk: usize,
    pub lm_loss: f64,
    pub indexer_kl: f64,
    pub indexer_kl_per_layer: Vec<f64>,
    pub attention_mass_recall: f64,
    pub attention_mass_recall_per_layer: Vec<f64>,
    pub attention_mass_recall_ceiling: f64,
    pub attention_mass_recall_ceiling_per_layer: Vec<f64>,
    /// "bf16" or "fp8" (`--indexer-scores`).
    pub indexer_scores: String,
    /// With FP8 scores, over the recall's positions: the share of queries whose FP8 set equals
    /// the bf16 scores' set, and the mean recall of the bf16 set by the FP8 one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fp8_selection_identical_per_layer: Option<Vec<f64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fp8_selection_recall_per_layer: Option<Vec<f64>>,
}

/// The end-of-document token a prepared token directory names (its index.json `eos_id`);
/// raw token files and Megatron datasets name none.
pub fn eos_of(tokens: &std::path::Path) -> Result<u32> {
    if tokens.is_dir() {
        return Ok(crate::data::DataIndex::read(&tokens.join("index.json"))?.eos_id);
    }
    bail!(
        "--document-mask needs --eos-id: {} names no end-of-document token (only prepared data directories do)",
        tokens.display()
    )
}

/// Load the model named by `args` and evaluate it.
pub fn run(args: &EvalArgs) -> Result<EvalReport> {
    let opts = LoadOptions {
        dtype: args.dtype,
        device: args.device.clone(),
        indexer: args.indexer,
        init_seed: args.init_seed,
        skip_mtp: args.skip_mtp,
    };
    let mut model = Model::load(&args.model, &opts)?;
    model.set_selection_scores(args.selection_scores)?;
    let tokens = if args.tokens.is_dir() || crate::data::megatron::prefix_of(&args.tokens).is_some()
    {
        // A prepared directory or a Megatron dataset: read only the windows to be evaluated, but never less than one
        // window's worth, so that `evaluate` reports too-short data and --max-windows 0 itself.
        let stream = TokenStream::open(&args.tokens, model.cfg.vocab_size)?;
        let n = args.seq_len as u64;
        let windows = args
            .max_windows
            .map_or(u64::MAX, |m| m as u64)
            .min(stream.len() / n.max(1));
        stream.read_prefix((windows * n).max(n))?
    } else {
        read_token_file(&args.tokens, model.cfg.vocab_size)?
    };
    evaluate(&model, &tokens, args)
}

pub fn evaluate(model: &Model, tokens: &[u32], args: &EvalArgs) -> Result<EvalReport> {
    let n = args.seq_len;
    if n < 2 {
        bail!("--seq-len {n}: need at least 2 tokens per window to predict anything");
    }
    let windows = tokens.len() / n;
    let windows = args.max_windows.map_or(windows, |m| windows.min(m));
    if tokens.len() < n {
        bail!(
            "token file {} holds {} tokens, fewer than one window of --seq-len {n}",
            args.tokens.display(),
            tokens.len()
        );
    }
    if windows == 0 {
        bail!("--max-windows 0 evaluates nothing");
    }
    let topk = args.topk.unwrap_or(model.cfg.index_topk);
    if topk == 0 {
        bail!("--topk must be positive");
    }
    if let Some(eos) = args
        .document_eos
        .filter(|&e| e as usize >= model.cfg.vocab_size)
    {
        bail!(
            "--eos-id {eos} is outside the model's vocabulary ({} tokens)",
            model.cfg.vocab_size
        );
    }
    // No [.., T, T] tensor and no [T, vocab] logits at once: any length whose weights fit.
    let opts = Pass::eval(args.attention, topk).in_rows(0);
    let layers = model.layers.len();
    let (mut nll_sum, mut kl_sum, mut recall_sum) = (0f64, vec![0f64; layers], vec![0f64; layers]);
    let mut ceiling_sum = vec![0f64; layers];
    // With FP8 selection scores: per layer, the summed [same set, recall] of the counted queries.
    let mut agreement_sum: Option<Vec<[f64; 2]>> = None;
    // Positions whose query has more than k keys (t + 1 > k; under document masking,
    // t - start + 1 > k) count towards the recall.
    let mut recall_positions = 0usize;
    let plain = ForwardContext::new(&model.cfg, n, &model.device)?;
    for w in 0..windows {
        let host = &tokens[w * n..(w + 1) * n];
        let window = Tensor::from_slice(host, (1, n), &model.device)?;
        let ctx = match args.document_eos {
            Some(eos) => plain.for_documents(host, 1, eos)?,
            None => plain.clone(),
        };
        let start = |t: usize| ctx.starts.as_ref().map_or(0, |s| s.seq(0)[t] as usize);
        let counted: Vec<u32> = (0..n)
            .filter(|&t| t + 1 - start(t) > topk)
            .map(|t| t as u32)
            .collect();
        let n_counted = counted.len();
        recall_positions += n_counted;
        let counted = Tensor::from_vec(counted, n_counted, &model.device)?;
        let (hidden, layers) = model.forward_layers_in(&window, &ctx, &opts)?;
        let nll = nll_sum_in_chunks(
            model,
            &hidden,
            &window,
            lm_chunk_positions(1, model.cfg.vocab_size),
        )?;
        // The weights were checked finite when loaded (`Model::load`); a non-finite value now
        // comes from the activations. Name the first layer whose indexer KL shows it.
        let layer_kl: Vec<f64> = layers
            .iter()
            .map(|s| s.indexer_kl.as_ref().map_or(Ok(0.0), sum_f64))
            .collect::<Result<_>>()?;
        let hint = if args.dtype == DType::F32 {
            ""
        } else {
            "; try --dtype f32"
        };
        if let Some(l) = layer_kl.iter().position(|k| !k.is_finite()) {
            bail!("window {w}: the indexer KL of layer {l} is not finite (the weights are finite: the activations overflow{hint})");
        }
        if !nll.is_finite() {
            bail!("window {w}: the LM loss is not finite (the weights are finite: the activations overflow{hint})");
        }
        nll_sum += nll;
        for (l, stats) in layers.iter().enumerate() {
            kl_sum[l] += layer_kl[l];
            if let (Some(r), true) = (&stats.recall, counted.dim(0)? > 0) {
                recall_sum[l] += sum_f64(&r.index_select(&counted, 1)?)?;
            }
            if let (Some(c), true) = (&stats.recall_ceiling, counted.dim(0)? > 0) {
                ceiling_sum[l] += sum_f64(&c.index_select(&counted, 1)?)?;
            }
            if let Some(a) = &stats.fp8_agreement {
                let sums = agreement_sum.get_or_insert_with(|| vec![[0.0; 2]; model.layers.len()]);
                if counted.dim(0)? > 0 {
                    let a = a.index_select(&counted, 1)?; // [1, counted, 2]
                    for (c, sum) in sums[l].iter_mut().enumerate() {
                        *sum += sum_f64(&a.narrow(2, c, 1)?)?;
                    }
                }
            }
        }
        crate::elog!(
            "[eval] window {}/{windows}: running lm_loss {:.5}",
            w + 1,
            nll_sum / ((w + 1) * (n - 1)) as f64
        );
    }
    let kl: Vec<f64> = kl_sum.iter().map(|s| s / (windows * n) as f64).collect();
    let per_position = |sums: &[f64]| -> Vec<f64> {
        if recall_positions == 0 {
            vec![1.0; layers]
        } else {
            sums.iter().map(|s| s / recall_positions as f64).collect()
        }
    };
    let (recall, ceiling) = (per_position(&recall_sum), per_position(&ceiling_sum));
    let agreement = |c: usize| {
        agreement_sum
            .as_ref()
            .map(|sums| per_position(&sums.iter().map(|s| s[c]).collect::<Vec<_>>()))
    };
    Ok(EvalReport {
        tokens: windows * n,
        windows,
        seq_len: n,
        attention: match args.attention {
            AttentionMode::Dense => "dense".into(),
            AttentionMode::Sparse => "sparse".into(),
        },
        topk,
        lm_loss: nll_sum / (windows * (n - 1)) as f64,
        indexer_kl: mean(&kl),
        indexer_kl_per_layer: kl,
        attention_mass_recall: mean(&recall),
        attention_mass_recall_per_layer: recall,
        attention_mass_recall_ceiling: mean(&ceiling),
        attention_mass_recall_ceiling_per_layer: ceiling,
        indexer_scores: args.selection_scores.name().into(),
        fp8_selection_identical_per_layer: agreement(0),
        fp8_selection_recall_per_layer: agreement(1),
    })
}

/// Summed next-token NLL of `tokens` [B, T] from the final hidden states [B, T, hidden], the LM
/// head run on `chunk` positions at a time: positions p0..p0+n predict tokens p0+1..p0+n+1, so
/// each chunk's head also covers row p0+n, whose own prediction belongs to the next chunk.
/// The same sum as `next_token_nll` over the whole logits (f32 per position, f64 sums).
pub fn nll_sum_in_chunks(
    model: &Model,
    hidden: &Tensor,
    tokens: &Tensor,
    chunk: usize,
) -> Result<f64> {
    let t = hidden.dim(1)?;
    let chunk = chunk.max(1);
    let mut sum = 0f64;
    for p0 in (0..t.saturating_sub(1)).step_by(chunk) {
        let n = chunk.min(t - 1 - p0);
        let logits = model.head(&hidden.narrow(1, p0, n + 1)?)?; // [B, n+1, vocab]
        sum += sum_f64(&next_token_nll(&logits, &tokens.narrow(1, p0, n + 1)?)?)?;
    }
    Ok(sum)
}

fn sum_f64(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?)
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}
