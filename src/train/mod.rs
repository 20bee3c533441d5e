//! `dsa-train train`: the two DSA stages of continued pre-training.
//!
//! Warm-up (`train.stage = "warmup"`): dense attention; every tensor but the indexers' is a
//! plain (frozen) tensor, so it gets no gradient and no optimizer state. Loss, per micro-batch:
//!   L_I = sum over layers l of mean over (sequence, query t) of KL(p_l,t || softmax(I_l,t)),
//! with p the head-mean dense attention probabilities (= the L1-normalised head sum) over the
//! causal keys. Summing over layers gives each layer's indexer exactly the gradient of its own
//! mean KL; the mean over tokens keeps the scale independent of batch and sequence length. The
//! backward runs layer by layer, so one layer's L x L scores are alive at a time.
//!
//! Sparse (`"sparse"`): the main model attends over the indexer's top-k (absorbed MLA) and
//! learns from next-token cross-entropy (+ optional MTP and balance losses); each indexer learns
//! from the KL over S_t against the sparse attention's own head-mean probabilities, its inputs
//! detached, so the two losses train disjoint tensors. The indexer KL is backpropagated per
//! layer as soon as the layer has run; the LM loss once at the end.
//!
//! One step: for each micro-batch, fetch, forward, backward into an f32 accumulator (each loss
//! divided by the number of micro-batches); clip per group; AdamW; router-bias sign update.

pub mod accumulate;
pub mod ckpt;
pub mod fit;
pub mod integrity;
pub mod metrics;
mod mtp;
pub mod optim;
pub mod plan;
pub mod run_dir;
pub mod tensorboard;
pub mod zero;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Shape, Tensor, Var};

use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::data::Sampler;
use crate::dist::context::ContextShard;
use crate::dist::expert::{ExpertShard, RowExchange};
use crate::dist::Collective;
use crate::losses::next_token_nll;
use crate::model::fp8_frozen::FrozenFp8;
use crate::model::{BackwardPlan, ForwardContext, Model, Pass};
use crate::recipe::{Layout, Recipe, Stage};
use crate::weights::{self, Kind, ParamSet, WeightSpec};
use ckpt::{ModelSource, Snapshot, TrainState};
use metrics::{MetricsLog, StepMetrics};
use optim::{lr_at, AdamW, GradAccum, Group, Slot};

/// Where to resume from.
#[derive(Debug, Clone, PartialEq)]
pub enum Resume {
    /// The newest complete checkpoint in run.output_dir, or a fresh start (said in one line)
    /// if there is none.
    Auto,
    Path(PathBuf),
}

/// How a call to `train` ended.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainOutcome {
    pub steps_done: u64,
    pub stopped_by_signal: bool,
    pub last_checkpoint: Option<PathBuf>,
}

/// The model, its trainable tensors and everything needed to continue a run.
pub struct Trainer {
    pub recipe: Recipe,
    pub stage: Stage,
    pub model: Model,
    pub slots: Vec<Slot>,
    /// MoE router biases (sparse stage): changed by the sign rule, saved with the parameters.
    pub router_biases: Vec<(String, Var)>,
    pub sampler: Sampler,
    pub step: u64,
    pub tokens_seen: u64,
    model_path: PathBuf,
    /// The model under this run's parameters, as its checkpoints record it.
    source: ModelSource,
    ctx: ForwardContext,
    /// Document masking (`data.document_mask`): the token that ends a document.
    document_eos: Option<u32>,
    device: Device,
    /// The other ranks of the job (a single process has none), the layout, and the gradient
    /// and parameter sums among them.
    reducer: zero::Reducer,
    layout: Layout,
    /// Seconds in stop-flag collectives since the last step's metrics.
    comm_seconds: f64,
}

/// The end-of-document token of a run with `data.document_mask` (None without): the
/// recipe's `data.eos_id`, else the one every data source's index.json names.
fn document_eos(recipe: &Recipe, sampler: &Sampler, vocab_size: usize) -> Result<Option<u32>> {
    let data = &recipe.data;
    if !data.document_mask {
        return Ok(None);
    }
    let eos = match data.eos_id {
        Some(id) => id,
        None => {
            let ids = sampler.eos_ids();
            if let Some((path, _)) = ids.iter().find(|(_, id)| id.is_none()) {
                bail!(
                    "data.document_mask needs data.eos_id: {} names no end-of-document token (only prepared data directories do)",
                    path.display()
                );
            }
            let first = ids[0].1.expect("checked above");
            if let Some((path, id)) = ids.iter().find(|(_, id)| *id != Some(first)) {
                bail!(
                    "data.document_mask needs data.eos_id: {} ends documents with token {} and {} with {first}",
                    path.display(),
                    id.expect("checked above"),
                    ids[0].0.display()
                );
            }
            first
        }
    };
    if eos as usize >= vocab_size {
        bail!("data.eos_id = {eos} is outside the model's vocabulary ({vocab_size} tokens)");
    }
    Ok(Some(eos))
}

/// Where the model of `recipe` comes from and its configuration: `model.path`'s chain, or,
/// when resuming, the chain the checkpoint records (without the checkpoint itself, whose
/// parameters come with its snapshot), so a resume does not depend on `model.path` still
/// being where it was.
fn model_source(
    recipe: &Recipe,
    resume_dir: Option<&Path>,
) -> Result<(ModelSource, ModelConfig, PathBuf)> {
    let model_path = std::path::absolute(&recipe.model.path)
        .with_context(|| format!("model.path {}", recipe.model.path))?;
    let source: ModelSource = match resume_dir {
        Some(dir) => {
            let mut s = ckpt::resolve_model(dir)?;
            s.overlays.pop();
            s
        }
        None => ckpt::resolve_model(&model_path)?,
    };
    let cfg = recipe.model_config(&source.hf_dir)?;
    Ok((source, cfg, model_path))
}

/// How `recipe`'s main layers get their backward: recomputed (`train.recompute`), or from what
/// the first pass kept; candle's autograd, the explicit backward's twin, when
/// `kernels.plain_ops` names `layer-backward` (or `kernels.plain`) and the step does not
/// recompute. An unknown op name reads as not plain: the policy's own error names it.
pub fn backward_plan(recipe: &Recipe) -> BackwardPlan {
    let plain = recipe
        .kernel_policy()
        .is_ok_and(|p| p.is_plain(crate::kernels::Fused::LayerBackward));
    match (recipe.train.recompute, plain) {
        (true, _) => BackwardPlan::Recompute,
        (false, true) => BackwardPlan::Autograd,
        (false, false) => BackwardPlan::Saved,
    }
}

/// Every check `train` makes of a recipe before loading anything, for `train` and `check`
/// alike: the parallel layout against `world` ranks, the batch against the layout, and
/// `model.path` outside `run.output_dir` (a run would otherwise write over the steps it
/// starts from).
pub fn validate(recipe: &Recipe, world: usize) -> Result<Layout> {
    let layout = recipe.parallel.layout(world)?;
    if layout.cp > 1 {
        let t = &recipe.train;
        if recipe.stage() != Stage::Warmup && backward_plan(recipe) == BackwardPlan::Autograd {
            bail!(
                "parallel.cp = {} runs the dense and sparse stages through their explicit layer backward, not autograd's: drop \"layer-backward\" from kernels.plain_ops (and kernels.plain = true), or set train.recompute = true (this recipe: train.stage = \"{}\")",
                layout.cp,
                t.stage.name(),
            );
        }
        let t = recipe.data.seq_len;
        if !t.is_multiple_of(2 * layout.cp) || t < 4 * layout.cp {
            bail!(
                "data.seq_len = {t} must be a multiple of 2 x parallel.cp = {} and at least 4 x parallel.cp (each rank of a context group holds one chunk of at least 2 tokens from the front of a sequence and one from the back)",
                2 * layout.cp
            );
        }
        if recipe.train.block_rows == 1 {
            bail!("train.block_rows = 1 with parallel.cp = {}: blocks of one row cannot pair up the ranks' blocks where the MTP module leaves one rank a row short; use 0 or at least 2", layout.cp);
        }
    }
    if recipe.parallel.fp8_dispatch
        && recipe.stage() != Stage::Warmup
        && backward_plan(recipe) == BackwardPlan::Autograd
    {
        bail!(
            "parallel.fp8_dispatch = true rounds the experts' inputs, which candle's autograd cannot carry a gradient through: the {} stage needs its explicit layer backward (drop \"layer-backward\" from kernels.plain_ops and kernels.plain = true, or set train.recompute = true)",
            recipe.train.stage.name()
        );
    }
    let micro = recipe.micro_batches();
    if !micro.is_multiple_of(layout.dp) {
        bail!(
            "train.global_batch_seqs / train.micro_batch_seqs = {micro} micro-batches per step, not a multiple of parallel.dp = {}",
            layout.dp
        );
    }
    // Resolved (symlinks, `..`): the same place however it is spelt.
    let (model, out) = (
        crate::paths::resolved(Path::new(&recipe.model.path)),
        crate::paths::resolved(Path::new(&recipe.run.output_dir)),
    );
    if model.starts_with(&out) {
        bail!(
            "model.path {} lies inside run.output_dir {}: the run would write over the steps it starts from; choose a new run.output_dir",
            recipe.model.path, recipe.run.output_dir
        );
    }
    // Inside another run's step, pruning that step would take this run with it.
    if let Some(step) = out.ancestors().find(|a| ckpt::is_checkpoint(a)) {
        bail!(
            "run.output_dir {} lies inside the training checkpoint {}; choose a folder outside it",
            recipe.run.output_dir,
            step.display()
        );
    }
    Ok(layout)
}

