"""The entmax rule (DashAttention): alpha-entmax against the `entmax` package in fp64, the
prefill's gradients by gradcheck, the Triton kernels (tau solve + selection, decode with the
prior, prefill forward/backward) under TRITON_INTERPRET=1 against the torch semantics, and a
long randomized decode of the incremental decoder against a from-scratch reference.

TRITON_INTERPRET must be set before triton is first imported (tests/interp.py); if another
module imported it first, the interpreter tests skip here and a subprocess reruns them.
sm_90 compilation runs in a subprocess without the interpreter (triton 3.6 cannot compile
while its standard library is interpreted).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import json  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from sparsegen.codegen.entmax_kernels import (EntmaxDecodeTriton, EntmaxStatic,  # noqa: E402
                                              EntmaxTauTriton)
from sparsegen.codegen.entmax_prefill import EntmaxPrefillTriton  # noqa: E402
from sparsegen.codegen.entmax_tau import EntmaxTau  # noqa: E402
from sparsegen.methods.sparse_decode_ref import sparse_decode_reference  # noqa: E402
from sparsegen.methods.entmax import (EntmaxDecoder, EntmaxPool, EntmaxRule, block_summaries,  # noqa: E402
                                      entmax, entmax_forward,
                                      entmax_prefill, select_blocks)
from sparsegen.methods.kv_cache import KVCache  # noqa: E402
from sparsegen.spec import load_spec  # noqa: E402
from tests.interp import (needs_interp, only_if_not_interpreted,  # noqa: E402
                          rerun_in_interpreter)
from tests.test_entmax_prefill import SMALL_PREFILL_CONFIG  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64


pytestmark = pytest.mark.usefixtures("single_thread")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------
# alpha-entmax vs the entmax package (fp64)
# ---------------------------------------------------------------------------------------
def _package(s, alpha):
    ent = pytest.importorskip("entmax")
    if alpha == 1.5:
        return ent.entmax15(s, dim=-1)
    return ent.entmax_bisect(s, alpha=alpha, dim=-1, n_iter=200)


@pytest.mark.parametrize("alpha", [1.5, 1.25, 1.75, 2.0])
def test_entmax_matches_package(alpha):
    g = _gen(int(alpha * 100))
    n = 300
    scale = torch.tensor([0.3, 1.0, 4.0, 20.0], dtype=F64).repeat(8)[:, None]
    s = torch.randn(32, n, generator=g, dtype=F64) * scale
    valid = torch.rand(32, n, generator=g) < 0.7
    valid[:, 0] = True
    ours = entmax_forward(s, valid, alpha, iters=50)
    ref = _package(s.masked_fill(~valid, -1e6), alpha)  # -1e6: far outside every support
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-10)
    assert torch.equal(ours > 0, ref > 0)
    assert not (ours[~valid] != 0).any()


@pytest.mark.parametrize("n", [64, 512, 2048, 8192])
def test_default_halley_steps_converge(n):
    """The spec's 4 Halley steps reach the converged tau on block-score-like rows."""
    g = _gen(n)
    s = torch.randn(16, n, generator=g, dtype=F64) * torch.linspace(0.5, 8, 16, dtype=F64)[:, None]
    valid = torch.ones_like(s, dtype=torch.bool)
    four = entmax_forward(s, valid, 1.5, iters=4)
    exact = _package(s, 1.5)
    assert (four - exact).abs().max() < 1e-6
    assert torch.equal(four > 1e-9, exact > 1e-9)


@pytest.mark.parametrize("alpha", [1.5, 1.3])
def test_entmax_backward_matches_package(alpha):
    g = _gen(7)
    s = (torch.randn(6, 40, generator=g, dtype=F64) * 3).requires_grad_()
    r = torch.randn(6, 40, generator=g, dtype=F64)
    (entmax(s, None, alpha, iters=50) * r).sum().backward()
    ours = s.grad.clone()
    s.grad = None
    (_package(s, alpha) * r).sum().backward()
    torch.testing.assert_close(ours, s.grad, rtol=1e-7, atol=1e-9)


