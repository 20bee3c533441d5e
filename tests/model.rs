//! Model-level properties on a tiny random checkpoint: the two attention paths agree when the
//! selection holds every key, gradients reach every trainable tensor and only through the
//! intended path, bf16 tracks f32, and the MTP module runs.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{max_rel_err, tiny_checkpoint};
use dsa_train::checkpoint::Checkpoint;
use dsa_train::config::ModelConfig;
use dsa_train::losses::next_token_nll;
use dsa_train::model::{AttentionMode, IndexerKl, LoadOptions, Model, Pass};
use dsa_train::weights::{self, ParamSet};

fn tokens(b: usize, t: usize, seed: u64) -> Tensor {
    let mut rng = dsa_train::rng::SplitMix64::new(seed);
    let v: Vec<u32> = (0..b * t).map(|_| (rng.next_u64() % 512) as u32).collect();
    Tensor::from_vec(v, (b, t), &Device::Cpu).unwrap()
}

fn opts(attention: AttentionMode, topk: usize) -> Pass {
    Pass::eval(attention, topk)
}

#[test]
fn sparse_attention_with_k_at_least_t_equals_dense() {
    let (_tmp, dir) = tiny_checkpoint(true, 21);
    let model = Model::load(&dir, &LoadOptions::default()).unwrap();
    let x = tokens(2, 40, 1);
    let dense = model.forward(&x, &opts(AttentionMode::Dense, 40)).unwrap();
    let sparse = model.forward(&x, &opts(AttentionMode::Sparse, 64)).unwrap();
    assert!(max_rel_err(&sparse.logits, &dense.logits) < 1e-5);
    for (d, s) in dense.layers.iter().zip(&sparse.layers) {
        // With S_t = every causal key, the sparse-stage KL is the warm-up KL.
        assert!(
            max_rel_err(
                s.indexer_kl.as_ref().unwrap(),
                d.indexer_kl.as_ref().unwrap()
            ) < 1e-4
        );
    }
    // A real selection changes the result.
    let narrow = model.forward(&x, &opts(AttentionMode::Sparse, 8)).unwrap();
    assert!(max_rel_err(&narrow.logits, &dense.logits) > 1e-3);
    let recall: Vec<Vec<f32>> = narrow.layers[0].recall.as_ref().unwrap().to_vec2().unwrap();
    assert!(recall[0][..8].iter().all(|r| (r - 1.0).abs() < 1e-5));
    assert!(recall[0][8..].iter().all(|r| *r > 0.0 && *r < 1.0 + 1e-6));
}

