//! Export: write the model's parameters as a DeepSeek-V3.2-Exp Hugging Face checkpoint
//! (`model_type` "deepseek_v32", indexer included), loadable by this crate, by transformers'
//! `DeepseekV32ForCausalLM` and by DeepSeek's own conversion scripts.
//!
//! Storage follows `WeightSpec::storage()`, the table the loader reads: with `fp8`, the main
//! model's projections are FP8 e4m3 with power-of-two (ue8m0) 128 x 128 block scales, exactly
//! as DeepSeek ships them; without it they are bf16. Norms, embeddings, the head, the router
//! and the indexer's wq_b / wk / k_norm are bf16; the router bias and the indexer's
//! weights_proj stay f32.
//!
//! Precision: a block of e4m3 values times one power of two (a weight loaded from FP8 with
//! ue8m0 scales and not changed since) re-quantises to the same values. Its new scale is a
//! power of two no larger than the old (the block maximum is at most 448 times the old
//! scale), and multiplying an e4m3 value by 2^j, j >= 0, stays exact up to 448. Such values
//! are exact in bf16 too (3 mantissa bits fit in 7). Anything else is rounded once, to
//! nearest even. The stored scale may differ (half the source's when a block's maximum
//! rounded down to 224 times it); the values do not.
//!
//! Tensors are converted one at a time while their shard is written, so the export holds at
//! most one tensor's stored bytes (plus its f32 copy) besides `params`. The directory appears
//! only once complete (`hf_writer::write_dir_atomically`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use serde_json::json;

use crate::checkpoint::{Checkpoint, StDtype, FP8_BLOCK, SCALE_SUFFIX};
use crate::config::{IndexerDefaults, ModelConfig};
use crate::fp8;
use crate::hf_writer::{
    check_output_dir, write_checkpoint_with, write_dir_atomically, StoredTensor, TensorPlan,
};
use crate::weights::{self, ParamSet, WeightSpec};

#[derive(Debug, Clone, PartialEq)]
pub struct ExportOptions {
    /// Store the main model's projections as FP8 with block scales (DeepSeek's format).
    pub fp8: bool,
    /// A new shard starts once this many bytes would be passed (one tensor never splits).
    pub max_shard_bytes: usize,
}

impl Default for ExportOptions {
    fn default() -> Self {
        // transformers' default shard size ("5GB").
        Self {
            fp8: false,
            max_shard_bytes: 5_000_000_000,
        }
    }
}

/// Write `params` (every tensor of `weights::model_weights(cfg, with_mtp)`, any dtype, any
/// device) into the new directory `out` as a V3.2-Exp checkpoint. The MTP layers are written
/// when `params` holds them, with the copies of the main embedding and output head the layout
/// stores in them (`weights::mtp_tied_copies`); when it holds none, config.json says
/// `num_nextn_predict_layers` 0 so the export stays self-consistent. `out` must not exist or
/// be empty.
pub fn export_v32(
    cfg: &ModelConfig,
    params: &ParamSet,
    out: &Path,
    opts: &ExportOptions,
) -> Result<()> {
    check_output_dir(out)?;
    let with_mtp = mtp_present(cfg, &|n| params.contains_key(n))?;
    check_params(&weights::model_weights(cfg, with_mtp), params, cfg)?;
    export_from(cfg, &ParamSource(params), with_mtp, out, opts)
}

/// Where an export reads each tensor's values, one tensor at a time.
pub trait TensorSource {
    /// The values of `spec` as f32 (row-major), read now; an error names the tensor.
    fn values(&self, spec: &WeightSpec) -> Result<Vec<f32>>;
}

/// Parameters already in memory (a trainer's).
struct ParamSource<'a>(&'a ParamSet);

impl TensorSource for ParamSource<'_> {
    fn values(&self, spec: &WeightSpec) -> Result<Vec<f32>> {
        let t = weights::get(self.0, &spec.name)?;
        Ok(t.to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?)
    }
}

