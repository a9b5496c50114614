"""Triton kernels of the entmax rule (DashAttention), rendered from Jinja templates:

- EntmaxTauTriton (templates/triton/entmax_tau.py.j2): block scores against the summaries,
  tau per query head by Halley steps + bisection, group average, support -> ascending
  indices, counts and log p_bar. Same signature as a decoder's selector.
- EntmaxDecodeTriton (templates/triton/sparse_decode.py.j2 with has_block_bias): the
  split-KV sparse decode of triton_decode with the per-block prior added to the logits;
  tuning space, checks, split count, launch and sm_90 compilation are the sparse decode's
  (it subclasses that adapter).
The prefill's token-level kernels (forward and backward) are in
sparsegen.codegen.entmax_prefill.

The torch semantics they must match live in sparsegen.methods.entmax. compile_sm90 needs a
process where Triton was imported without TRITON_INTERPRET=1 (an interpreted standard
library cannot be compiled; a warm Triton cache only hides that).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ..methods.entmax import EntmaxRule, Selection
from .decode_api import DecodeStatic
from .triton_decode import TritonSparseDecode, _g_pad
from .triton_kernel import (TRITON_PTR, TritonKernel, cdiv, check_int_config, dtype_name,
                            next_pow2, pow2, torch_dtype)


@dataclass(frozen=True)
class EntmaxStatic:
    """Compile-time parameters of the entmax kernels (from the spec)."""

    block_size: int
    head_dim: int
    group_size: int
    dtype: str = "bf16"
    layout: str = "contiguous"
    page_size: int = 0
    sink_blocks: int = 1
    local_blocks: int = 1
    alpha: float = 1.5
    halley_iters: int = 4
    prior: bool = True

    @classmethod
    def from_spec(cls, spec, dtype: str | None = None) -> "EntmaxStatic":
        m, c, s = spec.model, spec.cache, spec.selection
        return cls(s.block_size, m.head_dim, m.group_size, dtype or m.dtype, c.layout,
                   c.page_size or 0, s.sink_blocks, s.local_blocks, s.entmax.alpha,
                   s.entmax.halley_iters, s.entmax.prior)

    @classmethod
    def from_rule(cls, rule: EntmaxRule, q: torch.Tensor, num_kv_heads: int) -> "EntmaxStatic":
        """The statics of a rule applied to q [B, T, Hq, D] over num_kv_heads."""
        return cls(rule.block_size, q.shape[-1], q.shape[2] // num_kv_heads,
                   dtype_name(q.dtype), sink_blocks=rule.sink_blocks,
                   local_blocks=rule.local_blocks, alpha=rule.alpha,
                   halley_iters=rule.halley_iters, prior=rule.prior)

    def rule(self, scale: float = 1.0) -> EntmaxRule:
        """The method's rule these statics compile (scale is a runtime argument)."""
        return EntmaxRule(block_size=self.block_size, sink_blocks=self.sink_blocks,
                          local_blocks=self.local_blocks, alpha=self.alpha, scale=scale,
                          halley_iters=self.halley_iters, prior=self.prior)

    def decode_static(self) -> DecodeStatic:
        return DecodeStatic(self.block_size, self.head_dim, self.group_size, self.dtype,
                            self.layout, self.page_size)

    def as_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------
