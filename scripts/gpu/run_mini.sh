#!/usr/bin/env bash
# The miniature reproduction on one GPU (docs/results.md) as one ordered list of tasks; each
# call runs the next unfinished ones inside STEP_BUDGET seconds and stops, and the next call
# picks up there (files stay in WORK, default /tmp/mini, on the GPU host between calls; a
# training stage cut by the budget is stopped by SIGINT, checkpoints, and resumes). About
# three calls of STEP_BUDGET=560 run all of it on an H200 (estimated from the task times of
# the third pass in docs/results.md, which ran as five calls of this script's earlier form).
# Usage: scripts/gpu/run_mini.sh [STEP] [LOG_DIR]   (from the repository root; STEP is 1, 2, 3
# or next, all meaning "continue": numbered only so that logs say which call they came from)
#
# The tasks, in order (a task is skipped when its result is already in WORK):
#   tokenise  the corpus (data/corpus/corpus.tar.xz from scripts/fetch_corpus.sh, tokenizer
#             from scripts/fetch_tokenizer.sh), train and held-out test splits
#   selftest  gpu-selftest, with SELFTEST=1 only (about 110 s)
#   init      the mini-Terminus's random start (`dsa-train init`, CONFIG)
#   dense     pre-training (recipes/mini-dense.toml, DENSE_STEPS, default the recipe's)
#   export    the last dense checkpoint as an HF FP8 checkpoint: the mini-Terminus
#   warmup    dense warm-up at LONG tokens, top-LONG/64 (recipes/mini-warmup.toml)
#   sparse    sparse stage from the warm-up's end, SPARSE_STEPS steps (recipes/mini-sparse.toml)
#   baseline  the mini-Terminus continued densely for as many steps on as many tokens
#             (recipes/mini-dense-continued.toml): the matched comparison for the sparse stage
#   eval      held-out LM loss (dense and sparse attention), indexer recall and its ceiling of
#             the dense start, the baseline, the warm-up's end and the sparse stage's end, at
#             EVAL_SHORT (default 8192; EVAL_WINDOWS windows) and LONG (EVAL_WINDOWS_LONG)
#   speed     tokens/s of the dense, warm-up and sparse stages at each of LENS, LONG first
#   transformers  its DeepseekV3 and DeepseekV32 training steps on the same config.json at
#             LENS (tools/reference/bench_transformers.py; TRANSFORMERS=0 skips it)
# Every call ends with the report (tools/reference/report.py: results-table.md, recall.png,
# speed.png; stages.png from `dsa-train plot`) of what WORK holds, in WORK/report and LOG_DIR.
#
# Environment: WORK; STEP_BUDGET (seconds per call, default 560); DENSE_STEPS; LONG (default
# 32768); SPARSE_STEPS (default 120); EVAL_WINDOWS (default 4), EVAL_WINDOWS_LONG (default 2);
# LENS (default "4096 8192 16384 32768 65536"); BENCH_TIMEOUT / BENCH_STEPS (per `bench step`,
# default 75 s / 2 steps); SETS (extra --set arguments for every run, e.g. "model.device=cpu
# model.dtype=f32" for a CPU rehearsal); BIN (default dist/gpu/dsa-train); CONFIG (default
# recipes/mini/config.json); SELFTEST; TRANSFORMERS (default 1); MARGIN, MIN_TASK_S (the budget's
# safety margin and the least time a task is started with; tests/run_mini.rs shrinks them).
set -uo pipefail
STEP="${1:-next}"
case "$STEP" in 1|2|3|next) ;; *) echo "run_mini.sh: STEP is 1, 2, 3 or next (each continues where the last call stopped)" >&2; exit 2 ;; esac
LOG="${2:-${OUT:-gpu-logs}}"
WORK="${WORK:-/tmp/mini}"
# The lent GPU machines return at most 8 files of a call: LOG gets the call's mini.log,
# device.txt, the report (results-table.md, recall.png, speed.png, stages.png) and one
# mini-files.tar.gz of everything else (every stage's log and metrics, the evaluations,
# timings, transformers' figures); the detailed logs live in WORK/logs.
D="$WORK/logs"
mkdir -p "$LOG" "$WORK" "$D"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
BIN="${BIN:-dist/gpu/dsa-train}"
if [ ! -x "$BIN" ] && [ -f "$BIN.xz" ]; then xz -dc "$BIN.xz" > "$BIN" && chmod +x "$BIN"; fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tee "$LOG/device.txt" || echo cpu > "$LOG/device.txt"
stamp() { echo "[mini $(date +%T)] $*" | tee -a "$LOG/mini.log" "$WORK/mini.log"; }
EXTRA=()
for kv in ${SETS:-}; do EXTRA+=(--set "$kv"); done
DATA=(--set "data.path=$WORK/tokens/train" "${EXTRA[@]}")
LONG="${LONG:-32768}"
LENS="${LENS:-4096 8192 16384 32768 65536}"
CONFIG="${CONFIG:-recipes/mini/config.json}"
EVAL_DEVICE=cuda; EVAL_DTYPE=bf16
case " ${SETS:-} " in *" model.device=cpu "*) EVAL_DEVICE=cpu; EVAL_DTYPE=f32 ;; esac
# The checkpoint with the highest step (sorted on the number after the last "step-", so that
# a dash elsewhere in the path does not matter).
newest() { ls -d "$1"/step-* 2>/dev/null | awk -F'step-' '{ print $NF "\t" $0 }' | sort -n | tail -1 | cut -f2; }
T0=$(date +%s)
left() { echo $(( ${STEP_BUDGET:-560} - ($(date +%s) - T0) )); }
# cap N: N, or what is left of the budget less MARGIN seconds (default 20; at least 1).
# fits N: a task that needs about N seconds (MIN_TASK_S instead, where set) starts in time.
MARGIN="${MARGIN:-20}"
cap() { local l=$(( $(left) - MARGIN )); [ "$l" -lt "$1" ] && echo $(( l > 1 ? l : 1 )) || echo "$1"; }
fits() { [ "$(left)" -gt $(( ${MIN_TASK_S:-$1} + MARGIN )) ]; }
stamp "call $STEP: budget ${STEP_BUDGET:-560} s, WORK $WORK"

