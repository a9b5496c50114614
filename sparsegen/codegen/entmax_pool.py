"""Block level of the entmax prefill (DashAttention training) on the GPU, rendered from
templates/triton/entmax_pool.py.j2: the block summaries of q (mean) and k (attention pool
with w) read straight from the 16-bit q/k with fp32 accumulation (no fp32 copy of either),
and the alpha-entmax of the block scores with the group average, each with its backward.

`EntmaxPoolTriton` is the `block_ops` argument of sparsegen.methods.entmax.prefill_selection
/ entmax_prefill (the torch twin is entmax.TORCH_BLOCK_OPS): pool_q, pool_k and entmax_pbar
are differentiable. Not tuned (memory-bound passes over q and k, one small entmax pass), so
not in rule_kernels; the config still follows the adapters' pattern.
"""
from __future__ import annotations

import torch

from .entmax_kernels import EntmaxStatic
from .triton_kernel import (
    TRITON_PTR,
    TritonKernel,
    cdiv,
    check_int_config,
    next_pow2,
    pow2,
    torch_dtype,
)


class EntmaxPoolTriton(TritonKernel):
    """Block summaries + entmax of the prefill. `static` is an EntmaxStatic (block_size,
    head_dim, group_size, dtype of q/k, sink/local blocks, alpha, halley_iters)."""

    name = "entmax_pool"
    template = "triton/entmax_pool.py.j2"
    _KEYS = ("chunk", "num_warps", "pool_warps")

    @classmethod
    def tunable_space(cls, static) -> dict[str, list]:
        return {"chunk": [128, 256, 512, 1024, 2048], "num_warps": [2, 4, 8],
                "pool_warps": [2, 4, 8]}

    @classmethod
    def default_config(cls, static) -> dict:
        # one chunk covers a 32K prompt's 512 blocks at block 64: every entmax pass is one
        # vectorized reduction over the row (4 heads x 512 fp32 = 16 values per thread);
        # the pool backward holds three fp32 [64, 128] tiles: 8 warps keep it spill-free
        return {"chunk": min(512, 8192 // next_pow2(static.group_size)), "num_warps": 4,
                "pool_warps": 8}

    @classmethod
    def check_config(cls, static, config) -> str | None:
        bad = check_int_config(config, cls._KEYS)
        if bad:
            return bad
        if not pow2(config["chunk"]) or not 16 <= config["chunk"] <= 4096:
            return f"chunk={config['chunk']} must be a power of two in [16, 4096]"
        if next_pow2(static.group_size) * config["chunk"] > 16384:
            return "group (padded to a power of two) x chunk > 16384 fp32 values per tile"
        if config["pool_warps"] not in (1, 2, 4, 8):
            return f"pool_warps={config['pool_warps']} not in (1, 2, 4, 8)"
        if not pow2(static.block_size) or not pow2(static.head_dim):
            return "block_size and head_dim must be powers of two (one tile per block)"
        if not 1.0 < static.alpha <= 2.0:
            return f"alpha={static.alpha} out of (1, 2]"
        return None

    def template_params(self) -> dict:
        s = self.static
        return {"block_size": s.block_size, "head_dim": s.head_dim,
                "group_size": s.group_size, "g_pad": next_pow2(s.group_size),
                "sink_blocks": s.sink_blocks, "local_blocks": s.local_blocks,
                "alpha": float(s.alpha), "iters": s.halley_iters, **self.config}

    def signatures(self):
        dt = TRITON_PTR[self.static.dtype]
        f32 = "*fp32"
        qs = {a: "i32" for a in ("stride_qb", "stride_qt", "stride_qh")}
        ks = {a: "i32" for a in ("stride_kb", "stride_kt", "stride_kh")}
        ds = {a: "i32" for a in ("stride_db", "stride_dt", "stride_dh")}
        pw = {"num_warps": self.config["pool_warps"], "num_stages": 1}
        ew = {"num_warps": self.config["num_warps"], "num_stages": 1}
        return [
            ("pool_q_fwd", {"Q": dt, "QBAR": f32, "T": "i32", **qs}, ("Q", "QBAR"), pw),
            ("pool_q_bwd", {"DQBAR": f32, "DQ": dt, "T": "i32", **qs}, ("DQBAR", "DQ"), pw),
            ("pool_k_fwd", {"K": dt, "W": f32, "KBAR": f32, **ks}, ("K", "W", "KBAR"), pw),
            ("pool_k_bwd", {"K": dt, "W": f32, "DKBAR": f32, "DK": dt, "DW": f32, **ks, **ds},
             ("K", "W", "DKBAR", "DK", "DW"), pw),
            ("entmax_fwd", {"S": f32, "P": f32, "PBAR": f32, "nq": "i32", "J": "i32"},
             ("S", "P", "PBAR"), ew),
            ("entmax_bwd", {"P": f32, "DPBAR": f32, "DS": f32, "nq": "i32", "J": "i32"},
             ("P", "DPBAR", "DS"), ew),
        ]

    # --- runtime -----------------------------------------------------------------------
    def _check(self, x, heads_per_kv: int, what: str):
        s = self.static
        if x.dim() != 4 or x.shape[-1] != s.head_dim:
            raise ValueError(f"{what} must be [B, T, H, {s.head_dim}], got {tuple(x.shape)}")
        if x.dtype != torch_dtype(s.dtype):
            raise TypeError(f"{what} must be {s.dtype}, got {x.dtype}")
        if heads_per_kv and x.shape[2] % heads_per_kv:
            raise ValueError(f"{x.shape[2]} query heads do not split into groups of "
                             f"{heads_per_kv}")
        return x if x.stride(-1) == 1 else x.contiguous()

    def pool_q(self, q: torch.Tensor, block_size: int) -> torch.Tensor:
        """Mean of each query block's rows: q [B, T, Hq, D] -> [B, Hq, ceil(T / bs), D] fp32."""
        self._check_block(block_size)
        return _PoolQ.apply(self._check(q, self.static.group_size, "q"), self)

    def pool_k(self, k: torch.Tensor, w: torch.Tensor, block_size: int) -> torch.Tensor:
        """Attention pool of each full key block: k [B, T, Hkv, D], w [Hkv, D] ->
        [B, Hkv, T // bs, D] fp32."""
        self._check_block(block_size)
        k = self._check(k, 0, "k")
        if tuple(w.shape) != (k.shape[2], k.shape[3]):
            raise ValueError(f"w must be [{k.shape[2]}, {k.shape[3]}], got {tuple(w.shape)}")
        return _PoolK.apply(k, w, self)

    def entmax_pbar(self, s: torch.Tensor, rule) -> torch.Tensor:
        """Group-averaged entmax probabilities of the block scores s [B, Hkv, G, nq, J]
        (candidates j in [sink, i - local], from the static) -> [B, Hkv, nq, J] fp32."""
        st = self.static
        if (rule.sink_blocks, rule.local_blocks, rule.alpha, rule.halley_iters) != (
                st.sink_blocks, st.local_blocks, st.alpha, st.halley_iters):
            raise ValueError(f"rule {rule} does not match the kernel's static {st}")
        if s.dim() != 5 or s.shape[2] != st.group_size:
            raise ValueError(f"scores must be [B, Hkv, {st.group_size}, nq, J], got "
                             f"{tuple(s.shape)}")
        return _EntmaxPbar.apply(s.float().contiguous(), self)

    def _check_block(self, block_size: int) -> None:
        if block_size != self.static.block_size:
            raise ValueError(f"block_size {block_size} != kernel's {self.static.block_size}")

    def _launch(self, name, grid, *args, entmax=False):
        c = self.config
        getattr(self.module, name)[grid](
            *args, num_warps=c["num_warps" if entmax else "pool_warps"], num_stages=1)


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


class _PoolQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, kern):
        B, T, Hq, D = q.shape
        nq = cdiv(T, kern.static.block_size)
        qbar = torch.empty(B, Hq, nq, D, dtype=torch.float32, device=q.device)
        if qbar.numel():
            kern._launch("pool_q_fwd", (nq, Hq, B), q, qbar, T, *_strides(q))
        ctx.kern, ctx.shape, ctx.dtype = kern, q.shape, q.dtype
        return qbar

    @staticmethod
    def backward(ctx, dqbar):
        B, T, Hq, _D = ctx.shape
        dq = torch.empty(ctx.shape, dtype=ctx.dtype, device=dqbar.device)
        if dq.numel():
            ctx.kern._launch("pool_q_bwd", (dqbar.shape[2], Hq, B), dqbar.float().contiguous(),
                             dq, T, *_strides(dq))
        return dq, None


