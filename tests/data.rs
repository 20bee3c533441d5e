//! Token data: `data prepare` on small corpora with tokenizers built here (no network), the
//! shard format, every user error through the binary, and the training-side stream and sampler
//! (shuffled order, one visit per window per epoch, exact resume, raw file = prepared dir).

mod common;

use std::path::{Path, PathBuf};

use common::{assert_clean_error, path_str, run_cli};
use dsa_train::data::{DataCursor, TokenStream, WindowSampler};
use serde_json::json;

const BOS: &str = "<｜begin▁of▁sentence｜>";
const EOS: &str = "<｜end▁of▁sentence｜>";

/// The words of the word-level test tokenizer, id = position (BOS 0, EOS 1, <unk> 2).
const WORDS: [&str; 11] = [
    BOS, EOS, "<unk>", "the", "cat", "sat", "on", "mat", "a", "dog", ".",
];

fn added(id: u32, content: &str) -> serde_json::Value {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
           "normalized": false, "special": true})
}

fn tokenizer_json(
    added_tokens: Vec<serde_json::Value>,
    pre_tokenizer: serde_json::Value,
    model: serde_json::Value,
) -> serde_json::Value {
    json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": added_tokens,
           "normalizer": null, "pre_tokenizer": pre_tokenizer, "post_processor": null, "decoder": null,
           "model": model})
}

/// A WordLevel tokenizer over `WORDS` split on whitespace, with DeepSeek's BOS/EOS names when
/// `delimiters`.
fn word_tokenizer(dir: &Path, delimiters: bool) -> PathBuf {
    let vocab: serde_json::Map<String, serde_json::Value> = WORDS
        .iter()
        .enumerate()
        .filter(|(i, _)| delimiters || *i > 1)
        .map(|(i, w)| (w.to_string(), json!(i)))
        .collect();
    let added_tokens = if delimiters {
        vec![added(0, BOS), added(1, EOS)]
    } else {
        vec![]
    };
    let tok = tokenizer_json(
        added_tokens,
        json!({"type": "WhitespaceSplit"}),
        json!({"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}),
    );
    let path = dir.join(if delimiters {
        "words.json"
    } else {
        "no-delimiters.json"
    });
    std::fs::write(&path, tok.to_string()).unwrap();
    path
}

fn word_id(w: &str) -> u32 {
    WORDS.iter().position(|x| *x == w).unwrap_or(2) as u32
}

/// Expected stream for documents under the word tokenizer: BOS words EOS, empty ones dropped.
fn expected_words(docs: &[&str]) -> Vec<u32> {
    let mut v = Vec::new();
    for d in docs
        .iter()
        .filter(|d| d.split_whitespace().next().is_some())
    {
        v.push(0);
        v.extend(d.split_whitespace().map(word_id));
        v.push(1);
    }
    v
}

fn jsonl(path: &Path, texts: &[&str]) -> PathBuf {
    let body: String = texts
        .iter()
        .map(|t| json!({"text": t, "id": 7}).to_string() + "\n")
        .collect();
    std::fs::write(path, body).unwrap();
    path.to_path_buf()
}

fn prepare(
    tokenizer: &Path,
    inputs: &[&Path],
    out: &Path,
    extra: &[&str],
) -> (i32, String, String) {
    let mut args = vec![
        "data",
        "prepare",
        "--tokenizer",
        path_str(tokenizer),
        "--output",
        path_str(out),
        "--input",
    ];
    args.extend(inputs.iter().map(|p| path_str(p)));
    args.extend(extra);
    run_cli(&args)
}

fn prepare_ok(tokenizer: &Path, inputs: &[&Path], out: &Path, extra: &[&str]) {
    let (code, _, stderr) = prepare(tokenizer, inputs, out, extra);
    assert_eq!(code, 0, "{stderr}");
}

/// (header fields, tokens) of a shard, parsed independently of the crate.
fn read_shard(path: &Path) -> ([u8; 8], u32, u32, u64, u64, Vec<u32>) {
    let b = std::fs::read(path).unwrap();
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    let tokens = b[32..]
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (
        b[0..8].try_into().unwrap(),
        u32_at(8),
        u32_at(12),
        u64_at(16),
        u64_at(24),
        tokens,
    )
}

fn read_index(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("index.json")).unwrap()).unwrap()
}

