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
