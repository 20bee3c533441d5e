//! Training checkpoints: `<output_dir>/step-N/`.
//!
//! A checkpoint is written into a hidden temporary folder, every file flushed to disk, the
//! `COMPLETE` marker written last, and the folder renamed to `step-N`. A folder without the
//! marker (a run killed mid-save) is never resumed from. The marker lists every file with its
//! size and checksum (`integrity`); readers verify what they read. Contents:
//! - `params.safetensors`: the f32 values of every tensor this stage changes (the indexer alone
//!   after warm-up steps; everything, router biases included, in the sparse stage);
//! - `optimizer.safetensors`: Adam moments `NAME.exp_avg`, `NAME.exp_avg_sq` (f32);
//! - `state.json`: stage, step, tokens seen, data cursor, per-tensor optimizer step counts, the
//!   model path the run started from, versions;
//! - `recipe.toml`: the resolved recipe.
//! The frozen rest lives in the Hugging Face checkpoint the run started from. A run started
//! from another run's `step-N` keeps hard links (or, across file systems, copies) of the
//! parameters of every link of that chain in `<output_dir>/base/`, and each of its steps lists
//! the whole chain (HF folder, then base links) by paths relative to the step and absolute; so
//! the parent run may prune or move its steps, and the run folder itself may move.
//!
//! Sharded (a job of several ranks): every rank writes `params.rank-RRRRR.safetensors` and
//! `optimizer.rank-RRRRR.safetensors` with the tensors whose optimizer state it owns (each
//! tensor in exactly one file); a tensor split among owners by rows (`zero::OwnedRange`) is
//! stored as its parts, `NAME.rows.START-END` (moments `NAME.rows.START-END.exp_avg`, ...),
//! each in its owner's file. Rank 0 writes `manifest.json` (world and layout), state.json and
//! recipe.toml after all ranks have written, then the marker, then renames. Tensors are found
//! by name whatever file holds them, and parts are joined into whole tensors on loading, so a
//! checkpoint loads under any other layout (re-sharding is a matter of which rank keeps which
//! rows). A single process never splits, so its files hold whole tensors only.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::checkpoint::load_file_f32_where;
use crate::data::DataCursor;
use crate::hf_writer::{write_safetensors, StoredTensor};
use crate::recipe::Stage;

use super::integrity::{self, write_synced, FileSum, Use, MARKER};

/// 2: the marker lists every file with its checksum (`integrity`); 1: the marker is empty.
pub const FORMAT_VERSION: u32 = 2;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    pub format_version: u32,
    pub dsa_train_version: String,
    pub stage: Stage,
    /// Optimizer steps completed.
    pub step: u64,
    pub tokens_seen: u64,
    pub data_cursor: DataCursor,
    /// A blend run's cursor (`data.blend`); absent for one corpus.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blend_cursor: Option<crate::data::BlendCursor>,
    /// Per-tensor Adam step counts (bias correction).
    pub optimizer_steps: BTreeMap<String, u64>,
    /// The `model.path` this run started from (absolute), for chaining (steps written before
    /// `base` existed chain through it).
    pub model_path: String,
    /// The model this step's parameters overlay: its HF folder and earlier links, oldest first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<BaseChain>,
}

/// A path recorded both relative to the step folder (found first: the run folder may move)
/// and absolute (found when the step alone moved).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RecordedPath {
    pub relative: String,
    pub absolute: String,
}

impl RecordedPath {
    /// `target` as seen from a folder `from`; the absolute path resolved (`paths::resolved`).
    pub fn new(from: &Path, target: &Path) -> Self {
        Self {
            relative: crate::paths::relative(from, target)
                .to_string_lossy()
                .into_owned(),
            absolute: crate::paths::resolved(target)
                .to_string_lossy()
                .into_owned(),
        }
    }

    /// The recorded place as seen from the step folder `step`: relative if `exists` there,
    /// else absolute; resolved either way.
    pub fn locate(&self, step: &Path, exists: impl Fn(&Path) -> bool) -> PathBuf {
        let rel = crate::paths::resolved(&step.join(&self.relative));
        if exists(&rel) {
            rel
        } else {
            crate::paths::resolved(Path::new(&self.absolute))
        }
    }
}

