#!/usr/bin/env python3
"""Check a `dsa-train export` directory against transformers' DeepseekV32ForCausalLM.

    check_export.py EXPORT_DIR [--bin target/release/dsa-train] [--seq-len 64] [--windows 3]

Writes random token windows, runs `dsa-train eval --attention dense` on the export (our
loader and model, f32), and computes the same mean next-token loss with transformers:

- "state dict": the export's tensors read with safetensors, FP8 weights dequantised here
  (W8 * scale_inv over 128x128 blocks, as make_fixtures.py does), per-expert weights stacked
  into transformers' fused layout, loaded into DeepseekV32ForCausalLM in float64. Works for
  FP8 and bf16 exports: transformers' own FP8 path needs a GPU or the `accelerate` package to
  dequantise on the CPU, which the reference venv does not have.
- "from_pretrained": `DeepseekV32ForCausalLM.from_pretrained(EXPORT_DIR, dtype=float64)`,
  transformers' own loading of our files (config.json, index, shards, expert fusion). Tried
  for every export; for an FP8 export on a CPU-only venv it is reported as skipped.

Both run transformers unpatched (eager attention; its RMSNorm, RoPE, softmax and router
compute in float32 internally), with index_topk = seq_len so the indexer selects every key
and attention is dense, which is what `eval --attention dense` computes. Each lm_loss must
match ours to --rtol (default 1e-4, relative). With --sparse-topk K the script also
compares the sparse stage (`eval --attention sparse --topk K`) with the state-dict model at
index_topk = K, twice: under make_fixtures.py's float64 patches (float64 indexer scores,
lower index wins ties, as DeepSeek's selection rule and ours), checked to --rtol; and
unpatched, printed for information only: transformers computes indexer scores in float32
and breaks exact ties (common: ReLU makes many scores equal) in torch.topk's unspecified
order, so the selected keys, and the loss, may differ.

Exit status 0 when every checked lm_loss matches, 1 otherwise.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

import transformers
from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_fixtures as mf  # noqa: E402  (the fixtures' dequantiser and state-dict mapping)

F64 = torch.float64


def rust_eval(binary: str, export_dir: str, tokens: str, seq_len: int, windows: int, topk: int | None) -> dict:
    cmd = [binary, "eval", "--model", export_dir, "--tokens", tokens, "--seq-len", str(seq_len),
           "--max-windows", str(windows), "--attention", "dense" if topk is None else "sparse"]
    if topk is not None:
        cmd += ["--topk", str(topk)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


@torch.no_grad()
def lm_loss(model, windows: torch.Tensor) -> float:
    """Mean next-token cross-entropy over every predicted position of every window (batch 1
    per forward, positions from 0, as `dsa-train eval` does), summed in float64."""
    total, count = 0.0, 0
    for w in range(windows.shape[0]):
        x = windows[w : w + 1]
        logits = model(input_ids=x, use_cache=False).logits.to(F64)
        logp = torch.log_softmax(logits[0, :-1], dim=-1)
        total += float(-logp.gather(-1, x[0, 1:, None]).sum())
        count += x.shape[1] - 1
    return total / count


def state_dict_model(export_dir: str, config: dict, index_topk: int):
    """DeepseekV32ForCausalLM in float64 with weights read and dequantised here."""
    ckpt = mf.load_dequantized(export_dir)
    layout = {k: config[k] for k in ("num_hidden_layers", "first_k_dense_replace", "n_routed_experts")}
    sd = mf.hf_state_dict(ckpt, layout, with_indexer=True)
    return mf.make_model(DeepseekV32Config, DeepseekV32ForCausalLM, dict(copy.deepcopy(config), index_topk=index_topk), sd)


def pretrained_model(export_dir: str, config: dict, index_topk: int):
    """transformers' own loading of the export, checked to use every tensor: nothing missing
    or mis-shaped, and only the MTP layer (which transformers does not build) left over."""
    model, info = DeepseekV32ForCausalLM.from_pretrained(
        export_dir, dtype=F64, index_topk=index_topk, attn_implementation="eager", experts_implementation="eager",
        output_loading_info=True,
    )
    mtp = f"model.layers.{config['num_hidden_layers']}."
    unexpected = [k for k in info["unexpected_keys"] if not k.startswith(mtp)]
    if info["missing_keys"] or info["mismatched_keys"] or unexpected:
        sys.exit(f"error: from_pretrained: missing {sorted(info['missing_keys'])}, mismatched "
                 f"{info['mismatched_keys']}, unexpected {sorted(unexpected)}")
    assert all(p.dtype == F64 for p in model.parameters())
    return model.eval()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("export_dir")
    ap.add_argument("--bin", default="target/release/dsa-train", help="the dsa-train binary")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0, help="seed of the random tokens")
    ap.add_argument("--rtol", type=float, default=1e-4)
    ap.add_argument("--sparse-topk", type=int, help="also compare the sparse stage with this top-k (informational)")
    args = ap.parse_args(argv)
    # The load report lists the MTP layer as unexpected; pretrained_model checks it instead.
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if transformers.__version__ != mf.EXPECTED_TRANSFORMERS:
        print(f"warning: transformers {transformers.__version__}, checked with {mf.EXPECTED_TRANSFORMERS}", file=sys.stderr)

    with open(os.path.join(args.export_dir, "config.json")) as f:
        config = json.load(f)
    problems = []
    if config.get("model_type") != "deepseek_v32" or config.get("architectures") != ["DeepseekV32ForCausalLM"]:
        problems.append(f"config.json: model_type {config.get('model_type')!r}, architectures {config.get('architectures')!r}")
    for k in ("index_n_heads", "index_head_dim", "index_topk"):
        if not isinstance(config.get(k), int):
            problems.append(f"config.json: {k} is {config.get(k)!r}")
    fp8 = "quantization_config" in config
    print(f"export: {args.export_dir} ({'FP8' if fp8 else 'bf16'}, {config['num_hidden_layers']} layers, "
          f"indexer {config.get('index_n_heads')}x{config.get('index_head_dim')}, index_topk {config.get('index_topk')})")

    rng = np.random.default_rng(args.seed)
    toks = rng.integers(0, config["vocab_size"], size=args.windows * args.seq_len, dtype=np.uint32)
    windows = torch.from_numpy(toks.astype(np.int64).reshape(args.windows, args.seq_len))
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as tmp:
        tok_path = os.path.join(tmp, "tokens.bin")
        toks.astype("<u4").tofile(tok_path)
        ours = rust_eval(args.bin, args.export_dir, tok_path, args.seq_len, args.windows, None)["lm_loss"]
        ours_sparse = None
        if args.sparse_topk:
            ours_sparse = rust_eval(args.bin, args.export_dir, tok_path, args.seq_len, args.windows, args.sparse_topk)["lm_loss"]

    print(f"dsa-train eval --attention dense: lm_loss {ours:.10f} ({args.windows} windows x {args.seq_len} tokens)")
    rows = []
    model = state_dict_model(args.export_dir, config, args.seq_len)
    rows.append(("state dict (dequantised here), float64", lm_loss(model, windows)))
    sparse_rows = []
    if args.sparse_topk:
        k = args.sparse_topk
        with mf.f64_patches():
            logits, stats, _ = mf.run_windows(model, windows, "sparse", k, k, config["num_hidden_layers"])
        ties = stats["boundary_exact_ties"]
        sparse_rows.append((f"with make_fixtures' float64 patches ({ties} exact ties at the k-th place, lower index wins)",
                            mf.lm_loss(logits, windows)[0], True))
        for layer in model.model.layers:
            layer.self_attn.indexer.index_topk = k
        sparse_rows.append(("unpatched (float32 scores, torch.topk ties), informational", lm_loss(model, windows), False))
    del model
    try:
        rows.append(("from_pretrained, float64", lm_loss(pretrained_model(args.export_dir, config, args.seq_len), windows)))
    except Exception as e:  # transformers' FP8 loader on a CPU without accelerate, typically
        if not fp8:
            raise
        print(f"from_pretrained: skipped for the FP8 export ({type(e).__name__}: {str(e).splitlines()[0]})")

    for name, ref in rows:
        rel = abs(ours - ref) / abs(ref)
        ok = rel <= args.rtol
        print(f"transformers {name}: lm_loss {ref:.10f}  rel diff {rel:.2e}  {'ok' if ok else 'FAIL'} (rtol {args.rtol:g})")
        if not ok:
            problems.append(f"{name}: lm_loss {ref} vs ours {ours} (rel {rel:.2e})")
    if sparse_rows:
        print(f"dsa-train eval --attention sparse --topk {args.sparse_topk}: lm_loss {ours_sparse:.10f}")
    for name, ref, checked in sparse_rows:
        rel = abs(ours_sparse - ref) / abs(ref)
        ok = rel <= args.rtol or not checked
        verdict = ("ok" if ok else "FAIL") if checked else "-"
        print(f"transformers sparse, {name}: lm_loss {ref:.10f}  rel diff {rel:.2e}  {verdict}")
        if not ok:
            problems.append(f"sparse {name}: lm_loss {ref} vs ours {ours_sparse} (rel {rel:.2e})")

    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
