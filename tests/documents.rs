//! Document masking (`data.document_mask`): a packed window whose queries see only their own
//! document gives every document exactly what it gets when it runs alone: logits, the
//! indexer's KL and recall per query (dense and sparse attention, whole and in blocks of
//! rows), the MTP module's logits, and in training the indexer's KL and its gradients.

mod common;

use candle_core::{Device, Tensor};
use common::{max_abs_diff, max_rel_err, tiny_checkpoint};
use dsa_train::dsa::KeyStarts;
use dsa_train::model::{AttentionMode, ForwardContext, IndexerKl, LoadOptions, Model, Pass};
use dsa_train::recipe::Stage;

/// The end-of-document token of these windows.
const EOS: u32 = 1;

/// Windows of `t` tokens packed from documents of the given lengths (each ends with EOS
/// except one cut by the window's end), ids from 2..512; returns the tokens [B*T] and each
/// document as (sequence, start, length).
fn packed(docs: &[&[usize]], t: usize, seed: u64) -> (Vec<u32>, Vec<(usize, usize, usize)>) {
    let mut rng = dsa_train::rng::SplitMix64::new(seed);
    let mut tokens = Vec::new();
    let mut spans = Vec::new();
    for (b, lens) in docs.iter().enumerate() {
        assert_eq!(lens.iter().sum::<usize>(), t);
        let mut start = 0;
        for (i, &len) in lens.iter().enumerate() {
            for j in 0..len {
                let last = j + 1 == len && i + 1 < lens.len();
                tokens.push(if last {
                    EOS
                } else {
                    2 + (rng.next_u64() % 510) as u32
                });
            }
            spans.push((b, start, len));
            start += len;
        }
    }
    (tokens, spans)
}

fn rows(x: &Tensor, b: usize, start: usize, len: usize) -> Tensor {
    x.narrow(0, b, 1).unwrap().narrow(1, start, len).unwrap()
}

#[test]
fn key_starts_follow_the_end_of_document_token() {
    let toks = [5, EOS, 7, 8, EOS, EOS, 9, 3];
    let s = KeyStarts::after_eos(&toks, 2, 4, EOS, &Device::Cpu).unwrap();
    assert_eq!(s.seq(0), [0, 0, 2, 2]);
    // A window starts a document whatever came before it.
    assert_eq!(s.seq(1), [0, 1, 2, 2]);
    assert_eq!(s.positions(), [0, 1, 0, 1, 0, 0, 0, 1]);
    assert!(s.any_boundary());
    // Bias rows: 0 exactly on start..=q.
    let bias = s.bias_rows(1, 3, 4).unwrap().to_vec3::<f32>().unwrap();
    let visible = |row: &Vec<f32>| -> Vec<usize> {
        row.iter()
            .enumerate()
            .filter(|(_, v)| **v == 0.0)
            .map(|(i, _)| i)
            .collect()
    };
    assert_eq!(visible(&bias[0][1]), [2]);
    assert_eq!(visible(&bias[0][2]), [2, 3]);
    assert_eq!(visible(&bias[1][0]), [1]);
    // A start after its query, or going backwards, is refused.
    assert!(KeyStarts::new(vec![0, 2], 1, 2, &Device::Cpu).is_err());
    assert!(KeyStarts::new(vec![0, 1, 0], 1, 3, &Device::Cpu).is_err());
}

