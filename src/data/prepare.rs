//! `dsa-train data prepare`: tokenise text into a prepared token directory (docs/data.md).
//!
//! Inputs are read in order and cut into batches of documents; each batch is tokenised in
//! parallel (rayon, order kept by `collect`) and appended to the shards, so the output is the
//! same bytes whatever the thread count. Every document becomes `BOS ids EOS`; documents are
//! packed back to back and may straddle two shards. Shards are written under a `.tmp` name and
//! renamed when complete; index.json is written last, so a directory without it is unfinished.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;
use serde::Serialize;
use tokenizers::Tokenizer;

use super::format::{
    shard_name, DataIndex, ShardEntry, ShardHeader, HEADER_BYTES, INDEX_FILE, VERSION,
};

/// DeepSeek-V3's document delimiters (ids 0 and 1 in its tokenizer).
pub const BOS_TOKEN: &str = "<｜begin▁of▁sentence｜>";
pub const EOS_TOKEN: &str = "<｜end▁of▁sentence｜>";
pub const DEFAULT_SHARD_TOKENS: u64 = 1 << 28;

/// A batch closes at whichever comes first: enough documents to keep every core busy, or
/// enough bytes to bound the memory held by text and ids in flight.
const BATCH_DOCUMENTS: usize = 1024;
const BATCH_BYTES: u64 = 8 << 20;

#[derive(Debug, Clone)]
pub struct PrepareArgs {
    pub tokenizer: PathBuf,
    pub inputs: Vec<PathBuf>,
    pub output: PathBuf,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    /// Tokens per shard; every shard but the last holds exactly this many.
    pub shard_tokens: u64,
    /// Draw a progress bar on stderr (it stays hidden when stderr is not a terminal).
    pub progress: bool,
    /// The field of a JSONL object, or the column of a Parquet file, that holds the text.
    pub text_key: String,
}

/// What `prepare` did, printed as one JSON line.
#[derive(Debug, Clone, Serialize)]
pub struct PrepareReport {
    pub output: String,
    pub shards: usize,
    pub total_tokens: u64,
    pub total_documents: u64,
    pub input_bytes: u64,
    pub seconds: f64,
    pub tokens_per_second: f64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// The whole file is one document.
    Text,
    /// One JSON object per line; its `text_key` string is a document.
    Jsonl,
    /// One row per document: its `text_key` column.
    Parquet,
}

struct Input {
    path: PathBuf,
    kind: Kind,
}

