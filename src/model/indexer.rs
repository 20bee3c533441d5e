//! The lightning indexer of DSA: a small multi-head scorer that decides which keys each query
//! attends to.
//!
//! q_I = wq_b(qr) [B, T, HI, DI];  k_I = LayerNorm(wk(x)) [B, T, DI] (one key per token);
//! the first R dims of both get half-split RoPE (rope dims FIRST, unlike MLA's interleave);
//! w = weights_proj(x) * HI^-1/2 * DI^-1/2 [B, T, HI];
//! I[t, s] = sum_j w[t, j] * ReLU(q_I[t, j] . k_I[s]), and `dsa::MASKED` for s > t.
//! Everything runs in f32 (DeepSeek keeps weights_proj in f32; the scores feed a top-k whose
//! ties must not depend on bf16 rounding). DeepSeek's inference code also applies a Hadamard
//! rotation and FP8 quantisation to q_I and k_I; the rotation is orthogonal, so in f32 it
//! changes nothing and is skipped.

use candle_core::{DType, Result, Tensor, D};

use super::grad_sink::{add_if_wanted, GradSink, Originals, ToOriginals};
use crate::kernels::KernelPolicy;
use crate::ops::{
    layer_norm, layer_norm_backward, linear, linear_weight_grad, rope_half, rope_half_backward,
    softmax_last,
};

pub struct Indexer {
    /// Score the sparse stage's KL on tensor cores (`kernels::indexer_at_tc`: q_I and k_I
    /// rounded to bf16, f32 sums) where the kernels run: bf16 models, whose selection is
    /// scored that way too. f32 models keep the f32 kernel (GPU runs that must match the CPU).
    pub tensor_cores: bool,
    /// Which kernels its ops run.
    pub kernels: KernelPolicy,
    /// How the top-k selection scores keys (`dsa.indexer_scores`; the KL keeps its own).
    pub scores: super::fp8_scores::SelectionScores,
    pub wq_b: Tensor,
    pub wk: Tensor,
    pub k_norm_weight: Tensor,
    pub k_norm_bias: Tensor,
    pub weights_proj: Tensor,
    pub heads: usize,
    pub head_dim: usize,
    pub rope: usize,
}

/// LayerNorm epsilon of k_norm (DeepSeek's value).
const K_NORM_EPS: f64 = 1e-6;

impl Indexer {
    /// The backward of `rope_prefix`: the inverse rotation of the first `rope` dims of dy.
    fn rope_prefix_backward(&self, dy: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let d = dy.dim(3)?;
        let back = rope_half_backward(
            self.kernels,
            &dy.narrow(3, 0, self.rope)?.contiguous()?,
            cos,
            sin,
        )?;
        if d == self.rope {
            return Ok(back);
        }
        Tensor::cat(&[&back, &dy.narrow(3, self.rope, d - self.rope)?], 3)
    }

    /// A copy whose tensors are detached views of this one's (`Originals` remembers which).
    fn detached_view(&self, originals: &mut Originals) -> Indexer {
        Indexer {
            tensor_cores: self.tensor_cores,
            kernels: self.kernels,
            scores: self.scores,
            wq_b: originals.view(&self.wq_b),
            wk: originals.view(&self.wk),
            k_norm_weight: originals.view(&self.k_norm_weight),
            k_norm_bias: originals.view(&self.k_norm_bias),
            weights_proj: originals.view(&self.weights_proj),
            heads: self.heads,
            head_dim: self.head_dim,
            rope: self.rope,
        }
    }

    /// Apply the half-split RoPE to the first `rope` dims of `x` [B, T, H, DI].
    fn rope_prefix(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let d = x.dim(3)?;
        let roped = rope_half(
            self.kernels,
            &x.narrow(3, 0, self.rope)?.contiguous()?,
            cos,
            sin,
        )?;
        if d == self.rope {
            return Ok(roped);
        }
        Tensor::cat(&[&roped, &x.narrow(3, self.rope, d - self.rope)?], 3)
    }

