//! DeepSeek-V3 / V3.2 in candle: embeddings, decoder layers (MLA + indexer + MLP or MoE), the
//! final norm and LM head, and the multi-token-prediction (MTP) module.
//!
//! `forward(&self)` returns the logits and, per layer, exactly what the DSA losses and metrics
//! need (per-query indexer KL, attention-mass recall, expert load). Nothing is cached between
//! calls. Each layer computes its statistics as it goes and drops its L x L tensors before the
//! next layer runs, so at most one layer's L x L is alive at a time (unless gradients are being
//! recorded through them, which the trainer avoids by backpropagating layer by layer).
//! Evaluation (`Pass::Eval` with `rows`) has no L x L at all: it computes those statistics
//! a block of query rows at a time.

pub mod attention;
pub mod blocks;
pub mod dense_recompute;
pub mod dispatch;
pub mod fp8_frozen;
pub mod fp8_scores;
pub mod grad_sink;
pub mod indexer;
mod indexer_kl;
mod layer;
mod load;
pub mod materialize;
pub mod mtp;
pub mod sharded;

pub(crate) use load::build_layer;
pub use load::LoadOptions;
pub use mtp::Mtp;
pub mod moe;

use candle_core::{DType, Device, Result, Tensor};

use crate::config::ModelConfig;
use crate::kernels::KernelPolicy;
use crate::losses::kl_rows;
use crate::ops::{linear, rms_norm};
use crate::recipe::Stage;
use attention::Mla;
use indexer::Indexer;
use moe::{Mlp, Moe};

/// Which attention the main model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionMode {
    /// Every causal key (MHA mode): the warm-up stage.
    Dense,
    /// The indexer's top-k keys (absorbed MQA mode): the sparse stage.
    Sparse,
}

/// What a forward pass is for; it decides what each layer computes, keeps and detaches.
#[derive(Debug, Clone, PartialEq)]
pub enum Pass {
    /// Inference and evaluation (`eval`, the parity checks): attention `mode` over `topk` keys
    /// in sparse mode; per layer the indexer's KL (`kl`) and the attention-mass recall of the
    /// top-k (`recall`; a dense pass more in sparse mode). `rows`: Some(n) runs the attention's
    /// [.., T, T] work (dense attention, the KL target and the recall, the indexer's dense
    /// scores, their KL and top-k) n query rows at a time, so no [.., T, T] tensor exists and
    /// the results carry no graph (Some(0) = `eval_block_rows`, about 2^26 elements in a
    /// block's largest intermediate); None: whole-sequence tensors (the reference the blocked
    /// pass is tested against).
    Eval {
        attention: AttentionMode,
        topk: usize,
        kl: bool,
        recall: bool,
        rows: Option<usize>,
    },
    /// A training step's forward in `stage`. The sparse stage runs sparse attention over
    /// `topk` keys and detaches the indexer's inputs; the warm-up and dense stages run dense
    /// attention. `kl` (warm-up and sparse stages): the indexer's KL, deferred to the trainer
    /// (`LayerStats::deferred_kl`: dense target, streaming-kernel inputs, or the sparse
    /// selection and its target, which it computes and backpropagates a block of queries at a
    /// time), or per query with its graph (`LayerStats::indexer_kl`; the gradient-path tests). `seq_balance`: the MoE sequence-wise balance loss. `block_rows`
    /// (sparse stage, recomputing trainer's first pass, whose outputs are not
    /// differentiated): the layer runs that many queries at a time against the sequence's
    /// shared latent kv, each block detached (0 = whole; `DecoderLayer::sparse_backward` is
    /// its backward). `indexer_rows` (sparse stage): query rows per block of the indexer's
    /// selection and KL (0 = about 2^24 query values and 2^25 KL entries; tests force a few).
    /// In the warm-up, `block_rows` > 0 runs each layer's norm and feed-forward after the
    /// attention that many tokens at a time (`Pass::feed_forward_rows`).
    Train {
        stage: Stage,
        topk: usize,
        kl: IndexerKl,
        seq_balance: bool,
        block_rows: usize,
        indexer_rows: usize,
        backward: BackwardPlan,
    },
}

