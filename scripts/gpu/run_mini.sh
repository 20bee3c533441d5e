#!/usr/bin/env bash
# The miniature reproduction on one GPU (docs/results.md), run in steps that pick up where the
# previous one stopped; files stay in WORK (default /tmp/mini) on the GPU host between steps.
# Usage: scripts/gpu/run_mini.sh STEP [LOG_DIR]   (from the repository root)
#   step 1: unpack and tokenise the corpus (data/corpus/corpus.tar.xz from
#           scripts/fetch_corpus.sh, tokenizer from scripts/fetch_tokenizer.sh), write the
#           mini-Terminus's random start (`dsa-train init`), time the dense stage (one sequence
#           per step) at each of DENSE_BENCH_LENS (kept in WORK/speed.txt for step 3), then
#           pre-train densely (recipes/mini-dense.toml) for DENSE_STEPS steps or DENSE_TIMEOUT
#           seconds, checkpointing every 50 steps.
#   step 2: export the newest dense checkpoint as an HF FP8 checkpoint (the mini-Terminus),
#           then the warm-up (recipes/mini-warmup.toml) and the sparse stage
#           (recipes/mini-sparse.toml) at LONG tokens, each bounded by STAGE_TIMEOUT seconds;
#           then (BASELINE=1, the default) the matched baseline: the mini-Terminus continued
#           densely (recipes/mini-dense-continued.toml) for the sparse checkpoint's steps.
#   step 3: held-out evaluation (LM loss with dense and sparse attention, indexer recall and
#           its ceiling) of the dense start, the baseline, the warm-up's end and the sparse
#           stage's end at 8K and LONG; tokens/s of the warm-up and sparse stages per length
#           (the dense stage's come from step 1); transformers' training step side by side
#           (tools/reference/bench_transformers.py) if the budget allows; plots and
#           results-table.md in LOG_DIR.
# Environment: WORK, DENSE_STEPS (default the recipe's), DENSE_TIMEOUT (default 400), LONG
# (default 32768), STAGE_TIMEOUT (default 240), EVAL_WINDOWS (default 4; EVAL_WINDOWS_LONG,
# default 2, at LONG), LENS (tokens/s
# lengths, default "4096 8192 16384 32768 65536"; 64K is past what transformers' DeepseekV32
# fits on one H200: a length only we run), SETS (extra --set arguments for every run, e.g.
# "model.device=cpu model.dtype=f32" for a CPU rehearsal), BIN (default dist/gpu/dsa-train),
# CONFIG (the model's config.json, default recipes/mini/config.json), STEP_BUDGET (seconds per
# step, default 560), SELFTEST (1: step 1 runs gpu-selftest first on CUDA, about 110 s; default
# 0: run it in a call of its own, e.g. dist/gpu/run_suite.sh), SPARSE_STEPS (step 2's sparse
# stage, default 60),
# BENCH_TIMEOUT / BENCH_STEPS (step 3's per-length `bench step`, default 75 s / 2 steps),
# TRANSFORMERS (step 3 times transformers' step, default 1), DENSE_BENCH_LENS (step 1's timed
# dense lengths before pre-training, default LENS; empty skips them).
set -uo pipefail
STEP="${1:?usage: run_mini.sh STEP [LOG_DIR]}"
LOG="${2:-${OUT:-gpu-logs}}"
WORK="${WORK:-/tmp/mini}"
mkdir -p "$LOG" "$WORK"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
BIN="${BIN:-dist/gpu/dsa-train}"
if [ ! -x "$BIN" ] && [ -f "$BIN.xz" ]; then xz -dc "$BIN.xz" > "$BIN" && chmod +x "$BIN"; fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tee "$LOG/device.txt" || echo cpu > "$LOG/device.txt"
stamp() { echo "[mini $(date +%T)] $*" | tee -a "$LOG/mini.log"; }
EXTRA=()
for kv in ${SETS:-}; do EXTRA+=(--set "$kv"); done
DATA=(--set "data.path=$WORK/tokens/train" "${EXTRA[@]}")
LONG="${LONG:-32768}"
EVAL_DEVICE=cuda; EVAL_DTYPE=bf16
case " ${SETS:-} " in *" model.device=cpu "*) EVAL_DEVICE=cpu; EVAL_DTYPE=f32 ;; esac
# The checkpoint with the highest step (sorted on the number after the last "step-", so that
# a dash elsewhere in the path does not matter).
newest() { ls -d "$1"/step-* 2>/dev/null | awk -F'step-' '{ print $NF "\t" $0 }' | sort -n | tail -1 | cut -f2; }
# Each step stays inside the lent machine's 10-minute command limit: STEP_BUDGET seconds
# (default 560) from the step's start; optional work that would not end inside it is skipped.
T0=$(date +%s)
left() { echo $(( ${STEP_BUDGET:-560} - ($(date +%s) - T0) )); }
# cap N: N, or what is left of the budget less a 20 s margin (at least 1).
cap() { local l=$(( $(left) - 20 )); [ "$l" -lt "$1" ] && echo $(( l > 1 ? l : 1 )) || echo "$1"; }
fits() { [ "$(left)" -gt $(( $1 + 20 )) ]; }

