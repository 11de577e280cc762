#!/usr/bin/env python3
"""Write the golden fixtures of the diffmoe model from the independent PyTorch reference.

    python3 tools/reference/make_golden.py --out tests/fixtures

writes tests/fixtures/golden_diff.safetensors and tests/fixtures/golden_plain.safetensors.
Each file holds the weights (F32, checkpoint names of model.md §8), the input batch (I32), and the
float64 results of the reference computed from those F32 weights: logits, LM loss, aux loss, the
gradient of (lm_loss + aux_loss) for every parameter, lambda per differential layer, expert
counts per MoE layer (plus debug.* intermediates). Before writing, the generator asserts its own
consistency (finite differences, routing invariants, absorbed-vs-naive attention, dense-vs-
dispatched MoE, CE and aux-loss identities) and after writing it reloads the file and rebuilds the
model from it. Dependencies: torch, safetensors (and the Python standard library).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
from typing import Any, Dict, List, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from diffmoe_ref import CONFIG_KEYS, DTYPE, Config, DiffMoE, rope_frequencies  # noqa: E402

torch.set_default_dtype(torch.float64)

BATCH = 2
SEQ_LEN = 11
FD_STEP = 1e-6
FD_TOL = 1e-5

# Every §9 key, explicit (no defaults relied on).
CONFIG_DIFF: Dict[str, Any] = {
    "vocab_size": 67, "dim": 32, "n_layers": 3, "n_dense_layers": 1, "n_heads": 4,
    "q_lora_rank": 16, "kv_lora_rank": 12, "qk_nope_head_dim": 6, "qk_rope_head_dim": 4,
    "v_head_dim": 5, "inter_dim": 40, "moe_inter_dim": 12, "n_routed_experts": 8,
    "n_shared_experts": 1, "n_activated_experts": 2, "n_expert_groups": 4, "n_limited_groups": 2,
    "score_func": "sigmoid", "route_scale": 1.5, "balance_bias": True, "bias_update_rate": 0.001,
    "aux_loss_alpha": 0.01, "max_seq_len": 16, "original_seq_len": 8, "rope_theta": 10000.0,
    "rope_factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "differential": True,
    "tie_embeddings": False, "init_std": 0.02, "embed_init_std": 0.02, "embed_scale": math.sqrt(32.0),
    "norm_eps": 1e-6,
}

CONFIG_PLAIN: Dict[str, Any] = dict(CONFIG_DIFF)
CONFIG_PLAIN.update({
    "differential": False, "q_lora_rank": 0, "score_func": "softmax", "route_scale": 1.0,
    "n_expert_groups": 1, "n_limited_groups": 1, "balance_bias": False, "aux_loss_alpha": 0.001,
    "max_seq_len": 16, "original_seq_len": 16, "rope_factor": 1.0, "tie_embeddings": True,
    "embed_scale": 1.0, "n_activated_experts": 3,
})

FIXTURES = {
    # name: (config, weight/input seed, number of ignored targets)
    "golden_diff": (CONFIG_DIFF, 20240601, 3),
    "golden_plain": (CONFIG_PLAIN, 20240602, 2),
}


# ---------------------------------------------------------------------------------------------
# Weights and inputs
# ---------------------------------------------------------------------------------------------

def f32_round(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).to(DTYPE)


class PyRng:
    """Seeded draws from Python's own Mersenne Twister (random.Random), so that the same seed
    gives the same weights and batch with any torch version or machine."""

    def __init__(self, seed: int) -> None:
        self.r = random.Random(seed)

    def normal(self, shape) -> torch.Tensor:
        n = 1
        for d in shape:
            n *= int(d)
        return torch.tensor([self.r.gauss(0.0, 1.0) for _ in range(n)], dtype=DTYPE).reshape(tuple(shape))

    def randint(self, high: int, shape) -> torch.Tensor:
        n = 1
        for d in shape:
            n *= int(d)
        return torch.tensor([self.r.randrange(high) for _ in range(n)], dtype=torch.long).reshape(tuple(shape))

    def sample(self, n: int, k: int) -> List[int]:
        return self.r.sample(range(n), k)


def fill_weights(model: DiffMoE, cfg: Config, gen: PyRng) -> None:
    """Spreads larger than the §6 init so every branch matters: linear / expert / gate / head
    weights N(0, 1/in); norm and subln weights 1 + 0.2 N; lambda vectors N(0, 0.3^2); gate.bias
    N(0, 0.05^2) when balance_bias else 0; embedding N(0, 1). Drawn in state_dict order from one
    PyRng stream, then rounded to float32 (all later maths is float64 on those values)."""
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            z = gen.normal(t.shape)
            leaf = name.split(".")[-2] if name.endswith(".weight") else name.split(".")[-1]
            if name == "embed.weight":
                v = z
            elif name.endswith("gate.bias"):
                v = 0.05 * z if cfg.balance_bias else torch.zeros_like(z)
            elif leaf in ("attn_norm", "ffn_norm", "q_norm", "kv_norm", "norm", "subln"):
                v = 1.0 + 0.2 * z
            elif leaf.startswith("lambda_"):
                v = 0.3 * z
            else:   # [out, in] or stacked [E, out, in]
                v = z / math.sqrt(t.shape[-1])
            t.copy_(f32_round(v))


def make_inputs(cfg: Config, gen: PyRng, n_ignored: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """tokens uniform in [0, vocab); targets = the next token, a few set to -1 (ignored)."""
    seq = gen.randint(cfg.vocab_size, (BATCH, SEQ_LEN + 1))
    tokens = seq[:, :SEQ_LEN].clone()
    targets = seq[:, 1:].clone()
    for flat in gen.sample(BATCH * SEQ_LEN, n_ignored):
        targets.view(-1)[flat] = -1
    return tokens, targets


# ---------------------------------------------------------------------------------------------
# Self-checks
# ---------------------------------------------------------------------------------------------

def routing_signature(out: Dict[str, Any]) -> List[torch.Tensor]:
    sig = []
    for l in sorted(out["idx"]):
        sig.append(out["idx"][l].sort(dim=-1).values)
        sig.append(out["aux_idx"][l].sort(dim=-1).values)
    return sig


def same_routing(a: List[torch.Tensor], b: List[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def total_loss(model: DiffMoE, tokens, targets) -> Tuple[float, List[torch.Tensor]]:
    with torch.no_grad():
        out = model(tokens, targets)
    return float(out["lm_loss"] + out["aux_loss"]), routing_signature(out)


def check_finite_differences(model: DiffMoE, tokens, targets, grads: Dict[str, torch.Tensor],
                             gen: PyRng) -> Dict[str, float]:
    """Central differences (h = 1e-6) on the largest-|g| entry of every parameter (relative error
    < 1e-5) and on one random entry of every parameter (|fd - g| < 1e-5 * max(|g|, 1e-2)),
    keeping only perturbations that leave every routing choice unchanged."""
    _, sig0 = total_loss(model, tokens, targets)
    params = dict(model.named_parameters())
    worst_rel, worst_rnd, n_checked, n_skipped = 0.0, 0.0, 0, 0
    per_param: Dict[str, float] = {}
    for name, p in params.items():
        g = grads[name].reshape(-1)
        order = torch.argsort(g.abs(), descending=True).tolist()
        rnd = gen.sample(g.numel(), min(20, g.numel()))
        for kind, cands in (("max", order), ("random", rnd)):
            done = False
            for flat in cands[:20]:
                flat_view = p.data.view(-1)
                orig = float(flat_view[flat])
                flat_view[flat] = orig + FD_STEP
                lp, sp = total_loss(model, tokens, targets)
                flat_view[flat] = orig - FD_STEP
                lm, sm = total_loss(model, tokens, targets)
                flat_view[flat] = orig
                if not (same_routing(sig0, sp) and same_routing(sig0, sm)):
                    n_skipped += 1
                    continue            # a routing choice flipped: try the next entry
                fd = (lp - lm) / (2 * FD_STEP)
                ga = float(g[flat])
                if kind == "max":
                    rel = abs(fd - ga) / max(abs(fd), abs(ga), 1e-300)
                    assert abs(ga) > 1e-6, f"{name}: largest gradient entry is {ga:.3e} (dead parameter?)"
                    assert rel < FD_TOL, f"FD check {name}[{flat}]: autograd {ga:.12e} vs FD {fd:.12e} (rel {rel:.2e})"
                    worst_rel = max(worst_rel, rel)
                    per_param[name] = rel
                else:
                    err = abs(fd - ga) / max(abs(ga), 1e-2)
                    assert err < FD_TOL, f"FD check {name}[{flat}] (random): autograd {ga:.12e} vs FD {fd:.12e}"
                    worst_rnd = max(worst_rnd, err)
                n_checked += 1
                done = True
                break
            assert done, f"FD check {name}: every candidate entry flipped a routing choice"
    return {"worst_rel": worst_rel, "worst_random": worst_rnd, "checked": n_checked,
            "skipped_flips": n_skipped, "per_param": per_param}


def check_routing(model: DiffMoE, out: Dict[str, Any], cfg: Config) -> Dict[str, int]:
    """(b) K distinct experts per token, counts consistent; (c) weight sums; top-k and group
    optimality; coverage of the bias and group branches."""
    B, T = BATCH, SEQ_LEN
    E, K, G = cfg.n_routed_experts, cfg.n_activated_experts, cfg.n_expert_groups
    bias_changed = group_changed = 0
    for l in sorted(out["idx"]):
        r = out["route"][l]
        idx, w, s, s_sel, kept = r["idx"], r["w"], r["s"].detach(), r["s_sel"], r["group_kept"]
        N = idx.shape[0]
        assert N == B * T
        # (b) exactly K distinct experts per token; counts = assignments per expert
        srt = idx.sort(dim=-1).values
        assert bool((srt[:, 1:] != srt[:, :-1]).all()), f"layer {l}: a token got a repeated expert"
        counts = out["counts"][l]
        assert int(counts.sum()) == B * T * K, f"layer {l}: counts sum {int(counts.sum())} != {B * T * K}"
        assert torch.equal(counts, torch.bincount(idx.reshape(-1), minlength=E)), f"layer {l}: counts"
        # selection is the top-K of the masked biased scores, inside the kept groups
        sel = torch.zeros(N, E, dtype=torch.bool).scatter_(1, idx, True)
        sel_min = s_sel.masked_fill(~sel, float("inf")).min(dim=-1).values
        rest_max = s_sel.masked_fill(sel, float("-inf")).max(dim=-1).values
        assert bool(torch.isfinite(sel_min).all()), f"layer {l}: selected a masked expert"
        assert bool((sel_min > rest_max).all()), f"layer {l}: selection is not the top-K"
        expert_group = torch.arange(E) // (E // G)
        assert bool(kept.gather(1, expert_group[idx]).all()), f"layer {l}: expert outside kept groups"
        assert bool((kept.sum(dim=-1) == cfg.n_limited_groups).all()) or G == 1
        # (c) weights: gathered from the unbiased scores, renormalised for sigmoid, scaled
        sw = s.gather(1, idx)
        if cfg.score_func == "sigmoid":
            ws = w.detach().sum(dim=-1)
            assert float((ws - cfg.route_scale).abs().max()) < 1e-12, f"layer {l}: weights do not sum to route_scale"
            ref_w = sw / sw.sum(dim=-1, keepdim=True) * cfg.route_scale
        else:
            ref_w = sw * cfg.route_scale
        assert float((w.detach() - ref_w).abs().max()) < 1e-14, f"layer {l}: weights not from unbiased s"
        # coverage: did the bias / the group limit change any choice?
        sb = s + model.layers[l].ffn.gate.bias if cfg.balance_bias else s
        top_biased_nogroup = sb.topk(K, dim=-1).indices.sort(dim=-1).values
        top_plain = s.topk(K, dim=-1).indices.sort(dim=-1).values
        bias_changed += int((top_biased_nogroup != top_plain).any(dim=-1).sum())
        group_changed += int((top_biased_nogroup != srt).any(dim=-1).sum())
    return {"tokens_bias_changed": bias_changed, "tokens_group_changed": group_changed}


def check_second_forms(model: DiffMoE, out: Dict[str, Any], cfg: Config, tokens) -> Dict[str, float]:
    """(d) absorbed-latent attention == naive attention; dispatched MoE == dense MoE."""
    from diffmoe_ref import rope_angles
    angles = rope_angles(cfg, tokens.shape[1])
    att_err = moe_err = 0.0
    with torch.no_grad():
        for blk in model.layers:
            l = blk.layer
            x = out["attn_in"][l]
            a = blk.attn(x, angles)
            b = blk.attn.forward_absorbed(x, angles)
            att_err = max(att_err, float((a - b).abs().max()))
            if cfg.is_moe_layer(l):
                u = out["ffn_in"][l]
                moe_err = max(moe_err, float((blk.ffn(u)["y"] - blk.ffn.forward_dense_check(u)).abs().max()))
    assert att_err < 1e-10, f"absorbed vs naive attention differ by {att_err:.3e}"
    assert moe_err < 1e-12, f"dispatched vs dense MoE differ by {moe_err:.3e}"
    return {"absorbed_vs_naive": att_err, "moe_dispatch_vs_dense": moe_err}


def check_losses(model: DiffMoE, out: Dict[str, Any], cfg: Config, targets) -> None:
    """LM loss by hand; aux loss in Megatron's count form (docs/derivations.md §4.6)."""
    V = cfg.vocab_size
    logits = out["logits"].detach().reshape(-1, V)
    t = targets.reshape(-1)
    valid = t >= 0
    lp = torch.log_softmax(logits[valid], dim=-1).gather(1, t[valid].unsqueeze(1))
    ce = -lp.mean()
    assert abs(float(ce) - float(out["lm_loss"].detach())) < 1e-12, "cross-entropy by hand differs"
    E, K, T = cfg.n_routed_experts, cfg.n_activated_experts, SEQ_LEN
    aux = 0.0
    for l in sorted(out["idx"]):
        s = out["route"][l]["s"].detach().reshape(BATCH, T, E)
        p = s / s.sum(dim=-1, keepdim=True)
        per_seq = []
        for b in range(BATCH):
            count = torch.bincount(s[b].topk(K, dim=-1).indices.reshape(-1), minlength=E).to(DTYPE)
            per_seq.append(float((p[b].sum(dim=0) * count).sum()) * E * cfg.aux_loss_alpha / (K * T * T))
        aux += sum(per_seq) / BATCH
    assert abs(aux - float(out["aux_loss"].detach())) < 1e-14 + 1e-12 * abs(aux), "aux loss (count form) differs"


