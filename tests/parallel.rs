//! Several processes on the CPU collective backend (TCP on localhost): data parallelism with
//! ZeRO-1 gives the losses of one process, sharded checkpoints resume and re-shard (2 -> 1 and
//! 1 -> 2), and layout errors are one clear line.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::{assert_clean_error, run_cli, Fixture};
use dsa_train::train::metrics;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Run `dsa-train train RECIPE ARGS` as `world` processes (torchrun-style variables); every
/// rank must exit 0.
fn train_ranks(world: usize, recipe: &Path, args: &[&str]) {
    let port = free_port().to_string();
    let children: Vec<_> = (0..world)
        .map(|r| {
            Command::new(env!("CARGO_BIN_EXE_dsa-train"))
                .arg("train")
                .arg(recipe)
                .args(args)
                .env("RANK", r.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("LOCAL_RANK", r.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .env("DSA_RENDEZVOUS_TIMEOUT", "60")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (r, c) in children.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "rank {r} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
}

fn losses(dir: &Path) -> Vec<(f64, f64)> {
    metrics::read(&dir.join("metrics.jsonl")).unwrap().iter().map(|m| (m.lm_loss.unwrap_or(0.0), m.indexer_kl)).collect()
}

fn assert_close(a: &[(f64, f64)], b: &[(f64, f64)], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: step counts");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let close = |p: f64, q: f64| (p - q).abs() <= 1e-4 * p.abs().max(q.abs()).max(1e-3);
        assert!(close(x.0, y.0) && close(x.1, y.1), "{what}, step {}: {x:?} vs {y:?}", i + 1);
    }
}

#[test]
fn data_parallel_matches_one_process_and_sharded_checkpoints_reshard() {
    let f = Fixture::new(5);
    let model = f.root.join("model");
    for stage in ["warmup", "sparse"] {
        // One process, 4 steps straight.
        let one = f.recipe(stage, &format!("{stage}-one"), &model, 4);
        train_ranks(1, &one, &[]);
        // dp = 2: 2 steps, then resume on 2 ranks (same layout) for 2 more.
        let two = f.recipe(stage, &format!("{stage}-two"), &model, 4);
        train_ranks(2, &two, &["--set", "train.steps=2"]);
        let step2 = f.out(&format!("{stage}-two/step-2"));
        assert!(step2.join("manifest.json").exists() && step2.join("optimizer.rank-00001.safetensors").exists());
        train_ranks(2, &two, &["--resume", "auto"]);
        assert_close(&losses(&f.out(&format!("{stage}-one"))), &losses(&f.out(&format!("{stage}-two"))), &format!("{stage}: dp=2 vs 1 process"));
        // Re-shard 2 -> 1: resume the dp=2 step-2 checkpoint in one process.
        let down = f.recipe(stage, &format!("{stage}-down"), &model, 4);
        train_ranks(1, &down, &["--resume", step2.to_str().unwrap()]);
        let tail = |v: Vec<(f64, f64)>| v[v.len() - 2..].to_vec();
        assert_close(&tail(losses(&f.out(&format!("{stage}-one")))), &losses(&f.out(&format!("{stage}-down"))), &format!("{stage}: 2 -> 1"));
        // Re-shard 1 -> 2: resume the single-process step-2 checkpoint on 2 ranks.
        let up = f.recipe(stage, &format!("{stage}-up"), &model, 4);
        let one_step2 = f.out(&format!("{stage}-one/step-2"));
        train_ranks(2, &up, &["--resume", one_step2.to_str().unwrap()]);
        assert_close(&tail(losses(&f.out(&format!("{stage}-one")))), &losses(&f.out(&format!("{stage}-up"))), &format!("{stage}: 1 -> 2"));
    }
}

#[test]
fn layout_errors_are_one_clear_line() {
    let f = Fixture::new(6);
    let recipe = f.recipe("warmup", "bad", &f.root.join("model"), 2);
    let r = recipe.to_str().unwrap();
    assert_clean_error(&run_cli(&["train", r, "--set", "parallel.tp=2"]), &["parallel.tp = 2", "not built"]);
    assert_clean_error(&run_cli(&["train", r, "--set", "parallel.dp=2"]), &["parallel.dp (2)", "1 rank"]);
    assert_clean_error(&run_cli(&["train", r, "--set", "parallel.ep=3"]), &["parallel.ep (3) must divide parallel.dp (1)"]);
    assert_clean_error(&run_cli(&["train", r, "--set", "parallel.dq=2"]), &["--set parallel.dq: unknown key", "did you mean `parallel.dp`"]);
}