    /// The indexer's queries, keys and head weights (differentiable, f32).
    pub fn project(
        &self,
        x: &Tensor,
        qr: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<IndexerProj> {
        let (q, w) = self.project_queries(x, qr, cos, sin)?;
        let k = self.project_keys(x, cos, sin)?;
        Ok(IndexerProj { q, k, w })
    }

    /// Queries [B, n, HI, DI] and head weights [B, n, HI] of the n tokens of x [B, n, hidden]
    /// and qr [B, n, q_lora] (differentiable, f32); `cos`/`sin` are the rope rows of those
    /// tokens' positions. Per token, so a block of rows gives exactly those rows of `project`.
    pub fn project_queries(
        &self,
        x: &Tensor,
        qr: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (b, t, _) = x.dims3()?;
        let (hi, di) = (self.heads, self.head_dim);
        let qr = qr.to_dtype(DType::F32)?;
        let q = linear(&qr, &self.wq_b)?.reshape((b, t, hi, di))?;
        let q = self.rope_prefix(&q, cos, sin)?.contiguous()?; // [B, T, HI, DI]
        let w = (linear(&x.to_dtype(DType::F32)?, &self.weights_proj)?
            * ((hi as f64).powf(-0.5) * (di as f64).powf(-0.5)))?; // [B, T, HI]
        Ok((q, w))
    }

    /// Keys [B, T, DI] of the tokens of x [B, T, hidden] (differentiable, f32).
    pub fn project_keys(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let di = self.head_dim;
        let k = layer_norm(
            &linear(&x.to_dtype(DType::F32)?, &self.wk)?,
            &self.k_norm_weight,
            &self.k_norm_bias,
            K_NORM_EPS,
        )?;
        self.rope_prefix(&k.reshape((b, t, 1, di))?, cos, sin)?
            .reshape((b, t, di))?
            .contiguous() // [B, T, DI]
    }
}

/// Query rows per block wherever the indexer's queries exist a block of rows at a time: about
/// 2^24 query values (64 MiB in f32) over the batch's `b` sequences; at least 1, at most `t`.
pub fn query_block_rows(b: usize, t: usize, heads: usize, head_dim: usize) -> usize {
    ((1usize << 24) / (b * heads * head_dim).max(1)).clamp(1, t.max(1))
}

/// Query rows per block of the sparse stage's selection and KL: `query_block_rows`, and at
/// most about 2^25 KL entries [B, n, K] (K = min(topk, T)) per block.
pub fn sparse_block_rows(b: usize, t: usize, heads: usize, head_dim: usize, topk: usize) -> usize {
    let kl_bound = ((1usize << 25) / (b * topk.min(t)).max(1)).max(1);
    query_block_rows(b, t, heads, head_dim).min(kl_bound)
}

impl Indexer {
    /// Backpropagate given gradients of the projections (dq [B, T, HI, DI], dw [B, T, HI],
    /// dk [B, T, DI]) into the indexer's parameters, recomputing the projections of `rows`
    /// tokens at a time from the indexer's inputs x [B, T, hidden] and qr [B, T, q_lora]
    /// (every projection is per token, so chunks are exact): sum(q dq) + sum(w dw) + sum(k dk)
    /// per chunk. `cos`/`sin` are the rope tables of positions 0.. (at least T rows).
    #[allow(clippy::too_many_arguments)]
    pub fn backprop_rows(
        &self,
        x: &Tensor,
        qr: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        grads: (&Tensor, &Tensor, &Tensor),
        rows: usize,
        mut on_grads: impl FnMut(&candle_core::backprop::GradStore) -> Result<()>,
    ) -> Result<()> {
        let (dq, dw, dk) = grads;
        let t = x.dim(1)?;
        for r0 in (0..t).step_by(rows.max(1)) {
            let n = rows.max(1).min(t - r0);
            let p = self.project(
                &x.narrow(1, r0, n)?,
                &qr.narrow(1, r0, n)?,
                &cos.narrow(0, r0, n)?,
                &sin.narrow(0, r0, n)?,
            )?;
            let dot = |a: &Tensor, g: &Tensor| -> Result<Tensor> {
                (a * g.narrow(1, r0, n)?.to_dtype(DType::F32)?)?.sum_all()
            };
            let surrogate = ((dot(&p.q, dq)? + dot(&p.w, dw)?)? + dot(&p.k, dk)?)?;
            on_grads(&surrogate.backward()?)?;
        }
        Ok(())
    }

    /// The keys-only `backprop_rows`: push dk [B, T, DI] (f32) into wk and k_norm, recomputing
    /// the keys of `rows` tokens at a time from x [B, T, hidden]: sum(k dk) per chunk.
    pub fn backprop_keys(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        dk: &Tensor,
        rows: usize,
        mut on_grads: impl FnMut(&candle_core::backprop::GradStore) -> Result<()>,
    ) -> Result<()> {
        let t = x.dim(1)?;
        for r0 in (0..t).step_by(rows.max(1)) {
            let n = rows.max(1).min(t - r0);
            let k = self.project_keys(
                &x.narrow(1, r0, n)?,
                &cos.narrow(0, r0, n)?,
                &sin.narrow(0, r0, n)?,
            )?;
            on_grads(
                &(k * dk.narrow(1, r0, n)?.to_dtype(DType::F32)?)?
                    .sum_all()?
                    .backward()?,
            )?;
        }
        Ok(())
    }