case "$STEP" in
1)
  if [ ! -f "$WORK/tokens/train/index.json" ]; then
    mkdir -p "$WORK/corpus"
    xz -dc data/corpus/corpus.tar.xz | tar -x -C "$WORK/corpus"
    for split in train test; do
      start=$(date +%s.%N)
      $BIN data prepare --tokenizer data/tokenizer/tokenizer.json --input "$WORK/corpus/$split.jsonl" \
        --output "$WORK/tokens/$split" 2>&1 | tail -2 | tee -a "$LOG/mini.log"
      stamp "tokenised $split in $(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }') s"
    done
  fi
  if [ "$EVAL_DEVICE" = cuda ] && [ "${SELFTEST:-0}" = 1 ]; then
    timeout 150 $BIN gpu-selftest --device cuda > "$LOG/gpu-tests.log" 2>&1
    stamp "gpu-selftest exit $?: $(grep -c '^PASS' "$LOG/gpu-tests.log") PASS, $(grep -c '^FAIL' "$LOG/gpu-tests.log") FAIL"
  fi
  [ -d "$WORK/init" ] || $BIN init --config "${CONFIG:-recipes/mini/config.json}" --output "$WORK/init" 2>&1 | tee -a "$LOG/mini.log"
  # The dense stage's tokens/s per length (one sequence per step, as step 3 times the other
  # stages and as transformers is timed), before pre-training: it needs only the random start.
  : > "$WORK/speed.txt"
  for L in ${DENSE_BENCH_LENS-${LENS:-4096 8192 16384 32768 65536}}; do
    fits 45 || { echo "ours dense $L: skipped (step budget)" >> "$WORK/speed.txt"; continue; }
    line=$(timeout "$(cap "${BENCH_TIMEOUT:-75}")" $BIN bench step recipes/mini-dense.toml --steps "${BENCH_STEPS:-2}" --set "model.path=$WORK/init" "${DATA[@]}" \
      --set data.seq_len=$L --set train.global_batch_seqs=1 --set train.micro_batch_seqs=1 2>>"$LOG/bench-stderr.log" | tail -1)
    echo "ours dense $L: ${line:-FAILED or timed out}" | tee -a "$WORK/speed.txt" "$LOG/mini.log"
  done
  steps=()
  [ -n "${DENSE_STEPS:-}" ] && steps=(--set "train.steps=$DENSE_STEPS")
  dense_s=$(cap "${DENSE_TIMEOUT:-400}")
  stamp "dense pre-training (at most $dense_s s)"
  timeout -k 60 -s INT "$dense_s" $BIN train recipes/mini-dense.toml --set "model.path=$WORK/init" "${DATA[@]}" \
    --set "run.output_dir=$WORK/dense" --set checkpoint.every=50 "${steps[@]}" --resume auto > "$LOG/dense.log" 2>&1
  stamp "dense stage exit $? ($(wc -l < "$WORK/dense/metrics.jsonl" 2>/dev/null || echo 0) steps logged)"
  cp "$WORK/dense/metrics.jsonl" "$LOG/dense-metrics.jsonl" 2>/dev/null
  $BIN plot --metrics "$WORK/dense/metrics.jsonl" --output "$LOG/dense.png" 2>/dev/null
  ;;