/// The chain under a run's steps.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BaseChain {
    pub hf_dir: RecordedPath,
    /// step-N copies in `<output_dir>/base/`, oldest first.
    pub overlays: Vec<RecordedPath>,
    /// XXH3-64 (hex) of each overlay's marker, which holds the checksums of its files: the
    /// step found at a recorded path must be the very step this run was trained on.
    #[serde(default)]
    pub overlay_markers: Vec<String>,
}

/// XXH3-64 (hex) of the marker of step `dir` ("" when it cannot be read).
pub fn marker_digest(dir: &Path) -> String {
    std::fs::read(dir.join(MARKER))
        .map(|b| format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&b)))
        .unwrap_or_default()
}

/// Everything a checkpoint holds, in memory.
pub struct Snapshot {
    pub state: TrainState,
    pub params: BTreeMap<String, Tensor>,
    pub moments: BTreeMap<String, (Tensor, Tensor)>,
    /// Tensors read as this rank's owned rows only (`load_owned`, ZeRO-3's layer tensors):
    /// each owned range with its f32 values, in the order the ranges were asked for.
    pub param_rows: BTreeMap<String, Vec<(Range<usize>, Tensor)>>,
    /// Their Adam moments, the same way: (rows, exp_avg, exp_avg_sq).
    pub moment_rows: BTreeMap<String, Vec<(Range<usize>, Tensor, Tensor)>>,
    pub recipe_toml: String,
}

fn f32_tensor(name: &str, t: &Tensor) -> Result<StoredTensor> {
    let v: Vec<f32> = t
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    Ok(StoredTensor::f32(name, t.dims(), &v))
}

/// Write `snap` as `<output_dir>/step-<step>`, atomically. Returns the final folder.
pub fn save(output_dir: &Path, snap: &Snapshot) -> Result<PathBuf> {
    save_sharded(output_dir, snap, &mut crate::dist::SingleProcess)
}

fn shard_name(kind: &str, rank: usize) -> String {
    format!("{kind}.rank-{rank:05}.safetensors")
}

/// `save` for a job of several ranks: every rank calls it with its own part of the snapshot
/// (its tensors, moments and optimizer step counts; rank 0's state and recipe are written).
/// On an error rank 0 removes the temporary folder: a failed save leaves nothing behind.
pub fn save_sharded(
    output_dir: &Path,
    snap: &Snapshot,
    comm: &mut dyn crate::dist::Collective,
) -> Result<PathBuf> {
    let tmp = output_dir.join(format!(".step-{}.tmp", snap.state.step));
    let result = write_step(output_dir, &tmp, snap, comm);
    if result.is_err() && comm.rank() == 0 {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

fn write_step(
    output_dir: &Path,
    tmp: &Path,
    snap: &Snapshot,
    comm: &mut dyn crate::dist::Collective,
) -> Result<PathBuf> {
    let (rank, world) = (comm.rank(), comm.world());
    let step = snap.state.step;
    let final_dir = output_dir.join(format!("step-{step}"));
    if rank == 0 && tmp.exists() {
        std::fs::remove_dir_all(tmp).with_context(|| format!("cannot clear {}", tmp.display()))?;
    }
    comm.barrier()?;
    std::fs::create_dir_all(tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let (pname, oname) = if world == 1 {
        (
            "params.safetensors".to_string(),
            "optimizer.safetensors".to_string(),
        )
    } else {
        (shard_name("params", rank), shard_name("optimizer", rank))
    };
    let params: Vec<StoredTensor> = snap
        .params
        .iter()
        .map(|(n, t)| f32_tensor(n, t))
        .collect::<Result<_>>()?;
    write_safetensors(&tmp.join(&pname), &params)?;
    let mut moments = vec![];
    for (n, (m, v)) in &snap.moments {
        moments.push(f32_tensor(&format!("{n}.exp_avg"), m)?);
        moments.push(f32_tensor(&format!("{n}.exp_avg_sq"), v)?);
    }
    write_safetensors(&tmp.join(&oname), &moments)?;
    for f in [&pname, &oname] {
        std::fs::File::open(tmp.join(f))?.sync_all()?;
    }
    // Every rank's optimizer step counts and file checksums go to rank 0 (its state.json and
    // marker). The checksums are of the flushed files as read back.
    let sums = integrity::sum_files(tmp, &[pname.clone(), oname.clone()])?;
    let mine = serde_json::to_vec(&(&snap.state.optimizer_steps, &sums))?;
    let mut state = snap.state.clone();
    let mut files: BTreeMap<String, FileSum> = BTreeMap::new();
    for part in comm.all_gather(&mine)? {
        let (steps, sums): (BTreeMap<String, u64>, BTreeMap<String, FileSum>) =
            serde_json::from_slice(&part)
                .context("bad optimizer step counts or checksums from a rank")?;
        state.optimizer_steps.extend(steps);
        files.extend(sums);
    }
    if rank != 0 {
        comm.barrier()?; // rank 0 finishes the checkpoint
        return Ok(final_dir);
    }
    let mut meta = vec![];
    if world > 1 {
        let manifest = serde_json::json!({"world": world, "files": (0..world).flat_map(|r| [shard_name("params", r), shard_name("optimizer", r)]).collect::<Vec<_>>()});
        write_synced(
            &tmp.join("manifest.json"),
            serde_json::to_string_pretty(&manifest)?.as_bytes(),
        )?;
        meta.push("manifest.json".to_string());
    }
    write_synced(
        &tmp.join("state.json"),
        serde_json::to_string_pretty(&state)?.as_bytes(),
    )?;
    write_synced(&tmp.join("recipe.toml"), snap.recipe_toml.as_bytes())?;
    meta.extend(["state.json".to_string(), "recipe.toml".to_string()]);
    files.extend(integrity::sum_files(tmp, &meta)?);
    integrity::write_marker(tmp, files)?;
    if final_dir.symlink_metadata().is_ok() {
        // Start points are chosen so that a run's new steps are past every step in its folder
        // (`run_dir::start_point`); something there now is not ours to replace.
        bail!("{} already exists; not replacing it", final_dir.display());
    }
    std::fs::rename(tmp, &final_dir)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), final_dir.display()))?;
    // The rename is durable once the folder holding it is flushed.
    if let Ok(d) = std::fs::File::open(output_dir) {
        let _ = d.sync_all();
    }
    comm.barrier()?;
    Ok(final_dir)
}

