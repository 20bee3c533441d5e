//! Building a `Model` from checkpoint tensors: the loader (FP8 dequantisation and the
//! indexer's deterministic init live in `weights`), the per-layer modules, expert shards.

use std::path::Path;

use anyhow::Context as _;
use candle_core::{DType, Device};

use super::attention::Mla;
use super::indexer::Indexer;
use super::moe::{self, Mlp, Moe};
use super::{DecoderLayer, FeedForward, Model, Mtp};
use crate::checkpoint::Checkpoint;
use crate::config::{IndexerDefaults, ModelConfig};
use crate::dist::expert::ExpertShard;
use crate::kernels::KernelPolicy;
use crate::weights::{self, ParamSet};

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub dtype: DType,
    pub device: Device,
    pub indexer: IndexerDefaults,
    /// Seed of the deterministic indexer initialisation (V3.1 checkpoints have no indexer).
    pub init_seed: u64,
    /// Leave the MTP layers out even when the checkpoint has them.
    pub skip_mtp: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            device: Device::Cpu,
            indexer: IndexerDefaults::default(),
            init_seed: 0,
            skip_mtp: false,
        }
    }
}

impl Model {
    /// Load a model from a Hugging Face checkpoint folder or a training `step-N` checkpoint
    /// (resolved to its HF folder plus parameter overlays), logging what was initialised or
    /// skipped.
    pub fn load(dir: &Path, opts: &LoadOptions) -> anyhow::Result<Self> {
        let source = crate::train::ckpt::resolve_model(dir)?;
        source.verify_share(0, 1)?;
        let hf_dir = &source.hf_dir;
        let cfg = ModelConfig::from_dir(hf_dir, &opts.indexer)?;
        let ckpt = Checkpoint::open(hf_dir)?;
        let with_mtp = cfg.num_nextn_predict_layers > 0 && !opts.skip_mtp;
        if cfg.num_nextn_predict_layers > 0 && opts.skip_mtp {
            crate::elog!(
                "[load] skipping the {} MTP layer(s) as asked",
                cfg.num_nextn_predict_layers
            );
        }
        let specs = weights::model_weights(&cfg, with_mtp);
        let (mut params, initialised) =
            weights::load_params(&ckpt, &specs, opts.dtype, &opts.device, opts.init_seed)?;
        if !initialised.is_empty() {
            crate::elog!(
                "[load] {} has no indexer tensors: initialised {} of them from seed {} ({}x{} heads, top-k {})",
                hf_dir.display(), initialised.len(), opts.init_seed, cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
            );
        }
        let mut overlay = crate::train::ckpt::overlay_params(&source, &opts.device)?;
        if !with_mtp {
            // A trained step holds its MTP layer's tensors too; without MTP they are not loaded.
            let main_layers = cfg.num_hidden_layers;
            overlay.retain(|n, _| {
                n.strip_prefix("model.layers.")
                    .and_then(|r| r.split('.').next())
                    .and_then(|l| l.parse::<usize>().ok())
                    .is_none_or(|l| l < main_layers)
            });
        }
        if !overlay.is_empty() {
            crate::elog!(
                "[load] applied {} trained tensors from {}",
                overlay.len(),
                dir.display()
            );
        }
        weights::apply_overlay(&mut params, &specs, overlay, opts.dtype)?;
        if let Some(name) = weights::first_non_finite(&params)? {
            let file = if source.overlays.is_empty() {
                ckpt.file_of(&name)
                    .map(|f| hf_dir.join(f).display().to_string())
            } else {
                None
            };
            anyhow::bail!(
                "tensor {name} (in {}) holds NaN or infinite values",
                file.unwrap_or_else(|| dir.display().to_string())
            );
        }
        Model::from_params(cfg, &params, opts.dtype, &opts.device, with_mtp)
            .with_context(|| format!("building the model from {}", dir.display()))
    }

    /// Assemble the model from named parameters (as listed by `weights::model_weights`).
    pub fn from_params(
        cfg: ModelConfig,
        params: &ParamSet,
        dtype: DType,
        device: &Device,
        with_mtp: bool,
    ) -> anyhow::Result<Self> {
        Self::from_params_sharded(cfg, params, dtype, device, with_mtp, None)
    }

