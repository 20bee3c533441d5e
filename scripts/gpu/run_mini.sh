#!/usr/bin/env bash
# The miniature reproduction on one GPU (docs/results.md), run in steps that pick up where the
# previous one stopped; files stay in WORK (default /tmp/mini) on the GPU host between steps.
# Usage: dist/gpu/run_mini.sh STEP [LOG_DIR]
#   step 1: unpack and tokenise the corpus (data/corpus/corpus.tar.xz from
#           scripts/fetch_corpus.sh, tokenizer from scripts/fetch_tokenizer.sh), write the
#           mini-Terminus's random start (`dsa-train init`), time the dense stage at 4K and
#           8K, then pre-train densely (recipes/mini-dense.toml) for DENSE_STEPS steps or
#           DENSE_TIMEOUT seconds, checkpointing every 50 steps.
# Environment: WORK, DENSE_STEPS (default the recipe's), DENSE_TIMEOUT (default 400).
set -uo pipefail
STEP="${1:?usage: run_mini.sh STEP [LOG_DIR]}"
LOG="${2:-${OUT:-gpu-logs}}"
WORK="${WORK:-/tmp/mini}"
mkdir -p "$LOG" "$WORK"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
BIN=dist/gpu/dsa-train
if [ ! -x "$BIN" ] && [ -f "$BIN.xz" ]; then xz -dc "$BIN.xz" > "$BIN" && chmod +x "$BIN"; fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$LOG/device.txt"
stamp() { echo "[mini $(date +%T)] $*" | tee -a "$LOG/mini.log"; }
DATA=(--set "data.path=$WORK/tokens/train")

case "$STEP" in
1)
  if [ ! -f "$WORK/tokens/train/index.json" ]; then
    mkdir -p "$WORK/corpus"
    xz -dc data/corpus/corpus.tar.xz | tar -x -C "$WORK/corpus"
    for split in train test; do
      start=$(date +%s.%N)
      $BIN data prepare --tokenizer data/tokenizer/tokenizer.json --input "$WORK/corpus/$split.jsonl" \
        --output "$WORK/tokens/$split" 2>&1 | tail -2 | tee -a "$LOG/mini.log"
      stamp "tokenised $split in $(echo "$(date +%s.%N) - $start" | bc) s"
    done
  fi
  [ -d "$WORK/init" ] || $BIN init --config recipes/mini/config.json --output "$WORK/init" 2>&1 | tee -a "$LOG/mini.log"
  for L in 4096 8192; do
    line=$(timeout 120 $BIN bench step recipes/mini-dense.toml --steps 3 --set "model.path=$WORK/init" "${DATA[@]}" \
      --set data.seq_len=$L --set train.global_batch_seqs=2 --set train.micro_batch_seqs=2 2>>"$LOG/bench-stderr.log" | tail -1)
    stamp "bench dense, seq_len $L: ${line:-FAILED (bench-stderr.log)}"
  done
  steps=()
  [ -n "${DENSE_STEPS:-}" ] && steps=(--set "train.steps=$DENSE_STEPS")
  stamp "dense pre-training (at most ${DENSE_TIMEOUT:-400} s)"
  timeout -s INT "${DENSE_TIMEOUT:-400}" $BIN train recipes/mini-dense.toml --set "model.path=$WORK/init" "${DATA[@]}" \
    --set "run.output_dir=$WORK/dense" --set checkpoint.every=50 "${steps[@]}" --resume auto > "$LOG/dense.log" 2>&1
  stamp "dense stage exit $? ($(wc -l < "$WORK/dense/metrics.jsonl" 2>/dev/null || echo 0) steps logged)"
  cp "$WORK/dense/metrics.jsonl" "$LOG/dense-metrics.jsonl" 2>/dev/null
  $BIN plot --metrics "$WORK/dense/metrics.jsonl" --output "$LOG/dense.png" 2>/dev/null
  ;;
*)
  echo "run_mini.sh: step $STEP is not built yet (1 is)" >&2
  exit 2
  ;;
esac
