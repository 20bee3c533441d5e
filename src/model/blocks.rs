//! The decoder layer's training passes without autograd, as llm.c writes a layer's backward.
//! One block body (`block_forward`, `block_backward`) runs a block of query rows of the sparse
//! stage's layer; the dense stage's layer runs whole (`dense_forward_detached`,
//! `dense_backward_saved`). The pass's `BackwardPlan` says how the backward gets its inputs:
//! - recomputed (`sparse_backward`, `dense_backward`): the layer again from its input (kept by
//!   the trainer's first pass) with the sets (and, in MoE layers, the expert choices) that pass
//!   made, each block's backward right after its forward;
//! - saved (`saved_backward`): from what the first pass kept (`sparse_blocks` with `keep`,
//!   `forward_dense_explicit`; `LayerSaved`), no forward work again.
//!
//! Shapes: B batch, T tokens, D hidden, C + R the latent kv row, n rows of a block.
//!
//! Why blocks are exact: in the absorbed form every query reads only the shared latent rows
//! kv [B*T, C+R] and its own token; everything else (queries, attention, o_proj, norms, the
//! MLP or MoE) is per token. So the whole-sequence parts run once (the input norm and the
//! latent kv), each block runs the per-token parts, and the blocks' gradients of kv are summed
//! in f32 before one backward through the kv projection. The input norm's gradient is taken
//! once over the sequence from the sum of its two uses (queries and kv).
//!
//! Numerics: each op's backward states its own (`ops`, `attention`, `moe`); gradients meet in
//! the model dtype except kv's (f32 over blocks). The twin is candle's autograd of the same
//! forward (`DecoderLayer::forward_with`); `explicit_against_autograd` holds every gradient
//! against it.

use candle_core::{Result, Tensor};

use super::grad_sink::{add_if_wanted, GradSink, Originals, ToOriginals};
use super::{DecoderLayer, FeedForward, ForwardContext};
use crate::dsa::Selection;
use crate::ops::{rms_norm, rms_norm_backward};

/// What one layer's backward needs besides its input and sets.
pub struct LayerBackward<'a> {
    /// d(loss)/d(layer output) [B, T, D].
    pub dout: &'a Tensor,
    /// MoE layers with a balance loss: its f per sequence [B * E] (`LayerStats::balance_weights`,
    /// from the whole sequence's routing) and its weight (alpha times the micro-batch scale).
    pub balance: Option<(&'a [f32], f64)>,
    /// MoE layers: the first pass's experts per token [B*T*K] (`LayerStats::chosen`), reused
    /// (no host routing, no synchronisation); None routes again.
    pub chosen: Option<&'a [u32]>,
}

/// What `DecoderLayer::sparse_blocks` computed: the layer output [B, T, hidden] (detached),
/// the sparse attention's head-mean probabilities over S_t [B, T, K] (f32), for MoE layers
/// the experts chosen per token [B*T*K] in token order, and, when asked, what the layer's
/// backward reads (`LayerSaved`).
pub struct BlockPass {
    pub out: Tensor,
    pub head_mean: Tensor,
    pub chosen: Option<Vec<u32>>,
    pub saved: Option<LayerSaved>,
}

/// What a layer's explicit backward reads, kept by its forward (`BackwardPlan::Saved`): the
/// layer's input and every tensor the recomputing backward would compute again, so the
/// backward runs no forward work. About what candle's autograd would keep for the same layer.
pub enum LayerSaved {
    Sparse(SparseLayerSaved),
    Dense(Box<DenseLayerSaved>),
}

/// The sparse stage's layer: the whole-sequence parts and each block's.
pub struct SparseLayerSaved {
    h: Tensor,
    xn: Tensor,
    kv: Tensor,
    kv_saved: super::attention::KvSaved,
    rows_cos: Tensor,
    rows_sin: Tensor,
    blocks: Vec<BlockSaved>,
}

/// The dense stage's layer (whole sequence).
pub struct DenseLayerSaved {
    h: Tensor,
    attn: DenseAttentionSaved,
    xf: Tensor,
    ffn: FfnSaved,
}

/// One block of query rows: (first sequence, sequences, first local row, rows), the normed
/// rows, their RoPE tables and sets, the queries' and attention's saved tensors, the residual
/// h1, its norm and the feed-forward's saved tensors.
struct BlockSaved {
    place: (usize, usize, usize, usize),
    xq: Tensor,
    cos: Tensor,
    sin: Tensor,
    sel: Selection,
    q_saved: super::attention::QuerySaved,
    a_saved: super::attention::SparseSaved,
    h1: Tensor,
    xf: Tensor,
    ffn: FfnSaved,
}

/// The feed-forward's forward as its backward reads it.
enum FfnSaved {
    Dense(crate::ops::SwigluSaved),
    Moe(Box<super::moe::MoeSaved>),
}

/// The dense stage's attention half of a layer as its backward reads it
/// (`DecoderLayer::dense_attention_saved`); `cos`, `sin` the query rows' RoPE tables.
pub(crate) struct DenseAttentionSaved {
    pub h1: Tensor,
    xn: Tensor,
    kv_saved: super::attention::KvSaved,
    q_saved: super::attention::QuerySaved,
    a_saved: super::attention::DenseSaved,
    cos: Tensor,
    sin: Tensor,
}

/// Which way the block body runs.
enum Direction<'a, 'g> {
    /// Outputs, probabilities and expert choices (`BlockPass`); `keep`: and what the backward
    /// reads.
    Forward { keep: bool },
    /// Recompute each block, then its backward: dh, with the parameters' gradients to the sink.
    Backward(LayerBackward<'a>, &'g mut dyn GradSink),
}

/// What one block's forward is asked for: the layer output and the attention's head-mean
/// probabilities (`output`), the tensors its backward reads (`saved`), and the MoE experts
/// already chosen for its tokens (`known`: a recomputation routes as the first pass did).
struct BlockWants {
    output: bool,
    saved: bool,
    known: Option<Vec<u32>>,
}

