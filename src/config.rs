//! The model configuration: the checkpoint's own Hugging Face `config.json`.
//!
//! DeepSeek-V3, V3.1-Terminus (`model_type` "deepseek_v3") and V3.2-Exp ("deepseek_v32") share
//! one schema; V3.2 adds `index_n_heads`, `index_head_dim` and `index_topk`. When those are
//! absent the caller's [`IndexerDefaults`] fill them in. RoPE settings are accepted both in
//! DeepSeek's original form (`rope_theta` + `rope_scaling` with `type`) and in the form newer
//! transformers versions write (`rope_parameters` with `rope_type` and `rope_theta`).

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// Indexer shape used when config.json does not carry one (a V3.1-Terminus checkpoint).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IndexerDefaults {
    pub n_heads: usize,
    pub head_dim: usize,
    pub topk: usize,
}

impl Default for IndexerDefaults {
    fn default() -> Self {
        // DeepSeek-V3.2-Exp's values.
        Self {
            n_heads: 64,
            head_dim: 128,
            topk: 2048,
        }
    }
}

/// YaRN context extension of the RoPE frequencies (DeepSeek-V3: factor 40 from 4096).
#[derive(Debug, Clone, PartialEq)]
pub struct YarnScaling {
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub mscale: f64,
    pub mscale_all_dim: f64,
}

/// Everything the model needs from config.json, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub first_k_dense_replace: usize,
    pub intermediate_size: usize,
    pub moe_intermediate_size: usize,
    pub num_attention_heads: usize,
    pub q_lora_rank: usize,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub n_routed_experts: usize,
    pub n_shared_experts: usize,
    pub num_experts_per_tok: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub routed_scaling_factor: f64,
    pub norm_topk_prob: bool,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<YarnScaling>,
    pub max_position_embeddings: usize,
    pub num_nextn_predict_layers: usize,
    pub tie_word_embeddings: bool,
    pub index_n_heads: usize,
    pub index_head_dim: usize,
    pub index_topk: usize,
    /// True when the indexer shape came from config.json rather than the caller.
    pub indexer_in_config: bool,
}

/// The raw file, field for field. Unknown fields are ignored: HF configs carry many we do not use.
#[derive(Debug, Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    first_k_dense_replace: Option<usize>,
    intermediate_size: usize,
    moe_intermediate_size: usize,
    num_attention_heads: usize,
    q_lora_rank: Option<usize>,
    kv_lora_rank: usize,
    qk_nope_head_dim: usize,
    qk_rope_head_dim: usize,
    v_head_dim: usize,
    n_routed_experts: usize,
    #[serde(default)]
    n_shared_experts: Option<usize>,
    num_experts_per_tok: usize,
    #[serde(default)]
    n_group: Option<usize>,
    #[serde(default)]
    topk_group: Option<usize>,
    #[serde(default)]
    routed_scaling_factor: Option<f64>,
    #[serde(default)]
    norm_topk_prob: Option<bool>,
    #[serde(default)]
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    max_position_embeddings: Option<usize>,
    #[serde(default)]
    num_nextn_predict_layers: Option<usize>,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
    scoring_func: Option<String>,
    topk_method: Option<String>,
    hidden_act: Option<String>,
    attention_bias: Option<bool>,
    mlp_layer_types: Option<Vec<String>>,
    index_n_heads: Option<usize>,
    index_head_dim: Option<usize>,
    index_topk: Option<usize>,
}

