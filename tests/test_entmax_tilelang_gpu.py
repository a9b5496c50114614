"""entmax_tau's algo=tilelang (one TileLang kernel a row: scores, tau, selection) on a CUDA
GPU against the plain-torch rule (sparsegen.methods.entmax.select_blocks):

- exactly (same blocks, same counts; log p_bar to 1e-4) on inputs whose support is known
  exactly (EntmaxTauTriton.bench_inputs, inherited: every dot product exact), over GQA groups 1-8, head
  dims 64 / 128, alpha 1.5 / 2 / 1.3, sink / local / prior variants, bf16 and fp16, mixed
  lengths (full, a partial last block, shorter than a block, empty), capacities off the tile
  grid and far above the sequence;
- on random inputs, against the fp64 rule: the selections differ at most in blocks whose fp64
  p_bar is at the support's edge (< 1e-5), where fp32 rounding of tau decides;
- the Triton fallback of a row too long for shared memory, and a CUDA-graph replay;
- rows scored by a cluster of 2 or 4 CTAs (`cluster`) and heads solved by several warps each
  (`head_split`), as exact as one CTA a row and one warp a head, the graph replay included.
Skipped without a GPU (CI has none); run on an H100 with
`python -m pytest -q tests/test_entmax_tilelang_gpu.py`."""
from __future__ import annotations

import pytest
import torch

from sparsegen.codegen.entmax_kernels import EntmaxStatic
from sparsegen.codegen.entmax_tau import EntmaxTau
from sparsegen.codegen.tilelang_entmax import MAX_ROW_VALUES
from sparsegen.methods.entmax import select_blocks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

F64 = torch.float64
CONFIGS = {  # (block_j, stages, num_warps, cluster, head_split)
    "bj64-s3-w8": (64, 3, 8, 1, 0), "bj128-s2-w16": (128, 2, 16, 1, 0),
    "bj256-s1-w8": (256, 1, 8, 1, 0), "bj64-s2-w8-c4": (64, 2, 8, 4, 0),
    "bj128-s2-w16-c2": (128, 2, 16, 2, 0), "bj64-s3-w8-split": (64, 3, 8, 1, 1),
    "bj128-s2-w16-split": (128, 2, 16, 1, 1), "bj64-s3-w8-c2-split": (64, 3, 8, 2, 1)}
SPLIT = [c for c in CONFIGS if c.endswith("split")]
STATICS = [  # (block_size, head_dim, group, dtype, sink, local, alpha, prior)
    (64, 128, 4, "bf16", 1, 1, 1.5, True), (64, 128, 1, "bf16", 1, 1, 1.5, True),
    (32, 64, 8, "fp16", 2, 1, 1.5, False), (16, 128, 7, "bf16", 1, 3, 2.0, True),
    (128, 64, 2, "bf16", 0, 2, 1.3, True)]


def _kernel(st: EntmaxStatic, cfg: str, scale: float = 1.0) -> EntmaxTau:
    bj, stages, nw, cluster, split = CONFIGS[cfg]
    config = dict(EntmaxTau.default_config(st), algo="tilelang", block_j=bj,
                  stages=stages, num_warps=nw, cluster=cluster, head_split=split)
    assert EntmaxTau.check_config(st, config) is None
    return EntmaxTau(st, config, scale=scale)