/// How a training pass's main layers get their backward (the warm-up's main model is frozen
/// and has none). The explicit layer backward (`blocks`) either recomputes each layer from its
/// input (`Recompute`: the first pass keeps the inputs and selected sets) or reads what the
/// first pass kept (`Saved`: about what autograd would keep, no forward work twice). Its twin
/// is candle's autograd of the layer forward (`Autograd`: the first pass builds a graph).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackwardPlan {
    Recompute,
    Saved,
    Autograd,
}

/// What a training pass does with the indexer's KL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexerKl {
    Off,
    /// Per query, differentiable (`LayerStats::indexer_kl`).
    PerQuery,
    /// Handed to the trainer (`LayerStats::deferred_kl`).
    Deferred,
}

impl Pass {
    /// Inference with every statistic, whole-sequence tensors.
    pub fn eval(attention: AttentionMode, topk: usize) -> Self {
        Pass::Eval {
            attention,
            topk,
            kl: true,
            recall: true,
            rows: None,
        }
    }

    /// Logits only: no indexer statistic.
    pub fn logits(attention: AttentionMode, topk: usize) -> Self {
        Pass::Eval {
            attention,
            topk,
            kl: false,
            recall: false,
            rows: None,
        }
    }

    /// The same pass with `n` query rows per block (evaluation passes; a training pass is
    /// returned as it is).
    pub fn in_rows(mut self, n: usize) -> Self {
        if let Pass::Eval { rows, .. } = &mut self {
            *rows = Some(n);
        }
        self
    }

    /// The same pass over the whole sequence at once (no block mode).
    pub fn whole(mut self) -> Self {
        match &mut self {
            Pass::Train { block_rows, .. } => *block_rows = 0,
            Pass::Eval { rows, .. } => *rows = None,
        }
        self
    }

    pub fn attention(&self) -> AttentionMode {
        match self {
            Pass::Eval { attention, .. } => *attention,
            Pass::Train {
                stage: Stage::Sparse,
                ..
            } => AttentionMode::Sparse,
            Pass::Train { .. } => AttentionMode::Dense,
        }
    }

    pub fn topk(&self) -> usize {
        match self {
            Pass::Eval { topk, .. } | Pass::Train { topk, .. } => *topk,
        }
    }

    /// Does each layer compute the indexer's KL (deferred in training)?
    pub fn indexer_kl(&self) -> bool {
        match self {
            Pass::Eval { kl, .. } => *kl,
            Pass::Train { stage, kl, .. } => *kl != IndexerKl::Off && *stage != Stage::Dense,
        }
    }

    pub fn recall(&self) -> bool {
        matches!(self, Pass::Eval { recall: true, .. })
    }

    /// The indexer reads detached inputs (x and qr): the sparse stage's training.
    pub fn detach_indexer_inputs(&self) -> bool {
        matches!(
            self,
            Pass::Train {
                stage: Stage::Sparse,
                ..
            }
        )
    }

    pub fn seq_balance(&self) -> bool {
        matches!(
            self,
            Pass::Train {
                seq_balance: true,
                ..
            }
        )
    }

    /// The indexer's KL goes to the trainer as `LayerStats::deferred_kl`.
    pub fn defer_kl(&self) -> bool {
        matches!(
            self,
            Pass::Train {
                kl: IndexerKl::Deferred,
                ..
            }
        ) && self.indexer_kl()
    }

    pub fn block_rows(&self) -> usize {
        match self {
            Pass::Train { block_rows, .. } => *block_rows,
            Pass::Eval { .. } => 0,
        }
    }