# ---------------------------------------------------------------------------------------
# prefill: gradients reach q, k, v and the pooling vector
# ---------------------------------------------------------------------------------------
def _prefill_inputs(B, T, Hkv, G, D, dtype, seed, requires_grad=True):
    g = _gen(seed)
    t = [torch.randn(B, T, Hkv * G, D, generator=g), torch.randn(B, T, Hkv, D, generator=g),
         torch.randn(B, T, Hkv, D, generator=g), 0.5 * torch.randn(Hkv, D, generator=g)]
    return [x.to(dtype).requires_grad_(requires_grad) for x in t]


@pytest.mark.parametrize("prior", [True, False])
def test_prefill_gradcheck(prior):
    rule = EntmaxRule(block_size=4, sink_blocks=1, local_blocks=1, scale=6.0,
                      halley_iters=40, prior=prior)
    q, k, v, w = _prefill_inputs(1, 22, 1, 2, 4, F64, seed=3)
    out, sel = entmax_prefill(q, k, v, w, rule)
    cand = sel.pbar.numel()
    assert 0 < int((sel.pbar > 0).sum()) < cand, "want a partial support: some blocks skipped"

    def fn(q, k, v, w):
        return entmax_prefill(q, k, v, w, rule)[0]
    assert torch.autograd.gradcheck(fn, (q, k, v, w), eps=1e-6, atol=1e-6, rtol=1e-4)
    out.square().sum().backward()
    if prior:
        assert w.grad.abs().sum() > 0  # the pooling vector learns through summaries + p


def test_prefill_selection_is_causal_with_always_on_blocks():
    rule = EntmaxRule(block_size=4, sink_blocks=1, local_blocks=2, scale=5.0)
    q, k, v, w = _prefill_inputs(2, 45, 2, 2, 8, torch.float32, seed=4, requires_grad=False)
    _, sel = entmax_prefill(q, k, v, w, rule)
    nq = sel.mask.shape[-1]
    i = torch.arange(nq)[:, None]
    j = torch.arange(nq)[None, :]
    assert not (sel.mask & (j > i)).any()                       # causal
    forced = ((j < 1) | (j > i - 2)) & (j <= i)
    assert sel.mask[:, :, forced].all()                          # sink, local, diagonal
    cand = (j >= 1) & (j <= i - 2)
    assert (sel.mask[:, :, cand].float().mean() < 1)             # sparse elsewhere


# ---------------------------------------------------------------------------------------
# Triton kernels under the interpreter
# ---------------------------------------------------------------------------------------
@needs_interp
@pytest.mark.parametrize("alpha,sink,local,chunk,scale,G,tiles", [
    (1.5, 1, 1, 16, 6.0, 4, 1), (1.5, 0, 2, 64, 2.0, 4, 2), (1.25, 2, 1, 16, 6.0, 4, 1),
    (2.0, 1, 3, 32, 8.0, 4, 4), (1.5, 1, 1, 64, 6.0, 1, 1), (1.5, 1, 2, 16, 4.0, 8, 2),
    (1.5, 1, 1, 32, 6.0, 3, 8)])
def test_tau_kernel_matches_torch(alpha, sink, local, chunk, scale, G, tiles):
    """tiles: 16-block tiles a scoring program walks (the candidate range ends inside one;
    at 8 one program covers every block of a row)."""
    B, Hkv, D, bs = 3, 2, 32, 16
    st = EntmaxStatic(block_size=bs, head_dim=D, group_size=G, dtype="fp32",
                      sink_blocks=sink, local_blocks=local, alpha=alpha)
    rule = EntmaxRule(block_size=bs, sink_blocks=sink, local_blocks=local, alpha=alpha,
                      scale=scale)
    cap = 48
    g = _gen(11)
    summ = torch.randn(B, Hkv, cap, D, generator=g)
    q = torch.randn(B, Hkv * G, D, generator=g)
    lengths = [700, 50, 17]
    seq = torch.tensor(lengths, dtype=torch.int32)
    kern = EntmaxTauTriton(st, {"block_j": 16, "tiles": tiles, "stages": 2, "chunk": chunk,
                                "num_warps": 4, "select_warps": 4}, scale=scale)
    got = kern(q, summ, seq, lengths)
    want = select_blocks(q, summ, seq, rule, width=cap)
    exact = select_blocks(q.double(), summ.double(), seq, rule, width=cap, compute_dtype=F64)
    assert torch.equal(got.counts, want.counts)
    for b in range(B):
        for h in range(Hkv):
            assert got.blocks(b, h) == want.blocks(b, h) == exact.blocks(b, h)
            c = int(got.counts[b, h])
            torch.testing.assert_close(got.bias[b, h, :c], exact.bias[b, h, :c].float(),
                                       rtol=1e-4, atol=1e-4)
    assert int(got.counts[0].min()) < math.ceil(700 / bs)  # sparse for the long sequence


