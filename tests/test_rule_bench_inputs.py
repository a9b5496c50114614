"""The tuner's protocol of every rule kernel (bench_inputs + reference, sparsegen.tune.bench
`_prepare_rule` / `_evaluate_rule`), on the CPU in Triton's interpreter:

* a kernel call on a fresh input set passes the tuner's own check (`_check_rule`: integer
  outputs exactly, float outputs within its tolerance) against `reference`, and so do a
  repeated call on the same set (the tuner times many calls of one set; state updated in
  place must come out the same) and a call on a second set after it (one adapter instance
  serves every set of a workload);
* the inputs are what a decode step holds: the gate step fills and opens blocks, Quest's
  metadata covers every earlier block, entmax and milestone select realistic counts;
* every rule kernel of the example specs is tunable, and bench_inputs takes the keyword
  arguments the plan hands it (checked on a small shape against the reference alone).
Small shapes; fp16 / fp32 where a kernel uses tl.dot (the interpreter's bf16 tl.dot is wrong).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from sparsegen.codegen.entmax_kernels import EntmaxDecodeTriton, EntmaxStatic  # noqa: E402
from sparsegen.codegen.entmax_tau import EntmaxTau  # noqa: E402
from sparsegen.codegen.gate_kernels import GateStepStatic, TritonGateStep  # noqa: E402
from sparsegen.codegen.milestone_kernels import (MilestoneScoreTriton,  # noqa: E402
                                                 MilestoneSelectStatic, MilestoneSelectTriton,
                                                 MilestoneStatic)
from sparsegen.codegen.kv_append import AppendStatic, TritonKVAppend  # noqa: E402
from sparsegen.codegen.quest_kernels import QuestStatic, TritonQuestScore  # noqa: E402
from sparsegen.plan import ShapeBucket, make_plan, rule_kernel_plans  # noqa: E402
from sparsegen.spec import load_spec  # noqa: E402
from sparsegen.tune.bench import _check_rule, _tensors, rule_moved_bytes  # noqa: E402
from sparsegen.tune.worker import CandidateError  # noqa: E402
from tests.interp import needs_interp, only_if_not_interpreted, rerun_in_interpreter  # noqa: E402

SPECS = Path(__file__).resolve().parents[1] / "examples" / "specs"
TOL = 1e-2  # the tuner's default tolerance

GATE_SMALL = {"pairs": 4, "chunk_k": 64, "block_b": 2, "num_warps": 4}  # several tiles
TAU_SMALL = {"algo": "triton", "block_j": 16, "tiles": 2, "stages": 2, "chunk": 16,
             "num_warps": 4, "select_warps": 4, "cluster": 1, "head_split": 0}
# the TileLang form's seed: off a GPU (here) the Triton pair runs it at its default config
TAU_TILELANG = EntmaxTau.seed_configs(EntmaxStatic(16, 64, 4, "fp16"))[0]
SEL_SMALL = {"head_chunk": 4, "block_chunk": 16, "rank_sort": 1, "num_warps": 4}


def _decode_small(st):
    return {**EntmaxDecodeTriton.default_config(st), "block_n": 16, "num_stages": 1,
            "num_warps": 2}


# (id, adapter, static, config (None: default), batch, seq_len, bench_inputs keywords)
CASES = [
    ("gate_step", TritonGateStep, GateStepStatic(16, 64, 2, 32, dtype="fp16", kc_dtype="fp16"),
     GATE_SMALL, 5, 100, {"heads": 2}),
    ("gate_step-rmsnorm-mean", TritonGateStep,
     GateStepStatic(8, 32, 4, 32, pooling=("max", "mean"), rmsnorm=True,
                    query_reduction="mean", dtype="bf16", kc_dtype="bf16"),
     None, 4, 61, {"heads": 2}),
    ("quest_meta", TritonKVAppend, AppendStatic.of_quest(QuestStatic(16, 32, 2, "fp16"), 2),
     None, 4, 100, {}),
    ("quest_meta-paged-mean", TritonKVAppend,
     AppendStatic.of_quest(QuestStatic(16, 32, 2, "fp16", "mean_pooled", "shared", "paged", 32),
                           2), None, 3, 90, {}),
    # 3 KV heads and a head dim of 40 pad the tiles; fp32 keys are cast to the fp16 cache
    ("quest_meta-paged-pad-cast", TritonKVAppend,
     AppendStatic(40, 3, "fp16", "fp32", "paged", 32, "upper_bound", 16), {"num_warps": 1}, 3,
     70, {}),
    ("kv_append-plain", TritonKVAppend, AppendStatic(32, 2, "fp16", "fp16"), None, 2, 50, {}),
    ("quest_score", TritonQuestScore, QuestStatic(16, 32, 2, "fp16"),
     {"block_j": 16, "tiles": 2, "num_stages": 1, "num_warps": 4}, 2, 300, {"kv_heads": 2}),
    ("quest_score-paged-mean-shared", TritonQuestScore,
     QuestStatic(16, 32, 4, "fp32", "mean_pooled", "shared", "paged", 32), None, 3, 200,
     {"kv_heads": 2}),
    ("entmax_tau", EntmaxTau, EntmaxStatic(16, 32, 4, "fp16"), TAU_SMALL, 3, 300,
     {"kv_heads": 2, "budget_blocks": 6}),
    ("entmax_tau-tilelang-off-gpu", EntmaxTau, EntmaxStatic(16, 64, 4, "fp16"), TAU_TILELANG,
     3, 300, {"kv_heads": 2, "budget_blocks": 6}),
    ("entmax_tau-alpha2-sink2", EntmaxTau,
     EntmaxStatic(16, 64, 2, "fp32", sink_blocks=2, local_blocks=2, alpha=2.0), TAU_SMALL,
     2, 500, {"kv_heads": 2, "budget_blocks": 12}),
    ("entmax_decode", EntmaxDecodeTriton, EntmaxStatic(16, 32, 4, "fp16"), "decode", 2, 300,
     {"kv_heads": 2, "budget_blocks": 6}),
    ("entmax_decode-paged-noprior", EntmaxDecodeTriton,
     EntmaxStatic(16, 32, 2, "fp16", "paged", 32, prior=False), "decode", 3, 200,
     {"kv_heads": 2, "budget_blocks": 4}),
    ("milestone_score", MilestoneScoreTriton, MilestoneStatic(32, 4, "fp16"),
     {"slot_chunk": 16, "num_warps": 4}, 3, 500, {"kv_heads": 2, "budget_blocks": 20}),
    ("milestone_select", MilestoneSelectTriton, MilestoneSelectStatic(24), SEL_SMALL, 3, 1000,
     {"kv_heads": 2, "page_size": 32, "block_size": 16}),
    ("milestone_select-threshold-rank", MilestoneSelectTriton,
     MilestoneSelectStatic(12, threshold_mode=True), {**SEL_SMALL, "rank_sort": 0}, 2, 300,
     {"kv_heads": 2, "q_heads": 6}),
]


def _adapter(cls, static, config):
    if config == "decode":
        config = _decode_small(static)
    return cls(static, config)


def _check(out, ref, what):
    try:
        _check_rule(torch, out, ref, TOL, what)
    except CandidateError as e:  # the tuner's verdict, as a test failure
        pytest.fail(str(e))


@needs_interp
@pytest.mark.parametrize("name,cls,static,config,batch,seq_len,kw", CASES,
                         ids=[c[0] for c in CASES])
def test_call_on_bench_inputs_matches_reference(name, cls, static, config, batch, seq_len, kw):
    kern = _adapter(cls, static, config)
    sets = [cls.bench_inputs(static, batch, seq_len, **kw, device="cpu", seed=s)
            for s in (0, 1)]
    # the tuner computes the references first, before any kernel call
    refs = [kern.reference(**s) for s in sets]
    assert _tensors(refs[0]), "the reference returns no tensor to compare"
    for i, (inputs, ref) in enumerate(zip(sets, refs)):
        first = [t.clone() for t in _tensors(kern(**inputs))]
        _check(first, ref, f"{name}: set {i}, first call")
        again = _tensors(kern(**inputs))
        _check(again, ref, f"{name}: set {i}, repeated call")
        for a, b in zip(first, again):
            assert torch.equal(a, b), f"{name}: a repeated call changed an output"


@needs_interp
@pytest.mark.parametrize("case", [c for c in CASES if c[0].startswith("quest_meta")],
                         ids=lambda c: c[0])
def test_quest_meta_inputs_replay_one_slot_and_stay_small(case):
    """The topk append's tuner inputs: the lengths are read, not bumped (seq_out gets them
    plus one), so every replay writes the same slot; K and V hold one slot per sequence or
    page (stride 0 over tokens), which the call fills with the new token; the input set is
    no bigger than the metadata's twice over."""
    _, cls, st, config, batch, seq_len, _ = case
    inp = cls.bench_inputs(st, batch, seq_len, device="cpu", seed=2)
    k, pos = inp["k"], inp["seq_lens"].clone()
    assert k.stride(1) == 0 and k.shape[1] == (st.page_size if st.paged else seq_len)
    meta_bytes = sum(t.untyped_storage().nbytes() for t in _tensors(inp["meta"]))
    kv_bytes = sum(inp[n].untyped_storage().nbytes() for n in ("k", "v"))
    assert kv_bytes <= 2 * meta_bytes
    _adapter(cls, st, config)(**inp)
    assert torch.equal(inp["seq_lens"], pos) and torch.equal(inp["seq_out"], pos + 1)
    rows = (inp["block_table"][torch.arange(batch), pos // st.page_size].long() if st.paged
            else torch.arange(batch))
    assert torch.equal(k[rows, 0], inp["k_new"].to(k.dtype))
    assert torch.equal(inp["v"][rows, 0], inp["v_new"].to(k.dtype))


@needs_interp
def test_gate_step_inputs_fill_and_open_blocks():
    st = CASES[0][2]
    kern = TritonGateStep(st, GATE_SMALL)
    inputs = TritonGateStep.bench_inputs(st, 5, 100, heads=2, device="cpu", seed=3)
    pos = inputs["seq_lens"].long() - 1
    assert (pos % 16 == 15).any() and (pos % 16 == 0).any()
    before = inputs["state"].kc.clone()
    _, kc, *_ = kern(**inputs)
    filled = (pos % 16 == 15).nonzero().flatten()
    blk = pos[filled] // 16
    assert not torch.equal(kc[filled, :, blk], before[filled, :, blk])  # a new gate key
    assert torch.equal(kc[pos % 16 != 15], before[pos % 16 != 15])       # nothing else
    # every earlier block has a key, none after the current one
    nb = kc.shape[2]
    for b in range(5):
        assert before[b, :, : int(pos[b]) // 16].abs().sum(-1).min() > 0
        assert not before[b, :, int(pos[b]) // 16:nb].any()


def test_support_sizes_vary_and_follow_the_budget():
    st = EntmaxStatic(16, 32, 4, "fp32")
    inp = EntmaxDecodeTriton.bench_inputs(st, 4, 1600, kv_heads=4, budget_blocks=40,
                                          device="cpu")
    counts = inp["block_counts"]
    assert 28 <= int(counts.min()) < int(counts.max()) <= 50
    assert abs(counts.float().mean().item() - 40) < 4
    idx = inp["block_indices"]
    for b in range(4):
        for h in range(4):
            row = idx[b, h, : int(counts[b, h])]
            assert torch.equal(row, row.sort().values) and int(row[-1]) == 99  # current block
            assert (idx[b, h, int(counts[b, h]):] == -1).all()
    again = EntmaxDecodeTriton.bench_inputs(st, 4, 1600, kv_heads=4, budget_blocks=40,
                                            device="cpu", seed=7)
    assert torch.equal(again["block_counts"], counts)  # a function of the shape only


def test_entmax_decode_bandwidth_counts_the_selected_kv_only():
    """The tuner's GB/s for entmax's attention: the selected blocks' K and V (a partial last
    block counts its valid tokens), not the whole cache its input set holds."""
    st = EntmaxStatic(16, 32, 4, "fp16")
    seq_len = 1000  # 62 full blocks and a partial one of 8 tokens
    inp = EntmaxDecodeTriton.bench_inputs(st, 3, seq_len, kv_heads=2, budget_blocks=10,
                                          device="cpu")
    set_bytes = sum(t.untyped_storage().nbytes() for t in _tensors(inp))
    tokens = 0
    for b in range(3):
        for h in range(2):
            for blk in inp["block_indices"][b, h, : int(inp["block_counts"][b, h])].tolist():
                tokens += min(16, seq_len - 16 * blk)
    want = tokens * 32 * 2 * 2  # head_dim 32, fp16, K and V
    assert rule_moved_bytes(torch, st.as_dict(), inp, set_bytes) == want < set_bytes / 3
    # a rule kernel whose inputs are not a decode's counts its whole input set
    tau = EntmaxTau.bench_inputs(st, 3, seq_len, kv_heads=2, budget_blocks=10, device="cpu")
    assert rule_moved_bytes(torch, st.as_dict(), tau, 12345) == 12345


def test_bad_shapes_get_clear_errors():
    with pytest.raises(ValueError, match="page_size"):
        MilestoneSelectTriton.bench_inputs(MilestoneSelectStatic(8), 2, 100, page_size=24,
                                           block_size=16, device="cpu")
    with pytest.raises(ValueError, match="positive"):
        TritonGateStep.bench_inputs(CASES[0][2], 0, 100, device="cpu")


@pytest.mark.parametrize("spec_file", sorted(p.name for p in SPECS.glob("*.yaml")))
def test_every_rule_kernel_of_the_examples_is_tunable(spec_file):
    """No rule kernel is left for the tuner's 'has no bench_inputs/reference' note;
    bench_inputs takes what the plan hands it and its references run on a small shape."""
    plan = make_plan(load_spec(SPECS / spec_file))
    kernels = rule_kernel_plans(plan)
    assert kernels
    for k in kernels:
        assert k.tunable, k.name
        space = k.adapter.tunable_space(k.static)
        assert sum(len(v) > 1 for v in space.values()) >= 1, k.name  # a real space
        default = k.adapter.default_config(k.static)
        assert k.adapter.check_config(k.static, default) is None, k.name
        small = ShapeBucket(2, 8 * k.block_size)
        kw = k.bench_kwargs(small)
        inputs = k.adapter.bench_inputs(k.static, small.batch, small.seq_len, **kw,
                                        device="cpu", seed=0)
        ref = k.adapter(k.static, default, None).reference(**inputs)
        outs = _tensors(ref)
        assert outs and all(bool(torch.isfinite(t.float()).any()) for t in outs), k.name


@only_if_not_interpreted
def test_interpreter_tests_in_subprocess():
    rerun_in_interpreter(__file__)