/// What one block's forward gave.
struct BlockRun {
    out: Option<Tensor>,
    probs: Option<Tensor>,
    chosen: Vec<u32>,
    saved: Option<BlockSaved>,
}

/// A block's backward results: dh1 (the residual's gradient, before the input norm), the
/// normed rows' gradient from the queries, and the latent kv's gradient (every position).
struct BlockGrads {
    dh1: Tensor,
    dxq: Tensor,
    dkv: Tensor,
}

impl DecoderLayer {
    /// The sparse-stage layer over blocks of `rows` queries of one sequence at a time (0: every
    /// sequence at once, or each segment of a context-parallel rank's rows), without a graph
    /// (the trainer's first pass; `sparse_backward` recomputes it, `saved_backward` reads what
    /// `keep` kept). A block's working set is that of `rows` tokens, plus the sequence's latent
    /// kv; with `keep` every block's saved tensors stay alive.
    pub fn sparse_blocks(
        &self,
        h: &Tensor,
        ctx: &ForwardContext,
        sel: &Selection,
        rows: usize,
        keep: bool,
    ) -> Result<BlockPass> {
        let (view, _) = self.detached_view()?;
        match view.blocks(h, ctx, sel, rows, Direction::Forward { keep })? {
            Ran::Forward(pass) => Ok(pass),
            Ran::Backward(_) => unreachable!("a forward run returns its pass"),
        }
    }

    /// The sparse-stage layer's backward: recompute from `h` [B, T, D] with the sets `sel`
    /// [B, T, K] (absolute rows), `rows` queries per block (0, or at least T: every sequence
    /// at once), and return d(loss)/dh [B, T, D]; parameter gradients go to `grads` (block by
    /// block). The gradient of `forward_with`'s output against `bw.dout` (plus the balance
    /// loss) up to summation order, with no autograd graph.
    pub fn sparse_backward(
        &self,
        h: &Tensor,
        ctx: &ForwardContext,
        sel: &Selection,
        rows: usize,
        bw: LayerBackward,
        grads: &mut dyn GradSink,
    ) -> Result<Tensor> {
        self.backward_on_view(bw, grads, |view, bw, grads| {
            match view.blocks(h, ctx, sel, rows, Direction::Backward(bw, grads))? {
                Ran::Backward(dh) => Ok(dh),
                Ran::Forward(_) => unreachable!("a backward run returns dh"),
            }
        })
    }

    /// The layer's backward from what its forward kept (`sparse_blocks` or
    /// `forward_dense_explicit` with `keep`): the same block backward as the recomputing one,
    /// without the forward work. `bw.chosen` is unused (the saved routing is the first pass's).
    pub fn saved_backward(
        &self,
        saved: LayerSaved,
        ctx: &ForwardContext,
        bw: LayerBackward,
        grads: &mut dyn GradSink,
    ) -> Result<Tensor> {
        let _region = crate::profile::region("layer: explicit backward (saved activations)");
        self.backward_on_view(bw, grads, |view, bw, grads| match saved {
            LayerSaved::Sparse(s) => {
                let (b, t, _) = s.h.dims3()?;
                let mut parts = BackwardParts::default();
                for block in s.blocks {
                    parts.add(view.block_backward(block, &s.kv, &bw, b, ctx, grads)?)?;
                }
                let rope = (&s.rows_cos, &s.rows_sin);
                view.finish_sparse_backward(&s.h, &s.xn, &s.kv_saved, rope, parts, b, t, ctx, grads)
            }
            LayerSaved::Dense(s) => view.dense_backward_saved(*s, ctx, &bw, grads),
        })
    }

    /// A copy of the layer whose tensors are detached views of this one's, and the original of
    /// each view.
    fn detached_view(&self) -> Result<(DecoderLayer, Originals)> {
        let mut originals = Originals::default();
        let layer = self.map_tensors(&mut |t: &Tensor| Ok(originals.view(t)))?;
        Ok((layer, originals))
    }

    /// Run a backward `f` on a detached view of this layer. The trainer's weights are Vars,
    /// through which candle records every op's inputs: the work runs on detached views of them
    /// (the same storage), so no graph is kept, and their gradients are handed on to `grads`
    /// under the original tensors. `bw.dout` is detached too.
    fn backward_on_view<R>(
        &self,
        bw: LayerBackward,
        grads: &mut dyn GradSink,
        f: impl FnOnce(&DecoderLayer, LayerBackward, &mut dyn GradSink) -> Result<R>,
    ) -> Result<R> {
        let (view, originals) = self.detached_view()?;
        let dout = bw.dout.detach();
        let bw = LayerBackward { dout: &dout, ..bw };
        f(
            &view,
            bw,
            &mut ToOriginals {
                inner: grads,
                originals,
            },
        )
    }

    /// The layer's backward in the trainer's second pass, as `pass` ran the first: the sparse
    /// stage's a block of `pass.block_rows()` queries at a time with the first pass's sets
    /// `sel` (`sparse_backward`), the dense stage's whole (`dense_backward`).
    pub fn recomputed_backward(
        &self,
        h: &Tensor,
        ctx: &ForwardContext,
        sel: Option<&Selection>,
        pass: &super::Pass,
        bw: LayerBackward,
        grads: &mut dyn GradSink,
    ) -> Result<Tensor> {
        match (pass.attention(), sel) {
            (super::AttentionMode::Sparse, Some(sel)) => {
                self.sparse_backward(h, ctx, sel, pass.block_rows(), bw, grads)
            }
            (super::AttentionMode::Dense, _) => self.dense_backward(h, ctx, bw, grads),
            (super::AttentionMode::Sparse, None) => {
                candle_core::bail!("the first pass kept no selected sets")
            }
        }
    }

    /// The dense stage's layer backward (MHA-mode attention over every causal key): recompute
    /// from `h` [B, T, D] and return d(loss)/dh; parameter gradients to `grads`. The gradient
    /// of `forward_with` in the dense stage up to summation order, with no autograd graph.
    pub fn dense_backward(
        &self,
        h: &Tensor,
        ctx: &ForwardContext,
        bw: LayerBackward,
        grads: &mut dyn GradSink,
    ) -> Result<Tensor> {
        let _region = crate::profile::region("layer: explicit recompute and backward (dense)");
        self.backward_on_view(bw, grads, |view, bw, grads| {
            let (_, saved) = view.dense_forward_detached(h, ctx, false, bw.chosen)?;
            view.dense_backward_saved(saved, ctx, &bw, grads)
        })
    }