    /// The sparse stage's indexer KL of one layer, backpropagated into the indexer's parameters
    /// without q_I ever existing for every row. Loss: `weight` times the mean over (sequence,
    /// query t) of KL(p_t || softmax(I_t at S_t)), p = `target` [B, T, K] (the sparse
    /// attention's head-mean probabilities), the sets `sel` and their bias. Per block of `rows`
    /// queries: q and w are projected again from the detached inputs x [B, T, hidden] and
    /// qr [B, T, q_lora] with their graph, scored at the selected keys against ONE shared leaf
    /// copy of `keys` [B, T, DI] (f32), and the block's KL backpropagated at once: gradients of
    /// wq_b and weights_proj go to `on_grads` block by block, d(keys) is summed over the blocks
    /// in f32 and then pushed through wk and k_norm a chunk of `rows` tokens at a time
    /// (`backprop_keys`). The same gradient as one graph over all rows, up to the order of the
    /// f32 sums. `cos`/`sin`: rope tables of positions 0.. (at least T rows). Returns the mean
    /// KL (detached f32 scalar).
    #[allow(clippy::too_many_arguments)]
    pub fn backprop_sparse_kl(
        &self,
        inputs: (&Tensor, &Tensor),
        keys: &Tensor,
        target: &Tensor,
        sel: &crate::dsa::Selection,
        rope: (&Tensor, &Tensor),
        rows: usize,
        weight: f64,
        mut on_grads: impl FnMut(&candle_core::backprop::GradStore) -> Result<()>,
    ) -> Result<Tensor> {
        let ((x, qr), (cos, sin)) = (inputs, rope);
        let (b, t, _) = x.dims3()?;
        let rows = rows.clamp(1, t.max(1));
        let keys = candle_core::Var::from_tensor(&keys.detach())?; // the blocks' shared leaf
        let mut dk = keys.as_tensor().zeros_like()?;
        let mut total: Option<Tensor> = None;
        for q0 in (0..t).step_by(rows) {
            let n = rows.min(t - q0);
            // (DSA_PROFILE regions: which part of this backward costs what, per block.)
            let region = crate::profile::region("indexer KL bwd: project queries");
            let (q, w) = self.project_queries(
                &x.narrow(1, q0, n)?,
                &qr.narrow(1, q0, n)?,
                &cos.narrow(0, q0, n)?,
                &sin.narrow(0, q0, n)?,
            )?;
            drop(region);
            let region = crate::profile::region("indexer KL bwd: scores at the sets");
            let block = IndexerProj {
                q,
                k: keys.as_tensor().clone(),
                w,
            };
            let set = sel.rows(q0, n)?;
            let on_set = (block.scores_at(&set, self.kernels, self.tensor_cores)? + set.bias()?)?; // [B, n, K]
            drop(region);
            let region = crate::profile::region("indexer KL bwd: KL rows");
            let kl_sum = crate::losses::kl_rows(&target.narrow(1, q0, n)?, &on_set)?.sum_all()?; // sum over [B, n]
            drop(region);
            let region = crate::profile::region("indexer KL bwd: autograd of the block");
            let gs = (&kl_sum * (weight / (b * t) as f64))?.backward()?;
            drop(region);
            let _region = crate::profile::region("indexer KL bwd: gradients to the accumulator");
            on_grads(&gs)?;
            if let Some(g) = gs.get(keys.as_tensor()) {
                dk = (dk + g.detach())?;
            }
            let kl_sum = kl_sum.detach();
            total = Some(match total {
                Some(a) => (a + kl_sum)?,
                None => kl_sum,
            });
        }
        let region = crate::profile::region("indexer KL bwd: keys backward");
        self.backprop_keys(x, cos, sin, &dk, rows, on_grads)?;
        drop(region);
        match total {
            Some(s) => s / (b * t) as f64,
            None => candle_core::bail!("the sparse-stage KL of an empty sequence"),
        }
    }
}

/// Queries [B, T, HI, DI], keys [B, T, DI] and head weights [B, T, HI] (scale folded in).
pub struct IndexerProj {
    pub q: Tensor,
    pub k: Tensor,
    pub w: Tensor,
}

impl IndexerProj {
    pub fn detach(&self) -> Self {
        Self {
            q: self.q.detach(),
            k: self.k.detach(),
            w: self.w.detach(),
        }
    }

    /// Detached copies marked as leaves: a backward through losses built on them stops here
    /// and returns d/dq, d/dw, d/dk, which `Indexer::backprop_rows` then pushes into the
    /// indexer's parameters a chunk of tokens at a time (bounded memory at long lengths).
    pub fn leaves(&self) -> Result<Self> {
        let leaf = |t: &Tensor| -> Result<Tensor> {
            Ok(candle_core::Var::from_tensor(&t.detach())?
                .as_tensor()
                .clone())
        };
        Ok(Self {
            q: leaf(&self.q)?,
            k: leaf(&self.k)?,
            w: leaf(&self.w)?,
        })
    }

    /// Scores of queries `q0..q0+n` against every key: [B, n, T] f32, causal bias not added.
    /// Holds a [B, n*HI, T] intermediate, so callers bound `n`.
    pub fn scores_rows(&self, q0: usize, n: usize) -> Result<Tensor> {
        let (b, _, hi, di) = self.q.dims4()?;
        let t = self.k.dim(1)?;
        let q = self
            .q
            .narrow(1, q0, n)?
            .reshape((b, n * hi, di))?
            .contiguous()?;
        let qk = q
            .matmul(&self.k.t()?.contiguous()?)?
            .relu()?
            .reshape((b, n, hi, t))?; // [B, n, HI, T]
        let w = self.w.narrow(1, q0, n)?.unsqueeze(2)?.contiguous()?; // [B, n, 1, HI]
        w.matmul(&qk)?.squeeze(2) // [B, n, T]
    }

    /// Dense scores [B, T, T] with the causal bias added (warm-up KL and recall).
    pub fn scores(&self, causal: &Tensor) -> Result<Tensor> {
        let t = self.k.dim(1)?;
        self.scores_rows(0, t)?.broadcast_add(causal)
    }

