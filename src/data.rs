//! Token data. For now: raw little-endian u32 token files, as `eval --tokens` reads them.

use std::path::Path;

use anyhow::{bail, Context, Result};

/// Read a raw little-endian u32 token file, checking every id against the vocabulary.
pub fn read_token_file(path: &Path, vocab_size: usize) -> Result<Vec<u32>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read token file {}", path.display()))?;
    if bytes.is_empty() {
        bail!("token file {} is empty", path.display());
    }
    if bytes.len() % 4 != 0 {
        bail!(
            "token file {} has {} bytes, not a multiple of 4: expected raw little-endian u32 token ids",
            path.display(), bytes.len()
        );
    }
    let tokens: Vec<u32> = bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    if let Some((pos, id)) = tokens.iter().enumerate().find(|(_, &id)| id as usize >= vocab_size) {
        bail!("token file {}: token {id} at position {pos} is outside the vocabulary (vocab_size {vocab_size})", path.display());
    }
    Ok(tokens)
}

/// Write tokens as raw little-endian u32.
pub fn write_token_file(path: &Path, tokens: &[u32]) -> Result<()> {
    let bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
    std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

// ---- TEMPORARY shim until the data branch lands (not committed) ----
use serde::{Deserialize, Serialize};
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct DataCursor { pub epoch: u64, pub index: u64 }
pub struct TokenStream { tokens: Vec<u32> }
impl TokenStream {
    pub fn open(path: &Path, vocab: usize) -> Result<Self> { Ok(Self { tokens: read_token_file(path, vocab)? }) }
}
pub struct WindowSampler { s: TokenStream, seq: usize, seed: u64, c: DataCursor, order: Vec<u64> }
impl WindowSampler {
    pub fn new(s: TokenStream, seq: usize, seed: u64) -> Result<Self> {
        let mut w = Self { order: vec![], s, seq, seed, c: DataCursor::default() }; w.shuffle(); Ok(w)
    }
    fn shuffle(&mut self) {
        let n = (self.s.tokens.len() / self.seq) as u64;
        let mut rng = crate::rng::SplitMix64::new(self.seed ^ self.c.epoch.wrapping_mul(0x9E37));
        self.order = (0..n).collect();
        for i in (1..n as usize).rev() { let j = (rng.next_u64() % (i as u64 + 1)) as usize; self.order.swap(i, j); }
    }
    pub fn restore(&mut self, c: DataCursor) { self.c = c; self.shuffle(); }
    pub fn cursor(&self) -> DataCursor { self.c.clone() }
    pub fn next_batch(&mut self, n: usize) -> Result<Vec<Vec<u32>>> {
        let mut out = vec![];
        for _ in 0..n {
            if self.c.index as usize >= self.order.len() { self.c.epoch += 1; self.c.index = 0; self.shuffle(); }
            let w = self.order[self.c.index as usize] as usize; self.c.index += 1;
            out.push(self.s.tokens[w * self.seq..(w + 1) * self.seq].to_vec());
        }
        Ok(out)
    }
}
