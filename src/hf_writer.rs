//! Writing a Hugging Face safetensors checkpoint: shards `model-0000K-of-0000N.safetensors`,
//! `model.safetensors.index.json` and `config.json`. Used for the generated tiny checkpoint, the
//! loader benchmark, bad-input tests and (later) export.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
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
        Self { name: name.into(), dtype: StDtype::F32, shape: shape.to_vec(), bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect() }
    }
    pub fn bf16(name: &str, shape: &[usize], v: &[f32]) -> Self {
        let bytes = v.iter().flat_map(|x| bf16::from_f32(*x).to_bits().to_le_bytes()).collect();
        Self { name: name.into(), dtype: StDtype::BF16, shape: shape.to_vec(), bytes }
    }
    /// An FP8 weight and its block scales (two tensors, as DeepSeek stores them).
    pub fn fp8(name: &str, shape: &[usize], v: &[f32]) -> [Self; 2] {
        let (rows, cols) = (shape[0], shape[1]);
        let (q, s) = fp8::quantize(v, rows, cols, FP8_BLOCK);
        let scale_shape = [fp8::blocks(rows, FP8_BLOCK), fp8::blocks(cols, FP8_BLOCK)];
        [
            Self { name: name.into(), dtype: StDtype::F8E4M3, shape: shape.to_vec(), bytes: q },
            Self::f32(&format!("{name}{SCALE_SUFFIX}"), &scale_shape, &s),
        ]
    }
}

/// Write one safetensors file. The header is padded with spaces to a multiple of 8 bytes so
/// the data that follows is aligned.
pub fn write_safetensors(path: &Path, tensors: &[StoredTensor]) -> Result<()> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for t in tensors {
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": t.dtype.name(), "shape": t.shape, "data_offsets": [offset, offset + t.bytes.len()]}),
        );
        offset += t.bytes.len();
    }
    let mut text = serde_json::to_string(&header)?;
    while text.len() % 8 != 0 {
        text.push(' ');
    }
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?,
    );
    f.write_all(&(text.len() as u64).to_le_bytes())?;
    f.write_all(text.as_bytes())?;
    for t in tensors {
        f.write_all(&t.bytes)?;
    }
    f.flush().with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Write a sharded checkpoint: tensors in order, a new shard once `max_shard_bytes` is passed
/// (so a layer's tensors may span two shards, as in real checkpoints), plus the index and config.
pub fn write_checkpoint(
    dir: &Path,
    config: &serde_json::Value,
    tensors: Vec<StoredTensor>,
    max_shard_bytes: usize,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut shards: Vec<Vec<StoredTensor>> = vec![vec![]];
    let mut size = 0;
    let total: usize = tensors.iter().map(|t| t.bytes.len()).sum();
    for t in tensors {
        if size > 0 && size + t.bytes.len() > max_shard_bytes {
            shards.push(vec![]);
            size = 0;
        }
        size += t.bytes.len();
        shards.last_mut().unwrap().push(t);
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, n);
        for t in shard {
            weight_map.insert(t.name.clone(), file.clone().into());
        }
        write_safetensors(&dir.join(&file), shard)?;
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), serde_json::to_string_pretty(&index)?)?;
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(config)?)?;
    Ok(())
}