    /// The dense stage's layer forward without a graph (the first pass under context
    /// parallelism, or with `keep` the saved-activations pass): the attention half
    /// (`dense_attention_saved`) and the feed-forward; returns the output [B, n, D] and its
    /// routing (MoE layers), and with `keep` what `saved_backward` reads.
    pub(crate) fn forward_dense_explicit(
        &self,
        h: &Tensor,
        ctx: &ForwardContext,
        keep: bool,
    ) -> Result<(Tensor, Option<Vec<u32>>, Option<LayerSaved>)> {
        let (view, _) = self.detached_view()?;
        if !keep {
            let (b, n, d) = h.dims3()?;
            let h1 = view.dense_attention_saved(&h.detach(), ctx)?.h1;
            let x = rms_norm(view.kernels, &h1, &view.post_attention_norm, view.eps)?;
            let (f, chosen) = match &view.ffn {
                FeedForward::Dense(mlp) => (mlp.forward(&x)?, None),
                FeedForward::Moe(moe) => {
                    let (out, chosen, _) = moe.forward_flat(&x.reshape((b * n, d))?)?;
                    (out.reshape((b, n, d))?, Some(chosen))
                }
            };
            return Ok(((h1 + f)?.detach(), chosen, None));
        }
        let (out, saved) = view.dense_forward_detached(h, ctx, true, None)?;
        let chosen = match &saved.ffn {
            FfnSaved::Moe(m) => Some(m.chosen().to_vec()),
            FfnSaved::Dense(_) => None,
        };
        let out = out.expect("asked for the output");
        Ok((out, chosen, Some(LayerSaved::Dense(Box::new(saved)))))
    }

    /// The dense layer's forward on a detached view, keeping what its backward reads; the
    /// output when `output` (the first pass), the MoE routed as `known` when given.
    fn dense_forward_detached(
        &self,
        h: &Tensor,
        ctx: &ForwardContext,
        output: bool,
        known: Option<&[u32]>,
    ) -> Result<(Option<Tensor>, DenseLayerSaved)> {
        let (b, t, d) = h.dims3()?;
        let h = h.detach();
        let attn = self.dense_attention_saved(&h, ctx)?;
        let xf = rms_norm(self.kernels, &attn.h1, &self.post_attention_norm, self.eps)?;
        let (f, ffn) = match &self.ffn {
            FeedForward::Dense(mlp) => {
                let saved = mlp.forward_saved(&xf)?;
                let f = if output {
                    Some(saved.output(&mlp.down)?)
                } else {
                    None
                };
                (f, FfnSaved::Dense(saved))
            }
            FeedForward::Moe(moe) => {
                let (f, saved) = moe.forward_saved(&xf.reshape((b * t, d))?, known, output)?;
                (
                    f.map(|f| f.reshape((b, t, d))).transpose()?,
                    FfnSaved::Moe(Box::new(saved)),
                )
            }
        };
        let out = f.map(|f| (&attn.h1 + f).map(|o| o.detach())).transpose()?;
        Ok((out, DenseLayerSaved { h, attn, xf, ffn }))
    }

    /// The dense layer's backward from its saved forward.
    fn dense_backward_saved(
        &self,
        saved: DenseLayerSaved,
        ctx: &ForwardContext,
        bw: &LayerBackward,
        grads: &mut dyn GradSink,
    ) -> Result<Tensor> {
        let DenseLayerSaved { h, attn, xf, ffn } = saved;
        let b = h.dim(0)?;
        let eps = self.eps;
        let dout = bw.dout.to_dtype(h.dtype())?;
        let DenseAttentionSaved {
            h1,
            xn,
            kv_saved,
            q_saved,
            a_saved,
            cos,
            sin,
        } = attn;
        let dxf = self.feed_forward_backward(&xf, ffn, &dout, bw, (0, b), ctx, grads)?;
        let (dh1_norm, dw) =
            rms_norm_backward(self.kernels, &h1, &self.post_attention_norm, eps, &dxf)?;
        add_if_wanted(grads, &self.post_attention_norm, Some(dw))?;
        let dh1 = (dout + dh1_norm)?;
        let (dq_nope, dq_pe, dkv) = self.attn.dense_backward(&a_saved, &dh1, grads)?;
        // Under context parallelism every position's kv gradient goes home (f32, group order).
        let dkv = ctx.latent_grads_home(&dkv, b)?;
        let dxn = (self
            .attn
            .queries_backward(&xn, &q_saved, &dq_nope, &dq_pe, &cos, &sin, grads)?
            + self
                .attn
                .latent_kv_backward(&xn, &kv_saved, &dkv, &cos, &sin, grads)?)?;
        let (dh_norm, dw) = rms_norm_backward(self.kernels, &h, &self.input_norm, eps, &dxn)?;
        add_if_wanted(grads, &self.input_norm, Some(dw))?;
        dh1 + dh_norm
    }