    /// Scores at the selected keys only: [B, T, K] = sum_j w[t,j] ReLU(q[t,j] . k[idx[t,i]]),
    /// differentiable and O(T K) in memory (the sparse-stage KL needs nothing else). Padding
    /// slots score 0 (the caller adds the selection's bias). On CUDA a fused kernel computes
    /// it (with `tensor_cores` and a shape they cover, the bf16 tensor-core one; else f32); the
    /// plain twin below gathers the keys.
    pub fn scores_at(
        &self,
        sel: &crate::dsa::Selection,
        kernels: KernelPolicy,
        tensor_cores: bool,
    ) -> Result<Tensor> {
        // The queries may be a block of rows (t of them) while the keys cover the sequence (tk).
        let (b, t, hi, di) = self.q.dims4()?;
        let tk = self.k.dim(1)?;
        let kk = sel.k()?;
        if kernels.on(self.q.device()) {
            let q = self.q.contiguous()?.reshape((b * t, hi, di))?;
            let w = self.w.contiguous()?.reshape((b * t, hi))?;
            let k = self.k.reshape((b * tk, di))?;
            let idx = sel.absolute.contiguous()?.reshape((b * t, kk))?;
            if tensor_cores && crate::kernels::indexer_at_tc::supported(kernels, hi, di) {
                return crate::kernels::indexer_at_tc::indexer_scores_at_bf16(&q, &w, &k, &idx)?
                    .reshape((b, t, kk));
            }
            return crate::kernels::indexer_scores_at(&q, &w, &k, &idx)?.reshape((b, t, kk));
        }
        let offsets = Tensor::arange(0u32, b as u32, sel.absolute.device())?
            .affine(tk as f64, 0.0)?
            .reshape((b, 1, 1))?;
        let flat = sel
            .indices()?
            .broadcast_add(&offsets)?
            .contiguous()?
            .flatten_all()?;
        let k_sel = self
            .k
            .reshape((b * tk, di))?
            .index_select(&flat, 0)?
            .reshape((b * t, kk, di))?; // [BT, K, DI]
        let q = self.q.contiguous()?.reshape((b * t, hi, di))?; // [BT, HI, DI]
        let qk = q.matmul(&k_sel.t()?.contiguous()?)?.relu()?; // [BT, HI, K]
        let w = self.w.contiguous()?.reshape((b * t, 1, hi))?;
        (w.matmul(&qk)?.reshape((b, t, kk))? * sel.valid()?)? // padding slots score 0
            .reshape((b, t, kk))
    }
}

impl Indexer {
    /// `backprop_rows` written out (its twin): the gradients of the projections, dq
    /// [B, T, HI, DI], dw [B, T, HI] and dk [B, T, DI], into wq_b, weights_proj, wk and k_norm,
    /// `rows` tokens at a time from the detached inputs x [B, T, hidden] and qr [B, T, q_lora]
    /// (f32 products; the warm-up KL's backward on the GPU, after the streaming kernel).
    #[allow(clippy::too_many_arguments)]
    pub fn projections_backward(
        &self,
        x: &Tensor,
        qr: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        grads_in: (&Tensor, &Tensor, &Tensor),
        rows: usize,
        grads: &mut dyn GradSink,
    ) -> Result<()> {
        let mut originals = Originals::default();
        let view = self.detached_view(&mut originals);
        let sink = &mut ToOriginals {
            inner: grads,
            originals,
        };
        let (x, qr) = (x.detach(), qr.detach());
        let (dq, dw, dk) = grads_in;
        let t = x.dim(1)?;
        let rows = rows.clamp(1, t.max(1));
        for r0 in (0..t).step_by(rows) {
            let n = rows.min(t - r0);
            let (x32, qr32) = (
                x.narrow(1, r0, n)?.to_dtype(DType::F32)?,
                qr.narrow(1, r0, n)?.to_dtype(DType::F32)?,
            );
            let (dq, dw) = (
                dq.narrow(1, r0, n)?.to_dtype(DType::F32)?,
                dw.narrow(1, r0, n)?.to_dtype(DType::F32)?,
            );
            view.queries_weights_backward(
                &x32,
                &qr32,
                &dq,
                &dw,
                &cos.narrow(0, r0, n)?,
                &sin.narrow(0, r0, n)?,
                sink,
            )?;
        }
        view.keys_weights_backward(&x, &dk.to_dtype(DType::F32)?, cos, sin, rows, sink)
    }

    /// The queries' and head weights' projections backward for one chunk of n tokens: dq
    /// [B, n, HI, DI] (of the RoPE'd queries) and dw [B, n, HI] (of the scaled head weights)
    /// into wq_b and weights_proj, from x32 [B, n, hidden] and qr32 [B, n, q_lora] (f32).
    #[allow(clippy::too_many_arguments)]
    fn queries_weights_backward(
        &self,
        x32: &Tensor,
        qr32: &Tensor,
        dq: &Tensor,
        dw: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        grads: &mut dyn GradSink,
    ) -> Result<()> {
        let (b, n, hi, di) = dq.dims4()?;
        if grads.wants(&self.wq_b) {
            let dq_lin = self
                .rope_prefix_backward(dq, cos, sin)?
                .reshape((b, n, hi * di))?;
            grads.add(&self.wq_b, linear_weight_grad(qr32, &dq_lin)?)?;
        }
        if grads.wants(&self.weights_proj) {
            let head_scale = (hi as f64).powf(-0.5) * (di as f64).powf(-0.5);
            grads.add(
                &self.weights_proj,
                linear_weight_grad(x32, &(dw * head_scale)?)?,
            )?;
        }
        Ok(())
    }

