"""The `topk` rule (Quest, arXiv 2406.10774; NSA / InfLLMv2 style when shared): per-block key
metadata kept beside the KV cache, block scores from it, and the plain-torch reference.

Metadata lives in the layout of the KV cache, so a paged cache's metadata follows its pages
(and a page that is released and reused is simply overwritten):
  contiguous: [B, max_blocks, Hkv, D]          paged: [num_pages, page_size // bs, Hkv, D]
- upper_bound: element-wise min and max of the block's post-RoPE keys (in the KV dtype: a min
  or max of stored values is exact). Score of block j for query head h:
  sum_d max(q_d * min_jd, q_d * max_jd), an upper bound on q . k over the block's tokens.
- mean_pooled: the mean of the block's keys (rounded once to the KV dtype); the current,
  partial block keeps an fp32 running sum per sequence. Score = q . mean_j.
Group option: `per_head` scores and selects per query head (Quest) and the KV head attends
the union of its group's selections (the decode kernels take one selection per KV head);
`shared` sums the group's scores and selects once per KV head (NSA / InfLLMv2).
"""
from __future__ import annotations

import torch

from .kv_cache import KVCache


class QuestMeta:
    """Block metadata of one layer, updated on every append and filled by prefill."""

    def __init__(self, cache: KVCache, block_size: int, score: str = "upper_bound"):
        if score not in ("upper_bound", "mean_pooled"):
            raise ValueError(f"score {score!r} is not upper_bound or mean_pooled")
        if cache.layout == "paged" and cache.page_size % block_size:
            raise ValueError(f"page_size {cache.page_size} is not a multiple of block_size "
                             f"{block_size}")
        self.block_size, self.score, self.layout = block_size, score, cache.layout
        self.page_size = cache.page_size
        H, D, dev, dt = cache.kv_heads, cache.head_dim, cache.device, cache.k.dtype
        if cache.layout == "contiguous":
            shape = (cache.batch, -(-cache.capacity // block_size), H, D)
        else:
            shape = (cache.k.shape[0], cache.page_size // block_size, H, D)
        if score == "upper_bound":
            self.kmin = torch.zeros(shape, dtype=dt, device=dev)
            self.kmax = torch.zeros(shape, dtype=dt, device=dev)
        else:
            self.kmean = torch.zeros(shape, dtype=dt, device=dev)
            self.run_sum = torch.zeros(cache.batch, H, D, dtype=torch.float32, device=dev)

    def tensors(self) -> tuple:
        return (self.kmin, self.kmax) if self.score == "upper_bound" else (self.kmean,)

    def rows(self, cache: KVCache, b, blocks: torch.Tensor):
        """Index tuple addressing the metadata rows of blocks `blocks` of sequence(s) b."""
        if self.layout == "contiguous":
            return (b, blocks)
        tok = blocks * self.block_size
        page = cache.block_table[b, tok // self.page_size].long()
        return (page, (tok % self.page_size) // self.block_size)

    @torch.no_grad()
    def fill(self, cache: KVCache, b: int, start: int, stop: int) -> None:
        """Recompute the blocks that tokens [start, stop) of sequence b touch, from the cache
        (prefill, or a prefill chunk)."""
        bs = self.block_size
        j0, j1 = start // bs, -(-stop // bs)
        k, _ = cache.tokens(b, j0 * bs, stop)
        n, H, D = k.shape
        pad = (j1 - j0) * bs - n
        blocks = torch.arange(j0, j1, device=k.device)
        idx = self.rows(cache, b, blocks)
        if self.score == "upper_bound":
            kmax = torch.nn.functional.pad(k, (0, 0, 0, 0, 0, pad), value=float("-inf"))
            kmin = torch.nn.functional.pad(k, (0, 0, 0, 0, 0, pad), value=float("inf"))
            self.kmax[idx] = kmax.view(-1, bs, H, D).amax(1)
            self.kmin[idx] = kmin.view(-1, bs, H, D).amin(1)
        else:
            kf = torch.nn.functional.pad(k.float(), (0, 0, 0, 0, 0, pad)).view(-1, bs, H, D)
            sums = kf.sum(1)
            count = torch.full((j1 - j0,), float(bs), device=k.device)
            count[-1] = n - (j1 - j0 - 1) * bs
            self.kmean[idx] = (sums / count[:, None, None]).to(self.kmean.dtype)
            if stop % bs:
                self.run_sum[b] = sums[-1]

    @torch.no_grad()
    def append(self, cache: KVCache, k_new: torch.Tensor) -> None:
        """Decode reference of the metadata fold in templates/triton/kv_append.py.j2: fold
        the key each sequence just appended (k_new [B, Hkv, D]) into its block's metadata;
        no host sync."""
        bs = self.block_size
        pos = cache.seq_lens.long() - 1
        rows = torch.arange(cache.batch, device=k_new.device)
        idx = self.rows(cache, rows, pos // bs)
        first = (pos % bs == 0)[:, None, None]
        k = k_new.to(cache.k.dtype)
        if self.score == "upper_bound":
            self.kmax[idx] = torch.where(first, k, torch.maximum(self.kmax[idx], k))
            self.kmin[idx] = torch.where(first, k, torch.minimum(self.kmin[idx], k))
        else:
            self.run_sum.copy_(torch.where(first, k.float(), self.run_sum + k.float()))
            count = (pos % bs + 1).float()[:, None, None]
            self.kmean[idx] = (self.run_sum / count).to(self.kmean.dtype)


# --- plain-torch method reference of scoring ------------------------------------------------
def _gather_meta(meta: QuestMeta, cache: KVCache, t: torch.Tensor, width: int) -> torch.Tensor:
    """Metadata tensor t as [B, width, Hkv, D] in logical block order (fp32)."""
    B = cache.batch
    j = torch.arange(width, device=t.device)
    if meta.layout == "contiguous":
        return t[:, :width].float()
    tok = j * meta.block_size
    page = cache.block_table[:, tok // meta.page_size].long().clamp(min=0)   # [B, width]
    slot = ((tok % meta.page_size) // meta.block_size).expand(B, width)
    return t[page, slot].float()


def quest_scores_reference(q: torch.Tensor, meta: QuestMeta, cache: KVCache, group_mode: str,
                           width: int) -> torch.Tensor:
    """q [B, Hq, D] (post-RoPE) -> scores [B, Hq, width] (per_head) or [B, Hkv, width]
    (shared), fp32. Entries past a sequence's blocks are meaningless (never ranked)."""
    B, Hq, D = q.shape
    H = cache.kv_heads
    G = Hq // H
    qf = q.float().view(B, H, G, 1, D)
    if meta.score == "upper_bound":
        mn = _gather_meta(meta, cache, meta.kmin, width).permute(0, 2, 1, 3)[:, :, None]
        mx = _gather_meta(meta, cache, meta.kmax, width).permute(0, 2, 1, 3)[:, :, None]
        s = torch.maximum(qf * mn, qf * mx).sum(-1)                          # [B, H, G, W]
    else:
        mean = _gather_meta(meta, cache, meta.kmean, width).permute(0, 2, 1, 3)[:, :, None]
        s = (qf * mean).sum(-1)
    return s.reshape(B, Hq, width) if group_mode == "per_head" else s.sum(2)
