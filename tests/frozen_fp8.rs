//! `model.frozen_fp8`: the warm-up's frozen weights held as the checkpoint stores them (FP8
//! bytes and block scales) and dequantised a layer at a time. The run must be the dense-loaded
//! warm-up bit for bit, hold fewer weight bytes, and be refused where the main model trains.

mod common;

use std::collections::HashMap;

use common::{assert_clean_error, path_str, run_cli, Fixture};
use dsa_train::recipe::Recipe;
use dsa_train::train::Trainer;

/// Per step (indexer KL, its gradient norm); every trainable tensor's bits by name; the
/// tensors held in FP8 and their bytes.
type WarmUp = (Vec<(f64, f64)>, HashMap<String, Vec<u32>>, (usize, usize));

/// Three warm-up steps (MTP on, block mode off and on; the FP8 weights on the device or in host
/// memory): metrics and every trainable tensor.
fn warm_up(f: &Fixture, fp8: bool, offload: bool, block_rows: usize) -> WarmUp {
    let model = f.root.join("model");
    let recipe = f.recipe(
        "warmup",
        &format!("w-{fp8}-{offload}-{block_rows}"),
        &model,
        3,
    );
    let sets = vec![
        format!("model.frozen_fp8={fp8}"),
        format!("model.frozen_fp8_offload={offload}"),
        format!("train.block_rows={block_rows}"),
    ];
    let mut t = Trainer::new(Recipe::load(&recipe, &sets).unwrap(), None).unwrap();
    let held = t.model.frozen_fp8.held();
    let metrics = (0..3)
        .map(|_| {
            let m = t.train_step().unwrap();
            (m.indexer_kl, m.indexer_grad_norm)
        })
        .collect();
    let params = t
        .slots
        .iter()
        .map(|s| {
            let bits = s
                .var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_dtype(candle_core::DType::F32)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect();
            (s.name.clone(), bits)
        })
        .collect();
    (metrics, params, held)
}

#[test]
fn the_warm_up_with_frozen_weights_in_fp8_is_the_dense_loaded_warm_up_bit_for_bit() {
    let f = Fixture::new(21);
    for (block_rows, offload) in [(0, false), (5, false), (5, true)] {
        let (m_dense, p_dense, held_dense) = warm_up(&f, false, false, block_rows);
        let (m_fp8, p_fp8, (n, bytes)) = warm_up(&f, true, offload, block_rows);
        assert_eq!(held_dense, (0, 0), "without the key nothing is held in FP8");
        // The tiny checkpoint stores every projection and expert in FP8: 2 layers of 5
        // attention projections, the dense MLP's 3, the MoE layer's experts and shared expert,
        // plus the MTP layer's.
        assert!(n >= 20, "only {n} tensors held in FP8");
        assert!(bytes > 0);
        assert_eq!(
            m_fp8, m_dense,
            "block_rows {block_rows}: KL and gradient norms"
        );
        assert_eq!(p_fp8.len(), p_dense.len());
        for (name, bits) in &p_dense {
            assert!(
                p_fp8[name] == *bits,
                "block_rows {block_rows}: {name} differs after 3 steps"
            );
        }
    }
}

#[test]
fn frozen_fp8_is_refused_where_the_main_model_trains() {
    let f0 = Fixture::new(23);
    let warm = f0.recipe("warmup", "r-offload", &f0.root.join("model"), 1);
    let r = run_cli(&[
        "check",
        path_str(&warm),
        "--set",
        "model.frozen_fp8_offload=true",
    ]);
    assert_clean_error(&r, &["model.frozen_fp8_offload", "model.frozen_fp8 = true"]);
    let f = Fixture::new(22);
    let model = f.root.join("model");
    for stage in ["sparse", "dense"] {
        let recipe = f.recipe(stage, &format!("r-{stage}"), &model, 1);
        let r = run_cli(&["check", path_str(&recipe), "--set", "model.frozen_fp8=true"]);
        assert_clean_error(&r, &["model.frozen_fp8", "warm-up"]);
    }
}
