#!/usr/bin/env bash
# On the GPU host, from the repository root: our kernels (`bench kernels`) and TileLang 0.1.15's
# DeepSeek-V3.2 kernels (shared/tools/tilelang-kit) at the same shapes in one call, then a
# side-by-side table (issue 26). Ours first (the figures that matter most if time runs out),
# then TileLang's plain cases, then its pipelined forward under its own timeout (its README:
# the pipelined example hung once, so it goes last and alone).
# Usage: scripts/gpu/kernels_table.sh BIN BUNDLE [LOG_DIR]
#   BIN     dsa-train, unpacked or .xz (dist/gpu/dsa-train.xz is unpacked to /tmp)
#   BUNDLE  the kit's tl.tar.xz (build.sh); the kit's scripts are TL_KIT, else BUNDLE's folder/kit
#           (dist/tl/kit), else shared/tools/tilelang-kit, since ../shared does not travel
#   LOG_DIR default $OUT/kernels: device.txt, ours.log, tilelang.jsonl, tilelang.log, table.md
# Environment: LENS (default 8192,32768,131072), HEADS (sparse MLA, default 128,64,16),
# BUDGET_S (whole script, default 470: the stages' timeouts shrink to fit it, so it ends by
# about 8 minutes whatever hangs).
# Shapes: sparse MLA 576/512, top-k 2048, the last min(L, 16384) queries with L keys, the same
# causal draw on both sides (not the same numbers); indexer 64 x 128 over all causal keys (ours
# bf16, TileLang's fp8; TileLang's skips L 131072, whose f32 logits would take 64 GiB); top-k
# over L causal rows. Expected wall time about 5 minutes on an H100 (ours about 1.5, TileLang
# unpack + compile + cases about 2.5, pipelined about 1, at most 2).
set -uo pipefail
BIN="${1:?usage: kernels_table.sh BIN BUNDLE [LOG_DIR]}"
BUNDLE="$(realpath "${2:?usage: kernels_table.sh BIN BUNDLE [LOG_DIR]}")"
LOG="${3:-${OUT:-gpu-logs}/kernels}"
LENS="${LENS:-8192,32768,131072}"
HEADS="${HEADS:-128,64,16}"
BUDGET_S="${BUDGET_S:-470}"
mkdir -p "$LOG"
LOG="$(realpath "$LOG")"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"

case "$BIN" in
  *.xz) xz -dc "$BIN" > /tmp/dsa-kt && chmod +x /tmp/dsa-kt && BIN=/tmp/dsa-kt || { echo "cannot unpack $1" >&2; exit 2; } ;;
esac
KIT="${TL_KIT:-}"
for k in "$(dirname "$BUNDLE")/kit" shared/tools/tilelang-kit ../shared/tools/tilelang-kit; do
  [ -z "$KIT" ] && [ -f "$k/run.sh" ] && KIT="$k"