    /// The feed-forward's backward of rows `xf` [bn, n, D] from its saved forward, `seqs` =
    /// (the rows' first sequence, the batch's sequences B): d(loss)/dxf; the MoE balance loss's gradient
    /// (its f per sequence from `bw.balance`, a mean over every token of the sequences) joins.
    #[allow(clippy::too_many_arguments)]
    fn feed_forward_backward(
        &self,
        xf: &Tensor,
        saved: FfnSaved,
        dout: &Tensor,
        bw: &LayerBackward,
        seqs: (usize, usize),
        ctx: &ForwardContext,
        grads: &mut dyn GradSink,
    ) -> Result<Tensor> {
        let (bn, n, d) = xf.dims3()?;
        let (b0, b) = seqs;
        match (&self.ffn, saved) {
            (FeedForward::Dense(mlp), FfnSaved::Dense(saved)) => {
                mlp.backward(xf, &saved, dout, grads)
            }
            (FeedForward::Moe(moe), FfnSaved::Moe(saved)) => {
                let f_rows = match bw.balance {
                    Some((f, weight)) => {
                        let e = moe.n_experts;
                        let f =
                            Tensor::from_slice(&f[b0 * e..(b0 + bn) * e], (bn, 1, e), xf.device())?;
                        Some((f.broadcast_as((bn, n, e))?.reshape((bn * n, e))?, weight))
                    }
                    None => None,
                };
                // The balance loss is a mean over every token of the sequences (ctx.t each:
                // under context parallelism the group's ranks hold T between them).
                let balance = f_rows.as_ref().map(|(f, weight)| (f, b, ctx.t, *weight));
                let xf = xf.reshape((bn * n, d))?;
                moe.backward(&xf, &saved, &dout.reshape((bn * n, d))?, balance, grads)?
                    .reshape((bn, n, d))
            }
            _ => candle_core::bail!("a layer's saved feed-forward is not of its kind"),
        }
    }

    /// The dense stage's attention half of the layer from its input `h` [B, n, D] (the
    /// context's query rows), keeping what the backward reads: the norm, the latent kv rows
    /// and queries, the attention over every causal key (under context parallelism the rows
    /// against every position's gathered latent kv, `dense_recompute::forward_rows`), and the
    /// residual h1 = h + attention.
    pub(crate) fn dense_attention_saved(
        &self,
        h: &Tensor,
        ctx: &ForwardContext,
    ) -> Result<DenseAttentionSaved> {
        let (b, n, _) = h.dims3()?;
        let (cos, sin) = ctx.local_rope()?;
        let xn = rms_norm(self.kernels, h, &self.input_norm, self.eps)?;
        let (kv, kv_saved) = self.attn.latent_kv_saved(&xn, &cos, &sin)?; // [B*n, C+R]
        let (q_nope, q_pe, q_saved) = self.attn.queries_saved(&xn, &cos, &sin)?;
        let starts = ctx.starts.as_ref().map(|s| s.tensor());
        let (kv, blocks) = match &ctx.shard {
            Some(_) => {
                let width = kv.dim(1)?;
                let all = ctx.gather_keys(&kv.reshape((b, n, width))?)?; // [B, T, C+R]
                let rows = super::dense_recompute::block_rows(b, self.attn.heads, ctx.t);
                let blocks = ctx.query_blocks(rows).map_err(candle_core::Error::wrap)?;
                (all.reshape((b * ctx.t, width))?, Some(blocks))
            }
            None => (kv, None),
        };
        let (a, a_saved) = self.attn.dense_saved(&q_nope, &q_pe, &kv, starts, blocks)?;
        Ok(DenseAttentionSaved {
            h1: (h + a)?,
            xn,
            kv_saved,
            q_saved,
            a_saved,
            cos,
            sin,
        })
    }

    /// The block body of `sparse_blocks` and `sparse_backward`, on a layer whose tensors
    /// record no graph. `rows` 0 or at least T: every sequence in one block.
    fn blocks(
        &self,
        h: &Tensor,
        ctx: &ForwardContext,
        sel: &Selection,
        rows: usize,
        mut dir: Direction,
    ) -> Result<Ran> {
        let (b, t, _) = h.dims3()?;
        let h = h.detach();
        let eps = self.eps;
        let (forward, keep) = match &dir {
            Direction::Forward { keep } => (true, *keep),
            Direction::Backward(..) => (false, true),
        };
        let _region = crate::profile::region(if forward {
            "layer: forward in blocks"
        } else {
            "layer: explicit recompute and backward"
        });
        // Whole-sequence parts: the input norm and the latent kv every block reads.
        // (A forward that keeps nothing keeps neither the normed input nor kv_a's output: each
        // block norms its own rows again, the same bits, and the whole-sequence copies are
        // freed at once.) Under context parallelism h holds this rank's query rows; their kv
        // rows are gathered into every position's (`ForwardContext::gather_keys`).
        let region = crate::profile::region("blocks: input norm and latent kv");
        let (rows_cos, rows_sin) = ctx.local_rope()?; // the rank's rows' RoPE tables
        let (xn, kv, kv_saved) = {
            let xn = rms_norm(self.kernels, &h, &self.input_norm, eps)?;
            if keep {
                let (kv, saved) = self.attn.latent_kv_saved(&xn, &rows_cos, &rows_sin)?;
                (Some(xn), kv, Some(saved))
            } else {
                let (c_norm, k_pe) = self.attn.project_kv(&xn, &rows_cos, &rows_sin)?;
                (None, self.attn.latent_kv(&c_norm, &k_pe)?, None)
            }
        };
        let kv = match &ctx.shard {
            Some(_) => {
                let width = kv.dim(1)?;
                ctx.gather_keys(&kv.reshape((b, t, width))?)?
                    .reshape((b * ctx.t, width))?
            }
            None => kv,
        };
        drop(region);
        // (first sequence, sequences, local row, position, rows) of each block.
        let blocks: Vec<(usize, usize, usize, usize, usize)> =
            if ctx.shard.is_none() && (rows == 0 || rows >= t) {
                vec![(0, b, 0, 0, t)]
            } else {
                let in_rows = ctx.query_blocks(rows).map_err(candle_core::Error::wrap)?;
                (0..b)
                    .flat_map(|bi| in_rows.iter().map(move |r| (bi, 1, r.local, r.pos, r.n)))
                    .collect()
            };
        let (mut outs, mut probs, mut chosen, mut saved) = (
            Vec::with_capacity(blocks.len()),
            Vec::with_capacity(blocks.len()),
            Vec::new(),
            Vec::new(),
        );
        let mut parts = BackwardParts::default();
        let top_k = match &self.ffn {
            FeedForward::Moe(moe) => Some(moe.top_k),
            FeedForward::Dense(_) => None,
        };
        for &(b0, bn, q0, pos, n) in &blocks {
            // A recomputation routes each block's tokens as the first pass did.
            let known = match &dir {
                Direction::Backward(bw, _) => bw.chosen.zip(top_k).map(|(c, k)| {
                    (b0..b0 + bn)
                        .flat_map(|bi| c[(bi * t + q0) * k..(bi * t + q0 + n) * k].iter().copied())
                        .collect()
                }),
                Direction::Forward { .. } => None,
            };
            let wants = BlockWants {
                output: forward,
                saved: keep,
                known,
            };
            let run =
                self.block_forward(&h, xn.as_ref(), &kv, ctx, sel, (b0, bn, q0, pos, n), wants)?;
            match &mut dir {
                Direction::Forward { .. } => {
                    outs.push(run.out.expect("asked for the output"));
                    probs.push(run.probs.expect("asked for the probabilities"));
                    chosen.extend(run.chosen);
                    saved.extend(run.saved);
                }
                Direction::Backward(bw, grads) => {
                    let block = run.saved.expect("a backward keeps its block");
                    parts.add(self.block_backward(block, &kv, bw, b, ctx, &mut **grads)?)?;
                }
            }
        }
        match dir {
            Direction::Forward { .. } => {
                let is_moe = matches!(self.ffn, FeedForward::Moe(_));
                let saved = if keep {
                    Some(LayerSaved::Sparse(SparseLayerSaved {
                        h: h.clone(),
                        xn: xn.expect("a kept forward keeps the normed input"),
                        kv,
                        kv_saved: kv_saved.expect("a kept forward keeps kv_a's output"),
                        rows_cos,
                        rows_sin,
                        blocks: saved,
                    }))
                } else {
                    None
                };
                Ok(Ran::Forward(BlockPass {
                    out: assemble(outs, b, t)?,
                    head_mean: assemble(probs, b, t)?,
                    chosen: is_moe.then_some(chosen),
                    saved,
                }))
            }
            Direction::Backward(_, grads) => Ok(Ran::Backward(self.finish_sparse_backward(
                &h,
                &xn.expect("a backward keeps the normed input"),
                &kv_saved.expect("a backward keeps kv_a's output"),
                (&rows_cos, &rows_sin),
                parts,
                b,
                t,
                ctx,
                grads,
            )?)),
        }
    }