    /// The keys' backward: dk [B, T, DI] (f32, of the RoPE'd keys) through the RoPE, k_norm
    /// (`ops::layer_norm_backward`) and wk, `rows` tokens at a time from x [B, T, hidden];
    /// nothing when all three are frozen.
    fn keys_weights_backward(
        &self,
        x: &Tensor,
        dk: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        rows: usize,
        grads: &mut dyn GradSink,
    ) -> Result<()> {
        let (b, t, _) = x.dims3()?;
        let di = self.head_dim;
        let keys_learn = [&self.wk, &self.k_norm_weight, &self.k_norm_bias]
            .iter()
            .any(|p| grads.wants(p));
        for r0 in (0..t).step_by(rows.max(1)).filter(|_| keys_learn) {
            let n = rows.max(1).min(t - r0);
            let x32 = x.narrow(1, r0, n)?.to_dtype(DType::F32)?;
            let k_lin = linear(&x32, &self.wk)?; // [B, n, DI]
            let dkn = self
                .rope_prefix_backward(
                    &dk.narrow(1, r0, n)?.reshape((b, n, 1, di))?,
                    &cos.narrow(0, r0, n)?,
                    &sin.narrow(0, r0, n)?,
                )?
                .reshape((b, n, di))?;
            let (dk_lin, dnw, dnb) =
                layer_norm_backward(&k_lin, &self.k_norm_weight, K_NORM_EPS, &dkn)?;
            add_if_wanted(grads, &self.k_norm_weight, Some(dnw))?;
            add_if_wanted(grads, &self.k_norm_bias, Some(dnb))?;
            if grads.wants(&self.wk) {
                grads.add(&self.wk, linear_weight_grad(&x32, &dk_lin)?)?;
            }
        }
        Ok(())
    }
}

/// One layer's sparse-stage indexer KL, as `Indexer::sparse_kl_backward` takes it: the
/// indexer's detached inputs x [B, T, hidden] and qr [B, T, q_lora], the keys [B, T, DI] (f32),
/// the target [B, T, K] and sets `sel`, the RoPE tables of positions 0.. (at least T rows),
/// query rows per block and the loss weight.
#[derive(Clone, Copy)]
pub struct SparseKl<'a> {
    pub x: &'a Tensor,
    pub qr: &'a Tensor,
    pub keys: &'a Tensor,
    pub target: &'a Tensor,
    pub sel: &'a crate::dsa::Selection,
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
    pub rows: usize,
    pub weight: f64,
    /// Context parallelism: x, qr, the target and the sets are this rank's query rows; the
    /// keys every position's (None: every row of the sequence).
    pub shard: Option<&'a crate::dist::context::ContextShard>,
    /// The queries [B, rows, HI, DI] and head weights [B, rows, HI] of x and qr (f32) where
    /// the first pass kept them (None: projected again a block at a time).
    pub queries: Option<(&'a Tensor, &'a Tensor)>,
}

impl Indexer {
    /// `backprop_sparse_kl` written out (its twin): the same loss, blocks and value, no
    /// autograd graph; gradients of wq_b, weights_proj, wk and k_norm go to `grads`. Per block
    /// of `rows` queries: q and w projected again (f32), the scores at the sets, the KL rows and
    /// their gradient d(scores) = weight / (B T) (softmax(scores) sum(p) - p) (f32), through the
    /// scores' kernel backward (or `IndexerProj::scores_at_backward`'s plain form) into dq, dw
    /// and the block's dk; dq through the RoPE and dw through the head scale into the two
    /// projections' weights (the inputs are detached: no dx). The keys' gradient, summed over
    /// the blocks in f32, then goes through the RoPE, k_norm (`ops::layer_norm_backward`) and
    /// wk a chunk of `rows` tokens at a time. Returns the mean KL (f32 scalar).
    pub fn sparse_kl_backward(&self, kl: &SparseKl, grads: &mut dyn GradSink) -> Result<Tensor> {
        let mut originals = Originals::default();
        let view = self.detached_view(&mut originals);
        view.sparse_kl_backward_detached(
            kl,
            &mut ToOriginals {
                inner: grads,
                originals,
            },
        )
    }

    fn sparse_kl_backward_detached(
        &self,
        kl: &SparseKl,
        grads: &mut dyn GradSink,
    ) -> Result<Tensor> {
        let SparseKl {
            keys,
            target,
            sel,
            cos,
            sin,
            rows,
            weight,
            shard,
            queries,
            ..
        } = *kl;
        let (x, qr) = (kl.x.detach(), kl.qr.detach());
        let (b, local, _) = x.dims3()?;
        // The KL is a mean over every query of the sequences (t each), whichever rank holds it.
        let (t, query_rows) = match shard {
            Some(s) => (s.t, s.rows.clone()),
            None => (local, crate::dist::context::QueryRows::whole(local)),
        };
        let (hi, di) = (self.heads, self.head_dim);
        let rows = rows.clamp(1, t.max(1));
        let keys = keys.detach();
        let head_scale = (hi as f64).powf(-0.5) * (di as f64).powf(-0.5);
        let scale = weight / (b * t) as f64;
        let mut dk = keys.zeros_like()?.to_dtype(DType::F32)?;
        let mut total: Option<Tensor> = None;
        for block in query_rows.blocks(rows) {
            let (q0, n) = (block.local, block.n);
            let region = crate::profile::region("indexer KL bwd: project queries");
            let (cos_b, sin_b) = (cos.narrow(0, block.pos, n)?, sin.narrow(0, block.pos, n)?);
            let qr32 = qr.narrow(1, q0, n)?.to_dtype(DType::F32)?;
            let x32 = x.narrow(1, q0, n)?.to_dtype(DType::F32)?;
            let (q, w) = match queries {
                Some((q, w)) => (q.narrow(1, q0, n)?.contiguous()?, w.narrow(1, q0, n)?),
                None => (
                    self.rope_prefix(
                        &linear(&qr32, &self.wq_b)?.reshape((b, n, hi, di))?,
                        &cos_b,
                        &sin_b,
                    )?
                    .contiguous()?,
                    (linear(&x32, &self.weights_proj)? * head_scale)?,
                ),
            };
            drop(region);
            let region = crate::profile::region("indexer KL bwd: scores at the sets");
            let block = IndexerProj {
                q,
                k: keys.clone(),
                w,
            };
            let set = sel.rows(q0, n)?;
            let on_set = (block.scores_at(&set, self.kernels, self.tensor_cores)? + set.bias()?)?; // [B, n, K]
            drop(region);
            let region = crate::profile::region("indexer KL bwd: KL rows and their gradient");
            let p = target.narrow(1, q0, n)?.to_dtype(DType::F32)?;
            let kl_sum = crate::losses::kl_rows(&p, &on_set)?.sum_all()?;
            total = Some(match total {
                Some(a) => (a + kl_sum)?,
                None => kl_sum,
            });
            let d_on = ((softmax_last(&on_set)?.broadcast_mul(&p.sum_keepdim(D::Minus1)?)? - &p)?
                * scale)?;
            drop(region);
            let _region = crate::profile::region("indexer KL bwd: explicit backward of the block");
            let (dq, dw, dk_block) =
                block.scores_at_backward(&set, self.kernels, self.tensor_cores, &d_on)?;
            dk = (dk + dk_block.to_dtype(DType::F32)?)?;
            self.queries_weights_backward(&x32, &qr32, &dq, &dw, &cos_b, &sin_b, grads)?;
        }
        let _region = crate::profile::region("indexer KL bwd: keys backward");
        let (dk, cos, sin) = match shard {
            // Every position's key gradient home to the rank holding its row.
            Some(s) => (
                s.scatter_sum(&dk)?,
                s.rows.take(cos, 0)?,
                s.rows.take(sin, 0)?,
            ),
            None => (dk, cos.clone(), sin.clone()),
        };
        self.keys_weights_backward(&x, &dk, &cos, &sin, rows, grads)?;
        match total {
            Some(s) => s / (b * t) as f64,
            None => candle_core::bail!("the sparse-stage KL of an empty sequence"),
        }
    }
}

