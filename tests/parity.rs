//! Parity with an independent implementation: transformers' DeepseekV3ForCausalLM and
//! DeepseekV32ForCausalLM, run in float64 by tools/parity/make_fixtures.py on small random FP8
//! checkpoints in the real HF layout. Our f32 CPU path must match: logits to 1e-4 relative (max
//! abs difference over max abs value, per window), lm_loss to 1e-4 relative, indexer KLs and
//! attention-mass recall to 1e-4 absolute, in both attention modes.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use dsa_train::config::IndexerDefaults;
use dsa_train::eval::{evaluate, EvalArgs};
use dsa_train::model::{AttentionMode, LoadOptions, Model, Pass};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn read_logits(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("logits").unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::F32);
    t.data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn check_fixture(name: &str) {
    let dir = fixture(name);
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let num = |v: &serde_json::Value| v.as_f64().unwrap();
    let (seq_len, topk) = (
        expected["seq_len"].as_u64().unwrap() as usize,
        expected["topk"].as_u64().unwrap() as usize,
    );
    let indexer = IndexerDefaults {
        n_heads: expected["index_n_heads"].as_u64().unwrap() as usize,
        head_dim: expected["index_head_dim"].as_u64().unwrap() as usize,
        topk,
    };
    let model = Model::load(
        &dir,
        &LoadOptions {
            indexer,
            init_seed: expected["init_seed"].as_u64().unwrap(),
            ..Default::default()
        },
    )
    .unwrap();
    let tokens =
        dsa_train::data::read_token_file(&dir.join("tokens.bin"), model.cfg.vocab_size).unwrap();
    for (mode, key) in [
        (AttentionMode::Dense, "dense"),
        (AttentionMode::Sparse, "sparse"),
    ] {
        let args = EvalArgs {
            model: dir.clone(),
            tokens: dir.join("tokens.bin"),
            seq_len,
            attention: mode,
            topk: Some(topk),
            device: Device::Cpu,
            dtype: DType::F32,
            indexer,
            init_seed: 0,
            skip_mtp: false,
            max_windows: None,
            document_eos: None,
            selection_scores: Default::default(),
        };
        let got = evaluate(&model, &tokens, &args).unwrap();
        let want = &expected[key];
        assert_eq!(got.tokens as u64, expected["tokens"].as_u64().unwrap());
        let rel = (got.lm_loss - num(&want["lm_loss"])).abs() / num(&want["lm_loss"]);
        assert!(
            rel < 1e-4,
            "{name} {key}: lm_loss {} vs {} (rel {rel:e})",
            got.lm_loss,
            want["lm_loss"]
        );
        let close = |label: &str, ours: &[f64], theirs: &serde_json::Value| {
            let theirs: Vec<f64> = theirs.as_array().unwrap().iter().map(num).collect();
            assert_eq!(ours.len(), theirs.len(), "{name} {key} {label}");
            for (l, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                assert!(
                    (a - b).abs() < 1e-4,
                    "{name} {key} {label}[{l}]: {a} vs {b}"
                );
            }
        };
        close(
            "indexer_kl_per_layer",
            &got.indexer_kl_per_layer,
            &want["indexer_kl_per_layer"],
        );
        close(
            "attention_mass_recall_per_layer",
            &got.attention_mass_recall_per_layer,
            &want["attention_mass_recall_per_layer"],
        );
        close(
            "indexer_kl",
            &[got.indexer_kl],
            &serde_json::json!([want["indexer_kl"]]),
        );
        close(
            "attention_mass_recall",
            &[got.attention_mass_recall],
            &serde_json::json!([want["attention_mass_recall"]]),
        );

        // Logits, window by window.
        let reference = read_logits(&dir.join(format!("logits_{key}.safetensors")));
        let vocab = model.cfg.vocab_size;
        let opts = Pass::logits(mode, topk);
        for w in 0..got.windows {
            let x = Tensor::from_slice(
                &tokens[w * seq_len..(w + 1) * seq_len],
                (1, seq_len),
                &Device::Cpu,
            )
            .unwrap();
            let ours: Vec<f32> = model
                .forward(&x, &opts)
                .unwrap()
                .logits
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let theirs = &reference[w * seq_len * vocab..(w + 1) * seq_len * vocab];
            let max_diff = ours
                .iter()
                .zip(theirs)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            let max_ref = theirs.iter().map(|b| b.abs()).fold(0f32, f32::max);
            assert!(
                max_diff / max_ref < 1e-4,
                "{name} {key} window {w}: logits rel err {:e}",
                max_diff / max_ref
            );
        }
    }
}

