#!/usr/bin/env python3
"""Build tiny DeepSeek-V3.1 / V3.2 checkpoints and the float64 reference numbers
that dsa-train's parity tests compare against.

What it does, per fixture (see FIXTURES below, or --spec for other sizes):

1. Writes a small random checkpoint in the real Hugging Face layout: config.json in
   DeepSeek's original style (rope_scaling "type": "yarn", quantization_config fp8),
   FP8 (e4m3) linear weights with ue8m0 block scales `*.weight_scale_inv` (128x128
   blocks, ragged edges), bf16 norms/embeddings/router, f32 router bias, the MTP layer,
   2+ shards with `model.safetensors.index.json`, and `tokens.bin` (u32 LE).
2. Reads the files back, dequantises them to float64 and loads them into transformers'
   DeepseekV3ForCausalLM / DeepseekV32ForCausalLM (eager attention, eval, float64).
3. Runs every window in dense mode (indexer top-k >= T, i.e. plain causal attention)
   and sparse mode (indexer top-k = the fixture's k, DSA) and writes `expected.json`,
   `logits_dense.safetensors`, `logits_sparse.safetensors` and `diagnostics.json`.

transformers is the independent reference; this script only patches, at runtime, the
places where transformers computes in float32 (or where it has to expose internal
values). Every patch is validated against the unpatched transformers code on the same
weights (see `validate_patches`). README.md next to this file explains each patch.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import sys
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.overrides import TorchFunctionMode

import transformers
from transformers import (
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    DeepseekV32Config,
    DeepseekV32ForCausalLM,
)
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as mv3
from transformers.models.deepseek_v32 import modeling_deepseek_v32 as mv32

EXPECTED_TRANSFORMERS = "5.23.0"
FP8_BLOCK = 128
E4M3_MAX = 448.0
F64 = torch.float64

# ----------------------------------------------------------------------------------
# Fixture definitions. Dimensions are chosen so that FP8 blocks are ragged (several
# weights have rows and/or columns > 128 that are not multiples of 128) and the two
# fixtures differ in every dimension that the Rust side reads from config.json.
# "index_*" of a v31 fixture are NOT written to its config.json: they are what the Rust
# side must be told (expected.json) to initialise the missing indexer.
# ----------------------------------------------------------------------------------
FIXTURES: dict[str, dict] = {
    "v32_tiny": dict(
        kind="v32",
        hidden_size=192,
        num_hidden_layers=3,
        first_k_dense_replace=1,
        intermediate_size=320,
        moe_intermediate_size=64,
        vocab_size=384,
        num_attention_heads=4,
        q_lora_rank=160,
        kv_lora_rank=144,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=24,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=2.5,
        index_n_heads=4,
        index_head_dim=32,
        index_topk=16,
        seq_len=48,
        windows=3,
        extra_tokens=5,
        shards=3,
        router_logit_std=1.5,
        router_bias_std=0.15,
        router_bias_offset=-0.6,
    ),
    "v31_tiny": dict(
        kind="v31",
        hidden_size=136,
        num_hidden_layers=2,
        first_k_dense_replace=1,
        intermediate_size=264,
        moe_intermediate_size=48,
        vocab_size=300,
        num_attention_heads=3,
        q_lora_rank=176,
        kv_lora_rank=130,
        qk_nope_head_dim=24,
        qk_rope_head_dim=8,
        v_head_dim=20,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=3,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=1.8,
        index_n_heads=4,
        index_head_dim=24,
        index_topk=12,
        seq_len=40,
        windows=3,
        extra_tokens=7,
        shards=2,
        router_logit_std=1.5,
        router_bias_std=0.15,
        router_bias_offset=-0.6,
    ),
}

# Fields shared by all fixtures (DeepSeek-V3 values where they do not affect size).
COMMON_CONFIG = dict(
    num_nextn_predict_layers=1,
    scoring_func="sigmoid",
    topk_method="noaux_tc",
    norm_topk_prob=True,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    rope_scaling={
        "type": "yarn",
        "factor": 40,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    # = factor * original_max_position_embeddings, as in the 671B config
    max_position_embeddings=163840,
    tie_word_embeddings=False,
    hidden_act="silu",
    attention_bias=False,
    attention_dropout=0.0,
    initializer_range=0.02,
    bos_token_id=0,
    eos_token_id=1,
    use_cache=True,
    torch_dtype="bfloat16",
    quantization_config={
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
        "scale_fmt": "ue8m0",
    },
)


# ==================================================================================
# Part 1: the deterministic indexer initialisation (bit-exact twin of the Rust init)
# ==================================================================================
M64 = (1 << 64) - 1


def fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h ^= b
        h = (h * 0x100000001B3) & M64
    return h


def indexer_init_values(name: str, shape: tuple[int, int], seed: int) -> np.ndarray:
    """float32 [out, in] values of a missing indexer weight; see README for the formula."""
    out_dim, in_dim = shape
    base = np.uint64(fnv1a64(name.encode("utf-8")) ^ (seed & M64))
    n = out_dim * in_dim
    with np.errstate(over="ignore"):
        # numpy uint64 array arithmetic wraps modulo 2^64, as the spec requires.
        i1 = np.arange(1, n + 1, dtype=np.uint64)
        z = base + i1 * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    # top 24 bits -> exact float32 in [0, 1)
    u = (z >> np.uint64(40)).astype(np.float32) / np.float32(1 << 24)
    two_u_minus_1 = np.float32(2.0) * u - np.float32(1.0)  # exact in f32
    bound = np.float32(1.0 / math.sqrt(in_dim))  # computed in f64, then cast
    vals = (two_u_minus_1 * bound).astype(np.float32)  # one f32 multiply
    return vals.reshape(out_dim, in_dim)


def indexer_init_value_scalar(name: str, in_dim: int, seed: int, i: int) -> np.float32:
    """Element i of the same init with plain Python integers (cross-checks the numpy
    vectorisation, which relies on uint64 wrap-around)."""
    x = ((fnv1a64(name.encode("utf-8")) ^ seed) + (i + 1) * 0x9E3779B97F4A7C15) & M64
    z = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    z ^= z >> 31
    u = np.float32(z >> 40) / np.float32(1 << 24)
    return np.float32(np.float32(2.0) * u - np.float32(1.0)) * np.float32(1.0 / math.sqrt(in_dim))


def indexer_init_layer(prefix: str, cfg: dict, seed: int) -> dict[str, np.ndarray]:
    """All five indexer tensors of one layer (prefix ends with 'self_attn.indexer.')."""
    h_i, d_i = cfg["index_n_heads"], cfg["index_head_dim"]
    shapes = {
        "wq_b.weight": (h_i * d_i, cfg["q_lora_rank"]),
        "wk.weight": (d_i, cfg["hidden_size"]),
        "weights_proj.weight": (h_i, cfg["hidden_size"]),
    }
    out = {prefix + k: indexer_init_values(prefix + k, s, seed) for k, s in shapes.items()}
    out[prefix + "k_norm.weight"] = np.ones(d_i, np.float32)
    out[prefix + "k_norm.bias"] = np.zeros(d_i, np.float32)
    return out


def write_indexer_init_sample(path: str) -> None:
    name = "model.layers.0.self_attn.indexer.wq_b.weight"
    shape = (8, 5)
    samples = []
    for seed in (0, 12345):
        v = indexer_init_values(name, shape, seed).reshape(-1)[:8]
        scalar = np.array([indexer_init_value_scalar(name, shape[1], seed, i) for i in range(8)], np.float32)
        assert np.array_equal(v.view(np.uint32), scalar.view(np.uint32))
        samples.append(
            {
                "name": name,
                "shape": list(shape),
                "seed": seed,
                "fnv1a64_name": f"{fnv1a64(name.encode()):#018x}",
                "first8_f32_bits_hex": [f"{int(b):08x}" for b in v.view(np.uint32)],
                "first8": [float(x) for x in v],
            }
        )
    doc = {
        "description": "first 8 row-major values of the deterministic indexer init "
        "(tools/parity/make_fixtures.py: indexer_init_values)",
        "samples": samples,
    }
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")


# ==================================================================================
# Part 2: writing the checkpoint
# ==================================================================================
def fp8_quantize_blockwise(w: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """W (f64 [out,in]) -> (W8 float8_e4m3fn, scale_inv f32 [ceil(out/128), ceil(in/128)]).

    Per block: scale = the smallest power of two >= amax/448 (ue8m0), W8 = e4m3(W/scale)
    (round to nearest even; |W/scale| <= 448 so it never saturates).
    """
    rows, cols = w.shape
    nbr, nbc = -(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK)
    scale = np.empty((nbr, nbc), np.float64)
    scaled = np.empty_like(w)
    for br in range(nbr):
        for bc in range(nbc):
            rs = slice(br * FP8_BLOCK, min((br + 1) * FP8_BLOCK, rows))
            cs = slice(bc * FP8_BLOCK, min((bc + 1) * FP8_BLOCK, cols))
            amax = float(np.abs(w[rs, cs]).max())
            if amax == 0.0:
                s = 1.0
            else:
                m, e = math.frexp(amax / E4M3_MAX)  # amax/448 = m * 2^e, m in [0.5, 1)
                s = math.ldexp(1.0, e - 1) if m == 0.5 else math.ldexp(1.0, e)
                assert s * E4M3_MAX >= amax and (s / 2) * E4M3_MAX < amax
            scale[br, bc] = s
            scaled[rs, cs] = w[rs, cs] / s  # exact: division by a power of two
    w8 = torch.from_numpy(scaled).to(torch.float8_e4m3fn)
    return w8, torch.from_numpy(scale.astype(np.float32))


def dequantize_fp8(w8: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """W[r,c] = f64(W8[r,c]) * scale_inv[r//128, c//128] (edge blocks partial)."""
    rows, cols = w8.shape
    s = scale_inv.to(F64)
    s = s.repeat_interleave(FP8_BLOCK, 0)[:rows].repeat_interleave(FP8_BLOCK, 1)[:, :cols]
    return w8.to(F64) * s


@dataclass
class CheckpointBuilder:
    rng: np.random.Generator
    tensors: list[tuple[str, torch.Tensor]] = field(default_factory=list)

    def _normal(self, shape, std):
        return self.rng.standard_normal(shape) * std

    def linear_fp8(self, name: str, out_dim: int, in_dim: int):
        w = self._normal((out_dim, in_dim), 1.0 / math.sqrt(in_dim))
        w8, s = fp8_quantize_blockwise(w)
        self.tensors.append((name + ".weight", w8))
        self.tensors.append((name + ".weight_scale_inv", s))

    def bf16(self, name: str, value: np.ndarray):
        self.tensors.append((name, torch.from_numpy(np.asarray(value, np.float64)).to(torch.bfloat16)))

    def f32(self, name: str, value: np.ndarray):
        self.tensors.append((name, torch.from_numpy(np.asarray(value, np.float64)).to(torch.float32)))

    def norm(self, name: str, dim: int):
        # ~1 + small noise so a wrong norm weight shows up in the numbers
        self.bf16(name, 1.0 + 0.1 * self.rng.standard_normal(dim))

    def matrix_bf16(self, name: str, out_dim: int, in_dim: int, std: float | None = None):
        std = 1.0 / math.sqrt(in_dim) if std is None else std
        self.bf16(name, self._normal((out_dim, in_dim), std))


def build_layer(b: CheckpointBuilder, cfg: dict, layer: int, with_indexer: bool, moe: bool):
    p = f"model.layers.{layer}."
    hs = cfg["hidden_size"]
    nh = cfg["num_attention_heads"]
    qk_head = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    b.norm(p + "input_layernorm.weight", hs)
    a = p + "self_attn."
    b.linear_fp8(a + "q_a_proj", cfg["q_lora_rank"], hs)
    b.norm(a + "q_a_layernorm.weight", cfg["q_lora_rank"])
    b.linear_fp8(a + "q_b_proj", nh * qk_head, cfg["q_lora_rank"])
    b.linear_fp8(a + "kv_a_proj_with_mqa", cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"], hs)
    b.norm(a + "kv_a_layernorm.weight", cfg["kv_lora_rank"])
    b.linear_fp8(a + "kv_b_proj", nh * (cfg["qk_nope_head_dim"] + cfg["v_head_dim"]), cfg["kv_lora_rank"])
    b.linear_fp8(a + "o_proj", hs, nh * cfg["v_head_dim"])
    if with_indexer:
        ix = a + "indexer."
        h_i, d_i = cfg["index_n_heads"], cfg["index_head_dim"]
        b.matrix_bf16(ix + "wq_b.weight", h_i * d_i, cfg["q_lora_rank"])
        b.matrix_bf16(ix + "wk.weight", d_i, hs)
        b.norm(ix + "k_norm.weight", d_i)
        b.bf16(ix + "k_norm.bias", 0.05 * b.rng.standard_normal(d_i))
        b.f32(ix + "weights_proj.weight", b._normal((h_i, hs), 1.0 / math.sqrt(hs)))
    b.norm(p + "post_attention_layernorm.weight", hs)
    m = p + "mlp."
    if not moe:
        b.linear_fp8(m + "gate_proj", cfg["intermediate_size"], hs)
        b.linear_fp8(m + "up_proj", cfg["intermediate_size"], hs)
        b.linear_fp8(m + "down_proj", hs, cfg["intermediate_size"])
    else:
        n_exp, mi = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
        # router logits with std ~router_logit_std, so the sigmoid scores spread over (0, 1)
        # and routing depends on the token rather than on the bias alone
        b.matrix_bf16(m + "gate.weight", n_exp, hs, cfg["router_logit_std"] / math.sqrt(hs))
        # Both signs, and the second expert of every pair pulled down by router_bias_offset,
        # so that a kept group often holds an expert whose biased score s+b is negative:
        # there, masking the other groups with 0.0 instead of -inf picks other experts.
        # (Pure N(0, std) draws rarely produced such tokens at these sizes.)
        bias = b._normal(n_exp, cfg["router_bias_std"]) + cfg["router_bias_offset"] * (np.arange(n_exp) % 2)
        b.f32(m + "gate.e_score_correction_bias", bias)
        for e in range(n_exp):
            b.linear_fp8(m + f"experts.{e}.gate_proj", mi, hs)
            b.linear_fp8(m + f"experts.{e}.up_proj", mi, hs)
            b.linear_fp8(m + f"experts.{e}.down_proj", hs, mi)
        si = mi * cfg["n_shared_experts"]
        b.linear_fp8(m + "shared_experts.gate_proj", si, hs)
        b.linear_fp8(m + "shared_experts.up_proj", si, hs)
        b.linear_fp8(m + "shared_experts.down_proj", hs, si)


def build_checkpoint(cfg: dict, rng: np.random.Generator) -> list[tuple[str, torch.Tensor]]:
    b = CheckpointBuilder(rng)
    hs, vocab, n_layers = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    with_indexer = cfg["kind"] == "v32"
    b.bf16("model.embed_tokens.weight", b._normal((vocab, hs), 1.0))
    for layer in range(n_layers):
        build_layer(b, cfg, layer, with_indexer, moe=layer >= cfg["first_k_dense_replace"])
    # MTP module (layer index n_layers): ignored by the references, present in the files.
    p = f"model.layers.{n_layers}."
    b.bf16(p + "embed_tokens.weight", b._normal((vocab, hs), 1.0))
    b.norm(p + "enorm.weight", hs)
    b.norm(p + "hnorm.weight", hs)
    b.linear_fp8(p + "eh_proj", hs, 2 * hs)
    build_layer(b, cfg, n_layers, with_indexer, moe=True)
    b.norm(p + "shared_head.norm.weight", hs)
    b.matrix_bf16(p + "shared_head.head.weight", vocab, hs)
    b.norm("model.norm.weight", hs)
    b.matrix_bf16("lm_head.weight", vocab, hs)
    return b.tensors


def layer_of(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:3]) if name.startswith("model.layers.") else name


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def shard_split_points(tensors, n_shards: int, n_layers: int) -> list[int]:
    """Indices where shards 2..n start. Each cut lands strictly inside a MAIN decoder
    layer (so that layer spans two shards), near the byte fraction j/n; the first cut
    also separates a weight from its weight_scale_inv (loaders must look every tensor up
    in weight_map and never assume that companions share a file)."""
    sizes = [nbytes(t) for _, t in tensors]
    cum = np.cumsum(sizes)
    main_layers = {f"model.layers.{i}" for i in range(n_layers)}
    # allowed cut c: tensors[c-1] and tensors[c] belong to the same main layer
    allowed = [c for c in range(1, len(tensors)) if layer_of(tensors[c][0]) in main_layers and layer_of(tensors[c - 1][0]) == layer_of(tensors[c][0])]
    cuts = []
    for j in range(1, n_shards):
        target = int(np.searchsorted(cum, cum[-1] * j / n_shards)) + 1
        cands = allowed
        if j == 1:
            cands = [c for c in allowed if tensors[c][0].endswith(".weight_scale_inv")]
        cands = [c for c in cands if not cuts or c > cuts[-1]]
        cuts.append(min(cands, key=lambda c: abs(c - target)))
    return cuts


def write_checkpoint(out_dir: str, cfg: dict, tensors) -> dict:
    n = cfg["shards"]
    cuts = [0] + shard_split_points(tensors, n, cfg["num_hidden_layers"]) + [len(tensors)]
    weight_map = {}
    for k in range(n):
        fname = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        part = dict(tensors[cuts[k] : cuts[k + 1]])
        save_file({nm: t.contiguous() for nm, t in part.items()}, os.path.join(out_dir, fname), metadata={"format": "pt"})
        os.chmod(os.path.join(out_dir, fname), 0o644)  # safetensors creates files 0600
        for nm in part:
            weight_map[nm] = fname
    index = {
        "metadata": {"total_size": sum(nbytes(t) for _, t in tensors)},
        "weight_map": dict(sorted(weight_map.items())),
    }
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
    spanning = sorted(
        {layer_of(a) for a in weight_map for b in weight_map if layer_of(a) == layer_of(b) and weight_map[a] != weight_map[b]}
    )
    assert spanning, "no layer spans two shards"
    return {"shards": n, "layers_spanning_shards": spanning}


def config_json(cfg: dict) -> dict:
    arch = {"v31": ("deepseek_v3", "DeepseekV3ForCausalLM"), "v32": ("deepseek_v32", "DeepseekV32ForCausalLM")}
    model_type, arch_name = arch[cfg["kind"]]
    keys = [
        "hidden_size", "num_hidden_layers", "first_k_dense_replace", "intermediate_size",
        "moe_intermediate_size", "vocab_size", "num_attention_heads", "q_lora_rank", "kv_lora_rank",
        "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "n_shared_experts",
        "num_experts_per_tok", "n_group", "topk_group", "routed_scaling_factor",
    ]  # fmt: skip
    c = {"architectures": [arch_name], "model_type": model_type}
    c.update({k: cfg[k] for k in keys})
    c["num_key_value_heads"] = cfg["num_attention_heads"]
    c.update(copy.deepcopy(COMMON_CONFIG))
    if cfg["kind"] == "v32":
        c.update({k: cfg[k] for k in ("index_n_heads", "index_head_dim", "index_topk")})
    return dict(sorted(c.items()))


# ==================================================================================
# Part 3: reading the checkpoint back into float64 torch state dicts
# ==================================================================================
def load_dequantized(fixture_dir: str) -> dict[str, torch.Tensor]:
    with open(os.path.join(fixture_dir, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    raw = {}
    for fname in sorted(set(weight_map.values())):
        raw.update(load_file(os.path.join(fixture_dir, fname)))
    assert set(raw) == set(weight_map)
    out = {}
    for name, t in raw.items():
        if name.endswith(".weight_scale_inv"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            out[name] = dequantize_fp8(t, raw[name + "_scale_inv"])
        else:
            assert t.dtype in (torch.bfloat16, torch.float32), (name, t.dtype)
            out[name] = t.to(F64)
    return out


def hf_state_dict(ckpt: dict[str, torch.Tensor], cfg: dict, with_indexer: bool) -> dict[str, torch.Tensor]:
    """Map checkpoint names to transformers' parameter names: drop the MTP layer, stack the
    per-expert weights into transformers' fused [E, 2I, H] gate_up_proj and [E, H, I] down_proj."""
    n_layers = cfg["num_hidden_layers"]
    sd = {}
    for name, t in ckpt.items():
        if name.startswith(f"model.layers.{n_layers}."):
            continue  # MTP
        if ".mlp.experts." in name:
            continue
        if ".indexer." in name and not with_indexer:
            continue
        sd[name] = t
    for layer in range(cfg["first_k_dense_replace"], n_layers):
        p = f"model.layers.{layer}.mlp.experts."
        gu, dn = [], []
        for e in range(cfg["n_routed_experts"]):
            gu.append(torch.cat([ckpt[p + f"{e}.gate_proj.weight"], ckpt[p + f"{e}.up_proj.weight"]], 0))
            dn.append(ckpt[p + f"{e}.down_proj.weight"])
        sd[p + "gate_up_proj"] = torch.stack(gu)
        sd[p + "down_proj"] = torch.stack(dn)
    return sd


# ==================================================================================
# Part 4: runtime patches of transformers (float64 everywhere + recording)
# ==================================================================================
class Recorder:
    """Collects what the patched modules expose during one window's forward."""

    def __init__(self):
        self.mode = None  # "dense" | "sparse"
        self.phase = "main"  # "main" | "dense_recompute"
        self.recompute_dense = False
        self.model_topk = None  # top-k the model's attention uses in this run
        self.select_k = None  # the fixture's k, for S_t
        self.reset()
        self.router_tokens = 0
        self.router_mask_sensitive = 0
        self.router_negative_biased = 0
        self.router_counts = {}

    def reset(self):
        self.probs: dict[tuple[int, str], torch.Tensor] = {}
        self.index: dict[int, torch.Tensor] = {}
        self.sel: dict[int, torch.Tensor] = {}
        self.boundary_gaps: list[float] = []
        self.boundary_ties = 0


REC = Recorder()


def rmsnorm_forward_f64(self, hidden_states):
    # transformers upcasts to float32 and casts back; compute in the input dtype (f64)
    var = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(var + self.variance_epsilon))


def yarn_inv_freq_f64(rope: dict, dim: int) -> torch.Tensor:
    """YaRN inverse frequencies in float64 (DeepSeek's formula; see DSA_BRIEF section 1)."""
    theta, factor = float(rope["rope_theta"]), float(rope["factor"])
    orig = float(rope["original_max_position_embeddings"])
    i = np.arange(dim // 2, dtype=np.float64)
    freq = theta ** (-2.0 * i / dim)

    def corr(rot):
        return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(corr(rope["beta_fast"])), 0)
    high = min(math.ceil(corr(rope["beta_slow"])), dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((i - low) / (high - low), 0.0, 1.0)
    return torch.from_numpy(freq / factor * ramp + freq * (1.0 - ramp))


def rotary_forward_f64(self, x, position_ids):
    # transformers computes the angles in float32; do it in float64
    inv = yarn_inv_freq_f64(self.config.rope_parameters, self.config.qk_rope_head_dim)
    assert self.attention_scaling == 1.0  # mscale == mscale_all_dim: cos/sin unscaled
    freqs = position_ids[..., None].to(F64) * inv.to(x.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def eager_attention_f64(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    # transformers' eager path runs softmax in float32; this one stays in f64 and records
    # the per-head probabilities for the indexer targets.
    assert key.shape[1] == query.shape[1], "MLA: one key per head, no GQA repeat expected"
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    assert attention_mask is not None and attention_mask.dtype != torch.bool
    scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1)
    if REC.mode is not None:
        REC.probs[(module.layer_idx, REC.phase)] = probs[0].detach().clone()
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, probs


def router_forward_f64(self, hidden_states):
    """noaux_tc gate in float64 (transformers: f32 logits). Semantics as in the brief:
    sigmoid scores, biased scores for selection only, group score = sum of top-2 biased
    scores, non-kept groups masked with -inf, top-k by biased score, weights = unbiased
    scores normalised to sum 1 THEN times routed_scaling_factor."""
    assert self.norm_topk_prob
    x = hidden_states.reshape(-1, self.hidden_dim).to(F64)
    logits = x @ self.weight.to(F64).t()
    s = torch.sigmoid(logits)
    b = s + self.e_score_correction_bias.to(F64)
    n_tok, n_exp = b.shape
    per_group = n_exp // self.num_group
    grp = b.view(n_tok, self.num_group, per_group).topk(min(2, per_group), dim=-1).values.sum(-1)
    keep = grp.topk(self.topk_group, dim=-1).indices
    gmask = torch.zeros_like(grp, dtype=torch.bool).scatter(1, keep, True)
    emask = gmask.repeat_interleave(per_group, dim=1)
    idx = b.masked_fill(~emask, float("-inf")).topk(self.top_k, dim=-1).indices
    w = s.gather(1, idx)
    w = w / w.sum(-1, keepdim=True) * self.routed_scaling_factor
    if REC.mode is not None and REC.phase == "main":
        # would masking with 0.0 instead of -inf have chosen other experts?
        idx0 = b.masked_fill(~emask, 0.0).topk(self.top_k, dim=-1).indices
        diff = (idx.sort(-1).values != idx0.sort(-1).values).any(-1)
        REC.router_tokens += n_tok
        REC.router_mask_sensitive += int(diff.sum())
        REC.router_negative_biased += int((b.gather(1, idx) < 0).any(-1).sum())
        REC.router_counts.setdefault(getattr(self, 'layer_idx', -1), torch.zeros(n_exp, dtype=torch.long))
        REC.router_counts[getattr(self, 'layer_idx', -1)] += torch.bincount(idx.reshape(-1), minlength=n_exp)
    return logits, w, idx


def deterministic_order(scores: torch.Tensor) -> torch.Tensor:
    """[T, T] -> per row, column indices sorted by score descending, lower index first
    on ties (numpy lexsort: last key is primary). -inf (future) columns sort last."""
    a = scores.detach().cpu().numpy()
    cols = np.broadcast_to(np.arange(a.shape[1]), a.shape)
    order = np.lexsort((cols, -a), axis=-1)
    return torch.from_numpy(order)


def indexer_forward_f64(self, hidden_states, q_resid, position_embeddings, attention_mask, position_ids, past_key_values=None):
    """Lightning indexer in float64 that also records the logits I and the set S_t.

    I[t,s] = sum_j w[t,j] * ReLU(q_I[t,j] . k_I[s]),  w = weights_proj(x) * H^-0.5 * d^-0.5,
    q_I/k_I: rope dims first, half-split (non-interleaved) RoPE. Causal: -inf for s > t.
    Returns the top-min(index_topk, T) indices with lower-index-wins tie breaking.
    """
    assert past_key_values is None
    bsz, seq, _ = hidden_states.shape
    assert bsz == 1
    nh, hd, rd = self.n_heads, self.head_dim, self.qk_rope_head_dim
    cos, sin = position_embeddings  # [B, T, rd], halves equal (cat(freqs, freqs))

    def rope_half(x, c, s):
        x1, x2 = x[..., : rd // 2], x[..., rd // 2 :]
        return x * c + torch.cat((-x2, x1), dim=-1) * s

    q = self.wq_b(q_resid).view(bsz, seq, nh, hd)
    k = self.k_norm(self.wk(hidden_states))  # [B, T, hd]
    q = torch.cat((rope_half(q[..., :rd], cos[:, :, None], sin[:, :, None]), q[..., rd:]), dim=-1)
    k = torch.cat((rope_half(k[..., :rd], cos, sin), k[..., rd:]), dim=-1)
    dots = torch.einsum("bthd,bsd->bhts", q, k)
    w = self.weights_proj(hidden_states) * (nh**-0.5) * (hd**-0.5)  # [B, T, H]
    scores = torch.einsum("bth,bhts->bts", w, F.relu(dots))[0]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    order = deterministic_order(scores)
    if REC.mode is not None and REC.phase == "main":
        kk = REC.select_k
        sel = torch.zeros(seq, seq, dtype=torch.bool)
        sel.scatter_(1, order[:, : min(kk, seq)], True)
        sel &= causal  # rows with t+1 <= k: S_t = all s <= t
        REC.index[self.layer_idx] = scores.detach().clone()
        REC.sel[self.layer_idx] = sel
        for t in range(kk, seq):  # rows where selection cuts: gap at the k-th place
            srt = scores[t, order[t]]
            gap = float(srt[kk - 1] - srt[kk])
            if gap == 0.0:
                REC.boundary_ties += 1
            else:
                REC.boundary_gaps.append(gap)
    k_use = min(self.index_topk, seq)
    return order[:, :k_use][None].to(torch.int32)


_orig_v32_attention_forward = mv32.DeepseekV32Attention.forward


def v32_attention_forward_wrapper(self, hidden_states, *args, **kwargs):
    """In sparse mode, first run the layer's attention once with top-k >= T on the SAME
    input (the sparse forward's hidden state) to get the dense probabilities for the
    attention-mass recall; its output is discarded. Then run with the mode's top-k."""
    seq = hidden_states.shape[1]
    if REC.mode is not None and REC.recompute_dense:
        REC.phase = "dense_recompute"
        self.indexer.index_topk = seq
        _orig_v32_attention_forward(self, hidden_states, *args, **kwargs)
    REC.phase = "main"
    self.indexer.index_topk = REC.model_topk if REC.model_topk is not None else self.config.index_topk
    return _orig_v32_attention_forward(self, hidden_states, *args, **kwargs)


PATCHES = [
    (mv3.DeepseekV3RMSNorm, "forward", rmsnorm_forward_f64),
    (mv32.DeepseekV32RMSNorm, "forward", rmsnorm_forward_f64),
    (mv3.DeepseekV3RotaryEmbedding, "forward", rotary_forward_f64),
    (mv32.DeepseekV32RotaryEmbedding, "forward", rotary_forward_f64),
    (mv3, "eager_attention_forward", eager_attention_f64),
    (mv32, "eager_attention_forward", eager_attention_f64),
    (mv3.DeepseekV3TopkRouter, "forward", router_forward_f64),
    (mv32.DeepseekV32TopkRouter, "forward", router_forward_f64),
    (mv32.DeepseekV32Indexer, "forward", indexer_forward_f64),
    (mv32.DeepseekV32Attention, "forward", v32_attention_forward_wrapper),
]


@contextlib.contextmanager
def f64_patches():
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in PATCHES]
    try:
        for obj, attr, new in PATCHES:
            setattr(obj, attr, new)
        yield
    finally:
        for obj, attr, old in saved:
            setattr(obj, attr, old)


# ==================================================================================
# Part 5: the reference computation
# ==================================================================================
def make_model(cls_cfg, cls_model, config_dict: dict, state_dict: dict):
    cd = copy.deepcopy(config_dict)
    cd.pop("quantization_config", None)  # weights are given dequantised
    config = cls_cfg.from_dict(cd)
    model = cls_model._from_config(config, attn_implementation="eager", experts_implementation="eager")
    model = model.to(F64).eval()
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    for n, p in model.named_parameters():
        assert p.dtype == F64, n
    for i, layer in enumerate(model.model.layers):
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.layer_idx = i  # only for the router statistics
    return model


@torch.no_grad()
def run_windows(model, windows: torch.Tensor, mode: str, model_topk: int | None, select_k: int | None, n_layers: int):
    """Forward every window (batch 1 each). Returns logits [W,T,V] f64, the indexer
    metrics (V32 model only; model_topk must then be T in dense mode, select_k in sparse
    mode) and router statistics."""
    is_v32 = isinstance(model, DeepseekV32ForCausalLM)
    if is_v32:
        assert model_topk == (windows.shape[1] if mode == "dense" else select_k)
    REC.mode, REC.model_topk, REC.select_k = mode, model_topk, select_k
    REC.recompute_dense = is_v32 and mode == "sparse"
    REC.router_tokens = REC.router_mask_sensitive = REC.router_negative_biased = 0
    REC.router_counts = {}
    n_win, seq = windows.shape
    logits_all = []
    kl_sum = np.zeros(n_layers)
    kl_cnt = 0
    rec_sum = np.zeros(n_layers)
    rec_cnt = 0
    gaps, ties = [], 0
    for w in range(n_win):
        REC.reset()
        REC.phase = "main"
        out = model(input_ids=windows[w : w + 1], use_cache=False)
        logits_all.append(out.logits[0])
        if not is_v32:
            continue
        gaps += REC.boundary_gaps
        ties += REC.boundary_ties
        causal = torch.ones(seq, seq, dtype=torch.bool).tril()
        for layer in range(n_layers):
            scores = REC.index[layer]
            sel = REC.sel[layer]
            p_main = REC.probs[(layer, "main")].mean(0)  # head mean = head-summed, L1-normalised
            p_dense = p_main if mode == "dense" else REC.probs[(layer, "dense_recompute")].mean(0)
            assert torch.all(p_dense[~causal] == 0)
            if mode == "dense":
                support = causal
            else:
                support = sel
                # the sparse attention's own probabilities live on S_t and sum to 1 there
                assert torch.all(p_main[~sel] < 1e-300)
                assert torch.allclose(p_main.sum(-1), torch.ones(seq, dtype=F64), atol=1e-12)
            logq = torch.log_softmax(scores.masked_fill(~support, float("-inf")), dim=-1)
            p = p_main.masked_fill(~support, 0.0)
            kl_rows = torch.where(support, torch.xlogy(p, p) - p * logq.masked_fill(~support, 0.0), 0.0).sum(-1)
            assert torch.all(kl_rows > -1e-12), kl_rows.min()
            kl_sum[layer] += float(kl_rows.sum())
            rows = torch.arange(seq) + 1 > select_k
            recall = (p_dense * sel).sum(-1)[rows]
            rec_sum[layer] += float(recall.sum())
        kl_cnt += seq
        rec_cnt += int((torch.arange(seq) + 1 > select_k).sum())
    stats = None
    if is_v32:
        stats = {
            "kl_per_layer": (kl_sum / kl_cnt).tolist(),
            "recall_per_layer": (rec_sum / rec_cnt).tolist() if rec_cnt else [1.0] * n_layers,
            "boundary_min_gap": min(gaps) if gaps else None,
            "boundary_exact_ties": ties,
            "boundary_rows": len(gaps) + ties,
        }
    router = {
        "tokens": REC.router_tokens,
        "tokens_where_0_mask_would_pick_other_experts": REC.router_mask_sensitive,
        "tokens_with_a_chosen_expert_of_negative_biased_score": REC.router_negative_biased,
        "expert_pick_counts_per_layer": {str(k): v.tolist() for k, v in sorted(REC.router_counts.items())},
    }
    REC.mode = None
    return torch.stack(logits_all), stats, router


def lm_loss(logits: torch.Tensor, windows: torch.Tensor) -> tuple[float, list[float]]:
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    nll = -logp.gather(-1, windows[:, 1:, None])[..., 0]
    return float(nll.mean()), nll.mean(-1).tolist()


class CaptureTopk(TorchFunctionMode):
    """Records the tensor on which transformers' indexer calls .topk (its index scores)."""

    def __init__(self, sink):
        super().__init__()
        self.sink = sink

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.topk:
            self.sink.append(args[0].detach().clone())
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def validate_patches(v3_model, v32_model, windows, n_layers, ref_logits, ref_index):
    """Run the UNPATCHED transformers code (float32 inside RMSNorm, RoPE, softmax, router,
    indexer) on window 0 in dense mode and compare with the patched float64 numbers.
    The differences must be float32-sized: the patches change precision, not maths."""
    report = {}
    x = windows[:1]
    seq = x.shape[1]
    if v3_model is not None:
        lg = v3_model(input_ids=x, use_cache=False).logits[0]
        report["v3_unpatched_vs_f64_logits_maxabs"] = float((lg - ref_logits).abs().max())
    captured = []
    orig_ix = mv32.DeepseekV32Indexer.forward

    def capturing(self, *a, **k):
        with CaptureTopk(captured):
            return orig_ix(self, *a, **k)

    for layer in v32_model.model.layers:
        layer.self_attn.indexer.index_topk = seq  # dense: every key selected
    mv32.DeepseekV32Indexer.forward = capturing
    try:
        lg = v32_model(input_ids=x, use_cache=False).logits[0]
    finally:
        mv32.DeepseekV32Indexer.forward = orig_ix
    report["v32_unpatched_vs_f64_logits_maxabs"] = float((lg - ref_logits).abs().max())
    assert len(captured) == n_layers
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    diffs = []
    for layer in range(n_layers):
        theirs = captured[layer][0].to(F64)[causal]
        mine = ref_index[layer][causal]
        diffs.append(float((theirs - mine).abs().max() / mine.abs().max()))
    report["indexer_scores_unpatched_vs_f64_max_rel"] = diffs
    for k, v in report.items():
        worst = max(v) if isinstance(v, list) else v
        assert worst < 1e-4, (k, v)
    return report


@torch.no_grad()
def reference(fixture_dir: str, cfg: dict, init_seed: int) -> tuple[dict, dict]:
    with open(os.path.join(fixture_dir, "config.json")) as f:
        config = json.load(f)
    n_layers = cfg["num_hidden_layers"]
    seq, k = cfg["seq_len"], cfg["index_topk"]
    toks = np.fromfile(os.path.join(fixture_dir, "tokens.bin"), dtype="<u4").astype(np.int64)
    n_win = len(toks) // seq
    windows = torch.from_numpy(toks[: n_win * seq].reshape(n_win, seq))
    assert 1 < k < seq

    ckpt = load_dequantized(fixture_dir)
    v32_config = dict(config, model_type="deepseek_v32", architectures=["DeepseekV32ForCausalLM"])
    if cfg["kind"] == "v31":
        assert not any(".indexer." in n for n in ckpt) and "index_topk" not in config
        # what the Rust loader does for a checkpoint without indexer weights
        for layer in range(n_layers):
            init = indexer_init_layer(f"model.layers.{layer}.self_attn.indexer.", cfg, init_seed)
            ckpt.update({n: torch.from_numpy(v).to(F64) for n, v in init.items()})
        v32_config.update({k_: cfg[k_] for k_ in ("index_n_heads", "index_head_dim", "index_topk")})

    v3 = make_model(DeepseekV3Config, DeepseekV3ForCausalLM, dict(config, model_type="deepseek_v3"), hf_state_dict(ckpt, cfg, False))
    v32 = make_model(DeepseekV32Config, DeepseekV32ForCausalLM, v32_config, hf_state_dict(ckpt, cfg, True))

    with f64_patches():
        logits_v3, _, router_v3 = run_windows(v3, windows, "dense", None, None, n_layers)
        logits_d, st_d, router_d = run_windows(v32, windows, "dense", seq, k, n_layers)
        dense_index_w0 = None
        # keep window 0's dense indexer logits for the patch validation
        REC.mode, REC.model_topk, REC.select_k, REC.recompute_dense = "dense", seq, k, False
        REC.reset()
        v32(input_ids=windows[:1], use_cache=False)
        dense_index_w0 = dict(REC.index)
        REC.mode = None
        logits_s, st_s, router_s = run_windows(v32, windows, "sparse", k, k, n_layers)
        # sparse path with top-k >= T must reproduce dense: all keys selected
        for layer in v32.model.layers:
            layer.self_attn.indexer.index_topk = seq
        REC.mode, REC.model_topk, REC.select_k, REC.recompute_dense = "sparse", seq, k, True
        logits_sT = torch.stack([v32(input_ids=windows[w : w + 1], use_cache=False).logits[0] for w in range(len(windows))])
        REC.mode = None

    # ---- self-checks ----
    d_v3_v32 = float((logits_v3 - logits_d).abs().max())
    assert d_v3_v32 < 1e-10, f"V3 dense vs V32 dense (top-k >= T) logits differ by {d_v3_v32}"
    d_sT = float((logits_sT - logits_d).abs().max())
    assert d_sT < 1e-10, f"sparse with k >= T differs from dense by {d_sT}"
    loss_d, loss_d_w = lm_loss(logits_d, windows)
    loss_s, loss_s_w = lm_loss(logits_s, windows)
    assert abs(loss_d - loss_s) > 1e-6, "top-k < T should change the loss"
    for st in (st_d, st_s):
        assert all(x >= 0 for x in st["kl_per_layer"])
        assert all(-1e-12 <= r <= 1 + 1e-12 for r in st["recall_per_layer"])
    validation = validate_patches(v3, v32, windows, n_layers, logits_d[0], dense_index_w0)

    def block(loss, st):
        return {
            "lm_loss": loss,
            "indexer_kl": float(np.mean(st["kl_per_layer"])),
            "indexer_kl_per_layer": st["kl_per_layer"],
            "attention_mass_recall": float(np.mean(st["recall_per_layer"])),
            "attention_mass_recall_per_layer": st["recall_per_layer"],
        }

    expected = {
        "seq_len": seq,
        "topk": k,
        "windows": n_win,
        "tokens": n_win * seq,
        "index_n_heads": cfg["index_n_heads"],
        "index_head_dim": cfg["index_head_dim"],
        "init_seed": init_seed,
        "dense": block(loss_d, st_d),
        "sparse": block(loss_s, st_s),
    }
    for mode, lg in (("dense", logits_d), ("sparse", logits_s)):
        path = os.path.join(fixture_dir, f"logits_{mode}.safetensors")
        save_file({"logits": lg.to(torch.float32).contiguous()}, path)
        os.chmod(path, 0o644)
    diagnostics = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "lm_loss_per_window": {"dense": loss_d_w, "sparse": loss_s_w},
        "max_abs_logits_v3_vs_v32_dense": d_v3_v32,
        "max_abs_logits_sparse_k_ge_T_vs_dense": d_sT,
        "max_abs_logits_dense_vs_sparse": float((logits_d - logits_s).abs().max()),
        "patch_validation_window0": validation,
        "topk_boundary": {
            mode: {
                "rows_all_layers_with_t_plus_1_gt_k": st["boundary_rows"],
                "exact_ties_at_kth_place": st["boundary_exact_ties"],
                "min_nonzero_gap_at_kth_place": st["boundary_min_gap"],
            }
            for mode, st in (("dense", st_d), ("sparse", st_s))
        },
        "router": {
            "v3_dense": router_v3,
            "v32_dense": router_d,
            "v32_sparse": router_s,
        },
    }
    return expected, diagnostics


# ==================================================================================
# Driver
# ==================================================================================
def build_fixture(name: str, cfg: dict, out_root: str, seed: int, init_seed: int) -> None:
    out_dir = os.path.join(out_root, name)
    os.makedirs(out_dir, exist_ok=True)
    for f in os.listdir(out_dir):  # stale shards of an earlier run with other shard counts
        if f.startswith("model-") and f.endswith(".safetensors"):
            os.remove(os.path.join(out_dir, f))
    rng = np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(name.encode())]))
    tensors = build_checkpoint(cfg, rng)
    shard_info = write_checkpoint(out_dir, cfg, tensors)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config_json(cfg), f, indent=2)
        f.write("\n")
    n_tok = cfg["windows"] * cfg["seq_len"] + cfg["extra_tokens"]
    toks = rng.integers(0, cfg["vocab_size"], n_tok).astype("<u4")
    toks.tofile(os.path.join(out_dir, "tokens.bin"))

    expected, diag = reference(out_dir, cfg, init_seed)
    diag["checkpoint"] = shard_info | {
        "tensors": len(tensors),
        "bytes": sum(nbytes(t) for _, t in tensors),
        "fp8_weights": sum(1 for n, t in tensors if t.dtype == torch.float8_e4m3fn),
        "weight_seed": seed,
        "fixture_spec": cfg,
    }
    with open(os.path.join(out_dir, "expected.json"), "w") as f:
        json.dump(expected, f, indent=2)
        f.write("\n")
    with open(os.path.join(out_dir, "diagnostics.json"), "w") as f:
        json.dump(diag, f, indent=2)
        f.write("\n")
    print(f"[{name}] dense  {json.dumps(expected['dense'])}")
    print(f"[{name}] sparse {json.dumps(expected['sparse'])}")
    print(f"[{name}] router 0-vs--inf sensitive tokens: {diag['router']}")
    print(f"[{name}] top-k boundary: {diag['topk_boundary']}")
    print(f"[{name}] patch validation: {diag['patch_validation_window0']}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="tests/fixtures", help="output root (default tests/fixtures)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights and tokens")
    ap.add_argument("--init-seed", type=int, default=0, help="seed of the deterministic indexer init (v31 fixtures)")
    ap.add_argument("--only", action="append", help="build only this fixture (repeatable)")
    ap.add_argument(
        "--spec",
        action="append",
        default=[],
        help='extra fixture as JSON: {"name": "v32_big", "base": "v32_tiny", "hidden_size": 320, ...}',
    )
    args = ap.parse_args(argv)
    if transformers.__version__ != EXPECTED_TRANSFORMERS:
        print(f"warning: transformers {transformers.__version__}, fixtures were designed with {EXPECTED_TRANSFORMERS}", file=sys.stderr)
    torch.manual_seed(0)
    fixtures = dict(FIXTURES)
    for s in args.spec:
        d = json.loads(s)
        name = d.pop("name")
        fixtures[name] = dict(FIXTURES[d.pop("base", "v32_tiny")], **d)
    names = args.only or list(FIXTURES)
    os.makedirs(args.out, exist_ok=True)
    write_indexer_init_sample(os.path.join(args.out, "indexer_init_sample.json"))
    for name in names:
        cfg = fixtures[name]
        assert cfg["qk_rope_head_dim"] % 2 == 0 and cfg["index_head_dim"] >= cfg["qk_rope_head_dim"]
        assert cfg["n_routed_experts"] % cfg["n_group"] == 0
        build_fixture(name, cfg, args.out, args.seed, args.init_seed)


if __name__ == "__main__":
    main()
