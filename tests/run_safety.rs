//! What a run guarantees (docs/training.md): one run per output folder, verified checkpoints,
//! chains that survive the parent pruning or moving, resume guards, no lost work on output
//! errors or signals, token files that change under a run, `eval` on bad weights and on a
//! step, `check` = `train`'s validation, no leftovers from failed saves. Real files, real
//! processes, real signals; each test names the failure it holds.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::{assert_clean_error, path_str, run_cli, wait_for, Fixture};
use dsa_train::train::ckpt;

fn spawn_train(recipe: &Path, extra: &[&str], stderr: Stdio) -> Child {
    Command::new(env!("CARGO_BIN_EXE_dsa-train"))
        .arg("train")
        .arg(recipe)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap()
}

fn metrics_lines(out: &Path) -> usize {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

fn steps(out: &Path) -> Vec<u64> {
    ckpt::complete_checkpoints(out)
        .into_iter()
        .map(|(n, _)| n)
        .collect()
}

/// Every file of a folder, by name, with its bytes (to show nothing changed).
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().filter_map(|e| e.ok()) {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if e.file_name() != "LOCK" {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// Overwrite the bytes of tensor `name` in a safetensors file with `f(old bytes)` (a valid
/// file afterwards: only values change).
fn poke_tensor(file: &Path, name: &str, f: impl Fn(&mut [u8], &str)) {
    let mut bytes = std::fs::read(file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let t = &header[name];
    let (a, b) = (
        t["data_offsets"][0].as_u64().unwrap() as usize,
        t["data_offsets"][1].as_u64().unwrap() as usize,
    );
    f(
        &mut bytes[8 + n + a..8 + n + b],
        t["dtype"].as_str().unwrap(),
    );
    std::fs::write(file, bytes).unwrap();
}

fn flip_bytes(file: &Path, at: &[usize]) {
    let mut bytes = std::fs::read(file).unwrap();
    for &i in at {
        let i = bytes.len() - 1 - i; // in the data, past the header
        bytes[i] ^= 0x5a;
    }
    std::fs::write(file, bytes).unwrap();
}

/// Failure 1: the sparse stage pointed at the warm-up's own folder is refused and the warm-up
/// keeps its checkpoints and metrics.
#[test]
fn a_run_whose_model_lies_inside_its_output_dir_is_refused() {
    let f = Fixture::new(21);
    let warm = f.recipe("warmup", "w", &f.root.join("model"), 2);
    assert_eq!(run_cli(&["train", path_str(&warm)]).0, 0);
    let before = snapshot(&f.out("w"));
    let sparse = f.recipe("sparse", "w", &f.out("w/step-2"), 2);
    assert_clean_error(
        &run_cli(&["train", path_str(&sparse)]),
        &["lies inside run.output_dir", "model.path"],
    );
    assert_clean_error(
        &run_cli(&["check", path_str(&sparse)]),
        &["lies inside run.output_dir"],
    );
    // The same place through a symlink.
    std::os::unix::fs::symlink(f.out("w"), f.out("w-link")).unwrap();
    let linked = f.recipe("sparse", "w-link", &f.out("w/step-2"), 2);
    assert_clean_error(
        &run_cli(&["train", path_str(&linked)]),
        &["lies inside run.output_dir"],
    );
    // `..` after a symlink goes to the parent of its target, as the kernel resolves it.
    std::fs::create_dir_all(f.root.join("model/sub")).unwrap();
    std::fs::create_dir_all(f.out("e")).unwrap();
    std::os::unix::fs::symlink(f.root.join("model/sub"), f.out("e/q")).unwrap();
    let up = f.recipe("warmup", "e/q/..", &f.root.join("model"), 2);
    assert_clean_error(
        &run_cli(&["train", path_str(&up)]),
        &["lies inside run.output_dir"],
    );
    assert_eq!(
        snapshot(&f.out("w")),
        before,
        "the warm-up's folder changed"
    );
}

/// Failure 2: `train` without `--resume` over an earlier run refuses (naming `--resume auto`)
/// and changes nothing; with `--resume auto` it continues that run.
#[test]
fn a_fresh_start_over_an_earlier_run_is_refused_and_changes_nothing() {
    let f = Fixture::new(22);
    let recipe = f.recipe("warmup", "r", &f.root.join("model"), 4);
    assert_eq!(
        run_cli(&[
            "train",
            path_str(&recipe),
            "--set",
            "checkpoint.keep_last=2"
        ])
        .0,
        0
    );
    let before = snapshot(&f.out("r"));
    let refused = run_cli(&[
        "train",
        path_str(&recipe),
        "--set",
        "train.steps=2",
        "--set",
        "checkpoint.keep_last=1",
    ]);
    assert_clean_error(
        &refused,
        &[
            "already holds a run",
            "step-2 to step-4",
            "4 logged steps",
            "--resume auto",
        ],
    );
    assert_eq!(
        snapshot(&f.out("r")),
        before,
        "a refused run changed the folder"
    );
    // Resuming from anything but the newest step into the folder would overwrite step-4.
    let older = run_cli(&[
        "train",
        path_str(&recipe),
        "--resume",
        path_str(&f.out("r/step-2")),
    ]);
    assert_clean_error(&older, &["would overwrite", "new run.output_dir"]);
    // A newest step without its marker is neither skipped nor replaced.
    std::fs::rename(f.out("r/step-4/COMPLETE"), f.out("r/COMPLETE.aside")).unwrap();
    let skipped = run_cli(&[
        "train",
        path_str(&recipe),
        "--set",
        "train.steps=6",
        "--resume",
        "auto",
    ]);
    assert_clean_error(&skipped, &["step-4 has no COMPLETE marker"]);
    std::fs::rename(f.out("r/COMPLETE.aside"), f.out("r/step-4/COMPLETE")).unwrap();
    assert_eq!(
        snapshot(&f.out("r")),
        before,
        "a refused run changed the folder"
    );
    let (code, _, stderr) = run_cli(&[
        "train",
        path_str(&recipe),
        "--set",
        "train.steps=6",
        "--set",
        "checkpoint.keep_last=2",
        "--resume",
        "auto",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("resuming from") && stderr.contains("step-4"),
        "{stderr}"
    );
    assert_eq!(metrics_lines(&f.out("r")), 6);
    assert_eq!(steps(&f.out("r")), vec![4, 6]);
}

/// Failure 3: a flipped byte, a damaged optimizer state or a scaled tensor in a checkpoint is
/// found by resume, eval and export, named, and nothing is pruned; the older step is the way out.
#[test]
fn damaged_checkpoints_are_refused_by_every_reader_and_nothing_is_pruned() {
    let f = Fixture::new(23);
    let recipe = f.recipe("warmup", "d", &f.root.join("model"), 4);
    assert_eq!(
        run_cli(&[
            "train",
            path_str(&recipe),
            "--set",
            "checkpoint.keep_last=2"
        ])
        .0,
        0
    );
    let out = f.out("d");
    let pristine = snapshot(&out);
    let params = out.join("step-4/params.safetensors");
    flip_bytes(&params, &[10, 200, 3000, 4001]);
    let resume = run_cli(&[
        "train",
        path_str(&recipe),
        "--set",
        "train.steps=6",
        "--set",
        "checkpoint.keep_last=1",
        "--resume",
        "auto",
    ]);
    assert_clean_error(&resume, &["step-4/params.safetensors", "checksum mismatch"]);
    assert_eq!(steps(&out), vec![2, 4], "a refused resume pruned something");
    let tokens = f.root.join("tokens.bin");
    assert_clean_error(
        &run_cli(&[
            "eval",
            "--model",
            path_str(&out.join("step-4")),
            "--tokens",
            path_str(&tokens),
            "--seq-len",
            "32",
        ]),
        &["step-4/params.safetensors", "checksum"],
    );
    assert_clean_error(
        &run_cli(&[
            "export",
            "--checkpoint",
            path_str(&out.join("step-4")),
            "--output",
            path_str(&f.out("x")),
        ]),
        &["step-4/params.safetensors", "checksum"],
    );
    assert_clean_error(
        &run_cli(&["verify", path_str(&out.join("step-4"))]),
        &["step-4/params.safetensors", "checksum"],
    );
    let (code, stdout, stderr) = run_cli(&["verify", path_str(&out.join("step-2"))]);
    assert!(
        code == 0 && stdout.contains("4 files") && stdout.contains("checksums match"),
        "{stdout} {stderr}"
    );
    // An emptied marker (a step of this format always lists its files) and a file the marker
    // does not list are damage too.
    let marker = std::fs::read(out.join("step-2/COMPLETE")).unwrap();
    std::fs::write(out.join("step-2/COMPLETE"), b"").unwrap();
    assert_clean_error(
        &run_cli(&["verify", path_str(&out.join("step-2"))]),
        &["step-2/COMPLETE", "the marker is empty"],
    );
    std::fs::write(out.join("step-2/COMPLETE"), &marker).unwrap();
    std::fs::write(out.join("step-2/params.rank-00001.safetensors"), b"stray").unwrap();
    assert_clean_error(
        &run_cli(&["verify", path_str(&out.join("step-2"))]),
        &["params.rank-00001.safetensors", "not listed"],
    );
    std::fs::remove_file(out.join("step-2/params.rank-00001.safetensors")).unwrap();
    // The way out: the older step, into a new folder.
    let fork = run_cli(&[
        "train",
        path_str(&recipe),
        "--resume",
        path_str(&out.join("step-2")),
        "--set",
        &format!("run.output_dir={}", f.out("d2").display()),
    ]);
    assert_eq!(fork.0, 0, "{}", fork.2);
    assert_eq!(steps(&f.out("d2")), vec![4]);

    // A damaged optimizer state, and a tensor scaled x1000 (a valid file with other values).
    for (file, damage) in [("optimizer.safetensors", 0), ("params.safetensors", 1)] {
        for (p, bytes) in &pristine {
            std::fs::write(p, bytes).unwrap();
        }
        let path = out.join("step-4").join(file);
        if damage == 0 {
            flip_bytes(&path, &[7]);
        } else {
            poke_tensor(
                &path,
                "model.layers.0.self_attn.indexer.wq_b.weight",
                |b, dtype| {
                    assert_eq!(dtype, "F32");
                    for c in b.chunks_exact_mut(4) {
                        let x = f32::from_le_bytes(c.try_into().unwrap()) * 1000.0;
                        c.copy_from_slice(&x.to_le_bytes());
                    }
                },
            );
        }
        let r = run_cli(&[
            "train",
            path_str(&recipe),
            "--set",
            "train.steps=6",
            "--resume",
            "auto",
        ]);
        assert_clean_error(&r, &[&format!("step-4/{file}"), "checksum mismatch"]);
    }
}

/// Failure 4: a second process on the folder of a live run gets one line naming the holder and
/// touches nothing; once the holder is dead (SIGKILL, as a requeue finds it) the folder is free.
#[test]
fn two_processes_on_one_folder_the_second_is_refused_naming_the_holder() {
    let f = Fixture::new(24);
    let recipe = f.recipe("warmup", "l", &f.root.join("model"), 100_000);
    let out = f.out("l");
    let mut first = spawn_train(&recipe, &["--set", "checkpoint.every=0"], Stdio::null());
    wait_for(|| metrics_lines(&out) >= 1, "the first run's first step");
    let second = run_cli(&[
        "train",
        path_str(&recipe),
        "--resume",
        "auto",
        "--set",
        "train.steps=1",
    ]);
    assert_clean_error(
        &second,
        &[
            "is in use by another dsa-train process",
            &format!("pid {}", first.id()),
            "host",
            "since",
        ],
    );
    let n = metrics_lines(&out);
    wait_for(|| metrics_lines(&out) > n, "the first run going on");
    first.kill().unwrap();
    first.wait().unwrap();
    let (code, _, stderr) = run_cli(&[
        "train",
        path_str(&recipe),
        "--resume",
        "auto",
        "--set",
        "train.steps=1",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("no complete checkpoint") && stderr.contains("starting at step 0"),
        "{stderr}"
    );
}

/// Failure 5: a closed pipe on stderr stops the run like SIGTERM (checkpoint, exit 0, resumable);
/// a full stderr loses lines, never steps; SIGHUP checkpoints like SIGTERM; a result that
/// cannot be written to stdout is an error, not a panic.
#[test]
fn a_broken_pipe_or_a_full_stderr_loses_lines_never_steps() {
    let f = Fixture::new(25);
    let recipe = f.recipe("warmup", "p", &f.root.join("model"), 40);
    let out = f.out("p");
    let mut child = spawn_train(&recipe, &["--set", "checkpoint.every=0"], Stdio::piped());
    let mut reader = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    drop(reader); // the reader of our log is gone
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let done = metrics_lines(&out) as u64;
    assert!(
        done < 40,
        "the run should have stopped at the broken pipe, not finished"
    );
    assert_eq!(
        steps(&out).last(),
        Some(&done),
        "a checkpoint at the last step taken"
    );
    let (code, _, stderr) = run_cli(&["train", path_str(&recipe), "--resume", "auto"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(out.join("FINISHED").exists());

    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let recipe = f.recipe("warmup", "full", &f.root.join("model"), 6);
    let status = spawn_train(&recipe, &[], Stdio::from(full)).wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert_eq!(steps(&f.out("full")).last(), Some(&6));

    let recipe = f.recipe("warmup", "hup", &f.root.join("model"), 100_000);
    let mut child = spawn_train(&recipe, &["--set", "checkpoint.every=0"], Stdio::null());
    wait_for(|| metrics_lines(&f.out("hup")) >= 1, "a step");
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    assert!(child.wait().unwrap().success());
    assert_eq!(
        steps(&f.out("hup")).last().copied(),
        Some(metrics_lines(&f.out("hup")) as u64)
    );

    // `check | head -0`: stdout is a pipe whose reading end is closed before the child starts
    // (closing it after the spawn would race the child's write into the pipe's buffer).
    let mut ends = [0i32; 2];
    assert_eq!(unsafe { libc::pipe(ends.as_mut_ptr()) }, 0);
    unsafe { libc::close(ends[0]) };
    // SAFETY: ends[1] is a fresh descriptor owned by nothing else; Stdio takes it over.
    let write_end = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(ends[1]) };
    let check = Command::new(env!("CARGO_BIN_EXE_dsa-train"))
        .args(["check", path_str(&recipe)])
        .stdout(Stdio::from(write_end))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = check.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("error: cannot write the result to stdout") && !stderr.contains("panicked"),
        "{stderr}"
    );
}

/// Failure 6: a sparse run started from a warm-up step keeps working after the warm-up prunes
/// that step (extended with `--resume auto` and `keep_last` 1), and after the sparse run's
/// folder moves.
#[test]
fn a_chain_survives_the_parent_pruning_its_step_and_the_child_moving() {
    let f = Fixture::new(26);
    let warm = f.recipe("warmup", "w", &f.root.join("model"), 2);
    assert_eq!(
        run_cli(&["train", path_str(&warm), "--set", "checkpoint.keep_last=1"]).0,
        0
    );
    let sparse = f.recipe("sparse", "s", &f.out("w/step-2"), 2);
    assert_eq!(run_cli(&["train", path_str(&sparse)]).0, 0);
    let (code, _, stderr) = run_cli(&[
        "train",
        path_str(&warm),
        "--set",
        "checkpoint.keep_last=1",
        "--set",
        "train.steps=4",
        "--resume",
        "auto",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(steps(&f.out("w")), vec![4], "the warm-up pruned its step-2");
    // Resumed again and again: one base link, not one per resume.
    for steps in [3, 4, 5] {
        let (code, _, stderr) = run_cli(&[
            "train",
            path_str(&sparse),
            "--set",
            &format!("train.steps={steps}"),
            "--set",
            "checkpoint.keep_last=1",
            "--resume",
            "auto",
        ]);
        assert_eq!(code, 0, "{stderr}");
    }
    let links: Vec<String> = std::fs::read_dir(f.out("s/base"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(links, ["0-step-2"]);
    std::fs::remove_dir_all(f.out("w")).unwrap(); // the warm-up run is gone altogether
    let tokens = f.root.join("tokens.bin");
    let eval = |step: &Path| {
        run_cli(&[
            "eval",
            "--model",
            path_str(step),
            "--tokens",
            path_str(&tokens),
            "--seq-len",
            "32",
            "--max-windows",
            "2",
        ])
    };
    let (code, stdout, stderr) = eval(&f.out("s/step-5"));
    assert_eq!(code, 0, "{stderr}");
    let before: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    // The whole sparse run folder moves, deeper; its steps still resolve, to the same model.
    std::fs::create_dir_all(f.out("archive/2026")).unwrap();
    std::fs::rename(f.out("s"), f.out("archive/2026/moved")).unwrap();
    let (code, stdout, stderr) = eval(&f.out("archive/2026/moved/step-5"));
    assert_eq!(code, 0, "{stderr}");
    let after: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(before["lm_loss"], after["lm_loss"]);
    // The export is self-contained: the base folder's tokenizer and generation config come along.
    std::fs::write(
        f.root.join("model/generation_config.json"),
        r#"{"bos_token_id": 0}"#,
    )
    .unwrap();
    let moved = f.out("archive/2026/moved");
    let (code, _, stderr) = run_cli(&[
        "export",
        "--checkpoint",
        path_str(&moved.join("step-5")),
        "--output",
        path_str(&f.out("x")),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        std::fs::read_to_string(f.out("x/generation_config.json")).unwrap(),
        r#"{"bos_token_id": 0}"#
    );
    let (code, _, stderr) = run_cli(&[
        "train",
        path_str(&sparse),
        "--set",
        &format!("run.output_dir={}", moved.display()),
        "--set",
        "train.steps=6",
        "--resume",
        "auto",
    ]);
    assert_eq!(code, 0, "{stderr}");
    // An export into a step would be pruned with it: refused.
    assert_clean_error(
        &run_cli(&[
            "export",
            "--checkpoint",
            path_str(&moved.join("step-6")),
            "--output",
            path_str(&moved.join("step-6/hf")),
        ]),
        &["lies inside the training checkpoint"],
    );
    // `verify` checks the steps under a step too, as a resume does.
    flip_bytes(&moved.join("base/0-step-2/params.safetensors"), &[5]);
    assert_clean_error(
        &run_cli(&["verify", path_str(&moved.join("step-6"))]),
        &["0-step-2/params.safetensors", "checksum"],
    );
}

/// A run's base links are the steps it trained on: a leftover link of an earlier start is not
/// reused for another parent, a link swapped for another step of the same name is refused,
/// and a run may not live inside another run's step (pruning would take it).
#[test]
fn base_links_are_the_steps_the_run_trained_on() {
    let f = Fixture::new(31);
    let warm = f.recipe("warmup", "a", &f.root.join("model"), 2);
    assert_eq!(run_cli(&["train", path_str(&warm)]).0, 0);
    assert_eq!(
        run_cli(&[
            "train",
            path_str(&warm),
            "--set",
            &format!("run.output_dir={}", f.out("b").display()),
            "--set",
            "run.seed=4"
        ])
        .0,
        0
    );
    let marker = |d: &Path| std::fs::read(d.join("COMPLETE")).unwrap();
    assert_ne!(marker(&f.out("a/step-2")), marker(&f.out("b/step-2")));
    // A sparse start from a/step-2 leaves its link; the folder is then emptied of steps and
    // metrics (as a start killed before its first step leaves it) and started from b/step-2.
    let sparse = f.recipe("sparse", "x", &f.out("a/step-2"), 2);
    assert_eq!(run_cli(&["train", path_str(&sparse)]).0, 0);
    for leftover in ["step-2", "metrics.jsonl", "FINISHED", "tensorboard"] {
        let p = f.out("x").join(leftover);
        if p.is_dir() {
            std::fs::remove_dir_all(&p).unwrap()
        } else {
            std::fs::remove_file(&p).unwrap()
        }
    }
    let (code, _, stderr) = run_cli(&[
        "train",
        path_str(&sparse),
        "--set",
        &format!("model.path={}", f.out("b/step-2").display()),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        marker(&f.out("x/base/0-step-2")),
        marker(&f.out("b/step-2")),
        "the leftover link of a/step-2 was reused"
    );
    // A link swapped for another step of the same name.
    std::fs::remove_dir_all(f.out("x/base/0-step-2")).unwrap();
    std::process::Command::new("cp")
        .args([
            "-r",
            path_str(&f.out("a/step-2")),
            path_str(&f.out("x/base/0-step-2")),
        ])
        .status()
        .unwrap();
    let tokens = f.root.join("tokens.bin");
    assert_clean_error(
        &run_cli(&[
            "eval",
            "--model",
            path_str(&f.out("x/step-2")),
            "--tokens",
            path_str(&tokens),
            "--seq-len",
            "32",
        ]),
        &["is not the step it was trained from"],
    );
    assert_clean_error(
        &run_cli(&["verify", path_str(&f.out("x/step-2"))]),
        &["is not the step it was trained from"],
    );
    // Inside another run's step: refused.
    let inside = f.recipe("sparse", "a/step-2/child", &f.out("b/step-2"), 2);
    assert_clean_error(
        &run_cli(&["train", path_str(&inside)]),
        &["lies inside the training checkpoint"],
    );
}

/// Failure 7: `--resume auto` refuses a change to a key that gives the saved state its meaning,
/// with the old and new values; keys that may change are accepted.
#[test]
fn resume_refuses_changes_to_what_the_saved_state_means() {
    let f = Fixture::new(27);
    let recipe = f.recipe("warmup", "g", &f.root.join("model"), 2);
    assert_eq!(run_cli(&["train", path_str(&recipe)]).0, 0);
    let other_tokens = f.root.join("tokens2.bin");
    std::fs::copy(f.root.join("tokens.bin"), &other_tokens).unwrap();
    let other_model = f.root.join("model2");
    std::fs::create_dir(&other_model).unwrap();
    for e in std::fs::read_dir(f.root.join("model")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), other_model.join(e.file_name())).unwrap();
    }
    let data = format!("data.path={}", other_tokens.display());
    let model = format!("model.path={}", other_model.display());
    for (set, want) in [
        ("data.seq_len=64", "data.seq_len: 32 -> 64"),
        ("run.seed=4", "run.seed: 3 -> 4"),
        (
            "train.global_batch_seqs=2",
            "train.global_batch_seqs: 4 -> 2",
        ),
        ("dsa.index_topk=4", "dsa.index_topk: 8 -> 4"),
        ("model.dtype=bf16", "model.dtype"),
        (data.as_str(), "data.path"),
        (model.as_str(), "model.path"),
    ] {
        let r = run_cli(&[
            "train",
            path_str(&recipe),
            "--set",
            "train.steps=3",
            "--set",
            set,
            "--resume",
            "auto",
        ]);
        assert_clean_error(&r, &["would change what its saved state means", want]);
    }
    // A relative data.path names another file from another working directory: refused.
    let rel = f.recipe("warmup", "rel", &f.root.join("model"), 2);
    let text = std::fs::read_to_string(&rel).unwrap().replace(
        &f.root.join("tokens.bin").display().to_string(),
        "tokens.bin",
    );
    std::fs::write(&rel, text).unwrap();
    let cli_in = |dir: &Path, args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_dsa-train"))
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert_eq!(cli_in(&f.root, &["train", path_str(&rel)]).0, 0);
    std::fs::create_dir(f.root.join("elsewhere")).unwrap();
    std::fs::copy(
        f.root.join("tokens2.bin"),
        f.root.join("elsewhere/tokens.bin"),
    )
    .unwrap();
    assert_clean_error(
        &cli_in(
            &f.root.join("elsewhere"),
            &[
                "train",
                path_str(&rel),
                "--set",
                "train.steps=3",
                "--resume",
                "auto",
            ],
        ),
        &["data.path"],
    );
    let (code, _, stderr) = run_cli(&[
        "train",
        path_str(&recipe),
        "--set",
        "train.steps=3",
        "--set",
        "train.lr=5e-3",
        "--set",
        "checkpoint.every=1",
        "--set",
        "train.warmup_steps=0",
        "--resume",
        "auto",
    ]);
    assert_eq!(code, 0, "{stderr}");
}

/// Failure 8: a token file truncated under a run is one error line naming it (not SIGBUS);
/// a device file is refused before anything is read.
#[test]
fn token_files_that_shrink_or_are_not_files_are_clear_errors() {
    let f = Fixture::new(28);
    let tokens = f.root.join("shrinking.bin");
    std::fs::copy(f.root.join("tokens.bin"), &tokens).unwrap();
    let recipe = f.recipe("warmup", "t", &f.root.join("model"), 100_000);
    let child = spawn_train(
        &recipe,
        &[
            "--set",
            &format!("data.path={}", tokens.display()),
            "--set",
            "checkpoint.every=0",
        ],
        Stdio::piped(),
    );
    wait_for(|| metrics_lines(&f.out("t")) >= 2, "two steps");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&tokens)
        .unwrap()
        .set_len(100)
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.lines().any(|l| l.starts_with("error:")
            && l.contains("shrinking.bin")
            && l.contains("changed size")),
        "{stderr}"
    );

    // Rewritten in place at the same size: other data under the same name.
    std::fs::copy(f.root.join("tokens.bin"), &tokens).unwrap();
    let recipe = f.recipe("warmup", "t2", &f.root.join("model"), 100_000);
    let child = spawn_train(
        &recipe,
        &[
            "--set",
            &format!("data.path={}", tokens.display()),
            "--set",
            "checkpoint.every=0",
        ],
        Stdio::piped(),
    );
    wait_for(|| metrics_lines(&f.out("t2")) >= 2, "two steps");
    let mut bytes = std::fs::read(&tokens).unwrap();
    bytes.reverse();
    // Overwritten without truncation, so its size never changes, even for a moment.
    use std::io::Write;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&tokens)
        .unwrap()
        .write_all(&bytes)
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.lines().any(|l| l.starts_with("error:")
            && l.contains("shrinking.bin")
            && l.contains("modified")),
        "{stderr}"
    );

    let fresh = f.recipe("warmup", "z", &f.root.join("model"), 2);
    assert_clean_error(
        &run_cli(&["train", path_str(&fresh), "--set", "data.path=/dev/zero"]),
        &["/dev/zero", "not a regular file"],
    );
    assert_clean_error(
        &run_cli(&[
            "eval",
            "--model",
            path_str(&f.root.join("model")),
            "--tokens",
            "/dev/zero",
        ]),
        &["/dev/zero", "not a regular file"],
    );
}

/// Failure 9: `eval` names a non-finite tensor (exit 1) and evaluates a step with the indexer
/// shape and top-k of the recipe that trained it; `train` on such weights names the tensor
/// instead of blaming the learning rate.
#[test]
fn eval_names_non_finite_weights_and_reads_a_steps_recipe() {
    let f = Fixture::new(29);
    let recipe = f.recipe("warmup", "e", &f.root.join("model"), 2);
    assert_eq!(run_cli(&["train", path_str(&recipe)]).0, 0);
    let tokens = f.root.join("tokens.bin");
    let (code, stdout, stderr) = run_cli(&[
        "eval",
        "--model",
        path_str(&f.out("e/step-2")),
        "--tokens",
        path_str(&tokens),
        "--seq-len",
        "32",
        "--attention",
        "sparse",
        "--max-windows",
        "2",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let report: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(
        report["topk"], 8,
        "the step's recipe has dsa.index_topk = 8"
    );
    // Without the MTP layer: the step's MTP tensors are left out, not an error.
    let (code, _, stderr) = run_cli(&[
        "eval",
        "--model",
        path_str(&f.out("e/step-2")),
        "--tokens",
        path_str(&tokens),
        "--seq-len",
        "32",
        "--max-windows",
        "1",
        "--no-mtp",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert_clean_error(
        &run_cli(&[
            "eval",
            "--model",
            path_str(&f.out("e/step-2")),
            "--tokens",
            path_str(&tokens),
            "--index-n-heads",
            "4",
        ]),
        &["--index-n-heads 4", "recipe.toml"],
    );

    let bad = f.root.join("nan-model");
    std::fs::create_dir(&bad).unwrap();
    for e in std::fs::read_dir(f.root.join("model")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), bad.join(e.file_name())).unwrap();
    }
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(bad.join("model.safetensors.index.json"))
            .unwrap_or_else(|_| "{}".into()),
    )
    .unwrap();
    let name = "model.layers.1.post_attention_layernorm.weight";
    let shard = index["weight_map"][name]
        .as_str()
        .map_or(bad.join("model.safetensors"), |s| bad.join(s));
    poke_tensor(&shard, name, |b, dtype| {
        let nan: &[u8] = if dtype == "F32" {
            &[0, 0, 0xc0, 0x7f]
        } else {
            &[0xc0, 0x7f]
        };
        b[..nan.len()].copy_from_slice(nan);
    });
    assert_clean_error(
        &run_cli(&[
            "eval",
            "--model",
            path_str(&bad),
            "--tokens",
            path_str(&tokens),
            "--seq-len",
            "32",
        ]),
        &[name, "NaN or infinite"],
    );
    let r = f.recipe("warmup", "n", &bad, 2);
    let result = run_cli(&["train", path_str(&r)]);
    assert_clean_error(&result, &[name, "NaN or infinite"]);
    assert!(!result.2.contains("train.lr"), "{}", result.2);
}

/// Failure 10: `check` refuses the layouts `train` refuses; a failed save leaves no `.tmp`;
/// the shipped 671B recipes pass the command their header gives; `plot` skips a torn last line.
#[test]
fn check_validates_like_train_and_failures_leave_nothing_behind() {
    let f = Fixture::new(30);
    let recipe = f.recipe("warmup", "c", &f.root.join("model"), 4);
    assert_clean_error(
        &run_cli(&[
            "check",
            path_str(&recipe),
            "--set",
            "parallel.dp=7",
            "--set",
            "parallel.ep=3",
        ]),
        &["parallel.ep (3) must divide the job's 7 rank(s)"],
    );
    assert_clean_error(
        &run_cli(&["check", path_str(&recipe), "--set", "parallel.dp=3"]),
        &["not a multiple of parallel.dp = 3"],
    );
    assert_clean_error(
        &run_cli(&["check", path_str(&recipe), "--world", "0"]),
        &["0 ranks"],
    );
    // A verdict against a GPU's memory: a layout too large for 4 GiB less a 3.99 GiB reserve
    // exits 1 naming the verdict; a roomy GPU passes; --search lists layouts of --gpus ranks.
    assert_clean_error(
        &run_cli(&[
            "check",
            path_str(&recipe),
            "--gpu-mem",
            "4",
            "--reserve",
            "3.99",
        ]),
        &["does not fit 4 GiB GPUs"],
    );
    let roomy = run_cli(&[
        "check",
        path_str(&recipe),
        "--gpus",
        "2",
        "--gpu-mem",
        "80",
        "--search",
    ]);
    assert_eq!(roomy.0, 0, "{}", roomy.2);
    assert!(roomy.1.contains("verdict: fits"), "{}", roomy.1);
    assert!(roomy.1.contains("--set parallel.dp=2"), "{}", roomy.1);
    assert_clean_error(
        &run_cli(&["check", path_str(&recipe), "--search"]),
        &["--search needs --gpu-mem"],
    );
    assert_clean_error(
        &run_cli(&[
            "eval",
            "--model",
            path_str(&f.root.join("model")),
            "--tokens",
            path_str(&f.root.join("tokens.bin")),
            "--topk",
            "0",
        ]),
        &["--topk 0"],
    );

    // A save that fails (a file put where step-8 must go while the run is at step 1) leaves
    // no temporary folder, and the file is not replaced.
    let out = f.out("c");
    let long = f.recipe("warmup", "c", &f.root.join("model"), 100_000);
    let child = spawn_train(&long, &["--set", "checkpoint.every=8"], Stdio::piped());
    wait_for(|| metrics_lines(&out) >= 1, "a step");
    std::fs::write(out.join("step-8"), b"in the way").unwrap();
    let result = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert_eq!(result.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("error:") && stderr.contains("step-8 already exists"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(out.join("step-8")).unwrap(), b"in the way");
    let names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");

    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for name in ["v32-warmup.toml", "v32-sparse.toml"] {
        let path = root.join("recipes").join(name);
        let text = std::fs::read_to_string(&path).unwrap();
        let command = text
            .lines()
            .find_map(|l| {
                l.split_once("dsa-train ")
                    .map(|(_, c)| c.trim().to_string())
            })
            .unwrap_or_else(|| panic!("{name}: the header gives no dsa-train command"));
        let args: Vec<&str> = command.split_whitespace().collect();
        let out = Command::new(env!("CARGO_BIN_EXE_dsa-train"))
            .args(&args)
            .current_dir(root)
            .output()
            .unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // With a GPU size the verdict counts a step, the load and a resume (docs/scaling.md).
        assert!(
            out.status.success()
                && (!command.contains("--gpu-mem") || said.contains("verdict: fits")),
            "{name}: `dsa-train {command}`: {said}"
        );
    }

    let metrics = f.root.join("torn.jsonl");
    let line = r#"{"step":1,"stage":"warmup","lm_loss":null,"indexer_kl":0.5,"lr":0.001,"indexer_lr":0.001,"grad_norm":1.0,"indexer_grad_norm":1.0,"tokens":128,"tokens_per_s":100.0,"elapsed_s":1.0}"#;
    std::fs::write(
        &metrics,
        format!(
            "{line}\n{}",
            &line.replace("\"step\":1", "\"step\":2")[..40]
        ),
    )
    .unwrap();
    let png = f.root.join("torn.png");
    let (code, _, stderr) = run_cli(&[
        "plot",
        "--metrics",
        path_str(&metrics),
        "--output",
        path_str(&png),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("torn last line"), "{stderr}");
    let fifo = f.root.join("fifo.png");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    assert_clean_error(
        &run_cli(&[
            "plot",
            "--metrics",
            path_str(&metrics),
            "--output",
            path_str(&fifo),
        ]),
        &["not a regular file"],
    );
    std::fs::write(&metrics, format!("{}\n{line}\n", &line[..40])).unwrap();
    assert_clean_error(
        &run_cli(&[
            "plot",
            "--metrics",
            path_str(&metrics),
            "--output",
            path_str(&png),
        ]),
        &["line 1"],
    );
}