#[test]
fn v32_checkpoint_with_indexer_matches_transformers() {
    check_fixture("v32_tiny");
}

#[test]
fn v31_checkpoint_without_indexer_matches_transformers() {
    check_fixture("v31_tiny");
}

#[test]
fn indexer_init_matches_the_reference_scripts_bits() {
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("indexer_init_sample.json")).unwrap(),
    )
    .unwrap();
    for s in v["samples"].as_array().unwrap() {
        let spec = dsa_train::weights::WeightSpec {
            name: s["name"].as_str().unwrap().into(),
            shape: s["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize)
                .collect(),
            kind: dsa_train::weights::Kind::Linear,
            indexer: true,
        };
        let ours = dsa_train::weights::init_indexer_tensor(&spec, s["seed"].as_u64().unwrap());
        for (i, hex) in s["first8_f32_bits_hex"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            let bits = u32::from_str_radix(hex.as_str().unwrap(), 16).unwrap();
            assert_eq!(
                ours[i].to_bits(),
                bits,
                "{} seed {} [{i}]",
                spec.name,
                s["seed"]
            );
        }
    }
}

/// The sampled f64 gradients of a safetensors file written by
/// tools/parity/make_train_fixture.py, by tensor name.
fn read_f64_tensors(path: &Path) -> std::collections::BTreeMap<String, Vec<f64>> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, t)| {
            assert_eq!(t.dtype(), safetensors::Dtype::F64, "{name}");
            let v = t
                .data()
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (name, v)
        })
        .collect()
}

/// Training parity with an independent reference: one micro-batch (the fixture's first window)
/// of the warm-up, the sparse and the dense (pre-training) stage through our f32 CPU trainer against torch autograd
/// through transformers' DeepseekV32ForCausalLM in f64 with the two KL losses, the balance loss
/// and the MTP module written in torch (tools/parity/make_train_fixture.py; the losses as
/// docs/training.md defines them; the MTP as DeepSeek-V3 does: the main model's output after
/// its final norm, the main embedding and head). The LM
/// loss and the summed indexer KL to 1e-5 relative; the same set of trainable tensors on both
/// sides; per tensor, its largest |value| and L2 norm to 1e-5 relative and every sampled value
/// (every `stride`-th of the flattened gradient, about 512 a tensor) within 1e-5 of the largest
/// |value|: the f32 rounding of sums over a few hundred terms.
/// The training fixture of tools/parity/make_train_fixture.py: its report, and a trainer of
/// one stage over exactly its window (the first seq_len tokens), working in `work`.
struct TrainFixture {
    dir: PathBuf,
    expected: serde_json::Value,
    work: PathBuf,
}

impl TrainFixture {
    fn open(tag: &str) -> Self {
        let dir = fixture("v32_tiny");
        let expected: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("train_expected.json")).unwrap(),
        )
        .unwrap();
        let seq = expected["seq_len"].as_u64().unwrap() as usize;
        let work =
            std::env::temp_dir().join(format!("dsa-train-parity-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&work).unwrap();
        let tokens = dsa_train::data::read_token_file(&dir.join("tokens.bin"), usize::MAX).unwrap();
        let bytes: Vec<u8> = tokens[..seq].iter().flat_map(|t| t.to_le_bytes()).collect();
        std::fs::write(work.join("window.bin"), bytes).unwrap();
        Self {
            dir,
            expected,
            work,
        }
    }

    /// `sets`: recipe overrides (`key=value`).
    fn trainer(&self, stage: &str, sets: &[String]) -> dsa_train::train::Trainer {
        let e = &self.expected;
        let recipe = format!(
            "[run]\noutput_dir = {:?}\nprogress = false\n[model]\npath = {:?}\nmtp = true\n\
             [data]\npath = {:?}\nseq_len = {}\n[train]\nstage = {stage:?}\n\
             global_batch_seqs = 1\nmicro_batch_seqs = 1\nseq_balance_alpha = {}\nkl_weight = {}\n\
             mtp_weight = {}\n[dsa]\nindex_topk = {}\n",
            self.work.join(format!("out-{stage}")),
            self.dir,
            self.work.join("window.bin"),
            e["seq_len"].as_u64().unwrap(),
            e["seq_balance_alpha"].as_f64().unwrap(),
            e["kl_weight"].as_f64().unwrap(),
            e["mtp_weight"].as_f64().unwrap(),
            e["topk"].as_u64().unwrap(),
        );
        let recipe = dsa_train::recipe::Recipe::parse(&recipe, sets).unwrap();
        dsa_train::train::Trainer::new(recipe, None).unwrap()
    }
}

