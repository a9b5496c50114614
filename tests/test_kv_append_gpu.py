"""The topk rule's one-launch append on a CUDA GPU: the KV append kernel that folds each new
key into the block metadata (AppendStatic.meta) against the torch path (the cache's scatters,
then QuestMeta.append), bit for bit: K, V, lengths and metadata after every step, bf16
included (the interpreter's bf16 rounding differs from the GPU's, so only a GPU checks it),
in eager calls and in a CUDA graph replayed from a snapshot. Block = page is the milestone
rule's fast path. Skipped without a GPU (CI has none); run on an H100 with
`python -m pytest -q tests/test_kv_append_gpu.py`. In a process whose Triton was imported
in interpreter mode (another test module set TRITON_INTERPRET first) they run in a fresh
process instead."""
from __future__ import annotations

import pytest
import torch

from sparsegen.codegen.kv_append import AppendStatic, TritonKVAppend
from sparsegen.codegen.triton_kernel import dtype_name, interpreted
from sparsegen.methods.decode_step import TopkDecoder
from sparsegen.methods.kv_cache import KVCache
from sparsegen.methods.topk import QuestMeta
from sparsegen.spec import SelectionSpec, TopkParams

GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not GPU or interpreted(), reason="needs a CUDA GPU and Triton "
                               "compiled, not interpreted, in this process")

B, H, D = 4, 8, 128
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
# (block, page (0: contiguous), score, cache dtype, new k / v dtype)
CASES = [(16, 32, "upper_bound", BF16, BF16),
         (64, 0, "mean_pooled", BF16, BF16),
         (64, 128, "mean_pooled", BF16, FP32),     # fp32 keys rounded to bf16 in the kernel
         (32, 0, "upper_bound", FP16, FP16),
         (128, 256, "mean_pooled", FP16, FP16),
         (16, 0, "mean_pooled", FP32, FP32),
         (64, 64, "upper_bound", BF16, BF16)]      # block = page: the milestone fast path


def _lengths(bs):
    return [3 * bs + 5, 1, 0, 2 * bs - 1]  # not multiples of the block; one empty


def _pair(bs, page, score, dtype, gen):
    """Two identical prefilled caches and their metadata: [(cache, meta), (cache, meta)]."""
    lengths = _lengths(bs)
    k = torch.randn(B, max(lengths), H, D, device="cuda", generator=gen)
    out = []
    for _ in range(2):
        cache = KVCache(B, H, D, 8 * bs, dtype=dtype, device="cuda",
                        layout="paged" if page else "contiguous", page_size=page)
        meta = QuestMeta(cache, bs, score)
        for b, n in enumerate(lengths):
            cache.extend(b, k[b, :n], -k[b, :n])
            if n:
                meta.fill(cache, b, 0, n)
        out.append((cache, meta))
    return out


def _kernel(cache, bs, score, new_dtype):
    st = AppendStatic(D, H, dtype_name(cache.k.dtype), dtype_name(new_dtype), cache.layout,
                      cache.page_size, score, bs)
    return TritonKVAppend(st)


def _state(cache, meta):
    return [cache.k, cache.v, cache.seq_lens, *meta.tensors(),
            *([meta.run_sum] if meta.score == "mean_pooled" else [])]


def _assert_same(a, b, what):
    (ca, ma), (cb, mb) = a, b
    assert ca.lengths == cb.lengths, what
    for i, (x, y) in enumerate(zip(_state(ca, ma), _state(cb, mb))):
        assert torch.equal(x, y), f"{what}: state tensor {i} differs"


def _new(new_dtype, gen):
    return [torch.randn(B, H, D, device="cuda", generator=gen).to(new_dtype) for _ in range(2)]


