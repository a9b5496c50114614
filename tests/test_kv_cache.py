"""KVCache: appends land where the attention reference reads them, pages are reused."""
from __future__ import annotations

import pytest
import torch

from sparsegen.methods.kv_cache import CacheFullError, KVCache


@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_mixed_length_appends_read_back(layout):
    g = torch.Generator().manual_seed(0)
    cache = KVCache(3, 2, 8, capacity=100, dtype=torch.float32, layout=layout, page_size=16)
    truth = [[], [], []]
    for b, n in enumerate([37, 1, 64]):
        k, v = torch.randn(n, 2, 8, generator=g), torch.randn(n, 2, 8, generator=g)
        cache.extend(b, k, v)
        truth[b].append((k, v))
    for _ in range(20):
        k, v = torch.randn(3, 2, 8, generator=g), torch.randn(3, 2, 8, generator=g)
        cache.append(k, v)
        for b in range(3):
            truth[b].append((k[b:b + 1], v[b:b + 1]))
    for b in range(3):
        want_k = torch.cat([t[0] for t in truth[b]])
        got_k, got_v = cache.tokens(b)
        assert torch.equal(got_k, want_k)
        assert torch.equal(got_v, torch.cat([t[1] for t in truth[b]]))
    assert cache.seq_lens.tolist() == [57, 21, 84]


def test_released_page_is_reused_and_stays_evicted():
    cache = KVCache(1, 1, 4, capacity=64, dtype=torch.float32, layout="paged", page_size=16,
                    num_pages=3)
    cache.extend(0, torch.randn(48, 1, 4), torch.randn(48, 1, 4))
    assert cache.pages_in_use() == 3
    with pytest.raises(CacheFullError):
        cache.append(torch.randn(1, 1, 4), torch.randn(1, 1, 4))
    freed = cache.release_page(0, 1)
    cache.append(torch.randn(1, 1, 4), torch.randn(1, 1, 4))  # logical page 3 takes it
    assert cache.physical_page(0, 3) == freed and cache.physical_page(0, 1) == -1
    assert int(cache.block_table[0, 1]) == -1 and cache.pages_in_use() == 3


def test_contiguous_overflow_is_a_clear_error():
    cache = KVCache(1, 1, 4, capacity=8, dtype=torch.float32)
    with pytest.raises(CacheFullError, match="made for 8"):
        cache.extend(0, torch.randn(9, 1, 4), torch.randn(9, 1, 4))
