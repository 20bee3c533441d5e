//! Training recipes: TOML files, one section per component.
//!
//! Every key has a default except `run.output_dir`, `model.path` and `data.path`. Unknown keys
//! are rejected with the nearest valid key; `--set section.key=value` overrides a key but may
//! not change its type (an integer is accepted where a float is expected). The schema is the
//! default recipe itself, so adding a field to a struct is all it takes to accept a new key.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[derive(Default)]
pub struct Recipe {
    pub run: RunConfig,
    pub model: ModelSection,
    pub data: DataConfig,
    pub train: TrainConfig,
    pub dsa: DsaConfig,
    pub checkpoint: CheckpointConfig,
    pub parallel: ParallelConfig,
    pub kernels: KernelsConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// Checkpoints, metrics.jsonl and the resolved recipe go here.
    pub output_dir: String,
    pub seed: u64,
    /// Show the progress bar (metrics.jsonl is always written).
    pub progress: bool,
    /// Also write the metrics as TensorBoard scalars to `<output_dir>/tensorboard/`.
    pub tensorboard: bool,
    /// Print a log line (time, ms/step, tokens/s, FLOP/s, memory, expert load) every N steps
    /// when stderr is not a terminal, and at step 1; 0 = about 20 lines a run.
    pub log_every: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSection {
    /// A Hugging Face checkpoint directory or a `step-N` checkpoint of an earlier run.
    pub path: String,
    /// Compute dtype: "f32" or "bf16" (master weights and Adam moments are always f32).
    pub dtype: String,
    /// "cpu", "cuda" or "cuda:N".
    pub device: String,
    /// Seed of the deterministic indexer initialisation (a checkpoint without an indexer).
    pub init_seed: u64,
    /// Load and train the MTP layer(s) when the checkpoint has them.
    pub mtp: bool,
    /// Keep the frozen weights the checkpoint stores in FP8 in FP8 on the device (one byte a
    /// value instead of two) and dequantise a layer's when it runs: the same values, bit for
    /// bit. Only the warm-up freezes the main model.
    pub frozen_fp8: bool,
    /// With `frozen_fp8`: those FP8 weights wait in host memory and a layer's are copied to the
    /// device when it runs (one copy per layer and micro-batch; the device holds one layer).
    pub frozen_fp8_offload: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// Raw little-endian u32 token file, a prepared data directory or a Megatron indexed
    /// dataset. Empty when `blend` lists the corpora instead.
    pub path: String,
    pub seq_len: usize,
    /// A blend instead of one corpus: `[[data.blend]]` tables of `path` and `weight` (each
    /// source's share of the windows; data/blend.rs).
    pub blend: Vec<crate::data::BlendSource>,
    /// Document masking: inside a packed window a query sees only the keys of its own
    /// document (attention, the indexer's top-k and both KL targets), and RoPE counts
    /// positions from its document's first token. A document starts after each `eos_id`.
    pub document_mask: bool,
    /// The token that ends a document; default: the prepared data's index.json `eos_id`.
    /// Raw token files and Megatron datasets carry none: set it for them.
    pub eos_id: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// "warmup" (dense attention, only the indexer learns), "sparse", or "dense" (pre-training
    /// from scratch: dense attention, LM loss, the indexer unused).
    pub stage: Stage,
    pub steps: u64,
    pub lr: f64,
    /// Learning rate of the indexer; 0 means the same as `lr`.
    pub indexer_lr: f64,
    pub global_batch_seqs: usize,
    pub micro_batch_seqs: usize,
    /// Linear warm-up steps from 0 to `lr`.
    pub warmup_steps: u64,
    /// "constant" or "cosine" (to `min_lr` at `steps`) after the warm-up.
    pub schedule: Schedule,
    pub min_lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay; never applied to norms, biases or the router bias.
    pub weight_decay: f64,
    /// Global-norm clip per parameter group (main model, indexer); 0 disables.
    pub grad_clip: f64,
    /// Router-bias update speed of the auxiliary-loss-free balancing (sign rule); 0 = off.
    pub router_bias_gamma: f64,
    /// Weight of the sequence-wise balance loss; 0 = off.
    pub seq_balance_alpha: f64,
    /// Weight of the MTP loss in the sparse stage; 0 = MTP not trained.
    pub mtp_weight: f64,
    /// Weight of the indexer KL in the sparse stage (it reaches only the indexer).
    pub kl_weight: f64,
    /// Sparse and dense stages: keep only each layer's input during the forward and recompute
    /// the layer in its backward (activation memory of one layer instead of all of them);
    /// false keeps what each layer's backward reads (no forward work twice, about what
    /// autograd would keep). Either way the layers' backward is written out (`model::blocks`).
    pub recompute: bool,
    /// Sparse stage with `recompute`: run each layer `block_rows` queries at a time in both
    /// passes (the attention of a block reads the sequence's shared latent kv; everything else
    /// is per token), so one layer's working set is that of `block_rows` tokens; 0 = the whole
    /// sequence at once. Warm-up: each layer's norm and feed-forward after the attention run
    /// `block_rows` tokens at a time (the attention and the KL stay whole-sequence).
    pub block_rows: usize,
    /// With `recompute`: keep the layer inputs and selected sets between the two passes in
    /// host memory (moved back one layer at a time), not on the device.
    pub offload_activations: bool,
    /// Token positions per LM-head chunk (logits and cross-entropy are computed and
    /// backpropagated one chunk at a time); 0 = about 2^27 logits per chunk.
    pub lm_head_chunk: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DsaConfig {
    /// Keys per query in the sparse stage (and for the warm-up's recall metric). It selects
    /// even where a V3.2 config.json carries another (the run's steps then export this one).
    pub index_topk: usize,
    /// The indexer's heads and head dim. 0: config.json's (a V3.2 checkpoint), or V3.2-Exp's
    /// 64 x 128 where config.json has none (V3.1-Terminus, whose indexer is initialised from
    /// `model.init_seed`). A value that contradicts config.json is an error naming both.
    pub index_n_heads: usize,
    pub index_head_dim: usize,
    /// How the selection scores keys: "bf16" (q_I and k_I as computed: bf16 products on the
    /// tensor cores of bf16 CUDA models, f32 elsewhere) or "fp8" (Hadamard-rotated e4m3 rows
    /// with power-of-two scales, as DeepSeek's deployed indexer; `model::fp8_scores`). The
    /// indexer's KL keeps its unrounded scores either way.
    pub indexer_scores: String,
}

/// How the job's ranks divide the work (validated against the world size at start-up, the
/// way torchtitan's ParallelDims does): world = dp x cp. Tensor and pipeline parallelism are not
/// built (`parallel.tp` / `parallel.pp` other than 1 are refused by name).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ParallelConfig {
    /// Data-parallel replicas (each draws its own sequences); 0 = the world size / cp.
    pub dp: usize,
    /// Context-parallel ranks per sequence: cp consecutive ranks split each sequence by query
    /// rows (load-balanced for the causal mask) and all-gather each layer's latent kv rows and
    /// indexer keys. Every stage: the warm-up, and the dense and sparse stages with
    /// `train.recompute`.
    pub cp: usize,
    /// Expert-parallel ranks: routed experts are split into ep contiguous ranges over ep
    /// consecutive ranks; ep divides the world (dp x cp).
    pub ep: usize,
    /// ZeRO stage over every rank (dp x cp; each holds a share of the gradient sums): 1 shards the f32 master weights and Adam
    /// moments (every rank still accumulates every gradient); 2 also shards the gradients:
    /// each layer's gradients are summed onto their owner rank as soon as its backward has
    /// run, and the other ranks free them; 3 also shards the decoder layers' weights: each rank
    /// holds the rows it owns (of the trainable tensors, their f32 masters; in the warm-up, of
    /// the frozen FP8 weights, `model.frozen_fp8`) and a layer's are gathered when it runs.
    pub zero: usize,
    /// Round the rows the MoE layers hand their routed experts to FP8 e4m3 with one scale per
    /// row (`model::dispatch`): under expert parallelism half the bytes out; at every ep the
    /// same values (the rounding is the run's, not the layout's). Trains through the explicit
    /// backward (`train.recompute = true`) in the dense and sparse stages.
    pub fp8_dispatch: bool,
}

impl Default for ParallelConfig {
    fn default() -> Self {
        Self {
            dp: 0,
            cp: 1,
            ep: 1,
            zero: 1,
            fp8_dispatch: false,
        }
    }
}

/// The parallel layout of a job, resolved against its world size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub world: usize,
    /// Data-parallel replicas: groups of cp ranks that draw the same sequences.
    pub dp: usize,
    /// Context-parallel ranks per sequence.
    pub cp: usize,
    pub ep: usize,
    /// ZeRO stage (1, 2 or 3).
    pub zero: usize,
}