/// The evaluation pass in blocks of query rows (`Pass::eval_rows`, what
/// `dsa-train eval` runs, so that no [.., T, T] tensor exists) gives the whole-sequence pass's
/// logits and, per layer and per query, its indexer KL and attention-mass recall; the LM loss
/// with the head run in chunks of positions (`eval::nll_sum_in_chunks`) is the loss of the
/// whole logits. Both attention modes, batch 2, T = 23 in blocks of 3 rows (a last block of
/// 2) and in one block (`Some(0)` at this size), chunks of 4 positions; top-k 5, so the
/// recall of most positions is below 1 and depends on which rows each block holds.
#[test]
fn evaluation_in_blocks_of_query_rows_equals_the_whole_sequence_pass() {
    let (_tmp, dir) = tiny_checkpoint(true, 26);
    let model = Model::load(&dir, &LoadOptions::default()).unwrap();
    let (b, t, topk) = (2, 23, 5);
    let x = tokens(b, t, 6);
    let max_abs = |a: &Tensor, b: &Tensor| {
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
    for mode in [AttentionMode::Dense, AttentionMode::Sparse] {
        let whole = model.forward(&x, &opts(mode, topk)).unwrap();
        let lm_whole: f64 = next_token_nll(&whole.logits, &x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| *v as f64)
            .sum();
        for rows in [3, 0] {
            let o = opts(mode, topk).in_rows(rows);
            let blocked = model.forward(&x, &o).unwrap();
            let e = max_rel_err(&blocked.logits, &whole.logits);
            assert!(e < 1e-5, "{mode:?}, {rows} rows: logits, max rel err {e}");
            for (l, (bl, wh)) in blocked.layers.iter().zip(&whole.layers).enumerate() {
                let (kb, kw) = (
                    bl.indexer_kl.as_ref().unwrap(),
                    wh.indexer_kl.as_ref().unwrap(),
                );
                assert_eq!(kb.dims(), [b, t]);
                let e = max_rel_err(kb, kw);
                assert!(
                    e < 1e-4,
                    "{mode:?}, {rows} rows, layer {l}: KL, max rel err {e}"
                );
                let (rb, rw) = (bl.recall.as_ref().unwrap(), wh.recall.as_ref().unwrap());
                assert_eq!(rb.dims(), [b, t]);
                let e = max_abs(rb, rw);
                assert!(
                    e < 1e-5,
                    "{mode:?}, {rows} rows, layer {l}: recall, max abs diff {e}"
                );
                let below: usize = rw
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .filter(|r| **r < 0.999)
                    .count();
                assert!(
                    below >= b * (t - topk) / 2,
                    "{mode:?}, layer {l}: only {below} positions with recall < 1"
                );
            }
            let lm = dsa_train::eval::nll_sum_in_chunks(&model, &blocked.hidden, &x, 4).unwrap();
            assert!(
                (lm - lm_whole).abs() <= 1e-5 * lm_whole.abs(),
                "{mode:?}, {rows} rows: LM loss sum {lm} vs {lm_whole}"
            );
        }
    }
}

/// The model with every parameter wrapped in a Var, plus the Vars by name.
fn model_with_vars(dir: &std::path::Path) -> (Model, Vec<(String, Var)>) {
    let cfg = ModelConfig::from_dir(dir, &Default::default()).unwrap();
    let ckpt = Checkpoint::open(dir).unwrap();
    let specs = weights::model_weights(&cfg, false);
    let (params, _) = weights::load_params(&ckpt, &specs, DType::F32, &Device::Cpu, 0).unwrap();
    let vars: Vec<(String, Var)> = params
        .iter()
        .map(|(n, t)| (n.clone(), Var::from_tensor(t).unwrap()))
        .collect();
    let as_params: ParamSet = vars
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    (
        Model::from_params(cfg, &as_params, DType::F32, &Device::Cpu, false).unwrap(),
        vars,
    )
}

#[test]
fn lm_gradients_reach_the_main_model_and_kl_gradients_only_the_indexer() {
    let (_tmp, dir) = tiny_checkpoint(true, 22);
    let (model, vars) = model_with_vars(&dir);
    let x = tokens(2, 48, 2);
    let o = Pass::Train {
        stage: dsa_train::recipe::Stage::Sparse,
        topk: 12,
        kl: IndexerKl::PerQuery,
        seq_balance: false,
        block_rows: 0,
        indexer_rows: 0,
        backward: dsa_train::model::BackwardPlan::Autograd,
    };
    let out = model.forward(&x, &o).unwrap();
    let lm = next_token_nll(&out.logits, &x).unwrap().mean_all().unwrap();
    let kl = out
        .layers
        .iter()
        .map(|s| s.indexer_kl.as_ref().unwrap().mean_all().unwrap())
        .reduce(|a, b| (a + b).unwrap())
        .unwrap();

    let nonzero = |g: Option<&Tensor>| {
        g.is_some_and(|g| {
            g.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        })
    };
    let used_expert = |name: &str| -> bool {
        // Experts that no token was routed to get no gradient, legitimately.
        let Some(rest) = name.split(".mlp.experts.").nth(1) else {
            return true;
        };
        let l: usize = name.split('.').nth(2).unwrap().parse().unwrap();
        let e: usize = rest.split('.').next().unwrap().parse().unwrap();
        out.layers[l].expert_counts.as_ref().unwrap()[e] > 0
    };

    let lm_grads = lm.backward().unwrap();
    for (name, var) in &vars {
        let g = lm_grads.get(var.as_tensor());
        if name.contains(".indexer.") || name.ends_with("e_score_correction_bias") {
            assert!(!nonzero(g), "LM loss must not reach {name}");
        } else if used_expert(name) {
            assert!(nonzero(g), "LM loss must reach {name}");
        }
    }
    // The KL is built on leaf copies of the indexer's projections: its backward stops there...
    let kl_grads = kl.backward().unwrap();
    for (name, var) in &vars {
        assert!(
            !nonzero(kl_grads.get(var.as_tensor())),
            "the KL graph itself must stop at the projections, not reach {name}"
        );
    }
    // ...and the trainer's chunked step carries it into the indexer's parameters only.
    let ctx = dsa_train::model::ForwardContext::new(&model.cfg, 48, &Device::Cpu).unwrap();
    let mut reached = std::collections::HashSet::new();
    for (l, s) in out.layers.iter().enumerate() {
        let p = s.indexer_proj.as_ref().unwrap();
        let g = |x: &Tensor| {
            kl_grads
                .get(x)
                .cloned()
                .unwrap_or_else(|| x.zeros_like().unwrap())
        };
        let (x, qr) = s.indexer_inputs.as_ref().unwrap();
        model.layers[l]
            .indexer
            .backprop_rows(
                x,
                qr,
                &ctx.cos,
                &ctx.sin,
                (&g(&p.q), &g(&p.w), &g(&p.k)),
                7,
                |gs| {
                    for (name, var) in &vars {
                        if nonzero(gs.get(var.as_tensor())) {
                            reached.insert(name.clone());
                        }
                    }
                    Ok(())
                },
            )
            .unwrap();
    }
    for (name, _) in &vars {
        assert_eq!(
            reached.contains(name),
            name.contains(".indexer."),
            "KL gradient into {name}"
        );
    }
}

/// The sparse stage's deferred KL backward (`Indexer::backprop_sparse_kl`, what the trainer
/// runs) projects the queries again a few rows at a time from the layer's detached inputs,
/// scores them at the selected keys against one shared leaf copy of the keys and pushes the
/// keys' summed gradient through the key path afterwards. Its indexer gradients must equal
/// those of ONE plain autograd graph over every row (projections of all rows, no leaves,
/// `scores_at` + the sets' bias, `kl_rows`, mean, backward) to 1e-5 of max |g|, its KL the
/// graph's KL, and the sets chosen block by block the top-k of the whole-sequence scores.
/// Whole-layer and block-mode forwards, 3 query rows per indexer block (8 blocks of 23 rows).
#[test]
fn sparse_stage_kl_gradients_in_query_blocks_equal_one_autograd_graph() {
    let (_tmp, dir) = tiny_checkpoint(true, 24);
    let (model, vars) = model_with_vars(&dir);
    let (b, t, topk, weight) = (2, 23, 5, 0.7);
    let x = tokens(b, t, 4);
    let ctx = dsa_train::model::ForwardContext::new(&model.cfg, t, &Device::Cpu).unwrap();
    let max_abs = |x: &Tensor| {
        x.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    for block_rows in [0, 4] {
        let o = Pass::Train {
            stage: dsa_train::recipe::Stage::Sparse,
            topk,
            kl: IndexerKl::Deferred,
            seq_balance: false,
            block_rows,
            indexer_rows: 3,
            backward: dsa_train::model::BackwardPlan::Autograd,
        };
        let out = model.forward(&x, &o).unwrap();
        for (l, s) in out.layers.iter().enumerate() {
            let Some(dsa_train::model::DeferredKl::Sparse {
                keys,
                target,
                sel,
                rows,
                queries,
            }) = &s.deferred_kl
            else {
                panic!("layer {l}: the sparse stage defers its KL")
            };
            assert_eq!(*rows, 3);
            assert!(
                queries.is_none(),
                "layer {l}: a recomputing pass keeps no queries"
            );
            assert!(
                s.indexer_proj.is_none(),
                "layer {l}: no projections of every row are kept"
            );
            let (xi, qr) = s.indexer_inputs.as_ref().unwrap();
            let indexer = &model.layers[l].indexer;
            let prefix = format!("model.layers.{l}.self_attn.indexer.");
            let params: Vec<&(String, Var)> = vars
                .iter()
                .filter(|(n, _)| n.starts_with(&prefix))
                .collect();
            assert_eq!(params.len(), 5);

            // The trainer's path: gradients summed over the calls (query blocks, then key chunks).
            let mut blocked: std::collections::HashMap<String, Tensor> = Default::default();
            let mut calls = 0;
            let kl = indexer
                .backprop_sparse_kl(
                    (xi, qr),
                    keys,
                    target,
                    sel,
                    (&ctx.cos, &ctx.sin),
                    *rows,
                    weight,
                    |gs| {
                        calls += 1;
                        for (name, var) in &params {
                            if let Some(g) = gs.get(var.as_tensor()) {
                                let sum = match blocked.remove(name) {
                                    Some(a) => (a + g)?,
                                    None => g.clone(),
                                };
                                blocked.insert(name.clone(), sum);
                            }
                        }
                        Ok(())
                    },
                )
                .unwrap();
            assert_eq!(calls, 2 * t.div_ceil(3), "8 query blocks and 8 key chunks");

            // The reference: one graph from the parameters over all rows.
            let p = indexer.project(xi, qr, &ctx.cos, &ctx.sin).unwrap();
            let causal = dsa_train::dsa::causal_bias(t, &Device::Cpu).unwrap();
            let whole =
                dsa_train::dsa::select_topk(&p.scores(&causal).unwrap().detach(), topk).unwrap();
            assert_eq!(
                whole.indices().unwrap().to_vec3::<u32>().unwrap(),
                sel.indices().unwrap().to_vec3::<u32>().unwrap(),
                "layer {l}: the sets"
            );
            let on_set = (p.scores_at(sel, Default::default(), false).unwrap()
                + sel.bias().unwrap())
            .unwrap();
            let kl_ref = dsa_train::losses::kl_rows(target, &on_set)
                .unwrap()
                .mean_all()
                .unwrap();
            let grads = (&kl_ref * weight).unwrap().backward().unwrap();
            let (a, r) = (
                kl.to_scalar::<f32>().unwrap(),
                kl_ref.to_scalar::<f32>().unwrap(),
            );
            assert!(
                (a - r).abs() <= 1e-5 * r.abs(),
                "layer {l} (block_rows {block_rows}): KL {a} vs {r}"
            );
            for (name, var) in &params {
                let reference = grads
                    .get(var.as_tensor())
                    .unwrap_or_else(|| panic!("{name}: no reference gradient"));
                let scale = max_abs(reference);
                assert!(scale > 0.0, "{name}: zero reference gradient");
                let diff = max_abs(&(reference - &blocked[name]).unwrap());
                assert!(
                    diff <= 1e-5 * scale,
                    "{name} (block_rows {block_rows}): max diff {diff}, max |g| {scale}"
                );
            }
        }
    }
}

#[test]
fn without_detach_the_kl_reaches_the_main_model() {
    // The detach is what blocks it: the same forward without it leaks into q_a_proj.
    let (_tmp, dir) = tiny_checkpoint(true, 23);
    let (model, vars) = model_with_vars(&dir);
    let x = tokens(1, 24, 3);
    let o = Pass::Eval {
        attention: AttentionMode::Sparse,
        topk: 6,
        kl: true,
        recall: false,
        rows: None,
    };
    let out = model.forward(&x, &o).unwrap();
    let kl = out.layers[1]
        .indexer_kl
        .as_ref()
        .unwrap()
        .mean_all()
        .unwrap();
    let grads = kl.backward().unwrap();
    let q_a = &vars
        .iter()
        .find(|(n, _)| n == "model.layers.1.self_attn.q_a_proj.weight")
        .unwrap()
        .1;
    assert!(grads.get(q_a.as_tensor()).is_some());
}

#[test]
fn bf16_forward_tracks_f32() {
    let (_tmp, dir) = tiny_checkpoint(true, 24);
    let f32m = Model::load(&dir, &LoadOptions::default()).unwrap();
    let bf16m = Model::load(
        &dir,
        &LoadOptions {
            dtype: DType::BF16,
            ..Default::default()
        },
    )
    .unwrap();
    let x = tokens(1, 32, 4);
    let a = f32m
        .forward(&x, &opts(AttentionMode::Dense, 8))
        .unwrap()
        .logits;
    let b = bf16m
        .forward(&x, &opts(AttentionMode::Dense, 8))
        .unwrap()
        .logits
        .to_dtype(DType::F32)
        .unwrap();
    assert!(b
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .all(|v| v.is_finite()));
    let dot = (&a * &b)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let na = a
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .sqrt()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let nb = b
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .sqrt()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let cos = dot / (na * nb);
    assert!(cos > 1.0 - 5e-3, "cosine {cos}");
}

#[test]
fn mtp_layer_loads_and_predicts_two_ahead() {
    let (_tmp, dir) = tiny_checkpoint(false, 25);
    let model = Model::load(&dir, &LoadOptions::default()).unwrap();
    assert_eq!(model.mtp.len(), 1);
    let x = tokens(2, 16, 5);
    let o = opts(AttentionMode::Dense, 8);
    let out = model.forward(&x, &o).unwrap();
    let (logits, _) = model.mtp_logits(0, &out.hidden, &x, &o).unwrap();
    assert_eq!(logits.dims(), [2, 15, 512]);
    // Its loss is a finite cross-entropy against tokens t+2.
    let targets = x.narrow(1, 1, 15).unwrap();
    let nll = next_token_nll(&logits, &targets)
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(nll.is_finite() && nll > 0.0);
    let skipped = Model::load(
        &dir,
        &LoadOptions {
            skip_mtp: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(skipped.mtp.is_empty());
}

/// The bench-1k-h128 preset keeps bench-1k's model and takes DeepSeek-V3's attention shape:
/// 128 heads, q_lora 1536, absorbed query rows kv_lora + rope = 576 and latent values 512 (the
/// shape the wgmma sparse forward takes), and its config passes validation.
#[test]
fn bench_h128_preset_has_the_v3_attention_shape() {
    let text = dsa_train::tiny::bench_1k_h128_config().to_string();
    let c = dsa_train::config::ModelConfig::from_json(&text, &Default::default()).unwrap();
    c.validate().unwrap();
    assert_eq!(
        (c.num_attention_heads, c.q_lora_rank, c.kv_lora_rank),
        (128, 1536, 512)
    );
    assert_eq!(c.kv_lora_rank + c.qk_rope_head_dim, 576);
    let base = dsa_train::config::ModelConfig::from_json(
        &dsa_train::tiny::bench_1k_config().to_string(),
        &Default::default(),
    )
    .unwrap();
    assert_eq!(
        (
            base.num_attention_heads,
            base.hidden_size,
            base.num_hidden_layers
        ),
        (16, c.hidden_size, c.num_hidden_layers)
    );
    assert_eq!(
        (c.index_n_heads, c.index_head_dim, c.index_topk),
        (64, 128, 2048)
    );
}

/// FP8 selection scores (`dsa.indexer_scores = "fp8"`, `eval --indexer-scores fp8`): the
/// evaluation reports, per layer, how often the FP8 sets equal the bf16 scores' sets and their
/// recall of them; both within [0, 1], the recall high (the rounding moves scores by a few per
/// cent), and some sets differ (the FP8 path is not the bf16 one). The bf16 report has no such
/// fields; an index_head_dim that is not a power of two is refused by name.
#[test]
fn fp8_selection_scores_report_their_agreement_with_bf16() {
    use dsa_train::eval::{evaluate, EvalArgs};
    use dsa_train::model::fp8_scores::SelectionScores;
    let (_tmp, dir) = tiny_checkpoint(true, 27);
    let mut model = Model::load(&dir, &LoadOptions::default()).unwrap();
    let (t, topk) = (48, 6);
    let x = tokens(1, 3 * t, 8)
        .flatten_all()
        .unwrap()
        .to_vec1::<u32>()
        .unwrap();
    let args = |scores| EvalArgs {
        model: dir.clone(),
        tokens: dir.join("unused"),
        seq_len: t,
        attention: AttentionMode::Dense,
        topk: Some(topk),
        device: Device::Cpu,
        dtype: DType::F32,
        indexer: Default::default(),
        init_seed: 0,
        skip_mtp: false,
        max_windows: None,
        document_eos: None,
        selection_scores: scores,
    };
    let plain = evaluate(&model, &x, &args(SelectionScores::Bf16)).unwrap();
    assert_eq!(plain.indexer_scores, "bf16");
    assert!(plain.fp8_selection_identical_per_layer.is_none());
    model.set_selection_scores(SelectionScores::Fp8).unwrap();
    let fp8 = evaluate(&model, &x, &args(SelectionScores::Fp8)).unwrap();
    assert_eq!(fp8.indexer_scores, "fp8");
    let same = fp8.fp8_selection_identical_per_layer.unwrap();
    let recall = fp8.fp8_selection_recall_per_layer.unwrap();
    assert_eq!(same.len(), model.layers.len());
    for (s, r) in same.iter().zip(&recall) {
        assert!(
            (0.0..=1.0).contains(s) && (0.0..=1.0).contains(r),
            "{s} {r}"
        );
        assert!(*r > 0.7, "recall of the bf16 sets {r}");
        assert!(r >= s, "a query whose sets are equal has recall 1");
    }
    assert!(
        same.iter().any(|s| *s < 1.0),
        "the FP8 rounding changes no set at all: {same:?}"
    );
    // The LM loss reads the dense attention either way (dense evaluation).
    assert!((fp8.lm_loss - plain.lm_loss).abs() < 1e-9);
    model.cfg.index_head_dim = 24;
    let e = model
        .set_selection_scores(SelectionScores::Fp8)
        .unwrap_err();
    assert!(e.to_string().contains("index_head_dim is 24"), "{e}");
}

/// The sparse stage's first pass from saved activations keeps the indexer's queries and head
/// weights of every row as its selection projected them (`DeferredKl::Sparse::queries`), so the
/// KL's backward reads them instead of projecting again; the recomputing pass keeps none.
#[test]
fn the_saved_sparse_pass_keeps_the_selections_queries() {
    let (_tmp, dir) = tiny_checkpoint(true, 28);
    let model = Model::load(&dir, &LoadOptions::default()).unwrap();
    let (b, t) = (2, 23);
    let x = tokens(b, t, 9);
    let ctx = dsa_train::model::ForwardContext::new(&model.cfg, t, &Device::Cpu).unwrap();
    let pass = |backward| Pass::Train {
        stage: dsa_train::recipe::Stage::Sparse,
        topk: 5,
        kl: IndexerKl::Deferred,
        seq_balance: false,
        block_rows: 0,
        indexer_rows: 3,
        backward,
    };
    for (backward, keeps) in [
        (dsa_train::model::BackwardPlan::Saved, true),
        (dsa_train::model::BackwardPlan::Recompute, false),
    ] {
        let out = model.forward(&x, &pass(backward)).unwrap();
        for (l, s) in out.layers.iter().enumerate() {
            let Some(dsa_train::model::DeferredKl::Sparse { queries, .. }) = &s.deferred_kl else {
                panic!("layer {l}: the sparse stage defers its KL")
            };
            assert_eq!(queries.is_some(), keeps, "{backward:?}, layer {l}");
            let Some((q, w)) = queries else { continue };
            let (xi, qr) = s.indexer_inputs.as_ref().unwrap();
            let (want_q, want_w) = model.layers[l]
                .indexer
                .project_queries(xi, qr, &ctx.cos, &ctx.sin)
                .unwrap();
            assert_eq!(q.dims(), want_q.dims());
            assert!(max_rel_err(q, &want_q) < 1e-6 && max_rel_err(w, &want_w) < 1e-6);
        }
    }
}
