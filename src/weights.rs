//! The one table of weight names: every tensor of the model, its shape, how a Hugging Face
//! checkpoint stores it, and whether it belongs to the lightning indexer. Loading, indexer
//! initialisation, the trainable/frozen split and export all read this table.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};

use crate::checkpoint::{Checkpoint, StDtype};
use crate::config::ModelConfig;
use crate::dist::expert::RowExchange;
use crate::model::fp8_frozen::{self, Fp8Weight};

/// What a tensor is; decides storage, compute dtype and (later) weight decay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A projection `[out, in]`; FP8 with block scales in DeepSeek's checkpoints.
    Linear,
    /// A norm's scale vector.
    Norm,
    /// A norm's bias vector (the indexer's LayerNorm).
    NormBias,
    Embedding,
    /// The unquantised bf16 output head.
    Head,
    /// The MoE router weight `[experts, hidden]`; computed in f32.
    Router,
    /// The router's selection bias; f32, adjusted by the load rule, never by gradients.
    RouterBias,
}

#[derive(Debug, Clone, PartialEq)]
pub struct WeightSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub kind: Kind,
    /// Part of the lightning indexer (trained in the warm-up; absent from V3.1 checkpoints).
    pub indexer: bool,
}

impl WeightSpec {
    /// How a DeepSeek HF checkpoint stores this tensor.
    pub fn storage(&self) -> StDtype {
        match self.kind {
            Kind::Linear if !self.indexer => StDtype::F8E4M3,
            Kind::RouterBias => StDtype::F32,
            // DeepSeek keeps the indexer's head weights in f32.
            Kind::Linear if self.name.ends_with("weights_proj.weight") => StDtype::F32,
            _ => StDtype::BF16,
        }
    }

    /// The dtype the model computes this tensor in, given the model's compute dtype. The
    /// router, its bias and the indexer head weights stay f32 whatever the compute dtype.
    pub fn compute_dtype(&self, model_dtype: DType) -> DType {
        match self.kind {
            Kind::Router | Kind::RouterBias => DType::F32,
            _ if self.indexer => DType::F32,
            _ => model_dtype,
        }
    }
}

fn spec(name: String, shape: &[usize], kind: Kind, indexer: bool) -> WeightSpec {
    WeightSpec {
        name,
        shape: shape.to_vec(),
        kind,
        indexer,
    }
}

