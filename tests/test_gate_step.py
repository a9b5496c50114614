"""The fused per-step gate kernels (templates/triton/gate_step.py.j2: gate_query and
gate_append, adapter TritonGateStep) in Triton's interpreter against the torch reference
(AttnGate.query, GateState.append), over decode loops with mixed sequence lengths in which
blocks fill and new blocks open in the same step:

* every GQA group 1 / 4 / 8 x head dim 64 / 128 x fp16 / bf16 input, with the static options
  spread over them (pooling subsets, RoPE on / off, RMSNorm on / off, concat / mean query,
  fp32 / fp16 / bf16 compression cache), plus the H100 benchmark shape (batch 16);
* every tile config the adapter allows (its tunable space filtered by check_config), on a
  small shape where the configs give distinct kernels (several programs per head, several
  batch tiles, several chunks);
* the running pools are bit-exact, gate keys and queries within fp32 rounding (and the cache
  dtype's rounding), the per-head counters are zero after every launch.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import itertools  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from sparsegen.codegen.gate_kernels import GateStepStatic, TritonGateStep  # noqa: E402
from sparsegen.methods.gate import AttnGate, GateState  # noqa: E402
from tests.interp import needs_interp, only_if_not_interpreted, rerun_in_interpreter  # noqa: E402

DT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# relative error of a stored gate key: 1 ulp of the cache dtype (the kernel's fp32 sum and the
# reference's differ in the last fp32 bits, which can flip a rounding)
KC_RTOL = {"fp32": 1e-5, "fp16": 2.0 ** -10 + 1e-5, "bf16": 2.0 ** -7 + 1e-5}


def make_gate(Hkv, G, D, bs, dg, seed=0, **kw):
    gate = AttnGate(Hkv * G, Hkv, D, bs, d_gate=dg, rope_theta=500.0, **kw)
    gate.reset_parameters(torch.Generator().manual_seed(seed))
    if gate.rmsnorm:
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed + 1)
            gate.q_norm.uniform_(0.5, 1.5, generator=g)
            gate.k_norm.uniform_(0.5, 1.5, generator=g)
    return gate


def decode_check(gate, kern, lengths, steps, dtype, kc_dtype, seed=0):
    """Prefill `lengths` (the torch path, identical for both states), then `steps` decode
    steps of every sequence, checking gate_query and gate_append at each."""
    gen = torch.Generator().manual_seed(seed)
    B, H, D, G = len(lengths), gate.num_kv_heads, gate.head_dim, gate.group
    cap = max(lengths) + steps + 1
    ref = GateState(gate, B, cap)                       # fp32 keys: the exact reference
    got = GateState(gate, B, cap, dtype=DT[kc_dtype])
    for b, n in enumerate(lengths):
        if n:
            k = torch.randn(n, H, D, generator=gen).to(DT[dtype])
            ref.extend(b, k, 0)
            got.extend(b, k, 0)
    seq = torch.tensor(lengths, dtype=torch.int32)
    bs = gate.block_size
    filled = opened = 0
    for _ in range(steps):
        seq = seq + 1
        pos = seq.long() - 1
        filled += int((pos % bs == bs - 1).sum())
        opened += int((pos % bs == 0).sum())
        q = torch.randn(B, H * G, D, generator=gen).to(DT[dtype])
        torch.testing.assert_close(kern.query(gate, q, seq, cap),
                                   gate.query(q.float(), pos), rtol=1e-5, atol=1e-5)
        k = torch.randn(B, H, D, generator=gen).to(DT[dtype])
        ref.append(k.float(), seq)
        kern.append(got, k, seq)
        for a, b_ in ((ref.run_max, got.run_max), (ref.run_min, got.run_min),
                      (ref.run_sum, got.run_sum)):
            assert torch.equal(a, b_)
        torch.testing.assert_close(got.kc.float(), ref.kc, rtol=KC_RTOL[kc_dtype], atol=1e-6)
        for cnt in kern._cnt.values():
            assert not cnt.any()                        # the last program reset the counters
    assert filled and opened                             # the loop crossed block boundaries


# (G, D, input dtype, d_gate, pooling, rope, rmsnorm, query reduction, cache dtype, config)
ALL = ("max", "min", "mean")
SMALL = {"pairs": 4, "chunk_k": 64, "block_b": 4, "num_warps": 4}  # 2 tiles, several chunks
CASES = [
    (1, 64, "fp16", 32, ALL, True, False, "concat", "fp16", None),
    (1, 128, "bf16", 64, ("mean",), True, True, "concat", "bf16", SMALL),
    (4, 64, "bf16", 32, ALL, False, True, "mean", "fp32", SMALL),
    (4, 128, "fp16", 64, ("max", "mean"), True, False, "mean", "fp32", None),
    (8, 64, "fp16", 64, ("min",), True, True, "concat", "fp16", None),
    (8, 128, "bf16", 32, ALL, True, False, "concat", "bf16", None),
    (1, 64, "bf16", 32, ("mean", "max"), True, True, "mean", "fp32", None),
    (1, 128, "fp16", 32, ALL, False, False, "concat", "fp32", None),
    (4, 64, "fp16", 64, ("min", "mean"), True, False, "concat", "bf16", SMALL),
    (4, 128, "bf16", 32, ALL, True, True, "concat", "fp16", None),
    (8, 64, "bf16", 32, ALL, True, False, "mean", "bf16", None),
    (8, 128, "fp16", 32, ("max",), True, True, "mean", "fp32", SMALL),
]
assert {(c[0], c[1], c[2]) for c in CASES} == set(itertools.product((1, 4, 8), (64, 128),
                                                                    ("fp16", "bf16")))
# lengths after prefill: the next token fills a block (3, 7), opens one (0, 4), or lands
# mid-block (13); every sequence fills and opens blocks over the steps
LENGTHS = [3, 0, 13, 4, 7]


@needs_interp
@pytest.mark.parametrize("G,D,dtype,dg,pooling,rope,rmsnorm,reduction,kc_dtype,config", CASES)
def test_gate_step_matches_reference(G, D, dtype, dg, pooling, rope, rmsnorm, reduction,
                                     kc_dtype, config):
    gate = make_gate(2, G, D, 4, dg, seed=G + D, pooling=pooling, rope=rope, rmsnorm=rmsnorm,
                     query_reduction=reduction)
    kern = TritonGateStep(GateStepStatic.of(gate, dtype, kc_dtype), config)
    decode_check(gate, kern, LENGTHS, 5, dtype, kc_dtype, seed=G * D)


@needs_interp
def test_gate_step_benchmark_shape():
    """The H100 benchmark's shape (Hq 32 / Hkv 8 cut to 2 KV heads, D 128, d_gate 128, block
    64, bf16, default config): batch 16 in one tile, lengths around block boundaries."""
    gate = make_gate(2, 4, 128, 64, 128, seed=1)
    kern = TritonGateStep(GateStepStatic.of(gate, "bf16", "bf16"))
    assert kern.config == TritonGateStep.default_config(kern.static)
    lengths = [63, 64, 127, 0, 1, 62, 200, 191, 5, 64, 63, 128, 30, 255, 256, 100]
    decode_check(gate, kern, lengths, 2, "bf16", "bf16", seed=2)


def _allowed_configs(static):
    """Every config of the tunable space that check_config allows, one per distinct kernel
    (num_warps and chunk_k values past the shape's chunks render the same program)."""
    space = TritonGateStep.tunable_space(static)
    seen = {}
    for values in itertools.product(*space.values()):
        cfg = dict(zip(space, values))
        if TritonGateStep.check_config(static, cfg) is None:
            key = (cfg["pairs"], TritonGateStep.chunks(static, cfg["chunk_k"]),
                   cfg["block_b"])
            seen.setdefault(key, cfg)
    return list(seen.values())


SWEEP = GateStepStatic(4, 64, 2, 32, pooling=ALL, rmsnorm=True, dtype="fp16",
                       kc_dtype="fp32")


@needs_interp
def test_every_allowed_config():
    """Every allowed tile config, on a shape where they differ: d_gate 32 (1-16 programs per
    head), 128 query rows and head_dim 64 (1-4 chunks), 5 sequences (1 or 2 batch tiles).
    One step in which blocks fill, open and continue (RMSNorm: the counter path)."""
    gate = make_gate(1, 2, 64, 4, 32, seed=3, rmsnorm=True)
    assert GateStepStatic.of(gate, "fp16", "fp32") == SWEEP
    configs = _allowed_configs(SWEEP)
    assert len(configs) >= 40
    gen = torch.Generator().manual_seed(4)
    B, cap = 5, 40
    base = GateState(gate, B, cap)
    for b, n in enumerate([3, 0, 13, 4, 6]):
        if n:
            base.extend(b, torch.randn(n, 1, 64, generator=gen).half(), 0)
    seq = torch.tensor([4, 1, 14, 5, 7], dtype=torch.int32)  # fills, opens, mid, opens, mid
    q = torch.randn(B, 2, 64, generator=gen).half()
    k = torch.randn(B, 1, 64, generator=gen).half()
    want_q = gate.query(q.float(), seq.long() - 1)
    ref = GateState(gate, B, cap)
    for name in ("kc", "run_max", "run_min", "run_sum"):
        getattr(ref, name).copy_(getattr(base, name))
    ref.append(k.float(), seq)
    for cfg in configs:
        kern = TritonGateStep(SWEEP, cfg)
        torch.testing.assert_close(kern.query(gate, q, seq, cap), want_q, rtol=1e-5,
                                   atol=1e-5, msg=lambda m: f"{cfg}: {m}")
        got = GateState(gate, B, cap)
        for name in ("kc", "run_max", "run_min", "run_sum"):
            getattr(got, name).copy_(getattr(base, name))
        kern.append(got, k, seq)
        for name in ("run_max", "run_min", "run_sum"):
            assert torch.equal(getattr(got, name), getattr(ref, name)), (cfg, name)
        torch.testing.assert_close(got.kc, ref.kc, rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{cfg}: {m}")
        assert not any(c.any() for c in kern._cnt.values()), cfg


def test_configs_are_consistent():
    """default_config passes check_config (and fits the registers) for every shape the
    adapter takes; the tunable space holds feasible configs; bad configs are refused."""
    for D, G, dg, dtype, red in itertools.product((64, 128, 256), (1, 2, 3, 4, 8, 16),
                                                  (32, 64, 128, 256), ("bf16", "fp32"),
                                                  ("concat", "mean")):
        st = GateStepStatic(64, D, G, dg, query_reduction=red, dtype=dtype)
        cfg = TritonGateStep.default_config(st)
        assert TritonGateStep.check_config(st, cfg) is None, (st, cfg)
        assert max(TritonGateStep.registers(st, cfg).values()) <= TritonGateStep.REG_LIMIT
        space = TritonGateStep.tunable_space(st)
        assert all(space.values())
        assert any(TritonGateStep.check_config(st, dict(zip(space, v))) is None
                   for v in itertools.product(*space.values()))
    st = GateStepStatic(64, 128, 4, 128)
    cfg = TritonGateStep.default_config(st)
    assert cfg == {"pairs": 4, "chunk_k": 256, "block_b": 16, "num_warps": 8}
    assert TritonGateStep(st).programs_per_head == 16
    for bad, why in (({**cfg, "pairs": 3}, "power of two"), ({**cfg, "pairs": 128}, "d_gate"),
                     ({**cfg, "chunk_k": 4}, "chunk_k"), ({**cfg, "block_b": 128}, "block_b"),
                     ({**cfg, "block_b": 64, "num_warps": 2}, "registers"),
                     ({**cfg, "extra": 1}, "unknown"), ({"pairs": 4}, "missing")):
        assert why in TritonGateStep.check_config(st, bad), bad


def test_default_kernels_compile_without_spills():
    for st in (GateStepStatic(64, 128, 4, 128),
               GateStepStatic(64, 128, 8, 128, rmsnorm=True, query_reduction="mean",
                              dtype="fp16", kc_dtype="fp32")):
        for name, facts in TritonGateStep(st).compile_sm90().items():
            assert facts["cubin_bytes"] > 0, name
            assert facts.get("local", 0) == 0 and facts.get("stack", 0) == 0, (st, name, facts)


@only_if_not_interpreted
def test_interpreter_tests_in_subprocess():
    rerun_in_interpreter(__file__)