/// Agree on an outcome across the ranks: if any rank failed, every rank fails (with its own
/// error, or the message of the lowest failing rank).
fn agree<T>(comm: &mut dyn Collective, mine: Result<T>) -> Result<T> {
    if comm.world() == 1 {
        return mine;
    }
    let text = match &mine {
        Ok(_) => String::new(),
        Err(e) => format!("{e:#}"),
    };
    for (r, part) in comm.all_gather(text.as_bytes())?.iter().enumerate() {
        if !part.is_empty() {
            let msg = String::from_utf8_lossy(part).into_owned();
            return Err(match mine {
                Err(e) => e,
                Ok(_) => anyhow::anyhow!("rank {r}: {msg}"),
            });
        }
    }
    mine
}

/// Refuse to resume `dir` with `recipe` if that changes a key that gives the saved state its
/// meaning (`recipe::MAY_CHANGE_ON_RESUME` lists the rest). Read before anything is loaded.
fn check_resumable(dir: &Path, recipe: &Recipe) -> Result<()> {
    let file = dir.join("recipe.toml");
    let text = std::fs::read_to_string(&file).unwrap_or_default();
    if text.trim().is_empty() {
        bail!(
            "{}: missing or empty; the checkpoint cannot be checked against the recipe",
            file.display()
        );
    }
    let saved = Recipe::parse(&text, &[]).with_context(|| format!("{}", file.display()))?;
    let changes = recipe.resume_changes(&saved);
    if !changes.is_empty() {
        bail!(
            "resuming {} would change what its saved state means: {}; keep these as in {} (docs/training.md lists the keys that may change), or start a new run from it with model.path",
            dir.display(), changes.join(", "), file.display()
        );
    }
    Ok(())
}

/// ZeRO-3 of the trained layers: of every trained tensor a decoder layer holds
/// (`zero::held_as_rows`), the rows this rank owns (`zero::named_ranges`, the ZeRO ownership
/// the trainer's slots get: same names, shapes and order).
fn zero3_owned_rows(
    recipe: &Recipe,
    cfg: &ModelConfig,
    shard: Option<&ExpertShard>,
    layout: &Layout,
    rank: usize,
    expert_replicas: bool,
) -> HashMap<String, Vec<std::ops::Range<usize>>> {
    let with_mtp = recipe.model.mtp && cfg.num_nextn_predict_layers > 0;
    let stage = recipe.stage();
    let trained: Vec<(String, Shape)> = weights::model_weights(cfg, with_mtp)
        .into_iter()
        .filter(|s| held_here(shard, &s.name) && stage.trains(s))
        .map(|s| (s.name, Shape::from(s.shape)))
        .collect();
    let named: Vec<(&str, &Shape)> = trained.iter().map(|(n, s)| (n.as_str(), s)).collect();
    let mut owned: HashMap<String, Vec<std::ops::Range<usize>>> = HashMap::new();
    for r in zero::named_ranges(&named, layout, rank) {
        let name = named[r.slot].0;
        if zero::held_as_rows(name, cfg.num_hidden_layers, layout, expert_replicas) {
            let rows = owned.entry(name.to_string()).or_default();
            if r.owner == rank {
                rows.push(r.rows);
            }
        }
    }
    owned
}

/// Does this rank hold tensor `name`? Everything but the routed experts of other ranks.
fn held_here(shard: Option<&ExpertShard>, name: &str) -> bool {
    match (shard, weights::routed_expert(name)) {
        (Some(s), Some(e)) => s.holds(e),
        _ => true,
    }
}

/// Load the model for `recipe`: the HF weights, the overlays of a step-N chain, and (when
/// resuming) the checkpoint's own parameters; decide what trains. With expert parallelism
/// only the shard's routed experts are read.
fn build_model(
    recipe: &Recipe,
    source: &ModelSource,
    cfg: ModelConfig,
    resume: Option<&Snapshot>,
    device: &Device,
    shard: Option<&ExpertShard>,
    zero3: Option<&Arc<dyn RowExchange>>,
    owned: &HashMap<String, Vec<std::ops::Range<usize>>>,
) -> Result<(Model, Vec<Slot>, Vec<(String, Var)>)> {
    let dtype = crate::parse_dtype(&recipe.model.dtype)?;
    let with_mtp = recipe.model.mtp && cfg.num_nextn_predict_layers > 0;
    let specs: Vec<WeightSpec> = weights::model_weights(&cfg, with_mtp)
        .into_iter()
        .filter(|s| held_here(shard, &s.name))
        .collect();
    let hf = Checkpoint::open(&source.hf_dir)?;
    let mut overlay = ckpt::overlay_params_where(source, device, &|n| held_here(shard, n))?;
    if let Some(snap) = resume {
        overlay.extend(snap.params.clone());
    }
    let stage = recipe.stage();
    // model.frozen_fp8: the frozen tensors of the decoder layers' attention and feed-forward
    // stay as the checkpoint stores them (`Model::layer` dequantises them), unless an overlay
    // (an earlier stage's trained values) replaces them. The MTP module's input projection
    // runs outside its layer and stays dense.
    let keep_fp8 = |s: &WeightSpec| {
        recipe.model.frozen_fp8
            && !stage.trains(s)
            && !overlay.contains_key(&s.name)
            && (s.name.contains(".self_attn.") || s.name.contains(".mlp."))
    };
    // ZeRO-3: the trained tensors of the decoder layers are read as this rank's owned rows
    // (`owned`, from `zero3_owned_rows`), never whole: the layers get placeholders and the
    // slots the rows (`Slot::from_rows`); `zero::shard_layers` then registers them.
    let whole_specs: Vec<WeightSpec> = specs
        .iter()
        .filter(|s| !owned.contains_key(&s.name))
        .cloned()
        .collect();
    let (mut params, mut initialised, held_fp8) = weights::load_params_keeping_fp8(
        &hf,
        &whole_specs,
        dtype,
        device,
        // model.frozen_fp8_offload: the FP8 bytes wait in host memory.
        if recipe.model.frozen_fp8_offload {
            &Device::Cpu
        } else {
            device
        },
        recipe.model.init_seed,
        &keep_fp8,
        // ZeRO-3: every data-parallel rank holds the tensors outside the routed experts, so
        // their rows are split over all of them; an expert's holders are its replicas.
        &|s: &WeightSpec| {
            zero3
                .filter(|_| weights::routed_expert(&s.name).is_none())
                .cloned()
        },
    )?;
    // The owned rows of the ZeRO-3 tensors: an overlay's (an earlier stage's or the resumed
    // checkpoint's values), the checkpoint's, or the indexer's seeded init, each rounded to
    // the model dtype as the whole tensor would be.
    let mut row_parts: HashMap<String, Vec<(std::ops::Range<usize>, Tensor)>> = HashMap::new();
    for s in specs.iter().filter(|s| owned.contains_key(&s.name)) {
        let want = s.compute_dtype(dtype);
        let ranges = &owned[&s.name];
        let narrowed = |t: &Tensor| -> Result<Vec<(std::ops::Range<usize>, Tensor)>> {
            ranges
                .iter()
                .map(|r| Ok((r.clone(), t.narrow(0, r.start, r.len())?.to_dtype(want)?)))
                .collect()
        };
        let resumed = resume.and_then(|snap| snap.param_rows.get(&s.name));
        let from = match (resumed.is_some(), overlay.contains_key(&s.name)) {
            (true, _) => "the checkpoint being resumed".to_string(),
            (false, true) => source.overlays.last().map_or_else(
                || source.hf_dir.display().to_string(),
                |d| d.display().to_string(),
            ),
            (false, false) => source.hf_dir.display().to_string(),
        };
        let parts = if let Some(rows) = resumed {
            // The resumed checkpoint's f32 values of these very rows.
            rows.iter()
                .map(|(r, t)| Ok((r.clone(), t.to_dtype(want)?)))
                .collect::<Result<_>>()?
        } else if let Some(t) = overlay.remove(&s.name) {
            if t.dims() != s.shape.as_slice() {
                bail!(
                    "checkpoint tensor {} has shape {:?}, the model expects {:?}",
                    s.name,
                    t.dims(),
                    s.shape
                );
            }
            narrowed(&t)?
        } else if hf.contains(&s.name) || !s.indexer {
            ranges
                .iter()
                .map(|r| {
                    Ok((
                        r.clone(),
                        hf.load_rows(&s.name, &s.shape, r.clone(), want, device)?,
                    ))
                })
                .collect::<Result<_>>()?
        } else {
            initialised.push(s.name.clone());
            let init = weights::init_indexer_tensor(s, recipe.model.init_seed);
            narrowed(&Tensor::from_vec(init, s.shape.as_slice(), device)?)?
        };
        let rows: ParamSet = parts
            .iter()
            .map(|(r, t)| (format!("{} rows {r:?}", s.name), t.clone()))
            .collect();
        if let Some(part) = weights::first_non_finite(&rows)? {
            bail!("tensor {part} (from {from}) holds NaN or infinite values; this model cannot be trained");
        }
        params.insert(
            s.name.clone(),
            crate::model::fp8_frozen::placeholder(want, device)?,
        );
        row_parts.insert(s.name.clone(), parts);
    }
    if !row_parts.is_empty() {
        let values: usize = row_parts
            .values()
            .flatten()
            .map(|(_, t)| t.elem_count())
            .sum();
        crate::elog!(
            "[train] parallel.zero = 3: {} trained tensors of the layers read as this rank's rows ({values} values), never whole",
            row_parts.len()
        );
    }
    if !initialised.is_empty() {
        crate::elog!(
            "[train] {} has no indexer tensors: initialised {} from seed {}",
            source.hf_dir.display(),
            initialised.len(),
            recipe.model.init_seed
        );
    }
    weights::apply_overlay(&mut params, &specs, overlay, dtype)?;
    if let Some(name) = weights::first_non_finite(&params)? {
        let from = resume.map_or_else(
            || {
                source
                    .overlays
                    .last()
                    .unwrap_or(&source.hf_dir)
                    .display()
                    .to_string()
            },
            |_| "the checkpoint being resumed".into(),
        );
        bail!("tensor {name} (from {from}) holds NaN or infinite values; this model cannot be trained");
    }

    let trainable = |s: &WeightSpec| stage.trains(s);
    let mut slots = vec![];
    let mut router_biases = vec![];
    let mut model_params = ParamSet::new();
    for s in &specs {
        let t = params
            .remove(&s.name)
            .expect("load_params returns every spec");
        if trainable(s) {
            let var = Var::from_tensor(&t)?;
            model_params.insert(s.name.clone(), var.as_tensor().clone());
            let decay = matches!(
                s.kind,
                Kind::Linear | Kind::Embedding | Kind::Head | Kind::Router
            );
            let group = if s.indexer {
                Group::Indexer
            } else {
                Group::Main
            };
            let name = s.name.clone();
            slots.push(match row_parts.remove(&s.name) {
                // ZeRO-3, read as this rank's rows: `var` is the layer's placeholder.
                Some(rows) => {
                    Slot::from_rows(name, var, Shape::from(s.shape.clone()), rows, decay, group)?
                }
                // Optimizer state comes with the rows this rank owns (`Trainer::with_comm`).
                None => Slot::without_state(name, var, decay, group),
            });
        } else if stage.trains_main() && s.kind == Kind::RouterBias {
            let var = Var::from_tensor(&t)?;
            model_params.insert(s.name.clone(), var.as_tensor().clone());
            router_biases.push((s.name.clone(), var));
        } else {
            model_params.insert(s.name.clone(), t);
        }
    }
    let mut model = Model::from_params_sharded(cfg, &model_params, dtype, device, with_mtp, shard)?;
    if recipe.parallel.fp8_dispatch {
        model.set_dispatch(crate::model::dispatch::Dispatch::Fp8);
    }
    model.set_selection_scores(recipe.selection_scores()?)?;
    if recipe.model.frozen_fp8 {
        model.frozen_fp8 = FrozenFp8::new(held_fp8, &model_params)?;
        let (n, bytes) = model.frozen_fp8.held();
        crate::elog!(
            "[train] model.frozen_fp8: {n} frozen tensors held in FP8, {bytes} bytes with their scales on this rank{}{}, dequantised a layer at a time",
            if zero3.is_some() { " (ZeRO-3: its rows of those outside the routed experts)" } else { "" },
            if recipe.model.frozen_fp8_offload { " in host memory" } else { "" }
        );
    }
    Ok((model, slots, router_biases))
}