/// All tokens of a prepared directory, shard after shard.
fn all_tokens(dir: &Path) -> Vec<u32> {
    let index = read_index(dir);
    index["shards"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| read_shard(&dir.join(s["file"].as_str().unwrap())).5)
        .collect()
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

// ---- data prepare ---------------------------------------------------------------------------

#[test]
fn prepare_wraps_each_document_in_bos_and_eos_in_input_order() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = word_tokenizer(tmp.path(), true);
    // A .txt file is one document, blank lines included.
    let txt = tmp.path().join("a.txt");
    std::fs::write(&txt, "the cat sat\n\non a mat .\n").unwrap();
    // Blank lines carry nothing; an empty text is skipped; unknown fields are ignored.
    let jl = tmp.path().join("b.jsonl");
    std::fs::write(&jl, "{\"text\": \"a dog\", \"meta\": {\"x\": [1]}}\n\n{\"text\": \"\"}\n{\"text\": \"the mat .\"}").unwrap();
    let out = tmp.path().join("out");
    prepare_ok(&tok, &[&txt, &jl], &out, &[]);

    let stream = [0, 3, 4, 5, 6, 8, 7, 10, 1, 0, 8, 9, 1, 0, 3, 7, 10, 1];
    assert_eq!(files_in(&out), ["index.json", "tokens-00000.bin"]);
    let (magic, version, reserved, tokens, docs, ids) = read_shard(&out.join("tokens-00000.bin"));
    assert_eq!(
        (&magic, version, reserved, tokens, docs),
        (b"DSATOKS\0", 1, 0, 18, 3)
    );
    assert_eq!(ids, stream);
    assert_eq!(
        read_index(&out),
        json!({
            "version": 1,
            "shards": [{"file": "tokens-00000.bin", "tokens": 18, "documents": 3}],
            "total_tokens": 18, "total_documents": 3, "bos_id": 0, "eos_id": 1,
            "tokenizer": path_str(&tok), "vocab_size": 11,
        })
    );
    // The tokenizer may also be named by the model folder that ships it as tokenizer.json.
    let model = tmp.path().join("model");
    std::fs::create_dir(&model).unwrap();
    std::fs::copy(&tok, model.join("tokenizer.json")).unwrap();
    let again = tmp.path().join("again");
    prepare_ok(&model, &[&txt, &jl], &again, &[]);
    assert_eq!(read_shard(&again.join("tokens-00000.bin")).5, stream);
}

#[test]
fn prepare_cuts_shards_at_the_cap_and_counts_each_document_where_its_bos_is() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = word_tokenizer(tmp.path(), true);
    let docs = ["the cat sat", "a dog", "on the mat ."];
    let jl = jsonl(&tmp.path().join("d.jsonl"), &docs);
    let out = tmp.path().join("out");
    prepare_ok(&tok, &[&jl], &out, &["--shard-tokens", "4"]);
    // 5 + 4 + 6 = 15 tokens: shards of 4, 4, 4, 3. BOS at 0, 5, 9 -> shards 0, 1, 2.
    let index = read_index(&out);
    let shards: Vec<(u64, u64)> = index["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["tokens"].as_u64().unwrap(),
                s["documents"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(shards, [(4, 1), (4, 1), (4, 1), (3, 0)]);
    for (i, (t, d)) in shards.iter().enumerate() {
        let (_, _, _, ht, hd, ids) = read_shard(&out.join(format!("tokens-{i:05}.bin")));
        assert_eq!((ht, hd, ids.len() as u64), (*t, *d, *t));
    }
    assert_eq!(all_tokens(&out), expected_words(&docs));
    assert_eq!(
        (
            index["total_tokens"].as_u64(),
            index["total_documents"].as_u64()
        ),
        (Some(15), Some(3))
    );
}

#[test]
fn prepare_keeps_document_order_across_parallel_batches_and_repeats_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = word_tokenizer(tmp.path(), true);
    // More documents than one batch holds (1024), of varied lengths, so that batches are split
    // over threads and uneven work could reorder them.
    let words = ["the", "cat", "sat", "on", "mat", "a", "dog", ".", "zebra"];
    let texts: Vec<String> = (0..2500)
        .map(|i| {
            (0..(i * 7919) % 23)
                .map(|j| words[(i + j * j) % words.len()])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    let refs: Vec<&str> = texts.iter().map(|s| s.as_str()).collect();
    let jl = jsonl(&tmp.path().join("many.jsonl"), &refs);
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    prepare_ok(&tok, &[&jl], &a, &["--shard-tokens", "1000"]);
    prepare_ok(&tok, &[&jl], &b, &["--shard-tokens", "1000"]);
    assert_eq!(all_tokens(&a), expected_words(&refs));
    assert_eq!(files_in(&a), files_in(&b));
    for f in files_in(&a) {
        assert_eq!(
            std::fs::read(a.join(&f)).unwrap(),
            std::fs::read(b.join(&f)).unwrap(),
            "{f}"
        );
    }
}

#[test]
fn bos_and_eos_flags_override_the_tokenizer_and_stand_in_when_it_has_none() {
    let tmp = tempfile::tempdir().unwrap();
    let txt = tmp.path().join("a.txt");
    std::fs::write(&txt, "a dog").unwrap();
    let out = tmp.path().join("out");
    prepare_ok(
        &word_tokenizer(tmp.path(), true),
        &[&txt],
        &out,
        &["--bos-id", "5", "--eos-id", "6"],
    );
    assert_eq!(all_tokens(&out), [5, 8, 9, 6]);
    assert_eq!(
        (
            read_index(&out)["bos_id"].as_u64(),
            read_index(&out)["eos_id"].as_u64()
        ),
        (Some(5), Some(6))
    );

    let bare = word_tokenizer(tmp.path(), false);
    let out2 = tmp.path().join("out2");
    assert_clean_error(
        &prepare(&bare, &[&txt], &out2, &[]),
        &["no-delimiters.json", BOS, "--bos-id"],
    );
    assert_clean_error(
        &prepare(&bare, &[&txt], &out2, &["--bos-id", "3"]),
        &["no-delimiters.json", EOS, "--eos-id"],
    );
    assert_clean_error(
        &prepare(&bare, &[&txt], &out2, &["--bos-id", "3", "--eos-id", "11"]),
        &["--eos-id 11", "vocab_size 9"],
    );
    prepare_ok(&bare, &[&txt], &out2, &["--bos-id", "3", "--eos-id", "4"]);
    assert_eq!(all_tokens(&out2), [3, 8, 9, 4]);
}

/// The byte of each ByteLevel character (GPT-2's map: printable Latin-1 bytes stand for
/// themselves, the other 68 bytes take the characters from U+0100 on, in byte order).
fn byte_level_chars() -> Vec<char> {
    let printable = |b: u32| {
        (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
    };
    let mut next = 0x100;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap()
            } else {
                next += 1;
                char::from_u32(next - 1).unwrap()
            }
        })
        .collect()
}

