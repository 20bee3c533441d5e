//! `dsa-train init`: the random starting checkpoint of a model trained from scratch (the
//! dense pre-training stage), from any DeepSeek-V3-style config.json.
//!
//! Initialisation (what DeepSeek-V3's and transformers' code do for these modules): every
//! projection, the embedding, the head and the router drawn from N(0, initializer_range^2)
//! (config.json's value, 0.02 when absent); RMSNorm weights 1; LayerNorm biases and the router's
//! correction biases 0. Stored in DeepSeek's formats (FP8 with 128 x 128 block scales for the
//! main projections), as the trainer reads any V3 checkpoint; MTP layers included when the
//! config has them.

use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::rng::SplitMix64;
use crate::weights::{Kind, WeightSpec};

fn init_values(std: f64) -> impl Fn(&WeightSpec, &mut SplitMix64) -> Vec<f32> {
    move |spec: &WeightSpec, rng: &mut SplitMix64| {
        let n: usize = spec.shape.iter().product();
        match spec.kind {
            Kind::Norm => vec![1.0; n],
            Kind::NormBias | Kind::RouterBias => vec![0.0; n],
            Kind::Embedding | Kind::Linear | Kind::Head | Kind::Router => rng.normal_vec(n, std),
        }
    }
}

/// Write the initial checkpoint for `config_path` into `output` (which must not exist or be
/// empty); returns the parameter count.
pub fn write_initial_checkpoint(config_path: &Path, output: &Path, seed: u64) -> Result<usize> {
    let text = std::fs::read_to_string(config_path)
        .with_context(|| format!("cannot read {}", config_path.display()))?;
    let config: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: not valid JSON: {e}", config_path.display()))?;
    let cfg =
        crate::config::ModelConfig::from_json(&text, &crate::config::IndexerDefaults::default())
            .with_context(|| format!("{}", config_path.display()))?;
    if output.exists()
        && std::fs::read_dir(output)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        bail!(
            "--output {}: exists and is not empty; init writes only into a new folder",
            output.display()
        );
    }
    let std = config
        .get("initializer_range")
        .and_then(|v| v.as_f64())
        .unwrap_or(0.02);
    if !(std > 0.0 && std.is_finite()) {
        bail!(
            "{}: initializer_range = {std} must be a positive number",
            config_path.display()
        );
    }
    let params: usize = crate::weights::model_weights(&cfg, true)
        .iter()
        .filter(|s| !s.indexer || cfg.indexer_in_config)
        .map(|s| s.shape.iter().product::<usize>())
        .sum();
    crate::tiny::write_checkpoint_of(output, &config, seed, 4 << 30, init_values(std))?;
    Ok(params)
}