    /// The warm-up's block mode (`block_rows` > 0): tokens per block of the layers' norm and
    /// feed-forward after the attention (the main model is frozen: no graph to keep). None:
    /// the whole batch at once.
    pub fn feed_forward_rows(&self) -> Option<usize> {
        match self {
            Pass::Train {
                stage: Stage::Warmup,
                block_rows,
                ..
            } if *block_rows > 0 => Some(*block_rows),
            _ => None,
        }
    }

    /// The same pass with the layers' backward `plan` (evaluation passes are returned as they
    /// are).
    pub fn with_backward(mut self, plan: BackwardPlan) -> Self {
        if let Pass::Train { backward, .. } = &mut self {
            *backward = plan;
        }
        self
    }

    /// Does the first pass keep what each layer's explicit backward reads
    /// (`BackwardPlan::Saved`, the stages whose main model learns)?
    pub fn keeps_activations(&self) -> bool {
        matches!(
            self,
            Pass::Train {
                backward: BackwardPlan::Saved,
                stage: Stage::Sparse | Stage::Dense,
                ..
            }
        )
    }

    pub fn indexer_rows(&self) -> usize {
        match self {
            Pass::Train { indexer_rows, .. } => *indexer_rows,
            Pass::Eval { .. } => 0,
        }
    }

    pub fn eval_rows(&self) -> Option<usize> {
        match self {
            Pass::Eval { rows, .. } => *rows,
            Pass::Train { .. } => None,
        }
    }
}

/// What the warm-up KL of one layer needs, for evaluation by the caller.
pub enum DeferredKl {
    /// The plain path: the head-mean dense probabilities [B, T, T] (detached), evaluated a
    /// block of queries at a time.
    Plain {
        proj: indexer::IndexerProj,
        target: Tensor,
    },
    /// The streaming kernel: the target is recomputed tile by tile from q, k and the LSE.
    Streaming {
        proj: indexer::IndexerProj,
        scores: attention::DenseScores,
    },
    /// Sparse stage: the KL over each query's selected set against the sparse attention's
    /// head-mean probabilities `target` [B, T, K]. The keys [B, T, DI] (f32, detached) are
    /// kept; the queries [B, T, HI, DI] and head weights [B, T, HI] (f32, detached) too in a
    /// pass that keeps activations (`queries`), else the backward projects them again from
    /// `LayerStats::indexer_inputs`, `rows` queries at a time.
    Sparse {
        keys: Tensor,
        target: Tensor,
        sel: crate::dsa::Selection,
        rows: usize,
        queries: Option<(Tensor, Tensor)>,
    },
    /// The warm-up under context parallelism: the KL already differentiated, block by block,
    /// in the indexer's projections. `kl_sum`: the sum over the rank's query rows of their KL
    /// (f32 scalar); its gradients in the rows' queries `dq` [B, n, HI, DI] and head weights
    /// `dw` [B, n, HI], and in every position's keys `dk` [B, T, DI] (f32, this rank's terms).
    Rows {
        kl_sum: Tensor,
        dq: Tensor,
        dw: Tensor,
        dk: Tensor,
    },
}

impl DeferredKl {
    /// The whole-sequence projections the KL is built on (none in the sparse stage).
    pub fn proj(&self) -> Option<&indexer::IndexerProj> {
        match self {
            DeferredKl::Plain { proj, .. } | DeferredKl::Streaming { proj, .. } => Some(proj),
            DeferredKl::Sparse { .. } | DeferredKl::Rows { .. } => None,
        }
    }

    /// Plain path: per-query KL of queries q0..q0+n, [B, n], differentiable in the indexer.
    pub fn block(
        proj: &indexer::IndexerProj,
        target: &Tensor,
        ctx: &ForwardContext,
        q0: usize,
        n: usize,
    ) -> Result<Tensor> {
        Self::kl_rows_of(proj, &target.narrow(1, q0, n)?, ctx, q0, n)
    }

