"""From a spec to one layer's whole method: the KV cache its rule needs and the rule's
decoder (metadata, scoring, selection), whatever the rule.

Each decoder's `prefill(cache, k, v, ...)` fills the cache and the rule's state in one pass and
its `step(q, k_new, v_new, cache, attend, ...)` is one decode step: append, update the
metadata, score, select, attend. The emitted package wraps these in `SparseAttentionLayer`.
"""
from __future__ import annotations

import math

import torch

from .kv_cache import KVCache

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def make_cache(spec, batch: int, capacity: int, device="cpu", dtype=None,
               num_pages: int | None = None) -> KVCache:
    """The cache layout the spec names, sized for `capacity` tokens per sequence.

    Paged caches get `num_pages` pages (default: every sequence at full capacity); a
    milestone cache needs only prefill + budget pages per sequence, which is its point."""
    m, c = spec.model, spec.cache
    dtype = dtype or _DTYPES[m.dtype]
    if c.layout == "paged" and num_pages is None:
        num_pages = batch * math.ceil(capacity / c.page_size)
    return KVCache(batch, m.num_kv_heads, m.head_dim, capacity, dtype=dtype, device=device,
                   layout=c.layout, page_size=c.page_size or 0, num_pages=num_pages)


def make_decoder(spec, cache: KVCache, layer: int = 0, impl: str | None = None, gate=None,
                 kernel_configs: dict | None = None):
    """The rule's decoder for `layer`. impl "triton" uses the generated scoring/selection
    kernels (the default on CUDA), "torch" the method reference (the default elsewhere).
    A gate rule takes its trained AttnGate (`gate`); without one it starts untrained.
    kernel_configs: {rule kernel name: config} (tuned ones, see sparsegen.plan.rule_kernels);
    the others run their default config. A layer in the spec's dense_layers attends every
    block (the gate and topk decoders have their own dense path)."""
    n = spec.model.num_layers
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
        raise ValueError(f"layer must be the layer's index in the model, an int from 0 to "
                         f"{n - 1} (the spec's model.num_layers is {n}); got {layer!r}")
    impl = impl or ("triton" if cache.device.type == "cuda" else "torch")
    kc = kernel_configs or {}
    rule = spec.selection.rule
    if rule == "gate":
        from .decode_step import GateDecoder
        from .gate import AttnGate

        gate = (check_gate_fits(spec, gate) if gate is not None
                else AttnGate.from_spec(spec)).to(cache.device)
        return GateDecoder.from_spec(spec, gate, cache.batch, cache.capacity, layer,
                                     device=cache.device, impl=impl, kc_dtype=cache.k.dtype,
                                     kernel_configs=kc)
    if rule == "topk":
        from .decode_step import TopkDecoder

        return TopkDecoder.from_spec(spec, cache, layer, impl=impl, kernel_configs=kc)
    if rule in ("entmax", "milestone") and layer in spec.model.dense_layers:
        from .decode_step import DenseDecoder

        return DenseDecoder(spec.selection, cache.capacity)
    if rule == "entmax":
        from .entmax import EntmaxDecoder

        selector = prefill = None
        if impl == "triton":
            from ..codegen.entmax_kernels import EntmaxStatic
            from ..codegen.entmax_prefill import EntmaxPrefillTriton
            from ..codegen.entmax_tau import EntmaxTau

            static = EntmaxStatic.from_spec(spec)
            selector = EntmaxTau(static, kc.get("entmax_tau"), scale=spec.selection.entmax.scale)
            if "prefill" in spec.phases:
                prefill = EntmaxPrefillTriton(static, kc.get("entmax_prefill")).attention
        # impl torch: the method reference throughout, block summaries included
        dec = EntmaxDecoder.from_spec(spec, selector=selector, prefill_attention=prefill,
                                      append_impl="auto" if impl == "triton" else "torch")
        dec.pool.to(cache.device)  # trainable before the first decode step
        return dec
    if rule == "milestone":
        from .milestone import MilestoneDecoder

        scorer = None
        if impl == "triton":
            from ..codegen.milestone_kernels import MilestoneScoreTriton, MilestoneStatic

            scorer = MilestoneScoreTriton(MilestoneStatic.from_spec(spec),
                                          kc.get("milestone_score"))
        return MilestoneDecoder.from_spec(spec, scorer=scorer,
                                          selector_config=kc.get("milestone_select"))
    raise ValueError(f"unknown rule {rule!r}")


# what a trained gate must share with the spec it decodes (rope_theta and eps may differ)
_GATE_SHAPE = ("num_q_heads", "num_kv_heads", "head_dim", "block_size", "d_gate", "pooling",
               "rope", "rmsnorm", "query_reduction")


def check_gate_fits(spec, gate):
    """gate, if it is an AttnGate of this spec's shape (e.g. one `load_gates` read from a
    `sparsegen distill` of it); else a TypeError / ValueError naming the difference."""
    from .gate import AttnGate

    if not isinstance(gate, AttnGate):
        raise TypeError(f"gate must be an AttnGate (sparsegen.methods.gate.load_gates reads "
                        f"them), got {type(gate).__name__}")
    have, want = gate.config(), AttnGate.from_spec(spec).config()
    diff = [f"{k} {have[k]} (spec: {want[k]})" for k in _GATE_SHAPE if have[k] != want[k]]
    if diff:
        raise ValueError(f"the gate does not fit spec {spec.name!r}: " + ", ".join(diff)
                         + "; train gates for this spec with `sparsegen distill`")
    return gate


def check_step_inputs(spec, cache: KVCache, decoder, q, k_new, v_new, rule_inputs) -> None:
    """A decode step's inputs against the layer, before anything changes (a bad step must
    not append its token): q [B, Hq, D], k_new / v_new [B, Hkv, D] on the cache's device;
    the gate rule outside its dense layers also needs q_nope shaped like q and k_nope
    like k_new (the pre-RoPE query and key)."""
    m, B = spec.model, cache.batch
    want = {"q": (B, m.num_q_heads, m.head_dim), "k_new": (B, m.num_kv_heads, m.head_dim),
            "v_new": (B, m.num_kv_heads, m.head_dim)}
    given = {"q": q, "k_new": k_new, "v_new": v_new}
    if spec.selection.rule == "gate" and not getattr(decoder, "dense", True):
        want.update(q_nope=want["q"], k_nope=want["k_new"])
        given.update(q_nope=rule_inputs.get("q_nope"), k_nope=rule_inputs.get("k_nope"))
    for name, shape in want.items():
        t = given[name]
        if t is None:
            raise ValueError(f"the {spec.selection.rule} rule's step needs {name} "
                             f"[{', '.join(map(str, shape))}]")
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be [{', '.join(map(str, shape))}] (the layer's "
                             f"batch, heads and head dim); got {got}")
        if t.device != cache.device:
            raise ValueError(f"{name} is on {t.device} and the layer's cache on "
                             f"{cache.device}: move one of them")
