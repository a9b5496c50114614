"""Random sparse-decode inputs shared by the reference and kernel tests."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class DecodeCase:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    block_indices: torch.Tensor
    block_counts: torch.Tensor
    seq_lens: torch.Tensor
    block_size: int


def make_case(batch, kv_heads, group, head_dim, block_size, seq_lens, fraction, seed,
              dtype=torch.float16, device="cpu", max_sel=None, shuffle=True) -> DecodeCase:
    """Random q/k/v and a random unique selection of about `fraction` of each sequence's
    blocks per KV head, in random order, padded with -1 to a common width."""
    g = torch.Generator().manual_seed(seed)
    S = max(seq_lens)
    q = torch.randn(batch, kv_heads * group, head_dim, generator=g)
    k = torch.randn(batch, S, kv_heads, head_dim, generator=g)
    v = torch.randn(batch, S, kv_heads, head_dim, generator=g)
    nblocks = [math.ceil(n / block_size) for n in seq_lens]
    counts = [[max(1, round(fraction * nb)) if fraction > 0 else 0 for _ in range(kv_heads)]
              for nb in nblocks]
    width = max_sel or max(max(c) for c in counts) or 1
    idx = torch.full((batch, kv_heads, width), -1, dtype=torch.int32)
    for b in range(batch):
        for h in range(kv_heads):
            order = torch.randperm(nblocks[b], generator=g) if shuffle else torch.arange(nblocks[b])
            chosen = order[: counts[b][h]]
            idx[b, h, : len(chosen)] = chosen.to(torch.int32)
    return DecodeCase(q.to(dtype).to(device), k.to(dtype).to(device), v.to(dtype).to(device),
                      idx.to(device), torch.tensor(counts, dtype=torch.int32, device=device),
                      torch.tensor(seq_lens, dtype=torch.int32, device=device), block_size)


def paged_view(k, v, page_size, seed=0, extra_pages=3):
    """Scatter contiguous [B, S, Hkv, D] caches into shuffled pages; returns pages and the
    block table [B, max_pages] int32."""
    B, S, H, D = k.shape
    per_seq = math.ceil(S / page_size)
    total = B * per_seq + extra_pages
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(total, generator=g)[: B * per_seq].view(B, per_seq)
    k_pages = torch.randn(total, page_size, H, D, generator=g).to(k.dtype).to(k.device)
    v_pages = torch.randn(total, page_size, H, D, generator=g).to(v.dtype).to(v.device)
    pad = per_seq * page_size - S
    kp = torch.nn.functional.pad(k, (0, 0, 0, 0, 0, pad)).view(B, per_seq, page_size, H, D)
    vp = torch.nn.functional.pad(v, (0, 0, 0, 0, 0, pad)).view(B, per_seq, page_size, H, D)
    k_pages[perm.reshape(-1).to(k.device)] = kp.reshape(-1, page_size, H, D)
    v_pages[perm.reshape(-1).to(k.device)] = vp.reshape(-1, page_size, H, D)
    return k_pages, v_pages, perm.to(torch.int32).to(k.device)
