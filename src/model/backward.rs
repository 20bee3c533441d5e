//! The sparse-stage decoder layer's backward written out, as llm.c writes a layer's backward:
//! no candle autograd graph. The layer is recomputed from its input (kept by the trainer's
//! first pass) with the sets that pass selected, a block of query rows at a time, and each
//! block's backward runs by hand right after its forward.
//!
//! Shapes: B batch, T tokens, D hidden, C + R the latent kv row, n rows of a block.
//!
//! Why blocks are exact: in the absorbed form every query reads only the shared latent rows
//! kv [B*T, C+R] and its own token; everything else (queries, attention, o_proj, norms, the
//! MLP or MoE) is per token. So the whole-sequence parts run once (the input norm and the
//! latent kv), each block runs the per-token parts, and the blocks' gradients of kv are summed
//! in f32 before one backward through the kv projection. The input norm's gradient is taken
//! once over the sequence from the sum of its two uses (queries and kv).
//!
//! Numerics: each op's backward states its own (`ops`, `attention`, `moe`); gradients meet in
//! the model dtype except kv's (f32 over blocks). The twin is candle's autograd of the same
//! forward (`DecoderLayer::forward_with`); tests hold every gradient against it.

use candle_core::{Result, Tensor};

use super::attention::add_if_wanted;
use super::grad_sink::GradSink;
use super::{DecoderLayer, FeedForward, ForwardContext};
use crate::dsa::Selection;
use crate::ops::{rms_norm, rms_norm_backward};

/// What one layer's backward needs besides its input and sets.
pub struct LayerBackward<'a> {
    /// d(loss)/d(layer output) [B, T, D].
    pub dout: &'a Tensor,
    /// MoE layers with a balance loss: its f per sequence [B * E] (`LayerStats::balance_weights`,
    /// from the whole sequence's routing) and its weight (alpha times the micro-batch scale).
    pub balance: Option<(&'a [f32], f64)>,
}

impl DecoderLayer {
    /// The sparse-stage layer's backward: recompute from `h` [B, T, D] with the sets `sel`
    /// [B, T, K] (absolute rows), `rows` queries per block (0, or at least T: every sequence
    /// at once), and return d(loss)/dh [B, T, D]; parameter gradients go to `grads` (block by
    /// block). The gradient of `forward_with`'s output against `bw.dout` (plus the balance
    /// loss) up to summation order, with no autograd graph.
    pub fn sparse_backward(&self, h: &Tensor, ctx: &ForwardContext, sel: &Selection, rows: usize, bw: LayerBackward, grads: &mut dyn GradSink) -> Result<Tensor> {
        let (b, t, d) = h.dims3()?;
        let h = h.detach();
        let eps = self.eps;
        let _region = crate::profile::region("layer: explicit recompute and backward");
        // Whole-sequence parts: the input norm and the latent kv every block reads.
        let xn = rms_norm(&h, &self.input_norm, eps)?;
        let (kv, kv_saved) = self.attn.latent_kv_saved(&xn, &ctx.cos, &ctx.sin)?;
        let blocks: Vec<(usize, usize, usize, usize)> = if rows == 0 || rows >= t {
            vec![(0, b, 0, t)]
        } else {
            (0..b).flat_map(|bi| (0..t).step_by(rows).map(move |q0| (bi, 1, q0, rows.min(t - q0)))).collect()
        };
        let mut dkv: Option<Tensor> = None;
        let (mut dh_res, mut dxn_q) = (Vec::with_capacity(blocks.len()), Vec::with_capacity(blocks.len()));
        for &(b0, bn, q0, n) in &blocks {
            let rows_of = |x: &Tensor| -> Result<Tensor> { x.narrow(0, b0, bn)?.narrow(1, q0, n)?.contiguous() };
            let (hq, xq, dout) = (rows_of(&h)?, rows_of(&xn)?, rows_of(bw.dout)?.to_dtype(h.dtype())?);
            let (cos, sin) = (ctx.cos.narrow(0, q0, n)?, ctx.sin.narrow(0, q0, n)?);
            let block_sel = if bn == b && n == t { sel.clone() } else { sel.block(b0, q0, n)? };
            // Forward of the block, keeping what its backward reads.
            let (q_nope, q_pe, q_saved) = self.attn.queries_saved(&xq, &cos, &sin)?;
            let (a, a_saved) = self.attn.sparse_saved(&q_nope, &q_pe, &kv, &block_sel, false)?;
            let h1 = (&hq + &a.out)?;
            let xf = rms_norm(&h1, &self.post_attention_norm, eps)?;
            // Backward: out = h1 + ffn(norm(h1)), h1 = h + attention(norm(h)).
            let dxf = match &self.ffn {
                FeedForward::Dense(mlp) => {
                    let saved = mlp.forward_saved(&xf)?;
                    mlp.backward(&xf, &saved, &dout, grads)?
                }
                FeedForward::Moe(moe) => {
                    let xf = xf.reshape((bn * n, d))?;
                    let (_, saved) = moe.forward_saved(&xf)?;
                    let f_rows = match bw.balance {
                        Some((f, weight)) => {
                            let e = moe.n_experts;
                            let f = Tensor::from_slice(&f[b0 * e..(b0 + bn) * e], (bn, 1, e), h.device())?;
                            Some((f.broadcast_as((bn, n, e))?.reshape((bn * n, e))?, weight))
                        }
                        None => None,
                    };
                    let balance = f_rows.as_ref().map(|(f, weight)| (f, b, t, *weight));
                    moe.backward(&xf, &saved, &dout.reshape((bn * n, d))?, balance, grads)?.reshape((bn, n, d))?
                }
            };
            let (dh1_norm, dw) = rms_norm_backward(&h1, &self.post_attention_norm, eps, &dxf)?;
            add_if_wanted(grads, &self.post_attention_norm, Some(dw))?;
            let dh1 = (dout + dh1_norm)?;
            let g = self.attn.sparse_backward(&a_saved, &kv, &block_sel, &dh1, grads)?;
            dkv = Some(match dkv.take() {
                Some(acc) => (acc + g.kv)?,
                None => g.kv,
            });
            dxn_q.push(self.attn.queries_backward(&xq, &q_saved, &g.q_nope, &g.q_pe, &cos, &sin, grads)?);
            dh_res.push(dh1);
        }
        let dkv = dkv.expect("at least one block");
        let dxn = (assemble(dxn_q, b, t)? + self.attn.latent_kv_backward(&xn, &kv_saved, &dkv, &ctx.cos, &ctx.sin, grads)?)?;
        let (dh_norm, dw) = rms_norm_backward(&h, &self.input_norm, eps, &dxn)?;
        add_if_wanted(grads, &self.input_norm, Some(dw))?;
        assemble(dh_res, b, t)? + dh_norm
    }
}

