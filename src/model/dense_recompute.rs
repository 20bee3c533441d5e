//! Dense causal attention for training without an [H, T, T] graph: the forward keeps only the
//! output and the per-head log-sum-exp, the backward recomputes the probabilities a block of
//! query rows at a time (FlashAttention-2's backward, at block granularity, in candle ops).
//!
//! Why: the dense pre-training stage differentiated the plain softmax attention, whose graph
//! holds several [B, H, T, T] f32 tensors per layer: 32 GiB per layer at 8K on the mini model,
//! out of memory from 16K, and the step spends its time streaming them. Here the forward is
//! the flash-style kernel (bf16 models on CUDA, `kernels::warmup_kl::dense_attention_fwd`) or
//! the same computation a block at a time (the plain twin, any device and dtype), and the
//! backward for the query rows q0..q0+n touches only the keys 0..q0+n (causality halves the
//! work): a block holds p, dp, ds and their temporaries, a few [B, H, n, q0+n] f32 tensors,
//! plus the f32 dk and dv of every row (padded to T each block before they are added).
//!
//! On CUDA with bf16 inputs the backward is the tensor-core kernel
//! (`kernels::warmup_kl::dense_attention_bwd`: FlashAttention-2's maths, bf16 products, f32
//! accumulators, deterministic); `backward_blocks` below is its plain twin and the path of
//! every other device, dtype and head dim.
//!
//! Numerics of the plain twin (per block, all f32): s = scale q.k (f32 products of the inputs), p = exp(s + bias
//! - lse), dv += p^T do, dp = do v^T, ds = p (dp - delta) with delta = rowsum(do * o), dq =
//! scale ds k, dk += scale ds^T q. The probabilities are recomputed from the forward's lse, so
//! a row sums to 1 up to the rounding of lse; dk and dv are summed over blocks in f32.
//!
//! Document masking: `starts` (None or u32 [B, T], each query's first key) restricts query t
//! of sequence b to the keys start[b, t] ..= t, through the bias (`dsa::key_bias_rows`: MASKED
//! before the start as above the diagonal, so those keys get p = 0 exactly) in the plain path
//! and the kernels' per-row start otherwise. None is start 0: plain causal attention.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, D};

use crate::dist::context::{QueryRows, RowBlock};
use crate::kernels::{Fused, KernelPolicy};

/// Query rows per block so that one block's [B, H, rows, T] f32 scores hold about 2^27 values
/// (512 MiB), at least 16 rows.
pub fn block_rows(b: usize, h: usize, t: usize) -> usize {
    ((1usize << 27) / (b * h * t).max(1)).clamp(16, t.max(16))
}

/// Causal softmax attention q, k [B, H, T, DQK], v [B, H, T, DV] -> [B, H, T, DV] in v's
/// dtype, differentiable in q, k and v, scores `scale * q.k`. `rows`: query rows per block of
/// the backward (and of the plain forward); 0 picks `block_rows`. `starts`: None, or u32
/// [B, T] with each query's first key (document masking), kept for the backward.
pub fn attention(
    kernels: KernelPolicy,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    rows: usize,
    starts: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, h, t, _) = q.dims4()?;
    let rows = if rows == 0 { block_rows(b, h, t) } else { rows };
    let (qd, kd, vd) = (q.detach(), k.detach(), v.detach());
    let kernel = q.dtype() == DType::BF16
        && kernels.on(q.device())
        && crate::kernels::warmup_kl::supported(q.dim(3)?, v.dim(3)?, 1, 16);
    let (out, lse) = if kernel {
        crate::kernels::warmup_kl::dense_attention_fwd(&qd, &kd, &vd, scale, starts)?
    } else {
        forward_blocks(&qd, &kd, &vd, scale, rows, starts)?
    };
    // A fresh buffer holding exactly the output (offset 0, no more elements than the shape):
    // the op below hands out a copy of the whole buffer as a contiguous tensor.
    let out = out.to_dtype(v.dtype())?.force_contiguous()?;
    q.apply_op3(
        k,
        v,
        RecomputingBackward {
            out,
            lse,
            scale,
            rows,
            kernels,
            starts: starts.cloned(),
        },
    )
}

