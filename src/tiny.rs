//! The embedded default: a small DeepSeek-V3-shaped checkpoint and a synthetic corpus that the
//! project generates itself (no network), in the real HF layout (FP8 with ragged 128 x 128
//! blocks, several shards, an index). Also the writer of random checkpoints of any shape, used
//! by tests and the loader benchmark.

use std::path::Path;

use anyhow::Result;
use serde_json::json;

use crate::checkpoint::StDtype;
use crate::config::{IndexerDefaults, ModelConfig};
use crate::hf_writer::{write_checkpoint, StoredTensor};
use crate::rng::SplitMix64;
use crate::weights::{Kind, WeightSpec};

/// config.json of the tiny default model: 4 layers (1 dense + 3 MoE) and one MTP layer; dims
/// above 128 and not multiples of it, so FP8 edge blocks are exercised.
pub fn tiny_config(with_indexer: bool) -> serde_json::Value {
    let mut c = json!({
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": 512, "hidden_size": 192, "num_hidden_layers": 4, "first_k_dense_replace": 1,
        "intermediate_size": 384, "moe_intermediate_size": 96, "num_attention_heads": 4,
        "num_key_value_heads": 4, "q_lora_rank": 160, "kv_lora_rank": 144, "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16, "v_head_dim": 32, "n_routed_experts": 8, "n_shared_experts": 1,
        "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": true,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        "max_position_embeddings": 163840, "num_nextn_predict_layers": 1,
        "tie_word_embeddings": false, "hidden_act": "silu", "attention_bias": false,
        "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                "weight_block_size": [128, 128], "scale_fmt": "ue8m0"}
    });
    if with_indexer {
        let o = c.as_object_mut().unwrap();
        o.insert("model_type".into(), "deepseek_v32".into());
        o.insert("architectures".into(), json!(["DeepseekV32ForCausalLM"]));
        o.insert("index_n_heads".into(), 4.into());
        o.insert("index_head_dim".into(), 32.into());
        o.insert("index_topk".into(), 32.into());
    }
    c
}

/// config.json of the GPU benchmark model (the shape transformers' DeepseekV32 was
/// timed on): vocab 129280, hidden 1024, 4 layers (1 dense + 3 MoE: 16 routed experts, top-4,
/// 1 shared, 4 groups / top 2), 16 heads, q_lora 768, kv_lora 512, nope 128, rope 64, v 128,
/// indexer 64 x 128, top-k 2048, YaRN factor 40 from 4096.
pub fn bench_1k_config() -> serde_json::Value {
    let mut c = tiny_config(true);
    let o = c.as_object_mut().unwrap();
    for (k, v) in [
        ("vocab_size", json!(129280)),
        ("hidden_size", json!(1024)),
        ("num_hidden_layers", json!(4)),
        ("first_k_dense_replace", json!(1)),
        ("intermediate_size", json!(2816)),
        ("moe_intermediate_size", json!(512)),
        ("num_attention_heads", json!(16)),
        ("num_key_value_heads", json!(16)),
        ("q_lora_rank", json!(768)),
        ("kv_lora_rank", json!(512)),
        ("qk_nope_head_dim", json!(128)),
        ("qk_rope_head_dim", json!(64)),
        ("v_head_dim", json!(128)),
        ("n_routed_experts", json!(16)),
        ("num_experts_per_tok", json!(4)),
        ("n_shared_experts", json!(1)),
        ("n_group", json!(4)),
        ("topk_group", json!(2)),
        ("index_n_heads", json!(64)),
        ("index_head_dim", json!(128)),
        ("index_topk", json!(2048)),
        ("num_nextn_predict_layers", json!(0)),
    ] {
        o.insert(k.into(), v);
    }
    c
}

