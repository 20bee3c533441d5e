//! DeepSeek-V3 / V3.2 in candle: embeddings, decoder layers (MLA + indexer + MLP or MoE), the
//! final norm and LM head, and the multi-token-prediction (MTP) module.
//!
//! `forward(&self)` returns the logits and, per layer, exactly what the DSA losses and metrics
//! need (per-query indexer KL, attention-mass recall, expert load). Nothing is cached between
//! calls. Each layer computes its statistics as it goes and drops its L x L tensors before the
//! next layer runs, so at most one layer's L x L is alive at a time (unless gradients are being
//! recorded through them, which the trainer avoids by backpropagating layer by layer).
//! Evaluation (`ForwardOptions::eval_rows`) has no L x L at all: it computes those statistics
//! a block of query rows at a time.

pub mod attention;
pub mod blocks;
pub mod dense_recompute;
pub mod grad_sink;
pub mod indexer;
pub mod moe;

use std::path::Path;

use anyhow::Context as _;
use candle_core::{DType, Device, Result, Tensor};

use crate::checkpoint::Checkpoint;
use crate::config::{IndexerDefaults, ModelConfig};
use crate::dist::expert::ExpertShard;
use crate::dsa::{recall_rows, select_topk};
use crate::kernels::KernelPolicy;
use crate::losses::kl_rows;
use crate::ops::{linear, rms_norm};
use crate::weights::{self, ParamSet};
use attention::Mla;
use indexer::{Indexer, IndexerProj};
use moe::{Mlp, Moe};

/// Which attention the main model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionMode {
    /// Every causal key (MHA mode): the warm-up stage.
    Dense,
    /// The indexer's top-k keys (absorbed MQA mode): the sparse stage.
    Sparse,
}

#[derive(Debug, Clone)]
pub struct ForwardOptions {
    pub attention: AttentionMode,
    pub topk: usize,
    /// Compute the per-query indexer KL of every layer.
    pub indexer_kl: bool,
    /// Compute the attention-mass recall of the top-k (costs a dense pass in sparse mode).
    pub recall: bool,
    /// Detach the indexer's inputs (x and qr) from the main model (sparse-stage training).
    pub detach_indexer_inputs: bool,
    /// Compute the MoE sequence-wise balance loss.
    pub seq_balance: bool,
    /// Instead of the per-query KL, return the indexer projections and the KL target
    /// (`LayerStats::deferred_kl`: dense target, streaming-kernel inputs, or the sparse
    /// selection and its target) so the caller can compute and backpropagate the KL one block
    /// of queries at a time (bounded memory at long sequence lengths). Both stages' training.
    pub defer_dense_kl: bool,
    /// Sparse attention only: run the layer `block_rows` queries at a time against the
    /// sequence's shared latent kv, each block's outputs detached before the next (0 = the
    /// whole sequence at once). For passes whose outputs are not differentiated (the
    /// recomputing trainer's first pass); `DecoderLayer::sparse_backward` is its backward.
    pub block_rows: usize,
    /// Sparse attention with `defer_dense_kl` (the sparse stage's training): query rows per
    /// block of the indexer's selection and KL, where its queries exist a block at a time
    /// (0 = about 2^24 query values and 2^25 KL entries per block; tests force a few rows).
    pub indexer_rows: usize,
    /// Evaluation: the attention's [.., T, T] work (dense attention, the dense probabilities
    /// of the KL target and the recall, the indexer's dense scores, their KL and top-k) runs
    /// this many query rows at a time, so no [.., T, T] tensor exists; the layer's results
    /// carry no graph. Some(0) = `eval_block_rows` (about 2^26 elements in a block's largest
    /// intermediate; tests force a few rows). None: whole-sequence tensors (training, and the
    /// reference the blocked pass is tested against). Not used with `defer_dense_kl`.
    pub eval_rows: Option<usize>,
}

