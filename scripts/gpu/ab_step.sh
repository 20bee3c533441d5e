#!/usr/bin/env bash
# A change measured side by side: the same `bench step` runs with two binaries, interleaved
# (A, B, A, B ...), in one session on one GPU, and a table of tokens/s and their ratio B / A.
# Usage: scripts/gpu/ab_step.sh BIN_A BIN_B LOG_DIR CASE...   (from the repository root)
#   CASE: RECIPE:SEQ_LEN[:MICRO_SEQS], e.g. recipes/mini-dense.toml:8192:2
#   BIN_A / BIN_B may be .xz files (unpacked to /tmp). Models: the bench-1k recipes use
#   /tmp/bench-1k (made here with `tiny --preset bench-1k`), the mini recipes /tmp/mini/init
#   (made here with `init`); both read the bench-1k synthetic tokens. MODEL=DIR replaces the
#   bench-1k model (e.g. a `tiny --preset bench-1k-h128` one).
# Environment: STEPS (timed steps per run, default 3), STEP_TIMEOUT (seconds per run, default 150),
# ENV_A / ENV_B (space-separated VAR=VALUE set for A's / B's runs only: one binary under two
# settings, e.g. ENV_A="DSA_CUDA_DEFAULTS=1" with BIN_A = BIN_B); SET_A / SET_B (space-separated
# recipe overrides KEY=VALUE for A's / B's runs only, e.g. SET_A="kernels.plain_ops=[\"lm-loss\"]");
# SET (overrides for both), DATA (a token file instead of the bench-1k one, e.g. a preset's).
set -uo pipefail
A="${1:?BIN_A}"; B="${2:?BIN_B}"; LOG="${3:?LOG_DIR}"; shift 3
mkdir -p "$LOG"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
unpack() { case "$1" in *.xz) local out="/tmp/ab-$2"; xz -dc "$1" > "$out" && chmod +x "$out"; echo "$out" ;; *) echo "$1" ;; esac; }
A="$(unpack "$A" a)"; B="$(unpack "$B" b)"
[ -d /tmp/bench-1k/model ] || "$B" tiny --preset bench-1k --output /tmp/bench-1k 2>&1 | tail -1
[ -d /tmp/mini/init ] || "$B" init --config recipes/mini/config.json --output /tmp/mini/init 2>&1 | tail -1
run() { # ENV SETS BIN RECIPE LEN MICRO -> tokens/s or FAILED
  local envs="$1" sets=() kv; shift
  for kv in $1 ${SET:-}; do sets+=(--set "$kv"); done; shift
  local model="${MODEL:-/tmp/bench-1k/model}"; case "$2" in *mini-*) model=/tmp/mini/init ;; esac
  local line
  # shellcheck disable=SC2086
  line="$(env $envs timeout "${STEP_TIMEOUT:-150}" "$1" bench step "$2" --steps "${STEPS:-3}" --set "model.path=$model" \
    --set "data.path=${DATA:-/tmp/bench-1k/tokens.bin}" --set "data.seq_len=$3" --set "train.global_batch_seqs=$4" \
    --set "train.micro_batch_seqs=$4" "${sets[@]}" 2>>"$LOG/ab-stderr.log" | tail -1)"
  echo "$line" >> "$LOG/ab-lines.log"
  echo "$line" | grep -oE '[0-9.]+ tokens/s' | head -1 | cut -d' ' -f1 | grep . || echo FAILED
}
echo "| case | A tokens/s | B tokens/s | B / A |" | tee "$LOG/ab.md"
echo "| --- | --- | --- | --- |" | tee -a "$LOG/ab.md"
for c in "$@"; do
  IFS=: read -r recipe len micro <<< "$c"
  micro="${micro:-1}"
  a="$(run "${ENV_A:-}" "${SET_A:-}" "$A" "$recipe" "$len" "$micro")"; b="$(run "${ENV_B:-}" "${SET_B:-}" "$B" "$recipe" "$len" "$micro")"
  ratio="$(awk -v a="$a" -v b="$b" 'BEGIN { if (a + 0 > 0 && b + 0 > 0) printf "%.2f", b / a; else print "-" }')"
  echo "| $(basename "$recipe" .toml) at $len x $micro | $a | $b | $ratio |" | tee -a "$LOG/ab.md"
done