def check_structure(model: DiffMoE, cfg: Config) -> None:
    names = set(model.state_dict().keys())
    params = set(n for n, _ in model.named_parameters())
    for l in range(cfg.n_layers):
        p = f"layers.{l}."
        need = [p + "attn_norm.weight", p + "attn.wkv_a.weight", p + "attn.kv_norm.weight",
                p + "attn.wkv_b.weight", p + "attn.wo.weight", p + "ffn_norm.weight"]
        need += ([p + "attn.wq_a.weight", p + "attn.q_norm.weight", p + "attn.wq_b.weight"]
                 if cfg.q_lora_rank > 0 else [p + "attn.wq.weight"])
        if cfg.differential:
            need += [p + "attn.subln.weight"] + [p + f"attn.lambda_{x}" for x in ("q1", "k1", "q2", "k2")]
        if cfg.is_moe_layer(l):
            need += [p + "ffn.gate.weight", p + "ffn.gate.bias"] + [p + f"ffn.experts.w{i}" for i in (1, 2, 3)]
            if cfg.n_shared_experts > 0:
                need += [p + f"ffn.shared.w{i}.weight" for i in (1, 2, 3)]
            assert p + "ffn.gate.bias" not in params, "gate.bias must not be a parameter"
        else:
            need += [p + f"ffn.w{i}.weight" for i in (1, 2, 3)]
        for n in need:
            assert n in names, f"missing tensor {n}"
    need = ["embed.weight", "norm.weight"] + ([] if cfg.tie_embeddings else ["head.weight"])
    for n in need:
        assert n in names, f"missing tensor {n}"
    assert cfg.tie_embeddings == ("head.weight" not in names)


