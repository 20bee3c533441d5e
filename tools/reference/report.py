#!/usr/bin/env python3
"""The miniature reproduction's table and plots from run_mini.sh step 3's files.

Usage: report.py LOG_DIR   (reads eval.jsonl, speed.txt, transformers.jsonl, device.txt;
writes LOG_DIR/results-table.md, and with matplotlib recall.png and speed.png)
"""
import json
import os
import re
import sys


def read_jsonl(path):
    if not os.path.exists(path):
        return []
    return [json.loads(l) for l in open(path) if l.strip()]


def main():
    log = sys.argv[1]
    device = open(os.path.join(log, "device.txt")).readline().strip() if os.path.exists(os.path.join(log, "device.txt")) else "?"
    evals = [r for r in read_jsonl(os.path.join(log, "eval.jsonl")) if r.get("eval")]
    ours = {}
    speed = os.path.join(log, "speed.txt")
    if os.path.exists(speed):
        for line in open(speed):
            m = re.match(r"ours (\w+) (\d+): .*?= (\d+) tokens/s", line)
            if m:
                ours[(m.group(1), int(m.group(2)))] = int(m.group(3))
    theirs = read_jsonl(os.path.join(log, "transformers.jsonl"))
    out = [f"Measured on {device}.", "", "Held-out LM loss and indexer attention-mass recall (layer mean):", "",
           "| model | seq_len | attention | LM loss | recall | recall ceiling (best k keys) |", "|---|---|---|---|---|---|"]
    for r in evals:
        e = r["eval"]
        ceiling = e.get("attention_mass_recall_ceiling")
        ceiling = f"{ceiling:.3f}" if ceiling is not None else "-"
        out.append(f"| {r['model']} | {r['seq_len']} | {r['attention']} | {e['lm_loss']:.4f} | {e['attention_mass_recall']:.3f} | {ceiling} |")
    base = {r["seq_len"]: r["eval"]["lm_loss"] for r in evals if r["model"] == "dense-start" and r["attention"] == "dense"}
    sparse = {r["seq_len"]: r["eval"]["lm_loss"] for r in evals if r["model"] == "sparse-end" and r["attention"] == "sparse"}
    matched = {r["seq_len"]: r["eval"]["lm_loss"] for r in evals if r["model"] == "dense-continued" and r["attention"] == "dense"}
    step_of = lambda name: next((r.get("checkpoint", "").rsplit("step-", 1)[-1] for r in evals if r["model"] == name and "step-" in r.get("checkpoint", "")), "?")
    for L in sorted(set(base) & set(sparse)):
        out.append(f"\nAt {L}: sparse-end with sparse attention vs the dense start: {100 * (sparse[L] / base[L] - 1):+.2f} % LM loss.")
    for L in sorted(set(matched) & set(sparse)):
        out.append(f"\nAt {L}: sparse-end (step {step_of('sparse-end')}) with sparse attention vs the dense-continued baseline (step {step_of('dense-continued')}): {100 * (sparse[L] / matched[L] - 1):+.2f} % LM loss.")
    lens = sorted({L for (_, L) in ours} | {r["seq_len"] for r in theirs})
    out += ["", "Training tokens/s per length (batch 1):", "",
            "| seq_len | ours dense | ours warm-up | ours sparse | transformers V3 | transformers V32 |", "|---|---|---|---|---|---|"]
    def th(model, L):
        for r in theirs:
            if r["seq_len"] == L and r["model"].endswith(model):
                return f"{r['tokens_per_s']:.0f} ({r['peak_gib']:.1f} GiB)" if r["status"] == "ok" else r["status"]
        return "-"
    for L in lens:
        cells = [str(ours.get((s, L), "-")) for s in ("dense", "warmup", "sparse")]
        out.append(f"| {L} | " + " | ".join(cells) + f" | {th('V3', L)} | {th('V32', L)} |")
    open(os.path.join(log, "results-table.md"), "w").write("\n".join(out) + "\n")
    print("\n".join(out))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib missing: no recall.png / speed.png)", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    seen = set()
    for r in evals:
        # One curve per model and length: its first row's (the hidden states, and so the
        # recall of later layers, differ slightly between dense and sparse attention).
        if (r["model"], r["seq_len"]) not in seen:
            seen.add((r["model"], r["seq_len"]))
            line, = ax.plot(r["eval"]["attention_mass_recall_per_layer"], marker="o", label=f"{r['model']} @ {r['seq_len']}")
            if "attention_mass_recall_ceiling_per_layer" in r["eval"]:
                # The same model's ceiling (the mass of its attention's own top k), dashed.
                ax.plot(r["eval"]["attention_mass_recall_ceiling_per_layer"], ls="--", color=line.get_color(), label=f"ceiling, {r['model']} @ {r['seq_len']}")
    ax.set_xlabel("layer"); ax.set_ylabel("attention-mass recall of the top-k"); ax.legend(); ax.grid(alpha=.3)
    fig.tight_layout(); fig.savefig(os.path.join(log, "recall.png"), dpi=120)
    fig, ax = plt.subplots(figsize=(7, 4))
    for s in ("dense", "warmup", "sparse"):
        pts = sorted((L, v) for (st, L), v in ours.items() if st == s)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"dsa-train {s}")
    for model in ("V3", "V32"):
        pts = sorted((r["seq_len"], r["tokens_per_s"]) for r in theirs if r["model"].endswith(model) and r["status"] == "ok")
        if pts:
            ax.plot(*zip(*pts), marker="s", linestyle="--", label=f"transformers Deepseek{model}")
    ax.set_xscale("log", base=2); ax.set_xlabel("tokens per sequence"); ax.set_ylabel("training tokens/s"); ax.legend(); ax.grid(alpha=.3)
    fig.tight_layout(); fig.savefig(os.path.join(log, "speed.png"), dpi=120)


if __name__ == "__main__":
    main()