    /// One block's forward: queries, sparse attention over the sequence's latent `kv`, the
    /// residual, its norm and the feed-forward, for the rows `place` = (first sequence,
    /// sequences, first local row, first position, rows) of `h`; `xn` the whole normed input
    /// when kept (else the block norms its rows, the same bits).
    #[allow(clippy::too_many_arguments)]
    fn block_forward(
        &self,
        h: &Tensor,
        xn: Option<&Tensor>,
        kv: &Tensor,
        ctx: &ForwardContext,
        sel: &Selection,
        place: (usize, usize, usize, usize, usize),
        wants: BlockWants,
    ) -> Result<BlockRun> {
        let (b, t, d) = h.dims3()?;
        let (b0, bn, q0, pos, n) = place;
        let rows_of =
            |x: &Tensor| -> Result<Tensor> { x.narrow(0, b0, bn)?.narrow(1, q0, n)?.contiguous() };
        let hq = rows_of(h)?;
        let xq = match xn {
            Some(xn) => rows_of(xn)?,
            None => rms_norm(self.kernels, &hq, &self.input_norm, self.eps)?,
        };
        let (cos, sin) = ctx.rope_block(b0, bn, pos, n)?;
        let block_sel = if bn == b && n == t {
            sel.clone()
        } else {
            sel.block(b0, q0, n)?
        };
        let region = crate::profile::region("blocks: queries and attention forward");
        let (q_nope, q_pe, q_saved) = self.attn.queries_saved(&xq, &cos, &sin)?;
        let (a, a_saved) = self
            .attn
            .sparse_saved(&q_nope, &q_pe, kv, &block_sel, wants.output)?;
        let h1 = (&hq + &a.out)?;
        let xf = rms_norm(self.kernels, &h1, &self.post_attention_norm, self.eps)?;
        let probs = if wants.output {
            Some(a.probs()?.clone())
        } else {
            None
        };
        drop(region);
        let _region = crate::profile::region(if wants.output {
            "blocks: feed-forward"
        } else {
            "blocks: feed-forward forward and backward"
        });
        let (f, chosen, ffn) = match &self.ffn {
            FeedForward::Dense(mlp) if wants.saved => {
                let saved = mlp.forward_saved(&xf)?;
                let f = if wants.output {
                    Some(saved.output(&mlp.down)?)
                } else {
                    None
                };
                (f, Vec::new(), Some(FfnSaved::Dense(saved)))
            }
            FeedForward::Dense(mlp) => (Some(mlp.forward(&xf)?), Vec::new(), None),
            FeedForward::Moe(moe) if wants.saved => {
                let (f, saved) = moe.forward_saved(
                    &xf.reshape((bn * n, d))?,
                    wants.known.as_deref(),
                    wants.output,
                )?;
                let chosen = if wants.output {
                    saved.chosen().to_vec()
                } else {
                    Vec::new()
                };
                (
                    f.map(|f| f.reshape((bn, n, d))).transpose()?,
                    chosen,
                    Some(FfnSaved::Moe(Box::new(saved))),
                )
            }
            FeedForward::Moe(moe) => {
                let (o, c, _) = moe.forward_flat(&xf.reshape((bn * n, d))?)?;
                (Some(o.reshape((bn, n, d))?), c, None)
            }
        };
        let out = f.map(|f| &h1 + f).transpose()?;
        let saved = ffn.map(|ffn| BlockSaved {
            place: (b0, bn, q0, n),
            xq,
            cos,
            sin,
            sel: block_sel,
            q_saved,
            a_saved,
            h1,
            xf,
            ffn,
        });
        Ok(BlockRun {
            out,
            probs,
            chosen,
            saved,
        })
    }

