"""Block selection shared by every rule: always-on blocks, top-k, threshold, padding.

The plain-torch reference the selection kernel (templates/triton/block_select.py.j2) must
match exactly. Conventions, shared with the kernel:

- `scores` [B, H, NB] fp32, one row per score head; only blocks j < num_blocks[b] exist
  (num_blocks = ceil(seq_len / block_size)); entries past that are never read.
- Always-on blocks: the first `sink` blocks and the last `local` blocks of each sequence (the
  last one holds the current token). They are always selected and count toward k.
- Ranking (the documented tie-break): always-on blocks first, then higher score, then lower
  block index. NaN ranks as -inf and -0.0 as +0.0, so the order is a strict total order and
  a kernel comparing integer keys reproduces it bit for bit.
- Top-k selects max(k, number of always-on blocks) blocks, or every block when fewer exist.
- Threshold selects the always-on blocks plus every block whose probability is > threshold.
- `rows` > 1 unions the selections of `rows` consecutive score heads into one output head
  (Quest scored per query head, attended per KV head).
- Output: indices [B, H // rows, width] int32 in ascending block order, padded with -1, and
  counts [B, H // rows] int32 — the block_indices / block_counts of the decode kernels.
"""
from __future__ import annotations

import torch


def num_blocks(seq_lens: torch.Tensor, block_size: int) -> torch.Tensor:
    """Blocks holding at least one token: ceil(seq_len / block_size), [B] int64."""
    return (seq_lens.long() + block_size - 1) // block_size


def canonical_scores(scores: torch.Tensor) -> torch.Tensor:
    """fp32 copy with NaN -> -inf and -0.0 -> +0.0 (a strict order for ranking)."""
    s = scores.float().nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    return torch.where(s == 0, torch.zeros_like(s), s)


def always_on(nblocks: torch.Tensor, width: int, sink: int, local: int) -> torch.Tensor:
    """[B, width] bool: the sink blocks and the last `local` existing blocks."""
    j = torch.arange(width, device=nblocks.device)[None, :]
    nb = nblocks.long()[:, None]
    return (j < nb) & ((j < sink) | (j >= nb - local))


def forced_count(nblocks: torch.Tensor, sink: int, local: int) -> torch.Tensor:
    """Always-on blocks of each sequence, [B] int64 (sink and local may overlap)."""
    nb = nblocks.long()
    n_sink = nb.clamp(max=sink)
    n_local = nb.clamp(max=local)
    overlap = (n_sink + n_local - nb).clamp(min=0)
    return n_sink + n_local - overlap


def topk_width(k: int, sink: int, local: int, max_blocks: int, rows: int = 1) -> int:
    """Width of the index tensor top-k selection produces (shape-only, no device sync)."""
    return max(1, min(max_blocks, rows * max(k, sink + local)))


def ascending_lists(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., n] bool -> (indices [..., n] int32 of the set entries in ascending order, -1
    padded; counts [...] int32) by a compaction (cumsum + scatter, no sort, no host sync):
    the set entry j goes to its rank among the set entries, an unset one to counts + its
    rank among the unset ones, so the scatter is a permutation of each row."""
    mask = mask.contiguous()
    n = mask.shape[-1]
    rank = mask.cumsum(-1, dtype=torch.int32)           # set entries up to and including j
    counts = rank[..., -1].contiguous() if n else torch.zeros(mask.shape[:-1], dtype=torch.int32,
                                                  device=mask.device)
    j = torch.arange(n, dtype=torch.int32, device=mask.device)
    slot = torch.where(mask, rank - 1, counts[..., None] + (j - rank))
    idx = torch.empty_like(rank)
    idx.scatter_(-1, slot.long(), torch.where(mask, j, torch.full_like(j, -1)))
    return idx, counts


def mask_to_indices(mask: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, H, NB] bool -> ascending indices [B, H, width] int32 (-1 padded), counts [B, H]."""
    idx, counts = ascending_lists(mask)
    # the width check is the one host sync: a selection cut short would drop blocks silently
    if counts.numel() and int(counts.max()) > width:
        raise ValueError(f"a selection of {int(counts.max())} blocks does not fit width {width}")
    NB = mask.shape[-1]
    if NB < width:
        return torch.nn.functional.pad(idx, (0, width - NB), value=-1), counts
    return idx[..., :width].contiguous(), counts


def _union(mask: torch.Tensor, rows: int) -> torch.Tensor:
    B, H, NB = mask.shape
    if H % rows:
        raise ValueError(f"{H} score heads do not split into groups of {rows}")
    return mask.view(B, H // rows, rows, NB).any(2)


def topk_mask(scores: torch.Tensor, nblocks: torch.Tensor, k: int, sink: int,
              local: int) -> torch.Tensor:
    """[B, H, NB] bool: the top-k blocks of each row under the documented ranking."""
    B, H, NB = scores.shape
    s = canonical_scores(scores)
    j = torch.arange(NB, device=scores.device)
    valid = (j[None, :] < nblocks.long()[:, None])[:, None, :].expand(B, H, NB)
    forced = always_on(nblocks, NB, sink, local)[:, None, :].expand(B, H, NB)
    # stable sorts: by score (descending, equal scores keep lower index first), then by tier
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    tier = (forced.long() * 2 + valid.long()).gather(-1, order)
    order = order.gather(-1, torch.sort(tier, dim=-1, descending=True, stable=True).indices)
    k_eff = torch.minimum(forced_count(nblocks, sink, local).clamp(min=k), nblocks.long())
    take = torch.arange(NB, device=scores.device)[None, None, :] < k_eff[:, None, None]
    mask = torch.zeros(B, H, NB, dtype=torch.bool, device=scores.device)
    return mask.scatter(-1, order, take.expand(B, H, NB))


def select_topk(scores: torch.Tensor, nblocks: torch.Tensor, k: int, sink: int, local: int,
                rows: int = 1, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k blocks per row (union over `rows` rows); see the module doc for the ranking."""
    mask = _union(topk_mask(scores, nblocks, k, sink, local), rows)
    width = topk_width(k, sink, local, scores.shape[-1], rows) if width is None else width
    return mask_to_indices(mask, width)


def threshold_mask(probs: torch.Tensor, nblocks: torch.Tensor, threshold: float, sink: int,
                   local: int) -> torch.Tensor:
    """[B, H, NB] bool: always-on blocks plus blocks with probability > threshold."""
    B, H, NB = probs.shape
    j = torch.arange(NB, device=probs.device)
    valid = (j[None, :] < nblocks.long()[:, None])[:, None, :]
    forced = always_on(nblocks, NB, sink, local)[:, None, :]
    return valid & (forced | (canonical_scores(probs) > threshold))


def select_threshold(probs: torch.Tensor, nblocks: torch.Tensor, threshold: float, sink: int,
                     local: int, rows: int = 1, width: int | None = None):
    mask = _union(threshold_mask(probs, nblocks, threshold, sink, local), rows)
    return mask_to_indices(mask, probs.shape[-1] if width is None else width)


def select_all(nblocks: torch.Tensor, heads: int, width: int):
    """Every existing block (dense layers), in the same padded format; no device sync."""
    j = torch.arange(width, device=nblocks.device)[None, None, :]
    nb = nblocks.long().clamp(max=width)[:, None, None]
    idx = torch.where(j < nb, j, torch.full_like(j, -1)).expand(nb.shape[0], heads, width)
    counts = nb[:, :, 0].expand(-1, heads).to(torch.int32).contiguous()
    return idx.to(torch.int32).contiguous(), counts
