"""block_select's algo=tilelang on a CUDA GPU against the plain-torch selection, bit for bit:
one score row per output head (the whole select in TileLang) and two to eight (TileLang
thresholds, then the TileLang union), at 256 and 512 threads, on rows of random scores with long tie runs,
rows drawn from three values, NaN / -0.0 / +-inf, k = 0 and k above the blocks, sink and
local overlapping, rows shorter than a block, empty, shorter and longer than the thread
count, mixed lengths; then a row too long for shared memory (the Triton radix fallback) and
a CUDA-graph replay. Skipped without a GPU (CI has none); run on an H100 with
`python -m pytest -q tests/test_select_tilelang_gpu.py`."""
from __future__ import annotations

import pytest
import torch

from sparsegen.codegen.select_kernels import SelectStatic, TritonBlockSelect
from sparsegen.codegen.tilelang_select import MAX_BLOCKS
from sparsegen.methods import selection as sel
from tests.select_cases import tricky_scores

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CASES = [  # (rows, block_size, blocks in the widest row, k, sink, local)
    (1, 64, 512, 51, 1, 1), (1, 64, 2048, 205, 1, 1), (1, 16, 40, 5, 2, 3),
    (1, 64, 300, 0, 0, 0), (1, 64, 300, 1000, 1, 2), (1, 128, 7, 3, 4, 4),
    (4, 64, 512, 13, 1, 1), (4, 16, 2048, 51, 1, 1), (2, 32, 600, 7, 0, 1),
    (8, 16, 1000, 9, 1, 2), (7, 32, 700, 8, 1, 1),   # 7: a GQA group of 28 / 4 heads
    (4, 16, 9000, 60, 1, 1)]   # 64 KB of keys a row; the union takes 512 threads at 256


def _seq(B, NB, bs, gen):
    seq = torch.randint(1, NB * bs + 1, (B,), generator=gen, device="cuda", dtype=torch.int32)
    seq[0], seq[1] = NB * bs, NB * bs - bs // 2   # full, and a partial last block
    seq[2] = 1                                    # shorter than a block
    seq[3] = 0                                    # empty
    return seq


@pytest.mark.parametrize("num_warps", [8, 16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "r{}b{}n{}k{}s{}l{}".format(*c))
def test_tilelang_select_equals_reference(case, num_warps):
    rows, bs, NB, k, sink, local = case
    gen = torch.Generator(device="cuda").manual_seed(NB + k)
    B, H = 6, 2 * rows
    static = SelectStatic(bs, "topk", rows)
    cfg = {**TritonBlockSelect.default_config(static), "num_warps": num_warps}
    assert cfg["algo"] == "tilelang"
    kern = TritonBlockSelect(static, cfg)
    width = sel.topk_width(k, sink, local, NB, rows)
    for trial in range(3):
        scores = (tricky_scores(B, H, NB, gen, "cuda") if trial
                  else torch.randn(B, H, NB, generator=gen, device="cuda"))
        seq = _seq(B, NB, bs, gen)
        got = kern(scores, seq, k=k, sink=sink, local=local, width=width)
        want = kern.reference(scores, seq, k=k, sink=sink, local=local, width=width)
        assert torch.equal(got[1], want[1]), (trial, got[1], want[1])
        assert torch.equal(got[0], want[0]), (trial, (got[0] != want[0]).sum())


def test_rows_longer_than_shared_memory_fall_back_to_triton():
    gen = torch.Generator(device="cuda").manual_seed(7)
    NB = MAX_BLOCKS + 100
    scores = torch.randn(2, 2, NB, generator=gen, device="cuda")
    seq = torch.tensor([NB * 16, 5000 * 16], dtype=torch.int32, device="cuda")
    kern = TritonBlockSelect(SelectStatic(16, "topk", 1),
                             {"algo": "tilelang", "chunk": 1024, "radix_chunk": 2048,
                              "num_warps": 8})
    got = kern(scores, seq, k=300, sink=1, local=1, width=300)
    want = kern.reference(scores, seq, k=300, sink=1, local=1, width=300)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("rows", [1, 4])
def test_tilelang_select_in_a_cuda_graph(rows):
    """Captured once, replayed on new scores written into the same buffers."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    B, H, NB, k = 4, 8 * rows, 512, 51
    static = SelectStatic(64, "topk", rows)
    kern = TritonBlockSelect(static, TritonBlockSelect.default_config(static))
    width = sel.topk_width(k, 1, 1, NB, rows)
    scores = torch.randn(B, H, NB, generator=gen, device="cuda")
    seq = torch.full((B,), NB * 64, dtype=torch.int32, device="cuda")
    out = (torch.empty(B, H // rows, width, dtype=torch.int32, device="cuda"),
           torch.empty(B, H // rows, dtype=torch.int32, device="cuda"))
    kern(scores, seq, k=k, sink=1, local=1, width=width, out=out)   # compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kern(scores, seq, k=k, sink=1, local=1, width=width, out=out)
    for _ in range(3):
        scores.copy_(torch.randn(B, H, NB, generator=gen, device="cuda"))
        seq.copy_(torch.randint(1, NB * 64 + 1, (B,), generator=gen, device="cuda",
                                dtype=torch.int32))
        graph.replay()
        want = kern.reference(scores, seq, k=k, sink=1, local=1, width=width)
        assert torch.equal(out[0], want[0]) and torch.equal(out[1], want[1])
