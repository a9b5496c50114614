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


def test_entmax_layer_trains_its_pool_through_prefill_attention(tmp_path):
    """The entmax layer's training forward: gradients reach q, k, v and the layer's pool
    (a saved submodule) as in the method's torch prefill; a step of training changes the
    pool the decode summarises new blocks with. Other rules say what to change."""
    from sparsegen.methods.entmax import EntmaxRule, entmax_prefill

    spec = load_spec(next(p for p in SPECS if p.stem == "dash-entmax"))
    mod = load_package(build_package(make_plan(spec), tmp_path))
    m = spec.model
    layer = mod.SparseAttentionLayer(1, 256, dtype=torch.float64, impl="torch")
    assert [n for n, _ in layer.named_parameters()] == ["pool.w"]
    assert "pool.w" in layer.state_dict()
    g = torch.Generator().manual_seed(3)
    T = 200  # four blocks of 64 and a partial one
    q = torch.randn(1, T, m.num_q_heads, m.head_dim, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, T, m.num_kv_heads, m.head_dim, generator=g, dtype=torch.float64)
            for _ in range(2))
    with torch.no_grad():
        layer.pool.w.normal_(generator=g)
    w0 = layer.pool.w.detach().clone()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = layer.prefill_attention(*leaves)
    do = torch.randn(out.shape, generator=g, dtype=torch.float64)
    out.backward(do)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v, w0)]
    rule = EntmaxRule.from_spec(spec)
    want, _ = entmax_prefill(*ref_leaves, rule, block_ops=None)
    want.backward(do)
    torch.testing.assert_close(out, want)
    for a, b in zip([t.grad for t in leaves] + [layer.pool.w.grad],
                    [t.grad for t in ref_leaves]):
        torch.testing.assert_close(a, b)
    assert layer.pool.w.grad.abs().sum() > 0
    torch.optim.SGD(layer.pool.parameters(), lr=10.0).step()
    assert not torch.equal(layer.decoder.w, w0)
    torch.testing.assert_close(layer.decoder.w, layer.pool.w.detach(), rtol=0, atol=0)

    quest = load_spec(next(p for p in SPECS if p.stem == "quest-topk"))
    other = load_package(build_package(make_plan(quest), tmp_path / "o"))
    lay = other.SparseAttentionLayer(1, 256, dtype=torch.float32, impl="torch")
    with pytest.raises(ValueError, match="rule 'topk'.*add `prefill` to phases"):
        lay.prefill_attention(q.float(), k.float(), v.float())


@pytest.mark.parametrize("spec_path", SPECS, ids=lambda p: p.stem)
def test_a_bad_step_is_named_and_appends_nothing(spec_path, tmp_path):
    """A step with q, k_new or v_new of another batch, head count or head dim (or, for the
    gate, without its pre-RoPE inputs) raises a ValueError naming the input, before the
    cache or the rule's state change; a good step afterwards still works."""
    spec = load_spec(spec_path)
    mod = load_package(build_package(make_plan(spec), tmp_path))
    m, rule = spec.model, spec.selection.rule
    B, Hq, Hkv, D = 2, m.num_q_heads, m.num_kv_heads, m.head_dim
    layer = mod.SparseAttentionLayer(B, 256, dtype=torch.float32, impl="torch")
    g = torch.Generator().manual_seed(0)
    k = torch.randn(B, 100, Hkv, D, generator=g)
    layer.prefill(k, k.clone(), **_rule_inputs(rule, g, B, Hkv, Hq, D, 100))
    before = (layer.cache.k.clone(), list(layer.cache.lengths))

    def good():
        return {"q": torch.randn(B, Hq, D, generator=g),
                "k_new": torch.randn(B, Hkv, D, generator=g),
                "v_new": torch.randn(B, Hkv, D, generator=g),
                **_rule_inputs(rule, g, B, Hkv, Hq, D)}
    bad = [("q", torch.randn(B, Hq + 1, D)), ("q", torch.randn(B + 1, Hq, D)),
           ("k_new", torch.randn(B, Hkv, D // 2)), ("v_new", torch.randn(B, Hkv + 1, D))]
    if rule == "gate":
        bad += [("q_nope", None), ("k_nope", torch.randn(B, Hkv, 3))]
    for name, value in bad:
        args = good()
        args[name] = value
        with pytest.raises(ValueError, match=name):
            layer(args.pop("q"), args.pop("k_new"), args.pop("v_new"), **args)
        assert torch.equal(layer.cache.k, before[0]) and layer.cache.lengths == before[1]
    args = good()
    out = layer(args.pop("q"), args.pop("k_new"), args.pop("v_new"), **args)
    assert out.shape == (B, Hq, D) and layer.cache.lengths == [101, 101]


@pytest.mark.parametrize("spec_path", [p for p in SPECS if p.stem in ("nsa-topk",
                                                                         "raas-milestone")],
                         ids=lambda p: p.stem)
def test_layer_replayed_brings_the_host_record_up(spec_path, tmp_path, monkeypatch):
    """layer.replayed(steps) advances the host's token counts after a later graph replay
    (the decoder's own replayed where it keeps more, as milestone's step number); a bad
    count is refused with nothing changed. (The replays themselves: the GPU tests.)"""
    spec = load_spec(spec_path)
    mod = load_package(build_package(make_plan(spec), tmp_path))
    m = spec.model
    layer = mod.SparseAttentionLayer(2, 256, dtype=torch.float32, impl="torch")
    k = torch.randn(2, 40, m.num_kv_heads, m.head_dim)
    layer.prefill(k, k, lengths=[40, 33])
    with pytest.raises(ValueError, match="step"):
        layer.replayed(0)
    assert layer.cache.lengths == [40, 33]
    calls = []
    if spec.selection.rule == "milestone":
        monkeypatch.setattr(layer.decoder, "replayed",
                            lambda cache, steps: calls.append(steps) or cache.replayed(steps))
    layer.replayed(5)
    assert layer.cache.lengths == [45, 38]
    assert calls == ([5] if spec.selection.rule == "milestone" else [])


def test_a_gate_of_another_shape_or_type_is_refused(tmp_path):
    """The layer takes a trained gate only if it fits the spec (heads, head dim, block,
    d_gate, pooling, RoPE, RMSNorm, query reduction); load_package refuses a folder that is
    not a built package."""
    from sparsegen.errors import SparsegenError
    from sparsegen.methods.gate import AttnGate

    spec = load_spec(next(p for p in SPECS if p.stem == "seer-attention-r"))
    mod = load_package(build_package(make_plan(spec), tmp_path))
    fits = AttnGate.from_spec(spec)
    assert mod.SparseAttentionLayer(1, 256, gate=fits).gate is fits
    with pytest.raises(TypeError, match="must be an AttnGate"):
        mod.SparseAttentionLayer(1, 256, gate={"q_weight": None})
    m, s = spec.model, spec.selection
    for kw, what in (({"num_kv_heads": m.num_kv_heads // 2}, "num_kv_heads"),
                     ({"block_size": s.block_size * 2}, "block_size"),
                     ({"d_gate": s.gate.d_gate // 2}, "d_gate"),
                     ({"rmsnorm": not s.gate.rmsnorm}, "rmsnorm")):
        args = {**fits.config(), **kw}
        with pytest.raises(ValueError, match=f"does not fit spec .*{what}"):
            mod.SparseAttentionLayer(1, 256, gate=AttnGate(**args))
    with pytest.raises(SparsegenError, match="is not a package"):
        load_package(tmp_path)
