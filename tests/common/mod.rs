//! Helpers shared by the integration tests: tiny checkpoints in temporary folders and running
//! the `dsa-train` binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::Tensor;
use dsa_train::tiny::{tiny_config, write_random_checkpoint};

/// max |a - b| over all elements (f32 tensors of one shape).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// max |a - b| / max |b|: the largest error relative to the reference's scale.
pub fn max_rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let scale = b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    max_abs_diff(a, b) / scale.max(1e-30)
}

/// A temporary folder holding a tiny random checkpoint (V3.2 style when `with_indexer`).
pub fn tiny_checkpoint(with_indexer: bool, seed: u64) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    write_random_checkpoint(&dir, &tiny_config(with_indexer), seed, 1 << 20).unwrap();
    (tmp, dir)
}

/// Run the binary; returns (exit code, stdout, stderr).
pub fn run_cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dsa-train"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Assert a clean user-facing failure: exit 1, one `error:` line that mentions every `needle`,
/// and no panic or backtrace.
pub fn assert_clean_error(result: &(i32, String, String), needles: &[&str]) {
    let (code, _, stderr) = result;
    assert_eq!(*code, 1, "expected exit 1, stderr:\n{stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "panic:\n{stderr}"
    );
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "expected one error line:\n{stderr}");
    for n in needles {
        assert!(
            errors[0].contains(n),
            "error line lacks {n:?}: {}",
            errors[0]
        );
    }
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A tiny V3.1-style checkpoint (2 layers) and a synthetic corpus in a temp folder.
pub struct Fixture {
    _tmp: tempfile::TempDir,
    pub root: PathBuf,
}

impl Fixture {
    pub fn new(seed: u64) -> Self {
        Self::with_config(seed, |_| {})
    }

    /// As `new`, with `edit` applied to the model's config.json first.
    pub fn with_config(seed: u64, edit: impl FnOnce(&mut serde_json::Value)) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let mut cfg = dsa_train::tiny::tiny_config(false);
        cfg["num_hidden_layers"] = 2.into();
        edit(&mut cfg);
        dsa_train::tiny::write_random_checkpoint(&root.join("model"), &cfg, seed, 1 << 20).unwrap();
        let tokens = dsa_train::tiny::synthetic_corpus(512, 4096, seed);
        dsa_train::data::write_token_file(&root.join("tokens.bin"), &tokens).unwrap();
        Self { _tmp: tmp, root }
    }

    /// A recipe file for `stage` writing into `out`.
    pub fn recipe(&self, stage: &str, out: &str, model: &Path, steps: u64) -> PathBuf {
        let text = format!(
            "[run]\noutput_dir = \"{}\"\nseed = 3\nprogress = false\n\
             [model]\npath = \"{}\"\ndtype = \"f32\"\ndevice = \"cpu\"\nindex_n_heads = 2\nindex_head_dim = 32\n\
             [data]\npath = \"{}\"\nseq_len = 32\n\
             [train]\nstage = \"{stage}\"\nsteps = {steps}\nlr = 1e-2\nglobal_batch_seqs = 4\nmicro_batch_seqs = 2\n\
             warmup_steps = 2\nrouter_bias_gamma = 0.01\nmtp_weight = 0.5\nseq_balance_alpha = 0.01\n\
             [dsa]\nindex_topk = 8\n[checkpoint]\nevery = 2\nkeep_last = 0\n",
            self.root.join(out).display(), model.display(), self.root.join("tokens.bin").display()
        );
        let path = self.root.join(format!("{}.toml", out.replace('/', "_")));
        std::fs::write(&path, text).unwrap();
        path
    }

    pub fn out(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
}

/// Poll `cond` every 20 ms until it holds; fail after two minutes naming `what`.
pub fn wait_for(cond: impl Fn() -> bool, what: &str) {
    let t0 = std::time::Instant::now();
    while !cond() {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(120),
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
