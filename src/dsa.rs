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

use crate::dist::context::{QueryRows, RowBlock};

/// Additive bias for masked logits. Finite so that `0 * bias` is 0 (a masked entry carries
/// exactly zero target probability) while `exp(bias - max)` underflows to exactly 0.
pub const MASKED: f32 = -1e30;

/// The selected sets of one layer, stored in ONE form: the kernels' absolute rows. At 128K
/// tokens and k = 2048 each [B, T, K] form is 1 GiB per layer and sequence, so the positions,
/// the 0/1 mask and the additive bias are derived on demand for the rows at hand (`rows`,
/// `block` first, then `indices`/`valid`/`bias`: a block's worth, never the whole sequence's
/// in the training paths).
#[derive(Debug, Clone)]
pub struct Selection {
    /// [B, T, K] u32: row in the flattened [B*T] token axis (sequence * seq_len + position);
    /// u32::MAX for padding. Best first from the host selection, ascending from the device
    /// kernel (the sets, not their order, are the contract).
    pub absolute: Tensor,
    /// Tokens per sequence (the key axis), which the absolute rows are counted in.
    seq_len: usize,
    /// The batch index of this tensor's first sequence (non-zero after `block`).
    first_seq: usize,
}

impl Selection {
    /// Rebuild a selection from its `absolute` form [B, rows, K] (u32::MAX = padding): the
    /// form the kernels produce and the one cached between passes. The rows are every query of
    /// each sequence, or a context-parallel rank's; absolute rows count in sequences of
    /// `seq_len` keys.
    pub fn from_absolute(absolute: Tensor, seq_len: usize) -> candle_core::Result<Self> {
        Ok(Self {
            absolute,
            seq_len,
            first_seq: 0,
        })
    }

    /// Slots per query (K = min(k, T)).
    pub fn k(&self) -> candle_core::Result<usize> {
        self.absolute.dim(2)
    }

    /// [B, T, K] u8: 1 for a selected key, 0 for padding.
    fn mask(&self) -> candle_core::Result<Tensor> {
        self.absolute.ne(u32::MAX)
    }

    /// [B, T, K] u32 key positions within each sequence; padding slots hold 0.
    pub fn indices(&self) -> candle_core::Result<Tensor> {
        let (b, t, k) = self.absolute.dims3()?;
        let device = self.absolute.device();
        let start = (self.first_seq * self.seq_len) as f64;
        let offsets = Tensor::arange(0u32, b as u32, device)?
            .affine(self.seq_len as f64, start)?
            .reshape((b, 1, 1))?
            .broadcast_as((b, t, k))?
            .contiguous()?;
        // Padding becomes the sequence offset first, so the subtraction never wraps.
        self.mask()?.where_cond(&self.absolute, &offsets)? - &offsets
    }

    /// [B, T, K] f32: 1 for a selected key, 0 for padding.
    pub fn valid(&self) -> candle_core::Result<Tensor> {
        self.mask()?.to_dtype(DType::F32)
    }

    /// [B, T, K] f32: 0 for a selected key, `MASKED` for padding (added to logits).
    pub fn bias(&self) -> candle_core::Result<Tensor> {
        let masked = Tensor::full(MASKED, self.absolute.shape(), self.absolute.device())?;
        self.mask()?.where_cond(&masked.zeros_like()?, &masked)
    }

    /// The selected sets of queries q0..q0+n (the absolute rows still index the whole batch).
    pub fn rows(&self, q0: usize, n: usize) -> candle_core::Result<Self> {
        Ok(Self {
            absolute: self.absolute.narrow(1, q0, n)?,
            seq_len: self.seq_len,
            first_seq: self.first_seq,
        })
    }

    /// The sets of queries q0..q0+n of sequence `b` alone ([1, n, K]; absolute rows unchanged).
    pub fn block(&self, b: usize, q0: usize, n: usize) -> candle_core::Result<Self> {
        Ok(Self {
            absolute: self.absolute.narrow(0, b, 1)?.narrow(1, q0, n)?,
            seq_len: self.seq_len,
            first_seq: self.first_seq + b,
        })
    }
}