# The report of whatever WORK holds, into LOG: run at every exit of a call (the EXIT trap),
# so a failing call also returns its logs. `stop MESSAGE` ends the call here.
WHY="stopped"
stop() { WHY="$1"; exit 0; }
report() {
  local R="$WORK/report"
  mkdir -p "$R"
  cp "$WORK"/eval.jsonl "$WORK"/speed.txt "$WORK"/transformers.jsonl "$LOG/device.txt" "$R"/ 2>/dev/null
  for f in dense warmup sparse baseline; do
    cp "$WORK/$f/metrics.jsonl" "$R/$f-metrics.jsonl" 2>/dev/null
  done
  for f in dense warmup sparse; do
    [ -f "$WORK/$f/metrics.jsonl" ] && cat "$WORK/$f/metrics.jsonl"
  done > "$R/all-metrics.jsonl"
  [ -s "$R/all-metrics.jsonl" ] && $BIN plot --metrics "$R/all-metrics.jsonl" --output "$R/stages.png" >> "$D/report.log" 2>&1
  python3 tools/reference/report.py "$R" > /dev/null 2>>"$D/report.log"
  stamp "call $STEP done after $(( $(date +%s) - T0 )) s: $WHY"
  for f in results-table.md recall.png speed.png stages.png; do
    cp "$R/$f" "$LOG/" 2>/dev/null
  done
  tar -czf "$LOG/mini-files.tar.gz" -C "$WORK" report logs mini.log 2>/dev/null
}
trap report EXIT
# A measurement that failed (or was cut) is retried in a later call, at most twice in all:
# failed KEY records one failure; given_up KEY says it has failed twice.
RETRY=0
failed() { echo "$1" >> "$WORK/failures.txt"; given_up "$1" || RETRY=1; }
given_up() { [ "$(grep -cxF "$1" "$WORK/failures.txt" 2>/dev/null)" -ge 2 ]; }