#[test]
fn prepare_runs_a_byte_level_bpe_with_deepseeks_look_ahead_pre_tokenizer() {
    // DeepSeek-V3's tokenizer in miniature: its look-ahead Split regex (which needs the
    // fancy-regex backend), ByteLevel, and BPE over bytes with two merges. Byte b has id 2 + b.
    let tmp = tempfile::tempdir().unwrap();
    let chars = byte_level_chars();
    let mut vocab = serde_json::Map::new();
    vocab.insert(BOS.into(), json!(0));
    vocab.insert(EOS.into(), json!(1));
    for (b, c) in chars.iter().enumerate() {
        vocab.insert(c.to_string(), json!(2 + b));
    }
    vocab.insert("he".into(), json!(258));
    vocab.insert("Ġhe".into(), json!(259));
    let regex = "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+";
    let pre = json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "\\p{N}{1,3}"}, "behavior": "Isolated", "invert": false},
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]});
    let model = json!({"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
        "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "vocab": vocab,
        "merges": ["h e", "Ġ he"]});
    let tok = tmp.path().join("bpe.json");
    std::fs::write(
        &tok,
        tokenizer_json(vec![added(0, BOS), added(1, EOS)], pre, model).to_string(),
    )
    .unwrap();
    let txt = tmp.path().join("a.txt");
    std::fs::write(&txt, "hello  he é").unwrap();
    let out = tmp.path().join("out");
    prepare_ok(&tok, &[&txt], &out, &[]);
    // Pre-tokens "hello", " ", " he", " é": the look-ahead leaves the last space of "  " to
    // the word, so " he" merges to 259 (without it: " ", " ", "he" -> 34, 34, 258).
    let id = |b: u8| 2 + b as u32;
    assert_eq!(
        all_tokens(&out),
        [
            0,
            258,
            id(b'l'),
            id(b'l'),
            id(b'o'),
            id(b' '),
            259,
            id(b' '),
            id(0xC3),
            id(0xA9),
            1
        ]
    );
    assert_eq!(read_index(&out)["vocab_size"], json!(260));
}

// ---- data prepare: user errors --------------------------------------------------------------

/// Run prepare expecting a clean error that names `needles`, and check that the output holds
/// nothing that looks complete (and no shards either).
fn assert_prepare_fails(
    tok: &Path,
    inputs: &[&Path],
    out: &Path,
    extra: &[&str],
    needles: &[&str],
) {
    assert_clean_error(&prepare(tok, inputs, out, extra), needles);
    assert!(
        !out.join("index.json").exists(),
        "index.json left in {}",
        out.display()
    );
    let left: Vec<String> = files_in(out)
        .into_iter()
        .filter(|f| f.starts_with("tokens-"))
        .collect();
    assert!(left.is_empty(), "shards left behind: {left:?}");
}

#[test]
fn missing_or_unsupported_inputs_are_named_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = word_tokenizer(tmp.path(), true);
    let good = tmp.path().join("good.txt");
    std::fs::write(&good, "a dog").unwrap();
    let out = tmp.path().join("out");
    assert_prepare_fails(
        &tok,
        &[&good, &tmp.path().join("nope.txt")],
        &out,
        &[],
        &["nope.txt"],
    );
    let md = tmp.path().join("notes.md");
    std::fs::write(&md, "a dog").unwrap();
    assert_prepare_fails(
        &tok,
        &[&good, &md],
        &out,
        &[],
        &["notes.md", "unsupported extension"],
    );
    assert_prepare_fails(&tok, &[tmp.path()], &out, &[], &["is not a file"]);
    assert!(!out.exists());
}

#[test]
fn bad_jsonl_lines_are_named_by_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = word_tokenizer(tmp.path(), true);
    let out = tmp.path().join("out");
    let cases: [(&str, &str, &str); 5] = [
        (
            "{\"text\": \"a dog\"}\n{\"text\": \"the\"}\n{\"text\": \"cat\"\n",
            "line 3",
            "not valid JSON",
        ),
        (
            "{\"text\": \"a dog\"}\nnot json at all\n",
            "line 2",
            "not valid JSON",
        ),
        ("\n{\"body\": \"a dog\"}\n", "line 2", "\"text\""),
        ("{\"text\": \"a\"}\n{\"text\": 5}\n", "line 2", "\"text\""),
        ("[\"a dog\"]\n", "line 1", "not a JSON object"),
    ];
    for (i, (body, line, what)) in cases.iter().enumerate() {
        let name = format!("bad{i}.jsonl");
        let path = tmp.path().join(&name);
        std::fs::write(&path, body).unwrap();
        assert_prepare_fails(
            &tok,
            &[&path],
            &out,
            &[],
            &[&format!("{name} {line}"), what],
        );
    }
    let latin1 = tmp.path().join("latin1.txt");
    std::fs::write(&latin1, b"caf\xe9").unwrap();
    assert_prepare_fails(
        &tok,
        &[&latin1],
        &out,
        &[],
        &["latin1.txt", "UTF-8", "offset 3"],
    );
}

