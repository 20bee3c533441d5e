#!/usr/bin/env bash
# Fetch the corpus of the miniature reproduction (docs/results.md): text that no one here
# wrote, from Debian bookworm's packages (fetched by apt-get download, never committed):
#   - linux-doc-6.1 and python3.11-doc: their HTML manuals as plain text, one document a page;
#   - linux-source-6.1: C sources (*.c, *.h) of kernel/, mm/, fs/, lib/, ipc/, block/,
#     net/core/, net/ipv4/ in that order, up to C_MB megabytes (default 120): long files with
#     long-range references (a function defined far above its use).
# The held-out split is chosen by document (about 2 %, by a hash of the document's path).
# Writes DEST/train.jsonl, DEST/test.jsonl and DEST/corpus.tar.xz, the compressed pair to
# carry to the GPU host (under 64 MiB) and tokenise there with `dsa-train data prepare`.
# Usage: scripts/fetch_corpus.sh [DEST]   (default data/corpus, git-ignored)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
dest="$(mkdir -p "${1:-data/corpus}" && cd "${1:-data/corpus}" && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
chmod 755 "$tmp" # apt's download user must be able to write here
cd "$tmp"
pkgs=(linux-doc-6.1 python3.11-doc linux-source-6.1)
# Stale package lists name versions the mirror no longer has: refresh them once and retry.
apt-get download "${pkgs[@]}" >/dev/null 2>&1 || { apt-get update -qq && apt-get download "${pkgs[@]}" >/dev/null; }
for deb in *.deb; do dpkg -x "$deb" root; done
tarball="$(ls root/usr/src/linux-source-6.1.tar.* | head -1)"
mkdir src
dirs=(kernel mm fs lib ipc block net/core net/ipv4)
tar -xf "$tarball" -C src "${dirs[@]/#/linux-source-6.1/}"
# Roots in a fixed order: the manuals, then the C directories in the order above.
roots=()
for d in root/usr/share/doc/linux-doc-6.1 root/usr/share/doc/python3.11/html; do
  [ -d "$d" ] && roots+=("$d")
done
for d in "${dirs[@]}"; do roots+=("src/linux-source-6.1/$d"); done
python3 "$repo/tools/corpus/to_jsonl.py" "$dest" "$(( ${C_MB:-120} * 1000000 ))" "${roots[@]}"
tar -C "$dest" -cf - train.jsonl test.jsonl | xz -T0 -6 > "$dest/corpus.tar.xz"
ls -la "$dest"
size=$(stat -c %s "$dest/corpus.tar.xz")
[ "$size" -lt $((64 * 1024 * 1024)) ] || echo "warning: corpus.tar.xz is $((size >> 20)) MiB, over the 64 MiB a lent GPU machine takes; lower C_MB" >&2