# train_task NAME RECIPE FROM STEPS [--set ...]: one training stage into WORK/NAME, resumed
# from its last checkpoint if an earlier call stopped it; fails (so the call stops) unless the
# stage has FINISHED.
train_task() {
  local name=$1 recipe=$2 from=$3 steps=$4
  shift 4
  [ -f "$WORK/$name/FINISHED" ] && return 0
  fits 60 || return 1
  local budget
  budget=$(cap 100000)
  stamp "$name: $recipe from $from, ${steps:-default} steps (at most $budget s)"
  local s=()
  [ -n "$steps" ] && s=(--set "train.steps=$steps")
  timeout -k 15 -s INT "$budget" $BIN train "$recipe" --set "model.path=$from" "${DATA[@]}" \
    --set "run.output_dir=$WORK/$name" "${s[@]}" "$@" --resume auto >> "$D/$name.log" 2>&1
  local rc=$?
  stamp "$name exit $rc ($(wc -l < "$WORK/$name/metrics.jsonl" 2>/dev/null || echo 0) steps logged)"
  [ -f "$WORK/$name/FINISHED" ] && return 0
  # 124: stopped by the budget (it checkpointed on SIGINT); 137: killed 15 s after that, so
  # it resumes from its previous checkpoint; 0 without FINISHED: stopped by a signal from
  # elsewhere. Anything else is an error that another call would only repeat.
  case "$rc" in 0|124|137) ;; *) WHY="$name failed: see logs/$name.log in mini-files.tar.gz"; tail -5 "$D/$name.log"; exit 1 ;; esac
  return 1
}

# --- tokenise, self-test, random start
if [ ! -f "$WORK/tokens/test/index.json" ]; then
  rm -rf "$WORK/corpus" "$WORK/tokens"
  mkdir -p "$WORK/corpus"
  xz -dc data/corpus/corpus.tar.xz | tar -x -C "$WORK/corpus" || { WHY="cannot unpack data/corpus/corpus.tar.xz (run scripts/fetch_corpus.sh and carry it)"; exit 1; }
  for split in train test; do
    start=$(date +%s.%N)
    $BIN data prepare --tokenizer data/tokenizer/tokenizer.json --input "$WORK/corpus/$split.jsonl" \
      --output "$WORK/tokens/$split" 2>&1 | tail -2 >> "$D/data.log"
    [ -f "$WORK/tokens/$split/index.json" ] || { WHY="tokenising $split failed: see logs/data.log"; exit 1; }
    stamp "tokenised $split in $(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }') s"
  done
fi
if [ "$EVAL_DEVICE" = cuda ] && [ "${SELFTEST:-0}" = 1 ] && [ ! -f "$WORK/selftest.done" ]; then
  timeout 150 $BIN gpu-selftest --device cuda > "$D/gpu-tests.log" 2>&1
  stamp "gpu-selftest exit $?: $(grep -c '^PASS' "$D/gpu-tests.log") PASS, $(grep -c '^FAIL' "$D/gpu-tests.log") FAIL"
  touch "$WORK/selftest.done"
fi
[ -d "$WORK/init" ] || $BIN init --config "$CONFIG" --output "$WORK/init" >> "$D/data.log" 2>&1
[ -d "$WORK/init" ] || { WHY="init failed: see logs/data.log"; exit 1; }

# --- the three stages and the matched baseline
train_task dense recipes/mini-dense.toml "$WORK/init" "${DENSE_STEPS:-}" --set checkpoint.every=50 || stop "dense pre-training continues in the next call"
if [ ! -d "$WORK/terminus" ]; then
  $BIN export --checkpoint "$(newest "$WORK/dense")" --output "$WORK/terminus" --fp8 --index-n-heads 8 --index-head-dim 64 >> "$D/data.log" 2>&1
  [ -d "$WORK/terminus" ] || { WHY="export failed: see logs/data.log"; exit 1; }
fi
STAGE=(--set "data.seq_len=$LONG" --set "dsa.index_topk=$((LONG / 64))" --set checkpoint.every=25)
train_task warmup recipes/mini-warmup.toml "$WORK/terminus" "" "${STAGE[@]}" || stop "the warm-up continues in the next call"
train_task sparse recipes/mini-sparse.toml "$(newest "$WORK/warmup")" "${SPARSE_STEPS:-120}" "${STAGE[@]}" || stop "the sparse stage continues in the next call"
# As many steps (one LONG-token sequence each, the same data order) as the sparse stage ran.
sparse_steps="$(newest "$WORK/sparse")"; sparse_steps="${sparse_steps##*step-}"
train_task baseline recipes/mini-dense-continued.toml "$WORK/terminus" "$sparse_steps" "${STAGE[@]}" || stop "the dense-continued baseline continues in the next call"