2)
  dense="$(newest "$WORK/dense")"
  [ -n "$dense" ] || { stamp "no dense checkpoint in $WORK/dense: run step 1 first"; exit 1; }
  if [ ! -d "$WORK/terminus" ]; then
    $BIN export --checkpoint "$dense" --output "$WORK/terminus" --fp8 --index-n-heads 8 --index-head-dim 64 2>&1 | tail -1 | tee -a "$LOG/mini.log"
  fi
  for stage in warmup sparse; do
    from="$WORK/terminus"
    [ "$stage" = sparse ] && from="$(newest "$WORK/warmup")"
    budget=${STAGE_TIMEOUT:-240}
    [ "$stage" = sparse ] && budget=$(cap "$budget")
    stamp "$stage stage from $from at $LONG tokens (at most $budget s)"
    # The sparse stage runs SPARSE_STEPS steps (default 60), so that the dense baseline of as
    # many steps (about 2x the time per step at 32K) still fits in this step's budget.
    steps=()
    [ "$stage" = sparse ] && steps=(--set "train.steps=${SPARSE_STEPS:-60}")
    timeout -k 60 -s INT "$budget" $BIN train "recipes/mini-$stage.toml" --set "model.path=$from" "${DATA[@]}" \
      --set "data.seq_len=$LONG" --set "dsa.index_topk=$((LONG / 64))" --set "run.output_dir=$WORK/$stage" \
      --set checkpoint.every=25 "${steps[@]}" --resume auto > "$LOG/$stage.log" 2>&1
    stamp "$stage exit $? ($(wc -l < "$WORK/$stage/metrics.jsonl" 2>/dev/null || echo 0) steps logged)"
    cp "$WORK/$stage/metrics.jsonl" "$LOG/$stage-metrics.jsonl" 2>/dev/null
  done
  # The matched baseline: the same start continued densely for as many steps (and tokens) as
  # the sparse checkpoint that step 3 evaluates.
  sparse_end="$(newest "$WORK/sparse")"
  if [ "${BASELINE:-1}" = 1 ] && [ -n "$sparse_end" ] && fits 60; then
    n="${sparse_end##*step-}"
    budget=$(cap 400)
    stamp "dense-continued baseline: $n steps at $LONG tokens from $WORK/terminus (at most $budget s)"
    timeout -k 60 -s INT "$budget" $BIN train recipes/mini-dense-continued.toml --set "model.path=$WORK/terminus" "${DATA[@]}" \
      --set "data.seq_len=$LONG" --set "train.steps=$n" --set "run.output_dir=$WORK/dense-continued" \
      --set checkpoint.every=25 --resume auto > "$LOG/dense-continued.log" 2>&1
    stamp "dense-continued exit $? ($(wc -l < "$WORK/dense-continued/metrics.jsonl" 2>/dev/null || echo 0) steps logged)"
    cp "$WORK/dense-continued/metrics.jsonl" "$LOG/dense-continued-metrics.jsonl" 2>/dev/null
  fi
  ;;
