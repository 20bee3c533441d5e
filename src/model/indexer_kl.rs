//! The indexer's KL backward of one layer: from what the layer's forward kept (`LayerStats`:
//! the deferred KL's inputs, or a per-query KL with its graph) to the indexer parameters'
//! gradients. The sparse stage's KL over the selected sets (`Indexer::sparse_kl_backward`,
//! queries projected again a block of rows at a time); otherwise (1) the gradients of the KL
//! with respect to the indexer's projections q_I, w, k_I: from the streaming kernel (warm-up on
//! CUDA), block of queries by block (plain warm-up), or the per-query KL's graph; (2)
//! `Indexer::projections_backward` pushes them into the parameters a chunk of tokens at a time.

use candle_core::{DType, Result, Tensor};

use super::grad_sink::GradSink;
use super::indexer::{query_block_rows, Indexer, SparseKl};
use super::{DeferredKl, ForwardContext, LayerStats};

fn missing(what: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "the layer's forward kept no {what} for the indexer's KL"
    ))
}

impl Indexer {
    /// Backpropagate a layer's mean indexer KL (`stats`, from the layer's forward in `ctx`)
    /// times `weight` into `grads`; returns the mean KL as a detached f32 scalar on the device.
    /// Bounded in memory at long lengths: no q_I of every row is formed in the sparse stage, and
    /// the plain warm-up's KL runs a block of queries (about 2^26 score elements) at a time.
    pub fn kl_backward(
        &self,
        stats: &LayerStats,
        ctx: &ForwardContext,
        weight: f64,
        grads: &mut dyn GradSink,
    ) -> Result<Tensor> {
        if let Some(DeferredKl::Sparse {
            keys,
            target,
            sel,
            rows,
            queries,
        }) = &stats.deferred_kl
        {
            // Written out (`Indexer::sparse_kl_backward`; its autograd twin is `backprop_sparse_kl`).
            let (x, qr) = stats
                .indexer_inputs
                .as_ref()
                .ok_or_else(|| missing("indexer inputs"))?;
            let args = SparseKl {
                x,
                qr,
                keys,
                target,
                sel,
                cos: &ctx.cos,
                sin: &ctx.sin,
                rows: *rows,
                weight,
                shard: ctx.shard.as_deref(),
                queries: queries.as_ref().map(|(q, w)| (q, w)),
            };
            let kl = self.sparse_kl_backward(&args, grads)?;
            return kl.to_dtype(DType::F32);
        }
        if let Some(DeferredKl::Rows { kl_sum, dq, dw, dk }) = &stats.deferred_kl {
            // The warm-up under context parallelism: the mean is over every position of the
            // sequences (the group's ranks' terms add up to it); the keys' gradients go home.
            let (x, qr) = stats
                .indexer_inputs
                .as_ref()
                .ok_or_else(|| missing("indexer inputs"))?;
            let (b, _, hi, di) = dq.dims4()?;
            let scale = weight / (b * ctx.t) as f64;
            let dk = ctx.key_grads_home(&(dk * scale)?)?;
            let (cos, sin) = ctx.local_rope()?;
            let rows = query_block_rows(b, ctx.t, hi, di);
            self.projections_backward(
                x,
                qr,
                &cos,
                &sin,
                (&(dq * scale)?, &(dw * scale)?, &dk),
                rows,
                grads,
            )?;
            return (kl_sum / (b * ctx.t) as f64)?.to_dtype(DType::F32);
        }
        let proj = match (
            &stats.indexer_proj,
            stats.deferred_kl.as_ref().and_then(|d| d.proj()),
        ) {
            (_, Some(p)) => p,
            (Some(p), None) => p,
            (None, None) => return Err(missing("indexer projections")),
        };
        let (b, t, hi, di) = proj.q.dims4()?;
        let grad_of = |gs: &candle_core::backprop::GradStore, x: &Tensor| -> Result<Tensor> {
            Ok(match gs.get(x) {
                Some(g) => g.detach(),
                None => x.zeros_like()?,
            })
        };
        let (kl, dq, dw, dk) = if let Some(kl) = &stats.indexer_kl {
            let kl = kl.mean_all()?;
            let gs = (&kl * weight)?.backward()?;
            (
                kl.detach(),
                grad_of(&gs, &proj.q)?,
                grad_of(&gs, &proj.w)?,
                grad_of(&gs, &proj.k)?,
            )
        } else {
            match stats
                .deferred_kl
                .as_ref()
                .ok_or_else(|| missing("indexer KL"))?
            {
                DeferredKl::Streaming { proj, scores } => {
                    // Loss and gradients in one kernel call.
                    let g = weight / (b * t) as f64;
                    let r = crate::kernels::warmup_kl::warmup_kl(
                        &scores.q,
                        &scores.k,
                        &scores.lse,
                        scores.scale,
                        &proj.q,
                        &proj.w,
                        &proj.k,
                        g,
                        scores.starts.as_ref(),
                    )?;
                    ((r.kl.sum_all()? / (b * t) as f64)?, r.dqi, r.dw, r.dki)
                }
                DeferredKl::Sparse { .. } | DeferredKl::Rows { .. } => {
                    candle_core::bail!("a sparse-stage or context-parallel KL is handled above")
                }
                DeferredKl::Plain { proj, target } => {
                    // About 2^26 score elements per block (the [B, n*HI, T] intermediate).
                    let block = ((1usize << 26) / (b * hi * t).max(1)).clamp(1, t);
                    let mut total: Option<Tensor> = None;
                    let (mut dq, mut dw, mut dk) = (
                        proj.q.zeros_like()?,
                        proj.w.zeros_like()?,
                        proj.k.zeros_like()?,
                    );
                    for q0 in (0..t).step_by(block) {
                        let n = block.min(t - q0);
                        let kl_sum = DeferredKl::block(proj, target, ctx, q0, n)?.sum_all()?; // sum over [B, n]
                        let gs = (&kl_sum * (weight / (b * t) as f64))?.backward()?;
                        dq = (dq + grad_of(&gs, &proj.q)?)?;
                        dw = (dw + grad_of(&gs, &proj.w)?)?;
                        dk = (dk + grad_of(&gs, &proj.k)?)?;
                        let kl_sum = kl_sum.detach();
                        total = Some(match total {
                            Some(a) => (a + kl_sum)?,
                            None => kl_sum,
                        });
                    }
                    (
                        (total.ok_or_else(|| missing("query (empty sequence)"))? / (b * t) as f64)?,
                        dq,
                        dw,
                        dk,
                    )
                }
            }
        };
        let (x, qr) = stats
            .indexer_inputs
            .as_ref()
            .ok_or_else(|| missing("indexer inputs"))?;
        // About 2^24 query values (64 MiB in f32) per chunk of tokens.
        let rows = query_block_rows(b, t, hi, di);
        // Written out (`Indexer::projections_backward`; its autograd twin is `backprop_rows`).
        self.projections_backward(x, qr, &ctx.cos, &ctx.sin, (&dq, &dw, &dk), rows, grads)?;
        kl.to_dtype(DType::F32)
    }
}
