#!/usr/bin/env python3
"""KV-cache inference of the diffmoe model (docs/model.md) in plain PyTorch: the decode baseline.

torch_bench.py --decode times it beside `diffmoe bench`'s prefill/decode numbers. It is the model
of torch_model.py (same math, same router function, same BF16 rounding points), written the way a
PyTorch user writes a KV-cache generator:

  * weights: one BF16 copy of every matmul weight, fused once (wq_a|wkv_a, w1|w3 of every SwiGLU,
    the experts' w1|w3 as one [E, 2I, D] operand); FP32 embedding, norms, lambda, subln and router
    (docs/model.md §2, §5); the FP32 master model is not needed after DecodeWeights is built;
  * prefill: the whole prompt in one forward (causal SDPA), caching what decode needs; logits of
    the last position only;
  * decode: one token per sequence and step, greedy argmax of the last logits on the device;
  * caches, preallocated for prompt + new tokens (rounded up to 16 positions):
      "expanded"  per component head K = [k^C_j ; k^R] (d_qk) and V = v_j (d_v) after wkv_b, the usual
                  cache; the two differential components are two SDPA calls over the H/2 heads of
                  component c (q_{2h+c}, k_{2h+c}) with the value V_h = [v_2h ; v_2h+1], a free view
                  of the V cache -- the component pairing of docs/model.md §2;
      "latent"    the absorbed MLA cache of docs/model.md §2 / docs/derivations.md §2.4, §3.3: per token ĉ
                  and the rotated k^R (r_kv + d_rope values); q absorbs W^UK, all heads attend to the
                  one latent key (one SDPA call with the H heads as query rows), the differential
                  subtraction happens in latent space, then W^UV (FP32);
  * MoE: the same router (torch_model.route_tokens), tokens sorted by expert, only the selected
    experts run (torch._grouped_mm with device offsets, or a loop over the experts that got tokens);
  * static step (modes graph*, compile*): the cache is written at a device position (index_put_),
    keys past it are masked, so shapes never change and the whole step -- embedding, 12 layers,
    head, argmax, position advance -- is captured once in a torch.cuda.CUDAGraph and replayed;
    "compile" first passes the step through torch.compile (inductor, no CUDA graphs of its own).

self_check() proves the decoder computes the training forward's logits (see its docstring).
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

import torch_model as tm
from torch_model import Config

# mode -> (cache, static step, torch.compile)
DECODE_MODES: Dict[str, Tuple[str, bool, bool]] = {
    "eager": ("expanded", False, False),
    "eager-latent": ("latent", False, False),
    "graph": ("expanded", True, False),
    "graph-latent": ("latent", True, False),
    "compile": ("expanded", True, True),
    "compile-latent": ("latent", True, True),
}
CACHE_ALIGN = 16          # cache positions rounded up: SDPA's mem-efficient kernel wants aligned masks

# Self-check: rel. = max |decode - full forward| / max |full forward| over the compared logits.
# Both sides round at the same points to BF16, but the GEMMs and attention run on different
# shapes (one token vs the whole sequence), so accumulation order and hence the last BF16 bit
# differ; that propagates through the layers to ~1e-3 of the logit scale.
CHECK_TOL = 2e-2
CHECK_BATCH, CHECK_PROMPT, CHECK_NEW = 2, 5, 11


def cache_bytes(cfg: Config, cache: str, batch: int, positions: int) -> int:
    """Bytes of the BF16 KV cache of all layers."""
    if cache == "expanded":
        per = cfg.n_heads * (cfg.d_qk + cfg.v_head_dim)
    else:
        per = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    return 2 * cfg.n_layers * batch * positions * per


def cache_positions(max_len: int) -> int:
    return tm._round_up(max_len, CACHE_ALIGN)


class _LayerWeights:
    """One layer's inference weights (plain attributes)."""
    moe: bool


