//! The two losses of DSA training, in differentiable plain form (f32 internals).
//!
//! - Language modelling: next-token cross-entropy, `-log softmax(logits[t])[token[t+1]]`.
//! - Indexer: per query row, `KL(p || softmax(I))` over the row's valid entries, where the
//!   target `p` is a detached distribution (head-mean attention probabilities) that is exactly
//!   zero on masked entries, and `I` carries `dsa::MASKED` there. Written as
//!   `sum p log p - sum p log_softmax(I)`, so the gradient w.r.t. `I` is `softmax(I) - p`
//!   computed from a log-sum-exp, never from the log of an underflowed probability.

use candle_core::{DType, Result, Tensor, D};

use crate::grad_rows::LinearWeightGrad;
use crate::kernels::KernelPolicy;
use crate::ops::{linear, log_softmax_last, rms_norm, rms_norm_backward};

/// Per-row KL(p || softmax(logits)) over the last dim. `p` and `logits` [..., n]; returns [...].
/// `p` is treated as a constant (detached); entries with p = 0 contribute nothing.
pub fn kl_rows(p: &Tensor, logits: &Tensor) -> Result<Tensor> {
    let p = p.to_dtype(DType::F32)?.detach();
    // p log p with 0 log 0 = 0: the clamp only touches entries whose p is (near) zero.
    let plogp = (&p * p.clamp(1e-38f32, 1f32)?.log()?)?.sum(D::Minus1)?;
    let cross = (&p * log_softmax_last(logits)?)?.sum(D::Minus1)?;
    plogp - cross
}

/// Per-position next-token cross-entropy: logits [B, T, V], tokens [B, T] u32 -> [B, T-1] f32
/// (position t predicts token t + 1).
pub fn next_token_nll(logits: &Tensor, tokens: &Tensor) -> Result<Tensor> {
    let (_, t, _) = logits.dims3()?;
    let lsm = log_softmax_last(&logits.narrow(1, 0, t - 1)?)?; // [B, T-1, V]
    let targets = tokens.narrow(1, 1, t - 1)?.unsqueeze(2)?.contiguous()?; // [B, T-1, 1]
    lsm.gather(&targets, 2)?.squeeze(2)?.neg()
}

/// Positions per LM-head chunk so that one chunk holds about 2^27 logits (with their gradient,
/// 0.5 GiB in bf16, plus one block of the loss's f32 work, `nll_rows_and_grad`).
pub fn lm_chunk_positions(batch: usize, vocab: usize) -> usize {
    ((1usize << 27) / (batch * vocab).max(1)).max(1)
}

/// Values per block of rows of the LM loss's f32 work: 2^24, 64 MiB per f32 tensor.
pub const LOSS_BLOCK: usize = 1 << 24;

/// Next-token NLL per row and its gradient, without an autograd graph over the logits.
/// `logits` [N, V] (any float dtype), `targets` [N] u32; returns the NLL of each row (f32 [N])
/// and d(weight * sum of NLL) / dlogits [N, V] in the logits' dtype, computed `block_values`
/// logits (whole rows) at a time. candle's backward of `-(log_softmax_last(logits)[target])`
/// would keep the f32 logits, their shifted copy, exp and log-softmax for the backward and add
/// the zeros-plus-sum copies of each node's gradient: about 38 bytes per logit for a chunk
/// (4.8 GiB for the 2^27 logits of a 671B chunk); here the f32 work exists for one block of
/// rows (at most 3 f32 tensors of the block at once) and the gradient is written into one
/// buffer in the logits' dtype.
///
/// Numerics: the operations that backward performs, in its order, so bit for bit its values.
/// With x = f32(logits), m = max(x) per row (detached there), e = exp(x - m), s = sum(e),
/// lse = log(s) + m: NLL = -(x[t] - lse). The seed of `loss * weight` is `affine(1, w)` = f32(w),
/// the sum's and negation's backward give -w at the target, so the gradient reaching x is
/// G = -w one-hot (scattered into zeros) from the direct path, and from the lse path exactly w
/// at lse (a sum of zeros and one value), w / s at s, (w / s) at every e, and (w / s) * e at
/// x - m: x's gradient is (0 + G) + (w / s) e, i.e. (w / s) e + (-w) at the target (one f32
/// addition, commutative) and (w / s) e elsewhere; cast to the logits' dtype. Each row's
/// reductions (max, sum) are the same kernels over the same row whatever the block.
///
/// On CUDA (bf16 or f32 logits) the fused kernels of `kernels::lm_loss` compute the same
/// formula in two passes over each row, without the f32 copies; their row sums run in another
/// order, so there the values agree with this path to f32 rounding rather than bit for bit.
pub fn nll_rows_and_grad(
    kernels: KernelPolicy,
    logits: &Tensor,
    targets: &Tensor,
    weight: f64,
    block_values: usize,
) -> Result<(Tensor, Tensor)> {
    let (rows, _) = logits.dims2()?;
    if targets.dims() != [rows] {
        candle_core::bail!(
            "the LM loss needs one target per row of logits ({:?} targets for {rows} rows)",
            targets.dims()
        );
    }
    if rows > 0
        && targets.dtype() == DType::U32
        && crate::kernels::lm_loss::supported(kernels, logits)
    {
        return crate::kernels::lm_loss::nll_rows_and_grad(logits, targets, weight);
    }
    nll_rows_and_grad_plain(logits, targets, weight, block_values)
}

