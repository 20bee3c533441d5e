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
//! Memory per device, for the `[parallel]` layout (dp ranks; routed experts split over ep):
//! - weights in the compute dtype: every non-expert tensor, plus 1/ep of the routed experts;
//!   with `model.frozen_fp8` (warm-up) the frozen projections and experts in FP8 (1 byte a
//!   value and a 4-byte scale per 128 x 128 block; with ZeRO-3 those outside the routed
//!   experts 1/dp of it) plus the largest layer dequantised;
//! - optimizer: f32 master (when the dtype is not f32) and two f32 moments of the trainable
//!   rows this device OWNS, on the most-loaded rank (owners of whole tensors or, for a tensor
//!   above the fair share, of row ranges, assigned as the trainer does among the ranks that
//!   hold them: dp for non-expert tensors, dp/ep for experts; `most_loaded_rank_bytes`). Gradients: ZeRO-1 (`parallel.zero = 1`) keeps an
//!   unsharded f32 sum of every local trainable tensor; ZeRO-2 keeps the owned rows' f32
//!   gradients plus the unreduced f32 sum of one flush unit at a time (one layer, or the
//!   embedding, final norm or LM head alone). Sums are added to in place a block of rows at a
//!   time, and the LM head's and embedding's gradients arrive a block of rows at a time, so
//!   beyond the sums a unit holds one block or one backward's gradients (`GradientPeak`: for
//!   the head or embedding 4 bytes per value plus 10 x 2^24 bytes in bf16);
//! - activations of one micro-batch of B sequences of T tokens: with `train.recompute` (sparse
//!   stage) each layer's input (hidden x dtype per token and layer) and selected set (k x 4
//!   bytes per token and layer; both in host memory with `train.offload_activations`, which
//!   leaves two hidden-size tensors and one set on the device) plus ONE layer's working set;
//!   without it, what each layer's explicit backward reads, kept by the first pass: the
//!   per-query part below for every token and layer plus the latent kv (12 (C+R) bytes per
//!   token and layer; in the dense stage the per-head q, k, v and output in the dtype and the
//!   feed-forward's part instead of the absorbed attention's). One
//!   layer's working set has a whole-sequence part per token. Sparse stage (the indexer's
//!   queries exist a block of rows at a time): the indexer's keys (DI f32 values, their leaf
//!   copy in the KL backward, the summed gradient, one block's gradient and their sum:
//!   20 DI bytes), its detached inputs x and qr ((hidden + q_lora) x dtype), the KL target and
//!   the selection's one stored form (absolute rows; positions, mask and bias are derived a
//!   block at a time): k x 4 bytes, 2 tensors; the latent kv and its f32
//!   gradient (12 (C+R) bytes); plus, once per layer, the KL's block of
//!   n_I = min(T, 2^24 / (B HI DI), 2^25 / (B k)) query rows (about 6 f32 copies of the
//!   queries and their gradients, the rows of x and qr in f32, 8 live [n_I, k] f32 tensors:
//!   n_I (24 HI DI + 4 (hidden + q_lora) + 32 k) bytes; it bounds the selection's blocks
//!   too). Warm-up and dense stages: the indexer (HI x DI f32 queries, their bf16 copy and
//!   gradient: 10 HI DI bytes) and 12 (C+R) bytes. And a per-query part, for
//!   the B T tokens at once or, with `train.block_rows` = n, for n tokens: attention in
//!   absorbed form (H x (C+R) query and H x (C+1) output in f32 and bf16 copies: about
//!   14 H (C+R) bytes), MoE routing and expert inputs (about 4 x top-k x moe_intermediate x 2
//!   bytes) and the layer's hidden-size tensors (8 x hidden x dtype). The warm-up and dense
//!   stages run the attention in MHA form instead: the warm-up counts per-head q, k, v, the
//!   output and kv_b_proj's output in the dtype (2 (N+R) + 2 V + N + V values per head and
//!   token) or the feed-forward
//!   (for `block_rows` tokens in block mode) beside the per-head q and k the KL waits for,
//!   whichever phase is larger; the dense stage counts its flash-style attention separately (below). Against the
//!   device memory peak measured on the slice-671b model (H100, docs/scaling.md) the estimate
//!   is 1.03-1.07 of it in the warm-up and sparse stages and 1.15 in the dense stage (an upper
//!   bound: it counts the plain twin's f32 score blocks). The LM head runs in
//!   chunks of positions (`train.lm_head_chunk`, or 2^27 logits): a chunk's logits and their
//!   gradient in the compute dtype, plus the loss's f32 work on one block of 2^24 logits
//!   (`losses::nll_rows_and_grad`: 3 f32 tensors of the block at once), 0.69 GiB in bf16. The MTP
//!   layer (when loaded), in the sparse stage with `train.recompute`, runs as a main layer does
//!   (block mode, chunked logits) plus 3 x hidden x dtype bytes per token (its layer's input
//!   and two output gradients); in the warm-up it runs its layer's forward for its indexer's KL
//!   only (no logits), within a main layer's footprint; otherwise (the autograd twin of a step
//!   that does not recompute) one layer's working set at T tokens plus T x vocab x (dtype + 8)
//!   bytes of logits.
//!   Warm-up: no main-model backward; the streaming KL kernel holds O(T) state.
//! Communication per device and step (what the trainer sends; a ring all-reduce of B bytes
//! over n ranks sends 2 (n-1)/n B from each):
//! - gradient sums and ZeRO-1 parameter shares: two all-reduces of the f32 trainable tensors,
//!   the non-expert ones over dp ranks and the routed experts over their dp/ep holders;
//! - expert exchange: per MoE layer and micro-batch, top-k rows of hidden x dtype bytes per
//!   token go to the expert's rank ((ep-1)/ep of them leave the device) and come back; once in
//!   the forward, and in the stages that train the main model again in the backward and (with
//!   `train.recompute`) in the recomputation. MTP layers are not counted.

use anyhow::Result;

use crate::config::ModelConfig;
use crate::recipe::{Recipe, Stage};
use crate::train::ckpt;
use crate::weights::{model_weights, Kind};

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub trainable_params: u64,
    pub frozen_params: u64,
    pub tokens_per_step: u64,
    pub flops_per_step: f64,
    /// FLOPs of the recomputation (`train.recompute`, dense and sparse stages): each main
    /// layer's forward again, not counted in `flops_per_step` (MFU counts the model's work)
    /// but in the step's time (`fit::StepTime`).
    pub recompute_flops: f64,
    pub weight_bytes: f64,
    pub optimizer_bytes: f64,
    pub activation_bytes: f64,
    /// Host memory per device for offloaded activations (`train.offload_activations`).
    pub host_bytes: f64,
    /// Host memory per device for frozen FP8 weights (`model.frozen_fp8_offload`), copied to
    /// the device once per micro-batch, a tensor at a time.
    pub frozen_host_bytes: f64,
    /// Micro-batches each device runs per step.
    pub micro_batches_per_device: f64,
    /// Bytes each device sends per step for gradient sums and ZeRO-1 shares.
    pub grad_comm_bytes: f64,
    /// Bytes each device sends per step in expert-parallel exchanges.
    pub expert_comm_bytes: f64,
    /// Bytes each device sends per step in context-parallel gathers and gradient sums.
    pub context_comm_bytes: f64,
    /// ZeRO-3's layer weight gathers (bytes this rank sends per step).
    pub gather_comm_bytes: f64,
    /// Device memory while the model loads: every tensor the rank holds, whole (but ZeRO-3's
    /// layer tensors, read as the owned rows), beside the owned rows' f32 masters and moments.
    pub load_bytes: f64,
    /// Device memory while a run resumes: the load's, and the checkpoint's f32 values and Adam
    /// moments of the trained tensors the rank holds: whole (`ckpt::load` re-assembles the
    /// ranks' pieces), but ZeRO-3's layer tensors, read as the owned rows (`ckpt::load_owned`).
    pub resume_bytes: f64,
}

impl Plan {
    /// Device memory of a training step.
    pub fn memory_bytes(&self) -> f64 {
        self.weight_bytes + self.optimizer_bytes + self.activation_bytes
    }

