"""The gate rule (SeerAttention-R): first-token RoPE of the K-compression cache in training,
prefill and decode; decode scores equal the training logits; the generated scoring +
selection kernels pick exactly the reference's blocks over decode loops in which blocks fill
(block sizes 16-128, GQA groups 1-8, contiguous and paged caches, top-k and threshold)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from sparsegen.codegen.gate_kernels import GateScoreStatic, TritonGateScore  # noqa: E402
from sparsegen.methods.decode_step import GateDecoder, reference_attend  # noqa: E402
from sparsegen.methods.gate import (AttnGate, GateState, apply_rope,  # noqa: E402
                                    gate_logits_reference, pool_blocks, rope_cos_sin)
from sparsegen.methods.kv_cache import KVCache  # noqa: E402
from sparsegen.spec import SelectionSpec  # noqa: E402
from tests.interp import needs_interp, only_if_not_interpreted, rerun_in_interpreter  # noqa: E402
from tests.test_reference import masked_dense  # noqa: E402


def make_gate(Hkv=2, G=2, D=64, bs=16, dg=32, seed=0, **kw):
    gate = AttnGate(Hkv * G, Hkv, D, bs, d_gate=dg, **kw)
    gate.reset_parameters(torch.Generator().manual_seed(seed))
    if gate.rmsnorm:
        with torch.no_grad():
            gate.q_norm.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(seed + 1))
            gate.k_norm.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(seed + 2))
    return gate


@pytest.mark.parametrize("rmsnorm,pooling", [(False, ("max", "min", "mean")),
                                             (True, ("mean", "max"))])
def test_compression_cache_prefill_and_decode_equal_training(rmsnorm, pooling):
    bs = 16
    gate = make_gate(bs=bs, rmsnorm=rmsnorm, pooling=pooling)
    k = torch.randn(2, 150, 2, 64, generator=torch.Generator().manual_seed(1))
    want = gate.compress_blocks(k)                            # training path [B, NB, H, dg]
    st = GateState(gate, 2, 160)
    st.extend(0, k[0, :37], 0)                                # prefill, ends mid-block
    st.extend(0, k[0, 37:41], 37)                             # a chunk finishing nothing
    st.extend(1, k[1, :64], 0)                                # prefill on a block boundary
    seq = torch.tensor([41, 64])
    for t in range(86):                                       # decode: blocks fill one by one
        seq = seq + 1
        st.append(k[torch.arange(2), seq - 1], seq)
    for b, n in enumerate(seq.tolist()):
        nf = n // bs
        torch.testing.assert_close(st.kc[b, :, :nf].transpose(0, 1), want[b, :nf],
                                   rtol=1e-5, atol=1e-5)
        assert torch.all(st.kc[b, :, nf:] == 0)                # no entry before a block fills


def test_gate_key_is_rotated_at_the_blocks_first_token():
    bs, dg = 32, 64
    gate = make_gate(bs=bs, dg=dg, rope_theta=500.0)
    k = torch.randn(1, 4 * bs, 2, 64, generator=torch.Generator().manual_seed(2))
    st = GateState(gate, 1, 4 * bs)
    st.extend(0, k[0, :bs + 5], 0)
    for t in range(bs + 5, 4 * bs):
        st.append(k[:, t], torch.tensor([t + 1]))
    no_rope = make_gate(bs=bs, dg=dg, rope=False)
    no_rope.load_state_dict(gate.state_dict())
    stats = pool_blocks(k[0].view(4, bs, 2, 64))
    raw = no_rope.compress(stats, torch.arange(4))            # [NB, H, dg], unrotated
    for j in range(4):
        first = apply_rope(raw[j], *rope_cos_sin(torch.tensor(j * bs), dg, 500.0))
        last = apply_rope(raw[j], *rope_cos_sin(torch.tensor(j * bs + bs - 1), dg, 500.0))
        torch.testing.assert_close(st.kc[0, :, j], first, rtol=1e-5, atol=1e-5)
        if j > 0 or bs > 1:
            assert (st.kc[0, :, j] - last).abs().max() > 1e-2  # the public decode cache's error


@pytest.mark.parametrize("reduction", ["concat", "mean"])
def test_decode_scores_equal_training_logits(reduction):
    bs, S = 16, 90
    gate = make_gate(bs=bs, G=4, query_reduction=reduction)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, S, 8, 64, generator=g)
    k = torch.randn(1, S, 2, 64, generator=g)
    train = gate(q, k)                                          # [1, H, S, NB]
    st = GateState(gate, 1, S)
    for t in range(S):
        seq = torch.tensor([t + 1])
        st.append(k[:, t], seq)
        qg = gate.query(q[:, t], seq - 1)
        got = gate_logits_reference(qg, st.kc, seq, bs)[..., : train.shape[-1]]
        want = train[:, :, t]
        assert torch.equal(torch.isinf(got), torch.isinf(want))
        fin = torch.isfinite(want)
        torch.testing.assert_close(got[fin], want[fin], rtol=1e-4, atol=1e-4)


def _selection(mode, bs, budget_blocks=3, threshold=0.2):
    if mode == "topk":
        return SelectionSpec(rule="gate", block_size=bs, sink_blocks=1, local_blocks=1,
                             budget_tokens=budget_blocks * bs)
    return SelectionSpec(rule="gate", block_size=bs, sink_blocks=1, local_blocks=1,
                         threshold=threshold)


# (block size, group, layout, mode, query reduction): block sizes 16-128, groups 1-8
LOOPS = [(16, 1, "contiguous", "topk", "concat"),
         (32, 2, "paged", "threshold", "concat"),
         (64, 3, "contiguous", "topk", "mean"),
         (64, 4, "paged", "threshold", "mean"),
         (128, 8, "paged", "topk", "concat"),
         (16, 8, "contiguous", "threshold", "concat")]


@needs_interp
@pytest.mark.parametrize("bs,G,layout,mode,reduction", LOOPS)
def test_kernel_selection_equals_reference_over_decode(bs, G, layout, mode, reduction):
    """Prefill lengths that are not multiples of the block, then decode steps that fill
    blocks; at every step the kernels' selection equals the reference's exactly."""
    B, Hkv, D = 2, 2, 64
    gen = torch.Generator().manual_seed(bs + G)
    gate = make_gate(Hkv, G, D, bs, dg=32, seed=G, query_reduction=reduction)
    cap = 8 * bs
    cache = KVCache(B, Hkv, D, cap, dtype=torch.float32, layout=layout, page_size=2 * bs)
    dec = GateDecoder(gate, _selection(mode, bs, threshold=0.12), B, cap)
    lengths = [5 * bs - 7, 3 * bs - 20]
    kp, vp, knp = (torch.randn(B, lengths[0], Hkv, D, generator=gen) for _ in range(3))
    dec.prefill(cache, kp, vp, k_nope=knp, lengths=lengths)
    picked = 0
    for _ in range(24):
        q, qn = torch.randn(B, Hkv * G, D, generator=gen), torch.randn(B, Hkv * G, D, generator=gen)
        k, v, kn = (torch.randn(B, Hkv, D, generator=gen) for _ in range(3))
        cache.append(k, v)
        dec.state.append(kn, cache.seq_lens)
        want = dec.select(qn, cache, impl="torch")
        got = dec.select(qn, cache, impl="triton")
        assert torch.equal(got[1], want[1]), (got[1], want[1])
        assert torch.equal(got[0], want[0]), (got[0], want[0])
        picked += int(want[1].sum())
    nb = (cache.seq_lens + bs - 1) // bs
    assert picked < 24 * int(nb.sum()) * Hkv  # the selection was sparse somewhere


@needs_interp
@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_step_outputs(layout):
    """decode step as one call: kernel and reference paths give the same output, which
    equals an independent masked dense attention over the selected blocks."""
    B, Hkv, G, D, bs = 2, 2, 4, 64, 16
    gen = torch.Generator().manual_seed(7)
    gate = make_gate(Hkv, G, D, bs, seed=5)
    caches = [KVCache(B, Hkv, D, 200, dtype=torch.float32, layout=layout, page_size=32)
              for _ in range(2)]
    decs = [GateDecoder(gate, _selection("topk", bs, 4), B, 200, impl=impl)
            for impl in ("torch", "triton")]
    k, v, kn = (torch.randn(B, 70, Hkv, D, generator=gen) for _ in range(3))
    for dec, cache in zip(decs, caches):
        dec.prefill(cache, k, v, k_nope=kn, lengths=[70, 45])
    attend = reference_attend(bs)
    for _ in range(12):
        q, qn = torch.randn(B, Hkv * G, D, generator=gen), torch.randn(B, Hkv * G, D, generator=gen)
        kk, vv, kkn = (torch.randn(B, Hkv, D, generator=gen) for _ in range(3))
        outs = [dec.step(q, kk, vv, cache, attend, q_nope=qn, k_nope=kkn)
                for dec, cache in zip(decs, caches)]
        assert torch.equal(outs[0], outs[1])
    idx, cnt = decs[0].select(qn, caches[0])
    # independent check on a contiguous copy of the cache
    S = int(caches[0].seq_lens.max())
    kd = torch.zeros(B, S, Hkv, D)
    vd = torch.zeros(B, S, Hkv, D)
    for b in range(B):
        kb, vb = caches[0].tokens(b)
        kd[b, : kb.shape[0]], vd[b, : vb.shape[0]] = kb, vb
    want = masked_dense(q, kd, vd, idx, cnt, caches[0].seq_lens, bs)
    torch.testing.assert_close(outs[0].double(), want, rtol=1e-5, atol=1e-5)


@needs_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gate_score_kernel_matches_reference(dtype):
    gen = torch.Generator().manual_seed(11)
    qg = torch.randn(3, 2, 64, generator=gen)
    kc = torch.randn(3, 2, 40, 64, generator=gen).to(dtype)
    seq = torch.tensor([16 * 39 + 1, 16 * 10, 1], dtype=torch.int32)
    kern = TritonGateScore(GateScoreStatic(16, 64, {torch.float32: "fp32",
                                                     torch.float16: "fp16"}[dtype]))
    got = kern(qg, kc, seq)
    want = kern.reference(qg, kc, seq)
    nb = (seq.long() + 15) // 16
    for b in range(3):
        torch.testing.assert_close(got[b, :, : nb[b]], want[b, :, : nb[b]], rtol=1e-5, atol=1e-5)
    assert math.isinf(got[0, 0, 39]) and math.isinf(got[2, 0, 0])  # current block: -inf


def test_threshold_reference_semantics():
    """Reference threshold selection against a direct reading of the rule."""
    bs = 16
    gate = make_gate(bs=bs)
    dec = GateDecoder(gate, _selection("threshold", bs, threshold=0.1), 1, 160)
    cache = KVCache(1, 2, 64, 160, dtype=torch.float32)
    gen = torch.Generator().manual_seed(4)
    k = torch.randn(1, 150, 2, 64, generator=gen)
    dec.prefill(cache, k, k, k_nope=k)
    qn = torch.randn(1, 4, 64, generator=gen)
    idx, cnt = dec.select(qn, cache)
    logits = gate_logits_reference(dec.gate_query(qn, cache), dec.state.kc, cache.seq_lens, bs)
    p = torch.softmax(logits[0, :, :9], -1)                   # 150 tokens: 9 earlier blocks
    for h in range(2):
        want = sorted({0, 9} | {j for j in range(9) if p[h, j] > 0.1})
        assert idx[0, h, : cnt[0, h]].tolist() == want


def test_dense_layer_selects_every_block():
    spec_sel = _selection("topk", 16)
    dec = GateDecoder(make_gate(), spec_sel, 1, 100, dense=True)
    cache = KVCache(1, 2, 64, 100, dtype=torch.float32)
    dec.prefill(cache, torch.randn(1, 50, 2, 64), torch.randn(1, 50, 2, 64))
    idx, cnt = dec.select(None, cache)
    assert cnt.tolist() == [[4, 4]] and idx[0, 0, :4].tolist() == [0, 1, 2, 3]


@needs_interp
@pytest.mark.parametrize("G,reduction,rmsnorm,pooling,dtype",
                         [(2, "concat", False, ("max", "min", "mean"), torch.float32),
                          (3, "mean", True, ("mean", "max"), torch.float16),
                          (8, "concat", True, ("min",), torch.float32)])
def test_fused_query_and_append_kernels(G, reduction, rmsnorm, pooling, dtype):
    """gate_query / gate_append (one launch each per step) against AttnGate.query and
    GateState.append: running pools bit-exact, gate keys and queries within fp32 rounding."""
    from sparsegen.codegen.gate_kernels import GateStepStatic, TritonGateStep

    bs, D, B, H = 16, 64, 3, 2
    gate = make_gate(H, G, D, bs, dg=32, query_reduction=reduction, rmsnorm=rmsnorm,
                     pooling=pooling, rope_theta=5000.0)
    name = {torch.float32: "fp32", torch.float16: "fp16"}[dtype]
    kern = TritonGateStep(GateStepStatic.of(gate, name, "fp32"))
    gen = torch.Generator().manual_seed(G)
    q = torch.randn(B, H * G, D, generator=gen).to(dtype)
    seq = torch.tensor([1000, 17, 5], dtype=torch.int32)
    torch.testing.assert_close(kern.query(gate, q, seq, 1024),
                               gate.query(q.float(), seq.long() - 1), rtol=1e-5, atol=1e-5)
    ref, got = GateState(gate, B, 200), GateState(gate, B, 200)
    seq = torch.tensor([0, 10, 30], dtype=torch.int32)
    for _ in range(70):                       # every sequence fills blocks on the way
        seq = seq + 1
        k = torch.randn(B, H, D, generator=gen).to(dtype)
        ref.append(k.float(), seq)
        kern.append(got, k, seq)
    for a, b_ in ((ref.run_max, got.run_max), (ref.run_min, got.run_min),
                  (ref.run_sum, got.run_sum)):
        assert torch.equal(a, b_)
    torch.testing.assert_close(got.kc, ref.kc, rtol=1e-5, atol=1e-5)


def test_gate_score_config_and_compile():
    st = GateScoreStatic(64, 128, "bf16")
    assert TritonGateScore.check_config(st, TritonGateScore.default_config(st)) is None
    cfg = TritonGateScore.default_config(st)
    assert "exceed" in TritonGateScore.check_config(st, {**cfg, "block_j": 256})
    facts = TritonGateScore(st).compile_sm90()["gate_score"]
    assert facts["cubin_bytes"] > 0 and facts.get("local", 0) == 0
    from sparsegen.codegen.gate_kernels import GateStepStatic, TritonGateStep
    for f in TritonGateStep(GateStepStatic(64, 128, 4, 128)).compile_sm90().values():
        assert f["cubin_bytes"] > 0 and f.get("local", 0) == 0


@only_if_not_interpreted
def test_interpreter_tests_in_subprocess():
    rerun_in_interpreter(__file__)
