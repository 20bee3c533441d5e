//! `dsa-train check`: what a recipe will do, computed from config.json and the weight table
//! without loading any weights.
//!
//! FLOPs per step (multiply-add = 2 FLOPs; T = seq_len, k = index_topk, S = sequences):
//! - projections: 2 * active parameters per token, where active = all non-expert tensors
//!   (embeddings excluded: a lookup) + num_experts_per_tok routed experts per MoE layer;
//! - dense attention (MHA mode), per layer and sequence: 2 * H * (qk + v) * T(T+1)/2;
//! - sparse attention (absorbed), per layer and token t: 2 * H * min(k, t+1) * (C+R + C);
//! - indexer scores, per layer and sequence: 2 * HI * DI * T(T+1)/2 (+ its projections);
//! - training multiplies a forward by 3 (forward + backward); in warm-up only the indexer is
//!   differentiated, so the main model costs one forward and the indexer three.
//! Memory per device (one device; the scale-out issue divides it): weights in the compute
//! dtype; for trainable tensors + f32 master (if not f32) + f32 gradient + two f32 moments;
//! activations estimated as 34 * hidden bytes per token per layer (bf16, no recomputation)
//! for the sparse stage, plus one layer's streamed attention/indexer working set (LSE per head,
//! indexer queries, selected indices; the kernels never store [T, T] or [T, H, K]).

use anyhow::Result;

use crate::config::{IndexerDefaults, ModelConfig};
use crate::recipe::{Recipe, Stage};
use crate::train::ckpt;
use crate::weights::{model_weights, Kind};

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub trainable_params: u64,
    pub frozen_params: u64,
    pub tokens_per_step: u64,
    pub flops_per_step: f64,
    pub weight_bytes: f64,
    pub optimizer_bytes: f64,
    pub activation_bytes: f64,
}

impl Plan {
    pub fn memory_bytes(&self) -> f64 {
        self.weight_bytes + self.optimizer_bytes + self.activation_bytes
    }
}

fn causal_pairs(t: u64) -> f64 {
    (t * (t + 1) / 2) as f64
}

pub fn plan(recipe: &Recipe) -> Result<Plan> {
    let src = ckpt::resolve_model(std::path::Path::new(&recipe.model.path))?;
    let defaults = IndexerDefaults { n_heads: recipe.model.index_n_heads, head_dim: recipe.model.index_head_dim, topk: recipe.dsa.index_topk };
    let cfg = ModelConfig::from_dir(&src.hf_dir, &defaults)?;
    Ok(plan_for(recipe, &cfg))
}

pub fn plan_for(recipe: &Recipe, cfg: &ModelConfig) -> Plan {
    let stage = recipe.stage();
    let with_mtp = recipe.model.mtp && cfg.num_nextn_predict_layers > 0;
    let specs = model_weights(cfg, with_mtp);
    let numel = |s: &crate::weights::WeightSpec| s.shape.iter().product::<usize>() as u64;
    let trainable = |s: &crate::weights::WeightSpec| match stage {
        Stage::Warmup => s.indexer,
        Stage::Sparse => s.kind != Kind::RouterBias,
    };
    let trainable_params: u64 = specs.iter().filter(|s| trainable(s)).map(numel).sum();
    let total: u64 = specs.iter().map(numel).sum();
    let dtype_bytes = if recipe.model.dtype == "f32" { 4.0 } else { 2.0 };
    let master = if recipe.model.dtype == "f32" { 0.0 } else { 4.0 };

    // Active parameters per token of the main model (MTP excluded from the FLOP count).
    let main = model_weights(cfg, false);
    let experts_per_layer = cfg.n_routed_experts.max(1) as f64;
    let mut active_main = 0.0;
    let mut active_indexer = 0.0;
    for s in &main {
        let n = numel(s) as f64;
        if s.kind == Kind::Embedding {
            continue;
        }
        let n = if s.name.contains(".mlp.experts.") { n * cfg.num_experts_per_tok as f64 / experts_per_layer } else { n };
        if s.indexer { active_indexer += n } else { active_main += n }
    }
    let t = recipe.data.seq_len as u64;
    let seqs = recipe.train.global_batch_seqs as f64;
    let tokens = seqs * t as f64;
    let layers = cfg.num_hidden_layers as f64;
    let (h, qk, v) = (cfg.num_attention_heads as f64, cfg.qk_head_dim() as f64, cfg.v_head_dim as f64);
    let (c, r) = (cfg.kv_lora_rank as f64, cfg.qk_rope_head_dim as f64);
    let k = recipe.dsa.index_topk as u64;
    let dense_attn = 2.0 * h * (qk + v) * causal_pairs(t) * layers * seqs;
    // sum over t of min(k, t+1)
    let sparse_pairs = if t <= k { causal_pairs(t) } else { causal_pairs(k) + ((t - k) * k) as f64 };
    let sparse_attn = 2.0 * h * (2.0 * c + r) * sparse_pairs * layers * seqs;
    let indexer = 2.0 * cfg.index_n_heads as f64 * cfg.index_head_dim as f64 * causal_pairs(t) * seqs * layers + 2.0 * active_indexer * tokens;
    let flops_per_step = match stage {
        Stage::Warmup => 2.0 * active_main * tokens + dense_attn + 3.0 * indexer,
        Stage::Sparse => 3.0 * (2.0 * active_main * tokens + sparse_attn + indexer),
    };
    let micro_tokens = (recipe.train.micro_batch_seqs as u64 * t) as f64;
    let hidden = cfg.hidden_size as f64;
    // Per token of the micro-batch: one layer's per-head LSE, indexer query and selected indices
    // (the attention and indexer kernels stream over keys and never store [T, T] or [T, H, K]).
    let streamed = micro_tokens * (h * 4.0 + cfg.index_n_heads as f64 * cfg.index_head_dim as f64 * 2.0 + k.min(t) as f64 * 4.0);
    let activation_bytes = match stage {
        Stage::Warmup => micro_tokens * hidden * dtype_bytes * 4.0 + streamed,
        Stage::Sparse => 34.0 * hidden * micro_tokens * layers + streamed,
    };
    Plan {
        trainable_params,
        frozen_params: total - trainable_params,
        tokens_per_step: tokens as u64,
        flops_per_step,
        weight_bytes: total as f64 * dtype_bytes,
        optimizer_bytes: trainable_params as f64 * (master + 4.0 + 8.0),
        activation_bytes,
    }
}

/// Human-readable report for `dsa-train check`.
pub fn report(recipe: &Recipe, p: &Plan) -> String {
    let gib = |b: f64| b / (1u64 << 30) as f64;
    format!(
        "parameters: {} trainable, {} frozen\ntokens per step: {} ({} x {})\nFLOPs per step: {:.3e}\nmemory per device (estimate): {:.2} GiB = weights {:.2} + optimizer/grads {:.2} + activations {:.2}",
        p.trainable_params, p.frozen_params, p.tokens_per_step, recipe.train.global_batch_seqs, recipe.data.seq_len,
        p.flops_per_step, gib(p.memory_bytes()), gib(p.weight_bytes), gib(p.optimizer_bytes), gib(p.activation_bytes)
    )
}