/// The bench model with DeepSeek-V3's attention shape: 128 heads and q_lora 1536 (absorbed
/// queries 128 x 576, latent values 512, as in `bench kernels`), the rest as bench-1k. Its
/// sparse stage runs the wgmma forward (64-head blocks), which 16 heads cannot fill.
pub fn bench_1k_h128_config() -> serde_json::Value {
    let mut c = bench_1k_config();
    let o = c.as_object_mut().unwrap();
    for (k, v) in [
        ("num_attention_heads", json!(128)),
        ("num_key_value_heads", json!(128)),
        ("q_lora_rank", json!(1536)),
    ] {
        o.insert(k.into(), v);
    }
    c
}

/// A slice of the 671B model at its real widths (hidden 7168, 128 heads, q/kv LoRA 1536/512,
/// nope/rope/v 128/64/128, indexer 64 x 128 and top-k 2048, dense MLP 18432, experts 2048
/// wide, top-8, one shared expert) with 2 layers (1 dense, 1 MoE of 16 experts in 8 groups,
/// 4 groups per token) and a 32768-token vocabulary: 2.0B parameters, the step engine's
/// benchmark at the shapes the 671B job runs.
pub fn slice_671b_config() -> serde_json::Value {
    let mut c = bench_1k_config();
    let o = c.as_object_mut().unwrap();
    for (k, v) in [
        ("vocab_size", json!(32768)),
        ("hidden_size", json!(7168)),
        ("num_hidden_layers", json!(2)),
        ("first_k_dense_replace", json!(1)),
        ("intermediate_size", json!(18432)),
        ("moe_intermediate_size", json!(2048)),
        ("num_attention_heads", json!(128)),
        ("num_key_value_heads", json!(128)),
        ("q_lora_rank", json!(1536)),
        ("kv_lora_rank", json!(512)),
        ("n_routed_experts", json!(16)),
        ("num_experts_per_tok", json!(8)),
        ("n_shared_experts", json!(1)),
        ("n_group", json!(8)),
        ("topk_group", json!(4)),
    ] {
        o.insert(k.into(), v);
    }
    c
}

/// Random values for one tensor, scaled so activations stay O(1) through the layers.
fn random_values(spec: &WeightSpec, rng: &mut SplitMix64) -> Vec<f32> {
    let n: usize = spec.shape.iter().product();
    let fan_in = spec.shape.last().copied().unwrap_or(1) as f64;
    match spec.kind {
        Kind::Norm => rng
            .normal_vec(n, 0.1)
            .into_iter()
            .map(|x| 1.0 + x)
            .collect(),
        Kind::NormBias => rng.normal_vec(n, 0.1),
        Kind::Embedding => rng.normal_vec(n, 1.0),
        Kind::RouterBias => rng.normal_vec(n, 0.1),
        Kind::Linear | Kind::Head | Kind::Router => rng.normal_vec(n, fan_in.powf(-0.5)),
    }
}

/// Write a random checkpoint for `config` (a config.json value) in DeepSeek's storage formats.
/// Indexer tensors are written only when the config names the indexer (V3.2 style).
pub fn write_random_checkpoint(
    dir: &Path,
    config: &serde_json::Value,
    seed: u64,
    max_shard_bytes: usize,
) -> Result<()> {
    write_checkpoint_of(dir, config, seed, max_shard_bytes, random_values)
}