def _mixed_lengths(B: int, full: int, bs: int, gen) -> torch.Tensor:
    seq = torch.randint(1, full + 1, (B,), generator=gen, device="cuda", dtype=torch.int32)
    seq[0] = full
    seq[1] = full - bs // 2 if full > bs else full   # a partial last block
    if B > 3:
        seq[2] = max(1, bs // 3)                     # shorter than a block
        seq[3] = 0                                   # empty
    return seq


def _assert_same(got, want, check_bias=True):
    assert torch.equal(got.counts, want.counts), (got.counts, want.counts)
    B, H = got.counts.shape
    for b in range(B):
        for h in range(H):
            c = int(got.counts[b, h])
            assert torch.equal(got.indices[b, h, :c], want.indices[b, h, :c]), (b, h)
            if check_bias:
                torch.testing.assert_close(got.bias[b, h, :c], want.bias[b, h, :c].float(),
                                           rtol=1e-4, atol=1e-4)


# every config on the first statics, one config each on the others (each pair compiles two
# row bounds, ~10 s a kernel), then the heads' solve split over the warps on the statics whose
# group divides the warps (g1 over 16 warps, g8 over 16, g2 over 8)
UNSPLIT = [c for c in CONFIGS if c not in SPLIT]
PAIRS = [(STATICS[0], cfg) for cfg in CONFIGS] + [
    (st, UNSPLIT[i % len(UNSPLIT)]) for i, st in enumerate(STATICS[1:])] + [
    (STATICS[1], "bj128-s2-w16-split"), (STATICS[2], "bj128-s2-w16-split"),
    (STATICS[4], "bj64-s3-w8-c2-split")]


@pytest.mark.parametrize("stat,cfg", PAIRS,
                         ids=lambda p: "bs{}d{}g{}{}s{}l{}a{}p{}".format(*p) if isinstance(p, tuple) else p)
@pytest.mark.parametrize("seq_len,cap_extra", [(64 * 700, 0), (64 * 2048, 0), (3000, 517)])
def test_exact_support_equals_reference(stat, cfg, seq_len, cap_extra):
    bs, D, G, dt, sink, local, alpha, prior = stat
    st = EntmaxStatic(bs, D, G, dt, sink_blocks=sink, local_blocks=local, alpha=alpha,
                      prior=prior)
    longest = 1 << (MAX_ROW_VALUES // G).bit_length() - 1   # rows the kernel holds
    seq_len = min(seq_len, (longest - cap_extra) * bs)        # stay on the TileLang path
    B, Hkv = 6, 2
    inp = EntmaxTau.bench_inputs(st, B, seq_len, kv_heads=Hkv, budget_blocks=40,
                                       seed=seq_len + G)
    summ = inp["summaries"]
    if cap_extra:   # capacity above the sequence, off the tile grid
        summ = torch.cat([summ, torch.randn(B, Hkv, cap_extra, D, device="cuda",
                                            dtype=summ.dtype)], 2).contiguous()
    gen = torch.Generator(device="cuda").manual_seed(seq_len)
    kern = _kernel(st, cfg)
    assert kern.tilelang.fits(summ.shape[2])
    for seq in (inp["seq_lens"], _mixed_lengths(B, seq_len, bs, gen)):
        got = kern(inp["q"], summ, seq)
        want = select_blocks(inp["q"], summ, seq, st.rule(1.0), width=summ.shape[2])
        _assert_same(got, want)


@pytest.mark.parametrize("cfg", ["bj64-s3-w8", "bj128-s2-w16", "bj64-s2-w8-c4",
                                 "bj128-s2-w16-split"])
@pytest.mark.parametrize("G,D", [(4, 128), (8, 64), (3, 128)])
def test_random_inputs_match_fp64_off_the_edge(cfg, G, D):
    st = EntmaxStatic(64, D, G, "bf16")
    if cfg in SPLIT and G == 3:
        pytest.skip("3 query heads do not split 16 warps")
    B, Hkv, cap, scale = 4, 2, 1100, 6.0
    gen = torch.Generator(device="cuda").manual_seed(G * D)
    q = torch.randn(B, Hkv * G, D, generator=gen, device="cuda").bfloat16()
    summ = torch.randn(B, Hkv, cap, D, generator=gen, device="cuda").bfloat16()
    seq = _mixed_lengths(B, cap * 64, 64, gen)
    got = _kernel(st, cfg, scale)(q, summ, seq)
    exact, pbar = select_blocks(q.to(F64), summ.to(F64), seq, st.rule(scale), width=cap,
                                compute_dtype=F64, return_probs=True)
    for b in range(B):
        for h in range(Hkv):
            mine, ref = set(got.blocks(b, h)), set(exact.blocks(b, h))
            for j in mine ^ ref:
                assert j < pbar.shape[-1] and pbar[b, h, j] < 1e-5, (b, h, j)
            assert len(mine ^ ref) <= 2, (b, h, mine ^ ref)
            assert len(ref) < -(-int(seq[b]) // 64) or int(seq[b]) <= 64 * 3, "not sparse"


def test_row_too_long_for_shared_memory_runs_triton():
    st = EntmaxStatic(64, 128, 4, "bf16")
    cap = MAX_ROW_VALUES // 4 + 1
    kern = _kernel(st, "bj64-s3-w8")
    assert not kern.tilelang.fits(cap)
    inp = EntmaxTau.bench_inputs(st, 2, cap * 64, kv_heads=2, budget_blocks=60, seed=1)
    got = kern(inp["q"], inp["summaries"], inp["seq_lens"])
    want = select_blocks(inp["q"], inp["summaries"], inp["seq_lens"], st.rule(1.0), width=cap)
    _assert_same(got, want)


@pytest.mark.parametrize("cfg", ["bj64-s3-w8", "bj64-s2-w8-c4", "bj64-s3-w8-split"])
def test_in_a_cuda_graph(cfg):
    """Captured once, replayed on new queries and summaries written into the same buffers."""
    st = EntmaxStatic(64, 128, 4, "bf16")
    kern = _kernel(st, cfg)
    a = EntmaxTau.bench_inputs(st, 4, 64 * 512, budget_blocks=50, seed=2)
    b = EntmaxTau.bench_inputs(st, 4, 64 * 512, budget_blocks=30, seed=3)
    q, summ, seq = a["q"].clone(), a["summaries"].clone(), a["seq_lens"].clone()
    kern(q, summ, seq)   # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sel = kern(q, summ, seq)
    for inp in (b, a):
        q.copy_(inp["q"])
        summ.copy_(inp["summaries"])
        graph.replay()
        torch.cuda.synchronize()
        want = select_blocks(inp["q"], inp["summaries"], seq, st.rule(1.0),
                             width=summ.shape[2])
        _assert_same(sel, want)