impl Trainer {
    /// A trainer of a single-process job, fresh or from the checkpoint `resume_dir`.
    pub fn new(recipe: Recipe, resume_dir: Option<&Path>) -> Result<Self> {
        Self::with_comm(recipe, resume_dir, Box::new(crate::dist::SingleProcess))
    }

    /// A trainer for one rank of a job: data parallel over `comm`'s ranks, each taking every
    /// dp-th micro-batch of the global batch, gradients summed over ranks, optimizer state
    /// sharded (ZeRO-1) and parameters gathered after each step. A checkpoint to resume and
    /// the steps under it are verified first (each rank its share of the files).
    pub fn with_comm(
        recipe: Recipe,
        resume_dir: Option<&Path>,
        comm: Box<dyn Collective>,
    ) -> Result<Self> {
        let mut comm = comm;
        let layout = validate(&recipe, comm.world())?;
        let (rank, world) = (comm.rank(), comm.world());
        // Cheap checks first (the recipe guard reads one small file; the data, its headers and
        // sizes), then the checksums, each rank its share; every rank fails if one does. A
        // data typo fails here, before a long checksum pass or load.
        let resolved = (|| -> Result<_> {
            if let Some(d) = resume_dir {
                check_resumable(d, &recipe)?;
            }
            let (source, cfg, model_path) = model_source(&recipe, resume_dir)?;
            let sampler = Sampler::open(
                &recipe.data.path,
                &recipe.data.blend,
                recipe.data.seq_len,
                cfg.vocab_size,
                recipe.run.seed,
            )?;
            if let Some(d) = resume_dir {
                integrity::verify_share(d, integrity::Use::Resume, rank, world)?;
            }
            source.verify_share(rank, world)?;
            let eos = document_eos(&recipe, &sampler, cfg.vocab_size)?;
            Ok((source, cfg, model_path, sampler, eos))
        })();
        let (source, mut cfg, model_path, mut sampler, document_eos) =
            agree(comm.as_mut(), resolved)?;
        if cfg.index_topk != recipe.dsa.index_topk {
            // One home for k: the recipe's dsa.index_topk selects (a V3.2 config.json carries
            // its own); the model's config follows, so this run's steps export the k it used.
            if rank == 0 {
                crate::elog!(
                    "[train] dsa.index_topk = {} selects; {}/config.json's index_topk {} is not used",
                    recipe.dsa.index_topk, source.hf_dir.display(), cfg.index_topk
                );
            }
            cfg.index_topk = recipe.dsa.index_topk;
        }
        let shard = if layout.ep > 1 {
            // Every rank opens its group's exchange at the same moment, before any loading.
            let exchange = comm.row_exchange(&layout.expert_group(comm.rank()))?;
            Some(ExpertShard::new(cfg.n_routed_experts, exchange)?)
        } else {
            None
        };
        let device = crate::parse_device(&recipe.model.device)?;
        // ZeRO-3 of the layers: the rows of their trained tensors this rank owns, read alone
        // from the model and from a checkpoint being resumed.
        let owned_rows = if layout.zero >= 3 && layout.world > 1 {
            let replicas = layout.ep > 1 && layout.expert_replicas(rank).len() > 1;
            zero3_owned_rows(&recipe, &cfg, shard.as_ref(), &layout, rank, replicas)
        } else {
            HashMap::new()
        };
        let snapshot = match resume_dir {
            Some(d) => {
                let snap = ckpt::load_owned(d, &device, &|n| held_here(shard.as_ref(), n), &|n| {
                    owned_rows.get(n).cloned()
                })?;
                if snap.state.stage != recipe.stage() {
                    bail!(
                        "{} was written by the {:?} stage but the recipe runs {:?}",
                        d.display(),
                        snap.state.stage,
                        recipe.stage()
                    );
                }
                if rank == 0 {
                    crate::elog!(
                        "[train] resuming from {} (step {})",
                        d.display(),
                        snap.state.step
                    );
                }
                Some(snap)
            }
            None => None,
        };
        // ZeRO-3 (the layers' trainable tensors, the warm-up's frozen FP8 weights): every rank
        // opens the gather channels at the same moment, before any loading: one over every rank,
        // one over the replicas of its routed experts where they have several holders.
        let zero3 = if layout.zero >= 3 && layout.world > 1 {
            Some(comm.row_exchange(&(0..layout.world).collect::<Vec<_>>())?)
        } else {
            None
        };
        let expert_replicas = layout.expert_replicas(rank);
        let zero3_experts = if zero3.is_some() && layout.ep > 1 && expert_replicas.len() > 1 {
            Some(comm.row_exchange(&expert_replicas)?)
        } else {
            None
        };
        let (mut model, mut slots, router_biases) = build_model(
            &recipe,
            &source,
            cfg,
            snapshot.as_ref(),
            &device,
            shard.as_ref(),
            zero3.as_ref(),
            &owned_rows,
        )?;
        model.set_kernels(recipe.kernel_policy()?);
        crate::cuda_runtime::set_tf32(&device, recipe.kernels.tf32);
        let (mut step, mut tokens_seen) = (0, 0);
        // Each rank keeps the optimizer state of the row ranges it owns (ZeRO; one process
        // owns every row).
        let mut mine: Vec<Vec<std::ops::Range<usize>>> = vec![vec![]; slots.len()];
        for r in zero::slot_ranges(&slots, &layout, rank)
            .into_iter()
            .filter(|r| r.owner == rank)
        {
            mine[r.slot].push(r.rows);
        }
        for (s, rows) in slots.iter_mut().zip(mine) {
            if s.sharded {
                // Loaded as its rows (ZeRO-3): the same rows, by the same assignment.
                let have: Vec<_> = s.pieces.iter().map(|p| p.rows.clone()).collect();
                if have != rows {
                    bail!(
                        "{}: loaded rows {have:?}, but this rank owns {rows:?}",
                        s.name
                    );
                }
                continue;
            }
            s.keep_rows(rows)?;
        }
        if let Some(snap) = &snapshot {
            // Whatever layout wrote the checkpoint (the loader re-assembles split tensors),
            // each rank takes the state of the rows it owns now (re-sharding by name).
            let steps_of =
                |name: &str| -> u64 { snap.state.optimizer_steps.get(name).copied().unwrap_or(0) };
            for s in slots.iter_mut().filter(|s| !s.pieces.is_empty()) {
                if let Some(p) = snap.params.get(&s.name) {
                    s.set_value(p)?; // the exact f32 master, not its model-dtype rounding
                }
                // ZeRO-3's layer tensors, read as the owned rows: the exact f32 masters and
                // moments of those rows.
                let mine: Vec<_> = s.pieces.iter().map(|p| p.rows.clone()).collect();
                let name = s.name.clone();
                let rows_of = |have: &[std::ops::Range<usize>]| -> Result<()> {
                    if mine != have {
                        bail!(
                            "{}: read rows {have:?} of {name} but owns {mine:?}",
                            resume_dir.unwrap_or(Path::new("")).display()
                        );
                    }
                    Ok(())
                };
                if let Some(rows) = snap.param_rows.get(&s.name) {
                    rows_of(&rows.iter().map(|r| r.0.clone()).collect::<Vec<_>>())?;
                    for (p, (_, t)) in s.pieces.iter_mut().zip(rows) {
                        p.master = Some(t.clone());
                    }
                }
                if let Some(rows) = snap.moment_rows.get(&s.name) {
                    rows_of(&rows.iter().map(|r| r.0.clone()).collect::<Vec<_>>())?;
                    for (p, (_, m, v)) in s.pieces.iter_mut().zip(rows) {
                        (p.m, p.v) = (m.clone(), v.clone());
                    }
                    s.steps = steps_of(&s.name);
                }
                if let Some((m, v)) = snap.moments.get(&s.name) {
                    let dims = s.shape().dims().to_vec();
                    if m.dims() != dims.as_slice() || v.dims() != dims.as_slice() {
                        bail!("{}: the Adam moments of {} have shapes {:?} and {:?}, the tensor {dims:?}", resume_dir.unwrap_or(Path::new("")).display(), s.name, m.dims(), v.dims());
                    }
                    let total = s.rows();
                    for p in s.pieces.iter_mut() {
                        // A part is copied out, so the whole loaded moment can be freed.
                        let whole = p.rows == (0..total);
                        let rows = |t: &Tensor| -> Result<Tensor> {
                            Ok(if whole || t.rank() == 0 {
                                t.clone()
                            } else {
                                t.narrow(0, p.rows.start, p.rows.len())?.copy()?
                            })
                        };
                        (p.m, p.v) = (rows(m)?, rows(v)?);
                    }
                    s.steps = steps_of(&s.name);
                }
            }
            sampler
                .restore(snap.state.data_cursor, snap.state.blend_cursor.as_ref())
                .with_context(|| {
                    format!(
                    "{}: its data cursor does not fit data.path (or data.blend) and data.seq_len",
                    resume_dir.unwrap_or(Path::new("")).display()
                )
                })?;
            step = snap.state.step;
            tokens_seen = snap.state.tokens_seen;
        }
        if let Some(everyone) = zero3.clone() {
            zero::shard_layers(&mut model, &slots, &layout, rank, everyone, zero3_experts)?;
            let (n, bytes) = model.sharded.held();
            if rank == 0 && n > 0 {
                crate::elog!(
                    "[train] parallel.zero = 3: {n} tensors of the layers held as row shards ({bytes} bytes of f32 masters on rank 0), gathered a layer at a time"
                );
            }
        }
        let mut ctx = ForwardContext::new(&model.cfg, recipe.data.seq_len, &device)?;
        if layout.cp > 1 {
            // Every rank opens its context group's channel at the same moment, after the others.
            let exchange = comm.row_exchange(&layout.context_group(rank))?;
            ctx = ctx.with_shard(ContextShard::balanced(recipe.data.seq_len, exchange)?);
        }
        let stage = recipe.stage();
        let reducer = zero::Reducer::new(comm, layout, device.clone());
        Ok(Self {
            recipe,
            stage,
            model,
            slots,
            router_biases,
            sampler,
            step,
            tokens_seen,
            model_path,
            source,
            ctx,
            document_eos,
            device,
            reducer,
            layout,
            comm_seconds: 0.0,
        })
    }