/// Tokenise `args.inputs` into `args.output`. On error nothing that looks complete is left:
/// the shards written so far are removed and index.json is never written.
pub fn prepare(args: &PrepareArgs) -> Result<PrepareReport> {
    let started = Instant::now();
    if args.shard_tokens == 0 {
        bail!("--shard-tokens must be positive");
    }
    // A model folder (DeepSeek's Hugging Face repository ships tokenizer.json) or the file.
    let tokenizer_file = if args.tokenizer.is_dir() {
        args.tokenizer.join("tokenizer.json")
    } else {
        args.tokenizer.clone()
    };
    let tokenizer = Tokenizer::from_file(&tokenizer_file)
        .map_err(|e| anyhow!("cannot load tokenizer {}: {e}", tokenizer_file.display()))?;
    let vocab_size = tokenizer.get_vocab_size(true) as u64;
    let bos_id = delimiter_id(
        &tokenizer,
        args,
        args.bos_id,
        BOS_TOKEN,
        "--bos-id",
        vocab_size,
    )?;
    let eos_id = delimiter_id(
        &tokenizer,
        args,
        args.eos_id,
        EOS_TOKEN,
        "--eos-id",
        vocab_size,
    )?;
    let (inputs, input_bytes) = check_inputs(&args.inputs, &args.text_key)?;
    if args.output.join(INDEX_FILE).exists() {
        bail!(
            "{} already holds a prepared data set ({INDEX_FILE}): remove it or choose another --output",
            args.output.display()
        );
    }
    let created_dir = !args.output.exists();
    // SIGINT/SIGTERM/SIGHUP stop the tokenisation at the next batch, which removes what was
    // written (a second signal still exits at once).
    crate::signals::install();
    std::fs::create_dir_all(&args.output)
        .with_context(|| format!("cannot create {}", args.output.display()))?;

    let bar = if args.progress {
        ProgressBar::with_draw_target(Some(input_bytes), ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "[data] {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("the template is a constant"),
    );
    let mut writer = ShardWriter::new(&args.output, args.shard_tokens, created_dir);
    let written = tokenise_all(
        &tokenizer,
        &inputs,
        &args.text_key,
        bos_id,
        eos_id,
        &mut writer,
        &bar,
    )
    .and_then(|()| writer.finish());
    bar.finish_and_clear();
    let shards = match written {
        Ok(shards) => shards,
        Err(e) => {
            writer.remove_all();
            return Err(e);
        }
    };
    let total_tokens: u64 = shards.iter().map(|s| s.tokens).sum();
    if total_tokens == 0 {
        writer.remove_all();
        let names: Vec<String> = args
            .inputs
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        bail!(
            "the inputs ({}) hold no text to tokenise: every document is empty",
            names.join(", ")
        );
    }
    let index = DataIndex {
        version: VERSION,
        total_tokens,
        total_documents: shards.iter().map(|s| s.documents).sum(),
        shards,
        bos_id,
        eos_id,
        tokenizer: args.tokenizer.display().to_string(),
        vocab_size,
    };
    if let Err(e) = write_index(&args.output, &index) {
        writer.remove_all();
        return Err(e);
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(PrepareReport {
        output: args.output.display().to_string(),
        shards: index.shards.len(),
        total_tokens,
        total_documents: index.total_documents,
        input_bytes,
        seconds,
        tokens_per_second: total_tokens as f64 / seconds.max(1e-9),
    })
}

/// The id of a delimiter: the flag when given (checked against the vocabulary), else the
/// tokenizer's own token of that name.
fn delimiter_id(
    tok: &Tokenizer,
    args: &PrepareArgs,
    flag: Option<u32>,
    name: &str,
    flag_name: &str,
    vocab: u64,
) -> Result<u32> {
    match flag {
        Some(id) if id as u64 >= vocab => bail!(
            "{flag_name} {id} is outside the vocabulary of tokenizer {} (vocab_size {vocab})",
            args.tokenizer.display()
        ),
        Some(id) => Ok(id),
        None => tok.token_to_id(name).ok_or_else(|| {
            anyhow!(
                "tokenizer {} has no {name} token: pass {flag_name} N",
                args.tokenizer.display()
            )
        }),
    }
}

/// Check every input before any output exists, so that a typo fails at once; returns the
/// inputs with their kinds and their total size for the progress bar.
fn check_inputs(paths: &[PathBuf], text_key: &str) -> Result<(Vec<Input>, u64)> {
    if paths.is_empty() {
        bail!("no --input files given");
    }
    let mut inputs = Vec::with_capacity(paths.len());
    let mut bytes = 0;
    for path in paths {
        let meta = std::fs::metadata(path)
            .with_context(|| format!("cannot read input file {}", path.display()))?;
        if !meta.is_file() {
            bail!(
                "input {} is not a file: expected .txt, .jsonl or .parquet files",
                path.display()
            );
        }
        let kind = match path.extension().and_then(|e| e.to_str()) {
            Some("txt") => Kind::Text,
            Some("jsonl") => Kind::Jsonl,
            Some("parquet") => Kind::Parquet,
            _ => bail!(
                "input file {} has an unsupported extension: expected .txt (one document per file), .jsonl (one {{\"text\": ...}} object per line) or .parquet (one row per document)",
                path.display()
            ),
        };
        if kind == Kind::Parquet {
            // The footer only: a file without the text column fails now, not hours in.
            super::parquet::ParquetTexts::open(path, text_key)?;
        }
        bytes += meta.len();
        inputs.push(Input {
            path: path.clone(),
            kind,
        });
    }
    Ok((inputs, bytes))
}

/// A document and where it came from (for error messages).
struct Document {
    text: String,
    input: usize,
    /// 1-based line of a JSONL document or row of a Parquet one; 0 for a .txt file.
    line: u64,
    bytes: u64,
}

fn tokenise_all(
    tokenizer: &Tokenizer,
    inputs: &[Input],
    text_key: &str,
    bos: u32,
    eos: u32,
    writer: &mut ShardWriter,
    bar: &ProgressBar,
) -> Result<()> {
    let mut docs = Documents {
        inputs,
        next_input: 0,
        open: None,
        parquet: None,
        text_key,
    };
    let mut done = false;
    while !done {
        if crate::signals::stop_requested() {
            bail!("interrupted by a signal; the partial output was removed");
        }
        let mut batch: Vec<Document> = Vec::new();
        let mut batch_bytes = 0;
        while batch.len() < BATCH_DOCUMENTS && batch_bytes < BATCH_BYTES {
            match docs.next()? {
                Some(d) => {
                    batch_bytes += d.bytes;
                    batch.push(d);
                }
                None => {
                    done = true;
                    break;
                }
            }
        }
        // encode_fast skips the offsets, which are not needed here.
        let ids: Vec<Result<Vec<u32>>> = batch
            .par_iter()
            .map(|d| {
                tokenizer
                    .encode_fast(d.text.as_str(), false)
                    .map(|e| e.get_ids().to_vec())
                    .map_err(|e| {
                        let at = if d.line > 0 {
                            format!(" line {}", d.line)
                        } else {
                            String::new()
                        };
                        anyhow!(
                            "cannot tokenise {}{at}: {e}",
                            inputs[d.input].path.display()
                        )
                    })
            })
            .collect();
        for ids in ids {
            let ids = ids?;
            // An empty document would add a bare BOS EOS pair and nothing to learn from.
            if ids.is_empty() {
                continue;
            }
            writer.push(&[bos], true)?;
            writer.push(&ids, false)?;
            writer.push(&[eos], false)?;
        }
        bar.inc(batch_bytes);
    }
    Ok(())
}

/// The documents of all inputs, in order.
struct Documents<'a> {
    inputs: &'a [Input],
    next_input: usize,
    /// The JSONL file being read: its index, reader and last line number.
    open: Option<(usize, BufReader<File>, u64)>,
    /// The Parquet file being read: its index, rows, and its size shared out over its rows
    /// (for the progress bar: size / rows each, the remainder on the last).
    parquet: Option<(usize, super::parquet::ParquetTexts, u64)>,
    text_key: &'a str,
}

impl Documents<'_> {
    fn next(&mut self) -> Result<Option<Document>> {
        loop {
            if let Some((i, rows, size)) = &mut self.parquet {
                match rows.next_text()? {
                    Some((text, row)) => {
                        let share = *size / rows.total_rows.max(1);
                        let bytes = if row == rows.total_rows {
                            *size - share * (rows.total_rows - 1)
                        } else {
                            share
                        };
                        return Ok(Some(Document {
                            text,
                            input: *i,
                            line: row,
                            bytes,
                        }));
                    }
                    None => {
                        self.parquet = None;
                        continue;
                    }
                }
            }
            if let Some((i, reader, line)) = &mut self.open {
                let path = &self.inputs[*i].path;
                let mut buf = Vec::new();
                let n = reader
                    .read_until(b'\n', &mut buf)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                if n == 0 {
                    self.open = None;
                    continue;
                }
                *line += 1;
                let where_ = || format!("{} line {}", path.display(), line);
                // Blank lines (a trailing newline, spacing between records) carry no document.
                if buf.iter().all(|b| b.is_ascii_whitespace()) {
                    continue;
                }
                // Without its line ending, so that serde_json's column is the column in the line.
                let record = buf
                    .strip_suffix(b"\n")
                    .map(|r| r.strip_suffix(b"\r").unwrap_or(r))
                    .unwrap_or(&buf);
                let value: serde_json::Value = serde_json::from_slice(record)
                    .map_err(|e| anyhow!("{} is not valid JSON: {}", where_(), json_message(&e)))?;
                let key = self.text_key;
                let text = match value {
                    serde_json::Value::Object(mut fields) => match fields.remove(key) {
                        Some(serde_json::Value::String(t)) => t,
                        _ => bail!("{} has no string {key:?} field", where_()),
                    },
                    _ => bail!(
                        "{} is not a JSON object: expected {{{key:?}: \"...\"}}",
                        where_()
                    ),
                };
                return Ok(Some(Document {
                    text,
                    input: *i,
                    line: *line,
                    bytes: n as u64,
                }));
            }
            let Some(input) = self.inputs.get(self.next_input) else {
                return Ok(None);
            };
            let i = self.next_input;
            self.next_input += 1;
            let file = File::open(&input.path)
                .with_context(|| format!("cannot read input file {}", input.path.display()))?;
            match input.kind {
                Kind::Jsonl => self.open = Some((i, BufReader::with_capacity(1 << 20, file), 0)),
                Kind::Parquet => {
                    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
                    let rows = super::parquet::ParquetTexts::open(&input.path, self.text_key)?;
                    self.parquet = Some((i, rows, size));
                }
                Kind::Text => {
                    let bytes = std::fs::read(&input.path).with_context(|| {
                        format!("cannot read input file {}", input.path.display())
                    })?;
                    let n = bytes.len() as u64;
                    let text = String::from_utf8(bytes).map_err(|e| {
                        anyhow!(
                            "{} is not UTF-8 text (invalid byte at offset {})",
                            input.path.display(),
                            e.utf8_error().valid_up_to()
                        )
                    })?;
                    return Ok(Some(Document {
                        text,
                        input: i,
                        line: 0,
                        bytes: n,
                    }));
                }
            }
        }
    }
}

