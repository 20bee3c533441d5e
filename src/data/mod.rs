//! Token data for training and evaluation (docs/data.md describes the formats).
//!
//! - `prepare`: `dsa-train data prepare`, text (.txt, .jsonl, .parquet) to a prepared token
//!   directory; `parquet`: its Parquet reader.
//! - `format`: that directory's shard header and index.json.
//! - `megatron`: Megatron-LM indexed datasets (`.bin` + `.idx`), read in place.
//! - `stream`: `TokenStream`, one view of a prepared directory, a Megatron dataset or a raw file.
//! - `sampler`: `WindowSampler`, shuffled training windows with an exact-resume cursor.
//! - `blend`: `Sampler`, one corpus or a weighted blend of several, with an exact-resume cursor.
//! - here: raw little-endian u32 token files, as `eval --tokens` reads them.

pub mod blend;
pub mod format;
pub mod megatron;
pub mod parquet;
pub mod prepare;
pub mod sampler;
pub mod stream;

pub use blend::{BlendCursor, BlendSource, Sampler};
pub use format::DataIndex;
pub use prepare::{prepare, PrepareArgs, PrepareReport};
pub use sampler::{DataCursor, WindowSampler};
pub use stream::TokenStream;

use std::path::Path;

use anyhow::{bail, Context, Result};

/// Read a raw little-endian u32 token file, checking every id against the vocabulary.
pub fn read_token_file(path: &Path, vocab_size: usize) -> Result<Vec<u32>> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("cannot read token file {}", path.display()))?;
    if !meta.is_file() {
        bail!(
            "token file {} is not a regular file (a device, pipe or socket has no fixed size)",
            path.display()
        );
    }
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read token file {}", path.display()))?;
    if bytes.is_empty() {
        bail!("token file {} is empty", path.display());
    }
    if bytes.len() % 4 != 0 {
        bail!(
            "token file {} has {} bytes, not a multiple of 4: expected raw little-endian u32 token ids",
            path.display(), bytes.len()
        );
    }
    let tokens: Vec<u32> = bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    if let Some((pos, id)) = tokens
        .iter()
        .enumerate()
        .find(|(_, &id)| id as usize >= vocab_size)
    {
        bail!("token file {}: token {id} at position {pos} is outside the vocabulary (vocab_size {vocab_size})", path.display());
    }
    Ok(tokens)
}

/// Write tokens as raw little-endian u32.
pub fn write_token_file(path: &Path, tokens: &[u32]) -> Result<()> {
    let bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
    std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}