/// How far the sets `sel` agree with `reference` (the same queries), per query: [B, T, 2] f32,
/// 1 where the two sets are equal (as sets of valid keys) else 0, then the recall of the
/// reference set |sel ∩ reference| / |reference| (1 for an empty reference). On the host.
pub fn agreement_rows(sel: &Selection, reference: &Selection) -> candle_core::Result<Tensor> {
    let (b, t, k) = sel.absolute.dims3()?;
    if reference.absolute.dims() != sel.absolute.dims() {
        candle_core::bail!(
            "agreement of sets {:?} with reference sets {:?}",
            sel.absolute.dims(),
            reference.absolute.dims()
        );
    }
    let sorted_rows = |s: &Selection| -> candle_core::Result<Vec<Vec<u32>>> {
        let v = s.absolute.flatten_all()?.to_vec1::<u32>()?;
        Ok(v.chunks(k.max(1))
            .map(|row| {
                let mut r: Vec<u32> = row.iter().copied().filter(|&x| x != u32::MAX).collect();
                r.sort_unstable();
                r.dedup();
                r
            })
            .collect())
    };
    let (mine, theirs) = (sorted_rows(sel)?, sorted_rows(reference)?);
    let out: Vec<f32> = mine
        .iter()
        .zip(&theirs)
        .flat_map(|(a, r)| {
            let common = a.iter().filter(|x| r.binary_search(x).is_ok()).count();
            let recall = if r.is_empty() {
                1.0
            } else {
                common as f32 / r.len() as f32
            };
            [f32::from(a == r), recall]
        })
        .collect();
    Tensor::from_vec(out, (b, t, 2), sel.absolute.device())
}

/// Absolute rows (sequence `seq` x `seq_len` + position; u32::MAX stays padding) of key
/// positions [n, K] of one sequence: converted a block of queries at a time so that no
/// second whole-sequence form of the sets ever exists.
pub fn absolute_rows(
    positions: &Tensor,
    seq: usize,
    seq_len: usize,
) -> candle_core::Result<Tensor> {
    let valid = positions.ne(u32::MAX)?;
    let offset = Tensor::full(
        (seq * seq_len) as u32,
        positions.shape(),
        positions.device(),
    )?;
    // Padding becomes 0 before the add, so nothing wraps.
    let shifted = (valid.where_cond(positions, &positions.zeros_like()?)? + offset)?;
    valid.where_cond(&shifted, positions)
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
    topk_key_range(row, 0, t, k)
}

/// Indices of the top-k among `row[start..=t]` (a query's keys under document masking),
/// best first, lower index on ties.
pub fn topk_key_range(row: &[f32], start: usize, t: usize, k: usize) -> Vec<u32> {
    let better = |a: &u32, b: &u32| {
        score_key(row[*b as usize])
            .total_cmp(&score_key(row[*a as usize]))
            .then(a.cmp(b))
    };
    let mut cand: Vec<u32> = (start.min(t) as u32..=t as u32).collect();
    if cand.len() > k {
        cand.select_nth_unstable_by(k - 1, better);
        cand.truncate(k);
    }
    cand.sort_unstable_by(better);
    cand
}

/// Deterministic causal top-k of `scores` [B, T, T] (entries above the diagonal are ignored).
pub fn select_topk(scores: &Tensor, k: usize) -> Result<Selection> {
    select_topk_in(scores, k, None)
}

/// `select_topk` with each query's keys starting at `starts` (document masking; None: 0).
pub fn select_topk_in(scores: &Tensor, k: usize, starts: Option<&KeyStarts>) -> Result<Selection> {
    let (b, t, t2) = scores.dims3()?;
    anyhow::ensure!(
        t == t2,
        "indexer scores must be square per batch, got {:?}",
        scores.dims()
    );
    select_topk_streaming(
        b,
        t,
        k,
        &QueryRows::whole(t).blocks(query_block(b, t)),
        starts,
        scores.device(),
        |r| Ok(scores.narrow(1, r.pos, r.n)?),
    )
}