    /// One block's backward from its saved forward, `kv` the latent rows it attended to.
    /// Backward: out = h1 + ffn(norm(h1)), h1 = h + attention(norm(h)).
    #[allow(clippy::too_many_arguments)]
    fn block_backward(
        &self,
        block: BlockSaved,
        kv: &Tensor,
        bw: &LayerBackward,
        b: usize,
        ctx: &ForwardContext,
        grads: &mut dyn GradSink,
    ) -> Result<BlockGrads> {
        let BlockSaved {
            place: (b0, bn, q0, n),
            xq,
            cos,
            sin,
            sel,
            q_saved,
            a_saved,
            h1,
            xf,
            ffn,
        } = block;
        let dout = bw
            .dout
            .narrow(0, b0, bn)?
            .narrow(1, q0, n)?
            .contiguous()?
            .to_dtype(h1.dtype())?;
        let region = crate::profile::region("blocks: feed-forward backward");
        let dxf = self.feed_forward_backward(&xf, ffn, &dout, bw, (b0, b), ctx, grads)?;
        drop(region);
        let region = crate::profile::region("blocks: attention backward");
        let (dh1_norm, dw) =
            rms_norm_backward(self.kernels, &h1, &self.post_attention_norm, self.eps, &dxf)?;
        add_if_wanted(grads, &self.post_attention_norm, Some(dw))?;
        let dh1 = (dout + dh1_norm)?;
        let g = self.attn.sparse_backward(&a_saved, kv, &sel, &dh1, grads)?;
        drop(region);
        let _region = crate::profile::region("blocks: queries backward");
        let dxq = self
            .attn
            .queries_backward(&xq, &q_saved, &g.q_nope, &g.q_pe, &cos, &sin, grads)?;
        Ok(BlockGrads {
            dh1,
            dxq,
            dkv: g.kv,
        })
    }

    /// The whole-sequence end of the sparse layer's backward: the blocks' kv gradients (summed
    /// in f32) home and through the latent kv projection, joined with the queries' share of
    /// the normed input's gradient, through the input norm; dh = dh1 + that.
    #[allow(clippy::too_many_arguments)]
    fn finish_sparse_backward(
        &self,
        h: &Tensor,
        xn: &Tensor,
        kv_saved: &super::attention::KvSaved,
        rope: (&Tensor, &Tensor),
        parts: BackwardParts,
        b: usize,
        t: usize,
        ctx: &ForwardContext,
        grads: &mut dyn GradSink,
    ) -> Result<Tensor> {
        let _region = crate::profile::region("blocks: latent kv and input norm backward");
        let dkv = parts
            .dkv
            .ok_or_else(|| candle_core::Error::Msg("a layer backward ran no block".into()))?;
        // Every position's kv gradient home to the rank holding its row (summed over the group).
        let dkv = ctx.latent_grads_home(&dkv, b)?;
        let dxn = (assemble(parts.dxq, b, t)?
            + self
                .attn
                .latent_kv_backward(xn, kv_saved, &dkv, rope.0, rope.1, grads)?)?;
        let (dh_norm, dw) = rms_norm_backward(self.kernels, h, &self.input_norm, self.eps, &dxn)?;
        add_if_wanted(grads, &self.input_norm, Some(dw))?;
        assemble(parts.dh1, b, t)? + dh_norm
    }
}

/// The blocks' backward results gathered in block order: dh1 and the queries' dxn per block,
/// and the kv gradient summed over blocks (each block's is every position's).
#[derive(Default)]
struct BackwardParts {
    dh1: Vec<Tensor>,
    dxq: Vec<Tensor>,
    dkv: Option<Tensor>,
}

impl BackwardParts {
    fn add(&mut self, g: BlockGrads) -> Result<()> {
        self.dh1.push(g.dh1);
        self.dxq.push(g.dxq);
        self.dkv = Some(match self.dkv.take() {
            Some(acc) => (acc + g.dkv)?,
            None => g.dkv,
        });
        Ok(())
    }
}

/// What a run of the block body returns.
enum Ran {
    Forward(BlockPass),
    Backward(Tensor),
}

/// The blocks' rows [bn, n, D] (in `sparse_backward`'s order) as one [B, T, D] tensor.
fn assemble(parts: Vec<Tensor>, b: usize, t: usize) -> Result<Tensor> {
    if parts.len() == 1 {
        return Ok(parts.into_iter().next().expect("one part"));
    }
    let per_seq = parts.len() / b;
    let seqs = parts
        .chunks(per_seq)
        .map(|p| Tensor::cat(p, 1))
        .collect::<Result<Vec<_>>>()?;
    let out = Tensor::cat(&seqs, 0)?;
    debug_assert_eq!(out.dims()[..2], [b, t]);
    Ok(out)
}

/// The largest relative error (max |a - b| / max |a|, and the L2 ratio |a - b| / |a|) of
/// `sparse_backward` against candle's autograd of `forward_with` over dh and every parameter
/// gradient, for every layer of `cfg` (random parameters in `dtype`, norms near 1; router
/// f32), B 2, T `t`, top-k `k`, and `rows` per block (0: every sequence at once), with the MoE
/// balance loss. Errors if the two give gradients to different parameters (idle experts must
/// get none) or if a layer's sets have no padding (the check must cover it). Returns (max
/// relative, max L2, gradients compared). For the unit test and gpu-selftest.
pub fn explicit_against_autograd(
    cfg: &super::ModelConfig,
    device: &candle_core::Device,
    dtype: candle_core::DType,
    compute: super::moe::ExpertCompute,
    t: usize,
    k: usize,
    rows: usize,
    seed: u64,
) -> anyhow::Result<TwinReport> {
    explicit_against_autograd_in(
        cfg,
        device,
        dtype,
        compute,
        super::AttentionMode::Sparse,
        t,
        k,
        rows,
        seed,
        false,
    )
}