#[test]
fn a_failure_after_shards_were_written_removes_them() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = word_tokenizer(tmp.path(), true);
    let good: Vec<&str> = vec!["the cat sat on the mat ."; 50];
    let first = jsonl(&tmp.path().join("first.jsonl"), &good);
    let second = tmp.path().join("second.jsonl");
    std::fs::write(
        &second,
        "{\"text\": \"a dog\"}\n{\"text\": \"a cat\"}\n{oops}\n",
    )
    .unwrap();
    // 450 tokens of the first file fill several 64-token shards before line 3 fails.
    let out = tmp.path().join("out");
    assert_prepare_fails(
        &tok,
        &[&first, &second],
        &out,
        &["--shard-tokens", "64"],
        &["second.jsonl line 3"],
    );
    assert!(
        !out.exists(),
        "the output directory was created by the failed run and should be gone"
    );
    // A directory that existed before is kept, with whatever else it holds.
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("notes"), "mine").unwrap();
    assert_prepare_fails(
        &tok,
        &[&first, &second],
        &out,
        &["--shard-tokens", "64"],
        &["second.jsonl line 3"],
    );
    assert_eq!(files_in(&out), ["notes"]);
}

#[test]
fn an_empty_corpus_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = word_tokenizer(tmp.path(), true);
    let txt = tmp.path().join("empty.txt");
    std::fs::write(&txt, "  \n").unwrap();
    let jl = jsonl(&tmp.path().join("empty.jsonl"), &["", " "]);
    assert_prepare_fails(
        &tok,
        &[&txt, &jl],
        &tmp.path().join("out"),
        &[],
        &["empty.txt", "empty.jsonl", "no text"],
    );
}

#[test]
fn an_unreadable_tokenizer_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let txt = tmp.path().join("a.txt");
    std::fs::write(&txt, "a dog").unwrap();
    let out = tmp.path().join("out");
    assert_prepare_fails(
        &tmp.path().join("missing.json"),
        &[&txt],
        &out,
        &[],
        &["missing.json", "tokenizer"],
    );
    let broken = tmp.path().join("broken.json");
    std::fs::write(&broken, "{\"model\": ").unwrap();
    assert_prepare_fails(&broken, &[&txt], &out, &[], &["broken.json", "tokenizer"]);
}

#[test]
fn prepare_refuses_to_overwrite_a_finished_output() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = word_tokenizer(tmp.path(), true);
    let txt = tmp.path().join("a.txt");
    std::fs::write(&txt, "a dog").unwrap();
    let out = tmp.path().join("out");
    prepare_ok(&tok, &[&txt], &out, &[]);
    let before = std::fs::read(out.join("tokens-00000.bin")).unwrap();
    std::fs::write(&txt, "the cat").unwrap();
    assert_clean_error(
        &prepare(&tok, &[&txt], &out, &[]),
        &["out", "already holds", "index.json"],
    );
    assert_eq!(std::fs::read(out.join("tokens-00000.bin")).unwrap(), before);
}

// ---- TokenStream ----------------------------------------------------------------------------

/// A prepared directory of `docs` documents with small shards, and its tokens.
fn prepared(tmp: &Path, docs: usize, shard_tokens: u64) -> (PathBuf, Vec<u32>) {
    let tok = word_tokenizer(tmp, true);
    let words = ["the", "cat", "sat", "on", "mat", "a", "dog", "."];
    let texts: Vec<String> = (0..docs)
        .map(|i| words[..1 + i % words.len()].join(" "))
        .collect();
    let refs: Vec<&str> = texts.iter().map(|s| s.as_str()).collect();
    let jl = jsonl(&tmp.join("corpus.jsonl"), &refs);
    let out = tmp.join("prepared");
    prepare_ok(
        &tok,
        &[&jl],
        &out,
        &["--shard-tokens", &shard_tokens.to_string()],
    );
    (out, expected_words(&refs))
}

#[test]
fn stream_concatenates_shards_and_reads_ranges_across_their_boundaries() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, tokens) = prepared(tmp.path(), 40, 7);
    let stream = TokenStream::open(&dir, 11).unwrap();
    assert_eq!(stream.len(), tokens.len() as u64);
    assert_eq!(
        stream.index().unwrap().shards.len(),
        tokens.len().div_ceil(7)
    );
    // Every start and a length that spans zero, one and several boundaries.
    for len in [1, 6, 7, 8, 23] {
        for start in 0..=tokens.len() - len {
            let mut got = vec![u32::MAX; len];
            stream.copy_range(start as u64, &mut got).unwrap();
            assert_eq!(got, tokens[start..start + len], "start {start} len {len}");
        }
    }
    let mut past = vec![0; 2];
    let err = stream
        .copy_range(tokens.len() as u64 - 1, &mut past)
        .unwrap_err()
        .to_string();
    assert!(err.contains("prepared") && err.contains("holds"), "{err}");
}