/// A Hugging Face checkpoint and the trained tensors of the steps over it, read a tensor at a
/// time (the base memory-mapped, a step's tensor from its files), so an export holds one
/// tensor in memory however large the model: a trained tensor from the last step folder that
/// stores it, else the base checkpoint's, else (an indexer tensor a V3.1 base lacks) the
/// deterministic init from `init_seed`.
struct CheckpointSource {
    base: Checkpoint,
    /// Each step folder over the base, the last first, with the tensors it stores and the
    /// files that hold each (`ckpt::overlay_index`).
    overlays: Vec<(
        std::path::PathBuf,
        BTreeMap<String, Vec<std::path::PathBuf>>,
    )>,
    init_seed: u64,
}

impl CheckpointSource {
    fn open(source: &crate::train::ckpt::ModelSource, init_seed: u64) -> Result<Self> {
        let overlays = source
            .overlays
            .iter()
            .rev()
            .map(|d| Ok((d.clone(), crate::train::ckpt::overlay_index(d)?)))
            .collect::<Result<_>>()?;
        Ok(Self {
            base: Checkpoint::open(&source.hf_dir)?,
            overlays,
            init_seed,
        })
    }

    /// The last step folder that stores `name`, and the files holding it there.
    fn trained_in(&self, name: &str) -> Option<(&Path, &[std::path::PathBuf])> {
        self.overlays
            .iter()
            .find_map(|(d, index)| index.get(name).map(|f| (d.as_path(), f.as_slice())))
    }

    fn has(&self, name: &str) -> bool {
        self.trained_in(name).is_some() || self.base.contains(name)
    }
}

impl TensorSource for CheckpointSource {
    fn values(&self, spec: &WeightSpec) -> Result<Vec<f32>> {
        let name = &spec.name;
        let t = if let Some((dir, files)) = self.trained_in(name) {
            crate::train::ckpt::overlay_tensor(dir, name, files)?
        } else if self.base.contains(name) {
            self.base
                .load(name, &spec.shape, DType::F32, &Device::Cpu)?
        } else if spec.indexer {
            return Ok(weights::init_indexer_tensor(spec, self.init_seed));
        } else {
            bail!(
                "tensor {name} is in neither {} nor the steps over it",
                self.base.dir().display()
            );
        };
        if t.dims() != spec.shape.as_slice() {
            bail!(
                "tensor {name} has shape {:?}, the model config expects {:?}",
                t.dims(),
                spec.shape
            );
        }
        Ok(t.flatten_all()?.to_vec1()?)
    }
}

/// `export_v32` from any `TensorSource`: each tensor read, checked finite, converted and
/// written before the next is read.
pub fn export_from(
    cfg: &ModelConfig,
    source: &dyn TensorSource,
    with_mtp: bool,
    out: &Path,
    opts: &ExportOptions,
) -> Result<()> {
    check_output_dir(out)?;
    let written = weights::checkpoint_weights(cfg, with_mtp);
    let config = v32_config_json(cfg, opts.fp8, with_mtp);

    let mut plan = Vec::with_capacity(written.len() * 2);
    for (s, _) in &written {
        let dtype = stored_dtype(s, opts.fp8);
        plan.push(TensorPlan {
            name: s.name.clone(),
            dtype,
            shape: s.shape.clone(),
        });
        if dtype == StDtype::F8E4M3 {
            let scale_shape = vec![
                fp8::blocks(s.shape[0], FP8_BLOCK),
                fp8::blocks(s.shape[1], FP8_BLOCK),
            ];
            plan.push(TensorPlan {
                name: format!("{}{SCALE_SUFFIX}", s.name),
                dtype: StDtype::F32,
                shape: scale_shape,
            });
        }
    }
    // Each stored tensor and the parameter whose values it holds (itself, or the main tensor
    // an MTP copy ties to).
    let by_name: HashMap<&str, (&WeightSpec, &str)> = written
        .iter()
        .map(|(s, src)| (s.name.as_str(), (s, src.as_deref().unwrap_or(&s.name))))
        .collect();
    // Quantising a weight yields its scales too; they wait here until the plan reaches them
    // (right after the weight, possibly in the next shard).
    let mut scales: HashMap<String, Vec<u8>> = HashMap::new();
    // A 671B export runs for a long while: a progress line at most every 10 s.
    let (total, mut done, mut bytes_done, mut last_report) =
        (plan.len(), 0usize, 0usize, Instant::now());
    let produce = |t: &TensorPlan| -> Result<Vec<u8>> {
        done += 1;
        bytes_done += t.nbytes();
        if last_report.elapsed().as_secs() >= 10 {
            crate::elog!(
                "[export] {done}/{total} tensors, {:.2} GB",
                bytes_done as f64 / 1e9
            );
            last_report = Instant::now();
        }
        if let Some(bytes) = scales.remove(&t.name) {
            return Ok(bytes);
        }
        let (spec, holds) = by_name[t.name.as_str()];
        let values = finite(holds, source.values(by_name[holds].0)?)?;
        Ok(match t.dtype {
            StDtype::F8E4M3 => {
                let [w, s] = StoredTensor::fp8(&spec.name, &spec.shape, &values);
                scales.insert(s.name, s.bytes);
                w.bytes
            }
            StDtype::F32 => StoredTensor::f32(&spec.name, &spec.shape, &values).bytes,
            StDtype::BF16 => StoredTensor::bf16(&spec.name, &spec.shape, &values).bytes,
            StDtype::F16 => unreachable!("the weight table stores no f16 tensor"),
        })
    };
    write_dir_atomically(out, |dir| {
        write_checkpoint_with(dir, &config, &plan, opts.max_shard_bytes, produce)
    })
    .with_context(|| format!("exporting to {}", out.display()))
}

