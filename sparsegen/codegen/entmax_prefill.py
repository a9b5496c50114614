"""The entmax rule's prefill at token level (DashAttention training): causal block-sparse
attention with the block prior on the logits, forward and backward, rendered from
templates/triton/entmax_prefill.py.j2.

Three kernels: forward, dq (which also writes DELTA = rowsum(o * do)), then dk/dv; each tile
stacks `pack` query heads of a KV group (they share the selection). `attention(...)` is the
`attention` argument of sparsegen.methods.entmax.entmax_prefill (an autograd Function); the
tuner times one forward + backward (`__call__`) against the blockwise fp32 reference
(sparsegen.methods.entmax.token_attention_grads).

Its own module (not entmax_kernels) because a tuned kernel's identity hashes its adapter
module: an edit here leaves the decode kernels' tuned entries valid, and the reverse.
"""
from __future__ import annotations

import torch

from ..methods.entmax import PrefillSelection, prefill_candidates, token_attention_grads
from .triton_kernel import (ELEM_BYTES, LOG2E, SMEM_LIMIT, TRITON_PTR, TritonKernel, cdiv,
                            check_int_config, pow2, torch_dtype)


class EntmaxPrefillTriton(TritonKernel):
    """Token level of the entmax prefill: `attention(q, k, v, sel, block_size, sm_scale)`
    is the `attention` argument of sparsegen.methods.entmax.entmax_prefill. Three kernels:
    forward, dq (which also writes DELTA = rowsum(o * do)), then dk/dv; each tile stacks
    `pack` query heads of a KV group (they share the selection)."""

    name = "entmax_prefill"
    template = "triton/entmax_prefill.py.j2"
    _TILES = ("block_m", "block_n", "dq_m", "dq_n", "kv_m", "kv_n")
    _PACKS = ("pack", "dq_pack", "kv_pack")
    _KEYS = _TILES + _PACKS + ("num_warps", "num_stages", "bwd_warps", "bwd_stages",
                               "kv_warps", "kv_stages", "kv_qrows", "idx_ptx")
    # configs recorded before a key existed (plans, tuning records) mean its old behaviour:
    # one head per tile, plain index loads, key rows as the dk/dv matmuls' M, the dk/dv
    # kernel at the dq kernel's warps/stages
    _ADDED = {"idx_ptx": 0, "pack": 1, "dq_pack": 1, "kv_pack": 1, "kv_qrows": 0}
    _FOLLOWS = {"kv_warps": "bwd_warps", "kv_stages": "bwd_stages"}
    MAX_ROWS = 256   # tokens * pack of one tile (fp32 accumulators of 256 x D fill the RF)

    def __init__(self, static, config: dict | None = None, build_dir=None):
        super().__init__(static, None if config is None else self._upgraded(config),
                         build_dir)

    @classmethod
    def _upgraded(cls, config: dict) -> dict:
        config = {**cls._ADDED, **config}
        for key, old in cls._FOLLOWS.items():
            if key not in config and old in config:
                config[key] = config[old]
        return config

    @classmethod
    def tunable_space(cls, static) -> dict[str, list]:
        tiles = [n for n in (16, 32, 64, 128) if static.block_size % n == 0]
        packs = [n for n in (1, 2, 4, 8) if static.group_size % n == 0]
        return {**{t: tiles for t in cls._TILES}, **{p: packs for p in cls._PACKS},
                "num_warps": [4, 8], "num_stages": [1, 2, 3, 4], "bwd_warps": [4, 8],
                "bwd_stages": [1, 2, 3], "kv_warps": [4, 8], "kv_stages": [1, 2, 3],
                "kv_qrows": [0, 1], "idx_ptx": [0, 1]}

    @classmethod
    def default_config(cls, static) -> dict:
        # H100, D 128, bf16, G 4, 32K tokens at 75 % skipped (bench/results/H100-entmax-
        # prefill-probe.md), each kernel timed alone: forward 6.4 -> 5.3 ms with the group's
        # 4 heads in one 256-row tile at 8 warps; dq 8.7 -> 7.7 ms with 2 heads (128 rows)
        # at 8 warps; dk/dv 14.3 -> 12.7 ms with query columns as the matmuls' M (kv_qrows)
        # over 16 tokens x 4 heads at 4 warps (key rows cap M at 64: 8 warps split N and
        # ran 25 ms). Smaller statics (fp32, short blocks, small groups) step down to the
        # first variant that fits.
        tile = min(64, static.block_size)
        fast = {"block_m": tile, "block_n": tile, "pack": 4, "num_warps": 8, "num_stages": 3,
                "dq_m": tile, "dq_n": tile, "dq_pack": 2, "bwd_warps": 8, "bwd_stages": 3,
                "kv_m": 16, "kv_n": tile, "kv_pack": 4, "kv_warps": 4, "kv_stages": 2,
                "kv_qrows": 1,
                # block indices read by inline PTX (see the template): forward 6.64 -> 6.13
                # ms on the H100, backward unchanged (25.10 / 25.08)
                "idx_ptx": 1}
        for packs, stages in (((4, 2, 4), 3), ((2, 2, 2), 2), ((1, 1, 1), 2), ((1, 1, 1), 1)):
            cfg = dict(fast, num_stages=stages, bwd_stages=stages, kv_stages=min(stages, 2))
            for key, want in zip(cls._PACKS, packs):
                cfg[key] = max(n for n in (1, 2, 4) if n <= want and static.group_size % n == 0)
            cfg["kv_m"] = min(tile, 64 // cfg["kv_pack"])
            if cls.check_config(static, cfg) is None:
                return cfg
        return cfg   # nothing fits: check_config names why when the kernel is built

    @classmethod
    def smem_bytes(cls, static, config) -> int:
        """Estimate: streamed operand tiles times stages plus the resident tiles."""
        eb, d = ELEM_BYTES[static.dtype], static.head_dim
        c = config
        fwd = c["num_stages"] * 2 * c["block_n"] * d * eb + c["block_m"] * c["pack"] * d * eb
        dq = c["bwd_stages"] * 2 * c["dq_n"] * d * eb + 2 * c["dq_m"] * c["dq_pack"] * d * eb
        kv = c["kv_stages"] * 2 * c["kv_m"] * c["kv_pack"] * d * eb + 2 * c["kv_n"] * d * eb
        return max(fwd, dq, kv)

    @classmethod
    def check_config(cls, static, config) -> str | None:
        config = cls._upgraded(config)
        bad = check_int_config(config, cls._KEYS)
        if bad:
            return bad
        for key in cls._TILES:
            t = config[key]
            if not pow2(t) or t < 16 or static.block_size % t:
                return f"{key}={t} must be a power of two >= 16 dividing block_size"
        for key, tile in zip(cls._PACKS, ("block_m", "dq_m", "kv_m")):
            n = config[key]
            if not pow2(n) or static.group_size % n:
                return (f"{key}={n} must be a power of two dividing the GQA group "
                        f"({static.group_size})")
            if config[tile] * n > cls.MAX_ROWS:
                return f"{tile}={config[tile]} x {key}={n} rows > {cls.MAX_ROWS}"
        for key in ("num_stages", "bwd_stages", "kv_stages"):
            if not 1 <= config[key] <= 6:
                return f"{key}={config[key]} out of [1, 6]"
        for key in ("bwd_warps", "kv_warps"):
            if config[key] not in (2, 4, 8):
                return f"{key}={config[key]} not in (2, 4, 8)"
        for key in ("kv_qrows", "idx_ptx"):
            if config[key] not in (0, 1):
                return f"{key}={config[key]} not in (0, 1)"
        if config["kv_qrows"] and config["kv_stages"] == 1 and config["kv_n"] < static.block_size:
            # Triton 3.6's sm_90 build of this dk/dv variant wrote NaN dk (kv_m 64, kv_n 16,
            # kv_pack 4) or faulted (kv_m 32, kv_n 32, kv_pack 2) on the H100, while the same
            # tiles pass under the interpreter and at kv_stages 2, kv_n = block or kv_qrows 0
            # (bench/results/H100-tune-dash-prefill.log)
            return "kv_qrows=1 at kv_stages=1 needs kv_n = block_size (miscompiled otherwise)"
        smem = cls.smem_bytes(static, config)
        if smem > SMEM_LIMIT:
            return f"shared memory estimate {smem} B exceeds {SMEM_LIMIT} B"
        return None

    def template_params(self) -> dict:
        s = self.static
        # the interpreter cannot run inline PTX: idx_ptx renders plain loads there, while
        # compile_sm90 (a child process without the interpreter) renders the PTX variant
        from .triton_kernel import interpreted
        return {"block_size": s.block_size, "head_dim": s.head_dim,
                "group_size": s.group_size, "dtype": s.dtype, **self.config,
                "interpret": interpreted()}

    def signatures(self):
        dt = TRITON_PTR[self.static.dtype]
        strides = [f"stride_{t}{x}" for t in "qkvo" for x in "bth"]
        i32 = {a: "i32" for a in ["T", "nk"] + strides}
        fwd = {"Q": dt, "K": dt, "V": dt, "BIAS": "*fp32", "IDX": "*i32", "CNT": "*i32",
               "O": dt, "LSE": "*fp32", "qk_scale": "fp32"}
        dq = {"Q": dt, "K": dt, "V": dt, "BIAS": "*fp32", "IDX": "*i32", "CNT": "*i32",
              "O": dt, "DO": dt, "LSE": "*fp32", "DELTA": "*fp32", "DQ": dt, "DBIAS": "*fp32",
              "qk_scale": "fp32", "sm_scale": "fp32"}
        dkdv = {"Q": dt, "K": dt, "V": dt, "BIAS": "*fp32", "RIDX": "*i32", "RCNT": "*i32",
                "DO": dt, "LSE": "*fp32", "DELTA": "*fp32", "DK": dt, "DV": dt,
                "qk_scale": "fp32", "sm_scale": "fp32"}
        div = ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")
        if self.static.head_dim % 16 == 0:
            # what the runtime specializes for contiguous [B, T, H, D] tensors: without it the
            # sm_90 compile falls back to 2-byte loads (no cp.async) and its register / spill
            # figures are not the launched kernel's
            div += tuple(strides)
        fwd, dq, dkdv = ({**f, **i32} for f in (fwd, dq, dkdv))
        return [(name, sig, tuple(a for a in div if a in sig), self._launch_opts(part))
                for name, sig, part in (("entmax_prefill_fwd", fwd, "fwd"),
                                        ("entmax_prefill_bwd_dq", dq, "dq"),
                                        ("entmax_prefill_bwd_dkdv", dkdv, "kv"))]

    def _launch_opts(self, part: str) -> dict:
        warps, stages = {"fwd": ("num_warps", "num_stages"), "dq": ("bwd_warps", "bwd_stages"),
                         "kv": ("kv_warps", "kv_stages")}[part]
        return {"num_warps": self.config[warps], "num_stages": self.config[stages]}

    # --- runtime -----------------------------------------------------------------------
    def _check(self, q, k, v):
        s = self.static
        if q.dtype != torch_dtype(s.dtype) or k.dtype != q.dtype or v.dtype != q.dtype:
            raise TypeError(f"q/k/v must be {s.dtype}")
        if q.shape[-1] != s.head_dim or q.shape[2] != k.shape[2] * s.group_size:
            raise ValueError(f"q {tuple(q.shape)} / k {tuple(k.shape)} do not match the kernel")

    @staticmethod
    def _strides(*ts):
        out = []
        for t in ts:
            out += [t.stride(0), t.stride(1), t.stride(2)]
        return out

    def forward(self, q, k, v, bias, idx, cnt, sm_scale):
        self._check(q, k, v)
        B, T, Hq, _ = q.shape
        nk = bias.shape[-1]
        o = torch.empty_like(q)
        lse = torch.empty(B, Hq, T, dtype=torch.float32, device=q.device)
        c = self.config
        self.module.entmax_prefill_fwd[(Hq // c["pack"], cdiv(T, c["block_m"]), B)](
            q, k, v, bias, idx, cnt, o, lse, sm_scale * LOG2E, T, nk,
            *self._strides(q, k, v, o), **self._launch_opts("fwd"))
        return o, lse

    def backward_dq(self, q, k, v, bias, idx, cnt, o, lse, do, sm_scale):
        """dq, the bias gradient [B, Hkv, nq, nk] and DELTA (for backward_dkdv)."""
        B, T, Hq, _ = q.shape
        Hkv = k.shape[2]
        nq = nk = bias.shape[-1]
        c = self.config
        bs, bm, pack = self.static.block_size, c["dq_m"], c["dq_pack"]
        dq = torch.empty_like(q)
        delta = torch.empty(B, Hq, T, dtype=torch.float32, device=q.device)
        n_mt = cdiv(T, bm)
        dbias_part = torch.zeros(B, Hq // pack, n_mt, nk, dtype=torch.float32, device=q.device)
        self.module.entmax_prefill_bwd_dq[(Hq // pack, n_mt, B)](
            q, k, v, bias, idx, cnt, o, do, lse, delta, dq, dbias_part,
            sm_scale * LOG2E, sm_scale, T, nk, *self._strides(q, k, v, do),
            **self._launch_opts("dq"))
        # per (sub-tile, head pack) bias gradients -> per (query block, key block), summed
        # over the group
        pad = nq * (bs // bm) - n_mt
        dbias = torch.nn.functional.pad(dbias_part, (0, 0, 0, pad))
        dbias = dbias.view(B, Hkv, Hq // Hkv // pack, nq, bs // bm, nk).sum((2, 4))
        return dq, dbias, delta

    def backward_dkdv(self, q, k, v, bias, ridx, rcnt, do, lse, delta, sm_scale):
        B, T, _, _ = q.shape
        Hkv = k.shape[2]
        nk = bias.shape[-1]
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        self.module.entmax_prefill_bwd_dkdv[(Hkv, cdiv(T, self.config["kv_n"]), B)](
            q, k, v, bias, ridx, rcnt, do, lse, delta, dk, dv,
            sm_scale * LOG2E, sm_scale, T, nk, *self._strides(q, k, v, do),
            **self._launch_opts("kv"))
        return dk, dv

    def backward(self, q, k, v, bias, idx, cnt, ridx, rcnt, o, lse, do, sm_scale):
        dq, dbias, delta = self.backward_dq(q, k, v, bias, idx, cnt, o, lse, do, sm_scale)
        dk, dv = self.backward_dkdv(q, k, v, bias, ridx, rcnt, do, lse, delta, sm_scale)
        return dq, dk, dv, dbias

    def attention(self, q, k, v, sel, block_size, sm_scale=None):
        if block_size != self.static.block_size:
            raise ValueError(f"block_size {block_size} != kernel's {self.static.block_size}")
        scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
        lists = sel.lists()
        return _PrefillAttention.apply(q, k, v, sel.bias.float(), lists, self, scale)


    # --- tuner protocol --------------------------------------------------------------------
    def __call__(self, q, k, v, sel: PrefillSelection, do):
        """One training step's token level: forward, then backward for the output gradient
        do. Returns (out, dq, dk, dv, dbias) (dbias [B, Hkv, nq, nk] fp32)."""
        scale = q.shape[-1] ** -0.5
        bias = sel.bias.float().contiguous()
        idx, cnt, ridx, rcnt = sel.lists()
        o, lse = self.forward(q, k, v, bias, idx, cnt, scale)
        return (o, *self.backward(q, k, v, bias, idx, cnt, ridx, rcnt, o, lse, do, scale))

    def reference(self, q, k, v, sel: PrefillSelection, do):
        return token_attention_grads(q, k, v, sel.mask, sel.bias.float(),
                                     self.static.block_size, do)

    @classmethod
    def tuning_shapes(cls, shapes):
        """Training runs one or a few prompts at a time: tune batch 1 at the decode buckets'
        lengths capped at 32K (the blockwise reference and one fwd + bwd at 128K would take
        minutes per bucket)."""
        from ..plan import ShapeBucket

        return tuple(ShapeBucket(1, n) for n in sorted({min(s.seq_len, 32768) for s in shapes}))

    @classmethod
    def bench_inputs(cls, static, batch: int, seq_len: int, kv_heads: int = 8,
                     budget_blocks: int | None = None, device="cuda", seed: int = 0) -> dict:
        """Random q, k, v, output gradient and a random causal selection in which each query
        block keeps about budget_blocks / blocks of its causal key blocks (sink and local
        blocks always, the rest drawn), with log p priors on the drawn ones."""
        if batch < 1 or seq_len < 1:
            raise ValueError(f"batch {batch} and seq_len {seq_len} must be positive")
        gen = torch.Generator(device=device).manual_seed(seed)
        dt, bs, D = torch_dtype(static.dtype), static.block_size, static.head_dim
        hq = kv_heads * static.group_size
        nq, J = cdiv(seq_len, bs), seq_len // bs
        share = 0.25 if budget_blocks is None else min(1.0, budget_blocks / nq)

        def rand(*shape):
            return torch.randn(*shape, device=device, generator=gen).to(dt)

        rule = static.rule()
        i = torch.arange(nq, device=device)[:, None]
        j = torch.arange(nq, device=device)[None, :]
        always = ((j < rule.sink_blocks) | (j > i - rule.local_blocks)) & (j <= i)
        cand = torch.zeros(nq, nq, dtype=torch.bool, device=device)
        cand[:, :J] = prefill_candidates(nq, J, rule, device)
        # per query block, the draw probability that keeps `share` of its causal blocks
        want = share * (i + 1).float() - always.sum(1, keepdim=True)
        prob = (want / cand.sum(1, keepdim=True).clamp(min=1)).clamp(0, 1)
        u = torch.rand(batch, kv_heads, nq, nq, device=device, generator=gen)
        chosen = cand & (u < prob)
        mask = always | chosen
        pbar = torch.rand(batch, kv_heads, nq, nq, device=device, generator=gen) * 0.9 + 0.1
        bias = torch.where(chosen, pbar.log(), torch.zeros_like(pbar))
        sel = PrefillSelection(mask, bias, torch.where(chosen, pbar, 0.0)[..., :J])
        return {"q": rand(batch, seq_len, hq, D), "k": rand(batch, seq_len, kv_heads, D),
                "v": rand(batch, seq_len, kv_heads, D), "sel": sel,
                "do": rand(batch, seq_len, hq, D)}


class _PrefillAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, lists, kern, sm_scale):
        q, k, v, bias = (t.contiguous() for t in (q, k, v, bias))
        idx, cnt, ridx, rcnt = lists
        o, lse = kern.forward(q, k, v, bias, idx, cnt, sm_scale)
        ctx.save_for_backward(q, k, v, bias, idx, cnt, ridx, rcnt, o, lse)
        ctx.kern, ctx.sm_scale = kern, sm_scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, bias, idx, cnt, ridx, rcnt, o, lse = ctx.saved_tensors
        dq, dk, dv, dbias = ctx.kern.backward(q, k, v, bias, idx, cnt, ridx, rcnt, o, lse,
                                              do.contiguous(), ctx.sm_scale)
        return dq, dk, dv, dbias.to(bias.dtype), None, None, None
