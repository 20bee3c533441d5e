#!/usr/bin/env python3
"""transformers' DeepSeek training step, for the side-by-side figures of the miniature
reproduction (docs/results.md): the same config.json as dsa-train, random weights, batch 1,
AdamW, one optimizer step per measurement.

Usage: bench_transformers.py --config CONFIG.json --model v3|v32 --lens 4096,8192
       [--steps 3] [--device cuda] [--dtype bf16] [--index-topk K] [--index-heads H --index-dim D]
Prints one JSON line per length: model, seq_len, status ("ok" or "oom"), tokens_per_s (median
over the steps after one warm-up step) and peak_gib (torch's peak allocated memory). After the
first length that runs out of memory the longer ones are reported "skipped".
"""
import argparse
import json
import statistics
import time

import torch
import transformers


def build(args):
    cfg = json.load(open(args.config))
    cfg.pop("architectures", None)
    if args.model == "v32":
        cfg["model_type"] = "deepseek_v32"
        cfg.setdefault("index_topk", args.index_topk)
        cfg.setdefault("index_n_heads", args.index_heads)
        cfg.setdefault("index_head_dim", args.index_dim)
        config = transformers.DeepseekV32Config(**cfg)
    else:
        cfg["model_type"] = "deepseek_v3"
        config = transformers.DeepseekV3Config(**cfg)
    dtype = {"bf16": torch.bfloat16, "f32": torch.float32}[args.dtype]
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).to(args.device)
    model.train()
    return model, config


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--model", choices=["v3", "v32"], default="v3")
    p.add_argument("--lens", required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--index-topk", type=int, default=2048)
    p.add_argument("--index-heads", type=int, default=64)
    p.add_argument("--index-dim", type=int, default=128)
    args = p.parse_args()
    torch.manual_seed(0)
    model, config = build(args)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    oom = False
    for L in [int(x) for x in args.lens.split(",")]:
        row = {"model": f"transformers {transformers.__version__} Deepseek{args.model.upper()}", "seq_len": L}
        if oom:
            print(json.dumps({**row, "status": "skipped"}), flush=True)
            continue
        ids = torch.randint(0, config.vocab_size, (1, L), device=args.device)
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        times = []
        try:
            for i in range(args.steps + 1):
                sync(args.device)
                t0 = time.perf_counter()
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                sync(args.device)
                if i > 0:
                    times.append(time.perf_counter() - t0)
            peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None
            print(json.dumps({**row, "status": "ok", "tokens_per_s": L / statistics.median(times), "peak_gib": peak, "loss": loss.item()}), flush=True)
        except torch.OutOfMemoryError:
            oom = True
            opt.zero_grad(set_to_none=True)
            loss = None
            torch.cuda.empty_cache()
            print(json.dumps({**row, "status": "oom"}), flush=True)


if __name__ == "__main__":
    main()