impl ForwardOptions {
    /// Inference-style options: statistics as asked, nothing detached or deferred.
    pub fn new(attention: AttentionMode, topk: usize) -> Self {
        Self {
            attention,
            topk,
            indexer_kl: true,
            recall: true,
            detach_indexer_inputs: false,
            seq_balance: false,
            defer_dense_kl: false,
            block_rows: 0,
            indexer_rows: 0,
            eval_rows: None,
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
    /// head-mean probabilities `target` [B, T, K]. Only the keys [B, T, DI] (f32, detached) are
    /// kept: `Indexer::backprop_sparse_kl` projects the queries and head weights again from
    /// `LayerStats::indexer_inputs`, `rows` queries at a time.
    Sparse {
        keys: Tensor,
        target: Tensor,
        sel: crate::dsa::Selection,
        rows: usize,
    },
}

impl DeferredKl {
    /// The whole-sequence projections the KL is built on (none in the sparse stage).
    pub fn proj(&self) -> Option<&indexer::IndexerProj> {
        match self {
            DeferredKl::Plain { proj, .. } | DeferredKl::Streaming { proj, .. } => Some(proj),
            DeferredKl::Sparse { .. } => None,
        }
    }

    /// Plain path: per-query KL of queries q0..q0+n, [B, n], differentiable in the indexer.
    pub fn block(
        proj: &indexer::IndexerProj,
        target: &Tensor,
        q0: usize,
        n: usize,
    ) -> Result<Tensor> {
        Self::kl_rows_of(proj, &target.narrow(1, q0, n)?, q0, n)
    }

    /// The warm-up KL of queries q0..q0+n against their target rows `target` [B, n, T]: the
    /// indexer's scores of those rows plus their causal bias, `kl_rows`. Returns [B, n].
    pub fn kl_rows_of(
        proj: &indexer::IndexerProj,
        target: &Tensor,
        q0: usize,
        n: usize,
    ) -> Result<Tensor> {
        let t = proj.k.dim(1)?;
        let bias = crate::dsa::causal_rows(q0, n, t, proj.k.device())?;
        let scores = proj.scores_rows(q0, n)?.broadcast_add(&bias)?; // [B, n, T]
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
    /// Tokens routed to each expert (MoE layers only).
    pub expert_counts: Option<Vec<u32>>,
    /// MoE layers: the experts chosen per token [B*T*K] in token order (a recomputing backward
    /// reuses them instead of routing on the host again).
    pub chosen: Option<Vec<u32>>,
    /// Sequence-wise balance loss (MoE layers, when asked), scalar f32.
    pub balance_loss: Option<Tensor>,
    /// With `defer_dense_kl`: the pieces of the dense KL.
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
pub struct ForwardContext {
    pub cos: Tensor,
    pub sin: Tensor,
    /// Sequence length.
    pub t: usize,
}

impl ForwardContext {
    pub fn new(cfg: &ModelConfig, t: usize, device: &Device) -> Result<Self> {
        let (cos, sin) = crate::rope::tables(cfg, t, device)?;
        Ok(Self { cos, sin, t })
    }

    /// Causal bias of queries q0..q0+n: [n, T] (built on demand; never [T, T] at long lengths
    /// unless a caller asks for every row).
    pub fn causal(&self, q0: usize, n: usize) -> Result<Tensor> {
        crate::dsa::causal_rows(q0, n, self.t, self.cos.device())
    }
}

impl DecoderLayer {
    /// Run the layer's ops with `kernels` (kernels or their plain twins).
    pub fn set_kernels(&mut self, kernels: KernelPolicy) {
        self.kernels = kernels;
        self.attn.kernels = kernels;
        self.indexer.kernels = kernels;
        match &mut self.ffn {
            FeedForward::Dense(m) => m.kernels = kernels,
            FeedForward::Moe(m) => {
                m.kernels = kernels;
                for e in m.experts.iter_mut().chain(m.shared.iter_mut()) {
                    e.kernels = kernels;
                }
            }
        }
    }

    pub fn forward(
        &self,
        h: &Tensor,
        ctx: &ForwardContext,
        opts: &ForwardOptions,
    ) -> Result<(Tensor, LayerStats)> {
        self.forward_with(h, ctx, opts, None)
    }

    /// `forward`, reusing `cached` as the sparse selection instead of running the indexer's
    /// top-k again (the recomputing backward: same input, so the same sets).
    pub fn forward_with(
        &self,
        h: &Tensor,
        ctx: &ForwardContext,
        opts: &ForwardOptions,
        cached: Option<&crate::dsa::Selection>,
    ) -> Result<(Tensor, LayerStats)> {
        if opts.block_rows > 0 && opts.attention == AttentionMode::Sparse && !opts.recall {
            return self.forward_blocks(h, ctx, opts, cached);
        }
        let eval = opts.eval_rows.is_some() && !opts.defer_dense_kl;
        // Evaluation keeps no graph: its blocks must not stay alive through one.
        let h = if eval { h.detach() } else { h.clone() };
        let region = crate::profile::region("layer: norm + MLA projections");
        let x = rms_norm(self.kernels, &h, &self.input_norm, self.eps)?;
        let proj = self.attn.project(&x, &ctx.cos, &ctx.sin)?;
        drop(region);
        let mut stats = LayerStats::default();
        let region = crate::profile::region("layer: indexer projections");
        let ix = self.project_indexer(&x, &proj.qr, ctx, opts, cached.is_some(), &mut stats)?;
        drop(region);
        let region = crate::profile::region("layer: attention (with top-k, KL, recall)");
        let attn_out = match opts.attention {
            _ if eval => self.attention_in_blocks(&proj, ix, ctx, opts, cached, &mut stats)?,
            AttentionMode::Dense
                if opts.defer_dense_kl
                    && self.attn.streaming_supported(
                        &proj,
                        self.indexer.heads,
                        self.indexer.head_dim,
                    ) =>
            {
                let (out, scores) = self.attn.dense_streaming(&proj)?;
                stats.deferred_kl = Some(DeferredKl::Streaming {
                    proj: ix.expect("deferred KL projects the indexer").whole()?,
                    scores,
                });
                out
            }
            // No indexer statistic wants the probabilities (the dense pre-training stage): the
            // flash-style forward and backward (kernels, or the block-recomputing twin), no
            // [H, T, T] graph.
            AttentionMode::Dense if ix.is_none() && !opts.defer_dense_kl => {
                self.attn.dense_recomputing(&proj)?
            }
            AttentionMode::Dense => {
                let ix = ix.map(IndexerView::whole).transpose()?;
                let causal = ctx.causal(0, ctx.t)?;
                let a = self.attn.dense(&proj, &causal)?;
                if opts.defer_dense_kl {
                    let proj = ix.expect("deferred KL projects the indexer");
                    stats.deferred_kl = Some(DeferredKl::Plain {
                        proj,
                        target: a.probs()?.clone(),
                    });
                } else if let Some(ix) = &ix {
                    let scores = ix.scores(&causal)?; // [B, T, T]
                    if opts.indexer_kl {
                        stats.indexer_kl = Some(kl_rows(a.probs()?, &scores)?);
                    }
                    if opts.recall {
                        let sel = select_topk(&scores.detach(), opts.topk)
                            .map_err(candle_core::Error::wrap)?;
                        stats.recall =
                            Some(recall_rows(a.probs()?, &sel).map_err(candle_core::Error::wrap)?);
                    }
                }
                a.out
            }
            AttentionMode::Sparse => {
                let region = crate::profile::region("attention: selection (indexer top-k)");
                let sel = self.selection(ix.as_ref(), ctx, opts, cached, ctx.t)?;
                drop(region);
                let region =
                    crate::profile::region("attention: sparse MLA forward (and probabilities)");
                let a = self.attn.sparse(&proj, &sel, opts.indexer_kl)?;
                drop(region);
                if opts.indexer_kl {
                    let ix = ix.as_ref().expect("the indexer KL projects the indexer");
                    sparse_kl(ix, a.probs()?.clone(), &sel, &self.indexer, &mut stats)?;
                }
                if opts.recall {
                    let dense = self
                        .attn
                        .dense_head_mean_probs(&proj, &ctx.causal(0, ctx.t)?)?;
                    stats.recall =
                        Some(recall_rows(&dense, &sel).map_err(candle_core::Error::wrap)?);
                }
                stats.selection = Some(sel);
                a.out
            }
        };
        drop(region);
        let _region = crate::profile::region("layer: residual, norm, feed-forward");
        let h = (&h + attn_out)?;
        let x = rms_norm(self.kernels, &h, &self.post_attention_norm, self.eps)?;
        let f = match &self.ffn {
            FeedForward::Dense(mlp) => mlp.forward(&x)?,
            FeedForward::Moe(moe) => {
                let r = moe.forward(&x, opts.seq_balance)?;
                stats.expert_counts = Some(r.counts);
                stats.balance_loss = r.balance_loss;
                stats.balance_weights = r.balance_weights;
                stats.chosen = Some(r.chosen);
                r.out
            }
        };
        Ok(((h + f)?, stats))
    }

    /// The attention of an evaluation pass (`opts.eval_rows`) with its KL and recall, a block
    /// of query rows at a time wherever the whole-sequence pass holds [.., T, T] tensors; the
    /// same statistics as `forward_with`'s, row for row. Dense: the sets first (the indexer's
    /// f32 scores block by block and the host top-k, as `select_topk` on the whole scores; bf16
    /// models on CUDA take the device scoring and top-k kernels, as the sparse pass does: the
    /// host top-k of every row of a 32K window took about 50 s per window), then per
    /// block the dense attention rows, their head-mean probabilities, the indexer's scores of
    /// those rows again (cheaper to recompute than to keep), the KL rows and the recall rows.
    /// Sparse: the attention and its KL are O(T K) already; the host selection scores a block
    /// of rows at a time (the device kernel as in `forward_with`), and the recall's dense
    /// probabilities are computed per block. Every tensor of every row is O(T) (or O(T K)).
    fn attention_in_blocks(
        &self,
        proj: &attention::Projected,
        ix: Option<IndexerView>,
        ctx: &ForwardContext,
        opts: &ForwardOptions,
        cached: Option<&crate::dsa::Selection>,
        stats: &mut LayerStats,
    ) -> Result<Tensor> {
        let (b, t, _, _) = proj.q_nope.dims4()?;
        let rows = match opts.eval_rows {
            Some(0) | None => eval_block_rows(b, t, self.attn.heads, self.indexer.heads),
            Some(forced) => forced.min(t),
        };
        let (mut kl, mut recall, mut ceiling) = (vec![], vec![], vec![]); // [B, n] per block
        let out = match opts.attention {
            AttentionMode::Dense => {
                let ix = ix.map(|v| v.whole().map(|p| p.detach())).transpose()?;
                let sel = match (&ix, opts.recall) {
                    (Some(p), true) => {
                        let queries = |q0: usize, n: usize| {
                            Ok((p.q.narrow(1, q0, n)?, p.w.narrow(1, q0, n)?))
                        };
                        let fast = self.attn.q_b_proj.dtype() == DType::BF16
                            && self.kernels.on(p.k.device());
                        Some(select_indexer_topk(
                            &p.k, queries, rows, ctx, opts.topk, fast,
                        )?)
                    }
                    _ => None,
                };
                let out = self.attn.dense_blocks(proj, rows, true, |q0, n, probs| {
                    if let (Some(p), true) = (&ix, opts.indexer_kl) {
                        kl.push(DeferredKl::kl_rows_of(p, &probs, q0, n)?);
                    }
                    if let Some(sel) = &sel {
                        recall.push(recall_block(&probs, sel, q0, n)?);
                        ceiling.push(crate::dsa::topk_mass_rows(&probs, opts.topk)?);
                    }
                    Ok(())
                })?;
                out.expect("dense_blocks returns the output when asked")
            }
            AttentionMode::Sparse => {
                let sel = self.selection(ix.as_ref(), ctx, opts, cached, rows)?;
                let a = self.attn.sparse(proj, &sel, opts.indexer_kl)?;
                if opts.indexer_kl {
                    let ix = ix.as_ref().expect("the indexer KL projects the indexer");
                    sparse_kl(ix, a.probs()?.clone(), &sel, &self.indexer, stats)?;
                }
                if opts.recall {
                    self.attn.dense_blocks(proj, rows, false, |q0, n, probs| {
                        recall.push(recall_block(&probs, &sel, q0, n)?);
                        ceiling.push(crate::dsa::topk_mass_rows(&probs, opts.topk)?);
                        Ok(())
                    })?;
                }
                stats.selection = Some(sel);
                a.out
            }
        };
        if !kl.is_empty() {
            stats.indexer_kl = Some(Tensor::cat(&kl, 1)?);
        }
        if !recall.is_empty() {
            stats.recall = Some(Tensor::cat(&recall, 1)?);
            stats.recall_ceiling = Some(Tensor::cat(&ceiling, 1)?);
        }
        Ok(out)
    }

    /// The indexer's projections of x and qr when this pass needs them (sparse attention
    /// without cached sets, the KL, or the recall). In the sparse stage its inputs are detached
    /// so the KL trains only the indexer. Training keeps the detached inputs (`stats`) and:
    /// with sparse attention and a deferred KL (the sparse stage), the keys of every token
    /// alone, f32 [B, T, DI], since the queries (HI x DI per token) are projected again a block
    /// of rows at a time wherever they are needed; otherwise leaf copies of all three.
    fn project_indexer(
        &self,
        x: &Tensor,
        qr: &Tensor,
        ctx: &ForwardContext,
        opts: &ForwardOptions,
        cached: bool,
        stats: &mut LayerStats,
    ) -> Result<Option<IndexerView>> {
        let need_indexer =
            (opts.attention == AttentionMode::Sparse && !cached) || opts.indexer_kl || opts.recall;
        if !need_indexer {
            return Ok(None);
        }
        let (ix, iqr) = if opts.detach_indexer_inputs {
            (x.detach(), qr.detach())
        } else {
            (x.clone(), qr.clone())
        };
        if opts.attention == AttentionMode::Sparse && opts.defer_dense_kl {
            // The deferred KL stops at the projections whether or not the inputs are detached.
            let (x, qr) = (ix.detach(), iqr.detach());
            let k = self.indexer.project_keys(&x, &ctx.cos, &ctx.sin)?.detach(); // [B, T, DI]
            let (b, t, _) = x.dims3()?;
            let rows = match opts.indexer_rows {
                0 => indexer::sparse_block_rows(
                    b,
                    t,
                    self.indexer.heads,
                    self.indexer.head_dim,
                    opts.topk,
                ),
                forced => forced.min(t),
            };
            stats.indexer_inputs = Some((x.clone(), qr.clone()));
            return Ok(Some(IndexerView::Keys { k, x, qr, rows }));
        }
        let p = self.indexer.project(&ix, &iqr, &ctx.cos, &ctx.sin)?;
        if opts.detach_indexer_inputs || opts.defer_dense_kl {
            let leaves = p.leaves()?;
            stats.indexer_inputs = Some((ix.detach(), iqr.detach()));
            stats.indexer_proj = Some(IndexerProj {
                q: leaves.q.clone(),
                k: leaves.k.clone(),
                w: leaves.w.clone(),
            });
            Ok(Some(IndexerView::Whole(leaves)))
        } else {
            Ok(Some(IndexerView::Whole(p)))
        }
    }

    /// The sparse sets: `cached`, or the indexer's top-k, scored a block of queries at a time
    /// (with `IndexerView::Keys`, each block's queries projected from the inputs just then).
    /// `whole_rows`: with the whole projections, query rows per block of the host path (at
    /// most `dsa::query_block`; its [B, n*HI, T] intermediate is HI times that block's scores);
    /// the device kernel takes every row at once and chunks its score buffer itself.
    fn selection(
        &self,
        ix: Option<&IndexerView>,
        ctx: &ForwardContext,
        opts: &ForwardOptions,
        cached: Option<&crate::dsa::Selection>,
        whole_rows: usize,
    ) -> Result<crate::dsa::Selection> {
        if let Some(sel) = cached {
            return Ok(sel.clone());
        }
        let ix = ix.expect("sparse attention projects the indexer");
        let fast = |keys: &Tensor| {
            self.attn.q_b_proj.dtype() == DType::BF16 && self.kernels.on(keys.device())
        };
        match ix {
            IndexerView::Whole(p) => {
                let p = p.detach();
                let fast = fast(&p.k);
                let rows = if fast { p.k.dim(1)? } else { whole_rows };
                select_indexer_topk(
                    &p.k,
                    |q0, n| Ok((p.q.narrow(1, q0, n)?, p.w.narrow(1, q0, n)?)),
                    rows,
                    ctx,
                    opts.topk,
                    fast,
                )
            }
            IndexerView::Keys { k, x, qr, rows } => {
                let queries = |q0: usize, n: usize| -> Result<(Tensor, Tensor)> {
                    let (cos, sin) = (ctx.cos.narrow(0, q0, n)?, ctx.sin.narrow(0, q0, n)?);
                    let (q, w) = self.indexer.project_queries(
                        &x.narrow(1, q0, n)?,
                        &qr.narrow(1, q0, n)?,
                        &cos,
                        &sin,
                    )?;
                    Ok((q.detach(), w.detach())) // no graph: the selection is not differentiated
                };
                select_indexer_topk(k, queries, *rows, ctx, opts.topk, fast(k))
            }
        }
    }

    /// `forward_with` in block mode (sparse attention, `opts.block_rows` queries at a time):
    /// the indexer over the whole sequence as usual, then `sparse_blocks`; the output is
    /// detached and the balance loss is left to the blocked backward (`balance_weights`).
    fn forward_blocks(
        &self,
        h: &Tensor,
        ctx: &ForwardContext,
        opts: &ForwardOptions,
        cached: Option<&crate::dsa::Selection>,
    ) -> Result<(Tensor, LayerStats)> {
        let mut stats = LayerStats::default();
        let x = rms_norm(self.kernels, &h.detach(), &self.input_norm, self.eps)?;
        let qr = self.attn.project_qr(&x)?;
        let ix = self.project_indexer(&x, &qr, ctx, opts, cached.is_some(), &mut stats)?;
        drop((x, qr));
        let sel = self.selection(ix.as_ref(), ctx, opts, cached, ctx.t)?;
        let pass = self.sparse_blocks(h, ctx, &sel, opts.block_rows)?;
        let head_mean = pass.head_mean;
        if opts.indexer_kl {
            let ix = ix.as_ref().expect("the indexer KL projects the indexer");
            sparse_kl(ix, head_mean, &sel, &self.indexer, &mut stats)?;
        }
        if let (FeedForward::Moe(moe), Some(chosen)) = (&self.ffn, pass.chosen) {
            let (b, t, _) = h.dims3()?;
            stats.expert_counts = Some(moe.counts(&chosen));
            stats.balance_weights = Some(moe.balance_weights(&chosen, b, t));
            stats.chosen = Some(chosen);
        }
        stats.selection = Some(sel);
        Ok((pass.out, stats))
    }
}

/// What a pass holds of the indexer's projections.
enum IndexerView {
    /// Queries, keys and head weights of every row: a graph, or leaf copies when training.
    Whole(IndexerProj),
    /// The sparse stage's training: the keys of every token [B, T, DI] (f32, detached) and the
    /// detached inputs x [B, T, hidden], qr [B, T, q_lora]; queries and head weights exist only
    /// `rows` tokens at a time (`Indexer::project_queries`).
    Keys {
        k: Tensor,
        x: Tensor,
        qr: Tensor,
        rows: usize,
    },
}

impl IndexerView {
    /// The whole projections (every pass but the sparse stage's training has them).
    fn whole(self) -> Result<IndexerProj> {
        match self {
            IndexerView::Whole(p) => Ok(p),
            IndexerView::Keys { .. } => candle_core::bail!(
                "only the sparse stage keeps the indexer's keys alone; this pass needs its queries"
            ),
        }
    }
}

/// The sparse-stage KL of one layer over the selected sets `sel`, against the sparse
/// attention's head-mean probabilities `target` [B, T, K]: deferred to the trainer as (keys,
/// target, sets) when only the keys are kept, otherwise per query into `stats.indexer_kl`
/// (scores at the sets plus their bias, f32; differentiable in the projections).
fn sparse_kl(
    ix: &IndexerView,
    target: Tensor,
    sel: &crate::dsa::Selection,
    indexer: &Indexer,
    stats: &mut LayerStats,
) -> Result<()> {
    match ix {
        IndexerView::Keys { k, rows, .. } => {
            stats.deferred_kl = Some(DeferredKl::Sparse {
                keys: k.clone(),
                target,
                sel: sel.clone(),
                rows: *rows,
            });
        }
        IndexerView::Whole(p) => {
            let on_set =
                (p.scores_at(sel, indexer.kernels, indexer.tensor_cores)? + sel.bias()?)?; // [B, T, K]
            stats.indexer_kl = Some(kl_rows(&target, &on_set)?);
        }
    }
    Ok(())
}

/// Attention-mass recall of queries q0..q0+n, [B, n]: `probs` [B, n, T] their head-mean
/// dense probabilities, `sel` the sets of every query. Sequence by sequence: one sequence's
/// block of sets (`Selection::block`) is contiguous, which `recall_rows`' gather needs.
fn recall_block(
    probs: &Tensor,
    sel: &crate::dsa::Selection,
    q0: usize,
    n: usize,
) -> Result<Tensor> {
    let b = probs.dim(0)?;
    let per_seq = (0..b)
        .map(|bi| {
            recall_rows(&probs.narrow(0, bi, 1)?, &sel.block(bi, q0, n)?)
                .map_err(candle_core::Error::wrap)
        })
        .collect::<Result<Vec<_>>>()?; // [1, n] each
    Tensor::cat(&per_seq, 0)
}

/// Query rows per block of the evaluation pass (`ForwardOptions::eval_rows`): about 2^26
/// elements in its largest intermediates, the dense probabilities [B, H, n, T] and the
/// indexer's per-head scores [B, n*HI, T] (f32, 256 MiB); at least 1, at most `t`.
pub fn eval_block_rows(b: usize, t: usize, heads: usize, indexer_heads: usize) -> usize {
    ((1usize << 26) / (b * heads.max(indexer_heads) * t).max(1)).clamp(1, t.max(1))
}

/// Top-k selection from the indexer against `keys` [B, T, DI], scoring one block of at most
/// `rows` queries at a time (no [T, T] tensor, and the queries of one block at a time):
/// `queries(q0, n)` gives the detached queries [B, n, HI, DI] and head weights [B, n, HI]
/// (f32) of rows q0..q0+n. `fast` (bf16 models on CUDA): the tensor-core scoring and device
/// top-k kernels, with q_I and k_I rounded to bf16 for the products (f32 accumulation), each
/// block's rows passed with their offset q0; otherwise f32 scores and the host selection,
/// the reference that f32 GPU runs share with the CPU. The sets do not depend on `rows`.
fn select_indexer_topk(
    keys: &Tensor,
    queries: impl Fn(usize, usize) -> Result<(Tensor, Tensor)>,
    rows: usize,
    ctx: &ForwardContext,
    k: usize,
    fast: bool,
) -> Result<crate::dsa::Selection> {
    let (b, t, _) = keys.dims3()?;
    let rows = rows.clamp(1, t.max(1));
    if fast {
        let keys = keys.to_dtype(DType::BF16)?;
        let mut per_seq: Vec<Vec<Tensor>> = vec![Vec::new(); b]; // [n, min(k, T)] absolute rows per block
        for q0 in (0..t).step_by(rows) {
            let n = rows.min(t - q0);
            let (q, w) = queries(q0, n)?;
            let q = q.to_dtype(DType::BF16)?; // [B, n, HI, DI]
            for (bi, parts) in per_seq.iter_mut().enumerate() {
                let positions = crate::kernels::indexer_topk::indexer_topk(
                    &q.get(bi)?,
                    &w.get(bi)?,
                    &keys.get(bi)?,
                    q0,
                    k,
                )?;
                parts.push(crate::dsa::absolute_rows(&positions, bi, t)?);
            }
        }
        // One whole-sequence copy at a time: the blocks of a sequence are joined and dropped.
        let mut seqs: Vec<Tensor> = Vec::with_capacity(b);
        for parts in per_seq {
            seqs.push(Tensor::cat(&parts, 0)?.unsqueeze(0)?); // [1, T, K]
        }
        // (candle's cat of one tensor is that tensor: no copy for a single sequence)
        return crate::dsa::Selection::from_absolute(Tensor::cat(&seqs, 0)?);
    }
    let keys = keys.clone();
    crate::dsa::select_topk_streaming(
        b,
        t,
        k,
        rows.min(crate::dsa::query_block(b, t)),
        keys.device(),
        |q0, n| {
            let (q, w) = queries(q0, n)?;
            let block = IndexerProj {
                q,
                k: keys.clone(),
                w,
            };
            Ok(block
                .scores_rows(0, n)?
                .broadcast_add(&ctx.causal(q0, n)?)?)
        },
    )
    .map_err(candle_core::Error::wrap)
}

/// The multi-token-prediction module: predicts token t+2 from h_t and the embedding of t+1.
/// One multi-token-prediction module (DeepSeek-V3 section 2.2). Its embedding and output head
/// are the main model's (`Model::embed`, `Model::lm_head`): one parameter each, as the paper
/// defines them and as Megatron-LM and SGLang run them.
pub struct Mtp {
    pub enorm: Tensor,
    pub hnorm: Tensor,
    pub eh_proj: Tensor,
    pub layer: DecoderLayer,
    pub head_norm: Tensor,
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
}

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub dtype: DType,
    pub device: Device,
    pub indexer: IndexerDefaults,
    /// Seed of the deterministic indexer initialisation (V3.1 checkpoints have no indexer).
    pub init_seed: u64,
    /// Leave the MTP layers out even when the checkpoint has them.
    pub skip_mtp: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            device: Device::Cpu,
            indexer: IndexerDefaults::default(),
            init_seed: 0,
            skip_mtp: false,
        }
    }
}

impl Model {
    /// Load a model from a Hugging Face checkpoint folder or a training `step-N` checkpoint
    /// (resolved to its HF folder plus parameter overlays), logging what was initialised or
    /// skipped.
    pub fn load(dir: &Path, opts: &LoadOptions) -> anyhow::Result<Self> {
        let source = crate::train::ckpt::resolve_model(dir)?;
        source.verify_share(0, 1)?;
        let hf_dir = &source.hf_dir;
        let cfg = ModelConfig::from_dir(hf_dir, &opts.indexer)?;
        let ckpt = Checkpoint::open(hf_dir)?;
        let with_mtp = cfg.num_nextn_predict_layers > 0 && !opts.skip_mtp;
        if cfg.num_nextn_predict_layers > 0 && opts.skip_mtp {
            crate::elog!(
                "[load] skipping the {} MTP layer(s) as asked",
                cfg.num_nextn_predict_layers
            );
        }
        let specs = weights::model_weights(&cfg, with_mtp);
        let (mut params, initialised) =
            weights::load_params(&ckpt, &specs, opts.dtype, &opts.device, opts.init_seed)?;
        if !initialised.is_empty() {
            crate::elog!(
                "[load] {} has no indexer tensors: initialised {} of them from seed {} ({}x{} heads, top-k {})",
                hf_dir.display(), initialised.len(), opts.init_seed, cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
            );
        }
        let mut overlay = crate::train::ckpt::overlay_params(&source, &opts.device)?;
        if !with_mtp {
            // A trained step holds its MTP layer's tensors too; without MTP they are not loaded.
            let main_layers = cfg.num_hidden_layers;
            overlay.retain(|n, _| {
                n.strip_prefix("model.layers.")
                    .and_then(|r| r.split('.').next())
                    .and_then(|l| l.parse::<usize>().ok())
                    .is_none_or(|l| l < main_layers)
            });
        }
        if !overlay.is_empty() {
            crate::elog!(
                "[load] applied {} trained tensors from {}",
                overlay.len(),
                dir.display()
            );
        }
        weights::apply_overlay(&mut params, &specs, overlay, opts.dtype)?;
        if let Some(name) = weights::first_non_finite(&params)? {
            let file = if source.overlays.is_empty() {
                ckpt.file_of(&name)
                    .map(|f| hf_dir.join(f).display().to_string())
            } else {
                None
            };
            anyhow::bail!(
                "tensor {name} (in {}) holds NaN or infinite values",
                file.unwrap_or_else(|| dir.display().to_string())
            );
        }
        Model::from_params(cfg, &params, opts.dtype, &opts.device, with_mtp)
            .with_context(|| format!("building the model from {}", dir.display()))
    }