    /// The most device memory the job needs: a step's, the load's or a resume's.
    pub fn peak_bytes(&self) -> f64 {
        self.memory_bytes()
            .max(self.load_bytes)
            .max(self.resume_bytes)
    }
}

fn causal_pairs(t: u64) -> f64 {
    (t * (t + 1) / 2) as f64
}

pub fn plan(recipe: &Recipe) -> Result<Plan> {
    let src = ckpt::resolve_model(std::path::Path::new(&recipe.model.path))?;
    let cfg = recipe.model_config(&src.hf_dir)?;
    Ok(plan_for(recipe, &cfg))
}

pub fn plan_for(recipe: &Recipe, cfg: &ModelConfig) -> Plan {
    let stage = recipe.stage();
    let with_mtp = recipe.model.mtp && cfg.num_nextn_predict_layers > 0;
    let specs = model_weights(cfg, with_mtp);
    let numel = |s: &crate::weights::WeightSpec| s.shape.iter().product::<usize>() as u64;
    let trainable = |s: &crate::weights::WeightSpec| stage.trains(s);
    let trainable_params: u64 = specs.iter().filter(|s| trainable(s)).map(numel).sum();
    let total: u64 = specs.iter().map(numel).sum();
    let dtype_bytes = if recipe.model.dtype == "f32" {
        4.0
    } else {
        2.0
    };
    let master = if recipe.model.dtype == "f32" {
        0.0
    } else {
        4.0
    };

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
        let n = if s.name.contains(".mlp.experts.") {
            n * cfg.num_experts_per_tok as f64 / experts_per_layer
        } else {
            n
        };
        if s.indexer {
            active_indexer += n
        } else {
            active_main += n
        }
    }
    let t = recipe.data.seq_len as u64;
    let seqs = recipe.train.global_batch_seqs as f64;
    let tokens = seqs * t as f64;
    let layers = cfg.num_hidden_layers as f64;
    let (h, qk, v) = (
        cfg.num_attention_heads as f64,
        cfg.qk_head_dim() as f64,
        cfg.v_head_dim as f64,
    );
    let (c, r) = (cfg.kv_lora_rank as f64, cfg.qk_rope_head_dim as f64);
    let k = recipe.dsa.index_topk as u64;
    let dense_attn = 2.0 * h * (qk + v) * causal_pairs(t) * layers * seqs;
    // sum over t of min(k, t+1)
    let sparse_pairs = if t <= k {
        causal_pairs(t)
    } else {
        causal_pairs(k) + ((t - k) * k) as f64
    };
    let sparse_attn = 2.0 * h * (2.0 * c + r) * sparse_pairs * layers * seqs;
    let indexer = 2.0
        * cfg.index_n_heads as f64
        * cfg.index_head_dim as f64
        * causal_pairs(t)
        * seqs
        * layers
        + 2.0 * active_indexer * tokens;
    let flops_per_step = match stage {
        Stage::Warmup => 2.0 * active_main * tokens + dense_attn + 3.0 * indexer,
        Stage::Sparse => 3.0 * (2.0 * active_main * tokens + sparse_attn + indexer),
        Stage::Dense => 3.0 * (2.0 * active_main * tokens + dense_attn),
    };
    // The layers' forward again (their matrices, without the LM head, and their attention;
    // the selection is reused).
    let head = (cfg.vocab_size * cfg.hidden_size) as f64;
    let recompute_flops = match stage {
        _ if !recipe.train.recompute => 0.0,
        Stage::Warmup => 0.0,
        Stage::Sparse => 2.0 * (active_main - head) * tokens + sparse_attn,
        Stage::Dense => 2.0 * (active_main - head) * tokens + dense_attn,
    };
    let micro_tokens = (recipe.train.micro_batch_seqs as u64 * t) as f64;
    // Context parallelism (every stage): each device computes 1/cp of every sequence's
    // tokens; what a query reads of the others (the latent kv rows and indexer keys, and
    // their gradients) is gathered whole.
    let cp = recipe.parallel.cp.max(1) as f64;
    let local_tokens = micro_tokens / cp;
    let hidden = cfg.hidden_size as f64;
    let (hi, di) = (cfg.index_n_heads as f64, cfg.index_head_dim as f64);
    let kk = k.min(t) as f64;
    // The whole-sequence part per token and, in the sparse stage, the indexer's block of
    // query rows (the trainer's: `Pass::indexer_rows` = 0).
    let b = recipe.train.micro_batch_seqs.max(1);
    let q_lora = cfg.q_lora_rank as f64;
    let (per_seq_token, indexer_block) = if stage == Stage::Sparse {
        let rows = crate::model::indexer::sparse_block_rows(
            b,
            t as usize,
            cfg.index_n_heads,
            cfg.index_head_dim,
            k as usize,
        ) as f64;
        // Gathered for every position: the keys and the latent kv; the rank's own rows: the
        // indexer's inputs, the KL target and the sets.
        let gathered = 20.0 * di + 12.0 * (c + r);
        let own = (hidden + q_lora) * dtype_bytes + 2.0 * kk * 4.0;
        (
            gathered + own / cp,
            b as f64
                * rows.min(t as f64 / cp)
                * (24.0 * hi * di + 4.0 * (hidden + q_lora) + 32.0 * kk),
        )
    } else {
        // No selection in the warm-up and dense stages.
        (10.0 * hi * di + 12.0 * (c + r), 0.0)
    };
    let per_query_ffn =
        4.0 * cfg.num_experts_per_tok as f64 * cfg.moe_intermediate_size as f64 * 2.0
            + 8.0 * hidden * dtype_bytes;
    let per_query = 14.0 * h * (c + r) + per_query_ffn;
    let layer_working_set = micro_tokens * per_seq_token + local_tokens * per_query + indexer_block;
    // Warm-up: the attention in MHA form (per-head q, k, v, the output and kv_b_proj's output
    // [H, N + V] that k and v are cut from, in the dtype), then
    // the feed-forward (`block_rows` tokens at a time in block mode) while the per-head q and
    // k wait for the KL (`DenseScores`); the larger phase counts.
    let mha_attention = dtype_bytes * h * (2.0 * qk + 2.0 * v + (qk - r + v));
    let kl_scores = dtype_bytes * h * 2.0 * qk;
    let ffn_tokens = match recipe.train.block_rows {
        0 => micro_tokens,
        rows => (rows as f64).min(micro_tokens),
    };
    let warmup_working_set = if cp > 1.0 {
        // Context parallelism (`DecoderLayer::forward_context_warmup`): every position's
        // gathered latent row (dtype) and indexer key with its gradient (f32), the MHA keys,
        // values and kv_b_proj output of every position; the rank's rows' inputs, per-head
        // queries, output and the KL's query gradients (f32); one block of query rows'
        // probabilities and the KL's work on them (about 4 f32 tensors of 2^26 values); the
        // feed-forward's block of the rank's tokens.
        let gathered = (c + r) * dtype_bytes + 8.0 * di + mha_attention - dtype_bytes * h * qk;
        let own =
            (2.0 * hidden + q_lora) * dtype_bytes + dtype_bytes * h * qk + 4.0 * hi * (di + 1.0);
        micro_tokens * gathered
            + local_tokens * own
            + 4.0 * 4.0 * (1u64 << 26) as f64
            + ffn_tokens.min(local_tokens) * per_query_ffn
    } else {
        micro_tokens * per_seq_token
            + (micro_tokens * mha_attention)
                .max(micro_tokens * kl_scores + ffn_tokens * per_query_ffn)
    };
    let block = recipe.train.block_rows;
    let blocked = stage == Stage::Sparse && recipe.train.recompute && block > 0;
    let sparse_working_set = if blocked {
        micro_tokens * per_seq_token + indexer_block + (block as f64).min(local_tokens) * per_query
    } else {
        layer_working_set
    };
    // One LM-head chunk: its logits and their gradient (compute dtype), and the loss's f32
    // work on one block of rows (3 f32 tensors of `LOSS_BLOCK` values).
    let lm_positions = if recipe.train.lm_head_chunk > 0 {
        recipe.train.lm_head_chunk
    } else {
        crate::losses::lm_chunk_positions(b, cfg.vocab_size)
    };
    let lm_rows = b * lm_positions.min(((t as f64 / cp) as usize).saturating_sub(1).max(1));
    let loss_block_rows = (crate::losses::LOSS_BLOCK / cfg.vocab_size.max(1))
        .max(1)
        .min(lm_rows);
    let lm_chunk = (lm_rows * cfg.vocab_size) as f64 * 2.0 * dtype_bytes
        + 12.0 * (loss_block_rows * cfg.vocab_size) as f64;
    let mtp_bytes = match (with_mtp, stage) {
        (false, _) | (_, Stage::Dense) => 0.0,
        // Written out as a main layer is (train::mtp): the same working set, plus its layer's
        // input and the module's and the main output's gradients (hidden each).
        (true, Stage::Sparse) if recipe.train.recompute => {
            sparse_working_set + local_tokens * 3.0 * hidden * dtype_bytes
        }
        // Candle's autograd over the whole sequence, logits unchunked.
        (true, _) => layer_working_set + micro_tokens * cfg.vocab_size as f64 * (dtype_bytes + 8.0),
    };
    // Sparse stage with recomputation: each layer's input and selected set wait for pass 2.
    let kept = local_tokens * (hidden * dtype_bytes + kk * 4.0) * layers;
    let offload =
        recipe.train.recompute && recipe.train.offload_activations && stage == Stage::Sparse;
    let host_bytes = if offload { kept } else { 0.0 };
    let activation_bytes = match stage {
        Stage::Warmup => local_tokens * hidden * dtype_bytes * 4.0 + warmup_working_set,
        Stage::Sparse if recipe.train.recompute => {
            // Offloaded: the layer's input and output (pass 1) or input and output gradient
            // (pass 2) and the one set in use stay on the device.
            let on_device = if offload {
                local_tokens * (2.0 * hidden * dtype_bytes + kk * 4.0)
            } else {
                kept
            };
            on_device + sparse_working_set.max(mtp_bytes) + lm_chunk
        }
        // What each layer's explicit backward reads, kept by pass 1 (`BackwardPlan::Saved`):
        // its per-query tensors (the indexer's f32 queries and head weights among them, which
        // its KL's backward reads instead of projecting them again) and the sequence's latent
        // kv, every layer; plus one layer's working set (the indexer's parts) and the MTP
        // module's while it is alive.
        Stage::Sparse => {
            (local_tokens * (per_query + 4.0 * hi * (di + 1.0)) + micro_tokens * 12.0 * (c + r))
                * layers
                + layer_working_set.max(mtp_bytes)
                + lm_chunk
        }
        // The flash-style attention of `dense_recompute`: one block of query rows' f32 scores,
        // probabilities and their gradients (4 tensors of at most 2^27 values), the per-head
        // q, k, v, output and their gradients in the dtype, and the f32 sums of dk and dv.
        Stage::Dense => {
            // Under context parallelism (`DecoderLayer::dense_attention_saved`) the queries
            // and outputs are the rank's rows, the keys and values every position's, each
            // half of the per-head tensors.
            // A block of query rows never crosses a rank's segment (t / (2 cp) rows).
            let segment = if cp > 1.0 {
                t as f64 / (2.0 * cp)
            } else {
                t as f64
            };
            let block_values = (crate::model::dense_recompute::block_rows(b, h as usize, t as usize)
                as f64)
                .min(segment)
                * b as f64
                * h * t as f64;
            let dense_working = 4.0 * 4.0 * block_values
                + (local_tokens + micro_tokens) / 2.0 * h * (qk + v) * (2.0 * dtype_bytes + 8.0);
            // Recompute: each layer's input. Saved: what its backward reads (the per-head q,
            // k, v and output in the dtype, the feed-forward's per-token tensors).
            let kept = if recipe.train.recompute {
                local_tokens * hidden * dtype_bytes * layers
            } else {
                (local_tokens * (h * (qk + v) * 2.0 * dtype_bytes + per_query_ffn)
                    + micro_tokens * 12.0 * (c + r))
                    * layers
            };
            // The attention is `dense_working`'s; the rest of a layer is per token (the
            // gathered latent rows of every position, the feed-forward of the rank's).
            kept + micro_tokens * per_seq_token
                + local_tokens * per_query_ffn
                + dense_working
                + lm_chunk
        }
    };
    // Parallel layout: dp x cp ranks from the recipe (dp 0 = one replica), each holding every
    // non-expert tensor; ep splits the routed experts.
    let dp = recipe.parallel.dp.max(1) as f64 * cp;
    let ep = recipe.parallel.ep.max(1) as f64;
    let is_expert = |s: &crate::weights::WeightSpec| s.name.contains(".mlp.experts.");
    let local = |s: &crate::weights::WeightSpec| {
        if is_expert(s) {
            numel(s) as f64 / ep
        } else {
            numel(s) as f64
        }
    };
    let holders =
        |s: &crate::weights::WeightSpec| if is_expert(s) { (dp / ep).max(1.0) } else { dp };
    // model.frozen_fp8 (warm-up): the frozen tensors a layer's attention and feed-forward
    // take from the checkpoint in FP8 stay one byte a value plus a 4-byte scale per 128 x 128
    // block, and the largest layer exists dequantised while it runs.
    let held_fp8 = |s: &crate::weights::WeightSpec| {
        recipe.model.frozen_fp8
            && !trainable(s)
            && s.storage() == crate::checkpoint::StDtype::F8E4M3
            && (s.name.contains(".self_attn.") || s.name.contains(".mlp."))
    };
    let mut dequantised_layer = std::collections::BTreeMap::<String, f64>::new();
    let zero3 = recipe.parallel.zero >= 3 && dp > 1.0;
    // ZeRO-3: a tensor a decoder layer trains is held as the owned rows' f32 masters only
    // (counted with the optimizer state); the layer running has it whole in the compute dtype,
    // and while the layer is gathered the exchange's received rows once more.
    let layer_tensor = |s: &crate::weights::WeightSpec| {
        s.name.contains(".self_attn.") || s.name.contains(".mlp.") || s.name.contains("layernorm")
    };
    let gathered = |s: &crate::weights::WeightSpec| {
        zero3 && trainable(s) && layer_tensor(s) && !(is_expert(s) && holders(s) <= 1.0)
    };
    let layer_of = |s: &crate::weights::WeightSpec| -> String {
        s.name.split('.').take(3).collect::<Vec<_>>().join(".")
    };
    let mut gathered_layer = std::collections::BTreeMap::<String, f64>::new();
    for s in specs.iter().filter(|s| gathered(s)) {
        *gathered_layer.entry(layer_of(s)).or_default() += local(s) * dtype_bytes;
    }
    let fp8_offload = recipe.model.frozen_fp8_offload;
    let fp8_bytes = 1.0 + 4.0 / (128.0 * 128.0);
    // Gathered (ZeRO-3) or copied from the host (offload), one whole FP8 tensor is on the
    // device while it is dequantised.
    let (mut frozen_host_bytes, mut fp8_in_flight) = (0.0, 0.0f64);
    let weight_bytes: f64 = specs
        .iter()
        .map(|s| {
            if held_fp8(s) {
                let layer = s.name.split(".self_attn.").next().unwrap_or("");
                let layer = layer.split(".mlp.").next().unwrap_or("").to_string();
                *dequantised_layer.entry(layer).or_default() += local(s) * dtype_bytes;
                // ZeRO-3 splits the rows of those outside the routed experts over the dp ranks.
                let sharded = zero3 && !is_expert(s);
                if sharded || fp8_offload {
                    fp8_in_flight = fp8_in_flight.max(local(s) * fp8_bytes);
                }
                let held = local(s) * fp8_bytes / if sharded { dp } else { 1.0 };
                if fp8_offload {
                    frozen_host_bytes += held;
                    0.0
                } else {
                    held
                }
            } else if gathered(s) {
                0.0
            } else {
                local(s) * dtype_bytes
            }
        })
        .sum::<f64>()
        + dequantised_layer
            .keys()
            .chain(gathered_layer.keys())
            .map(|l| {
                dequantised_layer.get(l).copied().unwrap_or(0.0)
                    + 2.0 * gathered_layer.get(l).copied().unwrap_or(0.0)
            })
            .fold(0.0, f64::max)
        + fp8_in_flight;
    let zero2 = recipe.parallel.zero >= 2 && dp > 1.0;
    let gradient_peak = GradientPeak::new(&specs, &trainable, &local, dtype_bytes);
    let optimizer_bytes = if zero2 {
        // Owned rows: master, moments and the summed gradient; plus one unit's unreduced sum.
        most_loaded_rank_bytes(
            &specs,
            &trainable,
            recipe,
            cfg.n_routed_experts,
            master + 8.0 + 4.0,
        ) + gradient_peak.zero2()
    } else {
        // Owned rows: master and moments; every local trainable tensor's f32 sum; plus what
        // adding one unit's gradient to it holds.
        most_loaded_rank_bytes(
            &specs,
            &trainable,
            recipe,
            cfg.n_routed_experts,
            master + 8.0,
        ) + specs
            .iter()
            .filter(|s| trainable(s))
            .map(|s| local(s) * 4.0)
            .sum::<f64>()
            + gradient_peak.zero1(dp > 1.0)
    };
    // Loading (`train::build_model`): every tensor this rank holds is read whole, in the dtype
    // (FP8-held ones as their FP8 bytes, ZeRO-3 keeping their rows per tensor), but for the
    // ZeRO-3 layer tensors, read as the owned rows only; the owned rows get their f32 masters
    // and moments.
    let whole_weight_bytes: f64 = specs
        .iter()
        .map(|s| {
            if held_fp8(s) {
                let sharded = zero3 && !is_expert(s);
                if fp8_offload {
                    0.0
                } else {
                    local(s) * fp8_bytes / if sharded { dp } else { 1.0 }
                }
            } else if gathered(s) {
                0.0
            } else {
                local(s) * dtype_bytes
            }
        })
        .sum();
    let owned_state = most_loaded_rank_bytes(
        &specs,
        &trainable,
        recipe,
        cfg.n_routed_experts,
        master + 8.0,
    );
    let load_bytes = whole_weight_bytes + owned_state;
    // Resuming (`ckpt::load_owned`) also reads the checkpoint's f32 values and moments: whole
    // for the trained tensors a rank holds whole, the owned rows for ZeRO-3's layer tensors
    // (counted as the owned state once more, while they replace the fresh pieces).
    let resume_bytes = load_bytes
        + specs
            .iter()
            .filter(|s| trainable(s) && !gathered(s))
            .map(|s| local(s) * 12.0)
            .sum::<f64>()
        + if zero3 { owned_state } else { 0.0 };
    let ring = |n: f64| if n > 1.0 { 2.0 * (n - 1.0) / n } else { 0.0 };
    let micro_per_device = (recipe.micro_batches() as f64 / (dp / cp)).max(1.0);
    // ZeRO-1 sums the gradients once per step, ZeRO-2 once per micro-batch; then the shares.
    let grad_sums = if zero2 { micro_per_device } else { 1.0 };
    let grad_comm_bytes: f64 = (grad_sums + 1.0)
        * specs
            .iter()
            .filter(|s| trainable(s))
            .map(|s| local(s) * 4.0 * ring(holders(s)))
            .sum::<f64>();
    let moe_layers = (0..cfg.num_hidden_layers)
        .filter(|&l| cfg.is_moe_layer(l))
        .count() as f64;
    // Per routed row and pass over a MoE layer: out to the expert's holder and back; the
    // forward runs once (the warm-up, or no recomputation) or twice (first pass and the
    // recomputation), the backward sends the rows' gradients out and back (in the dtype).
    // With `parallel.fp8_dispatch` the forward's rows out go as FP8 codes and an f32 scale.
    let forward_passes = match stage {
        Stage::Warmup => 1.0,
        _ if recipe.train.recompute => 2.0,
        _ => 1.0,
    };
    let backward_passes = if stage == Stage::Warmup { 0.0 } else { 1.0 };
    let row_out = if recipe.parallel.fp8_dispatch {
        hidden + 4.0
    } else {
        hidden * dtype_bytes
    };
    let row_back = hidden * dtype_bytes;
    let expert_comm_bytes = moe_layers
        * micro_per_device
        * local_tokens
        * cfg.num_experts_per_tok as f64
        * ((ep - 1.0) / ep)
        * (forward_passes * (row_out + row_back) + backward_passes * 2.0 * row_back);
    // Context exchange, per layer (MTP included) and micro-batch: the rank's kv rows (C+R in the
    // dtype) to the cp - 1 others in the forward and again in the recomputation, its indexer
    // keys (DI f32) once, and the others' rows of the kv and key gradients (f32) home. The
    // warm-up (main model frozen, nothing recomputed): the kv rows and the keys once, the
    // keys' gradients home.
    let per_token_context = match stage {
        Stage::Warmup => (c + r) * dtype_bytes + 2.0 * di * 4.0,
        // The dense stage: no indexer keys.
        Stage::Dense => (c + r) * (2.0 * dtype_bytes + 4.0),
        Stage::Sparse => (c + r) * (2.0 * dtype_bytes + 4.0) + 2.0 * di * 4.0,
    };
    let context_comm_bytes = if cp > 1.0 {
        (layers + if with_mtp { 1.0 } else { 0.0 })
            * micro_per_device
            * micro_tokens
            * ((cp - 1.0) / cp)
            * per_token_context
    } else {
        0.0
    };
    // ZeRO-3 gathers, per layer and micro-batch: the rank's rows of the gathered tensors to
    // every other holder, for the first pass and again for the recomputing backward (the
    // warm-up's indexer: once).
    let passes = if stage == Stage::Warmup { 1.0 } else { 2.0 };
    let gather_comm_bytes = passes
        * micro_per_device
        * specs
            .iter()
            .filter(|s| gathered(s))
            .map(|s| local(s) * dtype_bytes * (holders(s) - 1.0) / holders(s))
            .fold(0.0, |a, b| a + b);
    Plan {
        trainable_params,
        frozen_params: total - trainable_params,
        tokens_per_step: tokens as u64,
        flops_per_step,
        recompute_flops,
        weight_bytes,
        optimizer_bytes,
        activation_bytes,
        host_bytes,
        frozen_host_bytes,
        micro_batches_per_device: micro_per_device,
        grad_comm_bytes,
        expert_comm_bytes,
        context_comm_bytes,
        gather_comm_bytes,
        load_bytes,
        resume_bytes,
    }
}

