"""The gate decode step's side stream on a CUDA GPU: the compression-cache update
(gate_append) overlaps query -> score -> select -> attend. Every output and every byte of the
rule state must equal a strictly serial run of the same kernels on the same inputs, in eager
calls and in a CUDA graph replaying 3 blocks' worth of steps (blocks fill inside it).
Skipped without a GPU (CI has none); run on an H100 with
`python -m pytest -q tests/test_gate_gpu.py`."""
from __future__ import annotations

import pytest
import torch

from sparsegen.codegen.backend import decode_backend
from sparsegen.codegen.decode_api import DecodeStatic
from sparsegen.methods.decode_step import GateDecoder
from sparsegen.methods.gate import AttnGate
from sparsegen.methods.kv_cache import KVCache
from sparsegen.spec import SelectionSpec

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

B, HKV, G, D, BS, CAP = 3, 2, 4, 64, 16, 1024
DT = torch.bfloat16


def _state(dec, cache):
    return [cache.k, cache.v, cache.seq_lens, dec.state.kc, dec.state.run_max,
            dec.state.run_min, dec.state.run_sum]


@pytest.mark.parametrize("rmsnorm", [False, True])
def test_side_stream_step_equals_serial(rmsnorm):
    g = torch.Generator(device="cuda").manual_seed(3)
    gate = AttnGate(HKV * G, HKV, D, BS, d_gate=64, rmsnorm=rmsnorm)
    gate.reset_parameters(torch.Generator().manual_seed(4))
    gate = gate.cuda()
    sel = SelectionSpec(rule="gate", block_size=BS, budget_tokens=4 * BS, sink_blocks=1,
                        local_blocks=1)
    caches = [KVCache(B, HKV, D, CAP, dtype=DT, device="cuda") for _ in range(2)]
    decs = [GateDecoder(gate, sel, B, CAP, device="cuda", impl="triton", kc_dtype=DT,
                        overlap_append=overlap) for overlap in (True, False)]
    lengths = [300, 237, 5]  # mixed, not multiples of the block, one shorter than a block
    k, v, kn = (torch.randn(B, 300, HKV, D, device="cuda", generator=g).to(DT)
                for _ in range(3))
    for dec, cache in zip(decs, caches):
        dec.prefill(cache, k, v, k_nope=kn, lengths=lengths)
    attend = decode_backend("triton")(DecodeStatic(BS, D, G, "bf16", "contiguous", 0))

    def inputs():
        return (torch.randn(B, HKV * G, D, device="cuda", generator=g).to(DT),
                *(torch.randn(B, HKV, D, device="cuda", generator=g).to(DT) for _ in range(3)),
                torch.randn(B, HKV * G, D, device="cuda", generator=g).to(DT),
                torch.randn(B, HKV, D, device="cuda", generator=g).to(DT))

    def both(x):
        q, kk, vv, _, qn, kkn = x
        got = decs[0].step(q, kk, vv, caches[0], attend, q_nope=qn, k_nope=kkn)
        want = decs[1].step(q, kk, vv, caches[1], attend, q_nope=qn, k_nope=kkn)
        return got, want

    both(inputs())                       # the first step is serial (builds tables, counters)
    for _ in range(2 * BS + 3):          # eager: every sequence fills blocks
        got, want = both(inputs())
        assert torch.equal(got, want)
    assert decs[0]._side is not None and decs[1]._side is None  # one overlapped, one not
    torch.cuda.synchronize()
    for a, b in zip(_state(decs[0], caches[0]), _state(decs[1], caches[1])):
        assert torch.equal(a, b)

    # a CUDA graph of 3 blocks' worth of steps, replayed from a snapshot, vs the serial run
    steps = [inputs() for _ in range(3 * BS)]
    snap = [t.clone() for t in _state(decs[0], caches[0])]
    host = list(caches[0].lengths)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [decs[0].step(x[0], x[1], x[2], caches[0], attend, q_nope=x[4], k_nope=x[5])
                for x in steps]
    for _ in range(2):                   # replays from the same state give the same result
        for t, s in zip(_state(decs[0], caches[0]), snap):
            t.copy_(s)
        graph.replay()
    caches[0].lengths = [n + len(steps) for n in host]
    wants = [decs[1].step(x[0], x[1], x[2], caches[1], attend, q_nope=x[4], k_nope=x[5])
             for x in steps]
    torch.cuda.synchronize()
    for got, want in zip(outs, wants):
        assert torch.equal(got, want)
    for a, b in zip(_state(decs[0], caches[0]), _state(decs[1], caches[1])):
        assert torch.equal(a, b)
