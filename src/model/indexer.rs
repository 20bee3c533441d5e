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

use candle_core::{DType, Result, Tensor};

use crate::ops::{layer_norm, linear, rope_half};

pub struct Indexer {
    /// Score the sparse stage's KL on tensor cores (`kernels::indexer_at_tc`: q_I and k_I
    /// rounded to bf16, f32 sums): bf16 models on CUDA, whose selection is scored that way too.
    /// f32 models keep the f32 kernel (GPU runs that must match the CPU).
    pub tensor_cores: bool,
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
    /// Apply the half-split RoPE to the first `rope` dims of `x` [B, T, H, DI].
    fn rope_prefix(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let d = x.dim(3)?;
        let roped = rope_half(&x.narrow(3, 0, self.rope)?.contiguous()?, cos, sin)?;
        if d == self.rope {
            return Ok(roped);
        }
        Tensor::cat(&[&roped, &x.narrow(3, self.rope, d - self.rope)?], 3)
    }

    /// The indexer's queries, keys and head weights (differentiable, f32).
    pub fn project(&self, x: &Tensor, qr: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<IndexerProj> {
        let (q, w) = self.project_queries(x, qr, cos, sin)?;
        let k = self.project_keys(x, cos, sin)?;
        Ok(IndexerProj { q, k, w })
    }

    /// Queries [B, n, HI, DI] and head weights [B, n, HI] of the n tokens of x [B, n, hidden]
    /// and qr [B, n, q_lora] (differentiable, f32); `cos`/`sin` are the rope rows of those
    /// tokens' positions. Per token, so a block of rows gives exactly those rows of `project`.
    pub fn project_queries(&self, x: &Tensor, qr: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, t, _) = x.dims3()?;
        let (hi, di) = (self.heads, self.head_dim);
        let qr = qr.to_dtype(DType::F32)?;
        let q = linear(&qr, &self.wq_b)?.reshape((b, t, hi, di))?;
        let q = self.rope_prefix(&q, cos, sin)?.contiguous()?; // [B, T, HI, DI]
        let w = (linear(&x.to_dtype(DType::F32)?, &self.weights_proj)? * ((hi as f64).powf(-0.5) * (di as f64).powf(-0.5)))?; // [B, T, HI]
        Ok((q, w))
    }

    /// Keys [B, T, DI] of the tokens of x [B, T, hidden] (differentiable, f32).
    pub fn project_keys(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let di = self.head_dim;
        let k = layer_norm(&linear(&x.to_dtype(DType::F32)?, &self.wk)?, &self.k_norm_weight, &self.k_norm_bias, K_NORM_EPS)?;
        self.rope_prefix(&k.reshape((b, t, 1, di))?, cos, sin)?.reshape((b, t, di))?.contiguous() // [B, T, DI]
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
            let p = self.project(&x.narrow(1, r0, n)?, &qr.narrow(1, r0, n)?, &cos.narrow(0, r0, n)?, &sin.narrow(0, r0, n)?)?;
            let dot = |a: &Tensor, g: &Tensor| -> Result<Tensor> { (a * g.narrow(1, r0, n)?.to_dtype(DType::F32)?)?.sum_all() };
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
            let k = self.project_keys(&x.narrow(1, r0, n)?, &cos.narrow(0, r0, n)?, &sin.narrow(0, r0, n)?)?;
            on_grads(&(k * dk.narrow(1, r0, n)?.to_dtype(DType::F32)?)?.sum_all()?.backward()?)?;
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
            let (q, w) = self.project_queries(&x.narrow(1, q0, n)?, &qr.narrow(1, q0, n)?, &cos.narrow(0, q0, n)?, &sin.narrow(0, q0, n)?)?;
            drop(region);
            let region = crate::profile::region("indexer KL bwd: scores at the sets");
            let block = IndexerProj { q, k: keys.as_tensor().clone(), w };
            let set = sel.rows(q0, n)?;
            let on_set = (block.scores_at(&set, self.tensor_cores)? + set.bias()?)?; // [B, n, K]
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
            total = Some(match total { Some(a) => (a + kl_sum)?, None => kl_sum });
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
        Self { q: self.q.detach(), k: self.k.detach(), w: self.w.detach() }
    }

    /// Detached copies marked as leaves: a backward through losses built on them stops here
    /// and returns d/dq, d/dw, d/dk, which `Indexer::backprop_rows` then pushes into the
    /// indexer's parameters a chunk of tokens at a time (bounded memory at long lengths).
    pub fn leaves(&self) -> Result<Self> {
        let leaf = |t: &Tensor| -> Result<Tensor> { Ok(candle_core::Var::from_tensor(&t.detach())?.as_tensor().clone()) };
        Ok(Self { q: leaf(&self.q)?, k: leaf(&self.k)?, w: leaf(&self.w)? })
    }

