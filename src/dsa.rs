//! DeepSeek Sparse Attention selection: the deterministic top-k of the indexer scores and the
//! attention-mass recall that measures how well a selection covers dense attention.
//!
//! Selection rule (brief, trap 8): for query t, S_t holds the k keys s <= t with the highest
//! score; equal scores go to the lower index; when t + 1 <= k, S_t is every s <= t. ReLU makes
//! exact-zero scores common, and +0.0 and -0.0 count as equal. Slots past |S_t| are padding:
//! index 0, `valid` 0, bias `MASKED`.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

/// Additive bias for masked logits. Finite so that `0 * bias` is 0 (a masked entry carries
/// exactly zero target probability) while `exp(bias - max)` underflows to exactly 0.
pub const MASKED: f32 = -1e30;

/// The selected sets of one layer.
#[derive(Debug, Clone)]
pub struct Selection {
    /// [B, T, K] u32 key positions, K = min(k, T): best first from the host selection,
    /// ascending from the device kernel (the sets, not their order, are the contract).
    pub indices: Tensor,
    /// [B, T, K] f32: 1 for a selected key, 0 for padding.
    pub valid: Tensor,
    /// [B, T, K] f32: 0 for a selected key, `MASKED` for padding.
    pub bias: Tensor,
    /// [B, T, K] u32: row in the flattened [B*T] token axis (b * T + index); u32::MAX for
    /// padding. The kernels' form.
    pub absolute: Tensor,
}

impl Selection {
    /// Rebuild a selection from its `absolute` form [B, T, K] (u32::MAX = padding) on the
    /// device: the form the kernels produce and the only one worth caching between passes.
    pub fn from_absolute(absolute: Tensor) -> candle_core::Result<Self> {
        let (b, t, k) = absolute.dims3()?;
        let device = absolute.device().clone();
        let valid_mask = absolute.ne(u32::MAX)?; // [B, T, K] u8
        let offsets = Tensor::arange(0u32, b as u32, &device)?.affine(t as f64, 0.0)?.reshape((b, 1, 1))?.broadcast_as((b, t, k))?.contiguous()?;
        // Padding becomes the sequence offset first, so the subtraction never wraps.
        let indices = (valid_mask.where_cond(&absolute, &offsets)? - &offsets)?;
        let valid = valid_mask.to_dtype(DType::F32)?;
        let masked = Tensor::full(MASKED, (b, t, k), &device)?;
        let bias = valid_mask.where_cond(&masked.zeros_like()?, &masked)?;
        Ok(Self { indices, valid, bias, absolute })
    }

    /// The selected sets of queries q0..q0+n (the absolute rows still index the whole batch).
    pub fn rows(&self, q0: usize, n: usize) -> candle_core::Result<Self> {
        Ok(Self {
            indices: self.indices.narrow(1, q0, n)?,
            valid: self.valid.narrow(1, q0, n)?,
            bias: self.bias.narrow(1, q0, n)?,
            absolute: self.absolute.narrow(1, q0, n)?,
        })
    }

    /// The sets of queries q0..q0+n of sequence `b` alone ([1, n, K]; absolute rows unchanged).
    pub fn block(&self, b: usize, q0: usize, n: usize) -> candle_core::Result<Self> {
        let cut = |x: &Tensor| x.narrow(0, b, 1)?.narrow(1, q0, n);
        Ok(Self { indices: cut(&self.indices)?, valid: cut(&self.valid)?, bias: cut(&self.bias)?, absolute: cut(&self.absolute)? })
    }

    /// Selection from per-sequence key positions [B, T, K] (u32::MAX = padding).
    pub fn from_positions(positions: &Tensor) -> candle_core::Result<Self> {
        let (b, t, k) = positions.dims3()?;
        let device = positions.device();
        let valid_mask = positions.ne(u32::MAX)?;
        let offsets = Tensor::arange(0u32, b as u32, device)?.affine(t as f64, 0.0)?.reshape((b, 1, 1))?.broadcast_as((b, t, k))?;
        let zero = positions.zeros_like()?;
        let safe = valid_mask.where_cond(positions, &zero)?; // no wrap-around in the add below
        let absolute = valid_mask.where_cond(&safe.broadcast_add(&offsets)?, positions)?;
        Self::from_absolute(absolute)
    }
}