    /// The warm-up KL of queries q0..q0+n against their target rows `target` [B, n, T]: the
    /// indexer's scores of those rows plus their causal bias, `kl_rows`. Returns [B, n].
    pub fn kl_rows_of(
        proj: &indexer::IndexerProj,
        target: &Tensor,
        ctx: &ForwardContext,
        q0: usize,
        n: usize,
    ) -> Result<Tensor> {
        let scores = proj
            .scores_rows(q0, n)?
            .broadcast_add(&ctx.causal(q0, n)?)?; // [B, n, T]
        kl_rows(target, &scores)
    }
}

/// What one layer reports besides its hidden states.
#[derive(Default)]
pub struct LayerStats {
    /// [B, T] KL(p_t || softmax(I_t)) per query, over all causal keys (dense) or over S_t (sparse).
    pub indexer_kl: Option<Tensor>,
    /// [B, T] dense attention mass inside S_t per query.
    pub recall: Option<Tensor>,
    /// [B, T] the most dense attention mass any k keys hold per query (the recall's ceiling;
    /// evaluation passes only).
    pub recall_ceiling: Option<Tensor>,
    /// [B, T, 2] under FP8 selection scores (evaluation passes with the recall): per query
    /// whether its set equals the bf16 scores' set, and the recall of that set
    /// (`dsa::agreement_rows`).
    pub fp8_agreement: Option<Tensor>,
    /// Tokens routed to each expert (MoE layers only).
    pub expert_counts: Option<Vec<u32>>,
    /// MoE layers: the experts chosen per token [B*T*K] in token order (a recomputing backward
    /// reuses them instead of routing on the host again).
    pub chosen: Option<Vec<u32>>,
    /// Sequence-wise balance loss (MoE layers, when asked), scalar f32.
    pub balance_loss: Option<Tensor>,
    /// With `Pass::defer_kl`: the pieces of the dense KL.
    pub deferred_kl: Option<DeferredKl>,
    /// Sparse mode: the selected sets (a recomputing backward reuses them).
    pub selection: Option<crate::dsa::Selection>,
    /// Training: the indexer's inputs (x, qr), detached, and (warm-up, or a KL that is not
    /// deferred) the leaf projections its KL was built on; the trainer turns
    /// d(KL)/d(projections) into parameter gradients a chunk of tokens at a time
    /// (`Indexer::backprop_rows`). The sparse stage's deferred KL keeps no projections of every
    /// row (`DeferredKl::Sparse`): `indexer_proj` is None there.
    pub indexer_inputs: Option<(Tensor, Tensor)>,
    pub indexer_proj: Option<indexer::IndexerProj>,
    /// Block mode (MoE layers): the balance loss's f per sequence [B * E] (detached), which
    /// the blocked backward needs before it has seen every token.
    pub balance_weights: Option<Vec<f32>>,
    /// `Pass::keeps_activations`: what the layer's explicit backward reads.
    pub saved: Option<blocks::LayerSaved>,
}

pub struct ForwardOutput {
    /// [B, T, vocab] in the model dtype.
    pub logits: Tensor,
    /// Final hidden states before the last norm [B, T, hidden] (the MTP module reads them).
    pub hidden: Tensor,
    pub layers: Vec<LayerStats>,
}

pub enum FeedForward {
    Dense(Mlp),
    Moe(Moe),
}

pub struct DecoderLayer {
    pub input_norm: Tensor,
    pub post_attention_norm: Tensor,
    pub attn: Mla,
    pub indexer: Indexer,
    pub ffn: FeedForward,
    pub eps: f64,
    /// Which kernels the layer's norms run (its modules hold the same policy).
    pub kernels: KernelPolicy,
}

