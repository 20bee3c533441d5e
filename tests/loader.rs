//! The checkpoint loader: FP8 dequantisation through the real file format, lazy loading, and
//! every bad-input case ending as one clear error line (never a panic).

mod common;

use std::path::Path;

use candle_core::{DType, Device};
use common::{assert_clean_error, path_str, run_cli, tiny_checkpoint};
use dsa_train::checkpoint::Checkpoint;
use dsa_train::hf_writer::{write_safetensors, StoredTensor};
use dsa_train::rng::SplitMix64;

fn edit_index(dir: &Path, f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let path = dir.join("model.safetensors.index.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    f(v["weight_map"].as_object_mut().unwrap());
    std::fs::write(&path, serde_json::to_string(&v).unwrap()).unwrap();
}

fn shard_of(dir: &Path, name: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    v["weight_map"][name].as_str().unwrap().to_string()
}

/// eval on the given checkpoint with a small valid token file.
fn eval_cli(dir: &Path) -> (i32, String, String) {
    let tokens = dir.parent().unwrap().join("tokens.bin");
    dsa_train::data::write_token_file(&tokens, &(0..64).collect::<Vec<u32>>()).unwrap();
    run_cli(&[
        "eval",
        "--model",
        path_str(dir),
        "--tokens",
        path_str(&tokens),
        "--seq-len",
        "16",
        "--index-n-heads",
        "4",
        "--index-head-dim",
        "32",
        "--topk",
        "8",
    ])
}

#[test]
fn fp8_weights_decode_exactly_through_the_file_format_with_ragged_blocks() {
    let tmp = tempfile::tempdir().unwrap();
    let (rows, cols) = (300, 200); // 3 x 2 blocks, both edges partial
    let w = SplitMix64::new(1).normal_vec(rows * cols, 3.0);
    let [q, s] = StoredTensor::fp8("w", &[rows, cols], &w);
    let (qbytes, sbytes) = (q.bytes.clone(), s.bytes.clone());
    write_safetensors(&tmp.path().join("model.safetensors"), &[q, s]).unwrap();
    let ckpt = Checkpoint::open(tmp.path()).unwrap();
    let got: Vec<f32> = ckpt
        .load("w", &[rows, cols], DType::F32, &Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let scales: Vec<f32> = sbytes
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    for r in 0..rows {
        for c in 0..cols {
            // Independent decode through the float8 crate.
            let expect = float8::F8E4M3::from_bits(qbytes[r * cols + c]).to_f32()
                * scales[(r / 128) * 2 + c / 128];
            assert_eq!(got[r * cols + c], expect, "({r},{c})");
            let orig = w[r * cols + c];
            assert!(
                (orig - expect).abs() <= orig.abs() / 16.0 + 1e-2,
                "({r},{c}) {orig} vs {expect}"
            );
        }
    }
    // Power-of-two scales make the bf16 load exact as well.
    let bf: Vec<f32> = ckpt
        .load("w", &[rows, cols], DType::BF16, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(bf, got);
}

#[test]
fn only_the_requested_tensors_are_read() {
    let (_tmp, dir) = tiny_checkpoint(false, 2);
    // Truncate the shard holding the MTP head; the embedding elsewhere must still load.
    let bad = dir.join(shard_of(&dir, "model.layers.4.shared_head.head.weight"));
    let good_shard = shard_of(&dir, "model.embed_tokens.weight");
    assert_ne!(bad, dir.join(&good_shard));
    let len = std::fs::metadata(&bad).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&bad)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    let ckpt = Checkpoint::open(&dir).unwrap();
    let e = ckpt
        .load(
            "model.embed_tokens.weight",
            &[512, 192],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
    assert_eq!(e.dims(), [512, 192]);
    let err = ckpt
        .load(
            "model.layers.4.shared_head.head.weight",
            &[512, 192],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap_err();
    assert!(format!("{err:#}").contains("truncated"), "{err:#}");
}

#[test]
fn eval_runs_on_a_v31_checkpoint_and_prints_json_last() {
    let (_tmp, dir) = tiny_checkpoint(false, 3);
    let (code, stdout, stderr) = eval_cli(&dir);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("has no indexer tensors: initialised"),
        "{stderr}"
    );
    let last = stdout.lines().last().unwrap();
    let v: serde_json::Value = serde_json::from_str(last).unwrap();
    assert_eq!(v["tokens"], 64);
    assert_eq!(v["topk"], 8);
    for key in ["lm_loss", "indexer_kl", "attention_mass_recall"] {
        assert!(v[key].as_f64().unwrap().is_finite(), "{key}");
    }
    assert_eq!(v["indexer_kl_per_layer"].as_array().unwrap().len(), 4);
    assert_eq!(
        v["attention_mass_recall_per_layer"]
            .as_array()
            .unwrap()
            .len(),
        4
    );
    // The ceiling is the mass of the best k keys: no indexer's top-k holds more, none less than 0.
    let ceilings = v["attention_mass_recall_ceiling_per_layer"]
        .as_array()
        .unwrap();
    assert_eq!(ceilings.len(), 4);
    for (c, r) in ceilings
        .iter()
        .zip(v["attention_mass_recall_per_layer"].as_array().unwrap())
    {
        let (c, r) = (c.as_f64().unwrap(), r.as_f64().unwrap());
        assert!(
            r <= c + 1e-5 && c <= 1.0 + 1e-5 && c > 0.0,
            "recall {r} ceiling {c}"
        );
    }
}

#[test]
fn a_missing_tensor_is_named() {
    let (_tmp, dir) = tiny_checkpoint(false, 4);
    edit_index(&dir, |m| {
        m.remove("model.norm.weight");
    });
    assert_clean_error(&eval_cli(&dir), &["model.norm.weight", "missing"]);
}

#[test]
fn a_wrong_shape_names_tensor_file_and_both_shapes() {
    let (_tmp, dir) = tiny_checkpoint(false, 5);
    let cfg = std::fs::read_to_string(dir.join("config.json"))
        .unwrap()
        .replace("\"q_lora_rank\": 160", "\"q_lora_rank\": 161");
    std::fs::write(dir.join("config.json"), cfg).unwrap();
    let file = shard_of(&dir, "model.layers.0.self_attn.q_a_proj.weight");
    assert_clean_error(
        &eval_cli(&dir),
        &[
            "model.layers.0.self_attn.q_a_proj.weight",
            &file,
            "[160, 192]",
            "[161, 192]",
        ],
    );
}

#[test]
fn an_unsupported_dtype_is_named() {
    let (_tmp, dir) = tiny_checkpoint(false, 6);
    // Point one norm at a new shard that stores it as I32.
    let header = r#"{"model.norm.weight":{"dtype":"I32","shape":[192],"data_offsets":[0,768]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header.as_bytes());
    bytes.extend(vec![0u8; 768]);
    std::fs::write(dir.join("extra.safetensors"), bytes).unwrap();
    edit_index(&dir, |m| {
        m.insert("model.norm.weight".into(), "extra.safetensors".into());
    });
    assert_clean_error(
        &eval_cli(&dir),
        &["model.norm.weight", "extra.safetensors", "I32"],
    );
}

#[test]
fn a_scale_without_its_weight_is_named() {
    let (_tmp, dir) = tiny_checkpoint(false, 7);
    edit_index(&dir, |m| {
        m.remove("model.layers.1.self_attn.o_proj.weight");
    });
    assert_clean_error(
        &eval_cli(&dir),
        &[
            "model.layers.1.self_attn.o_proj.weight_scale_inv",
            "has no weight",
        ],
    );
}

#[test]
fn an_fp8_weight_without_its_scale_is_named() {
    let (_tmp, dir) = tiny_checkpoint(false, 8);
    edit_index(&dir, |m| {
        m.remove("model.layers.1.self_attn.o_proj.weight_scale_inv");
    });
    assert_clean_error(
        &eval_cli(&dir),
        &[
            "model.layers.1.self_attn.o_proj.weight",
            "F8_E4M3",
            "_scale_inv",
        ],
    );
}

#[test]
fn a_truncated_shard_is_named() {
    let (_tmp, dir) = tiny_checkpoint(false, 9);
    let file = shard_of(&dir, "model.layers.0.mlp.down_proj.weight");
    let path = dir.join(&file);
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    assert_clean_error(&eval_cli(&dir), &[&file, "truncated"]);
    // Cut inside the header itself.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(5)
        .unwrap();
    assert_clean_error(&eval_cli(&dir), &[&file, "truncated"]);
}

#[test]
fn bad_json_is_named_by_file() {
    let (_tmp, dir) = tiny_checkpoint(false, 10);
    let index = dir.join("model.safetensors.index.json");
    let good = std::fs::read_to_string(&index).unwrap();
    std::fs::write(&index, "{\"weight_map\": {").unwrap();
    assert_clean_error(
        &eval_cli(&dir),
        &["model.safetensors.index.json", "bad JSON"],
    );
    std::fs::write(&index, good).unwrap();
    std::fs::write(dir.join("config.json"), "{ not json").unwrap();
    assert_clean_error(&eval_cli(&dir), &["config.json"]);
    // A shard whose header is not JSON.
    let (_tmp2, dir2) = tiny_checkpoint(false, 11);
    let file = shard_of(&dir2, "model.embed_tokens.weight");
    let path = dir2.join(&file);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[8..16].copy_from_slice(b"garbage!");
    std::fs::write(&path, bytes).unwrap();
    assert_clean_error(&eval_cli(&dir2), &[&file, "header"]);
}

#[test]
fn a_missing_checkpoint_or_config_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    std::fs::create_dir_all(&dir).unwrap();
    assert_clean_error(&eval_cli(&dir), &["config.json"]);
    let (_tmp, dir) = tiny_checkpoint(false, 12);
    for entry in std::fs::read_dir(&dir).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "safetensors")
            || p.ends_with("model.safetensors.index.json")
        {
            std::fs::remove_file(p).unwrap();
        }
    }
    assert_clean_error(
        &eval_cli(&dir),
        &["neither model.safetensors.index.json nor model.safetensors"],
    );
}