/// The plain forward, a block of query rows at a time: (out [B, H, T, DV] f32, lse [B, H, T]).
/// `starts`: None or u32 [B, T] (each query's first key).
pub fn forward_blocks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    rows: usize,
    starts: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let blocks = QueryRows::whole(q.dim(2)?).blocks(rows.max(1));
    forward_rows(q, k, v, scale, &blocks, starts)
}

/// `forward_blocks` for query rows at any positions (context parallelism): q [B, H, n, DQK]
/// holds the rows of `blocks` (each `RowBlock`'s `n` rows from local row `local`, at sequence
/// positions `pos`..), k [B, H, T, DQK] and v [B, H, T, DV] every position's; row r attends to
/// the keys up to its position. `starts`: None or u32 [B, T] by position. -> (out [B, H, n, DV]
/// f32, lse [B, H, n]) in local row order (the blocks cover the rows in order).
pub fn forward_rows(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    blocks: &[RowBlock],
    starts: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let (q, k, v) = (
        q.to_dtype(DType::F32)?,
        k.to_dtype(DType::F32)?,
        v.to_dtype(DType::F32)?,
    );
    let (mut outs, mut lses) = (vec![], vec![]);
    for &blk in blocks {
        let keys = blk.pos + blk.n;
        let s = scores(&q, &k, scale, blk, starts)?; // [B, H, n, keys]
        let lse = crate::ops::logsumexp_last(&s)?; // [B, H, n, 1]
        let p = s.broadcast_sub(&lse)?.exp()?;
        outs.push(p.matmul(&v.narrow(2, 0, keys)?.contiguous()?)?);
        lses.push(lse.squeeze(D::Minus1)?);
    }
    Ok((Tensor::cat(&outs, 2)?, Tensor::cat(&lses, 2)?))
}

/// scale q.k + mask bias for the query rows of `blk` against keys 0..blk.pos + blk.n, f32
/// [B, H, n, keys]: the causal bias, and with `starts` (u32 [B, T]) MASKED before each query's
/// first key too.
fn scores(
    q: &Tensor,
    k: &Tensor,
    scale: f64,
    blk: RowBlock,
    starts: Option<&Tensor>,
) -> Result<Tensor> {
    let (q0, n, keys) = (blk.pos, blk.n, blk.pos + blk.n);
    let qb = q.narrow(2, blk.local, n)?.contiguous()?;
    let kb = k.narrow(2, 0, keys)?.contiguous()?;
    let rows = starts.map(|s| s.narrow(1, q0, n)).transpose()?; // [B, n]
    let bias = crate::dsa::key_bias_rows(q0, n, keys, rows.as_ref(), q.device())?;
    // [n, keys] broadcasts as is; [B, n, keys] over the heads as [B, 1, n, keys].
    let bias = if bias.rank() == 3 {
        bias.unsqueeze(1)?
    } else {
        bias
    };
    (qb.matmul(&kb.t()?)? * scale)?.broadcast_add(&bias)
}

/// The backward a block of query rows at a time: (dq, dk, dv) in f32. `starts`: the
/// forward's (None or u32 [B, T]).
#[allow(clippy::too_many_arguments)]
pub fn backward_blocks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    dout: &Tensor,
    scale: f64,
    rows: usize,
    starts: Option<&Tensor>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let blocks = QueryRows::whole(q.dim(2)?).blocks(rows.max(1));
    backward_rows(q, k, v, out, lse, dout, scale, &blocks, starts)
}

