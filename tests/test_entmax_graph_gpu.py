"""The entmax rule's decode on a GPU: the one-launch append's block summaries against the torch
path (tests/summary_cases.py, as the interpreter test runs it); and its decode step in a CUDA
graph: 40 steps captured once, in which
every sequence of a mixed-length batch fills blocks at its own steps, replayed from a
snapshot and then again and again as a model decodes on, equal the same steps run eagerly,
bit for bit (K / V, lengths, block summaries, selections, outputs).

What makes this hold: the append writes a filling block's summary where seq_lens says, on
the device (templates/triton/summary_append.py.j2), and under capture the tau solve's grid
spans the summaries' capacity instead of the host's lengths. Skipped without a GPU (CI has
none); run on an H100 with `python -m pytest -q tests/test_entmax_graph_gpu.py`. In a process
whose Triton was imported in interpreter mode they run in a fresh process."""
from __future__ import annotations

import pytest
import torch

from sparsegen.codegen.entmax_kernels import EntmaxDecodeTriton, EntmaxStatic
from sparsegen.codegen.entmax_tau import EntmaxTau
from sparsegen.codegen.triton_kernel import interpreted
from sparsegen.methods.entmax import EntmaxDecoder, EntmaxPool, EntmaxRule
from sparsegen.methods.kv_cache import KVCache
from tests.graphs import assert_equal_lists, assert_replays_from_snapshot
from tests.summary_cases import CASES, case_id, check_summary_append

GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not GPU or interpreted(), reason="needs a CUDA GPU and Triton "
                               "compiled, not interpreted, in this process")

HKV, G, D, BS, STEPS = 2, 4, 64, 16, 40
DT = torch.bfloat16


def _state(cache, dec):
    return [t for t in (cache.k, cache.v, cache.seq_lens, cache.block_table, dec.summaries)
            if t is not None]  # no block table when contiguous


@needs_gpu
@pytest.mark.parametrize("layout", ["contiguous", "paged"])
@pytest.mark.parametrize("tau", ["triton", "tilelang"])
def test_decode_steps_replay_from_a_cuda_graph(layout, tau):
    gen = torch.Generator(device="cuda").manual_seed(5)
    rule = EntmaxRule(block_size=BS, sink_blocks=1, local_blocks=1, scale=4.0)
    st = EntmaxStatic(BS, D, G, "bf16", layout, 32 if layout == "paged" else 0)
    config = None if tau == "triton" else EntmaxTau.seed_configs(st)[0]
    prefill, cap = [37, 50, 16], 512
    w = 0.3 * torch.randn(HKV, D, device="cuda", generator=gen)
    k = torch.randn(3, max(prefill), HKV, D, device="cuda", dtype=DT, generator=gen)
    twins = []   # (graph, eager), each with its own kernels (their scratch buffers)
    for _ in range(2):
        cache = KVCache(3, HKV, D, cap, dtype=DT, device="cuda", layout=layout,
                        page_size=st.page_size)
        dec = EntmaxDecoder(rule, HKV * G, HKV, D, pool=EntmaxPool(HKV, D, w),
                            selector=EntmaxTau(st, config, scale=rule.scale))
        dec.prefill(cache, k, k, lengths=prefill)
        twins.append((cache, dec, EntmaxDecodeTriton(st)))
    (gcache, gdec, gattend), (ecache, edec, eattend) = twins

    def inputs():
        return (torch.randn(3, HKV * G, D, device="cuda", dtype=DT, generator=gen),
                torch.randn(3, HKV, D, device="cuda", dtype=DT, generator=gen),
                torch.randn(3, HKV, D, device="cuda", dtype=DT, generator=gen))

    for _ in range(3):  # eager steps first: every kernel built before the capture
        x = inputs()
        for cache, dec, attend in twins:
            dec.step(*x, cache, attend=attend)
    assert torch.equal(gdec.summaries, edec.summaries)
    steps = [inputs() for _ in range(STEPS)]
    for cache, _, _ in twins:   # the same page mapping in both twins
        cache.reserve(STEPS)
    torch.cuda.synchronize()
    snap = [t.clone() for t in _state(gcache, gdec)]
    lengths = list(gcache.lengths)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [gdec.step(*x, gcache, attend=gattend) for x in steps]
    assert gcache.lengths == [n + STEPS for n in lengths]
    assert all((n + STEPS) // BS > n // BS for n in lengths), "every sequence fills a block"
    want = [edec.step(*x, ecache, attend=eattend) for x in steps]
    assert_replays_from_snapshot(graph, _state(gcache, gdec), snap,
                                 _state(ecache, edec), outs, want)
    # as a model decodes: the graph replayed on fresh inputs, 40 steps further each time
    # (the blocks it fills are others on each replay), the host's counts advanced after it
    for cycle in range(3):
        fresh = [inputs() for _ in range(STEPS)]
        for dst, src in zip(steps, fresh):
            for a, b in zip(dst, src):
                a.copy_(b)
        for cache, _, _ in twins:
            cache.reserve(STEPS)
        graph.replay()
        gcache.replayed(STEPS)
        want = [edec.step(*x, ecache, attend=eattend) for x in fresh]
        torch.cuda.synchronize()
        assert gcache.lengths == ecache.lengths
        assert_equal_lists(_state(gcache, gdec), _state(ecache, edec), (cycle, "state"))
        assert_equal_lists(outs, want, (cycle, "output"))
        sel_g, sel_e = gdec.last_selection, edec.last_selection
        assert torch.equal(sel_g.counts, sel_e.counts) and torch.equal(sel_g.indices,
                                                                        sel_e.indices)
    for b, n in enumerate(gcache.lengths):   # every full block has its summary
        assert gdec.summaries[b, :, : n // BS].abs().sum(-1).gt(0).all(), b


@needs_gpu
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_summary_append_matches_torch_on_gpu(case):
    """The one-launch append's summaries on the GPU (its read-back of the block after this
    program's own store, behind a CTA barrier) against the torch path and fp64."""
    check_summary_append(case, "cuda")


@pytest.mark.skipif(not (GPU and interpreted()), reason="runs where the tests above cannot")
def test_gpu_tests_in_subprocess():
    from tests.interp import rerun_compiled  # here: importing it imports triton

    rerun_compiled(__file__)