/// The files of `kind` ("params" or "optimizer") in a checkpoint: the single-process file, or
/// every rank's shard (checked against manifest.json when there is one).
pub fn tensor_files(dir: &Path, kind: &str) -> Result<Vec<PathBuf>> {
    if let Ok(Some(marker)) = integrity::read_marker(dir) {
        // The marker is the list: a file it does not name is not part of the step.
        let listed: Vec<PathBuf> = marker
            .files
            .keys()
            .filter(|n| n.starts_with(&format!("{kind}.")) && n.ends_with(".safetensors"))
            .map(|n| dir.join(n))
            .collect();
        if listed.is_empty() {
            bail!("{}: its marker lists no {kind} file", dir.display());
        }
        return Ok(listed);
    }
    let single = dir.join(format!("{kind}.safetensors"));
    if single.exists() {
        return Ok(vec![single]);
    }
    let manifest = dir.join("manifest.json");
    let text = std::fs::read_to_string(&manifest).with_context(|| {
        format!(
            "{}: neither {kind}.safetensors nor manifest.json",
            dir.display()
        )
    })?;
    let m: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: bad manifest: {e}", manifest.display()))?;
    let world = m["world"]
        .as_u64()
        .with_context(|| format!("{}: no world size", manifest.display()))?
        as usize;
    let files: Vec<PathBuf> = (0..world).map(|r| dir.join(shard_name(kind, r))).collect();
    if let Some(missing) = files.iter().find(|f| !f.exists()) {
        bail!(
            "{}: the manifest lists {} but it is missing",
            dir.display(),
            missing.display()
        );
    }
    Ok(files)
}

/// A stored part of a tensor: `{base}.rows.{start}-{end}{suffix}` -> (`{base}{suffix}`, start,
/// end); the suffix is `.exp_avg`, `.exp_avg_sq` or nothing (see `optim::piece_name`).
fn split_piece_name(name: &str) -> Option<(String, usize, usize)> {
    let at = name.rfind(".rows.")?;
    let rest = &name[at + ".rows.".len()..];
    let (range, suffix) = match rest.find('.') {
        Some(dot) => (&rest[..dot], &rest[dot..]),
        None => (rest, ""),
    };
    let (a, b) = range.split_once('-')?;
    let (start, end) = (a.parse().ok()?, b.parse().ok()?);
    (start < end).then(|| (format!("{}{suffix}", &name[..at]), start, end))
}