/// Every pass of the model over a packed window equals each document run alone, row for row:
/// dense and sparse attention (top-k smaller than most documents, so the selection matters
/// and rows are padded), whole and in blocks of 5 rows; the MTP module's logits where its next
/// token is in the same document. Without the mask the same window differs (the test can fail).
#[test]
fn a_packed_window_with_document_masking_equals_each_document_alone() {
    let (_tmp, dir) = tiny_checkpoint(true, 31);
    let model = Model::load(&dir, &LoadOptions::default()).unwrap();
    let t = 36;
    let (host, spans) = packed(&[&[11, 1, 24], &[7, 29]], t, 3);
    let tokens = Tensor::from_vec(host.clone(), (2, t), &Device::Cpu).unwrap();
    let starts = KeyStarts::after_eos(&host, 2, t, EOS, &Device::Cpu).unwrap();
    let plain = ForwardContext::new(&model.cfg, t, &Device::Cpu).unwrap();
    let ctx = plain.with_documents(starts).unwrap();
    let topk = 6;
    let train = |stage: Stage, block_rows: usize| Pass::Train {
        stage,
        topk,
        kl: IndexerKl::Deferred,
        seq_balance: false,
        block_rows,
        indexer_rows: 4,
        backward: dsa_train::model::BackwardPlan::Autograd,
    };
    let mut passes = vec![];
    for mode in [AttentionMode::Dense, AttentionMode::Sparse] {
        passes.push((format!("eval {mode:?}"), Pass::eval(mode, topk)));
        passes.push((
            format!("eval {mode:?}, rows 5"),
            Pass::eval(mode, topk).in_rows(5),
        ));
    }
    // The training passes' forwards (their KL is the trainer's: see the training test).
    passes.push(("dense stage".into(), train(Stage::Dense, 0)));
    passes.push(("warm-up".into(), train(Stage::Warmup, 0)));
    passes.push(("sparse stage".into(), train(Stage::Sparse, 0)));
    passes.push(("sparse stage, blocks of 5".into(), train(Stage::Sparse, 5)));
    for (what, pass) in passes {
        {
            let out = model.forward_in(&tokens, &ctx, &pass).unwrap();
            let unmasked = model.forward_in(&tokens, &plain, &pass).unwrap();
            // All-zero starts (no boundary) give the unmasked numbers bit for bit: what lets
            // `ForwardContext::for_documents` keep the plain context for such windows.
            let zero_starts = KeyStarts::new(vec![0; 2 * t], 2, t, &Device::Cpu).unwrap();
            let zero = plain.with_documents(zero_starts).unwrap();
            let same = model.forward_in(&tokens, &zero, &pass).unwrap();
            assert_eq!(
                max_abs_diff(&same.logits, &unmasked.logits),
                0.0,
                "{what}: all-zero starts"
            );
            let (mtp, _) = model
                .mtp_logits_in(0, &out.hidden, &tokens, &ctx, &pass)
                .unwrap();
            let mut later_docs_differ = false;
            for &(b, start, len) in &spans {
                let alone_tokens = rows(&tokens, b, start, len);
                let alone = model.forward(&alone_tokens, &pass).unwrap();
                let e = max_rel_err(&rows(&out.logits, b, start, len), &alone.logits);
                assert!(
                    e < 1e-5,
                    "{what}, document ({b}, {start}, {len}): logits {e}"
                );
                if start > 0 {
                    later_docs_differ |=
                        max_rel_err(&rows(&unmasked.logits, b, start, len), &alone.logits) > 1e-3;
                }
                for (l, (p, a)) in out.layers.iter().zip(&alone.layers).enumerate() {
                    let Some(kl) = p.indexer_kl.as_ref() else {
                        continue; // a training pass
                    };
                    let e = max_rel_err(&rows(kl, b, start, len), a.indexer_kl.as_ref().unwrap());
                    assert!(
                        e < 1e-4,
                        "{what}, document ({b}, {start}), layer {l}: KL {e}"
                    );
                    let r = p.recall.as_ref().unwrap();
                    let e = max_abs_diff(&rows(r, b, start, len), a.recall.as_ref().unwrap());
                    assert!(
                        e < 1e-5,
                        "{what}, document ({b}, {start}), layer {l}: recall {e}"
                    );
                }
                if len >= 3 {
                    let (mtp_alone, _) = model
                        .mtp_logits(0, &alone.hidden, &alone_tokens, &pass)
                        .unwrap();
                    let e = max_rel_err(&rows(&mtp, b, start, len - 1), &mtp_alone);
                    assert!(e < 1e-5, "{what}, document ({b}, {start}): MTP logits {e}");
                }
            }
            assert!(later_docs_differ, "{what}: the mask changed nothing");
        }
    }
}

