"""Independent PyTorch reference of the diffmoe model (docs/model.md).

Plain PyTorch, float64, naive attention, autograd for gradients. Written from the spec texts
(model.md §1-§9, sources.md §1.3, §2.3, §3.2, §3.3, §4.2, §4.6, §5.1, Appendix A); it shares no
code with the C++ implementation and is meant to be slow and obvious.

Only torch and the Python standard library are used. Works with torch 1.13 and 2.x.

Parameter names: `DiffMoE(cfg).state_dict()` keys are exactly the checkpoint names of model.md §8
(`layers.{l}.ffn.gate.bias` is a persistent buffer: saved, never part of the gradient set).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

DTYPE = torch.float64
SUBLN_EPS = 1e-5

# ---------------------------------------------------------------------------------------------
# Config (model.md §9)
# ---------------------------------------------------------------------------------------------

# The §9 keys, in §9 order.  The sizes have no default (required).
CONFIG_KEYS = (
    "vocab_size", "dim", "n_layers", "n_dense_layers", "n_heads", "q_lora_rank", "kv_lora_rank",
    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "inter_dim", "moe_inter_dim",
    "n_routed_experts", "n_shared_experts", "n_activated_experts", "n_expert_groups",
    "n_limited_groups", "score_func", "route_scale", "balance_bias", "bias_update_rate",
    "aux_loss_alpha", "max_seq_len", "original_seq_len", "rope_theta", "rope_factor", "beta_fast",
    "beta_slow", "mscale", "differential", "tie_embeddings", "init_std", "embed_init_std",
    "embed_scale", "norm_eps",
)


@dataclass(kw_only=True)
class Config:
    vocab_size: int
    dim: int
    n_layers: int
    n_dense_layers: int
    n_heads: int                      # component heads; even when differential
    q_lora_rank: int                  # 0 = no query compression (wq instead of wq_a/q_norm/wq_b)
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    inter_dim: int
    moe_inter_dim: int
    n_routed_experts: int
    n_shared_experts: int
    n_activated_experts: int
    n_expert_groups: int = 1          # 1 = no groups
    n_limited_groups: int = 1
    score_func: str = "sigmoid"
    route_scale: float = 1.0
    balance_bias: bool = True
    bias_update_rate: float = 1e-3
    aux_loss_alpha: float = 1e-4
    max_seq_len: int
    original_seq_len: Optional[int] = None   # None: = max_seq_len (YaRN off)
    rope_theta: float = 10000.0
    rope_factor: float = 1.0                 # 1 = off
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    differential: bool = True
    tie_embeddings: bool = False
    init_std: float = 0.02
    embed_init_std: Optional[float] = None   # None: = init_std
    embed_scale: Optional[float] = None      # None: = sqrt(dim); 1.0 = none
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.original_seq_len is None:
            self.original_seq_len = self.max_seq_len
        if self.embed_init_std is None:
            self.embed_init_std = self.init_std
        if self.embed_scale is None:
            self.embed_scale = math.sqrt(self.dim)
        self.validate()

    # -- validation (model.md §9) --
    def validate(self) -> None:
        def need(ok: bool, key: str, why: str) -> None:
            if not ok:
                raise ValueError(f"model.{key}: {why}")

        for k in ("vocab_size", "dim", "n_layers", "n_heads", "kv_lora_rank", "qk_nope_head_dim",
                  "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "n_activated_experts",
                  "n_expert_groups", "n_limited_groups", "max_seq_len", "original_seq_len"):
            need(int(getattr(self, k)) > 0, k, "must be positive")
        for k in ("n_dense_layers", "q_lora_rank", "n_shared_experts"):
            need(int(getattr(self, k)) >= 0, k, "must be non-negative")
        need(self.n_dense_layers <= self.n_layers, "n_dense_layers", "must be <= n_layers")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "must be even (interleaved RoPE pairs)")
        need(not self.differential or self.n_heads % 2 == 0, "n_heads", "must be even when differential")
        need(self.score_func in ("sigmoid", "softmax"), "score_func", "must be sigmoid or softmax")
        need(self.n_routed_experts % self.n_expert_groups == 0, "n_expert_groups",
             "must divide n_routed_experts")
        need(self.n_limited_groups <= self.n_expert_groups, "n_limited_groups", "must be <= n_expert_groups")
        per_group = self.n_routed_experts // self.n_expert_groups
        need(self.n_activated_experts <= self.n_limited_groups * per_group, "n_activated_experts",
             "must be <= the experts in the kept groups")
        if self.n_expert_groups > 1 and self.balance_bias:
            need(per_group >= 2, "n_expert_groups", "top-2 group score needs >= 2 experts per group")
        need(self.max_seq_len >= self.original_seq_len, "max_seq_len", "must be >= original_seq_len")
        need(self.embed_scale > 0, "embed_scale", "must be positive")
        if self.n_layers > self.n_dense_layers:
            need(self.moe_inter_dim > 0, "moe_inter_dim", "must be positive")
        if self.n_dense_layers > 0:
            need(self.inter_dim > 0, "inter_dim", "must be positive")

    # -- derived quantities --
    @property
    def d_qk(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def yarn(self) -> bool:
        return self.max_seq_len > self.original_seq_len

    def softmax_scale(self) -> float:
        """sigma = d_qk^-1/2, times m^2 (m = 0.1*mscale*ln(rope_factor) + 1) when YaRN is on."""
        s = self.d_qk ** -0.5
        if self.yarn:
            m = 0.1 * self.mscale * math.log(self.rope_factor) + 1.0
            s = s * m * m
        return s

    @staticmethod
    def lambda_init(layer: int) -> float:
        return 0.8 - 0.6 * math.exp(-0.3 * layer)

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.n_dense_layers

    # -- (de)serialisation --
    def to_dict(self) -> Dict[str, Any]:
        """Every §9 key in §9 order, defaults resolved (ints stay ints, floats stay floats)."""
        d = dataclasses.asdict(self)
        out: Dict[str, Any] = {}
        for k in CONFIG_KEYS:
            v = d[k]
            if k in ("route_scale", "bias_update_rate", "aux_loss_alpha", "rope_theta", "rope_factor",
                     "beta_fast", "beta_slow", "mscale", "init_std", "embed_init_std", "embed_scale",
                     "norm_eps"):
                v = float(v)
            elif k in ("score_func",):
                v = str(v)
            elif k in ("balance_bias", "differential", "tie_embeddings"):
                v = bool(v)
            else:
                v = int(v)
            out[k] = v
        return out

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Config":
        unknown = [k for k in d if k not in CONFIG_KEYS]
        if unknown:
            raise ValueError(f"model.{unknown[0]}: unknown key")
        return cls(**d)


# ---------------------------------------------------------------------------------------------
# Elementary functions
# ---------------------------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * w over the last dim (Appendix A)."""
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * w


def swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """w2( silu(x w1^T) * (x w3^T) ),  w1, w3: [I, D], w2: [D, I]."""
    return (F.silu(x @ w1.t()) * (x @ w3.t())) @ w2.t()


def rope_frequencies(cfg: Config) -> torch.Tensor:
    """theta'_i, i = 0..d_rope/2-1, as DeepSeek's precompute_freqs_cis (docs/derivations.md §5.1)."""
    d = cfg.qk_rope_head_dim
    base = float(cfg.rope_theta)
    freqs = 1.0 / (base ** (torch.arange(0, d, 2, dtype=DTYPE) / d))
    if cfg.yarn:
        def correction_dim(n_rot: float) -> float:
            return d * math.log(cfg.original_seq_len / (n_rot * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(correction_dim(cfg.beta_fast)), 0)
        high = min(math.ceil(correction_dim(cfg.beta_slow)), d - 1)
        low_f, high_f = float(low), float(high)
        if low_f == high_f:
            high_f += 0.001
        ramp = ((torch.arange(d // 2, dtype=DTYPE) - low_f) / (high_f - low_f)).clamp(0.0, 1.0)
        smooth = 1.0 - ramp
        freqs = freqs / cfg.rope_factor * (1.0 - smooth) + freqs * smooth
    return freqs


def rope_angles(cfg: Config, seq_len: int) -> torch.Tensor:
    """angle[t, i] = t * theta'_i, [T, d_rope/2]; cos/sin are not scaled (DeepSeek)."""
    pos = torch.arange(seq_len, dtype=DTYPE)
    return torch.outer(pos, rope_frequencies(cfg))


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE: pairs (x[2i], x[2i+1]) rotated by angles[t, i].

    x: [B, T, ..., d]; angles: [T, d/2]. Broadcasts over the dims between T and d."""
    B, T = x.shape[0], x.shape[1]
    d = x.shape[-1]
    mid = x.shape[2:-1]
    shape = (1, T) + (1,) * len(mid) + (d // 2,)
    cos = torch.cos(angles).reshape(shape)
    sin = torch.sin(angles).reshape(shape)
    xp = x.reshape(x.shape[:-1] + (d // 2, 2))
    x0, x1 = xp[..., 0], xp[..., 1]
    y0 = x0 * cos - x1 * sin
    y1 = x0 * sin + x1 * cos
    return torch.stack((y0, y1), dim=-1).reshape(x.shape)


def causal_mask(T: int) -> torch.Tensor:
    """M[t, s] = -inf for s > t, 0 otherwise."""
    m = torch.zeros(T, T, dtype=DTYPE)
    return m.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1), float("-inf"))


# ---------------------------------------------------------------------------------------------
# Modules (names give the §8 checkpoint names)
# ---------------------------------------------------------------------------------------------

class Weight(nn.Module):
    """A holder whose only parameter is `.weight` (a Linear [out, in] or a norm weight [n])."""

    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(*shape, dtype=DTYPE))


class Attention(nn.Module):
    """DiffMLA (model.md §2, docs/derivations.md §3.2 Design A), or plain MLA when cfg.differential is false."""

    def __init__(self, cfg: Config, layer: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        H, D, dqk = cfg.n_heads, cfg.dim, cfg.d_qk
        if cfg.q_lora_rank > 0:
            self.wq_a = Weight(cfg.q_lora_rank, D)
            self.q_norm = Weight(cfg.q_lora_rank)
            self.wq_b = Weight(H * dqk, cfg.q_lora_rank)
        else:
            self.wq = Weight(H * dqk, D)
        self.wkv_a = Weight(cfg.kv_lora_rank + cfg.qk_rope_head_dim, D)
        self.kv_norm = Weight(cfg.kv_lora_rank)
        self.wkv_b = Weight(H * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
        self.wo = Weight(D, H * cfg.v_head_dim)
        if cfg.differential:
            self.subln = Weight(2 * cfg.v_head_dim)
            self.lambda_q1 = nn.Parameter(torch.zeros(dqk, dtype=DTYPE))
            self.lambda_k1 = nn.Parameter(torch.zeros(dqk, dtype=DTYPE))
            self.lambda_q2 = nn.Parameter(torch.zeros(dqk, dtype=DTYPE))
            self.lambda_k2 = nn.Parameter(torch.zeros(dqk, dtype=DTYPE))
        self.lambda_init = Config.lambda_init(layer)

    def lam(self) -> torch.Tensor:
        """lambda = exp(lq1.lk1) - exp(lq2.lk2) + lambda_init (a 0-dim tensor)."""
        return (torch.exp(torch.dot(self.lambda_q1, self.lambda_k1))
                - torch.exp(torch.dot(self.lambda_q2, self.lambda_k2)) + self.lambda_init)

    def _project(self, x: torch.Tensor, angles: torch.Tensor):
        """The MLA projections of docs/derivations.md §2.3: q^C, RoPE(q^R) per component head, c_hat, RoPE(k^R)."""
        cfg = self.cfg
        B, T, _ = x.shape
        H, dn, dr = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        if cfg.q_lora_rank > 0:
            c_q = rms_norm(x @ self.wq_a.weight.t(), self.q_norm.weight, cfg.norm_eps)
            q = c_q @ self.wq_b.weight.t()
        else:
            q = x @ self.wq.weight.t()
        q = q.reshape(B, T, H, dn + dr)
        q_nope = q[..., :dn]                              # [B, T, H, dn]
        q_pe = apply_rope(q[..., dn:], angles)            # [B, T, H, dr]
        kv = x @ self.wkv_a.weight.t()
        c = kv[..., :cfg.kv_lora_rank]
        k_pe = apply_rope(kv[..., cfg.kv_lora_rank:], angles)   # [B, T, dr]  ONE rope key
        c_hat = rms_norm(c, self.kv_norm.weight, cfg.norm_eps)  # [B, T, r_kv]
        return q_nope, q_pe, c_hat, k_pe

    def _finish(self, O: torch.Tensor, B: int, T: int) -> torch.Tensor:
        """O: [B, T, n_groups, width] head outputs in component order -> out projection."""
        cfg = self.cfg
        if cfg.differential:
            O = (1.0 - self.lambda_init) * rms_norm(O, self.subln.weight, SUBLN_EPS)
        return O.reshape(B, T, cfg.n_heads * cfg.v_head_dim) @ self.wo.weight.t()

    def forward(self, x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        """Naive ("MHA mode") attention with the full score matrix."""
        cfg = self.cfg
        B, T, _ = x.shape
        H, dn, dv = cfg.n_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
        q_nope, q_pe, c_hat, k_pe = self._project(x, angles)
        kvb = (c_hat @ self.wkv_b.weight.t()).reshape(B, T, H, dn + dv)
        k_nope, v = kvb[..., :dn], kvb[..., dn:]
        sigma = cfg.softmax_scale()
        scores = sigma * (torch.einsum("bthd,bshd->bhts", q_nope, k_nope)
                          + torch.einsum("bthd,bsd->bhts", q_pe, k_pe))
        A = torch.softmax(scores + causal_mask(T), dim=-1)      # [B, H, T, T]
        if not cfg.differential:
            O = torch.einsum("bhts,bshd->bthd", A, v)            # [B, T, H, dv]
            return self._finish(O, B, T)
        Hd = H // 2
        A = A.reshape(B, Hd, 2, T, T)                            # component c of diff head h = 2h+c
        V = v.reshape(B, T, Hd, 2 * dv)                          # V_h = [v_2h ; v_2h+1]
        O1 = torch.einsum("bhts,bshd->bthd", A[:, :, 0], V)
        O2 = torch.einsum("bhts,bshd->bthd", A[:, :, 1], V)
        O = O1 - self.lam() * O2                                 # [B, T, Hd, 2 dv]
        return self._finish(O, B, T)

    def forward_absorbed(self, x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        """Second formulation: absorbed latent ("MQA mode"), docs/derivations.md §2.4 (plain) / §3.3 (diff)."""
        cfg = self.cfg
        B, T, _ = x.shape
        H, dn, dv, r = cfg.n_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        q_nope, q_pe, c_hat, k_pe = self._project(x, angles)
        wkv_b = self.wkv_b.weight.reshape(H, dn + dv, r)
        W_uk, W_uv = wkv_b[:, :dn, :], wkv_b[:, dn:, :]
        q_lat = torch.einsum("bthd,hdc->bthc", q_nope, W_uk)      # [B, T, H, r]
        sigma = cfg.softmax_scale()
        scores = sigma * (torch.einsum("bthc,bsc->bhts", q_lat, c_hat)
                          + torch.einsum("bthd,bsd->bhts", q_pe, k_pe))
        A = torch.softmax(scores + causal_mask(T), dim=-1)
        if not cfg.differential:
            lat = torch.einsum("bhts,bsc->bthc", A, c_hat)         # [B, T, H, r]
            O = torch.einsum("bthc,hdc->bthd", lat, W_uv)          # [B, T, H, dv]
            return self._finish(O, B, T)
        Hd = H // 2
        A = A.reshape(B, Hd, 2, T, T)
        L = (torch.einsum("bhts,bsc->bthc", A[:, :, 0], c_hat)
             - self.lam() * torch.einsum("bhts,bsc->bthc", A[:, :, 1], c_hat))   # [B, T, Hd, r]
        O = torch.einsum("bthc,hadc->bthad", L, W_uv.reshape(Hd, 2, dv, r))      # [B, T, Hd, 2, dv]
        return self._finish(O.reshape(B, T, Hd, 2 * dv), B, T)


class DenseFFN(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.w1 = Weight(cfg.inter_dim, cfg.dim)
        self.w2 = Weight(cfg.dim, cfg.inter_dim)
        self.w3 = Weight(cfg.inter_dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.w1.weight, self.w2.weight, self.w3.weight)


class Gate(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(cfg.n_routed_experts, cfg.dim, dtype=DTYPE))
        # The balancing bias: saved in the checkpoint, never differentiated (a buffer).
        self.register_buffer("bias", torch.zeros(cfg.n_routed_experts, dtype=DTYPE), persistent=True)


class Experts(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        E, I, D = cfg.n_routed_experts, cfg.moe_inter_dim, cfg.dim
        self.w1 = nn.Parameter(torch.zeros(E, I, D, dtype=DTYPE))
        self.w2 = nn.Parameter(torch.zeros(E, D, I, dtype=DTYPE))
        self.w3 = nn.Parameter(torch.zeros(E, I, D, dtype=DTYPE))


class SharedFFN(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        I = cfg.n_shared_experts * cfg.moe_inter_dim
        self.w1 = Weight(I, cfg.dim)
        self.w2 = Weight(cfg.dim, I)
        self.w3 = Weight(I, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.w1.weight, self.w2.weight, self.w3.weight)


class MoE(nn.Module):
    """DeepSeek-V3 MoE (model.md §5, docs/derivations.md §4.2, §4.6), dropless."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.gate = Gate(cfg)
        self.experts = Experts(cfg)
        if cfg.n_shared_experts > 0:
            self.shared = SharedFFN(cfg)

    def route(self, u: torch.Tensor) -> Dict[str, torch.Tensor]:
        """u: [N, D] -> scores s, selection s_sel, group mask, idx [N, K], weights w [N, K]."""
        cfg = self.cfg
        N = u.shape[0]
        E, K, G = cfg.n_routed_experts, cfg.n_activated_experts, cfg.n_expert_groups
        z = u @ self.gate.weight.t()                                      # [N, E]
        s = torch.sigmoid(z) if cfg.score_func == "sigmoid" else torch.softmax(z, dim=-1)
        # Selection works on detached values: no gradient can flow through the choice.
        s_sel = s.detach() + self.gate.bias if cfg.balance_bias else s.detach().clone()
        group_kept = torch.ones(N, G, dtype=torch.bool)
        if G > 1:
            sg = s_sel.reshape(N, G, E // G)
            if cfg.balance_bias:
                gscore = sg.topk(2, dim=-1).values.sum(dim=-1)            # top-2 sum
            else:
                gscore = sg.max(dim=-1).values                            # max
            keep = gscore.topk(cfg.n_limited_groups, dim=-1).indices
            group_kept = torch.zeros(N, G, dtype=torch.bool)
            group_kept.scatter_(1, keep, True)
            s_sel = sg.masked_fill(~group_kept.unsqueeze(-1), float("-inf")).reshape(N, E)
        idx = s_sel.topk(K, dim=-1).indices                               # [N, K]
        w = s.gather(1, idx)                                              # ORIGINAL scores
        if cfg.score_func == "sigmoid":
            w = w / w.sum(dim=-1, keepdim=True)
        w = w * cfg.route_scale
        return {"z": z, "s": s, "s_sel": s_sel, "group_kept": group_kept, "idx": idx, "w": w}

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        ex = self.experts
        return swiglu(x, ex.w1[e], ex.w2[e], ex.w3[e])

    def aux_loss(self, s: torch.Tensor, B: int, T: int) -> Dict[str, torch.Tensor]:
        """Sequence-wise balance loss, docs/derivations.md §4.6: alpha * mean_b sum_i f_i P_i.

        f from a plain top-k of the UNBIASED scores (no groups, no gradient); s' = s / sum_j s_j
        for sigmoid, s' = s for softmax."""
        cfg = self.cfg
        E, K = cfg.n_routed_experts, cfg.n_activated_experts
        s = s.reshape(B, T, E)
        top = s.detach().topk(K, dim=-1).indices                          # [B, T, K]
        hits = torch.zeros(B, T, E, dtype=DTYPE).scatter_(2, top, 1.0)
        f = hits.sum(dim=1) * (E / (K * T))                               # [B, E], constant
        sp = s / s.sum(dim=-1, keepdim=True) if cfg.score_func == "sigmoid" else s
        P = sp.mean(dim=1)                                                # [B, E]
        loss = cfg.aux_loss_alpha * (f * P).sum(dim=-1).mean()
        return {"loss": loss, "aux_idx": top}

    def forward(self, x: torch.Tensor) -> Dict[str, Any]:
        cfg = self.cfg
        B, T, D = x.shape
        E = cfg.n_routed_experts
        u = x.reshape(B * T, D)
        r = self.route(u)
        idx, w = r["idx"], r["w"]
        y = torch.zeros_like(u)
        counts = torch.zeros(E, dtype=torch.long)
        for e in range(E):
            tok, kpos = torch.nonzero(idx == e, as_tuple=True)           # dropless: every assignment
            counts[e] = tok.numel()
            if tok.numel() == 0:
                continue
            ye = self.expert(e, u.index_select(0, tok)) * w[tok, kpos].unsqueeze(-1)
            y = y.index_add(0, tok, ye)
        if cfg.n_shared_experts > 0:
            y = y + self.shared(u)
        aux = self.aux_loss(r["s"], B, T)
        return {"y": y.reshape(B, T, D), "counts": counts, "aux_loss": aux["loss"],
                "idx": idx, "w": w, "aux_idx": aux["aux_idx"], "route": r}

    def forward_dense_check(self, x: torch.Tensor) -> torch.Tensor:
        """Second formulation of the MoE output: every expert on every token, combined with a
        scattered [N, E] weight matrix (zeros off the selection). Used by the self-check only."""
        cfg = self.cfg
        B, T, D = x.shape
        u = x.reshape(B * T, D)
        r = self.route(u)
        Wfull = torch.zeros(B * T, cfg.n_routed_experts, dtype=DTYPE).scatter(1, r["idx"], r["w"])
        y = sum(Wfull[:, e:e + 1] * self.expert(e, u) for e in range(cfg.n_routed_experts))
        if cfg.n_shared_experts > 0:
            y = y + self.shared(u)
        return y.reshape(B, T, D)


class Block(nn.Module):
    def __init__(self, cfg: Config, layer: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        self.attn_norm = Weight(cfg.dim)
        self.attn = Attention(cfg, layer)
        self.ffn_norm = Weight(cfg.dim)
        self.ffn = MoE(cfg) if cfg.is_moe_layer(layer) else DenseFFN(cfg)


class DiffMoE(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = Weight(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList([Block(cfg, l) for l in range(cfg.n_layers)])
        self.norm = Weight(cfg.dim)
        if not cfg.tie_embeddings:
            self.head = Weight(cfg.vocab_size, cfg.dim)

    def head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.cfg.tie_embeddings else self.head.weight

    def forward(self, tokens: torch.Tensor, targets: Optional[torch.Tensor] = None,
                collect: bool = False) -> Dict[str, Any]:
        """tokens, targets: [B, T] long (targets -1 = ignored).

        Returns logits [B, T, V], lm_loss (mean CE over valid targets; None without targets),
        aux_loss (sum over MoE layers), counts {l: [E] long}, lambda {l: 0-dim}, and the routing
        choices (idx {l: [N, K]}, aux_idx {l: [B, T, K]}, w {l: [N, K]}). With collect=True also
        attn_in {l: normalised attention input}, ffn_in {l: normalised FFN input}, hidden {l:
        residual after block l}."""
        cfg = self.cfg
        B, T = tokens.shape
        assert T <= cfg.max_seq_len, "sequence longer than max_seq_len"
        angles = rope_angles(cfg, T)
        h = self.embed.weight[tokens] * cfg.embed_scale
        aux_total = torch.zeros((), dtype=DTYPE)
        out: Dict[str, Any] = {"counts": {}, "lambda": {}, "idx": {}, "aux_idx": {}, "w": {},
                               "route": {}, "attn_in": {}, "ffn_in": {}, "hidden": {}}
        for blk in self.layers:
            l = blk.layer
            a_in = rms_norm(h, blk.attn_norm.weight, cfg.norm_eps)
            h = h + blk.attn(a_in, angles)
            if cfg.differential:
                out["lambda"][l] = blk.attn.lam()
            f_in = rms_norm(h, blk.ffn_norm.weight, cfg.norm_eps)
            if cfg.is_moe_layer(l):
                m = blk.ffn(f_in)
                h = h + m["y"]
                aux_total = aux_total + m["aux_loss"]
                for k in ("counts", "idx", "aux_idx", "w", "route"):
                    out[k][l] = m[k]
            else:
                h = h + blk.ffn(f_in)
            if collect:
                out["attn_in"][l] = a_in
                out["ffn_in"][l] = f_in
                out["hidden"][l] = h
        logits = rms_norm(h, self.norm.weight, cfg.norm_eps) @ self.head_weight().t()
        out["logits"] = logits
        out["aux_loss"] = aux_total
        out["lm_loss"] = None
        if targets is not None:
            out["lm_loss"] = F.cross_entropy(logits.reshape(B * T, cfg.vocab_size),
                                             targets.reshape(B * T), ignore_index=-1,
                                             reduction="mean")
        return out

    def trainable(self) -> List[tuple]:
        """(name, parameter) pairs that receive gradients: every parameter (gate.bias is a buffer)."""
        return list(self.named_parameters())