/// Every tensor of `kind` in a checkpoint, whichever shard holds it; tensors stored as row
/// ranges (ZeRO owners of parts of a tensor) are joined back into whole tensors, which must be
/// covered exactly once from row 0. `keep` sees the whole tensor's name.
fn load_tensors(
    dir: &Path,
    kind: &str,
    device: &Device,
    keep: &dyn Fn(&str) -> bool,
) -> Result<BTreeMap<String, Tensor>> {
    load_tensors_from(dir, &tensor_files(dir, kind)?, device, keep)
}

/// `load_tensors` over the given files of step `dir` (named in messages).
fn load_tensors_from(
    dir: &Path,
    files: &[PathBuf],
    device: &Device,
    keep: &dyn Fn(&str) -> bool,
) -> Result<BTreeMap<String, Tensor>> {
    let keep_stored = |n: &str| match split_piece_name(n) {
        Some((base, ..)) => keep(&base),
        None => keep(n),
    };
    let mut out = BTreeMap::new();
    let mut parts: BTreeMap<String, Vec<(usize, usize, Tensor)>> = BTreeMap::new();
    for f in files {
        for (name, t) in load_file_f32_where(f, device, &keep_stored)? {
            match split_piece_name(&name) {
                Some((base, start, end)) => parts.entry(base).or_default().push((start, end, t)),
                None => {
                    out.insert(name, t);
                }
            }
        }
    }
    for (base, mut pieces) in parts {
        pieces.sort_by_key(|p| p.0);
        let mut at = 0;
        for (start, end, t) in &pieces {
            if *start != at || t.dims().first() != Some(&(end - start)) {
                bail!("{}: the stored row ranges of {base} do not join up at row {at} (next: rows {start}-{end}, shape {:?})", dir.display(), t.dims());
            }
            at = *end;
        }
        if out.contains_key(&base) {
            bail!(
                "{}: {base} is stored both whole and as row ranges",
                dir.display()
            );
        }
        let ts: Vec<Tensor> = pieces.into_iter().map(|p| p.2).collect();
        out.insert(base, Tensor::cat(&ts, 0)?);
    }
    Ok(out)
}

/// The trained tensors a step folder stores, each (under its whole name, for a tensor stored
/// as row ranges) with the files that hold it; read from the file headers only, once.
pub fn overlay_index(dir: &Path) -> Result<BTreeMap<String, Vec<PathBuf>>> {
    let mut index: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for f in tensor_files(dir, "params")? {
        for n in crate::checkpoint::file_tensor_names(&f)? {
            let files = index
                .entry(split_piece_name(&n).map_or(n, |(base, ..)| base))
                .or_default();
            if files.last() != Some(&f) {
                files.push(f.clone());
            }
        }
    }
    Ok(index)
}

/// One trained tensor of step `dir` (its row ranges joined), f32 on the host, read from
/// `files` (its entry of `overlay_index`) only.
pub fn overlay_tensor(dir: &Path, name: &str, files: &[PathBuf]) -> Result<Tensor> {
    load_tensors_from(dir, files, &Device::Cpu, &|n| n == name)?
        .remove(name)
        .with_context(|| format!("{}: no trained tensor {name}", dir.display()))
}

/// Every `step-N` entry of `output_dir`, complete or not, oldest first.
pub fn step_entries(output_dir: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(output_dir) else {
        return vec![];
    };
    let mut out: Vec<(u64, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            Some((
                e.file_name()
                    .into_string()
                    .ok()?
                    .strip_prefix("step-")?
                    .parse()
                    .ok()?,
                e.path(),
            ))
        })
        .collect();
    out.sort();
    out
}