class _PoolK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, k, w, kern):
        B, T, Hkv, D = k.shape
        J = T // kern.static.block_size
        w32 = w.detach().float().contiguous()
        kbar = torch.empty(B, Hkv, J, D, dtype=torch.float32, device=k.device)
        if kbar.numel():
            kern._launch("pool_k_fwd", (J, Hkv, B), k, w32, kbar, *_strides(k))
        ctx.save_for_backward(k, w32)
        ctx.kern, ctx.w_dtype = kern, w.dtype
        return kbar

    @staticmethod
    def backward(ctx, dkbar):
        k, w32 = ctx.saved_tensors
        B, _T, Hkv, D = k.shape
        J = dkbar.shape[2]
        full = J * ctx.kern.static.block_size
        dk = torch.empty_like(k, memory_format=torch.contiguous_format)
        dk[:, full:] = 0  # rows of the partial last block have no summary
        dw = torch.zeros(B, Hkv, J, D, dtype=torch.float32, device=k.device)
        if dw.numel():
            ctx.kern._launch("pool_k_bwd", (J, Hkv, B), k, w32, dkbar.float().contiguous(),
                             dk, dw, *_strides(k), *_strides(dk))
        return dk, dw.sum((0, 2)).to(ctx.w_dtype), None


class _EntmaxPbar(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, kern):
        B, Hkv, _G, nq, J = s.shape
        p = torch.empty_like(s)
        pbar = torch.empty(B, Hkv, nq, J, dtype=torch.float32, device=s.device)
        if p.numel():
            kern._launch("entmax_fwd", (nq, Hkv, B), s, p, pbar, nq, J, entmax=True)
        ctx.save_for_backward(p)
        ctx.kern = kern
        return pbar

    @staticmethod
    def backward(ctx, dpbar):
        (p,) = ctx.saved_tensors
        B, Hkv, _G, nq, J = p.shape
        ds = torch.empty_like(p)
        if p.numel():
            ctx.kern._launch("entmax_bwd", (nq, Hkv, B), p, dpbar.float().contiguous(), ds,
                             nq, J, entmax=True)
        return ds, None


def block_ops_for(q: torch.Tensor, num_kv_heads: int, rule) -> EntmaxPoolTriton:
    """One EntmaxPoolTriton per (rule, shape, dtype) in this process (default config)."""
    return EntmaxPoolTriton.shared(EntmaxStatic.from_rule(rule, q, num_kv_heads))