/// Ordering key: +0.0 and -0.0 compare equal, NaN (never expected) sorts last.
#[inline]
fn score_key(x: f32) -> f32 {
    if x.is_nan() {
        f32::NEG_INFINITY
    } else if x == 0.0 {
        0.0
    } else {
        x
    }
}

/// Indices of the top-k among `row[..=t]`, best first, lower index on ties.
pub fn topk_causal_row(row: &[f32], t: usize, k: usize) -> Vec<u32> {
    let better = |a: &u32, b: &u32| {
        score_key(row[*b as usize]).total_cmp(&score_key(row[*a as usize])).then(a.cmp(b))
    };
    let mut cand: Vec<u32> = (0..=t as u32).collect();
    if cand.len() > k {
        cand.select_nth_unstable_by(k - 1, better);
        cand.truncate(k);
    }
    cand.sort_unstable_by(better);
    cand
}

/// Deterministic causal top-k of `scores` [B, T, T] (entries above the diagonal are ignored).
pub fn select_topk(scores: &Tensor, k: usize) -> Result<Selection> {
    let (b, t, t2) = scores.dims3()?;
    anyhow::ensure!(t == t2, "indexer scores must be square per batch, got {:?}", scores.dims());
    select_topk_streaming(b, t, k, query_block(b, t), scores.device(), |q0, n| Ok(scores.narrow(1, q0, n)?))
}

/// Deterministic causal top-k computed over blocks of `block` queries: `rows(q0, n)` returns
/// the scores [B, n, T] of queries q0..q0+n, so no more than one block exists at a time.
/// Selection runs on the host for now; the GPU issue replaces it with a device kernel.
pub fn select_topk_streaming(
    b: usize,
    t: usize,
    k: usize,
    block: usize,
    device: &Device,
    mut rows: impl FnMut(usize, usize) -> Result<Tensor>,
) -> Result<Selection> {
    anyhow::ensure!(k > 0, "top-k must be positive");
    let kk = k.min(t);
    let mut indices = vec![0u32; b * t * kk];
    let mut valid = vec![0f32; b * t * kk];
    let block = block.max(1);
    for q0 in (0..t).step_by(block) {
        let n = block.min(t - q0);
        let host: Vec<f32> = rows(q0, n)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?; // [B, n, T]
        let mut idx_rows: Vec<(usize, &[f32])> = Vec::with_capacity(b * n);
        for bi in 0..b {
            for r in 0..n {
                idx_rows.push((bi * t + q0 + r, &host[(bi * n + r) * t..(bi * n + r + 1) * t]));
            }
        }
        let picked: Vec<(usize, Vec<u32>)> = idx_rows
            .par_iter()
            .map(|(row_id, row)| (*row_id, topk_causal_row(row, row_id % t, kk)))
            .collect();
        for (row_id, sel) in picked {
            indices[row_id * kk..][..sel.len()].copy_from_slice(&sel);
            valid[row_id * kk..][..sel.len()].iter_mut().for_each(|v| *v = 1.0);
        }
    }
    selection_from_host(indices, valid, (b, t, kk), device)
}

/// Queries per scoring block: about 2^24 score elements (64 MiB of f32) per block.
pub fn query_block(b: usize, t: usize) -> usize {
    ((1usize << 24) / (b * t).max(1)).clamp(1, t.max(1))
}

fn selection_from_host(indices: Vec<u32>, valid: Vec<f32>, shape: (usize, usize, usize), device: &Device) -> Result<Selection> {
    let bias: Vec<f32> = valid.iter().map(|v| if *v > 0.0 { 0.0 } else { MASKED }).collect();
    let (_, t, k) = shape;
    let absolute: Vec<u32> = indices
        .iter()
        .zip(&valid)
        .enumerate()
        .map(|(i, (idx, v))| if *v > 0.0 { (i / (t * k) * t) as u32 + idx } else { u32::MAX })
        .collect();
    Ok(Selection {
        absolute: Tensor::from_vec(absolute, shape, device)?,
        indices: Tensor::from_vec(indices, shape, device)?,
        valid: Tensor::from_vec(valid, shape, device)?,
        bias: Tensor::from_vec(bias, shape, device)?,
    })
}

/// Attention-mass recall per query: sum over s in S_t of `p[b, t, s]`, with `p` [B, T, T] the
/// head-mean dense attention probabilities. Returns [B, T] f32.
pub fn recall_rows(p: &Tensor, sel: &Selection) -> Result<Tensor> {
    let picked = p.to_dtype(DType::F32)?.contiguous()?.gather(&sel.indices, 2)?; // [B, T, K]
    Ok((picked * &sel.valid)?.sum(2)?)
}