/// Deterministic causal top-k of the query rows in `blocks` (every position, or a context
/// rank's rows: `dist::context::QueryRows::blocks`), a block at a time: `rows(block)` returns
/// the scores [B, n, T] of the block's queries against every key, so no more than one block
/// exists at a time. The sets come back in row order, [B, rows, min(k, T)], absolute rows
/// counted in sequences of T. The host selection: f32 runs and the CPU; bf16 models on CUDA
/// take the device kernel (`kernels::indexer_topk`), whose rule is this one.
pub fn select_topk_streaming(
    b: usize,
    t: usize,
    k: usize,
    blocks: &[RowBlock],
    starts: Option<&KeyStarts>,
    device: &Device,
    mut rows: impl FnMut(RowBlock) -> Result<Tensor>,
) -> Result<Selection> {
    anyhow::ensure!(k > 0, "top-k must be positive");
    if let Some(s) = starts {
        anyhow::ensure!(
            s.dims() == (b, t),
            "key starts cover [{}, {}] queries, the scores [{b}, {t}]",
            s.dims().0,
            s.dims().1
        );
    }
    let kk = k.min(t);
    let local: usize = blocks.iter().map(|r| r.n).sum();
    let mut indices = vec![0u32; b * local * kk];
    let mut valid = vec![0f32; b * local * kk];
    for &block in blocks {
        let n = block.n;
        let host: Vec<f32> = rows(block)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?; // [B, n, T]
                         // (output row, position, key starts' row, scores)
        let mut idx_rows: Vec<(usize, usize, usize, &[f32])> = Vec::with_capacity(b * n);
        for bi in 0..b {
            for r in 0..n {
                idx_rows.push((
                    bi * local + block.local + r,
                    block.pos + r,
                    bi * t + block.pos + r,
                    &host[(bi * n + r) * t..(bi * n + r + 1) * t],
                ));
            }
        }
        let picked: Vec<(usize, Vec<u32>)> = idx_rows
            .par_iter()
            .map(|&(out, pos, key_row, row)| {
                let start = starts.map_or(0, |s| s.host[key_row] as usize);
                (out, topk_key_range(row, start, pos, kk))
            })
            .collect();
        for (out, sel) in picked {
            indices[out * kk..][..sel.len()].copy_from_slice(&sel);
            valid[out * kk..][..sel.len()]
                .iter_mut()
                .for_each(|v| *v = 1.0);
        }
    }
    selection_from_host(indices, valid, (b, local, kk), t, device)
}

/// Queries per scoring block: about 2^24 score elements (64 MiB of f32) per block.
pub fn query_block(b: usize, t: usize) -> usize {
    ((1usize << 24) / (b * t).max(1)).clamp(1, t.max(1))
}

/// Host positions `indices` (1.0 in `valid` where selected) of `shape` [B, rows, K] as a
/// selection over sequences of `seq_len` keys.
fn selection_from_host(
    indices: Vec<u32>,
    valid: Vec<f32>,
    shape: (usize, usize, usize),
    seq_len: usize,
    device: &Device,
) -> Result<Selection> {
    let (_, rows, k) = shape;
    let absolute: Vec<u32> = indices
        .iter()
        .zip(&valid)
        .enumerate()
        .map(|(i, (idx, v))| {
            if *v > 0.0 {
                (i / (rows * k) * seq_len) as u32 + idx
            } else {
                u32::MAX
            }
        })
        .collect();
    Ok(Selection::from_absolute(
        Tensor::from_vec(absolute, shape, device)?,
        seq_len,
    )?)
}

/// Attention-mass recall per query: sum over s in S_t of `p[b, t, s]`, with `p` [B, T, T] the
/// head-mean dense attention probabilities. Returns [B, T] f32.
pub fn recall_rows(p: &Tensor, sel: &Selection) -> Result<Tensor> {
    let picked = p
        .to_dtype(DType::F32)?
        .contiguous()?
        .gather(&sel.indices()?, 2)?; // [B, T, K]
    Ok((picked * sel.valid()?)?.sum(2)?)
}

/// Bisection steps of `topk_mass_rows`: the threshold's bracket starts at [0, row max] and
/// halves each step, so after 30 steps the mass is exact to k * max * 2^-30, at most k * 2^-30
/// of the mass itself (2e-6 at k = 2048). Cost: about 8 launches per step over one block of
/// rows; fine at the mini and bench models' shapes, launch-bound at the 671B one (16 rows per
/// block at 32K), where a one-kernel bisection would be the fix.
const TOPK_MASS_BISECTIONS: usize = 30;

