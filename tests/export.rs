//! Export to a V3.2-Exp checkpoint, read back through our own loader: config fields, stored
//! dtypes, bit-exact round trips where the maths says so, bf16/FP8 rounding bounds where it
//! does not, identical dense logits, and the directory appearing complete or not at all.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{assert_clean_error, path_str, run_cli, tiny_checkpoint};
use dsa_train::checkpoint::{Checkpoint, StDtype};
use dsa_train::config::{IndexerDefaults, ModelConfig};
use dsa_train::export::{export_v32, ExportOptions};
use dsa_train::model::{AttentionMode, LoadOptions, Model, Pass};
use dsa_train::rng::SplitMix64;
use dsa_train::weights::{self, Kind, ParamSet, WeightSpec};

/// The indexer shape given to the V3.1-style tiny checkpoint (it has none in its config).
const TINY_INDEXER_SHAPE: dsa_train::config::IndexerDefaults = dsa_train::config::IndexerDefaults {
    n_heads: 4,
    head_dim: 32,
    topk: 32,
};

fn source(seed: u64) -> (tempfile::TempDir, PathBuf, ModelConfig, ParamSet) {
    let (tmp, dir) = tiny_checkpoint(false, seed);
    let cfg = ModelConfig::from_dir(&dir, &TINY_INDEXER_SHAPE).unwrap();
    let ckpt = Checkpoint::open(&dir).unwrap();
    let specs = weights::model_weights(&cfg, true);
    let (params, initialised) =
        weights::load_params(&ckpt, &specs, DType::F32, &Device::Cpu, 3).unwrap();
    // 5 indexer tensors in each of the 4 layers and the MTP layer.
    assert_eq!(initialised.len(), 25);
    (tmp, dir, cfg, params)
}

fn opts(fp8: bool) -> ExportOptions {
    // Small shards, so the export spans several files and a weight can sit in another shard
    // than its scales.
    ExportOptions {
        fp8,
        max_shard_bytes: 1 << 20,
    }
}