# Decode attention with the prior
# ---------------------------------------------------------------------------------------
class EntmaxDecodeTriton(TritonSparseDecode):
    """decode_api's sparse decode plus `block_bias` [B, Hkv, max_sel] fp32 (natural log),
    added to the logits of each selected block's tokens. `static` is an EntmaxStatic.
    The kernel is the parent's template with has_block_bias on (off when prior=False: then
    it is the plain sparse decode and block_bias is ignored)."""

    name = "triton-entmax"

    def __init__(self, static: EntmaxStatic, config: dict | None = None, build_dir=None):
        self.entmax_static = static
        self.has_block_bias = static.prior
        super().__init__(static.decode_static(), config, build_dir)

    @classmethod
    def tunable_space(cls, static):
        return super().tunable_space(_as_decode(static))

    @classmethod
    def default_config(cls, static):
        # the support varies per KV head (widest row ~1.3x the mean at 90 % skipped): four
        # programs per SM balance it (H100, B 8 x 128K: 0.174 ms vs 0.188 at one per SM,
        # bench/results/H100-entmax-decode-probe.md)
        return {**super().default_config(_as_decode(static)), "waves": 4}

    @classmethod
    def check_config(cls, static, config):
        return super().check_config(_as_decode(static), config)

    def __call__(self, q, k, v, block_indices, block_counts, seq_lens, block_table=None,
                 block_bias=None, sm_scale=None, num_splits=None):
        """out [B, Hq, D] in q's dtype; decode_api's contract plus the prior. No device sync."""
        return self._launch(q, k, v, block_indices, block_counts, seq_lens, block_table,
                            sm_scale, num_splits, block_bias)[0]

    # --- tuner protocol (the parent's sparse-decode workload plus an entmax selection) -----
    @classmethod
    def bench_inputs(cls, static: EntmaxStatic, batch: int, seq_len: int, kv_heads: int = 8,
                     budget_blocks: int = 64, device="cuda", seed: int = 0) -> dict:
        """A cache of seq_len tokens per sequence (the tuner's decode cache: contiguous or
        paged over scattered pages) and an entmax selection: ascending blocks, the last
        (current) one always, ~budget_blocks per KV head varying over the heads as the
        support does (0.75x-1.25x), -1 padded to every block, with log p_bar priors < 0."""
        from ..tune.bench import Workload, _cache

        nb = -(-seq_len // static.block_size)
        gen = torch.Generator(device=device).manual_seed(seed)
        w = Workload(static=static.decode_static().as_dict(),
                     num_q_heads=kv_heads * static.group_size, num_kv_heads=kv_heads,
                     batch=batch, seq_len=seq_len, selected_blocks=budget_blocks, seed=seed)
        k, v, table = _cache(torch, w, [seq_len] * batch, gen, device)
        counts = _support_sizes(batch, kv_heads, budget_blocks, 1, nb, device)
        # random others before the last block, ascending: rank blocks by a random key with
        # the last block first, keep each row's count, then sort the kept ids
        key = torch.rand(batch, kv_heads, nb, generator=gen, device=device)
        key[..., nb - 1] = -1.0
        order = key.argsort(-1)
        live = torch.arange(nb, device=device) < counts[..., None]
        idx = torch.where(live, order, nb).sort(-1).values
        idx = torch.where(idx < nb, idx, -1).to(torch.int32)
        pbar = torch.rand(batch, kv_heads, nb, generator=gen, device=device) * 0.9 + 0.05
        bias = torch.where(idx >= 0, pbar.log(), 0.0)
        return {"q": torch.randn(batch, w.num_q_heads, static.head_dim, generator=gen,
                                 device=device).to(k.dtype),
                "k": k, "v": v, "block_indices": idx, "block_counts": counts.to(torch.int32),
                "seq_lens": torch.full((batch,), seq_len, dtype=torch.int32, device=device),
                "block_table": table, "block_bias": bias}

    def reference(self, q, k, v, block_indices, block_counts, seq_lens, block_table=None,
                  block_bias=None, sm_scale=None, num_splits=None):
        from ..methods.sparse_decode_ref import sparse_decode_reference

        return sparse_decode_reference(
            q, k, v, block_indices, block_counts, seq_lens, self.static.block_size,
            block_table=block_table, sm_scale=sm_scale,
            block_bias=block_bias if self.has_block_bias else None)


def _support_sizes(batch: int, heads: int, want: int, lo: int, hi: int, device):
    """[batch, heads] int64 sizes of a varying support: `want` scaled over the heads from
    0.75x to 1.25x (the entmax support varies per KV head), clamped to [lo, hi]. A function
    of the shape only, never of the seed: EntmaxTauTriton writes only the first `count`
    entries of its persistent outputs, so input sets of equal counts leave equal padding."""
    r = torch.arange(batch * heads, device=device).view(batch, heads) % 5
    return (want * (0.75 + 0.125 * r)).round().long().clamp(lo, max(lo, hi))


def _as_decode(static):
    return static.decode_static() if isinstance(static, EntmaxStatic) else static


# ---------------------------------------------------------------------------------------
# tau solve + selection
# ---------------------------------------------------------------------------------------
class EntmaxTauTriton(TritonKernel):
    """Decode selection of the entmax rule on the GPU (see sparsegen.methods.entmax.
    select_blocks). Call: (q [B, Hq, D], summaries [B, Hkv, cap, D], seq_lens [B] int32,
    lengths=None, scale=1.0) -> sparsegen.methods.entmax.Selection with width = cap (fp32
    bias). No device sync."""

    name = "entmax_tau"
    template = "triton/entmax_tau.py.j2"

    def __init__(self, static: EntmaxStatic, config: dict | None = None, build_dir=None,
                 scale: float = 1.0):
        super().__init__(static, config, build_dir)
        self.scale = scale  # c: a runtime argument (no recompilation when it is tuned)
        self._buffers = {}

    @classmethod
    def tunable_space(cls, static) -> dict[str, list]:
        return {"block_j": [16, 32, 64, 128], "tiles": [1, 2, 4, 8], "stages": [1, 2, 3],
                "chunk": [256, 512, 1024, 2048, 4096], "num_warps": [2, 4, 8],
                "select_warps": [1, 2, 4, 8]}

    @classmethod
    def default_config(cls, static) -> dict:
        # the select kernel runs ~iters + 3 passes over a row of candidate blocks: a row up
        # to 8192 group values stays resident (one chunk at 128K / block 64, G 4), so every
        # pass is one vectorized reduction instead of a serial chunk loop (H100, B 8 x 128K:
        # 57 us with 256-block chunks padded to 16 rows). Scoring: 32-block tiles, one per
        # program, 3 stages were fastest or within 1 % on every probed shape (the solve 1.04-
        # 1.26x faster than with 64-block tiles; more tiles per program gained nothing:
        # bench/results/H100-entmax-tau-probe.md)
        return {"block_j": 32, "tiles": 1, "stages": 3,
                "chunk": min(4096, 8192 // next_pow2(static.group_size)),
                "num_warps": 4, "select_warps": 8}

    @classmethod
    def check_config(cls, static, config) -> str | None:
        bad = check_int_config(config, ("block_j", "tiles", "stages", "chunk", "num_warps",
                                        "select_warps"))
        if bad:
            return bad
        if not pow2(config["block_j"]) or not 16 <= config["block_j"] <= 256:
            return f"block_j={config['block_j']} must be a power of two in [16, 256]"
        if not pow2(config["tiles"]) or not 1 <= config["tiles"] <= 16:
            return f"tiles={config['tiles']} must be a power of two in [1, 16]"
        if not 1 <= config["stages"] <= 4:
            return f"stages={config['stages']} out of [1, 4]"
        if not pow2(config["chunk"]) or not 16 <= config["chunk"] <= 4096:
            return f"chunk={config['chunk']} must be a power of two in [16, 4096]"
        if config["select_warps"] not in (1, 2, 4, 8):
            return f"select_warps={config['select_warps']} not in (1, 2, 4, 8)"
        if next_pow2(static.group_size) * config["chunk"] > 16384:
            return "group (padded to a power of two) x chunk > 16384 fp32 values per select tile (register spills)"
        if not 1.0 < static.alpha <= 2.0:
            return f"alpha={static.alpha} out of (1, 2]"
        return None

    def template_params(self) -> dict:
        s, c = self.static, self.config
        return {"head_dim": s.head_dim, "group_size": s.group_size,
                "g_pad": _g_pad(s.group_size), "g_sel": next_pow2(s.group_size), "dtype": s.dtype, "block_size": s.block_size,
                "sink_blocks": s.sink_blocks, "local_blocks": s.local_blocks,
                "alpha": float(s.alpha), "iters": s.halley_iters, "prior": s.prior, **c}

    def signatures(self):
        dt = TRITON_PTR[self.static.dtype]
        scores = {"Q": dt, "SUM": dt, "SEQ": "*i32", "Z": "*fp32", "coef": "fp32",
                  "width": "i32", **{a: "i32" for a in (
                      "stride_qb", "stride_qh", "stride_sb", "stride_sh", "stride_sj",
                      "stride_zb", "stride_zh")}}
        select = {"Z": "*fp32", "SEQ": "*i32", "IDX": "*i32", "CNT": "*i32", "BIAS": "*fp32",
                  **{a: "i32" for a in ("stride_zb", "stride_zh", "stride_ib", "stride_ih",
                                        "stride_cb", "stride_bb", "stride_bh")}}
        return [("entmax_scores", scores, ("Q", "SUM", "SEQ", "Z", "stride_qb", "stride_qh",
                                            "stride_sb", "stride_sh", "stride_sj"),
                 {"num_warps": self.config["num_warps"], "num_stages": 2}),
                ("entmax_select", select, ("Z", "SEQ", "IDX", "CNT", "BIAS"),
                 {"num_warps": self.config["select_warps"], "num_stages": 1})]

    def _scratch(self, B, Hq, Hkv, cap, device):
        key = (B, Hq, Hkv, cap, device)
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = (
                torch.empty(B, Hq, cap, dtype=torch.float32, device=device),
                torch.full((B, Hkv, cap), -1, dtype=torch.int32, device=device),
                torch.zeros(B, Hkv, dtype=torch.int32, device=device),
                torch.zeros(B, Hkv, cap, dtype=torch.float32, device=device))
        return buf

    def __call__(self, q, summaries, seq_lens, lengths=None):
        mod = self.module
        s = self.static
        B, Hq, D = q.shape
        Hkv, cap = summaries.shape[1], summaries.shape[2]
        if D != s.head_dim or Hq != Hkv * s.group_size or summaries.stride(3) != 1:
            raise ValueError(f"q {tuple(q.shape)} / summaries {tuple(summaries.shape)} do not "
                             f"match head_dim={s.head_dim}, group_size={s.group_size}")
        if q.dtype != torch_dtype(s.dtype) or summaries.dtype != q.dtype:
            raise TypeError(f"q and summaries must be {s.dtype}")
        z, idx, cnt, bias = self._scratch(B, Hq, Hkv, cap, q.device)
        # grid over the widest candidate range: from host lengths when known, else capacity
        if lengths is not None:
            nb = max(math.ceil(n / s.block_size) for n in lengths)
            width = max(0, min(cap, max(nb - s.local_blocks, s.sink_blocks)))
        else:
            width = cap
        coef = (s.alpha - 1.0) * self.scale / math.sqrt(D)
        if width > 0:
            per_program = self.config["block_j"] * self.config["tiles"]
            mod.entmax_scores[(cdiv(width, per_program), Hkv, B)](
                q, summaries, seq_lens, z, coef, cap,
                q.stride(0), q.stride(1), summaries.stride(0), summaries.stride(1),
                summaries.stride(2), z.stride(0), z.stride(1),
                num_warps=self.config["num_warps"], num_stages=self.config["stages"])
        mod.entmax_select[(Hkv, B)](
            z, seq_lens, idx, cnt, bias,
            z.stride(0), z.stride(1), idx.stride(0), idx.stride(1), cnt.stride(0),
            bias.stride(0), bias.stride(1),
            num_warps=self.config["select_warps"], num_stages=1)
        return Selection(idx, cnt, bias)

    # --- tuner protocol --------------------------------------------------------------------
    @classmethod
    def bench_inputs(cls, static: EntmaxStatic, batch: int, seq_len: int, kv_heads: int = 8,
                     budget_blocks: int = 64, device="cuda", seed: int = 0) -> dict:
        """The selection of a decode step at seq_len tokens, built so that its support is
        known exactly: per KV head a random set of candidate blocks (~budget_blocks less
        the always-on ones, varying per head as _support_sizes) whose summaries score one
        value, far above every other candidate (margins of ~1 in z = (alpha - 1) s, where
        fp32 rounding is ~1e-6). With data of no such structure the kernel's and torch's
        tau differ in the last bits and flip blocks at the support's edge, so an exact
        comparison of indices would reject every candidate. The values are small integers
        times powers of two: every dot product is exact in any summation order."""
        s = static
        if not 1.0 < s.alpha <= 2.0:
            raise ValueError(f"alpha={s.alpha} out of (1, 2]")
        gen = torch.Generator(device=device).manual_seed(seed)
        bs, D, G = s.block_size, s.head_dim, s.group_size
        nb = -(-seq_len // bs)
        cand_end = max(nb - s.local_blocks, s.sink_blocks)
        n_cand = max(0, cand_end - s.sink_blocks)
        want = budget_blocks - min(nb, s.sink_blocks + s.local_blocks)
        size = _support_sizes(batch, kv_heads, want, min(1, n_cand), n_cand, device)
        # a block of the support scores q.k = +a D / 2 against each head of its group, the
        # others -a D c / 2 (c in {1/4, 1/2, 1}); a makes that z gap >= 4 at scale 1
        coef = (s.alpha - 1.0) / math.sqrt(D)
        a = 2.0 ** math.ceil(math.log2(8.0 / (coef * D)))
        u = torch.randint(0, 2, (batch, kv_heads, 1, D), generator=gen,
                          device=device).float() * 2 - 1
        rank = torch.rand(batch, kv_heads, nb, generator=gen, device=device)
        rank[..., :s.sink_blocks] = 2.0   # never candidates
        rank[..., cand_end:] = 2.0
        pos = rank.argsort(-1).argsort(-1)
        hit = pos < size[..., None]
        c = 2.0 ** -torch.randint(0, 3, (batch, kv_heads, nb, 1), generator=gen,
                                  device=device).float()
        summ = torch.where(hit[..., None], a / 2 * u, -a / 2 * c * u)
        gscale = 2.0 ** torch.randint(0, 2, (batch, kv_heads, G, 1), generator=gen,
                                      device=device).float()
        q = (u * gscale).reshape(batch, kv_heads * G, D)
        dt = torch_dtype(s.dtype)
        return {"q": q.to(dt), "summaries": summ.to(dt).contiguous(),
                "seq_lens": torch.full((batch,), seq_len, dtype=torch.int32, device=device),
                "lengths": [seq_len] * batch}

    def reference(self, q, summaries, seq_lens, lengths=None):
        """sparsegen.methods.entmax.select_blocks at this kernel's scale."""
        from ..methods.entmax import select_blocks

        sel = select_blocks(q, summaries, seq_lens, self.static.rule(self.scale),
                            width=summaries.shape[2])
        return Selection(sel.indices, sel.counts, sel.bias.float())
