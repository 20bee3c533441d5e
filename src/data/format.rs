//! The on-disk format of a prepared token directory (docs/data.md is the reference):
//! `tokens-NNNNN.bin` shards, each a 32-byte header then little-endian u32 ids, and
//! `index.json`, written last, that lists them.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

pub const MAGIC: [u8; 8] = *b"DSATOKS\0";
pub const VERSION: u32 = 1;
pub const HEADER_BYTES: usize = 32;
pub const INDEX_FILE: &str = "index.json";

/// The file name of shard `i`.
pub fn shard_name(i: usize) -> String {
    format!("tokens-{i:05}.bin")
}

/// The 32-byte shard header: magic, version u32, reserved u32, tokens u64, documents u64.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardHeader {
    pub tokens: u64,
    pub documents: u64,
}

impl ShardHeader {
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut h = [0u8; HEADER_BYTES];
        h[0..8].copy_from_slice(&MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        // h[12..16] is reserved and stays zero.
        h[16..24].copy_from_slice(&self.tokens.to_le_bytes());
        h[24..32].copy_from_slice(&self.documents.to_le_bytes());
        h
    }

    /// Parse and check a shard's header against the shard's size in bytes, so that a truncated
    /// or overlong shard is caught when it is opened rather than as a short read later.
    pub fn decode(bytes: &[u8], file_len: u64, path: &Path) -> Result<Self> {
        if bytes.len() < HEADER_BYTES {
            bail!(
                "token shard {} has {} bytes, fewer than its {HEADER_BYTES}-byte header",
                path.display(),
                bytes.len()
            );
        }
        if bytes[0..8] != MAGIC {
            bail!(
                "token shard {} does not start with the magic DSATOKS: not a prepared token shard",
                path.display()
            );
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
        if version != VERSION {
            bail!(
                "token shard {} has format version {version}; this build reads version {VERSION}",
                path.display()
            );
        }
        let tokens = u64::from_le_bytes(bytes[16..24].try_into().unwrap());
        let documents = u64::from_le_bytes(bytes[24..32].try_into().unwrap());
        let expected = tokens
            .checked_mul(4)
            .and_then(|b| b.checked_add(HEADER_BYTES as u64));
        if expected != Some(file_len) {
            bail!(
                "token shard {} has {file_len} bytes but its header announces {tokens} tokens ({} bytes): truncated or corrupt",
                path.display(),
                expected.map_or_else(|| "too many".to_string(), |b| b.to_string())
            );
        }
        Ok(Self { tokens, documents })
    }
}

/// One shard as listed in index.json.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardEntry {
    pub file: String,
    pub tokens: u64,
    pub documents: u64,
}

/// index.json of a prepared directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataIndex {
    pub version: u32,
    pub shards: Vec<ShardEntry>,
    pub total_tokens: u64,
    pub total_documents: u64,
    pub bos_id: u32,
    pub eos_id: u32,
    /// The tokenizer.json path as given to `data prepare`.
    pub tokenizer: String,
    /// The tokenizer's vocabulary size including its added tokens.
    pub vocab_size: u64,
}

impl DataIndex {
    /// Read and check index.json for internal consistency (the shards themselves are checked
    /// when they are opened).
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let index: DataIndex = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a valid token index", path.display()))?;
        if index.version != VERSION {
            bail!(
                "{} has version {}; this build reads version {VERSION}",
                path.display(),
                index.version
            );
        }
        if index.shards.is_empty() {
            bail!("{} lists no shards", path.display());
        }
        for s in &index.shards {
            // Shards live beside index.json; a path would let an index point anywhere.
            if s.file.is_empty() || s.file.contains(['/', '\\']) || s.file == ".." || s.file == "."
            {
                bail!(
                    "{}: shard file {:?} is not a plain file name",
                    path.display(),
                    s.file
                );
            }
        }
        let tokens: u64 = index.shards.iter().map(|s| s.tokens).sum();
        let documents: u64 = index.shards.iter().map(|s| s.documents).sum();
        if tokens != index.total_tokens {
            bail!(
                "{}: total_tokens is {} but the shards hold {tokens}",
                path.display(),
                index.total_tokens
            );
        }
        if documents != index.total_documents {
            bail!(
                "{}: total_documents is {} but the shards hold {documents}",
                path.display(),
                index.total_documents
            );
        }
        Ok(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_checks_the_file_size() {
        let h = ShardHeader {
            tokens: 5,
            documents: 2,
        };
        let bytes = h.encode();
        assert_eq!(&bytes[0..8], b"DSATOKS\0");
        assert_eq!(bytes[8..12], 1u32.to_le_bytes());
        assert_eq!(bytes[12..16], [0; 4]);
        let p = Path::new("s.bin");
        assert_eq!(ShardHeader::decode(&bytes, 32 + 20, p).unwrap(), h);
        let err = ShardHeader::decode(&bytes, 32 + 16, p)
            .unwrap_err()
            .to_string();
        assert!(err.contains("s.bin") && err.contains("truncated"), "{err}");
        let mut bad = bytes;
        bad[8] = 2;
        assert!(ShardHeader::decode(&bad, 52, p)
            .unwrap_err()
            .to_string()
            .contains("version 2"));
        bad[0] = b'X';
        assert!(ShardHeader::decode(&bad, 52, p)
            .unwrap_err()
            .to_string()
            .contains("magic"));
    }

    #[test]
    fn header_with_an_absurd_count_is_an_error_not_an_overflow() {
        let bytes = ShardHeader {
            tokens: u64::MAX,
            documents: 0,
        }
        .encode();
        assert!(ShardHeader::decode(&bytes, 32, Path::new("s.bin"))
            .unwrap_err()
            .to_string()
            .contains("too many"));
    }
}
