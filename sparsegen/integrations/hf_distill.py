"""Gate self-distillation on a Hugging Face causal LM (Llama, Qwen2, Qwen3 layouts).

The base model runs unchanged under no_grad. Each attention module of these families calls
its modeling file's module-level `apply_rotary_pos_emb(q, k, cos, sin)` with the pre-RoPE
query and key ([B, H, S, D], after Qwen3's q/k norms) and returns the post-RoPE pair; wrapping
that function (while a forward pre-hook names the calling layer) gives both without copying
the model's code. Per layer: the target comes from the post-RoPE q/k (the model's own
attention), the gate's logits from the pre-RoPE q/k, and the KL loss flows into the gate's
parameters only. The loss walks the query rows in chunks (`gate_distill_loss`), so neither the
target nor the logits of the whole sequence ([S, S / block_size] per KV head) ever exist: what
a layer keeps for backward is linear in the sequence length.
"""
from __future__ import annotations

import contextlib
import sys

import torch
from torch import nn

from ..errors import SparsegenError
from ..methods.distill import gate_distill_loss
from ..methods.gate import AttnGate

SUPPORTED = ("llama", "qwen2", "qwen3")


def model_shape(config) -> dict:
    """Heads, head dim and layers of a transformers config."""
    heads = config.num_attention_heads
    return {"num_q_heads": heads,
            "num_kv_heads": getattr(config, "num_key_value_heads", None) or heads,
            "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
            "num_layers": config.num_hidden_layers}


def attention_layers(model) -> list[nn.Module]:
    """The self-attention module of each decoder layer, in layer order."""
    model_type = getattr(model.config, "model_type", "?")
    if model_type not in SUPPORTED:
        raise SparsegenError(f"model type {model_type!r} is not supported by `sparsegen distill` "
                             f"(supported: {', '.join(SUPPORTED)})")
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(base, "layers", None)
    if layers is None:
        raise SparsegenError(f"cannot find the decoder layers of this {model_type} model")
    return [layer.self_attn for layer in layers]


@contextlib.contextmanager
def capture_rope(attn_modules, on_rope):
    """Inside the block, every attention module's RoPE call also runs
    on_rope(layer, module, q_pre, k_pre, q_post, k_post) (tensors [B, H, S, D])."""
    state = {"module": None}
    index = {id(m): i for i, m in enumerate(attn_modules)}
    modeling = {sys.modules[type(m).__module__] for m in attn_modules}
    originals = {}
    for mod in modeling:
        if not hasattr(mod, "apply_rotary_pos_emb"):
            raise SparsegenError(f"{mod.__name__} has no apply_rotary_pos_emb to capture q/k "
                                 "from; this transformers version is not supported")
        originals[mod] = mod.apply_rotary_pos_emb

    def wrap(orig):
        def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
            q_post, k_post = orig(q, k, cos, sin, *args, **kwargs)
            module = state["module"]
            if module is not None:
                on_rope(index[id(module)], module, q, k, q_post, k_post)
            return q_post, k_post
        return apply_rotary_pos_emb

    def pre_hook(module, args, kwargs):
        state["module"] = module

    handles = [m.register_forward_pre_hook(pre_hook, with_kwargs=True) for m in attn_modules]
    try:
        for mod, orig in originals.items():
            mod.apply_rotary_pos_emb = wrap(orig)
        yield
    finally:
        for mod, orig in originals.items():
            mod.apply_rotary_pos_emb = orig
        for h in handles:
            h.remove()
        state["module"] = None


class GateDistiller(nn.Module):
    """The AttnGates of one model (every layer outside the spec's dense_layers) and the loss
    of one batch of token sequences."""

    def __init__(self, model, spec, target_impl: str = "auto", target_config=None,
                 chunk_rows: int | None = None):
        super().__init__()
        shape = model_shape(model.config)
        want = {k: getattr(spec.model, k) for k in ("num_q_heads", "num_kv_heads", "head_dim")}
        have = {k: shape[k] for k in want}
        if want != have:
            raise SparsegenError(f"{spec.source}: model section {want} does not match the model "
                                 f"({have}); the gates must fit the decode kernels")
        if spec.selection.rule != "gate":
            raise SparsegenError(f"{spec.source}: selection.rule is {spec.selection.rule}; "
                                 "`sparsegen distill` trains the gate rule")
        self.model = model
        self.attn = attention_layers(model)
        dense = set(spec.model.dense_layers)
        self.gates = nn.ModuleDict({str(i): AttnGate.from_spec(spec)
                                    for i in range(len(self.attn)) if i not in dense})
        self.target_impl, self.target_config = target_impl, target_config
        self.chunk_rows = chunk_rows        # None: methods.distill.default_chunk_rows

    def gate_dict(self) -> dict:
        return {int(i): g for i, g in self.gates.items()}

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Mean KL over the gated layers for input_ids [B, S], and each layer's loss."""
        losses = {}

        def on_rope(layer, module, q, k, q_post, k_post):
            if str(layer) not in self.gates:     # a dense layer has no gate
                return
            gate = self.gates[str(layer)]
            scale = getattr(module, "scaling", q.shape[-1] ** -0.5)
            with torch.enable_grad():
                losses[layer] = gate_distill_loss(
                    gate, q.transpose(1, 2).detach(), k.transpose(1, 2).detach(),
                    q_post.transpose(1, 2), k_post.transpose(1, 2), scale,
                    chunk_rows=self.chunk_rows, impl=self.target_impl,
                    config=self.target_config)

        base = self.model.get_decoder() if hasattr(self.model, "get_decoder") else self.model
        with capture_rope(self.attn, on_rope), torch.no_grad():
            base(input_ids=input_ids, use_cache=False)
        if not losses:
            raise SparsegenError("no attention layer was captured; is every layer dense?")
        return torch.stack(list(losses.values())).mean(), losses