    /// Scores of queries `q0..q0+n` against every key: [B, n, T] f32, causal bias not added.
    /// Holds a [B, n*HI, T] intermediate, so callers bound `n`.
    pub fn scores_rows(&self, q0: usize, n: usize) -> Result<Tensor> {
        let (b, _, hi, di) = self.q.dims4()?;
        let t = self.k.dim(1)?;
        let q = self.q.narrow(1, q0, n)?.reshape((b, n * hi, di))?.contiguous()?;
        let qk = q.matmul(&self.k.t()?.contiguous()?)?.relu()?.reshape((b, n, hi, t))?; // [B, n, HI, T]
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
    pub fn scores_at(&self, sel: &crate::dsa::Selection, tensor_cores: bool) -> Result<Tensor> {
        // The queries may be a block of rows (t of them) while the keys cover the sequence (tk).
        let (b, t, hi, di) = self.q.dims4()?;
        let tk = self.k.dim(1)?;
        let kk = sel.k()?;
        if crate::kernels::available(self.q.device()) {
            let q = self.q.contiguous()?.reshape((b * t, hi, di))?;
            let w = self.w.contiguous()?.reshape((b * t, hi))?;
            let k = self.k.reshape((b * tk, di))?;
            let idx = sel.absolute.contiguous()?.reshape((b * t, kk))?;
            if tensor_cores && crate::kernels::indexer_at_tc::supported(hi, di) {
                return crate::kernels::indexer_at_tc::indexer_scores_at_bf16(&q, &w, &k, &idx)?.reshape((b, t, kk));
            }
            return crate::kernels::indexer_scores_at(&q, &w, &k, &idx)?.reshape((b, t, kk));
        }
        let offsets = Tensor::arange(0u32, b as u32, sel.absolute.device())?.affine(tk as f64, 0.0)?.reshape((b, 1, 1))?;
        let flat = sel.indices()?.broadcast_add(&offsets)?.contiguous()?.flatten_all()?;
        let k_sel = self.k.reshape((b * tk, di))?.index_select(&flat, 0)?.reshape((b * t, kk, di))?; // [BT, K, DI]
        let q = self.q.contiguous()?.reshape((b * t, hi, di))?; // [BT, HI, DI]
        let qk = q.matmul(&k_sel.t()?.contiguous()?)?.relu()?; // [BT, HI, K]
        let w = self.w.contiguous()?.reshape((b * t, 1, hi))?;
        (w.matmul(&qk)?.reshape((b, t, kk))? * sel.valid()?)? // padding slots score 0
            .reshape((b, t, kk))
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
        let gathered = (dense.gather(&sel.indices().unwrap(), 2).unwrap() * sel.valid().unwrap()).unwrap();
        let direct = proj.scores_at(&sel, false).unwrap();
        let diff = (gathered - direct).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "{diff}");
        // Streaming selection in blocks of 4 queries picks the same sets.
        let streamed = crate::dsa::select_topk_streaming(b, t, 5, 4, &dev, |q0, n| {
            Ok(proj.scores_rows(q0, n)?.broadcast_add(&causal.narrow(0, q0, n)?)?)
        }).unwrap();
        assert_eq!(streamed.indices().unwrap().to_vec3::<u32>().unwrap(), sel.indices().unwrap().to_vec3::<u32>().unwrap());
    }
}

#[cfg(test)]
mod grad_tests {
    use super::*;
    use crate::rng::randn;
    use candle_core::{Device, Var};

    #[test]
    fn scores_at_passes_gradients_to_queries_keys_and_weights() {
        let dev = Device::Cpu;
        let (b, t, hi, di) = (1, 30, 4, 16);
        let q = Var::from_tensor(&randn(&[b, t, hi, di], 3, 1.0, &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&randn(&[b, t, hi], 4, 1.0, &dev).unwrap()).unwrap();
        let k = Var::from_tensor(&randn(&[b, t, di], 5, 1.0, &dev).unwrap()).unwrap();
        let proj = IndexerProj { q: q.as_tensor().clone(), k: k.as_tensor().clone(), w: w.as_tensor().clone() };
        let causal = crate::dsa::causal_bias(t, &dev).unwrap();
        let sel = crate::dsa::select_topk(&proj.scores(&causal).unwrap().detach(), 8).unwrap();
        let up = randn(&[b, t, 8], 6, 1.0, &dev).unwrap();
        let g = (proj.scores_at(&sel, false).unwrap() * up).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&q, &w, &k] {
            let n = g.get(v.as_tensor()).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(n > 0.0, "zero gradient for {:?}", v.shape());
        }
    }
}