/// Write a checkpoint for `config` whose values come from `values` (drawn in the weight
/// table's order from one seeded generator), stored as DeepSeek stores each tensor.
pub fn write_checkpoint_of(
    dir: &Path,
    config: &serde_json::Value,
    seed: u64,
    max_shard_bytes: usize,
    values: impl Fn(&WeightSpec, &mut SplitMix64) -> Vec<f32>,
) -> Result<()> {
    let cfg = ModelConfig::from_json(&config.to_string(), &IndexerDefaults::default())?;
    let mut rng = SplitMix64::new(seed);
    let mut tensors = vec![];
    // The MTP layers' copies of the embedding and head hold the main tensors' values.
    let mut drawn: std::collections::HashMap<String, Vec<f32>> = Default::default();
    for (spec, holds) in crate::weights::checkpoint_weights(&cfg, true) {
        if spec.indexer && !cfg.indexer_in_config {
            continue;
        }
        let v = match holds {
            Some(main) => drawn[&main].clone(),
            None => values(&spec, &mut rng),
        };
        if matches!(
            spec.kind,
            crate::weights::Kind::Embedding | crate::weights::Kind::Head
        ) {
            drawn.insert(spec.name.clone(), v.clone());
        }
        match spec.storage() {
            StDtype::F8E4M3 => tensors.extend(StoredTensor::fp8(&spec.name, &spec.shape, &v)),
            StDtype::F32 => tensors.push(StoredTensor::f32(&spec.name, &spec.shape, &v)),
            _ => tensors.push(StoredTensor::bf16(&spec.name, &spec.shape, &v)),
        }
    }
    write_checkpoint(dir, config, tensors, max_shard_bytes)
}

/// A synthetic corpus with structure a small model can learn: a sparse first-order Markov chain
/// (each token has four likely successors) interleaved with copies of spans seen earlier in the
/// same stretch, so that attending to the right distant keys pays off.
pub fn synthetic_corpus(vocab: usize, n_tokens: usize, seed: u64) -> Vec<u32> {
    let mut rng = SplitMix64::new(seed);
    let succ: Vec<[u32; 4]> = (0..vocab)
        .map(|_| std::array::from_fn(|_| (rng.next_u64() % vocab as u64) as u32))
        .collect();
    let mut out: Vec<u32> = Vec::with_capacity(n_tokens);
    let mut cur = 0u32;
    while out.len() < n_tokens {
        if out.len() > 64 && rng.uniform() < 0.03 {
            // Copy a span of 8..24 tokens from up to 256 tokens back.
            let len = 8 + (rng.next_u64() % 17) as usize;
            let back = 32 + (rng.next_u64() % 224) as usize;
            let start = out.len().saturating_sub(back);
            for i in 0..len {
                let tok = out[start + i];
                out.push(tok);
            }
            cur = *out.last().unwrap();
        } else {
            let r = rng.uniform();
            let j = if r < 0.6 {
                0
            } else if r < 0.8 {
                1
            } else if r < 0.93 {
                2
            } else {
                3
            };
            cur = succ[cur as usize][j];
            out.push(cur);
        }
    }
    out.truncate(n_tokens);
    out
}

/// The presets `write_preset` knows.
pub const PRESETS: [&str; 4] = ["tiny", "bench-1k", "bench-1k-h128", "slice-671b"];

/// Write a preset into `dir`: `model/` and `tokens.bin`. "tiny" is the embedded default (V3.1
/// style, no indexer); "bench-1k" is the GPU benchmark model (V3.2 style); "bench-1k-h128" the
/// same with V3's 128 attention heads; "slice-671b" two layers of the 671B model at its widths.
pub fn write_preset(dir: &Path, preset: &str, seed: u64) -> Result<()> {
    let (config, tokens) = match preset {
        "tiny" => (tiny_config(false), 1 << 17),
        "bench-1k" => (bench_1k_config(), 1 << 22),
        "bench-1k-h128" => (bench_1k_h128_config(), 1 << 22),
        "slice-671b" => (slice_671b_config(), 1 << 22),
        other => anyhow::bail!(
            "unknown preset {other:?}; expected one of {}",
            PRESETS.map(|p| format!("\"{p}\"")).join(", ")
        ),
    };
    let vocab = config["vocab_size"].as_u64().unwrap_or(512) as usize;
    write_random_checkpoint(&dir.join("model"), &config, seed, 1 << 30)?;
    crate::data::write_token_file(
        &dir.join("tokens.bin"),
        &synthetic_corpus(vocab, tokens, seed ^ 0x5eed),
    )?;
    Ok(())
}
