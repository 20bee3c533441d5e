//! The decoder layer's training passes without autograd. The sparse stage's layer a block of
//! query rows at a time: its forward without a graph (`DecoderLayer::sparse_blocks`, the
//! recomputing trainer's first pass in block mode) and its backward written out, as llm.c
//! writes a layer's backward (`DecoderLayer::sparse_backward`: no candle autograd graph). The
//! dense stage's layer backward the same way, over the whole sequence
//! (`DecoderLayer::dense_backward`, the attention through `dense_recompute`'s kernels). One block body serves both: the backward recomputes the layer
//! from its input (kept by the trainer's first pass) with the sets (and, in MoE layers, the
//! expert choices) that pass made, and runs each block's backward right after its forward.
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
/// the sparse attention's head-mean probabilities over S_t [B, T, K] (f32), and, for MoE
/// layers, the experts chosen per token [B*T*K] in token order.
pub struct BlockPass {
    pub out: Tensor,
    pub head_mean: Tensor,
    pub chosen: Option<Vec<u32>>,
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
    /// Outputs, probabilities and expert choices (`BlockPass`).
    Forward,
    /// dh, with the parameters' gradients to the sink.
    Backward(LayerBackward<'a>, &'g mut dyn GradSink),
}

impl DecoderLayer {
    /// The sparse-stage layer over blocks of `rows` queries of one sequence at a time (0: every
    /// sequence at once, or each segment of a context-parallel rank's rows), without a graph (the recomputing trainer's first pass; `sparse_backward` is its backward). A
    /// block's working set is that of `rows` tokens, plus the sequence's latent kv.
    pub fn sparse_blocks(
        &self,
        h: &Tensor,
        ctx: &ForwardContext,
        sel: &Selection,
        rows: usize,
    ) -> Result<BlockPass> {
        let (view, _) = self.detached_view()?;
        match view.blocks(h, ctx, sel, rows, Direction::Forward)? {
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
        // The trainer's weights are Vars, through which candle records every op's inputs: the
        // work runs on detached views of them (the same storage), so no graph is kept, and
        // their gradients are handed on under the original tensors.
        let (view, originals) = self.detached_view()?;
        let dout = bw.dout.detach();
        let bw = LayerBackward { dout: &dout, ..bw };
        match view.blocks(
            h,
            ctx,
            sel,
            rows,
            Direction::Backward(
                bw,
                &mut ToOriginals {
                    inner: grads,
                    originals,
                },
            ),
        )? {
            Ran::Backward(dh) => Ok(dh),
            Ran::Forward(_) => unreachable!("a backward run returns dh"),
        }
    }

    /// A copy of the layer whose tensors are detached views of this one's, and the original of
    /// each view.
    fn detached_view(&self) -> Result<(DecoderLayer, Originals)> {
        let mut originals = Originals::default();
        let layer = self.map_tensors(&mut |t: &Tensor| Ok(originals.view(t)))?;
        Ok((layer, originals))
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
        let (view, originals) = self.detached_view()?;
        view.dense_backward_detached(
            h,
            ctx,
            &bw.dout.detach(),
            bw,
            &mut ToOriginals {
                inner: grads,
                originals,
            },
        )
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

    fn dense_backward_detached(
        &self,
        h: &Tensor,
        ctx: &ForwardContext,
        dout: &Tensor,
        bw: LayerBackward,
        grads: &mut dyn GradSink,
    ) -> Result<Tensor> {
        let (b, t, d) = h.dims3()?;
        let h = h.detach();
        let eps = self.eps;
        let _region = crate::profile::region("layer: explicit recompute and backward (dense)");
        let dout = dout.to_dtype(h.dtype())?;
        let DenseAttentionSaved {
            h1,
            xn,
            kv_saved,
            q_saved,
            a_saved,
            cos,
            sin,
        } = self.dense_attention_saved(&h, ctx)?;
        let xf = rms_norm(self.kernels, &h1, &self.post_attention_norm, eps)?;
        let dxf = match &self.ffn {
            FeedForward::Dense(mlp) => {
                let saved = mlp.forward_saved(&xf)?;
                mlp.backward(&xf, &saved, &dout, grads)?
            }
            FeedForward::Moe(moe) => {
                let xf = xf.reshape((b * t, d))?;
                let (_, saved) = moe.forward_saved(&xf, bw.chosen, false)?;
                let f_rows = match bw.balance {
                    Some((f, weight)) => {
                        let e = moe.n_experts;
                        let f = Tensor::from_slice(f, (b, 1, e), h.device())?;
                        Some((f.broadcast_as((b, t, e))?.reshape((b * t, e))?, weight))
                    }
                    None => None,
                };
                // The loss's mean is over the whole sequences' tokens (ctx.t: under context
                // parallelism the group's ranks hold T between them).
                let balance = f_rows.as_ref().map(|(f, weight)| (f, b, ctx.t, *weight));
                moe.backward(&xf, &saved, &dout.reshape((b * t, d))?, balance, grads)?
                    .reshape((b, t, d))?
            }
        };
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
        let (b, t, d) = h.dims3()?;
        let h = h.detach();
        let eps = self.eps;
        let forward = matches!(dir, Direction::Forward);
        let _region = crate::profile::region(if forward {
            "layer: forward in blocks"
        } else {
            "layer: explicit recompute and backward"
        });
        // Whole-sequence parts: the input norm and the latent kv every block reads.
        // (The forward keeps neither the normed input nor kv_a's output: each block norms its
        // own rows again, the same bits, and the whole-sequence copies are freed at once.)
        // Under context parallelism h holds this rank's query rows; their kv rows are
        // gathered into every position's (`ForwardContext::gather_keys`).
        let region = crate::profile::region("blocks: input norm and latent kv");
        let (rows_cos, rows_sin) = ctx.local_rope()?; // the rank's rows' RoPE tables
        let (xn, kv, kv_saved) = {
            let xn = rms_norm(self.kernels, &h, &self.input_norm, eps)?;
            if forward {
                let (c_norm, k_pe) = self.attn.project_kv(&xn, &rows_cos, &rows_sin)?;
                (None, self.attn.latent_kv(&c_norm, &k_pe)?, None)
            } else {
                let (kv, saved) = self.attn.latent_kv_saved(&xn, &rows_cos, &rows_sin)?;
                (Some(xn), kv, Some(saved))
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
        let mut dkv: Option<Tensor> = None;
        // Backward: dh's residual part and the input norm's output gradient; forward: outputs,
        // probabilities, expert choices.
        let (mut first, mut second, mut chosen) = (
            Vec::with_capacity(blocks.len()),
            Vec::with_capacity(blocks.len()),
            Vec::new(),
        );
        for &(b0, bn, q0, pos, n) in &blocks {
            let rows_of = |x: &Tensor| -> Result<Tensor> {
                x.narrow(0, b0, bn)?.narrow(1, q0, n)?.contiguous()
            };
            let hq = rows_of(&h)?;
            let xq = match &xn {
                Some(xn) => rows_of(xn)?,
                None => rms_norm(self.kernels, &hq, &self.input_norm, eps)?,
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
                .sparse_saved(&q_nope, &q_pe, &kv, &block_sel, forward)?;
            let h1 = (&hq + &a.out)?;
            let xf = rms_norm(self.kernels, &h1, &self.post_attention_norm, eps)?;
            drop(region);
            let (bw, grads) = match &mut dir {
                Direction::Forward => {
                    let _region = crate::profile::region("blocks: feed-forward");
                    let f = match &self.ffn {
                        FeedForward::Dense(mlp) => mlp.forward(&xf)?,
                        FeedForward::Moe(moe) => {
                            let (o, c, _) = moe.forward_flat(&xf.reshape((bn * n, d))?)?;
                            chosen.extend(c);
                            o.reshape((bn, n, d))?
                        }
                    };
                    first.push((h1 + f)?);
                    second.push(a.probs()?.clone());
                    continue;
                }
                Direction::Backward(bw, grads) => (&*bw, &mut **grads),
            };
            let dout = rows_of(bw.dout)?.to_dtype(h.dtype())?;
            let region = crate::profile::region("blocks: feed-forward forward and backward");
            // Backward: out = h1 + ffn(norm(h1)), h1 = h + attention(norm(h)).
            let dxf = match &self.ffn {
                FeedForward::Dense(mlp) => {
                    let saved = mlp.forward_saved(&xf)?;
                    mlp.backward(&xf, &saved, &dout, grads)?
                }
                FeedForward::Moe(moe) => {
                    let xf = xf.reshape((bn * n, d))?;
                    let k = moe.top_k;
                    let known: Option<Vec<u32>> = bw.chosen.map(|c| {
                        (b0..b0 + bn)
                            .flat_map(|bi| {
                                c[(bi * t + q0) * k..(bi * t + q0 + n) * k].iter().copied()
                            })
                            .collect()
                    });
                    let (_, saved) = moe.forward_saved(&xf, known.as_deref(), false)?;
                    let f_rows = match bw.balance {
                        Some((f, weight)) => {
                            let e = moe.n_experts;
                            let f = Tensor::from_slice(
                                &f[b0 * e..(b0 + bn) * e],
                                (bn, 1, e),
                                h.device(),
                            )?;
                            Some((f.broadcast_as((bn, n, e))?.reshape((bn * n, e))?, weight))
                        }
                        None => None,
                    };
                    // The balance loss is a mean over every token of the sequences (ctx.t each).
                    let balance = f_rows.as_ref().map(|(f, weight)| (f, b, ctx.t, *weight));
                    moe.backward(&xf, &saved, &dout.reshape((bn * n, d))?, balance, grads)?
                        .reshape((bn, n, d))?
                }
            };
            drop(region);
            let region = crate::profile::region("blocks: attention backward");
            let (dh1_norm, dw) =
                rms_norm_backward(self.kernels, &h1, &self.post_attention_norm, eps, &dxf)?;
            add_if_wanted(grads, &self.post_attention_norm, Some(dw))?;
            let dh1 = (dout + dh1_norm)?;
            let g = self
                .attn
                .sparse_backward(&a_saved, &kv, &block_sel, &dh1, grads)?;
            dkv = Some(match dkv.take() {
                Some(acc) => (acc + g.kv)?,
                None => g.kv,
            });
            drop(region);
            let _region = crate::profile::region("blocks: queries backward");
            second.push(
                self.attn
                    .queries_backward(&xq, &q_saved, &g.q_nope, &g.q_pe, &cos, &sin, grads)?,
            );
            first.push(dh1);
        }
        let Direction::Backward(_, grads) = dir else {
            let is_moe = matches!(self.ffn, FeedForward::Moe(_));
            return Ok(Ran::Forward(BlockPass {
                out: assemble(first, b, t)?,
                head_mean: assemble(second, b, t)?,
                chosen: is_moe.then_some(chosen),
            }));
        };
        let _region = crate::profile::region("blocks: latent kv and input norm backward");
        let dkv = dkv.expect("at least one block");
        // Every position's kv gradient home to the rank holding its row (summed over the group).
        let dkv = ctx.latent_grads_home(&dkv, b)?;
        let (xn, kv_saved) = (
            xn.expect("a backward keeps the normed input"),
            kv_saved.expect("a backward keeps kv_a's output"),
        );
        let dxn = (assemble(second, b, t)?
            + self
                .attn
                .latent_kv_backward(&xn, &kv_saved, &dkv, &rows_cos, &rows_sin, grads)?)?;
        let (dh_norm, dw) = rms_norm_backward(self.kernels, &h, &self.input_norm, eps, &dxn)?;
        add_if_wanted(grads, &self.input_norm, Some(dw))?;
        Ok(Ran::Backward((assemble(first, b, t)? + dh_norm)?))
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
        if dh.track_op() || sink.sums.values().any(|g| g.track_op()) {
            anyhow::bail!("layer {l}: the explicit backward recorded an autograd graph (its results hold one)");
        }
        note(
            format!("layer {l} dh"),
            reference
                .get(hv.as_tensor())
                .ok_or_else(|| anyhow::anyhow!("autograd gave no dh"))?,
            &dh,
        )?;
        for (name, param) in &params {
            match (reference.get(param), sink.sums.get(&param.id())) {
                (Some(a), Some(g)) => note(name.clone(), a, g)?,
                (None, None) => {}
                (a, g) => anyhow::bail!(
                    "layer {l}: {name}: autograd {} a gradient, the explicit backward {}",
                    if a.is_some() { "gives" } else { "gives no" },
                    if g.is_some() { "does" } else { "does not" }
                ),
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
