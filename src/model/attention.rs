//! Multi-head latent attention (MLA) of DeepSeek-V3, in its two equivalent forms.
//!
//! Shape letters: B batch, T tokens, H heads, N = qk_nope_head_dim, R = qk_rope_head_dim,
//! V = v_head_dim, C = kv_lora_rank, K = selected keys per query.
//!
//! - `dense`: "MHA mode". Keys and values are expanded per head through kv_b_proj; scores
//!   [B, H, T, T] over every causal key. Used for the frozen model in the warm-up stage.
//!   `dense_blocks` is the same attention a block of query rows at a time (evaluation).
//! - `sparse`: "MQA (absorbed) mode" over each query's selected set. W_UK (the k_nope rows of
//!   kv_b_proj) is folded into the query, so every head reads ONE shared key per token,
//!   `[kv_a_norm(c), k_pe]` (C + R dims); values are the C-dim latent and W_UV (the v rows) is
//!   applied after the weighted sum. Same function, reorganised: with K >= T it equals `dense`.
//!
//! Softmax runs in f32 with the scale qk_head_dim^-1/2 * mscale^2.

use candle_core::{DType, Result, Tensor, D};

use super::grad_sink::{add_if_wanted, GradSink};
use crate::dsa::Selection;
use crate::kernels::join_rows::join_rows;
use crate::kernels::KernelPolicy;
use crate::ops::{
    linear, linear_backward, rms_norm, rms_norm_backward, rope_interleaved,
    rope_interleaved_backward, softmax_last,
};

pub struct Mla {
    pub q_a_proj: Tensor,
    pub q_a_norm: Tensor,
    pub q_b_proj: Tensor,
    pub kv_a_proj: Tensor,
    pub kv_a_norm: Tensor,
    pub kv_b_proj: Tensor,
    pub o_proj: Tensor,
    pub heads: usize,
    pub nope: usize,
    pub rope: usize,
    pub v_dim: usize,
    pub kv_lora: usize,
    pub scale: f64,
    /// Which kernels its ops run.
    pub kernels: KernelPolicy,
}

/// Epsilon of the q_a and kv_a LoRA norms. DeepSeek's reference code and transformers build
/// these two norms with their default 1e-6 whatever config.json's rms_norm_eps says.
pub const LORA_NORM_EPS: f64 = 1e-6;

/// What both attention forms (and the indexer) read from one layer input.
pub struct Projected {
    /// q LoRA output after its RMSNorm [B, T, q_lora]; the indexer reads it too.
    pub qr: Tensor,
    /// [B, T, H, N]
    pub q_nope: Tensor,
    /// RoPE'd [B, T, H, R]
    pub q_pe: Tensor,
    /// kv_a_norm(c) [B, T, C]
    pub c_norm: Tensor,
    /// RoPE'd shared rope key [B, T, 1, R]
    pub k_pe: Tensor,
}

/// Attention output and the head-mean probabilities the indexer loss needs.
pub struct AttentionOut {
    /// [B, T, hidden]
    pub out: Tensor,
    /// Head-mean probabilities, f32, detached: [B, T, T] (dense) or [B, T, K] over S_t (sparse);
    /// None where the caller did not ask for them (the sparse stage's recomputing pass).
    pub head_mean_probs: Option<Tensor>,
}

impl AttentionOut {
    /// The head-mean probabilities, or an error naming the caller's mistake (not asked for).
    pub fn probs(&self) -> Result<&Tensor> {
        self.head_mean_probs.as_ref().ok_or_else(|| {
            candle_core::Error::Msg("attention: head-mean probabilities were not asked for".into())
        })
    }
}

/// The dense attention's per-head queries and keys [B, H, T, N+R] (bf16, detached) and the
/// LSE of each head's scaled scores [B, H, T] f32: enough to recompute any probability tile.
pub struct DenseScores {
    pub q: Tensor,
    pub k: Tensor,
    pub lse: Tensor,
    pub scale: f64,
    /// Document masking: each query's first key, u32 [B, T] (None: causal).
    pub starts: Option<Tensor>,
}

/// What the query path (`Mla::queries_saved`) keeps for its backward: the q LoRA output before
/// its norm (qa) and after it (qr) [B, T, q_lora].
pub struct QuerySaved {
    qa: Tensor,
    qr: Tensor,
}

/// What `Mla::latent_kv_saved` keeps for its backward: kv_a_proj's output [B, T, C+R].
pub struct KvSaved {
    ckv: Tensor,
}

/// What the absorbed attention (`Mla::sparse_saved`) keeps for its backward.
pub struct SparseSaved {
    /// q_nope per head [H, BT, N].
    q_nope: Tensor,
    /// The absorbed queries [BT, H, C+R].
    q: Tensor,
    /// The latent output per head [H, BT, C].
    o_lat: Tensor,
    /// The kernels' combined result [BT, H, C+1] f32 (output and LSE); None on the plain path.
    fwd: Option<Tensor>,
    /// The per-head values, o_proj's input [B, T, H*V].
    o: Tensor,
}

/// What the dense stage's attention (`Mla::dense_saved`) keeps for its backward: the latent
/// values' input c_norm [B, T, C], the per-head q, k, v, the output o [B, H, T, V] and its LSE
/// [B, H, T] (f32), o_proj's input [B, T, H*V], and the plain path's query rows per block.
pub struct DenseSaved {
    c_norm: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    o_flat: Tensor,
    rows: usize,
    /// Document masking: each query's first key, u32 [B, T].
    starts: Option<Tensor>,
    /// Context parallelism: the query rows' blocks and positions (the keys are every
    /// position's); None: queries and keys are the same positions.
    blocks: Option<Vec<crate::dist::context::RowBlock>>,
}