/// Causal mask bias [T, T]: 0 where s <= t, `MASKED` above the diagonal.
pub fn causal_bias(t: usize, device: &Device) -> Result<Tensor> {
    Ok(causal_rows(0, t, t, device)?)
}

/// Rows q0..q0+n of the causal mask bias over `t` keys: [n, t], 0 where s <= q0 + r and
/// `MASKED` above. Built on the device, so no [T, T] bias is ever kept.
pub fn causal_rows(q0: usize, n: usize, t: usize, device: &Device) -> candle_core::Result<Tensor> {
    let rows = Tensor::arange(q0 as u32, (q0 + n) as u32, device)?.reshape((n, 1))?;
    let cols = Tensor::arange(0u32, t as u32, device)?.reshape((1, t))?;
    let above = cols.broadcast_gt(&rows)?; // [n, t] u8
    let masked = Tensor::full(MASKED, (n, t), device)?;
    above.where_cond(&masked, &masked.zeros_like()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_go_to_the_lower_index_and_signed_zeros_are_equal() {
        let row = [0.0, 5.0, -0.0, 5.0, 0.0, 1.0, -1.0];
        assert_eq!(topk_causal_row(&row, 6, 3), vec![1, 3, 5]);
        // Among the zeros (0, 2 and 4; 2 is -0.0), the lower indices win.
        assert_eq!(topk_causal_row(&row, 6, 5), vec![1, 3, 5, 0, 2]);
        // Causality: entries above t are never looked at.
        assert_eq!(topk_causal_row(&row, 2, 2), vec![1, 0]);
        // t + 1 <= k selects everything up to t.
        assert_eq!(topk_causal_row(&row, 2, 8).len(), 3);
    }

    #[test]
    fn selection_agrees_with_a_full_sort_on_random_rows_with_many_ties() {
        let mut rng = crate::rng::SplitMix64::new(3);
        let (b, t, k) = (2, 37, 9);
        // Values on a coarse grid: many exact ties.
        let v: Vec<f32> = (0..b * t * t).map(|_| (rng.uniform() * 6.0).floor() as f32 - 2.0).collect();
        let scores = Tensor::from_vec(v.clone(), (b, t, t), &Device::Cpu).unwrap();
        let sel = select_topk(&scores, k).unwrap();
        let idx: Vec<Vec<Vec<u32>>> = sel.indices.to_vec3().unwrap();
        let valid: Vec<Vec<Vec<f32>>> = sel.valid.to_vec3().unwrap();
        for bi in 0..b {
            for q in 0..t {
                let row = &v[(bi * t + q) * t..][..t];
                let mut all: Vec<u32> = (0..=q as u32).collect();
                all.sort_by(|a, c| row[*c as usize].partial_cmp(&row[*a as usize]).unwrap().then(a.cmp(c)));
                all.truncate(k);
                let n = all.len();
                assert_eq!(&idx[bi][q][..n], &all[..], "row {bi},{q}");
                assert!(valid[bi][q][..n].iter().all(|x| *x == 1.0));
                assert!(valid[bi][q][n..].iter().all(|x| *x == 0.0));
            }
        }
    }

    #[test]
    fn recall_is_one_when_the_selection_holds_every_key() {
        let t = 6;
        let p = crate::ops::softmax_last(
            &(crate::rng::randn(&[1, t, t], 5, 1.0, &Device::Cpu).unwrap()
                .broadcast_add(&causal_bias(t, &Device::Cpu).unwrap()).unwrap()),
        ).unwrap();
        let scores = crate::rng::randn(&[1, t, t], 6, 1.0, &Device::Cpu).unwrap();
        let full: Vec<f32> = recall_rows(&p, &select_topk(&scores, t).unwrap()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert!(full.iter().all(|r| (r - 1.0).abs() < 1e-6), "{full:?}");
        let part: Vec<f32> = recall_rows(&p, &select_topk(&scores, 2).unwrap()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert!(part[..2].iter().all(|r| (r - 1.0).abs() < 1e-6));
        assert!(part[2..].iter().all(|r| *r < 1.0 && *r > 0.0), "{part:?}");
    }
}