/// Tensors of decoder layer `l` (the MTP layer is `l = num_hidden_layers`).
pub fn layer_weights(cfg: &ModelConfig, l: usize) -> Vec<WeightSpec> {
    let p = format!("model.layers.{l}.");
    let (d, h) = (cfg.hidden_size, cfg.num_attention_heads);
    let mut v = vec![
        spec(
            format!("{p}input_layernorm.weight"),
            &[d],
            Kind::Norm,
            false,
        ),
        spec(
            format!("{p}self_attn.q_a_proj.weight"),
            &[cfg.q_lora_rank, d],
            Kind::Linear,
            false,
        ),
        spec(
            format!("{p}self_attn.q_a_layernorm.weight"),
            &[cfg.q_lora_rank],
            Kind::Norm,
            false,
        ),
        spec(
            format!("{p}self_attn.q_b_proj.weight"),
            &[h * cfg.qk_head_dim(), cfg.q_lora_rank],
            Kind::Linear,
            false,
        ),
        spec(
            format!("{p}self_attn.kv_a_proj_with_mqa.weight"),
            &[cfg.kv_lora_rank + cfg.qk_rope_head_dim, d],
            Kind::Linear,
            false,
        ),
        spec(
            format!("{p}self_attn.kv_a_layernorm.weight"),
            &[cfg.kv_lora_rank],
            Kind::Norm,
            false,
        ),
        spec(
            format!("{p}self_attn.kv_b_proj.weight"),
            &[
                h * (cfg.qk_nope_head_dim + cfg.v_head_dim),
                cfg.kv_lora_rank,
            ],
            Kind::Linear,
            false,
        ),
        spec(
            format!("{p}self_attn.o_proj.weight"),
            &[d, h * cfg.v_head_dim],
            Kind::Linear,
            false,
        ),
        spec(
            format!("{p}post_attention_layernorm.weight"),
            &[d],
            Kind::Norm,
            false,
        ),
    ];
    let (hi, di) = (cfg.index_n_heads, cfg.index_head_dim);
    let ix = format!("{p}self_attn.indexer.");
    v.extend([
        spec(
            format!("{ix}wq_b.weight"),
            &[hi * di, cfg.q_lora_rank],
            Kind::Linear,
            true,
        ),
        spec(format!("{ix}wk.weight"), &[di, d], Kind::Linear, true),
        spec(format!("{ix}k_norm.weight"), &[di], Kind::Norm, true),
        spec(format!("{ix}k_norm.bias"), &[di], Kind::NormBias, true),
        spec(
            format!("{ix}weights_proj.weight"),
            &[hi, d],
            Kind::Linear,
            true,
        ),
    ]);
    let mlp = |prefix: &str, inter: usize| {
        vec![
            spec(
                format!("{prefix}gate_proj.weight"),
                &[inter, d],
                Kind::Linear,
                false,
            ),
            spec(
                format!("{prefix}up_proj.weight"),
                &[inter, d],
                Kind::Linear,
                false,
            ),
            spec(
                format!("{prefix}down_proj.weight"),
                &[d, inter],
                Kind::Linear,
                false,
            ),
        ]
    };
    if cfg.is_moe_layer(l) {
        v.push(spec(
            format!("{p}mlp.gate.weight"),
            &[cfg.n_routed_experts, d],
            Kind::Router,
            false,
        ));
        v.push(spec(
            format!("{p}mlp.gate.e_score_correction_bias"),
            &[cfg.n_routed_experts],
            Kind::RouterBias,
            false,
        ));
        for e in 0..cfg.n_routed_experts {
            v.extend(mlp(
                &format!("{p}mlp.experts.{e}."),
                cfg.moe_intermediate_size,
            ));
        }
        if cfg.n_shared_experts > 0 {
            v.extend(mlp(
                &format!("{p}mlp.shared_experts."),
                cfg.moe_intermediate_size * cfg.n_shared_experts,
            ));
        }
    } else {
        v.extend(mlp(&format!("{p}mlp."), cfg.intermediate_size));
    }
    v
}

/// The extra tensors of the multi-token-prediction module at layer index `l` that are its own.
/// Its embedding and output head are the main model's (DeepSeek-V3 section 2.2: "shared
/// embedding layer and output head"); the checkpoint layout's copies are `mtp_tied_copies`.
pub fn mtp_extra_weights(cfg: &ModelConfig, l: usize) -> Vec<WeightSpec> {
    let p = format!("model.layers.{l}.");
    let d = cfg.hidden_size;
    vec![
        spec(format!("{p}enorm.weight"), &[d], Kind::Norm, false),
        spec(format!("{p}hnorm.weight"), &[d], Kind::Norm, false),
        spec(
            format!("{p}eh_proj.weight"),
            &[d, 2 * d],
            Kind::Linear,
            false,
        ),
        spec(
            format!("{p}shared_head.norm.weight"),
            &[d],
            Kind::Norm,
            false,
        ),
    ]
}

/// The copies of the main model's embedding and output head that the Hugging Face layout
/// stores in each MTP layer (`embed_tokens`, `shared_head.head`), each with the name of the
/// main tensor it holds. Not parameters: loading ignores them, an export writes them.
pub fn mtp_tied_copies(cfg: &ModelConfig) -> Vec<(WeightSpec, String)> {
    let (d, vocab) = (cfg.hidden_size, cfg.vocab_size);
    let head = if cfg.tie_word_embeddings {
        "model.embed_tokens.weight"
    } else {
        "lm_head.weight"
    };
    (0..cfg.num_nextn_predict_layers)
        .flat_map(|m| {
            let p = format!("model.layers.{}.", cfg.num_hidden_layers + m);
            [
                (
                    spec(
                        format!("{p}embed_tokens.weight"),
                        &[vocab, d],
                        Kind::Embedding,
                        false,
                    ),
                    "model.embed_tokens.weight".to_string(),
                ),
                (
                    spec(
                        format!("{p}shared_head.head.weight"),
                        &[vocab, d],
                        Kind::Head,
                        false,
                    ),
                    head.to_string(),
                ),
            ]
        })
        .collect()
}

/// Is `name` an MTP layer's copy of the embedding or output head (`mtp_tied_copies`)? By
/// name alone, for tensors an older build's step stored as its own.
pub fn is_mtp_copy(name: &str) -> bool {
    name.starts_with("model.layers.")
        && (name.ends_with(".embed_tokens.weight") || name.ends_with(".shared_head.head.weight"))
}