/// Per-forward constants shared by all layers.
#[derive(Clone)]
pub struct ForwardContext {
    /// RoPE tables, f32: [T, R/2] when every token's position is its index in the window;
    /// [T, B, R/2] under document masking (each token's position inside its document). Rows
    /// come first in both, so a block of query rows is `narrow(0, q0, n)` either way; the
    /// RoPE ops (`ops::rope_half`, `ops::rope_interleaved`) take both layouts.
    pub cos: Tensor,
    pub sin: Tensor,
    /// Sequence length.
    pub t: usize,
    /// Document masking: where each query's keys begin (None: every key up to the query).
    pub starts: Option<crate::dsa::KeyStarts>,
    /// Context parallelism: the query rows this rank computes and the channel to the ranks
    /// holding the others (None: every row of the sequence). The tables and masks above stay
    /// the whole sequence's; a pass takes its rows' part (`query_rows`, `local_rope`).
    pub shard: Option<std::sync::Arc<crate::dist::context::ContextShard>>,
}

impl ForwardContext {
    pub fn new(cfg: &ModelConfig, t: usize, device: &Device) -> Result<Self> {
        let (cos, sin) = crate::rope::tables(cfg, t, device)?;
        Ok(Self {
            cos,
            sin,
            t,
            starts: None,
            shard: None,
        })
    }

    /// This context with the query rows of `shard` (context parallelism).
    pub fn with_shard(mut self, shard: crate::dist::context::ContextShard) -> Self {
        self.shard = Some(std::sync::Arc::new(shard));
        self
    }

    /// The query rows a pass computes: the shard's, or every position.
    pub fn query_rows(&self) -> crate::dist::context::QueryRows {
        match &self.shard {
            Some(s) => s.rows.clone(),
            None => crate::dist::context::QueryRows::whole(self.t),
        }
    }

    /// The query rows in blocks of at most `rows` (0: every sequence's rows, or each segment of
    /// a context-parallel rank's), as many on every rank of a context group
    /// (`ContextShard::blocks`).
    pub fn query_blocks(&self, rows: usize) -> anyhow::Result<Vec<crate::dist::context::RowBlock>> {
        match &self.shard {
            Some(s) => s.blocks(rows),
            None => Ok(crate::dist::context::QueryRows::whole(self.t).blocks(rows)),
        }
    }

    /// The RoPE tables (cos, sin) of the query rows, in row order.
    pub fn local_rope(&self) -> Result<(Tensor, Tensor)> {
        match &self.shard {
            Some(s) => Ok((s.rows.take(&self.cos, 0)?, s.rows.take(&self.sin, 0)?)),
            None => Ok((self.cos.clone(), self.sin.clone())),
        }
    }

    /// Every position's key rows [B, T, C] from the query rows' own [B, rows, C] (the context
    /// group's all-gather; the rows themselves without a shard).
    pub fn gather_keys(&self, x: &Tensor) -> Result<Tensor> {
        match &self.shard {
            Some(s) => s.gather(x),
            None => Ok(x.clone()),
        }
    }

    /// The adjoint of `gather_keys`: the gradient of every position's key row [B, T, C], summed
    /// over the context group onto the query rows that own them, [B, rows, C] f32.
    pub fn key_grads_home(&self, dx: &Tensor) -> Result<Tensor> {
        match &self.shard {
            Some(s) => s.scatter_sum(dx),
            None => dx.to_dtype(DType::F32),
        }
    }

    /// The latent kv rows' gradient of every position of `b` sequences, [B*T, W], as the
    /// rank's rows [B*rows, W]: under context parallelism summed over the group onto the rows'
    /// owners (`key_grads_home`, f32); on one rank the rows themselves, unchanged.
    pub fn latent_grads_home(&self, dkv: &Tensor, b: usize) -> Result<Tensor> {
        match &self.shard {
            Some(_) => {
                let width = dkv.dim(1)?;
                let home = self.key_grads_home(&dkv.reshape((b, self.t, width))?)?;
                let rows = home.dim(1)?;
                home.reshape((b * rows, width))
            }
            None => Ok(dkv.clone()),
        }
    }

