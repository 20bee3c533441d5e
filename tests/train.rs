//! The trainer on a tiny checkpoint: exact resume (in process, after SIGKILL), clean stop on
//! SIGTERM, warm-up leaving the main model untouched, the sparse stage learning, router-bias
//! updates, and recipe errors through the binary.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use candle_core::{DType, Device};
use common::{assert_clean_error, max_abs_diff, path_str, run_cli, wait_for, Fixture};
use dsa_train::checkpoint::{load_file_f32, Checkpoint};
use dsa_train::model::{LoadOptions, Model};
use dsa_train::recipe::Recipe;
use dsa_train::train::{self, metrics, Resume};

fn run_recipe(path: &Path, sets: &[&str], resume: Option<Resume>) -> train::TrainOutcome {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    train::train(Recipe::load(path, &sets).unwrap(), resume).unwrap()
}

fn losses(dir: &Path) -> Vec<(u64, Option<u64>, u64)> {
    // (step, lm_loss bits, indexer_kl bits): compared bit for bit.
    metrics::read(&dir.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .map(|m| (m.step, m.lm_loss.map(f64::to_bits), m.indexer_kl.to_bits()))
        .collect()
}

fn assert_same_params(a: &Path, b: &Path) {
    let pa = load_file_f32(&a.join("params.safetensors"), &Device::Cpu).unwrap();
    let pb = load_file_f32(&b.join("params.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(pa.keys().collect::<Vec<_>>(), pb.keys().collect::<Vec<_>>());
    for (name, t) in &pa {
        let x: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let y: Vec<f32> = pb[name].flatten_all().unwrap().to_vec1().unwrap();
        assert!(
            x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()),
            "{name} differs"
        );
    }
}

#[test]
fn resume_reproduces_an_uninterrupted_run_bit_for_bit_in_both_stages() {
    let f = Fixture::new(1);
    let model = f.root.join("model");
    // Warm-up: 4 straight vs 2 + resume + 2.
    let straight = f.recipe("warmup", "w-straight", &model, 4);
    run_recipe(&straight, &[], None);
    let split = f.recipe("warmup", "w-split", &model, 4);
    run_recipe(&split, &["train.steps=2"], None);
    run_recipe(&split, &[], Some(Resume::Auto));
    assert_eq!(losses(&f.out("w-straight")), losses(&f.out("w-split")));
    assert_eq!(losses(&f.out("w-split")).len(), 4);
    // TensorBoard: one event file per start of the run, the same KL per step as metrics.jsonl.
    let mut kl: Vec<(u64, f32)> = vec![];
    let files: Vec<_> = std::fs::read_dir(f.out("w-split/tensorboard"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 2);
    for file in &files {
        let scalars = dsa_train::train::tensorboard::read_scalars(file).unwrap();
        kl.extend(
            scalars
                .into_iter()
                .filter(|s| s.1 == "train/indexer_kl")
                .map(|s| (s.0, s.2)),
        );
    }
    kl.sort_by_key(|x| x.0);
    let want: Vec<(u64, f32)> = metrics::read(&f.out("w-split/metrics.jsonl"))
        .unwrap()
        .iter()
        .map(|m| (m.step, m.indexer_kl as f32))
        .collect();
    assert_eq!(kl, want);
    assert_same_params(&f.out("w-straight/step-4"), &f.out("w-split/step-4"));

    // Sparse, chained from the warm-up: 4 straight vs 2 + resume + 2.
    let warm = f.out("w-straight/step-4");
    let straight = f.recipe("sparse", "s-straight", &warm, 4);
    run_recipe(&straight, &[], None);
    let split = f.recipe("sparse", "s-split", &warm, 4);
    run_recipe(&split, &["train.steps=2"], None);
    run_recipe(&split, &[], Some(Resume::Path(f.out("s-split/step-2"))));
    let a = losses(&f.out("s-straight"));
    assert_eq!(a, losses(&f.out("s-split")));
    assert!(a.iter().all(|(_, lm, _)| lm.is_some()));
    assert_same_params(&f.out("s-straight/step-4"), &f.out("s-split/step-4"));
}

/// A blend of two corpora (`[[data.blend]]`) trains and resumes bit for bit, and both corpora
/// feed it: the same run on the first corpus alone gives other losses.
#[test]
fn a_blend_of_corpora_resumes_bit_for_bit() {
    let f = Fixture::new(2);
    let model = f.root.join("model");
    // A second corpus: the fixture's tokens in reverse order.
    let mut ids = dsa_train::data::read_token_file(&f.root.join("tokens.bin"), usize::MAX).unwrap();
    ids.reverse();
    let bytes: Vec<u8> = ids.iter().flat_map(|t| t.to_le_bytes()).collect();
    std::fs::write(f.root.join("reversed.bin"), bytes).unwrap();
    let blended = |out: &str| {
        let one = f.recipe("warmup", out, &model, 4);
        let text = std::fs::read_to_string(&one).unwrap();
        let data_line = text
            .lines()
            .find(|l| l.starts_with("path = ") && l.contains("tokens.bin"))
            .unwrap()
            .to_string();
        let text = text.replace(&format!("{data_line}\n"), "")
            + &format!(
                "[[data.blend]]\n{data_line}\nweight = 2.0\n[[data.blend]]\npath = {:?}\nweight = 1.0\n",
                f.root.join("reversed.bin")
            );
        std::fs::write(&one, text).unwrap();
        one
    };
    let straight = blended("b-straight");
    run_recipe(&straight, &[], None);
    let split = blended("b-split");
    run_recipe(&split, &["train.steps=2"], None);
    run_recipe(&split, &[], Some(Resume::Auto));
    let a = losses(&f.out("b-straight"));
    assert_eq!(a.len(), 4);
    assert_eq!(a, losses(&f.out("b-split")));
    assert_same_params(&f.out("b-straight/step-4"), &f.out("b-split/step-4"));
    let state = std::fs::read_to_string(f.out("b-split/step-4/state.json")).unwrap();
    assert!(state.contains("blend_cursor"), "{state}");
    // The first corpus alone: other windows, other losses.
    let single = f.recipe("warmup", "b-single", &model, 4);
    run_recipe(&single, &[], None);
    assert_ne!(losses(&f.out("b-single")), a);
}

#[test]
fn warmup_trains_only_the_indexer_and_leaves_every_other_tensor_bitwise_unchanged() {
    let f = Fixture::new(2);
    let model = f.root.join("model");
    let recipe = f.recipe("warmup", "w", &model, 3);
    run_recipe(&recipe, &[], None);
    let step = f.out("w/step-3");
    let saved = load_file_f32(&step.join("params.safetensors"), &Device::Cpu).unwrap();
    assert!(
        !saved.is_empty() && saved.keys().all(|n| n.contains(".indexer.")),
        "{:?}",
        saved.keys()
    );
    // The chained model equals the base everywhere but in the indexers, which did move.
    let opts = LoadOptions {
        indexer: dsa_train::config::IndexerDefaults {
            n_heads: 2,
            head_dim: 32,
            topk: 8,
        },
        ..Default::default()
    };
    let trained = Model::load(&step, &opts).unwrap();
    let base = Model::load(&model, &opts).unwrap();
    let bits = |t: &candle_core::Tensor| -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect()
    };
    for (a, b) in trained.layers.iter().zip(&base.layers) {
        assert_eq!(bits(&a.attn.q_b_proj), bits(&b.attn.q_b_proj));
        assert_eq!(bits(&a.attn.kv_b_proj), bits(&b.attn.kv_b_proj));
        assert_eq!(bits(&a.input_norm), bits(&b.input_norm));
        assert_ne!(bits(&a.indexer.wq_b), bits(&b.indexer.wq_b));
        assert_ne!(bits(&a.indexer.weights_proj), bits(&b.indexer.weights_proj));
    }
    assert_eq!(bits(&trained.embed), bits(&base.embed));
    assert_eq!(bits(&trained.lm_head), bits(&base.lm_head));
    // Compared with the HF file itself, not only with our own loader.
    let hf = Checkpoint::open(&model).unwrap();
    let w = hf
        .load(
            "model.layers.1.mlp.experts.3.up_proj.weight",
            &[96, 192],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
    if let dsa_train::model::FeedForward::Moe(moe) = &trained.layers[1].ffn {
        assert_eq!(bits(&moe.experts[3].up), bits(&w));
    } else {
        panic!("layer 1 is MoE");
    }
}

#[test]
fn sparse_stage_lowers_the_lm_loss_and_moves_the_router_bias() {
    let f = Fixture::new(3);
    let model = f.root.join("model");
    let recipe = f.recipe("sparse", "s", &model, 12);
    run_recipe(&recipe, &["train.lr=3e-3", "checkpoint.every=0"], None);
    let m = metrics::read(&f.out("s/metrics.jsonl")).unwrap();
    let lm: Vec<f64> = m.iter().map(|x| x.lm_loss.unwrap()).collect();
    let first = lm[..3].iter().sum::<f64>() / 3.0;
    let last = lm[lm.len() - 3..].iter().sum::<f64>() / 3.0;
    assert!(last < first - 0.2, "LM loss {first} -> {last}");
    let saved = load_file_f32(&f.out("s/step-12/params.safetensors"), &Device::Cpu).unwrap();
    let hf = Checkpoint::open(&model).unwrap();
    let name = "model.layers.1.mlp.gate.e_score_correction_bias";
    let before: Vec<f32> = hf
        .load(name, &[8], DType::F32, &Device::Cpu)
        .unwrap()
        .to_vec1()
        .unwrap();
    let after: Vec<f32> = saved[name].to_vec1().unwrap();
    // 12 steps of +-0.01: every expert moved by a multiple of 0.01, and some moved.
    assert!(before.iter().zip(&after).any(|(a, b)| (a - b).abs() > 5e-3));
    for (a, b) in before.iter().zip(&after) {
        let k = (b - a) / 0.01;
        assert!(
            (k - k.round()).abs() < 1e-2 && k.abs() <= 12.0 + 1e-3,
            "{a} -> {b}"
        );
    }
}

/// Spawn `dsa-train train` in the background.
fn spawn_train(recipe: &Path, extra: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_dsa-train"))
        .arg("train")
        .arg(recipe)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn a_run_killed_with_sigkill_resumes_from_the_last_complete_checkpoint_and_matches() {
    let f = Fixture::new(4);
    let model = f.root.join("model");
    let reference = f.recipe("warmup", "ref", &model, 8);
    run_recipe(&reference, &["checkpoint.every=1"], None);

    let recipe = f.recipe("warmup", "killed", &model, 8);
    let mut child = spawn_train(&recipe, &["--set", "checkpoint.every=1"]);
    let out = f.out("killed");
    wait_for(|| out.join("step-3").join("COMPLETE").exists(), "step-3");
    child.kill().unwrap(); // SIGKILL, possibly in the middle of writing step-4
    child.wait().unwrap();
    let (code, _, stderr) = run_cli(&[
        "train",
        path_str(&recipe),
        "--set",
        "checkpoint.every=1",
        "--resume",
        "auto",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("resuming from"), "{stderr}");
    assert_eq!(losses(&f.out("ref")), losses(&out));
    assert_same_params(&f.out("ref/step-8"), &out.join("step-8"));
    // No temporary folder is left looking like a checkpoint.
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name().to_string_lossy().starts_with("step-")
                && !e.path().join("COMPLETE").exists()
        })
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn sigterm_writes_a_checkpoint_and_exits_cleanly() {
    let f = Fixture::new(5);
    let recipe = f.recipe("warmup", "term", &f.root.join("model"), 10_000);
    let mut child = spawn_train(&recipe, &["--set", "checkpoint.every=0"]);
    let metrics_path = f.out("term/metrics.jsonl");
    wait_for(
        || std::fs::read_to_string(&metrics_path).is_ok_and(|t| t.lines().count() >= 2),
        "two steps",
    );
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "{status:?} {stderr}");
    assert!(stderr.contains("stop requested"), "{stderr}");
    let steps = metrics::read(&metrics_path).unwrap().len() as u64;
    let ckpts = dsa_train::train::ckpt::complete_checkpoints(&f.out("term"));
    assert_eq!(
        ckpts.last().map(|c| c.0),
        Some(steps),
        "checkpoint at the last step taken"
    );
    assert!(
        !f.out("term/FINISHED").exists(),
        "a stopped run is not finished"
    );
    // Resumed with a reachable step count, the run finishes and says so.
    let last = format!("train.steps={}", steps + 1);
    let mut child = spawn_train(
        &recipe,
        &[
            "--set",
            "checkpoint.every=0",
            "--set",
            &last,
            "--resume",
            "auto",
        ],
    );
    assert!(child.wait().unwrap().success());
    assert_eq!(
        std::fs::read_to_string(f.out("term/FINISHED"))
            .unwrap()
            .trim(),
        (steps + 1).to_string()
    );
}

#[test]
fn recipe_and_data_errors_are_one_clear_line() {
    let f = Fixture::new(6);
    let recipe = f.recipe("warmup", "e", &f.root.join("model"), 2);
    let text = std::fs::read_to_string(&recipe).unwrap();
    let bad = f.root.join("bad.toml");
    std::fs::write(&bad, text.replace("warmup_steps", "warmup_stpes")).unwrap();
    assert_clean_error(
        &run_cli(&["train", path_str(&bad)]),
        &["bad.toml", "train.warmup_stpes", "train.warmup_steps"],
    );
    assert_clean_error(
        &run_cli(&["check", path_str(&recipe), "--set", "train.steps=1.5"]),
        &["train.steps", "integer"],
    );
    assert_clean_error(
        &run_cli(&[
            "train",
            path_str(&recipe),
            "--set",
            "data.path=/nonexistent/tokens.bin",
        ]),
        &["/nonexistent/tokens.bin"],
    );
    assert_clean_error(
        &run_cli(&[
            "train",
            path_str(&recipe),
            "--set",
            "model.path=/nonexistent/model",
        ]),
        &["/nonexistent/model"],
    );
    std::fs::write(&bad, "[run\noutput_dir=1").unwrap();
    assert_clean_error(&run_cli(&["train", path_str(&bad)]), &["bad.toml", "TOML"]);
    // The data is checked before the checkpoint is read whole: a data typo beside a damaged
    // shard names the data (the checksum pass or load would otherwise come first).
    let broken = f.root.join("broken-model");
    std::fs::create_dir_all(&broken).unwrap();
    for e in std::fs::read_dir(f.root.join("model")).unwrap() {
        let e = e.unwrap().path();
        std::fs::copy(&e, broken.join(e.file_name().unwrap())).unwrap();
    }
    let shard = std::fs::read_dir(&broken)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .unwrap();
    let len = std::fs::metadata(&shard).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&shard)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    assert_clean_error(
        &run_cli(&[
            "train",
            path_str(&recipe),
            "--set",
            &format!("model.path={}", broken.display()),
            "--set",
            "data.path=/nonexistent/tokens.bin",
        ]),
        &["/nonexistent/tokens.bin"],
    );
}

/// Without a terminal, a log line every `run.log_every` steps (and at step 1), with its time,
/// speed and memory.
#[test]
fn log_lines_come_every_run_log_every_steps() {
    let f = Fixture::new(8);
    let recipe = f.recipe("warmup", "logs", &f.root.join("model"), 4);
    let (code, _, stderr) = run_cli(&["train", path_str(&recipe), "--set", "run.log_every=2"]);
    assert_eq!(code, 0, "{stderr}");
    let steps: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("[train] ") && l.contains("ms/step"))
        .map(|l| l.split(" step ").nth(1).unwrap().split('/').next().unwrap())
        .collect();
    assert_eq!(steps, ["1", "2", "4"], "{stderr}");
    assert!(
        stderr.contains("tok/s") && stderr.contains("UTC"),
        "{stderr}"
    );
}

#[test]
fn check_reports_counts_and_estimates() {
    let f = Fixture::new(7);
    let recipe = f.recipe("warmup", "c", &f.root.join("model"), 2);
    let (code, stdout, stderr) = run_cli(&["check", path_str(&recipe)]);
    assert_eq!(code, 0, "{stderr}");
    // Warm-up trains only the indexers: 3 layers (2 + MTP) x (64*160 + 32*192 + 2*32 + 2*192).
    let per_layer = 64 * 160 + 32 * 192 + 64 + 2 * 192;
    assert!(
        stdout.contains(&format!("{} trainable", 3 * per_layer)),
        "{stdout}"
    );
    assert!(stdout.contains("tokens per step: 128"), "{stdout}");
    assert!(stdout.contains("FLOPs per step") && stdout.contains("memory per device"));
    // The dense pre-training stage trains the main model but no indexer tensor.
    let dense = f.recipe("dense", "cd", &f.root.join("model"), 2);
    let (code, stdout, stderr) = run_cli(&["check", path_str(&dense)]);
    assert_eq!(code, 0, "{stderr}");
    // Frozen: the three indexers and the router biases of the two MoE layers (layer 1, MTP; 8 experts).
    assert!(
        stdout.contains(&format!("trainable, {} frozen", 3 * per_layer + 2 * 8)),
        "{stdout}"
    );
}

#[test]
fn a_trained_checkpoint_exports_as_a_v32_checkpoint_our_loader_reads_back() {
    let f = Fixture::new(8);
    let model = f.root.join("model");
    let recipe = f.recipe("warmup", "x", &model, 2);
    run_recipe(&recipe, &[], None);
    let step = f.out("x/step-2");
    let export = f.out("export");
    let (code, _, stderr) = run_cli(&[
        "export",
        "--checkpoint",
        path_str(&step),
        "--output",
        path_str(&export),
        "--fp8",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(export.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["model_type"], "deepseek_v32");
    assert_eq!(
        (
            cfg["index_n_heads"].as_u64(),
            cfg["index_head_dim"].as_u64(),
            cfg["index_topk"].as_u64()
        ),
        (Some(2), Some(32), Some(8))
    );
    // The trained indexer (rounded once to bf16; weights_proj is stored f32) and the untouched
    // main model come back.
    let trained = load_file_f32(&step.join("params.safetensors"), &Device::Cpu).unwrap();
    let hf = Checkpoint::open(&export).unwrap();
    for (name, t) in &trained {
        let back: Vec<f32> = hf
            .load(name, t.dims(), DType::F32, &Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let stored = if name.ends_with("weights_proj.weight") {
            t.clone()
        } else {
            t.to_dtype(DType::BF16).unwrap()
        };
        let want: Vec<f32> = stored
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(back, want, "{name}");
    }
    let base = Checkpoint::open(&model).unwrap();
    let name = "model.layers.1.self_attn.kv_b_proj.weight";
    let shape = base.info(name).unwrap().shape;
    let a: Vec<f32> = base
        .load(name, &shape, DType::F32, &Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let b: Vec<f32> = hf
        .load(name, &shape, DType::F32, &Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(a, b);
    // And the plot command draws the run.
    let png = f.out("x/loss.png");
    let (code, _, stderr) = run_cli(&[
        "plot",
        "--metrics",
        path_str(&f.out("x/metrics.jsonl")),
        "--output",
        path_str(&png),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(std::fs::metadata(&png).unwrap().len() > 1000);
}

#[test]
fn a_diverging_run_stops_with_one_clear_line() {
    let f = Fixture::new(9);
    let recipe = f.recipe("warmup", "nan", &f.root.join("model"), 5);
    let result = run_cli(&[
        "train",
        path_str(&recipe),
        "--set",
        "train.lr=1e30",
        "--set",
        "train.warmup_steps=0",
    ]);
    assert_clean_error(&result, &["not finite", "step"]);
}

/// Also block mode (`train.block_rows`: each layer run and differentiated a few queries at a
/// time against the shared latent kv, MoE balance loss included) with the layer inputs and
/// sets offloaded to host memory, at block sizes that do and do not divide the sequence; the
/// layers' explicit backward from saved activations (`train.recompute = false`); and the dense
/// stage's explicit layer backward, both ways, against its autograd.
#[test]
fn recomputing_layers_and_chunking_the_lm_head_give_the_same_gradients() {
    let f = Fixture::new(4);
    let model = f.root.join("model");
    let recipe = f.recipe("sparse", "g", &model, 1);
    let grads = |sets: &[&str]| {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        let mut t = train::Trainer::new(Recipe::load(&recipe, &sets).unwrap(), None).unwrap();
        let (accum, _, lm, kl) = t.accumulate_gradients().unwrap();
        (accum.into_grads(), lm, kl)
    };
    // The dense stage: the explicit layer backward, recomputing and from saved activations,
    // against its twin, candle's autograd.
    const AUTOGRAD: &str = "kernels.plain_ops=[\"layer-backward\"]";
    // Every tensor's gradient of `g` within 1e-4 of its largest in `reference`, and no other.
    let same_gradients =
        |what: &str,
         reference: &std::collections::HashMap<String, candle_core::Tensor>,
         g: &std::collections::HashMap<String, candle_core::Tensor>| {
            let missing: Vec<&String> = reference.keys().filter(|n| !g.contains_key(*n)).collect();
            assert_eq!(
                g.len(),
                reference.len(),
                "{what}: the same tensors get gradients (missing {missing:?})"
            );
            for (name, a) in reference {
                let (diff, scale) = (
                    max_abs_diff(a, &g[name]),
                    max_abs_diff(a, &a.zeros_like().unwrap()),
                );
                assert!(
                    diff <= 1e-4 * scale + 1e-9,
                    "{what}: {name}: max diff {diff} (max |g| {scale})"
                );
            }
        };
    let (dense_whole, dense_lm, _) =
        grads(&["train.stage=dense", "train.recompute=false", AUTOGRAD]);
    for explicit in ["train.recompute=true", "train.recompute=false"] {
        let (dense_explicit, dense_lm2, _) = grads(&["train.stage=dense", explicit]);
        assert!(
            (dense_lm - dense_lm2).abs() < 1e-6 * dense_lm.abs(),
            "dense, {explicit}: {dense_lm2} vs {dense_lm}"
        );
        same_gradients(&format!("dense, {explicit}"), &dense_whole, &dense_explicit);
    }
    let (whole, lm0, kl0) = grads(&[
        "train.recompute=false",
        "train.lm_head_chunk=1000",
        AUTOGRAD,
    ]);
    for sets in [
        &["train.recompute=true", "train.lm_head_chunk=5"][..],
        &["train.recompute=false", "train.lm_head_chunk=7", AUTOGRAD][..],
        &["train.recompute=false", "train.lm_head_chunk=6"][..],
        &[
            "train.recompute=true",
            "train.block_rows=5",
            "train.offload_activations=true",
        ][..],
        &["train.recompute=true", "train.block_rows=1"][..],
        &["train.recompute=true", "train.block_rows=32"][..],
    ] {
        let (g, lm, kl) = grads(sets);
        assert!(
            (lm - lm0).abs() < 1e-6 * lm0.abs() && (kl - kl0).abs() < 1e-6 * kl0.abs().max(1e-3),
            "{sets:?}: {lm} vs {lm0}, {kl} vs {kl0}"
        );
        same_gradients(&format!("{sets:?}"), &whole, &g);
    }
}

/// `dsa-train init` writes the starting checkpoint of a from-scratch model (norms 1, biases 0,
/// projections of the configured spread), refuses a non-empty folder, and the dense stage
/// trains it: the LM loss falls, the indexer is never touched, and the stage resumes.
#[test]
fn init_and_the_dense_pretraining_stage() {
    let f = Fixture::new(9);
    let mut cfg = dsa_train::tiny::tiny_config(false);
    cfg["num_hidden_layers"] = 2.into();
    cfg["initializer_range"] = 0.05.into();
    let config = f.root.join("config.json");
    std::fs::write(&config, cfg.to_string()).unwrap();
    let init = f.root.join("init");
    let (code, _, stderr) = run_cli(&[
        "init",
        "--config",
        path_str(&config),
        "--output",
        path_str(&init),
        "--seed",
        "4",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let hf = Checkpoint::open(&init).unwrap();
    let norm: Vec<f32> = hf
        .load(
            "model.layers.0.input_layernorm.weight",
            &[192],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(norm.iter().all(|&x| x == 1.0));
    let bias: Vec<f32> = hf
        .load(
            "model.layers.1.mlp.gate.e_score_correction_bias",
            &[8],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(bias.iter().all(|&x| x == 0.0));
    let mc =
        dsa_train::config::ModelConfig::from_json(&cfg.to_string(), &Default::default()).unwrap();
    let spec = dsa_train::weights::model_weights(&mc, false)
        .into_iter()
        .find(|s| s.name == "model.layers.0.self_attn.q_b_proj.weight")
        .unwrap();
    let w: Vec<f32> = hf
        .load(&spec.name, &spec.shape, DType::F32, &Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let std = (w.iter().map(|x| (x * x) as f64).sum::<f64>() / w.len() as f64).sqrt();
    assert!(
        (std - 0.05).abs() < 0.005,
        "q_b_proj spread {std} (FP8-stored, initializer_range 0.05)"
    );
    assert_clean_error(
        &run_cli(&[
            "init",
            "--config",
            path_str(&config),
            "--output",
            path_str(&init),
        ]),
        &["exists and is not empty"],
    );
    assert_clean_error(
        &run_cli(&[
            "init",
            "--config",
            path_str(&f.root.join("nope.json")),
            "--output",
            path_str(&f.root.join("x")),
        ]),
        &["nope.json"],
    );

    let recipe = f.recipe("dense", "d", &init, 12);
    run_recipe(
        &recipe,
        &["train.lr=3e-3", "train.steps=6", "checkpoint.every=3"],
        None,
    );
    run_recipe(
        &recipe,
        &["train.lr=3e-3", "checkpoint.every=3"],
        Some(Resume::Auto),
    );
    let m = metrics::read(&f.out("d/metrics.jsonl")).unwrap();
    assert_eq!(
        m.iter().map(|x| x.step).collect::<Vec<_>>(),
        (1..=12).collect::<Vec<_>>()
    );
    assert!(m.iter().all(|x| x.stage == "dense" && x.indexer_kl == 0.0));
    let lm: Vec<f64> = m.iter().map(|x| x.lm_loss.unwrap()).collect();
    let (first, last) = (
        lm[..3].iter().sum::<f64>() / 3.0,
        lm[9..].iter().sum::<f64>() / 3.0,
    );
    assert!(last < first - 0.2, "LM loss {first} -> {last}");
    // The checkpoint holds the main model (and router biases), never an indexer tensor.
    let saved = load_file_f32(&f.out("d/step-12/params.safetensors"), &Device::Cpu).unwrap();
    assert!(saved.contains_key("model.layers.0.self_attn.q_b_proj.weight"));
    assert!(
        saved.keys().all(|n| !n.contains(".indexer.")),
        "an indexer tensor was trained"
    );
}

/// Nothing the trainer keeps between steps may hold an autograd graph: gradients come out of
/// candle's backward as outputs of tracked ops (over the activations), and an Adam moment built
/// from one would chain every step's graph to the next; on a GPU that grew device memory by
/// gigabytes per step until it ran out (bf16 models: the f32 master copy recorded the update
/// that made it, holding the previous master, moments and update). bf16 compute, every stage.
#[test]
fn gradients_and_optimizer_state_carry_no_graph_between_steps() {
    let f = Fixture::new(11);
    for stage in ["sparse", "dense", "warmup"] {
        let recipe = f.recipe(stage, &format!("g-{stage}"), &f.root.join("model"), 2);
        let mut t = train::Trainer::new(
            Recipe::load(
                &recipe,
                &["checkpoint.every=0".into(), "model.dtype=bf16".into()],
            )
            .unwrap(),
            None,
        )
        .unwrap();
        let (accum, ..) = t.accumulate_gradients().unwrap();
        assert!(accum.grads().next().is_some());
        for (name, g) in accum.grads() {
            assert!(
                !g.track_op(),
                "{stage}: the accumulated gradient of {name} holds a graph"
            );
        }
        t.train_step().unwrap();
        t.train_step().unwrap();
        for s in &t.slots {
            for p in &s.pieces {
                assert!(
                    !p.m.track_op() && !p.v.track_op(),
                    "{stage}: the Adam moments of {} hold a graph",
                    s.name
                );
                assert!(
                    p.master.as_ref().is_none_or(|m| !m.track_op()),
                    "{stage}: the master copy of {} holds a graph",
                    s.name
                );
            }
        }
    }
}

/// `check`'s communication estimate counts what the trainer sends: nothing in one process;
/// with dp = 2, ep = 2 two ring all-reduces of the replicated f32 trainable tensors (the
/// experts have one holder each) and, per MoE layer, the rows of (ep-1)/ep of the top-k
/// (token, expert) pairs out and back, in the forward, the recomputation and the backward.
#[test]
fn check_counts_the_bytes_each_device_sends() {
    let f = Fixture::new(12);
    let recipe = f.recipe("sparse", "comm", &f.root.join("model"), 2);
    let one = dsa_train::train::plan::plan(&Recipe::load(&recipe, &[]).unwrap()).unwrap();
    assert_eq!((one.grad_comm_bytes, one.expert_comm_bytes), (0.0, 0.0));
    let sets = [
        "parallel.dp=2".to_string(),
        "parallel.ep=2".to_string(),
        "model.mtp=false".to_string(),
    ];
    let r = Recipe::load(&recipe, &sets).unwrap();
    let p = dsa_train::train::plan::plan(&r).unwrap();
    let cfg = r.model_config(&f.root.join("model")).unwrap();
    let specs = dsa_train::weights::model_weights(&cfg, false);
    let replicated: usize = specs
        .iter()
        .filter(|s| {
            s.kind != dsa_train::weights::Kind::RouterBias && !s.name.contains(".mlp.experts.")
        })
        .map(|s| s.shape.iter().product::<usize>())
        .sum();
    // Ring over 2 ranks: 2 (n-1)/n = 1 times the bytes; two all-reduces.
    assert_eq!(p.grad_comm_bytes, 2.0 * 4.0 * replicated as f64);
    // 1 MoE layer (layer 1), 2 micro-batches of 2 x 32 tokens over 2 ranks, top-2, hidden 192, f32.
    let expect = 1.0 * 1.0 * 64.0 * 2.0 * 192.0 * 4.0 * 0.5 * 2.0 * 3.0;
    assert_eq!(p.expert_comm_bytes, expect);
}

/// One home for k: a V3.2 base whose config.json says index_topk 32, trained with a recipe of
/// dsa.index_topk 8, selects 8, says config.json's value is not used, and its step exports 8.
#[test]
fn the_recipes_index_topk_selects_and_is_what_a_step_exports() {
    let f = Fixture::with_config(13, |c| {
        c["model_type"] = "deepseek_v32".into();
        c["index_n_heads"] = 2.into();
        c["index_head_dim"] = 32.into();
        c["index_topk"] = 32.into();
    });
    let recipe = f.recipe("warmup", "k", &f.root.join("model"), 2);
    let (code, _, stderr) = run_cli(&["train", path_str(&recipe)]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("dsa.index_topk = 8 selects")
            && stderr.contains("index_topk 32 is not used"),
        "{stderr}"
    );
    let export = f.out("export");
    let (code, _, stderr) = run_cli(&[
        "export",
        "--checkpoint",
        path_str(&f.out("k/step-2")),
        "--output",
        path_str(&export),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(export.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["index_topk"], 8);
}

/// A run with FP8 selection scores (`dsa.indexer_scores = "fp8"`) trains, and `eval` of its step
/// selects as the run did unless told otherwise: the report names the scores and, for fp8, the
/// sets' agreement with bf16's; `--indexer-scores bf16` evaluates the same step with bf16 sets,
/// and a name that is neither is one clean error.
#[test]
fn a_step_trained_with_fp8_selection_evaluates_with_it() {
    let f = Fixture::new(17);
    let recipe = f.recipe("sparse", "fp8", &f.root.join("model"), 2);
    let (code, _, stderr) = run_cli(&[
        "train",
        path_str(&recipe),
        "--set",
        "dsa.indexer_scores=fp8",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let step = f.out("fp8/step-2");
    let tokens = f.root.join("tokens.bin");
    let eval = |extra: &[&str]| {
        let mut args = vec![
            "eval",
            "--model",
            path_str(&step),
            "--tokens",
            path_str(&tokens),
            "--seq-len",
            "32",
            "--max-windows",
            "2",
        ];
        args.extend_from_slice(extra);
        run_cli(&args)
    };
    let (code, stdout, stderr) = eval(&[]);
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(v["indexer_scores"], "fp8");
    let recall = v["fp8_selection_recall_per_layer"].as_array().unwrap();
    assert!(!recall.is_empty());
    assert!(recall
        .iter()
        .all(|r| (0.0..=1.0).contains(&r.as_f64().unwrap())));
    let (code, stdout, stderr) = eval(&["--indexer-scores", "bf16"]);
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(v["indexer_scores"], "bf16");
    assert!(v.get("fp8_selection_recall_per_layer").is_none());
    assert_clean_error(
        &eval(&["--indexer-scores", "fp4"]),
        &["--indexer-scores fp4", "bf16, fp8"],
    );
}
