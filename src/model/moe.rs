//! Feed-forward blocks: the dense SwiGLU MLP of the first layers and DeepSeek-V3's MoE.
//!
//! MoE routing ("noaux_tc", brief section 1): logits in f32, s = sigmoid(logits);
//! b = s + e_score_correction_bias is used for selection only; a group's score is the sum of
//! its top-2 b; the top `topk_group` groups survive and the rest are masked with -inf (not 0,
//! trap 2); the top `num_experts_per_tok` experts by b are chosen (lower index on ties); their
//! weights are the unbiased s, normalised to sum 1, then times routed_scaling_factor (trap 3).
//! Routing runs as kernels on a GPU (`kernels::moe_route`) and on the host elsewhere; the
//! expert compute is grouped by expert (one gather and one
//! SwiGLU per expert, then one weighted combine of all experts' rows) and stays
//! differentiable, including through the weights. Gathers and the combine are `RowPlan`s:
//! their backward is a parallel, deterministic row sum, not candle's serial index_add.

use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;

use super::grad_sink::{add_if_wanted, GradSink};
use crate::dist::expert::{all_to_all_rows, timed, ExpertShard};
use crate::kernels::{moe_route, KernelPolicy};
use crate::model::dispatch::{send_to_experts, Dispatch};
use crate::ops::{
    self, linear, sigmoid, swiglu, swiglu_backward, swiglu_batched_saved, swiglu_saved, SwigluSaved,
};
use crate::rows::RowPlan;

pub struct Mlp {
    pub gate: Tensor,
    pub up: Tensor,
    pub down: Tensor,
    /// Which kernels its ops run.
    pub kernels: KernelPolicy,
}

impl Mlp {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        swiglu(self.kernels, x, &self.gate, &self.up, &self.down)
    }

    /// The hidden layer of `forward` with what `backward` reads (the output:
    /// `SwigluSaved::output`).
    pub fn forward_saved(&self, x: &Tensor) -> Result<SwigluSaved> {
        swiglu_saved(self.kernels, x, &self.gate, &self.up)
    }

    /// The backward of `forward_saved`: dy -> dx; the three weights' gradients to `grads`.
    pub fn backward(
        &self,
        x: &Tensor,
        saved: &SwigluSaved,
        dy: &Tensor,
        grads: &mut dyn GradSink,
    ) -> Result<Tensor> {
        let want = [
            grads.wants(&self.gate),
            grads.wants(&self.up),
            grads.wants(&self.down),
        ];
        let (dx, g) = swiglu_backward(
            self.kernels,
            x,
            saved,
            &self.gate,
            &self.up,
            &self.down,
            dy,
            want,
        )?;
        add_if_wanted(grads, &self.gate, g.gate)?;
        add_if_wanted(grads, &self.up, g.up)?;
        add_if_wanted(grads, &self.down, g.down)?;
        Ok(dx)
    }
}

/// One batch of tokens' routing (`Moe::route`).
pub struct Routing {
    /// The router's sigmoid scores [N, E] f32 (differentiable in x and the router).
    pub scores: Tensor,
    /// The K experts chosen per token, best first [N*K].
    pub chosen: Vec<u32>,
    /// Their unbiased scores [N, K] f32.
    picked: Tensor,
    /// The combine weights [N*K] in x's dtype: `picked`, normalised to sum 1 when
    /// norm_topk_prob, times routed_scaling_factor.
    weights: Tensor,
    /// The routed rows sorted by expert.
    sorted: SortedRows,
}

/// The S = N K routed (token, slot) pairs as rows sorted by expert, then slot: expert e's rows
/// are `offsets[e]..offsets[e + 1]`; `slot` gathers each row's slot of an [N K] tensor (the
/// combine weights), `tok` each row's token of an [N, .] tensor (the dispatch; its adjoint,
/// each token summing its K rows in row order, is the combine). Built on the GPU by the
/// routing kernels or on the host by their twin (`kernels::moe_route`): the same plans.
struct SortedRows {
    offsets: Vec<u32>,
    slot: RowPlan,
    tok: RowPlan,
}

impl SortedRows {
    /// The host's sort of the choice `chosen` [N K] over `e` experts.
    fn on_host(chosen: &[u32], e: usize, n: usize, k: usize, dev: &Device) -> Result<Self> {
        let (order, _, offsets) = moe_route::expert_order(chosen, e);
        let tokens: Vec<u32> = order.iter().map(|&s| s / k as u32).collect();
        Ok(Self {
            offsets,
            slot: RowPlan::gather(&order, n * k, dev)?,
            tok: RowPlan::gather(&tokens, n, dev)?,
        })
    }

    /// The plans of the device's sort (`moe_route::sort`) of N tokens' K choices, with its
    /// offsets copied to the host. The adjoints are made there too: a gather's adjoint is its
    /// inverse permutation (`position`); the combine's is each token's K rows ascending
    /// (`moe_route::token_rows`), the order the host's transposed map sums them in.
    fn on_device(
        sorted: moe_route::ExpertOrder,
        offsets: Vec<u32>,
        n: usize,
        k: usize,
    ) -> Result<Self> {
        let s = n * k;
        let dev = sorted.order.device().clone();
        let one_each = Tensor::arange(0u32, s as u32 + 1, &dev)?; // a gather's offsets
        let per_token = Tensor::arange_step(0u32, s as u32 + 1, k as u32, &dev)?;
        let rows = moe_route::token_rows(&sorted.position, k)?;
        Ok(Self {
            offsets,
            slot: RowPlan::from_device(
                (sorted.order, one_each.clone()),
                (sorted.position, one_each.clone()),
                s,
                s,
                (true, true),
            )?,
            tok: RowPlan::from_device(
                (sorted.token, one_each),
                (rows, per_token),
                n,
                s,
                (true, k == 1),
            )?,
        })
    }