impl Layout {
    /// The expert-parallel group of `rank`: ep consecutive ranks, which between them hold every
    /// routed expert and exchange token rows (under context parallelism they may hold rows of
    /// the same sequences or of others: every rank runs the same blocks, so their exchanges
    /// pair up either way).
    pub fn expert_group(&self, rank: usize) -> Vec<usize> {
        let first = rank / self.ep * self.ep;
        (first..first + self.ep).collect()
    }

    /// The ranks holding the same experts as `rank` (one per expert group): expert gradients
    /// are summed over them and their optimizer state is sharded over them.
    pub fn expert_replicas(&self, rank: usize) -> Vec<usize> {
        (rank % self.ep..self.world).step_by(self.ep).collect()
    }

    /// The context group of `rank`: cp consecutive ranks, which split the same sequences.
    pub fn context_group(&self, rank: usize) -> Vec<usize> {
        let first = rank / self.cp * self.cp;
        (first..first + self.cp).collect()
    }

    /// The data-parallel replica `rank` belongs to (which micro-batches it computes).
    pub fn replica(&self, rank: usize) -> usize {
        rank / self.cp
    }
}

impl ParallelConfig {
    /// The world `check` assumes without a launcher: dp x cp when dp is set; else the
    /// smallest multiple of cp and ep whose dp (world / cp) divides the `micro_batches` of a
    /// step (else that least common multiple).
    pub fn smallest_world(&self, micro_batches: usize) -> usize {
        let (ep, cp) = (self.ep.max(1), self.cp.max(1));
        if self.dp > 0 {
            return self.dp * cp;
        }
        let lcm = (1..=ep)
            .map(|k| k * cp)
            .find(|w| w.is_multiple_of(ep))
            .unwrap_or(ep * cp);
        (1..=micro_batches.max(1))
            .map(|k| k * lcm)
            .find(|w| micro_batches.is_multiple_of(w / cp))
            .unwrap_or(lcm)
    }

    /// Resolve against `world` ranks; errors name the keys and the numbers.
    pub fn layout(&self, world: usize) -> Result<Layout> {
        if world == 0 {
            bail!("a job of 0 ranks: the world size must be at least 1");
        }
        if !(1..=3).contains(&self.zero) {
            bail!("parallel.zero = {}: the ZeRO stages built are 1 (optimizer state sharded), 2 (gradients too) and 3 (the warm-up's frozen FP8 weights too)", self.zero);
        }
        let cp = self.cp;
        if cp == 0 || !world.is_multiple_of(cp) {
            bail!("parallel.cp = {cp} must divide the job's {world} rank(s)");
        }
        let dp = if self.dp == 0 { world / cp } else { self.dp };
        if dp * cp != world {
            bail!("parallel.dp ({dp}) x parallel.cp ({cp}) but the job has {world} rank(s)");
        }
        if self.ep == 0 || !world.is_multiple_of(self.ep) {
            bail!(
                "parallel.ep ({}) must divide the job's {world} rank(s) (parallel.dp x parallel.cp)",
                self.ep
            );
        }
        Ok(Layout {
            world,
            dp,
            cp,
            ep: self.ep,
            zero: self.zero,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Save every N steps (and at the end, and on SIGINT/SIGTERM); 0 = only at the end.
    pub every: u64,
    /// Keep the newest N complete checkpoints; 0 = keep all.
    pub keep_last: usize,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            output_dir: String::new(),
            seed: 0,
            progress: true,
            tensorboard: true,
            log_every: 0,
        }
    }
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            path: String::new(),
            // CPU and f32 by default so that a recipe runs on any build; GPU recipes say so.
            dtype: "f32".into(),
            device: "cpu".into(),
            init_seed: 0,
            mtp: true,
            frozen_fp8: false,
            frozen_fp8_offload: false,
        }
    }
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            path: String::new(),
            seq_len: 131072,
            blend: Vec::new(),
            document_mask: false,
            eos_id: None,
        }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            stage: Stage::Warmup,
            steps: 1000,
            lr: 1e-3,
            indexer_lr: 0.0,
            global_batch_seqs: 16,
            micro_batch_seqs: 1,
            warmup_steps: 0,
            schedule: Schedule::Constant,
            min_lr: 0.0,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            grad_clip: 1.0,
            router_bias_gamma: 0.0,
            seq_balance_alpha: 0.0,
            mtp_weight: 0.0,
            kl_weight: 1.0,
            recompute: true,
            block_rows: 0,
            offload_activations: false,
            lm_head_chunk: 0,
        }
    }
}

