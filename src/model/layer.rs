//! The decoder layer's forward: MLA (dense or absorbed sparse over the indexer's selection),
//! the indexer and its statistics (KL, recall, deferred KL for the trainer), MLP or MoE, and the
//! blocked evaluation pass. Its explicit backward is in blocks.rs.

use candle_core::{DType, Result, Tensor};

use super::attention;
use super::fp8_scores::{round_for_scores, SelectionScores};
use super::indexer::{self, Indexer, IndexerProj};
use super::moe::{Mlp, Moe};
use super::{
    AttentionMode, DecoderLayer, DeferredKl, FeedForward, ForwardContext, LayerStats, Pass,
};
use crate::dist::context::RowBlock;
use crate::dsa::{recall_rows, select_topk_in};
use crate::kernels::KernelPolicy;
use crate::losses::kl_rows;
use crate::ops::rms_norm;

impl DecoderLayer {
    /// The same layer with every tensor replaced by `f` of it (norms, projections, indexer,
    /// router, experts), everything else copied: a detached view for a hand-written backward
    /// (`blocks`), or the full weights of a layer held in FP8 (`fp8_frozen`).
    pub fn map_tensors(
        &self,
        f: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    ) -> Result<DecoderLayer> {
        let a = &self.attn;
        let attn = attention::Mla {
            q_a_proj: f(&a.q_a_proj)?,
            q_a_norm: f(&a.q_a_norm)?,
            q_b_proj: f(&a.q_b_proj)?,
            kv_a_proj: f(&a.kv_a_proj)?,
            kv_a_norm: f(&a.kv_a_norm)?,
            kv_b_proj: f(&a.kv_b_proj)?,
            o_proj: f(&a.o_proj)?,
            heads: a.heads,
            nope: a.nope,
            rope: a.rope,
            v_dim: a.v_dim,
            kv_lora: a.kv_lora,
            scale: a.scale,
            kernels: a.kernels,
        };
        let ix = &self.indexer;
        let indexer = Indexer {
            tensor_cores: ix.tensor_cores,
            kernels: ix.kernels,
            scores: ix.scores,
            wq_b: f(&ix.wq_b)?,
            wk: f(&ix.wk)?,
            k_norm_weight: f(&ix.k_norm_weight)?,
            k_norm_bias: f(&ix.k_norm_bias)?,
            weights_proj: f(&ix.weights_proj)?,
            heads: ix.heads,
            head_dim: ix.head_dim,
            rope: ix.rope,
        };
        let mut mlp = |m: &Mlp| -> Result<Mlp> {
            Ok(Mlp {
                gate: f(&m.gate)?,
                up: f(&m.up)?,
                down: f(&m.down)?,
                kernels: m.kernels,
            })
        };
        let ffn = match &self.ffn {
            FeedForward::Dense(m) => FeedForward::Dense(mlp(m)?),
            FeedForward::Moe(m) => FeedForward::Moe(Moe {
                experts: m.experts.iter().map(&mut mlp).collect::<Result<_>>()?,
                shared: m.shared.as_ref().map(&mut mlp).transpose()?,
                router: f(&m.router)?,
                bias: f(&m.bias)?,
                shard: m.shard.clone(),
                n_experts: m.n_experts,
                top_k: m.top_k,
                n_group: m.n_group,
                topk_group: m.topk_group,
                norm_topk_prob: m.norm_topk_prob,
                routed_scaling_factor: m.routed_scaling_factor,
                compute: m.compute,
                dispatch: m.dispatch,
                kernels: m.kernels,
            }),
        };
        Ok(DecoderLayer {
            input_norm: f(&self.input_norm)?,
            post_attention_norm: f(&self.post_attention_norm)?,
            attn,
            indexer,
            ffn,
            eps: self.eps,
            kernels: self.kernels,
        })
    }

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
        opts: &Pass,
    ) -> Result<(Tensor, LayerStats)> {
        self.forward_with(h, ctx, opts, None)
    }

    /// `forward`, reusing `cached` as the sparse selection instead of running the indexer's
    /// top-k again (the recomputing backward: same input, so the same sets).
    pub fn forward_with(
        &self,
        h: &Tensor,
        ctx: &ForwardContext,
        opts: &Pass,
        cached: Option<&crate::dsa::Selection>,
    ) -> Result<(Tensor, LayerStats)> {
        let sparse = opts.attention() == AttentionMode::Sparse;
        if ctx.shard.is_some() {
            // Context parallelism: the rank's query rows against every position's gathered
            // latent kv (and indexer keys): the sparse stage's block body, or the warm-up's.
            let dense_stage = matches!(
                opts,
                Pass::Train {
                    stage: crate::recipe::Stage::Dense,
                    ..
                }
            );
            return match (sparse, opts.defer_kl()) {
                _ if opts.recall() || opts.eval_rows().is_some() => candle_core::bail!(
                    "context parallelism runs the training passes only (no recall or evaluation pass)"
                ),
                (true, true) => self.forward_blocks(h, ctx, opts, cached),
                (false, true) => self.forward_context_warmup(h, ctx, opts),
                (false, false) if dense_stage => self.forward_dense_stage(h, ctx, opts),
                _ => candle_core::bail!(
                    "context parallelism runs the warm-up's, the sparse stage's and the dense stage's training passes"
                ),
            };
        }
        if (opts.block_rows() > 0 || opts.keeps_activations()) && sparse && !opts.recall() {
            return self.forward_blocks(h, ctx, opts, cached);
        }
        if opts.keeps_activations() {
            return self.forward_dense_stage(h, ctx, opts);
        }
        let eval = opts.eval_rows().is_some() && !opts.defer_kl();
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
        let attn_out = match opts.attention() {
            _ if eval => self.attention_in_blocks(&proj, ix, ctx, opts, cached, &mut stats)?,
            AttentionMode::Dense
                if opts.defer_kl()
                    && self.attn.streaming_supported(
                        &proj,
                        self.indexer.heads,
                        self.indexer.head_dim,
                    ) =>
            {
                let starts = ctx.starts.as_ref().map(|s| s.tensor());
                let (out, scores) = self.attn.dense_streaming(&proj, starts)?;
                stats.deferred_kl = Some(DeferredKl::Streaming {
                    proj: ix.expect("deferred KL projects the indexer").whole()?,
                    scores,
                });
                out
            }
            // No indexer statistic wants the probabilities (the dense pre-training stage): the
            // flash-style forward and backward (kernels, or the block-recomputing twin), no
            // [H, T, T] graph.
            AttentionMode::Dense if ix.is_none() && !opts.defer_kl() => self
                .attn
                .dense_recomputing(&proj, ctx.starts.as_ref().map(|s| s.tensor()))?,
            AttentionMode::Dense => {
                let ix = ix.map(IndexerView::whole).transpose()?;
                let causal = ctx.causal(0, ctx.t)?;
                let a = self.attn.dense(&proj, &causal)?;
                if opts.defer_kl() {
                    let proj = ix.expect("deferred KL projects the indexer");
                    stats.deferred_kl = Some(DeferredKl::Plain {
                        proj,
                        target: a.probs()?.clone(),
                    });
                } else if let Some(ix) = &ix {
                    let scores = ix.scores(&causal)?; // [B, T, T]
                    if opts.indexer_kl() {
                        stats.indexer_kl = Some(kl_rows(a.probs()?, &scores)?);
                    }
                    if opts.recall() {
                        let sel =
                            select_topk_in(&scores.detach(), opts.topk(), ctx.starts.as_ref())
                                .map_err(candle_core::Error::wrap)?;
                        stats.recall =
                            Some(recall_rows(a.probs()?, &sel).map_err(candle_core::Error::wrap)?);
                    }
                }
                a.out
            }
            AttentionMode::Sparse => {
                let region = crate::profile::region("attention: selection (indexer top-k)");
                let sel =
                    self.selection(ix.as_ref(), ctx, opts, cached, ctx.t, self.indexer.scores)?;
                drop(region);
                let region =
                    crate::profile::region("attention: sparse MLA forward (and probabilities)");
                let a = self.attn.sparse(&proj, &sel, opts.indexer_kl())?;
                drop(region);
                if opts.indexer_kl() {
                    let ix = ix.as_ref().expect("the indexer KL projects the indexer");
                    sparse_kl(ix, a.probs()?.clone(), &sel, &self.indexer, &mut stats)?;
                }
                if opts.recall() {
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
        if let Some(rows) = opts.feed_forward_rows() {
            return Ok((self.feed_forward_in_rows(&h, rows, &mut stats)?, stats));
        }
        let x = rms_norm(self.kernels, &h, &self.post_attention_norm, self.eps)?;
        let f = match &self.ffn {
            FeedForward::Dense(mlp) => mlp.forward(&x)?,
            FeedForward::Moe(moe) => {
                let r = moe.forward(&x, opts.seq_balance())?;
                stats.expert_counts = Some(r.counts);
                stats.balance_loss = r.balance_loss;
                stats.balance_weights = r.balance_weights;
                stats.chosen = Some(r.chosen);
                r.out
            }
        };
        Ok(((h + f)?, stats))
    }

    /// The residual's norm and feed-forward (MLP or MoE) of the tokens of `h` [B, T, hidden],
    /// `rows` tokens at a time (in token order over the batch), without a graph: the warm-up's
    /// block mode, where the main model is frozen. Every token is routed and computed as in the
    /// whole pass; the expert counts and choices are the whole pass's (token order kept).
    fn feed_forward_in_rows(
        &self,
        h: &Tensor,
        rows: usize,
        stats: &mut LayerStats,
    ) -> Result<Tensor> {
        let (b, t, d) = h.dims3()?;
        let flat = h.detach().reshape((b * t, d))?;
        let mut outs = Vec::with_capacity((b * t).div_ceil(rows.max(1)));
        let mut chosen = Vec::new();
        for r0 in (0..b * t).step_by(rows.max(1)) {
            let n = rows.min(b * t - r0);
            let hb = flat.narrow(0, r0, n)?;
            let x = rms_norm(self.kernels, &hb, &self.post_attention_norm, self.eps)?;
            let f = match &self.ffn {
                FeedForward::Dense(mlp) => mlp.forward(&x)?,
                FeedForward::Moe(moe) => {
                    let (out, picked, _) = moe.forward_flat(&x)?;
                    chosen.extend(picked);
                    out
                }
            };
            outs.push((hb + f)?);
        }
        if let FeedForward::Moe(moe) = &self.ffn {
            stats.expert_counts = Some(moe.counts(&chosen));
            stats.chosen = Some(chosen);
        }
        Tensor::cat(&outs, 0)?.reshape((b, t, d))
    }

    /// The attention of an evaluation pass (`opts.eval_rows()`) with its KL and recall, a block
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
        opts: &Pass,
        cached: Option<&crate::dsa::Selection>,
        stats: &mut LayerStats,
    ) -> Result<Tensor> {
        let (b, t, _, _) = proj.q_nope.dims4()?;
        let rows = match opts.eval_rows() {
            Some(0) | None => eval_block_rows(b, t, self.attn.heads, self.indexer.heads),
            Some(forced) => forced.min(t),
        };
        let (mut kl, mut recall, mut ceiling) = (vec![], vec![], vec![]); // [B, n] per block
        let out = match opts.attention() {
            AttentionMode::Dense => {
                let ix = ix.map(|v| v.whole().map(|p| p.detach())).transpose()?;
                let sel = match (&ix, opts.recall()) {
                    (Some(p), true) => {
                        let select = |scores: SelectionScores| {
                            let queries = |r: RowBlock| {
                                Ok((p.q.narrow(1, r.local, r.n)?, p.w.narrow(1, r.local, r.n)?))
                            };
                            select_indexer_topk(
                                &p.k,
                                queries,
                                rows,
                                ctx,
                                opts.topk(),
                                self.scoring(&p.k, scores),
                            )
                        };
                        let sel = select(self.indexer.scores)?;
                        if self.indexer.scores == SelectionScores::Fp8 {
                            let reference = select(SelectionScores::Bf16)?;
                            stats.fp8_agreement =
                                Some(crate::dsa::agreement_rows(&sel, &reference)?);
                        }
                        Some(sel)
                    }
                    _ => None,
                };
                let out = self
                    .attn
                    .dense_blocks(proj, ctx, rows, true, |q0, n, probs| {
                        if let (Some(p), true) = (&ix, opts.indexer_kl()) {
                            kl.push(DeferredKl::kl_rows_of(p, &probs, ctx, q0, n)?);
                        }
                        if let Some(sel) = &sel {
                            recall.push(recall_block(&probs, sel, q0, n)?);
                            ceiling.push(crate::dsa::topk_mass_rows(&probs, opts.topk())?);
                        }
                        Ok(())
                    })?;
                out.expect("dense_blocks returns the output when asked")
            }
            AttentionMode::Sparse => {
                let scores = self.indexer.scores;
                let sel = self.selection(ix.as_ref(), ctx, opts, cached, rows, scores)?;
                if opts.recall() && cached.is_none() && scores == SelectionScores::Fp8 {
                    let reference =
                        self.selection(ix.as_ref(), ctx, opts, None, rows, SelectionScores::Bf16)?;
                    stats.fp8_agreement = Some(crate::dsa::agreement_rows(&sel, &reference)?);
                }
                let a = self.attn.sparse(proj, &sel, opts.indexer_kl())?;
                if opts.indexer_kl() {
                    let ix = ix.as_ref().expect("the indexer KL projects the indexer");
                    sparse_kl(ix, a.probs()?.clone(), &sel, &self.indexer, stats)?;
                }
                if opts.recall() {
                    self.attn
                        .dense_blocks(proj, ctx, rows, false, |q0, n, probs| {
                            recall.push(recall_block(&probs, &sel, q0, n)?);
                            ceiling.push(crate::dsa::topk_mass_rows(&probs, opts.topk())?);
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
        opts: &Pass,
        cached: bool,
        stats: &mut LayerStats,
    ) -> Result<Option<IndexerView>> {
        let need_indexer = (opts.attention() == AttentionMode::Sparse && !cached)
            || opts.indexer_kl()
            || opts.recall();
        if !need_indexer {
            return Ok(None);
        }
        let (ix, iqr) = if opts.detach_indexer_inputs() {
            (x.detach(), qr.detach())
        } else {
            (x.clone(), qr.clone())
        };
        if opts.attention() == AttentionMode::Sparse && opts.defer_kl() {
            // The deferred KL stops at the projections whether or not the inputs are detached.
            let (x, qr) = (ix.detach(), iqr.detach());
            // Every position's key (gathered from the context group under context parallelism).
            let (cos, sin) = ctx.local_rope()?;
            let k = self.indexer.project_keys(&x, &cos, &sin)?.detach(); // [B, rows, DI]
            let k = ctx.gather_keys(&k)?; // [B, T, DI]
            let (b, t, _) = x.dims3()?;
            let rows = match opts.indexer_rows() {
                0 => indexer::sparse_block_rows(
                    b,
                    t,
                    self.indexer.heads,
                    self.indexer.head_dim,
                    opts.topk(),
                ),
                forced => forced.min(t),
            };
            stats.indexer_inputs = Some((x.clone(), qr.clone()));
            // A pass that keeps activations keeps the queries the selection projects, for the
            // KL's backward (`DeferredKl::Sparse::queries`).
            let kept = opts
                .keeps_activations()
                .then(|| std::cell::RefCell::new(Vec::new()));
            return Ok(Some(IndexerView::Keys {
                k,
                x,
                qr,
                rows,
                kept,
            }));
        }
        let p = self.indexer.project(&ix, &iqr, &ctx.cos, &ctx.sin)?;
        if opts.detach_indexer_inputs() || opts.defer_kl() {
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
        opts: &Pass,
        cached: Option<&crate::dsa::Selection>,
        whole_rows: usize,
        scores: SelectionScores,
    ) -> Result<crate::dsa::Selection> {
        if let Some(sel) = cached {
            return Ok(sel.clone());
        }
        let ix = ix.expect("sparse attention projects the indexer");
        match ix {
            IndexerView::Whole(p) => {
                let p = p.detach();
                let scoring = self.scoring(&p.k, scores);
                let rows = if scoring.fast {
                    p.k.dim(1)?
                } else {
                    whole_rows
                };
                select_indexer_topk(
                    &p.k,
                    |r: RowBlock| Ok((p.q.narrow(1, r.local, r.n)?, p.w.narrow(1, r.local, r.n)?)),
                    rows,
                    ctx,
                    opts.topk(),
                    scoring,
                )
            }
            IndexerView::Keys {
                k,
                x,
                qr,
                rows,
                kept,
            } => {
                let queries = |r: RowBlock| -> Result<(Tensor, Tensor)> {
                    // The block's rows of the inputs; its positions' RoPE rows.
                    let (cos, sin) = (
                        ctx.cos.narrow(0, r.pos, r.n)?,
                        ctx.sin.narrow(0, r.pos, r.n)?,
                    );
                    let (q, w) = self.indexer.project_queries(
                        &x.narrow(1, r.local, r.n)?,
                        &qr.narrow(1, r.local, r.n)?,
                        &cos,
                        &sin,
                    )?;
                    let (q, w) = (q.detach(), w.detach()); // no graph: the selection is not differentiated
                    if let Some(kept) = kept {
                        kept.borrow_mut().push((q.clone(), w.clone()));
                    }
                    Ok((q, w))
                };
                select_indexer_topk(k, queries, *rows, ctx, opts.topk(), self.scoring(k, scores))
            }
        }
    }

    /// How this layer's selection scores against `keys`: on the device kernels where they run
    /// (bf16 models on CUDA), with `scores`.
    fn scoring(&self, keys: &Tensor, scores: SelectionScores) -> Scoring {
        Scoring {
            fast: self.attn.q_b_proj.dtype() == DType::BF16 && self.kernels.on(keys.device()),
            scores,
        }
    }

    /// The warm-up's training pass under context parallelism (the main model frozen, no
    /// graph): the rank's query rows of `h` [B, n, hidden] attend densely to every position,
    /// whose latent kv rows and indexer keys the context group gathers; a block of query rows
    /// at a time (`eval_block_rows`, blocks paired over the group) the attention's per-head
    /// probabilities give the KL target (their head mean) and the KL of those rows is
    /// differentiated at once in the indexer's projections (its queries and weights of the
    /// block, every position's keys), so the deferred KL holds gradients, not the [n, T]
    /// target (`DeferredKl::Rows`). The feed-forward runs on the rank's rows
    /// (`opts.feed_forward_rows()` at a time, blocks paired over the group for the expert
    /// exchange). Numerics: the whole-sequence warm-up's plain path (`DeferredKl::Plain`) row
    /// for row; sums over blocks and ranks in another order.
    fn forward_context_warmup(
        &self,
        h: &Tensor,
        ctx: &ForwardContext,
        opts: &Pass,
    ) -> Result<(Tensor, LayerStats)> {
        let mut stats = LayerStats::default();
        let h = h.detach();
        let (b, n, _) = h.dims3()?;
        let x = rms_norm(self.kernels, &h, &self.input_norm, self.eps)?;
        let (cos, sin) = ctx.local_rope()?;
        let proj = self.attn.project(&x, &cos, &sin)?;
        // Every position's latent kv row [B, T, C+R] and indexer key [B, T, DI] (f32).
        let own = Tensor::cat(&[&proj.c_norm, &proj.k_pe.squeeze(2)?], 2)?;
        let latent = ctx.gather_keys(&own)?;
        let (xi, qri) = (x.detach(), proj.qr.detach());
        let keys = ctx.gather_keys(&self.indexer.project_keys(&xi, &cos, &sin)?.detach())?;
        let t = ctx.t;
        let rows = eval_block_rows(b, t, self.attn.heads, self.indexer.heads);
        let blocks = ctx.query_blocks(rows).map_err(candle_core::Error::wrap)?;
        let (mut dq, mut dw) = (vec![], vec![]);
        let mut dk = Tensor::zeros(keys.shape(), DType::F32, keys.device())?;
        let mut kl_sum = Tensor::zeros((), DType::F32, keys.device())?;
        let attn_out =
            self.attn
                .dense_query_blocks(&proj, &latent, ctx, &blocks, |blk, probs| {
                    let (q, w) = self.indexer.project_queries(
                        &xi.narrow(1, blk.local, blk.n)?,
                        &qri.narrow(1, blk.local, blk.n)?,
                        &cos.narrow(0, blk.local, blk.n)?,
                        &sin.narrow(0, blk.local, blk.n)?,
                    )?;
                    let leaves = (
                        candle_core::Var::from_tensor(&q.detach())?,
                        candle_core::Var::from_tensor(&w.detach())?,
                        candle_core::Var::from_tensor(&keys)?,
                    );
                    let p = IndexerProj {
                        q: leaves.0.as_tensor().clone(),
                        k: leaves.2.as_tensor().clone(),
                        w: leaves.1.as_tensor().clone(),
                    };
                    let scores = p
                        .scores_rows(0, blk.n)?
                        .broadcast_add(&ctx.causal(blk.pos, blk.n)?)?; // [B, n, T]
                    let kl = kl_rows(&probs.mean(1)?, &scores)?.sum_all()?;
                    let g = kl.backward()?;
                    let grad = |v: &candle_core::Var| -> Result<Tensor> {
                        match g.get(v.as_tensor()) {
                            Some(x) => Ok(x.detach()),
                            None => v.as_tensor().zeros_like(),
                        }
                    };
                    dq.push(grad(&leaves.0)?);
                    dw.push(grad(&leaves.1)?);
                    dk = (&dk + grad(&leaves.2)?)?;
                    kl_sum = (&kl_sum + kl.detach().to_dtype(DType::F32)?)?;
                    Ok(())
                })?;
        stats.deferred_kl = Some(DeferredKl::Rows {
            kl_sum,
            dq: Tensor::cat(&dq, 1)?,
            dw: Tensor::cat(&dw, 1)?,
            dk,
        });
        stats.indexer_inputs = Some((xi, qri));
        let h = (&h + attn_out)?;
        let rows = opts.feed_forward_rows().unwrap_or(n.max(1));
        let blocks = ctx.query_blocks(rows).map_err(candle_core::Error::wrap)?;
        let mut outs = Vec::with_capacity(blocks.len());
        let mut chosen = Vec::new();
        for blk in &blocks {
            let hb = h.narrow(1, blk.local, blk.n)?;
            let d = hb.dim(2)?;
            let x = rms_norm(self.kernels, &hb, &self.post_attention_norm, self.eps)?
                .reshape((b * blk.n, d))?;
            let f = match &self.ffn {
                FeedForward::Dense(mlp) => mlp.forward(&x)?,
                FeedForward::Moe(moe) => {
                    let (out, picked, _) = moe.forward_flat(&x)?;
                    chosen.extend(picked);
                    out
                }
            };
            outs.push((hb + f.reshape((b, blk.n, d))?)?);
        }
        if let FeedForward::Moe(moe) = &self.ffn {
            stats.expert_counts = Some(moe.counts(&chosen));
        }
        Ok((Tensor::cat(&outs, 1)?, stats))
    }

    /// `forward_with` in block mode (sparse attention, `opts.block_rows()` queries at a time):
    /// the indexer over the whole sequence as usual, then `sparse_blocks`; the output is
    /// detached and the balance loss is left to the blocked backward (`balance_weights`).
    fn forward_blocks(
        &self,
        h: &Tensor,
        ctx: &ForwardContext,
        opts: &Pass,
        cached: Option<&crate::dsa::Selection>,
    ) -> Result<(Tensor, LayerStats)> {
        let mut stats = LayerStats::default();
        let x = rms_norm(self.kernels, &h.detach(), &self.input_norm, self.eps)?;
        let qr = self.attn.project_qr(&x)?;
        let ix = self.project_indexer(&x, &qr, ctx, opts, cached.is_some(), &mut stats)?;
        drop((x, qr));
        let sel = self.selection(ix.as_ref(), ctx, opts, cached, ctx.t, self.indexer.scores)?;
        let pass = self.sparse_blocks(h, ctx, &sel, opts.block_rows(), opts.keeps_activations())?;
        stats.saved = pass.saved;
        let head_mean = pass.head_mean;
        if opts.indexer_kl() {
            let ix = ix.as_ref().expect("the indexer KL projects the indexer");
            sparse_kl(ix, head_mean, &sel, &self.indexer, &mut stats)?;
        }
        if let (FeedForward::Moe(moe), Some(chosen)) = (&self.ffn, pass.chosen) {
            let (b, rows, _) = h.dims3()?;
            routing_stats(moe, chosen, b, rows, ctx, &mut stats)?;
        }
        stats.selection = Some(sel);
        Ok((pass.out, stats))
    }

    /// The dense stage's first pass through the explicit layer body, without a graph: under
    /// context parallelism (the rank's query rows against every position's gathered latent
    /// kv; the trainer recomputes the layer in its second pass), or keeping what the layer's
    /// backward reads (`Pass::keeps_activations`). The balance loss's per-sequence counts are
    /// summed over the context group (`routing_stats`).
    fn forward_dense_stage(
        &self,
        h: &Tensor,
        ctx: &ForwardContext,
        opts: &Pass,
    ) -> Result<(Tensor, LayerStats)> {
        let mut stats = LayerStats::default();
        let (b, n, _) = h.dims3()?;
        let (out, chosen, saved) = self.forward_dense_explicit(h, ctx, opts.keeps_activations())?;
        if let (FeedForward::Moe(moe), Some(chosen)) = (&self.ffn, chosen) {
            routing_stats(moe, chosen, b, n, ctx, &mut stats)?;
        }
        stats.saved = saved;
        Ok((out, stats))
    }
}

/// A MoE layer's routing statistics from the experts `chosen` for the B x `rows` tokens of a
/// pass: the expert counts, the balance loss's f per sequence (its counts summed over the
/// context group: each sequence's f counts its tokens on every rank) and the choices.
fn routing_stats(
    moe: &Moe,
    chosen: Vec<u32>,
    b: usize,
    rows: usize,
    ctx: &ForwardContext,
    stats: &mut LayerStats,
) -> Result<()> {
    stats.expert_counts = Some(moe.counts(&chosen));
    let mut counts = moe.balance_counts(&chosen, b, rows);
    if let Some(shard) = &ctx.shard {
        let as_f32: Vec<f32> = counts.iter().map(|&c| c as f32).collect(); // exact below 2^24
        counts = shard
            .sum_host(&as_f32)
            .map_err(candle_core::Error::wrap)?
            .iter()
            .map(|&c| c as u32)
            .collect();
    }
    stats.balance_weights = Some(moe.balance_weights_of(&counts, ctx.t));
    stats.chosen = Some(chosen);
    Ok(())
}

/// What a pass holds of the indexer's projections.
enum IndexerView {
    /// Queries, keys and head weights of every row: a graph, or leaf copies when training.
    Whole(IndexerProj),
    /// The sparse stage's training: the keys of every token [B, T, DI] (f32, detached) and the
    /// detached inputs x [B, T, hidden], qr [B, T, q_lora]; queries and head weights exist only
    /// `rows` tokens at a time (`Indexer::project_queries`), and, in a pass that keeps
    /// activations, `kept` collects each block's (queries, head weights) as the selection
    /// projects them, in row order.
    Keys {
        k: Tensor,
        x: Tensor,
        qr: Tensor,
        rows: usize,
        kept: Option<std::cell::RefCell<Vec<(Tensor, Tensor)>>>,
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
        IndexerView::Keys { k, rows, kept, .. } => {
            // The selection's queries of every row, where it projected and kept them.
            let queries = match kept.as_ref().map(|v| v.borrow()) {
                Some(blocks) if !blocks.is_empty() => {
                    let (q, w): (Vec<Tensor>, Vec<Tensor>) = blocks.iter().cloned().unzip();
                    Some((Tensor::cat(&q, 1)?, Tensor::cat(&w, 1)?))
                }
                _ => None,
            };
            stats.deferred_kl = Some(DeferredKl::Sparse {
                keys: k.clone(),
                target,
                sel: sel.clone(),
                rows: *rows,
                queries,
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

/// Query rows per block of the evaluation pass (`Pass::eval_rows`): about 2^26
/// elements in its largest intermediates, the dense probabilities [B, H, n, T] and the
/// indexer's per-head scores [B, n*HI, T] (f32, 256 MiB); at least 1, at most `t`.
pub fn eval_block_rows(b: usize, t: usize, heads: usize, indexer_heads: usize) -> usize {
    ((1usize << 26) / (b * heads.max(indexer_heads) * t).max(1)).clamp(1, t.max(1))
}

/// The device kernels' sets, a block of `rows` query rows at a time: `positions(block)` gives each
/// sequence's key positions [n, K] of the block's rows; a sequence's blocks are joined into
/// absolute rows, one whole-sequence copy at a time.
fn device_sets(
    ctx: &ForwardContext,
    (b, t): (usize, usize),
    rows: usize,
    positions: impl Fn(RowBlock) -> Result<Vec<Tensor>>,
) -> Result<crate::dsa::Selection> {
    let mut per_seq: Vec<Vec<Tensor>> = vec![Vec::new(); b]; // [n, min(k, T)] absolute rows per block
    for block in ctx.query_rows().blocks(rows) {
        for (bi, p) in positions(block)?.iter().enumerate() {
            per_seq[bi].push(crate::dsa::absolute_rows(p, bi, t)?);
        }
    }
    let mut seqs: Vec<Tensor> = Vec::with_capacity(b);
    for parts in per_seq {
        seqs.push(Tensor::cat(&parts, 0)?.unsqueeze(0)?); // [1, rows, K]
    }
    // (candle's cat of one tensor is that tensor: no copy for a single sequence)
    crate::dsa::Selection::from_absolute(Tensor::cat(&seqs, 0)?, t)
}

/// How a selection scores keys (`DecoderLayer::scoring`): on the device kernels (`fast`) or the
/// host's f32 path, with bf16 or FP8 scores.
#[derive(Debug, Clone, Copy)]
struct Scoring {
    fast: bool,
    scores: SelectionScores,
}

/// Top-k selection from the indexer against `keys` [B, T, DI] (every position's), for the
/// context's query rows (`ForwardContext::query_rows`: every position, or this rank's under
/// context parallelism), scoring one block of at most `rows` queries at a time (no [T, T]
/// tensor, and the queries of one block at a time): `queries(block)` gives the detached
/// queries [B, n, HI, DI] and head weights [B, n, HI] (f32) of the block's rows. `fast` (bf16
/// models on CUDA): the tensor-core scoring and device top-k kernels, with q_I and k_I rounded
/// to bf16 for the products (f32 accumulation), each block's rows passed with their first
/// position; otherwise f32 scores and the host selection, the reference that f32 GPU runs
/// share with the CPU. With `SelectionScores::Fp8` the queries and keys are first rotated and
/// rounded to FP8 (`fp8_scores::round_for_scores`; exact in bf16, so either path scores the
/// rounded rows with f32 sums). The sets do not depend on `rows`. Returns the sets of the query
/// rows, [B, rows, K], absolute rows counted in sequences of T.
fn select_indexer_topk(
    keys: &Tensor,
    queries: impl Fn(RowBlock) -> Result<(Tensor, Tensor)>,
    rows: usize,
    ctx: &ForwardContext,
    k: usize,
    scoring: Scoring,
) -> Result<crate::dsa::Selection> {
    let (b, t, _) = keys.dims3()?;
    let query_rows = ctx.query_rows();
    let rows = rows.clamp(1, t.max(1));
    let fp8 = scoring.scores == SelectionScores::Fp8;
    // FP8 scores: the rounded rows, exact in bf16, through either path below.
    let keys = &if fp8 {
        round_for_scores(keys)?
    } else {
        keys.clone()
    };
    let queries = |block: RowBlock| -> Result<(Tensor, Tensor)> {
        let (q, w) = queries(block)?;
        Ok((if fp8 { round_for_scores(&q)? } else { q }, w))
    };
    if scoring.fast {
        let keys = keys.to_dtype(DType::BF16)?;
        return device_sets(ctx, (b, t), rows, |block| {
            let (q, w) = queries(block)?;
            let q = q.to_dtype(DType::BF16)?; // [B, n, HI, DI]
            let starts = ctx.starts_rows(block.pos, block.n)?; // [B, n] under document masking
            (0..b)
                .map(|bi| {
                    crate::kernels::indexer_topk::indexer_topk(
                        &q.get(bi)?,
                        &w.get(bi)?,
                        &keys.get(bi)?,
                        block.pos,
                        k,
                        starts.as_ref().map(|s| s.get(bi)).transpose()?.as_ref(),
                    )
                })
                .collect()
        });
    }
    let keys = keys.clone();
    crate::dsa::select_topk_streaming(
        b,
        t,
        k,
        &query_rows.blocks(rows.min(crate::dsa::query_block(b, t))),
        ctx.starts.as_ref(),
        keys.device(),
        |block| {
            let (q, w) = queries(block)?;
            let scores = IndexerProj {
                q,
                k: keys.clone(),
                w,
            };
            Ok(scores
                .scores_rows(0, block.n)?
                .broadcast_add(&ctx.causal(block.pos, block.n)?)?)
        },
    )
    .map_err(candle_core::Error::wrap)
}