#[test]
fn out_of_vocabulary_ids_are_reported_lazily_with_file_and_position() {
    let tmp = tempfile::tempdir().unwrap();
    let raw = tmp.path().join("raw.bin");
    let mut ids: Vec<u32> = (0..100).map(|i| i % 50).collect();
    ids[37] = 999;
    dsa_train::data::write_token_file(&raw, &ids).unwrap();
    // Opening reads no ids; windows without the bad id are fine.
    let stream = TokenStream::open(&raw, 50).unwrap();
    let mut w = vec![0; 10];
    stream.copy_range(0, &mut w).unwrap();
    stream.copy_range(38, &mut w).unwrap();
    let err = stream.copy_range(30, &mut w).unwrap_err().to_string();
    assert!(
        err.contains("raw.bin") && err.contains("999") && err.contains("position 37"),
        "{err}"
    );

    // In a prepared directory the shard is named as well as the stream position.
    let (dir, tokens) = prepared(tmp.path(), 10, 8);
    let stream = TokenStream::open(&dir, 9).unwrap(); // "dog" (9) and "." (10) are now out of range
    let pos = tokens.iter().position(|&t| t >= 9).unwrap();
    let mut all = vec![0; tokens.len()];
    let err = stream.copy_range(0, &mut all).unwrap_err().to_string();
    let shard = format!("tokens-{:05}.bin", pos / 8);
    assert!(
        err.contains(&format!("position {pos} ")) && err.contains(&shard),
        "{err}"
    );
}

#[test]
fn damaged_prepared_directories_are_clear_errors_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, _) = prepared(tmp.path(), 20, 16);
    let shard = dir.join("tokens-00001.bin");
    let good = std::fs::read(&shard).unwrap();
    let open_err = || {
        TokenStream::open(&dir, 11)
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default()
    };

    std::fs::write(&shard, &good[..good.len() - 4]).unwrap();
    let err = open_err();
    assert!(
        err.contains("tokens-00001.bin") && err.contains("truncated"),
        "{err}"
    );
    std::fs::write(&shard, &good[..20]).unwrap();
    assert!(open_err().contains("tokens-00001.bin"), "{}", open_err());
    let mut bad = good.clone();
    bad[0] = b'X';
    std::fs::write(&shard, &bad).unwrap();
    assert!(open_err().contains("tokens-00001.bin") && open_err().contains("magic"));
    std::fs::write(&shard, &good).unwrap();
    TokenStream::open(&dir, 11).unwrap();

    let index_path = dir.join("index.json");
    let index = std::fs::read_to_string(&index_path).unwrap();
    std::fs::write(
        &index_path,
        index.replacen("\"tokens\": 16", "\"tokens\": 15", 1),
    )
    .unwrap();
    let err = open_err();
    assert!(
        err.contains("index.json") && err.contains("total_tokens"),
        "{err}"
    );
    std::fs::write(&index_path, "{\"version\": 1").unwrap();
    assert!(open_err().contains("index.json"));
    std::fs::remove_file(&index_path).unwrap();
    assert!(open_err().contains("no index.json"), "{}", open_err());
}

#[test]
fn damaged_prepared_directory_fails_eval_with_one_error_line() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, _) = prepared(tmp.path(), 20, 16);
    let shard = dir.join("tokens-00000.bin");
    let good = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &good[..good.len() - 2]).unwrap();
    let (_ckpt_tmp, model) = common::tiny_checkpoint(false, 3);
    let result = run_cli(&[
        "eval",
        "--model",
        path_str(&model),
        "--tokens",
        path_str(&dir),
        "--seq-len",
        "8",
        "--index-n-heads",
        "4",
        "--index-head-dim",
        "32",
    ]);
    assert_clean_error(&result, &["tokens-00000.bin", "truncated"]);
}

// ---- WindowSampler --------------------------------------------------------------------------

/// A raw stream whose token at position p is p (so a window shows where it came from). The
/// file is written once: rewriting a file that another stream maps would be a test bug.
fn counting_stream(dir: &Path, n: u32) -> TokenStream {
    let path = dir.join(format!("count-{n}.bin"));
    if !path.exists() {
        dsa_train::data::write_token_file(&path, &(0..n).collect::<Vec<u32>>()).unwrap();
    }
    TokenStream::open(&path, n as usize).unwrap()
}