/// How the export stores `spec`: DeepSeek's storage, with FP8 replaced by bf16 unless `fp8`.
pub fn stored_dtype(spec: &WeightSpec, fp8: bool) -> StDtype {
    match spec.storage() {
        StDtype::F8E4M3 if !fp8 => StDtype::BF16,
        other => other,
    }
}

/// Does the source (`has`) hold the MTP layers? All of them or none; a partial set is an
/// error. Indexer tensors do not count (a V3.1 base has none; they are initialised).
fn mtp_present(cfg: &ModelConfig, has: &dyn Fn(&str) -> bool) -> Result<bool> {
    let main: BTreeSet<String> = weights::model_weights(cfg, false)
        .into_iter()
        .map(|s| s.name)
        .collect();
    let mtp: Vec<String> = weights::model_weights(cfg, true)
        .into_iter()
        .filter(|s| !s.indexer)
        .map(|s| s.name)
        .filter(|n| !main.contains(n))
        .collect();
    let present = mtp.iter().filter(|n| has(n)).count();
    if present == 0 {
        if cfg.num_nextn_predict_layers > 0 {
            crate::elog!(
                "[export] the parameters hold no MTP layer: writing num_nextn_predict_layers 0 instead of {}",
                cfg.num_nextn_predict_layers
            );
        }
        return Ok(false);
    }
    if present < mtp.len() {
        let missing = mtp.iter().find(|n| !has(n)).unwrap();
        bail!(
            "the parameters hold {present} of the {} MTP tensors; {missing} is missing",
            mtp.len()
        );
    }
    Ok(true)
}

/// Every tensor of the table present with its shape, and nothing else (an unknown name would
/// otherwise be dropped without a word).
fn check_params(specs: &[WeightSpec], params: &ParamSet, cfg: &ModelConfig) -> Result<()> {
    for s in specs {
        let t = params.get(&s.name).with_context(|| {
            format!(
                "parameter {} is missing from the parameters to export",
                s.name
            )
        })?;
        if t.dims() != s.shape.as_slice() {
            bail!(
                "parameter {} has shape {:?}, expected {:?} from the model config",
                s.name,
                t.dims(),
                s.shape
            );
        }
    }
    if params.len() != specs.len() {
        let known: BTreeSet<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        if let Some(extra) = params.keys().find(|n| !known.contains(n.as_str())) {
            bail!(
                "parameter {extra} is not a tensor of this model (num_hidden_layers {}); refusing to drop it",
                cfg.num_hidden_layers
            );
        }
    }
    Ok(())
}

/// `v`, the values of parameter `name`, checked finite (FP8 block scales of a NaN or an
/// infinity would silently corrupt the whole block).
fn finite(name: &str, v: Vec<f32>) -> Result<Vec<f32>> {
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        bail!(
            "parameter {name} holds {} at flat index {i}; refusing to export a non-finite weight",
            v[i]
        );
    }
    Ok(v)
}