/// `nll_rows_and_grad`'s plain twin (every device; the CPU's path), bit for bit candle's.
pub fn nll_rows_and_grad_plain(
    logits: &Tensor,
    targets: &Tensor,
    weight: f64,
    block_values: usize,
) -> Result<(Tensor, Tensor)> {
    let (rows, vocab) = logits.dims2()?;
    let block = (block_values / vocab.max(1)).max(1);
    // This function's own buffer: written in place a block at a time, shared with no one.
    let grad = Tensor::zeros((rows, vocab), logits.dtype(), logits.device())?;
    let mut nll = Vec::with_capacity(rows.div_ceil(block));
    // f32(w), as the backward's `affine(ones, w, 0)` makes it.
    let w = Tensor::ones((1, 1), DType::F32, logits.device())?.affine(weight, 0.0)?;
    for r0 in (0..rows).step_by(block) {
        let n = block.min(rows - r0);
        let t = targets.narrow(0, r0, n)?.unsqueeze(1)?.contiguous()?; // [n, 1]
        let x = logits.narrow(0, r0, n)?.to_dtype(DType::F32)?;
        let m = x.max_keepdim(D::Minus1)?;
        let e = x.broadcast_sub(&m)?.exp()?;
        let s = e.sum_keepdim(D::Minus1)?;
        let lse = s.log()?.broadcast_add(&m)?;
        nll.push((x.gather(&t, 1)? - lse)?.neg()?.squeeze(1)?);
        drop(x);
        let q = e.broadcast_mul(&(w.broadcast_as(s.shape())?.contiguous()? / &s)?)?;
        drop(e);
        let g = q.scatter_add(&t, &w.neg()?.broadcast_as((n, 1))?.contiguous()?, 1)?;
        drop(q);
        grad.slice_set(&g.to_dtype(logits.dtype())?, 0, r0)?;
    }
    if nll.is_empty() {
        candle_core::bail!("the LM loss needs at least one row of logits");
    }
    Ok((Tensor::cat(&nll, 0)?, grad))
}

/// The LM head: final RMSNorm, then `logits = linear(norm(h), weight)` (as `Model::head`).
pub struct LmHead<'a> {
    pub norm: &'a Tensor,
    pub weight: &'a Tensor,
    pub eps: f64,
    /// Produce the weight's gradient (false: the weight is frozen, skip the product).
    pub weight_trains: bool,
    /// The norm's and the loss's kernels or twins.
    pub kernels: KernelPolicy,
}

