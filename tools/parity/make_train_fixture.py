#!/usr/bin/env python3
"""Training parity: the gradients of one micro-batch of the warm-up and of the sparse stage,
by torch autograd through transformers' DeepseekV32ForCausalLM in float64, with the two KL
losses written here. dsa-train's f32 CPU trainer must reproduce them (tests/parity.rs:
`one_training_micro_batch_matches_torch_autograd`).

Input: a fixture folder of make_fixtures.py (a V3.2 one: it has indexer weights). Uses the
first window of its tokens.bin (seq_len tokens, batch 1). The losses, as docs/training.md
defines them for one sequence of T tokens:

  warm-up:  L = sum over layers l of mean over t of KL(p_l[t] || softmax(I_l[t]))
            p_l = head-mean dense attention probabilities over the causal keys (detached),
            I_l = the indexer's logits with -inf on future keys; only indexer tensors learn.
  dense:    L = the sparse stage's loss without the KL, dense attention, every tensor but the
            indexer's and the router's correction bias learns (pre-training from scratch).
  sparse:   L = mean next-token NLL over T-1 positions
              + mtp_weight * mean NLL of the MTP module over T-2 positions
              + alpha * sum over the main MoE layers of sum_e f_e P_e
              + kl_weight * sum over layers l (the MTP layer's too) of
                  mean over t of KL(p_S[t] || softmax(I_S[t]))
            S_t = top-k of I_l[t] (higher score first, lower index on ties; all of 0..t when
            t < k), attention over S_t only, p_S its head-mean probabilities (detached), the
            indexer fed detached inputs; f_e = E / (K T) * (tokens routed to e), P_e = mean over
            t of s_e / sum_j s_j with s the router's sigmoid scores; every tensor learns but the
            router's correction bias. The MTP module (DeepSeek-V3 eq. 21-23): position i takes
            the main model's output after the final RMSNorm, h_i, and the embedding of token i+1:
            eh_proj([enorm(emb); hnorm(h)]) -> a decoder layer (its own indexer, sparse) ->
            shared_head.norm -> the main model's output head, predicting token i+2; its
            embedding and head are the main model's (one parameter each).

Output (in the fixture folder), for every trainable tensor under its checkpoint name (routed
experts split back into per-expert gate/up/down): in train_warmup.safetensors and
train_sparse.safetensors every `stride`-th value of its float64 gradient (flattened, from 0;
about SAMPLES values a tensor, so the files stay small), and in train_expected.json its shape,
stride, largest |value| and L2 norm, with the settings and the loss values.

AdamW (sparse stage only): torch.optim.AdamW takes two steps from the checkpoint's weights, the
first with the micro-batch's gradients, the second with -0.5 times them (so that both moments and
both bias corrections are exercised), each after clipping every group's gradients to
ADAMW["grad_clip"] by their global L2 norm (torch.nn.utils.clip_grad_norm_). Groups: the
indexer's tensors and the rest, each clipped by its own norm; weight decay on tensors of two or
more dimensions (linear, embedding, head and router weights), none on norms and biases. The
weights after each step are sampled like the gradients, as "adamw1/<name>" and "adamw2/<name>"
in train_sparse.safetensors; the group norms before clipping are in train_expected.json.

    ../dsa-venv-ref/bin/python tools/parity/make_train_fixture.py --fixture tests/fixtures/v32_tiny
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_fixtures as mf  # noqa: E402  (the f64 patches, the checkpoint reader, the model)

F64 = torch.float64
ALPHA = 0.1  # train.seq_balance_alpha of the Rust side
SAMPLES = 512  # gradient values kept per tensor (at least; every value of a small tensor)
KL_WEIGHT = 1.0  # train.kl_weight
MTP_WEIGHT = 0.3  # train.mtp_weight
# The optimizer steps after the sparse stage's micro-batch (train.*; lr large enough that an
# error in the update shows next to the weights, clip below the main group's norm so that one
# group is clipped and the other, the indexer's, is not).
ADAMW = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1, "grad_clip": 2.0}


class Capture:
    """What one training forward records (with autograd graphs where a loss needs them)."""

    def __init__(self):
        self.detach_indexer_inputs = False
        self.scores: dict[int, torch.Tensor] = {}  # layer -> indexer logits [T, T], -inf future
        self.router: list = []  # (layer, (sigmoid scores, chosen))


CAP = Capture()


def indexer_train_forward(self, hidden_states, q_resid, position_embeddings, attention_mask, position_ids, past_key_values=None):
    """make_fixtures' f64 indexer, keeping its logits' graph and (sparse stage) fed detached
    inputs; returns the same top-k indices."""
    if CAP.detach_indexer_inputs:
        hidden_states, q_resid = hidden_states.detach(), q_resid.detach()
    bsz, seq, _ = hidden_states.shape
    assert bsz == 1 and past_key_values is None
    nh, hd, rd = self.n_heads, self.head_dim, self.qk_rope_head_dim
    cos, sin = position_embeddings

    def rope_half(x, c, s):
        x1, x2 = x[..., : rd // 2], x[..., rd // 2 :]
        return x * c + torch.cat((-x2, x1), dim=-1) * s

    q = self.wq_b(q_resid).view(bsz, seq, nh, hd)
    k = self.k_norm(self.wk(hidden_states))
    q = torch.cat((rope_half(q[..., :rd], cos[:, :, None], sin[:, :, None]), q[..., rd:]), dim=-1)
    k = torch.cat((rope_half(k[..., :rd], cos, sin), k[..., rd:]), dim=-1)
    dots = torch.einsum("bthd,bsd->bhts", q, k)
    w = self.weights_proj(hidden_states) * (nh**-0.5) * (hd**-0.5)
    scores = torch.einsum("bth,bhts->bts", w, F.relu(dots))[0]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    CAP.scores[self.layer_idx] = scores
    order = mf.deterministic_order(scores)
    return order[:, : min(self.index_topk, seq)][None].to(torch.int32)


def router_train_forward(self, hidden_states):
    logits, w, idx = mf.router_forward_f64(self, hidden_states)
    CAP.router.append((self.layer_idx, (torch.sigmoid(logits), idx)))
    return logits, w, idx


def kl_rows(p: torch.Tensor, scores: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """Per query KL(p || softmax(scores)) over `support` (p detached, 0 off the support)."""
    logq = torch.log_softmax(scores.masked_fill(~support, float("-inf")), dim=-1)
    p = p.masked_fill(~support, 0.0)
    return torch.where(support, torch.xlogy(p, p) - p * logq.masked_fill(~support, 0.0), 0.0).sum(-1)


class MtpModule(torch.nn.Module):
    """The checkpoint's MTP layer (index L = num_hidden_layers) as transformers modules: a
    DeepseekV32DecoderLayer with its weights, enorm, hnorm, eh_proj and shared_head.norm."""

    def __init__(self, model, ckpt: dict, cfg: dict):
        super().__init__()
        L = cfg["num_hidden_layers"]
        conf = copy.deepcopy(model.config)
        conf.mlp_layer_types = list(conf.mlp_layer_types) + ["sparse"]
        conf.num_hidden_layers = L + 1
        self.layer = mf.mv32.DeepseekV32DecoderLayer(conf, L).to(F64)
        self.layer.mlp.gate.layer_idx = L
        d, eps = cfg["hidden_size"], conf.rms_norm_eps
        self.enorm = mf.mv32.DeepseekV32RMSNorm(d, eps).to(F64)
        self.hnorm = mf.mv32.DeepseekV32RMSNorm(d, eps).to(F64)
        self.head_norm = mf.mv32.DeepseekV32RMSNorm(d, eps).to(F64)
        self.eh_proj = torch.nn.Linear(2 * d, d, bias=False).to(F64)
        p = f"model.layers.{L}."
        own = {"enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight"}
        tied = {"embed_tokens.weight", "shared_head.head.weight"}  # the main model's
        layer_sd = {}
        for name, t in ckpt.items():
            if not name.startswith(p) or ".mlp.experts." in name:
                continue
            short = name[len(p) :]
            if short in own:
                mod = {"enorm.weight": self.enorm, "hnorm.weight": self.hnorm,
                       "eh_proj.weight": self.eh_proj, "shared_head.norm.weight": self.head_norm}[short]
                mod.weight.data.copy_(t)
            elif short not in tied:
                layer_sd[short] = t
        gu, dn = [], []
        for e in range(cfg["n_routed_experts"]):
            gu.append(torch.cat([ckpt[p + f"mlp.experts.{e}.gate_proj.weight"], ckpt[p + f"mlp.experts.{e}.up_proj.weight"]], 0))
            dn.append(ckpt[p + f"mlp.experts.{e}.down_proj.weight"])
        layer_sd["mlp.experts.gate_up_proj"] = torch.stack(gu)
        layer_sd["mlp.experts.down_proj"] = torch.stack(dn)
        missing, unexpected = self.layer.load_state_dict(layer_sd, strict=False)
        assert not missing and not unexpected, (missing, unexpected)
        self.prefix = p

    def forward(self, model, h0: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
        n = window.shape[1] - 1
        e = self.enorm(model.model.embed_tokens(window[:, 1:]))
        x = self.eh_proj(torch.cat([e, self.hnorm(h0[:, :n])], dim=-1))
        pos = torch.arange(n)[None]
        mask = mf.mv32.create_causal_mask(
            config=model.config, inputs_embeds=x, attention_mask=None, past_key_values=None,
            position_ids=pos, allow_is_causal_skip=False,
        )
        y = self.layer(x, attention_mask=mask, position_ids=pos, position_embeddings=model.model.rotary_emb(x, pos))
        return model.lm_head(self.head_norm(y))


def run_stage(model, mtp: MtpModule, window: torch.Tensor, stage: str, k: int, n_layers: int):
    seq = window.shape[1]
    mf.REC.mode, mf.REC.phase, mf.REC.recompute_dense = stage, "main", False
    mf.REC.model_topk = k if stage == "sparse" else seq  # top-k >= T: dense attention
    mf.REC.select_k = k
    mf.REC.reset()
    CAP.__init__()
    CAP.detach_indexer_inputs = stage == "sparse"
    model.zero_grad(set_to_none=True)
    mtp.zero_grad(set_to_none=True)
    for name, p in list(model.named_parameters()) + list(mtp.named_parameters()):
        if stage == "warmup":
            p.requires_grad_(".indexer." in name)
        elif stage == "sparse":
            p.requires_grad_("e_score_correction_bias" not in name)
        else:  # dense: the indexer neither runs a loss nor learns
            p.requires_grad_(".indexer." not in name and "e_score_correction_bias" not in name)
    h0 = model.model(input_ids=window, use_cache=False).last_hidden_state  # after model.norm
    logits = model.lm_head(h0)[0]
    mtp_logits = mtp(model, h0, window)[0]  # [T - 1, V]
    kl = torch.zeros((), dtype=F64)
    kl_main = None
    for layer in range(n_layers + 1):  # the main layers, then the MTP layer
        if layer == n_layers:
            kl_main = kl.detach().clone()
        p = mf.REC.probs[(layer, "main")].mean(0)  # head mean, detached by the recorder
        n = p.shape[-1]  # T, or T - 1 in the MTP layer
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        if stage != "sparse":
            support = causal
        else:
            order = mf.deterministic_order(CAP.scores[layer])
            support = torch.zeros(n, n, dtype=torch.bool).scatter(1, order[:, : min(k, n)], True) & causal
            assert torch.all(p[~support] < 1e-300), "the sparse attention reads S_t only"
        if stage != "dense":
            kl = kl + kl_rows(p, CAP.scores[layer], support).mean()
    values = {"indexer_kl_sum": float(kl_main), "mtp_indexer_kl": float(kl.detach() - kl_main)}
    if stage == "warmup":
        loss = kl
    else:
        logp = torch.log_softmax(logits[:-1], dim=-1)
        lm = -logp.gather(-1, window[0, 1:, None])[..., 0].mean()
        mtp_nll = -torch.log_softmax(mtp_logits[:-1], dim=-1).gather(-1, window[0, 2:, None])[..., 0].mean()
        balance = torch.zeros((), dtype=F64)
        for layer, (s, idx) in CAP.router:
            if layer >= n_layers:
                continue  # the trainer's balance loss covers the main layers
            n_tok, n_exp = s.shape
            top_k = idx.shape[1]
            f = torch.bincount(idx.reshape(-1), minlength=n_exp).to(F64) * (n_exp / (top_k * n_tok))
            balance = balance + (f * (s / s.sum(-1, keepdim=True)).mean(0)).sum()
        values.update(lm_loss=float(lm.detach()), mtp_loss=float(mtp_nll.detach()), balance_sum=float(balance.detach()))
        loss = lm + MTP_WEIGHT * mtp_nll + ALPHA * balance + (KL_WEIGHT * kl if stage == "sparse" else 0.0)
    loss.backward()
    mf.REC.mode = None
    return values


def gradients(model, mtp: MtpModule, cfg: dict) -> dict[str, torch.Tensor]:
    """Every parameter's gradient under its checkpoint name (fused experts split back)."""
    out = {}
    inter = cfg["moe_intermediate_size"]
    mtp_names = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight",
                 "eh_proj.weight": "eh_proj.weight", "head_norm.weight": "shared_head.norm.weight"}
    named = list(model.named_parameters()) + [
        (mtp.prefix + (mtp_names.get(n) or n.removeprefix("layer.")), p) for n, p in mtp.named_parameters()
    ]
    for name, p in named:
        if p.grad is None:
            continue
        g = p.grad.detach().to(F64).contiguous()
        if name.endswith("mlp.experts.gate_up_proj"):
            base = name[: -len("gate_up_proj")]
            for e in range(g.shape[0]):
                out[f"{base}{e}.gate_proj.weight"] = g[e, :inter].contiguous()
                out[f"{base}{e}.up_proj.weight"] = g[e, inter:].contiguous()
        elif name.endswith("mlp.experts.down_proj"):
            base = name[: -len("down_proj")]
            for e in range(g.shape[0]):
                out[f"{base}{e}.down_proj.weight"] = g[e].contiguous()
        else:
            out[name] = g
    return out


