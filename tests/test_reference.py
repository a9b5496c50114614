"""The plain-torch block-sparse reference against an independent masked dense attention."""
from __future__ import annotations

import pytest
import torch

from sparsegen.methods.sparse_decode_ref import (BlockIndexError, dense_decode_reference,
                                                 sparse_decode_reference,
                                                 validate_block_indices)
from tests.decode_cases import make_case, paged_view


def masked_dense(q, k, v, block_indices, block_counts, seq_lens, block_size):
    """Independent formulation: full attention in fp64 with a boolean token mask."""
    B, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    allowed = torch.zeros(B, Hkv, S, dtype=torch.bool)
    for b in range(B):
        for h in range(Hkv):
            for j in block_indices[b, h, : block_counts[b, h]].tolist():
                allowed[b, h, j * block_size:(j + 1) * block_size] = True
    allowed &= torch.arange(S)[None, None, :] < seq_lens[:, None, None]
    allowed = allowed.repeat_interleave(G, dim=1)  # [B, Hq, S]
    logits = torch.einsum("bhd,bshd->bhs", q.double(),
                          k.double().repeat_interleave(G, dim=2)) * D ** -0.5
    logits = logits.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(logits, -1).nan_to_num(0.0)  # an empty row is all zeros
    return torch.einsum("bhs,bshd->bhd", p, v.double().repeat_interleave(G, dim=2))


@pytest.mark.parametrize("block_size,group,head_dim", [(16, 1, 64), (64, 4, 128), (128, 8, 64)])
def test_reference_matches_masked_dense(block_size, group, head_dim):
    case = make_case(batch=3, kv_heads=2, group=group, head_dim=head_dim,
                     block_size=block_size, seq_lens=[5 * block_size + 3, block_size // 2, 700],
                     fraction=0.5, seed=block_size, dtype=torch.float32)
    want = masked_dense(case.q, case.k, case.v, case.block_indices, case.block_counts,
                        case.seq_lens, block_size)
    got = sparse_decode_reference(case.q, case.k, case.v, case.block_indices, case.block_counts,
                                  case.seq_lens, block_size, compute_dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_all_blocks_selected_is_dense():
    case = make_case(batch=2, kv_heads=2, group=4, head_dim=64, block_size=32,
                     seq_lens=[100, 257], fraction=1.0, seed=3, dtype=torch.float32)
    dense = dense_decode_reference(case.q, case.k, case.v, case.seq_lens,
                                   compute_dtype=torch.float64)
    sparse = sparse_decode_reference(case.q, case.k, case.v, case.block_indices,
                                     case.block_counts, case.seq_lens, 32,
                                     compute_dtype=torch.float64)
    torch.testing.assert_close(sparse, dense, rtol=1e-10, atol=1e-10)


def test_paged_equals_contiguous():
    case = make_case(batch=2, kv_heads=2, group=2, head_dim=64, block_size=16,
                     seq_lens=[77, 130], fraction=0.6, seed=5, dtype=torch.float32)
    k_pages, v_pages, table = paged_view(case.k, case.v, page_size=32, seed=7)
    a = sparse_decode_reference(case.q, case.k, case.v, case.block_indices, case.block_counts,
                                case.seq_lens, 16)
    b = sparse_decode_reference(case.q, k_pages, v_pages, case.block_indices,
                                case.block_counts, case.seq_lens, 16, block_table=table)
    torch.testing.assert_close(a, b)


def test_empty_selection_gives_zeros():
    case = make_case(batch=1, kv_heads=2, group=2, head_dim=64, block_size=16,
                     seq_lens=[50], fraction=0.5, seed=1, dtype=torch.float32)
    case.block_counts[0, 1] = 0
    out = sparse_decode_reference(case.q, case.k, case.v, case.block_indices, case.block_counts,
                                  case.seq_lens, 16)
    assert torch.all(out[0, 2:] == 0) and torch.all(out[0, :2].abs().sum(-1) > 0)


def test_invalid_indices_are_rejected():
    seq_lens = torch.tensor([100], dtype=torch.int32)  # 4 blocks of 32
    counts = torch.tensor([[2]], dtype=torch.int32)
    with pytest.raises(BlockIndexError, match="out of range"):
        validate_block_indices(torch.tensor([[[0, 4, -1]]], dtype=torch.int32), counts,
                               seq_lens, 32)
    with pytest.raises(BlockIndexError, match="out of range"):
        validate_block_indices(torch.tensor([[[-1, 1, 0]]], dtype=torch.int32), counts,
                               seq_lens, 32)
    with pytest.raises(BlockIndexError, match="selected twice"):
        validate_block_indices(torch.tensor([[[2, 2, 0]]], dtype=torch.int32), counts,
                               seq_lens, 32)
    with pytest.raises(BlockIndexError, match="count"):
        validate_block_indices(torch.tensor([[[2, 1, 0]]], dtype=torch.int32),
                               torch.tensor([[4]], dtype=torch.int32), seq_lens, 32)
    with pytest.raises(BlockIndexError, match="int32"):
        validate_block_indices(torch.tensor([[[2, 1, 0]]]), counts, seq_lens, 32)
    # padding past the count is never read, whatever it holds
    validate_block_indices(torch.tensor([[[3, 0, 99]]], dtype=torch.int32), counts, seq_lens, 32)
    # lengths: one per sequence, within the tokens the cache holds (when it is given)
    ok = torch.tensor([[[2, 1, 0]]], dtype=torch.int32)
    with pytest.raises(BlockIndexError, match=r"seq_lens must be \[B\] = \[1\]"):
        validate_block_indices(ok, counts, torch.tensor([100, 100], dtype=torch.int32), 32)
    with pytest.raises(BlockIndexError, match=r"must lie in \[0, 64\]"):
        validate_block_indices(ok, counts, seq_lens, 32, max_tokens=64)
    validate_block_indices(ok, counts, seq_lens, 32, max_tokens=100)


def test_reference_refuses_lengths_past_the_cache():
    case = make_case(batch=1, kv_heads=2, group=2, head_dim=64, block_size=16,
                     seq_lens=[50], fraction=0.5, seed=1, dtype=torch.float32)
    too_long = torch.tensor([case.k.shape[1] + 1], dtype=torch.int32)
    with pytest.raises(BlockIndexError, match="the tokens the cache holds"):
        sparse_decode_reference(case.q, case.k, case.v, case.block_indices, case.block_counts,
                                too_long, 16)
