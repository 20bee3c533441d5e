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
                // Each expert gathers its tokens; the outputs, weighted, are stacked in expert
                // order and each token sums its K rows in that order (as index_add would).
                let mut ys = Vec::with_capacity(e);
                for (ex, mlp) in self.experts.iter().enumerate() {
                    if tokens_of[ex].is_empty() {
                        continue;
                    }
                    ys.push(mlp.forward(&RowPlan::gather(&tokens_of[ex], n, dev)?.apply(&x)?)?); // [n_e, hidden]
                }
                let order: Vec<u32> = slots_of.concat();
                let w = RowPlan::gather(&order, n * k, dev)?.apply(&weights.unsqueeze(1)?)?; // [N*K, 1]
                let tok: Vec<u32> = order.iter().map(|&s| s / k as u32).collect();
                let combine = RowPlan::gather(&tok, n, dev)?.adjoint(); // token <- its K rows
                if ys.is_empty() {
                    x.zeros_like()? // no token at all
                } else {
                    combine.apply(&Tensor::cat(&ys, 0)?.broadcast_mul(&w)?)?
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
        let mut ys = Vec::with_capacity(per);
        let mut taken: Vec<u32> = Vec::with_capacity(arrived.dim(0)?);
        for (j, mlp) in self.experts.iter().enumerate() {
            let rows: Vec<u32> = (0..ep)
                .flat_map(|s| {
                    let first = block_start[s] + counts[s][..j].iter().sum::<usize>();
                    (first..first + counts[s][j]).map(|r| r as u32)
                })
                .collect();
            if rows.is_empty() {
                continue;
            }
            ys.push(mlp.forward(&RowPlan::gather(&rows, arrived.dim(0)?, dev)?.apply(&arrived)?)?);
            taken.extend(rows);
        }
        // With no row here, arrived * 0 keeps the output a function of the input, so every
        // rank's backward takes part in the exchange.
        let y = if ys.is_empty() {
            arrived.affine(0.0, 0.0)?
        } else {
            RowPlan::gather(&taken, arrived.dim(0)?, dev)?.adjoint().apply(&Tensor::cat(&ys, 0)?)?
        };
        let back = all_to_all_rows(&y, ex, &recv, &send)?; // [S, hidden], in the order rows left
        let w = RowPlan::gather(&slot, weights.dim(0)?, dev)?.apply(&weights.unsqueeze(1)?)?;
        RowPlan::gather(&tok, n, dev)?.adjoint().apply(&back.broadcast_mul(&w)?)
    }
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

    #[test]
    fn ties_pick_the_lower_expert() {
        let b = [0.5; 8];
        assert_eq!(route_token(&b, 2, 1, 3), vec![0, 1, 2]);
    }
}