3)
  # Held-out loss and recall, most informative first: the dense start (dense attention; the
  # untrained indexer's recall), the dense-continued baseline, the warm-up's end (recall after the warm-up; sparse attention
  # before any sparse training), the sparse stage's end (dense and sparse attention).
  : > "$LOG/eval.jsonl"
  for row in "dense-start:$WORK/terminus:dense" "dense-continued:$(newest "$WORK/dense-continued"):dense" "warmup-end:$(newest "$WORK/warmup"):sparse" \
             "sparse-end:$(newest "$WORK/sparse"):sparse" "sparse-end:$(newest "$WORK/sparse"):dense" "dense-start:$WORK/terminus:sparse"; do
    name="${row%%:*}"; rest="${row#*:}"; path="${rest%:*}"; attn="${rest##*:}"
    [ -d "$path" ] || { stamp "eval $name: no checkpoint"; continue; }
    for L in 8192 "$LONG"; do
      fits 60 || { stamp "eval $name $L $attn: skipped (step budget)"; continue; }
      windows="${EVAL_WINDOWS:-4}"; [ "$L" = "$LONG" ] && windows="${EVAL_WINDOWS_LONG:-2}"
      line=$(timeout "$(cap 120)" $BIN eval --model "$path" --tokens "$WORK/tokens/test" --seq-len "$L" --attention "$attn" --topk $((L / 64)) \
        --device "$EVAL_DEVICE" --dtype "$EVAL_DTYPE" --index-n-heads 8 --index-head-dim 64 --no-mtp --max-windows "$windows" 2>>"$LOG/eval-stderr.log" | tail -1)
      echo "{\"model\": \"$name\", \"checkpoint\": \"$path\", \"seq_len\": $L, \"attention\": \"$attn\", \"eval\": ${line:-null}}" >> "$LOG/eval.jsonl"
    done
  done
  stamp "eval: $(grep -vc ': null}' "$LOG/eval.jsonl") rows"
  # Tokens/s of the warm-up and sparse stages per length (ours; top-512 as in the recipes and
  # as given to transformers); the dense stage's were timed in step 1 (WORK/speed.txt).
  # Longest first: if the budget runs out, the short lengths (which transformers also runs and
  # the stages' own logs cover least) are the ones skipped.
  cp "$WORK/speed.txt" "$LOG/speed.txt" 2>/dev/null || : > "$LOG/speed.txt"
  for L in $(echo ${LENS:-4096 8192 16384 32768 65536} | tr ' ' '\n' | sort -rn); do
    for stage in warmup sparse; do
      fits 45 || { echo "ours $stage $L: skipped (step budget)" >> "$LOG/speed.txt"; continue; }
      from="$WORK/terminus"
      line=$(timeout "$(cap "${BENCH_TIMEOUT:-75}")" $BIN bench step "recipes/mini-$stage.toml" --steps "${BENCH_STEPS:-2}" --set "model.path=$from" "${DATA[@]}" \
        --set data.seq_len=$L --set train.global_batch_seqs=1 --set train.micro_batch_seqs=1 2>>"$LOG/bench-stderr.log" | tail -1)
      echo "ours $stage $L: ${line:-FAILED or timed out}" | tee -a "$LOG/speed.txt"
    done
  done
  # transformers' training step on the same config.json, same GPU, until it runs out of memory.
  if [ "$EVAL_DEVICE" = cuda ] && [ "${TRANSFORMERS:-1}" = 1 ]; then
    for m in v3 v32; do
      fits 60 || { stamp "transformers $m: skipped (step budget)"; continue; }
      timeout "$(cap 150)" python3 tools/reference/bench_transformers.py --config "${CONFIG:-recipes/mini/config.json}" --model $m \
        --lens "$(echo ${LENS:-4096 8192 16384 32768 65536} | tr ' ' ,)" --index-topk 512 --index-heads 8 --index-dim 64 \
        2>>"$LOG/transformers-stderr.log" | tee -a "$LOG/transformers.jsonl"
    done
  fi
  for f in "$WORK"/dense/metrics.jsonl "$WORK"/warmup/metrics.jsonl "$WORK"/sparse/metrics.jsonl; do
    [ -f "$f" ] && cat "$f"
  done > "$LOG/all-metrics.jsonl"
  $BIN plot --metrics "$LOG/all-metrics.jsonl" --output "$LOG/stages.png" 2>>"$LOG/mini.log"
  python3 tools/reference/report.py "$LOG" > /dev/null 2>>"$LOG/mini.log"
  stamp "step 3 done: eval.jsonl, speed.txt, transformers.jsonl, stages.png, results-table.md (recall.png, speed.png with matplotlib)"
  ;;
*)
  echo "run_mini.sh: STEP is 1, 2 or 3" >&2
  exit 2
  ;;
esac