/// The gradient memory beside the owned shares, unit by unit, as the trainer holds it. A unit
/// is what the trainer sums over the ranks at once under ZeRO-2: one decoder layer (with its
/// indexer and local experts), or a tensor outside the layers alone (the embedding, the final
/// norm, the LM head). Byte counts (d = the compute dtype's bytes, u = a unit's local values,
/// L = its largest tensor's, B = 2^24 values, `accumulate::BLOCK_VALUES` = `zero::BUCKET`):
/// - the unit's f32 sum while its gradients arrive: 4 u (added to in place a block of rows at
///   a time: two f32 blocks, 8 B bytes, or 4 B when the gradient is f32 already);
/// - a unit differentiated by candle's backward (the layers; the final norm): one backward's
///   gradients in the compute dtype, d u, plus, while it forms the largest tensor's gradient,
///   the product and the zeros its store adds it to, 2 d L (or the add's two blocks, if more);
/// - the LM head and the embedding, whose gradients come a block of rows at a time
///   (`grad_rows`): one block's source in flight, at most 3 d B (the embedding's gathered rows,
///   its block before and after `index_add`) or d B + the add's two blocks;
/// - its reduction (ZeRO-2, or ZeRO-1's once per step): the sum is summed over the ranks in
///   place, a bucket or row chunk of B values at a time: the bucket's copy and the
///   collective's result, 8 B bytes.
struct GradientPeak {
    /// Per unit: (f32 sum bytes 4 u, extra bytes while its gradient arrives).
    units: Vec<(f64, f64)>,
    reduce: f64,
}

