#!/usr/bin/env python3
"""The diffmoe model (docs/model.md) as a fast, fair PyTorch training model.

This is the PyTorch side of the training benchmark (bench/torch_bench.py): the strongest plain
PyTorch version of exactly the spec's model, so the C++/CUDA trainer can be compared with it on the
same card in the same run. Run `python3 bench/torch_model.py --check` to prove that it computes the
same model as tools/reference/diffmoe_ref.py (float64 reference).

Precision ("bf16 mixed precision", the standard PyTorch recipe):
  * parameters, gradients and AdamW moments are FP32 (master weights); the optimizer is
    torch.optim.AdamW(fused=True) (torch_bench.py);
  * every matmul runs in BF16: each weight is cast with `.to(bfloat16)` where it is used -- exactly
    the cast torch.autocast inserts, done explicitly so that ops autocast does not know
    (torch._grouped_mm) and ops it would wrongly downcast (the FP32 router) are handled the same way
    in eager and torch.compile. The training step still runs under torch.autocast(bfloat16);
  * FP32: the residual stream, RMSNorm (torch.nn.functional.rms_norm on FP32 inputs), RoPE rotation,
    softmax inside the attention kernels, lambda, the differential subtraction O1 - lambda*O2 and its
    subln, the SwiGLU product (docs/model.md §4), the router (logits, sigmoid/softmax, top-k, weights, aux
    loss, balancing bias) and the cross-entropy (logits upcast to FP32).

Fast paths (each one exact, chosen/verified at run time where the hardware matters):
  * DiffMLA attention through F.scaled_dot_product_attention(is_causal=True, scale=sigma). A
    differential head needs V of width 2*d_v while q/k are d_qk wide. Formulations (attention_core):
      "ev"     one SDPA call over all 2H component heads, q/k width d_qk, V width 2*d_v (component j
               of diff head h attends to V_h = [v_2h ; v_2h+1]); = flashdiff_1's two calls batched.
               Needs a backend that allows E != Ev (cuDNN, mem-efficient).
      "pad"    the same single call with q/k zero-padded to P = max(d_qk, 2*d_v) (rounded to 8), so
               that E == Ev (FlashAttention-2 needs that); scale passed explicitly. Exact: the zero
               columns add nothing to q.k.
      "splitv" two calls (flashdiff_2's four calls batched over components): V split in halves
               v_2h and v_2h+1, each d_v wide.
    torch_bench.py picks formulation x backend by a correctness check plus timing on the bench
    shapes (select_attention) and prints the choice.
  * MoE: router in FP32, token permutation by a stable sort of the expert ids, experts through
    torch._grouped_mm (BF16, offsets = int32 cumulative counts; w1|w3 fused into one grouped GEMM),
    routing weights applied to the expert hidden (linear, so identical to weighting the outputs),
    gather/unsort-and-sum combine with deterministic backward (no atomics), shared expert, dropless.
    Falls back to a per-expert loop (with a warning) when torch._grouped_mm is missing or wrong.
  * SwiGLU as a small autograd.Function: FP32 product, saves only the BF16 hidden and recomputes
    the FP32 intermediates in backward (eager memory; compile traces through it).
  * w1|w3 of the dense FFN and the shared expert, and wq_a|wkv_a (same input), are concatenated into
    one GEMM each (the usual fused gate/up and fused QKV-down projections).
  * regional torch.compile: DiffMoEFast.compile_regions() compiles each block (nn.Module.compile, so
    state_dict names are unchanged; all MoE blocks share one graph) and the final norm + head + loss.

Parameter names are those of model.md §8 (== diffmoe_ref.DiffMoE), so a state_dict or our
safetensors checkpoint loads directly (load_safetensors); `layers.{l}.ffn.gate.bias` is a
persistent FP32 buffer.

    python3 bench/torch_model.py --check          # FP32 + BF16 comparison with the reference
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_HERE)
_REF_DIR = os.path.join(_REPO, "tools", "reference")
if _REF_DIR not in sys.path:
    sys.path.insert(0, _REF_DIR)
from diffmoe_ref import Config  # noqa: E402  (the §9 config class: keys, defaults, validation)

try:  # torch >= 2.3
    from torch.nn.attention import SDPBackend, sdpa_kernel
except Exception:  # pragma: no cover - old torch
    SDPBackend = None
    sdpa_kernel = None

SUBLN_EPS = 1e-5

# The grouped GEMM: torch._grouped_mm(mat_a, mat_b, offs=None, bias=None, out_dtype=None), or its
# public alias torch.nn.functional.grouped_mm where a release has it. None -> per-expert loop.
_GMM: Optional[Callable[..., torch.Tensor]] = getattr(torch, "_grouped_mm", None) or \
    getattr(F, "grouped_mm", None)
_GMM_NAME = ("torch._grouped_mm" if getattr(torch, "_grouped_mm", None) is not None else
             "torch.nn.functional.grouped_mm" if getattr(F, "grouped_mm", None) is not None else "none")


@dataclass
class FastOptions:
    """Run-time choices shared by all modules of one model (read in forward; torch.compile guards
    on them, so set them before the first compiled call)."""
    compute_dtype: torch.dtype = torch.bfloat16   # matmul / activation dtype
    attn: str = "ev"                              # "ev" | "pad" | "splitv"   (see attention_core)
    experts: str = "grouped_mm"                   # "grouped_mm" | "loop"


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


# ---------------------------------------------------------------------------------------------
# Elementary pieces
# ---------------------------------------------------------------------------------------------

def rms_norm32(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in FP32 (spec: norms in FP32): x*rsqrt(mean(x^2)+eps)*w, FP32 result."""
    return F.rms_norm(x.float(), (x.shape[-1],), w.float(), eps)