/// The explicit sparse-stage KL backward (`Indexer::sparse_kl_backward`) against its autograd
/// twin (`backprop_sparse_kl`) on random f32 weights and inputs of shape (B, T, hidden,
/// q_lora, HI, DI, R, k), `rows` queries per block, with `tensor_cores` scoring on CUDA:
/// (relative error of the KL, largest max-relative error over the five weights' gradients).
/// Errors if either side gives a weight no gradient. For the unit test and gpu-selftest.
#[allow(clippy::type_complexity)]
pub fn sparse_kl_against_autograd(
    dev: &candle_core::Device,
    tensor_cores: bool,
    shape: (usize, usize, usize, usize, usize, usize, usize, usize),
    rows: usize,
    seed: u64,
) -> anyhow::Result<(f32, f32)> {
    use crate::rng::randn;
    let (b, t, d, ql, hi, di, rope, k) = shape;
    let cpu = candle_core::Device::Cpu;
    let var = |shape: &[usize], s: u64, std: f64, mean: f64| -> Result<Tensor> {
        let v = (randn(shape, seed * 100 + s, std, &cpu)? + mean)?.to_device(dev)?;
        Ok(candle_core::Var::from_tensor(&v)?.as_tensor().clone())
    };
    let ix = Indexer {
        tensor_cores,
        kernels: KernelPolicy::default(),
        scores: Default::default(),
        wq_b: var(&[hi * di, ql], 1, 0.3, 0.0)?,
        wk: var(&[di, d], 2, 0.3, 0.0)?,
        k_norm_weight: var(&[di], 3, 0.1, 1.0)?,
        k_norm_bias: var(&[di], 4, 0.1, 0.0)?,
        weights_proj: var(&[hi, d], 5, 0.3, 0.0)?,
        heads: hi,
        head_dim: di,
        rope,
    };
    let x = randn(&[b, t, d], seed + 6, 1.0, &cpu)?.to_device(dev)?;
    let qr = randn(&[b, t, ql], seed + 7, 1.0, &cpu)?.to_device(dev)?;
    let angles = (randn(&[t, rope / 2], seed + 8, 1.0, &cpu)? * 40.0)?.to_device(dev)?;
    let (cos, sin) = (angles.cos()?, angles.sin()?);
    let proj = ix.project(&x, &qr, &cos, &sin)?.detach();
    let sel = crate::dsa::select_topk(&proj.scores(&crate::dsa::causal_bias(t, dev)?)?, k)?;
    // A target distribution over each query's valid slots.
    let target =
        softmax_last(&(randn(&[b, t, k], seed + 10, 1.0, &cpu)?.to_device(dev)? + sel.bias()?)?)?;
    let params = [
        &ix.wq_b,
        &ix.wk,
        &ix.k_norm_weight,
        &ix.k_norm_bias,
        &ix.weights_proj,
    ];
    let mut twin: Vec<Option<Tensor>> = vec![None; params.len()];
    let kl_twin = ix.backprop_sparse_kl(
        (&x, &qr),
        &proj.k,
        &target,
        &sel,
        (&cos, &sin),
        rows,
        0.7,
        |gs| {
            for (i, p) in params.iter().enumerate() {
                if let Some(g) = gs.get(p) {
                    twin[i] = Some(match twin[i].take() {
                        Some(a) => (a + g)?,
                        None => g.clone(),
                    });
                }
            }
            Ok(())
        },
    )?;
    // The explicit backward twice: projecting the queries again, and reading the queries a
    // first pass kept (`SparseKl::queries`, as the saved-activation plan hands them).
    let (kept_q, kept_w) = ix.project_queries(&x, &qr, &cos, &sin)?;
    let (kept_q, kept_w) = (kept_q.detach(), kept_w.detach());
    let (mut worst, mut kl_err) = (0f32, 0f32);
    for queries in [None, Some((&kept_q, &kept_w))] {
        let mut sink = super::grad_sink::GradMap::default();
        let args = SparseKl {
            x: &x,
            qr: &qr,
            keys: &proj.k,
            target: &target,
            sel: &sel,
            cos: &cos,
            sin: &sin,
            shard: None,
            rows,
            weight: 0.7,
            queries,
        };
        let kl = ix.sparse_kl_backward(&args, &mut sink)?;
        let (a, e) = (
            kl_twin.to_dtype(DType::F32)?.to_scalar::<f32>()?,
            kl.to_dtype(DType::F32)?.to_scalar::<f32>()?,
        );
        kl_err = kl_err.max((a - e).abs() / a.abs().max(1e-3));
        for (i, p) in params.iter().enumerate() {
            let (Some(want), Some(got)) = (twin[i].as_ref(), sink.sums.get(&p.id())) else {
                anyhow::bail!(
                    "indexer weight {i}: the twin gives {} gradient, the explicit backward {}",
                    if twin[i].is_some() { "a" } else { "no" },
                    if sink.sums.contains_key(&p.id()) {
                        "one"
                    } else {
                        "none"
                    }
                );
            };
            let scale = want
                .abs()?
                .max_all()?
                .to_dtype(DType::F32)?
                .to_scalar::<f32>()?;
            let diff = (want.to_dtype(DType::F32)? - got)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            if scale == 0.0 {
                anyhow::bail!(
                    "indexer weight {i}: a zero gradient (the check would prove nothing)"
                );
            }
            worst = worst.max(diff / scale);
        }
    }
    Ok((kl_err, worst))
}