/// config.json of the export: every DeepSeek-V3 field in DeepSeek's own spelling (`rope_theta`
/// plus `rope_scaling` with `type` "yarn"), the V3.2 indexer fields, and with `fp8` DeepSeek's
/// quantization_config. Fields the model does not read take DeepSeek-V3's values.
pub fn v32_config_json(cfg: &ModelConfig, fp8: bool, with_mtp: bool) -> serde_json::Value {
    let fields = [
        ("architectures", json!(["DeepseekV32ForCausalLM"])),
        ("model_type", json!("deepseek_v32")),
        ("vocab_size", json!(cfg.vocab_size)),
        ("hidden_size", json!(cfg.hidden_size)),
        ("intermediate_size", json!(cfg.intermediate_size)),
        ("moe_intermediate_size", json!(cfg.moe_intermediate_size)),
        ("num_hidden_layers", json!(cfg.num_hidden_layers)),
        (
            "num_nextn_predict_layers",
            json!(if with_mtp {
                cfg.num_nextn_predict_layers
            } else {
                0
            }),
        ),
        ("num_attention_heads", json!(cfg.num_attention_heads)),
        ("num_key_value_heads", json!(cfg.num_attention_heads)),
        ("n_shared_experts", json!(cfg.n_shared_experts)),
        ("n_routed_experts", json!(cfg.n_routed_experts)),
        ("ep_size", json!(1)),
        ("routed_scaling_factor", json!(cfg.routed_scaling_factor)),
        ("kv_lora_rank", json!(cfg.kv_lora_rank)),
        ("q_lora_rank", json!(cfg.q_lora_rank)),
        ("qk_rope_head_dim", json!(cfg.qk_rope_head_dim)),
        ("v_head_dim", json!(cfg.v_head_dim)),
        ("qk_nope_head_dim", json!(cfg.qk_nope_head_dim)),
        ("topk_method", json!("noaux_tc")),
        ("n_group", json!(cfg.n_group)),
        ("topk_group", json!(cfg.topk_group)),
        ("num_experts_per_tok", json!(cfg.num_experts_per_tok)),
        ("moe_layer_freq", json!(1)),
        ("first_k_dense_replace", json!(cfg.first_k_dense_replace)),
        ("norm_topk_prob", json!(cfg.norm_topk_prob)),
        ("scoring_func", json!("sigmoid")),
        ("hidden_act", json!("silu")),
        (
            "max_position_embeddings",
            json!(cfg.max_position_embeddings),
        ),
        ("initializer_range", json!(0.02)),
        ("rms_norm_eps", json!(cfg.rms_norm_eps)),
        ("use_cache", json!(true)),
        ("bos_token_id", json!(0)),
        ("eos_token_id", json!(1)),
        ("tie_word_embeddings", json!(cfg.tie_word_embeddings)),
        ("rope_theta", json!(cfg.rope_theta)),
        ("attention_bias", json!(false)),
        ("attention_dropout", json!(0.0)),
        ("index_n_heads", json!(cfg.index_n_heads)),
        ("index_head_dim", json!(cfg.index_head_dim)),
        ("index_topk", json!(cfg.index_topk)),
        ("torch_dtype", json!("bfloat16")),
    ];
    let mut o: serde_json::Map<String, serde_json::Value> = fields
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    if let Some(y) = &cfg.rope_scaling {
        o.insert(
            "rope_scaling".into(),
            json!({
                "type": "yarn",
                "factor": y.factor,
                "original_max_position_embeddings": y.original_max_position_embeddings,
                "beta_fast": y.beta_fast,
                "beta_slow": y.beta_slow,
                "mscale": y.mscale,
                "mscale_all_dim": y.mscale_all_dim,
            }),
        );
    }
    if fp8 {
        o.insert(
            "quantization_config".into(),
            json!({
                "quant_method": "fp8",
                "fmt": "e4m3",
                "activation_scheme": "dynamic",
                "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
                "scale_fmt": "ue8m0",
            }),
        );
    }
    serde_json::Value::Object(o)
}