/// Complete checkpoints in `output_dir`, oldest first.
pub fn complete_checkpoints(output_dir: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(output_dir) else {
        return vec![];
    };
    let mut out: Vec<(u64, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let n: u64 = name.strip_prefix("step-")?.parse().ok()?;
            e.path().join(MARKER).exists().then(|| (n, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// Remove all but the newest `keep_last` complete checkpoints (0 keeps all). `newest` is the
/// step just written and verified: it is never removed, whatever the numbering. Steps that a
/// later stage started from are not at risk: that stage holds its own links to them (`base/`).
pub fn prune(output_dir: &Path, keep_last: usize, newest: &Path) -> Result<()> {
    if keep_last == 0 {
        return Ok(());
    }
    let all = complete_checkpoints(output_dir);
    for (_, dir) in all.iter().take(all.len().saturating_sub(keep_last)) {
        if dir == newest {
            continue;
        }
        std::fs::remove_dir_all(dir)
            .with_context(|| format!("cannot remove old checkpoint {}", dir.display()))?;
    }
    Ok(())
}

/// The indexer shape and top-k (as `IndexerDefaults`) and the indexer's init seed that the
/// step `dir` was trained with, from its recipe; None for a folder that is not a step. `eval`
/// and `export` read a step through this, so they see the model its run trained.
pub fn trained_settings(dir: &Path) -> Result<Option<(crate::config::IndexerDefaults, u64)>> {
    Ok(trained_recipe(dir)?.map(|r| (r.indexer_defaults(), r.model.init_seed)))
}

/// The recipe that trained a step-N folder (None for any other model directory).
fn trained_recipe(dir: &Path) -> Result<Option<crate::recipe::Recipe>> {
    if !is_checkpoint(dir) {
        return Ok(None);
    }
    let file = dir.join("recipe.toml");
    let text = std::fs::read_to_string(&file)
        .with_context(|| format!("cannot read {}", file.display()))?;
    let r =
        crate::recipe::Recipe::parse(&text, &[]).with_context(|| format!("{}", file.display()))?;
    Ok(Some(r))
}

/// For a training step-N folder, how its run's selection scored keys (`dsa.indexer_scores`
/// of its recipe); None for any other model directory.
pub fn trained_selection_scores(
    dir: &Path,
) -> Result<Option<crate::model::fp8_scores::SelectionScores>> {
    trained_recipe(dir)?
        .map(|r| r.selection_scores())
        .transpose()
}

pub fn is_checkpoint(dir: &Path) -> bool {
    dir.join("state.json").exists()
}

pub fn read_state(dir: &Path) -> Result<TrainState> {
    if !dir.join(MARKER).is_file() {
        bail!(
            "{} is not a complete checkpoint (no {MARKER} marker)",
            dir.display()
        );
    }
    let path = dir.join("state.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let state: TrainState = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: bad state: {e}", path.display()))?;
    if !(1..=FORMAT_VERSION).contains(&state.format_version) {
        bail!(
            "{}: checkpoint format {} is not supported (this build reads {FORMAT_VERSION})",
            path.display(),
            state.format_version
        );
    }
    Ok(state)
}

/// Load a checkpoint's state and the tensors (with their optimizer state) whose names `keep`
/// accepts (`|_| true` for all; an expert-parallel rank skips the other ranks' experts).
pub fn load(dir: &Path, device: &Device, keep: &dyn Fn(&str) -> bool) -> Result<Snapshot> {
    load_owned(dir, device, keep, &|_| None)
}

/// `load`, reading the tensors for which `rows_of` names owned row ranges as those rows only
/// (`Snapshot::param_rows`, `moment_rows`): the stored pieces that overlap them are read and
/// cut, whatever layout wrote the checkpoint, so a rank never holds the whole tensor.
pub fn load_owned(
    dir: &Path,
    device: &Device,
    keep: &dyn Fn(&str) -> bool,
    rows_of: &dyn Fn(&str) -> Option<Vec<Range<usize>>>,
) -> Result<Snapshot> {
    let state = read_state(dir)?;
    let (params, param_rows) = load_split(dir, "params", device, keep, rows_of)?;
    let tensor_of = |n: &str| -> String {
        n.strip_suffix(".exp_avg")
            .or(n.strip_suffix(".exp_avg_sq"))
            .unwrap_or(n)
            .to_string()
    };
    let keep_state = |n: &str| keep(&tensor_of(n));
    let (mut flat, mut flat_rows) = load_split(dir, "optimizer", device, &keep_state, &|n| {
        rows_of(&tensor_of(n))
    })?;
    let mut moment_rows = BTreeMap::new();
    let row_names: Vec<String> = flat_rows
        .keys()
        .filter_map(|n| n.strip_suffix(".exp_avg").map(String::from))
        .collect();
    for n in row_names {
        let m = flat_rows
            .remove(&format!("{n}.exp_avg"))
            .expect("listed above");
        let v = flat_rows
            .remove(&format!("{n}.exp_avg_sq"))
            .with_context(|| {
                format!(
                    "{}: optimizer state has rows of {n}.exp_avg but not of {n}.exp_avg_sq",
                    dir.display()
                )
            })?;
        let parts = m
            .into_iter()
            .zip(v)
            .map(|((rows, m), (_, v))| (rows, m, v))
            .collect();
        moment_rows.insert(n, parts);
    }
    let names: Vec<String> = flat
        .keys()
        .filter_map(|n| n.strip_suffix(".exp_avg").map(String::from))
        .collect();
    let mut moments = BTreeMap::new();
    for n in names {
        let m = flat.remove(&format!("{n}.exp_avg")).expect("listed above");
        let v = flat.remove(&format!("{n}.exp_avg_sq")).with_context(|| {
            format!(
                "{}: optimizer state has {n}.exp_avg but no {n}.exp_avg_sq",
                dir.display()
            )
        })?;
        moments.insert(n, (m, v));
    }
    let recipe_toml = std::fs::read_to_string(dir.join("recipe.toml")).unwrap_or_default();
    Ok(Snapshot {
        state,
        params,
        moments,
        param_rows,
        moment_rows,
        recipe_toml,
    })
}

/// The tensors of `kind` kept by `keep`: whole (`load_tensors`) where `rows_of` names no rows,
/// else the owned ranges' rows, cut from the stored pieces (or whole tensor) that overlap them;
/// every owned range must be covered by the stored rows.
#[allow(clippy::type_complexity)]
fn load_split(
    dir: &Path,
    kind: &str,
    device: &Device,
    keep: &dyn Fn(&str) -> bool,
    rows_of: &dyn Fn(&str) -> Option<Vec<Range<usize>>>,
) -> Result<(
    BTreeMap<String, Tensor>,
    BTreeMap<String, Vec<(Range<usize>, Tensor)>>,
)> {
    let files = tensor_files(dir, kind)?;
    let whole = load_tensors_from(dir, &files, device, &|n| keep(n) && rows_of(n).is_none())?;
    let overlapping = |n: &str| match split_piece_name(n) {
        Some((base, start, end)) => {
            keep(&base)
                && rows_of(&base)
                    .is_some_and(|rs| rs.iter().any(|r| r.start < end && start < r.end))
        }
        None => keep(n) && rows_of(n).is_some(),
    };
    let mut stored: BTreeMap<String, Vec<(usize, usize, Tensor)>> = BTreeMap::new();
    for f in &files {
        for (name, t) in load_file_f32_where(f, device, &overlapping)? {
            match split_piece_name(&name) {
                Some((base, start, end)) => stored.entry(base).or_default().push((start, end, t)),
                None => {
                    let n = t.dims().first().copied().unwrap_or(1);
                    stored.entry(name).or_default().push((0, n, t));
                }
            }
        }
    }
    let mut rows = BTreeMap::new();
    for (base, mut pieces) in stored {
        pieces.sort_by_key(|p| p.0);
        let mut parts = vec![];
        for r in rows_of(&base).unwrap_or_default() {
            let mut at = r.start;
            let mut cut = vec![];
            for (start, end, t) in pieces.iter().filter(|p| p.0 < r.end && r.start < p.1) {
                let (lo, hi) = ((*start).max(r.start), (*end).min(r.end));
                if lo != at {
                    break;
                }
                cut.push(t.narrow(0, lo - start, hi - lo)?);
                at = hi;
            }
            if at != r.end || r.is_empty() {
                bail!(
                    "{}: the stored rows of {base} do not cover rows {}-{} (covered up to {at})",
                    dir.display(),
                    r.start,
                    r.end
                );
            }
            // A copy, so that the stored piece it was cut from can be freed.
            parts.push((r, Tensor::cat(&cut, 0)?.copy()?));
        }
        rows.insert(base, parts);
    }
    Ok((whole, rows))
}

/// Where a model comes from: a Hugging Face folder plus parameter overlays, oldest first.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSource {
    pub hf_dir: PathBuf,
    /// step-N folders, oldest first.
    pub overlays: Vec<PathBuf>,
}

impl ModelSource {
    /// Verify every overlay's parameters against its marker, the share of `rank` of `world`
    /// (each rank reads every world-th file; the caller agrees on the outcome).
    pub fn verify_share(&self, rank: usize, world: usize) -> Result<()> {
        for dir in &self.overlays {
            integrity::verify_share(dir, Use::Model, rank, world)?;
        }
        Ok(())
    }

    /// The chain as a step in `output_dir/step-N` records it (paths from any sibling step).
    pub fn recorded_from(&self, output_dir: &Path) -> BaseChain {
        let step = output_dir.join("step-0");
        BaseChain {
            hf_dir: RecordedPath::new(&step, &self.hf_dir),
            overlays: self
                .overlays
                .iter()
                .map(|o| RecordedPath::new(&step, o))
                .collect(),
            overlay_markers: self.overlays.iter().map(|o| marker_digest(o)).collect(),
        }
    }
}

/// Resolve `path` (an HF folder or a `step-N` checkpoint, possibly chained).
pub fn resolve_model(path: &Path) -> Result<ModelSource> {
    let mut overlays = vec![];
    let mut cur = path.to_path_buf();
    for _ in 0..64 {
        if !is_checkpoint(&cur) {
            overlays.reverse();
            return Ok(ModelSource {
                hf_dir: cur,
                overlays,
            });
        }
        let state = read_state(&cur)?;
        overlays.push(cur.clone());
        if let Some(base) = &state.base {
            // The step lists its whole chain: no need to read its parents' state.
            let dir = crate::paths::resolved(&cur);
            let hf_dir = base.hf_dir.locate(&dir, |p| p.join("config.json").exists());
            let mut links: Vec<PathBuf> = base
                .overlays
                .iter()
                .map(|o| o.locate(&dir, is_checkpoint))
                .collect();
            for (i, (o, l)) in base.overlays.iter().zip(&links).enumerate() {
                if !is_checkpoint(l) {
                    bail!(
                        "{}: a step it was trained from is gone: neither {} nor {} holds it",
                        cur.display(),
                        dir.join(&o.relative).display(),
                        o.absolute
                    );
                }
                if let Some(want) = base.overlay_markers.get(i).filter(|m| !m.is_empty()) {
                    if marker_digest(l) != *want {
                        bail!("{}: {} is not the step it was trained from (its marker differs from the one recorded): replaced or damaged", cur.display(), l.display());
                    }
                }
            }
            overlays.reverse();
            links.extend(overlays);
            return Ok(ModelSource {
                hf_dir,
                overlays: links,
            });
        }
        cur = PathBuf::from(state.model_path);
    }
    bail!(
        "{}: checkpoint chain is longer than 64 links (a cycle?)",
        path.display()
    )
}

/// `source` with each overlay replaced by its place in `<output_dir>/base/` (`<i>-<name>`);
/// overlays already there stay. Paths only: `link_base` makes them.
pub fn linked_source(output_dir: &Path, source: &ModelSource) -> ModelSource {
    let base = crate::paths::resolved(&output_dir.join("base"));
    let mut overlays = vec![];
    for (i, dir) in source.overlays.iter().enumerate() {
        let abs = crate::paths::resolved(dir);
        overlays.push(if abs.starts_with(&base) {
            abs
        } else {
            let name = abs
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "step".into());
            base.join(format!("{i}-{name}"))
        });
    }
    ModelSource {
        hf_dir: crate::paths::resolved(&source.hf_dir),
        overlays,
    }
}

/// Give a run its own links to the steps its model comes from: every overlay of `source`
/// (parameters, state, recipe and marker, not the optimizer state) is hard-linked into its
/// `linked_source` place (copied when the file system cannot link), so that the run no longer
/// depends on the other run keeping those steps where they are. Returns the linked source.
pub fn link_base(output_dir: &Path, source: &ModelSource) -> Result<ModelSource> {
    let linked = linked_source(output_dir, source);
    for (from, dest) in source.overlays.iter().zip(&linked.overlays) {
        if dest.join(MARKER).exists() {
            // Linked before (a resumed run), or the overlay is already a link: it must be the same
            // step (the same marker, which holds every file's checksum).
            if from != dest && marker_digest(from) != marker_digest(dest) {
                bail!("{} holds another step than {} (a leftover of an earlier start?); remove it or choose a new run.output_dir", dest.display(), from.display());
            }
            continue;
        }
        let parent = dest.parent().context("a base link has a parent folder")?;
        let tmp = parent.join(format!(
            ".{}.tmp",
            dest.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut names: Vec<String> = std::fs::read_dir(from)
            .with_context(|| format!("cannot read {}", from.display()))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_file())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with("optimizer."))
            .collect();
        names.sort();
        let mut copied = 0u64;
        for n in &names {
            let (a, b) = (from.join(n), tmp.join(n));
            if std::fs::hard_link(&a, &b).is_err() {
                copied += std::fs::copy(&a, &b).with_context(|| {
                    format!("cannot link or copy {} to {}", a.display(), b.display())
                })?;
            }
        }
        if copied > 0 {
            crate::elog!(
                "[train] {} cannot be hard-linked here: copied {:.1} MB of it into {}",
                from.display(),
                copied as f64 / 1e6,
                dest.display()
            );
        }
        std::fs::rename(&tmp, dest)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), dest.display()))?;
    }
    Ok(linked)
}