    /// Each expert's rows, offsets[e]..offsets[e + 1].
    fn rows_of(&self) -> Vec<Vec<u32>> {
        self.offsets
            .windows(2)
            .map(|w| (w[0]..w[1]).collect())
            .collect()
    }

    /// Rows per expert.
    fn counts(&self) -> Vec<usize> {
        self.offsets
            .windows(2)
            .map(|w| (w[1] - w[0]) as usize)
            .collect()
    }
}

/// What the routed experts' explicit forward keeps, per `ExpertCompute`.
enum ExpertsSaved {
    /// Per expert held here that has rows (index into `Moe::experts`): its rows of the arrived
    /// rows, its input [n_e, hidden] and its SwiGLU's saved values.
    PerExpert(Vec<(usize, Vec<u32>, Tensor, SwigluSaved)>),
    /// The busy experts at once: `pad` takes the arrived rows to [E' * cap] padded rows (zeros
    /// past an expert's count), `unpad` takes them back; the padded input [E', cap, hidden],
    /// the stacked weights (gate, up, down) and the batched SwiGLU's saved values.
    Grouped {
        busy: Vec<usize>,
        pad: RowPlan,
        unpad: RowPlan,
        xs: Tensor,
        stacks: [Tensor; 3],
        saved: SwigluSaved,
    },
    /// No row reached an expert held here.
    Idle,
}

/// How the routed experts run: a policy of the model, set when it is built (numerics: the same
/// dot products either way, summed in cuBLAS's order for the shape).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertCompute {
    /// Grouped on CUDA while the stacked weights stay under 256 MiB (small experts, where the
    /// per-expert launches cost more than the FLOPs), one per expert otherwise.
    Auto,
    /// One gather and one SwiGLU per expert that has rows.
    PerExpert,
    /// Every busy expert at once: padded batched products over stacked weights.
    Grouped,
}

impl MoeSaved {
    /// The experts chosen per token [N*K] and the router's scores [N, E] f32.
    pub fn routing(&self) -> (&[u32], &Tensor) {
        (&self.routing.chosen, &self.routing.scores)
    }
}

/// What `Moe::forward_saved` keeps for `Moe::backward`.
pub struct MoeSaved {
    routing: Routing,
    /// Token and slot of every routed row, rows sorted by expert then token: [S] each.
    tok: RowPlan,
    slot: RowPlan,
    /// Expert parallelism: rows sent to and received from each rank of the group.
    exchange: Option<(Vec<usize>, Vec<usize>)>,
    /// The routed experts' forward.
    experts: ExpertsSaved,
    /// Arrived rows (= S unsharded).
    arrived_rows: usize,
    /// The routed outputs back at this rank, unweighted [S, hidden].
    back: Tensor,
    shared: Option<SwigluSaved>,
}

