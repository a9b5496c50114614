"""Shared block selection: the plain-torch rules, and the Triton kernel reproducing them bit
for bit (ties, NaN, signed zeros, infinities, always-on overlaps, group unions) in Triton's
interpreter; sm_90 compilation without a GPU."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from sparsegen.codegen.select_kernels import SelectStatic, TritonBlockSelect  # noqa: E402
from sparsegen.methods import selection as sel  # noqa: E402
from tests.interp import needs_interp, only_if_not_interpreted, rerun_in_interpreter  # noqa: E402


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


def _scores(B, H, NB, gen):
    s = torch.randn(B, H, NB, generator=gen)
    s[0, 0, : NB // 2] = 0.25                                   # a long run of ties
    s[1 % B] = torch.randint(0, 3, (H, NB), generator=gen).float()  # ties everywhere
    s[-1, -1, 1] = float("nan")
    s[-1, -1, 2] = -0.0
    s[-1, -1, 3] = float("inf")
    s[-1, -1, 4] = float("-inf")
    return s


@needs_interp
@pytest.mark.parametrize("rows,chunk,radix_chunk", [(1, 32, 32), (1, 32, 64), (3, 16, 32),
                                                    (8, 16, 64)])
@pytest.mark.parametrize("k,sink,local", [(5, 1, 1), (1, 2, 3), (40, 0, 1)])
def test_kernel_topk_equals_reference(rows, chunk, radix_chunk, k, sink, local):
    """radix_chunk 64 holds the longest row (40 blocks) in registers; 32 streams it."""
    gen = torch.Generator().manual_seed(rows * 100 + k)
    B, heads, bs = 4, 2, 16
    seq = torch.tensor([bs * 37 + 5, bs * 3, 1, 0], dtype=torch.int32)
    scores = _scores(B, heads * rows, 40, gen)
    kern = TritonBlockSelect(SelectStatic(bs, "topk", rows),
                             {"chunk": chunk, "radix_chunk": radix_chunk, "num_warps": 1})
    width = sel.topk_width(k, sink, local, 40, rows)
    got = kern(scores, seq, k=k, sink=sink, local=local, width=width)
    want = kern.reference(scores, seq, k=k, sink=sink, local=local, width=width)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


@needs_interp
@pytest.mark.parametrize("rows", [1, 4])
def test_kernel_threshold_equals_reference(rows):
    gen = torch.Generator().manual_seed(rows)
    B, bs = 3, 32
    seq = torch.tensor([bs * 50 + 1, bs * 2, bs], dtype=torch.int32)
    logits = torch.randn(B, 2 * rows, 64, generator=gen) * 2
    kern = TritonBlockSelect(SelectStatic(bs, "softmax_threshold", rows, exclude_current=True),
                             {"chunk": 32, "radix_chunk": 32, "num_warps": 1})
    kw = dict(threshold=0.03, sink=1, local=2, width=64)
    got = kern(logits, seq, **kw)
    want = kern.reference(logits, seq, **kw)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    assert (got[1] >= torch.tensor([3, 2, 1])[:, None]).all()  # always-on blocks


def test_configs_and_compile():
    for rows in (1, 2, 8):
        st = SelectStatic(64, "topk", rows)
        assert TritonBlockSelect.check_config(st, TritonBlockSelect.default_config(st)) is None
    st = SelectStatic(64, "topk", 1)
    bad = {"chunk": 100, "radix_chunk": 256, "num_warps": 4}
    assert "power of two" in TritonBlockSelect.check_config(st, bad)
    assert "missing" in TritonBlockSelect.check_config(st, {"chunk": 128})
    for mode, rows in (("topk", 1), ("topk", 4), ("softmax_threshold", 1)):
        facts = TritonBlockSelect(SelectStatic(64, mode, rows, mode != "topk")).compile_sm90()
        f = facts["block_select"]
        assert f["cubin_bytes"] > 0 and f.get("local", 0) == 0


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