impl IndexerProj {
    /// The backward of `scores_at`: d(scores) [B, t, K] f32 -> (dq [B, t, HI, DI], dw [B, t, HI],
    /// dk [B, tk, DI]), f32. On CUDA the kernels' backward (the one the forward ran); the plain
    /// form: with k_sel the gathered keys and qk = q k_sel^T [BT, HI, K], g = d(scores) at
    /// valid slots: dw = g ReLU(qk)^T, d(qk) = w^T g where qk >= 0 (candle's ReLU gradient),
    /// dq = d(qk) k_sel, d(k_sel) = d(qk)^T q, each selected key's gradient added to its row.
    pub fn scores_at_backward(
        &self,
        sel: &crate::dsa::Selection,
        kernels: KernelPolicy,
        tensor_cores: bool,
        grad: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t, hi, di) = self.q.dims4()?;
        let tk = self.k.dim(1)?;
        let kk = sel.k()?;
        let q = self.q.contiguous()?.reshape((b * t, hi, di))?;
        let w = self.w.contiguous()?.reshape((b * t, hi))?;
        let k = self.k.reshape((b * tk, di))?;
        let grad = grad
            .to_dtype(DType::F32)?
            .contiguous()?
            .reshape((b * t, kk))?;
        let (dq, dw, dk) = if kernels.on(self.q.device()) {
            let idx = sel.absolute.contiguous()?.reshape((b * t, kk))?;
            if tensor_cores && crate::kernels::indexer_at_tc::supported(kernels, hi, di) {
                crate::kernels::indexer_at_tc::indexer_scores_at_bf16_backward(
                    &q, &w, &k, &idx, &grad,
                )?
            } else {
                crate::kernels::indexer_scores_at_backward(&q, &w, &k, &idx, &grad)?
            }
        } else {
            let offsets = Tensor::arange(0u32, b as u32, sel.absolute.device())?
                .affine(tk as f64, 0.0)?
                .reshape((b, 1, 1))?;
            let flat = sel
                .indices()?
                .broadcast_add(&offsets)?
                .contiguous()?
                .flatten_all()?;
            let k_sel = k.index_select(&flat, 0)?.reshape((b * t, kk, di))?; // [BT, K, DI]
            let qk = q.matmul(&k_sel.t()?.contiguous()?)?; // [BT, HI, K]
            let g = (grad * sel.valid()?.reshape((b * t, kk))?)?.reshape((b * t, 1, kk))?;
            let dw = g.matmul(&qk.relu()?.t()?)?.reshape((b * t, hi))?;
            let dqk =
                (w.reshape((b * t, hi, 1))?.matmul(&g)? * qk.ge(0f32)?.to_dtype(DType::F32)?)?; // [BT, HI, K]
            let dq = dqk.matmul(&k_sel)?;
            let dk_sel = dqk.t()?.matmul(&q)?.reshape((b * t * kk, di))?;
            let dk = Tensor::zeros((b * tk, di), DType::F32, q.device())?
                .index_add(&flat, &dk_sel, 0)?;
            (dq, dw, dk)
        };
        Ok((
            dq.reshape((b, t, hi, di))?,
            dw.reshape((b, t, hi))?,
            dk.reshape((b, tk, di))?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::randn;
    use candle_core::Device;

    #[test]
    fn scores_at_the_selection_equal_the_dense_scores_gathered() {
        let dev = Device::Cpu;
        let (b, t, hi, di) = (2, 19, 3, 8);
        let proj = IndexerProj {
            q: randn(&[b, t, hi, di], 1, 1.0, &dev).unwrap(),
            k: randn(&[b, t, di], 2, 1.0, &dev).unwrap(),
            w: randn(&[b, t, hi], 3, 1.0, &dev).unwrap(),
        };
        let causal = crate::dsa::causal_bias(t, &dev).unwrap();
        let dense = proj.scores(&causal).unwrap();
        let sel = crate::dsa::select_topk(&dense, 5).unwrap();
        let gathered =
            (dense.gather(&sel.indices().unwrap(), 2).unwrap() * sel.valid().unwrap()).unwrap();
        let direct = proj
            .scores_at(&sel, KernelPolicy::default(), false)
            .unwrap();
        let diff = (gathered - direct)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "{diff}");
        // Streaming selection in blocks of 4 queries picks the same sets.
        let blocks = crate::dist::context::QueryRows::whole(t).blocks(4);
        let streamed = crate::dsa::select_topk_streaming(b, t, 5, &blocks, None, &dev, |r| {
            Ok(proj
                .scores_rows(r.pos, r.n)?
                .broadcast_add(&causal.narrow(0, r.pos, r.n)?)?)
        })
        .unwrap();
        assert_eq!(
            streamed.indices().unwrap().to_vec3::<u32>().unwrap(),
            sel.indices().unwrap().to_vec3::<u32>().unwrap()
        );
    }
}

#[cfg(test)]
mod grad_tests {
    use super::*;
    use crate::rng::randn;
    use candle_core::{Device, Var};