impl GradientPeak {
    fn new(
        specs: &[crate::weights::WeightSpec],
        trainable: &dyn Fn(&crate::weights::WeightSpec) -> bool,
        local: &dyn Fn(&crate::weights::WeightSpec) -> f64,
        dtype_bytes: f64,
    ) -> Self {
        let block = crate::train::accumulate::BLOCK_VALUES as f64;
        let add_block = block * if dtype_bytes == 4.0 { 4.0 } else { 8.0 };
        let by_rows = |name: &str| name == "lm_head.weight" || name == "model.embed_tokens.weight";
        // unit -> (values, largest tensor, produced by rows)
        let mut units: std::collections::BTreeMap<String, (f64, f64, bool)> =
            std::collections::BTreeMap::new();
        for s in specs.iter().filter(|s| trainable(s)) {
            let unit = match s.name.strip_prefix("model.layers.") {
                Some(rest) => rest.split('.').next().unwrap_or("").to_string(),
                None => s.name.clone(),
            };
            let e = units.entry(unit).or_insert((0.0, 0.0, by_rows(&s.name)));
            e.0 += local(s);
            e.1 = e.1.max(local(s));
        }
        let units = units
            .into_values()
            .map(|(u, largest, rows)| {
                let extra = if rows {
                    (3.0 * dtype_bytes * block).max(dtype_bytes * block + add_block)
                } else {
                    dtype_bytes * u + (2.0 * dtype_bytes * largest).max(add_block)
                };
                (4.0 * u, extra)
            })
            .collect();
        Self {
            units,
            reduce: 8.0 * crate::train::zero::BUCKET as f64,
        }
    }

