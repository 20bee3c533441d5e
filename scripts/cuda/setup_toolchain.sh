#!/usr/bin/env bash
# Set up a CUDA 13.0 build toolchain on a machine without one (a login node, a CPU dev box),
# from NVIDIA's Python wheels and Debian's libcuda1, outside the repository.
# Usage: scripts/cuda/setup_toolchain.sh [DIR]   (default: ../dsa-cuda-toolchain)
# Then:  source DIR/env.sh && cargo build --release --features cuda
# Users with a CUDA toolkit installed skip this and set CUDA_ROOT themselves.
set -euo pipefail
DIR="$(realpath -m "${1:-$(dirname "$0")/../../../dsa-cuda-toolchain}")"
mkdir -p "$DIR"
if [ ! -x "$DIR/venv/bin/python" ]; then
  python3 -m venv "$DIR/venv"
fi
# nvcc must stay at 13.0: PTX from a newer nvcc is refused by a 13.0 driver.
"$DIR/venv/bin/pip" install -q \
  nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88 \
  'nvidia-cuda-cccl==13.0.*' nvidia-nvvm==13.0.88 'nvidia-cublas==13.0.*' 'nvidia-curand==10.4.0.*' \
  'nvidia-cuda-nvrtc==13.0.*' nvidia-nccl-cu13==2.27.7
SITE="$("$DIR/venv/bin/python" -c 'import site; print(site.getsitepackages()[0])')"
CUDA="$SITE/nvidia/cu13"
# The wheels ship versioned sonames only; the linker wants unversioned names.
mkdir -p "$DIR/lib"
for lib in "$CUDA"/lib/lib*.so.* "$SITE"/nvidia/nccl/lib/lib*.so.*; do
  base="$(basename "$lib")"; plain="${base%%.so.*}.so"
  ln -sf "$lib" "$DIR/lib/$plain"
done
# libcuda (the driver API) is in no wheel: take Debian's libcuda1 (non-free) for linking only;
# at run time the GPU host's own driver is used.
if [ ! -e "$DIR/lib/libcuda.so" ]; then
  tmp="$(mktemp -d)"
  codename="$(. /etc/os-release && echo "$VERSION_CODENAME")"
  mkdir -p "$tmp/lists" "$tmp/etc/sources.list.d"
  echo "deb http://deb.debian.org/debian $codename main non-free non-free-firmware" > "$tmp/etc/sources.list"
  opts=(-o Dir::State::Lists="$tmp/lists" -o Dir::Etc::SourceList="$tmp/etc/sources.list" -o Dir::Etc::SourceParts="$tmp/etc/sources.list.d")
  apt-get "${opts[@]}" update -qq
  (cd "$tmp" && apt-get "${opts[@]}" download -qq libcuda1)
  dpkg -x "$tmp"/libcuda1_*.deb "$tmp/x"
  found="$(find "$tmp/x" -name 'libcuda.so.*' -type f | head -1)"
  cp "$found" "$DIR/lib/"
  ln -sf "$DIR/lib/$(basename "$found")" "$DIR/lib/libcuda.so"
  ln -sf "$DIR/lib/$(basename "$found")" "$DIR/lib/libcuda.so.1"
  rm -rf "$tmp"
fi
cat > "$DIR/env.sh" <<ENV
export CUDA_ROOT="$CUDA" CUDA_HOME="$CUDA" CUDA_PATH="$CUDA"
export PATH="$CUDA/bin:\$PATH"
export CUDA_COMPUTE_CAP=90
export LIBRARY_PATH="$DIR/lib:\${LIBRARY_PATH:-}"
export RUSTFLAGS="-L $DIR/lib \${RUSTFLAGS:-}"
export NVCC_APPEND_FLAGS="-I$CUDA/include"
ENV
echo "toolchain ready: source $DIR/env.sh"
"$CUDA/bin/nvcc" --version | tail -2