    fn forward_options(&self) -> Pass {
        Pass::Train {
            stage: self.stage,
            topk: self.recipe.dsa.index_topk,
            kl: crate::model::IndexerKl::Deferred,
            seq_balance: self.stage.trains_main() && self.recipe.train.seq_balance_alpha > 0.0,
            block_rows: if (self.stage == Stage::Sparse && self.recipe.train.recompute)
                || self.stage == Stage::Warmup
            {
                self.recipe.train.block_rows
            } else {
                0
            },
            indexer_rows: 0,
            backward: backward_plan(&self.recipe),
        }
    }

    /// Forward and backward of one micro-batch; gradients go into `accum` scaled by `scale`.
    /// Returns (LM loss, mean over main layers of the indexer KL).
    ///
    /// Pass 1 runs the layers in order; each layer's indexer KL is backpropagated as soon as
    /// the layer has run (its graph holds only indexer tensors). The LM head and cross-entropy
    /// run in chunks of positions (`losses::chunked_next_token_loss`), giving dL/dh at the
    /// last layer. Pass 2 walks the main layers backwards through their explicit backward
    /// (`backward_plan`): with `train.recompute` pass 1 keeps only each layer's input and
    /// selected sets and pass 2 recomputes one layer from its input before its backward;
    /// otherwise pass 1 keeps what each layer's backward reads. The autograd twin builds a graph
    /// in pass 1 and backpropagates sum(out * dL/dout) (+ the balance losses) through it.
    fn micro_batch(
        &self,
        tokens: &Tensor,
        ctx: &ForwardContext,
        scale: f64,
        accum: &mut GradAccum,
        loads: &mut [Vec<u64>],
    ) -> Result<(Option<f64>, f64)> {
        let opts = self.forward_options();
        let t = &self.recipe.train;
        // `main`: the main model learns (sparse and dense stages); `with_kl`: the indexer learns.
        let main = self.stage.trains_main();
        let with_kl = self.stage != Stage::Dense;
        let plan = backward_plan(&self.recipe);
        // The main layers' backward written out (`model::blocks`): recomputed or from what
        // pass 1 keeps; else candle's autograd through pass 1's graph.
        let explicit = main && plan != BackwardPlan::Autograd;
        let recompute = main && plan == BackwardPlan::Recompute;
        let kl_weight = if self.stage == Stage::Sparse {
            t.kl_weight
        } else {
            1.0
        };
        // Scalars stay on the device until the end of the micro-batch: one host sync for the logs.
        let mut kl_sum: Option<Tensor> = None;
        let mut balance: Option<Tensor> = None;
        let add = |acc: Option<Tensor>, x: Tensor| -> Result<Option<Tensor>> {
            Ok(Some(match acc {
                Some(a) => (a + x)?,
                None => x,
            }))
        };
        // The tensors that learn, by the id of the Var the model reads (the explicit backwards' sink).
        let trainable: HashMap<candle_core::TensorId, &str> = self
            .slots
            .iter()
            .map(|s| (s.var.as_tensor().id(), s.name.as_str()))
            .collect();
        let mut inputs = Vec::new();
        let mut selections = Vec::new();
        let mut balance_weights = Vec::new();
        let mut chosen = Vec::new();
        let mut kept = Vec::new();
        // Offload: what pass 2 needs waits in host memory.
        let host = Device::Cpu;
        let keep = |x: Tensor| -> Result<Tensor> {
            Ok(if t.offload_activations {
                x.to_device(&host)?
            } else {
                x
            })
        };
        // Context parallelism: this rank computes its query rows of each sequence (every
        // position otherwise); the layers gather what attention needs from the others.
        let rows = ctx.query_rows();
        let local_tokens = rows.take(tokens, 1)?;
        // The embedding table's gradient is built from dL/d(its output) a block of rows at a
        // time (`add_embedding_grad`), never by candle's backward: its output is a leaf.
        let embedded = self.model.embed(&local_tokens)?.detach();
        let embed_leaf = if main && !explicit {
            Some(Var::from_tensor(&embedded)?)
        } else {
            None
        };
        let mut h = match &embed_leaf {
            Some(leaf) => leaf.as_tensor().clone(),
            None => embedded,
        };
        for (l, load) in loads.iter_mut().enumerate() {
            let layer = self
                .model
                .layer(l)
                .with_context(|| format!("layer {l} weights"))?;
            if recompute {
                inputs.push(keep(h.clone())?);
            }
            let region = crate::profile::region("step: layer forward (first pass)");
            let (next, mut stats) = layer
                .forward(&h, ctx, &opts)
                .with_context(|| format!("layer {l} forward"))?;
            drop(region);
            crate::profile::log_device_memory(&format!("layer {l} forward"));
            if with_kl {
                let kl = self
                    .backprop_indexer_kl(
                        &stats,
                        ctx,
                        scale * kl_weight,
                        accum,
                        &with_gathered(&trainable, &layer),
                        &layer.indexer,
                    )
                    .with_context(|| format!("layer {l} indexer KL backward"))?;
                self.flush_layer(accum, l)
                    .with_context(|| format!("layer {l} indexer gradient sums"))?;
                crate::profile::log_device_memory(&format!("layer {l} KL backward"));
                kl_sum = add(kl_sum, kl)?;
            }
            if let Some(c) = stats.expert_counts.take() {
                load.iter_mut().zip(c).for_each(|(a, b)| *a += b as u64);
            }
            match stats.balance_loss.take() {
                Some(b) if !explicit => balance = add(balance, (b * t.seq_balance_alpha)?)?,
                _ => {} // explicit: its gradient joins in the layer's backward
            }
            if recompute {
                // The selection's one stored form ([B, T, K] u32 absolute rows): 1 GiB per
                // layer at 128K tokens and k = 2048.
                selections.push(
                    stats
                        .selection
                        .take()
                        .map(|s| keep(s.absolute))
                        .transpose()?,
                );
                chosen.push(stats.chosen.take());
            }
            if explicit {
                balance_weights.push(stats.balance_weights.take());
                kept.push(stats.saved.take());
            }
            drop(stats);
            // Warm-up: nothing upstream trains. Explicit backward: no graph is needed.
            h = if !main || explicit {
                next.detach()
            } else {
                next
            };
        }
        let mut lm_value = None;
        let mut dh: Option<Tensor> = None;
        crate::profile::log_device_memory("layers done");
        if main {
            let _region = crate::profile::region("step: LM head, loss and its gradients");
            let (b, t) = tokens.dims2()?;
            let next = crate::losses::NextTokens {
                targets: rows.shifted(tokens, 1)?,
                count: b * (t - 1),
            };
            let (lm, g) = self
                .head_loss(&h, &next, &self.model.norm, scale, accum)
                .context("LM head and loss")?;
            lm_value = Some(lm);
            dh = Some(g);
        }
        // MTP: its indexer always learns its KL; its main tensors only when mtp_weight > 0.
        for depth in 0..self.model.mtp.len() {
            if tokens.dim(1)? < depth + 3 {
                break;
            }
            let trains = main && t.mtp_weight > 0.0;
            if !trains && !with_kl {
                continue;
            }
            // Written out when the step recomputes, and whenever only the module's indexer
            // learns (the warm-up): no graph and no logits are needed then.
            if explicit || !trains {
                let terms = mtp::MtpTerms {
                    kl: with_kl.then_some(scale * kl_weight),
                    lm: trains.then_some(scale * t.mtp_weight),
                };
                let d = self
                    .mtp_explicit(depth, &h, tokens, ctx, terms, &opts, accum, &trainable)
                    .with_context(|| format!("MTP module {depth}"))?;
                if let (Some(dh), Some(d)) = (dh.as_mut(), d) {
                    *dh = (&*dh + d)?;
                }
                continue;
            }
            let hv = Var::from_tensor(&h.detach())?;
            // The autograd twin: the MTP layer differentiated through its own forward graph.
            let mtp_opts = opts.clone().whole();
            let (logits, stats) =
                self.model
                    .mtp_logits_in(depth, hv.as_tensor(), tokens, ctx, &mtp_opts)?;
            if with_kl {
                let mtp_ctx = ctx.prefix(tokens.dim(1)? - 1 - depth)?;
                self.backprop_indexer_kl(
                    &stats,
                    &mtp_ctx,
                    scale * kl_weight,
                    accum,
                    &trainable,
                    &self.model.mtp[depth].layer.indexer,
                )?;
            }
            if trains {
                let targets = tokens.narrow(1, 1 + depth, tokens.dim(1)? - 1 - depth)?;
                let mtp = next_token_nll(&logits, &targets)?.mean_all()?;
                let grads = (mtp * (t.mtp_weight * scale))?
                    .backward()
                    .context("MTP backward")?;
                accum.add(&self.slots, &grads)?;
                if let (Some(d), Some(g)) = (dh.as_mut(), grads.get(hv.as_tensor())) {
                    *d = (&*d + g.detach())?;
                }
            }
        }
        crate::profile::log_device_memory("LM head and MTP done");
        if main && self.reducer.world() > 1 && self.layout.zero >= 2 {
            // ZeRO-2: the LM head and final norm are complete; MTP layers too.
            let main_layers = self.model.layers.len();
            let done = |n: &str| match layer_of(n) {
                Some(l) => l >= main_layers,
                None => n != "model.embed_tokens.weight",
            };
            self.reducer
                .flush(&self.slots, accum, &done)
                .context("LM head gradient sums")?;
        }
        if let Some(mut dh) = dh {
            let surrogate = |out: &Tensor, d: &Tensor| -> Result<Tensor> {
                Ok((out.to_dtype(DType::F32)? * d.to_dtype(DType::F32)?)?.sum_all()?)
            };
            if explicit {
                for l in (0..self.model.layers.len()).rev() {
                    let layer = self
                        .model
                        .layer(l)
                        .with_context(|| format!("layer {l} weights"))?;
                    let bw = crate::model::blocks::LayerBackward {
                        dout: &dh,
                        balance: balance_weights[l]
                            .as_deref()
                            .filter(|_| opts.seq_balance())
                            .map(|f| (f, t.seq_balance_alpha * scale)),
                        chosen: chosen.get(l).and_then(|c| c.as_deref()),
                    };
                    let trainable = with_gathered(&trainable, &layer);
                    let mut sink = AccumSink {
                        trainable: &trainable,
                        accum,
                    };
                    dh = match kept[l].take() {
                        // What pass 1 kept (`BackwardPlan::Saved`).
                        Some(saved) => layer
                            .saved_backward(saved, ctx, bw, &mut sink)
                            .with_context(|| format!("layer {l} backward"))?,
                        // Recompute: the sparse stage's a block of queries at a time with the
                        // first pass's sets, the dense stage's whole.
                        None if !recompute => {
                            bail!("layer {l}: the first pass kept nothing for its backward")
                        }
                        None => {
                            let input = inputs[l].to_device(&self.device)?;
                            let sel = selections[l]
                                .take()
                                .map(|s| s.to_device(&self.device))
                                .transpose()?
                                .map(|a| crate::dsa::Selection::from_absolute(a, ctx.t))
                                .transpose()?;
                            layer
                                .recomputed_backward(
                                    &input,
                                    ctx,
                                    sel.as_ref(),
                                    &opts,
                                    bw,
                                    &mut sink,
                                )
                                .with_context(|| format!("layer {l} recompute and backward"))?
                        }
                    };
                    crate::profile::log_device_memory(&format!("layer {l} backward"));
                    self.flush_layer(accum, l)
                        .with_context(|| format!("layer {l} gradient sums"))?;
                }
                let _region = crate::profile::region("step: embedding gradient");
                self.add_embedding_grad(accum, &local_tokens, &dh)?;
            } else {
                let mut loss = surrogate(&h, &dh)?;
                if let Some(b) = balance {
                    loss = (loss + (b * scale)?)?;
                }
                let grads = loss.backward().context("main-model backward")?;
                accum.add(&self.slots, &grads)?;
                if let Some(d) = embed_leaf
                    .as_ref()
                    .and_then(|leaf| grads.get(leaf.as_tensor()))
                {
                    self.add_embedding_grad(accum, &local_tokens, d)?;
                }
                crate::profile::log_device_memory("main-model backward done");
            }
        }
        let kl_sum = match kl_sum {
            Some(k) => k,
            None => Tensor::zeros((), DType::F32, &self.device)?, // dense stage: no indexer KL
        };
        self.reducer
            .flush(&self.slots, accum, &|_| true)
            .context("gradient sums")?;
        let lm = lm_value
            .clone()
            .unwrap_or_else(|| kl_sum.zeros_like().expect("scalar"));
        let host: Vec<f32> = Tensor::stack(&[&lm, &kl_sum], 0)?.to_vec1()?; // the one sync
        Ok((
            lm_value.map(|_| host[0] as f64),
            host[1] as f64 / self.model.layers.len() as f64,
        ))
    }

