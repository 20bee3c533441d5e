//! `TokenStream`: one token stream over a prepared directory (its shards concatenated in index
//! order) or over a raw little-endian u32 file.
//!
//! Nothing is read at open time beyond headers and sizes, so opening a corpus of any size is
//! instant; windows are read with positioned reads (`pread`) and their ids checked against the
//! vocabulary as they are copied out. Not memory-mapped: a file that shrinks under a run would
//! kill a mapping's reader with SIGBUS, where a read returns short and becomes an error naming
//! the file; so is one whose modification time changed (rewritten in place at the same size).
//! Only regular files are accepted (`/dev/zero` or a pipe has no size to trust).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::format::{DataIndex, ShardHeader, HEADER_BYTES, INDEX_FILE};
use super::megatron::Width;

/// One file's share of the stream.
struct Segment {
    path: PathBuf,
    file: File,
    /// The file's size and modification time when it was opened.
    bytes: u64,
    modified: Option<std::time::SystemTime>,
    /// Byte offset of the first token in the file (the header size, or 0 for a raw file).
    offset: usize,
    /// How each id is stored (u32 in our formats; Megatron datasets say in their index).
    width: Width,
    tokens: u64,
    /// Position of this segment's first token in the whole stream.
    start: u64,
}

pub struct TokenStream {
    path: PathBuf,
    segments: Vec<Segment>,
    len: u64,
    vocab_size: u64,
    index: Option<DataIndex>,
}

impl TokenStream {
    /// Open `path`: a directory prepared by `dsa-train data prepare`, a Megatron indexed
    /// dataset (its prefix, or its `.bin` or `.idx`), or a raw token file.
    /// Every id fetched later must be below `vocab_size`.
    pub fn open(path: &Path, vocab_size: usize) -> Result<Self> {
        let (segments, index) = if path.is_dir() {
            let (s, i) = open_prepared(path)?;
            (s, Some(i))
        } else if let Some(prefix) = super::megatron::prefix_of(path) {
            (vec![open_megatron(&prefix)?], None)
        } else {
            (vec![open_raw(path)?], None)
        };
        let len = segments.iter().map(|s| s.tokens).sum();
        Ok(Self {
            path: path.to_path_buf(),
            segments,
            len,
            vocab_size: vocab_size as u64,
            index,
        })
    }

    /// The path the stream was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tokens in the whole stream.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// index.json of a prepared directory (None for a raw file).
    pub fn index(&self) -> Option<&DataIndex> {
        self.index.as_ref()
    }

    /// Copy `out.len()` tokens starting at stream position `start`, across shard boundaries,
    /// checking each id against the vocabulary.
    pub fn copy_range(&self, start: u64, out: &mut [u32]) -> Result<()> {
        let end = start
            .checked_add(out.len() as u64)
            .filter(|&e| e <= self.len);
        if end.is_none() {
            bail!(
                "{}: tokens {start}..{} requested but the stream holds {}",
                self.path.display(),
                start.saturating_add(out.len() as u64),
                self.len
            );
        }
        // The segment holding `start`: the last one starting at or before it.
        let mut seg = self.segments.partition_point(|s| s.start <= start) - 1;
        let (mut pos, mut filled) = (start, 0usize);
        while filled < out.len() {
            let s = &self.segments[seg];
            let local = (pos - s.start) as usize;
            let take = (out.len() - filled).min(s.tokens as usize - local);
            let bytes = s.read(local, take)?;
            for (i, (o, b)) in out[filled..filled + take]
                .iter_mut()
                .zip(bytes.chunks_exact(s.width.bytes))
                .enumerate()
            {
                // A negative id of a signed Megatron dtype is reported as out of the vocabulary.
                let id = s.width.decode(b).unwrap_or(u64::MAX);
                if id >= self.vocab_size {
                    bail!(
                        "{}: token {id} at position {} of the stream (token {} of {}) is outside the vocabulary (vocab_size {})",
                        self.path.display(), pos + i as u64, local + i, s.path.display(), self.vocab_size
                    );
                }
                *o = id as u32; // below vocab_size, which fits u32
            }
            filled += take;
            pos += take as u64;
            seg += 1;
        }
        Ok(())
    }