    /// The context of windows whose queries see only their own document: `starts` [B, T] (of
    /// this context's T), and RoPE angles of each token's position inside its document, the
    /// rows of this context's tables (so a document gets exactly the angles it would get
    /// alone). Every start 0 gives this context's tables, [T, B, R/2].
    pub fn with_documents(&self, starts: crate::dsa::KeyStarts) -> Result<Self> {
        let (b, t) = starts.dims();
        if t != self.t || self.cos.rank() != 2 {
            candle_core::bail!(
                "document starts cover {t} positions, the context {} (or it has them already)",
                self.t
            );
        }
        let device = self.cos.device();
        let positions = Tensor::from_vec(starts.positions(), b * t, device)?;
        let per_seq = |table: &Tensor| -> Result<Tensor> {
            let half = table.dim(1)?;
            table
                .index_select(&positions, 0)? // [B*T, R/2]
                .reshape((b, t, half))?
                .transpose(0, 1)?
                .contiguous() // [T, B, R/2]
        };
        Ok(Self {
            cos: per_seq(&self.cos)?,
            sin: per_seq(&self.sin)?,
            t,
            starts: Some(starts),
            shard: self.shard.clone(),
        })
    }

    /// The context of token windows `tokens` [B*T] under document masking, documents ending
    /// with `eos` (`dsa::KeyStarts::after_eos`). Windows without a boundary keep this context
    /// as it is: all-zero starts give the same numbers bit for bit, without the per-sequence
    /// tables and masks.
    pub fn for_documents(&self, tokens: &[u32], b: usize, eos: u32) -> Result<Self> {
        let starts = crate::dsa::KeyStarts::after_eos(tokens, b, self.t, eos, self.cos.device())
            .map_err(candle_core::Error::wrap)?;
        if starts.any_boundary() {
            self.with_documents(starts)
        } else {
            Ok(self.clone())
        }
    }

    /// The context of the first `n` positions (the MTP module runs on T - 1 - depth of them).
    pub fn prefix(&self, n: usize) -> Result<Self> {
        if n > self.t {
            candle_core::bail!("a prefix of {n} positions of a context of {}", self.t);
        }
        let starts = match &self.starts {
            Some(s) => {
                let (b, _) = s.dims();
                let host: Vec<u32> = (0..b).flat_map(|bi| s.seq(bi)[..n].to_vec()).collect();
                Some(
                    crate::dsa::KeyStarts::new(host, b, n, self.cos.device())
                        .map_err(candle_core::Error::wrap)?,
                )
            }
            None => None,
        };
        Ok(Self {
            cos: self.cos.narrow(0, 0, n)?,
            sin: self.sin.narrow(0, 0, n)?,
            t: n,
            starts,
            shard: self
                .shard
                .as_ref()
                .map(|s| std::sync::Arc::new(s.prefix(n))),
        })
    }

    /// Mask bias of queries q0..q0+n over the T keys: [n, T] causal, or [B, n, T] under
    /// document masking (built on demand; never [T, T] at long lengths unless a caller asks
    /// for every row). Add it to [B, n, T] scores; `per_head` shapes it for [B, H, n, T].
    pub fn causal(&self, q0: usize, n: usize) -> Result<Tensor> {
        match &self.starts {
            Some(s) => s.bias_rows(q0, n, self.t),
            None => crate::dsa::causal_rows(q0, n, self.t, self.cos.device()),
        }
    }

    /// The RoPE rows (cos, sin) of positions q0..q0+n of sequences b0..b0+bn: [n, R/2], or
    /// [n, bn, R/2] under document masking.
    pub fn rope_block(
        &self,
        b0: usize,
        bn: usize,
        q0: usize,
        n: usize,
    ) -> Result<(Tensor, Tensor)> {
        let rows = |table: &Tensor| -> Result<Tensor> {
            let r = table.narrow(0, q0, n)?;
            if r.rank() == 3 {
                r.narrow(1, b0, bn)
            } else {
                Ok(r)
            }
        };
        Ok((rows(&self.cos)?, rows(&self.sin)?))
    }