    /// The next-token loss of `h` [B, n, D] (its rows' targets `next`) through the norm `norm`
    /// and the model's output head, a chunk of positions at a time
    /// (`losses::chunked_next_token_loss`), times `weight`: the norm's and the head's gradients
    /// into `accum` (the head's a block of rows at a time, into its f32 sum). Returns the mean
    /// NLL (device scalar) and d(weight * loss)/dh.
    fn head_loss(
        &self,
        h: &Tensor,
        next: &crate::losses::NextTokens,
        norm: &Tensor,
        weight: f64,
        accum: &mut GradAccum,
    ) -> Result<(Tensor, Tensor)> {
        use crate::losses::HeadGrads;
        let m = &self.model;
        let head_slot = self.slot_holding(&m.lm_head).map(|s| s.name.clone());
        let norm_slot = self.slot_holding(norm).map(|s| s.name.clone());
        let head = crate::losses::LmHead {
            norm,
            weight: &m.lm_head,
            eps: m.cfg.rms_norm_eps,
            weight_trains: head_slot.is_some(),
            kernels: m.kernels,
        };
        let chunk = self.lm_head_chunk(h.dim(0)?);
        Ok(crate::losses::chunked_next_token_loss(
            &h.detach(),
            next,
            chunk,
            weight,
            &head,
            |g| {
                match (g, head_slot.as_deref(), norm_slot.as_deref()) {
                    (HeadGrads::Norm(g), _, Some(name)) => accum.add_one(name, g),
                    (HeadGrads::Weight(w), Some(name), _) => accum.add_rows(name, w, &self.device),
                    _ => Ok(()), // a frozen tensor's gradient
                }
                .map_err(candle_core::Error::wrap)
            },
        )?)
    }

