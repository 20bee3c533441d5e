//! Feed-forward blocks: the dense SwiGLU MLP of the first layers and DeepSeek-V3's MoE.
//!
//! MoE routing ("noaux_tc", brief section 1): logits in f32, s = sigmoid(logits);
//! b = s + e_score_correction_bias is used for selection only; a group's score is the sum of
//! its top-2 b; the top `topk_group` groups survive and the rest are masked with -inf (not 0,
//! trap 2); the top `num_experts_per_tok` experts by b are chosen (lower index on ties); their
//! weights are the unbiased s, normalised to sum 1, then times routed_scaling_factor (trap 3).
//! Routing runs on the host; the expert compute is grouped by expert (one gather and one
//! SwiGLU per expert, then one weighted combine of all experts' rows) and stays
//! differentiable, including through the weights. Gathers and the combine are `RowPlan`s:
//! their backward is a parallel, deterministic row sum, not candle's serial index_add.

use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

use crate::dist::expert::{all_to_all_rows, timed, ExpertShard};
use crate::ops::{linear, sigmoid, swiglu};
use crate::rows::RowPlan;

pub struct Mlp {
    pub gate: Tensor,
    pub up: Tensor,
    pub down: Tensor,
}

impl Mlp {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        swiglu(x, &self.gate, &self.up, &self.down)
    }
}

pub struct Moe {
    /// [E, hidden] f32
    pub router: Tensor,
    /// [E] f32
    pub bias: Tensor,
    /// The routed experts held here: all E, or with expert parallelism the shard's range.
    pub experts: Vec<Mlp>,
    /// Expert parallelism: which experts are held here and the exchange to the others.
    pub shard: Option<ExpertShard>,
    /// E, the routed experts of the whole layer.
    pub n_experts: usize,
    pub shared: Option<Mlp>,
    pub top_k: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f64,
}

/// The experts chosen for one token, best first.
pub fn route_token(biased: &[f32], n_group: usize, topk_group: usize, top_k: usize) -> Vec<usize> {
    let e = biased.len();
    let per_group = e / n_group;
    let desc = |v: &[f32], a: usize, b: usize| v[b].total_cmp(&v[a]).then(a.cmp(&b));
    // Group score: sum of the (up to) two best biased scores in the group.
    let group_scores: Vec<f32> = (0..n_group)
        .map(|g| {
            let mut m: Vec<f32> = biased[g * per_group..(g + 1) * per_group].to_vec();
            m.sort_by(|a, b| b.total_cmp(a));
            m.iter().take(2).sum()
        })
        .collect();
    let mut groups: Vec<usize> = (0..n_group).collect();
    groups.sort_by(|&a, &b| desc(&group_scores, a, b));
    let mut keep = vec![false; n_group];
    groups.iter().take(topk_group).for_each(|&g| keep[g] = true);
    let masked: Vec<f32> = (0..e).map(|i| if keep[i / per_group] { biased[i] } else { f32::NEG_INFINITY }).collect();
    let mut order: Vec<usize> = (0..e).collect();
    order.sort_by(|&a, &b| desc(&masked, a, b));
    order.truncate(top_k);
    order
}

pub struct MoeOutput {
    pub out: Tensor,
    pub counts: Vec<u32>,
    /// Scalar f32, present when asked for.
    pub balance_loss: Option<Tensor>,
}

impl Moe {
    /// x [B, T, hidden] -> output [B, T, hidden], tokens routed to each expert, and (when asked)
    /// the sequence-wise balance loss of DeepSeek-V3 without its alpha:
    /// mean over sequences of sum_e f_e P_e, with f_e = E / (K T) * (tokens of the sequence
    /// routed to e) and P_e = mean over the sequence of s_e / sum_j s_j.
    pub fn forward(&self, x: &Tensor, balance: bool) -> Result<MoeOutput> {
        let dims = x.dims().to_vec();
        let (b, t, d) = x.dims3()?;
        let (out, chosen, scores) = self.forward_flat(&x.reshape(((), d))?)?;
        let counts = self.counts(&chosen);
        let balance_loss = if balance {
            let f = Tensor::from_vec(self.balance_weights(&chosen, b, t), (b, self.n_experts), x.device())?;
            let p = scores.broadcast_div(&scores.sum_keepdim(1)?)?.reshape((b, t, self.n_experts))?.mean(1)?; // [B, E]
            Some((f * p)?.sum(1)?.mean_all()?)
        } else {
            None
        };
        Ok(MoeOutput { out: out.reshape(dims)?, counts, balance_loss })
    }