    /// The first key of queries q0..q0+n, u32 [B, n] (None without document masking).
    pub fn starts_rows(&self, q0: usize, n: usize) -> Result<Option<Tensor>> {
        self.starts
            .as_ref()
            .map(|s| s.tensor().narrow(1, q0, n))
            .transpose()
    }
}

/// A mask bias from `ForwardContext::causal` shaped for per-head scores [B, H, n, T]: [n, T]
/// broadcasts as it is, [B, n, T] gains the head axis.
pub fn per_head(bias: &Tensor) -> Result<Tensor> {
    if bias.rank() == 3 {
        bias.unsqueeze(1)
    } else {
        Ok(bias.clone())
    }
}

pub struct Model {
    pub cfg: ModelConfig,
    pub embed: Tensor,
    pub layers: Vec<DecoderLayer>,
    pub norm: Tensor,
    pub lm_head: Tensor,
    pub mtp: Vec<Mtp>,
    pub dtype: DType,
    pub device: Device,
    /// Which kernels its passes run (every kernel where it can run unless `set_kernels` says
    /// otherwise); each layer's modules hold a copy.
    pub kernels: KernelPolicy,
    /// Frozen weights its layers hold in FP8 (none unless the trainer asked: `model.frozen_fp8`).
    pub frozen_fp8: fp8_frozen::FrozenFp8,
    /// Trainable weights its layers hold as this rank's rows (none unless the trainer shards
    /// them: `parallel.zero = 3`).
    pub sharded: sharded::ShardedParams,
}

