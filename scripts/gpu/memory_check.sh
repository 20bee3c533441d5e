#!/usr/bin/env bash
# On the GPU host, from the repository root: `dsa-train check`'s memory estimate beside the
# device memory peak that `bench step` measures, for the slice-671b model (the 671B widths) in
# several stages and lengths. A table to LOG_DIR/memory.md.
# Usage: scripts/gpu/memory_check.sh [LOG_DIR] [CASES]
#   CASES: space-separated STAGE:SEQ_LEN:BLOCK_ROWS (default below).
set -uo pipefail
LOG="${1:-${OUT:-gpu-logs}}"
CASES="${2:-dense:8192:0 warmup:16384:0 warmup:16384:2048 sparse:8192:0 sparse:32768:4096}"
mkdir -p "$LOG"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
BIN=/tmp/dsa-mem; [ -x "$BIN" ] || { xz -dc dist/gpu/dsa-train.xz > "$BIN" && chmod +x "$BIN"; }
DEVICE="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
dir=/tmp/preset-slice-671b
[ -d "$dir/model" ] || "$BIN" tiny --preset slice-671b --output "$dir" >/dev/null 2>>"$LOG/stderr.log"
echo "| stage | seq_len | block_rows | check's estimate (GiB) | measured peak (GiB) | estimate / peak |" > "$LOG/memory.md"
echo "| --- | --- | --- | --- | --- | --- |" >> "$LOG/memory.md"
for c in $CASES; do
  IFS=: read -r stage len block <<< "$c"
  recipe="recipes/bench-1k-$([ "$stage" = warmup ] && echo warmup || echo sparse).toml"
  sets=(--set "model.path=$dir/model" --set "data.path=$dir/tokens.bin" --set "data.seq_len=$len"
        --set "train.stage=$stage" --set "train.block_rows=$block" --set model.mtp=false)
  est="$("$BIN" check "$recipe" "${sets[@]}" 2>&1 | grep -oE 'memory per device \(estimate\): [0-9.]+' | grep -oE '[0-9.]+$')"
  line="$(timeout 240 "$BIN" bench step "$recipe" --steps 2 "${sets[@]}" 2>>"$LOG/stderr.log" | tail -1)"
  echo "$line" >> "$LOG/steps.log"
  peak="$(echo "$line" | grep -oE 'device memory peak [0-9.]+' | grep -oE '[0-9.]+$')"
  ratio="$(awk -v a="$est" -v b="$peak" 'BEGIN { if (a + 0 > 0 && b + 0 > 0) printf "%.2f", a / b; else print "-" }')"
  echo "| $stage | $len | $block | ${est:--} | ${peak:-failed} | $ratio |" | tee -a "$LOG/memory.md"
done
echo "($DEVICE)" | tee -a "$LOG/memory.md"
