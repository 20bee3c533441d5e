#!/usr/bin/env bash
# One GPU call: gpu-selftest, then side-by-side steps of one binary under two settings
# (the in-place gradient sums on/off; document masking off/on). Logs under $OUT.
set -uo pipefail
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
BIN=/tmp/dsa; xz -dc dist/gpu/dsa-train.xz > "$BIN" && chmod +x "$BIN"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
( time "$BIN" gpu-selftest --device cuda ) > "$OUT/selftest.log" 2>&1
grep -E "^(FAIL|gpu-selftest)" "$OUT/selftest.log"; grep -iE "grad-sum|document|starts" "$OUT/selftest.log" | head -20
SET_A='kernels.plain_ops=["grad-sum"]' STEPS=3 bash scripts/gpu/ab_step.sh "$BIN" "$BIN" "$OUT/ab-gradsum" \
  recipes/bench-1k-sparse.toml:4096 recipes/bench-1k-sparse.toml:8192 recipes/bench-1k-warmup.toml:8192 2>&1 | tail -5
SET_B='data.document_mask=true data.eos_id=1' STEPS=3 bash scripts/gpu/ab_step.sh "$BIN" "$BIN" "$OUT/ab-docmask" \
  recipes/bench-1k-sparse.toml:8192 recipes/bench-1k-warmup.toml:8192 recipes/mini-dense.toml:8192:2 2>&1 | tail -5
