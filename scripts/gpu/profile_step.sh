#!/usr/bin/env bash
# Where a training step's time goes on the GPU host, for one recipe and length:
#  1. `bench step` with DSA_PROFILE=1 (per-region table, regions between device syncs);
#  2. with ncu (Nsight Compute, GPU time of every kernel, summed per kernel name), when ncu is
#     on the machine: the sum against the step's wall time says how much of the step the GPU
#     is busy, and which kernels fill it.
# Usage: scripts/gpu/profile_step.sh BIN LOG_DIR NAME RECIPE SEQ_LEN MICRO [MODEL]
# Environment: DATA (token file, default /tmp/bench-1k/tokens.bin), NCU_TIMEOUT (seconds, default 150; 0 skips ncu), STEPS (default 2), PROFILE=0 (ncu only),
# SET (space-separated recipe overrides KEY=VALUE, e.g. SET="train.recompute=false").
set -uo pipefail
BIN="${1:?BIN}"; LOG="${2:?LOG}"; NAME="${3:?NAME}"; RECIPE="${4:?RECIPE}"; L="${5:?SEQ_LEN}"; MICRO="${6:?MICRO}"
MODEL="${7:-/tmp/bench-1k/model}"
mkdir -p "$LOG"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
args=(bench step "$RECIPE" --set "model.path=$MODEL" --set "data.path=${DATA:-/tmp/bench-1k/tokens.bin}" --set "data.seq_len=$L"
  --set "train.global_batch_seqs=$MICRO" --set "train.micro_batch_seqs=$MICRO")
for kv in ${SET:-}; do args+=(--set "$kv"); done
if [ "${PROFILE:-1}" = 1 ]; then
  DSA_PROFILE=1 timeout 150 "$BIN" "${args[@]}" --steps "${STEPS:-2}" > "$LOG/profile-$NAME.txt" 2>&1
  echo "== $NAME: $(tail -1 "$LOG/profile-$NAME.txt")"
  sed -n '/\[profile\]/,$p' "$LOG/profile-$NAME.txt" | head -40
fi
NCU="$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)"
if [ -n "$NCU" ] && [ "${NCU_TIMEOUT:-150}" != 0 ]; then
  timeout "${NCU_TIMEOUT:-150}" "$NCU" --clock-control none --cache-control none --metrics gpu__time_duration.sum \
    --print-summary per-kernel --csv "$BIN" "${args[@]}" --steps 1 > "$LOG/ncu-$NAME.csv" 2> "$LOG/ncu-$NAME.err"
  echo "ncu exit $? ($(wc -l < "$LOG/ncu-$NAME.csv") lines)"
  python3 - "$LOG/ncu-$NAME.csv" <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 5]
if not rows: sys.exit(print("no ncu rows"))
# The header is the first row naming "Kernel Name" (the trainer's own output lines come first).
start = next((i for i, r in enumerate(rows) if "Kernel Name" in r), 0)
head = rows[start]; rows = rows[start + 1:]
try:
    ki, ni, mi, ai = head.index("Kernel Name"), head.index("Invocations"), head.index("Metric Name"), head.index("Average")
    ui = head.index("Metric Unit")
except ValueError:
    sys.exit(print("ncu header:", head))
scale = {"nsecond": 1e-9, "usecond": 1e-6, "msecond": 1e-3, "second": 1.0}
tot = collections.Counter(); calls = collections.Counter()
width = max(ki, ni, mi, ai, ui)
for r in rows:
    if len(r) <= width or r[mi] != "gpu__time_duration.sum": continue
    n = int(r[ni].replace(",", "")); avg = float(r[ai].replace(",", "")) * scale.get(r[ui], 1e-9)
    name = r[ki].split("(")[0][:70]
    tot[name] += n * avg; calls[name] += n
s = sum(tot.values())
print(f"GPU kernel time, whole run (warm-up + 1 timed step, plus loading): {s:.3f} s in {sum(calls.values())} launches")
for name, t in tot.most_common(30):
    print(f"{t:9.4f} s {100 * t / s:5.1f} % {calls[name]:7d} calls  {name}")
PY
fi
