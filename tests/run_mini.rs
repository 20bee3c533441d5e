//! `scripts/gpu/run_mini.sh`, the miniature reproduction's driver, with a stand-in for the
//! binary: calls with a few seconds of budget each must cut a training stage, resume it from
//! its checkpoint in the next call without repeating or skipping a step, run every task once
//! (a failed evaluation again, in a later call), give the matched baseline as many steps as
//! the sparse stage, and return at most the 8 files the lent GPU machines hand back.

use std::path::Path;
use std::process::Command;

/// The stand-in for dsa-train: `train` logs one metrics line per step (0.1 s each), keeps a
/// `step-N` folder every 5 steps, and on SIGINT checkpoints the step it is at and exits 0, as
/// the trainer does; it finishes with `FINISHED`; it resumes from its newest `step-N` with
/// `--resume auto`, from 0 without. `eval` fails once, for one row. Every call is recorded in calls.log.
const FAKE_BIN: &str = r#"#!/usr/bin/env bash
echo "$*" >> "$(dirname "$0")/calls.log"
arg() { local v; v=$(printf '%s\n' "$@" | grep "^$1=" | tail -1); echo "${v#*=}"; }
out_of() { local prev=; for a in "$@"; do [ "$prev" = --output ] && echo "$a"; prev=$a; done; }
case "$1" in
init|export) mkdir -p "$(out_of "$@")" ;;
train)
  out=$(arg run.output_dir "$@"); steps=$(arg train.steps "$@"); steps=${steps:-10}
  mkdir -p "$out"; cur=0
  # --resume auto: from the newest step-N, dropping metrics lines past it (as the trainer
  # does); without it, from step 0.
  if printf '%s\n' "$@" | grep -qx auto; then
    cur=$(ls -d "$out"/step-* 2>/dev/null | sed 's/.*step-//' | sort -n | tail -1); cur=${cur:-0}
  fi
  head -n "$cur" "$out/metrics.jsonl" > "$out/m.tmp" 2>/dev/null; mv "$out/m.tmp" "$out/metrics.jsonl"; stop=0
  trap 'stop=1' INT
  while [ "$cur" -lt "$steps" ]; do
    sleep 0.1; cur=$((cur + 1)); echo "{\"step\": $cur}" >> "$out/metrics.jsonl"
    [ $((cur % 5)) = 0 ] && mkdir -p "$out/step-$cur"
    [ "$stop" = 1 ] && { mkdir -p "$out/step-$cur"; exit 0; }
  done
  mkdir -p "$out/step-$cur"; touch "$out/FINISHED" ;;
eval)
  # The first sparse-attention evaluation of the dense start at 64 tokens fails once.
  once="$(dirname "$0")/failed-once"
  if [[ "$*" == */terminus\ *--seq-len\ 64\ --attention\ sparse* ]] && [ ! -f "$once" ]; then
    touch "$once"; echo "error: a made-up failure" >&2; exit 1
  fi
  echo '{"lm_loss": 7.0, "topk": 4, "attention_mass_recall": 0.5, "attention_mass_recall_per_layer": [0.5], "attention_mass_recall_ceiling": 0.6, "attention_mass_recall_ceiling_per_layer": [0.6]}' ;;