/// A trainer of one window, `tokens`, from the checkpoint `model` in `stage`.
fn trainer(
    model: &std::path::Path,
    work: &std::path::Path,
    tag: &str,
    stage: &str,
    tokens: &[u32],
    document_mask: bool,
) -> dsa_train::train::Trainer {
    let window = work.join(format!("{tag}.bin"));
    dsa_train::data::write_token_file(&window, tokens).unwrap();
    let recipe = format!(
        "[run]\noutput_dir = {:?}\nprogress = false\n[model]\npath = {model:?}\nmtp = false\n\
         [data]\npath = {window:?}\nseq_len = {}\ndocument_mask = {document_mask}\neos_id = {EOS}\n\
         [train]\nstage = {stage:?}\nglobal_batch_seqs = 1\nmicro_batch_seqs = 1\n\
         [dsa]\nindex_topk = 6\n",
        work.join(format!("out-{tag}")),
        tokens.len(),
    );
    let recipe = dsa_train::recipe::Recipe::parse(&recipe, &[]).unwrap();
    dsa_train::train::Trainer::new(recipe, None).unwrap()
}

/// Training on a packed window with document masking gives the indexer what the documents
/// give alone: in the warm-up and the sparse stage the indexer learns only by its KL, a mean
/// over queries, so (KL, gradient of every indexer tensor) x T equals the sum over documents
/// of their own x length. (The main model's LM loss also has the target across each boundary,
/// which no document alone has, so its gradients are not compared.)
#[test]
fn training_on_a_packed_window_gives_the_indexer_what_each_document_gives_alone() {
    let (tmp, dir) = tiny_checkpoint(true, 33);
    let t = 36;
    let (host, spans) = packed(&[&[15, 2, 19]], t, 5);
    for stage in ["warmup", "sparse"] {
        let (accum, _, _, kl) = trainer(&dir, tmp.path(), "packed", stage, &host, true)
            .accumulate_gradients()
            .unwrap();
        let packed = accum.into_grads();
        let mut kl_sum = 0.0;
        let mut sums: std::collections::HashMap<String, Tensor> = Default::default();
        for &(_, start, len) in &spans {
            let doc = &host[start..start + len];
            let (accum, _, _, kl_doc) = trainer(&dir, tmp.path(), "doc", stage, doc, false)
                .accumulate_gradients()
                .unwrap();
            kl_sum += kl_doc * len as f64;
            for (name, g) in accum.into_grads() {
                let g = (g * len as f64).unwrap();
                let sum = match sums.remove(&name) {
                    Some(s) => (s + g).unwrap(),
                    None => g,
                };
                sums.insert(name, sum);
            }
        }
        let rel = (kl * t as f64 - kl_sum).abs() / kl_sum.abs();
        assert!(rel < 1e-5, "{stage}: KL x T {} vs {kl_sum}", kl * t as f64);
        let mut compared = 0;
        for (name, g) in &packed {
            if !name.contains("indexer") {
                continue;
            }
            let want = &sums[name];
            let e = max_rel_err(&(g * t as f64).unwrap(), want);
            assert!(e < 1e-4, "{stage}: {name}: max relative error {e}");
            compared += 1;
        }
        assert!(compared >= 8, "{stage}: only {compared} indexer gradients");
    }
}

/// The recipe's mistakes around document masking are one sentence naming the key (and file).
#[test]
fn document_masking_without_an_end_of_document_token_is_refused_by_name() {
    let (tmp, dir) = tiny_checkpoint(true, 35);
    let window = tmp.path().join("raw.bin");
    dsa_train::data::write_token_file(&window, &[5; 40]).unwrap();
    let text = |extra: &str| {
        format!(
            "[run]\noutput_dir = {:?}\nprogress = false\n[model]\npath = {dir:?}\n\
             [data]\npath = {window:?}\nseq_len = 16\ndocument_mask = true\n{extra}\
             [train]\nstage = \"warmup\"\nglobal_batch_seqs = 1\nmicro_batch_seqs = 1\n",
            tmp.path().join("out"),
        )
    };
    let err = |extra: &str| -> String {
        let recipe = match dsa_train::recipe::Recipe::parse(&text(extra), &[]) {
            Ok(r) => r,
            Err(e) => return format!("{e:#}"),
        };
        match dsa_train::train::Trainer::new(recipe, None) {
            Ok(_) => panic!("{extra:?} was accepted"),
            Err(e) => format!("{e:#}"),
        }
    };
    let e = err("");
    assert!(e.contains("data.eos_id") && e.contains("raw.bin"), "{e}");
    let e = err("eos_id = 9999\n");
    assert!(
        e.contains("data.eos_id = 9999") && e.contains("vocabulary"),
        "{e}"
    );
    let e = err("eos_id = -1\n");
    assert!(e.contains("data.eos_id") && e.contains("token id"), "{e}");
    let e = err("eos_id = \"1\"\n");
    assert!(e.contains("data.eos_id") && e.contains("a string"), "{e}");
    // And with the id, the same recipe trains.
    let recipe = dsa_train::recipe::Recipe::parse(&text("eos_id = 5\n"), &[]).unwrap();
    let mut trainer = dsa_train::train::Trainer::new(recipe, None).unwrap();
    trainer.accumulate_gradients().unwrap();
}