/// Which custom kernels run (`kernels::KernelPolicy`): by default every kernel where it can
/// run. For side-by-side measurements of one binary and for runs that must repeat bit for bit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct KernelsConfig {
    /// The plain twins (candle ops) everywhere.
    pub plain: bool,
    /// Fused ops that take their plain twins while the others stay on (`kernels::Fused`'s
    /// names: indexer-at, lm-loss, adamw, rms-norm, rope, sparse-wg, ...).
    pub plain_ops: Vec<String>,
    /// Kernels off by default that run where named (`kernels::Fused::OPT_IN`: built, their GPU
    /// checks not yet passed on a GPU): sparse-merge-queries.
    pub opt_in: Vec<String>,
    /// The sparse MLA backward sums dkv in a fixed order (bit-identical runs, about twice its
    /// time) instead of with f32 atomics.
    pub deterministic: bool,
    /// cuBLAS may run f32 matrix products on tensor cores (TF32: inputs rounded to 10
    /// mantissa bits, f32 sums); for bf16 models only, never for runs that must match the CPU.
    pub tf32: bool,
}

impl Default for DsaConfig {
    fn default() -> Self {
        Self {
            index_topk: 2048,
            index_n_heads: 0,
            index_head_dim: 0,
            indexer_scores: "bf16".into(),
        }
    }
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            every: 100,
            keep_last: 3,
        }
    }
}

/// The learning-rate schedule after the linear warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    /// Cosine decay to `train.min_lr` at `train.steps`.
    Cosine,
}

/// The words a recipe may use for its enum keys (checked on the parsed tree, so that a wrong
/// word is an error naming the key).
const ENUM_KEYS: [(&str, &str, &[&str]); 2] = [
    ("train", "stage", &["warmup", "sparse", "dense"]),
    ("train", "schedule", &["constant", "cosine"]),
];

fn check_enum_words(tree: &Value) -> Result<()> {
    for (section, key, words) in ENUM_KEYS {
        if let Some(v) = tree.get(section).and_then(|s| s.get(key)) {
            if !v.as_str().is_some_and(|w| words.contains(&w)) {
                let expected: Vec<String> = words.iter().map(|w| format!("\"{w}\"")).collect();
                bail!("{section}.{key} is {v}; expected {}", expected.join(", "));
            }
        }
    }
    Ok(())
}

/// The training stage, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Warmup,
    Sparse,
    Dense,
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Stage {
    /// The recipe's word for it.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Warmup => "warmup",
            Stage::Sparse => "sparse",
            Stage::Dense => "dense",
        }
    }

    /// Does this stage train tensor `s` by gradient? (The router biases move by the balancing
    /// rule instead, in the stages that train the main model.)
    pub fn trains(self, s: &crate::weights::WeightSpec) -> bool {
        use crate::weights::Kind;
        match self {
            Stage::Warmup => s.indexer,
            Stage::Sparse => s.kind != Kind::RouterBias,
            Stage::Dense => !s.indexer && s.kind != Kind::RouterBias,
        }
    }

    /// Does this stage train the main model (LM loss, router-bias balancing)?
    pub fn trains_main(self) -> bool {
        self != Stage::Warmup
    }
}

impl Recipe {
    /// Read a recipe file, apply `--set` overrides, validate. Errors name the file and key.
    pub fn load(path: &Path, sets: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read recipe {}", path.display()))?;
        Self::parse(&text, sets).with_context(|| format!("recipe {}", path.display()))
    }

    pub fn parse(text: &str, sets: &[String]) -> Result<Self> {
        let toml_value: toml::Value =
            toml::from_str(text).map_err(|e| anyhow::anyhow!("bad TOML: {}", e.message()))?;
        reject_non_finite(&toml_value, "")?;
        let mut tree = serde_json::to_value(&toml_value)?;
        let schema = serde_json::to_value(Recipe::default())?;
        drop_not_built(&mut tree)?;
        move_indexer_shape(&mut tree)?;
        check_keys(&tree, &schema, "")?;
        for set in sets {
            if let Some(old) = INDEXER_SHAPE
                .iter()
                .find(|k| set.trim_start().starts_with(&format!("model.{k}")))
            {
                bail!("--set model.{old}: the indexer's shape lives in [dsa]; use dsa.{old}");
            }
            if !not_built_set(set)? {
                apply_set(&mut tree, &schema, set)?;
            }
        }
        check_enum_words(&tree)?;
        let recipe: Recipe = serde_json::from_value(tree).map_err(|e| anyhow::anyhow!("{e}"))?;
        recipe.validate()?;
        Ok(recipe)
    }

    pub fn stage(&self) -> Stage {
        self.train.stage
    }

