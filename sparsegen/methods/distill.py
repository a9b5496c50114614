"""Gate self-distillation (SeerAttention-R): the target from the model's own attention and the
KL loss that trains the gate towards it.

target[b, h, t, j] = for query token t and key block j strictly before t's block: the largest
attention probability of any token of block j, over the G query heads of KV head h (the
model's causal softmax over all keys s <= t, current block included), renormalised over j to
sum to 1. A row with no earlier block (t < block_size) is all zeros and carries no loss.

`distill_target_reference` is plain torch and independent of the kernel: it materialises the
probabilities of a chunk of query rows with torch.softmax (memory O(chunk x S)) and block-maxes
them; the kernel (sparsegen.codegen.distill_kernels) never forms probabilities at all.
"""
from __future__ import annotations

import torch


def distill_target_reference(q: torch.Tensor, k: torch.Tensor, block_size: int,
                             sm_scale: float | None = None, chunk: int = 512,
                             compute_dtype=torch.float32) -> torch.Tensor:
    """q [B, S, Hq, D], k [B, S, Hkv, D] (post-RoPE) -> target [B, Hkv, S, NB] fp32."""
    B, S, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    nb = -(-S // block_size)
    scale = D ** -0.5 if sm_scale is None else sm_scale
    kk = k.to(compute_dtype).repeat_interleave(G, dim=2)                 # [B, S, Hq, D]
    out = torch.zeros(B, Hkv, S, nb, dtype=torch.float32, device=q.device)
    for c0 in range(0, S, chunk):
        c1 = min(S, c0 + chunk)
        logits = torch.einsum("bthd,bshd->bhts", q[:, c0:c1].to(compute_dtype),
                              kk[:, :c1]) * scale                          # [B, Hq, c, c1]
        t = torch.arange(c0, c1, device=q.device)
        causal = torch.arange(c1, device=q.device)[None, :] <= t[:, None]
        probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)
        probs = torch.nn.functional.pad(probs, (0, nb * block_size - c1))
        bmax = probs.view(B, Hq, c1 - c0, nb, block_size).amax(-1)         # [B, Hq, c, NB]
        gmax = bmax.view(B, Hkv, G, c1 - c0, nb).amax(2)
        earlier = torch.arange(nb, device=q.device)[None, :] < (t // block_size)[:, None]
        gmax = gmax.masked_fill(~earlier, 0.0)
        total = gmax.sum(-1, keepdim=True)
        out[:, :, c0:c1] = torch.where(total > 0, gmax / torch.where(total > 0, total, 1),
                                       0).float()
    return out


def distill_target(q: torch.Tensor, k: torch.Tensor, block_size: int,
                   sm_scale: float | None = None, impl: str = "auto",
                   config: dict | None = None) -> torch.Tensor:
    """The target through the generated kernel (impl "triton"; "auto" = on CUDA tensors) or
    the reference (impl "torch")."""
    if impl == "auto":
        impl = "triton" if q.is_cuda else "torch"
    if impl == "torch":
        return distill_target_reference(q, k, block_size, sm_scale)
    from ..codegen.distill_kernels import DistillStatic
    from ..codegen.triton_kernel import dtype_name

    static = DistillStatic(block_size, q.shape[-1], q.shape[2] // k.shape[2],
                           dtype_name(q.dtype))
    return _kernel(static, config)(q, k, sm_scale)


_KERNELS: dict = {}


def _kernel(static, config):
    from ..codegen.distill_kernels import TritonDistillTarget

    key = (static, tuple(sorted((config or {}).items())))
    if key not in _KERNELS:
        _KERNELS[key] = TritonDistillTarget(static, config)
    return _KERNELS[key]


def gate_kl_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KL(target || softmax(logits)) summed over blocks, averaged over the rows that have an
    earlier block. logits [..., NB] with -inf where a block is not allowed; target [..., NB]
    (rows sum to 1 or are all zero)."""
    target = target.float()
    valid = target.sum(-1, keepdim=True) > 0
    # rows with no allowed block are all -inf: give them finite logits so no NaN reaches
    # the gradient (they carry no loss)
    logits = torch.where(valid, logits.float(), torch.zeros_like(logits, dtype=torch.float32))
    logq = torch.log_softmax(logits, -1)
    pos = target > 0
    kl = torch.where(pos, target * (torch.log(torch.where(pos, target, 1.0)) - logq), 0.0)
    rows = valid.sum().clamp(min=1)
    return kl.sum() / rows
