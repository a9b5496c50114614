"""The milestone rule's fast path on a CUDA GPU: a run of decode steps that open pages and
evict (a mixed-length batch, each sequence at its own steps) captured in one CUDA graph and
replayed equals the same steps run eagerly, bit for bit (K / V, lengths, block table, page
min / max, timestamps, slots, the attention's output); then, as a model decodes, the same
graph replayed on fresh inputs page after page with `replayed` after each replay, against an
eager twin. The fast path opens pages on the device (MilestoneOpenTriton), so no step needs
the host. Skipped without a GPU (CI has none); run on an H100 with
`python -m pytest -q tests/test_milestone_gpu.py`. In a process whose Triton was imported in
interpreter mode they run in a fresh process."""
from __future__ import annotations

import pytest
import torch

from sparsegen.codegen.backend import decode_backend
from sparsegen.codegen.decode_api import DecodeStatic
from sparsegen.codegen.milestone_kernels import MilestoneScoreTriton, MilestoneStatic
from sparsegen.codegen.triton_kernel import interpreted
from sparsegen.methods.kv_cache import KVCache
from sparsegen.methods.milestone import MilestoneDecoder, MilestoneRule
from tests.graphs import assert_equal_lists, assert_replays_from_snapshot

GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not GPU or interpreted(), reason="needs a CUDA GPU and Triton "
                               "compiled, not interpreted, in this process")

HKV, G, D, P = 2, 4, 64, 16
DT = torch.bfloat16


def _decoder(rule, prefill, k, v):
    """A paged cache holding the prefill and its fast-path milestone decoder."""
    B = len(prefill)
    pool = B * (-(-max(prefill) // P) + rule.budget_pages)
    cache = KVCache(B, HKV, D, k.shape[1], dtype=DT, device="cuda", layout="paged",
                    page_size=P, num_pages=pool)
    dec = MilestoneDecoder(rule, HKV * G, HKV, D,
                           scorer=MilestoneScoreTriton(MilestoneStatic(D, G, "bf16")))
    dec.prefill(cache, k[:, :max(prefill)], v[:, :max(prefill)], lengths=prefill)
    assert dec.fast
    return cache, dec


def _device_state(cache, dec):
    return [cache.k, cache.v, cache.seq_lens, cache.block_table, dec.kmin, dec.kmax,
            dec.slot_ts, dec.slot_logical, dec.slot_phys, dec._t_dev, dec._refresh_k,
            dec._blocks, dec._evicted, dec.last_scores]


def _host_record(cache, dec):
    return list(cache.lengths), dec.t, list(dec._live), dec.num_evictions


@needs_gpu
@pytest.mark.parametrize("refresh", [dict(refresh_fraction=0.5),
                                     dict(refresh_fraction=None, refresh_threshold=0.2)])
def test_steps_that_open_pages_and_evict_replay_from_a_cuda_graph(refresh):
    gen = torch.Generator(device="cuda").manual_seed(11)
    rule = MilestoneRule(page_size=P, block_size=P, budget_tokens=4 * P, **refresh)
    prefill, cap, steps = [37, 50, 0], 1024, P + 7
    k = torch.randn(3, cap, HKV, D, device="cuda", dtype=DT, generator=gen)
    v = torch.randn_like(k)
    pairs = [_decoder(rule, prefill, k, v) for _ in range(2)]   # (graph, eager) twins
    attend = decode_backend("triton")(DecodeStatic(P, D, G, "bf16", "paged", P))

    def inputs():
        return (torch.randn(3, HKV * G, D, device="cuda", dtype=DT, generator=gen),
                torch.randn(3, HKV, D, device="cuda", dtype=DT, generator=gen),
                torch.randn(3, HKV, D, device="cuda", dtype=DT, generator=gen))

    # eager steps until every sequence's budget is nearly full: the captured steps open
    # pages below the budget (sequence 2) and at it (evicting)
    (gcache, gdec), (ecache, edec) = pairs
    for _ in range(3 * P + 5):
        x = inputs()
        for cache, dec in pairs:
            dec.step(*x, cache, attend=attend)
    xs = [inputs() for _ in range(steps)]
    gcache.reserve(steps)
    torch.cuda.synchronize()
    snap = [t.clone() for t in _device_state(gcache, gdec)]
    record = _host_record(gcache, gdec)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [gdec.step(*x, gcache, attend=attend) for x in xs]
    want = [edec.step(*x, ecache, attend=attend) for x in xs]
    assert _host_record(gcache, gdec) == _host_record(ecache, edec) != record
    assert_replays_from_snapshot(graph, _device_state(gcache, gdec), snap,
                                 _device_state(ecache, edec), outs, want)
    assert gdec.last_evictions == edec.last_evictions
    # as a model decodes: the graph replayed on fresh inputs, `steps` tokens further each
    # time (every page opening and eviction on the device), the host's record advanced
    for cycle in range(4):
        fresh = [inputs() for _ in range(steps)]
        for x, y in zip(xs, fresh):
            for t, u in zip(x, y):
                t.copy_(u)
        gcache.reserve(steps)
        graph.replay()
        gdec.replayed(gcache, steps)
        want = [edec.step(*x, ecache, attend=attend) for x in fresh]
        torch.cuda.synchronize()
        assert _host_record(gcache, gdec) == _host_record(ecache, edec), cycle
        assert_equal_lists(_device_state(gcache, gdec), _device_state(ecache, edec),
                           (cycle, "state"))
        assert_equal_lists(outs, want, (cycle, "output"))
        assert gdec.last_evictions == edec.last_evictions, cycle
    assert gdec.num_evictions == edec.num_evictions > 3 * 4
    assert [gdec.decode_pages(b) for b in range(3)] == [edec.decode_pages(b) for b in range(3)]
    assert gcache.pages_in_use() == ecache.pages_in_use() == 3 + 4 + 0 + 3 * 4


@pytest.mark.skipif(not (GPU and interpreted()), reason="runs where the tests above cannot")
def test_gpu_tests_in_subprocess():
    from tests.interp import rerun_compiled  # here: importing it imports triton

    rerun_compiled(__file__)