/// `explicit_against_autograd` in either attention mode: `Dense` holds `dense_backward` against
/// autograd of the dense stage's forward (`rows` and `k` unused, no padded sets).
/// `documents`: under document masking, sequence 0 holding documents of about T/3, 1 and the
/// rest tokens, sequence 1 two halves.
#[allow(clippy::too_many_arguments)]
pub fn explicit_against_autograd_in(
    cfg: &super::ModelConfig,
    device: &candle_core::Device,
    dtype: candle_core::DType,
    compute: super::moe::ExpertCompute,
    mode: super::AttentionMode,
    t: usize,
    k: usize,
    rows: usize,
    seed: u64,
    documents: bool,
) -> anyhow::Result<TwinReport> {
    use super::{AttentionMode, Pass};
    use crate::rng::randn;
    use candle_core::{DType, Device, Var};
    let cpu = Device::Cpu;
    let params: crate::weights::ParamSet = crate::weights::model_weights(cfg, false)
        .into_iter()
        .enumerate()
        .map(|(i, s)| -> anyhow::Result<(String, Tensor)> {
            let v = randn(&s.shape, seed * 1000 + i as u64, 0.2, &cpu)?;
            let v = if s.name.ends_with("norm.weight") {
                (v * 0.5)?.affine(1.0, 1.0)?
            } else {
                v
            };
            let v = v.to_dtype(s.compute_dtype(dtype))?.to_device(device)?;
            Ok((s.name, Var::from_tensor(&v)?.as_tensor().clone()))
        })
        .collect::<anyhow::Result<_>>()?;
    let b = 2;
    let d = cfg.hidden_size;
    let mut ctx = ForwardContext::new(cfg, t, device)?;
    if documents {
        let (a, half) = (t / 3, t / 2);
        let starts: Vec<u32> = (0..t)
            .map(|i| match i {
                i if i < a => 0,
                i if i == a => a,
                _ => a + 1,
            })
            .chain((0..t).map(|i| if i < half { 0 } else { half }))
            .map(|s| s as u32)
            .collect();
        ctx = ctx.with_documents(crate::dsa::KeyStarts::new(starts, b, t, device)?)?;
    }
    let h = randn(&[b, t, d], seed + 11, 1.0, &cpu)?
        .to_dtype(dtype)?
        .to_device(device)?;
    let dout = randn(&[b, t, d], seed + 12, 1.0, &cpu)?
        .to_dtype(dtype)?
        .to_device(device)?;
    let alpha = 0.37;
    let to32 = |x: &Tensor| x.to_dtype(DType::F32)?.to_device(&cpu);
    let mut report = TwinReport::default();
    let mut note = |what: String, a: &Tensor, g: &Tensor| -> anyhow::Result<()> {
        let (a, g) = (to32(a)?, to32(g)?);
        let diff = (&a - &g)?;
        let scale = a.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-30);
        let max = diff.abs()?.max_all()?.to_scalar::<f32>()? / scale;
        if max > report.max_rel {
            (report.max_rel, report.worst) = (max, what);
        }
        let norm = a.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt().max(1e-30);
        report.max_l2 = report
            .max_l2
            .max(diff.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt() / norm);
        report.compared += 1;
        Ok(())
    };
    for l in 0..cfg.num_hidden_layers {
        let mut layer = super::build_layer(cfg, &params, l, None)?;
        if let FeedForward::Moe(m) = &mut layer.ffn {
            m.compute = compute;
        }
        let dense = mode == AttentionMode::Dense;
        // A training forward without the indexer's KL (the layer twins' check).
        let opts = Pass::Train {
            stage: if mode == AttentionMode::Dense {
                crate::recipe::Stage::Dense
            } else {
                crate::recipe::Stage::Sparse
            },
            topk: k,
            kl: crate::model::IndexerKl::Off,
            seq_balance: true,
            block_rows: 0,
            indexer_rows: 0,
            backward: super::BackwardPlan::Autograd,
        };
        let sel = if dense {
            None
        } else {
            let (_, stats) = layer.forward(&h, &ctx, &opts)?;
            let sel = stats
                .selection
                .ok_or_else(|| anyhow::anyhow!("the sparse pass returned no sets"))?;
            if !sel
                .absolute
                .flatten_all()?
                .to_vec1::<u32>()?
                .contains(&u32::MAX)
            {
                anyhow::bail!(
                    "layer {l}: no padded set (k {k} must exceed the first queries' keys)"
                );
            }
            Some(sel)
        };
        // The twin: autograd through the whole-layer forward (with the same sets).
        let hv = Var::from_tensor(&h)?;
        let (out, stats) = layer.forward_with(hv.as_tensor(), &ctx, &opts, sel.as_ref())?;
        let mut loss = (out.to_dtype(DType::F32)? * dout.to_dtype(DType::F32)?)?.sum_all()?;
        if let Some(bal) = &stats.balance_loss {
            loss = (loss + (bal * alpha)?)?;
        }
        let reference = loss.backward()?;
        let f = stats.balance_weights.clone();
        let mut sink = super::grad_sink::GradMap::default();
        // Blocks of one row route again on the host; the others reuse the first pass's choice.
        let chosen = stats.chosen.clone().filter(|_| rows != 1);
        let bw = LayerBackward {
            dout: &dout,
            balance: f.as_deref().map(|f| (f, alpha)),
            chosen: chosen.as_deref(),
        };
        let dh = match &sel {
            Some(sel) => layer.sparse_backward(&h, &ctx, sel, rows, bw, &mut sink)?,
            None => layer.dense_backward(&h, &ctx, bw, &mut sink)?,
        };
        // The same backward from what a keeping first pass saved (`BackwardPlan::Saved`), in
        // blocks of `rows` as the recomputing one.
        let keeping = match opts.clone() {
            Pass::Train {
                stage,
                topk,
                kl,
                seq_balance,
                indexer_rows,
                ..
            } => Pass::Train {
                stage,
                topk,
                kl,
                seq_balance,
                block_rows: rows,
                indexer_rows,
                backward: super::BackwardPlan::Saved,
            },
            eval => eval,
        };
        let (_, kept) = layer.forward_with(&h, &ctx, &keeping, sel.as_ref())?;
        let saved = kept
            .saved
            .ok_or_else(|| anyhow::anyhow!("layer {l}: the keeping pass saved nothing"))?;
        let f_kept = kept.balance_weights;
        let mut kept_sink = super::grad_sink::GradMap::default();
        let bw = LayerBackward {
            dout: &dout,
            balance: f_kept.as_deref().map(|f| (f, alpha)),
            chosen: None,
        };
        let dh_kept = layer.saved_backward(saved, &ctx, bw, &mut kept_sink)?;
        for (how, dh, sink) in [("recomputing", &dh, &sink), ("saved", &dh_kept, &kept_sink)] {
            if dh.track_op() || sink.sums.values().any(|g| g.track_op()) {
                anyhow::bail!("layer {l}: the {how} explicit backward recorded an autograd graph (its results hold one)");
            }
            note(
                format!("layer {l} dh ({how})"),
                reference
                    .get(hv.as_tensor())
                    .ok_or_else(|| anyhow::anyhow!("autograd gave no dh"))?,
                dh,
            )?;
            for (name, param) in &params {
                match (reference.get(param), sink.sums.get(&param.id())) {
                    (Some(a), Some(g)) => note(format!("{name} ({how})"), a, g)?,
                    (None, None) => {}
                    (a, g) => anyhow::bail!(
                        "layer {l}: {name}: autograd {} a gradient, the {how} explicit backward {}",
                        if a.is_some() { "gives" } else { "gives no" },
                        if g.is_some() { "does" } else { "does not" }
                    ),
                }
            }
        }
    }
    Ok(report)
}