impl ModelConfig {
    /// Read and validate `<dir>/config.json`.
    pub fn from_dir(dir: &Path, defaults: &IndexerDefaults) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Self::from_json(&text, defaults).with_context(|| format!("{}", path.display()))
    }

    /// Parse and validate the text of a config.json.
    pub fn from_json(text: &str, defaults: &IndexerDefaults) -> Result<Self> {
        let raw: RawConfig =
            serde_json::from_str(text).map_err(|e| anyhow::anyhow!("bad config: {e}"))?;
        let model_type = raw.model_type.clone().unwrap_or_default();
        if model_type != "deepseek_v3" && model_type != "deepseek_v32" {
            bail!("model_type is {model_type:?}; expected \"deepseek_v3\" or \"deepseek_v32\"");
        }
        for (field, value, expected) in [
            ("scoring_func", &raw.scoring_func, "sigmoid"),
            ("topk_method", &raw.topk_method, "noaux_tc"),
            ("hidden_act", &raw.hidden_act, "silu"),
        ] {
            if let Some(v) = value {
                if v != expected {
                    bail!("{field} is {v:?}; only {expected:?} (DeepSeek-V3) is supported");
                }
            }
        }
        if raw.attention_bias == Some(true) {
            bail!("attention_bias is true; DeepSeek-V3 attention has no biases");
        }
        let q_lora_rank = raw.q_lora_rank.context(
            "q_lora_rank is missing or null; DeepSeek-V3 uses a q LoRA and the indexer reads its output",
        )?;
        let (rope_theta, rope_scaling) = parse_rope(&raw)?;
        let indexer_in_config = raw.index_n_heads.is_some();
        let cfg = ModelConfig {
            model_type,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            num_hidden_layers: raw.num_hidden_layers,
            // transformers' V3.2 config may carry only mlp_layer_types ("dense" then "sparse").
            first_k_dense_replace: raw.first_k_dense_replace.unwrap_or_else(|| {
                raw.mlp_layer_types.as_ref().map_or(0, |t| {
                    t.iter().take_while(|x| x.as_str() == "dense").count()
                })
            }),
            intermediate_size: raw.intermediate_size,
            moe_intermediate_size: raw.moe_intermediate_size,
            num_attention_heads: raw.num_attention_heads,
            q_lora_rank,
            kv_lora_rank: raw.kv_lora_rank,
            qk_nope_head_dim: raw.qk_nope_head_dim,
            qk_rope_head_dim: raw.qk_rope_head_dim,
            v_head_dim: raw.v_head_dim,
            n_routed_experts: raw.n_routed_experts,
            n_shared_experts: raw.n_shared_experts.unwrap_or(0),
            num_experts_per_tok: raw.num_experts_per_tok,
            n_group: raw.n_group.unwrap_or(1),
            topk_group: raw.topk_group.unwrap_or(1),
            routed_scaling_factor: raw.routed_scaling_factor.unwrap_or(1.0),
            norm_topk_prob: raw.norm_topk_prob.unwrap_or(true),
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(163840),
            num_nextn_predict_layers: raw.num_nextn_predict_layers.unwrap_or(0),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            index_n_heads: raw.index_n_heads.unwrap_or(defaults.n_heads),
            index_head_dim: raw.index_head_dim.unwrap_or(defaults.head_dim),
            index_topk: raw.index_topk.unwrap_or(defaults.topk),
            indexer_in_config,
        };
        if let Some(types) = &raw.mlp_layer_types {
            let dense = types.iter().take_while(|t| t.as_str() == "dense").count();
            if types.len() != cfg.num_hidden_layers
                || dense != cfg.first_k_dense_replace
                || types[dense..].iter().any(|t| t != "sparse")
            {
                bail!(
                    "mlp_layer_types {types:?} disagrees with first_k_dense_replace {} and num_hidden_layers {}",
                    cfg.first_k_dense_replace, cfg.num_hidden_layers
                );
            }
        }
        if raw.index_head_dim.is_some() != indexer_in_config
            || raw.index_topk.is_some() && !indexer_in_config
        {
            bail!("index_n_heads, index_head_dim and index_topk must be given together");
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Consistency checks; each failure names the field at fault.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("q_lora_rank", self.q_lora_rank),
            ("kv_lora_rank", self.kv_lora_rank),
            ("qk_nope_head_dim", self.qk_nope_head_dim),
            ("qk_rope_head_dim", self.qk_rope_head_dim),
            ("v_head_dim", self.v_head_dim),
            ("index_n_heads", self.index_n_heads),
            ("index_head_dim", self.index_head_dim),
            ("index_topk", self.index_topk),
            ("n_group", self.n_group),
            ("topk_group", self.topk_group),
        ];
        for (name, v) in positive {
            if v == 0 {
                bail!("{name} must be positive");
            }
        }
        if !self.qk_rope_head_dim.is_multiple_of(2) {
            bail!(
                "qk_rope_head_dim {} must be even (RoPE rotates pairs)",
                self.qk_rope_head_dim
            );
        }
        if self.index_head_dim < self.qk_rope_head_dim {
            bail!(
                "index_head_dim {} is smaller than qk_rope_head_dim {}; the indexer ropes its first qk_rope_head_dim dims",
                self.index_head_dim, self.qk_rope_head_dim
            );
        }
        if self.first_k_dense_replace > self.num_hidden_layers {
            bail!(
                "first_k_dense_replace {} exceeds num_hidden_layers {}",
                self.first_k_dense_replace,
                self.num_hidden_layers
            );
        }
        let has_moe = self.first_k_dense_replace < self.num_hidden_layers
            || self.num_nextn_predict_layers > 0;
        if has_moe {
            if self.n_routed_experts == 0 {
                bail!("n_routed_experts must be positive when MoE layers exist");
            }
            if !self.n_routed_experts.is_multiple_of(self.n_group) {
                bail!(
                    "n_routed_experts {} is not divisible by n_group {}",
                    self.n_routed_experts,
                    self.n_group
                );
            }
            if self.topk_group > self.n_group {
                bail!(
                    "topk_group {} exceeds n_group {}",
                    self.topk_group,
                    self.n_group
                );
            }
            let selectable = self.topk_group * (self.n_routed_experts / self.n_group);
            if self.num_experts_per_tok == 0 || self.num_experts_per_tok > selectable {
                bail!(
                    "num_experts_per_tok {} must be between 1 and topk_group * experts per group = {selectable}",
                    self.num_experts_per_tok
                );
            }
            if self.moe_intermediate_size == 0 {
                bail!("moe_intermediate_size must be positive");
            }
        }
        if self.first_k_dense_replace > 0 && self.intermediate_size == 0 {
            bail!("intermediate_size must be positive when dense MLP layers exist");
        }
        if !(self.rms_norm_eps > 0.0) {
            bail!("rms_norm_eps must be positive");
        }
        if !(self.rope_theta > 0.0) {
            bail!("rope_theta must be positive");
        }
        if let Some(y) = &self.rope_scaling {
            if !(y.factor > 0.0) || y.original_max_position_embeddings == 0 {
                bail!("rope_scaling needs a positive factor and original_max_position_embeddings");
            }
        }
        Ok(())
    }

    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Is layer `layer` (0-based; the MTP layer is `num_hidden_layers`) a MoE layer?
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        layer >= self.first_k_dense_replace
    }

    /// Attention softmax scale: qk_head_dim^-1/2, times mscale^2 under YaRN (as DeepSeek's reference code scales it).
    pub fn softmax_scale(&self) -> f64 {
        let base = (self.qk_head_dim() as f64).powf(-0.5);
        match &self.rope_scaling {
            Some(y) if y.mscale_all_dim != 0.0 => {
                let m = yarn_mscale(y.factor, y.mscale_all_dim);
                base * m * m
            }
            _ => base,
        }
    }
}