    /// Tokens routed to each expert.
    pub fn counts(&self, chosen: &[u32]) -> Vec<u32> {
        let mut c = vec![0u32; self.n_experts];
        chosen.iter().for_each(|&e| c[e as usize] += 1);
        c
    }

    /// f of the balance loss, [B * E] row-major: f_e = E / (K T) * (tokens of the sequence
    /// routed to e), from the experts `chosen` for the B*T tokens (K per token).
    pub fn balance_weights(&self, chosen: &[u32], b: usize, t: usize) -> Vec<f32> {
        let (e, k) = (self.n_experts, self.top_k);
        let mut f = vec![0f32; b * e];
        for (slot, &ex) in chosen.iter().enumerate() {
            f[(slot / k) / t * e + ex as usize] += e as f32 / (k * t) as f32;
        }
        f
    }

    /// The balance loss's share of some tokens of a batch of B sequences of T tokens: with
    /// `f_rows` [n, E] each token's sequence's f (detached, from the whole sequence's routing),
    /// (1 / (B T)) sum over the tokens of sum_e f_e s_e / sum_j s_j. Summed over all tokens this
    /// is the loss of `forward`.
    pub fn balance_share(scores: &Tensor, f_rows: &Tensor, b: usize, t: usize) -> Result<Tensor> {
        let p = scores.broadcast_div(&scores.sum_keepdim(1)?)?;
        (f_rows * p)?.sum_all()? / (b * t) as f64
    }

    /// x [N, hidden] -> (output [N, hidden], the K experts chosen per token [N*K], and the
    /// router's sigmoid scores [N, E] f32, differentiable).
    pub fn forward_flat(&self, x: &Tensor) -> Result<(Tensor, Vec<u32>, Tensor)> {
        let x = x.clone();
        let n = x.dim(0)?;
        let e = self.n_experts;
        let k = self.top_k;
        let region = crate::profile::region("moe: router and host routing");
        let scores = sigmoid(&linear(&x.to_dtype(DType::F32)?, &self.router)?)?; // [N, E] f32
        let host: Vec<f32> = scores.flatten_all()?.to_vec1()?;
        let bias: Vec<f32> = self.bias.to_vec1()?;
        // Each token's choice depends on its own row only: routed in parallel on the host's
        // cores (one core took ~1 us per token, 16 ms per layer at 16K tokens), concatenated in
        // token order, so the result is the serial loop's.
        let chosen: Vec<u32> = host
            .par_chunks(e)
            .flat_map_iter(|row| {
                let biased: Vec<f32> = row.iter().zip(&bias).map(|(s, b)| s + b).collect();
                route_token(&biased, self.n_group, self.topk_group, k).into_iter().map(|i| i as u32)
            })
            .collect(); // [N*K] expert ids
        let chosen_t = Tensor::from_vec(chosen.clone(), (n, k), x.device())?;
        let mut weights = scores.gather(&chosen_t, 1)?; // [N, K] f32, differentiable
        if self.norm_topk_prob {
            weights = weights.broadcast_div(&(weights.sum_keepdim(1)? + 1e-20)?)?;
        }
        let weights = (weights * self.routed_scaling_factor)?.to_dtype(x.dtype())?.flatten_all()?; // [N*K]

        // Group (token, slot) pairs by expert.
        let mut tokens_of: Vec<Vec<u32>> = vec![vec![]; e];
        let mut slots_of: Vec<Vec<u32>> = vec![vec![]; e];
        for (slot, &ex) in chosen.iter().enumerate() {
            tokens_of[ex as usize].push((slot / k) as u32);
            slots_of[ex as usize].push(slot as u32);
        }
        drop(region);
        let region = crate::profile::region("moe: routed experts and combine");
        let mut out = match &self.shard {
            None => {
                let dev = x.device();
                // The experts' outputs of their tokens, stacked in expert order; weighted, each
                // token sums its K rows in that order (as index_add would).
                let order: Vec<u32> = slots_of.concat();
                let w = RowPlan::gather(&order, n * k, dev)?.apply(&weights.unsqueeze(1)?)?; // [N*K, 1]
                let tok: Vec<u32> = order.iter().map(|&s| s / k as u32).collect();
                let combine = RowPlan::gather(&tok, n, dev)?.adjoint(); // token <- its K rows
                match self.routed_outputs(&x, &tokens_of, self.use_grouped())? {
                    Some(ys) => combine.apply(&ys.broadcast_mul(&w)?)?,
                    None => x.zeros_like()?, // no token at all
                }
            }
            Some(shard) => self.experts_sharded(&x, &weights, &tokens_of, &slots_of, shard)?,
        };
        drop(region);
        if let Some(shared) = &self.shared {
            let _region = crate::profile::region("moe: shared expert");
            out = (out + shared.forward(&x)?)?;
        }
        Ok((out, chosen, scores))
    }