/// Every tensor a checkpoint in the Hugging Face layout stores, in its order: the model's
/// parameters (`model_weights`) and, with the MTP layers, their tied copies after each layer's
/// own tensors; each copy with the parameter it holds (None: the tensor is a parameter).
pub fn checkpoint_weights(cfg: &ModelConfig, with_mtp: bool) -> Vec<(WeightSpec, Option<String>)> {
    let mut v: Vec<(WeightSpec, Option<String>)> = model_weights(cfg, with_mtp)
        .into_iter()
        .map(|s| (s, None))
        .collect();
    if with_mtp {
        v.extend(
            mtp_tied_copies(cfg)
                .into_iter()
                .map(|(s, src)| (s, Some(src))),
        );
    }
    v
}

/// Every tensor of the model, in checkpoint order. `with_mtp` adds the MTP layers.
pub fn model_weights(cfg: &ModelConfig, with_mtp: bool) -> Vec<WeightSpec> {
    let (d, vocab) = (cfg.hidden_size, cfg.vocab_size);
    let mut v = vec![spec(
        "model.embed_tokens.weight".into(),
        &[vocab, d],
        Kind::Embedding,
        false,
    )];
    for l in 0..cfg.num_hidden_layers {
        v.extend(layer_weights(cfg, l));
    }
    v.push(spec("model.norm.weight".into(), &[d], Kind::Norm, false));
    if !cfg.tie_word_embeddings {
        v.push(spec(
            "lm_head.weight".into(),
            &[vocab, d],
            Kind::Head,
            false,
        ));
    }
    if with_mtp {
        for m in 0..cfg.num_nextn_predict_layers {
            let l = cfg.num_hidden_layers + m;
            v.extend(layer_weights(cfg, l));
            v.extend(mtp_extra_weights(cfg, l));
        }
    }
    v
}

/// Deterministic initial values for an indexer tensor missing from the checkpoint.
///
/// Linear weights are uniform in +-1/sqrt(fan_in) (PyTorch's default Linear bound), drawn per
/// element from splitmix64 of (fnv1a64(name) ^ seed) + (i+1) * golden, so a value depends only
/// on (seed, name, index): any subset of tensors, on any rank, gets the same numbers, and a
/// numpy script can reproduce them bit for bit (tools/parity). LayerNorm: weight 1, bias 0.
pub fn init_indexer_tensor(spec: &WeightSpec, seed: u64) -> Vec<f32> {
    let numel: usize = spec.shape.iter().product();
    match spec.kind {
        Kind::Norm => vec![1.0; numel],
        Kind::NormBias => vec![0.0; numel],
        _ => {
            let bound = (1.0 / (spec.shape[1] as f64).sqrt()) as f32;
            let base = fnv1a64(spec.name.as_bytes()) ^ seed;
            (0..numel as u64)
                .map(|i| {
                    let z = splitmix64_mix(base.wrapping_add((i + 1).wrapping_mul(GOLDEN)));
                    let u = (z >> 40) as f32 / (1u32 << 24) as f32;
                    (2.0 * u - 1.0) * bound
                })
                .collect()
        }
    }
}

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

fn splitmix64_mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Named parameter tensors, in compute dtype, on one device.
pub type ParamSet = BTreeMap<String, Tensor>;

/// Load `specs` from a checkpoint. Indexer tensors the checkpoint lacks (a V3.1-Terminus
/// checkpoint has none) are initialised from `init_seed`; everything else must be present.
/// Returns the parameters and the names that were initialised rather than read.
pub fn load_params(
    ckpt: &Checkpoint,
    specs: &[WeightSpec],
    dtype: DType,
    device: &Device,
    init_seed: u64,
) -> Result<(ParamSet, Vec<String>)> {
    let (params, initialised, _) = load_params_keeping_fp8(
        ckpt,
        specs,
        dtype,
        device,
        device,
        init_seed,
        &|_| false,
        &|_| None,
    )?;
    Ok((params, initialised))
}