/// serde_json's message without its " at line 1 column C" (always line 1 here: each JSONL
/// line is parsed alone), with the column kept.
fn json_message(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    let base = msg
        .rsplit_once(" at line ")
        .map_or(msg.as_str(), |(m, _)| m);
    format!("{base} (column {})", e.column())
}

/// Appends tokens to `tokens-NNNNN.bin` shards of exactly `cap` tokens (the last one shorter).
struct ShardWriter {
    dir: PathBuf,
    cap: u64,
    done: Vec<ShardEntry>,
    current: Option<OpenShard>,
    /// Whether `dir` was created for this run (and so is removed again on failure).
    created_dir: bool,
}

struct OpenShard {
    file: BufWriter<File>,
    tmp: PathBuf,
    tokens: u64,
    documents: u64,
}

impl ShardWriter {
    fn new(dir: &Path, cap: u64, created_dir: bool) -> Self {
        Self {
            dir: dir.to_path_buf(),
            cap,
            done: Vec::new(),
            current: None,
            created_dir,
        }
    }

    fn tmp_path(&self, i: usize) -> PathBuf {
        self.dir.join(format!("{}.tmp", shard_name(i)))
    }

    /// Append `tokens`; `starts_document` counts a document in the shard holding its first
    /// token (its BOS), so the shards' counts sum to the number of documents.
    fn push(&mut self, mut tokens: &[u32], mut starts_document: bool) -> Result<()> {
        let mut bytes = Vec::new();
        while !tokens.is_empty() {
            if self.current.is_none() {
                let tmp = self.tmp_path(self.done.len());
                let file = File::create(&tmp)
                    .with_context(|| format!("cannot create {}", tmp.display()))?;
                let mut file = BufWriter::with_capacity(1 << 20, file);
                // A zeroed header (no magic) until the shard is complete.
                file.write_all(&[0u8; HEADER_BYTES])
                    .with_context(|| format!("cannot write {}", tmp.display()))?;
                self.current = Some(OpenShard {
                    file,
                    tmp,
                    tokens: 0,
                    documents: 0,
                });
            }
            let cur = self.current.as_mut().unwrap();
            if starts_document {
                cur.documents += 1;
                starts_document = false;
            }
            let take = ((self.cap - cur.tokens) as usize).min(tokens.len());
            bytes.clear();
            bytes.extend(tokens[..take].iter().flat_map(|t| t.to_le_bytes()));
            cur.file
                .write_all(&bytes)
                .with_context(|| format!("cannot write {}", cur.tmp.display()))?;
            cur.tokens += take as u64;
            tokens = &tokens[take..];
            if cur.tokens == self.cap {
                self.close()?;
            }
        }
        Ok(())
    }

