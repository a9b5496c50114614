"""Triton adapter of the gate's self-distillation target (templates/triton/distill_target.py.j2).

Two launches: the target kernel (flash-style log-sum-exp pass, then the block-max pass over
strictly earlier blocks; the group's heads are rows of one tl.dot) and a normalisation pass.
A call covers a range of query rows (all by default): besides those rows of the target,
[B, Hkv, rows, ceil(row_end / block_size)], it holds only a [B, Hkv, rows] row-sum buffer, so
a fixed-size row chunk costs memory linear in the sequence length, never S x S.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .triton_kernel import (
    ELEM_BYTES,
    LOG2E,
    SMEM_LIMIT,
    TRITON_PTR,
    TritonKernel,
    check_int_config,
    next_pow2,
    pow2,
    torch_dtype,
)

_KEYS = ("block_m", "block_n", "block_j", "num_warps", "num_stages")


@dataclass(frozen=True)
class DistillStatic:
    block_size: int
    head_dim: int
    group_size: int
    dtype: str = "bf16"

    def __post_init__(self):
        if not pow2(self.block_size) or not pow2(self.head_dim):
            raise ValueError("block_size and head_dim must be powers of two")
        if not 1 <= self.group_size <= 16:
            raise ValueError(f"group_size={self.group_size} out of [1, 16]")
        if self.dtype not in TRITON_PTR:
            raise ValueError(f"dtype {self.dtype!r} is not one of {tuple(TRITON_PTR)}")

    @property
    def g_pad(self) -> int:
        return next_pow2(self.group_size)

    def as_dict(self) -> dict:
        return asdict(self)


class TritonDistillTarget(TritonKernel):
    name = "distill_target"
    template = "triton/distill_target.py.j2"

    @classmethod
    def tunable_space(cls, static: DistillStatic) -> dict[str, list]:
        return {"block_m": [8, 16, 32, 64], "block_n": [16, 32, 64, 128],
                "block_j": [16, 32, 64], "num_warps": [4, 8], "num_stages": [1, 2, 3]}

    @classmethod
    def default_config(cls, static: DistillStatic) -> dict:
        # 64 tl.dot rows (tokens x group heads), up to 64 keys per dot
        return {"block_m": 64 // static.g_pad, "block_n": min(64, static.block_size),
                "block_j": 32, "num_warps": 4, "num_stages": 2}

    @classmethod
    def check_config(cls, static: DistillStatic, config: dict) -> str | None:
        if reason := check_int_config(config, _KEYS):
            return reason
        bm, bn, bj = config["block_m"], config["block_n"], config["block_j"]
        rows = bm * static.g_pad
        if not pow2(bm) or not pow2(bn) or not pow2(bj):
            return "block_m, block_n and block_j must be powers of two"
        if rows < 16 or rows > 256:
            return f"block_m x g_pad = {rows} tl.dot rows must lie in [16, 256]"
        if not 16 <= bn <= static.block_size:
            return f"block_n={bn} must lie in [16, block_size={static.block_size}]"
        if not 1 <= config["num_stages"] <= 4:
            return f"num_stages={config['num_stages']} out of [1, 4]"
        eb = ELEM_BYTES[static.dtype]
        smem = config["num_stages"] * bn * static.head_dim * eb + rows * static.head_dim * eb
        if smem > SMEM_LIMIT:
            return f"shared memory estimate {smem} B exceeds {SMEM_LIMIT} B"
        regs = (rows * static.head_dim * eb / 4 + 2 * rows * bn) / (32 * config["num_warps"])
        if regs > 192:
            return f"register estimate {int(regs)}/thread for live tiles would spill"
        return None

    def template_params(self) -> dict:
        s, c = self.static, self.config
        return {"block_size": s.block_size, "head_dim": s.head_dim, "group_size": s.group_size,
                "g_pad": s.g_pad, "dtype": s.dtype, **c}

    def signatures(self):
        dt = TRITON_PTR[self.static.dtype]
        target = {"Q": dt, "K": dt, "OUT": "*fp32", "ROWSUM": "*fp32", "qk_scale": "fp32",
                  "ROW0": "i32", "ROW_END": "i32"}
        for a in ("stride_qb", "stride_qs", "stride_qh", "stride_kb", "stride_ks", "stride_kh",
                  "stride_ob", "stride_oh", "stride_os", "stride_rb", "stride_rh"):
            target[a] = "i32"
        norm = {"OUT": "*fp32", "ROWSUM": "*fp32", "ROW0": "i32", "NROWS": "i32", "NB": "i32"}
        for a in ("stride_ob", "stride_oh", "stride_os", "stride_rb", "stride_rh"):
            norm[a] = "i32"
        kw = {"num_warps": self.config["num_warps"], "num_stages": self.config["num_stages"]}
        return [("distill_target", target, ("Q", "K", "OUT", "ROWSUM"), kw),
                ("distill_normalize", norm, ("OUT", "ROWSUM"),
                 {"num_warps": self.config["num_warps"], "num_stages": 1})]

    def __call__(self, q, k, sm_scale: float | None = None, row_start: int = 0,
                 num_rows: int | None = None):
        """q [B, S, Hq, D], k [B, S, Hkv, D] (post-RoPE, any strides with a contiguous last
        dim) -> the target of query rows [row_start, row_start + num_rows) (default: all),
        [B, Hkv, num_rows, ceil((row_start + num_rows) / block_size)] fp32."""
        import torch

        from ..methods.distill import row_range

        s = self.static
        if q.dim() != 4 or k.dim() != 4:
            raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must be [B, S, H, D]")
        B, S, Hq, D = q.shape
        Hkv = k.shape[2]
        if D != s.head_dim or Hq != Hkv * s.group_size or k.shape[:2] != (B, S):
            raise ValueError(f"q {tuple(q.shape)} / k {tuple(k.shape)} do not match "
                             f"head_dim={s.head_dim}, group_size={s.group_size}")
        if q.dtype != torch_dtype(s.dtype) or k.dtype != q.dtype:
            raise TypeError(f"q and k must be {s.dtype}; got {q.dtype}, {k.dtype}")
        if q.stride(3) != 1 or k.stride(3) != 1:
            raise ValueError("the last (head_dim) dimension of q and k must be contiguous")
        r0, r1 = row_range(S, row_start, num_rows)
        n, nb = r1 - r0, -(-r1 // s.block_size)
        out = torch.empty(B, Hkv, n, nb, dtype=torch.float32, device=q.device)
        rowsum = torch.empty(B, Hkv, n, dtype=torch.float32, device=q.device)
        scale = (D ** -0.5 if sm_scale is None else sm_scale) * LOG2E
        grid = (-(-n // self.config["block_m"]), Hkv, B)
        mod = self.module
        mod.distill_target[grid](
            q, k, out, rowsum, scale, r0, r1, q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2), out.stride(0), out.stride(1), out.stride(2),
            rowsum.stride(0), rowsum.stride(1),
            num_warps=self.config["num_warps"], num_stages=self.config["num_stages"])
        mod.distill_normalize[grid](
            out, rowsum, r0, n, nb, out.stride(0), out.stride(1), out.stride(2),
            rowsum.stride(0), rowsum.stride(1), num_warps=self.config["num_warps"],
            num_stages=1)
        return out

    # --- tuner protocol --------------------------------------------------------------------
    @classmethod
    def tuning_shapes(cls, shapes):
        """Distillation trains one sequence at a time, in row chunks of a few thousand rows
        (sparsegen.methods.distill): tune batch 1 at the decode buckets' lengths capped at
        16K (a whole 128K target would need 137 GB per batch of 16)."""
        from ..plan import ShapeBucket

        return tuple(ShapeBucket(1, n) for n in sorted({min(s.seq_len, 16384) for s in shapes}))

    @classmethod
    def bench_inputs(cls, static: DistillStatic, batch: int, seq_len: int, kv_heads: int = 8,
                     device="cuda", seed: int = 0) -> dict:
        import torch

        gen = torch.Generator(device=device).manual_seed(seed)
        dt = torch_dtype(static.dtype)
        shape_q = (batch, seq_len, kv_heads * static.group_size, static.head_dim)
        return {"q": torch.randn(shape_q, device=device, generator=gen).to(dt),
                "k": torch.randn(batch, seq_len, kv_heads, static.head_dim, device=device,
                                 generator=gen).to(dt)}

    def reference(self, q, k, sm_scale: float | None = None, row_start: int = 0,
                  num_rows: int | None = None):
        from ..methods.distill import distill_target_reference
        return distill_target_reference(q, k, self.static.block_size, sm_scale,
                                        row_start=row_start, num_rows=num_rows)


def flops(batch: int, seq_len: int, q_heads: int, head_dim: int) -> float:
    """Tensor-core FLOPs of the kernel: two causal QK^T passes."""
    return 2 * 2.0 * batch * q_heads * head_dim * seq_len * seq_len / 2
