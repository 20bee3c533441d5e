#!/usr/bin/env bash
# Launch sizes of the kernels whose names match a regex, over one `bench step` (warm-up + 1
# timed step) under Nsight Compute: how many launches of each grid size and their GPU time.
# It says which tensors feed the elementwise kernels that `profile_step.sh` finds on top.
# Usage: scripts/gpu/kernel_sizes.sh BIN LOG_DIR REGEX RECIPE SEQ_LEN [MODEL]
set -uo pipefail
BIN="${1:?BIN}"; LOG="${2:?LOG}"; RE="${3:?REGEX}"; RECIPE="${4:?RECIPE}"; L="${5:?SEQ_LEN}"
MODEL="${6:-/tmp/bench-1k/model}"
mkdir -p "$LOG"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
NCU="$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)"
[ -n "$NCU" ] || { echo "no ncu on this machine"; exit 1; }
timeout "${NCU_TIMEOUT:-240}" "$NCU" --clock-control none --cache-control none --kernel-name "regex:$RE" \
  --metrics gpu__time_duration.sum,launch__grid_size,launch__block_size --csv \
  "$BIN" bench step "$RECIPE" --set "model.path=$MODEL" --set data.path=/tmp/bench-1k/tokens.bin --set "data.seq_len=$L" \
  --set train.global_batch_seqs=1 --set train.micro_batch_seqs=1 --steps 1 > "$LOG/sizes.csv" 2> "$LOG/sizes.err"
echo "ncu exit $?"
python3 - "$LOG/sizes.csv" <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 5]
start = next((i for i, r in enumerate(rows) if "Kernel Name" in r), None)
if start is None: sys.exit(print("no ncu rows"))
head = rows[start]; rows = rows[start + 1:]
ki, ii, mi, vi, ui = (head.index(c) for c in ("Kernel Name", "ID", "Metric Name", "Metric Value", "Metric Unit"))
launch = collections.defaultdict(dict)
for r in rows:
    launch[(r[ii], r[ki].split("(")[0])][r[mi]] = (r[vi].replace(",", ""), r[ui])
scale = {"nsecond": 1e-9, "usecond": 1e-6, "msecond": 1e-3, "second": 1.0}
agg = collections.defaultdict(lambda: [0, 0.0])
for (i, name), m in launch.items():
    g = int(float(m["launch__grid_size"][0])); b = int(float(m["launch__block_size"][0]))
    t = float(m["gpu__time_duration.sum"][0]) * scale.get(m["gpu__time_duration.sum"][1], 1e-9)
    a = agg[(name, g * b)]; a[0] += 1; a[1] += t
total = sum(v[1] for v in agg.values())
print(f"{total:.4f} s in {sum(v[0] for v in agg.values())} launches matching {sys.argv[1]}")
for (name, threads), (n, t) in sorted(agg.items(), key=lambda kv: -kv[1][1])[:25]:
    print(f"{t*1e3:9.2f} ms {n:6d} launches  {threads:>11d} threads  {name}")
PY