    /// Positions per chunk of the LM head's logits (`train.lm_head_chunk`, else sized to the
    /// vocabulary).
    fn lm_head_chunk(&self, batch: usize) -> usize {
        match self.recipe.train.lm_head_chunk {
            0 => crate::losses::lm_chunk_positions(batch, self.model.cfg.vocab_size),
            c => c,
        }
    }

    /// The slot whose Var the model reads as `t` (the model holds clones of the slots' Vars,
    /// which keep their tensor id); None for a frozen tensor.
    fn slot_holding(&self, t: &Tensor) -> Option<&Slot> {
        self.slots.iter().find(|s| s.var.as_tensor().id() == t.id())
    }

    /// Add the embedding table's gradient for `dh` = dL/d(embedding output) [B, T, D] to
    /// `accum`, a block of table rows at a time (`grad_rows::EmbeddingGrad`, bit for bit
    /// candle's index-select backward), so that neither candle's whole bf16 gradient (built
    /// twice over: zeros and their index-add) nor its f32 copy exists beside the f32 sum.
    /// Nothing when the table is frozen.
    fn add_embedding_grad(
        &self,
        accum: &mut GradAccum,
        tokens: &Tensor,
        dh: &Tensor,
    ) -> Result<()> {
        let table = &self.model.embed;
        let Some(slot) = self.slot_holding(table) else {
            return Ok(());
        };
        let ids: Vec<u32> = tokens.flatten_all()?.to_vec1()?;
        let (vocab, dim) = table.dims2()?;
        let rows = crate::grad_rows::EmbeddingGrad::new(
            self.model.kernels,
            &ids,
            &dh.reshape((ids.len(), dim))?,
            vocab,
            table.dtype(),
        )
        .context("embedding gradient")?;
        accum
            .add_rows(&slot.name, &rows, &self.device)
            .context("embedding gradient")
    }

    /// Backpropagate a layer's mean indexer KL times `weight` into `accum`
    /// (`Indexer::kl_backward`); returns the mean KL as a detached f32 scalar on the device.
    fn backprop_indexer_kl(
        &self,
        stats: &crate::model::LayerStats,
        ctx: &ForwardContext,
        weight: f64,
        accum: &mut GradAccum,
        trainable: &HashMap<candle_core::TensorId, &str>,
        indexer: &crate::model::indexer::Indexer,
    ) -> Result<Tensor> {
        let _region = crate::profile::region("step: indexer KL backward");
        Ok(indexer.kl_backward(stats, ctx, weight, &mut AccumSink { trainable, accum })?)
    }

    /// Forward and backward over the next `global_batch_seqs` sequences (advancing the data
    /// cursor): the averaged gradients, the expert loads per layer, and the summed LM loss and
    /// indexer KL of the micro-batches.
    pub fn accumulate_gradients(&mut self) -> Result<(GradAccum, Vec<Vec<u64>>, f64, f64)> {
        let r = &self.recipe;
        let micro = r.micro_batches();
        let scale = 1.0 / micro as f64;
        let mut accum = GradAccum::default().with_kernels(self.model.kernels);
        let experts = self.model.cfg.n_routed_experts;
        let mut loads = vec![vec![0u64; experts]; self.model.layers.len()];
        let (mut lm_sum, mut kl_sum) = (0.0, 0.0);
        let (dp, replica) = (self.layout.dp, self.layout.replica(self.reducer.rank()));
        for i in 0..micro {
            // Every rank draws every window (the data cursor stays the same on all ranks) and
            // its replica computes its own share of the micro-batches (the ranks of a context
            // group each their rows of the same ones).
            let batch = self.sampler.next_batch(r.train.micro_batch_seqs)?;
            if i % dp != replica {
                continue;
            }
            let flat: Vec<u32> = batch.concat();
            let (b, t) = (r.train.micro_batch_seqs, r.data.seq_len);
            let ctx = match self.document_eos {
                Some(eos) => self.ctx.for_documents(&flat, b, eos)?,
                None => self.ctx.clone(),
            };
            let tokens = Tensor::from_vec(flat, (b, t), &self.device)?;
            let (lm, kl) = self.micro_batch(&tokens, &ctx, scale, &mut accum, &mut loads)?;
            lm_sum += lm.unwrap_or(0.0);
            kl_sum += kl;
        }
        self.reducer
            .finish(&self.slots, &mut accum)
            .context("gradient sums")?;
        if self.reducer.world() > 1 {
            let start = Instant::now();
            (lm_sum, kl_sum) = self.reduce_logs(&mut loads, lm_sum, kl_sum)?;
            self.comm_seconds += start.elapsed().as_secs_f64();
        }
        Ok((accum, loads, lm_sum, kl_sum))
    }

    /// ZeRO-2: the gradients of layer `l` (`model.layers.{l}.`) are complete for this
    /// micro-batch; sum them onto their owners now.
    fn flush_layer(&self, accum: &mut GradAccum, l: usize) -> Result<()> {
        if self.reducer.world() == 1 || self.layout.zero < 2 {
            return Ok(()); // settled once at the end of the micro-batch or step
        }
        self.reducer
            .flush(&self.slots, accum, &|n| layer_of(n) == Some(l))
    }

    /// Sum the expert loads and the logged losses over the ranks (loads are counts: summed
    /// exactly as integers).
    fn reduce_logs(&mut self, loads: &mut [Vec<u64>], lm: f64, kl: f64) -> Result<(f64, f64)> {
        let mut mine: Vec<u8> = [lm, kl].iter().flat_map(|x| x.to_le_bytes()).collect();
        mine.extend(loads.iter().flatten().flat_map(|x| x.to_le_bytes()));
        let all = self.reducer.comm.get_mut().all_gather(&mine)?;
        let word = |part: &[u8], i: usize| -> [u8; 8] {
            part[8 * i..8 * i + 8].try_into().expect("8 bytes")
        };
        let (mut lm, mut kl) = (0.0, 0.0);
        loads.iter_mut().flatten().for_each(|x| *x = 0);
        for part in &all {
            lm += f64::from_le_bytes(word(part, 0));
            kl += f64::from_le_bytes(word(part, 1));
            for (i, x) in loads.iter_mut().flatten().enumerate() {
                *x += u64::from_le_bytes(word(part, 2 + i));
            }
        }
        Ok((lm, kl))
    }