@needs_gpu
@pytest.mark.parametrize("bs,page,score,dtype,new_dtype", CASES)
def test_one_launch_append_equals_torch_path(bs, page, score, dtype, new_dtype):
    gen = torch.Generator(device="cuda").manual_seed(bs + page)
    (fused, torch_path) = pair = _pair(bs, page, score, dtype, gen)
    kern = _kernel(fused[0], bs, score, new_dtype)
    for step in range(2 * bs + 3):      # every sequence opens and fills blocks
        kn, vn = _new(new_dtype, gen)
        fused[0].append(kn, vn, meta=fused[1], kernel=kern)
        torch_path[0].append(kn, vn, impl="torch", meta=torch_path[1])
        _assert_same(*pair, f"step {step}")


@needs_gpu
@pytest.mark.parametrize("bs,page,score,dtype,new_dtype",
                         [CASES[0], CASES[1], CASES[-1]])
def test_one_launch_append_in_a_cuda_graph(bs, page, score, dtype, new_dtype):
    """2 blocks' worth of appends captured in one graph, replayed twice from a snapshot: the
    state equals the torch path's eager run. A paged cache's pages are taken on the host, so
    those the graph's tokens need are mapped before capture (as a model maps them before it
    replays a decode graph), in both caches alike."""
    gen = torch.Generator(device="cuda").manual_seed(7)
    (fused, torch_path) = _pair(bs, page, score, dtype, gen)
    kern = _kernel(fused[0], bs, score, new_dtype)
    kn, vn = _new(new_dtype, gen)  # one eager step first: compiles and loads the kernel
    fused[0].append(kn, vn, meta=fused[1], kernel=kern)
    torch_path[0].append(kn, vn, impl="torch", meta=torch_path[1])
    steps = [_new(new_dtype, gen) for _ in range(2 * bs)]
    for cache, _ in (fused, torch_path):
        cache.reserve(len(steps))
    torch.cuda.synchronize()
    snap = [t.clone() for t in _state(*fused)]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for kn, vn in steps:
            fused[0].append(kn, vn, meta=fused[1], kernel=kern)
    for _ in range(2):
        for t, s in zip(_state(*fused), snap):
            t.copy_(s)
        graph.replay()
    for kn, vn in steps:
        torch_path[0].append(kn, vn, impl="torch", meta=torch_path[1])
    torch.cuda.synchronize()
    _assert_same(fused, torch_path, "after the graph")


@needs_gpu
@pytest.mark.parametrize("score,group,page", [("mean_pooled", "shared", 0),
                                              ("upper_bound", "per_head", 16)])
def test_decoders_kernel_path_equals_torch_path(score, group, page):
    """TopkDecoder.append as a decode step runs it: the kernel path (one launch) vs the torch
    path (the cache's append, then QuestMeta.append), bf16."""
    bs = 64 if score == "mean_pooled" else 16
    sel = SelectionSpec(rule="topk", block_size=bs, sink_blocks=1, local_blocks=1,
                        budget_tokens=4 * bs, topk=TopkParams(score, group))
    gen = torch.Generator(device="cuda").manual_seed(11)
    caches = [KVCache(B, H, D, 8 * bs, dtype=BF16, device="cuda",
                      layout="paged" if page else "contiguous", page_size=page)
              for _ in range(2)]
    decs = [TopkDecoder(sel, 4 * H, c, impl=impl) for c, impl in zip(caches, ("triton", "torch"))]
    k = torch.randn(B, max(_lengths(bs)), H, D, device="cuda", generator=gen).to(BF16)
    for dec, cache in zip(decs, caches):
        dec.prefill(cache, k, k, lengths=_lengths(bs))
    for step in range(2 * bs + 3):
        kn, vn = _new(BF16, gen)
        for dec, cache in zip(decs, caches):
            dec.append(cache, kn, vn)
        _assert_same((caches[0], decs[0].meta), (caches[1], decs[1].meta), f"step {step}")


@pytest.mark.skipif(not (GPU and interpreted()), reason="runs where the tests above cannot")
def test_gpu_tests_in_subprocess():
    from tests.interp import rerun_compiled  # here: importing it imports triton

    rerun_compiled(__file__)
