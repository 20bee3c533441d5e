#!/usr/bin/env bash
# On the GPU host, from the repository root: the GPU test suite, then the benchmarks, then a
# short table. Full logs go to LOG_DIR (default: $OUT on the lent machines, else gpu-logs/).
# Usage: dist/gpu/run_suite.sh [LOG_DIR] [SEQ_LENS]
# Environment: KERNEL_LENS (comma list for `bench kernels`, default 8192,32768; "none" skips),
# SKIP_TESTS=1 (benchmarks only), STAGES (default "warmup sparse"), STEP_TIMEOUT (seconds per
# `bench step`, default 300), PLAIN=0 (skip the plain-twin comparison).
set -uo pipefail
LOG="${1:-${OUT:-gpu-logs}}"
SEQ_LENS="${2:-2048 4096 8192}"
mkdir -p "$LOG"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export NCCL_NVLS_ENABLE=0
BIN=dist/gpu/dsa-train
if [ ! -x "$BIN" ] && [ -f "$BIN.xz" ]; then
  xz -dc "$BIN.xz" > "$BIN" 2>/dev/null || python3 -c 'import lzma,sys; sys.stdout.buffer.write(lzma.open(sys.argv[1]).read())' "$BIN.xz" > "$BIN"
  chmod +x "$BIN"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$LOG/device.txt"
DEVICE="$(head -1 "$LOG/device.txt" | cut -d, -f1)"

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  echo "== GPU tests" | tee "$LOG/summary.txt"
  $BIN gpu-selftest --device cuda 2>&1 | tee "$LOG/gpu-tests.log"
  grep -E "^(PASS|FAIL|gpu-selftest)" "$LOG/gpu-tests.log" >> "$LOG/summary.txt"
fi

echo "== benchmarks ($DEVICE)" | tee -a "$LOG/summary.txt"
if [ "${KERNEL_LENS:-8192,32768}" != none ]; then
  $BIN bench kernels --device cuda --lens "${KERNEL_LENS:-8192,32768}" 2>>"$LOG/bench-stderr.log" | tee -a "$LOG/summary.txt"
fi
[ -d /tmp/bench-1k/model ] || $BIN tiny --preset bench-1k --output /tmp/bench-1k 2>&1 | tail -1
for stage in ${STAGES:-warmup sparse}; do
  for L in $SEQ_LENS; do
    line="$(timeout "${STEP_TIMEOUT:-300}" $BIN bench step recipes/bench-1k-$stage.toml --steps "${STEPS:-3}" \
      --set model.path=/tmp/bench-1k/model --set data.path=/tmp/bench-1k/tokens.bin \
      --set data.seq_len=$L 2>>"$LOG/bench-stderr.log" | tail -1)"
    [ -n "$line" ] || line="$stage stage, seq_len $L: FAILED or timed out (bench-stderr.log: $(grep -i error "$LOG/bench-stderr.log" | tail -1 | tail -c 200))"
    echo "$line" | tee -a "$LOG/bench.log"
  done
done
if [ "${PLAIN:-1}" = 1 ]; then
  # The plain twins (candle ops only) side by side at the shortest length.
  L0="${SEQ_LENS%% *}"
  line="$(timeout "${STEP_TIMEOUT:-300}" $BIN bench step recipes/bench-1k-sparse.toml --steps 3 \
    --set model.path=/tmp/bench-1k/model --set data.path=/tmp/bench-1k/tokens.bin \
    --set data.seq_len=$L0 --set kernels.plain=true 2>>"$LOG/bench-stderr.log" | tail -1)"
  echo "plain twins (kernels.plain = true): ${line:-FAILED}" | tee -a "$LOG/bench.log"
fi
cat "$LOG/bench.log" >> "$LOG/summary.txt"
echo; echo "==== summary ($DEVICE)"; cat "$LOG/summary.txt"