/// The most attention mass any k keys can hold, per query: the sum of the k largest entries of
/// each row of `p` [B, n, T] (non-negative; entries above the causal diagonal are 0, so a row
/// with fewer than k keys gives its whole mass). This is the ceiling of the attention-mass
/// recall: an indexer whose top-k is the attention's own top-k reaches it.
///
/// Computed without sorting (candle's sort needs a row in shared memory; 32K f32 does not
/// fit): a bisection on the threshold tau with count(p >= tau) >= k, on the device, one pass
/// over the rows per step. At the end fewer than k entries are >= hi and at least k are >= lo;
/// the mass is sum(p >= hi) plus the missing count times the bracket's midpoint (the entries
/// in [lo, hi) differ from it by less than the bracket's width). Ties at the row maximum with
/// at least k copies give k * max. Returns [B, n] f32.
pub fn topk_mass_rows(p: &Tensor, k: usize) -> candle_core::Result<Tensor> {
    let p = p.to_dtype(DType::F32)?.contiguous()?;
    let kf = k as f64;
    let mut hi = p.max_keepdim(2)?; // [B, n, 1]
    let mut lo = hi.zeros_like()?;
    for _ in 0..TOPK_MASS_BISECTIONS {
        let mid = ((&lo + &hi)? * 0.5)?;
        let enough = p
            .broadcast_ge(&mid)?
            .to_dtype(DType::F32)?
            .sum_keepdim(2)?
            .ge(kf)?;
        lo = enough.where_cond(&mid, &lo)?;
        hi = enough.where_cond(&hi, &mid)?;
    }
    let above = p.broadcast_ge(&hi)?.to_dtype(DType::F32)?;
    let count = above.sum_keepdim(2)?;
    let sum_above = (&p * &above)?.sum_keepdim(2)?;
    let mid = ((&lo + &hi)? * 0.5)?;
    let filled = (sum_above + ((count.affine(-1.0, kf)?) * mid)?)?;
    let ties_at_max = (hi * kf)?;
    count.ge(kf)?.where_cond(&ties_at_max, &filled)?.squeeze(2)
}

/// Where each query's keys begin: query t of sequence b attends to keys `start[b, t]..=t`.
/// All zeros is plain causal attention; document masking (`data.document_mask`) starts each
/// query at the first token of its document, so no query sees an earlier document. Kept
/// twice: on the host (the host top-k, RoPE positions) and as u32 [B, T] on the device (the
/// kernels read each row's start; the plain twins build their bias rows from it).
#[derive(Debug, Clone)]
pub struct KeyStarts {
    host: std::sync::Arc<Vec<u32>>,
    device: Tensor,
    b: usize,
    t: usize,
}

impl KeyStarts {
    /// Starts [B*T] (row-major, each `start[b, t] <= t`) checked and copied to `device`.
    pub fn new(host: Vec<u32>, b: usize, t: usize, device: &Device) -> Result<Self> {
        anyhow::ensure!(
            host.len() == b * t,
            "{} key starts for [{b}, {t}] queries",
            host.len()
        );
        for (i, &s) in host.iter().enumerate() {
            let (bi, ti) = (i / t.max(1), i % t.max(1));
            anyhow::ensure!(
                s as usize <= ti && (ti == 0 || s >= host[i - 1]),
                "key start {s} of query {ti} (sequence {bi}) is after the query or before the previous query's start"
            );
        }
        let device = Tensor::from_slice(&host, (b, t), device)?;
        Ok(Self {
            host: std::sync::Arc::new(host),
            device,
            b,
            t,
        })
    }

    /// Document starts of token windows `tokens` [B*T]: a document begins at each window's
    /// first token and right after every `eos` token.
    pub fn after_eos(
        tokens: &[u32],
        b: usize,
        t: usize,
        eos: u32,
        device: &Device,
    ) -> Result<Self> {
        anyhow::ensure!(
            tokens.len() == b * t,
            "{} tokens for [{b}, {t}] windows",
            tokens.len()
        );
        let mut host = Vec::with_capacity(b * t);
        for seq in tokens.chunks(t.max(1)) {
            let mut start = 0u32;
            for (i, &tok) in seq.iter().enumerate() {
                host.push(start);
                if tok == eos {
                    start = i as u32 + 1;
                }
            }
        }
        Self::new(host, b, t, device)
    }

    /// (B, T).
    pub fn dims(&self) -> (usize, usize) {
        (self.b, self.t)
    }

    /// The starts of sequence `b`, [T] on the host.
    pub fn seq(&self, b: usize) -> &[u32] {
        &self.host[b * self.t..(b + 1) * self.t]
    }

    /// u32 [B, T] on the device.
    pub fn tensor(&self) -> &Tensor {
        &self.device
    }

    /// Each token's position inside its document, t - start[b, t], [B*T] (RoPE's positions).
    pub fn positions(&self) -> Vec<u32> {
        self.host
            .iter()
            .enumerate()
            .map(|(i, &s)| (i % self.t) as u32 - s)
            .collect()
    }

    /// Does any query start after key 0 (is there a boundary in any window)?
    pub fn any_boundary(&self) -> bool {
        self.host.iter().any(|&s| s > 0)
    }