impl Drop for TrainFixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

#[test]
fn one_training_micro_batch_matches_torch_autograd() {
    let fx = TrainFixture::open("grads");
    let (dir, expected) = (&fx.dir, &fx.expected);
    // The sparse stage twice: whole sequences, then every layer (the MTP module's too) a block
    // of 7 query rows at a time with the logits in chunks of 5 positions. The warm-up twice:
    // whole, then each layer's feed-forward 7 tokens at a time.
    let blocks = [
        "train.block_rows=7".to_string(),
        "train.lm_head_chunk=5".to_string(),
    ];
    for (stage, sets) in [
        ("warmup", &[][..]),
        ("warmup", &blocks[..1]),
        ("sparse", &[][..]),
        ("sparse", &blocks[..]),
        ("dense", &[][..]),
    ] {
        let want = &expected[stage];
        let layers = 3.0; // the fixture's main layers; the trainer logs the mean KL over them
        let mut trainer = fx.trainer(stage, sets);
        let (accum, _, lm, kl) = trainer.accumulate_gradients().unwrap();
        let rel = |a: f64, b: f64| (a - b).abs() / b.abs().max(1e-30);
        let kl_want = want["indexer_kl_sum"].as_f64().unwrap() / layers;
        if stage == "dense" {
            assert_eq!(kl, 0.0, "dense: no indexer KL");
        } else {
            assert!(
                rel(kl, kl_want) < 1e-5,
                "{stage}: indexer KL {kl} vs {kl_want}"
            );
        }
        if stage != "warmup" {
            let lm_want = want["lm_loss"].as_f64().unwrap();
            assert!(
                rel(lm, lm_want) < 1e-5,
                "{stage}: LM loss {lm} vs {lm_want}"
            );
        }
        let ours = accum.into_grads();
        let samples = read_f64_tensors(&dir.join(format!("train_{stage}.safetensors")));
        let stats = want["gradients"].as_object().unwrap();
        let mut names: Vec<&String> = ours.keys().collect();
        names.sort();
        assert_eq!(
            names,
            stats.keys().collect::<Vec<_>>(),
            "{stage}: the tensors that learn"
        );
        let mut worst = (0f64, String::new());
        for (name, st) in stats {
            let shape: Vec<usize> = st["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            let got = &ours[name];
            assert_eq!(got.dims(), &shape[..], "{stage}: {name}");
            let got: Vec<f64> = got
                .to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let (max_abs, l2) = (st["max_abs"].as_f64().unwrap(), st["l2"].as_f64().unwrap());
            let our_max = got.iter().fold(0f64, |m, v| m.max(v.abs()));
            let our_l2 = got.iter().map(|v| v * v).sum::<f64>().sqrt();
            let stride = st["stride"].as_u64().unwrap() as usize;
            let want = &samples[name];
            assert_eq!(
                want.len(),
                got.len().div_ceil(stride),
                "{stage}: {name} samples"
            );
            let diff = got
                .iter()
                .step_by(stride)
                .zip(want)
                .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
            let e = (diff / max_abs.max(1e-30))
                .max(rel(our_max, max_abs))
                .max(rel(our_l2, l2));
            if e > worst.0 {
                worst = (e, name.clone());
            }
        }
        assert!(
            worst.0 < 1e-5,
            "{stage}: gradient of {} differs by {:.2e} of its scale",
            worst.1,
            worst.0
        );
        eprintln!(
            "{stage}: {} gradients, worst relative difference {:.2e} ({})",
            stats.len(),
            worst.0,
            worst.1
        );
    }
}

/// Two AdamW steps from the checkpoint's weights with torch's gradients of the sparse stage
/// (the second with -0.5 times them) against torch.optim.AdamW: our update, clipping by each
/// group's norm, and the trainer's choice of group and weight decay per tensor. AdamW acts
/// value by value once the group norms are known, so the sampled values (every stride-th) of
/// each tensor suffice, with the norms torch measured over whole tensors.
#[test]
fn two_adamw_steps_match_torch() {
    use dsa_train::train::optim::{AdamW, GradAccum, Group, Slot};
    let fx = TrainFixture::open("adamw");
    let a = &fx.expected["adamw"];
    let f = |key: &str| a[key].as_f64().unwrap();
    let norms = &a["group_norms"];
    let stats = fx.expected["sparse"]["gradients"].as_object().unwrap();
    let samples = read_f64_tensors(&fx.dir.join("train_sparse.safetensors"));
    let trainer = fx.trainer("sparse", &[]);
    let opt = AdamW {
        beta1: f("beta1"),
        beta2: f("beta2"),
        eps: f("eps"),
        weight_decay: f("weight_decay"),
        clip: f("grad_clip"),
        kernels: dsa_train::kernels::KernelPolicy::KERNELS,
    };
    let dev = Device::Cpu;
    let to_f32 = |v: &[f64]| {
        Tensor::from_vec(
            v.iter().map(|&x| x as f32).collect::<Vec<_>>(),
            v.len(),
            &dev,
        )
        .unwrap()
    };
    // One slot per trainable tensor, holding its sampled weights, with the trainer's decay
    // and group.
    let mut slots = vec![];
    for s in &trainer.slots {
        let stride = stats[&s.name]["stride"].as_u64().unwrap() as usize;
        let w: Vec<f32> = s
            .var
            .as_tensor()
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let w: Vec<f64> = w.iter().step_by(stride).map(|&x| x as f64).collect();
        let var = candle_core::Var::from_tensor(&to_f32(&w)).unwrap();
        slots.push(Slot::new(s.name.clone(), var, s.decay, s.group).unwrap());
    }
    assert_eq!(slots.len(), stats.len(), "the tensors that learn");
    let mut worst = (0f64, String::new());
    for (step, factor) in [(1, 1.0), (2, -0.5)] {
        let mut accum = GradAccum::default();
        for s in &slots {
            let g: Vec<f64> = samples[&s.name].iter().map(|g| g * factor).collect();
            accum.settle(&s.name, &to_f32(&g)).unwrap();
        }
        let norm = |group: &str| norms[format!("{group}_step{step}")].as_f64().unwrap();
        let sq = [
            (Group::Main, norm("main")),
            (Group::Indexer, norm("indexer")),
        ]
        .into_iter()
        .map(|(g, n)| (g, n * n))
        .collect();
        opt.step_with_norms(&mut slots, &accum, &sq, |_| f("lr"))
            .unwrap();
        for s in &slots {
            let want = &samples[&format!("adamw{step}/{}", s.name)];
            let got: Vec<f32> = s.var.as_tensor().to_vec1().unwrap();
            let scale = want.iter().fold(0f64, |m, w| m.max(w.abs())).max(1e-30);
            let diff = got
                .iter()
                .zip(want)
                .fold(0f64, |m, (&g, w)| m.max((g as f64 - w).abs()));
            if diff / scale > worst.0 {
                worst = (diff / scale, format!("{} after step {step}", s.name));
            }
        }
    }
    // f32 weights and arithmetic against torch's f64: a few f32 roundings of the weight.
    assert!(
        worst.0 < 1e-6,
        "AdamW: {} differs by {:.2e} of its scale",
        worst.1,
        worst.0
    );
    eprintln!(
        "AdamW: {} tensors, two steps, worst relative difference {:.2e} ({})",
        slots.len(),
        worst.0,
        worst.1
    );
}
