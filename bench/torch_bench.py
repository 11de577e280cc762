#!/usr/bin/env python3
"""PyTorch side of the diffmoe training benchmark (bench preset, docs/model.md §9 MFU).

Times full training steps of bench/torch_model.py -- forward + backward + global-norm gradient
clipping + fused AdamW + balancing-bias update -- in eager mode and with regional torch.compile,
plus two op benchmarks (experts through torch._grouped_mm; differential attention through SDPA).
With --decode / --decode-only: prefill and greedy KV-cache decode tokens/s of bench/torch_decode.py
(eager loop, CUDA-graph step; expanded and absorbed-latent caches) after a correctness self-check.
Prints a markdown table at the end and writes JSON with --json.

    python3 bench/torch_bench.py --json torch_bench.json            # eager + compile, ~5-6 min
    python3 bench/torch_bench.py --quick --modes eager --json q.json
    python3 bench/torch_bench.py --dry-run                           # config, FLOPs, params; no GPU
    python3 bench/torch_bench.py --decode-only --json d.json         # KV-cache prefill/decode, ~1-2 min

See bench/README.md for what is measured and the fair choices made.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback
from typing import Any, Dict, List, Tuple

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_HERE)
sys.path.insert(0, _HERE)
import torch_decode as td  # noqa: E402
import torch_model as tm  # noqa: E402
from torch_model import Config  # noqa: E402

PEAK_TFLOPS = 989.0          # docs/model.md §9: H100/H200 dense BF16
BENCH_YAML = os.path.join(_REPO, "configs", "bench.yaml")
# configs/bench.yaml, used only when the file cannot be read (identical values).
BENCH_FALLBACK: Dict[str, Any] = {
    "vocab_size": 32768, "dim": 1536, "n_layers": 12, "n_dense_layers": 1, "n_heads": 16,
    "q_lora_rank": 768, "kv_lora_rank": 256, "qk_nope_head_dim": 64, "qk_rope_head_dim": 32,
    "v_head_dim": 64, "inter_dim": 4096, "moe_inter_dim": 512, "n_routed_experts": 64,
    "n_shared_experts": 2, "n_activated_experts": 4, "n_expert_groups": 8, "n_limited_groups": 4,
    "max_seq_len": 2048, "original_seq_len": 2048,
}
BENCH_BATCH = 8              # docs/model.md §10: micro-batch 8 sequences of 2048 tokens
DEV = "cuda"                 # the benchmark device (a module variable only for offline tests)
COMPILE_MODES = {"compile": "default", "compile-max": "max-autotune-no-cudagraphs"}


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

def _scalar(text: str) -> Any:
    t = text.strip()
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "'\"":
        return t[1:-1]
    low = t.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("null", "~", ""):
        return None
    try:
        return int(t)
    except ValueError:
        pass
    try:
        return float(t)
    except ValueError:
        return t


def _strip_comment(line: str) -> str:
    quote = None
    for i, ch in enumerate(line):
        if ch in "'\"":
            quote = None if quote == ch else (ch if quote is None else quote)
        elif ch == "#" and quote is None and (i == 0 or line[i - 1] in " \t"):
            return line[:i]
    return line


def read_yaml(path: str) -> Dict[str, Any]:
    """PyYAML when importable; else a tiny reader for nested `key: value` mappings (all our
    config files need)."""
    try:
        import yaml  # type: ignore
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f) or {}
    except ImportError:
        pass
    root: Dict[str, Any] = {}
    stack: List[Tuple[int, Dict[str, Any]]] = [(-1, root)]
    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = _strip_comment(raw.rstrip("\n")).rstrip()
            if not line.strip() or line.strip() == "---":
                continue
            indent = len(line) - len(line.lstrip(" "))
            key, sep, val = line.strip().partition(":")
            if not sep:
                raise ValueError(f"{path}: cannot parse line: {raw.rstrip()}")
            while stack and indent <= stack[-1][0]:
                stack.pop()
            parent = stack[-1][1]
            key = key.strip().strip("'\"")
            if val.strip() == "":
                child: Dict[str, Any] = {}
                parent[key] = child
                stack.append((indent, child))
            else:
                parent[key] = _scalar(val)
    return root


def load_config(path: str) -> Tuple[Config, str]:
    try:
        doc = read_yaml(path)
        model = dict(doc["model"])
        src = path
    except (OSError, KeyError, TypeError) as e:
        model = dict(BENCH_FALLBACK)
        src = f"built-in copy of configs/bench.yaml ({type(e).__name__}: {e})"
    return Config.from_dict(model), src


def flops_per_token(cfg: Config, seq: int) -> Dict[str, float]:
    """docs/model.md §9: 6*(active non-embedding matmul weights + head) + 3*L*seq*H*(d_qk + d_v,eff)."""
    D, H, L = cfg.dim, cfg.n_heads, cfg.n_layers
    if cfg.q_lora_rank > 0:
        attn = cfg.q_lora_rank * D + H * cfg.d_qk * cfg.q_lora_rank
    else:
        attn = H * cfg.d_qk * D
    attn += (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * D
    attn += H * (cfg.qk_nope_head_dim + cfg.v_head_dim) * cfg.kv_lora_rank
    attn += D * H * cfg.v_head_dim
    dense = 3 * D * cfg.inter_dim
    moe = (cfg.n_routed_experts * D                                        # gate
           + cfg.n_activated_experts * 3 * D * cfg.moe_inter_dim           # routed, active
           + 3 * D * cfg.n_shared_experts * cfg.moe_inter_dim)             # shared
    n_moe = L - cfg.n_dense_layers
    head = cfg.vocab_size * D
    matmul = L * attn + cfg.n_dense_layers * dense + n_moe * moe + head
    dv_eff = 2 * cfg.v_head_dim if cfg.differential else cfg.v_head_dim
    att = 3 * L * seq * H * (cfg.d_qk + dv_eff)
    return {"total": 6.0 * matmul + att, "matmul_weights": float(matmul), "matmul": 6.0 * matmul,
            "attention": float(att)}


def param_counts(cfg: Config) -> Tuple[int, int]:
    """(total, active) parameters from the shapes (gate.bias is a buffer, not counted)."""
    D, H, L = cfg.dim, cfg.n_heads, cfg.n_layers
    attn = (cfg.q_lora_rank * D + cfg.q_lora_rank + H * cfg.d_qk * cfg.q_lora_rank
            if cfg.q_lora_rank > 0 else H * cfg.d_qk * D)
    attn += (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * D + cfg.kv_lora_rank
    attn += H * (cfg.qk_nope_head_dim + cfg.v_head_dim) * cfg.kv_lora_rank + D * H * cfg.v_head_dim
    if cfg.differential:
        attn += 2 * cfg.v_head_dim + 4 * cfg.d_qk
    n_moe = L - cfg.n_dense_layers
    I = cfg.moe_inter_dim
    moe = cfg.n_routed_experts * D + 3 * cfg.n_routed_experts * D * I + 3 * D * cfg.n_shared_experts * I
    total = (cfg.vocab_size * D * (1 if cfg.tie_embeddings else 2) + D
             + L * (attn + 2 * D) + cfg.n_dense_layers * 3 * D * cfg.inter_dim + n_moe * moe)
    active = total - n_moe * (cfg.n_routed_experts - cfg.n_activated_experts) * 3 * D * I
    return total, active


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

class Clock:
    def __init__(self, budget_s: float) -> None:
        self.t0 = time.perf_counter()
        self.budget = budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget - self.elapsed()


def log(msg: str) -> None:
    print(msg, flush=True)


def free_cuda() -> None:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def env_info() -> Dict[str, Any]:
    info: Dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                            "python": sys.version.split()[0]}
    try:
        info["cudnn"] = torch.backends.cudnn.version()
    except Exception:
        info["cudnn"] = None
    try:
        import triton  # type: ignore
        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update({"gpu": p.name, "capability": f"{p.major}.{p.minor}",
                     "sm_count": p.multi_processor_count,
                     "gpu_mem_gib": round(p.total_memory / 2**30, 1)})
    return info


def set_compile_limits() -> None:
    import torch._dynamo as dyn
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dyn.config, name):
            setattr(dyn.config, name, 64)


# ---------------------------------------------------------------------------------------------
# Gradient clipping folded into fused AdamW
# ---------------------------------------------------------------------------------------------

def fused_scale_supported() -> Tuple[bool, str]:
    """Fused Adam/AdamW read `optimizer.grad_scale` (the hook GradScaler uses) and divide every
    gradient by it inside the fused kernel. Global-norm clipping can then cost only the norm
    (as in the C++ trainer, whose AdamW kernel applies the clip factor) instead of an extra
    read+write of all gradients by clip_grad_norm_. This checks that the hook is honoured."""
    try:
        dev = DEV
        res = []
        for scale in (None, 4.0):
            p = torch.nn.Parameter(torch.ones(8, device=dev))
            o = torch.optim.AdamW([p], lr=0.1, eps=1.0, weight_decay=0.0, fused=True)
            p.grad = torch.full((8,), 2.0, device=dev) / (4.0 if scale is None else 1.0)
            if scale is not None:
                o.grad_scale = torch.full((1,), scale, device=dev)
            o.step()
            res.append(p.detach().clone())
        q = torch.nn.Parameter(torch.ones(8, device=dev))
        o = torch.optim.AdamW([q], lr=0.1, eps=1.0, weight_decay=0.0, fused=True)
        q.grad = torch.full((8,), 2.0, device=dev)
        o.step()
        same = torch.allclose(res[0], res[1], rtol=1e-6, atol=1e-7)
        differs = not torch.allclose(res[1], q.detach(), rtol=1e-6, atol=1e-7)
        if same and differs:
            return True, "fused AdamW honours grad_scale"
        return False, "fused AdamW ignores grad_scale"
    except Exception as e:
        return False, f"grad_scale check failed ({type(e).__name__}: {e})"


class Clipper:
    """Global-norm clipping, c = min(1, max_norm / (||g|| + 1e-6)), without host syncs.
    mode "fused": grad_scale = 1/c handed to the fused AdamW kernel; "foreach": the standard
    torch.nn.utils.clip_grad_norm_(foreach=True)."""

    def __init__(self, opt, params, max_norm: float, mode: str) -> None:
        self.opt, self.params, self.max_norm, self.mode = opt, params, max_norm, mode

    def __call__(self) -> None:
        if self.max_norm <= 0:
            return
        if self.mode == "foreach":
            torch.nn.utils.clip_grad_norm_(self.params, self.max_norm, foreach=True)
            return
        grads = [p.grad for p in self.params if p.grad is not None]
        norms = torch._foreach_norm(grads, 2.0)
        total = torch.linalg.vector_norm(torch.stack(norms), 2.0)
        self.opt.grad_scale = torch.clamp((total + 1e-6) / self.max_norm, min=1.0).reshape(1)


# ---------------------------------------------------------------------------------------------
# Op benchmarks
# ---------------------------------------------------------------------------------------------

def bench_grouped_gemm(cfg: Config, B: int, T: int, warmup: int, iters: int) -> List[Dict[str, Any]]:
    """Experts' grouped GEMMs on the bench shapes: E experts, B*T*K routed rows from a uniform
    random top-K routing. TFLOP/s: fwd 2*M*K*N; fwd+bwd 6*M*K*N (dgrad + wgrad)."""
    dev = DEV
    E, K, D, I = cfg.n_routed_experts, cfg.n_activated_experts, cfg.dim, cfg.moe_inter_dim
    M = B * T * K
    g = torch.Generator(device=dev)
    g.manual_seed(3)
    idx = torch.rand(B * T, E, device=dev, generator=g).topk(K, dim=-1).indices.reshape(-1)
    counts = torch.bincount(idx, minlength=E)
    offs = counts.cumsum(0).to(torch.int32)
    cmin, cmax = int(counts.min()), int(counts.max())
    rows: List[Dict[str, Any]] = []
    shapes = [(f"grouped_mm w1 {D}->{I}", D, I), (f"grouped_mm w1|w3 {D}->{2 * I} (model)", D, 2 * I),
              (f"grouped_mm w2 {I}->{D} (model)", I, D)]
    for name, kin, nout in shapes:
        x = torch.randn(M, kin, device=dev, generator=g).to(torch.bfloat16).requires_grad_(True)
        w = (torch.randn(E, nout, kin, device=dev, generator=g) * 0.02).to(torch.bfloat16)
        w.requires_grad_(True)
        gy = torch.randn(M, nout, device=dev, generator=g).to(torch.bfloat16)

        def fwd():
            with torch.no_grad():
                tm._GMM(x, w.transpose(1, 2), offs=offs)

        def fwd_bwd():
            y = tm._GMM(x, w.transpose(1, 2), offs=offs)
            torch.autograd.grad(y, (x, w), gy)

        fl = 2.0 * M * kin * nout
        t_f = tm._cuda_time(fwd, warmup, iters)
        t_fb = tm._cuda_time(fwd_bwd, warmup, iters)
        rows.append({"op": name, "shape": f"M={M} ({E} experts, rows/expert {cmin}..{cmax}), "
                     f"[{kin}]->[{nout}]", "ms_fwd": t_f, "tflops_fwd": fl / t_f / 1e9,
                     "ms_fwd_bwd": t_fb, "tflops_fwd_bwd": 3 * fl / t_fb / 1e9})
        del x, w, gy
    # dense GEMM with the same FLOPs, for scale
    x = torch.randn(M, D, device=dev, generator=g).to(torch.bfloat16).requires_grad_(True)
    w = (torch.randn(I, D, device=dev, generator=g) * 0.02).to(torch.bfloat16).requires_grad_(True)
    gy = torch.randn(M, I, device=dev, generator=g).to(torch.bfloat16)

    def dfwd():
        with torch.no_grad():
            torch.nn.functional.linear(x, w)

    def dfwd_bwd():
        y = torch.nn.functional.linear(x, w)
        torch.autograd.grad(y, (x, w), gy)

    fl = 2.0 * M * D * I
    t_f = tm._cuda_time(dfwd, warmup, iters)
    t_fb = tm._cuda_time(dfwd_bwd, warmup, iters)
    rows.append({"op": f"dense mm {D}->{I} (same FLOPs, reference)", "shape": f"M={M}",
                 "ms_fwd": t_f, "tflops_fwd": fl / t_f / 1e9, "ms_fwd_bwd": t_fb,
                 "tflops_fwd_bwd": 3 * fl / t_fb / 1e9})
    return rows


def attention_rows(choices: List[tm.AttnChoice], cfg: Config, B: int, T: int) -> List[Dict[str, Any]]:
    """TFLOP/s of the differential attention core by the spec convention: causal forward
    B*Hc*T^2*(d_qk + d_v,eff), forward+backward 3x that (the kernels themselves do ~3.5x, and
    padded formulations do more)."""
    Hc = cfg.n_heads
    dv_eff = 2 * cfg.v_head_dim if cfg.differential else cfg.v_head_dim
    fl = float(B) * Hc * T * T * (cfg.d_qk + dv_eff)
    rows = []
    ncalls = {"ev": 1, "pad": 1, "splitv": 2}
    for c in choices:
        r = {"op": f"diff attention {c.label} ({ncalls[c.formulation]} SDPA call"
                   f"{'s' if ncalls[c.formulation] > 1 else ''})",
             "shape": f"B={B} T={T} {Hc} comp. heads d_qk={cfg.d_qk} d_v={cfg.v_head_dim}",
             "ok": c.ok, "note": c.note, "err_out": c.err_out, "err_grad": c.err_grad}
        if c.ok:
            r.update({"ms_fwd": c.ms_fwd, "tflops_fwd": fl / c.ms_fwd / 1e9,
                      "ms_fwd_bwd": c.ms_fwd_bwd, "tflops_fwd_bwd": 3 * fl / c.ms_fwd_bwd / 1e9})
        rows.append(r)
    return rows


# ---------------------------------------------------------------------------------------------
# Training-step benchmark
# ---------------------------------------------------------------------------------------------

def run_mode(mode: str, cfg: Config, args, choice: tm.AttnChoice, experts: str, fpt: float,
             clock: Clock) -> Dict[str, Any]:
    res: Dict[str, Any] = {"mode": mode, "attention": choice.label, "experts": experts,
                           "compile_mode": COMPILE_MODES.get(mode), "clip": args.clip_mode,
                           "error": None}
    B, T = args.batch, args.seq
    model = opt = params = None
    try:
        choice.apply()
        if mode in COMPILE_MODES:
            import torch._dynamo as dyn
            dyn.reset()
            set_compile_limits()
        free_cuda()
        opts = tm.FastOptions(torch.bfloat16, choice.formulation, experts)
        model = tm.DiffMoEFast(cfg, opts, device=DEV)
        tm.init_weights(model, args.seed)
        res["params_built"] = sum(p.numel() for p in model.parameters())
        if mode in COMPILE_MODES:
            model.compile_regions(COMPILE_MODES[mode])
        opt = torch.optim.AdamW(model.param_groups(args.weight_decay), lr=args.lr,
                                betas=(0.9, 0.95), eps=1e-8, fused=True)
        params = list(model.parameters())
        clip = Clipper(opt, params, args.grad_clip, args.clip_mode)
        g = torch.Generator(device=DEV)
        g.manual_seed(args.seed + 7)
        seq = torch.randint(0, cfg.vocab_size, (B, T + 1), device=DEV, generator=g)
        tokens, targets = seq[:, :-1].contiguous(), seq[:, 1:].contiguous()

        def step():
            with torch.autocast(DEV, dtype=torch.bfloat16):
                loss, lm, aux, counts = model(tokens, targets)
            loss.backward()
            clip()
            opt.step()
            opt.zero_grad(set_to_none=True)
            model.update_bias(counts)
            return lm.detach(), aux.detach()

        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        lm0, aux0 = step()
        torch.cuda.synchronize()
        res["first_step_s"] = time.perf_counter() - t0
        log(f"  [{mode}] first step {res['first_step_s']:.1f} s (includes compilation), "
            f"lm loss {float(lm0):.4f} aux {float(aux0):.2e}")
        for _ in range(args.warmup - 1):
            step()
        torch.cuda.synchronize()
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(args.steps + 1)]
        losses = []
        n = 0
        t_wall = time.perf_counter()
        ev[0].record()
        for i in range(args.steps):
            losses.append(step()[0])
            ev[i + 1].record()
            n += 1
            if clock.left() < 5:
                res["partial"] = f"time budget: {n} of {args.steps} timed steps"
                log(f"  [{mode}] stopping early (time budget)")
                break
        torch.cuda.synchronize()
        wall = time.perf_counter() - t_wall
        times = [ev[i].elapsed_time(ev[i + 1]) for i in range(n)]
        med = statistics.median(times)
        tok = B * T
        res.update({
            "steps_timed": n, "warmup": args.warmup, "step_ms_median": med,
            "step_ms_mean": statistics.fmean(times), "step_ms_min": min(times),
            "step_ms_max": max(times), "wall_s_timed": wall,
            "tokens_per_s": tok / (med / 1e3), "tokens_per_s_wall": tok * n / wall,
            "mfu": tok / (med / 1e3) * fpt / (PEAK_TFLOPS * 1e12),
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
            "lm_loss_first": float(lm0), "lm_loss_last": float(losses[-1]),
        })
        if model.moe_layers():
            biases = torch.stack([m.gate.bias for m in model.moe_layers()])
            res["bias_range"] = [float(biases.min()), float(biases.max())]
        log(f"  [{mode}] {res['tokens_per_s']:,.0f} tokens/s, step {med:.1f} ms (median of {n}; "
            f"min {min(times):.1f}, max {max(times):.1f}), MFU {100 * res['mfu']:.1f}%, peak "
            f"{res['peak_mem_gib']:.1f} GiB, lm loss {res['lm_loss_first']:.4f} -> "
            f"{res['lm_loss_last']:.4f}")
    except Exception as e:  # compile failure, OOM, unsupported kernel ...
        text = str(e).strip()
        msg = f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"
        res["error"] = msg
        log(f"  [{mode}] FAILED: {msg}")
        if args.verbose:
            traceback.print_exc()
    finally:
        model = opt = params = None  # noqa: F841 (the caller frees the memory after return)
    return res


# ---------------------------------------------------------------------------------------------
# Decode benchmark (torch_decode.py)
# ---------------------------------------------------------------------------------------------

DECODE_NEED_S = {"eager": 10.0, "graph": 15.0, "compile": 150.0}   # budget a row needs to start


def decode_settings(cfg: Config, args) -> Dict[str, Any]:
    """What the decode benchmark will run, and its cache sizes (no GPU needed)."""
    cap = td.cache_positions(args.prompt_len + args.new_tokens)
    return {"modes": args.decode_modes, "batches": args.decode_batch, "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens, "repeats": args.decode_repeats, "cache_positions": cap,
            "cache_gib": {c: {str(b): td.cache_bytes(cfg, c, b, cap) / 2**30 for b in args.decode_batch}
                          for c in ("expanded", "latent")},
            "self_check": not args.no_decode_check}


def run_decode(cfg: Config, args, experts: str, clock: Clock) -> Dict[str, Any]:
    """Random-weight model (docs/model.md §6 init), BF16 decode weights, the self-check, then per
    mode and batch size one warm-up and `--decode-repeats` timed runs of prefill + greedy decode."""
    out: Dict[str, Any] = {"rows": [], "check": None, "error": None}
    if args.prompt_len + args.new_tokens > cfg.max_seq_len:
        out["error"] = (f"--prompt-len {args.prompt_len} + --new-tokens {args.new_tokens} exceed "
                        f"max_seq_len = {cfg.max_seq_len}")
        log(f"[decode] ERROR: {out['error']}")
        return out
    tm.activate_flash_impl(None)
    tm.set_sdpa_backend(None)        # every SDPA backend on: torch picks per call (E != Ev, masks, T = 1)
    free_cuda()
    log(f"[decode] building the model (seed {args.seed}) and its BF16 decode weights; experts: {experts}")
    model = tm.DiffMoEFast(cfg, tm.FastOptions(torch.bfloat16, "ev", experts), device=DEV)
    tm.init_weights(model, args.seed)
    weights = td.DecodeWeights(model, experts)
    out["weights_gib"] = weights.nbytes() / 2**30
    if not args.no_decode_check:
        modes = [m for m in args.decode_modes if not td.DECODE_MODES[m][2]]   # compile: too slow to check
        try:
            ok, out["check"] = td.self_check(model, weights, modes, args.seed + 11, log)
        except Exception as e:
            ok = False
            out["check"] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            log(f"decode self-check: FAIL ({out['check']['error']})")
            if args.verbose:
                traceback.print_exc()
        if not ok:
            out["error"] = "decode self-check FAILED: the decoder's logits differ from the training forward's"
            log(f"[decode] ERROR: {out['error']}; no timing")
            return out
    model = None                     # the FP32 master model is not needed to decode
    free_cuda()
    unusable = (out["check"] or {}).get("unusable", {})
    if any(td.DECODE_MODES[m][2] for m in args.decode_modes):
        set_compile_limits()
    for mode in args.decode_modes:
        need = DECODE_NEED_S["compile" if td.DECODE_MODES[mode][2] else
                             "graph" if td.DECODE_MODES[mode][1] else "eager"]
        for b in args.decode_batch:
            if mode in unusable:
                out["rows"].append({"mode": mode, "cache": td.DECODE_MODES[mode][0], "batch": b,
                                    "error": f"failed in the self-check: {unusable[mode]}"})
                continue
            if clock.left() < need:
                log(f"[decode] {mode} batch {b} skipped: {clock.left():.0f} s left of the time budget (< {need:.0f} s)")
                out["rows"].append({"mode": mode, "cache": td.DECODE_MODES[mode][0], "batch": b,
                                    "skipped": "time budget"})
                continue
            out["rows"].append(td.time_decode(weights, mode, b, args.prompt_len, args.new_tokens,
                                              args.decode_repeats, args.seed + 7, clock.left, log))
            free_cuda()
    weights = None
    free_cuda()
    return out


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def _f(x: Any, fmt: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, fmt)


def _clean(x: Any) -> Any:
    """NaN/inf -> None so the JSON is strict."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def markdown(report: Dict[str, Any]) -> str:
    env = report["env"]
    fl = report["flops_per_token"]
    L = []
    L.append(f"## diffmoe `bench` preset: PyTorch reference, {env.get('gpu', '?')}")
    L.append("")
    L.append(f"torch {env['torch']} (CUDA {env['cuda']}, cuDNN {env['cudnn']}, triton {env['triton']}); "
             f"batch {report['batch']} x {report['seq']} tokens; params {report['params_total'] / 1e6:.2f}M "
             f"total / {report['params_active'] / 1e6:.2f}M active")
    L.append(f"FLOPs/token (docs/model.md §9) = 6*(active matmul weights + head) + 3*L*T*H*(d_qk + d_v,eff) = "
             f"6*{fl['matmul_weights'] / 1e6:.2f}M + {fl['attention'] / 1e9:.4f}G = "
             f"**{fl['total'] / 1e9:.3f} GFLOP/token**; MFU = tokens/s * FLOPs/token / {PEAK_TFLOPS:.0f} TFLOP/s")
    L.append(f"attention: {report['attention_choice']}; experts: {report['experts_impl']}; "
             f"optimizer: AdamW(fused=True) on FP32 params, global-norm clip {report['grad_clip']} "
             f"({report.get('clip_mode', '-')}); BF16 compute")
    L.append("")
    L.append("| mode | tokens/s | step ms (median) | MFU | peak mem GiB | first step s | attention | note |")
    L.append("|---|---:|---:|---:|---:|---:|---|---|")
    for r in report["modes"]:
        if r.get("error") or "tokens_per_s" not in r:
            L.append(f"| {r['mode']} | - | - | - | - | - | {r.get('attention', '-')} | "
                     f"{r.get('error') or r.get('skipped', '')} |")
            continue
        note = r.get("partial", "") or (r["compile_mode"] or "")
        if r.get("retry_of_error"):
            note += f" (after a failure with the first attention choice: {r['retry_of_error'][:80]})"
        L.append(f"| {r['mode']} | {r['tokens_per_s']:,.0f} | {r['step_ms_median']:.1f} | "
                 f"{100 * r['mfu']:.1f}% | {r['peak_mem_gib']:.1f} | {r['first_step_s']:.1f} | "
                 f"{r['attention']} | {note} |")
    if report.get("ops"):
        L.append("")
        L.append("| op | shape | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s |")
        L.append("|---|---|---:|---:|---:|---:|")
        for r in report["ops"]:
            if r.get("ok", True) is False:
                L.append(f"| {r['op']} | {r['shape']} | - | - | - | {r.get('note', '')} |")
                continue
            L.append(f"| {r['op']} | {r['shape']} | {_f(r.get('ms_fwd'), '.3f')} | "
                     f"{_f(r.get('tflops_fwd'), '.0f')} | {_f(r.get('ms_fwd_bwd'), '.3f')} | "
                     f"{_f(r.get('tflops_fwd_bwd'), '.0f')} |")
        L.append("")
        L.append("Attention TFLOP/s use the spec's convention (causal fwd B*H*T^2*(d_qk+d_v,eff), "
                 "fwd+bwd = 3x fwd); grouped GEMM fwd+bwd = 3x fwd (dgrad + wgrad).")
    return "\n".join(L)


