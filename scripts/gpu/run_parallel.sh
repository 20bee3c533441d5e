#!/usr/bin/env bash
# On a multi-GPU host, from the repository root: the bench model trained by several layouts
# (one process per GPU, NCCL between them), both stages, the same global batch in every
# layout, so the losses must agree; then a table of tokens/s, scaling efficiency, time in
# gradient sums and in the expert exchange, peak memory per GPU, and the largest loss
# difference against the one-GPU run.
# Usage: dist/gpu/run_parallel.sh [LOG_DIR]
# Environment: LAYOUTS (world:ep or world:ep:cp, default "1:1 2:1 2:2"; cp > 1, context
# parallelism, runs the sparse stage only: STAGES=sparse), SEQ_LEN (default 8192),
# STEPS (default 6), GLOBAL (sequences per step, default the largest world), STAGES (default
# "warmup sparse"), RUN_TIMEOUT (seconds per run, default 400).
set -uo pipefail
LOG="${1:-${OUT:-gpu-logs}}"
mkdir -p "$LOG"
LAYOUTS="${LAYOUTS:-1:1 2:1 2:2}"
SEQ_LEN="${SEQ_LEN:-8192}"
STEPS="${STEPS:-6}"
GLOBAL="${GLOBAL:-$(for l in $LAYOUTS; do echo "${l%%:*}"; done | sort -n | tail -1)}"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
# NVLink multicast must stay off on these hosts.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# cudarc opens libnccl.so; the hosts ship libnccl.so.2 only.
NCCL_SO="$(ls /lib/x86_64-linux-gnu/libnccl.so.2 /usr/lib/x86_64-linux-gnu/libnccl.so.2 2>/dev/null | head -1)"
[ -n "$NCCL_SO" ] || NCCL_SO="$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib", "libnccl.so.2"))' 2>/dev/null)"
mkdir -p /tmp/nccl-lib && ln -sf "$NCCL_SO" /tmp/nccl-lib/libnccl.so
export LD_LIBRARY_PATH="/tmp/nccl-lib:$LD_LIBRARY_PATH"
BIN=dist/gpu/dsa-train
if [ ! -x "$BIN" ] && [ -f "$BIN.xz" ]; then
  xz -dc "$BIN.xz" > "$BIN" && chmod +x "$BIN"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$LOG/device.txt"
echo "libnccl: $NCCL_SO" | tee -a "$LOG/device.txt"
[ -d /tmp/bench-1k/model ] || $BIN tiny --preset bench-1k --output /tmp/bench-1k 2>&1 | tail -1

port=29500
for stage in ${STAGES:-warmup sparse}; do
  for layout in $LAYOUTS; do
    IFS=: read -r world ep cp <<< "$layout"; cp="${cp:-1}"
    name="$stage-w$world-ep$ep-cp$cp"
    out="/tmp/runs/$name"; rm -rf "$out"
    port=$((port + 7))
    nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 500 > "$LOG/$name.mem.csv" &
    smi=$!
    pids=()
    for ((r = 0; r < world; r++)); do
      RANK=$r WORLD_SIZE=$world LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
        timeout "${RUN_TIMEOUT:-400}" $BIN train "recipes/bench-1k-$stage.toml" \
        --set model.path=/tmp/bench-1k/model --set data.path=/tmp/bench-1k/tokens.bin \
        --set data.seq_len="$SEQ_LEN" --set train.steps="$STEPS" \
        --set train.global_batch_seqs="$GLOBAL" --set train.micro_batch_seqs=1 \
        --set parallel.ep="$ep" --set parallel.cp="$cp" --set run.output_dir="$out" --set checkpoint.every=0 \
        > "$LOG/$name.rank$r.log" 2>&1 &
      pids+=($!)
    done
    status=0
    for p in "${pids[@]}"; do wait "$p" || status=1; done
    kill "$smi" 2>/dev/null
    cp "$out/metrics.jsonl" "$LOG/$name.metrics.jsonl" 2>/dev/null
    echo "$name: exit $status"
  done
done

python3 - "$LOG" "$LAYOUTS" "${STAGES:-warmup sparse}" "$SEQ_LEN" "$GLOBAL" <<'EOF' | tee "$LOG/parallel-summary.md"
import json, sys, os, collections
log, layouts, stages, seq_len, glob = sys.argv[1], sys.argv[2].split(), sys.argv[3].split(), int(sys.argv[4]), int(sys.argv[5])
device = open(os.path.join(log, "device.txt")).readline().strip()
print(f"Bench model, seq_len {seq_len}, {glob} sequences per step, on {device}; steps after the first.\n")
print("| stage | GPUs | ep | cp | tokens/s | tokens/s per GPU | scaling eff. | step s | grad sums s | expert exchange s | peak MiB/GPU | max rel. loss diff vs 1 GPU |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
def parse(layout):
    parts = [int(x) for x in layout.split(":")]
    return parts[0], parts[1], (parts[2] if len(parts) > 2 else 1)
for stage in stages:
    base = None
    for layout in layouts:
        world, ep, cp = parse(layout)
        name = f"{stage}-w{world}-ep{ep}-cp{cp}"
        path = os.path.join(log, name + ".metrics.jsonl")
        if not os.path.exists(path):
            print(f"| {stage} | {world} | {ep} | {cp} | failed (see {name}.rank0.log) | | | | | | | |"); continue
        rows = [json.loads(l) for l in open(path) if l.strip()]
        tail = rows[1:] or rows
        tps = sum(r["tokens_per_s"] for r in tail) / len(tail)
        mean = lambda k: sum(r.get(k, 0.0) for r in tail) / len(tail)
        peak = collections.defaultdict(int)
        for line in open(os.path.join(log, name + ".mem.csv")):
            try:
                i, m = [int(x) for x in line.split(",")]
                peak[i] = max(peak[i], m)
            except ValueError:
                pass
        peak_mib = max(peak[i] for i in range(world)) if peak else 0
        key = "lm_loss" if stage == "sparse" else "indexer_kl"
        losses = [r[key] for r in rows]
        if world == 1 and base is None:
            base = (tps, losses)
        eff = tps / (world * base[0]) if base else float("nan")
        diff = max(abs(a - b) / max(abs(b), 1e-9) for a, b in zip(losses, base[1])) if base else float("nan")
        print(f"| {stage} | {world} | {ep} | {cp} | {tps:.0f} | {tps / world:.0f} | {eff:.2f} | {mean('elapsed_s'):.2f} | {mean('comm_s'):.2f} | {mean('exchange_s'):.2f} | {peak_mib} | {diff:.2e} |")
    print()
for stage in stages:
    for layout in layouts:
        world, ep, cp = parse(layout)
        path = os.path.join(log, f"{stage}-w{world}-ep{ep}-cp{cp}.metrics.jsonl")
        if os.path.exists(path):
            key = "lm_loss" if stage == "sparse" else "indexer_kl"
            print(f"{stage} {world} GPU ep {ep} cp {cp} {key}:", " ".join(f"{json.loads(l)[key]:.6f}" for l in open(path) if l.strip()))
EOF
