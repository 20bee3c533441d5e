//! Helpers shared by the integration tests: tiny checkpoints in temporary folders and running
//! the `dsa-train` binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use dsa_train::tiny::{tiny_config, write_random_checkpoint};

/// A temporary folder holding a tiny random checkpoint (V3.2 style when `with_indexer`).
pub fn tiny_checkpoint(with_indexer: bool, seed: u64) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    write_random_checkpoint(&dir, &tiny_config(with_indexer), seed, 1 << 20).unwrap();
    (tmp, dir)
}

/// Run the binary; returns (exit code, stdout, stderr).
pub fn run_cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dsa-train")).args(args).output().unwrap();
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
    assert!(!stderr.contains("panicked") && !stderr.contains("backtrace"), "panic:\n{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "expected one error line:\n{stderr}");
    for n in needles {
        assert!(errors[0].contains(n), "error line lacks {n:?}: {}", errors[0]);
    }
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}