def markdown_decode(report: Dict[str, Any]) -> str:
    d = report["decode"]
    st = d["settings"]
    env = report["env"]
    L = [f"## diffmoe `bench` preset: PyTorch KV-cache decode, {env.get('gpu', '?')}", ""]
    L.append(f"torch {env['torch']} (CUDA {env['cuda']}); prompt {st['prompt_len']} tokens, {st['new_tokens']} new "
             f"tokens (greedy argmax), {st['cache_positions']} cache positions; median of {st['repeats']} runs "
             f"after 1 warm-up; BF16 weights ({_f(d.get('weights_gib'), '.2f')} GiB), FP32 residual, norms, "
             f"router, softmax; experts: {report.get('experts_impl', '-')}; SDPA backend: torch's choice")
    chk = d.get("check")
    if chk is None:
        L.append("self-check: not run")
    elif chk.get("error"):
        L.append(f"self-check: **FAIL** ({chk['error']})")
    else:
        L.append(f"self-check (decode logits vs the training forward, bench model + 2 micro configs): "
                 f"{'PASS' if chk['ok'] else '**FAIL**'}, worst rel. diff {chk['worst_rel']:.1e} "
                 f"(tolerance {chk['tolerance']:.0e})"
                 + (f"; could not run: {', '.join(chk['unusable'])}" if chk.get("unusable") else ""))
    if d.get("error"):
        L.append(f"**decode benchmark not run: {d['error']}**")
    L.append("")
    L.append("| mode | cache | batch | prefill tokens/s | decode tokens/s | ms/step | peak mem GiB | cache GiB | "
             "first run s | note |")
    L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in d["rows"]:
        if r.get("error") or "decode_tokens_per_s" not in r:
            L.append(f"| {r['mode']} | {r['cache']} | {r['batch']} | - | - | - | - | - | - | "
                     f"{r.get('error') or r.get('skipped', '')} |")
            continue
        L.append(f"| {r['mode']} | {r['cache']} | {r['batch']} | {r['prefill_tokens_per_s']:,.0f} | "
                 f"{r['decode_tokens_per_s']:,.0f} | {r['ms_per_step']:.2f} | {r['peak_mem_gib']:.1f} | "
                 f"{r['cache_gib']:.2f} | {r['first_run_s']:.1f} | {r.get('partial', '')} |")
    L.append("")
    L.append("decode tokens/s = batch x new tokens / decode seconds (prefill excluded); prefill tokens/s = "
             "batch x prompt / prefill seconds; peak mem = max_memory_allocated (decode weights + cache + "
             "activations). eager = plain loop, graph = the static step in one CUDA graph, compile = "
             "torch.compile'd static step in one CUDA graph; latent = absorbed MLA cache.")
    return "\n".join(L)


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="PyTorch diffmoe training benchmark (bench preset)")
    ap.add_argument("--config", default=BENCH_YAML, help="model YAML (default configs/bench.yaml)")
    ap.add_argument("--modes", default="eager,compile",
                    help="comma list of eager, compile (inductor default mode), compile-max "
                         "(max-autotune-no-cudagraphs; longer compilation)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per mode (default 20; --quick 10)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps per mode (default 4; --quick 3)")
    ap.add_argument("--batch", type=int, default=BENCH_BATCH)
    ap.add_argument("--seq", type=int, default=None, help="sequence length (default max_seq_len)")
    ap.add_argument("--time-budget-s", type=float, default=480.0,
                    help="stop gracefully (skip or cut modes) when this much wall time is used")
    ap.add_argument("--quick", action="store_true", help="fewer steps and op iterations")
    ap.add_argument("--json", default=None, help="write the full report as JSON here")
    ap.add_argument("--attn", default=None,
                    help="force formulation/backend, e.g. ev/cudnn, pad/flash, splitv/efficient")
    ap.add_argument("--experts", default=None, choices=["grouped_mm", "loop"])
    ap.add_argument("--no-ops", action="store_true", help="skip the op benchmarks")
    ap.add_argument("--ops-only", action="store_true", help="only the op benchmarks")
    ap.add_argument("--grad-clip", type=float, default=1.0,
                    help="global-norm clip as the C++ trainer (0 disables)")
    ap.add_argument("--clip-impl", default="auto", choices=["auto", "fused", "foreach"],
                    help="fused: clip factor applied inside fused AdamW via grad_scale (checked at "
                         "start); foreach: torch.nn.utils.clip_grad_norm_; auto: fused if it works")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--decode", action="store_true",
                    help="also run the KV-cache prefill/decode benchmark (torch_decode.py), after the training modes")
    ap.add_argument("--decode-only", action="store_true",
                    help="only the decode benchmark (no attention selection, op benchmarks or training)")
    ap.add_argument("--decode-modes", default="eager,eager-latent,graph,graph-latent",
                    help="comma list of " + ", ".join(td.DECODE_MODES) + " (compile*: minutes of compilation)")
    ap.add_argument("--decode-batch", default="1,8,64", help="decode: batch sizes (default 1,8,64)")
    ap.add_argument("--prompt-len", type=int, default=512, help="decode: prompt tokens per sequence (default 512)")
    ap.add_argument("--new-tokens", type=int, default=64, help="decode: greedy steps after the prompt (default 64)")
    ap.add_argument("--decode-repeats", type=int, default=3, help="decode: timed runs per row, median (default 3)")
    ap.add_argument("--no-decode-check", action="store_true",
                    help="skip the decode self-check (decode logits vs the training forward)")
    ap.add_argument("--dry-run", action="store_true", help="print config, FLOPs and params; no GPU")
    ap.add_argument("--verbose", action="store_true", help="tracebacks on failures")
    a = ap.parse_args(argv)
    a.steps = a.steps if a.steps is not None else (10 if a.quick else 20)
    a.warmup = a.warmup if a.warmup is not None else (3 if a.quick else 4)
    a.steps = max(a.steps, 1)
    a.warmup = max(a.warmup, 1)
    a.modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    for m in a.modes:
        if m not in ("eager",) + tuple(COMPILE_MODES):
            ap.error(f"unknown mode {m!r}")
    a.decode = a.decode or a.decode_only
    a.decode_modes = [m.strip() for m in a.decode_modes.split(",") if m.strip()]
    for m in a.decode_modes:
        if m not in td.DECODE_MODES:
            ap.error(f"unknown decode mode {m!r} (expected one of {', '.join(td.DECODE_MODES)})")
    try:
        a.decode_batch = [int(b) for b in a.decode_batch.split(",") if b.strip()]
    except ValueError:
        ap.error(f"--decode-batch {a.decode_batch!r}: expected a comma list of integers")
    for name in ("prompt_len", "new_tokens", "decode_repeats"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if not a.decode_batch or min(a.decode_batch) < 1:
        ap.error("--decode-batch: batch sizes must be >= 1")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    clock = Clock(args.time_budget_s)
    cfg, src = load_config(args.config)
    args.seq = args.seq or cfg.max_seq_len
    if args.seq > cfg.max_seq_len:
        raise SystemExit(f"--seq {args.seq} > max_seq_len {cfg.max_seq_len}")
    fl = flops_per_token(cfg, args.seq)
    total, active = param_counts(cfg)
    log(f"config: {src}")
    log(f"  {json.dumps(cfg.to_dict())}")
    log(f"params: {total / 1e6:.2f}M total, {active / 1e6:.2f}M active (docs/model.md §10: bench 1892.31M / 335.18M)")
    log(f"FLOPs/token (docs/model.md §9) at seq {args.seq}: 6*{fl['matmul_weights'] / 1e6:.3f}M + "
        f"{fl['attention'] / 1e6:.3f}M = {fl['total'] / 1e9:.3f} GFLOP/token"
        + (" (spec: 1.973 for bench at 2048)" if args.seq == 2048 else ""))
    if args.seq == 2048 and cfg.dim == 1536 and abs(fl["total"] / 1e9 - 1.973) > 5e-4:
        log("WARNING: FLOPs/token differs from the spec's 1.973 GFLOP for bench")
    report: Dict[str, Any] = {
        "config_source": src, "config": cfg.to_dict(), "batch": args.batch, "seq": args.seq,
        "tokens_per_step": args.batch * args.seq, "flops_per_token": fl,
        "params_total": total, "params_active": active, "peak_tflops": PEAK_TFLOPS,
        "grad_clip": args.grad_clip, "modes": [], "ops": [], "env": env_info()}
    if args.decode:
        st = decode_settings(cfg, args)
        report["decode"] = {"settings": st, "rows": []}
        log(f"decode: modes {','.join(st['modes'])}, batches {','.join(map(str, st['batches']))}, prompt "
            f"{st['prompt_len']} + {st['new_tokens']} new tokens ({st['cache_positions']} cache positions), "
            f"{st['repeats']} timed runs; cache GiB expanded "
            + "/".join(f"{v:.3f}" for v in st["cache_gib"]["expanded"].values()) + ", latent "
            + "/".join(f"{v:.3f}" for v in st["cache_gib"]["latent"].values()))
    if args.dry_run:
        print(json.dumps(_clean(report), indent=1, default=str))
        return 0
    if not torch.cuda.is_available():
        log("ERROR: needs a CUDA GPU (use --dry-run to print the config and FLOPs only)")
        return 2
    env = report["env"]
    log(f"env: torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, triton {env['triton']}, "
        f"GPU {env.get('gpu')} (sm {env.get('capability')}, {env.get('sm_count')} SMs, "
        f"{env.get('gpu_mem_gib')} GiB)")
    torch.backends.cuda.matmul.allow_tf32 = False   # FP32 router / CE stay FP32
    torch.backends.cudnn.allow_tf32 = False

    # --- clipping: inside fused AdamW (grad_scale) when the hook works, else clip_grad_norm_ ---
    if args.grad_clip <= 0:
        args.clip_mode = "off"
    elif args.clip_impl == "foreach":
        args.clip_mode = "foreach"
    else:
        okc, msgc = fused_scale_supported()
        log(f"clipping: {msgc}")
        if args.clip_impl == "fused" and not okc:
            log("WARNING: --clip-impl fused requested but unsupported; using clip_grad_norm_")
        args.clip_mode = "fused" if okc else "foreach"
    log(f"  clip mode: {args.clip_mode} (max norm {args.grad_clip})")
    report["clip_mode"] = args.clip_mode

    # --- experts: torch._grouped_mm or the loop ---
    log(f"grouped GEMM: {tm.grouped_mm_signature()}")
    ok16, msg16 = tm.probe_grouped_mm(DEV, torch.bfloat16)
    log(f"  probe (bf16, fwd+bwd vs per-group matmul): {msg16}")
    experts = args.experts or ("grouped_mm" if ok16 else "loop")
    if experts == "loop":
        log("WARNING: experts run as a per-expert loop (torch._grouped_mm unusable): slower")
    report["experts_impl"] = f"{experts} ({msg16})"

    if args.decode_only:
        report["decode"].update(run_decode(cfg, args, experts, clock))
        return finish(report, args, clock)

    # --- attention: formulation x SDPA backend, checked and timed on the bench shapes ---
    log(f"attention selection on B={args.batch} T={args.seq} Hc={cfg.n_heads} d_qk={cfg.d_qk} "
        f"d_v={cfg.v_head_dim} (fwd+bwd, BF16; correctness vs FP32 math on one sequence):")
    iters = 5 if args.quick else 10
    choices = tm.select_attention(args.batch, args.seq, cfg.n_heads, cfg.d_qk, cfg.v_head_dim,
                                  cfg.softmax_scale(), cfg.differential, DEV, warmup=3,
                                  iters=iters, log=log,
                                  only=[args.attn] if args.attn else None)
    usable = [c for c in choices if c.ok]
    if not usable:
        log("ERROR: no SDPA formulation/backend works on these shapes")
        return 3
    report["attention_candidates"] = [c.__dict__ | {"label": c.label} for c in choices]
    best = usable[0]
    report["attention_choice"] = f"{best.label} (formulation {best.formulation}, SDPA backend {best.backend})"
    log(f"  -> using {best.label}")
    free_cuda()

    # --- op benchmarks ---
    if not args.no_ops:
        try:
            report["ops"] += bench_grouped_gemm(cfg, args.batch, args.seq, 3, iters)
        except Exception as e:
            log(f"grouped GEMM op benchmark failed: {type(e).__name__}: {e}")
        report["ops"] += attention_rows(choices, cfg, args.batch, args.seq)
        for r in report["ops"]:
            if "ms_fwd_bwd" in r:
                log(f"  op {r['op']}: fwd {r['ms_fwd']:.3f} ms ({r['tflops_fwd']:.0f} TFLOP/s), "
                    f"fwd+bwd {r['ms_fwd_bwd']:.3f} ms ({r['tflops_fwd_bwd']:.0f} TFLOP/s)")
        free_cuda()

    # --- training steps ---
    if not args.ops_only:
        for mode in args.modes:
            need = 150.0 if mode in COMPILE_MODES else 20.0
            if clock.left() < need:
                log(f"[{mode}] skipped: {clock.left():.0f} s left of the time budget (< {need:.0f} s)")
                report["modes"].append({"mode": mode, "skipped": "time budget", "attention": best.label})
                continue
            log(f"[{mode}] building model, {args.warmup} warm-up + {args.steps} timed steps "
                f"({clock.left():.0f} s of budget left)")
            r = run_mode(mode, cfg, args, best, experts, fl["total"], clock)
            free_cuda()
            if r.get("error") and mode in COMPILE_MODES:
                # Fallback: the next attention candidates (a backend may fail under compile).
                for alt in usable[1:3]:
                    if clock.left() < need:
                        break
                    log(f"[{mode}] retrying with attention {alt.label}")
                    r2 = run_mode(mode, cfg, args, alt, experts, fl["total"], clock)
                    free_cuda()
                    r2["retry_of_error"] = r["error"]
                    r = r2
                    if not r.get("error"):
                        break
            report["modes"].append(r)
        tm.set_sdpa_backend(None)

    if args.decode:
        report["decode"].update(run_decode(cfg, args, experts, clock))
    return finish(report, args, clock)


def finish(report: Dict[str, Any], args, clock: Clock) -> int:
    """Markdown to stdout, JSON to --json; exit 0 when nothing failed, 4 when the decode self-check
    failed, else 1."""
    report["elapsed_s"] = clock.elapsed()
    parts = [] if args.decode_only else [markdown(report)]
    if "decode" in report:
        parts.append(markdown_decode(report))
    print()
    print("\n\n".join(parts), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(_clean(report), f, indent=1, default=str)
        log(f"\nwrote {args.json}")
    dec = report.get("decode", {})
    if dec.get("check") is not None and not dec["check"].get("ok"):
        log("DECODE SELF-CHECK FAILED: the decoder's logits differ from the training forward's (see above)")
        return 4
    failed = [r for r in report["modes"] + dec.get("rows", []) if r.get("error")]
    return 0 if not failed and not dec.get("error") else 1


if __name__ == "__main__":
    sys.exit(main())
