"""Shared block selection: the plain-torch rules, and the Triton kernel reproducing them bit
for bit with each top-k algorithm (ties, NaN, signed zeros, infinities, always-on overlaps,
group unions, resident and streamed rows) in Triton's interpreter; sm_90 compilation without
a GPU."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from sparsegen.codegen.select_kernels import SelectStatic, TritonBlockSelect
from sparsegen.codegen.tilelang_select import TileLangTopk
from sparsegen.methods import selection as sel
from tests.interp import needs_interp, only_if_not_interpreted, rerun_in_interpreter
from tests.select_cases import tricky_scores


def test_topk_ranking_and_tie_break():
    # block:       0    1    2    3    4    5    6    7
    s = torch.tensor([[[0.5, 2.0, 0.5, 0.5, 3.0, 0.5, -1.0, 9.0]]])
    nb = torch.tensor([7])  # block 7 does not exist: its 9.0 is never ranked
    idx, cnt = sel.select_topk(s, nb, k=4, sink=1, local=1)
    # always on: 0 (sink) and 6 (current); then 4 (3.0), 1 (2.0); ties at 0.5 -> none left
    assert idx.tolist() == [[[0, 1, 4, 6]]] and cnt.tolist() == [[4]]
    idx, cnt = sel.select_topk(s, nb, k=5, sink=1, local=1)
    assert idx.tolist() == [[[0, 1, 2, 4, 6]]]  # of the tied 0.5s, the lowest index wins


def test_topk_counts_and_padding():
    s = torch.randn(2, 3, 10)
    nb = torch.tensor([10, 3])
    idx, cnt = sel.select_topk(s, nb, k=2, sink=2, local=2)
    assert cnt.tolist() == [[4, 4, 4], [3, 3, 3]]  # max(k, always-on) capped by the blocks
    assert idx.shape == (2, 3, 4) and idx[1, :, 3].tolist() == [-1, -1, -1]
    assert (idx[0].sort(-1).values == idx[0]).all()
    assert set(idx[0, 0].tolist()) >= {0, 1, 8, 9}


def test_nan_and_signed_zero_rank_canonically():
    s = torch.tensor([[[float("nan"), -0.0, 0.0, float("-inf"), 1.0]]])
    idx, _ = sel.select_topk(s, torch.tensor([5]), k=2, sink=0, local=0)
    assert idx.tolist() == [[[1, 4]]]  # -0.0 == +0.0, lower index first; NaN ranks last


def test_threshold_and_union():
    p = torch.tensor([[[0.5, 0.1, 0.3, 0.0], [0.0, 0.6, 0.0, 0.4]]])
    idx, cnt = sel.select_threshold(p, torch.tensor([4]), 0.2, sink=0, local=1, rows=2)
    assert idx.tolist() == [[[0, 1, 2, 3]]] and cnt.tolist() == [[4]]
    idx, cnt = sel.select_topk(p, torch.tensor([4]), 1, sink=0, local=0, rows=2)
    assert idx.tolist() == [[[0, 1]]]


def test_select_all():
    idx, cnt = sel.select_all(torch.tensor([3, 0]), heads=2, width=4)
    assert idx[0, 0].tolist() == [0, 1, 2, -1] and cnt.tolist() == [[3, 3], [0, 0]]


def test_mask_to_indices_pads_truncates_and_rejects_overflow():
    mask = torch.tensor([[[True, False, True, False], [False, False, False, True]]])
    idx, cnt = sel.mask_to_indices(mask, 6)
    assert idx.tolist() == [[[0, 2, -1, -1, -1, -1], [3, -1, -1, -1, -1, -1]]]
    assert cnt.tolist() == [[2, 1]] and idx.dtype == cnt.dtype == torch.int32
    idx, _ = sel.mask_to_indices(mask, 2)
    assert idx.tolist() == [[[0, 2], [3, -1]]] and idx.is_contiguous()
    with pytest.raises(ValueError, match="2 blocks does not fit width 1"):
        sel.mask_to_indices(mask, 1)


ALGOS = ["radix8", "count2", "count4", "sort"]
# (rows, heads, chunk, radix_chunk, k, sink, local): the longest row has 40 blocks, so
# radix_chunk 64 holds it in registers and 32 streams it (sort falls back to counting)
TOPK_CASES = [(1, 2, 32, 64, 5, 1, 1), (1, 2, 32, 32, 40, 0, 1), (1, 1, 32, 64, 0, 0, 0),
              (1, 1, 32, 32, 1, 2, 3), (2, 2, 16, 32, 3, 1, 1), (4, 1, 16, 64, 7, 2, 1),
              (8, 1, 16, 32, 100, 1, 2)]


@needs_interp
@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("case", TOPK_CASES, ids=lambda c: "r{}h{}c{}rc{}k{}s{}l{}".format(*c))
def test_kernel_topk_equals_reference(algo, case):
    """Every algorithm: random scores, long tie runs, rows drawn from three values, NaN /
    -0.0 / inf, k = 0 and k > blocks, always-on overlaps, rows 1..8, mixed lengths."""
    rows, heads, chunk, radix_chunk, k, sink, local = case
    gen = torch.Generator().manual_seed(rows * 100 + k)
    B, bs = 4, 16
    seq = torch.tensor([bs * 37 + 5, bs * 3, 1, 0], dtype=torch.int32)
    scores = tricky_scores(B, heads * rows, 40, gen)
    kern = TritonBlockSelect(SelectStatic(bs, "topk", rows),
                             {"algo": algo, "chunk": chunk, "radix_chunk": radix_chunk,
                              "num_warps": 1})
    width = sel.topk_width(k, sink, local, 40, rows)
    got = kern(scores, seq, k=k, sink=sink, local=local, width=width)
    want = kern.reference(scores, seq, k=k, sink=sink, local=local, width=width)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


@needs_interp
@pytest.mark.parametrize("algo", ALGOS)
def test_kernel_topk_all_tied_and_negative(algo):
    """Whole rows of one value (the k-th key's ties decide everything), rows of negative
    scores and infinities only: the key transform must keep the order across signs."""
    B, bs, NB = 3, 16, 24
    seq = torch.tensor([bs * NB, bs * 20 - 3, bs * 9], dtype=torch.int32)
    scores = torch.full((B, 2, NB), -3.5)
    scores[1, 0] = -torch.rand(NB, generator=torch.Generator().manual_seed(1)) * 1e30
    scores[1, 1] = torch.tensor([float("inf"), float("-inf"), -0.0, 0.0] * 6)
    scores[2, 1, ::3] = float("nan")
    kern = TritonBlockSelect(SelectStatic(bs, "topk", 1),
                             {"algo": algo, "chunk": 32, "radix_chunk": 32, "num_warps": 1})
    for k in (2, 11):
        got = kern(scores, seq, k=k, sink=1, local=1, width=k)
        want = kern.reference(scores, seq, k=k, sink=1, local=1, width=k)
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0]), (k, got, want)


@needs_interp
@pytest.mark.parametrize("radix_chunk", [32, 64])
def test_kernel_radix_decides_after_each_pass(radix_chunk):
    """radix8 stops once the keys under the k-th key's prefix are exactly the ones still
    wanted. Rows built so that this happens after pass 1, 2, 3, 4 (the k-th and (k+1)-th
    keys first differ in that byte), never (ties of the k-th key, taken lowest index
    first), with the lowest key of the prefix itself among the taken ones, with k = 0 and a
    row of nothing but always-on blocks; resident (64) and streamed (32) rows."""
    B, bs, NB = 7, 16, 40
    k = 9
    seq = torch.tensor([bs * NB] * 6 + [bs * 2], dtype=torch.int32)
    gen = torch.Generator().manual_seed(7)
    scores = torch.empty(B, 1, NB)
    # the bit patterns of the scores: key i of a row is base + i * step, then shuffled,
    # so the 9th and 10th largest differ first in byte 3 - pass (pass 0 = the top byte)
    for b, step in enumerate((1 << 24, 1 << 16, 1 << 8, 1)):
        bits = torch.tensor(0x3F000000, dtype=torch.int64) + torch.arange(NB) * step
        scores[b, 0] = bits.to(torch.int32).view(torch.float32)[torch.randperm(NB, generator=gen)]
    scores[4, 0] = torch.randint(0, 3, (NB,), generator=gen).float()    # the k-th key tied
    scores[5, 0] = torch.randn(NB, generator=gen)
    scores[5, 0, 20:30] = 2.0 ** 100           # the k-th key = the lowest of its prefix
    scores[6, 0] = torch.randn(NB, generator=gen)
    kern = TritonBlockSelect(SelectStatic(bs, "topk", 1),
                             {"algo": "radix8", "chunk": 32, "radix_chunk": radix_chunk,
                              "num_warps": 1})
    for kk, sink, local in ((k, 1, 1), (k, 0, 0), (0, 0, 0), (3, 1, 1)):
        width = sel.topk_width(kk, sink, local, NB, 1)
        got = kern(scores, seq, k=kk, sink=sink, local=local, width=width)
        want = kern.reference(scores, seq, k=kk, sink=sink, local=local, width=width)
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0]), (kk, got, want)


@needs_interp
@pytest.mark.parametrize("rows", [1, 4])
def test_kernel_threshold_equals_reference(rows):
    gen = torch.Generator().manual_seed(rows)
    B, bs = 3, 32
    seq = torch.tensor([bs * 50 + 1, bs * 2, bs], dtype=torch.int32)
    logits = torch.randn(B, 2 * rows, 64, generator=gen) * 2
    kern = TritonBlockSelect(SelectStatic(bs, "softmax_threshold", rows, exclude_current=True),
                             {"algo": "count4", "chunk": 32, "radix_chunk": 32,
                              "num_warps": 1})
    kw = {"threshold": 0.03, "sink": 1, "local": 2, "width": 64}
    got = kern(logits, seq, **kw)
    want = kern.reference(logits, seq, **kw)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    assert (got[1] >= torch.tensor([3, 2, 1])[:, None]).all()  # always-on blocks


def test_configs_and_compile():
    for rows in (1, 2, 8):
        for mode in ("topk", "softmax_threshold"):
            st = SelectStatic(64, mode, rows)
            assert TritonBlockSelect.check_config(st, TritonBlockSelect.default_config(st)) is None
    st = SelectStatic(64, "topk", 1)
    check = TritonBlockSelect.check_config
    base = {"algo": "count4", "chunk": 256, "radix_chunk": 2048, "num_warps": 8}
    assert "power of two" in check(st, {**base, "chunk": 100})
    assert "missing" in check(st, {"chunk": 128})
    assert "missing" in check(st, {k: v for k, v in base.items() if k != "algo"})
    assert "not one of" in check(st, {**base, "algo": "bitonic"})
    assert "not one of" in check(st, {**base, "algo": ["sort"]})
    assert "threshold mode" in check(SelectStatic(64, "softmax_threshold", 1),
                                     {**base, "algo": "sort"})
    assert "exceed 512" in check(st, {**base, "radix_chunk": 8192, "num_warps": 4})
    assert "exceed 32" in check(st, {**base, "algo": "sort", "radix_chunk": 8192, "num_warps": 4})
    assert "exceed 64" in check(st, {**base, "algo": "radix8", "radix_chunk": 8192, "num_warps": 2})
    assert check(st, {**base, "algo": "radix8", "radix_chunk": 8192, "num_warps": 4}) is None
    # compile-time bounds (bench/results/CPU-block-select-compile.md)
    assert "does not compile" in check(st, {**base, "algo": "radix8", "num_warps": 16})
    assert "exceed 32" in check(st, {**base, "algo": "count2", "radix_chunk": 8192,
                                     "num_warps": 4})
    assert check(st, {**base, "algo": "count2", "radix_chunk": 8192, "num_warps": 8}) is None
    assert check(st, {**base, "algo": "sort", "radix_chunk": 8192, "num_warps": 16,
                      "chunk": 512}) is None
    for algo in ("radix8", "count2", "count4", "sort"):
        assert algo in TritonBlockSelect.tunable_space(st)["algo"]
    with pytest.raises(ValueError, match="infeasible"):
        TritonBlockSelect(st, {**base, "algo": "quick"})
    for mode, rows, cfg in (("topk", 1, {**base, "algo": "radix8"}),
                            ("topk", 1, {**base, "algo": "count2"}),
                            ("topk", 1, base),
                            ("topk", 1, {**base, "algo": "sort"}),
                            ("topk", 4, {**base, "chunk": 128, "num_warps": 4}),
                            ("topk", 4, {**base, "algo": "sort", "chunk": 128,
                                         "radix_chunk": 8192, "num_warps": 16}),
                            ("softmax_threshold", 1, None)):
        facts = TritonBlockSelect(SelectStatic(64, mode, rows, mode != "topk"),
                                  cfg).compile_sm90()
        for f in facts.values():
            assert f["cubin_bytes"] > 0 and f.get("local", 0) == 0, (mode, rows, cfg, facts)


def test_tilelang_algo_configs_and_compile():
    """algo=tilelang: top-k only, 8 or 16 warps (a thread per radix bin), the unused keys
    pinned; the tuner measures both thread counts early (seed_configs); every form compiles
    for sm_90a without a GPU (one score row: the whole select in TileLang; four, eight and seven:
    TileLang thresholds, then the TileLang union; no Triton kernel is built)."""
    check = TritonBlockSelect.check_config
    one, four = SelectStatic(64, "topk", 1), SelectStatic(16, "topk", 4)
    base = {"algo": "tilelang", "chunk": 1024, "radix_chunk": 2048, "num_warps": 8}
    assert check(one, base) is None and check(one, {**base, "num_warps": 16}) is None
    assert "8 or 16" in check(one, {**base, "num_warps": 4})
    assert "unused" in check(one, {**base, "radix_chunk": 1024})
    assert "unused" in check(one, {**base, "chunk": 512})
    assert check(four, {**base, "chunk": 256}) is None
    assert "leave 256" in check(four, {**base, "chunk": 512})
    assert "threshold mode" in check(SelectStatic(64, "softmax_threshold", 1), base)
    assert "tilelang" in TritonBlockSelect.tunable_space(one)["algo"]
    for st in (one, four):
        seeds = TritonBlockSelect.seed_configs(st)
        assert [c["num_warps"] for c in seeds] == [8, 16]
        assert all(check(st, c) is None for c in seeds)
    assert TritonBlockSelect.seed_configs(SelectStatic(64, "softmax_threshold", 1)) == []
    facts = TritonBlockSelect(one, base).compile_sm90()
    assert set(facts) == {"tilelang_indices"} and facts["tilelang_indices"]["cubin_bytes"] > 0
    for st in (four, SelectStatic(64, "topk", 8), SelectStatic(32, "topk", 7)):
        chunk = TritonBlockSelect.default_config(st)["chunk"]
        facts = TritonBlockSelect(st, {**base, "chunk": chunk, "num_warps": 16}).compile_sm90()
        assert set(facts) == {"tilelang_threshold", "tilelang_union"}
        assert all(f["cubin_bytes"] > 0 for f in facts.values())
    with pytest.raises(ValueError, match="union kernel"):
        TileLangTopk(16, 256, "union")                   # rows = 1
    assert TileLangTopk(16, 256, "union", rows=4).launch_shape(8192) == (256, 8192)
    assert TileLangTopk(16, 256, "union", rows=4).launch_shape(8193) == (512, 16384)
    assert TileLangTopk(16, 512, "threshold").launch_shape(100) == (512, 512)
    assert TritonBlockSelect.default_config(one)["algo"] == "tilelang"
    assert check(four, TritonBlockSelect.default_config(four)) is None
    with pytest.raises(RuntimeError, match="CUDA device only"):   # the kernel itself
        TritonBlockSelect(one, base).tilelang[0](
            torch.zeros(1, 1, 4), torch.ones(1, dtype=torch.int32),
            (torch.zeros(1, 1, 1, dtype=torch.int32), torch.zeros(1, 1, dtype=torch.int32)),
            1, 0, 0)


@needs_interp
@pytest.mark.parametrize("rows", [1, 4])
def test_tilelang_algo_off_cuda_runs_the_triton_radix_select(rows):
    """The default algo (tilelang) on CPU scores, as under the interpreter: the same
    selection through Triton's radix8."""
    gen = torch.Generator().manual_seed(rows)
    static = SelectStatic(16, "topk", rows)
    kern = TritonBlockSelect(static, TritonBlockSelect.default_config(static))
    seq = torch.tensor([16 * 37 + 5, 16 * 3, 1, 0], dtype=torch.int32)
    scores = tricky_scores(4, 2 * rows, 40, gen)
    width = sel.topk_width(7, 1, 2, 40, rows)
    got = kern(scores, seq, k=7, sink=1, local=2, width=width)
    want = kern.reference(scores, seq, k=7, sink=1, local=2, width=width)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


@only_if_not_interpreted
def test_interpreter_tests_in_subprocess():
    rerun_in_interpreter(__file__)


def test_rule_kernels_of_the_example_specs():
    from pathlib import Path

    from sparsegen.codegen.rule_kernels import rule_kernels
    from sparsegen.spec import load_spec

    root = Path(__file__).resolve().parents[1] / "examples" / "specs"
    names = {}
    for f in ("seer-attention-r.yaml", "quest-topk.yaml"):
        for name, cls, static in rule_kernels(load_spec(root / f)):
            assert cls.check_config(static, cls.default_config(static)) is None, (name, static)
            assert all(v for v in cls.tunable_space(static).values())
            names[name] = static
    assert {"gate_step", "gate_score", "block_select", "distill_target", "quest_meta",
            "quest_score"} <= set(names)