# --- held-out evaluation, most informative first; one row per (model, length, attention)
touch "$WORK/eval.jsonl"
for row in "dense-start:$WORK/terminus:dense" "baseline:$(newest "$WORK/baseline"):dense" "warmup-end:$(newest "$WORK/warmup"):sparse" \
           "sparse-end:$(newest "$WORK/sparse"):sparse" "sparse-end:$(newest "$WORK/sparse"):dense" "dense-start:$WORK/terminus:sparse"; do
  name="${row%%:*}"; rest="${row#*:}"; path="${rest%:*}"; attn="${rest##*:}"
  for L in ${EVAL_SHORT:-8192} "$LONG"; do
    key="\"model\": \"$name\", \"checkpoint\": \"$path\", \"seq_len\": $L, \"attention\": \"$attn\""
    grep -qF "$key" "$WORK/eval.jsonl" && continue
    given_up "eval $key" && continue
    fits 120 || stop "evaluation continues in the next call"
    windows="${EVAL_WINDOWS:-4}"; [ "$L" = "$LONG" ] && windows="${EVAL_WINDOWS_LONG:-2}"
    line=$(timeout 120 $BIN eval --model "$path" --tokens "$WORK/tokens/test" --seq-len "$L" --attention "$attn" --topk $((L / 64)) \
      --device "$EVAL_DEVICE" --dtype "$EVAL_DTYPE" --index-n-heads 8 --index-head-dim 64 --no-mtp --max-windows "$windows" 2>>"$D/eval-stderr.log" | tail -1)
    case "$line" in
      "{"*) echo "{$key, \"eval\": $line}" >> "$WORK/eval.jsonl" ;;
      *) failed "eval $key"; stamp "eval $name $L $attn failed or timed out (see logs/eval-stderr.log)" ;;
    esac
  done
done
stamp "eval: $(wc -l < "$WORK/eval.jsonl") rows"

# --- tokens/s of the three stages (one sequence per step, top-512 as given to transformers),
# side by side in one call; LONG first (the sparse / dense goal is set there), then longest first
touch "$WORK/speed.txt"
for L in $LONG $(echo $LENS | tr ' ' '\n' | grep -vx "$LONG" | sort -rn); do
  for stage in dense warmup sparse; do
    grep -q "^ours $stage $L: .*tokens/s" "$WORK/speed.txt" && continue
    given_up "speed $stage $L" && continue
    fits "${BENCH_TIMEOUT:-75}" || stop "tokens/s continue in the next call"
    line=$(timeout "${BENCH_TIMEOUT:-75}" $BIN bench step "recipes/mini-$stage.toml" --steps "${BENCH_STEPS:-2}" --set "model.path=$WORK/terminus" "${DATA[@]}" \
      --set data.seq_len=$L --set train.global_batch_seqs=1 --set train.micro_batch_seqs=1 2>>"$D/bench-stderr.log" | tail -1)
    case "$line" in
      *tokens/s*) echo "ours $stage $L: $line" | tee -a "$WORK/speed.txt" ;;
      *) failed "speed $stage $L"; stamp "ours $stage $L: failed or timed out (see logs/bench-stderr.log)" ;;
    esac
  done
done

# --- transformers' training step on the same config.json, same GPU, until it runs out of memory
if [ "$EVAL_DEVICE" = cuda ] && [ "${TRANSFORMERS:-1}" = 1 ]; then
  touch "$WORK/transformers.jsonl"
  for m in v3 v32; do
    [ -f "$WORK/transformers-$m.done" ] && continue
    given_up "transformers $m" && continue
    fits 150 || stop "transformers' timings continue in the next call"
    # One model's lines are kept only when its whole run (every length, or up to its OOM) ended.
    if timeout 150 python3 tools/reference/bench_transformers.py --config "$CONFIG" --model $m \
      --lens "$(echo $LENS | tr ' ' ,)" --index-topk 512 --index-heads 8 --index-dim 64 \
      > "$WORK/transformers-$m.jsonl" 2>>"$D/transformers-stderr.log"; then
      cat "$WORK/transformers-$m.jsonl" | tee -a "$WORK/transformers.jsonl"
      touch "$WORK/transformers-$m.done"
    else
      failed "transformers $m"; stamp "transformers $m failed or timed out (see logs/transformers-stderr.log)"
    fi
  done
fi
if [ "$RETRY" = 1 ]; then
  WHY="a measurement failed (failures.txt, logs/): the next call tries it again"
else
  WHY="every task has run"
fi