    /// Every routed expert's SwiGLU on its tokens `tokens_of[e]` (rows of x [N, hidden]),
    /// stacked in expert order, then token order: [sum_e n_e, hidden], or None when no expert
    /// has a token. `grouped`: every expert that has tokens at once, as batched matmuls over
    /// [E', cap, .] with cap = the largest n_e (rows past an expert's n_e are zeros, computed
    /// and dropped: at most E' cap / sum n_e times the FLOPs, a few launches instead of about
    /// ten per expert; the weights are stacked per call, which `use_grouped` bounds).
    /// Otherwise one gather and one SwiGLU per expert, the plain twin. Each output row is the
    /// same dot products either way (equal up to the matmul's summation order).
    pub fn routed_outputs(&self, x: &Tensor, tokens_of: &[Vec<u32>], grouped: bool) -> Result<Option<Tensor>> {
        let (n, d) = x.dims2()?;
        let dev = x.device();
        if tokens_of.iter().all(Vec::is_empty) {
            return Ok(None);
        }
        let _region = crate::profile::region(if grouped { "moe: routed experts (grouped)" } else { "moe: routed experts (one per expert)" });
        if !grouped {
            let mut ys = Vec::with_capacity(self.experts.len());
            for (ex, mlp) in self.experts.iter().enumerate() {
                if !tokens_of[ex].is_empty() {
                    ys.push(mlp.forward(&RowPlan::gather(&tokens_of[ex], n, dev)?.apply(x)?)?); // [n_e, hidden]
                }
            }
            return Ok(Some(Tensor::cat(&ys, 0)?));
        }
        // Only the experts that have tokens are stacked: an idle expert's weights get no
        // gradient at all, as in the per-expert path (a zero gradient would still move them
        // through AdamW's momentum and weight decay), and pad no rows.
        let busy: Vec<usize> = (0..self.experts.len()).filter(|&ex| !tokens_of[ex].is_empty()).collect();
        let e = busy.len();
        let cap = tokens_of.iter().map(Vec::len).max().unwrap_or(0);
        // Row g * cap + j of the padded input is x[tokens_of[busy[g]][j]], or zeros past that
        // expert's count (an empty group of the row sum).
        let (mut src, mut off, mut valid) = (Vec::new(), Vec::with_capacity(e * cap + 1), Vec::new());
        off.push(0u32);
        for (g, &ex) in busy.iter().enumerate() {
            for j in 0..cap {
                if let Some(&t) = tokens_of[ex].get(j) {
                    src.push(t);
                    valid.push((g * cap + j) as u32);
                }
                off.push(src.len() as u32);
            }
        }
        let xs = RowPlan::sums(src, off, n, dev)?.apply(x)?.reshape((e, cap, d))?;
        let stack = |pick: fn(&Mlp) -> &Tensor| -> Result<Tensor> { Tensor::stack(&busy.iter().map(|&ex| pick(&self.experts[ex])).collect::<Vec<_>>(), 0) };
        let (gate, up, down) = (stack(|m| &m.gate)?, stack(|m| &m.up)?, stack(|m| &m.down)?); // [E', I, D], [E', I, D], [E', D, I]
        let h = (xs.matmul(&gate.transpose(1, 2)?)?.silu()? * xs.matmul(&up.transpose(1, 2)?)?)?; // [E', cap, I]
        let y = h.matmul(&down.transpose(1, 2)?)?.reshape((e * cap, d))?;
        Ok(Some(RowPlan::gather(&valid, e * cap, dev)?.apply(&y)?))
    }

    /// Whether the routed experts run grouped (`routed_outputs`): by default on CUDA, where it
    /// was measured faster side by side (NVIDIA H200: bench model sparse stage at 8K 1.28x,
    /// mini model dense stage 1.25x; docs/benchmarks.md), per expert elsewhere;
    /// DSA_MOE_GROUPED=1 / =0 forces it on / off. Only while the stacked copy of the experts'
    /// weights stays under 256 MiB: small experts, where the per-expert launches cost more
    /// than the FLOPs (large experts amortise them anyway).
    fn use_grouped(&self) -> bool {
        static ASKED: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();
        let asked = *ASKED.get_or_init(|| match std::env::var("DSA_MOE_GROUPED").as_deref() {
            Ok("1") => Some(true),
            Ok("0") => Some(false),
            _ => None,
        });
        let asked = asked.unwrap_or_else(|| self.experts.first().is_some_and(|m| m.gate.device().is_cuda()));
        let bytes: usize = self.experts.iter().map(|m| (m.gate.elem_count() + m.up.elem_count() + m.down.elem_count()) * m.gate.dtype().size_in_bytes()).sum();
        asked && self.experts.len() > 1 && bytes <= 256 << 20
    }