    /// As `from_params`, holding only the routed experts of `shard` (expert parallelism);
    /// `params` then needs only those experts.
    pub fn from_params_sharded(
        cfg: ModelConfig,
        params: &ParamSet,
        dtype: DType,
        device: &Device,
        with_mtp: bool,
        shard: Option<&ExpertShard>,
    ) -> anyhow::Result<Self> {
        let get = |n: &str| weights::get(params, n).cloned();
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| build_layer(&cfg, params, l, shard))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let lm_head = if cfg.tie_word_embeddings {
            get("model.embed_tokens.weight")?
        } else {
            get("lm_head.weight")?
        };
        let mut mtp = vec![];
        if with_mtp && cfg.num_nextn_predict_layers > 1 {
            anyhow::bail!(
                "config.json has num_nextn_predict_layers {}: dsa-train trains one MTP module (DeepSeek-V3's); set model.mtp = false to leave them out",
                cfg.num_nextn_predict_layers
            );
        }
        if with_mtp {
            for m in 0..cfg.num_nextn_predict_layers {
                let l = cfg.num_hidden_layers + m;
                let p = format!("model.layers.{l}.");
                mtp.push(Mtp {
                    enorm: get(&format!("{p}enorm.weight"))?,
                    hnorm: get(&format!("{p}hnorm.weight"))?,
                    eh_proj: get(&format!("{p}eh_proj.weight"))?,
                    layer: build_layer(&cfg, params, l, shard)?,
                    head_norm: get(&format!("{p}shared_head.norm.weight"))?,
                });
            }
        }
        Ok(Model {
            embed: get("model.embed_tokens.weight")?,
            norm: get("model.norm.weight")?,
            lm_head,
            layers,
            mtp,
            dtype,
            device: device.clone(),
            cfg,
            kernels: KernelPolicy::default(),
            frozen_fp8: Default::default(),
            sharded: Default::default(),
        })
    }
}

pub(crate) fn build_layer(
    cfg: &ModelConfig,
    params: &ParamSet,
    l: usize,
    shard: Option<&ExpertShard>,
) -> anyhow::Result<DecoderLayer> {
    let p = format!("model.layers.{l}.");
    let get = |n: &str| weights::get(params, &format!("{p}{n}")).cloned();
    let mlp = |prefix: &str| -> anyhow::Result<Mlp> {
        Ok(Mlp {
            gate: get(&format!("{prefix}gate_proj.weight"))?,
            up: get(&format!("{prefix}up_proj.weight"))?,
            down: get(&format!("{prefix}down_proj.weight"))?,
            kernels: KernelPolicy::default(),
        })
    };
    let ffn = if cfg.is_moe_layer(l) {
        FeedForward::Moe(Moe {
            router: get("mlp.gate.weight")?,
            bias: get("mlp.gate.e_score_correction_bias")?,
            experts: (0..cfg.n_routed_experts)
                .filter(|&e| shard.is_none_or(|s| s.holds(e)))
                .map(|e| mlp(&format!("mlp.experts.{e}.")))
                .collect::<anyhow::Result<_>>()?,
            shard: shard.cloned(),
            n_experts: cfg.n_routed_experts,
            shared: if cfg.n_shared_experts > 0 {
                Some(mlp("mlp.shared_experts.")?)
            } else {
                None
            },
            top_k: cfg.num_experts_per_tok,
            n_group: cfg.n_group,
            topk_group: cfg.topk_group,
            norm_topk_prob: cfg.norm_topk_prob,
            routed_scaling_factor: cfg.routed_scaling_factor,
            compute: moe::ExpertCompute::Auto,
            dispatch: super::dispatch::Dispatch::Dtype,
            kernels: KernelPolicy::default(),
        })
    } else {
        FeedForward::Dense(mlp("mlp.")?)
    };
    Ok(DecoderLayer {
        input_norm: get("input_layernorm.weight")?,
        post_attention_norm: get("post_attention_layernorm.weight")?,
        attn: Mla {
            q_a_proj: get("self_attn.q_a_proj.weight")?,
            q_a_norm: get("self_attn.q_a_layernorm.weight")?,
            q_b_proj: get("self_attn.q_b_proj.weight")?,
            kv_a_proj: get("self_attn.kv_a_proj_with_mqa.weight")?,
            kv_a_norm: get("self_attn.kv_a_layernorm.weight")?,
            kv_b_proj: get("self_attn.kv_b_proj.weight")?,
            o_proj: get("self_attn.o_proj.weight")?,
            heads: cfg.num_attention_heads,
            nope: cfg.qk_nope_head_dim,
            rope: cfg.qk_rope_head_dim,
            v_dim: cfg.v_head_dim,
            kv_lora: cfg.kv_lora_rank,
            scale: cfg.softmax_scale(),
            kernels: KernelPolicy::default(),
        },
        indexer: Indexer {
            kernels: KernelPolicy::default(),
            scores: Default::default(),
            tensor_cores: get("self_attn.kv_b_proj.weight")?.dtype() == DType::BF16,
            wq_b: get("self_attn.indexer.wq_b.weight")?,
            wk: get("self_attn.indexer.wk.weight")?,
            k_norm_weight: get("self_attn.indexer.k_norm.weight")?,
            k_norm_bias: get("self_attn.indexer.k_norm.bias")?,
            weights_proj: get("self_attn.indexer.weights_proj.weight")?,
            heads: cfg.index_n_heads,
            head_dim: cfg.index_head_dim,
            rope: cfg.qk_rope_head_dim,
        },
        ffn,
        eps: cfg.rms_norm_eps,
        kernels: KernelPolicy::default(),
    })
}