/// What one chunk of `chunked_next_token_loss` hands back.
pub enum HeadGrads<'a> {
    /// The final norm weight's gradient from this chunk (in the weight's dtype).
    Norm(&'a Tensor),
    /// The head weight's gradient, rows on demand.
    Weight(&'a LinearWeightGrad),
}

/// The targets of `chunked_next_token_loss`: the next token of each of the first
/// `targets.dim(1)` rows of h (the rows after them predict nothing), and `count`, the
/// predicted positions the mean is taken over (every rank's together under context
/// parallelism).
pub struct NextTokens {
    /// [B, m] u32.
    pub targets: Tensor,
    pub count: usize,
}

impl NextTokens {
    /// Position t of `tokens` [B, T] predicts token t + 1: every position but the last.
    pub fn of(tokens: &Tensor) -> Result<Self> {
        let (b, t) = tokens.dims2()?;
        if t < 2 {
            candle_core::bail!("a sequence needs at least 2 tokens");
        }
        Ok(Self {
            targets: tokens.narrow(1, 1, t - 1)?,
            count: b * (t - 1),
        })
    }
}

/// Next-token cross-entropy computed and backpropagated one chunk of positions at a time, so
/// the [B, T, vocab] logits never exist: at most `chunk` positions of them are alive.
/// `h` [B, T, D] hidden states; row t predicts `next.targets[:, t]` (`NextTokens::of`: token
/// t + 1, as in `next_token_nll`), and the mean is over `next.count` positions. Each chunk's share of `weight * mean NLL` is backpropagated at once, by
/// hand (no autograd graph): the final norm weight's gradient goes to `on_grads` as
/// `HeadGrads::Norm`, and the head weight's gradient (when `head.weight_trains`) as
/// `HeadGrads::Weight`, a `LinearWeightGrad` that yields its rows a block at a time: the whole
/// [vocab, D] gradient would be 5.2 GiB in bf16 for the 671B head. Returns the mean NLL
/// (detached f32 scalar) and d(weight * mean NLL) / dh, [B, T, D] in h's dtype (zero at the
/// rows without a target).
///
/// Memory per chunk: its logits and their gradient in the compute dtype and one block of the
/// loss's f32 work (`nll_rows_and_grad`).
///
/// Numerics: the logits' gradient is candle's, bit for bit (`nll_rows_and_grad`); the normed
/// chunk's gradient is `dlogits @ W` (the product candle's matmul backward forms) and goes back
/// through the norm by `ops::rms_norm_backward` (f32 sums; the fused kernel on a GPU).
pub fn chunked_next_token_loss(
    h: &Tensor,
    next: &NextTokens,
    chunk: usize,
    weight: f64,
    head: &LmHead,
    mut on_grads: impl FnMut(HeadGrads) -> Result<()>,
) -> Result<(Tensor, Tensor)> {
    let (b, t, d) = h.dims3()?;
    let positions = next.targets.dim(1)?;
    if positions > t || next.count == 0 {
        candle_core::bail!(
            "{positions} targets for {t} rows, a mean over {} positions",
            next.count
        );
    }
    let count = next.count as f64;
    let chunk = chunk.max(1);
    let (w, norm) = (head.weight.detach(), head.norm.detach());
    let mut total: Option<Tensor> = None;
    let mut dh = Vec::with_capacity(positions.div_ceil(chunk) + 1);
    for p0 in (0..positions).step_by(chunk) {
        let n = chunk.min(positions - p0);
        let x = h.narrow(1, p0, n)?.detach(); // [B, n, D]
        let normed = rms_norm(head.kernels, &x, &norm, head.eps)?; // [B, n, D]
        let logits = linear(&normed, &w)?; // [B, n, V]
        let vocab = logits.dim(2)?;
        let targets = next.targets.narrow(1, p0, n)?.flatten_all()?; // [B n]
        let (nll_rows, dlogits) = nll_rows_and_grad(
            head.kernels,
            &logits.reshape((b * n, vocab))?,
            &targets,
            weight / count,
            LOSS_BLOCK,
        )?;
        drop(logits);
        let nll_sum = nll_rows.sum_all()?; // [B n] f32, a few thousand values
        if head.weight_trains {
            let rows = normed.reshape((b * n, d))?;
            on_grads(HeadGrads::Weight(&LinearWeightGrad::new(&rows, &dlogits)?))?;
        }
        let dnormed = dlogits.matmul(&w)?.reshape((b, n, d))?;
        drop(dlogits);
        let (dx, dnorm) = rms_norm_backward(head.kernels, &x, &norm, head.eps, &dnormed)?;
        on_grads(HeadGrads::Norm(&dnorm))?;
        dh.push(dx.to_dtype(h.dtype())?);
        total = Some(match total {
            Some(a) => (a + nll_sum)?,
            None => nll_sum,
        });
    }
    if positions < t {
        dh.push(h.narrow(1, positions, t - positions)?.zeros_like()?);
    }
    let dh = Tensor::cat(&dh, 1)?;
    let total = match total {
        Some(total) => total,
        // (a context-parallel rank whose rows all lack a target)
        None => Tensor::zeros((), DType::F32, h.device())?,
    };
    Ok(((total / count)?, dh))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn kl_matches_f64_and_its_gradient_is_softmax_minus_p() {
        let dev = Device::Cpu;
        let n = 7;
        let logits = crate::rng::randn(&[3, n], 1, 2.0, &dev).unwrap();
        // Target: a distribution with an exact zero on masked entries (last two of row 0).
        let mut pv = crate::rng::randn(&[3, n], 2, 1.0, &dev)
            .unwrap()
            .exp()
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        pv[0][5] = 0.0;
        pv[0][6] = 0.0;
        for r in pv.iter_mut() {
            let s: f32 = r.iter().sum();
            r.iter_mut().for_each(|x| *x /= s);
        }
        let p = Tensor::new(pv.clone(), &dev).unwrap();
        let mut lv = logits.to_vec2::<f32>().unwrap();
        lv[0][5] = crate::dsa::MASKED;
        lv[0][6] = crate::dsa::MASKED;
        let var = Var::new(lv.clone(), &dev).unwrap();
        let kl = kl_rows(&p, var.as_tensor()).unwrap();
        let got: Vec<f32> = kl.to_vec1().unwrap();
        let grads = kl.sum_all().unwrap().backward().unwrap();
        let g: Vec<Vec<f32>> = grads.get(var.as_tensor()).unwrap().to_vec2().unwrap();
        for r in 0..3 {
            let valid = if r == 0 { 5 } else { n };
            let m = lv[r][..valid]
                .iter()
                .cloned()
                .fold(f64::MIN, |a, b| a.max(b as f64));
            let z: f64 = lv[r][..valid].iter().map(|x| (*x as f64 - m).exp()).sum();
            let q: Vec<f64> = lv[r][..valid]
                .iter()
                .map(|x| (*x as f64 - m).exp() / z)
                .collect();
            let expect: f64 = (0..valid)
                .filter(|&s| pv[r][s] > 0.0)
                .map(|s| pv[r][s] as f64 * (pv[r][s] as f64 / q[s]).ln())
                .sum();
            assert!(
                (got[r] as f64 - expect).abs() < 1e-5,
                "row {r}: {} vs {expect}",
                got[r]
            );
            for s in 0..n {
                let want = if s < valid {
                    q[s] - pv[r][s] as f64
                } else {
                    0.0
                };
                assert!(
                    (g[r][s] as f64 - want).abs() < 1e-5,
                    "grad {r},{s}: {} vs {want}",
                    g[r][s]
                );
            }
        }
    }

    #[test]
    fn chunked_loss_and_gradients_equal_the_whole_sequence_ones() {
        let dev = Device::Cpu;
        let (b, t, d, v) = (2, 9, 5, 13);
        let h = Var::from_tensor(&crate::rng::randn(&[b, t, d], 7, 1.0, &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&crate::rng::randn(&[v, d], 8, 1.0, &dev).unwrap()).unwrap();
        let norm =
            Var::from_tensor(&(crate::rng::randn(&[d], 9, 0.1, &dev).unwrap() + 1.0).unwrap())
                .unwrap();
        let tokens = Tensor::from_vec(
            (0..(b * t) as u32)
                .map(|i| (i * 7) % v as u32)
                .collect::<Vec<_>>(),
            (b, t),
            &dev,
        )
        .unwrap();
        let head = LmHead {
            norm: norm.as_tensor(),
            weight: w.as_tensor(),
            eps: 1e-6,
            weight_trains: true,
            kernels: KernelPolicy::PLAIN,
        };
        let logits = linear(
            &rms_norm(KernelPolicy::PLAIN, h.as_tensor(), norm.as_tensor(), 1e-6).unwrap(),
            w.as_tensor(),
        )
        .unwrap();
        let whole = next_token_nll(&logits, &tokens)
            .unwrap()
            .mean_all()
            .unwrap();
        let g = (&whole * 0.5).unwrap().backward().unwrap();
        let close = |a: &Tensor, b: &Tensor| {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        for chunk in [1, 3, 8, 100] {
            let mut gw = w.as_tensor().zeros_like().unwrap();
            let mut gn = norm.as_tensor().zeros_like().unwrap();
            let (loss, dh) = chunked_next_token_loss(
                h.as_tensor(),
                &NextTokens::of(&tokens).unwrap(),
                chunk,
                0.5,
                &head,
                |g| {
                    match g {
                        HeadGrads::Norm(g) => gn = (&gn + g)?,
                        HeadGrads::Weight(src) => {
                            // In blocks of 4 rows (13 is not a multiple).
                            let parts: Vec<Tensor> = (0..v)
                                .step_by(4)
                                .map(|s| crate::grad_rows::RowBlocks::rows(src, s, 4.min(v - s)))
                                .collect::<Result<_>>()?;
                            gw = (&gw + Tensor::cat(&parts, 0)?)?;
                        }
                    }
                    Ok(())
                },
            )
            .unwrap();
            assert!(close(&loss, &whole) < 1e-6, "chunk {chunk}");
            assert!(
                close(&dh, g.get(h.as_tensor()).unwrap()) < 1e-6,
                "chunk {chunk}: dh"
            );
            assert!(
                close(&gw, g.get(w.as_tensor()).unwrap()) < 1e-6,
                "chunk {chunk}: dw"
            );
            assert!(
                close(&gn, g.get(norm.as_tensor()).unwrap()) < 1e-5,
                "chunk {chunk}: dnorm"
            );
        }
    }

    #[test]
    fn the_loss_gradient_by_blocks_of_rows_is_candles_backward_bit_for_bit() {
        let dev = Device::Cpu;
        let (rows, vocab) = (11, 37);
        let targets = Tensor::from_vec(
            (0..rows as u32)
                .map(|i| (i * 13 + 5) % vocab as u32)
                .collect::<Vec<_>>(),
            rows,
            &dev,
        )
        .unwrap();
        let bits = |x: &Tensor| {
            x.flatten_all()
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect::<Vec<_>>()
        };
        for dtype in [DType::F32, DType::BF16] {
            let logits = Var::from_tensor(
                &crate::rng::randn(&[rows, vocab], 4, 3.0, &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            let weight = 0.37 / 29.0;
            let nll = log_softmax_last(logits.as_tensor())
                .unwrap()
                .gather(&targets.unsqueeze(1).unwrap(), 1)
                .unwrap()
                .neg()
                .unwrap();
            let want_grad = (nll.sum_all().unwrap() * weight)
                .unwrap()
                .backward()
                .unwrap()
                .get(logits.as_tensor())
                .unwrap()
                .clone();
            for block in [1, vocab, 3 * vocab + 5, 1 << 24] {
                let (got_nll, got_grad) = nll_rows_and_grad(
                    KernelPolicy::PLAIN,
                    logits.as_tensor(),
                    &targets,
                    weight,
                    block,
                )
                .unwrap();
                assert_eq!(bits(&got_nll), bits(&nll), "{dtype:?}, block {block}: NLL");
                assert_eq!(
                    bits(&got_grad),
                    bits(&want_grad),
                    "{dtype:?}, block {block}: gradient"
                );
                assert_eq!(got_grad.dtype(), dtype);
            }
        }
        assert!(nll_rows_and_grad(
            KernelPolicy::PLAIN,
            &Tensor::zeros((2, 3), DType::F32, &dev).unwrap(),
            &targets,
            1.0,
            4
        )
        .is_err());
    }

    /// Against candle's autograd through the whole head, chunk by chunk: dh and the norm's
    /// gradient to f32 rounding (f32), to a bf16 rounding or two of the largest value (bf16);
    /// the head weight's gradient: `grad_rows`.
    #[test]
    fn the_chunked_head_backward_matches_candles_autograd() {
        let dev = Device::Cpu;
        let (b, t, d, v) = (2, 12, 16, 40);
        for dtype in [DType::F32, DType::BF16] {
            let h = crate::rng::randn(&[b, t, d], 1, 1.0, &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let w = Var::from_tensor(
                &crate::rng::randn(&[v, d], 2, 0.3, &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            let norm = Var::from_tensor(
                &(crate::rng::randn(&[d], 3, 0.1, &dev).unwrap() + 1.0)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            let tokens = Tensor::from_vec(
                (0..(b * t) as u32)
                    .map(|i| (i * 11) % v as u32)
                    .collect::<Vec<_>>(),
                (b, t),
                &dev,
            )
            .unwrap();
            let bits = |x: &Tensor| {
                x.flatten_all()
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect::<Vec<_>>()
            };
            let chunk = 5;
            // Before: candle's backward of the whole head per chunk.
            let (mut dh0, mut gn0) = (
                vec![],
                norm.as_tensor()
                    .zeros_like()
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap(),
            );
            for p0 in (0..t - 1).step_by(chunk) {
                let n = chunk.min(t - 1 - p0);
                let hv = Var::from_tensor(&h.narrow(1, p0, n).unwrap()).unwrap();
                let logits = linear(
                    &rms_norm(KernelPolicy::PLAIN, hv.as_tensor(), norm.as_tensor(), 1e-6).unwrap(),
                    w.as_tensor(),
                )
                .unwrap();
                let targets = tokens
                    .narrow(1, p0 + 1, n)
                    .unwrap()
                    .unsqueeze(2)
                    .unwrap()
                    .contiguous()
                    .unwrap();
                let nll = log_softmax_last(&logits)
                    .unwrap()
                    .gather(&targets, 2)
                    .unwrap()
                    .neg()
                    .unwrap()
                    .sum_all()
                    .unwrap();
                let gs = (nll * (0.5 / (b * (t - 1)) as f64))
                    .unwrap()
                    .backward()
                    .unwrap();
                dh0.push(gs.get(hv.as_tensor()).unwrap().clone());
                gn0 = (gn0
                    + gs.get(norm.as_tensor())
                        .unwrap()
                        .to_dtype(DType::F32)
                        .unwrap())
                .unwrap();
            }
            dh0.push(h.narrow(1, t - 1, 1).unwrap().zeros_like().unwrap());
            let dh0 = Tensor::cat(&dh0, 1).unwrap();
            let head = LmHead {
                norm: norm.as_tensor(),
                weight: w.as_tensor(),
                eps: 1e-6,
                weight_trains: false,
                kernels: KernelPolicy::PLAIN,
            };
            let mut gn = norm
                .as_tensor()
                .zeros_like()
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let (_, dh) = chunked_next_token_loss(
                &h,
                &NextTokens::of(&tokens).unwrap(),
                chunk,
                0.5,
                &head,
                |g| {
                    match g {
                        HeadGrads::Norm(g) => gn = (&gn + g.to_dtype(DType::F32)?)?,
                        HeadGrads::Weight(_) => panic!("the head weight is frozen here"),
                    }
                    Ok(())
                },
            )
            .unwrap();
            let tol = if dtype == DType::F32 { 1e-6 } else { 1e-2 };
            for (what, a, b) in [("dh", &dh, &dh0), ("the norm's gradient", &gn, &gn0)] {
                let (a, b) = (bits(a), bits(b));
                let f = |x: &u32| f32::from_bits(*x);
                let scale = b.iter().map(|x| f(x).abs()).fold(0f32, f32::max);
                let diff = a
                    .iter()
                    .zip(&b)
                    .map(|(x, y)| (f(x) - f(y)).abs())
                    .fold(0f32, f32::max);
                assert!(
                    diff <= tol * scale,
                    "{dtype:?}: {what} differs by {diff} (scale {scale})"
                );
            }
        }
    }

    #[test]
    fn cross_entropy_matches_f64() {
        let dev = Device::Cpu;
        let logits = crate::rng::randn(&[2, 4, 11], 3, 3.0, &dev).unwrap();
        let tokens = Tensor::new(&[[1u32, 4, 10, 0], [7, 7, 2, 3]], &dev).unwrap();
        let nll: Vec<Vec<f32>> = next_token_nll(&logits, &tokens).unwrap().to_vec2().unwrap();
        let lv: Vec<Vec<Vec<f32>>> = logits.to_vec3().unwrap();
        let tv: Vec<Vec<u32>> = tokens.to_vec2().unwrap();
        for b in 0..2 {
            for t in 0..3 {
                let row = &lv[b][t];
                let lse = row.iter().map(|x| (*x as f64).exp()).sum::<f64>().ln();
                let expect = lse - row[tv[b][t + 1] as usize] as f64;
                assert!((nll[b][t] as f64 - expect).abs() < 1e-5);
            }
        }
    }
}