    /// The routed experts' weighted sum with the experts spread over an expert-parallel group.
    /// Rows leave sorted by expert (then by token slot), so each destination receives, per
    /// source, one block per local expert; the per-expert row counts travel first (host
    /// bytes), then the rows, then the outputs come back in the order the rows left. The
    /// routing weights are applied here, at the token's rank, so their gradient stays local.
    /// Per token the expert outputs are added in expert order, as in the unsharded path.
    fn experts_sharded(&self, x: &Tensor, weights: &Tensor, tokens_of: &[Vec<u32>], slots_of: &[Vec<u32>], shard: &ExpertShard) -> Result<Tensor> {
        let ex = &shard.exchange;
        let (ep, per) = (ex.size(), shard.count);
        let tok: Vec<u32> = tokens_of.concat();
        let slot: Vec<u32> = slots_of.concat();
        let send: Vec<usize> = (0..ep).map(|d| tokens_of[d * per..(d + 1) * per].iter().map(Vec::len).sum()).collect();
        let parts = (0..ep)
            .map(|d| tokens_of[d * per..(d + 1) * per].iter().flat_map(|v| (v.len() as u32).to_le_bytes()).collect())
            .collect();
        let got = timed(|| ex.host(parts)).map_err(|e| candle_core::Error::Msg(format!("expert exchange (row counts): {e:#}")))?;
        // counts[s][j]: rows source s sends for local expert j.
        let counts: Vec<Vec<usize>> = got
            .iter()
            .map(|b| b.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")) as usize).collect::<Vec<_>>())
            .collect();
        if counts.iter().any(|c| c.len() != per) {
            candle_core::bail!("expert exchange: a rank sent row counts for a different number of experts per rank than {per}");
        }
        let recv: Vec<usize> = counts.iter().map(|c| c.iter().sum()).collect();
        let dev = x.device();
        let n = x.dim(0)?;
        let x_sorted = RowPlan::gather(&tok, n, dev)?.apply(x)?; // [S, hidden]
        let arrived = all_to_all_rows(&x_sorted, ex, &send, &recv)?; // [R, hidden]
        let mut block_start = vec![0usize; ep + 1];
        for s in 0..ep {
            block_start[s + 1] = block_start[s] + recv[s];
        }
        // Local expert j takes its rows from every source's block; the outputs, stacked in
        // expert order, go back to the arrival order (each arrived row has exactly one).
        let rows_of: Vec<Vec<u32>> = (0..per)
            .map(|j| {
                (0..ep)
                    .flat_map(|s| {
                        let first = block_start[s] + counts[s][..j].iter().sum::<usize>();
                        (first..first + counts[s][j]).map(|r| r as u32)
                    })
                    .collect()
            })
            .collect();
        let taken: Vec<u32> = rows_of.concat();
        // With no row here, arrived * 0 keeps the output a function of the input, so every
        // rank's backward takes part in the exchange.
        let y = match self.routed_outputs(&arrived, &rows_of, self.use_grouped())? {
            Some(ys) => RowPlan::gather(&taken, arrived.dim(0)?, dev)?.adjoint().apply(&ys)?,
            None => arrived.affine(0.0, 0.0)?,
        };
        let back = all_to_all_rows(&y, ex, &recv, &send)?; // [S, hidden], in the order rows left
        let w = RowPlan::gather(&slot, weights.dim(0)?, dev)?.apply(&weights.unsqueeze(1)?)?;
        RowPlan::gather(&tok, n, dev)?.adjoint().apply(&back.broadcast_mul(&w)?)
    }
}

/// The largest relative error (max |a - b| / max |a| per tensor) between the grouped experts
/// (`Moe::routed_outputs` with `grouped`) and the per-expert twin, over the output and the
/// gradients of a random probe of it into x and every expert's gate, up and down: `e` experts
/// of hidden `d` and width `i`, `n` tokens with uneven loads and the last expert unused (its
/// weights must get no gradient from either path, or the error is infinite). For the unit
/// test and gpu-selftest.
pub fn grouped_against_plain(dev: &candle_core::Device, dtype: DType, e: usize, n: usize, d: usize, i: usize, seed: u64) -> Result<f32> {
    use crate::rng::{randn, SplitMix64};
    use candle_core::Var;
    let var = |shape: &[usize], s: u64| -> Result<Var> { Var::from_tensor(&randn(shape, seed * 1000 + s, 0.5, &candle_core::Device::Cpu)?.to_dtype(dtype)?.to_device(dev)?) };
    let weights: Vec<[Var; 3]> = (0..e as u64).map(|s| Ok([var(&[i, d], 10 + 3 * s)?, var(&[i, d], 11 + 3 * s)?, var(&[d, i], 12 + 3 * s)?])).collect::<Result<_>>()?;
    let moe = Moe {
        router: Tensor::zeros((e, d), DType::F32, dev)?,
        bias: Tensor::zeros(e, DType::F32, dev)?,
        experts: weights.iter().map(|[g, u, w]| Mlp { gate: g.as_tensor().clone(), up: u.as_tensor().clone(), down: w.as_tensor().clone() }).collect(),
        shard: None,
        n_experts: e,
        shared: None,
        top_k: 1,
        n_group: 1,
        topk_group: 1,
        norm_topk_prob: true,
        routed_scaling_factor: 1.0,
    };
    let x = var(&[n, d], 1)?;
    // Expert j takes each token with probability about (j + 1) / e (uneven loads); the last takes none.
    let mut rng = SplitMix64::new(seed);
    let tokens_of: Vec<Vec<u32>> = (0..e).map(|j| if j + 1 == e { vec![] } else { (0..n as u32).filter(|_| rng.next_u64() % e as u64 <= j as u64).collect() }).collect();
    let rows: usize = tokens_of.iter().map(Vec::len).sum();
    let probe = randn(&[rows.max(1), d], seed + 7, 1.0, &candle_core::Device::Cpu)?.to_dtype(dtype)?.to_device(dev)?;
    let run = |grouped: bool| -> Result<Vec<Option<Tensor>>> {
        let y = moe.routed_outputs(x.as_tensor(), &tokens_of, grouped)?.ok_or_else(|| candle_core::Error::Msg("no routed rows".into()))?;
        let grads = (y.to_dtype(DType::F32)? * probe.to_dtype(DType::F32)?)?.sum_all()?.backward()?;
        let mut all = vec![Some(y), grads.get(x.as_tensor()).cloned()];
        all.extend(weights.iter().flatten().map(|v| grads.get(v.as_tensor()).cloned()));
        Ok(all)
    };
    let (plain, grouped) = (run(false)?, run(true)?);
    let mut worst = 0f32;
    for (a, b) in plain.iter().zip(&grouped) {
        let (a, b) = match (a, b) {
            (None, None) => continue, // an idle expert: no gradient either way
            (Some(a), Some(b)) => (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?),
            _ => return Ok(f32::INFINITY), // a gradient on one path only
        };
        let scale = a.abs()?.max_all()?.to_scalar::<f32>()?;
        let diff = (&a - &b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        worst = worst.max(if scale == 0.0 { if diff == 0.0 { 0.0 } else { f32::INFINITY } } else { diff / scale });
    }
    Ok(worst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_groups_lose_even_when_every_biased_score_is_negative() {
        // 4 groups of 2; keep 2 groups. Group sums: g0 -1.9, g1 -0.3, g2 -1.0, g3 -0.5.
        // With 0-masking (transformers' old bug) the masked experts would score 0 and win.
        let b = [-1.0, -0.9, -0.1, -0.2, -0.5, -0.5, -0.25, -0.25];
        assert_eq!(route_token(&b, 4, 2, 3), vec![2, 3, 6]);
    }

    /// The grouped experts against the per-expert twin, forward and backward, with an expert
    /// that gets no token and uneven loads (f32, so only the summation order differs).
    #[test]
    fn grouped_experts_equal_one_swiglu_per_expert() {
        let err = grouped_against_plain(&candle_core::Device::Cpu, DType::F32, 5, 23, 12, 7, 1).unwrap();
        assert!(err <= 1e-5, "grouped experts vs one SwiGLU per expert: max relative error {err}");
    }

    #[test]
    fn ties_pick_the_lower_expert() {
        let b = [0.5; 8];
        assert_eq!(route_token(&b, 2, 1, 3), vec![0, 1, 2]);
    }
}