@needs_interp
def test_tilelang_tau_off_a_gpu_runs_the_triton_pair():
    """algo=tilelang on CPU tensors (here under the interpreter) selects with the Triton pair
    at its default config, which matches the torch rule."""
    B, Hkv, G, D, bs, cap = 3, 2, 4, 64, 16, 40
    st = EntmaxStatic(block_size=bs, head_dim=D, group_size=G, dtype="fp16")
    kern = EntmaxTau(st, EntmaxTau.seed_configs(st)[0], scale=6.0)
    assert kern.tilelang is not None
    g = _gen(5)
    summ = torch.randn(B, Hkv, cap, D, generator=g).half()
    q = torch.randn(B, Hkv * G, D, generator=g).half()
    lengths = [cap * bs, 300, 9]
    seq = torch.tensor(lengths, dtype=torch.int32)
    got = kern(q, summ, seq, lengths)
    want = select_blocks(q, summ, seq, st.rule(6.0), width=cap)
    assert torch.equal(got.counts, want.counts)
    for b in range(B):
        for h in range(Hkv):
            assert got.blocks(b, h) == want.blocks(b, h)


@needs_interp
@pytest.mark.parametrize("bs,block_n,layout,prior,dtype", [
    (16, 16, "contiguous", True, "fp32"), (32, 16, "paged", True, "fp32"),
    (16, 32, "contiguous", True, "fp16"), (16, 32, "paged", False, "fp32")])
def test_decode_kernel_matches_reference(bs, block_n, layout, prior, dtype):
    B, Hkv, G, D = 2, 2, 4, 32
    dt = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    lengths = [300, 77]
    g = _gen(5)
    seq = torch.tensor(lengths, dtype=torch.int32)
    q = torch.randn(B, Hkv * G, D, generator=g)
    k = torch.randn(B, 320, Hkv, D, generator=g)
    v = torch.randn(B, 320, Hkv, D, generator=g)
    rule = EntmaxRule(block_size=bs, scale=6.0, prior=prior)
    summ = block_summaries(k, torch.zeros(Hkv, D), bs).contiguous()
    sel = select_blocks(q, summ, seq, rule, width=summ.shape[2] + 2)
    bias = sel.bias if prior else None
    want = sparse_decode_reference(q, k, v, sel.indices, sel.counts, seq, bs, block_bias=bias)
    st = EntmaxStatic(block_size=bs, head_dim=D, group_size=G, dtype=dtype, layout=layout,
                      page_size=2 * bs if layout == "paged" else 0, prior=prior)
    kern = EntmaxDecodeTriton(st, {**EntmaxDecodeTriton.default_config(st), "block_n": block_n,
                                   "num_stages": 1, "num_warps": 2})
    table = None
    kk, vv = k, v
    if layout == "paged":  # scatter the cache into shuffled pages
        ps = 2 * bs
        per = 320 // ps
        perm = torch.randperm(B * per, generator=g)
        table = perm.view(B, per).to(torch.int32)
        kk = torch.empty(B * per, ps, Hkv, D)
        vv = torch.empty_like(kk)
        kk[perm] = k.view(B * per, ps, Hkv, D)
        vv[perm] = v.view(B * per, ps, Hkv, D)
    got = kern(q.to(dt), kk.to(dt), vv.to(dt), sel.indices, sel.counts, seq, block_table=table,
               block_bias=bias, num_splits=3)
    tol = 1e-4 if dtype == "fp32" else 2e-2
    torch.testing.assert_close(got.float(), want, rtol=0, atol=tol)