    /// The explicit sparse-stage KL backward against its autograd twin on the CPU in f32: the
    /// KL and every indexer weight's gradient within 1e-5 relative, at blocks of every row, 4
    /// rows and 1 row (padded sets for the first queries; head dim longer than the RoPE part).
    #[test]
    fn explicit_sparse_kl_backward_matches_autograd() {
        for rows in [11, 4, 1] {
            let (kl_err, grad_err) = sparse_kl_against_autograd(
                &Device::Cpu,
                false,
                (2, 11, 24, 20, 3, 16, 8, 4),
                rows,
                1,
            )
            .unwrap();
            assert!(
                kl_err <= 1e-6 && grad_err <= 1e-5,
                "rows {rows}: KL off by {kl_err}, gradients by {grad_err}"
            );
        }
    }

    /// `projections_backward` against its autograd twin `backprop_rows` on random projection
    /// gradients (f32, within 1e-5 relative), chunks of every row and of 3 rows.
    #[test]
    fn explicit_projections_backward_matches_autograd() {
        let dev = Device::Cpu;
        let (b, t, d, ql, hi, di, rope) = (2, 7, 24, 20, 3, 16, 8);
        let var = |shape: &[usize], seed: u64, mean: f64| {
            Var::from_tensor(&(randn(shape, seed, 0.3, &dev).unwrap() + mean).unwrap())
                .unwrap()
                .as_tensor()
                .clone()
        };
        let ix = Indexer {
            tensor_cores: false,
            kernels: KernelPolicy::default(),
            scores: Default::default(),
            wq_b: var(&[hi * di, ql], 1, 0.0),
            wk: var(&[di, d], 2, 0.0),
            k_norm_weight: var(&[di], 3, 1.0),
            k_norm_bias: var(&[di], 4, 0.0),
            weights_proj: var(&[hi, d], 5, 0.0),
            heads: hi,
            head_dim: di,
            rope,
        };
        let (x, qr) = (
            randn(&[b, t, d], 6, 1.0, &dev).unwrap(),
            randn(&[b, t, ql], 7, 1.0, &dev).unwrap(),
        );
        let angles = randn(&[t, rope / 2], 8, 3.0, &dev).unwrap();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        let (dq, dw, dk) = (
            randn(&[b, t, hi, di], 9, 1.0, &dev).unwrap(),
            randn(&[b, t, hi], 10, 1.0, &dev).unwrap(),
            randn(&[b, t, di], 11, 1.0, &dev).unwrap(),
        );
        let params = [
            &ix.wq_b,
            &ix.wk,
            &ix.k_norm_weight,
            &ix.k_norm_bias,
            &ix.weights_proj,
        ];
        for rows in [t, 3] {
            let mut twin: Vec<Option<Tensor>> = vec![None; params.len()];
            ix.backprop_rows(&x, &qr, &cos, &sin, (&dq, &dw, &dk), rows, |gs| {
                for (i, p) in params.iter().enumerate() {
                    if let Some(g) = gs.get(p) {
                        twin[i] = Some(match twin[i].take() {
                            Some(a) => (a + g)?,
                            None => g.clone(),
                        });
                    }
                }
                Ok(())
            })
            .unwrap();
            let mut sink = crate::model::grad_sink::GradMap::default();
            ix.projections_backward(&x, &qr, &cos, &sin, (&dq, &dw, &dk), rows, &mut sink)
                .unwrap();
            for (i, p) in params.iter().enumerate() {
                let want = twin[i].as_ref().unwrap();
                let got = &sink.sums[&p.id()];
                let scale = want
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                let diff = (want - got)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(
                    scale > 0.0 && diff <= 1e-5 * scale,
                    "rows {rows}: parameter {i}: max diff {diff} (max |g| {scale})"
                );
            }
        }
    }

    #[test]
    fn scores_at_passes_gradients_to_queries_keys_and_weights() {
        let dev = Device::Cpu;
        let (b, t, hi, di) = (1, 30, 4, 16);
        let q = Var::from_tensor(&randn(&[b, t, hi, di], 3, 1.0, &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&randn(&[b, t, hi], 4, 1.0, &dev).unwrap()).unwrap();
        let k = Var::from_tensor(&randn(&[b, t, di], 5, 1.0, &dev).unwrap()).unwrap();
        let proj = IndexerProj {
            q: q.as_tensor().clone(),
            k: k.as_tensor().clone(),
            w: w.as_tensor().clone(),
        };
        let causal = crate::dsa::causal_bias(t, &dev).unwrap();
        let sel = crate::dsa::select_topk(&proj.scores(&causal).unwrap().detach(), 8).unwrap();
        let up = randn(&[b, t, 8], 6, 1.0, &dev).unwrap();
        let g = (proj
            .scores_at(&sel, KernelPolicy::default(), false)
            .unwrap()
            * up)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&q, &w, &k] {
            let n = g
                .get(v.as_tensor())
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(n > 0.0, "zero gradient for {:?}", v.shape());
        }
    }
}