    /// The resolved recipe as TOML (stored in every checkpoint).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a recipe always serialises")
    }

    pub fn micro_batches(&self) -> usize {
        self.train.global_batch_seqs / self.train.micro_batch_seqs
    }

    /// `dsa.indexer_scores` (an unknown name is an error naming the key and the choices).
    pub fn selection_scores(&self) -> Result<crate::model::fp8_scores::SelectionScores> {
        use crate::model::fp8_scores::SelectionScores;
        SelectionScores::parse(&self.dsa.indexer_scores).ok_or_else(|| {
            anyhow::anyhow!(
                "dsa.indexer_scores = \"{}\": one of {}",
                self.dsa.indexer_scores,
                SelectionScores::NAMES.join(", ")
            )
        })
    }

    /// The kernel policy of `[kernels]` (an unknown op name is an error naming the key).
    pub fn kernel_policy(&self) -> Result<crate::kernels::KernelPolicy> {
        crate::kernels::KernelPolicy::from_recipe(
            self.kernels.plain,
            &self.kernels.plain_ops,
            &self.kernels.opt_in,
            self.kernels.deterministic,
        )
    }

    /// What fills the indexer's shape and k in where config.json has none.
    pub fn indexer_defaults(&self) -> crate::config::IndexerDefaults {
        let v32 = crate::config::IndexerDefaults::default();
        let or = |v: usize, d: usize| if v == 0 { d } else { v };
        crate::config::IndexerDefaults {
            n_heads: or(self.dsa.index_n_heads, v32.n_heads),
            head_dim: or(self.dsa.index_head_dim, v32.head_dim),
            topk: self.dsa.index_topk,
        }
    }

    /// `<hf_dir>/config.json` read with this recipe's indexer settings: the shape from
    /// config.json where it has one (a recipe value that differs is an error naming both), else
    /// `indexer_defaults`. k is config.json's where it has one (the trainer then selects with
    /// `dsa.index_topk` and says so), else the recipe's.
    pub fn model_config(&self, hf_dir: &Path) -> Result<crate::config::ModelConfig> {
        let cfg = crate::config::ModelConfig::from_dir(hf_dir, &self.indexer_defaults())?;
        if cfg.indexer_in_config {
            for (key, ours, theirs) in [
                ("index_n_heads", self.dsa.index_n_heads, cfg.index_n_heads),
                (
                    "index_head_dim",
                    self.dsa.index_head_dim,
                    cfg.index_head_dim,
                ),
            ] {
                if ours != 0 && ours != theirs {
                    bail!(
                        "dsa.{key} = {ours} contradicts {}/config.json's {key} {theirs}: the checkpoint's indexer has that shape; remove dsa.{key} or make them agree",
                        hf_dir.display()
                    );
                }
            }
        }
        Ok(cfg)
    }

    pub fn indexer_lr(&self) -> f64 {
        if self.train.indexer_lr > 0.0 {
            self.train.indexer_lr
        } else {
            self.train.lr
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        self.kernel_policy()?;
        for (key, v) in [
            ("run.output_dir", &self.run.output_dir),
            ("model.path", &self.model.path),
        ] {
            if v.is_empty() {
                bail!("{key} must be set");
            }
        }
        match (self.data.path.is_empty(), self.data.blend.is_empty()) {
            (true, true) => bail!("data.path must be set (or data.blend list the corpora)"),
            (false, false) => bail!(
                "data.path = {:?} and data.blend are both set: one corpus or a blend, not both",
                self.data.path
            ),
            _ => {}
        }
        for (i, b) in self.data.blend.iter().enumerate() {
            if b.path.is_empty() {
                bail!("data.blend[{i}].path must be set");
            }
            if !(b.weight.is_finite() && b.weight > 0.0) {
                bail!(
                    "data.blend[{i}].weight = {} must be a positive number",
                    b.weight
                );
            }
        }
        crate::parse_dtype(&self.model.dtype).map_err(|_| {
            anyhow::anyhow!(
                "model.dtype is {:?}; expected \"f32\" or \"bf16\"",
                self.model.dtype
            )
        })?;
        if !(self.model.device == "cpu"
            || self.model.device == "cuda"
            || self.model.device.starts_with("cuda:"))
        {
            bail!(
                "model.device is {:?}; expected \"cpu\", \"cuda\" or \"cuda:N\"",
                self.model.device
            );
        }
        let t = &self.train;
        if t.micro_batch_seqs == 0
            || t.global_batch_seqs == 0
            || !t.global_batch_seqs.is_multiple_of(t.micro_batch_seqs)
        {
            bail!(
                "train.global_batch_seqs ({}) must be a positive multiple of train.micro_batch_seqs ({})",
                t.global_batch_seqs, t.micro_batch_seqs
            );
        }
        if self.data.seq_len < 2 {
            bail!("data.seq_len must be at least 2");
        }
        if self.dsa.index_topk == 0 {
            bail!("dsa.index_topk must be positive");
        }
        self.selection_scores()?;
        for (key, v) in [
            ("train.lr", t.lr),
            ("train.beta1", t.beta1),
            ("train.beta2", t.beta2),
            ("train.eps", t.eps),
        ] {
            if !(v > 0.0) || !v.is_finite() {
                bail!("{key} must be a positive number");
            }
        }
        if t.offload_activations && !t.recompute {
            bail!("train.offload_activations works on the recomputing backward: set train.recompute = true");
        }
        if t.block_rows > 0 && t.stage == Stage::Sparse && !t.recompute {
            bail!("train.block_rows works on the sparse stage's recomputing backward: set train.recompute = true");
        }
        if self.model.frozen_fp8_offload && !self.model.frozen_fp8 {
            bail!("model.frozen_fp8_offload = true keeps the frozen FP8 weights in host memory: it needs model.frozen_fp8 = true");
        }
        if self.parallel.zero == 3 && t.stage == Stage::Warmup && !self.model.frozen_fp8 {
            bail!("parallel.zero = 3 in the warm-up shards the frozen main model as the checkpoint stores it: set model.frozen_fp8 = true, or parallel.zero = 2 to shard the optimizer state and gradients only");
        }
        if self.parallel.zero == 3 && t.stage != Stage::Warmup && !t.recompute {
            bail!("parallel.zero = 3 gathers each layer's weights when it runs, for the first pass and again for the written-out backward that recomputes it: set train.recompute = true");
        }
        if self.model.frozen_fp8 && t.stage != Stage::Warmup {
            bail!("model.frozen_fp8 = true keeps frozen weights in FP8, and only the warm-up freezes the main model: set train.stage = \"warmup\" or model.frozen_fp8 = false");
        }
        if t.block_rows > 0 && t.stage == Stage::Dense {
            bail!("train.block_rows = {}: the dense stage has no block mode (its attention is flash-style already); set it to 0", t.block_rows);
        }
        if t.beta1 >= 1.0 || t.beta2 >= 1.0 {
            bail!("train.beta1 and train.beta2 must be below 1");
        }
        for (key, v) in [
            ("train.indexer_lr", t.indexer_lr),
            ("train.min_lr", t.min_lr),
            ("train.weight_decay", t.weight_decay),
            ("train.grad_clip", t.grad_clip),
            ("train.router_bias_gamma", t.router_bias_gamma),
            ("train.seq_balance_alpha", t.seq_balance_alpha),
            ("train.mtp_weight", t.mtp_weight),
            ("train.kl_weight", t.kl_weight),
        ] {
            if !(v >= 0.0) || !v.is_finite() {
                bail!("{key} must be zero or positive");
            }
        }
        if t.steps == 0 {
            bail!("train.steps must be positive");
        }
        Ok(())
    }
}

