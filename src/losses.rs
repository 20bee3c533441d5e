//! The two losses of DSA training, in differentiable plain form (f32 internals).
//!
//! - Language modelling: next-token cross-entropy, `-log softmax(logits[t])[token[t+1]]`.
//! - Indexer: per query row, `KL(p || softmax(I))` over the row's valid entries, where the
//!   target `p` is a detached distribution (head-mean attention probabilities) that is exactly
//!   zero on masked entries, and `I` carries `dsa::MASKED` there. Written as
//!   `sum p log p - sum p log_softmax(I)`, so the gradient w.r.t. `I` is `softmax(I) - p`
//!   computed from a log-sum-exp, never from the log of an underflowed probability.

use candle_core::{DType, Result, Tensor, D};

use crate::ops::log_softmax_last;

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

/// Positions per LM-head chunk so that one chunk holds about 2^27 logits (with the f32
/// log-softmax and its gradient, about 1.5 GiB at most).
pub fn lm_chunk_positions(batch: usize, vocab: usize) -> usize {
    ((1usize << 27) / (batch * vocab).max(1)).max(1)
}

/// Next-token cross-entropy computed and backpropagated one chunk of positions at a time, so
/// the [B, T, vocab] logits never exist: at most `chunk` positions of them are alive.
/// `h` [B, T, D] hidden states (treated as a leaf), `head` maps [B, n, D] -> [B, n, V],
/// `tokens` [B, T]; position t predicts token t + 1, as in `next_token_nll`. Each chunk's share
/// of `weight * mean NLL` is backpropagated at once and its gradients (the head's parameters)
/// handed to `on_grads`. Returns the mean NLL (detached f32 scalar) and
/// d(weight * mean NLL) / dh, [B, T, D] in h's dtype (zero at the last position).
pub fn chunked_next_token_loss(
    h: &Tensor,
    tokens: &Tensor,
    chunk: usize,
    weight: f64,
    head: impl Fn(&Tensor) -> Result<Tensor>,
    mut on_grads: impl FnMut(&candle_core::backprop::GradStore) -> Result<()>,
) -> Result<(Tensor, Tensor)> {
    let (b, t, _) = h.dims3()?;
    let positions = t - 1;
    let count = (b * positions) as f64;
    let chunk = chunk.max(1);
    let mut total: Option<Tensor> = None;
    let mut dh = Vec::with_capacity(positions.div_ceil(chunk) + 1);
    for p0 in (0..positions).step_by(chunk) {
        let n = chunk.min(positions - p0);
        let hv = candle_core::Var::from_tensor(&h.narrow(1, p0, n)?.detach())?;
        let logits = head(hv.as_tensor())?; // [B, n, V]
        let targets = tokens.narrow(1, p0 + 1, n)?.unsqueeze(2)?.contiguous()?; // [B, n, 1]
        let nll_sum = log_softmax_last(&logits)?.gather(&targets, 2)?.neg()?.sum_all()?;
        let grads = (&nll_sum * (weight / count))?.backward()?;
        on_grads(&grads)?;
        dh.push(match grads.get(hv.as_tensor()) {
            Some(g) => g.detach().to_dtype(h.dtype())?,
            None => hv.as_tensor().zeros_like()?,
        });
        let nll_sum = nll_sum.detach().to_dtype(DType::F32)?;
        total = Some(match total { Some(a) => (a + nll_sum)?, None => nll_sum });
    }
    dh.push(h.narrow(1, positions, 1)?.zeros_like()?);
    let dh = Tensor::cat(&dh, 1)?;
    let total = total.ok_or_else(|| candle_core::Error::Msg("a sequence needs at least 2 tokens".into()))?;
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
        let mut pv = crate::rng::randn(&[3, n], 2, 1.0, &dev).unwrap().exp().unwrap().to_vec2::<f32>().unwrap();
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
            let m = lv[r][..valid].iter().cloned().fold(f64::MIN, |a, b| a.max(b as f64));
            let z: f64 = lv[r][..valid].iter().map(|x| (*x as f64 - m).exp()).sum();
            let q: Vec<f64> = lv[r][..valid].iter().map(|x| (*x as f64 - m).exp() / z).collect();
            let expect: f64 = (0..valid).filter(|&s| pv[r][s] > 0.0).map(|s| pv[r][s] as f64 * (pv[r][s] as f64 / q[s]).ln()).sum();
            assert!((got[r] as f64 - expect).abs() < 1e-5, "row {r}: {} vs {expect}", got[r]);
            for s in 0..n {
                let want = if s < valid { q[s] - pv[r][s] as f64 } else { 0.0 };
                assert!((g[r][s] as f64 - want).abs() < 1e-5, "grad {r},{s}: {} vs {want}", g[r][s]);
            }
        }
    }

    #[test]
    fn chunked_loss_and_gradients_equal_the_whole_sequence_ones() {
        let dev = Device::Cpu;
        let (b, t, d, v) = (2, 9, 5, 13);
        let h = Var::from_tensor(&crate::rng::randn(&[b, t, d], 7, 1.0, &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&crate::rng::randn(&[v, d], 8, 1.0, &dev).unwrap()).unwrap();
        let tokens = Tensor::from_vec((0..(b * t) as u32).map(|i| (i * 7) % v as u32).collect::<Vec<_>>(), (b, t), &dev).unwrap();
        let head = |x: &Tensor| crate::ops::linear(x, w.as_tensor());
        let whole = next_token_nll(&head(h.as_tensor()).unwrap(), &tokens).unwrap().mean_all().unwrap();
        let g = (&whole * 0.5).unwrap().backward().unwrap();
        for chunk in [1, 3, 8, 100] {
            let mut gw = w.as_tensor().zeros_like().unwrap();
            let (loss, dh) = chunked_next_token_loss(h.as_tensor(), &tokens, chunk, 0.5, head, |gs| {
                gw = (&gw + gs.get(w.as_tensor()).unwrap())?;
                Ok(())
            }).unwrap();
            let close = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert!(close(&loss, &whole) < 1e-6, "chunk {chunk}");
            assert!(close(&dh, g.get(h.as_tensor()).unwrap()) < 1e-6, "chunk {chunk}: dh");
            assert!(close(&gw, g.get(w.as_tensor()).unwrap()) < 1e-6, "chunk {chunk}: dw");
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
