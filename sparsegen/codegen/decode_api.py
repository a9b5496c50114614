"""The contract every sparse-decode attention backend implements.

One decode step of block-sparse GQA attention:

  q             [B, Hq, D]                    query of the current token (post-RoPE)
  k, v          contiguous: [B, S, Hkv, D]    (any strides; last dim contiguous)
                paged:      [num_pages, page_size, Hkv, D]
  block_table   paged only: [B, max_pages] int32, page of each page_size-token slice
  seq_lens      [B] int32, valid tokens of each sequence (mixed lengths allowed)
  block_indices [B, Hkv, max_sel] int32, selected blocks (units of block_size tokens) per
                KV head; only the first block_counts[b, h] entries are read, in any order
  block_counts  [B, Hkv] int32

  out           [B, Hq, D] in q's dtype. Query head h reads KV head h // group_size.
                Tokens at positions >= seq_lens[b] are masked, whatever the order of the
                indices. A head with no selected block gets zeros.

Kernels split the selected blocks of each (batch, KV head) across `num_splits` programs,
keep partial outputs and log-sum-exps in fp32 (an empty split has lse = -inf) and merge
them with a log-sum-exp reduction in fp32.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

DTYPES = ("bf16", "fp16", "fp32")  # fp32 is for CPU interpretation in tests only
LAYOUTS = ("contiguous", "paged")


@dataclass(frozen=True)
class DecodeStatic:
    """Compile-time parameters of a sparse decode kernel (from the spec)."""

    block_size: int
    head_dim: int
    group_size: int
    dtype: str = "bf16"
    layout: str = "contiguous"
    page_size: int = 0  # paged layout only; a multiple of block_size

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {DTYPES}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout {self.layout!r} is not one of {LAYOUTS}")
        if self.layout == "paged" and (self.page_size <= 0 or self.page_size % self.block_size):
            raise ValueError("paged layout needs page_size a positive multiple of block_size")

    def as_dict(self) -> dict:
        return asdict(self)


def default_num_splits(batch: int, kv_heads: int, max_selected: int, num_sms: int = 132,
                       min_blocks_per_split: int = 2, waves: int = 2) -> int:
    """Split count that gives the GPU about `waves` programs per SM.

    Depends only on shapes (never on tensor contents), so it costs no device sync and a
    CUDA graph captures it. Each split keeps at least `min_blocks_per_split` blocks so the
    merge stays cheap next to the attention itself.
    """
    rows = max(1, batch * kv_heads)
    want = math.ceil(waves * num_sms / rows)
    most = max(1, math.ceil(max_selected / max(1, min_blocks_per_split)))
    return max(1, min(want, most, 256))
