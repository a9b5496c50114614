"""The emitted SparseAttentionLayer on a CUDA GPU: the generated scoring / selection kernels
and the tuned attention (impl "triton") against the same layer with the torch method
reference for scoring and selection (impl "torch"), in the spec's dtype, over a decode with mixed lengths.
Skipped without a GPU (CI has none); run on an H100 with
`python -m pytest -q tests/test_emitted_layer_gpu.py`."""
from __future__ import annotations


import pytest
import torch

from sparsegen.codegen.triton_kernel import torch_dtype
from sparsegen.emit import build_package, load_package
from sparsegen.plan import make_plan
from sparsegen.spec import load_spec

from .graphs import assert_equal_lists
from .test_emitted_layer import SPECS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("spec_path", SPECS, ids=lambda p: p.stem)
def test_layer_on_gpu_matches_torch_selection(spec_path, tmp_path):
    spec = load_spec(spec_path)
    mod = load_package(build_package(make_plan(spec), tmp_path))
    m, rule = spec.model, spec.selection.rule
    batch, capacity, prompt = 3, 8192, 5000
    dt = torch_dtype(m.dtype)
    torch.manual_seed(0)
    fast = mod.SparseAttentionLayer(batch, capacity, device="cuda", dtype=dt)
    ref = mod.SparseAttentionLayer(batch, capacity, device="cuda", dtype=dt, impl="torch",
                                   gate=getattr(fast, "gate", None))
    g = torch.Generator(device="cuda").manual_seed(1)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", generator=g).to(dt)
    k, v = randn(batch, prompt, m.num_kv_heads, m.head_dim), randn(batch, prompt,
                                                                   m.num_kv_heads, m.head_dim)
    lengths = [prompt, prompt - 1013, 77]  # mixed, not multiples of the block, one short
    extra = {}
    if rule == "gate":
        extra = {"k_nope": randn(batch, prompt, m.num_kv_heads, m.head_dim)}
    fast.prefill(k, v, lengths=lengths, **extra)
    ref.prefill(k, v, lengths=lengths, **extra)
    worst = 0.0
    for _ in range(64):
        q = randn(batch, m.num_q_heads, m.head_dim)
        k_new, v_new = randn(batch, m.num_kv_heads, m.head_dim), randn(batch, m.num_kv_heads,
                                                                       m.head_dim)
        extra = {}
        if rule == "gate":
            extra = {"q_nope": randn(batch, m.num_q_heads, m.head_dim),
                     "k_nope": randn(batch, m.num_kv_heads, m.head_dim)}
        got = fast(q, k_new, v_new, **extra)
        want = ref(q, k_new, v_new, **extra)
        assert torch.isfinite(got).all()
        worst = max(worst, _rel(got, want))
    assert worst < 2e-2, worst
    assert fast.cache.lengths == ref.cache.lengths == [n + 64 for n in lengths]


@pytest.mark.parametrize("spec_path", SPECS, ids=lambda p: p.stem)
def test_layer_steps_replay_from_a_cuda_graph(spec_path, tmp_path):
    """The emitted layer as a model serves it: 70 decode steps (every sequence of a
    mixed-length batch crosses a block boundary and, paged, opens pages) captured in one
    CUDA graph and replayed on fresh inputs, three times, equal an eager twin layer bit for
    bit. (Milestone evictions inside a graph: tests/test_milestone_gpu.py.)"""
    spec = load_spec(spec_path)
    mod = load_package(build_package(make_plan(spec), tmp_path))
    m, rule = spec.model, spec.selection.rule
    batch, capacity, prompt, steps = 3, 8192, 3000, 70
    dt = torch_dtype(m.dtype)
    graph_layer = mod.SparseAttentionLayer(batch, capacity, device="cuda", dtype=dt)
    eager_layer = mod.SparseAttentionLayer(batch, capacity, device="cuda", dtype=dt,
                                           gate=getattr(graph_layer, "gate", None))
    layers = (graph_layer, eager_layer)
    g = torch.Generator(device="cuda").manual_seed(4)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", generator=g).to(dt)

    def inputs():
        x = {"q": randn(batch, m.num_q_heads, m.head_dim),
             "k_new": randn(batch, m.num_kv_heads, m.head_dim),
             "v_new": randn(batch, m.num_kv_heads, m.head_dim)}
        if rule == "gate":
            x.update(q_nope=randn(batch, m.num_q_heads, m.head_dim),
                     k_nope=randn(batch, m.num_kv_heads, m.head_dim))
        return x

    kv = [randn(batch, prompt, m.num_kv_heads, m.head_dim) for _ in range(3)]
    extra = {"k_nope": kv[2]} if rule == "gate" else {}
    if rule == "entmax":
        with torch.no_grad():
            graph_layer.pool.w.normal_(generator=g)
            eager_layer.pool.w.copy_(graph_layer.pool.w)
    for layer in layers:
        layer.prefill(kv[0], kv[1], lengths=[prompt, prompt - 1013, 77], **extra)
    for _ in range(3):  # eager steps first: kernels built, lazy buffers made
        x = inputs()
        for layer in layers:
            layer(**x)
    static = [inputs() for _ in range(steps)]
    for layer in layers:   # the same page mapping in both (paged specs)
        layer.cache.reserve(steps)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [graph_layer(**x) for x in static]
    for cycle in range(3):
        if cycle:   # fresh inputs into the graph's, and the host told of the replay
            for dst in static:
                for key, t in inputs().items():
                    dst[key].copy_(t)
            for layer in layers:
                layer.cache.reserve(steps)
        graph.replay()
        if cycle:
            graph_layer.replayed(steps)
        want = [eager_layer(**x) for x in static]
        torch.cuda.synchronize()
        assert graph_layer.cache.lengths == eager_layer.cache.lengths
        assert torch.equal(graph_layer.cache.seq_lens, eager_layer.cache.seq_lens)
        assert_equal_lists(outs, want, (cycle, "output"))


def test_entmax_layer_prefill_attention_on_gpu(tmp_path):
    """The entmax layer's training forward on the GPU (Triton block level and the tuned
    token-level kernels, bf16) against the same layer's torch path in fp32: output and the
    gradients of q, k, v and the pool; a prompt that is no multiple of the block."""
    spec = load_spec(next(p for p in SPECS if p.stem == "dash-entmax"))
    mod = load_package(build_package(make_plan(spec), tmp_path))
    m = spec.model
    fast = mod.SparseAttentionLayer(1, 4096, device="cuda")
    ref = mod.SparseAttentionLayer(1, 4096, device="cuda", dtype=torch.float32, impl="torch")
    g = torch.Generator(device="cuda").manual_seed(2)
    with torch.no_grad():
        fast.pool.w.normal_(generator=g)
        ref.pool.w.copy_(fast.pool.w)
    T = 3000
    q = torch.randn(1, T, m.num_q_heads, m.head_dim, device="cuda", generator=g)
    k, v = (torch.randn(1, T, m.num_kv_heads, m.head_dim, device="cuda", generator=g)
            for _ in range(2))
    do = torch.randn(q.shape, device="cuda", generator=g)
    res = []
    for layer, dt in ((fast, torch.bfloat16), (ref, torch.float32)):
        leaves = [t.to(dt).requires_grad_() for t in (q, k, v)]
        out = layer.prefill_attention(*leaves)
        out.backward(do.to(dt))
        res.append([out] + [t.grad for t in leaves] + [layer.pool.w.grad])
    for name, a, b in zip(("out", "dq", "dk", "dv", "dw"), *res):
        assert torch.isfinite(a).all(), name
        assert _rel(a, b) < 3e-2, (name, _rel(a, b))