#[test]
fn bad_token_files_are_named() {
    let (_tmp, dir) = tiny_checkpoint(false, 13);
    let tokens = dir.parent().unwrap().join("bad.bin");
    let run = |tokens: &Path, seq: &str| {
        run_cli(&[
            "eval",
            "--model",
            path_str(&dir),
            "--tokens",
            path_str(tokens),
            "--seq-len",
            seq,
            "--index-n-heads",
            "4",
            "--index-head-dim",
            "32",
        ])
    };
    std::fs::write(&tokens, [1u8, 2, 3, 4, 5, 6]).unwrap();
    assert_clean_error(&run(&tokens, "4"), &["bad.bin", "multiple of 4"]);
    dsa_train::data::write_token_file(&tokens, &[1, 2, 9999, 3]).unwrap();
    assert_clean_error(&run(&tokens, "2"), &["bad.bin", "9999", "position 2"]);
    dsa_train::data::write_token_file(&tokens, &[1, 2, 3]).unwrap();
    assert_clean_error(&run(&tokens, "16"), &["bad.bin", "fewer than one window"]);
    assert_clean_error(&run(&dir.join("nope.bin"), "16"), &["nope.bin"]);
    std::fs::write(&tokens, []).unwrap();
    assert_clean_error(&run(&tokens, "16"), &["bad.bin", "empty"]);
}