    /// One optimizer step over `global_batch_seqs` sequences.
    pub fn train_step(&mut self) -> Result<StepMetrics> {
        let start = Instant::now();
        let (accum, loads, lm_sum, kl_sum) = self.accumulate_gradients()?;
        crate::profile::log_device_memory("gradients accumulated");
        let recipe = self.recipe.clone();
        let r = &recipe;
        let micro = r.micro_batches();
        let seq_len = r.data.seq_len;
        let lr = lr_at(self.step, r.train.lr, &r.train);
        let indexer_lr = lr_at(self.step, r.indexer_lr(), &r.train);
        let sq = self
            .reducer
            .whole_squared_norms(&self.slots, &accum)
            .context("gradient norms (summed over the ranks)")?;
        let region = crate::profile::region("step: gradient norms and AdamW");
        let report = AdamW::from_recipe(&r.train, self.model.kernels)
            .step_with_norms(&mut self.slots, &accum, &sq, |g| match g {
                Group::Main => lr,
                Group::Indexer => indexer_lr,
            })
            .context("optimizer step")?;
        drop(accum);
        drop(region);
        crate::profile::log_device_memory("optimizer step done");
        if self.layout.world > 1 {
            self.reducer
                .gather_updated_params(&mut self.slots)
                .context("gathering the updated parameters from their owners")?;
            zero::share_sharded_masters(&mut self.model, &self.slots)?;
        }
        self.update_router_biases(&loads)?;
        self.step += 1;
        let tokens = (r.train.global_batch_seqs * seq_len) as u64;
        self.tokens_seen += tokens;
        let elapsed = start.elapsed().as_secs_f64();
        Ok(StepMetrics {
            step: self.step,
            stage: r.train.stage.name().to_string(),
            lm_loss: self.stage.trains_main().then_some(lm_sum / micro as f64),
            indexer_kl: kl_sum / micro as f64,
            lr,
            indexer_lr,
            grad_norm: match self.stage {
                Stage::Warmup => report.indexer_grad_norm,
                Stage::Sparse | Stage::Dense => report.main_grad_norm,
            },
            indexer_grad_norm: report.indexer_grad_norm,
            tokens: self.tokens_seen,
            tokens_per_s: tokens as f64 / elapsed,
            elapsed_s: elapsed,
            comm_s: std::mem::take(&mut self.comm_seconds) + self.reducer.take_seconds(),
            exchange_s: crate::dist::expert::take_exchange_seconds(),
            exchange_bytes: crate::dist::expert::take_exchange_bytes(),
            context_bytes: crate::dist::context::take_context_bytes(),
            gather_bytes: crate::model::sharded::take_gather_bytes(),
            max_expert_load: metrics::max_expert_load(&loads),
        })
    }

    /// Auxiliary-loss-free balancing: b_e += gamma * sign(mean load - load_e), per MoE layer.
    fn update_router_biases(&self, loads: &[Vec<u64>]) -> Result<()> {
        let gamma = self.recipe.train.router_bias_gamma;
        if gamma == 0.0 {
            return Ok(());
        }
        for (name, var) in &self.router_biases {
            let Some(l) = name.split('.').nth(2).and_then(|x| x.parse::<usize>().ok()) else {
                continue;
            };
            let Some(load) = loads.get(l) else { continue }; // MTP layer: not counted
            let mean = load.iter().sum::<u64>() as f64 / load.len() as f64;
            // Under-loaded experts (load below the mean) get a higher bias, over-loaded a lower one.
            let delta: Vec<f32> = load
                .iter()
                .map(|&x| match (x as f64).partial_cmp(&mean) {
                    Some(std::cmp::Ordering::Less) => gamma as f32,
                    Some(std::cmp::Ordering::Greater) => -gamma as f32,
                    _ => 0.0,
                })
                .collect();
            let delta = Tensor::from_vec(delta, load.len(), &self.device)?;
            var.set(&(var.as_tensor() + delta)?)?;
        }
        Ok(())
    }

    /// Wait for queued device work (timing).
    pub fn sync_device(&self) -> Result<()> {
        Ok(self.device.synchronize()?)
    }

    /// The checkpoint of the current state.
    pub fn snapshot(&self) -> Result<Snapshot> {
        let mut params = BTreeMap::new();
        let mut moments = BTreeMap::new();
        let mut optimizer_steps = BTreeMap::new();
        // Each rank saves the rows it owns (a part of a tensor under `optim::piece_name`); rank
        // 0 also the router biases (identical on all).
        for s in self.slots.iter().filter(|s| !s.pieces.is_empty()) {
            for p in &s.pieces {
                let name = optim::piece_name(&s.name, &p.rows, s.rows());
                params.insert(name.clone(), s.piece_value(p)?);
                moments.insert(name, (p.m.clone(), p.v.clone()));
            }
            optimizer_steps.insert(s.name.clone(), s.steps);
        }
        for (name, var) in self
            .router_biases
            .iter()
            .filter(|_| self.reducer.rank() == 0)
        {
            params.insert(name.clone(), var.as_tensor().clone());
        }
        let (data_cursor, blend_cursor) = self.sampler.cursor();
        Ok(Snapshot {
            state: TrainState {
                format_version: ckpt::FORMAT_VERSION,
                dsa_train_version: env!("CARGO_PKG_VERSION").into(),
                stage: self.stage,
                step: self.step,
                tokens_seen: self.tokens_seen,
                data_cursor,
                blend_cursor,
                optimizer_steps,
                model_path: self.model_path.to_string_lossy().into_owned(),
                base: Some(
                    self.source
                        .recorded_from(Path::new(&self.recipe.run.output_dir)),
                ),
            },
            params,
            moments,
            param_rows: Default::default(),
            moment_rows: Default::default(),
            recipe_toml: self.recipe.to_toml(),
        })
    }

    /// Write the checkpoint of the current step, read it back against its checksums (each
    /// rank its share), and only then prune older ones: the newest verified step is never lost.
    pub fn save_checkpoint(&mut self) -> Result<PathBuf> {
        let out = PathBuf::from(&self.recipe.run.output_dir);
        let snap = self.snapshot()?;
        let comm = self.reducer.comm.get_mut();
        let dir = ckpt::save_sharded(&out, &snap, comm.as_mut())?;
        let (rank, world) = (comm.rank(), comm.world());
        let verified = integrity::verify_share(&dir, integrity::Use::Resume, rank, world)
            .with_context(|| format!("{} failed its check right after it was written (storage problem?); older checkpoints are kept", dir.display()));
        agree(comm.as_mut(), verified)?;
        if rank == 0 {
            ckpt::prune(&out, self.recipe.checkpoint.keep_last, &dir)?;
        }
        comm.barrier()?;
        Ok(dir)
    }

    /// Give this run its own links to the steps its model comes from (`ckpt::link_base`), so
    /// that its checkpoints survive the other run pruning or moving them. Rank 0 links; every
    /// rank records the same paths.
    pub fn link_base(&mut self) -> Result<()> {
        let out = PathBuf::from(&self.recipe.run.output_dir);
        let comm = self.reducer.comm.get_mut();
        let linked = if comm.rank() == 0 {
            ckpt::link_base(&out, &self.source).map(|_| ())
        } else {
            Ok(())
        };
        agree(comm.as_mut(), linked)?;
        self.source = ckpt::linked_source(&out, &self.source);
        Ok(())
    }

    pub fn rank(&self) -> usize {
        self.reducer.rank()
    }

    /// Did any rank get a stop signal? (All ranks must checkpoint and stop at the same step.)
    fn stop_agreed(&mut self, mine: bool) -> Result<bool> {
        if self.reducer.world() == 1 {
            return Ok(mine);
        }
        Ok(self
            .reducer
            .comm
            .get_mut()
            .all_gather(&[mine as u8])?
            .iter()
            .any(|b| b.first() == Some(&1)))
    }
}

/// The decoder layer a tensor belongs to (`model.layers.{l}.`), MTP layers included.
/// The explicit backward's parameter gradients into the step's f32 sums (`GradAccum`), for
/// the tensors that train here (by the id of the Var the model reads).
struct AccumSink<'a> {
    trainable: &'a HashMap<candle_core::TensorId, &'a str>,
    accum: &'a mut GradAccum,
}