def adamw_steps(ckpt: dict, grads: dict[str, torch.Tensor]) -> tuple[list[dict], dict]:
    """Two AdamW steps over the tensors in `grads` from their checkpoint values (f64): the
    weights after each step, and the squared norm of each group's gradient at each step."""
    params = {n: torch.nn.Parameter(ckpt[n].to(F64).clone()) for n in grads}
    groups = {"main": [n for n in grads if ".indexer." not in n], "indexer": [n for n in grads if ".indexer." in n]}
    opt = torch.optim.AdamW(
        [{"params": [params[n] for n in names if params[n].dim() >= 2], "weight_decay": ADAMW["weight_decay"]}
         for names in groups.values()]
        + [{"params": [params[n] for n in names if params[n].dim() < 2], "weight_decay": 0.0}
           for names in groups.values()],
        lr=ADAMW["lr"], betas=(ADAMW["beta1"], ADAMW["beta2"]), eps=ADAMW["eps"], foreach=False)
    after, norms = [], {}
    for step, factor in ((1, 1.0), (2, -0.5)):
        for n, g in grads.items():
            params[n].grad = g.to(F64) * factor
        for group, names in groups.items():
            norm = torch.nn.utils.clip_grad_norm_([params[n] for n in names], ADAMW["grad_clip"])
            norms[f"{group}_step{step}"] = float(norm)
        opt.step()
        after.append({n: p.detach().clone() for n, p in params.items()})
    return after, norms


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fixture", required=True, help="a V3.2 fixture folder of make_fixtures.py")
    args = ap.parse_args(argv)
    d = args.fixture
    with open(os.path.join(d, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(d, "expected.json")) as f:
        expected = json.load(f)
    seq, k = expected["seq_len"], expected["topk"]
    n_layers = config["num_hidden_layers"]
    toks = np.fromfile(os.path.join(d, "tokens.bin"), dtype="<u4").astype(np.int64)
    window = torch.from_numpy(toks[:seq].copy())[None]
    ckpt = mf.load_dequantized(d)
    assert any(".indexer." in n for n in ckpt), "a V3.2 fixture (with indexer weights) is needed"
    cfg = dict(config)
    model = mf.make_model(mf.DeepseekV32Config, mf.DeepseekV32ForCausalLM, config, mf.hf_state_dict(ckpt, cfg, True))
    patches = [
        (mf.mv32.DeepseekV32Indexer, "forward", indexer_train_forward),
        (mf.mv32.DeepseekV32TopkRouter, "forward", router_train_forward),
    ]
    mtp = MtpModule(model, ckpt, cfg)
    report = {"seq_len": seq, "topk": k, "seq_balance_alpha": ALPHA, "kl_weight": KL_WEIGHT,
              "mtp_weight": MTP_WEIGHT, "window": 0}
    with mf.f64_patches():
        saved = [(o, a, getattr(o, a)) for o, a, _ in patches]
        for o, a, new in patches:
            setattr(o, a, new)
        try:
            for stage in ("warmup", "sparse", "dense"):
                report[stage] = run_stage(model, mtp, window, stage, k, n_layers)
                grads = gradients(model, mtp, cfg)
                samples, stats = {}, {}
                for name, g in sorted(grads.items()):
                    flat = g.reshape(-1)
                    stride = max(1, flat.numel() // SAMPLES)
                    samples[name] = flat[::stride].contiguous()
                    stats[name] = {
                        "shape": list(g.shape),
                        "stride": stride,
                        "max_abs": float(flat.abs().max()),
                        "l2": float(flat.norm()),
                    }
                report[stage]["gradients"] = stats
                if stage == "sparse":
                    after, norms = adamw_steps(ckpt, grads)
                    for i, weights in enumerate(after):
                        for name, w in weights.items():
                            stride = stats[name]["stride"]
                            samples[f"adamw{i + 1}/{name}"] = w.reshape(-1)[::stride].contiguous()
                    report["adamw"] = dict(ADAMW, group_norms=norms)
                save_file(samples, os.path.join(d, f"train_{stage}.safetensors"))
        finally:
            for o, a, old in saved:
                setattr(o, a, old)
    with open(os.path.join(d, "train_expected.json"), "w") as f:
        json.dump(report, f, indent=1, sort_keys=True)
        f.write("\n")
    print(json.dumps(report, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