/// The absorbed attention's gradients with respect to its inputs.
pub struct SparseGrads {
    /// Of q_nope, head-major [H, B*T, N] (as the per-head products make it).
    pub q_nope: Tensor,
    /// Of the RoPE'd q_pe, [B*T, H, R].
    pub q_pe: Tensor,
    /// [B*T', C+R] of the latent rows `kv` (every row, zero where no query selected it), f32.
    pub kv: Tensor,
}

impl Mla {
    pub fn project(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Projected> {
        let qr = self.project_qr(x)?;
        let (q_nope, q_pe) = self.project_queries(&qr, cos, sin)?;
        let (c_norm, k_pe) = self.project_kv(x, cos, sin)?;
        Ok(Projected {
            qr,
            q_nope,
            q_pe,
            c_norm,
            k_pe,
        })
    }

    /// The q LoRA output after its RMSNorm [B, T, q_lora] (the indexer reads it too).
    pub fn project_qr(&self, x: &Tensor) -> Result<Tensor> {
        rms_norm(
            self.kernels,
            &linear(x, &self.q_a_proj)?,
            &self.q_a_norm,
            LORA_NORM_EPS,
        )
    }

    /// Per-head queries from `qr` [B, T, q_lora]: q_nope [B, T, H, N] and RoPE'd q_pe
    /// [B, T, H, R] (`cos`/`sin` the rows of these T positions).
    pub fn project_queries(
        &self,
        qr: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (b, t, _) = qr.dims3()?;
        let (h, n, r) = (self.heads, self.nope, self.rope);
        let q = linear(qr, &self.q_b_proj)?.reshape((b, t, h, n + r))?; // [B, T, H, N+R]
        let q_nope = q.narrow(3, 0, n)?;
        let q_pe = rope_interleaved(self.kernels, &q.narrow(3, n, r)?.contiguous()?, cos, sin)?;
        Ok((q_nope, q_pe))
    }

    /// The shared latent key/value: kv_a_norm(c) [B, T, C] and the RoPE'd k_pe [B, T, 1, R].
    pub fn project_kv(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<(Tensor, Tensor)> {
        self.kv_from_ckv(&linear(x, &self.kv_a_proj)?, cos, sin)
    }

    /// kv_a_proj's output ckv [B, T, C+R] -> (kv_a_norm(c) [B, T, C], RoPE'd k_pe [B, T, 1, R]).
    fn kv_from_ckv(&self, ckv: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, t, _) = ckv.dims3()?;
        let r = self.rope;
        let c_norm = rms_norm(
            self.kernels,
            &ckv.narrow(2, 0, self.kv_lora)?,
            &self.kv_a_norm,
            LORA_NORM_EPS,
        )?;
        let k_pe = ckv.narrow(2, self.kv_lora, r)?.reshape((b, t, 1, r))?;
        let k_pe = rope_interleaved(self.kernels, &k_pe, cos, sin)?;
        Ok((c_norm, k_pe))
    }

    /// `latent_kv(project_kv(x))` keeping what `latent_kv_backward` reads: x [B, T, hidden]
    /// (the input norm's output) -> kv [B*T, C+R].
    pub fn latent_kv_saved(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<(Tensor, KvSaved)> {
        let ckv = linear(x, &self.kv_a_proj)?;
        let (c_norm, k_pe) = self.kv_from_ckv(&ckv, cos, sin)?;
        Ok((self.latent_kv(&c_norm, &k_pe)?, KvSaved { ckv }))
    }

    /// The backward of `latent_kv_saved`: dkv [B*T, C+R] -> dx [B, T, hidden]; kv_a_proj's
    /// and kv_a_norm's gradients to `grads`. dkv is rounded to the model dtype first.
    pub fn latent_kv_backward(
        &self,
        x: &Tensor,
        saved: &KvSaved,
        dkv: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        grads: &mut dyn GradSink,
    ) -> Result<Tensor> {
        let (b, t, _) = saved.ckv.dims3()?;
        let (c, r) = (self.kv_lora, self.rope);
        let dkv = dkv.to_dtype(saved.ckv.dtype())?;
        let dc_norm = dkv.narrow(1, 0, c)?.reshape((b, t, c))?;
        let dk_pe = rope_interleaved_backward(
            self.kernels,
            &dkv.narrow(1, c, r)?.reshape((b, t, 1, r))?.contiguous()?,
            cos,
            sin,
        )?
        .reshape((b, t, r))?;
        let (dc, dnorm) = rms_norm_backward(
            self.kernels,
            &saved.ckv.narrow(2, 0, c)?,
            &self.kv_a_norm,
            LORA_NORM_EPS,
            &dc_norm,
        )?;
        add_if_wanted(grads, &self.kv_a_norm, Some(dnorm))?;
        let dckv = Tensor::cat(&[&dc, &dk_pe], 2)?;
        let (dx, dw) = linear_backward(x, &self.kv_a_proj, &dckv, grads.wants(&self.kv_a_proj))?;
        add_if_wanted(grads, &self.kv_a_proj, dw)?;
        Ok(dx)
    }

    /// The query path keeping what `queries_backward` reads: x [B, T, hidden] (the input norm's
    /// output) -> (q_nope [B, T, H, N], RoPE'd q_pe [B, T, H, R]).
    pub fn queries_saved(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<(Tensor, Tensor, QuerySaved)> {
        let qa = linear(x, &self.q_a_proj)?;
        let qr = rms_norm(self.kernels, &qa, &self.q_a_norm, LORA_NORM_EPS)?;
        let (q_nope, q_pe) = self.project_queries(&qr, cos, sin)?;
        Ok((q_nope, q_pe, QuerySaved { qa, qr }))
    }

    /// The backward of `queries_saved`: the gradients of q_nope (head-major [H, B*T, N]) and of
    /// q_pe ([B*T, H, R], as `SparseGrads` holds them) -> dx [B, T, hidden]; q_a_proj's,
    /// q_a_norm's and q_b_proj's gradients to `grads`.
    pub fn queries_backward(
        &self,
        x: &Tensor,
        saved: &QuerySaved,
        dq_nope: &Tensor,
        dq_pe: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        grads: &mut dyn GradSink,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (h, r) = (self.heads, self.rope);
        let dq_pe =
            rope_interleaved_backward(self.kernels, &dq_pe.reshape((b, t, h, r))?, cos, sin)?
                .reshape((b * t, h, r))?;
        // [B*T, H, N+R]: the head-major dq_nope back to token-major, joined with dq_pe.
        let dq = join_rows(
            self.kernels,
            &dq_nope.transpose(0, 1)?,
            Some(&dq_pe),
            1,
            x.dtype(),
        )?
        .reshape((b, t, h * (self.nope + r)))?;
        let (dqr, dw) =
            linear_backward(&saved.qr, &self.q_b_proj, &dq, grads.wants(&self.q_b_proj))?;
        add_if_wanted(grads, &self.q_b_proj, dw)?;
        let (dqa, dnorm) =
            rms_norm_backward(self.kernels, &saved.qa, &self.q_a_norm, LORA_NORM_EPS, &dqr)?;
        add_if_wanted(grads, &self.q_a_norm, Some(dnorm))?;
        let (dx, dw) = linear_backward(x, &self.q_a_proj, &dqa, grads.wants(&self.q_a_proj))?;
        add_if_wanted(grads, &self.q_a_proj, dw)?;
        Ok(dx)
    }

    /// One shared key/value row per token, [B*T, C+R]: what every head of the absorbed form reads.
    pub fn latent_kv(&self, c_norm: &Tensor, k_pe: &Tensor) -> Result<Tensor> {
        let (b, t, c) = c_norm.dims3()?;
        Tensor::cat(&[c_norm, &k_pe.squeeze(2)?], 2)?.reshape((b * t, c + self.rope))
    }

    /// MHA-mode per-head queries and keys [B, H, T, N+R] and values [B, H, T, V].
    fn mha_qkv(&self, p: &Projected) -> Result<(Tensor, Tensor, Tensor)> {
        let (k, v) = self.mha_kv(&p.c_norm, &p.k_pe)?;
        Ok((self.mha_q(p)?, k, v))
    }

    /// MHA-mode per-head queries [B, H, n, N+R] of the projected rows.
    fn mha_q(&self, p: &Projected) -> Result<Tensor> {
        Tensor::cat(&[&p.q_nope, &p.q_pe], 3)?
            .transpose(1, 2)?
            .contiguous()
    }

    /// MHA-mode keys [B, H, T, N+R] and values [B, H, T, V] from the latent rows: c_norm [B, T,
    /// C] up-projected per head, k_pe [B, T, 1, R] shared by the heads.
    fn mha_kv(&self, c_norm: &Tensor, k_pe: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, t, _) = c_norm.dims3()?;
        let h = self.heads;
        let kv = linear(c_norm, &self.kv_b_proj)?.reshape((b, t, h, self.nope + self.v_dim))?;
        let k_nope = kv.narrow(3, 0, self.nope)?;
        let v = kv
            .narrow(3, self.nope, self.v_dim)?
            .transpose(1, 2)?
            .contiguous()?; // [B, H, T, V]
        let k_pe = k_pe.broadcast_as((b, t, h, self.rope))?;
        let k = Tensor::cat(&[&k_nope, &k_pe], 3)?
            .transpose(1, 2)?
            .contiguous()?; // [B, H, T, N+R]
        Ok((k, v))
    }

    /// Dense MLA in MHA mode for some query rows against every position, without a graph (the
    /// warm-up under context parallelism, where the main model is frozen): `p` the rows' own
    /// projections ([B, n, ..], RoPE at their positions), `latent` [B, T, C+R] every position's
    /// latent kv row (c_norm, then the RoPE'd k_pe: the context group's gather), `blocks` the
    /// rows in blocks with their positions. Each block's per-head probabilities [B, H, nb, T]
    /// f32 go to `each(block, probs)`; returns the attention output [B, n, hidden]. Row for row
    /// the computation of `dense_blocks`.
    pub fn dense_query_blocks(
        &self,
        p: &Projected,
        latent: &Tensor,
        ctx: &super::ForwardContext,
        blocks: &[crate::dist::context::RowBlock],
        mut each: impl FnMut(crate::dist::context::RowBlock, Tensor) -> Result<()>,
    ) -> Result<Tensor> {
        let (b, _, h, _) = p.q_nope.dims4()?;
        let (t, c) = (latent.dim(1)?, self.kv_lora);
        let c_norm = latent.narrow(2, 0, c)?.contiguous()?;
        let k_pe = latent
            .narrow(2, c, self.rope)?
            .reshape((b, t, 1, self.rope))?;
        let (k, v) = self.mha_kv(&c_norm, &k_pe)?;
        let (q, k, v) = (self.mha_q(p)?.detach(), k.detach(), v.detach());
        let mut outs = Vec::with_capacity(blocks.len());
        for &blk in blocks {
            let causal = ctx.causal(blk.pos, blk.n)?; // [n, T] or [B, n, T]
            let probs = self.dense_probs_rows(&q, &k, &causal, blk.local, blk.n)?; // [B, H, n, T]
            let o = probs.to_dtype(v.dtype())?.matmul(&v)?; // [B, H, n, V]
            let o = o.transpose(1, 2)?.reshape((b, blk.n, h * self.v_dim))?;
            outs.push(linear(&o, &self.o_proj)?.detach()); // [B, n, hidden]
            each(blk, probs)?;
        }
        Tensor::cat(&outs, 1)
    }

    /// Dense causal probabilities per head of queries q0..q0+n against every key, [B, H, n, T]
    /// f32, from the MHA-mode q, k [B, H, T, N+R]; `causal` is those queries' bias rows
    /// (`ForwardContext::causal`: [n, T], or [B, n, T] under document masking).
    fn dense_probs_rows(
        &self,
        q: &Tensor,
        k: &Tensor,
        causal: &Tensor,
        q0: usize,
        n: usize,
    ) -> Result<Tensor> {
        let q = q.narrow(2, q0, n)?.contiguous()?; // [B, H, n, N+R]; the whole q when n = T
        let scores = q.matmul(&k.t()?)?.to_dtype(DType::F32)?; // [B, H, n, T]
        softmax_last(&(scores * self.scale)?.broadcast_add(&super::per_head(causal)?)?)
    }

    /// Dense causal attention probabilities per head, [B, H, T, T] f32.
    fn dense_probs_and_values(&self, p: &Projected, causal: &Tensor) -> Result<(Tensor, Tensor)> {
        let (q, k, v) = self.mha_qkv(p)?;
        let t = q.dim(2)?;
        Ok((self.dense_probs_rows(&q, &k, causal, 0, t)?, v))
    }

    /// Head-mean dense probabilities [B, T, T] f32 (detached), for the attention-mass recall.
    pub fn dense_head_mean_probs(&self, p: &Projected, causal: &Tensor) -> Result<Tensor> {
        Ok(self.dense_probs_and_values(p, causal)?.0.mean(1)?.detach())
    }

    /// Dense MLA in MHA mode, `rows` queries at a time and without a graph (evaluation): no
    /// [.., T, T] tensor exists, the largest being one block's probabilities [B, H, rows, T]
    /// f32. Each block q0..q0+n hands its head-mean probabilities [B, n, T] (f32) to
    /// `each(q0, n, probs)` before the next block is computed. With `output`, returns the
    /// attention output [B, T, hidden] (the blocks' rows concatenated); without it (the sparse
    /// pass's recall) the values and o_proj are skipped. Row for row the same computation as
    /// `dense` and `dense_head_mean_probs`.
    pub fn dense_blocks(
        &self,
        p: &Projected,
        ctx: &super::ForwardContext,
        rows: usize,
        output: bool,
        mut each: impl FnMut(usize, usize, Tensor) -> Result<()>,
    ) -> Result<Option<Tensor>> {
        let (b, t, h, _) = p.q_nope.dims4()?;
        let rows = rows.clamp(1, t.max(1));
        let (q, k, v) = self.mha_qkv(p)?;
        let (q, k, v) = (q.detach(), k.detach(), v.detach()); // [B, H, T, *]: O(T), no graph
        let mut outs = Vec::with_capacity(if output { t.div_ceil(rows) } else { 0 });
        for q0 in (0..t).step_by(rows) {
            let n = rows.min(t - q0);
            let causal = ctx.causal(q0, n)?; // [n, T] or [B, n, T]
            let probs = self.dense_probs_rows(&q, &k, &causal, q0, n)?; // [B, H, n, T]
            if output {
                let o = probs.to_dtype(v.dtype())?.matmul(&v)?; // [B, H, n, V]
                let o = o.transpose(1, 2)?.reshape((b, n, h * self.v_dim))?;
                outs.push(linear(&o, &self.o_proj)?.detach()); // [B, n, hidden]
            }
            each(q0, n, probs.mean(1)?)?;
        }
        if output {
            Ok(Some(Tensor::cat(&outs, 1)?))
        } else {
            Ok(None)
        }
    }

    /// Dense MLA in MHA mode; `causal` is the [T, T] mask bias.
    pub fn dense(&self, p: &Projected, causal: &Tensor) -> Result<AttentionOut> {
        let (b, t, h, _) = p.q_nope.dims4()?;
        let (probs, v) = self.dense_probs_and_values(p, causal)?;
        let o = probs.to_dtype(v.dtype())?.matmul(&v)?; // [B, H, T, V]
        let o = o.transpose(1, 2)?.reshape((b, t, h * self.v_dim))?;
        Ok(AttentionOut {
            out: linear(&o, &self.o_proj)?,
            head_mean_probs: Some(probs.mean(1)?.detach()),
        })
    }

    /// Dense MLA in MHA mode for training without an [H, T, T] graph (`dense_recompute`):
    /// the output only; the per-head probabilities are never materialised whole.
    /// `starts`: document masking's first key per query, u32 [B, T].
    pub fn dense_recomputing(&self, p: &Projected, starts: Option<&Tensor>) -> Result<Tensor> {
        let (b, t, h, _) = p.q_nope.dims4()?;
        let (q, k, v) = self.mha_qkv(p)?;
        let o = super::dense_recompute::attention(self.kernels, &q, &k, &v, self.scale, 0, starts)?; // [B, H, T, V]
        linear(
            &o.transpose(1, 2)?.reshape((b, t, h * self.v_dim))?,
            &self.o_proj,
        )
    }

    /// The dense stage's attention (MHA mode over every causal key, the flash-style forward of
    /// `dense_recomputing`) from the latent kv rows `kv` [B*T, C+R] and the queries [B, n, H,
    /// .], keeping what `dense_backward` reads: -> the attention output [B, n, hidden].
    /// `blocks`: None, queries at the keys' positions (n = T); under context parallelism the
    /// query rows' blocks with their positions (`ForwardContext::query_blocks`), the keys every
    /// position's (the plain path, `dense_recompute::forward_rows`).
    pub fn dense_saved(
        &self,
        q_nope: &Tensor,
        q_pe: &Tensor,
        kv: &Tensor,
        starts: Option<&Tensor>,
        blocks: Option<Vec<crate::dist::context::RowBlock>>,
    ) -> Result<(Tensor, DenseSaved)> {
        let (b, t, h, _) = q_nope.dims4()?;
        let (c, r) = (self.kv_lora, self.rope);
        let keys = kv.dim(0)? / b;
        let kv = kv.reshape((b, keys, c + r))?;
        let c_norm = kv.narrow(2, 0, c)?.contiguous()?;
        let k_pe = kv.narrow(2, c, r)?.reshape((b, keys, 1, r))?;
        let p = Projected {
            qr: c_norm.clone(),
            q_nope: q_nope.clone(),
            q_pe: q_pe.clone(),
            c_norm,
            k_pe,
        };
        let q = self.mha_q(&p)?; // [B, H, n, N+R]
        let (k, v) = self.mha_kv(&p.c_norm, &p.k_pe)?; // [B, H, T, N+R], [B, H, T, V]
        let rows = super::dense_recompute::block_rows(b, h, keys);
        let kernel = q.dtype() == DType::BF16
            && self.kernels.on(q.device())
            && crate::kernels::warmup_kl::supported(q.dim(3)?, v.dim(3)?, 1, 16);
        let (o, lse) = match &blocks {
            Some(blocks) => {
                super::dense_recompute::forward_rows(&q, &k, &v, self.scale, blocks, starts)?
            }
            None if kernel => {
                crate::kernels::warmup_kl::dense_attention_fwd(&q, &k, &v, self.scale, starts)?
            }
            None => super::dense_recompute::forward_blocks(&q, &k, &v, self.scale, rows, starts)?,
        };
        let o = o.to_dtype(v.dtype())?; // [B, H, T, V]
        let o_flat = o.transpose(1, 2)?.reshape((b, t, h * self.v_dim))?;
        let out = linear(&o_flat, &self.o_proj)?;
        Ok((
            out,
            DenseSaved {
                c_norm: p.c_norm,
                q,
                k,
                v,
                o,
                lse,
                o_flat,
                rows,
                starts: starts.cloned(),
                blocks,
            },
        ))
    }

    /// The backward of `dense_saved`: dout [B, n, hidden] -> (d q_nope head-major [H, B*n, N],
    /// d q_pe [B*n, H, R], as `queries_backward` takes them, and d kv [B*T, C+R] f32 of every
    /// key position); o_proj's and kv_b_proj's gradients to `grads`. The
    /// attention through the tensor-core backward (bf16 on CUDA) or
    /// `dense_recompute::backward_blocks`, as `dense_recomputing`'s autograd runs them; the
    /// shared k_pe's gradient is the sum over heads.
    pub fn dense_backward(
        &self,
        saved: &DenseSaved,
        dout: &Tensor,
        grads: &mut dyn GradSink,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t, _) = dout.dims3()?;
        let (h, n, r, v_dim, c) = (self.heads, self.nope, self.rope, self.v_dim, self.kv_lora);
        let dtype = saved.q.dtype();
        let (d_o, dw) =
            linear_backward(&saved.o_flat, &self.o_proj, dout, grads.wants(&self.o_proj))?;
        add_if_wanted(grads, &self.o_proj, dw)?;
        let d_o = d_o
            .reshape((b, t, h, v_dim))?
            .transpose(1, 2)?
            .contiguous()?; // [B, H, T, V]
        let keys = saved.k.dim(2)?;
        let (dq, dk, dv) = if let Some(blocks) = &saved.blocks {
            super::dense_recompute::backward_rows(
                &saved.q,
                &saved.k,
                &saved.v,
                &saved.o,
                &saved.lse,
                &d_o,
                self.scale,
                blocks,
                saved.starts.as_ref(),
            )?
        } else if super::dense_recompute::use_backward_kernel(self.kernels, &saved.q, &saved.v)? {
            crate::kernels::warmup_kl::dense_attention_bwd(
                &saved.q,
                &saved.k,
                &saved.v,
                &saved.o,
                &saved.lse,
                &d_o,
                self.scale,
                saved.starts.as_ref(),
            )?
        } else {
            super::dense_recompute::backward_blocks(
                &saved.q,
                &saved.k,
                &saved.v,
                &saved.o,
                &saved.lse,
                &d_o,
                self.scale,
                saved.rows,
                saved.starts.as_ref(),
            )?
        };
        let to_tokens =
            |x: Tensor| -> Result<Tensor> { x.to_dtype(dtype)?.transpose(1, 2)?.contiguous() }; // [B, T, H, .]
        let (dq, dk, dv) = (to_tokens(dq)?, to_tokens(dk)?, to_tokens(dv)?);
        let dkv_b =
            Tensor::cat(&[&dk.narrow(3, 0, n)?, &dv], 3)?.reshape((b, keys, h * (n + v_dim)))?;
        let (dc_norm, dw) = linear_backward(
            &saved.c_norm,
            &self.kv_b_proj,
            &dkv_b,
            grads.wants(&self.kv_b_proj),
        )?;
        add_if_wanted(grads, &self.kv_b_proj, dw)?;
        // k_pe is one key shared by the heads: its gradient is the heads' sum (f32).
        let dk_pe = dk.narrow(3, n, r)?.to_dtype(DType::F32)?.sum(2)?; // [B, T, R]
        let dkv = Tensor::cat(&[&dc_norm.to_dtype(DType::F32)?, &dk_pe], 2)?
            .reshape((b * keys, c + r))?;
        // The queries' gradients as `queries_backward` takes them, as views of dq.
        let dq = dq.reshape((b * t, h, n + r))?;
        Ok((
            dq.narrow(2, 0, n)?.transpose(0, 1)?,
            dq.narrow(2, n, r)?,
            dkv,
        ))
    }

    /// Can `dense_streaming` run here (CUDA kernels, bf16 model, shapes the kernels take)?
    pub fn streaming_supported(
        &self,
        p: &Projected,
        indexer_heads: usize,
        indexer_dim: usize,
    ) -> bool {
        p.q_nope.dtype() == DType::BF16
            && self.kernels.on(p.q_nope.device())
            && crate::kernels::warmup_kl::supported(
                self.nope + self.rope,
                self.v_dim,
                indexer_heads,
                indexer_dim,
            )
    }

    /// Dense MLA through the flash-style kernel: the output and what the streaming warm-up KL
    /// recomputes the target from (per-head q, k and LSE); no [T, T] tensor exists.
    pub fn dense_streaming(
        &self,
        p: &Projected,
        starts: Option<&Tensor>,
    ) -> Result<(Tensor, DenseScores)> {
        let (b, t, h, _) = p.q_nope.dims4()?;
        let (q, k, v) = self.mha_qkv(p)?;
        let (o, lse) =
            crate::kernels::warmup_kl::dense_attention_fwd(&q, &k, &v, self.scale, starts)?; // [B, H, T, V]
        let o = o.transpose(1, 2)?.reshape((b, t, h * self.v_dim))?;
        Ok((
            linear(&o, &self.o_proj)?,
            DenseScores {
                q: q.detach(),
                k: k.detach(),
                lse,
                scale: self.scale,
                starts: starts.cloned(),
            },
        ))
    }

    /// Sparse MLA in absorbed (MQA) mode over the selected keys of each query.
    pub fn sparse(&self, p: &Projected, sel: &Selection, want_probs: bool) -> Result<AttentionOut> {
        self.sparse_rows(
            &p.q_nope,
            &p.q_pe,
            &self.latent_kv(&p.c_norm, &p.k_pe)?,
            sel,
            want_probs,
        )
    }

    /// Sparse MLA of the queries q_nope [B, n, H, N], q_pe [B, n, H, R] (any n of the T
    /// positions) over the latent rows `kv` [B*T, C+R] of the whole batch; `sel` holds these
    /// queries' sets ([B, n, K], absolute rows into kv). Each query reads only kv rows, so a
    /// long sequence can be processed a block of queries at a time against one shared kv.
    /// `want_probs`: also the head-mean probabilities (the KL target; a pass of their own on
    /// the GPU, skipped when not wanted).
    pub fn sparse_rows(
        &self,
        q_nope: &Tensor,
        q_pe: &Tensor,
        kv: &Tensor,
        sel: &Selection,
        want_probs: bool,
    ) -> Result<AttentionOut> {
        Ok(self.sparse_saved(q_nope, q_pe, kv, sel, want_probs)?.0)
    }

    /// kv_b_proj's rows per head: W_UK [H, N, C] and W_UV [H, V, C].
    fn absorbed_weights(&self) -> Result<(Tensor, Tensor)> {
        let c = self.kv_lora;
        let w_kv = self
            .kv_b_proj
            .reshape((self.heads, self.nope + self.v_dim, c))?;
        Ok((
            w_kv.narrow(1, 0, self.nope)?.contiguous()?,
            w_kv.narrow(1, self.nope, self.v_dim)?.contiguous()?,
        ))
    }

    /// Do the bf16 tensor-core kernels take this model's shapes?
    fn tensor_cores(&self, q: &Tensor) -> bool {
        q.dtype() == DType::BF16
            && crate::kernels::sparse_mla_tc::supported(
                self.kv_lora + self.rope,
                self.kv_lora,
                self.heads,
            )
    }

    /// `sparse_rows`, also returning what `sparse_backward` reads (the same tensors autograd
    /// would keep; no extra work). Layout moves between token-major [BT, H, .] (the kernels')
    /// and head-major [H, BT, .] (the per-head products') go through `join_rows`.
    pub fn sparse_saved(
        &self,
        q_nope: &Tensor,
        q_pe: &Tensor,
        kv: &Tensor,
        sel: &Selection,
        want_probs: bool,
    ) -> Result<(AttentionOut, SparseSaved)> {
        let (b, t, h, _) = q_nope.dims4()?;
        let (c, r, k) = (self.kv_lora, self.rope, sel.k()?);
        let bt = b * t;
        let dtype = q_nope.dtype();
        let (w_uk, w_uv) = self.absorbed_weights()?;
        // Absorb W_UK into the query: q_lat[h] = q_nope[h] @ W_UK[h], head-major.
        let q_nope = join_rows(self.kernels, &q_nope.permute((2, 0, 1, 3))?, None, 1, dtype)?; // [H, BT, N]
        let q_lat = q_nope.matmul(&w_uk)?; // [H, BT, C]
        let q = join_rows(
            self.kernels,
            &q_lat.transpose(0, 1)?,
            Some(&q_pe.reshape((bt, h, r))?),
            1,
            dtype,
        )?; // [BT, H, C+R]
        let (o_lat, head_mean, fwd) = if self.kernels.on(q.device()) {
            // Fused kernel: gathers the selected rows on the fly, keeps only the LSE. bf16 models
            // take the tensor-core kernel (bf16 products, f32 softmax and accumulators).
            let idx = sel.absolute.reshape((bt, k))?;
            let tensor_cores = self.tensor_cores(&q);
            let out = if tensor_cores {
                crate::kernels::sparse_mla_tc::sparse_mla_bf16(
                    self.kernels,
                    &q,
                    &kv.contiguous()?,
                    &idx,
                    self.scale,
                    c,
                )?
            } else {
                crate::kernels::sparse_mla(
                    &q.to_dtype(DType::F32)?.contiguous()?,
                    &kv.to_dtype(DType::F32)?.contiguous()?,
                    &idx,
                    self.scale,
                    c,
                )?
            }; // [BT, H, C+1] f32
            let pm = if !want_probs {
                None
            } else if tensor_cores {
                Some(
                    crate::kernels::sparse_mla_tc::sparse_mla_head_mean_probs_bf16(
                        self.kernels,
                        &q.detach(),
                        &kv.detach().contiguous()?,
                        &idx,
                        &out.detach(),
                        self.scale,
                        c,
                    )?,
                )
            } else {
                let (q32, kv32) = (
                    q.detach().to_dtype(DType::F32)?.contiguous()?,
                    kv.detach().to_dtype(DType::F32)?.contiguous()?,
                );
                Some(crate::kernels::sparse_mla_head_mean_probs(
                    &q32, &kv32, &idx, &out, self.scale, c,
                )?)
            };
            let o_lat = join_rows(
                self.kernels,
                &out.narrow(2, 0, c)?.transpose(0, 1)?,
                None,
                1,
                dtype,
            )?; // [H, BT, C]
            (
                o_lat,
                pm.map(|p| p.reshape((b, t, k))).transpose()?,
                Some(out.detach()),
            )
        } else {
            let (o, pm) = self.sparse_plain(&q, kv, sel, b, t)?;
            (
                join_rows(self.kernels, &o.transpose(0, 1)?, None, 1, dtype)?,
                want_probs.then_some(pm),
                None,
            )
        };
        // Apply W_UV per head: o[h] = o_lat[h] @ W_UV[h]^T.
        let o = o_lat.matmul(&w_uv.transpose(1, 2)?)?; // [H, BT, V]
        let o = join_rows(self.kernels, &o.transpose(0, 1)?, None, 1, dtype)?.reshape((
            b,
            t,
            h * self.v_dim,
        ))?;
        let out = AttentionOut {
            out: linear(&o, &self.o_proj)?,
            head_mean_probs: head_mean.map(|p| p.detach()),
        };
        Ok((
            out,
            SparseSaved {
                q_nope,
                q,
                o_lat,
                fwd,
                o,
            },
        ))
    }

    /// The backward of `sparse_saved`: dout [B, T, hidden] -> the gradients of its queries and
    /// of every latent row (`SparseGrads`); o_proj's and kv_b_proj's gradients to `grads`.
    /// Attention through the kernels' backward on a GPU (the kernel the forward ran), else
    /// `sparse_plain_backward`. Products in the model dtype, softmax gradients in f32.
    pub fn sparse_backward(
        &self,
        saved: &SparseSaved,
        kv: &Tensor,
        sel: &Selection,
        dout: &Tensor,
        grads: &mut dyn GradSink,
    ) -> Result<SparseGrads> {
        let (b, t, _) = dout.dims3()?;
        let (h, c, r, n) = (self.heads, self.kv_lora, self.rope, self.nope);
        let bt = b * t;
        let dtype = saved.q.dtype();
        let (w_uk, w_uv) = self.absorbed_weights()?;
        let (d_o, dw) = linear_backward(&saved.o, &self.o_proj, dout, grads.wants(&self.o_proj))?;
        add_if_wanted(grads, &self.o_proj, dw)?;
        let d_o = join_rows(
            self.kernels,
            &d_o.reshape((bt, h, self.v_dim))?.transpose(0, 1)?,
            None,
            1,
            dtype,
        )?; // [H, BT, V]
        let do_lat = d_o.matmul(&w_uv)?; // [H, BT, C]
        let wants_kv_b = grads.wants(&self.kv_b_proj);
        let dw_uv = if wants_kv_b {
            Some(d_o.transpose(1, 2)?.matmul(&saved.o_lat)?)
        } else {
            None
        }; // [H, V, C]
        let region = crate::profile::region("attention bwd: sparse MLA kernel");
        let (dq, dkv) = match &saved.fwd {
            Some(fwd) => {
                let idx = sel.absolute.reshape((bt, sel.k()?))?;
                // The gradient of the kernels' combined result [BT, H, C+1] f32: the output's,
                // token-major, and a zero LSE column.
                let zero = Tensor::zeros((1, 1, 1), do_lat.dtype(), do_lat.device())?
                    .broadcast_as((bt, h, 1))?;
                let grad = join_rows(
                    self.kernels,
                    &do_lat.transpose(0, 1)?,
                    Some(&zero),
                    1,
                    DType::F32,
                )?;
                if self.tensor_cores(&saved.q) {
                    crate::kernels::sparse_mla_tc::sparse_mla_bf16_backward(
                        self.kernels,
                        &saved.q,
                        kv,
                        &idx,
                        fwd,
                        &grad,
                        self.scale,
                        c,
                    )?
                } else {
                    let (q32, kv32) = (
                        saved.q.to_dtype(DType::F32)?.contiguous()?,
                        kv.to_dtype(DType::F32)?.contiguous()?,
                    );
                    crate::kernels::sparse_mla_backward(
                        &q32, &kv32, &idx, fwd, &grad, self.scale, c,
                    )?
                }
            }
            None => self.sparse_plain_backward(
                &saved.q,
                kv,
                sel,
                &join_rows(self.kernels, &do_lat.transpose(0, 1)?, None, 1, dtype)?,
            )?,
        };
        drop(region);
        let dq = dq.to_dtype(dtype)?; // [BT, H, C+R]
        let dq_lat = join_rows(
            self.kernels,
            &dq.narrow(2, 0, c)?.transpose(0, 1)?,
            None,
            1,
            dtype,
        )?; // [H, BT, C]
        let dq_nope = dq_lat.matmul(&w_uk.transpose(1, 2)?)?; // [H, BT, N]
        if let Some(dw_uv) = dw_uv {
            let dw_uk = saved.q_nope.transpose(1, 2)?.matmul(&dq_lat)?; // [H, N, C]
            let dw = Tensor::cat(&[&dw_uk, &dw_uv], 1)?.reshape((h * (n + self.v_dim), c))?;
            grads.add(&self.kv_b_proj, dw)?;
        }
        Ok(SparseGrads {
            q_nope: dq_nope,
            q_pe: join_rows(self.kernels, &dq.narrow(2, c, r)?, None, 1, dtype)?,
            kv: dkv.to_dtype(DType::F32)?,
        })
    }

    /// The plain twin of the sparse kernels' backward, recomputing the probabilities from q and
    /// kv as they do: with kv_sel the selected rows [BT, K, C+R], P = softmax(scale q kv_sel^T +
    /// bias) (f32), dP = do_lat V^T (V = the first C columns), dS = P (dP - sum(P dP)) (f32);
    /// dq = scale dS kv_sel; d(kv_sel) = scale dS^T q + [P^T do_lat, 0]; each selected row's
    /// gradient is added to its kv row (padding slots add zeros: their P is 0). Products in the
    /// dtype of q (as autograd of `sparse_plain` runs them).
    fn sparse_plain_backward(
        &self,
        q: &Tensor,
        kv: &Tensor,
        sel: &Selection,
        do_lat: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let bt = q.dim(0)?;
        let (c, r, k) = (self.kv_lora, self.rope, sel.k()?);
        let dtype = q.dtype();
        let flat = sel
            .absolute
            .ne(u32::MAX)?
            .where_cond(&sel.absolute, &sel.absolute.zeros_like()?)?
            .flatten_all()?; // [BT*K]
        let kv_sel = kv.index_select(&flat, 0)?.reshape((bt, k, c + r))?; // [BT, K, C+R]
        let scores = q.matmul(&kv_sel.t()?)?.to_dtype(DType::F32)?; // [BT, H, K]
        let probs = softmax_last(
            &(scores * self.scale)?.broadcast_add(&sel.bias()?.reshape((bt, 1, k))?)?,
        )?;
        let values = kv_sel.narrow(2, 0, c)?.contiguous()?; // [BT, K, C]
        let dp = do_lat.matmul(&values.t()?)?.to_dtype(DType::F32)?; // [BT, H, K]
        let ds = (&probs * dp.broadcast_sub(&(&probs * &dp)?.sum_keepdim(D::Minus1)?)?)?;
        let ds = (ds * self.scale)?.to_dtype(dtype)?;
        let dq = ds.matmul(&kv_sel)?; // [BT, H, C+R]
        let dv = probs.to_dtype(dtype)?.t()?.matmul(do_lat)?; // [BT, K, C]
        let dv = Tensor::cat(&[&dv, &Tensor::zeros((bt, k, r), dtype, q.device())?], 2)?;
        let dkv_sel = (ds.t()?.matmul(q)? + dv)?.reshape((bt * k, c + r))?;
        let dkv =
            Tensor::zeros((kv.dim(0)?, c + r), dtype, q.device())?.index_add(&flat, &dkv_sel, 0)?;
        Ok((dq, dkv))
    }

    /// The plain twin of the sparse kernel: gather the selected rows [BT, K, C+R], score, softmax
    /// in f32, weight the latent values. Returns the latent output [BT, H, C] and the head-mean
    /// probabilities [B, T, K].
    fn sparse_plain(
        &self,
        q: &Tensor,
        kv: &Tensor,
        sel: &Selection,
        b: usize,
        t: usize,
    ) -> Result<(Tensor, Tensor)> {
        let (c, r, k) = (self.kv_lora, self.rope, sel.k()?);
        let bt = b * t;
        // Absolute rows into kv; padding (u32::MAX) reads row 0, which its bias masks.
        let flat = sel
            .absolute
            .ne(u32::MAX)?
            .where_cond(&sel.absolute, &sel.absolute.zeros_like()?)?
            .flatten_all()?; // [BT*K]
        let kv_sel = kv.index_select(&flat, 0)?.reshape((bt, k, c + r))?; // [BT, K, C+R]
        let scores = q.matmul(&kv_sel.t()?)?.to_dtype(DType::F32)?; // [BT, H, K]
        let bias = sel.bias()?.reshape((bt, 1, k))?;
        let probs = softmax_last(&(scores * self.scale)?.broadcast_add(&bias)?)?; // [BT, H, K]
        let o_lat = probs
            .to_dtype(q.dtype())?
            .matmul(&kv_sel.narrow(2, 0, c)?.contiguous()?)?; // [BT, H, C]
        Ok((o_lat, probs.mean(D::Minus2)?.reshape((b, t, k))?))
    }
}