def yarn_frequencies(cfg: Config) -> torch.Tensor:
    """theta'_i (float64, CPU) over qk_rope_head_dim, DeepSeek's precompute_freqs_cis (docs/model.md §3)."""
    d = cfg.qk_rope_head_dim
    base = float(cfg.rope_theta)
    freqs = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    if cfg.max_seq_len > cfg.original_seq_len:
        def corr(n_rot: float) -> float:
            return d * math.log(cfg.original_seq_len / (n_rot * 2 * math.pi)) / (2 * math.log(base))
        low = float(max(math.floor(corr(cfg.beta_fast)), 0))
        high = float(min(math.ceil(corr(cfg.beta_slow)), d - 1))
        if low == high:
            high += 0.001
        ramp = ((torch.arange(d // 2, dtype=torch.float64) - low) / (high - low)).clamp(0.0, 1.0)
        smooth = 1.0 - ramp
        freqs = freqs / cfg.rope_factor * (1.0 - smooth) + freqs * smooth
    return freqs


def rope_tables(cfg: Config, seq_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of t*theta'_i as FP32 [seq_len, d_rope/2] (angles computed in float64)."""
    ang = torch.outer(torch.arange(seq_len, dtype=torch.float64), yarn_frequencies(cfg))
    return torch.cos(ang).float(), torch.sin(ang).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE on pairs (x[2i], x[2i+1]), computed in FP32, returned in x's dtype.
    x: [B, T, ..., d]; cos/sin: [T, d/2]."""
    shape = x.shape
    T, d = shape[1], shape[-1]
    bshape = (1, T) + (1,) * (x.dim() - 3) + (d // 2,)
    c, s = cos.view(bshape), sin.view(bshape)
    xp = x.float().unflatten(-1, (d // 2, 2))
    x0, x1 = xp[..., 0], xp[..., 1]
    y = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    return y.flatten(-2).to(x.dtype)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal SDPA on [B, T, H, E] tensors (the layout every fused backend reads without a copy);
    returns [B, T, H, Ev]."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=True, scale=scale)
    return o.transpose(1, 2)


def attention_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lam: Optional[torch.Tensor],
                   scale: float, formulation: str, differential: bool) -> torch.Tensor:
    """The attention of DiffMLA (docs/model.md §2) through SDPA.

    q, k: [B, T, Hc, P] per component head (P >= d_qk; columns past d_qk must be zero);
    v: [B, T, Hc, dv] (v_j of component j); lam: 0-dim FP32 (differential only).
    differential: returns O [B, T, Hc/2, 2*dv] FP32 with O_h = A_{h,0} V_h - lam * A_{h,1} V_h,
                  V_h = [v_2h ; v_2h+1];
    plain:        returns O [B, T, Hc, dv] in v's dtype.
    formulation: "ev" | "pad" (pads V to P when P > its width) | "splitv" (differential only)."""
    B, T, Hc, P = q.shape
    dv = v.shape[-1]
    if not differential:
        if formulation == "pad" and P > dv:
            return _sdpa(q, k, F.pad(v, (0, P - dv)), scale)[..., :dv]
        return _sdpa(q, k, v, scale)
    Hd = Hc // 2
    vp = v.unflatten(2, (Hd, 2))                                        # [B, T, Hd, 2, dv] (view)
    if formulation == "splitv":
        outs = []
        for a in range(2):   # value half a: v_{2h+a}, for both components c of head h
            va = vp[:, :, :, a:a + 1].expand(B, T, Hd, 2, dv).reshape(B, T, Hc, dv)
            outs.append(_sdpa(q, k, va, scale))
        o = torch.cat(outs, dim=-1)                                     # [B, T, Hc, 2dv]
    else:
        W = 2 * dv
        # vh[b, t, 2h+c, a*dv + i] = v[b, t, 2h+a, i]: both components of head h see V_h.
        vh = vp.unsqueeze(3).expand(B, T, Hd, 2, 2, dv).reshape(B, T, Hc, W)
        if formulation == "pad" and P > W:
            vh = F.pad(vh, (0, P - W))
        o = _sdpa(q, k, vh, scale)
        if o.shape[-1] != W:
            o = o[..., :W]
    o = o.reshape(B, T, Hd, 2, 2 * dv)
    return o[:, :, :, 0].float() - lam * o[:, :, :, 1].float()


# Token permutation with deterministic backward (no atomics). `order` sorts the flattened (token, k)
# assignments by expert; tok = order // K; inv is the inverse permutation of order.
class _DispatchRows(torch.autograd.Function):
    """xs = u[tok]  (u: [N, D] -> [N*K, D]); backward sums the K copies of each token."""

    @staticmethod
    def forward(ctx, u, tok, inv, k):  # type: ignore[override]
        ctx.save_for_backward(inv)
        ctx.k = k
        return u.index_select(0, tok)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        (inv,) = ctx.saved_tensors
        n = inv.numel() // ctx.k
        return g.index_select(0, inv).view(n, ctx.k, g.shape[-1]).sum(1), None, None, None


class _CombineRows(torch.autograd.Function):
    """y[n] = sum_k ys[inv[n*K + k]]  ([N*K, D] expert-sorted rows -> [N, D]); backward = gather."""

    @staticmethod
    def forward(ctx, ys, inv, tok, k):  # type: ignore[override]
        ctx.save_for_backward(tok)
        n = inv.numel() // k
        return ys.index_select(0, inv).view(n, k, ys.shape[-1]).sum(1)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        (tok,) = ctx.saved_tensors
        return g.index_select(0, tok), None, None, None


def _up(x: torch.Tensor) -> torch.Tensor:
    """At least FP32 (float64 stays float64)."""
    return x if x.dtype == torch.float64 else x.float()


class _SwiGLU(torch.autograd.Function):
    """a = silu(h1) * h3 (* w), h = [h1 | h3], computed in FP32 (docs/model.md §4) and returned in h's dtype.
    Saves only h (and w) and recomputes the FP32 intermediates in backward: in eager mode autograd
    would otherwise keep four FP32 copies of the expert hidden per layer (~0.4 GB per MoE layer on
    the bench preset). torch.compile traces through it and fuses both directions."""

    @staticmethod
    def forward(ctx, h, w):  # type: ignore[override]
        inter = h.shape[-1] // 2
        h1, h3 = _up(h[..., :inter]), _up(h[..., inter:])
        a = F.silu(h1) * h3
        ctx.has_w = w is not None
        if w is not None:
            a = a * w.unsqueeze(-1)
            ctx.save_for_backward(h, w)
        else:
            ctx.save_for_backward(h)
        return a.to(h.dtype)

    @staticmethod
    def backward(ctx, ga):  # type: ignore[override]
        saved = ctx.saved_tensors
        h = saved[0]
        w = saved[1] if ctx.has_w else None
        inter = h.shape[-1] // 2
        h1, h3 = _up(h[..., :inter]), _up(h[..., inter:])
        sig = torch.sigmoid(h1)
        silu = h1 * sig
        g = _up(ga)
        dw = None
        if w is not None:
            if ctx.needs_input_grad[1]:
                dw = (g * silu * h3).sum(-1)
            g = g * w.unsqueeze(-1)
        dh1 = g * h3 * (sig * (1.0 + h1 * (1.0 - sig)))
        dh3 = g * silu
        return torch.cat([dh1, dh3], dim=-1).to(h.dtype), dw


def swiglu_fused(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor,
                 cdt: torch.dtype) -> torch.Tensor:
    """w2(silu(w1 x) * w3 x) with w1|w3 in one GEMM; the product in FP32 (docs/model.md §4)."""
    h = F.linear(x.to(cdt), torch.cat([w1.to(cdt), w3.to(cdt)], dim=0))
    return F.linear(_SwiGLU.apply(h, None), w2.to(cdt))


# ---------------------------------------------------------------------------------------------
# Modules (attribute names give the §8 checkpoint names)
# ---------------------------------------------------------------------------------------------

def _param(shape: Sequence[int], device, dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, device=device, dtype=dtype))


class Weight(nn.Module):
    """Holds `.weight`: a Linear weight [out, in] or a norm weight [n]."""

    def __init__(self, *shape: int, device=None, dtype=torch.float32) -> None:
        super().__init__()
        self.weight = _param(shape, device, dtype)


class FastAttention(nn.Module):
    """DiffMLA (docs/model.md §2), or plain MLA when cfg.differential is false."""

    def __init__(self, cfg: Config, layer: int, opts: FastOptions, device, dtype) -> None:
        super().__init__()
        self.cfg, self.opts = cfg, opts
        H, D, dqk = cfg.n_heads, cfg.dim, cfg.d_qk
        kw = dict(device=device, dtype=dtype)
        if cfg.q_lora_rank > 0:
            self.wq_a = Weight(cfg.q_lora_rank, D, **kw)
            self.q_norm = Weight(cfg.q_lora_rank, **kw)
            self.wq_b = Weight(H * dqk, cfg.q_lora_rank, **kw)
        else:
            self.wq = Weight(H * dqk, D, **kw)
        self.wkv_a = Weight(cfg.kv_lora_rank + cfg.qk_rope_head_dim, D, **kw)
        self.kv_norm = Weight(cfg.kv_lora_rank, **kw)
        self.wkv_b = Weight(H * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank, **kw)
        self.wo = Weight(D, H * cfg.v_head_dim, **kw)
        self.lambda_init = Config.lambda_init(layer)      # python float, for reports only
        if cfg.differential:
            self.subln = Weight(2 * cfg.v_head_dim, **kw)
            # lambda vectors are FP32 whatever the parameter dtype (docs/model.md §2 / §9).
            lkw = dict(device=device, dtype=torch.float32 if dtype != torch.float64 else dtype)
            self.lambda_q1 = _param((dqk,), **lkw)
            self.lambda_k1 = _param((dqk,), **lkw)
            self.lambda_q2 = _param((dqk,), **lkw)
            self.lambda_k2 = _param((dqk,), **lkw)
            # a tensor (not a python float) so that one compiled graph serves every layer
            self.register_buffer("lambda_init_t", torch.tensor(self.lambda_init, device=device,
                                                               dtype=lkw["dtype"]), persistent=False)
        self.scale = cfg.softmax_scale()

    def lam(self) -> torch.Tensor:
        """lambda = exp(lq1.lk1) - exp(lq2.lk2) + lambda_init, 0-dim FP32."""
        return (torch.exp((self.lambda_q1 * self.lambda_k1).sum())
                - torch.exp((self.lambda_q2 * self.lambda_k2).sum()) + self.lambda_init_t)

    def qk_width(self) -> int:
        cfg = self.cfg
        if self.opts.attn == "pad":
            vw = 2 * cfg.v_head_dim if cfg.differential else cfg.v_head_dim
            return _round_up(max(cfg.d_qk, vw), 8)
        return cfg.d_qk

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        cfg, cdt = self.cfg, self.opts.compute_dtype
        B, T, _ = x.shape
        H, dn, dr, dv, r = (cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                            cfg.v_head_dim, cfg.kv_lora_rank)
        xc = x.to(cdt)
        # x feeds wq_a (or wq) and wkv_a: one GEMM over the concatenated weights.
        if cfg.q_lora_rank > 0:
            wa = torch.cat([self.wq_a.weight.to(cdt), self.wkv_a.weight.to(cdt)], dim=0)
            qa, kv = F.linear(xc, wa).split([cfg.q_lora_rank, r + dr], dim=-1)
            cq = rms_norm32(qa, self.q_norm.weight, cfg.norm_eps).to(cdt)
            q = F.linear(cq, self.wq_b.weight.to(cdt))
        else:
            wa = torch.cat([self.wq.weight.to(cdt), self.wkv_a.weight.to(cdt)], dim=0)
            q, kv = F.linear(xc, wa).split([H * cfg.d_qk, r + dr], dim=-1)
        q = q.view(B, T, H, dn + dr)
        c, k_pe = kv.split([r, dr], dim=-1)
        c_hat = rms_norm32(c, self.kv_norm.weight, cfg.norm_eps).to(cdt)
        k_pe = apply_rope(k_pe, cos, sin)                                  # [B, T, dr]: ONE rope key
        q_pe = apply_rope(q[..., dn:], cos, sin)                           # [B, T, H, dr]
        kvb = F.linear(c_hat, self.wkv_b.weight.to(cdt)).view(B, T, H, dn + dv)
        k_nope, v = kvb[..., :dn], kvb[..., dn:]
        qparts = [q[..., :dn], q_pe]
        kparts = [k_nope, k_pe.unsqueeze(2).expand(B, T, H, dr)]
        pad = self.qk_width() - (dn + dr)
        if pad > 0:
            z = q.new_zeros(B, T, H, pad)
            qparts.append(z)
            kparts.append(z)
        qf = torch.cat(qparts, dim=-1)
        kf = torch.cat(kparts, dim=-1)
        if cfg.differential:
            O = attention_core(qf, kf, v, self.lam(), self.scale, self.opts.attn, True)
            O = (1.0 - self.lambda_init_t) * F.rms_norm(O, (2 * dv,), self.subln.weight.float(),
                                                        SUBLN_EPS)
        else:
            O = attention_core(qf, kf, v, None, self.scale, self.opts.attn, False)
        return F.linear(O.reshape(B, T, H * dv).to(cdt), self.wo.weight.to(cdt))


class DenseFFN(nn.Module):
    def __init__(self, cfg: Config, opts: FastOptions, device, dtype) -> None:
        super().__init__()
        self.opts = opts
        self.w1 = Weight(cfg.inter_dim, cfg.dim, device=device, dtype=dtype)
        self.w2 = Weight(cfg.dim, cfg.inter_dim, device=device, dtype=dtype)
        self.w3 = Weight(cfg.inter_dim, cfg.dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu_fused(x, self.w1.weight, self.w2.weight, self.w3.weight,
                            self.opts.compute_dtype)


class SharedFFN(nn.Module):
    """The shared experts: ONE SwiGLU of width n_shared_experts*moe_inter_dim."""

    def __init__(self, cfg: Config, opts: FastOptions, device, dtype) -> None:
        super().__init__()
        self.opts = opts
        inter = cfg.n_shared_experts * cfg.moe_inter_dim
        self.w1 = Weight(inter, cfg.dim, device=device, dtype=dtype)
        self.w2 = Weight(cfg.dim, inter, device=device, dtype=dtype)
        self.w3 = Weight(inter, cfg.dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu_fused(x, self.w1.weight, self.w2.weight, self.w3.weight,
                            self.opts.compute_dtype)



class Gate(nn.Module):
    def __init__(self, cfg: Config, device, dtype) -> None:
        super().__init__()
        self.weight = _param((cfg.n_routed_experts, cfg.dim), device, dtype)
        # balancing bias: FP32 buffer, saved, never differentiated
        self.register_buffer("bias", torch.zeros(cfg.n_routed_experts, device=device,
                                                 dtype=torch.float32 if dtype != torch.float64
                                                 else dtype), persistent=True)


class Experts(nn.Module):
    """Routed experts, stacked [E, out, in] (docs/model.md §8)."""

    def __init__(self, cfg: Config, opts: FastOptions, device, dtype) -> None:
        super().__init__()
        self.opts = opts
        E, I, D = cfg.n_routed_experts, cfg.moe_inter_dim, cfg.dim
        self.w1 = _param((E, I, D), device, dtype)
        self.w2 = _param((E, D, I), device, dtype)
        self.w3 = _param((E, I, D), device, dtype)

    def forward(self, xs: torch.Tensor, ws: torch.Tensor, offs: torch.Tensor,
                counts: torch.Tensor) -> torch.Tensor:
        """xs: [M, D] rows sorted by expert; ws: [M] FP32 routing weights; offs: int32 cumulative
        counts [E]; returns [M, D] = ws * Expert_e(xs) (weights applied to the hidden, FP32)."""
        cdt = xs.dtype
        if self.opts.experts == "grouped_mm" and _GMM is None:
            warnings.warn("torch._grouped_mm is not available: routed experts run as a per-expert "
                          "loop (slow)")
            self.opts.experts = "loop"
        if self.opts.experts == "grouped_mm":
            w13 = torch.cat([self.w1.to(cdt), self.w3.to(cdt)], dim=1)          # [E, 2I, D]
            h = _GMM(xs, w13.transpose(1, 2), offs=offs)                       # [M, 2I]
            a = _SwiGLU.apply(h, ws)                                            # [M, I]
            return _GMM(a, self.w2.to(cdt).transpose(1, 2), offs=offs)          # [M, D]
        # Fallback: one GEMM chain per expert (host sync for the counts).
        outs = []
        start = 0
        for e, c in enumerate(counts.tolist()):
            if c == 0:
                continue
            xe = xs[start:start + c]
            h1 = F.linear(xe, self.w1[e].to(cdt))
            h3 = F.linear(xe, self.w3[e].to(cdt))
            a = (F.silu(h1.float()) * h3.float() * ws[start:start + c].unsqueeze(-1)).to(cdt)
            outs.append(F.linear(a, self.w2[e].to(cdt)))
            start += c
        return torch.cat(outs, dim=0)


def route_tokens(cfg: Config, u32: torch.Tensor, gate_weight: torch.Tensor, gate_bias: torch.Tensor,
                 force_idx: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The router of docs/model.md §5 (FastMoE.route and the decoder of torch_decode.py share it).
    u32: [N, D] FP32 -> scores s [N, E] (with grad), idx [N, K], weights w [N, K] FP32.
    force_idx [N, K] replaces the top-k selection (test hook; the weights still come from s)."""
    N = u32.shape[0]
    E, K, G = cfg.n_routed_experts, cfg.n_activated_experts, cfg.n_expert_groups
    with torch.autocast(device_type=u32.device.type, enabled=False):
        z = F.linear(u32, gate_weight)                                       # FP32 router
    s = torch.sigmoid(z) if cfg.score_func == "sigmoid" else torch.softmax(z, dim=-1)
    sd = s.detach()                                       # selection never gets a gradient
    s_sel = sd + gate_bias if cfg.balance_bias else sd
    if G > 1:
        sg = s_sel.view(N, G, E // G)
        gscore = sg.topk(2, dim=-1).values.sum(-1) if cfg.balance_bias else sg.amax(dim=-1)
        keep = gscore.topk(cfg.n_limited_groups, dim=-1).indices
        drop = torch.ones(N, G, dtype=torch.bool, device=u32.device).scatter_(1, keep, False)
        s_sel = sg.masked_fill(drop.unsqueeze(-1), float("-inf")).view(N, E)
    if force_idx is not None:
        idx = force_idx
    else:
        idx = s_sel.topk(K, dim=-1).indices
    w = s.gather(1, idx)                                   # ORIGINAL scores
    if cfg.score_func == "sigmoid":
        w = w / w.sum(dim=-1, keepdim=True)
    if cfg.route_scale != 1.0:
        w = w * cfg.route_scale
    return s, idx, w


class FastMoE(nn.Module):
    """DeepSeek-V3 MoE (docs/model.md §5), dropless."""

    def __init__(self, cfg: Config, opts: FastOptions, device, dtype) -> None:
        super().__init__()
        self.cfg, self.opts = cfg, opts
        self.gate = Gate(cfg, device, dtype)
        self.experts = Experts(cfg, opts, device, dtype)
        if cfg.n_shared_experts > 0:
            self.shared = SharedFFN(cfg, opts, device, dtype)
        # --check hooks (never set in benchmarks)
        self._force_idx: Optional[torch.Tensor] = None
        self._record = False
        self._last_idx: Optional[torch.Tensor] = None

    def route(self, u32: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """u32: [N, D] FP32 -> scores s [N, E] (with grad), idx [N, K], weights w [N, K] FP32."""
        return route_tokens(self.cfg, u32, self.gate.weight, self.gate.bias, self._force_idx)

    def aux_loss(self, s: torch.Tensor, B: int, T: int) -> torch.Tensor:
        """alpha * mean_b sum_i f_i P_i (docs/derivations.md §4.6): f from a plain top-k of the unbiased s."""
        cfg = self.cfg
        E, K = cfg.n_routed_experts, cfg.n_activated_experts
        s3 = s.view(B, T, E)
        top = s3.detach().topk(K, dim=-1).indices.reshape(B, T * K)
        f = torch.zeros(B, E, device=s.device, dtype=s.dtype).scatter_add_(
            1, top, torch.ones(B, T * K, device=s.device, dtype=s.dtype)) * (E / (K * T))
        sp = s3 / s3.sum(dim=-1, keepdim=True) if cfg.score_func == "sigmoid" else s3
        P = sp.mean(dim=1)
        return cfg.aux_loss_alpha * (f * P).sum(dim=-1).mean()

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [B, T, D] FP32 (normalised) -> (y [B, T, D], aux loss 0-dim, counts [E] int64)."""
        cfg = self.cfg
        cdt = self.opts.compute_dtype
        B, T, D = x.shape
        N, K, E = B * T, cfg.n_activated_experts, cfg.n_routed_experts
        u32 = x.reshape(N, D)
        s, idx, w = self.route(u32)
        if cfg.aux_loss_alpha > 0:
            aux = self.aux_loss(s, B, T)
        else:
            aux = s.new_zeros(())
        if self._record:
            self._last_idx = idx.detach().clone()
        flat = idx.reshape(-1)
        counts = torch.zeros(E, dtype=torch.int64, device=x.device).scatter_add_(
            0, flat, torch.ones_like(flat))
        order = torch.sort(flat, stable=True).indices                        # expert-major
        tok = torch.div(order, K, rounding_mode="floor")
        inv = torch.empty_like(order).scatter_(0, order, torch.arange(N * K, device=x.device))
        u = u32.to(cdt)
        xs = _DispatchRows.apply(u, tok, inv, K)                              # [N*K, D]
        ws = w.reshape(-1).index_select(0, order)                             # FP32 [N*K]
        offs = counts.cumsum(0).to(torch.int32)
        ys = self.experts(xs, ws, offs, counts)                               # [N*K, D]
        y = _CombineRows.apply(ys, inv, tok, K)                               # [N, D]
        if cfg.n_shared_experts > 0:
            y = y + self.shared(u)
        return y.view(B, T, D), aux, counts


class FastBlock(nn.Module):
    def __init__(self, cfg: Config, layer: int, opts: FastOptions, device, dtype) -> None:
        super().__init__()
        self.eps = cfg.norm_eps
        self.attn_norm = Weight(cfg.dim, device=device, dtype=dtype)
        self.attn = FastAttention(cfg, layer, opts, device, dtype)
        self.ffn_norm = Weight(cfg.dim, device=device, dtype=dtype)
        self.is_moe = cfg.is_moe_layer(layer)
        self.ffn = FastMoE(cfg, opts, device, dtype) if self.is_moe else DenseFFN(cfg, opts, device, dtype)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """h: FP32 residual [B, T, D] -> (h, aux or None, counts or None)."""
        h = h + self.attn(rms_norm32(h, self.attn_norm.weight, self.eps), cos, sin)
        f_in = rms_norm32(h, self.ffn_norm.weight, self.eps)
        if self.is_moe:
            y, aux, counts = self.ffn(f_in)
            return h + y, aux, counts
        return h + self.ffn(f_in), None, None


def head_loss(h: torch.Tensor, norm_w: torch.Tensor, head_w: torch.Tensor, targets: torch.Tensor,
              eps: float, cdt: torch.dtype) -> torch.Tensor:
    """Final RMSNorm, head GEMM (compute dtype), mean cross-entropy in FP32 (ignore_index -1)."""
    x = rms_norm32(h, norm_w, eps).to(cdt)
    logits = F.linear(x, head_w.to(cdt))
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=-1)


class DiffMoEFast(nn.Module):
    """The whole model. forward(tokens, targets) -> (loss = lm + aux, lm, aux, [counts per MoE layer])."""

    def __init__(self, cfg: Config, opts: Optional[FastOptions] = None, device="cpu",
                 param_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.cfg = cfg
        self.opts = opts if opts is not None else FastOptions()
        kw = dict(device=device, dtype=param_dtype)
        self.embed = Weight(cfg.vocab_size, cfg.dim, **kw)
        self.layers = nn.ModuleList([FastBlock(cfg, l, self.opts, device, param_dtype)
                                     for l in range(cfg.n_layers)])
        self.norm = Weight(cfg.dim, **kw)
        if not cfg.tie_embeddings:
            self.head = Weight(cfg.vocab_size, cfg.dim, **kw)
        cos, sin = rope_tables(cfg, cfg.max_seq_len)
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)
        self._head_loss: Callable[..., torch.Tensor] = head_loss

    def head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.cfg.tie_embeddings else self.head.weight

    def moe_layers(self) -> List[FastMoE]:
        return [blk.ffn for blk in self.layers if blk.is_moe]

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor):
        cfg = self.cfg
        B, T = tokens.shape
        assert T <= cfg.max_seq_len, "sequence longer than max_seq_len"
        h = F.embedding(tokens, self.embed.weight) * cfg.embed_scale
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        aux_total: Optional[torch.Tensor] = None
        counts: List[torch.Tensor] = []
        for blk in self.layers:
            h, aux, c = blk(h, cos, sin)
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
                counts.append(c)
        lm = self._head_loss(h, self.norm.weight, self.head_weight(), targets, cfg.norm_eps,
                             self.opts.compute_dtype)
        if aux_total is None:
            aux_total = lm.new_zeros(())
        return lm + aux_total, lm, aux_total, counts

    @torch.no_grad()
    def update_bias(self, counts: List[torch.Tensor]) -> None:
        """b_i += rate * sign(mean(c) - c_i) once per optimizer step (docs/model.md §5), all layers at once."""
        cfg = self.cfg
        if not counts or not cfg.balance_bias or cfg.bias_update_rate == 0:
            return
        C = torch.stack(counts).float()                                         # [L_moe, E]
        upd = torch.sign(C.mean(dim=1, keepdim=True) - C) * cfg.bias_update_rate
        biases = [m.gate.bias for m in self.moe_layers()]
        torch._foreach_add_(biases, [u.to(b.dtype) for u, b in zip(upd.unbind(0), biases)])

    def compile_regions(self, mode: Optional[str] = None) -> None:
        """Regional torch.compile: every block (one graph for all MoE blocks, one for the dense
        one; state_dict names unchanged) and the final norm + head + loss."""
        kw: Dict[str, Any] = {"dynamic": False}
        if mode and mode != "default":
            kw["mode"] = mode
        for blk in self.layers:
            blk.compile(**kw)
        self._head_loss = torch.compile(head_loss, **kw)

    def param_groups(self, weight_decay: float) -> List[Dict[str, Any]]:
        """AdamW groups as the C++ trainer: decay on matrices, experts, gate and head; none on the
        embedding, norms, subln and lambda vectors."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            (decay if p.dim() >= 2 and name != "embed.weight" else no_decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def init_weights(model: DiffMoEFast, seed: int) -> None:
    """docs/model.md §6: linear weights and the gate N(0, init_std^2), wo and every w2 scaled by
    1/sqrt(2*n_layers); embedding N(0, embed_init_std^2); norms 1; lambda N(0, 0.1^2); bias 0.
    (Seeded torch generator on the model's device: reproducible, not bit-equal to the C++ init.)"""
    cfg = model.cfg
    dev = model.embed.weight.device
    g = torch.Generator(device=dev)
    g.manual_seed(seed)
    out_scale = 1.0 / math.sqrt(2 * cfg.n_layers)
    for name, p in model.named_parameters():
        if name == "embed.weight":
            p.normal_(0.0, cfg.embed_init_std, generator=g)
        elif name.endswith("norm.weight") or name.endswith("subln.weight"):
            p.fill_(1.0)
        elif ".lambda_" in name:
            p.normal_(0.0, 0.1, generator=g)
        else:
            std = cfg.init_std
            if name.endswith("attn.wo.weight") or name.endswith(".w2.weight") or \
                    name.endswith("experts.w2"):
                std *= out_scale
            p.normal_(0.0, std, generator=g)
    for m in model.moe_layers():
        m.gate.bias.zero_()


def load_safetensors(path: str, device="cpu", opts: Optional[FastOptions] = None,
                     cfg: Optional[Config] = None) -> DiffMoEFast:
    """Builds the model from one of our safetensors checkpoints (docs/model.md §8 names; the config from
    the "config" metadata entry unless given) and loads its weights. Tensors with other names
    (none expected) are ignored; a missing model tensor is an error."""
    import json
    from safetensors import safe_open  # type: ignore
    with safe_open(path, framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        if cfg is None:
            doc = json.loads(meta["config"])
            cfg = Config.from_dict(dict(doc.get("model", doc)))
        model = DiffMoEFast(cfg, opts, device=device)
        wanted = model.state_dict()
        missing = [k for k in wanted if k not in f.keys()]
        if missing:
            raise KeyError(f"{path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        with torch.no_grad():
            for k, t in wanted.items():
                t.copy_(f.get_tensor(k))
    return model


# ---------------------------------------------------------------------------------------------
# Run-time selection helpers (used by torch_bench.py and --check)
# ---------------------------------------------------------------------------------------------

_SDPA_BACKENDS = ("cudnn", "flash", "efficient", "math")


def set_sdpa_backend(name: Optional[str]) -> None:
    """Enable exactly one SDPA backend globally (None: all). Global flags are what both eager
    dispatch and torch.compile's tracing consult."""
    cu = torch.backends.cuda
    on = (lambda b: True) if name is None else (lambda b: name.split("+")[0] == b)
    cu.enable_flash_sdp(on("flash"))
    cu.enable_mem_efficient_sdp(on("efficient"))
    if hasattr(cu, "enable_cudnn_sdp"):
        cu.enable_cudnn_sdp(on("cudnn"))
    cu.enable_math_sdp(on("math"))


def sdpa_only(name: str):
    """Context manager: only this backend (eager); "default" = torch's own choice."""
    if sdpa_kernel is None or SDPBackend is None or name == "default":
        return contextlib.nullcontext()
    m = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
         "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    return sdpa_kernel([m[name.split("+")[0]]])


def flash_impls() -> List[str]:
    """Alternative FlashAttention implementations registered with torch (e.g. "FA3"/"FA4" where
    their packages are installed); usually empty."""
    try:
        from torch.nn.attention import list_flash_attention_impls  # type: ignore
        return list(list_flash_attention_impls())
    except Exception:
        return []


_ACTIVE_FLASH_IMPL: Optional[str] = None


def activate_flash_impl(impl: Optional[str]) -> None:
    """Activate a registered flash impl (None: back to the built-in FlashAttention-2)."""
    global _ACTIVE_FLASH_IMPL
    if impl == _ACTIVE_FLASH_IMPL:
        return
    import torch.nn.attention as A
    if impl is None:
        fn = getattr(A, "restore_flash_attention_impl", None)
        if fn is not None:
            try:
                fn(_raise_warn=False)
            except TypeError:
                fn()
        _ACTIVE_FLASH_IMPL = None
        return
    A.activate_flash_attention_impl(impl)  # type: ignore[attr-defined]
    _ACTIVE_FLASH_IMPL = impl


@dataclass
class AttnChoice:
    formulation: str          # ev | pad | splitv
    backend: str              # cudnn | flash | efficient | math | flash+FA3 ...
    ok: bool = False
    ms_fwd_bwd: float = float("nan")
    ms_fwd: float = float("nan")
    err_out: float = float("nan")
    err_grad: float = float("nan")
    note: str = ""

    @property
    def label(self) -> str:
        return f"{self.formulation}/{self.backend}"

    def apply(self) -> None:
        impl = self.backend.split("+")[1] if "+" in self.backend else None
        activate_flash_impl(impl)
        set_sdpa_backend(self.backend)


def _cuda_time(fn: Callable[[], Any], warmup: int, iters: int) -> float:
    """Median milliseconds of fn() over `iters` runs (CUDA events per run)."""
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for i in range(iters):
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    ts = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    return ts[len(ts) // 2]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def attention_inputs(B: int, T: int, Hc: int, dqk: int, dv: int, differential: bool,
                     device, seed: int = 0):
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    q = torch.randn(B, T, Hc, dqk, device=device, generator=g).to(torch.bfloat16)
    k = torch.randn(B, T, Hc, dqk, device=device, generator=g).to(torch.bfloat16)
    v = torch.randn(B, T, Hc, dv, device=device, generator=g).to(torch.bfloat16)
    ow = 2 * dv if differential else dv
    oh = Hc // 2 if differential else Hc
    dO = torch.randn(B, T, oh, ow, device=device, generator=g)
    lam = torch.tensor(0.35, device=device)
    return q, k, v, dO, lam


def pad_qk(x: torch.Tensor, P: int) -> torch.Tensor:
    return x if x.shape[-1] == P else F.pad(x, (0, P - x.shape[-1]))


def formulation_width(formulation: str, dqk: int, dv: int, differential: bool) -> int:
    if formulation == "pad":
        return _round_up(max(dqk, 2 * dv if differential else dv), 8)
    return dqk


def select_attention(B: int, T: int, Hc: int, dqk: int, dv: int, scale: float,
                     differential: bool = True, device="cuda", warmup: int = 2, iters: int = 5,
                     log: Callable[[str], None] = print,
                     only: Optional[Sequence[str]] = None) -> List[AttnChoice]:
    """Try every formulation x SDPA backend on the given shapes: correctness (outputs and
    q/k/v gradients of one sequence vs an FP32 math reference from the same BF16 inputs; rel. L2
    error <= 2e-2 / 5e-2) and forward+backward time on the full batch. Returns all candidates,
    the usable ones first, fastest first. Leaves all SDPA backends enabled."""
    forms = ["ev", "pad", "splitv"] if differential else ["ev", "pad"]
    backends = ["cudnn", "flash", "efficient"]
    for impl in flash_impls():
        backends.append("flash+" + impl)
    q, k, v, dO, lam = attention_inputs(B, T, Hc, dqk, dv, differential, device)
    # FP32 reference on the first sequence (math backend).
    set_sdpa_backend("math")
    qr, kr, vr = (t[:1].float().requires_grad_(True) for t in (q, k, v))
    o_ref = attention_core(qr, kr, vr, lam, scale, "ev", differential)
    gq_ref, gk_ref, gv_ref = torch.autograd.grad(o_ref.float(), (qr, kr, vr), dO[:1])
    o_ref = o_ref.detach()
    results: List[AttnChoice] = []
    for be in backends:
        for fm in forms:
            ch = AttnChoice(fm, be)
            if only is not None and ch.label not in only:
                continue
            results.append(ch)
            P = formulation_width(fm, dqk, dv, differential)
            wctx = warnings.catch_warnings()   # "kernel not used because ..." noise
            wctx.__enter__()
            warnings.simplefilter("ignore")
            try:
                ch.apply()
                qp, kp = pad_qk(q, P), pad_qk(k, P)
                q1, k1, v1 = (t[:1].detach().clone().requires_grad_(True) for t in (qp, kp, v))
                o1 = attention_core(q1, k1, v1, lam, scale, fm, differential)
                g1 = torch.autograd.grad(o1.float(), (q1, k1, v1), dO[:1])
                ch.err_out = _rel(o1.float(), o_ref)
                ch.err_grad = max(_rel(g1[0][..., :dqk].float(), gq_ref),
                                  _rel(g1[1][..., :dqk].float(), gk_ref),
                                  _rel(g1[2].float(), gv_ref))
                if not (ch.err_out <= 2e-2 and ch.err_grad <= 5e-2):
                    ch.note = "WRONG RESULT"
                    continue
                qa, ka, va = (t.detach().clone().requires_grad_(True) for t in (qp, kp, v))

                def fwd_bwd():
                    o = attention_core(qa, ka, va, lam, scale, fm, differential)
                    torch.autograd.grad(o.float(), (qa, ka, va), dO)

                def fwd():
                    with torch.no_grad():
                        attention_core(qa, ka, va, lam, scale, fm, differential)

                ch.ms_fwd_bwd = _cuda_time(fwd_bwd, warmup, iters)
                ch.ms_fwd = _cuda_time(fwd, warmup, iters)
                ch.ok = True
            except Exception as e:  # unsupported shape / backend
                msg = str(e).strip().splitlines()
                ch.note = "n/a: " + (msg[0][:100] if msg else type(e).__name__)
            finally:
                wctx.__exit__(None, None, None)
                torch.cuda.synchronize()
    activate_flash_impl(None)
    set_sdpa_backend(None)
    results.sort(key=lambda c: (not c.ok, c.ms_fwd_bwd if c.ok else 0.0))
    for c in results:
        if c.ok:
            log(f"  attention {c.label:22s} fwd+bwd {c.ms_fwd_bwd:8.3f} ms  fwd {c.ms_fwd:7.3f} ms"
                f"  err out {c.err_out:.1e} grad {c.err_grad:.1e}")
        else:
            log(f"  attention {c.label:22s} unusable  {c.note}")
    return results


def grouped_mm_signature() -> str:
    if _GMM is None:
        return "absent"
    import inspect
    try:
        return f"{_GMM_NAME}{inspect.signature(_GMM)}"
    except (TypeError, ValueError):
        doc = (getattr(_GMM, "__doc__", None) or "").strip().splitlines()
        return f"{_GMM_NAME} ({doc[0] if doc else 'no signature available'})"


def probe_grouped_mm(device, dtype: torch.dtype) -> Tuple[bool, str]:
    """Checks torch._grouped_mm (2D x 3D with offsets, as used here, forward and backward,
    including an empty group) against per-group matmuls."""
    if _GMM is None:
        return False, "torch._grouped_mm is not present in this torch"
    try:
        g = torch.Generator(device=device)
        g.manual_seed(1)
        counts = [5, 0, 19, 8]
        E, D, I = len(counts), 64, 48
        M = sum(counts)
        x = torch.randn(M, D, device=device, generator=g).to(dtype).requires_grad_(True)
        w = torch.randn(E, I, D, device=device, generator=g).to(dtype).requires_grad_(True)
        gy = torch.randn(M, I, device=device, generator=g).to(dtype)
        offs = torch.tensor(counts, device=device).cumsum(0).to(torch.int32)
        y = _GMM(x, w.transpose(1, 2), offs=offs)
        gx, gw = torch.autograd.grad(y, (x, w), gy)
        xr, wr = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
        parts, s = [], 0
        for e, c in enumerate(counts):
            parts.append(xr[s:s + c] @ wr[e].t())
            s += c
        yr = torch.cat(parts)
        gxr, gwr = torch.autograd.grad(yr, (xr, wr), gy.double())
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        errs = (_rel(y, yr), _rel(gx, gxr), _rel(gw, gwr))
        if max(errs) > tol:
            return False, f"{_GMM_NAME} mismatch (rel errors {errs})"
        return True, f"{_GMM_NAME} ok (rel errors {max(errs):.1e})"
    except Exception as e:
        msg = str(e).strip().splitlines()
        return False, f"{_GMM_NAME} failed: {msg[0][:160] if msg else type(e).__name__}"


# ---------------------------------------------------------------------------------------------
# --check: same model as tools/reference/diffmoe_ref.py
# ---------------------------------------------------------------------------------------------

# Micro configs (every §9 key explicit); dims multiples of 8 so BF16 fused kernels accept them.
CHECK_DIFF: Dict[str, Any] = {
    "vocab_size": 96, "dim": 64, "n_layers": 3, "n_dense_layers": 1, "n_heads": 4,
    "q_lora_rank": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
    "v_head_dim": 16, "inter_dim": 96, "moe_inter_dim": 32, "n_routed_experts": 8,
    "n_shared_experts": 1, "n_activated_experts": 2, "n_expert_groups": 4, "n_limited_groups": 2,
    "score_func": "sigmoid", "route_scale": 1.5, "balance_bias": True, "bias_update_rate": 0.001,
    "aux_loss_alpha": 0.01, "max_seq_len": 64, "original_seq_len": 16, "rope_theta": 10000.0,
    "rope_factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "differential": True,
    "tie_embeddings": False, "init_std": 0.02, "embed_init_std": 0.02, "embed_scale": 8.0,
    "norm_eps": 1e-6,
}
CHECK_PLAIN: Dict[str, Any] = dict(CHECK_DIFF)
CHECK_PLAIN.update({
    "differential": False, "q_lora_rank": 0, "score_func": "softmax", "route_scale": 1.0,
    "n_expert_groups": 1, "n_limited_groups": 1, "balance_bias": False, "aux_loss_alpha": 0.001,
    "original_seq_len": 64, "rope_factor": 1.0, "tie_embeddings": True, "embed_scale": 1.0,
    "n_activated_experts": 3,
})
CHECK_BATCH, CHECK_SEQ = 2, 48

# Tolerances (relative L2 error vs the float64 reference).
TOL_F32 = {"loss": 2e-5, "grad": 5e-4}     # FP32 fast path: only FP32 rounding
TOL_BF16 = {"loss": 2e-2, "grad": 1e-1}    # BF16 matmuls/activations, FP32 softmax/norms/router
WARN_BF16_GRAD = 5e-2


def _fill_check_weights(ref: nn.Module, cfg: Config, seed: int) -> None:
    """Spreads larger than the §6 init so every branch matters (as make_golden.py): linear/expert/
    gate/head N(0, 1/in); norms and subln 1 + 0.2 N; lambda N(0, 0.3^2); gate.bias N(0, 0.05^2)
    when balance_bias; embedding N(0, 1). Rounded to FP32 so the FP32 model holds the same values."""
    g = torch.Generator()
    g.manual_seed(seed)
    with torch.no_grad():
        for name, t in ref.state_dict(keep_vars=True).items():
            z = torch.randn(t.shape, generator=g, dtype=torch.float64)
            leaf = name.split(".")[-2] if name.endswith(".weight") else name.split(".")[-1]
            if name == "embed.weight":
                v = z
            elif name.endswith("gate.bias"):
                v = 0.05 * z if cfg.balance_bias else torch.zeros_like(z)
            elif leaf in ("attn_norm", "ffn_norm", "q_norm", "kv_norm", "norm", "subln"):
                v = 1.0 + 0.2 * z
            elif leaf.startswith("lambda_"):
                v = 0.3 * z
            else:
                v = z / math.sqrt(t.shape[-1])
            t.copy_(v.float().double())


def _sorted_idx(idx: torch.Tensor) -> torch.Tensor:
    return idx.detach().cpu().sort(dim=-1).values


def run_check(device: str, seed: int = 1234, cpu_bf16: bool = False) -> bool:
    import diffmoe_ref as R
    ok_all = True
    is_cuda = device.startswith("cuda")
    if is_cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    print(f"check: fast model vs tools/reference/diffmoe_ref.py (float64, CPU); fast model on "
          f"{device}; torch {torch.__version__}; grouped GEMM: {grouped_mm_signature()}")
    print(f"  tolerances (rel. L2 error vs f64): FP32 path loss {TOL_F32['loss']:.0e}, grads "
          f"{TOL_F32['grad']:.0e}; BF16 path (routing forced to the reference's) loss "
          f"{TOL_BF16['loss']:.0e}, grads {TOL_BF16['grad']:.0e} (warn > {WARN_BF16_GRAD:.0e}; "
          f"lambda-vector grads gated in FP32 only)")
    gmm_ok32, gmm_msg32 = probe_grouped_mm(device, torch.float32)
    print(f"  grouped_mm probe fp32: {gmm_msg32}")
    expert_impls = ["grouped_mm", "loop"] if gmm_ok32 else ["loop"]
    for cname, cdict in (("diff", CHECK_DIFF), ("plain", CHECK_PLAIN)):
        cfg = Config.from_dict(dict(cdict))
        torch.manual_seed(seed)
        ref = R.DiffMoE(cfg)
        _fill_check_weights(ref, cfg, seed)
        g = torch.Generator()
        g.manual_seed(seed + 1)
        seq = torch.randint(0, cfg.vocab_size, (CHECK_BATCH, CHECK_SEQ + 1), generator=g)
        tokens, targets = seq[:, :-1].clone(), seq[:, 1:].clone()
        for flat in torch.randperm(CHECK_BATCH * CHECK_SEQ, generator=g)[:5].tolist():
            targets.view(-1)[flat] = -1
        out = ref(tokens, targets)
        (out["lm_loss"] + out["aux_loss"]).backward()
        ref_grads = {n: p.grad.detach().clone() for n, p in ref.named_parameters()}
        ref_lm, ref_aux = float(out["lm_loss"]), float(out["aux_loss"])
        ref_idx = {l: _sorted_idx(i) for l, i in out["idx"].items()}
        ref_counts = {l: c.clone() for l, c in out["counts"].items()}
        ref_lam = {l: float(v) for l, v in out["lambda"].items()}
        # YaRN tables: independent implementation == reference's
        fr = R.rope_frequencies(cfg)
        assert torch.allclose(yarn_frequencies(cfg), fr, rtol=0, atol=1e-15), "YaRN frequencies differ"
        sd = ref.state_dict()
        forms = ["ev", "pad", "splitv"] if cfg.differential else ["ev", "pad"]
        print(f"[{cname}] ref lm {ref_lm:.6f} aux {ref_aux:.3e}; differential={cfg.differential} "
              f"q_lora={cfg.q_lora_rank} yarn={cfg.yarn} score={cfg.score_func} "
              f"groups={cfg.n_expert_groups} tie={cfg.tie_embeddings}")
        forced: Dict[int, torch.Tensor] = {}
        # ---- FP32 path, every formulation x expert implementation, math SDPA ----
        for ex in expert_impls:
            for fm in forms:
                model = DiffMoEFast(cfg, FastOptions(torch.float32, fm, ex), device=device)
                model.load_state_dict(sd, strict=True)        # §8 names match exactly
                for m in model.moe_layers():
                    m._record = True
                ctx = sdpa_only("math") if is_cuda else contextlib.nullcontext()
                with ctx:
                    loss, lm, aux, counts = model(tokens.to(device), targets.to(device))
                    loss.backward()
                errs = {"lm": abs(float(lm) - ref_lm) / abs(ref_lm),
                        "aux": abs(float(aux) - ref_aux) / max(abs(ref_aux), 1e-30)}
                routing_same = True
                moe_ls = [l for l in range(cfg.n_layers) if cfg.is_moe_layer(l)]
                for l, m, c in zip(moe_ls, model.moe_layers(), counts):
                    routing_same &= bool(torch.equal(_sorted_idx(m._last_idx), ref_idx[l]))
                    routing_same &= bool(torch.equal(c.cpu(), ref_counts[l]))
                    forced[l] = m._last_idx
                lam_err = max([abs(float(model.layers[l].attn.lam()) - v) for l, v in ref_lam.items()]
                              or [0.0])
                gerr = {n: _rel(p.grad.cpu(), ref_grads[n]) for n, p in model.named_parameters()}
                worst = sorted(gerr.items(), key=lambda kv: -kv[1])[:3]
                ok = (errs["lm"] <= TOL_F32["loss"] and errs["aux"] <= max(TOL_F32["loss"], 1e-4)
                      and routing_same and lam_err <= 1e-5 and max(gerr.values()) <= TOL_F32["grad"])
                ok_all &= ok
                print(f"  fp32 {fm:6s} experts={ex:10s} {'PASS' if ok else 'FAIL'}  lm {errs['lm']:.1e} "
                      f"aux {errs['aux']:.1e} lambda {lam_err:.1e} routing "
                      f"{'same' if routing_same else 'DIFFERENT'}  grads max {max(gerr.values()):.1e} "
                      f"(worst: {', '.join(f'{n} {e:.1e}' for n, e in worst)})")
                model = None
        # ---- BF16 path: the production kernels (SDPA fused backends, grouped_mm bf16) ----
        if not is_cuda and not cpu_bf16:
            print("  bf16: skipped (no CUDA; --cpu-bf16 runs it on the CPU)")
            continue
        gmm_ok16, gmm_msg16 = probe_grouped_mm(device, torch.bfloat16)
        print(f"  grouped_mm probe bf16: {gmm_msg16}")
        ex16 = "grouped_mm" if gmm_ok16 else "loop"
        dev_type = "cuda" if is_cuda else "cpu"
        for be in (("cudnn", "flash", "efficient") if is_cuda else ("default",)):
            for fm in forms:
                model = DiffMoEFast(cfg, FastOptions(torch.bfloat16, fm, ex16), device=device)
                model.load_state_dict(sd, strict=True)
                moe_ls = [l for l in range(cfg.n_layers) if cfg.is_moe_layer(l)]
                for l, m in zip(moe_ls, model.moe_layers()):
                    m._force_idx = forced[l]
                try:
                    with sdpa_only(be), torch.autocast(dev_type, dtype=torch.bfloat16):
                        loss, lm, aux, counts = model(tokens.to(device), targets.to(device))
                    loss.backward()
                except RuntimeError as e:
                    msg = str(e).strip().splitlines()
                    print(f"  bf16 {fm:6s} sdpa={be:9s} n/a ({msg[0][:90] if msg else 'error'})")
                    model = None
                    continue
                lm_err = abs(float(lm) - ref_lm) / abs(ref_lm)
                gerr_all = {n: _rel(p.grad.float().cpu(), ref_grads[n])
                            for n, p in model.named_parameters()}
                # lambda-vector gradients (a cancelling sum) are gated in the FP32 comparison only:
                # in BF16 their error is set by the BF16 rounding of q/k/v upstream, data dependent.
                lam_g = [e for n, e in gerr_all.items() if ".lambda_" in n]
                gerr = {n: e for n, e in gerr_all.items() if ".lambda_" not in n}
                worst = sorted(gerr.items(), key=lambda kv: -kv[1])[:3]
                mx = max(gerr.values())
                ok = lm_err <= TOL_BF16["loss"] and mx <= TOL_BF16["grad"]
                ok_all &= ok
                tag = "PASS" if ok else "FAIL"
                if ok and mx > WARN_BF16_GRAD:
                    tag = "PASS(warn)"
                lam_txt = f"  lambda-vector grads max {max(lam_g):.1e} (not gated)" if lam_g else ""
                print(f"  bf16 {fm:6s} sdpa={be:9s} experts={ex16:10s} {tag:10s} lm {lm_err:.1e}  "
                      f"grads max {mx:.1e} (worst: {', '.join(f'{n} {e:.1e}' for n, e in worst)})"
                      + lam_txt)
                model = None
    # bias update rule on the reference's counts
    cfg = Config.from_dict(dict(CHECK_DIFF))
    model = DiffMoEFast(cfg, FastOptions(torch.float32), device="cpu")
    with torch.no_grad():
        for m in model.moe_layers():
            m.gate.bias.zero_()
    cnt = [torch.tensor([5, 1, 3, 3, 0, 9, 3, 0]), torch.tensor([3] * 8)]
    model.update_bias(cnt)
    b0 = model.moe_layers()[0].gate.bias
    exp0 = 1e-3 * torch.sign(torch.tensor([3.0] * 8) - cnt[0].float())
    ok_b = torch.allclose(b0, exp0) and bool((model.moe_layers()[1].gate.bias == 0).all())
    ok_all &= ok_b
    print(f"  bias update rule b += rate*sign(mean(c)-c): {'PASS' if ok_b else 'FAIL'}")
    print("check: " + ("PASS" if ok_all else "FAIL"))
    return ok_all


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true",
                    help="compare loss and gradients with tools/reference/diffmoe_ref.py")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--cpu-bf16", action="store_true",
                    help="without CUDA, also run the BF16 comparison on the CPU (dtype plumbing only)")
    args = ap.parse_args(argv)
    if not args.check:
        ap.print_help()
        return 0
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.time()
    ok = run_check(device, args.seed, args.cpu_bf16)
    print(f"({time.time() - t0:.1f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