#[test]
fn sampler_visits_every_window_once_per_epoch_in_a_seeded_order() {
    let tmp = tempfile::tempdir().unwrap();
    // 1003 tokens, seq_len 10: 100 windows, the last 3 tokens dropped.
    let mut s = WindowSampler::new(counting_stream(tmp.path(), 1003), 10, 42).unwrap();
    assert_eq!(s.windows(), 100);
    let mut epochs = Vec::new();
    for epoch in 0..3 {
        let batch = s.next_batch(100).unwrap();
        let starts: Vec<u32> = batch.iter().map(|w| w[0]).collect();
        for w in &batch {
            assert_eq!(
                *w,
                (w[0]..w[0] + 10).collect::<Vec<_>>(),
                "a window is 10 consecutive tokens"
            );
        }
        let mut sorted = starts.clone();
        sorted.sort_unstable();
        assert_eq!(
            sorted,
            (0..100).map(|w| w * 10).collect::<Vec<_>>(),
            "epoch {epoch} visits each window once"
        );
        assert_eq!(
            s.cursor(),
            DataCursor {
                epoch: epoch + 1,
                index: 0
            }
        );
        epochs.push(starts);
    }
    assert_ne!(epochs[0], epochs[1]);
    assert_ne!(
        epochs[0],
        (0..100).map(|w| w * 10).collect::<Vec<_>>(),
        "the order is shuffled"
    );
    // The same seed repeats the order; another seed does not.
    let mut again = WindowSampler::new(counting_stream(tmp.path(), 1003), 10, 42).unwrap();
    assert_eq!(
        again
            .next_batch(100)
            .unwrap()
            .iter()
            .map(|w| w[0])
            .collect::<Vec<_>>(),
        epochs[0]
    );
    let mut other = WindowSampler::new(counting_stream(tmp.path(), 1003), 10, 43).unwrap();
    assert_ne!(
        other
            .next_batch(100)
            .unwrap()
            .iter()
            .map(|w| w[0])
            .collect::<Vec<_>>(),
        epochs[0]
    );
}

#[test]
fn restoring_a_cursor_continues_exactly_mid_epoch_and_across_epoch_boundaries() {
    let tmp = tempfile::tempdir().unwrap();
    let fresh = || WindowSampler::new(counting_stream(tmp.path(), 370), 10, 7).unwrap(); // 37 windows
    let mut straight = fresh();
    let reference: Vec<Vec<Vec<u32>>> = (0..20).map(|_| straight.next_batch(5).unwrap()).collect(); // 100 windows, ~2.7 epochs
                                                                                                    // Stop after k batches: mid-epoch (3), a batch straddling the boundary (8: windows 35..40),
                                                                                                    // inside the second epoch (9, 14) and in the third (16).
    for k in [3, 8, 9, 14, 16] {
        let mut first = fresh();
        for b in &reference[..k] {
            assert_eq!(&first.next_batch(5).unwrap(), b);
        }
        // The cursor goes through JSON as it would in a checkpoint.
        let saved = serde_json::to_string(&first.cursor()).unwrap();
        let cursor: DataCursor = serde_json::from_str(&saved).unwrap();
        assert_eq!(
            cursor,
            DataCursor {
                epoch: (k as u64 * 5) / 37,
                index: (k as u64 * 5) % 37
            }
        );
        let mut resumed = fresh();
        resumed.restore(cursor).unwrap();
        for (i, b) in reference[k..].iter().enumerate() {
            assert_eq!(
                &resumed.next_batch(5).unwrap(),
                b,
                "resumed after {k} batches, batch {}",
                k + i
            );
        }
    }
}

#[test]
fn resuming_exactly_at_an_epoch_boundary_starts_the_next_epochs_order() {
    let tmp = tempfile::tempdir().unwrap();
    let mut a = WindowSampler::new(counting_stream(tmp.path(), 200), 10, 1).unwrap();
    a.next_batch(20).unwrap();
    assert_eq!(a.cursor(), DataCursor { epoch: 1, index: 0 });
    let expected = a.next_batch(20).unwrap();
    let mut b = WindowSampler::new(counting_stream(tmp.path(), 200), 10, 1).unwrap();
    b.restore(DataCursor { epoch: 1, index: 0 }).unwrap();
    assert_eq!(b.next_batch(20).unwrap(), expected);
    let order: Vec<u32> = b.epoch_order(1).iter().map(|&w| w * 10).collect();
    assert_eq!(expected.iter().map(|w| w[0]).collect::<Vec<_>>(), order);
}

#[test]
fn sampler_rejects_too_little_data_and_foreign_cursors() {
    let tmp = tempfile::tempdir().unwrap();
    let err = WindowSampler::new(counting_stream(tmp.path(), 9), 10, 0)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("count-9.bin holds 9 tokens, fewer than one window of seq_len 10"),
        "{err}"
    );
    let mut s = WindowSampler::new(counting_stream(tmp.path(), 30), 10, 0).unwrap();
    let err = s
        .restore(DataCursor { epoch: 0, index: 3 })
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("index 3") && err.contains("3 windows"),
        "{err}"
    );
    s.restore(DataCursor { epoch: 5, index: 2 }).unwrap();
}

#[test]
fn raw_file_and_prepared_directory_give_the_same_stream_and_batches() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, tokens) = prepared(tmp.path(), 60, 13);
    let raw = tmp.path().join("same.bin");
    dsa_train::data::write_token_file(&raw, &tokens).unwrap();
    let (from_dir, from_raw) = (
        TokenStream::open(&dir, 11).unwrap(),
        TokenStream::open(&raw, 11).unwrap(),
    );
    assert_eq!(from_dir.len(), from_raw.len());
    assert_eq!(from_dir.read_prefix(u64::MAX).unwrap(), tokens);
    assert_eq!(from_raw.read_prefix(u64::MAX).unwrap(), tokens);
    let mut a = WindowSampler::new(from_dir, 16, 9).unwrap();
    let mut b = WindowSampler::new(from_raw, 16, 9).unwrap();
    for _ in 0..10 {
        assert_eq!(a.next_batch(7).unwrap(), b.next_batch(7).unwrap());
    }
}