class DecodeWeights:
    """BF16 matmul weights (fused once) and FP32 small weights of a DiffMoEFast, for decoding."""

    def __init__(self, model: tm.DiffMoEFast, experts: str = "grouped_mm",
                 compute_dtype: torch.dtype = torch.bfloat16) -> None:
        cfg = model.cfg
        self.cfg, self.cdt, self.experts = cfg, compute_dtype, experts
        H, dn, dv, r = cfg.n_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        C = 2 if cfg.differential else 1

        def bf(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(compute_dtype).contiguous()

        def f32(t: torch.Tensor) -> torch.Tensor:
            return t.detach().float().clone()

        with torch.no_grad():
            self.embed = f32(model.embed.weight)                  # FP32 lookup, as the training forward
            self.head = bf(model.head_weight())
            self.norm = f32(model.norm.weight)
            self.layers: List[_LayerWeights] = []
            for blk in model.layers:
                a, W = blk.attn, _LayerWeights()
                W.attn_norm, W.ffn_norm = f32(blk.attn_norm.weight), f32(blk.ffn_norm.weight)
                if cfg.q_lora_rank > 0:
                    W.wa = bf(torch.cat([a.wq_a.weight, a.wkv_a.weight], dim=0))
                    W.q_norm, W.wq_b = f32(a.q_norm.weight), bf(a.wq_b.weight)
                else:
                    W.wa = bf(torch.cat([a.wq.weight, a.wkv_a.weight], dim=0))
                    W.q_norm = W.wq_b = None
                W.kv_norm = f32(a.kv_norm.weight)
                W.wkv_b = bf(a.wkv_b.weight)                                   # [H (dn+dv), r]
                wkvb = W.wkv_b.view(H, dn + dv, r)
                W.w_uk = wkvb[:, :dn]                                          # [H, dn, r] BF16 view
                # W^UV grouped per differential head: [H/C, C dv, r] (rows of v_2h then v_2h+1), FP32
                W.w_uv = wkvb[:, dn:].float().reshape(H // C, C * dv, r)
                W.wo = bf(a.wo.weight)
                if cfg.differential:
                    W.lam = a.lam().detach().float()                           # 0-dim, docs/model.md §2
                    W.sub_scale = (1.0 - a.lambda_init_t).detach().float()
                    W.subln = f32(a.subln.weight)
                ffn = blk.ffn
                W.moe = blk.is_moe
                if W.moe:
                    W.gate_w, W.gate_b = f32(ffn.gate.weight), f32(ffn.gate.bias)
                    W.e_w13 = bf(torch.cat([ffn.experts.w1, ffn.experts.w3], dim=1))   # [E, 2I, D]
                    W.e_w2 = bf(ffn.experts.w2)                                         # [E, D, I]
                    W.s_w13 = W.s_w2 = None
                    if cfg.n_shared_experts > 0:
                        W.s_w13 = bf(torch.cat([ffn.shared.w1.weight, ffn.shared.w3.weight], dim=0))
                        W.s_w2 = bf(ffn.shared.w2.weight)
                else:
                    W.d_w13 = bf(torch.cat([ffn.w1.weight, ffn.w3.weight], dim=0))
                    W.d_w2 = bf(ffn.w2.weight)
                self.layers.append(W)

    def nbytes(self) -> int:
        """Bytes held (w_uk is a view of wkv_b; a tied head is a copy)."""
        tensors = [self.embed, self.head, self.norm] + [t for W in self.layers for k, t in vars(W).items()
                                                        if isinstance(t, torch.Tensor) and k != "w_uk"]
        return sum(t.numel() * t.element_size() for t in tensors)


def _swiglu(h: torch.Tensor, w: Optional[torch.Tensor] = None) -> torch.Tensor:
    """silu(h1) * h3 (* w) in FP32 (docs/model.md §4), h = [h1 | h3]; result in h's dtype."""
    inter = h.shape[-1] // 2
    a = F.silu(h[..., :inter].float()) * h[..., inter:].float()
    if w is not None:
        a = a * w.unsqueeze(-1)
    return a.to(h.dtype)


class Decoder:
    """Greedy KV-cache generation for `batch` sequences of equal prompt length.

    prefill(prompt [B, P]) -> FP32 logits [B, V] of the last prompt position;
    step(tokens [B]) -> FP32 logits [B, V] after appending one token per sequence;
    decode(logits, n): n greedy steps from the given logits (the timed loop).
    static=True: the step reads its token and position from device buffers (tok_buf, pos_t), so one
    CUDA graph of it (captured at the first step; on the CPU the same code runs without a graph)
    serves every step. `force` ({layer: idx}) overrides the routers' top-k (self-check only)."""

    def __init__(self, w: DecodeWeights, cache: str, batch: int, max_len: int, static: bool = False,
                 compiled: bool = False) -> None:
        cfg = w.cfg
        if cache not in ("expanded", "latent"):
            raise ValueError(f"cache {cache!r}: expected expanded or latent")
        if static and w.experts != "grouped_mm":
            raise ValueError("a static (CUDA graph) decode step needs torch._grouped_mm: the per-expert "
                             "loop reads the expert counts on the host")
        dev, cdt = w.head.device, w.cdt
        self.w, self.cfg, self.cache, self.batch, self.max_len = w, cfg, cache, batch, max_len
        self.static = static
        self.cap = cache_positions(max_len)
        self.C = 2 if cfg.differential else 1
        self.scale = cfg.softmax_scale()
        cos, sin = tm.rope_tables(cfg, self.cap)       # YaRN angles at positions 0 .. cap-1 (docs/model.md §3)
        self.cos, self.sin = cos.to(dev), sin.to(dev)
        B, H, L = batch, cfg.n_heads, cfg.n_layers
        if cache == "expanded":
            # zeros, not empty: masked keys/values must be finite (0 * NaN would poison the output)
            self.k = [torch.zeros(B, self.cap, H, cfg.d_qk, device=dev, dtype=cdt) for _ in range(L)]
            self.v = [torch.zeros(B, self.cap, H, cfg.v_head_dim, device=dev, dtype=cdt) for _ in range(L)]
        else:
            width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
            self.lat = [torch.zeros(B, self.cap, width, device=dev, dtype=cdt) for _ in range(L)]
        self.pos = 0
        self.force: Optional[Dict[int, torch.Tensor]] = None
        if static:
            self.tok_buf = torch.zeros(B, dtype=torch.long, device=dev)
            self.pos_t = torch.zeros(1, dtype=torch.long, device=dev)
            self.key_pos = torch.arange(self.cap, device=dev)
            self.use_graph = dev.type == "cuda"
            self.graph: Optional[Any] = None
            self.logits_buf: Optional[torch.Tensor] = None
            self._core: Callable[[], torch.Tensor] = self._core_static
            if compiled:
                self._core = torch.compile(self._core_static, dynamic=False)

    def nbytes(self) -> int:
        bufs = (self.k + self.v) if self.cache == "expanded" else self.lat
        return sum(t.numel() * t.element_size() for t in bufs)

    # ---- the model ----

    def _project(self, W: _LayerWeights, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """The MLA projections as FastAttention.forward: q^C, RoPE(q^R) [B, T, H, .], ĉ [B, T, r],
        RoPE(k^R) [B, T, dr], all in the compute dtype."""
        cfg, cdt = self.cfg, self.w.cdt
        B, T, _ = x.shape
        H, dn, dr, r = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
        if cfg.q_lora_rank > 0:
            qa, kv = F.linear(x.to(cdt), W.wa).split([cfg.q_lora_rank, r + dr], dim=-1)
            q = F.linear(tm.rms_norm32(qa, W.q_norm, cfg.norm_eps).to(cdt), W.wq_b)
        else:
            q, kv = F.linear(x.to(cdt), W.wa).split([H * cfg.d_qk, r + dr], dim=-1)
        q = q.view(B, T, H, dn + dr)
        c, k_pe = kv.split([r, dr], dim=-1)
        c_hat = tm.rms_norm32(c, W.kv_norm, cfg.norm_eps).to(cdt)
        return q[..., :dn], tm.apply_rope(q[..., dn:], cos, sin), c_hat, tm.apply_rope(k_pe, cos, sin)

    def _finish(self, W: _LayerWeights, O: torch.Tensor) -> torch.Tensor:
        """O [B, T, H/C, C d_v] (component order) -> subln (differential) -> wo."""
        cfg = self.cfg
        B, T = O.shape[:2]
        if cfg.differential:
            O = W.sub_scale * F.rms_norm(O, (2 * cfg.v_head_dim,), W.subln, tm.SUBLN_EPS)
        return F.linear(O.reshape(B, T, cfg.n_heads * cfg.v_head_dim).to(self.w.cdt), W.wo)

    def _attend(self, W: _LayerWeights, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Expanded attention: q [B, T, H, d_qk]; k [B, L, H, d_qk], v [B, L, H, d_v] (cache views).
        Component c of differential head h is component head 2h+c; both see V_h = [v_2h ; v_2h+1]."""
        cfg, C = self.cfg, self.C
        B, T, H, _ = q.shape
        Lk, Hg = k.shape[1], H // C
        qg, kg = q.unflatten(2, (Hg, C)), k.unflatten(2, (Hg, C))
        vg = v.reshape(B, Lk, Hg, C * cfg.v_head_dim)
        outs = []
        for c in range(C):
            o = F.scaled_dot_product_attention(qg[:, :, :, c].transpose(1, 2), kg[:, :, :, c].transpose(1, 2),
                                               vg.transpose(1, 2), attn_mask=mask, is_causal=causal,
                                               scale=self.scale)
            outs.append(o.transpose(1, 2))                                    # [B, T, Hg, C dv]
        if cfg.differential:
            O = outs[0].float() - W.lam * outs[1].float()                     # O1 - lambda O2, FP32
        else:
            O = outs[0]
        return self._finish(W, O)

    def _attend_latent(self, W: _LayerWeights, q_nope: torch.Tensor, q_pe: torch.Tensor, lat: torch.Tensor,
                       mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Absorbed attention of one new token (docs/derivations.md §2.4, §3.3): q_lat_j = W^UK_jᵀ q^C_j, so
        σ q_j·k_j = σ [q_lat_j ; q^R_j]·[ĉ ; k^R]: one key head shared by all H heads, which become
        the query rows of one SDPA call. Latent outputs A_j ĉ -> A_{h,0}ĉ - λ A_{h,1}ĉ -> W^UV."""
        cfg, C = self.cfg, self.C
        B, H, r = q_nope.shape[0], cfg.n_heads, cfg.kv_lora_rank
        q_lat = torch.einsum("bthd,hdr->bthr", q_nope, W.w_uk)              # [B, 1, H, r]
        qa = torch.cat([q_lat, q_pe], dim=-1)                                # [B, 1, H, r+dr]: heads = rows
        o = F.scaled_dot_product_attention(qa, lat.unsqueeze(1), lat[..., :r].unsqueeze(1), attn_mask=mask,
                                           scale=self.scale)                 # [B, 1, H, r]
        o = o.reshape(B, 1, H // C, C, r)
        if cfg.differential:
            z = o[..., 0, :].float() - W.lam * o[..., 1, :].float()
        else:
            z = o[..., 0, :].float()
        return self._finish(W, torch.einsum("bthr,hor->btho", z, W.w_uv))   # [B, 1, H/C, C dv] FP32

    def _attention(self, l: int, W: _LayerWeights, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   p0: int, pos_t: Optional[torch.Tensor], mask: Optional[torch.Tensor]) -> torch.Tensor:
        """x [B, T, D] (normed, FP32) at positions p0 .. p0+T-1, or one token at the device position
        pos_t (static step). T > 1 only for the prefill (p0 = 0)."""
        cfg = self.cfg
        B, T, _ = x.shape
        H, dn, dv, dr = cfg.n_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.qk_rope_head_dim
        q_nope, q_pe, c_hat, k_pe = self._project(W, x, cos, sin)
        if self.cache == "latent":
            new = torch.cat([c_hat, k_pe], dim=-1)                           # [B, T, r+dr]
            lat = self.lat[l]
            if pos_t is not None:
                lat[:, pos_t] = new                 # index_put_ at the device position
                keys = lat
            else:
                lat[:, p0:p0 + T] = new
                keys = lat[:, :p0 + T]
            if T == 1:
                return self._attend_latent(W, q_nope, q_pe, keys, mask)
        kvb = F.linear(c_hat, W.wkv_b).view(B, T, H, dn + dv)
        k = torch.cat([kvb[..., :dn], k_pe.unsqueeze(2).expand(B, T, H, dr)], dim=-1)   # one shared k^R
        v = kvb[..., dn:]
        q = torch.cat([q_nope, q_pe], dim=-1)
        if self.cache == "latent":                     # the prefill: attend over the prompt's own k, v
            return self._attend(W, q, k, v, True, None)
        kc, vc = self.k[l], self.v[l]
        if pos_t is not None:
            kc[:, pos_t] = k
            vc[:, pos_t] = v
            return self._attend(W, q, kc, vc, False, mask)
        kc[:, p0:p0 + T] = k
        vc[:, p0:p0 + T] = v
        # causal only for the prefill (T query rows = T keys); a new token attends to every cached key
        return self._attend(W, q, kc[:, :p0 + T], vc[:, :p0 + T], T > 1, None)

    def _moe(self, l: int, W: _LayerWeights, x: torch.Tensor) -> torch.Tensor:
        """DeepSeek-V3 MoE (docs/model.md §5) of x [B, T, D] FP32: only the selected experts run."""
        cfg, cdt = self.cfg, self.w.cdt
        B, T, D = x.shape
        N, K, E = B * T, cfg.n_activated_experts, cfg.n_routed_experts
        u32 = x.reshape(N, D)
        force = self.force.get(l) if self.force is not None else None
        _, idx, wts = tm.route_tokens(cfg, u32, W.gate_w, W.gate_b, force)
        flat = idx.reshape(-1)
        order = torch.sort(flat, stable=True).indices                      # expert-major
        tok = torch.div(order, K, rounding_mode="floor")
        inv = torch.empty_like(order).scatter_(0, order, torch.arange(N * K, device=x.device))
        u = u32.to(cdt)
        xs = u.index_select(0, tok)                                         # [N K, D]
        ws = wts.reshape(-1).index_select(0, order)                        # FP32 [N K]
        counts = torch.zeros(E, dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
        if self.w.experts == "grouped_mm":
            offs = counts.cumsum(0).to(torch.int32)
            h = tm._GMM(xs, W.e_w13.transpose(1, 2), offs=offs)            # [N K, 2I]
            ys = tm._GMM(_swiglu(h, ws), W.e_w2.transpose(1, 2), offs=offs)  # [N K, D]
        else:
            parts, start = [], 0
            for e, c in enumerate(counts.tolist()):
                if c:
                    h = F.linear(xs[start:start + c], W.e_w13[e])
                    parts.append(F.linear(_swiglu(h, ws[start:start + c]), W.e_w2[e]))
                    start += c
            ys = torch.cat(parts, dim=0)
        y = ys.index_select(0, inv).view(N, K, D).sum(1)                   # combine, as FastMoE
        if W.s_w13 is not None:
            y = y + F.linear(_swiglu(F.linear(u, W.s_w13)), W.s_w2)
        return y.view(B, T, D)

    def _block(self, l: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, p0: int,
               pos_t: Optional[torch.Tensor], mask: Optional[torch.Tensor]) -> torch.Tensor:
        cfg, W = self.cfg, self.w.layers[l]
        h = h + self._attention(l, W, tm.rms_norm32(h, W.attn_norm, cfg.norm_eps), cos, sin, p0, pos_t, mask)
        f = tm.rms_norm32(h, W.ffn_norm, cfg.norm_eps)
        if W.moe:
            return h + self._moe(l, W, f)
        return h + F.linear(_swiglu(F.linear(f.to(self.w.cdt), W.d_w13)), W.d_w2)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        """h [B, D] FP32 -> FP32 logits [B, V] (BF16 GEMM, as head_loss)."""
        x = tm.rms_norm32(h, self.w.norm, self.cfg.norm_eps).to(self.w.cdt)
        return F.linear(x, self.w.head).float()

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.w.embed) * self.cfg.embed_scale

    # ---- generation ----

    @torch.no_grad()
    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        B, P = prompt.shape
        if B != self.batch or not 1 <= P < self.max_len:
            raise ValueError(f"prompt {tuple(prompt.shape)}: expected [{self.batch}, 1..{self.max_len - 1}]")
        h = self._embed(prompt)
        cos, sin = self.cos[:P], self.sin[:P]
        for l in range(self.cfg.n_layers):
            h = self._block(l, h, cos, sin, 0, None, None)
        self.pos = P
        if self.static:
            self.pos_t.fill_(P)
        return self._head(h[:, -1])

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.pos >= self.max_len:
            raise ValueError(f"step at position {self.pos}: the cache holds {self.max_len} positions")
        if self.static:
            self.tok_buf.copy_(tokens)
            out = self._run_static()
            self.pos += 1
            return out.clone()
        p = self.pos
        h = self._embed(tokens.view(self.batch, 1))
        cos, sin = self.cos[p:p + 1], self.sin[p:p + 1]
        for l in range(self.cfg.n_layers):
            h = self._block(l, h, cos, sin, p, None, None)
        self.pos = p + 1
        return self._head(h[:, -1])

    @torch.no_grad()
    def decode(self, logits: torch.Tensor, n: int) -> torch.Tensor:
        """n greedy steps after the logits of the previous position; returns the last step's logits."""
        if self.pos + n > self.max_len:
            raise ValueError(f"{n} steps from position {self.pos} exceed the cache ({self.max_len} positions)")
        if not self.static:
            for _ in range(n):
                logits = self.step(logits.argmax(dim=-1))
            return logits
        self.tok_buf.copy_(logits.argmax(dim=-1))
        for _ in range(n):
            out = self._run_static()           # the graph writes the argmax into tok_buf itself
        self.pos += n
        return out

    # ---- static step (CUDA graph) ----

    def _core_static(self) -> torch.Tensor:
        pos = self.pos_t
        cos, sin = self.cos.index_select(0, pos), self.sin.index_select(0, pos)
        mask = (self.key_pos <= pos).view(1, 1, 1, self.cap)      # keys 0 .. pos
        h = self._embed(self.tok_buf.view(self.batch, 1))
        for l in range(self.cfg.n_layers):
            h = self._block(l, h, cos, sin, 0, pos, mask)
        return self._head(h[:, -1])

    def _static_body(self) -> torch.Tensor:
        logits = self._core()
        self.tok_buf.copy_(logits.argmax(dim=-1))
        self.pos_t.add_(1)
        return logits

    def _capture(self) -> None:
        """Warm-up on a side stream (compiles in compile mode), restore the token/position, capture."""
        tok0, pos0 = self.tok_buf.clone(), self.pos_t.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._static_body()
        torch.cuda.current_stream().wait_stream(side)
        self.tok_buf.copy_(tok0)
        self.pos_t.copy_(pos0)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits_buf = self._static_body()
        self.graph = graph

    def _run_static(self) -> torch.Tensor:
        if not self.use_graph:
            return self._static_body()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.logits_buf


# ---------------------------------------------------------------------------------------------
# Self-check: decode logits == the training forward's logits
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def full_logits(model: tm.DiffMoEFast, seq: torch.Tensor) -> Tuple[torch.Tensor, Dict[int, torch.Tensor]]:
    """FP32 logits [B, T, V] of the training forward (DiffMoEFast blocks, BF16 compute) over seq, and
    each MoE layer's expert choice [B, T, K]."""
    cfg = model.cfg
    B, T = seq.shape
    moe_ids = [l for l, blk in enumerate(model.layers) if blk.is_moe]
    for m in model.moe_layers():
        m._record, m._force_idx = True, None
    ctx = (torch.autocast("cuda", dtype=torch.bfloat16) if seq.device.type == "cuda"
           else torch.autocast("cpu", enabled=False))
    with ctx:
        h = F.embedding(seq, model.embed.weight) * cfg.embed_scale
        cos, sin = model.rope_cos[:T], model.rope_sin[:T]
        for blk in model.layers:
            h, _, _ = blk(h, cos, sin)
        x = tm.rms_norm32(h, model.norm.weight, cfg.norm_eps).to(model.opts.compute_dtype)
        logits = F.linear(x, model.head_weight().to(model.opts.compute_dtype)).float()
    idx = {}
    for l, m in zip(moe_ids, model.moe_layers()):
        idx[l] = m._last_idx.view(B, T, -1)
        m._record, m._last_idx = False, None
    return logits, idx


@torch.no_grad()
def _forced_logits(dec: Decoder, seq: torch.Tensor, P: int, ref_idx: Dict[int, torch.Tensor]) -> torch.Tensor:
    """Logits [B, n+1, V] of prefill(seq[:, :P]) and steps feeding seq[:, P:], with every router's
    choice set to ref_idx (static buffers for the steps, so a captured graph reads them too)."""
    B, T = seq.shape
    dec.force = {l: r[:, :P].reshape(B * P, -1) for l, r in ref_idx.items()}
    out = [dec.prefill(seq[:, :P])]
    bufs = {l: torch.empty_like(r[:, 0]) for l, r in ref_idx.items()}
    dec.force = bufs
    for t in range(P, T):
        for l, r in ref_idx.items():
            bufs[l].copy_(r[:, t])
        out.append(dec.step(seq[:, t]))
    dec.force = None
    return torch.stack(out, dim=1)


@torch.no_grad()
def check_model(model: tm.DiffMoEFast, weights: DecodeWeights, modes: List[str], name: str, seed: int,
                log: Callable[[str], None], batch: int = CHECK_BATCH, prompt: int = CHECK_PROMPT,
                new: int = CHECK_NEW) -> Tuple[bool, List[Dict[str, Any]]]:
    """Greedy generation (eager, expanded cache), then the full training forward over prompt +
    generated tokens; every decode mode, fed the same tokens with the routers forced to the
    forward's expert choice (a BF16 rounding can flip a near tie in the top-k, which is not an
    error), must give the forward's logits at every new position (prefill's last + each step):
    max |diff| / max |logit| <= CHECK_TOL. A mode that raises (e.g. a CUDA graph that cannot be
    captured with this torch) is reported in its row's "error" and is not a mismatch."""
    cfg = model.cfg
    dev = model.embed.weight.device
    g = torch.Generator(device=dev)
    g.manual_seed(seed)
    toks = torch.randint(0, cfg.vocab_size, (batch, prompt), device=dev, generator=g)
    free = Decoder(weights, "expanded", batch, prompt + new)
    logits, gen, free_out = free.prefill(toks), [], []
    free_out.append(logits)
    for _ in range(new):
        gen.append(logits.argmax(dim=-1))
        logits = free.step(gen[-1])
        free_out.append(logits)
    free = None
    seq = torch.cat([toks, torch.stack(gen, dim=1)], dim=1)
    ref, ref_idx = full_logits(model, seq)
    ref = ref[:, prompt - 1:]                                               # predicts positions P .. P+n
    scale = float(ref.abs().max())
    free_rel = float((torch.stack(free_out, 1) - ref).abs().max()) / scale
    agree = float((ref[:, :-1].argmax(-1) == seq[:, prompt:]).float().mean())
    log(f"  [{name}] logit scale {scale:.3g}; unforced greedy run: rel. diff {free_rel:.2e}, "
        f"greedy tokens = forward argmax {100 * agree:.0f}% (routing near-ties may differ; not gated)")
    rows, ok_all = [], True
    for mode in modes:
        cache, static, compiled = DECODE_MODES[mode]
        row: Dict[str, Any] = {"config": name, "mode": mode, "cache": cache}
        try:
            dec = Decoder(weights, cache, batch, prompt + new, static=static, compiled=compiled)
            got = _forced_logits(dec, seq, prompt, ref_idx)
            dec = None
            diff = (got - ref).abs()
            worst = diff.amax(dim=(0, 2))                                     # per position
            row.update(max_abs_diff=float(diff.max()), logit_scale=scale, rel=float(diff.max()) / scale,
                       worst_position=prompt - 1 + int(worst.argmax()), ok=float(diff.max()) / scale <= CHECK_TOL)
        except Exception as e:  # the mode cannot run here: unusable, not wrong
            text = str(e).strip()
            row.update(ok=True, error=f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}")
        ok_all &= bool(row["ok"])
        if "error" in row:
            log(f"  [{name}] {mode:13s} n/a  {row['error']}")
        else:
            log(f"  [{name}] {mode:13s} {'PASS' if row['ok'] else 'FAIL'} rel. diff {row['rel']:.2e} "
                f"(max abs {row['max_abs_diff']:.3g}, worst at position {row['worst_position']})")
        rows.append(row)
    return ok_all, rows


def self_check(model: tm.DiffMoEFast, weights: DecodeWeights, modes: List[str], seed: int,
               log: Callable[[str], None] = print) -> Tuple[bool, Dict[str, Any]]:
    """check_model on the benchmarked model (docs/model.md §6 init) and on the two micro configs of
    torch_model --check (DiffMLA + q_lora + YaRN + grouped sigmoid router; plain MLA + wq + softmax
    router + tied head) with their large test weights, where every branch changes the logits."""
    dev = model.embed.weight.device
    log(f"decode self-check: batch {CHECK_BATCH}, prompt {CHECK_PROMPT}, {CHECK_NEW} new tokens, modes "
        f"{','.join(modes)}; tolerance rel. {CHECK_TOL:.0e} (max |decode - forward| / max |forward logit|)")
    ok, rows = check_model(model, weights, modes, "model", seed, log)
    for name, cdict in (("micro-diff", tm.CHECK_DIFF), ("micro-plain", tm.CHECK_PLAIN)):
        cfg = Config.from_dict(dict(cdict))
        m = tm.DiffMoEFast(cfg, tm.FastOptions(weights.cdt, "ev", weights.experts), device=dev)
        tm._fill_check_weights(m, cfg, seed)
        ok_m, rows_m = check_model(m, DecodeWeights(m, weights.experts, weights.cdt), modes, name, seed + 1, log)
        ok &= ok_m
        rows += rows_m
    worst = max((r["rel"] for r in rows if "rel" in r), default=math.nan)
    unusable: Dict[str, str] = {}
    for r in rows:
        if "error" in r:
            unusable.setdefault(r["mode"], r["error"])
    log(f"decode self-check: {'PASS' if ok else 'FAIL'} (worst rel. diff {worst:.2e}, tolerance {CHECK_TOL:.0e})"
        + (f"; could not run: {', '.join(unusable)}" if unusable else ""))
    return ok, {"ok": ok, "worst_rel": worst, "tolerance": CHECK_TOL, "unusable": unusable, "rows": rows}


# ---------------------------------------------------------------------------------------------
# Timing (CUDA)
# ---------------------------------------------------------------------------------------------

def time_decode(weights: DecodeWeights, mode: str, batch: int, prompt_len: int, new_tokens: int,
                repeats: int, seed: int, left: Callable[[], float] = lambda: math.inf,
                log: Callable[[str], None] = print) -> Dict[str, Any]:
    """One warm-up run (CUDA graph capture / compilation included), then `repeats` timed runs of
    prefill + new_tokens greedy steps on random prompts; medians. torch.cuda.synchronize() closes
    each timed region. Decode tokens/s = batch * new_tokens / decode seconds."""
    cache, static, compiled = DECODE_MODES[mode]
    row: Dict[str, Any] = {"mode": mode, "cache": cache, "batch": batch, "prompt_len": prompt_len,
                           "new_tokens": new_tokens, "error": None}
    dec = None
    try:
        torch.cuda.reset_peak_memory_stats()
        dec = Decoder(weights, cache, batch, prompt_len + new_tokens, static=static, compiled=compiled)
        row["cache_gib"] = dec.nbytes() / 2**30
        g = torch.Generator(device=weights.head.device)
        g.manual_seed(seed)
        prompt = torch.randint(0, weights.cfg.vocab_size, (batch, prompt_len), device=weights.head.device,
                               generator=g)

        def run() -> Tuple[float, float]:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            logits = dec.prefill(prompt)
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            dec.decode(logits, new_tokens)
            torch.cuda.synchronize()
            return t1 - t0, time.perf_counter() - t1

        t0 = time.perf_counter()
        run()
        row["first_run_s"] = time.perf_counter() - t0
        pre, dcs = [], []
        for i in range(repeats):
            a, b = run()
            pre.append(a)
            dcs.append(b)
            if i + 1 < repeats and left() < 3:
                row["partial"] = f"time budget: {i + 1} of {repeats} runs"
                break
        p_s, d_s = sorted(pre)[len(pre) // 2], sorted(dcs)[len(dcs) // 2]
        row.update(runs=len(pre), prefill_s=p_s, decode_s=d_s,
                   prefill_tokens_per_s=batch * prompt_len / p_s,
                   decode_tokens_per_s=batch * new_tokens / d_s, ms_per_step=d_s / new_tokens * 1e3,
                   peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30)
        log(f"  [{mode}] batch {batch:3d}: prefill {batch * prompt_len} tokens {row['prefill_tokens_per_s']:,.0f} "
            f"tokens/s, decode {new_tokens} steps {row['decode_tokens_per_s']:,.0f} tokens/s "
            f"({row['ms_per_step']:.2f} ms/step), peak {row['peak_mem_gib']:.1f} GiB (cache "
            f"{row['cache_gib']:.2f}), first run {row['first_run_s']:.1f} s")
    except Exception as e:  # capture/compile failure, OOM, unsupported kernel ...
        text = str(e).strip()
        row["error"] = f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"
        log(f"  [{mode}] batch {batch}: FAILED: {row['error']}")
    finally:
        dec = None
    return row