    /// Assemble the model from named parameters (as listed by `weights::model_weights`).
    pub fn from_params(
        cfg: ModelConfig,
        params: &ParamSet,
        dtype: DType,
        device: &Device,
        with_mtp: bool,
    ) -> anyhow::Result<Self> {
        Self::from_params_sharded(cfg, params, dtype, device, with_mtp, None)
    }

    /// As `from_params`, holding only the routed experts of `shard` (expert parallelism);
    /// `params` then needs only those experts.
    pub fn from_params_sharded(
        cfg: ModelConfig,
        params: &ParamSet,
        dtype: DType,
        device: &Device,
        with_mtp: bool,
        shard: Option<&ExpertShard>,
    ) -> anyhow::Result<Self> {
        let get = |n: &str| weights::get(params, n).cloned();
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| build_layer(&cfg, params, l, shard))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let lm_head = if cfg.tie_word_embeddings {
            get("model.embed_tokens.weight")?
        } else {
            get("lm_head.weight")?
        };
        let mut mtp = vec![];
        if with_mtp && cfg.num_nextn_predict_layers > 1 {
            anyhow::bail!(
                "config.json has num_nextn_predict_layers {}: dsa-train trains one MTP module (DeepSeek-V3's); set model.mtp = false to leave them out",
                cfg.num_nextn_predict_layers
            );
        }
        if with_mtp {
            for m in 0..cfg.num_nextn_predict_layers {
                let l = cfg.num_hidden_layers + m;
                let p = format!("model.layers.{l}.");
                mtp.push(Mtp {
                    enorm: get(&format!("{p}enorm.weight"))?,
                    hnorm: get(&format!("{p}hnorm.weight"))?,
                    eh_proj: get(&format!("{p}eh_proj.weight"))?,
                    layer: build_layer(&cfg, params, l, shard)?,
                    head_norm: get(&format!("{p}shared_head.norm.weight"))?,
                });
            }
        }
        Ok(Model {
            embed: get("model.embed_tokens.weight")?,
            norm: get("model.norm.weight")?,
            lm_head,
            layers,
            mtp,
            dtype,
            device: device.clone(),
            cfg,
            kernels: KernelPolicy::default(),
        })
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