impl MoeSaved {
    /// The K experts chosen per token [N*K], best first (the routing the forward ran).
    pub fn chosen(&self) -> &[u32] {
        &self.routing.chosen
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
    pub compute: ExpertCompute,
    /// The routed rows' format on their way to the experts (`model::dispatch`).
    pub dispatch: Dispatch,
    /// Which kernels its ops run.
    pub kernels: KernelPolicy,
}

/// The experts chosen for one token, best first.
pub fn route_token(biased: &[f32], n_group: usize, topk_group: usize, top_k: usize) -> Vec<usize> {
    // A NaN ranks above every number, and NaNs tie (lower index first): one NaN pattern for
    // all, as the routing kernel does, since NaN payloads and signs from an addition differ
    // between the host and the GPU.
    let canon = |x: f32| if x.is_nan() { f32::NAN } else { x };
    let biased: Vec<f32> = biased.iter().map(|&x| canon(x)).collect();
    let biased = biased.as_slice();
    let e = biased.len();
    let per_group = e / n_group;
    let desc = |v: &[f32], a: usize, b: usize| v[b].total_cmp(&v[a]).then(a.cmp(&b));
    // Group score: the best biased score plus the second best (one f32 addition; a group of
    // one expert: that expert's), as the routing kernel adds them.
    let group_scores: Vec<f32> = (0..n_group)
        .map(|g| {
            let mut m: Vec<f32> = biased[g * per_group..(g + 1) * per_group].to_vec();
            m.sort_by(|a, b| b.total_cmp(a));
            if m.len() > 1 {
                canon(m[0] + m[1])
            } else {
                m[0]
            }
        })
        .collect();
    let mut groups: Vec<usize> = (0..n_group).collect();
    groups.sort_by(|&a, &b| desc(&group_scores, a, b));
    let mut keep = vec![false; n_group];
    groups.iter().take(topk_group).for_each(|&g| keep[g] = true);
    let masked: Vec<f32> = (0..e)
        .map(|i| {
            if keep[i / per_group] {
                biased[i]
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect();
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
    /// The balance loss's f per sequence [B * E] (`balance_weights`), present when asked for:
    /// a backward that recomputes the layer a block of tokens at a time needs it.
    pub balance_weights: Option<Vec<f32>>,
    /// The experts chosen per token [B*T*K], token order (a recomputing backward reuses them).
    pub chosen: Vec<u32>,
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
        let (balance_loss, balance_weights) = if balance {
            let fw = self.balance_weights(&chosen, b, t);
            let f = Tensor::from_slice(&fw, (b, self.n_experts), x.device())?;
            let p = scores
                .broadcast_div(&scores.sum_keepdim(1)?)?
                .reshape((b, t, self.n_experts))?
                .mean(1)?; // [B, E]
            (Some((f * p)?.sum(1)?.mean_all()?), Some(fw))
        } else {
            (None, None)
        };
        Ok(MoeOutput {
            out: out.reshape(dims)?,
            counts,
            balance_loss,
            balance_weights,
            chosen,
        })
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
        self.balance_weights_of(&self.balance_counts(chosen, b, t), t)
    }

    /// Tokens of each sequence routed to each expert, [B * E] row-major, from the experts
    /// `chosen` for `rows` tokens of each of B sequences (K per token).
    pub fn balance_counts(&self, chosen: &[u32], b: usize, rows: usize) -> Vec<u32> {
        let (e, k) = (self.n_experts, self.top_k);
        let mut c = vec![0u32; b * e];
        debug_assert_eq!(chosen.len(), b * rows * k);
        for (slot, &ex) in chosen.iter().enumerate() {
            c[(slot / k) / rows.max(1) * e + ex as usize] += 1;
        }
        c
    }

    /// f of the balance loss from each sequence's `counts` [B * E] over its `t` tokens:
    /// E / (K T) added once per routed token, in f32 (a sum of equal terms, so the bits depend
    /// on the count alone, however the tokens were split between ranks).
    pub fn balance_weights_of(&self, counts: &[u32], t: usize) -> Vec<f32> {
        let step = self.n_experts as f32 / (self.top_k * t) as f32;
        counts
            .iter()
            .map(|&n| (0..n).fold(0f32, |f, _| f + step))
            .collect()
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
        let routing = self.route(&x, None)?;
        let sorted = &routing.sorted;
        let region = crate::profile::region("moe: routed experts and combine");
        let mut out = match &self.shard {
            None => {
                // The tokens' rows sorted by expert; each expert's are consecutive. The experts'
                // outputs come back in that order; weighted, each token sums its K rows in
                // that order (as index_add would).
                let x_sorted = sorted.tok.apply(self.kernels, &x)?; // [S, hidden]
                let x_sorted = send_to_experts(&x_sorted, self.dispatch, None)?;
                let w = sorted
                    .slot
                    .apply(self.kernels, &routing.weights.unsqueeze(1)?)?; // [S, 1]
                match self.routed_outputs(&x_sorted, &sorted.rows_of(), self.use_grouped())? {
                    Some(ys) => sorted.tok.adjoint().apply_weighted(self.kernels, &ys, &w)?,
                    None => x.zeros_like()?, // no token at all
                }
            }
            Some(shard) => self.experts_sharded(&x, &routing.weights, sorted, shard)?,
        };
        drop(region);
        if let Some(shared) = &self.shared {
            let _region = crate::profile::region("moe: shared expert");
            out = (out + shared.forward(&x)?)?;
        }
        Ok((out, routing.chosen, routing.scores))
    }

    /// Route the tokens x [N, hidden]: router logits in f32, sigmoid scores, each token's
    /// choice (`route_token`), the combine weights (differentiable through the scores) and the
    /// routed rows sorted by expert. On a GPU whose policy runs `moe-route` the choice and the
    /// sort are kernels and the host receives the choice and the experts' row counts in one
    /// copy ([N K + E + 1] u32, instead of the [N, E] f32 scores); elsewhere the host routes
    /// (in parallel over tokens) and sorts. `known`: the choice an earlier pass made for these
    /// tokens [N*K] (a recomputation: same input, so the same choice), used as it is.
    pub fn route(&self, x: &Tensor, known: Option<&[u32]>) -> Result<Routing> {
        let n = x.dim(0)?;
        let e = self.n_experts;
        let k = self.top_k;
        let dev = x.device();
        let _region = crate::profile::region("moe: router and routing");
        let scores = sigmoid(&linear(&x.to_dtype(DType::F32)?, &self.router)?)?; // [N, E] f32
        if let Some(c) = known.filter(|c| c.len() != n * k) {
            candle_core::bail!(
                "MoE routing: {} known choices for {n} tokens of {k} experts",
                c.len()
            );
        }
        let on_device = moe_route::supported(self.kernels, &scores, self.n_group, k);
        let (chosen, chosen_t, sorted) = if on_device {
            let chosen_t = match known {
                Some(c) => Tensor::from_slice(c, (n, k), dev)?,
                None => moe_route::route(
                    &scores.detach(),
                    &self.bias,
                    self.n_group,
                    self.topk_group,
                    k,
                )?,
            };
            let order = moe_route::sort(&chosen_t, e)?;
            // The layer's one copy to the host: the choice (expert counts, balance loss, the
            // recomputation's `known`) and the experts' row counts (the expert GEMMs' sizes).
            let (chosen, offsets) = match known {
                Some(c) => (c.to_vec(), order.offsets.to_vec1::<u32>()?),
                None => {
                    let mut both: Vec<u32> =
                        Tensor::cat(&[chosen_t.flatten_all()?, order.offsets.clone()], 0)?
                            .to_vec1()?;
                    let offsets = both.split_off(n * k);
                    (both, offsets)
                }
            };
            let sorted = SortedRows::on_device(order, offsets, n, k)?;
            (chosen, chosen_t, sorted)
        } else {
            let chosen: Vec<u32> = match known {
                Some(c) => c.to_vec(),
                None => {
                    let host: Vec<f32> = scores.flatten_all()?.to_vec1()?;
                    let bias: Vec<f32> = self.bias.to_vec1()?;
                    // Each token's choice depends on its own row only: routed in parallel on
                    // the host's cores, concatenated in token order, so the result is the
                    // serial loop's.
                    host.par_chunks(e)
                        .flat_map_iter(|row| {
                            let biased: Vec<f32> =
                                row.iter().zip(&bias).map(|(s, b)| s + b).collect();
                            route_token(&biased, self.n_group, self.topk_group, k)
                                .into_iter()
                                .map(|i| i as u32)
                        })
                        .collect() // [N*K] expert ids
                }
            };
            let sorted = SortedRows::on_host(&chosen, e, n, k, dev)?;
            let chosen_t = Tensor::from_slice(&chosen, (n, k), dev)?;
            (chosen, chosen_t, sorted)
        };
        let picked = scores.gather(&chosen_t, 1)?; // [N, K] f32, differentiable
        let mut weights = picked.clone();
        if self.norm_topk_prob {
            weights = weights.broadcast_div(&(weights.sum_keepdim(1)? + 1e-20)?)?;
        }
        let weights = (weights * self.routed_scaling_factor)?
            .to_dtype(x.dtype())?
            .flatten_all()?; // [N*K]
        Ok(Routing {
            scores,
            chosen,
            picked,
            weights,
            sorted,
        })
    }

    /// `forward_flat` keeping what `backward` reads: x [N, hidden] -> (output when
    /// `want_output`, saved); `known` as in `route`. Without the output (a backward) the
    /// combine and the shared expert's last product are skipped. The same values as `forward_flat` (its per-expert path: one
    /// SwiGLU per expert that has rows), with the expert-parallel exchange of
    /// `experts_sharded`. Rows are sorted by expert (then token), sent, computed by the experts
    /// held here, sent back in the order they left, weighted and summed per token in that order.
    pub fn forward_saved(
        &self,
        x: &Tensor,
        known: Option<&[u32]>,
        want_output: bool,
    ) -> Result<(Option<Tensor>, MoeSaved)> {
        let routing = self.route(&x.detach(), known)?;
        let _region = crate::profile::region("moe: routed experts and combine (explicit)");
        // Row plans built once (by the routing): the forward and the backward read them.
        let (slot, tok) = (routing.sorted.slot.clone(), routing.sorted.tok.clone());
        let x_sorted = tok.apply(self.kernels, x)?; // [S, hidden]
        let (arrived, rows_of, exchange) = match &self.shard {
            None => (
                send_to_experts(&x_sorted, self.dispatch, None)?,
                routing.sorted.rows_of(),
                None,
            ),
            Some(shard) => {
                let (send, recv, counts) = self.exchange_counts(&routing.sorted.counts(), shard)?;
                let to = Some((&shard.exchange, &send[..], &recv[..]));
                let arrived = send_to_experts(&x_sorted, self.dispatch, to)?; // [R, hidden]
                (
                    arrived,
                    arrived_rows_of(&counts, &recv, shard.count),
                    Some((send, recv)),
                )
            }
        };
        let arrived_rows = arrived.dim(0)?;
        let (y, experts) = self.experts_forward_saved(&arrived, &rows_of)?;
        let back = match &exchange {
            Some((send, recv)) => all_to_all_rows(
                &y,
                &self.shard.as_ref().expect("sharded").exchange,
                recv,
                send,
            )?,
            None => y,
        }; // [S, hidden]
        let shared = self
            .shared
            .as_ref()
            .map(|mlp| mlp.forward_saved(x))
            .transpose()?;
        let out = if want_output {
            let w = slot.apply(self.kernels, &routing.weights.unsqueeze(1)?)?; // [S, 1]
            let out = tok.adjoint().apply_weighted(self.kernels, &back, &w)?;
            Some(match (&self.shared, &shared) {
                (Some(mlp), Some(s)) => (out + s.output(&mlp.down)?)?,
                _ => out,
            })
        } else {
            None
        };
        Ok((
            out,
            MoeSaved {
                routing,
                tok,
                slot,
                exchange,
                experts,
                arrived_rows,
                back,
                shared,
            },
        ))
    }

    /// The backward of `forward_saved`: dy [N, hidden] -> dx [N, hidden]; the experts', the
    /// shared expert's and the router's gradients to `grads`. `balance`: this batch's share of
    /// the sequence-wise balance loss (`balance_share`: each token's f [N, E], the batch's B
    /// and T) times its weight, whose gradient flows into the scores.
    ///
    /// Routed rows (sorted by expert, S of them): with w the combine weights, back the expert
    /// outputs and d = dy of each row's token: d(back) = d w goes back through the exchange
    /// and the experts; dw = sum over hidden of d back (f32). The weights' gradient then goes
    /// through the scaling, the normalisation (dp_j = (dw_j - sum_i dw_i w_i) / sum p, with
    /// w_i = p_i / sum p), into the chosen scores, and through the sigmoid into the router
    /// logits: dlogit = ds s (1 - s), router += dlogit^T x (f32), dx += dlogit router.
    pub fn backward(
        &self,
        x: &Tensor,
        saved: &MoeSaved,
        dy: &Tensor,
        balance: Option<(&Tensor, usize, usize, f64)>,
        grads: &mut dyn GradSink,
    ) -> Result<Tensor> {
        let (n, _) = x.dims2()?;
        let dev = x.device();
        let k = self.top_k;
        let r = &saved.routing;
        let mut dx = match (&self.shared, &saved.shared) {
            (Some(mlp), Some(s)) => mlp.backward(x, s, dy, grads)?,
            _ => x.zeros_like()?,
        };
        let w = saved.slot.apply(self.kernels, &r.weights.unsqueeze(1)?)?; // [S, 1]
                                                                           // With d_rows = dy of each row's token: d_back = d_rows w [S, hidden], dw_rows = the
                                                                           // row sums of d_rows back [S, 1] f32, without d_rows itself.
        let (d_back, dw_rows) = saved
            .tok
            .gather_scaled_dot(self.kernels, dy, &w, &saved.back)?;
        let d_y = match &saved.exchange {
            Some((send, recv)) => all_to_all_rows(
                &d_back,
                &self.shard.as_ref().expect("sharded").exchange,
                send,
                recv,
            )?,
            None => d_back,
        }; // [R, hidden]
        let d_arrived = self.experts_backward(&saved.experts, saved.arrived_rows, &d_y, grads)?;
        let d_sorted = match &saved.exchange {
            Some((send, recv)) => all_to_all_rows(
                &d_arrived,
                &self.shard.as_ref().expect("sharded").exchange,
                recv,
                send,
            )?,
            None => d_arrived,
        }; // [S, hidden]
        dx = (dx + saved.tok.adjoint().apply(self.kernels, &d_sorted)?)?;
        // The weights' path into the scores.
        let dweights = saved
            .slot
            .adjoint()
            .apply(self.kernels, &dw_rows)?
            .reshape((n, k))?; // [N, K] f32
        let dweights = (dweights * self.routed_scaling_factor)?;
        let dpicked = if self.norm_topk_prob {
            let sum = (r.picked.sum_keepdim(1)? + 1e-20)?;
            let normed = r.picked.broadcast_div(&sum)?;
            dweights
                .broadcast_sub(&(&dweights * normed)?.sum_keepdim(1)?)?
                .broadcast_div(&sum)?
        } else {
            dweights
        };
        let chosen_t = Tensor::from_slice(&r.chosen, (n, k), dev)?;
        let mut dscores =
            r.scores
                .zeros_like()?
                .scatter_add(&chosen_t, &dpicked.contiguous()?, 1)?; // [N, E]
        if let Some((f_rows, b, t, weight)) = balance {
            // d/ds_te of weight/(B T) sum_t sum_e f_te s_te / S_t, S_t = sum_j s_tj.
            let sum = r.scores.sum_keepdim(1)?;
            let fs = (f_rows * &r.scores)?.sum_keepdim(1)?;
            let d = (f_rows.broadcast_div(&sum)?
                - fs.broadcast_div(&sum.sqr()?)?
                    .broadcast_as(f_rows.shape())?)?;
            dscores = (dscores + (d * (weight / (b * t) as f64))?)?;
        }
        let dlogits = (dscores * (&r.scores * r.scores.affine(-1.0, 1.0)?)?)?; // [N, E] f32
        let x32 = x.to_dtype(DType::F32)?;
        let (dx32, drouter) =
            crate::ops::linear_backward(&x32, &self.router, &dlogits, grads.wants(&self.router))?;
        add_if_wanted(grads, &self.router, drouter)?;
        dx + dx32.to_dtype(x.dtype())?
    }

    /// The routed experts on the rows that arrived here [R, hidden], expert j (index into
    /// `experts`) taking rows `rows_of[j]`: their outputs in arrival order [R, hidden] and
    /// what `experts_backward` reads. Grouped or per expert as `compute` says.
    fn experts_forward_saved(
        &self,
        arrived: &Tensor,
        rows_of: &[Vec<u32>],
    ) -> Result<(Tensor, ExpertsSaved)> {
        let (r, d) = arrived.dims2()?;
        let dev = arrived.device();
        let busy: Vec<usize> = (0..rows_of.len())
            .filter(|&j| !rows_of[j].is_empty())
            .collect();
        if busy.is_empty() {
            return Ok((arrived.zeros_like()?, ExpertsSaved::Idle));
        }
        if self.use_grouped() {
            let cap = busy.iter().map(|&j| rows_of[j].len()).max().unwrap_or(0);
            let (mut src, mut off, mut p_of_r) = (
                Vec::with_capacity(r),
                Vec::with_capacity(busy.len() * cap + 1),
                vec![0u32; r],
            );
            off.push(0u32);
            for (g, &j) in busy.iter().enumerate() {
                for i in 0..cap {
                    if let Some(&row) = rows_of[j].get(i) {
                        src.push(row);
                        p_of_r[row as usize] = (g * cap + i) as u32;
                    }
                    off.push(src.len() as u32);
                }
            }
            let pad = RowPlan::sums(src, off, r, dev)?;
            let unpad = RowPlan::gather(&p_of_r, busy.len() * cap, dev)?;
            let xs = pad
                .apply(self.kernels, arrived)?
                .reshape((busy.len(), cap, d))?;
            let stack = |pick: fn(&Mlp) -> &Tensor| -> Result<Tensor> {
                Tensor::stack(
                    &busy
                        .iter()
                        .map(|&j| pick(&self.experts[j]))
                        .collect::<Vec<_>>(),
                    0,
                )
            };
            let stacks = [stack(|m| &m.gate)?, stack(|m| &m.up)?, stack(|m| &m.down)?];
            let saved = swiglu_batched_saved(self.kernels, &xs, &stacks[0], &stacks[1])?;
            let y = unpad.apply(
                self.kernels,
                &saved
                    .output_batched(&stacks[2])?
                    .reshape((busy.len() * cap, d))?,
            )?;
            return Ok((
                y,
                ExpertsSaved::Grouped {
                    busy,
                    pad,
                    unpad,
                    xs,
                    stacks,
                    saved,
                },
            ));
        }
        let (mut experts, mut ys) = (
            Vec::with_capacity(busy.len()),
            Vec::with_capacity(busy.len()),
        );
        for j in busy {
            let xe = take_rows(self.kernels, arrived, &rows_of[j])?;
            let saved = self.experts[j].forward_saved(&xe)?;
            ys.push(saved.output(&self.experts[j].down)?);
            experts.push((j, rows_of[j].clone(), xe, saved));
        }
        // Each arrived row has exactly one expert: put the outputs back in arrival order.
        let taken: Vec<u32> = experts
            .iter()
            .flat_map(|(_, rows, _, _)| rows.iter().copied())
            .collect();
        let y = put_rows(self.kernels, &Tensor::cat(&ys, 0)?, &taken, r)?;
        Ok((y, ExpertsSaved::PerExpert(experts)))
    }

    /// The backward of `experts_forward_saved`: d(outputs) [R, hidden] -> d(arrived rows);
    /// the experts' weights' gradients to `grads` (none for an idle expert).
    fn experts_backward(
        &self,
        saved: &ExpertsSaved,
        arrived_rows: usize,
        d_y: &Tensor,
        grads: &mut dyn GradSink,
    ) -> Result<Tensor> {
        let d = d_y.dim(1)?;
        match saved {
            ExpertsSaved::Idle => d_y.zeros_like(),
            ExpertsSaved::PerExpert(experts) => {
                let mut dxs = Vec::with_capacity(experts.len());
                for (j, rows, xe, s) in experts {
                    let dye = take_rows(self.kernels, d_y, rows)?;
                    dxs.push(self.experts[*j].backward(xe, s, &dye, grads)?);
                }
                let taken: Vec<u32> = experts
                    .iter()
                    .flat_map(|(_, rows, _, _)| rows.iter().copied())
                    .collect();
                put_rows(self.kernels, &Tensor::cat(&dxs, 0)?, &taken, arrived_rows)
            }
            ExpertsSaved::Grouped {
                busy,
                pad,
                unpad,
                xs,
                stacks,
                saved,
            } => {
                let (e, cap, _) = xs.dims3()?;
                let d_pad = unpad
                    .adjoint()
                    .apply(self.kernels, d_y)?
                    .reshape((e, cap, d))?; // zero rows past each count
                let (dxs, g) = ops::swiglu_batched_backward(
                    self.kernels,
                    xs,
                    saved,
                    &stacks[0],
                    &stacks[1],
                    &stacks[2],
                    &d_pad,
                )?;
                for (gi, &j) in busy.iter().enumerate() {
                    let m = &self.experts[j];
                    for (param, grad) in [(&m.gate, &g.gate), (&m.up, &g.up), (&m.down, &g.down)] {
                        if let Some(grad) = grad {
                            add_if_wanted(grads, param, Some(grad.get(gi)?))?;
                        }
                    }
                }
                pad.adjoint()
                    .apply(self.kernels, &dxs.reshape((e * cap, d))?)
            }
        }
    }

    /// Expert parallelism: rows sent to each rank of the group (by the expert ranges, from the
    /// rows routed to each expert `per_expert`), the rows received from each, and per source
    /// the rows for each local expert (exchanged as host bytes first).
    #[allow(clippy::type_complexity)]
    fn exchange_counts(
        &self,
        per_expert: &[usize],
        shard: &ExpertShard,
    ) -> Result<(Vec<usize>, Vec<usize>, Vec<Vec<usize>>)> {
        let ex = &shard.exchange;
        let (ep, per) = (ex.size(), shard.count);
        let send: Vec<usize> = (0..ep)
            .map(|d| per_expert[d * per..(d + 1) * per].iter().sum())
            .collect();
        let parts = (0..ep)
            .map(|d| {
                per_expert[d * per..(d + 1) * per]
                    .iter()
                    .flat_map(|&c| (c as u32).to_le_bytes())
                    .collect()
            })
            .collect();
        let got = timed(|| ex.host(parts))
            .map_err(|e| candle_core::Error::Msg(format!("expert exchange (row counts): {e:#}")))?;
        // counts[s][j]: rows source s sends for local expert j.
        let counts: Vec<Vec<usize>> = got
            .iter()
            .map(|b| {
                b.chunks_exact(4)
                    .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")) as usize)
                    .collect::<Vec<_>>()
            })
            .collect();
        if counts.iter().any(|c| c.len() != per) {
            candle_core::bail!("expert exchange: a rank sent row counts for a different number of experts per rank than {per}");
        }
        let recv: Vec<usize> = counts.iter().map(|c| c.iter().sum()).collect();
        Ok((send, recv, counts))
    }

    /// Every routed expert's SwiGLU on its tokens `tokens_of[e]` (rows of x [N, hidden]),
    /// stacked in expert order, then token order: [sum_e n_e, hidden], or None when no expert
    /// has a token. `grouped`: every expert that has tokens at once, as batched matmuls over
    /// [E', cap, .] with cap = the largest n_e (rows past an expert's n_e are zeros, computed
    /// and dropped: at most E' cap / sum n_e times the FLOPs, a few launches instead of about
    /// ten per expert; the weights are stacked per call, which `use_grouped` bounds).
    /// Otherwise one gather and one SwiGLU per expert, the plain twin. Each output row is the
    /// same dot products either way (equal up to the matmul's summation order).
    pub fn routed_outputs(
        &self,
        x: &Tensor,
        tokens_of: &[Vec<u32>],
        grouped: bool,
    ) -> Result<Option<Tensor>> {
        let (n, d) = x.dims2()?;
        let dev = x.device();
        if tokens_of.iter().all(Vec::is_empty) {
            return Ok(None);
        }
        let _region = crate::profile::region(if grouped {
            "moe: routed experts (grouped)"
        } else {
            "moe: routed experts (one per expert)"
        });
        if !grouped {
            let mut ys = Vec::with_capacity(self.experts.len());
            for (ex, mlp) in self.experts.iter().enumerate() {
                if !tokens_of[ex].is_empty() {
                    ys.push(mlp.forward(&take_rows(self.kernels, x, &tokens_of[ex])?)?);
                    // [n_e, hidden]
                }
            }
            return Ok(Some(Tensor::cat(&ys, 0)?));
        }
        // Only the experts that have tokens are stacked: an idle expert's weights get no
        // gradient at all, as in the per-expert path (a zero gradient would still move them
        // through AdamW's momentum and weight decay), and pad no rows.
        let busy: Vec<usize> = (0..self.experts.len())
            .filter(|&ex| !tokens_of[ex].is_empty())
            .collect();
        let e = busy.len();
        let cap = tokens_of.iter().map(Vec::len).max().unwrap_or(0);
        // Row g * cap + j of the padded input is x[tokens_of[busy[g]][j]], or zeros past that
        // expert's count (an empty group of the row sum).
        let (mut src, mut off, mut valid) =
            (Vec::new(), Vec::with_capacity(e * cap + 1), Vec::new());
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
        let xs = RowPlan::sums(src, off, n, dev)?
            .apply(self.kernels, x)?
            .reshape((e, cap, d))?;
        let stack = |pick: fn(&Mlp) -> &Tensor| -> Result<Tensor> {
            Tensor::stack(
                &busy
                    .iter()
                    .map(|&ex| pick(&self.experts[ex]))
                    .collect::<Vec<_>>(),
                0,
            )
        };
        let (gate, up, down) = (stack(|m| &m.gate)?, stack(|m| &m.up)?, stack(|m| &m.down)?); // [E', I, D], [E', I, D], [E', D, I]
        let h = crate::ops::silu_mul(
            self.kernels,
            &xs.matmul(&gate.transpose(1, 2)?)?,
            &xs.matmul(&up.transpose(1, 2)?)?,
        )?; // [E', cap, I]
        let y = h.matmul(&down.transpose(1, 2)?)?.reshape((e * cap, d))?;
        Ok(Some(
            RowPlan::gather(&valid, e * cap, dev)?.apply(self.kernels, &y)?,
        ))
    }

    /// Whether the routed experts run grouped (`routed_outputs`, `experts_forward_saved`), as
    /// `compute` says. `Auto`: on CUDA, where it was measured faster side by side (NVIDIA
    /// H200: bench model sparse stage at 8K 1.28x, mini model dense stage 1.25x;
    /// docs/benchmarks.md), while the stacked copy of the experts' weights stays under 256 MiB.
    fn use_grouped(&self) -> bool {
        match self.compute {
            ExpertCompute::PerExpert => false,
            ExpertCompute::Grouped => true,
            ExpertCompute::Auto => {
                let bytes: usize = self
                    .experts
                    .iter()
                    .map(|m| {
                        (m.gate.elem_count() + m.up.elem_count() + m.down.elem_count())
                            * m.gate.dtype().size_in_bytes()
                    })
                    .sum();
                self.experts
                    .first()
                    .is_some_and(|m| m.gate.device().is_cuda())
                    && self.experts.len() > 1
                    && bytes <= 256 << 20
            }
        }
    }

    /// The routed experts' weighted sum with the experts spread over an expert-parallel group.
    /// Rows leave sorted by expert (then by token slot), so each destination receives, per
    /// source, one block per local expert; the per-expert row counts travel first (host
    /// bytes), then the rows, then the outputs come back in the order the rows left. The
    /// routing weights are applied here, at the token's rank, so their gradient stays local.
    /// Per token the expert outputs are added in expert order, as in the unsharded path.
    fn experts_sharded(
        &self,
        x: &Tensor,
        weights: &Tensor,
        sorted: &SortedRows,
        shard: &ExpertShard,
    ) -> Result<Tensor> {
        let ex = &shard.exchange;
        let (send, recv, counts) = self.exchange_counts(&sorted.counts(), shard)?;
        let dev = x.device();
        let x_sorted = sorted.tok.apply(self.kernels, x)?; // [S, hidden]
        let arrived = send_to_experts(&x_sorted, self.dispatch, Some((ex, &send, &recv)))?; // [R, hidden]
        let rows_of = arrived_rows_of(&counts, &recv, shard.count);
        let taken: Vec<u32> = rows_of.concat();
        // With no row here, arrived * 0 keeps the output a function of the input, so every
        // rank's backward takes part in the exchange.
        let y = match self.routed_outputs(&arrived, &rows_of, self.use_grouped())? {
            Some(ys) => RowPlan::gather(&taken, arrived.dim(0)?, dev)?
                .adjoint()
                .apply(self.kernels, &ys)?,
            None => arrived.affine(0.0, 0.0)?,
        };
        let back = all_to_all_rows(&y, ex, &recv, &send)?; // [S, hidden], in the order rows left
        let w = sorted.slot.apply(self.kernels, &weights.unsqueeze(1)?)?;
        sorted.tok.adjoint().apply_weighted(self.kernels, &back, &w)
    }
}

/// Rows `rows` of x [R, .]: a view when they are consecutive (an expert's sorted rows without
/// expert parallelism), else a gather; the same values either way.
fn take_rows(kernels: KernelPolicy, x: &Tensor, rows: &[u32]) -> Result<Tensor> {
    match consecutive(rows) {
        Some(first) => x.narrow(0, first, rows.len()),
        None => RowPlan::gather(rows, x.dim(0)?, x.device())?.apply(kernels, x),
    }
}

/// The rows y [S, .] back in place: row i of the result [r, .] is y's row j where
/// taken[j] = i (each of the r rows taken once); y itself when taken is 0, 1, ..., r - 1.
fn put_rows(kernels: KernelPolicy, y: &Tensor, taken: &[u32], r: usize) -> Result<Tensor> {
    if taken.len() == r && consecutive(taken) == Some(0) {
        return Ok(y.clone());
    }
    RowPlan::gather(taken, r, y.device())?
        .adjoint()
        .apply(kernels, y)
}

/// The first row of `rows` when they are first, first + 1, ... (None when empty).
fn consecutive(rows: &[u32]) -> Option<usize> {
    let first = *rows.first()?;
    rows.iter()
        .enumerate()
        .all(|(i, &r)| r as usize == first as usize + i)
        .then_some(first as usize)
}

/// Expert parallelism: local expert j's rows of the arrived rows, taken from every source's
/// block (`counts[s][j]` rows of source s for expert j; sources' blocks in order, `recv[s]`
/// rows each).
fn arrived_rows_of(counts: &[Vec<usize>], recv: &[usize], per: usize) -> Vec<Vec<u32>> {
    let mut block_start = vec![0usize; recv.len() + 1];
    for s in 0..recv.len() {
        block_start[s + 1] = block_start[s] + recv[s];
    }
    (0..per)
        .map(|j| {
            (0..recv.len())
                .flat_map(|s| {
                    let first = block_start[s] + counts[s][..j].iter().sum::<usize>();
                    (first..first + counts[s][j]).map(|r| r as u32)
                })
                .collect()
        })
        .collect()
}

/// The largest relative error (max |a - b| / max |a| per tensor) between the grouped experts
/// (`Moe::routed_outputs` with `grouped`) and the per-expert twin, over the output and the
/// gradients of a random probe of it into x and every expert's gate, up and down: `e` experts
/// of hidden `d` and width `i`, `n` tokens with uneven loads and the last expert unused (its
/// weights must get no gradient from either path, or the error is infinite). For the unit
/// test and gpu-selftest.
pub fn grouped_against_plain(
    dev: &candle_core::Device,
    dtype: DType,
    e: usize,
    n: usize,
    d: usize,
    i: usize,
    seed: u64,
) -> Result<f32> {
    use crate::rng::{randn, SplitMix64};
    use candle_core::Var;
    let var = |shape: &[usize], s: u64| -> Result<Var> {
        Var::from_tensor(
            &randn(shape, seed * 1000 + s, 0.5, &candle_core::Device::Cpu)?
                .to_dtype(dtype)?
                .to_device(dev)?,
        )
    };
    let weights: Vec<[Var; 3]> = (0..e as u64)
        .map(|s| {
            Ok([
                var(&[i, d], 10 + 3 * s)?,
                var(&[i, d], 11 + 3 * s)?,
                var(&[d, i], 12 + 3 * s)?,
            ])
        })
        .collect::<Result<_>>()?;
    let moe = Moe {
        router: Tensor::zeros((e, d), DType::F32, dev)?,
        bias: Tensor::zeros(e, DType::F32, dev)?,
        experts: weights
            .iter()
            .map(|[g, u, w]| Mlp {
                gate: g.as_tensor().clone(),
                up: u.as_tensor().clone(),
                down: w.as_tensor().clone(),
                kernels: KernelPolicy::default(),
            })
            .collect(),
        shard: None,
        n_experts: e,
        shared: None,
        top_k: 1,
        n_group: 1,
        topk_group: 1,
        norm_topk_prob: true,
        routed_scaling_factor: 1.0,
        compute: ExpertCompute::Auto,
        dispatch: crate::model::dispatch::Dispatch::Dtype,
        kernels: KernelPolicy::default(),
    };
    let x = var(&[n, d], 1)?;
    // Expert j takes each token with probability about (j + 1) / e (uneven loads); the last takes none.
    let mut rng = SplitMix64::new(seed);
    let tokens_of: Vec<Vec<u32>> = (0..e)
        .map(|j| {
            if j + 1 == e {
                vec![]
            } else {
                (0..n as u32)
                    .filter(|_| rng.next_u64() % e as u64 <= j as u64)
                    .collect()
            }
        })
        .collect();
    let rows: usize = tokens_of.iter().map(Vec::len).sum();
    let probe = randn(&[rows.max(1), d], seed + 7, 1.0, &candle_core::Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(dev)?;
    let run = |grouped: bool| -> Result<Vec<Option<Tensor>>> {
        let y = moe
            .routed_outputs(x.as_tensor(), &tokens_of, grouped)?
            .ok_or_else(|| candle_core::Error::Msg("no routed rows".into()))?;
        let grads = (y.to_dtype(DType::F32)? * probe.to_dtype(DType::F32)?)?
            .sum_all()?
            .backward()?;
        let mut all = vec![Some(y), grads.get(x.as_tensor()).cloned()];
        all.extend(
            weights
                .iter()
                .flatten()
                .map(|v| grads.get(v.as_tensor()).cloned()),
        );
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
        worst = worst.max(if scale == 0.0 {
            if diff == 0.0 {
                0.0
            } else {
                f32::INFINITY
            }
        } else {
            diff / scale
        });
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
        let err =
            grouped_against_plain(&candle_core::Device::Cpu, DType::F32, 5, 23, 12, 7, 1).unwrap();
        assert!(
            err <= 1e-5,
            "grouped experts vs one SwiGLU per expert: max relative error {err}"
        );
    }

    #[test]
    fn a_nan_score_ranks_first_and_nans_tie_by_index() {
        let neg_nan = f32::from_bits(0xffc0_0001);
        let b = [0.5, f32::NAN, 0.9, neg_nan, 0.1, 0.2];
        assert_eq!(route_token(&b, 1, 1, 3), vec![1, 3, 2]);
    }

    #[test]
    fn ties_pick_the_lower_expert() {
        let b = [0.5; 8];
        assert_eq!(route_token(&b, 2, 1, 3), vec![0, 1, 2]);
    }
}