/// `eval --document-mask` gives a packed window's documents what they get alone: the indexer
/// KL per layer x T equals the documents' x length (sparse attention, top-k below most
/// documents' lengths); without EOS tokens in the stream the mask changes nothing.
#[test]
fn evaluation_with_document_masking_weighs_each_document_alone() {
    let (tmp, dir) = tiny_checkpoint(true, 37);
    let model = Model::load(&dir, &LoadOptions::default()).unwrap();
    let t = 30;
    let (host, spans) = packed(&[&[12, 18]], t, 7);
    let args = |len: usize, eos: Option<u32>| dsa_train::eval::EvalArgs {
        model: dir.clone(),
        tokens: tmp.path().join("unused.bin"),
        seq_len: len,
        attention: AttentionMode::Sparse,
        topk: Some(6),
        device: Device::Cpu,
        dtype: candle_core::DType::F32,
        indexer: Default::default(),
        init_seed: 0,
        skip_mtp: true,
        max_windows: None,
        document_eos: eos,
        selection_scores: Default::default(),
    };
    let eval = |tokens: &[u32], len: usize, eos: Option<u32>| {
        dsa_train::eval::evaluate(&model, tokens, &args(len, eos)).unwrap()
    };
    let masked = eval(&host, t, Some(EOS));
    let alone: Vec<_> = spans
        .iter()
        .map(|&(_, start, len)| (len, eval(&host[start..start + len], len, None)))
        .collect();
    for l in 0..masked.indexer_kl_per_layer.len() {
        let want: f64 = alone
            .iter()
            .map(|(len, r)| r.indexer_kl_per_layer[l] * *len as f64)
            .sum();
        let got = masked.indexer_kl_per_layer[l] * t as f64;
        assert!(
            (got - want).abs() <= 1e-5 * want.abs(),
            "layer {l}: KL x T {got} vs {want}"
        );
    }
    // Recall: over the queries with more than k keys of their own document, weighted alike.
    let counted = |len: usize| len.saturating_sub(6);
    let want: f64 = alone
        .iter()
        .map(|(len, r)| r.attention_mass_recall * counted(*len) as f64)
        .sum::<f64>()
        / alone
            .iter()
            .map(|(len, _)| counted(*len) as f64)
            .sum::<f64>();
    assert!(
        (masked.attention_mass_recall - want).abs() < 1e-6,
        "recall {} vs {want}",
        masked.attention_mass_recall
    );
    let no_eos: Vec<u32> = host.iter().map(|&x| if x == EOS { 2 } else { x }).collect();
    assert_eq!(eval(&no_eos, t, Some(EOS)), eval(&no_eos, t, None));
}

/// `eval --document-mask` on a raw token file needs `--eos-id`, and says so.
#[test]
fn eval_document_mask_on_a_raw_file_asks_for_the_eos_id() {
    let (tmp, dir) = tiny_checkpoint(true, 39);
    let raw = tmp.path().join("raw.bin");
    dsa_train::data::write_token_file(&raw, &[5; 64]).unwrap();
    let (d, r) = (dir.to_str().unwrap(), raw.to_str().unwrap());
    let base = [
        "eval",
        "--model",
        d,
        "--tokens",
        r,
        "--seq-len",
        "32",
        "--document-mask",
    ];
    let (code, _, err) = common::run_cli(&base);
    assert_ne!(code, 0);
    assert!(err.contains("--eos-id") && err.contains("raw.bin"), "{err}");
    let (code, _, err) = common::run_cli(&[&base[..], &["--eos-id", "99999"]].concat());
    assert_ne!(code, 0);
    assert!(
        err.contains("--eos-id 99999") && err.contains("vocabulary"),
        "{err}"
    );
    let (code, out, err) = common::run_cli(&[&base[..], &["--eos-id", "5"]].concat());
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("lm_loss"), "{out}");
}