    pub fn forward(&self, tokens: &Tensor, opts: &ForwardOptions) -> Result<ForwardOutput> {
        let (h, layers) = self.forward_layers(tokens, opts)?;
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
        opts: &ForwardOptions,
    ) -> Result<(Tensor, Vec<LayerStats>)> {
        let (_, t) = tokens.dims2()?;
        let ctx = ForwardContext::new(&self.cfg, t, &self.device)?;
        let mut h = self.embed(tokens)?;
        let mut layers = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            let (next, stats) = layer.forward(&h, &ctx, opts)?;
            h = next;
            layers.push(stats);
        }
        Ok((h, layers))
    }

    /// Logits of the MTP module (depth 0; the only one DeepSeek-V3 has): position t predicts
    /// token t + 2 from the main model's representation at t and the embedding of token t + 1.
    /// `hidden` [B, T, D] is the last decoder layer's output; the module reads it after the
    /// final RMSNorm (`model.norm`), as vLLM, SGLang and Megatron-LM feed their MTP blocks
    /// (docs/design.md), then: eh_proj([enorm(embed(t + 1)); hnorm(h)]), the decoder layer,
    /// shared_head.norm and the main model's output head. Returns [B, T - 1 - depth, vocab].
    pub fn mtp_logits(
        &self,
        depth: usize,
        hidden: &Tensor,
        tokens: &Tensor,
        opts: &ForwardOptions,
    ) -> Result<(Tensor, LayerStats)> {
        let m = &self.mtp[depth];
        let (_, t) = tokens.dims2()?;
        let n = t - 1 - depth;
        let eps = self.cfg.rms_norm_eps;
        let e = rms_norm(
            self.kernels,
            &embed_with(self.kernels, &self.embed, &tokens.narrow(1, 1 + depth, n)?)?,
            &m.enorm,
            eps,
        )?;
        let h0 = rms_norm(self.kernels, &hidden.narrow(1, 0, n)?, &self.norm, eps)?;
        let hh = rms_norm(self.kernels, &h0, &m.hnorm, eps)?;
        let x = linear(&Tensor::cat(&[&e, &hh], 2)?, &m.eh_proj)?;
        let ctx = ForwardContext::new(&self.cfg, n, &self.device)?;
        let (y, stats) = m.layer.forward(&x, &ctx, opts)?;
        Ok((
            linear(
                &rms_norm(self.kernels, &y, &m.head_norm, eps)?,
                &self.lm_head,
            )?,
            stats,
        ))
    }
}