@needs_interp
def test_prefill_kernels_match_torch_path():
    B, Hkv, G, D, bs, T = 2, 2, 2, 32, 16, 90
    rule = EntmaxRule(block_size=bs, sink_blocks=1, local_blocks=1, scale=6.0)
    st = EntmaxStatic(block_size=bs, head_dim=D, group_size=G, dtype="fp32")
    kern = EntmaxPrefillTriton(st, SMALL_PREFILL_CONFIG)
    results = []
    for attention in (None, kern.attention):
        q, k, v, w = _prefill_inputs(B, T, Hkv, G, D, torch.float32, seed=1)
        out, sel = entmax_prefill(q, k, v, w, rule, attention=attention)
        do = torch.randn(out.shape, generator=_gen(2))
        out.backward(do)
        results.append((out.detach(), q.grad, k.grad, v.grad, w.grad))
    assert 0 < sel.mask.float().mean() < 0.9
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------
# long randomized decode: incremental decoder vs from-scratch reference
# ---------------------------------------------------------------------------------------
def scratch_step(q, K, V, lengths, w, rule):
    """One decode step from the whole history, by the definition: summaries of every full
    block, entmax per query head over the candidates, group mean, support + always-on,
    dense softmax over the selected tokens with log p_bar on candidate blocks."""
    B, Hq, D = q.shape
    Hkv = K.shape[2]
    G, bs = Hq // Hkv, rule.block_size
    out = torch.zeros(B, Hq, D, dtype=F64)
    sels = {}
    for b, n in enumerate(lengths):
        nb, full = math.ceil(n / bs), n // bs
        kbar = block_summaries(K[b:b + 1, : full * bs], w, bs, F64)[0]  # [Hkv, full, D]
        cand = list(range(rule.sink_blocks, max(nb - rule.local_blocks, rule.sink_blocks)))
        always = (set(range(min(rule.sink_blocks, nb)))
                  | set(range(max(0, nb - rule.local_blocks), nb)))
        for h in range(Hkv):
            qg = q[b, h * G:(h + 1) * G].double()
            bias = {}
            if cand:
                s = qg @ kbar[h, cand].T * (rule.scale / math.sqrt(D))
                p = entmax_forward(s, torch.ones_like(s, dtype=torch.bool), rule.alpha,
                                   rule.halley_iters).mean(0)
                bias = {j: math.log(float(p[i])) for i, j in enumerate(cand) if p[i] > 0}
            chosen = sorted(always | set(bias))
            sels[b, h] = chosen
            pos = torch.tensor([j * bs + t for j in chosen for t in range(bs) if j * bs + t < n])
            logits = qg @ K[b, pos, h].double().T / math.sqrt(D)
            if rule.prior:
                logits = logits + torch.tensor([bias.get(int(t) // bs, 0.0) for t in pos],
                                               dtype=F64)
            out[b, h * G:(h + 1) * G] = torch.softmax(logits, -1) @ V[b, pos, h].double()
    return out, sels


@pytest.mark.parametrize("layout,prior", [("contiguous", True), ("paged", True),
                                          ("contiguous", False)])
def test_long_decode_matches_scratch_reference(layout, prior):
    steps = {("contiguous", True): 2000, ("paged", True): 1200, ("contiguous", False): 600}[
        (layout, prior)]
    B, Hkv, G, D, bs = 2, 2, 2, 16, 8
    rule = EntmaxRule(block_size=bs, sink_blocks=1, local_blocks=2, scale=5.0, prior=prior)
    pre = [37, 20]
    cap = max(pre) + steps + 8
    g = _gen(21)
    w = 0.3 * torch.randn(Hkv, D, generator=g, dtype=F64)
    cache = KVCache(B, Hkv, D, cap, dtype=F64, layout=layout,
                    page_size=16 if layout == "paged" else 0)
    dec = EntmaxDecoder(rule, Hkv * G, Hkv, D, pool=EntmaxPool(Hkv, D, w), compute_dtype=F64)
    K = torch.randn(B, cap, Hkv, D, generator=g, dtype=F64)
    V = torch.randn(B, cap, Hkv, D, generator=g, dtype=F64)
    # ragged prompts: sequence 1 starts shorter, so both hit block boundaries at other steps
    dec.prefill(cache, K[:, : max(pre)], V[:, : max(pre)], lengths=pre)
    lengths = list(pre)
    sizes = []
    for t in range(steps):
        q = torch.randn(B, Hkv * G, D, generator=g, dtype=F64) * (1 + (t % 7))
        k_new = torch.stack([K[b, lengths[b]] for b in range(B)])
        v_new = torch.stack([V[b, lengths[b]] for b in range(B)])
        out = dec.step(q, k_new, v_new, cache)
        lengths = [n + 1 for n in lengths]
        if t % 10 == 0 or t == steps - 1:  # reference every few steps: same state path
            want, sels = scratch_step(q, K, V, lengths, w, rule)
            for (b, h), blocks in sels.items():
                assert dec.last_selection.blocks(b, h) == blocks, (t, b, h)
            torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-9)
            sizes.append(int(dec.last_selection.counts.sum()))
    nb_total = sum(math.ceil(n / bs) for n in lengths) * Hkv
    assert sizes[-1] < 0.8 * nb_total, "the rule should skip blocks on long sequences"


@needs_interp
def test_decoder_on_triton_kernels_matches_torch_decoder():
    B, Hkv, G, D, bs = 2, 2, 4, 32, 16
    rule = EntmaxRule(block_size=bs, sink_blocks=1, local_blocks=1, scale=6.0)
    st = EntmaxStatic(block_size=bs, head_dim=D, group_size=G, dtype="fp32")
    g = _gen(8)
    w = 0.3 * torch.randn(Hkv, D, generator=g)
    prompt_k = torch.randn(B, 200, Hkv, D, generator=g)
    prompt_v = torch.randn(B, 200, Hkv, D, generator=g)
    decs, caches = [], []
    kern_sel = EntmaxTauTriton(st, {"block_j": 16, "tiles": 1, "stages": 1, "chunk": 16,
                                    "num_warps": 4, "select_warps": 4}, scale=rule.scale)
    kern_att = EntmaxDecodeTriton(st, {**EntmaxDecodeTriton.default_config(st),
                                       "block_n": 16, "num_stages": 1, "num_warps": 2})
    for selector in (None, kern_sel):
        cache = KVCache(B, Hkv, D, 256, dtype=torch.float32)
        dec = EntmaxDecoder(rule, Hkv * G, Hkv, D, pool=EntmaxPool(Hkv, D, w), selector=selector)
        dec.prefill(cache, prompt_k, prompt_v, lengths=[200, 190])
        decs.append(dec)
        caches.append(cache)
    for t in range(6):  # crosses the block boundary at 192 for sequence 1
        q = torch.randn(B, Hkv * G, D, generator=g) * 2
        kv = torch.randn(2, B, Hkv, D, generator=g)
        want = decs[0].step(q, kv[0], kv[1], caches[0])
        got = decs[1].step(q, kv[0], kv[1], caches[1], attend=kern_att)
        a, b = decs[1].last_selection, decs[0].last_selection
        assert torch.equal(a.counts, b.counts)
        for bb in range(B):
            for h in range(Hkv):
                assert a.blocks(bb, h) == b.blocks(bb, h)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------
# configs, spec, sm_90
# ---------------------------------------------------------------------------------------
def test_configs_defaults_valid_and_bad_rejected():
    for st in (EntmaxStatic(64, 128, 4, "bf16"), EntmaxStatic(16, 64, 1, "fp16"),
               EntmaxStatic(128, 128, 8, "bf16", "paged", 128, alpha=1.3, prior=False)):
        for cls in (EntmaxTauTriton, EntmaxTau, EntmaxDecodeTriton, EntmaxPrefillTriton):
            cfg = cls.default_config(st)
            assert cls.check_config(st, cfg) is None, (cls, st)
            space = cls.tunable_space(st)
            assert set(space) == set(cfg) and all(cfg[k] in v for k, v in space.items())
    st = EntmaxStatic(32, 128, 4, "bf16")
    bad = {**EntmaxPrefillTriton.default_config(st), "kv_n": 64}
    assert "dividing block_size" in EntmaxPrefillTriton.check_config(st, bad)
    assert "unknown" in EntmaxTauTriton.check_config(st, {**EntmaxTauTriton.default_config(st),
                                                         "x": 1})
    with pytest.raises(ValueError):
        EntmaxPrefillTriton(st, bad)


def test_tilelang_tau_configs():
    """EntmaxTau's algo: TileLang seeds (one CTA a row and a 2-CTA cluster) are feasible for
    bf16 / fp16 statics; the TileLang corners (dtype, warps, tile, shared memory, cluster,
    unused Triton keys) and the Triton bounds are named when rejected."""
    st = EntmaxStatic(64, 128, 4, "bf16")
    seeds = EntmaxTau.seed_configs(st)
    assert len(seeds) == 5 and all(EntmaxTau.check_config(st, c) is None for c in seeds)
    assert sorted(c["cluster"] for c in seeds) == [1, 1, 1, 1, 2]
    assert sorted(c["head_split"] for c in seeds) == [0, 0, 0, 1, 1]
    space = EntmaxTau.tunable_space(st)
    assert all(c[k] in space[k] for c in seeds for k in c)
    assert EntmaxTau.seed_configs(EntmaxStatic(64, 128, 4, "fp32")) == []
    tl = seeds[0]
    for bad, words in [({"num_warps": 4}, "(256, 512) threads"), ({"block_j": 32}, "block_j"),
                       ({"cluster": 3}, "cluster=3"), ({"cluster": None}, "cluster"),
                       ({"head_split": 2}, "head_split=2"),
                       ({"num_warps": 16, "block_j": 64}, ">= 128"),
                       ({"block_j": 256, "stages": 3}, "exceed 128 KB"),
                       ({"chunk": 256}, "chunk is unused"), ({"algo": "cuda"}, "algo")]:
        assert words in EntmaxTau.check_config(st, {**tl, **bad}), bad
    assert "tilelang: dtype" in EntmaxTau.check_config(EntmaxStatic(64, 128, 4, "fp32"), tl)
    assert "at most 8 warps" in EntmaxTau.check_config(
        st, {**EntmaxTau.default_config(st), "num_warps": 16})
    assert "no cluster" in EntmaxTau.check_config(st, {**EntmaxTau.default_config(st),
                                                       "cluster": 2})
    assert "no head_split" in EntmaxTau.check_config(st, {**EntmaxTau.default_config(st),
                                                          "head_split": 1})
    g7 = EntmaxStatic(64, 128, 7, "bf16")   # 7 query heads do not split 8 or 16 warps
    assert [c["head_split"] for c in EntmaxTau.seed_configs(g7)] == [0, 0, 0]
    assert "does not split 8 warps" in EntmaxTau.check_config(g7, {**tl, "head_split": 1})
    with pytest.raises(ValueError):
        EntmaxTau(EntmaxStatic(64, 128, 4, "fp32"), tl)


def test_tuner_draws_entmax_tau_keys_per_algo():
    """The tuner's space for the example spec's entmax_tau branches on algo: under tilelang
    the Triton-only keys are fixed at their defaults, under triton the cluster at 1 and the
    tiles / warps within the Triton kernels' bounds (no trial wasted on a mix)."""
    from sparsegen.plan import make_plan, rule_kernel_plans
    from sparsegen.tune.space import SearchSpace

    plan = make_plan(load_spec(ROOT / "examples/specs/dash-entmax.yaml"))
    tau = next(k for k in rule_kernel_plans(plan) if k.name == "entmax_tau")
    (backend,) = tau.backends
    branches = SearchSpace(tau).branches(backend)
    default = EntmaxTau.default_config(tau.static)
    tl, tr = branches["tilelang"], branches["triton"]
    assert all(tl[k] == [default[k]] for k in ("tiles", "chunk", "select_warps"))
    assert tl["num_warps"] == [8, 16] and tl["block_j"] == [64, 128, 256]
    assert tl["cluster"] == [1, 2, 4] and tr["cluster"] == [1]
    assert tl["head_split"] == [0, 1] and tr["head_split"] == [0]
    assert max(tr["num_warps"]) == 8 and max(tr["block_j"]) == 128


@pytest.mark.parametrize("st", [EntmaxStatic(64, 128, 4, "bf16"),
                                EntmaxStatic(32, 64, 7, "fp16", alpha=1.3, prior=False)],
                         ids=["bf16-d128-g4", "fp16-d64-g7-a1.3"])
def test_tilelang_tau_compiles_for_sm90(st):
    """The TileLang tau kernel lowers and nvcc-compiles for sm_90a with no GPU (each seed, and
    a 4-CTA cluster of 512 threads)."""
    seeds = EntmaxTau.seed_configs(st)
    for cfg in [*seeds, dict(seeds[1], cluster=4)]:
        facts = EntmaxTau(st, cfg).compile_sm90()
        assert facts["tilelang_entmax_tau"]["cubin_bytes"] > 0


WORKER_PREWARM = r'''
import json, sys
from pathlib import Path
from sparsegen.codegen.entmax_kernels import EntmaxStatic
from sparsegen.codegen.entmax_tau import EntmaxTau
from sparsegen.codegen.tilelang_build import compile_for_arch
from sparsegen.tune.worker import compile_candidate

cache, build = Path(sys.argv[1]), sys.argv[2]
st = EntmaxStatic(64, 128, 4, "bf16")
cfg = EntmaxTau.seed_configs(st)[0]
task = {"adapter": "sparsegen.codegen.entmax_tau:EntmaxTau", "static": st.as_dict(),
        "static_cls": "sparsegen.codegen.entmax_kernels:EntmaxStatic", "config": cfg,
        "build_dir": build, "workload": {"kind": "rule", "batch": 2, "seq_len": 64 * 300}}
facts = compile_candidate(task)
kernels = sorted(cache.rglob("executable.so"))
stamps = [p.stat().st_mtime_ns for p in kernels]
tl = EntmaxTau(st, cfg, Path(build)).tilelang
compile_for_arch(tl._module(tl.nmax(300)), "sm_90a")   # what the GPU child's first call builds
after = sorted(cache.rglob("executable.so"))
print(json.dumps({"prewarm": facts.get("tilelang_prewarm"), "kernels": len(kernels),
                  "after": len(after), "rewritten": [p.stat().st_mtime_ns for p in after] != stamps}))
'''


def test_tuner_worker_builds_the_tau_kernel_its_gpu_child_will_load(tmp_path):
    """The tuner's CPU worker compiles a TileLang tau candidate, for the workload's row
    length, into TileLang's disk cache: the GPU child's first call then finds that entry
    (nothing new built or written) instead of compiling while it holds the GPU."""
    import os

    cache = tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-c", WORKER_PREWARM, str(cache), str(tmp_path / "b")],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TILELANG_CACHE_DIR": str(cache),
                               "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {"prewarm": 1, "kernels": 1, "after": 1, "rewritten": False}, got


def test_from_spec():
    spec = load_spec(ROOT / "examples/specs/dash-entmax.yaml")
    rule = EntmaxRule.from_spec(spec)
    assert (rule.alpha, rule.halley_iters, rule.prior, rule.block_size) == (1.5, 4, True, 64)
    st = EntmaxStatic.from_spec(spec)
    assert st.group_size == 4 and st.dtype == "bf16"
    dec = EntmaxDecoder.from_spec(spec)
    assert dec.w.shape == (8, 128) and not dec.w.any()  # zero init: summaries start as means
    assert not dec.w.requires_grad and dec.pool.w.requires_grad  # the decode reads, never trains


def test_pool_weight_checked_and_copied():
    w = torch.randn(2, 16)
    pool = EntmaxPool(2, 16, w)
    w.zero_()
    assert pool.w.abs().sum() > 0      # a copy: the caller's tensor stays theirs
    with pytest.raises(ValueError, match=r"\[num_kv_heads, head_dim\] = \[2, 32\]"):
        EntmaxPool(2, 32, torch.zeros(2, 16))


_COMPILE = r"""
import json, sys
from sparsegen.codegen.entmax_kernels import *
from sparsegen.codegen.entmax_prefill import *
from sparsegen.codegen.milestone_kernels import *
out = {}
for name, st in [("bf16-64-128", EntmaxStatic(64, 128, 4, "bf16")),
                 ("fp16-128-64-paged", EntmaxStatic(128, 64, 8, "fp16", "paged", 128, alpha=1.3))]:
    for cls in (EntmaxTauTriton, EntmaxDecodeTriton, EntmaxPrefillTriton):
        out[name + "/" + cls.__name__] = cls(st).compile_sm90()
out["milestone"] = MilestoneScoreTriton(MilestoneStatic(128, 4, "bf16")).compile_sm90()
print(json.dumps(out))
"""


def test_compile_sm90_in_subprocess():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    facts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(facts) == 7
    for name, kernels in facts.items():
        for kernel, f in kernels.items():
            assert f["cubin_bytes"] > 0, (name, kernel)
            # defaults are spill-free (cuobjdump figures), except the prefill's: its 64-row
            # tiles at 4 warps spill at D 128 and still measured 3.6x faster than the
            # spill-free 32-row tiles (bench/results/H100-entmax-prefill-probe.md)
            if "local" in f and "entmax_prefill" not in kernel:
                assert f["local"] == 0 and f.get("stack", 0) == 0, (name, kernel, f)


@only_if_not_interpreted
def test_interpreter_tests_in_subprocess():
    rerun_in_interpreter(__file__)