/// `backward_blocks` for query rows at any positions (`forward_rows`' backward): dq [B, H, n,
/// DQK] of the rows, dk and dv of every position [B, H, T, .], all f32.
#[allow(clippy::too_many_arguments)]
pub fn backward_rows(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    dout: &Tensor,
    scale: f64,
    blocks: &[RowBlock],
    starts: Option<&Tensor>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let t = k.dim(2)?;
    let f = |x: &Tensor| x.to_dtype(DType::F32);
    let (q, k, v, dout) = (f(q)?, f(k)?, f(v)?, f(dout)?);
    let delta = (&dout * f(out)?)?.sum_keepdim(D::Minus1)?; // [B, H, T, 1]
    let lse = f(lse)?.unsqueeze(D::Minus1)?; // [B, H, T, 1]
    let mut dk = k.zeros_like()?;
    let mut dv = v.zeros_like()?;
    let mut dqs = vec![];
    for &blk in blocks {
        let (l0, n, keys) = (blk.local, blk.n, blk.pos + blk.n);
        let p = scores(&q, &k, scale, blk, starts)?
            .broadcast_sub(&lse.narrow(2, l0, n)?)?
            .exp()?; // [B, H, n, keys]
        let do_b = dout.narrow(2, l0, n)?.contiguous()?;
        let v_b = v.narrow(2, 0, keys)?.contiguous()?;
        let k_b = k.narrow(2, 0, keys)?.contiguous()?;
        let dp = do_b.matmul(&v_b.t()?)?;
        let ds = (p.clone() * dp.broadcast_sub(&delta.narrow(2, l0, n)?)?)?;
        dqs.push((ds.matmul(&k_b)? * scale)?);
        let pad = |x: Tensor| x.pad_with_zeros(2, 0, t - keys);
        dv = (dv + pad(p.t()?.matmul(&do_b)?)?)?;
        dk = (dk + pad((ds.t()?.matmul(&q.narrow(2, l0, n)?.contiguous()?)? * scale)?)?)?;
    }
    Ok((Tensor::cat(&dqs, 2)?, dk, dv))
}

/// The tensor-core backward (`kernels::warmup_kl::dense_attention_bwd`) for bf16 on CUDA at the
/// head dims it takes, where the policy uses it (`Fused::DenseBwd`); otherwise
/// `backward_blocks`, its plain twin.
pub fn use_backward_kernel(kernels: KernelPolicy, q: &Tensor, v: &Tensor) -> Result<bool> {
    Ok(q.dtype() == DType::BF16
        && v.dtype() == DType::BF16
        && kernels.uses(Fused::DenseBwd, q.device())
        && crate::kernels::warmup_kl::backward_supported(q.dim(3)?, v.dim(3)?))
}

/// Attaches the recomputing backward to an output computed without a graph: the forward hands
/// out a copy of `out`; the backward runs the kernel or `backward_blocks` on the detached inputs.
struct RecomputingBackward {
    out: Tensor,
    lse: Tensor,
    scale: f64,
    rows: usize,
    kernels: KernelPolicy,
    /// The forward's key starts (u32 [B, T]), None for plain causal attention.
    starts: Option<Tensor>,
}

impl RecomputingBackward {
    fn shape(&self) -> Shape {
        self.out.shape().clone()
    }
}