# ---------------------------------------------------------------------------------------------
# One fixture
# ---------------------------------------------------------------------------------------------

def build_fixture(name: str, cfg_dict: Dict[str, Any], seed: int, n_ignored: int):
    assert list(cfg_dict.keys()) == list(CONFIG_KEYS) or set(cfg_dict) == set(CONFIG_KEYS), \
        f"{name}: config must list every §9 key"
    cfg = Config.from_dict(cfg_dict)
    assert cfg.to_dict() == {k: cfg_dict[k] for k in CONFIG_KEYS}, f"{name}: config round trip"
    gen = PyRng(seed)
    model = DiffMoE(cfg)
    check_structure(model, cfg)
    fill_weights(model, cfg, gen)
    tokens, targets = make_inputs(cfg, gen, n_ignored)
    assert int((targets < 0).sum()) == n_ignored

    out = model(tokens, targets, collect=True)
    loss = out["lm_loss"] + out["aux_loss"]
    named = model.trainable()
    gl = torch.autograd.grad(loss, [p for _, p in named])
    grads = {n: g.detach() for (n, _), g in zip(named, gl)}
    assert all(bool(torch.isfinite(g).all()) for g in grads.values()), f"{name}: non-finite gradient"
    assert bool(torch.isfinite(out["logits"]).all())

    # ---- self-checks ----
    stats: Dict[str, Any] = {}
    stats.update(check_routing(model, out, cfg))
    stats.update(check_second_forms(model, out, cfg, tokens))
    check_losses(model, out, cfg, targets)
    if cfg.differential:
        for l, lam in out["lambda"].items():
            assert abs(float(lam.detach()) - Config.lambda_init(l)) > 1e-3, f"layer {l}: lambda == lambda_init"
    if cfg.balance_bias:
        assert stats["tokens_bias_changed"] > 0, f"{name}: the balancing bias never changed a choice (pick another seed)"
    if cfg.n_expert_groups > 1:
        assert stats["tokens_group_changed"] > 0, f"{name}: the group limit never changed a choice (pick another seed)"
    if cfg.yarn:
        plain = Config.from_dict({**cfg_dict, "original_seq_len": cfg.max_seq_len})
        fy, fp = rope_frequencies(cfg), rope_frequencies(plain)
        assert bool((fy != fp).any()) and bool((fy == fp).any()), f"{name}: YaRN ramp not exercised"
        assert cfg.softmax_scale() > cfg.d_qk ** -0.5
    fd = check_finite_differences(model, tokens, targets, grads, PyRng(seed + 7))
    stats["fd"] = fd

    # ---- tensors ----
    tensors: Dict[str, torch.Tensor] = {}
    for n, t in model.state_dict().items():
        t32 = t.detach().to(torch.float32)
        assert torch.equal(t32.to(DTYPE), t.detach()), f"{n} is not float32-representable"
        tensors[n] = t32.contiguous()
    tensors["input.tokens"] = tokens.to(torch.int32).contiguous()
    tensors["input.targets"] = targets.to(torch.int32).contiguous()
    tensors["expected.logits"] = out["logits"].detach().contiguous()
    tensors["expected.lm_loss"] = out["lm_loss"].detach().reshape(1).clone()
    tensors["expected.aux_loss"] = out["aux_loss"].detach().reshape(1).clone()
    for n, g in grads.items():
        tensors["expected.grad." + n] = g.contiguous()
    for l, lam in out["lambda"].items():
        tensors[f"expected.lambda.layers.{l}"] = lam.detach().reshape(1).clone()
    K = cfg.n_activated_experts
    for l in sorted(out["idx"]):
        tensors[f"expected.counts.layers.{l}"] = out["counts"][l].to(torch.int32).contiguous()
        srt, order = out["idx"][l].sort(dim=-1)
        tensors[f"debug.route_idx.layers.{l}"] = srt.reshape(BATCH, SEQ_LEN, K).to(torch.int32).contiguous()
        tensors[f"debug.route_weight.layers.{l}"] = (
            out["w"][l].detach().gather(1, order).reshape(BATCH, SEQ_LEN, K).contiguous())
        tensors[f"debug.aux_loss.layers.{l}"] = model.layers[l].ffn.aux_loss(
            out["route"][l]["s"].detach(), BATCH, SEQ_LEN)["loss"].reshape(1).clone()
    for l, h in out["hidden"].items():
        tensors[f"debug.hidden.layers.{l}"] = h.detach().contiguous()
    for t in tensors.values():
        if t.is_floating_point():
            assert bool(torch.isfinite(t).all())

    meta = {
        "format": "pt",
        "config": json.dumps(cfg.to_dict()),
        "batch": str(BATCH),
        "seq_len": str(SEQ_LEN),
        "generator": "tools/reference/make_golden.py",
        "torch": str(torch.__version__),
        "seed": str(seed),
    }
    summary = {
        "lm_loss": float(out["lm_loss"].detach()), "aux_loss": float(out["aux_loss"].detach()),
        "lambda": {l: float(v.detach()) for l, v in out["lambda"].items()},
        "counts": {l: out["counts"][l].tolist() for l in sorted(out["counts"])},
        **{k: v for k, v in stats.items() if k != "fd"},
        "fd_worst_rel_max_entries": fd["worst_rel"], "fd_worst_random_entries": fd["worst_random"],
        "fd_entries_checked": fd["checked"], "fd_skipped_for_routing_flip": fd["skipped_flips"],
    }
    return tensors, meta, summary


