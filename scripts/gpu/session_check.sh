#!/usr/bin/env bash
# One GPU call of a session's checks, logs under $OUT. PART=a: gpu-selftest, then `check`'s
# memory estimate beside the measured peak (memory_check.sh). PART=b: side-by-side steps of one
# binary under two settings (the in-place gradient sums off/on; document masking off/on).
# PART=c: the gpu-selftest groups of the MoE routing and FP8 weights (and those they feed), then
# MoE routing on the host against the routing kernels (moe-route off/on) on the bench-1k model
# (and the slice-671b model with SLICE=1). PART=d: every gpu-selftest group, then the layers'
# backward recomputed (A) against from saved activations (B) on bench-1k sparse 4K and 8K, mini
# dense 8K x 2 and the slice-671b sparse 8K, transformers' DeepseekV32 on bench-1k in the same
# call, and where the saved bench-1k 4K step goes (profile_step.sh: regions, then ncu). PART=e
# (the opt-in kernels' first GPU call): the gpu-selftest groups of the sparse MLA kernels, the
# FP8 dispatch and selection scores and the training steps; the sparse MLA at 16 and 32 heads
# (`bench kernels`: merged queries beside one query a block) and the scoring and top-k kernels;
# the saved-activation step with merged queries (B) against one query a block (A) on bench-1k
# sparse 4K and 8K. PART=f: transformers' DeepseekV32 on bench-1k 4K and 8K, FP8 selection
# scores (B, the rounded rows through the bf16 kernel) against bf16 ones (A) at 8K, every
# gpu-selftest group, and where the saved bench-1k 4K step goes (regions, then ncu).
set -uo pipefail
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
BIN=/tmp/dsa; xz -dc dist/gpu/dsa-train.xz > "$BIN" && chmod +x "$BIN"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
if [ "${PART:-a}" = a ]; then
  ( time "$BIN" gpu-selftest --device cuda ) > "$OUT/selftest.log" 2>&1
  grep -E "^(FAIL|gpu-selftest)" "$OUT/selftest.log"; grep -iE "grad-sum|document|starts" "$OUT/selftest.log" | head -20
  cp "$BIN" /tmp/dsa-mem; bash scripts/gpu/memory_check.sh "$OUT"
elif [ "${PART:-a}" = c ]; then
  # The groups the routing and FP8 changes touch, then the step A/B (one GPU call).
  for g in ${SELFTEST_GROUPS:-moe fp8 rows layer-backward train-steps forward}; do
    "$BIN" gpu-selftest --device cuda --only "$g" >> "$OUT/selftest.log" 2>&1 || echo "gpu-selftest --only $g FAILED"
  done
  grep -E "^(FAIL|gpu-selftest)" "$OUT/selftest.log"; grep -iE "moe-route|routing kernels|fp8" "$OUT/selftest.log" | head -30
  SET_A='kernels.plain_ops=["moe-route"]' STEPS=2 bash scripts/gpu/ab_step.sh "$BIN" "$BIN" "$OUT/ab-route" \
    recipes/bench-1k-sparse.toml:8192 2>&1 | tail -2
  if [ -n "${SLICE:-}" ]; then
    slice=/tmp/preset-slice-671b
    [ -d "$slice/model" ] || "$BIN" tiny --preset slice-671b --output "$slice" >/dev/null 2>>"$OUT/stderr.log"
    MODEL="$slice/model" DATA="$slice/tokens.bin" SET="model.mtp=false" SET_A='kernels.plain_ops=["moe-route"]' STEPS=2 \
      bash scripts/gpu/ab_step.sh "$BIN" "$BIN" "$OUT/ab-route-slice" recipes/bench-1k-sparse.toml:8192 2>&1 | tail -1
  fi