impl CustomOp3 for RecomputingBackward {
    fn name(&self) -> &'static str {
        "dsa-dense-attention-recomputing"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (s, l) = self.out.storage_and_layout();
        match &*s {
            Storage::Cpu(c) => Ok((
                candle_core::backend::BackendStorage::try_clone(c, l)?,
                self.shape(),
            )),
            _ => candle_core::bail!("dense attention: the output is not on the CPU"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (s, l) = self.out.storage_and_layout();
        match &*s {
            Storage::Cuda(c) => Ok((
                candle_core::backend::BackendStorage::try_clone(c, l)?,
                self.shape(),
            )),
            _ => candle_core::bail!("dense attention: the output is not on the GPU"),
        }
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (q, k, v, grad) = (q.detach(), k.detach(), v.detach(), grad.detach());
        let (dq, dk, dv) = if use_backward_kernel(self.kernels, &q, &v)? {
            crate::kernels::warmup_kl::dense_attention_bwd(
                &q,
                &k,
                &v,
                &self.out,
                &self.lse,
                &grad.to_dtype(DType::BF16)?,
                self.scale,
                self.starts.as_ref(),
            )?
        } else {
            backward_blocks(
                &q,
                &k,
                &v,
                &self.out,
                &self.lse,
                &grad,
                self.scale,
                self.rows,
                self.starts.as_ref(),
            )?
        };
        Ok((
            Some(dq.to_dtype(q.dtype())?),
            Some(dk.to_dtype(k.dtype())?),
            Some(dv.to_dtype(v.dtype())?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The plain attention of the whole sequence, differentiated by autograd.
    fn whole(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
        let t = q.dim(2)?;
        let s = scores(
            q,
            k,
            scale,
            RowBlock {
                local: 0,
                pos: 0,
                n: t,
            },
            None,
        )?;
        crate::ops::softmax_last(&s)?.matmul(v)
    }

    #[test]
    fn blocked_forward_and_recomputed_backward_equal_autograd_of_the_whole_softmax() -> Result<()> {
        let dev = Device::Cpu;
        for (b, h, t, dqk, dvv, rows) in [
            (1, 1, 1, 4, 3, 1),
            (2, 3, 97, 12, 8, 7),
            (1, 2, 33, 8, 8, 32),
            (1, 2, 40, 8, 4, 64),
        ] {
            let seed = (t * 10 + rows) as u64;
            // Large scores (std 3 before the scale) so that the softmax is peaked, not flat.
            let q = Var::from_tensor(&crate::rng::randn(&[b, h, t, dqk], seed, 3.0, &dev)?)?;
            let k = Var::from_tensor(&crate::rng::randn(&[b, h, t, dqk], seed + 1, 3.0, &dev)?)?;
            let v = Var::from_tensor(&crate::rng::randn(&[b, h, t, dvv], seed + 2, 1.0, &dev)?)?;
            let up = crate::rng::randn(&[b, h, t, dvv], seed + 3, 1.0, &dev)?;
            let scale = 1.0 / (dqk as f64).sqrt();
            let ours = attention(
                KernelPolicy::default(),
                q.as_tensor(),
                k.as_tensor(),
                v.as_tensor(),
                scale,
                rows,
                None,
            )?;
            let reference = whole(q.as_tensor(), k.as_tensor(), v.as_tensor(), scale)?;
            let g1 = (&ours * &up)?.sum_all()?.backward()?;
            let g2 = (&reference * &up)?.sum_all()?.backward()?;
            let err = |a: &Tensor, b: &Tensor| -> Result<f32> {
                // A floor for gradients that vanish (T = 1: dq is 0 up to rounding).
                let scale = b
                    .abs()?
                    .flatten_all()?
                    .max(0)?
                    .to_scalar::<f32>()?
                    .max(1e-2);
                Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? / scale)
            };
            let e_out = err(&ours, &reference)?;
            assert!(e_out < 1e-5, "T {t} rows {rows}: out {e_out}");
            for (name, x) in [("dq", &q), ("dk", &k), ("dv", &v)] {
                let (a, r) = (
                    g1.get(x.as_tensor()).expect("grad"),
                    g2.get(x.as_tensor()).expect("grad"),
                );
                let e = err(a, r)?;
                assert!(e < 1e-4, "T {t} rows {rows}: {name} {e}");
            }
        }
        Ok(())
    }

    #[test]
    fn the_forward_keeps_the_log_sum_exp_of_each_row() -> Result<()> {
        let dev = Device::Cpu;
        let q = crate::rng::randn(&[1, 2, 9, 4], 1, 1.0, &dev)?;
        let k = crate::rng::randn(&[1, 2, 9, 4], 2, 1.0, &dev)?;
        let v = crate::rng::randn(&[1, 2, 9, 3], 3, 1.0, &dev)?;
        let (_, lse) = forward_blocks(&q, &k, &v, 0.5, 4, None)?;
        let s = scores(
            &q,
            &k,
            0.5,
            RowBlock {
                local: 0,
                pos: 0,
                n: 9,
            },
            None,
        )?;
        let expect = crate::ops::logsumexp_last(&s)?.squeeze(D::Minus1)?;
        let d = (lse - expect)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(d < 1e-6, "{d}");
        Ok(())
    }

    /// Key starts u32 [B, T] of sequences cut into documents of the given lengths.
    fn doc_starts(docs: &[Vec<usize>], t: usize) -> Result<Tensor> {
        let mut v = vec![];
        for seq in docs {
            assert_eq!(seq.iter().sum::<usize>(), t, "documents {seq:?}");
            let mut s0 = 0u32;
            for &len in seq {
                v.extend(std::iter::repeat_n(s0, len));
                s0 += len as u32;
            }
        }
        Tensor::from_vec(v, (docs.len(), t), &Device::Cpu)
    }

    /// max |a - b| / (1 + max |b|).
    fn max_err(a: &Tensor, b: &Tensor) -> Result<f32> {
        let d = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        let m = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        Ok(d / (1.0 + m))
    }

    /// With document starts, each document's rows of the blocked forward (out, lse) and backward
    /// (dq, dk, dv) equal those of the document run alone (its rows of q, k, v and dout, no
    /// starts): no query sees an earlier document, and no key gets gradient from a later one.
    /// Blocks of 4 rows put document boundaries inside blocks; a length-1 document is included.
    #[test]
    fn document_starts_equal_each_document_alone() -> Result<()> {
        let dev = Device::Cpu;
        let (b, h, t, dqk, dvv, rows) = (2usize, 3usize, 23usize, 8usize, 5usize, 4usize);
        let docs = vec![vec![5usize, 1, 10, 7], vec![23]];
        let starts = doc_starts(&docs, t)?;
        let r = |shape: &[usize], seed: u64| crate::rng::randn(shape, seed, 1.5, &dev);
        let (q, k, v, dout) = (
            r(&[b, h, t, dqk], 41)?,
            r(&[b, h, t, dqk], 42)?,
            r(&[b, h, t, dvv], 43)?,
            r(&[b, h, t, dvv], 44)?,
        );
        let scale = 0.45;
        let (out, lse) = forward_blocks(&q, &k, &v, scale, rows, Some(&starts))?;
        let (dq, dk, dv) =
            backward_blocks(&q, &k, &v, &out, &lse, &dout, scale, rows, Some(&starts))?;
        // Sequence 0 has four documents, so starts must change its rows (the test can fail).
        let (causal_out, _) = forward_blocks(&q, &k, &v, scale, rows, None)?;
        assert!(
            max_err(&out, &causal_out)? > 1e-2,
            "the starts changed nothing"
        );
        // `attention` carries the starts to its backward: its gradients are backward_blocks'.
        let vars = [&q, &k, &v].map(|x| Var::from_tensor(x).expect("var"));
        let o = attention(
            KernelPolicy::default(),
            vars[0].as_tensor(),
            vars[1].as_tensor(),
            vars[2].as_tensor(),
            scale,
            rows,
            Some(&starts),
        )?;
        assert!(max_err(&o, &out)? == 0.0, "attention's output");
        let grads = (&o * &dout)?.sum_all()?.backward()?;
        for (what, x, want) in [
            ("dq", &vars[0], &dq),
            ("dk", &vars[1], &dk),
            ("dv", &vars[2], &dv),
        ] {
            let e = max_err(grads.get(x.as_tensor()).expect("grad"), want)?;
            assert!(e == 0.0, "attention's {what}: {e}");
        }
        for (bi, seq) in docs.iter().enumerate() {
            let mut s0 = 0;
            for &len in seq {
                let cut = |x: &Tensor| -> Result<Tensor> { x.narrow(0, bi, 1)?.narrow(2, s0, len) };
                let (qd, kd, vd, dod) = (cut(&q)?, cut(&k)?, cut(&v)?, cut(&dout)?);
                let (o1, l1) = forward_blocks(&qd, &kd, &vd, scale, 3, None)?;
                let (dq1, dk1, dv1) =
                    backward_blocks(&qd, &kd, &vd, &o1, &l1, &dod, scale, 3, None)?;
                let lse_rows = lse.narrow(0, bi, 1)?.narrow(2, s0, len)?;
                for (what, got, want) in [
                    ("out", cut(&out)?, o1),
                    ("lse", lse_rows, l1),
                    ("dq", cut(&dq)?, dq1),
                    ("dk", cut(&dk)?, dk1),
                    ("dv", cut(&dv)?, dv1),
                ] {
                    let e = max_err(&got, &want)?;
                    assert!(
                        e < 1e-5,
                        "sequence {bi}, document at {s0} (length {len}): {what} {e}"
                    );
                }
                s0 += len;
            }
        }
        Ok(())
    }

    /// All-zero starts are the causal attention bit for bit: the blocked forward and backward
    /// and `attention`'s autograd (the recomputing op carries its starts to the backward).
    #[test]
    fn all_zero_starts_equal_no_starts_exactly() -> Result<()> {
        let dev = Device::Cpu;
        let (b, h, t, dqk, dvv) = (2usize, 2usize, 19usize, 8usize, 4usize);
        let zeros = Tensor::zeros((b, t), DType::U32, &dev)?;
        let q = Var::from_tensor(&crate::rng::randn(&[b, h, t, dqk], 51, 2.0, &dev)?)?;
        let k = Var::from_tensor(&crate::rng::randn(&[b, h, t, dqk], 52, 2.0, &dev)?)?;
        let v = Var::from_tensor(&crate::rng::randn(&[b, h, t, dvv], 53, 1.0, &dev)?)?;
        let dout = crate::rng::randn(&[b, h, t, dvv], 54, 1.0, &dev)?;
        let bits = |x: &Tensor| -> Result<Vec<u32>> {
            Ok(x.flatten_all()?
                .to_vec1::<f32>()?
                .into_iter()
                .map(f32::to_bits)
                .collect())
        };
        let (qt, kt, vt) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
        let (o_n, l_n) = forward_blocks(qt, kt, vt, 0.3, 5, None)?;
        let (o_z, l_z) = forward_blocks(qt, kt, vt, 0.3, 5, Some(&zeros))?;
        assert_eq!(bits(&o_z)?, bits(&o_n)?, "out");
        assert_eq!(bits(&l_z)?, bits(&l_n)?, "lse");
        let g_n = backward_blocks(qt, kt, vt, &o_n, &l_n, &dout, 0.3, 5, None)?;
        let g_z = backward_blocks(qt, kt, vt, &o_n, &l_n, &dout, 0.3, 5, Some(&zeros))?;
        for (what, a, b) in [
            ("dq", &g_z.0, &g_n.0),
            ("dk", &g_z.1, &g_n.1),
            ("dv", &g_z.2, &g_n.2),
        ] {
            assert_eq!(bits(a)?, bits(b)?, "{what}");
        }
        let run = |starts: Option<&Tensor>| -> Result<Vec<Vec<u32>>> {
            let o = attention(KernelPolicy::default(), qt, kt, vt, 0.3, 5, starts)?;
            let g = (&o * &dout)?.sum_all()?.backward()?;
            let mut all = vec![bits(&o)?];
            for x in [&q, &k, &v] {
                all.push(bits(g.get(x.as_tensor()).expect("grad"))?);
            }
            Ok(all)
        };
        assert_eq!(
            run(Some(&zeros))?,
            run(None)?,
            "attention and its gradients"
        );
        Ok(())
    }
}
