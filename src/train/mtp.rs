//! The MTP module's share of a micro-batch, written out as the main layers' is: the input
//! projection and the decoder layer's first pass without a graph (block mode in the sparse
//! stage), the indexer's KL backward, the loss through the shared output head in chunks of
//! positions, the layer's explicit backward (recomputed from its input with the first pass's
//! sets and experts, or from what its first pass kept, as the step's `BackwardPlan` says) and
//! the input projection's. No whole-sequence activation of the module outlives its own step,
//! as for a main layer. The autograd twin (`Model::mtp_logits`) runs in the autograd step;
//! tests/parity.rs holds both against torch autograd.

use std::collections::HashMap;

use anyhow::{Context, Result};
use candle_core::{Tensor, TensorId};

use super::optim::GradAccum;
use super::{AccumSink, Trainer};
use crate::model::blocks::LayerBackward;
use crate::model::{ForwardContext, Pass};

/// How MTP module `depth` takes part in a micro-batch.
pub(super) struct MtpTerms {
    /// The weight of its indexer's KL (micro-batch scale times kl_weight); None: no KL.
    pub kl: Option<f64>,
    /// The weight of its LM loss (micro-batch scale times mtp_weight); None: only its indexer
    /// learns.
    pub lm: Option<f64>,
}

impl Trainer {
    /// MTP module `depth` on the main model's output `hidden` [B, T, D] (detached) of `tokens`
    /// [B, T]: its gradients into `accum`; returns d(loss)/d(hidden) [B, T, D] when its LM loss
    /// trains the model (None when only its indexer learns).
    pub(super) fn mtp_explicit(
        &self,
        depth: usize,
        hidden: &Tensor,
        tokens: &Tensor,
        ctx: &ForwardContext,
        terms: MtpTerms,
        pass: &Pass,
        accum: &mut GradAccum,
        trainable: &HashMap<TensorId, &str>,
    ) -> Result<Option<Tensor>> {
        let model = &self.model;
        let module = &model.mtp[depth];
        let layer = model.mtp_layer(depth).context("MTP layer")?;
        // The module's sequence: positions 0..n, each reading the token 1 + depth after it
        // (this rank's rows of them under context parallelism).
        let (b, t) = tokens.dims2()?;
        let n = t - 1 - depth;
        let ctx = ctx.prefix(n)?;
        let rows = ctx.query_rows();
        let input = model
            .mtp_input(depth, hidden, &rows.shifted(tokens, 1 + depth)?)
            .context("MTP input")?;
        // Only its indexer learns: nothing of the layer's forward is kept for a backward.
        let kl_only;
        let pass = if terms.lm.is_none() {
            kl_only = pass
                .clone()
                .with_backward(crate::model::BackwardPlan::Recompute);
            &kl_only
        } else {
            pass
        };
        let (y, mut stats) = layer
            .forward(&input.x, &ctx, pass)
            .context("MTP layer forward")?;
        // Under ZeRO-3 the layer's tensors are gathered copies, known under the model's names.
        let trainable = &super::with_gathered(trainable, &layer);
        if let Some(weight) = terms.kl {
            self.backprop_indexer_kl(&stats, &ctx, weight, accum, trainable, &layer.indexer)
                .context("MTP indexer KL backward")?;
        }
        let Some(lm_weight) = terms.lm else {
            return Ok(None);
        };
        let sel = stats.selection.take();
        let chosen = stats.chosen.take();
        // `BackwardPlan::Saved`: what the layer's forward kept (else it is recomputed below).
        let saved = stats.saved.take();
        drop(stats);
        // Position i predicts token i + 2 + depth; the mean is over the n - 1 positions that
        // have one.
        let next = crate::losses::NextTokens {
            targets: rows.shifted(tokens, 2 + depth)?,
            count: b * (n - 1),
        };
        let (_, dy) = self
            .head_loss(&y, &next, &module.head_norm, lm_weight, accum)
            .context("MTP head and loss")?;
        drop(y);
        // No balance loss: it is taken over the main model's MoE layers only.
        let bw = LayerBackward {
            dout: &dy,
            balance: None,
            chosen: chosen.as_deref(),
        };
        let mut sink = AccumSink { trainable, accum };
        let dx = match saved {
            Some(saved) => layer
                .saved_backward(saved, &ctx, bw, &mut sink)
                .context("MTP layer backward")?,
            None => layer
                .recomputed_backward(&input.x, &ctx, sel.as_ref(), pass, bw, &mut sink)
                .context("MTP layer recompute and backward")?,
        };
        let (d_hidden, d_emb) = model
            .mtp_input_backward(depth, &input, hidden, &dx, &mut sink)
            .context("MTP input backward")?;
        self.add_embedding_grad(accum, &input.tokens, &d_emb)?;
        Ok(Some(d_hidden))
    }
}