/// The keys a resumed run may change: the length of the run, the learning-rate schedule and
/// optimizer settings, loss weights, memory strategies (recompute, blocks, offload, LM-head
/// chunks: the same gradients up to the order of f32 sums; frozen weights held in FP8: the same
/// values), checkpointing, logging, the device,
/// the output folder (a resume into a new folder forks the run) and the data- and
/// expert-parallel layout (checkpoints re-shard). Every other key changes what the saved state
/// means (which model, which data in which order, which tensors and shapes), and a resume that
/// changes one is refused. A key added later is refused until it is listed here.
pub const MAY_CHANGE_ON_RESUME: &[&str] = &[
    "run.output_dir",
    "run.progress",
    "run.tensorboard",
    "model.device",
    "model.frozen_fp8",
    "model.frozen_fp8_offload",
    "train.steps",
    "train.lr",
    "train.indexer_lr",
    "train.warmup_steps",
    "train.schedule",
    "train.min_lr",
    "train.beta1",
    "train.beta2",
    "train.eps",
    "train.weight_decay",
    "train.grad_clip",
    "train.router_bias_gamma",
    "train.seq_balance_alpha",
    "train.mtp_weight",
    "train.kl_weight",
    "train.recompute",
    "train.block_rows",
    "train.offload_activations",
    "train.lm_head_chunk",
    "checkpoint.every",
    "checkpoint.keep_last",
    "parallel.dp",
    "parallel.cp",
    "parallel.ep",
    "parallel.zero",
];

impl Recipe {
    /// What resuming a checkpoint written under `saved` with `self` would change among the
    /// keys that may not change: `key: old -> new` for each, in key order. Paths compare as
    /// resolved places (`paths::resolved`; `train` stores them resolved, so a relative path in a
    /// checkpoint's recipe comes only from an older build).
    pub fn resume_changes(&self, saved: &Recipe) -> Vec<String> {
        let flat = |r: &Recipe| -> std::collections::BTreeMap<String, Value> {
            let mut r = r.clone();
            for p in [&mut r.model.path, &mut r.data.path]
                .into_iter()
                .chain(r.data.blend.iter_mut().map(|b| &mut b.path))
                .filter(|p| !p.is_empty())
            {
                *p = crate::paths::resolved(Path::new(p.as_str()))
                    .to_string_lossy()
                    .into_owned();
            }
            let tree = serde_json::to_value(&r).expect("a recipe always serialises");
            let mut out = std::collections::BTreeMap::new();
            for (section, keys) in tree.as_object().into_iter().flatten() {
                for (k, v) in keys.as_object().into_iter().flatten() {
                    out.insert(format!("{section}.{k}"), v.clone());
                }
            }
            out
        };
        let (old, new) = (flat(saved), flat(self));
        new.iter()
            .filter(|(k, v)| !MAY_CHANGE_ON_RESUME.contains(&k.as_str()) && old.get(*k) != Some(*v))
            .map(|(k, v)| {
                format!(
                    "{k}: {} -> {v}",
                    old.get(k).map_or("(absent)".to_string(), |o| o.to_string())
                )
            })
            .collect()
    }
}

/// Parallelism that is named but not built: such a key is refused unless it asks for one rank
/// (the recipes of older builds wrote `tp = 1` and `pp = 1`, which are dropped).
const NOT_BUILT: [(&str, &str); 2] = [("tp", "tensor parallelism"), ("pp", "pipeline parallelism")];

fn not_built(key: &str, value: &Value) -> Result<()> {
    let what = NOT_BUILT
        .iter()
        .find(|(k, _)| *k == key)
        .map_or("this parallelism", |(_, w)| *w);
    if value.as_i64() == Some(1) {
        return Ok(());
    }
    bail!("parallel.{key} = {value}: {what} is not built (the layout keys are parallel.dp, parallel.cp, parallel.ep and parallel.zero)")
}

/// Remove `parallel.tp` / `parallel.pp` of 1 from a recipe tree; refuse any other value.
fn drop_not_built(tree: &mut Value) -> Result<()> {
    if let Some(par) = tree.get_mut("parallel").and_then(Value::as_object_mut) {
        for (key, _) in NOT_BUILT {
            if let Some(v) = par.remove(key) {
                not_built(key, &v)?;
            }
        }
    }
    Ok(())
}

/// The indexer-shape keys that older recipes (and the recipe.toml of older checkpoints) have
/// under [model]; they live in [dsa].
const INDEXER_SHAPE: [&str; 2] = ["index_n_heads", "index_head_dim"];

/// Move `model.index_n_heads` / `model.index_head_dim` of an older recipe to [dsa]; both
/// places with different values is an error naming them.
fn move_indexer_shape(tree: &mut Value) -> Result<()> {
    for key in INDEXER_SHAPE {
        let Some(v) = tree
            .get_mut("model")
            .and_then(Value::as_object_mut)
            .and_then(|m| m.remove(key))
        else {
            continue;
        };
        let dsa = tree
            .as_object_mut()
            .context("recipe root must be a table")?
            .entry("dsa")
            .or_insert_with(|| Value::Object(Default::default()))
            .as_object_mut()
            .context("[dsa] must be a table")?;
        match dsa.get(key) {
            Some(d) if *d != v => {
                bail!("model.{key} = {v} and dsa.{key} = {d}: the indexer's shape lives in [dsa] alone")
            }
            _ => {
                dsa.insert(key.to_string(), v);
            }
        }
    }
    Ok(())
}

/// Whether `--set` names `parallel.tp` / `parallel.pp` (true: handled, nothing to apply).
fn not_built_set(set: &str) -> Result<bool> {
    let Some((key, raw)) = set.split_once('=') else {
        return Ok(false);
    };
    let Some(name) = key.trim().strip_prefix("parallel.") else {
        return Ok(false);
    };
    if !NOT_BUILT.iter().any(|(k, _)| *k == name) {
        return Ok(false);
    }
    let value = raw
        .trim()
        .parse::<i64>()
        .map(Value::from)
        .unwrap_or_else(|_| Value::String(raw.trim().to_string()));
    not_built(name, &value)?;
    Ok(true)
}

