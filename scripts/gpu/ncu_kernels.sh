#!/usr/bin/env bash
# What bounds the sparse MLA kernels: Nsight Compute's raw metrics of `dsa-train bench kernels`
# (tensor-pipe and issue activity, occupancy, L2/DRAM throughput, f32 reductions to L2, and the
# largest warp-stall reasons per issued instruction), one line per kernel and grid.
# Usage: scripts/gpu/ncu_kernels.sh BIN(.xz) LOG_DIR [HEADS] [KERNEL_REGEX] [SKIP] [COUNT]
#   defaults: HEADS "128 16", KERNEL_REGEX 'sparse_mla', SKIP 0, COUNT 12; e.g. 'bwd|det_' for
#   the backward kernels, 'det_fill|det_reduce' for the deterministic summation.
set -uo pipefail
BIN="${1:?BIN}"; LOG="${2:?LOG_DIR}"; HEADS="${3:-128 16}"; RE="${4:-sparse_mla}"
SKIP="${5:-0}"; COUNT="${6:-12}"
mkdir -p "$LOG"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
case "$BIN" in *.xz) xz -dc "$BIN" > /tmp/dsa-ncu && chmod +x /tmp/dsa-ncu; BIN=/tmp/dsa-ncu ;; esac
NCU="$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)"
[ -n "$NCU" ] || { echo "no ncu on this machine"; exit 1; }
M=sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,sm__warps_active.avg.pct_of_peak_sustained_active,smsp__issue_active.avg.pct_of_peak_sustained_active
M=$M,dram__throughput.avg.pct_of_peak_sustained_elapsed,lts__throughput.avg.pct_of_peak_sustained_elapsed,lts__t_sectors_op_red.sum,gpu__time_duration.sum
for r in long_scoreboard barrier lg_throttle mio_throttle wait math_pipe_throttle short_scoreboard membar dispatch_stall drain; do
  M=$M,smsp__average_warps_issue_stalled_${r}_per_issue_active.ratio
done
for H in $HEADS; do
  "$NCU" --metrics "$M" --kernel-name "regex:$RE" --launch-skip "$SKIP" --launch-count "$COUNT" --csv --page raw \
    "$BIN" bench kernels --lens 8192 --only "sparse MLA" --heads "$H" > "$LOG/ncu-$H.csv" 2> "$LOG/ncu-$H.err"
  echo "== heads $H (ncu exit $?)"
  python3 - "$LOG/ncu-$H.csv" <<'PY'
import csv, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
if len(rows) < 3: sys.exit(print("no kernels profiled"))
head, seen = rows[0], set()
for r in rows[2:]:
    d = dict(zip(head, r))
    key = (d["Kernel Name"][:40], d["Grid Size"])
    if key in seen: continue
    seen.add(key)
    stalls = {m.split("stalled_")[1].split("_per")[0]: float(d[m].replace(",", "")) for m in head if "stalled" in m}
    top = sorted(stalls.items(), key=lambda x: -x[1])[:4]
    print(key, "ns", d["gpu__time_duration.sum"],
          "tensor%", d["sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active"],
          "issue%", d["smsp__issue_active.avg.pct_of_peak_sustained_active"],
          "warps%", d["sm__warps_active.avg.pct_of_peak_sustained_active"],
          "L2%", d["lts__throughput.avg.pct_of_peak_sustained_elapsed"],
          "dram%", d["dram__throughput.avg.pct_of_peak_sustained_elapsed"],
          "red sectors", d["lts__t_sectors_op_red.sum"], "stalls", top)
PY
done
