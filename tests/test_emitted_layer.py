"""The emitted package's SparseAttentionLayer: one decode step of each rule as one call, on
the CPU, against the same rule driven by hand with the torch reference attention."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sparsegen.emit import build_package, load_package
from sparsegen.methods.decode_step import reference_attend
from sparsegen.methods.decoders import make_cache, make_decoder
from sparsegen.plan import make_plan
from sparsegen.spec import load_spec

SPECS = sorted((Path(__file__).resolve().parents[1] / "examples" / "specs").glob("*.yaml"))


def _rule_inputs(rule, g, batch, kv_heads, q_heads, dim, tokens=None):
    """The gate rule also takes the pre-RoPE query and key (its inputs)."""
    if rule != "gate":
        return {}
    if tokens is not None:
        return {"k_nope": torch.randn(batch, tokens, kv_heads, dim, generator=g)}
    return {"q_nope": torch.randn(batch, q_heads, dim, generator=g),
            "k_nope": torch.randn(batch, kv_heads, dim, generator=g)}


@pytest.mark.parametrize("spec_path", SPECS, ids=lambda p: p.stem)
def test_layer_step_matches_the_rule_driven_by_hand(spec_path, tmp_path):
    spec = load_spec(spec_path)
    mod = load_package(build_package(make_plan(spec), tmp_path))
    m, rule = spec.model, spec.selection.rule
    batch, capacity, prompt = 2, 512, 300
    torch.manual_seed(0)
    layer = mod.SparseAttentionLayer(batch, capacity, dtype=torch.float32, impl="torch")
    cache = make_cache(spec, batch, capacity, dtype=torch.float32)
    decoder = make_decoder(spec, cache, impl="torch", gate=layer.gate)
    attend = reference_attend(spec.selection.block_size)
    if rule == "entmax":
        attend = None  # the decoder's own reference carries the log-p prior

    g = torch.Generator().manual_seed(1)
    k = torch.randn(batch, prompt, m.num_kv_heads, m.head_dim, generator=g)
    v = torch.randn(batch, prompt, m.num_kv_heads, m.head_dim, generator=g)
    lengths = [prompt, prompt - 113]  # mixed lengths, not multiples of the block
    extra = _rule_inputs(rule, g, batch, m.num_kv_heads, m.num_q_heads, m.head_dim, prompt)
    layer.prefill(k, v, lengths=lengths, **extra)
    decoder.prefill(cache, k, v, lengths=lengths, **extra)
    for step in range(40):
        q = torch.randn(batch, m.num_q_heads, m.head_dim, generator=g)
        k_new = torch.randn(batch, m.num_kv_heads, m.head_dim, generator=g)
        v_new = torch.randn(batch, m.num_kv_heads, m.head_dim, generator=g)
        extra = _rule_inputs(rule, g, batch, m.num_kv_heads, m.num_q_heads, m.head_dim)
        got = layer(q, k_new, v_new, **extra)
        want = decoder.step(q, k_new, v_new, cache, attend, **extra)
        assert got.shape == (batch, m.num_q_heads, m.head_dim)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert layer.cache.lengths == [prompt + 40, prompt - 113 + 40]
    if rule == "gate":  # the gate is a submodule: trainable and saved with the layer
        assert any(n.startswith("gate.") for n, _ in layer.named_parameters())