impl Model {
    /// Main layer `l` ready to run: the layer itself, or, where it holds weights in FP8, a copy
    /// with them dequantised (alive while the caller holds it).
    pub fn layer(&self, l: usize) -> Result<materialize::LayerToRun<'_>> {
        materialize::materialize(
            &self.layers[l],
            &self.frozen_fp8,
            &self.sharded,
            self.kernels,
        )
    }

    /// MTP module `m`'s layer, as `layer`.
    pub fn mtp_layer(&self, m: usize) -> Result<materialize::LayerToRun<'_>> {
        materialize::materialize(
            &self.mtp[m].layer,
            &self.frozen_fp8,
            &self.sharded,
            self.kernels,
        )
    }

    /// The ids of the tensors the decoder layers hold (main and MTP).
    pub fn layer_tensor_ids(&self) -> Result<std::collections::HashSet<candle_core::TensorId>> {
        let mut ids = std::collections::HashSet::new();
        for layer in self.layers.iter().chain(self.mtp.iter().map(|m| &m.layer)) {
            layer.map_tensors(&mut |t: &Tensor| {
                ids.insert(t.id());
                Ok(t.clone())
            })?;
        }
        Ok(ids)
    }

    /// Run the passes with `kernels` (kernels or their plain twins, per op).
    pub fn set_kernels(&mut self, kernels: KernelPolicy) {
        self.kernels = kernels;
        for layer in self
            .layers
            .iter_mut()
            .chain(self.mtp.iter_mut().map(|m| &mut m.layer))
        {
            layer.set_kernels(kernels);
        }
    }

    /// Score the top-k selection of every layer's indexer as `scores` says (an error where FP8
    /// scores cannot rotate the indexer's head dim).
    pub fn set_selection_scores(&mut self, scores: fp8_scores::SelectionScores) -> Result<()> {
        let di = self.cfg.index_head_dim;
        if scores == fp8_scores::SelectionScores::Fp8 && !di.is_power_of_two() {
            candle_core::bail!("dsa.indexer_scores = \"fp8\" rotates the indexer's rows by a Hadamard matrix, whose order must be a power of two: this model's index_head_dim is {di}");
        }
        for layer in self
            .layers
            .iter_mut()
            .chain(self.mtp.iter_mut().map(|m| &mut m.layer))
        {
            layer.indexer.scores = scores;
        }
        Ok(())
    }

    /// Hand every MoE layer's routed experts their rows in `dispatch`'s format.
    pub fn set_dispatch(&mut self, dispatch: dispatch::Dispatch) {
        for layer in self
            .layers
            .iter_mut()
            .chain(self.mtp.iter_mut().map(|m| &mut m.layer))
        {
            if let FeedForward::Moe(moe) = &mut layer.ffn {
                moe.dispatch = dispatch;
            }
        }
    }

    /// Token embeddings [B, T, hidden] for `tokens` [B, T] u32.
    pub fn embed(&self, tokens: &Tensor) -> Result<Tensor> {
        embed_with(self.kernels, &self.embed, tokens)
    }

    /// Final norm and LM head: [B, T, hidden] -> [B, T, vocab].
    pub fn head(&self, h: &Tensor) -> Result<Tensor> {
        linear(
            &rms_norm(self.kernels, h, &self.norm, self.cfg.rms_norm_eps)?,
            &self.lm_head,
        )
    }

    pub fn forward(&self, tokens: &Tensor, opts: &Pass) -> Result<ForwardOutput> {
        let ctx = ForwardContext::new(&self.cfg, tokens.dim(1)?, &self.device)?;
        self.forward_in(tokens, &ctx, opts)
    }

    /// `forward` in the context `ctx` (document masking: `ForwardContext::with_documents`).
    pub fn forward_in(
        &self,
        tokens: &Tensor,
        ctx: &ForwardContext,
        opts: &Pass,
    ) -> Result<ForwardOutput> {
        let (h, layers) = self.forward_layers_in(tokens, ctx, opts)?;
        Ok(ForwardOutput {
            logits: self.head(&h)?,
            hidden: h,
            layers,
        })
    }

    /// `forward` without the LM head: the final hidden states [B, T, hidden] (before the last
    /// norm) and each layer's statistics. For callers that run the head in chunks of
    /// positions, since the [B, T, vocab] logits outgrow the accelerator at long lengths.
    pub fn forward_layers(
        &self,
        tokens: &Tensor,
        opts: &Pass,
    ) -> Result<(Tensor, Vec<LayerStats>)> {
        let ctx = ForwardContext::new(&self.cfg, tokens.dim(1)?, &self.device)?;
        self.forward_layers_in(tokens, &ctx, opts)
    }

    /// `forward_layers` in the context `ctx`.
    pub fn forward_layers_in(
        &self,
        tokens: &Tensor,
        ctx: &ForwardContext,
        opts: &Pass,
    ) -> Result<(Tensor, Vec<LayerStats>)> {
        let mut h = self.embed(tokens)?;
        let mut layers = Vec::with_capacity(self.layers.len());
        for l in 0..self.layers.len() {
            let (next, stats) = self.layer(l)?.forward(&h, ctx, opts)?;
            h = next;
            layers.push(stats);
        }
        Ok((h, layers))
    }
}

/// The embedding rows of `tokens` (u32 [B, T]). A row gather whose backward sums each
/// vocabulary row's gradients in parallel and in token order (`rows::RowPlan`); a token id
/// past the vocabulary is an error, not a device assertion.
pub(crate) fn embed_with(kernels: KernelPolicy, table: &Tensor, tokens: &Tensor) -> Result<Tensor> {
    let (b, t) = tokens.dims2()?;
    let d = table.dim(1)?;
    let ids: Vec<u32> = tokens
        .flatten_all()?
        .to_dtype(candle_core::DType::U32)?
        .to_vec1()?;
    let plan = crate::rows::RowPlan::gather(&ids, table.dim(0)?, table.device())?;
    plan.apply(kernels, table)?.reshape((b, t, d))
}