done
[ -f "$KIT/run.sh" ] || { echo "no TileLang kit (run.sh): set TL_KIT" >&2; exit 2; }
[ -f "$BUNDLE" ] || { echo "no TileLang bundle at $BUNDLE" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$LOG/device.txt"

# Seconds for a stage: its own cap, or what is left of the budget less a reserve for the later
# stages and the table, never under 30.
left() { local cap=$1 reserve=$2 r=$((BUDGET_S - SECONDS - $2)); [ "$r" -lt "$cap" ] && cap=$r; [ "$cap" -lt 30 ] && cap=30; echo "$cap"; }

# 1. Ours: the sparse MLA (fwd, bwd atomic and deterministic, head-mean probabilities) at each
# head count, then the indexer (scoring, top-k, both). A binary older than `--heads` times 128,
# 64 and 16 anyway. The bench prints each figure to stderr as it is measured ("[bench] ..."),
# so a timeout keeps what was done.
heads=(); "$BIN" bench kernels --help 2>/dev/null | grep -q -- --heads && heads=(--heads "$HEADS")
for fam in "sparse MLA (tensor cores)" "indexer top-k"; do
  echo "== ours: $fam, L $LENS (${SECONDS}s)" | tee -a "$LOG/ours.log"
  timeout -k 10 "$(left 240 250)" "$BIN" bench kernels --device cuda --lens "$LENS" --only "$fam" "${heads[@]}" \
    >> "$LOG/ours.log" 2>&1 || echo "ours: $fam exited with $?" | tee -a "$LOG/ours.log"
done

# 2. TileLang's plain cases at the same lengths (the kit's examples' own shapes left out).
# run.sh's own output goes to tilelang.jsonl and tilelang.log only.
echo "== TileLang: fwd, bwd H128/H64, indexer fp8, top-k (${SECONDS}s)"
t=$(left 270 100)
OUT="$LOG" TL_BUNDLE="$BUNDLE" timeout -k 10 "$t" bash "$KIT/run.sh" --lens "$LENS" \
  --only "fwd/L,bwd_h128/L,bwd_h64/L,indexer_h64_d128/L,topk/L" --budget-s $((t - 20)) \
  --case-timeout-s 90 > /dev/null 2>&1 || echo "TileLang plain cases exited with $?"
[ -f "$LOG/tilelang.log" ] || echo "no tilelang.log: run.sh stopped before Python (bundle unpack?)"

# 3. TileLang's pipelined forward, alone; a hang costs one case (its watchdog exits the run).
echo "== TileLang: fwd_pipelined (${SECONDS}s)"
t=$(left 120 15)
OUT="$LOG" TL_BUNDLE="$BUNDLE" timeout -k 10 "$t" bash "$KIT/run.sh" --lens "$LENS" \
  --only "fwd_pipelined/L" --budget-s $((t - 15)) --case-timeout-s 45 > /dev/null 2>&1 \
  || echo "TileLang pipelined exited with $?"

# 4. The table: milliseconds per call and TFLOP/s with the project's count (P valid pairs) on
# both sides, and TileLang's time over ours (> 1: ours is faster).
python3 - "$LOG" <<'EOF' | tee "$LOG/table.md"
import json, re, sys
log = sys.argv[1]
ours = {}  # (L, kernel, H) -> (ms, rate text)
failed = []  # our families that failed at a length (out of memory, say)
h = None
for line in open(f"{log}/ours.log", errors="replace"):
    m = re.match(r"\[bench\] L (\d+): (.*)", line.rstrip())
    if not m:
        continue
    L, s = int(m.group(1)), m.group(2)
    if (mh := re.search(r"sparse MLA \(H (\d+),", s)):
        h = int(mh.group(1))
        continue
    if ": failed: " in s:
        failed.append(f"L {L}: {s[:200]}")
        continue
    mt = re.search(r"([\d.]+) ms = ([\d.]+) (TFLOP/s|us/row)", s)
    if not mt or "same inputs" in s:
        continue
    v = (float(mt.group(1)), f"{mt.group(2)} {mt.group(3)}")
    s = s.strip()
    if s.startswith("fwd bf16"):
        ours[(L, "sparse MLA fwd", h)] = v
    elif s.startswith("bwd bf16") and "atomic dkv" in s:
        ours[(L, "sparse MLA bwd", h)] = v
    elif s.startswith("bwd bf16") and "deterministic" in s:
        ours[(L, "sparse MLA bwd, deterministic dkv", h)] = v
    elif s.startswith("indexer scores rows"):
        ours[(L, "indexer scoring, causal, 64 x 128", 64)] = v
    elif s.startswith("indexer top-k"):
        ours[(L, "top-k 2048, causal rows", None)] = v
tl = {}
names = {"sparse_mla_fwd": "sparse MLA fwd", "sparse_mla_bwd": "sparse MLA bwd",
         "sparse_mla_fwd_pipelined": "sparse MLA fwd (TileLang pipelined)",
         "sparse_mla_bwd_kernel_only": "sparse MLA bwd (TileLang kernel only)",
         "fp8_lighting_indexer": "indexer scoring, causal, 64 x 128", "topk_selector": "top-k 2048, causal rows"}
try:
    lines = open(f"{log}/tilelang.jsonl").readlines()
except OSError:
    lines = []
for line in lines:
    try:
        r = json.loads(line)
    except ValueError:
        continue
    if r.get("kernel") not in names or r.get("L") is None:
        continue
    key = (r["L"], names[r["kernel"]], None if r["kernel"] == "topk_selector" else r.get("H"))
    if r.get("ms") is not None:
        rate = f"{r['tflops_project']:.1f} TFLOP/s" if r.get("tflops_project") else f"{r['us_per_row']:.2f} us/row" if r.get("us_per_row") else ""
        tl[key] = (r["ms"], rate)
    else:
        tl[key] = (None, (r.get("error") or r.get("skipped") or "no figure")[:60])
print("| L | kernel | H | ours | TileLang | TileLang / ours (time) |")
print("| --- | --- | --- | --- | --- | --- |")
order = ["sparse MLA fwd", "sparse MLA fwd (TileLang pipelined)", "sparse MLA bwd", "sparse MLA bwd (TileLang kernel only)",
         "sparse MLA bwd, deterministic dkv", "indexer scoring, causal, 64 x 128", "top-k 2048, causal rows"]
keys = sorted(set(ours) | set(tl), key=lambda k: (k[0], order.index(k[1]), -(k[2] or 0)))
cell = lambda v: "-" if v is None else (f"{v[0]:.3f} ms, {v[1]}" if v[0] is not None else v[1])
for k in keys:
    o, t = ours.get(k), tl.get(k)
    ratio = f"{t[0] / o[0]:.2f}" if o and t and t[0] and o[0] else ""
    print(f"| {k[0]} | {k[1]} | {k[2] or ''} | {cell(o)} | {cell(t)} | {ratio} |")
for f in failed:
    print(f"\nours failed: {f}")
print("\nours: bf16 (the indexer too), sparse bwd with atomic dkv unless said; at 8 to 32 "
      "heads ours merges 64 / H neighbouring queries a block (opt-in in training until checked on a GPU); TileLang: "
      "its sparse bwd is its example's whole call (preprocess, zeroed f32 dkv, bwd, postprocess), its indexer fp8. "
      "TFLOP/s: the project's count.")
EOF
echo "device: $(head -1 "$LOG/device.txt"); ${SECONDS}s in all; logs in $LOG"
