//! Megatron-LM's indexed datasets (`PREFIX.bin` + `PREFIX.idx`, as `preprocess_data.py` writes
//! them): the long-context corpora labs already hold, read in place.
//!
//! `.idx` (little-endian): the 9-byte magic `MMIDIDX\0\0`, version u64 = 1, the token dtype code
//! u8 (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 8 uint16; 6 float64 and 7 float32 are not
//! token ids), the sequence count u64, the document-index count u64, then the sequence lengths
//! (i32 each), the sequences' byte offsets into `.bin` (i64 each) and the document indices
//! (i64 each). `.bin` holds the sequences' ids back to back. The stream is the `.bin` read in
//! order (documents packed, as in our prepared format); the sequence table is checked against it
//! (contiguous offsets, the file's size) so a truncated or foreign pair is refused at open.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

const MAGIC: &[u8; 9] = b"MMIDIDX\x00\x00";

/// How ids are stored: bytes per id, signed or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Width {
    pub bytes: usize,
    pub signed: bool,
}

impl Width {
    pub const U32: Width = Width {
        bytes: 4,
        signed: false,
    };

    fn from_code(code: u8) -> Option<Width> {
        Some(match code {
            1 => Width {
                bytes: 1,
                signed: false,
            },
            2 => Width {
                bytes: 1,
                signed: true,
            },
            3 => Width {
                bytes: 2,
                signed: true,
            },
            4 => Width {
                bytes: 4,
                signed: true,
            },
            5 => Width {
                bytes: 8,
                signed: true,
            },
            8 => Width {
                bytes: 2,
                signed: false,
            },
            _ => return None,
        })
    }

    /// The id in `b` (`self.bytes` long); None for a negative signed value.
    pub fn decode(self, b: &[u8]) -> Option<u64> {
        let mut le = [0u8; 8];
        le[..b.len()].copy_from_slice(b);
        if self.signed && b[b.len() - 1] & 0x80 != 0 {
            return None;
        }
        Some(u64::from_le_bytes(le))
    }
}

/// A Megatron dataset's files and what its index says of them.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    pub bin: PathBuf,
    pub width: Width,
    pub tokens: u64,
    pub sequences: u64,
}

/// `path` names a Megatron dataset if it is a prefix with `.bin` and `.idx` beside it, or one of
/// those two files with its sibling present.
pub fn prefix_of(path: &Path) -> Option<PathBuf> {
    let with = |p: &Path, ext: &str| PathBuf::from(format!("{}.{ext}", p.display()));
    if with(path, "idx").is_file() && with(path, "bin").is_file() {
        return Some(path.to_path_buf());
    }
    match path.extension().and_then(|e| e.to_str()) {
        Some("idx" | "bin") => {
            let prefix = path.with_extension("");
            (with(&prefix, "idx").is_file() && with(&prefix, "bin").is_file()).then_some(prefix)
        }
        _ => None,
    }
}

/// Read and check `PREFIX.idx` against `PREFIX.bin`.
pub fn open(prefix: &Path) -> Result<Dataset> {
    let idx = PathBuf::from(format!("{}.idx", prefix.display()));
    let bin = PathBuf::from(format!("{}.bin", prefix.display()));
    let mut f =
        std::fs::File::open(&idx).with_context(|| format!("cannot open {}", idx.display()))?;
    let mut head = [0u8; 34];
    f.read_exact(&mut head).map_err(|_| {
        anyhow::anyhow!(
            "{} is shorter than a Megatron index header (34 bytes)",
            idx.display()
        )
    })?;
    if &head[..9] != MAGIC {
        bail!(
            "{} does not start with MMIDIDX: not a Megatron indexed dataset index",
            idx.display()
        );
    }
    let u64_at = |o: usize| u64::from_le_bytes(head[o..o + 8].try_into().expect("8 bytes"));
    if u64_at(9) != 1 {
        bail!(
            "{}: index version {} (this build reads version 1)",
            idx.display(),
            u64_at(9)
        );
    }
    let width = Width::from_code(head[17]).with_context(|| {
        format!(
            "{}: dtype code {} is not an integer token type",
            idx.display(),
            head[17]
        )
    })?;
    let (sequences, doc_count) = (u64_at(18), u64_at(26));
    let need = sequences
        .checked_mul(12)
        .and_then(|x| x.checked_add(doc_count.checked_mul(8)?))
        .and_then(|x| x.checked_add(34));
    let idx_len = f
        .metadata()
        .with_context(|| format!("cannot stat {}", idx.display()))?
        .len();
    if need != Some(idx_len) {
        bail!("{}: {idx_len} bytes, but its header announces {sequences} sequences and {doc_count} document indices ({} bytes): truncated or corrupt",
            idx.display(), need.map_or_else(|| "too many".into(), |n| n.to_string()));
    }
    let mut table = vec![0u8; (sequences * 12) as usize];
    f.read_exact(&mut table)
        .with_context(|| format!("cannot read {}", idx.display()))?;
    let (lens, ptrs) = table.split_at((sequences * 4) as usize);
    let mut at = 0u64;
    for (i, (l, p)) in lens.chunks_exact(4).zip(ptrs.chunks_exact(8)).enumerate() {
        let len = i32::from_le_bytes(l.try_into().expect("4 bytes"));
        let ptr = i64::from_le_bytes(p.try_into().expect("8 bytes"));
        if len < 0 || ptr != at as i64 {
            bail!("{}: sequence {i} (length {len}, offset {ptr}) does not follow the previous one at byte {at}: not a packed dataset", idx.display());
        }
        at += len as u64 * width.bytes as u64;
    }
    let bin_len = std::fs::metadata(&bin)
        .with_context(|| format!("cannot stat {}", bin.display()))?
        .len();
    if bin_len != at {
        bail!(
            "{}: {bin_len} bytes, but {} lists {} bytes of tokens: truncated or not its pair",
            bin.display(),
            idx.display(),
            at
        );
    }
    if at == 0 {
        bail!("{} lists no tokens", idx.display());
    }
    Ok(Dataset {
        bin,
        width,
        tokens: at / width.bytes as u64,
        sequences,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_decode_little_endian_and_negative_signed_ids_are_refused() {
        assert_eq!(
            Width {
                bytes: 2,
                signed: true
            }
            .decode(&[0xff, 0xff]),
            None
        );
        assert_eq!(
            Width {
                bytes: 2,
                signed: false
            }
            .decode(&[0xff, 0xff]),
            Some(65535)
        );
        assert_eq!(
            Width {
                bytes: 4,
                signed: true
            }
            .decode(&[1, 2, 0, 0]),
            Some(0x0201)
        );
        assert_eq!(Width::from_code(7), None, "float32 is not a token type");
    }
}