/// `load_params`, keeping the tensors that `keep` names and the checkpoint stores in FP8 as
/// they are stored (`model::fp8_frozen`): each gets a placeholder in the parameters and its
/// bytes and scales in the third result, by name. `shard`: ZeRO-3's group for the tensors it
/// holds (`Some` for a tensor = shard its rows over that group, this rank keeping its share).
/// The kept bytes live on `fp8_device` (the host, to offload them) and dequantise onto
/// `device`.
#[allow(clippy::too_many_arguments)]
pub fn load_params_keeping_fp8(
    ckpt: &Checkpoint,
    specs: &[WeightSpec],
    dtype: DType,
    device: &Device,
    fp8_device: &Device,
    init_seed: u64,
    keep: &dyn Fn(&WeightSpec) -> bool,
    shard: &dyn Fn(&WeightSpec) -> Option<Arc<dyn RowExchange>>,
) -> Result<(ParamSet, Vec<String>, HashMap<String, Fp8Weight>)> {
    let mut params = ParamSet::new();
    let mut initialised = vec![];
    let mut held = HashMap::new();
    for s in specs {
        let want = s.compute_dtype(dtype);
        if keep(s) && ckpt.contains(&s.name) && s.shape.len() == 2 {
            let (rows, cols) = (s.shape[0], s.shape[1]);
            let group = shard(s);
            let range = match &group {
                Some(g) => fp8_frozen::shard_rows(rows, g.index(), g.size()),
                None => 0..rows,
            };
            if let Some((bytes, scales)) = ckpt.load_fp8(&s.name, &s.shape, range.clone())? {
                let part = if range.is_empty() {
                    None
                } else {
                    let scale_rows = scales.len() / crate::fp8::blocks(cols, fp8_frozen::BLOCK);
                    Some((
                        Tensor::from_vec(bytes, (range.len(), cols), fp8_device)?,
                        Tensor::from_vec(
                            scales,
                            (scale_rows, crate::fp8::blocks(cols, fp8_frozen::BLOCK)),
                            fp8_device,
                        )?,
                    ))
                };
                params.insert(s.name.clone(), fp8_frozen::placeholder(want, device)?);
                held.insert(
                    s.name.clone(),
                    Fp8Weight {
                        part,
                        rows,
                        cols,
                        dtype: want,
                        device: device.clone(),
                        sharded: group,
                    },
                );
                continue;
            }
        }
        let t = if ckpt.contains(&s.name) || !s.indexer {
            ckpt.load(&s.name, &s.shape, want, device)?
        } else {
            initialised.push(s.name.clone());
            Tensor::from_vec(
                init_indexer_tensor(s, init_seed),
                s.shape.as_slice(),
                device,
            )?
            .to_dtype(want)?
        };
        params.insert(s.name.clone(), t);
    }
    Ok((params, initialised, held))
}

/// Replace loaded tensors by overlay values (f32 from training checkpoints), checking names
/// and shapes against the weight table.
pub fn apply_overlay(
    params: &mut ParamSet,
    specs: &[WeightSpec],
    overlay: BTreeMap<String, Tensor>,
    dtype: DType,
) -> Result<()> {
    let by_name: std::collections::HashMap<&str, &WeightSpec> =
        specs.iter().map(|s| (s.name.as_str(), s)).collect();
    for (name, t) in overlay {
        if is_mtp_copy(&name) && !by_name.contains_key(name.as_str()) {
            // A step of an older build trained the MTP layer's copies of the embedding and head
            // as their own tensors; the module now shares the main ones (docs/design.md).
            crate::elog!("[load] {name}: not loaded; the MTP module uses the main model's tensor");
            continue;
        }
        let spec = by_name.get(name.as_str()).with_context(|| {
            format!("checkpoint tensor {name} is not part of this model (config.json, the MTP setting or the indexer shape differ)")
        })?;
        if t.dims() != spec.shape.as_slice() {
            anyhow::bail!(
                "checkpoint tensor {name} has shape {:?}, the model expects {:?}",
                t.dims(),
                spec.shape
            );
        }
        params.insert(name, t.to_dtype(spec.compute_dtype(dtype))?);
    }
    Ok(())
}

/// The first tensor (in name order) holding a NaN or an infinity, if any: x * 0 is 0 for
/// every finite x and NaN otherwise, so one sum per tensor, in the tensor's own dtype, finds it
/// (a sum of zeros cannot overflow). Rows are summed first: a sum straight to one value runs
/// on one GPU thread block (11 ms for a 132M-value tensor on an H200).
pub fn first_non_finite(params: &ParamSet) -> Result<Option<String>> {
    for (name, t) in params {
        let zeros = (t * 0.0)?;
        let rows = match zeros.rank() {
            0 | 1 => zeros,
            _ => zeros.flatten_from(1)?.sum(1)?,
        };
        let s = rows.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        if !s.is_finite() {
            return Ok(Some(name.clone()));
        }
    }
    Ok(None)
}

