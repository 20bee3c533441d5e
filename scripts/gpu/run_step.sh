#!/usr/bin/env bash
# On the GPU host, from the repository root: `bench step` of this build side by side with
# transformers (tools/reference/bench_transformers.py, the same config.json) and, when OLD_BIN
# names another build of dsa-train, with that build, in one call on one GPU.
# Usage: scripts/gpu/run_step.sh [LOG_DIR] [CASES]
#   CASES: space-separated STAGE:PRESET:SEQ_LEN (default "sparse:bench-1k:4096 sparse:bench-1k:8192")
#   with STAGE warmup, sparse or dense and PRESET a `dsa-train tiny --preset` name.
# Environment: OLD_BIN (an .xz or executable), TRANSFORMERS=0 (skip transformers), STEPS
# (timed steps, default 3), PROFILE=1 (DSA_PROFILE regions of this build, to LOG_DIR/profile-*).
set -uo pipefail
LOG="${1:-${OUT:-gpu-logs}}"
CASES="${2:-sparse:bench-1k:4096 sparse:bench-1k:8192}"
mkdir -p "$LOG"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
unpack() { # $1: .xz or executable -> path of an executable
  case "$1" in
    *.xz) local out="/tmp/$(basename "$1" .xz)-$(md5sum "$1" | cut -c1-8)"
          [ -x "$out" ] || { xz -dc "$1" > "$out" && chmod +x "$out"; }
          echo "$out" ;;
    *) echo "$1" ;;
  esac
}
BIN="$(unpack dist/gpu/dsa-train.xz)"
OLD="${OLD_BIN:+$(unpack "$OLD_BIN")}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$LOG/device.txt"
for case in $CASES; do
  IFS=: read -r stage preset len <<< "$case"
  dir="/tmp/preset-$preset"
  [ -d "$dir/model" ] || "$BIN" tiny --preset "$preset" --output "$dir" >/dev/null 2>>"$LOG/stderr.log"
  sets=(--set "model.path=$dir/model" --set "data.path=$dir/tokens.bin" --set "data.seq_len=$len" --set "train.stage=$stage")
  recipe="recipes/bench-1k-$([ "$stage" = warmup ] && echo warmup || echo sparse).toml"
  env ${PROFILE:+DSA_PROFILE=1} "$BIN" bench step "$recipe" --steps "${STEPS:-3}" "${sets[@]}" \
    2>"$LOG/profile-$stage-$preset-$len.log" | sed "s/^/ours ($preset): /" | tee -a "$LOG/step.log"
  if [ -n "$OLD" ]; then
    "$OLD" bench step "$recipe" --steps "${STEPS:-3}" "${sets[@]}" 2>>"$LOG/stderr.log" | sed "s/^/old build ($preset): /" | tee -a "$LOG/step.log"
  fi
  if [ "${TRANSFORMERS:-1}" = 1 ]; then
    model=$([ "$stage" = dense ] && echo v3 || echo v32)
    python3 tools/reference/bench_transformers.py --config "$dir/model/config.json" --model "$model" --lens "$len" --steps "${STEPS:-3}" \
      2>>"$LOG/stderr.log" | sed "s/^/transformers $model ($preset, $stage): /" | tee -a "$LOG/step.log"
  fi
done
