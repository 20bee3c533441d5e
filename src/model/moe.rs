//! Feed-forward blocks: the dense SwiGLU MLP of the first layers and DeepSeek-V3's MoE.
//!
//! MoE routing ("noaux_tc", brief section 1): logits in f32, s = sigmoid(logits);
//! b = s + e_score_correction_bias is used for selection only; a group's score is the sum of
//! its top-2 b; the top `topk_group` groups survive and the rest are masked with -inf (not 0,
//! trap 2); the top `num_experts_per_tok` experts by b are chosen (lower index on ties); their
//! weights are the unbiased s, normalised to sum 1, then times routed_scaling_factor (trap 3).
//! Routing runs on the host; the expert compute is grouped by expert (one gather, one SwiGLU,
//! one scatter-add per expert) and stays differentiable, including through the weights.

use candle_core::{DType, Result, Tensor};

use crate::ops::{linear, sigmoid, swiglu};

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
    pub experts: Vec<Mlp>,
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
        let x = x.reshape(((), d))?; // [N, hidden]
        let n = x.dim(0)?;
        let e = self.experts.len();
        let k = self.top_k;
        let scores = sigmoid(&linear(&x.to_dtype(DType::F32)?, &self.router)?)?; // [N, E] f32
        let host: Vec<f32> = scores.flatten_all()?.to_vec1()?;
        let bias: Vec<f32> = self.bias.to_vec1()?;
        let mut chosen = Vec::with_capacity(n * k); // [N*K] expert ids
        for row in host.chunks(e) {
            let biased: Vec<f32> = row.iter().zip(&bias).map(|(s, b)| s + b).collect();
            chosen.extend(route_token(&biased, self.n_group, self.topk_group, k).into_iter().map(|i| i as u32));
        }
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
        let mut out = x.zeros_like()?;
        for (ex, mlp) in self.experts.iter().enumerate() {
            if tokens_of[ex].is_empty() {
                continue;
            }
            let tok = Tensor::new(tokens_of[ex].as_slice(), x.device())?;
            let slot = Tensor::new(slots_of[ex].as_slice(), x.device())?;
            let y = mlp.forward(&x.index_select(&tok, 0)?)?; // [n_e, hidden]
            let w = weights.index_select(&slot, 0)?.unsqueeze(1)?; // [n_e, 1]
            out = out.index_add(&tok, &y.broadcast_mul(&w)?, 0)?;
        }
        if let Some(shared) = &self.shared {
            out = (out + shared.forward(&x)?)?;
        }
        let counts = tokens_of.iter().map(|v| v.len() as u32).collect();
        let balance_loss = if balance {
            let mut f = vec![0f32; b * e];
            for (slot, &ex) in chosen.iter().enumerate() {
                f[(slot / k) / t * e + ex as usize] += e as f32 / (k * t) as f32;
            }
            let f = Tensor::from_vec(f, (b, e), x.device())?;
            let p = scores.broadcast_div(&scores.sum_keepdim(1)?)?.reshape((b, t, e))?.mean(1)?; // [B, E]
            Some((f * p)?.sum(1)?.mean_all()?)
        } else {
            None
        };
        Ok(MoeOutput { out: out.reshape(dims)?, counts, balance_loss })
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