/// The routed expert a tensor belongs to (`...mlp.experts.{e}....`), if any.
pub fn routed_expert(name: &str) -> Option<usize> {
    let rest = &name[name.find(".mlp.experts.")? + ".mlp.experts.".len()..];
    rest.split('.').next()?.parse().ok()
}

/// Fetch a parameter by name; a missing one is a programming error in the weight table.
pub fn get<'a>(params: &'a ParamSet, name: &str) -> Result<&'a Tensor> {
    params
        .get(name)
        .with_context(|| format!("parameter {name} was not loaded"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::IndexerDefaults;

    #[test]
    fn table_of_the_671b_model_has_the_briefs_shapes_and_count() {
        let text = include_str!("../tests/data/deepseek-v3.1-terminus/config.json");
        let cfg = ModelConfig::from_json(text, &IndexerDefaults::default()).unwrap();
        let w = model_weights(&cfg, true);
        let find = |n: &str| {
            w.iter()
                .find(|s| s.name == n)
                .unwrap_or_else(|| panic!("{n}"))
        };
        assert_eq!(
            find("model.layers.0.self_attn.q_b_proj.weight").shape,
            [128 * 192, 1536]
        );
        assert_eq!(
            find("model.layers.0.self_attn.kv_a_proj_with_mqa.weight").shape,
            [576, 7168]
        );
        assert_eq!(
            find("model.layers.0.self_attn.kv_b_proj.weight").shape,
            [128 * 256, 512]
        );
        assert_eq!(find("model.layers.3.mlp.gate.weight").shape, [256, 7168]);
        assert_eq!(find("model.layers.61.eh_proj.weight").shape, [7168, 14336]);
        assert_eq!(
            find("model.layers.5.self_attn.indexer.wq_b.weight").shape,
            [64 * 128, 1536]
        );
        assert_eq!(
            find("model.layers.5.self_attn.indexer.weights_proj.weight").storage(),
            StDtype::F32
        );
        assert_eq!(
            find("model.layers.5.mlp.experts.255.down_proj.weight").storage(),
            StDtype::F8E4M3
        );
        // 671B main parameters + ~14B MTP: the checkpoint stores about 685B without indexers;
        // the MTP layer's embedding and head are copies of the main ones, not parameters.
        let count = |specs: &mut dyn Iterator<Item = &WeightSpec>| -> usize {
            specs
                .filter(|s| !s.indexer)
                .map(|s| s.shape.iter().product::<usize>())
                .sum()
        };
        let stored = checkpoint_weights(&cfg, true);
        let total = count(&mut stored.iter().map(|(s, _)| s));
        assert!((684e9..686e9).contains(&(total as f64)), "{total}");
        let copies = 2 * 129280 * 7168;
        assert_eq!(count(&mut w.iter()), total - copies);
        assert!(stored
            .iter()
            .filter_map(|(s, holds)| holds.as_ref().map(|h| (s, h)))
            .all(|(s, h)| s.name.starts_with("model.layers.61.")
                && (h == "model.embed_tokens.weight" || h == "lm_head.weight")));
    }

    #[test]
    fn indexer_init_depends_only_on_seed_name_and_index() {
        let s = |name: &str| spec(name.into(), &[8, 5], Kind::Linear, true);
        let a = init_indexer_tensor(&s("model.layers.0.self_attn.indexer.wq_b.weight"), 0);
        let b = init_indexer_tensor(&s("model.layers.0.self_attn.indexer.wq_b.weight"), 0);
        let c = init_indexer_tensor(&s("model.layers.1.self_attn.indexer.wq_b.weight"), 0);
        let d = init_indexer_tensor(&s("model.layers.0.self_attn.indexer.wq_b.weight"), 1);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
        let bound = 1.0 / 5f32.sqrt();
        assert!(a.iter().all(|x| x.abs() <= bound));
        let mean = a.iter().sum::<f32>() / a.len() as f32;
        assert!(mean.abs() < 0.2, "{mean}");
    }
}
