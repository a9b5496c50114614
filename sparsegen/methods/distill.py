"""Gate self-distillation (SeerAttention-R): the target from the model's own attention and the
KL loss that trains the gate towards it.

target[b, h, t, j] = for query token t and key block j strictly before t's block: the largest
attention probability of any token of block j, over the G query heads of KV head h (the
model's causal softmax over all keys s <= t, current block included), renormalised over j to
sum to 1. A row with no earlier block (t < block_size) is all zeros and carries no loss.

`distill_target_reference` is plain torch and independent of the kernel: it materialises the
probabilities of a chunk of query rows with torch.softmax (memory O(chunk x S)) and block-maxes
them; the kernel (sparsegen.codegen.distill_kernels) never forms probabilities at all. Both
compute any range of query rows, so `gate_distill_loss` can walk the sequence in row chunks:
its memory, forward and backward, is linear in S for a fixed chunk (the whole target is
[S, S / block_size] per KV head, quadratic).
"""
from __future__ import annotations

import torch

from .gate import block_logits

# a chunk's target rows take about this much (fp32); the chunk's logits, log-softmax and
# their gradients a small multiple of it
CHUNK_TARGET_BYTES = 32 << 20


def row_range(seq_len: int, row_start: int = 0, num_rows: int | None = None) -> tuple[int, int]:
    """(first, end) of the query rows [row_start, row_start + num_rows) of a sequence of
    seq_len tokens (num_rows None: to the end); ValueError if they do not lie inside it."""
    num_rows = seq_len - row_start if num_rows is None else num_rows
    if not (0 <= row_start < seq_len and 1 <= num_rows <= seq_len - row_start):
        raise ValueError(f"query rows [{row_start}, {row_start} + {num_rows}) do not lie in a "
                         f"sequence of {seq_len} tokens")
    return row_start, row_start + num_rows