bench) echo "$2 stage, seq_len $(arg data.seq_len "$@"): median step 0.1 s = 1000 tokens/s" ;;
esac
"#;

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn run_mini_resumes_each_stage_where_the_last_call_stopped_and_runs_every_task_once() {
    let root = env!("CARGO_MANIFEST_DIR");
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("dsa-train");
    std::fs::write(&bin, FAKE_BIN).unwrap();
    Command::new("chmod").arg("+x").arg(&bin).status().unwrap();
    let work = dir.path().join("work");
    // Tokenised already: the corpus (fetched by a script, never committed) is not needed.
    for split in ["train", "test"] {
        std::fs::create_dir_all(work.join("tokens").join(split)).unwrap();
        std::fs::write(work.join("tokens").join(split).join("index.json"), "{}").unwrap();
    }
    let call = |n: usize| -> String {
        let log = dir.path().join(format!("log{n}"));
        let out = Command::new("bash")
            .arg(Path::new(root).join("scripts/gpu/run_mini.sh"))
            .arg("next")
            .arg(&log)
            .current_dir(root)
            .env("BIN", &bin)
            .env("WORK", &work)
            .env("SETS", "model.device=cpu")
            .env("STEP_BUDGET", "4")
            .env("MARGIN", "1")
            .env("MIN_TASK_S", "1")
            .env("DENSE_STEPS", "40")
            .env("SPARSE_STEPS", "12")
            .env("LONG", "64")
            .env("LENS", "32 64")
            .env("EVAL_SHORT", "32")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "call {n}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let returned = std::fs::read_dir(&log).unwrap().count();
        assert!(
            returned <= 8,
            "call {n} leaves {returned} files for the GPU machine to return, more than 8"
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mut calls = 0;
    loop {
        calls += 1;
        assert!(calls <= 12, "still not done after 11 calls of 4 s");
        if call(calls).contains("every task has run") {
            break;
        }
    }
    assert!(
        calls >= 3,
        "a 4 s pre-training plus the stages should not fit in one or two 4 s calls (took {calls})"
    );
    // Every stage ran each of its steps exactly once across the calls.
    for (stage, steps) in [
        ("dense", 40),
        ("warmup", 10),
        ("sparse", 12),
        ("baseline", 12),
    ] {
        let logged: Vec<String> = lines(&work.join(stage).join("metrics.jsonl"));
        let expected: Vec<String> = (1..=steps).map(|s| format!("{{\"step\": {s}}}")).collect();
        assert_eq!(logged, expected, "{stage}: steps logged across the calls");
        assert!(
            work.join(stage).join("FINISHED").exists(),
            "{stage} did not finish"
        );
    }
    let trains: Vec<String> = lines(&dir.path().join("calls.log"))
        .into_iter()
        .filter(|l| l.starts_with("train "))
        .collect();
    assert!(
        trains
            .iter()
            .filter(|l| l.contains("run.output_dir=") && l.contains("/dense "))
            .count()
            >= 2,
        "pre-training was never resumed: {trains:?}"
    );
    let baseline = trains
        .iter()
        .find(|l| l.contains("mini-dense-continued"))
        .expect("the baseline ran");
    assert!(
        baseline.contains("train.steps=12"),
        "the baseline must repeat the sparse stage's 12 steps: {baseline}"
    );
    let sparse = trains
        .iter()
        .find(|l| l.contains("mini-sparse"))
        .expect("the sparse stage ran");
    assert!(
        sparse.contains(&format!(
            "model.path={}",
            work.join("warmup").join("step-10").display()
        )),
        "sparse starts from the warm-up's end: {sparse}"
    );
    // Six model rows at two lengths, each once; three stages at two lengths, LONG first.
    let evals = lines(&work.join("eval.jsonl"));
    assert_eq!(evals.len(), 12, "{evals:#?}");
    assert!(evals.iter().all(|l| !l.ends_with("null}")), "{evals:#?}");
    let failures = lines(&work.join("failures.txt"));
    assert_eq!(
        failures.len(),
        1,
        "one evaluation failed once and was retried: {failures:?}"
    );
    assert!(
        failures[0].contains("\"seq_len\": 64, \"attention\": \"sparse\"")
            && failures[0].contains("terminus"),
        "{failures:?}"
    );
    let speed = lines(&work.join("speed.txt"));
    assert_eq!(speed.len(), 6, "{speed:#?}");
    assert!(
        speed[0].starts_with("ours dense 64: ") && speed[3].starts_with("ours dense 32: "),
        "{speed:#?}"
    );
    // The report of the last call (tools/reference/report.py, where the machine has python3).
    if Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        let table = std::fs::read_to_string(
            dir.path()
                .join(format!("log{calls}"))
                .join("results-table.md"),
        )
        .unwrap_or_default();
        assert!(
            table.contains("| dense-start | 32 | dense | 7.0000 |")
                && table.contains("| 64 | 1000 | 1000 | 1000 |"),
            "report.py's table:\n{table}"
        );
    }
    // One more call finds nothing to do.
    let before = lines(&dir.path().join("calls.log")).len();
    assert!(call(calls + 1).contains("every task has run"));
    let after: Vec<String> = lines(&dir.path().join("calls.log"))[before..].to_vec();
    assert!(
        after.iter().all(|l| l.starts_with("plot ")),
        "a finished pipeline ran again: {after:?}"
    );
}
