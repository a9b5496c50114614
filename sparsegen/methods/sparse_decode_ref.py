"""Plain-torch block-sparse GQA decode: the reference every kernel is checked against,
and the CPU path of the emitted module.

Shapes and semantics are those of sparsegen.codegen.decode_api. Math is in fp32 (or fp64
when asked), gathered block by block, so memory stays proportional to the selection.
"""
from __future__ import annotations

import torch


class BlockIndexError(ValueError):
    """Selected block indices that no kernel may be given."""


def cache_tokens(k: torch.Tensor, block_table: torch.Tensor | None = None) -> int:
    """The tokens a sequence of this cache can hold, from shapes only (no device sync):
    S of a contiguous [B, S, Hkv, D] cache, max_pages x page_size of a paged one."""
    return k.shape[1] * (block_table.shape[1] if block_table is not None else 1)


def validate_block_indices(block_indices: torch.Tensor, block_counts: torch.Tensor,
                           seq_lens: torch.Tensor, block_size: int,
                           max_tokens: int | None = None) -> None:
    """Reject out-of-range or duplicate indices among the first `count` entries, and
    sequence lengths outside [0, max_tokens] (the tokens the cache holds, when given).

    Costs a device sync: call it while debugging or testing, not in a captured graph.
    """
    if block_indices.dim() != 3 or block_counts.shape != block_indices.shape[:2]:
        raise BlockIndexError(
            f"block_indices must be [B, Hkv, max_sel] and block_counts [B, Hkv]; got "
            f"{tuple(block_indices.shape)} and {tuple(block_counts.shape)}")
    if seq_lens.shape != block_indices.shape[:1]:
        raise BlockIndexError(f"seq_lens must be [B] = [{block_indices.shape[0]}] like "
                              f"block_indices; got {tuple(seq_lens.shape)}")
    if max_tokens is not None and len(seq_lens) and (
            int(seq_lens.min()) < 0 or int(seq_lens.max()) > max_tokens):
        raise BlockIndexError(f"seq_lens holds {int(seq_lens.min())}..{int(seq_lens.max())}; "
                              f"each must lie in [0, {max_tokens}] (the tokens the cache "
                              "holds)")
    if block_indices.dtype != torch.int32 or block_counts.dtype != torch.int32:
        raise BlockIndexError("block_indices and block_counts must be int32 tensors "
                              f"(got {block_indices.dtype}, {block_counts.dtype})")
    max_sel = block_indices.shape[-1]
    counts = block_counts.long()
    if bool((counts < 0).any()) or bool((counts > max_sel).any()):
        bad = counts[(counts < 0) | (counts > max_sel)][0].item()
        raise BlockIndexError(f"block_counts holds {bad}; each count must be in [0, {max_sel}] "
                              "(the width of block_indices)")
    live = torch.arange(max_sel, device=block_indices.device) < counts[..., None]
    num_blocks = (seq_lens.long() + block_size - 1) // block_size  # [B]
    idx = block_indices.long()
    out_of_range = live & ((idx < 0) | (idx >= num_blocks[:, None, None]))
    if bool(out_of_range.any()):
        b, h, s = (int(x) for x in out_of_range.nonzero()[0])
        raise BlockIndexError(
            f"block_indices[{b}, {h}, {s}] = {int(idx[b, h, s])} is out of range: sequence {b} "
            f"has {int(num_blocks[b])} blocks of {block_size} tokens (seq_len "
            f"{int(seq_lens[b])}); valid indices are 0..{int(num_blocks[b]) - 1}")
    sentinel = torch.iinfo(torch.int64).max
    keyed = torch.where(live, idx, torch.full_like(idx, sentinel)).sort(dim=-1).values
    dup = (keyed[..., 1:] == keyed[..., :-1]) & (keyed[..., 1:] != sentinel)
    if bool(dup.any()):
        b, h, s = (int(x) for x in dup.nonzero()[0])
        raise BlockIndexError(
            f"block {int(keyed[b, h, s])} is selected twice for batch {b}, KV head {h}; "
            "each selected block must appear once (deduplicate before attention)")


def gather_token_positions(block_ids: torch.Tensor, block_size: int) -> torch.Tensor:
    """Token positions of the given blocks, [n_blocks * block_size]."""
    offs = torch.arange(block_size, device=block_ids.device)
    return (block_ids.long()[:, None] * block_size + offs[None, :]).reshape(-1)


def sparse_decode_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            block_indices: torch.Tensor, block_counts: torch.Tensor,
                            seq_lens: torch.Tensor, block_size: int,
                            block_table: torch.Tensor | None = None,
                            sm_scale: float | None = None,
                            compute_dtype: torch.dtype = torch.float32,
                            validate: bool = True,
                            block_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Block-sparse decode attention; see decode_api for the contract.

    With block_table given, k/v are pages [num_pages, page_size, Hkv, D]. block_bias
    [B, Hkv, max_sel] (natural-log units, e.g. entmax's log p prior) is added to the logits
    of every token of the corresponding selected block.
    """
    B, Hq, D = q.shape
    Hkv = k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    group = Hq // Hkv
    if validate:
        validate_block_indices(block_indices, block_counts, seq_lens, block_size,
                               cache_tokens(k, block_table))
    scale = D ** -0.5 if sm_scale is None else sm_scale
    out = torch.zeros(B, Hq, D, dtype=compute_dtype, device=q.device)
    for b in range(B):
        n = int(seq_lens[b])
        for h in range(Hkv):
            count = int(block_counts[b, h])
            if count == 0:
                continue
            pos = gather_token_positions(block_indices[b, h, :count], block_size)
            keep = pos < n
            pos = pos[keep]
            if pos.numel() == 0:
                continue
            if block_table is None:
                keys, vals = k[b, pos, h], v[b, pos, h]
            else:
                page_size = k.shape[1]
                pages = block_table[b].long()[pos // page_size]
                keys, vals = k[pages, pos % page_size, h], v[pages, pos % page_size, h]
            qg = q[b, h * group:(h + 1) * group].to(compute_dtype)  # [G, D]
            logits = qg @ keys.to(compute_dtype).T * scale  # [G, n_tok]
            if block_bias is not None:
                tok_bias = block_bias[b, h, :count].to(compute_dtype).repeat_interleave(block_size)
                logits = logits + tok_bias[keep]
            out[b, h * group:(h + 1) * group] = torch.softmax(logits, -1) @ vals.to(compute_dtype)
    return out


def dense_decode_reference(q, k, v, seq_lens, sm_scale=None, compute_dtype=torch.float32):
    """Dense GQA decode over contiguous k/v [B, S, Hkv, D]; used to check the sparse path
    with every block selected."""
    B, Hq, D = q.shape
    Hkv = k.shape[2]
    group = Hq // Hkv
    scale = D ** -0.5 if sm_scale is None else sm_scale
    out = torch.empty(B, Hq, D, dtype=compute_dtype, device=q.device)
    for b in range(B):
        n = int(seq_lens[b])
        kk = k[b, :n].to(compute_dtype).repeat_interleave(group, dim=1)  # [n, Hq, D]
        vv = v[b, :n].to(compute_dtype).repeat_interleave(group, dim=1)
        logits = torch.einsum("hd,nhd->hn", q[b].to(compute_dtype), kk) * scale
        out[b] = torch.einsum("hn,nhd->hd", torch.softmax(logits, -1), vv)
    return out