    /// ZeRO-2: one unit's f32 sum at a time (each is summed onto its owners and freed before
    /// the next unit's gradients start), with what arrives into it or its reduction.
    fn zero2(&self) -> f64 {
        self.units
            .iter()
            .map(|&(sum, extra)| sum + extra.max(self.reduce))
            .fold(0.0, f64::max)
    }

    /// ZeRO-1 or one process: the sums of every unit exist all step (counted with the
    /// accumulator); beyond them, what one unit's gradient holds as it arrives, or (several
    /// ranks) the reduction's bucket at the end of the step.
    fn zero1(&self, reduced: bool) -> f64 {
        let arriving = self
            .units
            .iter()
            .map(|&(_, extra)| extra)
            .fold(0.0, f64::max);
        if reduced {
            arriving.max(self.reduce)
        } else {
            arriving
        }
    }
}

/// Optimizer bytes of the most-loaded rank, replaying the trainer's assignment
/// (`zero::assign_row_ranges`, as `zero::slot_ranges` calls it: replicated tensors over the dp
/// ranks, the routed experts of one expert-parallel slice over its dp/ep replicas; a tensor
/// above the fair share cut into row ranges, largest first to the least-loaded rank). `owned`
/// bytes per owned value (f32 master and moments, plus the ZeRO-2 gradient share). Without the
/// row ranges the owner of the 671B embedding (0.93B values; a rank's share at dp 2048 is about
/// 0.33B) would hold 3x the average; with them the most-loaded rank is near the average.
fn most_loaded_rank_bytes(
    specs: &[crate::weights::WeightSpec],
    trainable: &dyn Fn(&crate::weights::WeightSpec) -> bool,
    recipe: &Recipe,
    experts: usize,
    owned: f64,
) -> f64 {
    // Every rank (dp x cp) holds the non-expert tensors; an expert slice has world / ep holders.
    let dp = recipe.parallel.dp.max(1) * recipe.parallel.cp.max(1);
    let ep = recipe.parallel.ep.max(1);
    let slice = experts.div_ceil(ep).max(1); // experts per expert-parallel rank
    let is_expert =
        |s: &crate::weights::WeightSpec| ep > 1 && crate::weights::routed_expert(&s.name).is_some();
    let load = |f: &dyn Fn(&crate::weights::WeightSpec) -> bool, ranks: usize| -> Vec<usize> {
        let shapes: Vec<(usize, usize)> = specs
            .iter()
            .filter(|s| trainable(s) && f(s))
            .map(|s| {
                (
                    s.shape.first().copied().unwrap_or(1),
                    s.shape.iter().skip(1).product::<usize>(),
                )
            })
            .collect();
        let mut load = vec![0usize; ranks.max(1)];
        for r in crate::train::zero::assign_row_ranges(&shapes, ranks) {
            load[r.owner] += r.rows.len() * shapes[r.slot].1;
        }
        load
    };
    let replicated = load(&|s| !is_expert(s), dp);
    // Slice 0's experts (every slice is the same shape) over its dp/ep replicas.
    let expert = load(
        &|s| is_expert(s) && crate::weights::routed_expert(&s.name).is_some_and(|e| e < slice),
        (dp / ep).max(1),
    );
    (0..dp)
        .map(|r| {
            (replicated[r]
                + if ep > 1 {
                    expert[(r / ep).min(expert.len() - 1)]
                } else {
                    0
                }) as f64
                * owned
        })
        .fold(0.0, f64::max)
}

