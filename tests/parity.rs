//! Parity with an independent implementation: transformers' DeepseekV3ForCausalLM and
//! DeepseekV32ForCausalLM, run in float64 by tools/parity/make_fixtures.py on small random FP8
//! checkpoints in the real HF layout. Our f32 CPU path must match: logits to 1e-4 relative (max
//! abs difference over max abs value, per window), lm_loss to 1e-4 relative, indexer KLs and
//! attention-mass recall to 1e-4 absolute, in both attention modes.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use dsa_train::config::IndexerDefaults;
use dsa_train::eval::{evaluate, EvalArgs};
use dsa_train::model::{AttentionMode, ForwardOptions, LoadOptions, Model};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn read_logits(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("logits").unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::F32);
    t.data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn check_fixture(name: &str) {
    let dir = fixture(name);
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let num = |v: &serde_json::Value| v.as_f64().unwrap();
    let (seq_len, topk) = (
        expected["seq_len"].as_u64().unwrap() as usize,
        expected["topk"].as_u64().unwrap() as usize,
    );
    let indexer = IndexerDefaults {
        n_heads: expected["index_n_heads"].as_u64().unwrap() as usize,
        head_dim: expected["index_head_dim"].as_u64().unwrap() as usize,
        topk,
    };
    let model = Model::load(
        &dir,
        &LoadOptions {
            indexer,
            init_seed: expected["init_seed"].as_u64().unwrap(),
            ..Default::default()
        },
    )
    .unwrap();
    let tokens =
        dsa_train::data::read_token_file(&dir.join("tokens.bin"), model.cfg.vocab_size).unwrap();
    for (mode, key) in [
        (AttentionMode::Dense, "dense"),
        (AttentionMode::Sparse, "sparse"),
    ] {
        let args = EvalArgs {
            model: dir.clone(),
            tokens: dir.join("tokens.bin"),
            seq_len,
            attention: mode,
            topk: Some(topk),
            device: Device::Cpu,
            dtype: DType::F32,
            indexer,
            init_seed: 0,
            skip_mtp: false,
            max_windows: None,
        };
        let got = evaluate(&model, &tokens, &args).unwrap();
        let want = &expected[key];
        assert_eq!(got.tokens as u64, expected["tokens"].as_u64().unwrap());
        let rel = (got.lm_loss - num(&want["lm_loss"])).abs() / num(&want["lm_loss"]);
        assert!(
            rel < 1e-4,
            "{name} {key}: lm_loss {} vs {} (rel {rel:e})",
            got.lm_loss,
            want["lm_loss"]
        );
        let close = |label: &str, ours: &[f64], theirs: &serde_json::Value| {
            let theirs: Vec<f64> = theirs.as_array().unwrap().iter().map(num).collect();
            assert_eq!(ours.len(), theirs.len(), "{name} {key} {label}");
            for (l, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                assert!(
                    (a - b).abs() < 1e-4,
                    "{name} {key} {label}[{l}]: {a} vs {b}"
                );
            }
        };
        close(
            "indexer_kl_per_layer",
            &got.indexer_kl_per_layer,
            &want["indexer_kl_per_layer"],
        );
        close(
            "attention_mass_recall_per_layer",
            &got.attention_mass_recall_per_layer,
            &want["attention_mass_recall_per_layer"],
        );
        close(
            "indexer_kl",
            &[got.indexer_kl],
            &serde_json::json!([want["indexer_kl"]]),
        );
        close(
            "attention_mass_recall",
            &[got.attention_mass_recall],
            &serde_json::json!([want["attention_mass_recall"]]),
        );

        // Logits, window by window.
        let reference = read_logits(&dir.join(format!("logits_{key}.safetensors")));
        let vocab = model.cfg.vocab_size;
        let opts = ForwardOptions {
            attention: mode,
            topk,
            indexer_kl: false,
            recall: false,
            detach_indexer_inputs: false,
            seq_balance: false,
            defer_dense_kl: false,
            block_rows: 0,
            indexer_rows: 0,
            eval_rows: None,
        };
        for w in 0..got.windows {
            let x = Tensor::from_slice(
                &tokens[w * seq_len..(w + 1) * seq_len],
                (1, seq_len),
                &Device::Cpu,
            )
            .unwrap();
            let ours: Vec<f32> = model
                .forward(&x, &opts)
                .unwrap()
                .logits
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let theirs = &reference[w * seq_len * vocab..(w + 1) * seq_len * vocab];
            let max_diff = ours
                .iter()
                .zip(theirs)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            let max_ref = theirs.iter().map(|b| b.abs()).fold(0f32, f32::max);
            assert!(
                max_diff / max_ref < 1e-4,
                "{name} {key} window {w}: logits rel err {:e}",
                max_diff / max_ref
            );
        }
    }
}

#[test]
fn v32_checkpoint_with_indexer_matches_transformers() {
    check_fixture("v32_tiny");
}

#[test]
fn v31_checkpoint_without_indexer_matches_transformers() {
    check_fixture("v31_tiny");
}

#[test]
fn indexer_init_matches_the_reference_scripts_bits() {
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("indexer_init_sample.json")).unwrap(),
    )
    .unwrap();
    for s in v["samples"].as_array().unwrap() {
        let spec = dsa_train::weights::WeightSpec {
            name: s["name"].as_str().unwrap().into(),
            shape: s["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize)
                .collect(),
            kind: dsa_train::weights::Kind::Linear,
            indexer: true,
        };
        let ours = dsa_train::weights::init_indexer_tensor(&spec, s["seed"].as_u64().unwrap());
        for (i, hex) in s["first8_f32_bits_hex"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            let bits = u32::from_str_radix(hex.as_str().unwrap(), 16).unwrap();
            assert_eq!(
                ours[i].to_bits(),
                bits,
                "{} seed {} [{i}]",
                spec.name,
                s["seed"]
            );
        }
    }
}