/// YaRN's attention temperature: 0.1 * mscale * ln(factor) + 1 for factor > 1.
pub fn yarn_mscale(factor: f64, mscale: f64) -> f64 {
    if factor <= 1.0 {
        1.0
    } else {
        0.1 * mscale * factor.ln() + 1.0
    }
}

fn parse_rope(raw: &RawConfig) -> Result<(f64, Option<YarnScaling>)> {
    let params = raw
        .rope_scaling
        .as_ref()
        .filter(|v| !v.is_null())
        .or(raw.rope_parameters.as_ref());
    let theta_in_params = raw
        .rope_parameters
        .as_ref()
        .and_then(|p| p.get("rope_theta"))
        .and_then(|v| v.as_f64());
    let theta = raw.rope_theta.or(theta_in_params).unwrap_or(10000.0);
    let Some(p) = params.filter(|p| !p.is_null()) else {
        return Ok((theta, None));
    };
    let kind = p
        .get("type")
        .or_else(|| p.get("rope_type"))
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    match kind {
        "default" => Ok((theta, None)),
        "yarn" => {
            let num = |key: &str, default: Option<f64>| -> Result<f64> {
                match p.get(key).filter(|v| !v.is_null()) {
                    Some(v) => v
                        .as_f64()
                        .with_context(|| format!("rope_scaling.{key} is not a number")),
                    None => default.with_context(|| format!("rope_scaling.{key} is missing")),
                }
            };
            Ok((
                theta,
                Some(YarnScaling {
                    factor: num("factor", None)?,
                    original_max_position_embeddings: num("original_max_position_embeddings", None)?
                        as usize,
                    beta_fast: num("beta_fast", Some(32.0))?,
                    beta_slow: num("beta_slow", Some(1.0))?,
                    mscale: num("mscale", Some(1.0))?,
                    mscale_all_dim: num("mscale_all_dim", Some(0.0))?,
                }),
            ))
        }
        other => bail!("rope_scaling type {other:?} is not supported; DeepSeek-V3 uses \"yarn\""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const V3_671B: &str = r#"{
        "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168,
        "num_hidden_layers": 61, "first_k_dense_replace": 3, "intermediate_size": 18432,
        "moe_intermediate_size": 2048, "num_attention_heads": 128, "q_lora_rank": 1536,
        "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8,
        "topk_group": 4, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid",
        "topk_method": "noaux_tc", "norm_topk_prob": true, "rms_norm_eps": 1e-6, "rope_theta": 10000,
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
          "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        "max_position_embeddings": 163840, "num_nextn_predict_layers": 1, "tie_word_embeddings": false
    }"#;

    #[test]
    fn the_671b_config_gives_the_papers_softmax_scale_and_default_indexer() {
        let c = ModelConfig::from_json(V3_671B, &IndexerDefaults::default()).unwrap();
        // 192^-0.5 * (0.1 ln 40 + 1)^2 = 0.1352338 (brief, section 1).
        assert!(
            (c.softmax_scale() - 0.1352338).abs() < 1e-6,
            "{}",
            c.softmax_scale()
        );
        assert_eq!(
            (c.index_n_heads, c.index_head_dim, c.index_topk),
            (64, 128, 2048)
        );
        assert!(!c.indexer_in_config);
        assert!(c.is_moe_layer(3) && !c.is_moe_layer(2));
    }

    #[test]
    fn indexer_fields_in_config_take_precedence_over_the_callers() {
        let text = V3_671B.replace(
            "\"deepseek_v3\",",
            "\"deepseek_v32\", \"index_n_heads\": 32, \"index_head_dim\": 96, \"index_topk\": 512,",
        );
        let c = ModelConfig::from_json(
            &text,
            &IndexerDefaults {
                n_heads: 1,
                head_dim: 64,
                topk: 2,
            },
        )
        .unwrap();
        assert_eq!(
            (c.index_n_heads, c.index_head_dim, c.index_topk),
            (32, 96, 512)
        );
        assert!(c.indexer_in_config);
    }

    #[test]
    fn rope_parameters_form_is_accepted() {
        let text = V3_671B.replace("\"rope_theta\": 10000,", "").replace(
            "\"rope_scaling\": {\"type\"",
            "\"rope_parameters\": {\"rope_theta\": 50000, \"rope_type\"",
        );
        let c = ModelConfig::from_json(&text, &IndexerDefaults::default()).unwrap();
        assert_eq!(c.rope_theta, 50000.0);
        assert_eq!(c.rope_scaling.as_ref().unwrap().factor, 40.0);
    }

    #[test]
    fn inconsistent_configs_are_rejected_naming_the_field() {
        let cases = [
            ("\"n_group\": 8", "\"n_group\": 7", "n_group"),
            ("\"topk_group\": 4", "\"topk_group\": 9", "topk_group"),
            (
                "\"qk_rope_head_dim\": 64",
                "\"qk_rope_head_dim\": 63",
                "qk_rope_head_dim",
            ),
            (
                "\"num_experts_per_tok\": 8",
                "\"num_experts_per_tok\": 200",
                "num_experts_per_tok",
            ),
            (
                "\"first_k_dense_replace\": 3",
                "\"first_k_dense_replace\": 62",
                "first_k_dense_replace",
            ),
            (
                "\"scoring_func\": \"sigmoid\"",
                "\"scoring_func\": \"softmax\"",
                "scoring_func",
            ),
            ("\"deepseek_v3\"", "\"llama\"", "model_type"),
            (
                "\"q_lora_rank\": 1536",
                "\"q_lora_rank\": null",
                "q_lora_rank",
            ),
            ("\"hidden_size\": 7168,", "", "hidden_size"),
            (
                "\"type\": \"yarn\"",
                "\"type\": \"dynamic\"",
                "rope_scaling",
            ),
        ];
        for (from, to, field) in cases {
            let text = V3_671B.replace(from, to);
            assert_ne!(text, V3_671B, "{from}");
            let err = ModelConfig::from_json(&text, &IndexerDefaults::default()).unwrap_err();
            assert!(format!("{err:#}").contains(field), "{field}: {err:#}");
        }
        let small_indexer = IndexerDefaults {
            n_heads: 4,
            head_dim: 32,
            topk: 8,
        };
        let err = ModelConfig::from_json(V3_671B, &small_indexer).unwrap_err();
        assert!(format!("{err:#}").contains("index_head_dim"), "{err:#}");
    }
}