def verify_file(path: str, tensors: Dict[str, torch.Tensor], meta: Dict[str, str]) -> None:
    """Reload the written file, compare bit for bit, rebuild the model from it alone."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    back = load_file(path)
    assert set(back) == set(tensors), "reloaded names differ"
    for n, t in tensors.items():
        assert back[n].dtype == t.dtype and back[n].shape == t.shape, f"{n}: dtype/shape after reload"
        assert torch.equal(back[n], t), f"{n}: values after reload"
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == meta, "metadata after reload"
    cfg = Config.from_dict(json.loads(meta["config"]))
    model = DiffMoE(cfg)
    sd = {n: back[n].to(DTYPE) for n in model.state_dict()}
    model.load_state_dict(sd, strict=True)
    with torch.no_grad():
        out = model(back["input.tokens"].long(), back["input.targets"].long())
    assert float((out["logits"] - back["expected.logits"]).abs().max()) < 1e-12, "rebuilt model: logits differ"
    assert abs(float(out["lm_loss"].detach()) - float(back["expected.lm_loss"][0])) < 1e-12, "rebuilt model: lm_loss differs"
    assert abs(float(out["aux_loss"].detach()) - float(back["expected.aux_loss"][0])) < 1e-14, "rebuilt model: aux_loss differs"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="tests/fixtures", help="output folder (default tests/fixtures)")
    ap.add_argument("--only", choices=sorted(FIXTURES), action="append",
                    help="write only this fixture (repeatable)")
    args = ap.parse_args(argv)
    from safetensors.torch import save_file

    os.makedirs(args.out, exist_ok=True)
    for name in (args.only or list(FIXTURES)):
        cfg_dict, seed, n_ignored = FIXTURES[name]
        tensors, meta, summary = build_fixture(name, cfg_dict, seed, n_ignored)
        path = os.path.join(args.out, name + ".safetensors")
        save_file(tensors, path, metadata=meta)
        verify_file(path, tensors, meta)
        print(f"{path}: {len(tensors)} tensors, {os.path.getsize(path)} bytes")
        for k, v in summary.items():
            print(f"  {k}: {v}")
    print("all self-checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
