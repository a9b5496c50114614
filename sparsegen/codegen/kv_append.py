"""Triton adapter of the fused KV-cache append (templates/triton/kv_append.py.j2): one launch
per decode step writes every sequence's new K and V at its length and bumps the length on the
device, where the torch path costs an index computation, two scatters and an add (~12 us of
small kernels per step on the H100). Memory-bound and tiny, so it has no tuned space."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .triton_kernel import TRITON_PTR, TritonKernel, check_int_config, next_pow2


@dataclass(frozen=True)
class AppendStatic:
    head_dim: int
    kv_heads: int
    dtype: str = "bf16"          # the cache's dtype
    new_dtype: str = "bf16"      # the appended k/v's dtype (cast on store)
    layout: str = "contiguous"
    page_size: int = 0

    def __post_init__(self):
        if self.layout not in ("contiguous", "paged"):
            raise ValueError(f"layout {self.layout!r} is not contiguous or paged")
        if self.layout == "paged" and self.page_size <= 0:
            raise ValueError("paged layout needs page_size > 0")
        for name in (self.dtype, self.new_dtype):
            if name not in TRITON_PTR:
                raise ValueError(f"dtype {name!r} is not one of {tuple(TRITON_PTR)}")
        if not 1 <= self.head_dim <= 512 or not 1 <= self.kv_heads <= 256:
            raise ValueError(f"head_dim={self.head_dim} / kv_heads={self.kv_heads} out of range")

    def as_dict(self) -> dict:
        return asdict(self)


class TritonKVAppend(TritonKernel):
    name = "kv_append"
    template = "triton/kv_append.py.j2"

    @classmethod
    def tunable_space(cls, static: AppendStatic) -> dict[str, list]:
        return {"num_warps": [1, 2, 4]}

    @classmethod
    def default_config(cls, static: AppendStatic) -> dict:
        return {"num_warps": 2}

    @classmethod
    def check_config(cls, static: AppendStatic, config: dict) -> str | None:
        return check_int_config(config, ("num_warps",))

    def template_params(self) -> dict:
        s = self.static
        return {"head_dim": s.head_dim, "head_pad": next_pow2(s.head_dim),
                "kv_heads": s.kv_heads,
                "heads_pad": next_pow2(s.kv_heads), "paged": s.layout == "paged",
                "page_size": s.page_size, "num_warps": self.config["num_warps"]}

    def signatures(self):
        new, dt = TRITON_PTR[self.static.new_dtype], TRITON_PTR[self.static.dtype]
        sig = {"K_NEW": new, "V_NEW": new, "K": dt, "V": dt, "SEQ": "*i32", "BT": "*i32"}
        for a in ("stride_nb", "stride_nh", "stride_cb", "stride_cs", "stride_ch",
                  "stride_btb"):
            sig[a] = "i32"
        return [("kv_append", sig, ("K_NEW", "V_NEW", "K", "V", "SEQ"),
                 {"num_warps": self.config["num_warps"], "num_stages": 1})]

    def __call__(self, k_new, v_new, k, v, seq_lens, block_table=None):
        """Write k_new, v_new [B, Hkv, D] at slot seq_lens[b] of k, v and add 1 to seq_lens."""
        if k_new.shape != v_new.shape or k_new.stride() != v_new.stride() or \
                k.stride() != v.stride():
            raise ValueError("k and v (new and cached) must have matching shapes and strides")
        if k_new.stride(-1) != 1 or k.stride(-1) != 1:
            raise ValueError("the head dimension must be contiguous")
        bt = block_table if block_table is not None else seq_lens[:, None]
        self.module.kv_append[(k_new.shape[0],)](
            k_new, v_new, k, v, seq_lens, bt, k_new.stride(0), k_new.stride(1),
            k.stride(0), k.stride(1), k.stride(2), bt.stride(0),
            num_warps=self.config["num_warps"], num_stages=1)