/// Read an export back with our loader. The indexer defaults passed here differ from the
/// tiny model's, so loading only works if config.json carries the index fields.
fn reload(out: &Path) -> (ModelConfig, Checkpoint, ParamSet) {
    let cfg = ModelConfig::from_dir(out, &IndexerDefaults::default()).unwrap();
    let ckpt = Checkpoint::open(out).unwrap();
    let specs = weights::model_weights(&cfg, cfg.num_nextn_predict_layers > 0);
    let (params, initialised) =
        weights::load_params(&ckpt, &specs, DType::F32, &Device::Cpu, 99).unwrap();
    assert!(initialised.is_empty(), "the export lacks {initialised:?}");
    (cfg, ckpt, params)
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// The stored dtype DeepSeek's V3.2-Exp checkpoints use, written out independently of
/// `WeightSpec::storage`.
fn expected_dtype(spec: &WeightSpec, fp8: bool) -> StDtype {
    match (spec.kind, spec.indexer) {
        (Kind::Linear, false) if fp8 => StDtype::F8E4M3,
        (Kind::Linear, true) if spec.name.ends_with("indexer.weights_proj.weight") => StDtype::F32,
        (Kind::RouterBias, _) => StDtype::F32,
        _ => StDtype::BF16,
    }
}

fn tokens(b: usize, t: usize, seed: u64) -> Tensor {
    let mut rng = SplitMix64::new(seed);
    let v: Vec<u32> = (0..b * t).map(|_| (rng.next_u64() % 512) as u32).collect();
    Tensor::from_vec(v, (b, t), &Device::Cpu).unwrap()
}

fn dense() -> Pass {
    Pass::logits(AttentionMode::Dense, 32)
}

/// Main and MTP logits of a dense forward, flattened.
fn dense_logits(model: &Model, x: &Tensor) -> (Vec<f32>, Vec<f32>) {
    let out = model.forward(x, &dense()).unwrap();
    let (mtp, _) = model.mtp_logits(0, &out.hidden, x, &dense()).unwrap();
    (values(&out.logits), values(&mtp))
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn fp8_and_bf16_exports_of_an_fp8_checkpoint_reload_bit_exactly_with_identical_dense_logits() {
    let (tmp, _, cfg, params) = source(11);
    let original =
        Model::from_params(cfg.clone(), &params, DType::F32, &Device::Cpu, true).unwrap();
    let x = tokens(2, 40, 5);
    let (logits, mtp_logits) = dense_logits(&original, &x);
    let specs = weights::model_weights(&cfg, true);
    for fp8 in [true, false] {
        let out = tmp.path().join(if fp8 { "fp8" } else { "bf16" });
        if fp8 {
            // An existing empty directory is a valid target.
            std::fs::create_dir(&out).unwrap();
        }
        export_v32(&cfg, &params, &out, &opts(fp8)).unwrap();

        let raw = read_json(&out.join("config.json"));
        assert_eq!(raw["model_type"], "deepseek_v32");
        assert_eq!(
            raw["architectures"],
            serde_json::json!(["DeepseekV32ForCausalLM"])
        );
        assert_eq!(
            (
                raw["index_n_heads"].as_u64(),
                raw["index_head_dim"].as_u64(),
                raw["index_topk"].as_u64()
            ),
            (Some(4), Some(32), Some(32))
        );
        assert_eq!(raw["num_nextn_predict_layers"], 1);
        assert_eq!(raw["rope_scaling"]["type"], "yarn");
        assert_eq!(raw["rope_theta"], 10000.0);
        if fp8 {
            assert_eq!(
                raw["quantization_config"],
                serde_json::json!({"quant_method": "fp8", "fmt": "e4m3",
                "activation_scheme": "dynamic", "weight_block_size": [128, 128], "scale_fmt": "ue8m0"})
            );
        } else {
            assert!(raw.get("quantization_config").is_none());
        }
        let index = read_json(&out.join("model.safetensors.index.json"));
        let shards: std::collections::BTreeSet<&str> = index["weight_map"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(shards.len() > 1, "expected several shards, got {shards:?}");

        let (cfg2, ckpt, back) = reload(&out);
        let expect = ModelConfig {
            model_type: "deepseek_v32".into(),
            indexer_in_config: true,
            ..cfg.clone()
        };
        assert_eq!(cfg2, expect);
        for spec in &specs {
            let want = expected_dtype(spec, fp8);
            assert_eq!(ckpt.info(&spec.name).unwrap().dtype, want, "{}", spec.name);
            assert_eq!(
                ckpt.contains(&format!("{}_scale_inv", spec.name)),
                want == StDtype::F8E4M3,
                "{}",
                spec.name
            );
            let (a, b) = (values(&params[&spec.name]), values(&back[&spec.name]));
            if !spec.indexer || want == StDtype::F32 {
                // FP8 values times power-of-two scales re-quantise to the same values and are
                // exact in bf16; bf16 and f32 tensors are copied.
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert!(
                    bits(&a) == bits(&b),
                    "{} (fp8 export: {fp8}) is not bit-exact",
                    spec.name
                );
            } else {
                // The f32 indexer init, stored in bf16: rounded once.
                for (x, y) in a.iter().zip(&b) {
                    assert!(
                        (x - y).abs() <= x.abs() * 2f32.powi(-8),
                        "{}: {x} -> {y}",
                        spec.name
                    );
                }
                if spec.kind == Kind::Linear {
                    assert!(
                        a != b,
                        "{}: the f32 init should not be bf16-representable",
                        spec.name
                    );
                }
            }
        }

        // Dense attention does not read the indexer, so the logits are the same bits.
        let reloaded = Model::load(&out, &LoadOptions::default()).unwrap();
        assert_eq!(reloaded.cfg.index_topk, 32);
        let (l2, m2) = dense_logits(&reloaded, &x);
        assert!(
            l2 == logits,
            "main logits differ after the export (fp8: {fp8})"
        );
        assert!(
            m2 == mtp_logits,
            "MTP logits differ after the export (fp8: {fp8})"
        );
        // The indexer survived, to bf16 rounding: its KL against the dense attention agrees.
        let kl_opts = Pass::Eval {
            attention: AttentionMode::Dense,
            topk: 32,
            kl: true,
            recall: false,
            rows: None,
        };
        let (k1, k2) = (
            original.forward(&x, &kl_opts).unwrap(),
            reloaded.forward(&x, &kl_opts).unwrap(),
        );
        for (l, (a, b)) in k1.layers.iter().zip(&k2.layers).enumerate() {
            let mean = |s: &dsa_train::model::LayerStats| {
                s.indexer_kl
                    .as_ref()
                    .unwrap()
                    .mean_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            };
            let (a, b) = (mean(a), mean(b));
            assert!(
                (a - b).abs() <= 1e-2 * a.abs(),
                "layer {l}: indexer KL {a} vs {b}"
            );
        }
    }
}

#[test]
fn requantising_fp8_values_reproduces_them_even_when_the_block_scale_halves() {
    // Block 0's largest value is 224 * 2^-6 (e4m3 224 at scale 2^-6): its new scale is the
    // smallest power of two >= 224 * 2^-6 / 448 = 2^-7, half the old one, and every e4m3 value
    // doubles exactly. Block 1's largest is 448 * 2^-6 and keeps its scale. The bottom blocks
    // (rows 128, 129) hold smaller maxima and get scales smaller by more than one power of two.
    let (rows, cols) = (130, 140);
    let mut rng = SplitMix64::new(3);
    let e4m3 = |x: f32| float8::F8E4M3::from_f32(x).to_f32();
    let mut w: Vec<f32> = (0..rows * cols)
        .map(|_| e4m3(rng.normal() as f32 * 40.0) * 2f32.powi(-6))
        .collect();
    for (i, x) in w.iter_mut().enumerate() {
        let (r, c) = (i / cols, i % cols);
        if r < 128 && c < 128 {
            *x = x.clamp(-224.0 * 2f32.powi(-6), 224.0 * 2f32.powi(-6));
        }
    }
    w[5 * cols + 7] = 224.0 * 2f32.powi(-6);
    w[5 * cols + 130] = 448.0 * 2f32.powi(-6);
    let (q, scales) = dsa_train::fp8::quantize(&w, rows, cols, 128);
    assert_eq!(scales[..2], [2f32.powi(-7), 2f32.powi(-6)]);
    assert!(scales[2..].iter().all(|s| *s < 2f32.powi(-7)), "{scales:?}");
    for i in 0..rows * cols {
        let back = float8::F8E4M3::from_bits(q[i]).to_f32()
            * scales[(i / cols / 128) * 2 + (i % cols) / 128];
        assert_eq!(back.to_bits(), w[i].to_bits(), "element {i}");
    }
}

/// The parameters after some training: every value moved off the FP8 and bf16 grids.
fn trained(params: &ParamSet, seed: u64) -> ParamSet {
    let mut rng = SplitMix64::new(seed);
    params
        .iter()
        .map(|(n, t)| {
            let mut noise = |std| {
                Tensor::from_vec(rng.normal_vec(t.elem_count(), std), t.dims(), &Device::Cpu)
                    .unwrap()
            };
            // Relative steps, plus small absolute ones so that zeros (LayerNorm bias) move too.
            let (rel, abs) = (noise(0.01), noise(1e-3));
            (
                n.clone(),
                ((t * (rel + 1.0).unwrap()).unwrap() + abs).unwrap(),
            )
        })
        .collect()
}

/// `params` rounded in memory the way the export stores each tensor: bf16 round-to-nearest-
/// even, or FP8 quantisation (our encoder) decoded through the float8 crate.
fn rounded_as_stored(cfg: &ModelConfig, params: &ParamSet, fp8: bool) -> ParamSet {
    let mut out = ParamSet::new();
    for spec in weights::model_weights(cfg, true) {
        let t = &params[&spec.name];
        let r = match expected_dtype(&spec, fp8) {
            StDtype::BF16 => t
                .to_dtype(DType::BF16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap(),
            StDtype::F8E4M3 => {
                let (rows, cols) = (spec.shape[0], spec.shape[1]);
                let (q, scales) = dsa_train::fp8::quantize(&values(t), rows, cols, 128);
                let cb = cols.div_ceil(128);
                let v: Vec<f32> = (0..rows * cols)
                    .map(|i| {
                        float8::F8E4M3::from_bits(q[i]).to_f32()
                            * scales[(i / cols / 128) * cb + (i % cols) / 128]
                    })
                    .collect();
                Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap()
            }
            _ => t.clone(),
        };
        out.insert(spec.name.clone(), r);
    }
    out
}

#[test]
fn export_of_trained_weights_holds_each_value_rounded_once_and_nothing_else() {
    let (tmp, _, cfg, params) = source(12);
    let params = trained(&params, 1);
    let x = tokens(2, 40, 6);
    for fp8 in [false, true] {
        let out = tmp.path().join(if fp8 { "fp8" } else { "bf16" });
        export_v32(&cfg, &params, &out, &opts(fp8)).unwrap();
        let (_, ckpt, back) = reload(&out);
        for spec in weights::model_weights(&cfg, true) {
            let (a, b) = (values(&params[&spec.name]), values(&back[&spec.name]));
            let amax = a.iter().fold(0f32, |m, x| m.max(x.abs()));
            // bf16: one rounding to 8 significant bits. e4m3: 4 significant bits (relative
            // 2^-4), plus half a subnormal step of the block scale (<= amax / 224 * 2^-10).
            let (rel, abs) = match ckpt.info(&spec.name).unwrap().dtype {
                StDtype::F8E4M3 => (2f32.powi(-4), amax * 5e-6),
                StDtype::BF16 => (2f32.powi(-8), 0.0),
                _ => (0.0, 0.0),
            };
            for (x, y) in a.iter().zip(&b) {
                assert!(
                    (x - y).abs() <= x.abs() * rel + abs,
                    "{} (fp8: {fp8}): {x} -> {y}",
                    spec.name
                );
            }
            if rel > 0.0 {
                assert!(
                    a != b,
                    "{}: trained values should not survive storage unrounded",
                    spec.name
                );
            }
        }
        // The reloaded model is the in-memory rounded one, to the bit.
        let expected = Model::from_params(
            cfg.clone(),
            &rounded_as_stored(&cfg, &params, fp8),
            DType::F32,
            &Device::Cpu,
            true,
        )
        .unwrap();
        let reloaded = Model::load(&out, &LoadOptions::default()).unwrap();
        assert!(
            dense_logits(&reloaded, &x) == dense_logits(&expected, &x),
            "fp8 {fp8}: logits differ"
        );
    }
}

#[test]
fn rounding_trained_weights_keeps_dense_mlp_logits_within_bf16_and_fp8_tolerance() {
    // Dense MLPs only: with MoE layers, rounding the router weights to bf16 (DeepSeek's
    // storage) flips the expert choice of tokens whose top-k scores nearly tie, a discrete
    // change no tolerance covers. On the tiny MoE model that is 1 to 4 of 80 tokens per layer,
    // giving logit cosines of 0.989 (bf16) and 0.967 (FP8); with dense MLPs they are 0.99995
    // and 0.9986.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    let mut config = dsa_train::tiny::tiny_config(false);
    config["first_k_dense_replace"] = 4.into();
    dsa_train::tiny::write_random_checkpoint(&dir, &config, 12, 1 << 20).unwrap();
    let cfg = ModelConfig::from_dir(&dir, &TINY_INDEXER_SHAPE).unwrap();
    let ckpt = Checkpoint::open(&dir).unwrap();
    let (params, _) = weights::load_params(
        &ckpt,
        &weights::model_weights(&cfg, true),
        DType::F32,
        &Device::Cpu,
        3,
    )
    .unwrap();
    let params = trained(&params, 1);
    let original =
        Model::from_params(cfg.clone(), &params, DType::F32, &Device::Cpu, true).unwrap();
    let x = tokens(2, 40, 6);
    let (logits, _) = dense_logits(&original, &x);
    for (fp8, floor) in [(false, 0.999), (true, 0.995)] {
        let out = tmp.path().join(if fp8 { "fp8" } else { "bf16" });
        export_v32(&cfg, &params, &out, &opts(fp8)).unwrap();
        let (l2, _) = dense_logits(&Model::load(&out, &LoadOptions::default()).unwrap(), &x);
        assert!(
            l2 != logits,
            "fp8 {fp8}: rounding should show in the logits"
        );
        assert!(l2.iter().all(|v| v.is_finite()));
        let cos = cosine(&logits, &l2);
        assert!(cos > floor, "fp8 {fp8}: logits cosine {cos}");
    }
}

#[test]
fn exporting_into_a_non_empty_directory_is_a_clear_error() {
    let (tmp, dir, cfg, params) = source(13);
    let out = tmp.path().join("taken");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("notes.txt"), "keep me").unwrap();
    let err = format!(
        "{:#}",
        export_v32(&cfg, &params, &out, &opts(true)).unwrap_err()
    );
    assert!(
        err.contains("not empty") && err.contains(path_str(&out)),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("notes.txt")).unwrap(),
        "keep me"
    );
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);

    let r = run_cli(&[
        "export",
        "--checkpoint",
        path_str(&dir),
        "--output",
        path_str(&out),
        "--fp8",
        "--index-n-heads",
        "4",
        "--index-head-dim",
        "32",
        "--index-topk",
        "32",
    ]);
    assert_clean_error(&r, &["not empty", path_str(&out)]);
}

#[test]
fn an_export_that_fails_midway_leaves_nothing_that_looks_like_a_checkpoint() {
    let (tmp, _, cfg, mut params) = source(14);
    let good = params.clone();
    // lm_head comes after every decoder layer: several shards are already written.
    let head = &params["lm_head.weight"];
    let mut v = values(head);
    v[7] = f32::NAN;
    params.insert(
        "lm_head.weight".into(),
        Tensor::from_vec(v, head.dims(), &Device::Cpu).unwrap(),
    );
    let out = tmp.path().join("export");
    let partial = tmp.path().join(".export.partial");
    let err = format!(
        "{:#}",
        export_v32(&cfg, &params, &out, &opts(true)).unwrap_err()
    );
    assert!(
        err.contains("lm_head.weight") && err.contains("NaN"),
        "{err}"
    );
    assert!(
        !out.exists() && !partial.exists(),
        "a failed export left files behind"
    );

    // A partial directory left by a killed export is replaced by the next attempt.
    std::fs::create_dir(&partial).unwrap();
    std::fs::write(partial.join("model-00001-of-00009.safetensors"), "half").unwrap();
    export_v32(&cfg, &good, &out, &opts(true)).unwrap();
    assert!(!partial.exists());
    assert!(!out.join("model-00001-of-00009.safetensors").exists());
    reload(&out);
}

#[test]
fn parameters_that_do_not_match_the_weight_table_are_refused_naming_the_tensor() {
    let (tmp, _, cfg, params) = source(15);
    let out = tmp.path().join("export");
    let try_export =
        |p: &ParamSet| format!("{:#}", export_v32(&cfg, p, &out, &opts(false)).unwrap_err());

    let name = "model.layers.2.self_attn.kv_b_proj.weight";
    let mut p = params.clone();
    p.remove(name);
    let err = try_export(&p);
    assert!(err.contains(name) && err.contains("missing"), "{err}");

    let mut p = params.clone();
    p.insert(
        name.into(),
        Tensor::zeros((3, 5), DType::F32, &Device::Cpu).unwrap(),
    );
    let err = try_export(&p);
    assert!(err.contains(name) && err.contains("[3, 5]"), "{err}");

    let mut p = params.clone();
    p.insert(
        "model.layers.2.self_attn.extra.weight".into(),
        Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap(),
    );
    let err = try_export(&p);
    assert!(
        err.contains("model.layers.2.self_attn.extra.weight"),
        "{err}"
    );

    let mut p = params.clone();
    p.remove("model.layers.4.eh_proj.weight");
    let err = try_export(&p);
    assert!(
        err.contains("MTP") && err.contains("model.layers.4.eh_proj.weight"),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn parameters_without_the_mtp_layer_export_a_model_without_one() {
    let (tmp, _, cfg, params) = source(16);
    let main: ParamSet = weights::model_weights(&cfg, false)
        .iter()
        .map(|s| (s.name.clone(), params[&s.name].clone()))
        .collect();
    let out = tmp.path().join("export");
    export_v32(&cfg, &main, &out, &opts(true)).unwrap();
    let (cfg2, ckpt, _) = reload(&out);
    assert_eq!(cfg2.num_nextn_predict_layers, 0);
    assert!(ckpt.names().all(|n| !n.starts_with("model.layers.4.")));
    Model::load(&out, &LoadOptions::default()).unwrap();
}

#[test]
fn export_command_turns_a_v31_checkpoint_into_a_v32_one_with_the_same_dense_loss() {
    let (tmp, dir) = tiny_checkpoint(false, 17);
    let out = tmp.path().join("v32");
    let (code, _, stderr) = run_cli(&[
        "export",
        "--checkpoint",
        path_str(&dir),
        "--output",
        path_str(&out),
        "--fp8",
        "--index-n-heads",
        "4",
        "--index-head-dim",
        "32",
        "--index-topk",
        "32",
        "--init-seed",
        "5",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let tokens = tmp.path().join("tokens.bin");
    let mut rng = SplitMix64::new(8);
    dsa_train::data::write_token_file(
        &tokens,
        &(0..96)
            .map(|_| (rng.next_u64() % 512) as u32)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let eval = |model: &Path| -> serde_json::Value {
        let (code, stdout, stderr) = run_cli(&[
            "eval",
            "--model",
            path_str(model),
            "--tokens",
            path_str(&tokens),
            "--seq-len",
            "48",
            "--attention",
            "dense",
            "--index-n-heads",
            "4",
            "--index-head-dim",
            "32",
            "--init-seed",
            "5",
        ]);
        assert_eq!(code, 0, "{stderr}");
        serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
    };
    let (before, after) = (eval(&dir), eval(&out));
    assert_eq!(
        before["lm_loss"].as_f64().unwrap().to_bits(),
        after["lm_loss"].as_f64().unwrap().to_bits()
    );
    assert_eq!(after["topk"], 32);
    // Same indexer up to bf16 rounding of its f32 init.
    let (a, b) = (
        before["indexer_kl"].as_f64().unwrap(),
        after["indexer_kl"].as_f64().unwrap(),
    );
    assert!((a - b).abs() <= 1e-2 * a, "indexer KL {a} vs {b}");
}
