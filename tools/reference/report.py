#!/usr/bin/env python3
"""The miniature reproduction's table and plots from the files run_mini.sh writes.

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
    matched = {r["seq_len"]: r["eval"]["lm_loss"] for r in evals if r["model"] in ("baseline", "dense-continued") and r["attention"] == "dense"}
    step_of = lambda *names: next((r.get("checkpoint", "").rsplit("step-", 1)[-1] for r in evals if r["model"] in names and "step-" in r.get("checkpoint", "")), "?")
    for L in sorted(set(base) & set(sparse)):
        out.append(f"\nAt {L}: sparse-end with sparse attention vs the dense start: {100 * (sparse[L] / base[L] - 1):+.2f} % LM loss.")
    for L in sorted(set(matched) & set(sparse)):
        out.append(f"\nAt {L}: sparse-end (step {step_of('sparse-end')}) with sparse attention vs the dense-continued baseline (step {step_of('baseline', 'dense-continued')}): {100 * (sparse[L] / matched[L] - 1):+.2f} % LM loss.")
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
    # Recall per layer at the longest evaluated length (k = L/64 for every row there), one
    # curve per model (its first row at that length: dense and sparse attention give slightly
    # different hidden states, so later layers' recall differs a little), with the ceiling
    # (the mass of the model's own k largest attention probabilities) dashed in the same colour.
    # Models trained densely keep an untrained indexer: their curves sit near the uniform bound.
    longest = max((r["seq_len"] for r in evals), default=0)
    firsts = {}
    for r in evals:
        if r["seq_len"] == longest:
            firsts.setdefault(r["model"], r)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name, r in firsts.items():
        line, = ax.plot(r["eval"]["attention_mass_recall_per_layer"], marker="o", label=f"{name}: recall")
        if "attention_mass_recall_ceiling_per_layer" in r["eval"]:
            ax.plot(r["eval"]["attention_mass_recall_ceiling_per_layer"], ls="--", color=line.get_color(), label=f"{name}: ceiling")
    topk = next(iter(firsts.values()))["eval"]["topk"] if firsts else "?"
    ax.set_title(f"indexer attention-mass recall per layer at {longest} tokens, top-{topk}")
    ax.set_xlabel("layer"); ax.set_ylabel("attention mass in the top-k"); ax.grid(alpha=.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
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
