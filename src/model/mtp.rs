//! DeepSeek-V3's multi-token prediction module (section 2.2, eq. 21-25): position i takes the
//! main model's output h_i after the final RMSNorm and the embedding of token i + 1 + depth:
//!   x = eh_proj([enorm(emb(t_{i+1+depth})); hnorm(norm(h_i))])   [B, n, D], n = T - 1 - depth
//!   y = a decoder layer (with its own indexer) on x; logits = lm_head(shared_head.norm(y)),
//! predicting token i + 2 + depth. The embedding and output head are the main model's (one
//! parameter each; docs/design.md cites the references).
//!
//! Two forms: `Model::mtp_logits` with candle's autograd (the reference twin, and the path of
//! runs without recomputation), and the explicit one the recomputing trainer runs: the input
//! projection without a graph (`Model::mtp_input`) and its backward written out
//! (`Model::mtp_input_backward`); the layer between them runs the main layers' block passes and
//! the logits `losses::chunked_next_token_loss`, so the module holds no whole-sequence graph.
//!
//! Numerics: each op's backward states its own (`ops::rms_norm_backward`, `ops::linear_backward`);
//! gradients reach the parameters in the model dtype, as the main layers' do.

use candle_core::{Result, Tensor};

use super::grad_sink::{add_if_wanted, GradSink};
use super::{embed_with, DecoderLayer, ForwardContext, LayerStats, Model, Pass};
use crate::ops::{linear, linear_backward, rms_norm, rms_norm_backward};

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

/// What the MTP module's input projection hands its decoder layer and keeps for its backward
/// (`Model::mtp_input`): the layer's input; the backward rebuilds the rest from the main
/// output and the tokens (two gathers and three norms), so only one hidden-sized tensor per
/// token waits.
pub struct MtpInput {
    /// The decoder layer's input [B, n, D] (no graph).
    pub x: Tensor,
    /// The tokens whose embeddings were read [B, n] (t_{i+1+depth}), for the embedding's
    /// gradient.
    pub tokens: Tensor,
}

/// The input projection's intermediate values.
struct MtpParts {
    /// Embeddings of the next tokens [B, n, D].
    emb: Tensor,
    /// The main output after the final norm [B, n, D].
    normed: Tensor,
    /// [enorm(emb); hnorm(normed)] [B, n, 2D].
    cat: Tensor,
}

impl Model {
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
        opts: &Pass,
    ) -> Result<(Tensor, LayerStats)> {
        let ctx = ForwardContext::new(&self.cfg, tokens.dim(1)?, &self.device)?;
        self.mtp_logits_in(depth, hidden, tokens, &ctx, opts)
    }

    /// `mtp_logits` in the main forward's context `ctx` (of the T positions of `tokens`; the
    /// module runs on its first T - 1 - depth, under the same document masking).
    pub fn mtp_logits_in(
        &self,
        depth: usize,
        hidden: &Tensor,
        tokens: &Tensor,
        ctx: &ForwardContext,
        opts: &Pass,
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
        let (y, stats) = self.mtp_layer(depth)?.forward(&x, &ctx.prefix(n)?, opts)?;
        Ok((
            linear(
                &rms_norm(self.kernels, &y, &m.head_norm, eps)?,
                &self.lm_head,
            )?,
            stats,
        ))
    }

    /// The MTP module's input without a graph (`hidden` [B, T, D], the last main layer's
    /// output; `next` [B, n], the token 1 + depth positions after each of hidden's first n
    /// rows: `tokens` from 1 + depth for a whole sequence, or a context-parallel rank's rows'
    /// `QueryRows::shifted`): what `mtp_logits` feeds its decoder layer, and what
    /// `mtp_input_backward` reads.
    pub fn mtp_input(&self, depth: usize, hidden: &Tensor, next: &Tensor) -> Result<MtpInput> {
        let next = next.clone();
        let parts = self.mtp_parts(depth, hidden, &next)?;
        Ok(MtpInput {
            x: linear(&parts.cat, &self.mtp[depth].eh_proj.detach())?,
            tokens: next,
        })
    }

    /// The values between the main output and eh_proj for the n tokens `next` [B, n].
    fn mtp_parts(&self, depth: usize, hidden: &Tensor, next: &Tensor) -> Result<MtpParts> {
        let m = &self.mtp[depth];
        let n = next.dim(1)?;
        let eps = self.cfg.rms_norm_eps;
        let emb = embed_with(self.kernels, &self.embed.detach(), next)?;
        let normed = rms_norm(
            self.kernels,
            &hidden.narrow(1, 0, n)?.detach(),
            &self.norm.detach(),
            eps,
        )?;
        let cat = Tensor::cat(
            &[
                &rms_norm(self.kernels, &emb, &m.enorm.detach(), eps)?,
                &rms_norm(self.kernels, &normed, &m.hnorm.detach(), eps)?,
            ],
            2,
        )?;
        Ok(MtpParts { emb, normed, cat })
    }

    /// The backward of `mtp_input`: dx [B, n, D] (the decoder layer's input gradient) ->
    /// (d(hidden) [B, T, D], zero past row n; d(embedding rows) [B, n, D] for `saved.tokens`).
    /// eh_proj's, enorm's, hnorm's and the final norm's gradients go to `grads`.
    pub fn mtp_input_backward(
        &self,
        depth: usize,
        saved: &MtpInput,
        hidden: &Tensor,
        dx: &Tensor,
        grads: &mut dyn GradSink,
    ) -> Result<(Tensor, Tensor)> {
        let m = &self.mtp[depth];
        let (eps, k) = (self.cfg.rms_norm_eps, self.kernels);
        let (b, t, d) = hidden.dims3()?;
        let n = saved.x.dim(1)?;
        let saved = self.mtp_parts(depth, hidden, &saved.tokens)?;
        let (dcat, d_eh) = linear_backward(&saved.cat, &m.eh_proj, dx, grads.wants(&m.eh_proj))?;
        add_if_wanted(grads, &m.eh_proj, d_eh)?;
        let (d_emb, d_enorm) =
            rms_norm_backward(k, &saved.emb, &m.enorm, eps, &dcat.narrow(2, 0, d)?)?;
        grads_add(grads, &m.enorm, d_enorm)?;
        let (d_normed, d_hnorm) =
            rms_norm_backward(k, &saved.normed, &m.hnorm, eps, &dcat.narrow(2, d, d)?)?;
        grads_add(grads, &m.hnorm, d_hnorm)?;
        let (d_h, d_norm) =
            rms_norm_backward(k, &hidden.narrow(1, 0, n)?, &self.norm, eps, &d_normed)?;
        grads_add(grads, &self.norm, d_norm)?;
        let d_hidden = if n < t {
            Tensor::cat(
                &[
                    &d_h,
                    &Tensor::zeros((b, t - n, d), d_h.dtype(), d_h.device())?,
                ],
                1,
            )?
        } else {
            d_h
        };
        Ok((d_hidden, d_emb))
    }
}

/// `grads[param] += grad` when `param` learns.
fn grads_add(grads: &mut dyn GradSink, param: &Tensor, grad: Tensor) -> Result<()> {
    add_if_wanted(grads, param, Some(grad))
}