impl crate::model::grad_sink::GradSink for AccumSink<'_> {
    fn wants(&self, param: &Tensor) -> bool {
        self.trainable.contains_key(&param.id())
    }

    fn add(&mut self, param: &Tensor, grad: Tensor) -> candle_core::Result<()> {
        match self.trainable.get(&param.id()) {
            Some(name) => self
                .accum
                .add_one(name, &grad)
                .map_err(candle_core::Error::wrap),
            None => Ok(()),
        }
    }
}

/// `trainable` and, under the names of the tensors they gather, a ZeRO-3 layer's gathered
/// copies: their gradients are the model's tensors' gradients.
fn with_gathered<'a>(
    trainable: &HashMap<candle_core::TensorId, &'a str>,
    layer: &crate::model::materialize::LayerToRun,
) -> HashMap<candle_core::TensorId, &'a str> {
    let mut map = trainable.clone();
    for (gathered, held) in layer.gathered() {
        if let Some(&name) = trainable.get(&held) {
            map.insert(gathered, name);
        }
    }
    map
}

fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// Run a recipe to `train.steps`, checkpointing as configured.
/// Run a recipe as one rank of the job the environment describes (SLURM or torchrun-style
/// variables; a single process when there are none).
pub fn train(recipe: Recipe, resume: Option<Resume>) -> Result<TrainOutcome> {
    let launch = crate::dist::Launch::from_env()?;
    // Check the recipe before waiting for other ranks: a typo fails at once on every rank.
    validate(&recipe, launch.world)?;
    let mut recipe = recipe;
    if recipe.model.device == "cuda" && launch.world > 1 {
        // One process per GPU: rank i of a node takes GPU LOCAL_RANK, unless the launcher
        // gave each task a single visible GPU.
        recipe.model.device = crate::dist::rank_gpu(&launch);
    }
    let device = crate::parse_device(&recipe.model.device)?;
    let comm = crate::dist::connect(&launch, &device)?;
    train_with(recipe, resume, comm)
}

/// `train` over the given collectives; rank 0 alone writes the logs and the recipe copy.
///
/// Before anything is written: rank 0 locks the folder (`run_dir::RunLock`, held until this
/// returns, or the process dies), every rank agrees on it, and the start point is decided
/// (`run_dir::start_point`: a folder holding another run is never written over).
pub fn train_with(
    recipe: Recipe,
    resume: Option<Resume>,
    comm: Box<dyn Collective>,
) -> Result<TrainOutcome> {
    let mut comm = comm;
    // The run records where its model and data are, resolved: a resume from another working
    // directory, or through another spelling, compares the places, not the strings.
    let mut recipe = recipe;
    for p in [
        &mut recipe.model.path,
        &mut recipe.data.path,
        &mut recipe.run.output_dir,
    ]
    .into_iter()
    .chain(recipe.data.blend.iter_mut().map(|b| &mut b.path))
    .filter(|p| !p.is_empty())
    {
        *p = crate::paths::resolved(Path::new(p.as_str()))
            .to_string_lossy()
            .into_owned();
    }
    let out = PathBuf::from(&recipe.run.output_dir);
    let lead = comm.rank() == 0;
    let layout = validate(&recipe, comm.world())?;
    std::fs::create_dir_all(&out)
        .with_context(|| format!("cannot create run.output_dir {}", out.display()))?;
    let lock = if lead {
        run_dir::RunLock::acquire(&out).map(Some)
    } else {
        Ok(None)
    };
    let _lock = agree(comm.as_mut(), lock)?;
    let start = agree(
        comm.as_mut(),
        run_dir::start_point(&out, resume.as_ref(), lead),
    )?;
    if lead {
        run_dir::clear_leftovers(&out);
        if start.is_none() {
            // A fresh start over a folder that holds no run: base links left by an earlier
            // start that never wrote a step are not this run's.
            let base = out.join("base");
            if base.exists() {
                std::fs::remove_dir_all(&base)
                    .with_context(|| format!("cannot clear the leftover {}", base.display()))?;
            }
        }
    }
    crate::signals::install();
    if lead && comm.world() > 1 {
        crate::elog!(
            "[train] {} ranks over {}: dp {} x cp {} (experts over ep {})",
            comm.world(),
            comm.backend(),
            layout.dp,
            layout.cp,
            layout.ep
        );
    }
    let mut trainer = Trainer::with_comm(recipe, start.as_deref(), comm)?;
    trainer.link_base()?;
    let r = trainer.recipe.clone();
    if lead {
        // The run's resolved recipe, replaced whole (never half-written).
        let path = out.join("recipe.toml");
        let tmp = out.join(".recipe.toml.tmp");
        std::fs::write(&tmp, r.to_toml())
            .and_then(|()| std::fs::rename(&tmp, &path))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let log = if lead {
        Some(MetricsLog::open(&out, trainer.step)?)
    } else {
        None
    };
    let mut events = if lead && r.run.tensorboard {
        tensorboard::EventWriter::create(&out, trainer.step)
            .map_err(|e| crate::elog!("[train] warning: {e:#}; no TensorBoard events for this run"))
            .ok()
    } else {
        None
    };
    if lead && trainer.step < r.train.steps {
        let _ = std::fs::remove_file(out.join("FINISHED")); // a longer run of the same folder
    }
    let progress = if lead {
        progress_bar(&r, trainer.step)
    } else {
        None
    };
    let mut last_checkpoint = None;
    let mut stopped = false;
    let log_every = match r.run.log_every {
        0 => (r.train.steps / 20).max(1),
        n => n,
    };
    if lead && trainer.step >= r.train.steps {
        crate::elog!(
            "[train] nothing to do: the run is at step {}, train.steps is {}",
            trainer.step,
            r.train.steps
        );
    }
    let first_step = trainer.step + 1;
    // FLOPs of a step (the `check` count), per device, for the log's TFLOP/s.
    let flops_per_device_step = plan::plan(&r)
        .ok()
        .map(|p| p.flops_per_step / trainer.reducer.world() as f64);
    while trainer.step < r.train.steps {
        let m = trainer.train_step()?;
        if let Some(log) = &log {
            log.append(&m)?;
        }
        if let Some(ev) = events.as_mut() {
            ev.append(&m);
        }
        if !m.indexer_kl.is_finite()
            || m.lm_loss.is_some_and(|l| !l.is_finite())
            || !m.grad_norm.is_finite()
        {
            // At the first step of this process no update has happened, and the weights were
            // checked finite at load: the learning rate is not the cause then.
            let why = match (m.step == first_step, r.model.dtype.as_str()) {
                (true, "f32") => "at the first step, before any update: the forward overflows".to_string(),
                (true, _) => "at the first step, before any update: the forward overflows (try model.dtype = \"f32\")".to_string(),
                (false, _) => "stopping without a checkpoint (resume from the last complete one with a lower train.lr)".to_string(),
            };
            bail!(
                "step {}: the loss or gradient norm is not finite (lm_loss {:?}, indexer_kl {}, grad_norm {}); {why}",
                m.step, m.lm_loss, m.indexer_kl, m.grad_norm
            );
        }
        match &progress {
            Some(p) => {
                p.set_position(m.step);
                p.set_message(format!(
                    "{}kl {:.4} lr {:.2e} {:.0} tok/s",
                    m.lm_loss.map_or(String::new(), |l| format!("lm {l:.4} ")),
                    m.indexer_kl,
                    m.lr,
                    m.tokens_per_s
                ));
            }
            None if lead && (m.step % log_every == 0 || m.step == 1) => {
                let mem = metrics::memory_in_use_gib(&trainer.device);
                crate::elog!(
                    "[train] {}",
                    metrics::log_line(&m, r.train.steps, flops_per_device_step, mem)
                );
            }
            None => {}
        }
        stopped = trainer.stop_agreed(crate::signals::stop_requested())?;
        let periodic = r.checkpoint.every > 0 && m.step % r.checkpoint.every == 0;
        if periodic || stopped || m.step == r.train.steps {
            last_checkpoint = Some(trainer.save_checkpoint()?);
        }
        if stopped {
            crate::elog!(
                "[train] stop requested: checkpoint written at step {}, exiting",
                m.step
            );
            break;
        }
    }
    if let Some(p) = progress {
        p.finish();
    }
    let finished = out.join("FINISHED");
    if lead && trainer.step >= r.train.steps {
        // Job scripts tell "reached train.steps" from "stopped by a signal" by this file.
        std::fs::write(&finished, format!("{}\n", trainer.step))
            .with_context(|| format!("cannot write {}", finished.display()))?;
    }
    Ok(TrainOutcome {
        steps_done: trainer.step,
        stopped_by_signal: stopped,
        last_checkpoint,
    })
}

fn progress_bar(r: &Recipe, start: u64) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if !r.run.progress || !std::io::stderr().is_terminal() {
        return None;
    }
    let p = indicatif::ProgressBar::new(r.train.steps).with_position(start);
    p.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:30}] step {pos}/{len} {msg} ETA {eta}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    p.set_prefix(r.train.stage.name());
    Some(p)
}