/// Reject keys the schema does not have, suggesting the nearest sibling.
fn check_keys(tree: &Value, schema: &Value, prefix: &str) -> Result<()> {
    let (Some(obj), Some(sch)) = (tree.as_object(), schema.as_object()) else {
        return Ok(());
    };
    for (k, v) in obj {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match sch.get(k) {
            None => bail!("unknown key `{path}`{}", suggestion(k, sch.keys(), prefix)),
            Some(s) if s.is_object() && !v.is_object() => {
                bail!("`{path}` must be a section ([{path}])")
            }
            Some(s) if !s.is_object() && !type_ok(s, v) => {
                bail!("`{path}` must be {}, got {}", type_name(s), type_name(v))
            }
            Some(s) => check_keys(v, s, &path)?,
        }
    }
    Ok(())
}

fn suggestion<'a>(key: &str, candidates: impl Iterator<Item = &'a String>, prefix: &str) -> String {
    let best = candidates.map(|c| (edit_distance(key, c), c)).min();
    match best {
        Some((d, c)) if d <= key.len().max(3) / 2 + 1 => {
            if prefix.is_empty() {
                format!("; did you mean `{c}`?")
            } else {
                format!("; did you mean `{prefix}.{c}`?")
            }
        }
        _ => String::new(),
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            cur.push(
                (prev[j] + (ca != *cb) as usize)
                    .min(prev[j + 1] + 1)
                    .min(cur[j] + 1),
            );
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Apply one `section.key=value` override; the value is parsed as a TOML literal (bare words
/// are strings) and must have the key's type.
fn apply_set(tree: &mut Value, schema: &Value, set: &str) -> Result<()> {
    let (key, raw) = set
        .split_once('=')
        .with_context(|| format!("--set {set}: expected section.key=value"))?;
    let key = key.trim();
    let parts: Vec<&str> = key.split('.').collect();
    let mut sch = schema;
    for (i, p) in parts.iter().enumerate() {
        let prefix = parts[..i].join(".");
        sch = sch.get(p).with_context(|| {
            format!(
                "--set {key}: unknown key{}",
                suggestion(
                    p,
                    sch.as_object().map(|o| o.keys()).into_iter().flatten(),
                    &prefix
                )
            )
        })?;
    }
    if sch.is_object() {
        bail!("--set {key}: that is a section, not a key");
    }
    let parsed: Value = match toml::from_str::<toml::Value>(&format!("v = {}", raw.trim())) {
        Ok(t) => {
            reject_non_finite(&t["v"], key)?;
            serde_json::to_value(&t)?["v"].clone()
        }
        Err(_) => match raw.trim().parse::<f64>() {
            // TOML refuses a float out of f64's range; it is not a string either.
            Ok(x) if !x.is_finite() => bail!(
                "--set {key}={}: out of range; expected a finite number",
                raw.trim()
            ),
            _ => Value::String(raw.trim().to_string()),
        },
    };
    if !type_ok(sch, &parsed) {
        bail!(
            "--set {key}={}: expected {}, got {}",
            raw.trim(),
            type_name(sch),
            type_name(&parsed)
        );
    }
    let mut node = tree;
    for p in &parts[..parts.len() - 1] {
        let obj = node
            .as_object_mut()
            .context("recipe root must be a table")?;
        node = obj
            .entry(p.to_string())
            .or_insert_with(|| Value::Object(Default::default()));
    }
    node.as_object_mut()
        .with_context(|| format!("--set {key}: its section is not a table"))?
        .insert(parts[parts.len() - 1].to_string(), parsed);
    Ok(())
}

/// NaN and infinities have no JSON form (they would reach the schema check as null):
/// name them here.
fn reject_non_finite(v: &toml::Value, path: &str) -> Result<()> {
    match v {
        toml::Value::Float(f) if !f.is_finite() => {
            bail!("`{path}` is {f}; expected a finite number")
        }
        toml::Value::Table(t) => {
            for (k, x) in t {
                reject_non_finite(
                    x,
                    &if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    },
                )?;
            }
            Ok(())
        }
        toml::Value::Array(a) => a.iter().try_for_each(|x| reject_non_finite(x, path)),
        _ => Ok(()),
    }
}

/// Does `v` fit the type of the schema's default `sch`? Integers fit float keys.
fn type_ok(sch: &Value, v: &Value) -> bool {
    match (sch, v) {
        (Value::String(_), Value::String(_)) | (Value::Bool(_), Value::Bool(_)) => true,
        (Value::Number(s), Value::Number(p)) => s.is_f64() || p.is_u64(),
        // An optional key unset by default: the only kind is a token id (data.eos_id).
        (Value::Null, Value::Number(p)) => p.as_u64().is_some_and(|x| x <= u32::MAX as u64),
        // The schema's lists are of names (kernels.plain_ops) or of tables (data.blend, whose
        // fields serde checks by name).
        (Value::Array(_), Value::Array(items)) => {
            items.iter().all(Value::is_string) || items.iter().all(Value::is_object)
        }
        _ => false,
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::String(_) => "a string",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a number",
        Value::Number(n) if n.as_i64().is_some_and(|x| x < 0) => "a negative integer",
        Value::Number(_) => "an integer",
        Value::Array(_) => "an array",
        Value::Object(_) => "a table",
        // (No recipe value is null: TOML has none. A null is an unset optional token id.)
        Value::Null => "a token id (an integer from 0 to 2^32 - 1)",
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn every_shipped_recipe_parses_and_validates() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).expect("recipes/") {
            let path = entry.expect("a directory entry").path();
            if path.extension().is_some_and(|e| e == "toml") {
                if let Err(e) = super::Recipe::load(&path, &[]) {
                    panic!("{}: {e:#}", path.display());
                }
                seen += 1;
            }
        }
        assert!(seen >= 10, "only {seen} recipes found in {}", dir.display());
    }

    #[test]
    fn expert_groups_and_replicas_partition_the_ranks() {
        let l = Layout {
            world: 8,
            dp: 8,
            cp: 1,
            ep: 4,
            zero: 1,
        };
        assert_eq!(l.expert_group(5), vec![4, 5, 6, 7]);
        assert_eq!(l.expert_replicas(5), vec![1, 5]);
        // Every rank is in exactly one group of each kind, and a group's members agree on it.
        for r in 0..8 {
            for m in l.expert_group(r) {
                assert_eq!(l.expert_group(m), l.expert_group(r));
            }
            for m in l.expert_replicas(r) {
                assert_eq!(l.expert_replicas(m), l.expert_replicas(r));
                assert_eq!(m % 4, r % 4, "replicas hold the same expert range");
            }
        }
        let one = Layout {
            world: 3,
            dp: 3,
            cp: 1,
            ep: 1,
            zero: 1,
        };
        assert_eq!(one.expert_group(2), vec![2]);
        assert_eq!(one.expert_replicas(2), vec![0, 1, 2]);
    }

    use super::*;

    const MINIMAL: &str =
        "[run]\noutput_dir = \"out\"\n[model]\npath = \"m\"\n[data]\npath = \"d\"\n";

    #[test]
    fn a_minimal_recipe_takes_the_defaults() {
        let r = Recipe::parse(MINIMAL, &[]).unwrap();
        assert_eq!(r.train.lr, 1e-3);
        assert_eq!(r.dsa.index_topk, 2048);
        assert_eq!(r.stage(), Stage::Warmup);
        // The resolved recipe round-trips.
        assert_eq!(Recipe::parse(&r.to_toml(), &[]).unwrap(), r);
        // With the optional token id unset (absent from the TOML) and set.
        assert_eq!(r.data.eos_id, None);
        let set = [
            "data.document_mask=true".to_string(),
            "data.eos_id=7".into(),
        ];
        let masked = Recipe::parse(MINIMAL, &set).unwrap();
        assert_eq!(
            (masked.data.document_mask, masked.data.eos_id),
            (true, Some(7))
        );
        assert_eq!(Recipe::parse(&masked.to_toml(), &[]).unwrap(), masked);
        // Block mode: the warm-up's needs no recompute; the dense stage has none.
        let warm = [
            "train.block_rows=64".to_string(),
            "train.recompute=false".into(),
        ];
        assert!(Recipe::parse(MINIMAL, &warm).is_ok());
        let dense = [
            "train.stage=\"dense\"".to_string(),
            "train.block_rows=64".into(),
        ];
        let e = Recipe::parse(MINIMAL, &dense).unwrap_err().to_string();
        assert!(
            e.contains("train.block_rows = 64") && e.contains("dense stage"),
            "{e}"
        );
    }

    /// The indexer's shape has one home, [dsa]: an older recipe's [model] keys move there, a
    /// `--set` of the old key names the new one, and a value that contradicts config.json is an
    /// error naming both; 0 takes config.json's, or V3.2-Exp's 64 x 128 where it has none.
    #[test]
    fn the_indexer_shape_lives_in_dsa_and_may_not_contradict_the_checkpoint() {
        let with_model_keys = |extra: &str| {
            MINIMAL.replace(
                "[model]\n",
                &format!("[model]\nindex_n_heads = 8\nindex_head_dim = 64\n{extra}"),
            )
        };
        let old = Recipe::parse(&with_model_keys(""), &[]).unwrap();
        assert_eq!((old.dsa.index_n_heads, old.dsa.index_head_dim), (8, 64));
        assert!(!old.to_toml().contains("[model]\nindex_n_heads"));
        let err = Recipe::parse(MINIMAL, &["model.index_n_heads=8".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("dsa.index_n_heads"), "{err}");
        let both = format!("{}[dsa]\nindex_n_heads = 16\n", with_model_keys(""));
        assert!(Recipe::parse(&both, &[]).is_err());

        // A V3.1 config.json (no indexer) takes the recipe's shape or V3.2-Exp's.
        let v31 = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/deepseek-v3.1-terminus");
        let plain = Recipe::parse(MINIMAL, &[]).unwrap();
        let c = plain.model_config(&v31).unwrap();
        assert_eq!((c.index_n_heads, c.index_head_dim), (64, 128));
        let c = old.model_config(&v31).unwrap();
        assert_eq!((c.index_n_heads, c.index_head_dim), (8, 64));
        // A V3.2 config.json: its shape, and a recipe that says otherwise is refused by name.
        let dir = std::env::temp_dir().join(format!("dsa-recipe-v32-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(v31.join("config.json")).unwrap())
                .unwrap();
        cfg["index_n_heads"] = 32.into();
        cfg["index_head_dim"] = 96.into();
        cfg["index_topk"] = 512.into();
        std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
        let c = plain.model_config(&dir).unwrap();
        assert_eq!((c.index_n_heads, c.index_head_dim), (32, 96));
        let err = old.model_config(&dir).unwrap_err().to_string();
        assert!(
            err.contains("dsa.index_n_heads = 8") && err.contains("index_n_heads 32"),
            "{err}"
        );
        let agree = Recipe::parse(MINIMAL, &["dsa.index_n_heads=32".into()]).unwrap();
        assert!(agree.model_config(&dir).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// `[[data.blend]]` lists corpora with weights instead of `data.path`; one of the two, positive
    /// weights, and a misspelt field named.
    #[test]
    fn a_blend_replaces_data_path_and_its_mistakes_are_named() {
        let no_path = MINIMAL.replace("[data]\npath = \"d\"\n", "[data]\n");
        let blend = "[[data.blend]]\npath = \"a\"\nweight = 3\n[[data.blend]]\npath = \"b\"\nweight = 1.0\n";
        let r = Recipe::parse(&format!("{no_path}{blend}"), &[]).unwrap();
        assert_eq!(r.data.blend.len(), 2);
        assert_eq!(
            (r.data.blend[0].weight, r.data.blend[1].path.as_str()),
            (3.0, "b")
        );
        assert_eq!(Recipe::parse(&r.to_toml(), &[]).unwrap(), r);
        let err = |text: String| Recipe::parse(&text, &[]).unwrap_err().to_string();
        let e = err(format!("{MINIMAL}{blend}"));
        assert!(e.contains("data.path") && e.contains("data.blend"), "{e}");
        let e = err(format!(
            "{no_path}[[data.blend]]\npath = \"a\"\nweight = 0\n"
        ));
        assert!(e.contains("data.blend[0].weight"), "{e}");
        let e = err(format!(
            "{no_path}[[data.blend]]\npath = \"a\"\nwieght = 1\n"
        ));
        assert!(e.contains("wieght"), "{e}");
        let e = err(no_path);
        assert!(e.contains("data.path must be set"), "{e}");
    }

    /// `[kernels]` gives the model its kernel policy; a wrong op name names the key.
    #[test]
    fn the_kernels_section_sets_the_policy() {
        use crate::kernels::{Fused, KernelPolicy};
        assert_eq!(
            Recipe::parse(MINIMAL, &[])
                .unwrap()
                .kernel_policy()
                .unwrap(),
            KernelPolicy::default()
        );
        let r = Recipe::parse(
            MINIMAL,
            &[
                "kernels.plain_ops=[\"lm-loss\", \"rope\"]".into(),
                "kernels.deterministic=true".into(),
            ],
        )
        .unwrap();
        let p = r.kernel_policy().unwrap();
        assert!(p.is_plain(Fused::LmLoss) && p.is_plain(Fused::Rope) && !p.is_plain(Fused::Adamw));
        assert!(p.deterministic);
        let all = Recipe::parse(MINIMAL, &["kernels.plain=true".into()]).unwrap();
        assert!(all.kernel_policy().unwrap().is_plain(Fused::Adamw));
        let err = Recipe::parse(
            &format!("{MINIMAL}[kernels]\nplain_ops = [\"lm_loss\"]\n"),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("kernels.plain_ops") && err.contains("lm-loss"),
            "{err}"
        );
    }

    /// `dsa.indexer_scores`: bf16 by default, fp8 by name, anything else refused naming the
    /// key and the choices.
    #[test]
    fn indexer_scores_are_named_choices() {
        use crate::model::fp8_scores::SelectionScores;
        let r = Recipe::parse(MINIMAL, &[]).unwrap();
        assert_eq!(r.selection_scores().unwrap(), SelectionScores::Bf16);
        let fp8 = Recipe::parse(MINIMAL, &["dsa.indexer_scores=\"fp8\"".into()]).unwrap();
        assert_eq!(fp8.selection_scores().unwrap(), SelectionScores::Fp8);
        let err = Recipe::parse(MINIMAL, &["dsa.indexer_scores=\"fp4\"".into()])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("dsa.indexer_scores") && err.contains("fp4") && err.contains("bf16, fp8"),
            "{err}"
        );
    }

    /// Tensor and pipeline parallelism are not built: no key in a resolved recipe, a value of 1
    /// (older builds' recipes) accepted and dropped, any other refused by name, in the file
    /// and in `--set`.
    #[test]
    fn parallelism_that_is_not_built_has_no_key() {
        let r = Recipe::parse(&format!("{MINIMAL}[parallel]\ntp = 1\npp = 1\n"), &[]).unwrap();
        let resolved = r.to_toml();
        assert!(
            !resolved
                .lines()
                .any(|l| l.starts_with("tp ") || l.starts_with("pp ")),
            "{resolved}"
        );
        let err = Recipe::parse(&format!("{MINIMAL}[parallel]\ntp = 2\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("parallel.tp = 2") && err.contains("tensor parallelism is not built"),
            "{err}"
        );
        let err = Recipe::parse(MINIMAL, &["parallel.pp=4".into()])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("parallel.pp = 4") && err.contains("pipeline parallelism is not built"),
            "{err}"
        );
        assert!(Recipe::parse(MINIMAL, &["parallel.pp=1".into()]).is_ok());
    }

    /// `train.stage` and `train.schedule` are enums: a wrong word names the key and the words.
    #[test]
    fn enum_keys_name_their_words() {
        let r = Recipe::parse(
            MINIMAL,
            &["train.schedule=cosine".into(), "train.stage=dense".into()],
        )
        .unwrap();
        assert_eq!(
            (r.train.schedule, r.train.stage),
            (Schedule::Cosine, Stage::Dense)
        );
        let err = Recipe::parse(&format!("{MINIMAL}[train]\nschedule = \"linear\"\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("train.schedule") && err.contains("\"cosine\""),
            "{err}"
        );
        let err = Recipe::parse(MINIMAL, &["train.stage=sprase".into()])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("train.stage") && err.contains("\"sparse\""),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_name_the_key_and_the_nearest_valid_one() {
        let err = Recipe::parse(&format!("{MINIMAL}[train]\nlrr = 1.0\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`train.lrr`") && err.contains("`train.lr`"),
            "{err}"
        );
        let err = Recipe::parse(&format!("{MINIMAL}[chekpoint]\nevery = 1\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`chekpoint`") && err.contains("`checkpoint`"),
            "{err}"
        );
        let err = Recipe::parse(MINIMAL, &["train.stpes=3".into()])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("train.stpes") && err.contains("`train.steps`"),
            "{err}"
        );
    }

    #[test]
    fn set_overrides_but_may_not_change_a_type() {
        let r = Recipe::parse(
            MINIMAL,
            &[
                "train.steps=7".into(),
                "train.lr=2e-4".into(),
                "train.stage=sparse".into(),
                "data.path=/x y/z".into(),
                "train.lr=1".into(),
            ],
        )
        .unwrap();
        assert_eq!(
            (r.train.steps, r.train.lr, r.stage()),
            (7, 1.0, Stage::Sparse)
        );
        assert_eq!(r.data.path, "/x y/z");
        for (set, want) in [
            ("train.steps=1.5", "expected an integer"),
            ("train.steps=many", "expected an integer"),
            ("train.lr=fast", "expected a number"),
            ("run.progress=1", "expected a boolean"),
            (
                "train.steps=-2",
                "expected an integer, got a negative integer",
            ),
            (
                "train.lr=nan",
                "`train.lr` is NaN; expected a finite number",
            ),
            ("train.lr=-inf", "expected a finite number"),
            ("train.lr=1e400", "out of range"),
        ] {
            let err = Recipe::parse(MINIMAL, &[set.into()])
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{set}: {err}");
        }
    }

    #[test]
    fn wrong_types_and_values_in_the_file_are_named() {
        let err = Recipe::parse(&format!("{MINIMAL}[train]\nsteps = \"ten\"\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`train.steps` must be an integer, got a string"),
            "{err}"
        );
        let err = Recipe::parse(&format!("{MINIMAL}[train]\nstage = \"sparce\"\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("train.stage") && err.contains("\"dense\""),
            "{err}"
        );
        let err = Recipe::parse(
            &format!("{MINIMAL}[train]\nglobal_batch_seqs = 5\nmicro_batch_seqs = 2\n"),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("train.global_batch_seqs"), "{err}");
        let err = Recipe::parse(&format!("{MINIMAL}[train]\nsteps = -3\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`train.steps` must be an integer, got a negative integer"),
            "{err}"
        );
        let err = Recipe::parse(&format!("{MINIMAL}[train]\nlr = nan\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("`train.lr` is NaN"), "{err}");
        let err = Recipe::parse("[run]\nseed = 1\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("run.output_dir"), "{err}");
    }
}