/// Human-readable report for `dsa-train check`.
pub fn report(recipe: &Recipe, p: &Plan) -> String {
    let gib = |b: f64| b / (1u64 << 30) as f64;
    let mut host = String::new();
    if p.host_bytes > 0.0 {
        host += &format!(
            "; host memory for offloaded activations {:.2} GiB",
            gib(p.host_bytes)
        );
    }
    if p.frozen_host_bytes > 0.0 {
        host += &format!(
            "; host memory for frozen FP8 weights {:.2} GiB",
            gib(p.frozen_host_bytes)
        );
    }
    format!(
        "parameters: {} trainable, {} frozen\ntokens per step: {} ({} x {})\nFLOPs per step: {:.3e}\n\
         layout: dp {} x cp {}, experts over ep {} ({} device(s))\n\
         memory per device (estimate): {:.2} GiB = weights {:.2} + optimizer/grads {:.2} + activations {:.2} (ZeRO-{}){}\n\
         while loading (estimate): {:.2} GiB (the held tensors, the owned rows' masters and moments); while resuming {:.2} GiB (and the checkpoint's values and moments of the trained tensors)\n\
         sent per device per step (estimate): gradient sums and ZeRO-1 shares {:.2} GiB, expert exchange {:.2} GiB, context gathers {:.2} GiB, ZeRO-3 weight gathers {:.2} GiB",
        p.trainable_params, p.frozen_params, p.tokens_per_step, recipe.train.global_batch_seqs, recipe.data.seq_len,
        p.flops_per_step, recipe.parallel.dp.max(1), recipe.parallel.cp.max(1), recipe.parallel.ep,
        recipe.parallel.dp.max(1) * recipe.parallel.cp.max(1),
        gib(p.memory_bytes()), gib(p.weight_bytes), gib(p.optimizer_bytes), gib(p.activation_bytes), recipe.parallel.zero,
        host, gib(p.load_bytes), gib(p.resume_bytes),
        gib(p.grad_comm_bytes), gib(p.expert_comm_bytes), gib(p.context_comm_bytes),
        gib(p.gather_comm_bytes)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::{Kind, WeightSpec};

    fn spec(name: &str, rows: usize) -> WeightSpec {
        WeightSpec {
            name: name.to_string(),
            shape: vec![rows, 10],
            kind: Kind::Linear,
            indexer: false,
        }
    }

    #[test]
    fn gradient_sums_are_counted_as_the_trainer_holds_them() {
        let block = crate::train::accumulate::BLOCK_VALUES as f64;
        // bf16: a block of rows of the head or embedding in flight is 10 B bytes (the block in
        // bf16, its f32 copy and the block's sum), above 3 x 2 B and the reduction's 8 B.
        let rows_in_flight = 10.0 * block;
        let mut json = crate::tiny::tiny_config(true);
        json["vocab_size"] = (1 << 20).into(); // the head and embedding outgrow every layer
        let cfg =
            crate::config::ModelConfig::from_json(&json.to_string(), &Default::default()).unwrap();
        let head = (cfg.vocab_size * cfg.hidden_size) as f64;
        let mut recipe = Recipe::default();
        recipe.train.stage = Stage::Sparse;
        recipe.model.dtype = "bf16".into();
        recipe.model.mtp = false;
        recipe.parallel.dp = 1;
        let p = plan_for(&recipe, &cfg);
        let trainable = p.trainable_params as f64;
        // One process: master and moments (12 bytes), the f32 sums (4), one block in flight.
        assert!(
            (p.optimizer_bytes - (trainable * 16.0 + rows_in_flight)).abs() < 1.0,
            "one rank: {} vs {}",
            p.optimizer_bytes,
            trainable * 16.0 + rows_in_flight
        );
        // ZeRO-2: the owned shares (16 bytes per owned value) and the head's f32 sum (4 bytes a
        // value; no second copy, no bf16 copy) with one block in flight.
        recipe.parallel.dp = 2;
        recipe.parallel.zero = 2;
        let two = plan_for(&recipe, &cfg).optimizer_bytes;
        let specs = model_weights(&cfg, false);
        let shares = most_loaded_rank_bytes(
            &specs,
            &|s| Stage::Sparse.trains(s),
            &recipe,
            cfg.n_routed_experts,
            16.0,
        );
        assert!(
            (two - (shares + head * 4.0 + rows_in_flight)).abs() < 1.0,
            "ZeRO-2: {two} vs shares {shares} + head {}",
            head * 4.0
        );

        // A layer differentiated by candle's backward: its f32 sum, its bf16 gradients, and the
        // product and zeros of its largest tensor (here above the add's two f32 blocks).
        let mut json = crate::tiny::tiny_config(true);
        json["moe_intermediate_size"] = (1 << 18).into();
        let cfg =
            crate::config::ModelConfig::from_json(&json.to_string(), &Default::default()).unwrap();
        let specs = model_weights(&cfg, false);
        let layer = |l: usize| -> (f64, f64) {
            let mine: Vec<f64> = specs
                .iter()
                .filter(|s| {
                    s.name.starts_with(&format!("model.layers.{l}.")) && Stage::Sparse.trains(s)
                })
                .map(|s| s.shape.iter().product::<usize>() as f64)
                .collect();
            (mine.iter().sum(), mine.iter().cloned().fold(0.0, f64::max))
        };
        let (u, largest) = layer(1); // a MoE layer
        assert!(
            4.0 * largest > 8.0 * block && u > head_of(&cfg),
            "the layer must dominate: {u} values, largest {largest}"
        );
        let shares = most_loaded_rank_bytes(
            &specs,
            &|s| Stage::Sparse.trains(s),
            &recipe,
            cfg.n_routed_experts,
            16.0,
        );
        let two = plan_for(&recipe, &cfg).optimizer_bytes;
        let want = shares + u * 6.0 + largest * 4.0;
        assert!(
            (two - want).abs() < 1.0,
            "ZeRO-2 layer unit: {two} vs {want}"
        );
    }

    /// The slice-671b preset's configuration (the 671B widths, 2 layers, 16 experts).
    fn slice_config() -> crate::config::ModelConfig {
        crate::config::ModelConfig::from_json(
            &crate::tiny::slice_671b_config().to_string(),
            &Default::default(),
        )
        .unwrap()
    }

    /// A bf16 recipe for the slice: one sequence of `len` tokens in `stage`, `block` rows per
    /// block, k 2048, MTP off.
    /// `recipe` recomputing, 4 sequences a step, one per micro-batch, on 4 data-parallel ranks.
    fn four_sequences_on_four_ranks(mut recipe: Recipe) -> Recipe {
        recipe.train.recompute = true;
        recipe.train.global_batch_seqs = 4;
        recipe.train.micro_batch_seqs = 1;
        recipe.parallel.dp = 4;
        recipe
    }

    fn slice_recipe(stage: Stage, len: usize, block: usize) -> Recipe {
        let mut recipe = Recipe::default();
        recipe.train.stage = stage;
        recipe.model.dtype = "bf16".into();
        recipe.model.mtp = false;
        recipe.data.seq_len = len;
        recipe.train.block_rows = block;
        recipe.dsa.index_topk = 2048;
        recipe
    }

    /// The slice-671b preset is what its name says (2.0B parameters at the 671B widths) and,
    /// by `check`'s count, fits one 80 GB GPU in all three stages at the lengths of its
    /// benchmarks (dense 8K; warm-up 32K; sparse 32K and 128K in blocks of 4096 and 2048 queries).
    #[test]
    fn the_slice_of_the_671b_model_fits_one_80_gb_gpu_in_every_stage() {
        let cfg = slice_config();
        assert_eq!(
            (
                cfg.hidden_size,
                cfg.num_attention_heads,
                cfg.moe_intermediate_size,
                cfg.num_experts_per_tok
            ),
            (7168, 128, 2048, 8)
        );
        let params: usize = model_weights(&cfg, false)
            .iter()
            .map(|s| s.shape.iter().product::<usize>())
            .sum();
        assert!(
            (1.9e9..2.1e9).contains(&(params as f64)),
            "{params} parameters"
        );
        for (stage, len, block) in [
            (Stage::Dense, 8192, 0),
            (Stage::Warmup, 32768, 0),
            (Stage::Sparse, 32768, 4096),
            (Stage::Sparse, 131072, 2048),
        ] {
            let recipe = slice_recipe(stage, len, block);
            let gib = plan_for(&recipe, &cfg).memory_bytes() / (1u64 << 30) as f64;
            let p = plan_for(&recipe, &cfg);
            assert!(gib < 75.0, "{stage} at {len}: {gib:.1} GiB by check's count (weights {:.1}, optimizer {:.1}, activations {:.1})", p.weight_bytes / 1073741824.0, p.optimizer_bytes / 1073741824.0, p.activation_bytes / 1073741824.0);
        }
    }

    /// Saved activations (`train.recompute = false`): each layer's per-query tensors (the
    /// absorbed attention's 14 H (C+R) bytes, the feed-forward's, the indexer's f32 queries and
    /// head weights) and its latent kv stay
    /// for the backward, in place of each layer's input and sets; the slice at 8K still fits
    /// 80 GB, and the difference is exactly that count for its two layers.
    #[test]
    fn saved_activations_count_every_layers_per_query_tensors() {
        let cfg = slice_config();
        let recompute = plan_for(&slice_recipe(Stage::Sparse, 8192, 0), &cfg);
        let mut r = slice_recipe(Stage::Sparse, 8192, 0);
        r.train.recompute = false;
        let saved = plan_for(&r, &cfg);
        let (t, layers) = (8192.0, 2.0);
        let per_query = 14.0 * 128.0 * 576.0
            + 4.0 * 8.0 * 2048.0 * 2.0
            + 8.0 * 7168.0 * 2.0
            + 4.0 * 64.0 * 129.0; // the indexer's f32 queries and head weights
        let kept_saved = (t * per_query + t * 12.0 * 576.0) * layers;
        let kept_recompute = t * (7168.0 * 2.0 + 2048.0 * 4.0) * layers;
        let grew = saved.activation_bytes - recompute.activation_bytes;
        assert!(
            (grew - (kept_saved - kept_recompute)).abs() < 1.0,
            "saved {grew} more bytes, want {}",
            kept_saved - kept_recompute
        );
        let gib = saved.memory_bytes() / (1u64 << 30) as f64;
        assert!(gib < 75.0, "{gib:.1} GiB");
        assert_eq!(saved.flops_per_step, recompute.flops_per_step);
    }

    /// model.frozen_fp8 halves the slice's frozen projections and experts (one byte a value
    /// and the scales) and adds back the largest layer dequantised; the trained indexer,
    /// norms, embedding and head are unchanged.
    #[test]
    fn frozen_fp8_counts_a_byte_a_frozen_value_plus_the_largest_layer() {
        let cfg = slice_config();
        let dense = plan_for(&slice_recipe(Stage::Warmup, 8192, 0), &cfg);
        let mut r = slice_recipe(Stage::Warmup, 8192, 0);
        r.model.frozen_fp8 = true;
        let fp8 = plan_for(&r, &cfg);
        let specs = model_weights(&cfg, false);
        let held = |s: &crate::weights::WeightSpec| {
            !Stage::Warmup.trains(s)
                && s.storage() == crate::checkpoint::StDtype::F8E4M3
                && (s.name.contains(".self_attn.") || s.name.contains(".mlp."))
        };
        let n = |s: &crate::weights::WeightSpec| s.shape.iter().product::<usize>() as f64;
        let held_values: f64 = specs.iter().filter(|s| held(s)).map(n).sum();
        let largest_layer = (0..cfg.num_hidden_layers)
            .map(|l| {
                specs
                    .iter()
                    .filter(|s| held(s) && s.name.starts_with(&format!("model.layers.{l}.")))
                    .map(n)
                    .sum::<f64>()
            })
            .fold(0.0, f64::max);
        let want =
            dense.weight_bytes - held_values * (2.0 - 1.0 - 4.0 / 16384.0) + 2.0 * largest_layer;
        assert!(
            held_values > 1e9,
            "the slice's frozen FP8 values: {held_values}"
        );
        assert!(
            (fp8.weight_bytes - want).abs() < 1.0,
            "{} vs {want}",
            fp8.weight_bytes
        );
        assert_eq!(fp8.activation_bytes, dense.activation_bytes);
        // The 671B model's warm-up at dp = ep = 16: the weights fall to about half (the
        // slice's two layers gain little: one of them is held dequantised while it runs).
        let big = crate::config::ModelConfig::from_json(
            include_str!("../../tests/data/deepseek-v3.1-terminus/config.json"),
            &Default::default(),
        )
        .unwrap();
        let mut r = slice_recipe(Stage::Warmup, 131072, 0);
        r.parallel.dp = 16;
        r.parallel.ep = 16;
        let dense = plan_for(&r, &big).weight_bytes;
        r.model.frozen_fp8 = true;
        let fp8 = plan_for(&r, &big).weight_bytes;
        assert!(
            fp8 < 0.55 * dense,
            "671B warm-up weights: {:.1} GiB in FP8 vs {:.1} GiB",
            fp8 / 1073741824.0,
            dense / 1073741824.0
        );
    }

    /// model.frozen_fp8_offload moves the FP8 bytes to the host (`frozen_host_bytes`), leaving
    /// on the device the largest layer dequantised and one FP8 tensor in flight; ZeRO-3 then
    /// divides the host bytes outside the routed experts by dp.
    #[test]
    fn frozen_fp8_offload_moves_the_fp8_bytes_to_the_host() {
        let cfg = slice_config();
        let mut r = slice_recipe(Stage::Warmup, 8192, 0);
        r.model.frozen_fp8 = true;
        let on_device = plan_for(&r, &cfg);
        r.model.frozen_fp8_offload = true;
        let offloaded = plan_for(&r, &cfg);
        assert_eq!(on_device.frozen_host_bytes, 0.0);
        assert!(offloaded.frozen_host_bytes > 1e9);
        let largest_tensor = model_weights(&cfg, false)
            .iter()
            .filter(|s| s.name.contains(".mlp.") && !Stage::Warmup.trains(s))
            .map(|s| s.shape.iter().product::<usize>() as f64)
            .fold(0.0, f64::max);
        let want = on_device.weight_bytes - offloaded.frozen_host_bytes
            + largest_tensor * (1.0 + 4.0 / 16384.0);
        assert!(
            (offloaded.weight_bytes - want).abs() < 1.0,
            "{} vs {want}",
            offloaded.weight_bytes
        );
        r.parallel.dp = 4;
        r.parallel.zero = 3;
        r.train.global_batch_seqs = 4;
        let sharded = plan_for(&r, &cfg);
        assert!(sharded.frozen_host_bytes < offloaded.frozen_host_bytes);
        assert!(sharded.frozen_host_bytes > offloaded.frozen_host_bytes / 4.0);
    }

    /// The warm-up's block mode counts its feed-forward for `block_rows` tokens and leaves the
    /// whole-sequence attention as it is (the larger of the two phases counts), nothing else
    /// changed.
    #[test]
    fn warm_up_blocks_count_the_feed_forward_for_the_block_only() {
        let cfg = slice_config();
        let whole = plan_for(&slice_recipe(Stage::Warmup, 32768, 0), &cfg);
        let blocked = plan_for(&slice_recipe(Stage::Warmup, 32768, 2048), &cfg);
        // Per token: the feed-forward's 4 x 8 x 2048 x 2 + 8 x 7168 x 2 bytes beside the KL's
        // q and k (2 x 128 x 2 x 192), or the MHA attention's 2 x 128 x (2 x 192 + 2 x 128 +
        // 256): the larger phase counts.
        let ffn: f64 = 4.0 * 8.0 * 2048.0 * 2.0 + 8.0 * 7168.0 * 2.0;
        let attention: f64 = 2.0 * 128.0 * (2.0 * 192.0 + 2.0 * 128.0 + 256.0);
        let scores: f64 = 2.0 * 128.0 * 2.0 * 192.0;
        let saved = whole.activation_bytes - blocked.activation_bytes;
        let phase =
            |ffn_tokens: f64| (32768.0 * attention).max(32768.0 * scores + ffn_tokens * ffn);
        let want = phase(32768.0) - phase(2048.0);
        assert!(
            (saved - want).abs() < 1.0,
            "saved {saved} bytes, want {want}"
        );
        assert_eq!(whole.weight_bytes, blocked.weight_bytes);
        assert_eq!(whole.flops_per_step, blocked.flops_per_step);
    }

    /// `check`'s estimate against the device memory peak `bench step` measured for the
    /// slice-671b model (one NVIDIA H100 80GB HBM3, 2026-12-07, `scripts/gpu/memory_check.sh`,
    /// docs/scaling.md): within 10 % for the sparse stage and the warm-up (whole and in
    /// blocks). The dense stage's estimate stays an upper bound (its plain twin's f32 score
    /// blocks are counted; the CUDA kernel keeps none).
    #[test]
    fn the_estimate_is_within_ten_percent_of_the_measured_peak_on_the_slice() {
        let cfg = slice_config();
        for (stage, len, block, measured_gib) in [
            (Stage::Warmup, 16384, 0, 11.5),
            (Stage::Warmup, 16384, 2048, 9.8),
            (Stage::Sparse, 8192, 0, 44.8),
            (Stage::Sparse, 32768, 4096, 42.1),
            (Stage::Dense, 8192, 0, 38.8),
        ] {
            let recipe = slice_recipe(stage, len, block);
            let gib = plan_for(&recipe, &cfg).memory_bytes() / (1u64 << 30) as f64;
            let ratio = gib / measured_gib;
            if stage == Stage::Dense {
                assert!(
                    (1.0..1.3).contains(&ratio),
                    "{stage} {len}: {gib:.1} GiB vs {measured_gib}"
                );
            } else {
                assert!(
                    (0.9..1.1).contains(&ratio),
                    "{stage} {len} blocks {block}: {gib:.1} GiB vs measured {measured_gib}"
                );
            }
        }
    }

    fn head_of(cfg: &crate::config::ModelConfig) -> f64 {
        (cfg.vocab_size * cfg.hidden_size) as f64
    }

    #[test]
    fn the_most_loaded_rank_holds_about_the_fair_share_once_large_tensors_are_split_by_rows() {
        let mut recipe = Recipe::default();
        recipe.parallel.dp = 4;
        let all = |_: &WeightSpec| true;
        // Four equal tensors over four ranks: one each, the average.
        let even: Vec<WeightSpec> = (0..4)
            .map(|i| spec(&format!("model.layers.{i}.w"), 5))
            .collect();
        assert_eq!(
            most_loaded_rank_bytes(&even, &all, &recipe, 0, 2.0),
            5.0 * 10.0 * 2.0
        );
        // One tensor of 100 rows beside three of 5 (fair share 1150 / 4 -> 288 values): split
        // into four ranges of 25 rows, one per rank, and the three small ones on top of three of
        // them. Whole, its owner would hold all 1000.
        let mut skewed = even[..3].to_vec();
        skewed.push(spec("model.embed_tokens.weight", 100));
        assert_eq!(
            most_loaded_rank_bytes(&skewed, &all, &recipe, 0, 1.0),
            300.0
        );
        // Routed experts split over ep = 2: slice 0 (experts 0, 1 of 4) over dp / ep = 2 replicas.
        recipe.parallel.ep = 2;
        let experts: Vec<WeightSpec> = (0..4)
            .map(|e| spec(&format!("model.layers.1.mlp.experts.{e}.up_proj.weight"), 7))
            .collect();
        assert_eq!(
            most_loaded_rank_bytes(&experts, &all, &recipe, 4, 1.0),
            70.0
        );
    }

    /// Context parallelism in the sparse stage: a device holds 1/cp of each sequence's rows
    /// (the kept layer inputs and sets, in host memory here, exactly halve at cp 2), the
    /// gathered kv rows and indexer keys stay whole, the weights do not change, and the context
    /// traffic is the formula's: per layer and micro-batch, (cp-1)/cp of the sequence's rows of
    /// kv (twice in the dtype, once in f32) and of the keys (twice in f32).
    #[test]
    fn context_parallelism_divides_the_rows_a_device_holds() {
        let cfg = slice_config();
        let mut r = slice_recipe(Stage::Sparse, 131072, 2048);
        r.train.recompute = true;
        r.train.offload_activations = true;
        r.train.global_batch_seqs = 4;
        r.train.micro_batch_seqs = 1;
        r.parallel.dp = 4;
        let one = plan_for(&r, &cfg);
        r.parallel.dp = 2;
        r.parallel.cp = 2;
        let two = plan_for(&r, &cfg);
        assert_eq!(one.context_comm_bytes, 0.0);
        assert_eq!(two.weight_bytes, one.weight_bytes);
        assert!((two.host_bytes - one.host_bytes / 2.0).abs() < 1.0);
        assert!(two.activation_bytes < one.activation_bytes);
        let (c, r_dim, di) = (
            cfg.kv_lora_rank as f64,
            cfg.qk_rope_head_dim as f64,
            cfg.index_head_dim as f64,
        );
        let want = cfg.num_hidden_layers as f64 // MTP off
            * 2.0 // micro-batches per device: 4 over dp 2
            * 131072.0
            * 0.5
            * ((c + r_dim) * (2.0 * 2.0 + 4.0) + 2.0 * di * 4.0);
        assert!(
            (two.context_comm_bytes - want).abs() < 1.0,
            "{} vs {want}",
            two.context_comm_bytes
        );
        // The gathered part is whole: halving the rows takes less than half the activations.
        assert!(two.activation_bytes > one.activation_bytes / 2.0);
        // The warm-up: the kv rows (dtype) and keys (f32) out once, the keys' gradients home.
        let mut w = slice_recipe(Stage::Warmup, 131072, 0);
        w.train.global_batch_seqs = 4;
        w.train.micro_batch_seqs = 1;
        w.parallel.dp = 4;
        let one = plan_for(&w, &cfg);
        w.parallel.dp = 2;
        w.parallel.cp = 2;
        let two = plan_for(&w, &cfg);
        let want = cfg.num_hidden_layers as f64
            * 2.0
            * 131072.0
            * 0.5
            * ((c + r_dim) * 2.0 + 2.0 * di * 4.0);
        assert!(
            (two.context_comm_bytes - want).abs() < 1.0,
            "warm-up: {} vs {want}",
            two.context_comm_bytes
        );
        assert_eq!(two.weight_bytes, one.weight_bytes);
        assert!(two.activation_bytes < one.activation_bytes);
        // The dense stage (recomputing): the kv rows out twice (dtype) and their gradients
        // home (f32); no indexer keys.
        let mut d = four_sequences_on_four_ranks(slice_recipe(Stage::Dense, 32768, 0));
        let one = plan_for(&d, &cfg);
        d.parallel.dp = 2;
        d.parallel.cp = 2;
        let two = plan_for(&d, &cfg);
        let want = cfg.num_hidden_layers as f64 * 2.0 * 32768.0 * 0.5 * (c + r_dim) * 8.0;
        assert!(
            (two.context_comm_bytes - want).abs() < 1.0,
            "dense: {} vs {want}",
            two.context_comm_bytes
        );
        assert_eq!(two.weight_bytes, one.weight_bytes);
        assert!(two.activation_bytes < one.activation_bytes);
        assert!(two.activation_bytes > one.activation_bytes / 2.0);
    }

    /// FP8 dispatch: of a routed row's six transfers in the recomputing sparse stage (out and
    /// back twice in the forward, twice in the backward) the two outs go as hidden FP8 bytes
    /// and a 4-byte scale instead of 2 hidden bf16 bytes; nothing else changes.
    #[test]
    fn fp8_dispatch_sends_the_forward_rows_out_in_one_byte() {
        let cfg = slice_config();
        let mut r = four_sequences_on_four_ranks(slice_recipe(Stage::Sparse, 8192, 2048));
        r.parallel.ep = 4;
        let bf16 = plan_for(&r, &cfg);
        r.parallel.fp8_dispatch = true;
        let fp8 = plan_for(&r, &cfg);
        let hidden = cfg.hidden_size as f64;
        let want = (2.0 * (hidden + 4.0 + 2.0 * hidden) + 4.0 * hidden) / (12.0 * hidden);
        let ratio = fp8.expert_comm_bytes / bf16.expert_comm_bytes;
        assert!((ratio - want).abs() < 1e-12, "{ratio} vs {want}");
        assert!(bf16.expert_comm_bytes > 0.0);
        assert_eq!(fp8.weight_bytes, bf16.weight_bytes);
        assert_eq!(fp8.activation_bytes, bf16.activation_bytes);
    }

    /// ZeRO-3 in the sparse stage (everything trains): the layers' weights leave the device
    /// but for the gathered layer, counted twice (its tensors and the received rows); what
    /// stays whole is the embedding, final norm, head and router biases; the optimizer state and the
    /// activations do not change; the gathers send, per layer and micro-batch, the layer's
    /// values times (n - 1) / n in the dtype, twice (first pass and recompute).
    #[test]
    fn zero3_keeps_the_layers_as_owned_rows_and_gathers_one_at_a_time() {
        let cfg = slice_config();
        let mut r = four_sequences_on_four_ranks(slice_recipe(Stage::Sparse, 8192, 2048));
        r.parallel.zero = 2;
        let z2 = plan_for(&r, &cfg);
        r.parallel.zero = 3;
        let z3 = plan_for(&r, &cfg);
        assert_eq!(z2.gather_comm_bytes, 0.0);
        assert_eq!(z3.optimizer_bytes, z2.optimizer_bytes);
        assert_eq!(z3.activation_bytes, z2.activation_bytes);
        let specs = model_weights(&cfg, false);
        let values = |keep: &dyn Fn(&str) -> bool| -> f64 {
            specs
                .iter()
                .filter(|s| keep(&s.name))
                .map(|s| s.shape.iter().product::<usize>() as f64)
                .sum()
        };
        // The router's correction bias moves by the sign rule, not the optimizer: it stays whole.
        let bias = |n: &str| n.ends_with("e_score_correction_bias");
        let outside = values(&|n| !n.starts_with("model.layers.") || bias(n));
        let per_layer: Vec<f64> = (0..cfg.num_hidden_layers)
            .map(|l| values(&|n| n.starts_with(&format!("model.layers.{l}.")) && !bias(n)))
            .collect();
        let largest = per_layer.iter().copied().fold(0.0, f64::max);
        assert!(
            (z2.weight_bytes - 2.0 * (outside + per_layer.iter().sum::<f64>())).abs() < 1.0,
            "ZeRO-2 holds every weight in bf16"
        );
        assert!(
            (z3.weight_bytes - 2.0 * (outside + 2.0 * largest)).abs() < 1.0,
            "{} vs {}",
            z3.weight_bytes,
            2.0 * (outside + 2.0 * largest)
        );
        let want = 2.0 * 1.0 * per_layer.iter().sum::<f64>() * 2.0 * 0.75;
        assert!(
            (z3.gather_comm_bytes - want).abs() < 1.0,
            "{} vs {want}",
            z3.gather_comm_bytes
        );
        // The load: every held tensor whole and the owned rows' f32 masters and moments (12
        // bytes a value); ZeRO-3 reads its layer tensors as the owned rows only, so its load
        // is ZeRO-2's less the layers' bf16 weights.
        let owned_state = z2.load_bytes - z2.weight_bytes;
        assert!(owned_state > 0.0);
        assert!(
            (z3.load_bytes - (2.0 * outside + owned_state)).abs() < 1.0,
            "{} vs {}",
            z3.load_bytes,
            2.0 * outside + owned_state
        );
        assert!(z2.load_bytes <= z2.memory_bytes());
        assert!(z3.peak_bytes() >= z3.load_bytes);
        // A resume reads the checkpoint's f32 values and moments of the trained tensors whole.
        assert!(z3.resume_bytes > z3.load_bytes);
        assert_eq!(z3.peak_bytes(), z3.resume_bytes.max(z3.memory_bytes()));
    }
}