/// `dsa-train export` on a Hugging Face checkpoint directory: load every tensor (the indexer
/// initialised from `init_seed` when absent, as `eval` does) and export it. Returns the
/// config that was exported. Tensors load in bf16 (the indexer in f32), half the memory of
/// f32: values stored as FP8 with power-of-two (ue8m0) scales, as in V3.1-Terminus, or as
/// bf16 are exact there, so the export loses nothing. (Arbitrary f32 scales, as in the
/// original V3, round once to bf16; its FP8 re-export to ue8m0 scales rounds anyway.)
pub fn export_hf_checkpoint(
    src: &Path,
    out: &Path,
    indexer: &IndexerDefaults,
    init_seed: u64,
    opts: &ExportOptions,
) -> Result<ModelConfig> {
    // Fail before the (possibly long) load, not after it.
    check_output_dir(out)?;
    // Not inside a training step: pruning would delete it with the step.
    let resolved = crate::paths::resolved(out);
    if let Some(step) = resolved
        .ancestors()
        .skip(1)
        .find(|a| crate::train::ckpt::is_checkpoint(a))
    {
        bail!(
            "--output {} lies inside the training checkpoint {}; choose a folder outside it",
            out.display(),
            step.display()
        );
    }
    // A training step-N folder resolves to its Hugging Face base plus trained overlays; the
    // indexer shape and top-k then come from the recipe that trained it.
    let source = crate::train::ckpt::resolve_model(src)?;
    source.verify_share(0, 1)?;
    let trained = crate::train::ckpt::trained_settings(src)?;
    let (indexer, init_seed) = trained.unwrap_or((*indexer, init_seed));
    let mut cfg = ModelConfig::from_dir(&source.hf_dir, &indexer)?;
    if trained.is_some() {
        // A step exports the k its run trained with (the recipe's), not a base config.json's.
        cfg.index_topk = indexer.topk;
    }
    // Read a tensor at a time while writing (trained tensors in f32, so the export rounds
    // them exactly once); nothing is loaded up front.
    let reader = CheckpointSource::open(&source, init_seed)?;
    let with_mtp = mtp_present(&cfg, &|n| reader.has(n))?;
    let specs = weights::model_weights(&cfg, with_mtp);
    let known: BTreeSet<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    let trained: BTreeSet<&String> = reader
        .overlays
        .iter()
        .flat_map(|(_, index)| index.keys())
        .filter(|n| !weights::is_mtp_copy(n)) // an older step's; the main tensors are used
        .collect();
    if let Some(extra) = trained.iter().find(|n| !known.contains(n.as_str())) {
        bail!(
            "{}: trained tensor {extra} is not a tensor of this model (config.json, the MTP layers or the indexer shape differ)",
            src.display()
        );
    }
    let initialised: Vec<&WeightSpec> = specs
        .iter()
        .filter(|s| s.indexer && !reader.has(&s.name))
        .collect();
    if let Some(s) = specs.iter().find(|s| !s.indexer && !reader.has(&s.name)) {
        bail!(
            "tensor {} is missing from {} (and from the steps over it)",
            s.name,
            source.hf_dir.display()
        );
    }
    if !initialised.is_empty() {
        crate::elog!(
            "[export] {} has no indexer tensors: initialised {} of them from seed {init_seed} ({}x{} heads, top-k {})",
            src.display(), initialised.len(), cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
        );
    }
    if !trained.is_empty() {
        crate::elog!(
            "[export] {} trained tensors from {}",
            trained.len(),
            src.display()
        );
    }
    export_from(&cfg, &reader, with_mtp, out, opts)?;
    copy_companions(&source.hf_dir, out)?;
    Ok(cfg)
}

/// The files of a Hugging Face model folder that are not weights but that loaders and
/// generation expect beside them; copied from the base folder when it has them.
pub const COMPANION_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
];

/// Copy the `COMPANION_FILES` that `hf_dir` holds into `out`, so an export is self-contained.
fn copy_companions(hf_dir: &Path, out: &Path) -> Result<()> {
    for name in COMPANION_FILES {
        let from = hf_dir.join(name);
        if from.is_file() {
            std::fs::copy(&from, out.join(name)).with_context(|| {
                format!("cannot copy {} into {}", from.display(), out.display())
            })?;
        }
    }
    Ok(())
}
