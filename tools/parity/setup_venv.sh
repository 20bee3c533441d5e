#!/usr/bin/env bash
# Create the Python environment that tools/parity/make_fixtures.py runs in.
#
#   tools/parity/setup_venv.sh [VENV_DIR]
#
# VENV_DIR defaults to ../dsa-venv-ref next to the repository (outside it, so that cargo
# and git never see it). Everything runs on the CPU; no GPU is needed.
#
# Environment:
#   PYTHON           interpreter to create the venv with (default python3; needs >= 3.10)
#   TORCH_INDEX_URL  optional extra index for torch, e.g. https://download.pytorch.org/whl/cpu
#                    to get the small CPU-only wheel instead of PyPI's CUDA build. The
#                    fixtures do not depend on which build is used (float64 on the CPU).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${1:-$repo/../dsa-venv-ref}"
python="${PYTHON:-python3}"

# Versions the committed fixtures were generated with.
TORCH=2.15.0
TRANSFORMERS=5.23.0
SAFETENSORS=0.8.0
NUMPY=2.4.6

"$python" -m venv "$venv"
pip="$venv/bin/pip"
"$pip" install --upgrade pip
if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
    "$pip" install "torch==$TORCH" --index-url "$TORCH_INDEX_URL"
else
    "$pip" install "torch==$TORCH"
fi
"$pip" install "transformers==$TRANSFORMERS" "safetensors==$SAFETENSORS" "numpy==$NUMPY"

"$venv/bin/python" - <<EOF
import numpy, safetensors, torch, transformers
assert transformers.__version__ == "$TRANSFORMERS", transformers.__version__
assert torch.__version__.split("+")[0] == "$TORCH", torch.__version__
print("ok: torch", torch.__version__, "transformers", transformers.__version__,
      "safetensors", safetensors.__version__, "numpy", numpy.__version__)
EOF
echo "venv ready: $venv"
echo "run: $venv/bin/python tools/parity/make_fixtures.py --out tests/fixtures"