    /// Write the real header, flush to disk, and rename the shard to its final name.
    fn close(&mut self) -> Result<()> {
        let Some(cur) = self.current.take() else {
            return Ok(());
        };
        let tmp = cur.tmp.clone();
        let io =
            |r: std::io::Result<()>| r.with_context(|| format!("cannot write {}", tmp.display()));
        let mut file = cur
            .file
            .into_inner()
            .map_err(|e| e.into_error())
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        let header = ShardHeader {
            tokens: cur.tokens,
            documents: cur.documents,
        };
        io(file.seek(SeekFrom::Start(0)).map(|_| ()))?;
        io(file.write_all(&header.encode()))?;
        io(file.sync_all())?;
        let name = shard_name(self.done.len());
        let path = self.dir.join(&name);
        std::fs::rename(&tmp, &path)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
        self.done.push(ShardEntry {
            file: name,
            tokens: cur.tokens,
            documents: cur.documents,
        });
        Ok(())
    }

    fn finish(&mut self) -> Result<Vec<ShardEntry>> {
        self.close()?;
        Ok(self.done.clone())
    }

    /// Best-effort removal of everything this writer created, after a failure.
    fn remove_all(&mut self) {
        if let Some(cur) = self.current.take() {
            drop(cur.file);
            let _ = std::fs::remove_file(&cur.tmp);
        }
        for s in self.done.drain(..) {
            let _ = std::fs::remove_file(self.dir.join(s.file));
        }
        // remove_dir only removes an empty directory: nothing of the user's can go with it.
        if self.created_dir {
            let _ = std::fs::remove_dir(&self.dir);
        }
    }
}

fn write_index(dir: &Path, index: &DataIndex) -> Result<()> {
    let path = dir.join(INDEX_FILE);
    let tmp = dir.join(format!("{INDEX_FILE}.tmp"));
    let text = serde_json::to_string_pretty(index)? + "\n";
    let mut file =
        File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
}