elif [ "${PART:-a}" = d ]; then
  ( time timeout 300 "$BIN" gpu-selftest --device cuda ) > "$OUT/selftest.log" 2>&1
  grep -E "^(FAIL|gpu-selftest)|^real" "$OUT/selftest.log"
  SET_A="train.recompute=true" SET_B="train.recompute=false" STEPS=3 bash scripts/gpu/ab_step.sh "$BIN" "$BIN" \
    "$OUT/ab-saved" recipes/bench-1k-sparse.toml:4096 recipes/bench-1k-sparse.toml:8192 recipes/mini-dense.toml:8192:2 2>&1 | tail -3
  python3 tools/reference/bench_transformers.py --config /tmp/bench-1k/model/config.json --model v32 --lens 4096,8192 \
    --steps 3 2>>"$OUT/stderr.log" | tee "$OUT/transformers.txt"
  slice=/tmp/preset-slice-671b
  [ -d "$slice/model" ] || "$BIN" tiny --preset slice-671b --output "$slice" >/dev/null 2>>"$OUT/stderr.log"
  MODEL="$slice/model" DATA="$slice/tokens.bin" SET="model.mtp=false" SET_A="train.recompute=true" \
    SET_B="train.recompute=false" STEPS=2 bash scripts/gpu/ab_step.sh "$BIN" "$BIN" "$OUT/ab-saved-slice" \
    recipes/bench-1k-sparse.toml:8192 2>&1 | tail -1
  SET="train.recompute=false" NCU_TIMEOUT=150 bash scripts/gpu/profile_step.sh "$BIN" "$OUT/prof" saved4k \
    recipes/bench-1k-sparse.toml 4096 1 2>&1 | tail -40
elif [ "${PART:-a}" = e ]; then
  for g in ${SELFTEST_GROUPS:-sparse-mla-tc fp8-dispatch fp8-scores train-steps}; do
    timeout 240 "$BIN" gpu-selftest --device cuda --only "$g" >> "$OUT/selftest.log" 2>&1 || echo "gpu-selftest --only $g FAILED"
  done
  grep -E "^(FAIL|gpu-selftest)" "$OUT/selftest.log"; grep -E "merged queries|fp8-dispatch" "$OUT/selftest.log" | cut -c1-400
  timeout 150 "$BIN" bench kernels --lens 4096,8192 --heads 16,32 --only "sparse MLA" > "$OUT/kernels.log" 2>&1
  timeout 90 "$BIN" bench kernels --lens 8192,32768 --only "top-k" >> "$OUT/kernels.log" 2>&1
  grep -E "H 16|H 32|bwd|merged|top-k" "$OUT/kernels.log"
  SET="train.recompute=false" SET_B='kernels.opt_in=["sparse-merge-queries"]' STEPS=3 bash scripts/gpu/ab_step.sh "$BIN" "$BIN" \
    "$OUT/ab-merge" recipes/bench-1k-sparse.toml:4096 recipes/bench-1k-sparse.toml:8192 2>&1 | tail -3
elif [ "${PART:-a}" = f ]; then
  [ -d /tmp/bench-1k/model ] || "$BIN" tiny --preset bench-1k --output /tmp/bench-1k >/dev/null 2>>"$OUT/stderr.log"
  python3 tools/reference/bench_transformers.py --config /tmp/bench-1k/model/config.json --model v32 --lens 4096,8192 \
    --steps 3 2>>"$OUT/stderr.log" | tee "$OUT/transformers.txt"
  SET="train.recompute=false" SET_B="dsa.indexer_scores=fp8" STEPS=2 \
    bash scripts/gpu/ab_step.sh "$BIN" "$BIN" "$OUT/ab-fp8" recipes/bench-1k-sparse.toml:8192 2>&1 | tail -1
  ( time timeout 280 "$BIN" gpu-selftest --device cuda ) > "$OUT/selftest-all.log" 2>&1
  grep -E "^(FAIL|gpu-selftest)|^real" "$OUT/selftest-all.log"
  SET="train.recompute=false" NCU_TIMEOUT=120 bash scripts/gpu/profile_step.sh "$BIN" "$OUT/prof" saved4k \
    recipes/bench-1k-sparse.toml 4096 1 2>&1 | tail -40
else
  SET_A='kernels.plain_ops=["grad-sum"]' STEPS=3 bash scripts/gpu/ab_step.sh "$BIN" "$BIN" "$OUT/ab-gradsum" \
    recipes/bench-1k-sparse.toml:4096 recipes/bench-1k-sparse.toml:8192 recipes/bench-1k-warmup.toml:8192 2>&1 | tail -5
  SET_B='data.document_mask=true data.eos_id=1' STEPS=3 bash scripts/gpu/ab_step.sh "$BIN" "$BIN" "$OUT/ab-docmask" \
    recipes/bench-1k-sparse.toml:8192 recipes/bench-1k-warmup.toml:8192 recipes/mini-dense.toml:8192:2 2>&1 | tail -5
fi