#[test]
fn eval_gives_the_same_result_on_a_prepared_directory_and_its_raw_file() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, tokens) = prepared(tmp.path(), 12, 10);
    assert!(tokens.len() >= 48);
    let raw = tmp.path().join("same.bin");
    dsa_train::data::write_token_file(&raw, &tokens).unwrap();
    let (_ckpt_tmp, model) = common::tiny_checkpoint(false, 5);
    let eval = |tokens: &Path| {
        let (code, stdout, stderr) = run_cli(&[
            "eval",
            "--model",
            path_str(&model),
            "--tokens",
            path_str(tokens),
            "--seq-len",
            "16",
            "--max-windows",
            "3",
            "--index-n-heads",
            "4",
            "--index-head-dim",
            "32",
            "--topk",
            "8",
        ]);
        assert_eq!(code, 0, "{stderr}");
        stdout.lines().last().unwrap().to_string()
    };
    let from_dir = eval(&dir);
    assert!(from_dir.contains("\"windows\":3"), "{from_dir}");
    assert_eq!(from_dir, eval(&raw));
}

/// `data prepare` stopped by SIGINT after it has written shards removes what it wrote (and
/// the output folder it created): a partial data set is never left to be mistaken for one.
#[test]
fn an_interrupted_prepare_removes_its_partial_output() {
    let dir = tempfile::tempdir().unwrap();
    let tok = word_tokenizer(dir.path(), true);
    let body = (json!({"text": "the cat sat on the mat . a dog sat on the cat ."}).to_string()
        + "\n")
        .repeat(2_000_000);
    let input = dir.path().join("big.jsonl");
    std::fs::write(&input, body).unwrap();
    let out = dir.path().join("out");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_dsa-train"))
        .args([
            "data",
            "prepare",
            "--tokenizer",
            path_str(&tok),
            "--output",
            path_str(&out),
            "--input",
            path_str(&input),
            "--shard-tokens",
            "100000",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while !out.join("tokens-00000.bin").exists() {
        assert!(t0.elapsed().as_secs() < 120, "no shard written");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let result = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert_eq!(
        result.status.code(),
        Some(1),
        "the run finished before the signal? {stderr}"
    );
    assert!(
        stderr.contains("error:") && stderr.contains("interrupted"),
        "{stderr}"
    );
    assert!(
        !out.exists(),
        "partial output left: {:?}",
        std::fs::read_dir(&out).map(|d| d.count())
    );
}

/// Write `PREFIX.bin` + `PREFIX.idx` as Megatron's MMapIndexedDatasetBuilder lays them out
/// (written here from the format's description, not with the crate's reader): dtype `code`,
/// `width` bytes per id.
fn write_megatron(prefix: &Path, code: u8, width: usize, docs: &[&[u32]]) {
    let (mut bin, mut lens, mut ptrs) = (vec![], vec![], vec![]);
    for d in docs {
        ptrs.push(bin.len() as i64);
        lens.push(d.len() as i32);
        for &t in *d {
            bin.extend_from_slice(&(t as u64).to_le_bytes()[..width]);
        }
    }
    let mut idx = b"MMIDIDX\x00\x00".to_vec();
    idx.extend_from_slice(&1u64.to_le_bytes());
    idx.push(code);
    idx.extend_from_slice(&(docs.len() as u64).to_le_bytes());
    idx.extend_from_slice(&(docs.len() as u64 + 1).to_le_bytes());
    lens.iter()
        .for_each(|l| idx.extend_from_slice(&l.to_le_bytes()));
    ptrs.iter()
        .for_each(|p| idx.extend_from_slice(&p.to_le_bytes()));
    (0..=docs.len() as i64).for_each(|d| idx.extend_from_slice(&d.to_le_bytes()));
    std::fs::write(format!("{}.bin", prefix.display()), bin).unwrap();
    std::fs::write(format!("{}.idx", prefix.display()), idx).unwrap();
}

/// A Megatron-LM indexed dataset is the same token stream as the raw file of its ids, in int32
/// and uint16, by prefix or by either file; `eval` on it gives the raw file's result; a
/// truncated `.bin` or a float dtype is one error naming the file.
#[test]
fn a_megatron_indexed_dataset_reads_as_the_same_stream() {
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<u32> = dsa_train::tiny::synthetic_corpus(512, 3000, 7);
    let docs: Vec<&[u32]> = ids.chunks(437).collect();
    let raw = dir.path().join("raw.u32");
    dsa_train::data::write_token_file(&raw, &ids).unwrap();
    let (p32, p16) = (
        dir.path().join("c32_text_document"),
        dir.path().join("c16_text_document"),
    );
    write_megatron(&p32, 4, 4, &docs);
    write_megatron(&p16, 8, 2, &docs);
    for p in [
        p32.clone(),
        p16.clone(),
        p32.with_extension("bin"),
        p16.with_extension("idx"),
    ] {
        assert_eq!(
            dsa_train::data::megatron::prefix_of(&p),
            Some(p.with_extension("")),
            "{}",
            p.display()
        );
        let s = TokenStream::open(&p, 512).unwrap();
        assert_eq!(s.read_prefix(u64::MAX).unwrap(), ids, "{}", p.display());
    }
    assert_eq!(dsa_train::data::megatron::prefix_of(&raw), None);
    let (_tmp, model) = common::tiny_checkpoint(true, 3);
    let eval = |tokens: &Path| {
        let (code, stdout, stderr) = run_cli(&[
            "eval",
            "--model",
            path_str(&model),
            "--tokens",
            path_str(tokens),
            "--seq-len",
            "64",
            "--max-windows",
            "3",
        ]);
        assert_eq!(code, 0, "{stderr}");
        let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        (
            v["lm_loss"].as_f64().unwrap(),
            v["tokens"].as_u64().unwrap(),
        )
    };
    assert_eq!(eval(&p16), eval(&raw));
    let bin = p16.with_extension("bin");
    let bytes = std::fs::read(&bin).unwrap();
    std::fs::write(&bin, &bytes[..bytes.len() - 2]).unwrap();
    assert_clean_error(
        &run_cli(&[
            "eval",
            "--model",
            path_str(&model),
            "--tokens",
            path_str(&p16),
        ]),
        &["c16_text_document.bin", "truncated"],
    );
    write_megatron(&p32, 7, 4, &docs);
    assert_clean_error(
        &run_cli(&[
            "eval",
            "--model",
            path_str(&model),
            "--tokens",
            path_str(&p32),
        ]),
        &["c32_text_document.idx", "not an integer token type"],
    );
}

/// A Parquet file of `(body, id)` rows in row groups of `group` rows, pages compressed with
/// `codec` (Snappy is what pyarrow writes by default), written with the parquet crate's own
/// writer.
fn parquet_file(
    path: &Path,
    bodies: &[&str],
    group: usize,
    codec: parquet::basic::Compression,
) -> PathBuf {
    use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use std::sync::Arc;
    let schema = Arc::new(
        parquet::schema::parser::parse_message_type(
            "message doc { required int64 id; required binary body (UTF8); }",
        )
        .unwrap(),
    );
    let props = Arc::new(WriterProperties::builder().set_compression(codec).build());
    let mut w =
        SerializedFileWriter::new(std::fs::File::create(path).unwrap(), schema, props).unwrap();
    for (g, chunk) in bodies.chunks(group).enumerate() {
        let mut rg = w.next_row_group().unwrap();
        let mut column = 0;
        while let Some(mut c) = rg.next_column().unwrap() {
            if column == 0 {
                let ids: Vec<i64> = (0..chunk.len()).map(|i| (g * group + i) as i64).collect();
                c.typed::<Int64Type>()
                    .write_batch(&ids, None, None)
                    .unwrap();
            } else {
                let v: Vec<ByteArray> = chunk.iter().map(|s| ByteArray::from(*s)).collect();
                c.typed::<ByteArrayType>()
                    .write_batch(&v, None, None)
                    .unwrap();
            }
            c.close().unwrap();
            column += 1;
        }
        rg.close().unwrap();
    }
    w.close().unwrap();
    path.to_path_buf()
}

/// Parquet inputs: one document per row of the `--text-key` column, across row groups, in
/// order with the other inputs, whatever the pages' codec (Snappy, gzip, zstd, LZ4); JSONL
/// takes the same key; a missing column is named with the columns the file has, before any
/// output exists.
#[test]
fn prepare_reads_parquet_rows_and_the_text_key() {
    use parquet::basic::{Compression, GzipLevel, ZstdLevel};
    let tmp = tempfile::tempdir().unwrap();
    let tok = word_tokenizer(tmp.path(), true);
    let docs = ["the cat sat", "", "on a mat .", "a dog", "the mat ."];
    for (name, codec) in [
        ("gzip", Compression::GZIP(GzipLevel::default())),
        ("zstd", Compression::ZSTD(ZstdLevel::default())),
        ("lz4", Compression::LZ4_RAW),
    ] {
        let pq = parquet_file(&tmp.path().join(format!("{name}.parquet")), &docs, 2, codec);
        let out = tmp.path().join(format!("out-{name}"));
        prepare_ok(&tok, &[&pq], &out, &["--text-key", "body"]);
        assert_eq!(all_tokens(&out), expected_words(&docs), "{name}");
    }
    let pq = parquet_file(&tmp.path().join("a.parquet"), &docs, 2, Compression::SNAPPY);
    let jl = tmp.path().join("b.jsonl");
    std::fs::write(&jl, "{\"body\": \"a cat\"}\n").unwrap();
    let out = tmp.path().join("out");
    prepare_ok(&tok, &[&pq, &jl], &out, &["--text-key", "body"]);
    let mut want = docs.to_vec();
    want.push("a cat");
    assert_eq!(all_tokens(&out), expected_words(&want));
    assert_eq!(read_index(&out)["total_documents"], 5);

    let (code, _, stderr) = prepare(&tok, &[&pq], &tmp.path().join("no"), &[]);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("a.parquet")
            && stderr.contains("no column \"text\"")
            && stderr.contains("id, body"),
        "{stderr}"
    );
    assert!(!tmp.path().join("no").exists());
    let (code, _, stderr) = prepare(&tok, &[&jl], &tmp.path().join("no2"), &[]);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("b.jsonl line 1") && stderr.contains("\"text\""),
        "{stderr}"
    );
}