/// The embedding rows of `tokens` (u32 [B, T]). A row gather whose backward sums each
/// vocabulary row's gradients in parallel and in token order (`rows::RowPlan`); a token id
/// past the vocabulary is an error, not a device assertion.
fn embed_with(kernels: KernelPolicy, table: &Tensor, tokens: &Tensor) -> Result<Tensor> {
    let (b, t) = tokens.dims2()?;
    let d = table.dim(1)?;
    let ids: Vec<u32> = tokens
        .flatten_all()?
        .to_dtype(candle_core::DType::U32)?
        .to_vec1()?;
    let plan = crate::rows::RowPlan::gather(&ids, table.dim(0)?, table.device())?;
    plan.apply(kernels, table)?.reshape((b, t, d))
}

pub(crate) fn build_layer(
    cfg: &ModelConfig,
    params: &ParamSet,
    l: usize,
    shard: Option<&ExpertShard>,
) -> anyhow::Result<DecoderLayer> {
    let p = format!("model.layers.{l}.");
    let get = |n: &str| weights::get(params, &format!("{p}{n}")).cloned();
    let mlp = |prefix: &str| -> anyhow::Result<Mlp> {
        Ok(Mlp {
            gate: get(&format!("{prefix}gate_proj.weight"))?,
            up: get(&format!("{prefix}up_proj.weight"))?,
            down: get(&format!("{prefix}down_proj.weight"))?,
            kernels: KernelPolicy::default(),
        })
    };
    let ffn = if cfg.is_moe_layer(l) {
        FeedForward::Moe(Moe {
            router: get("mlp.gate.weight")?,
            bias: get("mlp.gate.e_score_correction_bias")?,
            experts: (0..cfg.n_routed_experts)
                .filter(|&e| shard.is_none_or(|s| s.holds(e)))
                .map(|e| mlp(&format!("mlp.experts.{e}.")))
                .collect::<anyhow::Result<_>>()?,
            shard: shard.cloned(),
            n_experts: cfg.n_routed_experts,
            shared: if cfg.n_shared_experts > 0 {
                Some(mlp("mlp.shared_experts.")?)
            } else {
                None
            },
            top_k: cfg.num_experts_per_tok,
            n_group: cfg.n_group,
            topk_group: cfg.topk_group,
            norm_topk_prob: cfg.norm_topk_prob,
            routed_scaling_factor: cfg.routed_scaling_factor,
            compute: moe::ExpertCompute::Auto,
            kernels: KernelPolicy::default(),
        })
    } else {
        FeedForward::Dense(mlp("mlp.")?)
    };
    Ok(DecoderLayer {
        input_norm: get("input_layernorm.weight")?,
        post_attention_norm: get("post_attention_layernorm.weight")?,
        attn: Mla {
            q_a_proj: get("self_attn.q_a_proj.weight")?,
            q_a_norm: get("self_attn.q_a_layernorm.weight")?,
            q_b_proj: get("self_attn.q_b_proj.weight")?,
            kv_a_proj: get("self_attn.kv_a_proj_with_mqa.weight")?,
            kv_a_norm: get("self_attn.kv_a_layernorm.weight")?,
            kv_b_proj: get("self_attn.kv_b_proj.weight")?,
            o_proj: get("self_attn.o_proj.weight")?,
            heads: cfg.num_attention_heads,
            nope: cfg.qk_nope_head_dim,
            rope: cfg.qk_rope_head_dim,
            v_dim: cfg.v_head_dim,
            kv_lora: cfg.kv_lora_rank,
            scale: cfg.softmax_scale(),
            kernels: KernelPolicy::default(),
        },
        indexer: Indexer {
            kernels: KernelPolicy::default(),
            tensor_cores: get("self_attn.kv_b_proj.weight")?.dtype() == DType::BF16,
            wq_b: get("self_attn.indexer.wq_b.weight")?,
            wk: get("self_attn.indexer.wk.weight")?,
            k_norm_weight: get("self_attn.indexer.k_norm.weight")?,
            k_norm_bias: get("self_attn.indexer.k_norm.bias")?,
            weights_proj: get("self_attn.indexer.weights_proj.weight")?,
            heads: cfg.index_n_heads,
            head_dim: cfg.index_head_dim,
            rope: cfg.qk_rope_head_dim,
        },
        ffn,
        eps: cfg.rms_norm_eps,
        kernels: KernelPolicy::default(),
    })
}
