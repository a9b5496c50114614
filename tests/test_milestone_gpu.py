"""The milestone rule's fast path on a CUDA GPU: the decode steps between page openings
captured in one CUDA graph and replayed from a snapshot equal the same steps run eagerly,
bit for bit (K / V, lengths, page min / max, timestamps, slots, the attention's output).
Those steps upload nothing from the host (their append finds each token's page on the
device, and the step number advances there), which is what makes them capturable; a page
opening's step picks its eviction on the host and is run eagerly (refused inside a capture:
tests/test_milestone.py). Skipped without a GPU
(CI has none); run on an H100 with `python -m pytest -q tests/test_milestone_gpu.py`. In a
process whose Triton was imported in interpreter mode they run in a fresh process."""
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
            dec.slot_ts, dec.slot_logical, dec.slot_phys, dec._step_buf, dec._refresh_k,
            dec._blocks, dec.last_scores]


@needs_gpu
@pytest.mark.parametrize("refresh", [dict(refresh_fraction=0.5),
                                     dict(refresh_fraction=None, refresh_threshold=0.2)])
def test_steps_between_page_openings_replay_from_a_cuda_graph(refresh):
    gen = torch.Generator(device="cuda").manual_seed(11)
    rule = MilestoneRule(page_size=P, block_size=P, budget_tokens=4 * P, **refresh)
    prefill, cap = [37, 50], 512
    k = torch.randn(2, cap, HKV, D, device="cuda", dtype=DT, generator=gen)
    v = torch.randn_like(k)
    pairs = [_decoder(rule, prefill, k, v) for _ in range(2)]   # (graph, eager) twins
    attend = decode_backend("triton")(DecodeStatic(P, D, G, "bf16", "paged", P))

    def inputs():
        return (torch.randn(2, HKV * G, D, device="cuda", dtype=DT, generator=gen),
                torch.randn(2, HKV, D, device="cuda", dtype=DT, generator=gen),
                torch.randn(2, HKV, D, device="cuda", dtype=DT, generator=gen))

    # eager steps past several evictions, until the next 6 steps open no page
    (gcache, gdec), (ecache, edec) = pairs
    while edec.num_evictions < 4 or not gdec.capturable(gcache, 6):
        x = inputs()
        for cache, dec in pairs:
            dec.step(*x, cache, attend=attend)
    steps = [inputs() for _ in range(6)]
    torch.cuda.synchronize()
    snap = [t.clone() for t in _device_state(gcache, gdec)]
    lengths, t0 = list(gcache.lengths), gdec.t
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [gdec.step(*x, gcache, attend=attend) for x in steps]
    assert gcache.lengths == [n + 6 for n in lengths] and gdec.t == t0 + 6
    want = [edec.step(*x, ecache, attend=attend) for x in steps]
    assert_replays_from_snapshot(graph, _device_state(gcache, gdec), snap,
                                 _device_state(ecache, edec), outs, want)
    # as a model decodes: the page-opening steps eagerly, the graph replayed wherever its 6
    # steps come round again, the host's record advanced after each later replay
    for cycle in range(3):
        for _ in range(P - 6):
            x = inputs()
            for cache, dec in pairs:
                dec.step(*x, cache, attend=attend)
        assert gdec.capturable(gcache, 6)
        graph.replay()
        gdec.replayed(gcache, 6)
        want = [edec.step(*x, ecache, attend=attend) for x in steps]
        torch.cuda.synchronize()
        assert gcache.lengths == ecache.lengths and gdec.t == edec.t
        assert_equal_lists(_device_state(gcache, gdec), _device_state(ecache, edec),
                           (cycle, "state"))
        assert torch.equal(outs[-1], want[-1]), cycle
    assert gdec.num_evictions == edec.num_evictions > 4


@pytest.mark.skipif(not (GPU and interpreted()), reason="runs where the tests above cannot")
def test_gpu_tests_in_subprocess():
    from tests.interp import rerun_compiled  # here: importing it imports triton

    rerun_compiled(__file__)