def distill_target_reference(q: torch.Tensor, k: torch.Tensor, block_size: int,
                             sm_scale: float | None = None, chunk: int = 512,
                             compute_dtype=torch.float32, row_start: int = 0,
                             num_rows: int | None = None) -> torch.Tensor:
    """q [B, S, Hq, D], k [B, S, Hkv, D] (post-RoPE) -> the target of query rows
    [row_start, row_start + num_rows) (default: all), [B, Hkv, rows, NB] fp32 with
    NB = ceil(row end / block_size): the blocks those rows' causal keys touch."""
    B, S, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    r0, r1 = row_range(S, row_start, num_rows)
    nb = -(-r1 // block_size)
    scale = D ** -0.5 if sm_scale is None else sm_scale
    kk = k[:, :r1].to(compute_dtype).repeat_interleave(G, dim=2)        # [B, r1, Hq, D]
    out = torch.zeros(B, Hkv, r1 - r0, nb, dtype=torch.float32, device=q.device)
    for c0 in range(r0, r1, chunk):
        c1 = min(r1, c0 + chunk)
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
        out[:, :, c0 - r0:c1 - r0] = torch.where(total > 0, gmax / torch.where(total > 0, total, 1),
                                                 0).float()
    return out


def distill_target(q: torch.Tensor, k: torch.Tensor, block_size: int,
                   sm_scale: float | None = None, impl: str = "auto",
                   config: dict | None = None, row_start: int = 0,
                   num_rows: int | None = None) -> torch.Tensor:
    """The target (of query rows [row_start, row_start + num_rows), default all) through the
    generated kernel (impl "triton"; "auto" = on CUDA tensors) or the reference ("torch")."""
    if impl == "auto":
        impl = "triton" if q.is_cuda else "torch"
    if impl == "torch":
        return distill_target_reference(q, k, block_size, sm_scale, row_start=row_start,
                                        num_rows=num_rows)
    if impl != "triton":
        raise ValueError(f"impl {impl!r} is not auto, triton or torch")
    from ..codegen.distill_kernels import DistillStatic, TritonDistillTarget
    from ..codegen.triton_kernel import dtype_name

    static = DistillStatic(block_size, q.shape[-1], q.shape[2] // k.shape[2],
                           dtype_name(q.dtype))
    return TritonDistillTarget.shared(static, config)(q, k, sm_scale, row_start, num_rows)


def _kl_sum(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over rows and blocks of KL(target || softmax(logits)), number of rows that have an
    earlier block)."""
    target = target.float()
    valid = target.sum(-1, keepdim=True) > 0
    # rows with no allowed block are all -inf: give them finite logits so no NaN reaches
    # the gradient (they carry no loss)
    logits = torch.where(valid, logits.float(), torch.zeros_like(logits, dtype=torch.float32))
    logq = torch.log_softmax(logits, -1)
    pos = target > 0
    kl = torch.where(pos, target * (torch.log(torch.where(pos, target, 1.0)) - logq), 0.0)
    return kl.sum(), valid.sum()


def gate_kl_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KL(target || softmax(logits)) summed over blocks, averaged over the rows that have an
    earlier block. logits [..., NB] with -inf where a block is not allowed; target [..., NB]
    (rows sum to 1 or are all zero)."""
    total, rows = _kl_sum(logits, target)
    return total / rows.clamp(min=1)


# --- the row-chunked loss: memory linear in S ------------------------------------------------
def default_chunk_rows(batch: int, kv_heads: int, seq_len: int, block_size: int) -> int:
    """Query rows per chunk so that a chunk's target is about CHUNK_TARGET_BYTES: a short
    sequence is one chunk, a long one many chunks of constant size (a multiple of 64 rows)."""
    row_bytes = 4 * batch * kv_heads * -(-seq_len // block_size)
    return min(seq_len, max(64, CHUNK_TARGET_BYTES // row_bytes // 64 * 64))


def chunk_gate_logits(qg: torch.Tensor, kg: torch.Tensor, row_start: int,
                      block_size: int) -> torch.Tensor:
    """AttnGate.forward's logits of query rows [row_start, row_start + n) (block_logits),
    cut to the blocks strictly before the last row's block: the columns after are -inf in
    these rows, so they are left out."""
    nbv = (row_start + qg.shape[1] - 1) // block_size
    return block_logits(qg, kg, row_start, block_size, nbv)


def _chunk_pass(qg, kg, block_size, target_rows, chunk, want_grad):
    """Walk the query rows in chunks: per chunk its target rows, its gate logits and its KL
    sum; with want_grad also d(sum)/d(qg) and d(sum)/d(kg), so that no chunk's logits outlive
    the chunk. Returns (KL sum, valid rows, grad qg or None, grad kg or None)."""
    S = qg.shape[1]
    total = torch.zeros((), dtype=torch.float32, device=qg.device)
    rows = torch.zeros((), dtype=torch.int64, device=qg.device)
    gq = torch.zeros_like(qg) if want_grad and qg.requires_grad else None
    gk = torch.zeros_like(kg) if want_grad and kg.requires_grad else None
    kd = kg.detach().requires_grad_(gk is not None)
    for r0 in range(block_size, S, chunk):       # rows of block 0 have no earlier block
        r1 = min(S, r0 + chunk)
        target = target_rows(r0, r1 - r0)
        qc = qg[:, r0:r1].detach().requires_grad_(gq is not None)
        with torch.enable_grad() if want_grad else torch.no_grad():
            logits = chunk_gate_logits(qc, kd, r0, block_size)
            part, valid = _kl_sum(logits, target[..., :logits.shape[-1]])
        if want_grad:
            wrt = [x for x in (qc, kd) if x.requires_grad]
            grads = iter(torch.autograd.grad(part, wrt))
            if gq is not None:
                gq[:, r0:r1] = next(grads)
            if gk is not None:
                gk += next(grads)
        total += part.detach()
        rows += valid
        del target, logits, part
    return total, rows, gq, gk


class _ChunkedKL(torch.autograd.Function):
    """KL sum over row chunks whose gradients (w.r.t. the gate queries and keys) are taken
    chunk by chunk in the forward: backward keeps only those two linear-size tensors."""

    @staticmethod
    def forward(ctx, qg, kg, block_size, target_rows, chunk):
        total, rows, gq, gk = _chunk_pass(qg, kg, block_size, target_rows, chunk, True)
        ctx.save_for_backward(*(g for g in (gq, gk) if g is not None))
        ctx.has = (gq is not None, gk is not None)
        ctx.mark_non_differentiable(rows)
        return total, rows

    @staticmethod
    def backward(ctx, grad_total, grad_rows):
        saved = iter(ctx.saved_tensors)
        gq, gk = (next(saved) * grad_total if h else None for h in ctx.has)
        return gq, gk, None, None, None


def gate_distill_loss(gate, q_nope: torch.Tensor, k_nope: torch.Tensor, q_post: torch.Tensor,
                      k_post: torch.Tensor, sm_scale: float | None = None,
                      chunk_rows: int | None = None, impl: str = "auto",
                      config: dict | None = None) -> torch.Tensor:
    """gate_kl_loss(gate(q_nope, k_nope), distill_target(q_post, k_post, ...)) computed in
    chunks of query rows, with peak memory (forward and backward) linear in S for a fixed
    chunk: the gate's queries (per row) and block keys (per block) are computed once and
    sliced; each chunk's target rows (kernel or torch, as `impl` says), logits and KL are
    freed before the next chunk. q_nope / q_post [B, S, Hq, D], k_nope / k_post
    [B, S, Hkv, D] (pre-RoPE for the gate, post-RoPE for the target). chunk_rows: query rows
    per chunk (default_chunk_rows when None)."""
    if q_nope.dim() != 4 or k_nope.dim() != 4:
        raise ValueError(f"q_nope {tuple(q_nope.shape)} and k_nope {tuple(k_nope.shape)} must "
                         "be [B, S, H, D]")
    B, S = q_nope.shape[:2]
    Hq, Hkv, D = gate.num_q_heads, gate.num_kv_heads, gate.head_dim
    for name, x, w in (("q_nope", q_nope, (B, S, Hq, D)), ("k_nope", k_nope, (B, S, Hkv, D)),
                       ("q_post", q_post, (B, S, Hq, None)),
                       ("k_post", k_post, (B, S, Hkv, None))):  # None: any head dim
        if x.dim() != 4 or any(a is not None and a != b for a, b in zip(w, x.shape)):
            raise ValueError(f"{name} has shape {tuple(x.shape)}; the gate wants "
                             f"[{B}, {S}, {w[2]}, {w[3] or 'D'}]")
    if q_post.shape[-1] != k_post.shape[-1]:
        raise ValueError(f"q_post {tuple(q_post.shape)} and k_post {tuple(k_post.shape)} differ "
                         "in head dim")
    bs = gate.block_size
    chunk = default_chunk_rows(B, Hkv, S, bs) if chunk_rows is None else chunk_rows
    if chunk < 1:
        raise ValueError(f"chunk_rows={chunk_rows} must be >= 1")
    qg, kg = gate.gate_qk(q_nope, k_nope)          # linear in S

    def target_rows(r0, n):
        with torch.no_grad():
            return distill_target(q_post, k_post, bs, sm_scale, impl, config, r0, n)

    if torch.is_grad_enabled() and (qg.requires_grad or kg.requires_grad):
        total, rows = _ChunkedKL.apply(qg, kg, bs, target_rows, chunk)
    else:
        total, rows, _, _ = _chunk_pass(qg, kg, bs, target_rows, chunk, False)
    return total / rows.clamp(min=1)