    /// The mask bias of queries q0..q0+n over `keys` keys: [B, n, keys], 0 where
    /// start[b, q] <= s <= q, `MASKED` elsewhere.
    pub fn bias_rows(&self, q0: usize, n: usize, keys: usize) -> candle_core::Result<Tensor> {
        key_bias_rows(
            q0,
            n,
            keys,
            Some(&self.device.narrow(1, q0, n)?),
            self.device.device(),
        )
    }
}

/// The mask bias of queries q0..q0+n over `keys` keys: with `starts` (u32 [B, n], each
/// query's first key) [B, n, keys], 0 where start <= s <= q0 + r; without, the causal
/// [n, keys]. `MASKED` elsewhere. Built on the device.
pub fn key_bias_rows(
    q0: usize,
    n: usize,
    keys: usize,
    starts: Option<&Tensor>,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let causal = causal_rows(q0, n, keys, device)?;
    let Some(starts) = starts else {
        return Ok(causal);
    };
    let b = starts.dim(0)?;
    let cols = Tensor::arange(0u32, keys as u32, device)?.reshape((1, 1, keys))?;
    let before = cols.broadcast_lt(&starts.reshape((b, n, 1))?)?; // [B, n, keys] u8
    let masked = Tensor::full(MASKED, (b, n, keys), device)?;
    before.where_cond(&masked, &causal.unsqueeze(0)?.broadcast_as((b, n, keys))?)
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

    /// The sum of the k largest entries by sorting in f64, per row.
    fn topk_mass_by_sorting(rows: &[Vec<f32>], k: usize) -> Vec<f64> {
        rows.iter()
            .map(|r| {
                let mut v: Vec<f64> = r.iter().map(|&x| x as f64).collect();
                v.sort_by(|a, b| b.partial_cmp(a).unwrap());
                v.iter().take(k).sum()
            })
            .collect()
    }

    #[test]
    fn topk_mass_is_the_sum_of_the_k_largest_entries() {
        let mut rng = crate::rng::SplitMix64::new(11);
        let (n, t) = (37, 97);
        let mut rows: Vec<Vec<f32>> = (0..n)
            .map(|r| {
                // Causal rows of softmax-like mass: r + 1 keys, the rest 0; a few spiky rows.
                let mut row: Vec<f32> = (0..t)
                    .map(|s| {
                        if s <= r * 3 {
                            (rng.uniform() as f32).powi(1 + 3 * (r % 4) as i32)
                        } else {
                            0.0
                        }
                    })
                    .collect();
                let z: f32 = row.iter().sum();
                row.iter_mut().for_each(|x| *x /= z.max(1e-30));
                row
            })
            .collect();
        // Ties: one row of equal entries (ties at the max with more than k copies) and one with
        // ties straddling the k-th place.
        rows[5] = vec![1.0 / t as f32; t];
        rows[6] = (0..t)
            .map(|s| {
                if s < 4 {
                    0.2
                } else if s < 20 {
                    0.0125
                } else {
                    0.0
                }
            })
            .collect();
        let flat: Vec<f32> = rows.concat();
        let p = Tensor::from_vec(flat, (1, n, t), &Device::Cpu).unwrap();
        for k in [1usize, 7, 10, 40, 97, 200] {
            let got: Vec<f32> = topk_mass_rows(&p, k)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let want = topk_mass_by_sorting(&rows, k);
            for (r, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (*g as f64 - w).abs() <= 2e-6 * w.max(1e-3),
                    "k {k} row {r}: {g} vs {w}"
                );
            }
        }
    }

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
        let v: Vec<f32> = (0..b * t * t)
            .map(|_| (rng.uniform() * 6.0).floor() as f32 - 2.0)
            .collect();
        let scores = Tensor::from_vec(v.clone(), (b, t, t), &Device::Cpu).unwrap();
        let sel = select_topk(&scores, k).unwrap();
        let idx: Vec<Vec<Vec<u32>>> = sel.indices().unwrap().to_vec3().unwrap();
        let valid: Vec<Vec<Vec<f32>>> = sel.valid().unwrap().to_vec3().unwrap();
        for bi in 0..b {
            for q in 0..t {
                let row = &v[(bi * t + q) * t..][..t];
                let mut all: Vec<u32> = (0..=q as u32).collect();
                all.sort_by(|a, c| {
                    row[*c as usize]
                        .partial_cmp(&row[*a as usize])
                        .unwrap()
                        .then(a.cmp(c))
                });
                all.truncate(k);
                let n = all.len();
                assert_eq!(&idx[bi][q][..n], &all[..], "row {bi},{q}");
                assert!(valid[bi][q][..n].iter().all(|x| *x == 1.0));
                assert!(valid[bi][q][n..].iter().all(|x| *x == 0.0));
            }
        }
    }

    #[test]
    fn derived_forms_of_a_block_equal_the_whole_selections_cut() {
        // The one stored form (absolute rows) must give, for any block of any sequence, the
        // same positions, mask and bias as the whole selection's forms cut to that block.
        let (b, t, k) = (3, 23, 6);
        let scores = crate::rng::randn(&[b, t, t], 11, 1.0, &Device::Cpu).unwrap();
        let sel = select_topk(&scores, k).unwrap();
        let (idx, valid, bias) = (
            sel.indices().unwrap(),
            sel.valid().unwrap(),
            sel.bias().unwrap(),
        );
        assert!(idx
            .flatten_all()
            .unwrap()
            .to_vec1::<u32>()
            .unwrap()
            .iter()
            .all(|&i| (i as usize) < t));
        let cut = |x: &Tensor, bi: usize, q0: usize, n: usize| {
            x.narrow(0, bi, 1).unwrap().narrow(1, q0, n).unwrap()
        };
        for (bi, q0, n) in [(0, 0, 4), (1, 3, 7), (2, 17, 6), (2, 0, t)] {
            let blk = sel.block(bi, q0, n).unwrap();
            assert_eq!(
                blk.indices().unwrap().to_vec3::<u32>().unwrap(),
                cut(&idx, bi, q0, n).to_vec3::<u32>().unwrap(),
                "positions {bi} {q0}"
            );
            assert_eq!(
                blk.valid().unwrap().to_vec3::<f32>().unwrap(),
                cut(&valid, bi, q0, n).to_vec3::<f32>().unwrap()
            );
            assert_eq!(
                blk.bias().unwrap().to_vec3::<f32>().unwrap(),
                cut(&bias, bi, q0, n).to_vec3::<f32>().unwrap()
            );
            // A row range of all sequences.
            let rows = sel.rows(q0, n).unwrap();
            assert_eq!(
                rows.indices().unwrap().to_vec3::<u32>().unwrap(),
                idx.narrow(1, q0, n).unwrap().to_vec3::<u32>().unwrap()
            );
            // Positions of one sequence's block back to absolute rows.
            let positions = (blk
                .valid()
                .unwrap()
                .ne(0f32)
                .unwrap()
                .where_cond(
                    &blk.indices().unwrap(),
                    &Tensor::full(u32::MAX, (1, n, k), &Device::Cpu).unwrap(),
                )
                .unwrap())
            .squeeze(0)
            .unwrap();
            assert_eq!(
                absolute_rows(&positions, bi, t)
                    .unwrap()
                    .to_vec2::<u32>()
                    .unwrap(),
                cut(&sel.absolute, bi, q0, n)
                    .squeeze(0)
                    .unwrap()
                    .to_vec2::<u32>()
                    .unwrap()
            );
        }
        // Early rows hold fewer than k keys: padding is masked and scores nothing.
        assert_eq!(
            valid
                .narrow(1, 0, 1)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            b as f32
        );
        assert_eq!(
            bias.narrow(1, 0, 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .filter(|&&x| x == MASKED)
                .count(),
            b * (k - 1)
        );
    }

    #[test]
    fn recall_is_one_when_the_selection_holds_every_key() {
        let t = 6;
        let p = crate::ops::softmax_last(
            &(crate::rng::randn(&[1, t, t], 5, 1.0, &Device::Cpu)
                .unwrap()
                .broadcast_add(&causal_bias(t, &Device::Cpu).unwrap())
                .unwrap()),
        )
        .unwrap();
        let scores = crate::rng::randn(&[1, t, t], 6, 1.0, &Device::Cpu).unwrap();
        let full: Vec<f32> = recall_rows(&p, &select_topk(&scores, t).unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(full.iter().all(|r| (r - 1.0).abs() < 1e-6), "{full:?}");
        let part: Vec<f32> = recall_rows(&p, &select_topk(&scores, 2).unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(part[..2].iter().all(|r| (r - 1.0).abs() < 1e-6));
        assert!(part[2..].iter().all(|r| *r < 1.0 && *r > 0.0), "{part:?}");
    }
}