/// Overlay tensors of every link of `src`, later links winning.
pub fn overlay_params(src: &ModelSource, device: &Device) -> Result<BTreeMap<String, Tensor>> {
    overlay_params_where(src, device, &|_| true)
}

/// As `overlay_params`, keeping only the tensors whose names `keep` accepts.
pub fn overlay_params_where(
    src: &ModelSource,
    device: &Device,
    keep: &dyn Fn(&str) -> bool,
) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    for dir in &src.overlays {
        out.extend(load_tensors(dir, "params", device, keep)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_range_names_parse_back_to_the_whole_tensor_and_its_rows() {
        let p = |n: &str| split_piece_name(n);
        assert_eq!(
            p("lm_head.weight.rows.0-5"),
            Some(("lm_head.weight".into(), 0, 5))
        );
        assert_eq!(
            p("model.embed_tokens.weight.rows.64640-129280.exp_avg_sq"),
            Some(("model.embed_tokens.weight.exp_avg_sq".into(), 64640, 129280))
        );
        assert_eq!(p("x.rows.3-7.exp_avg"), Some(("x.exp_avg".into(), 3, 7)));
        for whole in [
            "lm_head.weight",
            "lm_head.weight.exp_avg",
            "x.rows.5-5",
            "x.rows.a-b",
            "x.rows.3",
        ] {
            assert_eq!(p(whole), None, "{whole}");
        }
    }

    #[test]
    fn parts_join_into_whole_tensors_and_gaps_are_one_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let dev = Device::Cpu;
        let rows = |a: f32, n: usize| {
            Tensor::from_vec(
                (0..2 * n).map(|i| a + i as f32).collect::<Vec<_>>(),
                (n, 2),
                &dev,
            )
            .unwrap()
        };
        let write = |name: &str, parts: &[(&str, Tensor)]| {
            let stored: Vec<StoredTensor> = parts
                .iter()
                .map(|(n, t)| f32_tensor(n, t).unwrap())
                .collect();
            write_safetensors(&dir.path().join(name), &stored).unwrap();
        };
        std::fs::write(dir.path().join("manifest.json"), r#"{"world": 2}"#).unwrap();
        write(
            &shard_name("params", 0),
            &[("w.rows.2-5", rows(10.0, 3)), ("b", rows(0.0, 1))],
        );
        write(&shard_name("params", 1), &[("w.rows.0-2", rows(0.0, 2))]);
        let got = load_tensors(dir.path(), "params", &dev, &|_| true).unwrap();
        assert_eq!(got.keys().collect::<Vec<_>>(), ["b", "w"]);
        let w: Vec<Vec<f32>> = got["w"].to_vec2().unwrap();
        assert_eq!(
            w,
            [
                [0.0, 1.0],
                [2.0, 3.0],
                [10.0, 11.0],
                [12.0, 13.0],
                [14.0, 15.0]
            ]
        );
        // `keep` sees the whole tensor's name.
        assert!(load_tensors(dir.path(), "params", &dev, &|n| n != "w")
            .unwrap()
            .keys()
            .eq(["b"]));
        write(&shard_name("params", 1), &[("w.rows.0-1", rows(0.0, 1))]);
        let err = load_tensors(dir.path(), "params", &dev, &|_| true)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("row ranges of w do not join up at row 1"),
            "{err}"
        );
    }
}