/// What `explicit_against_autograd` found: the largest max-relative error and the tensor it
/// was in, the largest relative L2 error, and how many gradients were compared.
#[derive(Debug, Default)]
pub struct TwinReport {
    pub max_rel: f32,
    pub worst: String,
    pub max_l2: f32,
    pub compared: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{IndexerDefaults, ModelConfig};
    use crate::model::moe::ExpertCompute;
    use candle_core::{DType, Device};

    /// A small V3.2 config: layer 0 dense, layer 1 MoE (8 experts in 4 groups, 2 kept, top 2,
    /// a shared expert), with `edit` applied.
    fn config(edit: &[(&str, serde_json::Value)]) -> ModelConfig {
        let mut c = crate::tiny::tiny_config(true);
        let o = c.as_object_mut().unwrap();
        for (k, v) in [
            ("hidden_size", 40),
            ("num_hidden_layers", 2),
            ("intermediate_size", 56),
            ("moe_intermediate_size", 24),
            ("num_attention_heads", 3),
            ("num_key_value_heads", 3),
            ("q_lora_rank", 28),
            ("kv_lora_rank", 20),
            ("qk_nope_head_dim", 12),
            ("qk_rope_head_dim", 8),
            ("v_head_dim", 10),
            ("index_n_heads", 2),
            ("index_head_dim", 16),
            ("index_topk", 5),
            ("vocab_size", 64),
        ] {
            o.insert(k.into(), v.into());
        }
        for (k, v) in edit {
            o.insert(k.to_string(), v.clone());
        }
        ModelConfig::from_json(&c.to_string(), &IndexerDefaults::default()).unwrap()
    }

    /// The dense stage's explicit layer backward against autograd in f32, dense and MoE layers,
    /// with and without document masking.
    #[test]
    fn explicit_dense_layer_backward_matches_autograd() {
        for (compute, documents) in [
            (ExpertCompute::PerExpert, false),
            (ExpertCompute::Grouped, false),
            (ExpertCompute::Grouped, true),
        ] {
            let r = explicit_against_autograd_in(
                &config(&[]),
                &Device::Cpu,
                DType::F32,
                compute,
                crate::model::AttentionMode::Dense,
                9,
                5,
                0,
                4,
                documents,
            )
            .unwrap();
            assert!(
                r.max_rel <= 1e-5,
                "{compute:?}: max relative error {} in {}",
                r.max_rel,
                r.worst
            );
            assert!(
                r.compared >= 40,
                "{compute:?}: only {} gradients compared",
                r.compared
            );
        }
    }

    /// The explicit backward of a dense and a MoE layer (balance loss included) against
    /// candle's autograd in f32: dh and every parameter gradient within 1e-5 relative, the
    /// same parameters getting gradients, at blocks of every sequence at once, of 4 rows (not
    /// dividing T 9) and of 1 row, with the experts one at a time and grouped; top-k 5, so early queries have padded sets. Also MoE without
    /// the weights' normalisation and without a shared expert.
    #[test]
    fn explicit_layer_backward_matches_autograd() {
        let plain = config(&[]);
        let other = config(&[
            ("norm_topk_prob", false.into()),
            ("n_shared_experts", 0.into()),
            ("first_k_dense_replace", 0.into()),
        ]);
        for cfg in [&plain, &other] {
            for compute in [ExpertCompute::PerExpert, ExpertCompute::Grouped] {
                for rows in [0, 4, 1] {
                    let r = explicit_against_autograd(
                        cfg,
                        &Device::Cpu,
                        DType::F32,
                        compute,
                        9,
                        5,
                        rows,
                        3,
                    )
                    .unwrap();
                    assert!(
                        r.max_rel <= 1e-5,
                        "{compute:?}, rows {rows}: max relative error {} in {}",
                        r.max_rel,
                        r.worst
                    );
                    assert!(
                        r.compared >= 40,
                        "{compute:?}, rows {rows}: only {} gradients compared",
                        r.compared
                    );
                }
            }
        }
    }

    /// The sparse stage's explicit backward against autograd under document masking (the
    /// selection and RoPE positions per document), whole and in blocks of 4 rows.
    #[test]
    fn explicit_layer_backward_with_documents_matches_autograd() {
        for rows in [0, 4] {
            let r = explicit_against_autograd_in(
                &config(&[]),
                &Device::Cpu,
                DType::F32,
                ExpertCompute::Grouped,
                crate::model::AttentionMode::Sparse,
                12,
                5,
                rows,
                5,
                true,
            )
            .unwrap();
            assert!(
                r.max_rel <= 1e-5,
                "rows {rows}: max relative error {} in {}",
                r.max_rel,
                r.worst
            );
            assert!(
                r.compared >= 40,
                "rows {rows}: only {} gradients",
                r.compared
            );
        }
    }
}
