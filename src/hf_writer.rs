//! Writing a Hugging Face safetensors checkpoint: shards `model-0000K-of-0000N.safetensors`,
//! `model.safetensors.index.json` and `config.json`. Used for the generated tiny checkpoint, the
//! loader benchmark, bad-input tests and export.
//!
//! Every tensor's size follows from its dtype and shape, so headers and shard cuts are planned
//! before any bytes exist and tensors can be produced one at a time while their shard is
//! written (`write_checkpoint_with`): an export never holds a second copy of the model.
//! `write_dir_atomically` makes a directory appear complete or not at all.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use half::bf16;

use crate::checkpoint::{StDtype, FP8_BLOCK, SCALE_SUFFIX};
use crate::fp8;

/// One tensor ready to be written: its bytes are already in the stored dtype.
pub struct StoredTensor {
    pub name: String,
    pub dtype: StDtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl StoredTensor {
    pub fn f32(name: &str, shape: &[usize], v: &[f32]) -> Self {
        Self {
            name: name.into(),
            dtype: StDtype::F32,
            shape: shape.to_vec(),
            bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
    pub fn bf16(name: &str, shape: &[usize], v: &[f32]) -> Self {
        let bytes = v
            .iter()
            .flat_map(|x| bf16::from_f32(*x).to_bits().to_le_bytes())
            .collect();
        Self {
            name: name.into(),
            dtype: StDtype::BF16,
            shape: shape.to_vec(),
            bytes,
        }
    }
    /// An FP8 weight and its block scales (two tensors, as DeepSeek stores them).
    pub fn fp8(name: &str, shape: &[usize], v: &[f32]) -> [Self; 2] {
        let (rows, cols) = (shape[0], shape[1]);
        let (q, s) = fp8::quantize(v, rows, cols, FP8_BLOCK);
        let scale_shape = [fp8::blocks(rows, FP8_BLOCK), fp8::blocks(cols, FP8_BLOCK)];
        [
            Self {
                name: name.into(),
                dtype: StDtype::F8E4M3,
                shape: shape.to_vec(),
                bytes: q,
            },
            Self::f32(&format!("{name}{SCALE_SUFFIX}"), &scale_shape, &s),
        ]
    }
}

/// A tensor as a shard will hold it, known before its bytes exist.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorPlan {
    pub name: String,
    pub dtype: StDtype,
    pub shape: Vec<usize>,
}

impl TensorPlan {
    pub fn nbytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size()
    }
}

/// The safetensors header for `plan`: u64 little-endian length, then JSON padded with spaces
/// to a multiple of 8 bytes so the data that follows is aligned.
fn header_bytes(plan: &[TensorPlan]) -> Result<Vec<u8>> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for t in plan {
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": t.dtype.name(), "shape": t.shape, "data_offsets": [offset, offset + t.nbytes()]}),
        );
        offset += t.nbytes();
    }
    let mut text = serde_json::to_string(&header)?;
    while text.len() % 8 != 0 {
        text.push(' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    Ok(out)
}

/// Write one safetensors file whose tensors' bytes come from `produce`, one at a time, in order.
fn write_shard(
    path: &Path,
    plan: &[TensorPlan],
    produce: &mut impl FnMut(&TensorPlan) -> Result<Vec<u8>>,
) -> Result<()> {
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut f = std::io::BufWriter::new(file);
    f.write_all(&header_bytes(plan)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    for t in plan {
        let bytes = produce(t)?;
        if bytes.len() != t.nbytes() {
            bail!(
                "tensor {} was produced with {} bytes but its shape {:?} of {} needs {}",
                t.name,
                bytes.len(),
                t.shape,
                t.dtype.name(),
                t.nbytes()
            );
        }
        f.write_all(&bytes)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    // Flushed and synced before the caller may rename the directory into place, so a crash
    // cannot leave a committed checkpoint with missing data.
    let file = f
        .into_inner()
        .map_err(|e| e.into_error())
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.sync_all()
        .with_context(|| format!("cannot sync {}", path.display()))?;
    Ok(())
}

/// Write one safetensors file.
pub fn write_safetensors(path: &Path, tensors: &[StoredTensor]) -> Result<()> {
    let plan: Vec<TensorPlan> = tensors.iter().map(StoredTensor::plan).collect();
    let mut next = tensors.iter();
    write_shard(path, &plan, &mut |_| {
        Ok(next
            .next()
            .expect("one tensor per plan entry")
            .bytes
            .clone())
    })
}

impl StoredTensor {
    fn plan(&self) -> TensorPlan {
        TensorPlan {
            name: self.name.clone(),
            dtype: self.dtype,
            shape: self.shape.clone(),
        }
    }
}

/// Write a sharded checkpoint: tensors in order, a new shard once `max_shard_bytes` is passed
/// (so a layer's tensors may span two shards, as in real checkpoints), plus the index and config.
pub fn write_checkpoint(
    dir: &Path,
    config: &serde_json::Value,
    tensors: Vec<StoredTensor>,
    max_shard_bytes: usize,
) -> Result<()> {
    let plan: Vec<TensorPlan> = tensors.iter().map(StoredTensor::plan).collect();
    let mut next = tensors.into_iter();
    write_checkpoint_with(dir, config, &plan, max_shard_bytes, |_| {
        Ok(next.next().expect("one tensor per plan entry").bytes)
    })
}

/// `write_checkpoint` for tensors produced on demand: `produce` is called once per entry of
/// `plan`, in order, and must return exactly that tensor's bytes in its stored dtype. Only
/// one produced tensor is alive at a time. The shard cut rule is `write_checkpoint`'s.
pub fn write_checkpoint_with(
    dir: &Path,
    config: &serde_json::Value,
    plan: &[TensorPlan],
    max_shard_bytes: usize,
    mut produce: impl FnMut(&TensorPlan) -> Result<Vec<u8>>,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut shards: Vec<&[TensorPlan]> = vec![];
    let (mut start, mut size) = (0, 0);
    for (i, t) in plan.iter().enumerate() {
        if size > 0 && size + t.nbytes() > max_shard_bytes {
            shards.push(&plan[start..i]);
            (start, size) = (i, 0);
        }
        size += t.nbytes();
    }
    shards.push(&plan[start..]);
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, n);
        for t in *shard {
            weight_map.insert(t.name.clone(), file.clone().into());
        }
        write_shard(&dir.join(&file), shard, &mut produce)?;
    }
    let total: usize = plan.iter().map(TensorPlan::nbytes).sum();
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    let index_path = dir.join("model.safetensors.index.json");
    std::fs::write(&index_path, serde_json::to_string_pretty(&index)?)
        .with_context(|| format!("cannot write {}", index_path.display()))?;
    let config_path = dir.join("config.json");
    std::fs::write(&config_path, serde_json::to_string_pretty(config)?)
        .with_context(|| format!("cannot write {}", config_path.display()))?;
    Ok(())
}

/// Check that `out` can receive a new directory: it does not exist, or is an empty directory.
pub fn check_output_dir(out: &Path) -> Result<()> {
    if !out.exists() {
        return Ok(());
    }
    if !out.is_dir() {
        bail!("output {} exists and is not a directory", out.display());
    }
    let mut entries = std::fs::read_dir(out)
        .with_context(|| format!("cannot read output directory {}", out.display()))?;
    if entries.next().is_some() {
        bail!("output directory {} is not empty; refusing to write into it (give a new or empty directory)", out.display());
    }
    Ok(())
}

/// Create directory `out` complete or not at all. `write` fills a sibling `.NAME.partial`,
/// which is renamed to `out` only after `write` succeeded (rename is atomic and may replace
/// an empty directory). On error the partial directory is removed; one left by a killed run
/// is clearly named, never mistaken for a checkpoint, and replaced by the next attempt.
/// `out` must not exist or be an empty directory.
pub fn write_dir_atomically(out: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    check_output_dir(out)?;
    let name = out
        .file_name()
        .with_context(|| format!("output {} does not end in a directory name", out.display()))?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    let partial = parent.join(format!(".{}.partial", name.to_string_lossy()));
    if partial.exists() {
        crate::elog!(
            "[write] removing {}, left by an interrupted write",
            partial.display()
        );
        std::fs::remove_dir_all(&partial)
            .with_context(|| format!("cannot remove {}", partial.display()))?;
    }
    std::fs::create_dir(&partial)
        .with_context(|| format!("cannot create {}", partial.display()))?;
    if let Err(e) = write(&partial) {
        let _ = std::fs::remove_dir_all(&partial);
        return Err(e);
    }
    std::fs::rename(&partial, out)
        .with_context(|| format!("cannot rename {} to {}", partial.display(), out.display()))?;
    Ok(())
}