    /// The first `n` tokens (all of them when the stream is shorter).
    pub fn read_prefix(&self, n: u64) -> Result<Vec<u32>> {
        let mut v = vec![0u32; n.min(self.len) as usize];
        self.copy_range(0, &mut v)?;
        Ok(v)
    }
}

impl Segment {
    /// The bytes of `n` tokens from token `local` of this file. A file that changed size since
    /// it was opened is an error, whether or not the range is still there.
    fn read(&self, local: usize, n: usize) -> Result<Vec<u8>> {
        let w = self.width.bytes;
        let mut buf = vec![0u8; n * w];
        let at = (self.offset + local * w) as u64;
        let read = self.file.read_exact_at(&mut buf, at);
        let meta = self.file.metadata().ok();
        let now = meta.as_ref().map_or(0, |m| m.len());
        if now != self.bytes {
            bail!(
                "token file {} changed size during the run ({} bytes when opened, {now} now): it was truncated or rewritten; restore it and resume",
                self.path.display(), self.bytes
            );
        }
        if meta.and_then(|m| m.modified().ok()) != self.modified {
            bail!("token file {} was modified during the run (same size, new contents): restore it and resume", self.path.display());
        }
        read.with_context(|| {
            format!(
                "cannot read token file {} at byte {at}",
                self.path.display()
            )
        })?;
        Ok(buf)
    }
}

/// Open a token file: it must be a regular, non-empty file. Returns it, its size and its
/// modification time.
fn open_file(path: &Path) -> Result<(File, u64, Option<std::time::SystemTime>)> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("cannot open token file {}", path.display()))?;
    if !meta.is_file() {
        bail!("token file {} is not a regular file (a device, pipe or socket has no fixed size to read windows from)", path.display());
    }
    let file =
        File::open(path).with_context(|| format!("cannot open token file {}", path.display()))?;
    let len = meta.len();
    if len == 0 {
        bail!("token file {} is empty", path.display());
    }
    Ok((file, len, meta.modified().ok()))
}

fn open_megatron(prefix: &Path) -> Result<Segment> {
    let d = super::megatron::open(prefix)?;
    let (file, len, modified) = open_file(&d.bin)?;
    Ok(Segment {
        path: d.bin,
        file,
        bytes: len,
        modified,
        offset: 0,
        width: d.width,
        tokens: d.tokens,
        start: 0,
    })
}

fn open_raw(path: &Path) -> Result<Segment> {
    let (file, len, modified) = open_file(path)?;
    if len % 4 != 0 {
        bail!(
            "token file {} has {len} bytes, not a multiple of 4: expected raw little-endian u32 token ids",
            path.display()
        );
    }
    Ok(Segment {
        path: path.to_path_buf(),
        file,
        bytes: len,
        modified,
        offset: 0,
        width: Width::U32,
        tokens: len / 4,
        start: 0,
    })
}

fn open_prepared(dir: &Path) -> Result<(Vec<Segment>, DataIndex)> {
    let index_path = dir.join(INDEX_FILE);
    if !index_path.is_file() {
        bail!(
            "{} has no {INDEX_FILE}: not a prepared token directory, or `dsa-train data prepare` did not finish",
            dir.display()
        );
    }
    let index = DataIndex::read(&index_path)?;
    let mut segments = Vec::with_capacity(index.shards.len());
    let mut start = 0u64;
    for entry in &index.shards {
        let path = dir.join(&entry.file);
        let (file, len, modified) = open_file(&path)?;
        let mut head = vec![0u8; HEADER_BYTES.min(len as usize)];
        file.read_exact_at(&mut head, 0)
            .with_context(|| format!("cannot read token shard {}", path.display()))?;
        let header = ShardHeader::decode(&head, len, &path)?;
        if header.tokens != entry.tokens || header.documents != entry.documents {
            bail!(
                "token shard {} holds {} tokens of {} documents but {} lists {} tokens of {} documents",
                path.display(), header.tokens, header.documents, index_path.display(), entry.tokens, entry.documents
            );
        }
        segments.push(Segment {
            path,
            file,
            bytes: len,
            modified,
            offset: HEADER_BYTES,
            width: Width::U32,
            tokens: header.tokens,
            start,
        });
        start += header.tokens;
    }
    // Zero-token shards would never hold a position and would confuse the segment search.
    segments.retain(|s| s.tokens > 0);
    if segments.is_empty() {
        bail!("{} lists no tokens", index_path.display());
    }
    Ok((segments, index))
}