/// The blocks' rows [bn, n, D] (in `sparse_backward`'s order) as one [B, T, D] tensor.
fn assemble(parts: Vec<Tensor>, b: usize, t: usize) -> Result<Tensor> {
    if parts.len() == 1 {
        return Ok(parts.into_iter().next().expect("one part"));
    }
    let per_seq = parts.len() / b;
    let seqs = parts.chunks(per_seq).map(|p| Tensor::cat(p, 1)).collect::<Result<Vec<_>>>()?;
    let out = Tensor::cat(&seqs, 0)?;
    debug_assert_eq!(out.dims()[..2], [b, t]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{IndexerDefaults, ModelConfig};
    use crate::model::grad_sink::GradMap;
    use crate::model::{AttentionMode, ForwardOptions};
    use crate::rng::randn;
    use candle_core::{Device, Var};

    /// A small V3.2 config: layer 0 dense, layer 1 MoE (8 experts in 4 groups, 2 kept, top 2,
    /// a shared expert); T 9 with k 5, so early queries have padded sets.
    fn config(edit: &[(&str, serde_json::Value)]) -> ModelConfig {
        let mut c = crate::tiny::tiny_config(true);
        let o = c.as_object_mut().unwrap();
        for (k, v) in edit {
            o.insert(k.to_string(), v.clone());
        }
        for (k, v) in [
            ("hidden_size", 40), ("num_hidden_layers", 2), ("intermediate_size", 56), ("moe_intermediate_size", 24),
            ("num_attention_heads", 3), ("num_key_value_heads", 3), ("q_lora_rank", 28), ("kv_lora_rank", 20),
            ("qk_nope_head_dim", 12), ("qk_rope_head_dim", 8), ("v_head_dim", 10), ("index_n_heads", 2),
            ("index_head_dim", 16), ("index_topk", 5), ("vocab_size", 64),
        ] {
            o.insert(k.into(), v.into());
        }
        ModelConfig::from_json(&c.to_string(), &IndexerDefaults::default()).unwrap()
    }

    /// Every parameter of the layers as a Var (f32, random; norms near 1).
    fn params(cfg: &ModelConfig, seed: u64) -> crate::weights::ParamSet {
        crate::weights::model_weights(cfg, false)
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                let t = randn(&s.shape, seed * 1000 + i as u64, 0.2, &Device::Cpu).unwrap();
                let t = if s.name.ends_with("norm.weight") || s.name.ends_with("layernorm.weight") { (t * 0.5).unwrap().affine(1.0, 1.0).unwrap() } else { t };
                (s.name, Var::from_tensor(&t).unwrap().as_tensor().clone())
            })
            .collect()
    }

    fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
        let scale = a.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        diff / scale.max(1e-30)
    }

    /// The explicit backward of a dense and a MoE layer (balance loss included) against
    /// candle's autograd of `forward_with`, in f32: dh and every parameter's gradient within
    /// 1e-5 relative, the same parameters getting gradients (idle experts none), at blocks of
    /// every sequence at once, of 4 rows (not dividing T) and of 1 row; also MoE without the
    /// weights' normalisation and without a shared expert.
    #[test]
    fn explicit_layer_backward_matches_autograd() {
        check_against_autograd(&config(&[]), 2);
        check_against_autograd(&config(&[("norm_topk_prob", false.into()), ("n_shared_experts", 0.into()), ("first_k_dense_replace", 0.into())]), 1);
    }

    fn check_against_autograd(cfg: &ModelConfig, layers: usize) {
        let cfg = cfg.clone();
        let p = params(&cfg, 3);
        let (b, t, d) = (2, 9, cfg.hidden_size);
        let ctx = ForwardContext::new(&cfg, t, &Device::Cpu).unwrap();
        let h = randn(&[b, t, d], 11, 1.0, &Device::Cpu).unwrap();
        let dout = randn(&[b, t, d], 12, 1.0, &Device::Cpu).unwrap();
        let alpha = 0.37;
        for l in 0..layers {
            let layer = crate::model::build_layer(&cfg, &p, l, None).unwrap();
            let opts = ForwardOptions { indexer_kl: false, recall: false, detach_indexer_inputs: true, seq_balance: true, ..ForwardOptions::new(AttentionMode::Sparse, 5) };
            let (_, stats) = layer.forward(&h, &ctx, &opts).unwrap();
            let sel = stats.selection.unwrap();
            assert!(sel.absolute.flatten_all().unwrap().to_vec1::<u32>().unwrap().contains(&u32::MAX), "some sets are padded");
            // The twin: autograd through the whole-layer forward with the same sets.
            let hv = Var::from_tensor(&h).unwrap();
            let (out, stats) = layer.forward_with(hv.as_tensor(), &ctx, &opts, Some(&sel)).unwrap();
            let mut loss = (out * &dout).unwrap().sum_all().unwrap();
            if let Some(bal) = &stats.balance_loss {
                loss = (loss + (bal * alpha).unwrap()).unwrap();
            }
            let reference = loss.backward().unwrap();
            let f = stats.balance_weights.clone();
            assert_eq!(f.is_some(), cfg.is_moe_layer(l), "MoE layers report the balance weights");
            for rows in [0, 4, 1] {
                let mut sink = GradMap::default();
                let bw = LayerBackward { dout: &dout, balance: f.as_deref().map(|f| (f, alpha)) };
                let dh = layer.sparse_backward(&h, &ctx, &sel, rows, bw, &mut sink).unwrap();
                let want = reference.get(hv.as_tensor()).unwrap();
                assert!(rel_err(want, &dh) <= 1e-5, "layer {l} rows {rows}: dh off by {}", rel_err(want, &dh));
                let mut checked = 0;
                for (name, param) in &p {
                    match (reference.get(param), sink.sums.get(&param.id())) {
                        (Some(a), Some(g)) => {
                            let e = rel_err(a, g);
                            assert!(e <= 1e-5, "layer {l} rows {rows}: {name} off by {e}");
                            checked += 1;
                        }
                        (None, None) => {}
                        (a, g) => panic!("layer {l} rows {rows}: {name}: autograd {} a gradient, explicit {}", a.is_some(), g.is_some()),
                    }
                }
                assert!(checked >= 11, "layer {l}: only {checked} gradients compared");
            }
        }
    }
}
