#!/usr/bin/env bash
# Build the CUDA binary and package what the GPU host runs into dist/gpu/ (git-ignored).
# Usage: scripts/cuda/build.sh [TOOLCHAIN_DIR]   (see scripts/cuda/setup_toolchain.sh)
# With a system CUDA toolkit, set CUDA_ROOT and CUDA_COMPUTE_CAP=90 and skip the toolchain.
set -euo pipefail
cd "$(dirname "$0")/../.."
TOOLCHAIN="${1:-../dsa-cuda-toolchain}"
if [ -z "${CUDA_ROOT:-}" ]; then
  # shellcheck disable=SC1091
  source "$TOOLCHAIN/env.sh"
fi
TARGET_DIR="${CARGO_TARGET_DIR:-target-cuda}"
# nccl: NCCL between GPU ranks (libnccl.so is opened at run time, only by multi-GPU jobs).
cargo build --release --features nccl --target-dir "$TARGET_DIR"
mkdir -p dist/gpu
cp "$TARGET_DIR/release/dsa-train" dist/gpu/dsa-train
strip dist/gpu/dsa-train
# The lent GPU machines take at most 64 MiB of carried files: ship the binary xz-compressed
# (about 8 MB); run_suite.sh unpacks it.
xz -T2 -6 -f dist/gpu/dsa-train
cp scripts/gpu/run_suite.sh scripts/gpu/run_parallel.sh dist/gpu/
ls -la dist/gpu
